"""Course tooling: the student version of the notebooks, and running one exercise's cells.

The notebooks in ``notebooks/`` are the *instructor* version: every exercise's solution sits in
the cell, between the delimiters that nbgrader (the usual Jupyter autograding tool) understands,
and every cell of an exercise carries nbgrader's cell metadata, so nbgrader itself can consume
the notebooks unchanged:

* code cells: ``### BEGIN SOLUTION`` / ``### END SOLUTION`` around the solution (text after
  ``BEGIN SOLUTION`` on the same line, e.g. ``### BEGIN SOLUTION hint: use np.cumsum``, is the
  one-line hint the student version shows), ``### BEGIN HIDDEN TESTS`` / ``### END HIDDEN TESTS``
  around checks the student version leaves out;
* markdown cells: the model answer of a conceptual question between the same solution delimiters;
* metadata ``nbgrader: {grade_id, solution, grade, points, locked, schema_version}`` on every
  exercise cell, and ``ponder: {exercise, role}`` (role ``prompt``, ``solution``, ``tests`` or
  ``answer``) so that the student-facing tests can find an exercise's cells.

:func:`build_student_notebooks` writes the student version: solution regions become
``raise NotImplementedError()`` under the hint (``YOUR ANSWER HERE`` in markdown), hidden tests
are removed, outputs cleared. :func:`exercise_namespace` executes one exercise's code cells in a
fresh namespace (what ``tests/exercises`` checks). Only ``nbformat`` is needed (the ``notebooks``
and ``test`` extras), imported when used.

:func:`check_exercises` runs every exercise's cells of a folder of notebooks and says which pass
(an instructor checking the solutions, or a student's copies before handing them in).

Command line (``ponder course``, or ``python -m refimpl.course`` with the same arguments)::

    ponder course student --out student_notebooks [--src notebooks]
    ponder course list [--src notebooks]
    ponder course check [--src my_notebooks] [--exercise ex06_2 ...]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

BEGIN_SOLUTION = "### BEGIN SOLUTION"
END_SOLUTION = "### END SOLUTION"
BEGIN_HIDDEN = "### BEGIN HIDDEN TESTS"
END_HIDDEN = "### END HIDDEN TESTS"
CODE_STUB = "raise NotImplementedError()"
TEXT_STUB = "YOUR ANSWER HERE"
ROLES = ("prompt", "solution", "tests", "answer")
EXERCISE_ID = re.compile(r"^(ex|q)(\d\d)_\d+$")


class CourseError(ValueError):
    """A notebook's exercise markup is malformed; the message names the notebook and the cell."""


def _nbformat():
    try:
        import nbformat
    except ImportError as error:  # pragma: no cover - nbformat is in the notebooks and test extras
        raise ImportError("refimpl.course needs nbformat: pip install 'ponder[notebooks]'") from error
    return nbformat


def default_notebook_dir():
    """``notebooks/`` of the source checkout this package was imported from."""
    return Path(__file__).resolve().parents[1] / "notebooks"


def _where(path, index, cell):
    grade_id = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")
    return f"{Path(path).name}, cell {index}" + (f" ({grade_id})" if grade_id else "")


def _marker(line):
    """Which delimiter ``line`` is (or None). Delimiters must start the line (after indentation)."""
    stripped = line.strip()
    for marker in (BEGIN_SOLUTION, END_SOLUTION, BEGIN_HIDDEN, END_HIDDEN):
        if stripped.startswith(marker):
            return marker
    return None


def _regions(source, where):
    """Check the delimiters of one cell's source: balanced, not nested. Returns the markers found."""
    found, open_marker = [], None
    for number, line in enumerate(source.splitlines(), start=1):
        marker = _marker(line)
        if marker is None:
            if any(text in line for text in ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS")):
                # nbgrader would take this line for a delimiter; the student version would not
                raise CourseError(f"{where}, line {number}: a delimiter must start its line (after indentation), "
                                  f"got {line.strip()!r}")
            continue
        found.append(marker)
        if marker in (BEGIN_SOLUTION, BEGIN_HIDDEN):
            if open_marker is not None:
                raise CourseError(f"{where}, line {number}: {marker!r} inside an open {open_marker!r} region "
                                  f"(regions cannot nest)")
            open_marker = marker
        else:
            expected = BEGIN_SOLUTION if marker == END_SOLUTION else BEGIN_HIDDEN
            if open_marker != expected:
                raise CourseError(f"{where}, line {number}: {marker!r} without a matching {expected!r} before it")
            open_marker = None
    if open_marker is not None:
        closing = END_SOLUTION if open_marker == BEGIN_SOLUTION else END_HIDDEN
        raise CourseError(f"{where}: {open_marker!r} is never closed by {closing!r}")
    return found


def stub_source(source, cell_type):
    """The student version of one cell's source (delimiters already checked by :func:`check_notebook`).

    A solution region becomes nbgrader's stub (code: the hint after ``### BEGIN SOLUTION`` as a
    comment, or ``# YOUR CODE HERE``, then ``raise NotImplementedError()``; text: ``YOUR ANSWER
    HERE``); a hidden-test region disappears.
    """
    lines, out, skipping = source.splitlines(), [], False
    for line in lines:
        marker = _marker(line)
        if marker == BEGIN_SOLUTION:
            indent = line[: len(line) - len(line.lstrip())]
            hint = line.strip()[len(BEGIN_SOLUTION):].strip()
            if cell_type == "code":
                out.append(indent + (f"# {hint}" if hint else "# YOUR CODE HERE"))
                out.append(indent + CODE_STUB)
            else:
                out.append(TEXT_STUB)
            skipping = True
        elif marker == BEGIN_HIDDEN:
            skipping = True
        elif marker in (END_SOLUTION, END_HIDDEN):
            skipping = False
        elif not skipping:
            out.append(line)
    return "\n".join(out)


def check_notebook(nb, path):
    """Validate the exercise markup of one notebook; returns ``{exercise id: [cell indices]}``.

    Raises :class:`CourseError` naming the notebook and the cell for unbalanced or nested
    delimiters, delimiters in a cell whose nbgrader metadata does not allow them, duplicate
    ``grade_id`` values, and malformed ``ponder`` exercise metadata. In a student version
    (notebook metadata ``ponder.version == "student"``) solution cells hold stubs, not regions.
    """
    exercises, grade_ids = {}, {}
    is_student = nb.metadata.get("ponder", {}).get("version") == "student"
    for index, cell in enumerate(nb.cells):
        where = _where(path, index, cell)
        found = _regions(cell.source, where)
        grading = cell.metadata.get("nbgrader", {})
        if BEGIN_SOLUTION in found and not grading.get("solution"):
            raise CourseError(f"{where}: solution delimiters in a cell whose metadata nbgrader.solution is not true")
        if BEGIN_HIDDEN in found and (cell.cell_type != "code" or not grading.get("grade")):
            raise CourseError(f"{where}: hidden-test delimiters belong in a code cell with nbgrader.grade true")
        if grading:
            grade_id = grading.get("grade_id")
            if not grade_id:
                raise CourseError(f"{where}: nbgrader metadata without a grade_id")
            if grade_id in grade_ids:
                raise CourseError(f"{where}: grade_id {grade_id!r} is also used by cell {grade_ids[grade_id]}")
            grade_ids[grade_id] = index
        exercise = cell.metadata.get("ponder", {}).get("exercise")
        if exercise is None:
            continue
        role = cell.metadata["ponder"].get("role")
        if not EXERCISE_ID.match(exercise):
            raise CourseError(f"{where}: exercise id {exercise!r} is not of the form ex01_2 or q01_1")
        if role not in ROLES:
            raise CourseError(f"{where}: ponder.role must be one of {ROLES}, got {role!r}")
        if role in ("solution", "answer") and BEGIN_SOLUTION not in found and not is_student:
            raise CourseError(f"{where}: a {role} cell of {exercise} has no {BEGIN_SOLUTION!r} region")
        exercises.setdefault(exercise, []).append(index)
    return exercises


def _notebooks(src_dir):
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise FileNotFoundError(f"src_dir must be a directory of notebooks, got {str(src_dir)!r}")
    paths = sorted(src_dir.glob("*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"src_dir {str(src_dir)!r} holds no .ipynb file")
    return paths


def student_notebook(nb, path):
    """The student version of one (instructor) notebook object; ``nb`` itself is not changed."""
    if nb.metadata.get("ponder", {}).get("version") == "student":
        raise CourseError(f"{Path(path).name} is already a student version (metadata ponder.version)")
    check_notebook(nb, path)
    student = _nbformat().from_dict(nb)  # a deep copy
    for cell in student.cells:
        if _regions(cell.source, ""):
            cell.source = stub_source(cell.source, cell.cell_type)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    student.metadata.setdefault("ponder", {})["version"] = "student"
    return student


def build_student_notebooks(src_dir, out_dir):
    """Write the student version of every notebook of ``src_dir`` into ``out_dir``.

    Solution regions become ``raise NotImplementedError()`` under their one-line hint (markdown
    answers: ``YOUR ANSWER HERE``), hidden tests are removed, outputs cleared; every other cell is
    copied as it is. All notebooks are checked before anything is written.

    Returns the list of written paths.
    """
    nbformat = _nbformat()
    paths = _notebooks(src_dir)
    out_dir = Path(out_dir)
    if out_dir.resolve() == Path(src_dir).resolve():
        raise ValueError(f"out_dir must differ from src_dir (it would overwrite the solutions), got {str(out_dir)!r}")
    students = [(path, student_notebook(nbformat.read(path, as_version=4), path)) for path in paths]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path, student in students:
        nbformat.validate(student)
        target = out_dir / path.name
        nbformat.write(student, target)
        written.append(target)
    return written


def list_exercises(src_dir):
    """``[(notebook file name, exercise id, title)]`` in notebook order; the title is the prompt's first bold text."""
    nbformat = _nbformat()
    rows = []
    for path in _notebooks(src_dir):
        nb = nbformat.read(path, as_version=4)
        for exercise, indices in check_notebook(nb, path).items():
            prompt = next((nb.cells[i].source for i in indices if nb.cells[i].metadata["ponder"]["role"] == "prompt"), "")
            title = re.search(r"\*\*(.+?)\*\*", prompt)
            rows.append((path.name, exercise, title.group(1) if title else ""))
    return rows


def find_notebook(src_dir, prefix):
    """The notebook of ``src_dir`` whose file name starts with ``prefix`` (e.g. ``"01"``)."""
    matches = [p for p in _notebooks(src_dir) if p.name.startswith(prefix)]
    if len(matches) != 1:
        raise FileNotFoundError(f"expected one notebook starting with {prefix!r} in {str(src_dir)!r}, "
                                f"found {[p.name for p in matches]}")
    return matches[0]


def exercise_namespace(path, exercise, roles=("solution", "tests")):
    """Execute the code cells of one exercise (those of the given roles, in order) in a fresh namespace.

    Exercises are self-contained by design (their cells import what they use and never need the
    notebook's slow cells), so this runs in a fraction of a second. Exceptions from the cells
    propagate (``NotImplementedError`` from a stub, ``AssertionError`` from a visible test).
    """
    nb = _nbformat().read(path, as_version=4)
    cells = [nb.cells[i] for i in check_notebook(nb, path).get(exercise, [])]
    code = [c for c in cells if c.cell_type == "code" and c.metadata["ponder"]["role"] in roles]
    if not code:
        raise KeyError(f"{Path(path).name} has no code cells of exercise {exercise!r} with roles {roles}")
    namespace = {"__name__": f"exercise_{exercise}"}
    for cell in code:
        exec(compile(cell.source, f"<{Path(path).name} {cell.metadata['nbgrader']['grade_id']}>", "exec"), namespace)
    return namespace


STATUSES = ("passes", "not done", "fails")


def check_exercises(src_dir, exercises=None):
    """Run the code cells of each exercise of the notebooks in ``src_dir`` and say whether they pass.

    Each exercise runs alone (:func:`exercise_namespace`: its solution cell, then its test cells;
    conceptual questions have none and are left out). ``exercises`` (ids such as ``"ex06_2"``)
    restricts the run; an id that no notebook holds is an error.

    Returns
    -------
    list of (notebook file name, exercise id, status, detail): status ``"passes"``, ``"not done"``
    (the stub's ``NotImplementedError``) or ``"fails"`` (detail: the exception's type and first line)
    """
    nbformat = _nbformat()
    wanted = None if exercises is None else list(exercises)
    found, rows = set(), []
    for path in _notebooks(src_dir):
        for exercise in check_notebook(nbformat.read(path, as_version=4), path):
            if not exercise.startswith("ex") or (wanted is not None and exercise not in wanted):
                continue
            found.add(exercise)
            try:
                exercise_namespace(path, exercise)
            except NotImplementedError:
                rows.append((path.name, exercise, "not done", "raise NotImplementedError() still in place"))
            except Exception as error:  # a student's code may raise anything; report it, go on
                first = (str(error).strip().splitlines() or [""])[0][:160]
                rows.append((path.name, exercise, "fails", f"{type(error).__name__}: {first}".rstrip(": ")))
            else:
                rows.append((path.name, exercise, "passes", ""))
    missing = [e for e in (wanted or []) if e not in found]
    if missing:
        raise ValueError(f"exercises must be ids of autograded exercises in {str(src_dir)!r} "
                         f"(e.g. ex06_2, see 'list'), got {missing}")
    return rows


def add_arguments(parser):
    """The subcommands ``student``, ``list`` and ``check`` on ``parser`` (``ponder course`` uses this too)."""
    commands = parser.add_subparsers(dest="course_command", required=True, metavar="{student,list,check}")
    student = commands.add_parser("student", help="write the student version (stubs, no hidden tests)",
                                  description="Write the student version of the notebooks: solutions replaced "
                                              "by stubs under their hints, hidden tests removed, outputs cleared.")
    student.add_argument_group("required arguments").add_argument(
        "--out", required=True, type=Path, help="folder to write the student notebooks to")
    listing = commands.add_parser("list", help="list the exercises of every notebook",
                                  description="List the exercises (and conceptual questions) of every notebook.")
    checking = commands.add_parser("check", help="run every exercise's cells and say which pass",
                                   description="Run each autograded exercise's solution and test cells (never "
                                               "the notebooks' slow cells) and report passes / not done / fails. "
                                               "Exit status 1 unless all pass.")
    checking.add_argument("--exercise", nargs="+", default=None, metavar="ID",
                          help="only these exercises (e.g. ex06_2; default: all)")
    for sub in (student, listing, checking):
        sub.add_argument("--src", type=Path, default=default_notebook_dir(),
                         help="folder of notebooks (default: notebooks/ of this checkout, the instructor version)")


def run(args):
    """Carry out the subcommand parsed by :func:`add_arguments`; returns the exit status.

    Raises :class:`CourseError`, ``FileNotFoundError`` or ``ValueError`` for bad notebooks or arguments.
    """
    if args.course_command == "student":
        for path in build_student_notebooks(args.src, args.out):
            print(path)
        return 0
    if args.course_command == "list":
        for name, exercise, title in list_exercises(args.src):
            print(f"{name:36s} {exercise:7s} {title}")
        return 0
    rows = check_exercises(args.src, args.exercise)
    for name, exercise, status, detail in rows:
        print(f"{name:36s} {exercise:7s} {status:8s} {detail}".rstrip())
    counts = {status: sum(row[2] == status for row in rows) for status in STATUSES}
    print(", ".join(f"{count} {status}" for status, count in counts.items()) + f" (of {len(rows)} exercises)")
    return 0 if counts["passes"] == len(rows) else 1


def main(argv=None):
    """``python -m refimpl.course {student,list,check} ...``; returns the exit code (2 for bad input)."""
    parser = argparse.ArgumentParser(prog="python -m refimpl.course", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (CourseError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
