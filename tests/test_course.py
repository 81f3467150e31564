"""The course tooling (refimpl.course) and the exercise markup of the notebooks.

* the student version builds, is valid, holds no solution, and **every stub fails its exercise's
  check** (the instructor version passing is tests/exercises/test_exercises.py);
* malformed delimiters are reported with the notebook and the cell;
* every notebook has at least three autograded exercises, each with a check and registered
  pytest markers, nbgrader metadata nbgrader can consume, and a "Functions used" cell whose
  links point at existing files.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")

from refimpl import course  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent / "exercises"))
from exercise_checks import CHECKS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MIN_AUTOGRADED = 3


def read(path):
    return nbformat.read(path, as_version=4)


def exercise_ids(nb, kind="ex"):
    return sorted({c.metadata["ponder"]["exercise"] for c in nb.cells
                   if c.metadata.get("ponder", {}).get("exercise", "").startswith(kind)})


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("student")
    written = course.build_student_notebooks(ROOT / "notebooks", out)
    assert [p.name for p in written] == [p.name for p in NOTEBOOKS]
    return out


# --------------------------------------------------------------------------- stubs fail, solutions absent


@pytest.mark.parametrize("exercise", sorted(CHECKS))
def test_every_stub_fails_its_check(student_dir, exercise):
    notebook, check = CHECKS[exercise]
    path = course.find_notebook(student_dir, notebook)
    with pytest.raises((NotImplementedError, AssertionError)):
        check(course.exercise_namespace(path, exercise, roles=("solution",)))
    with pytest.raises((NotImplementedError, AssertionError)):  # and the notebook's own test cell fails too
        course.exercise_namespace(path, exercise, roles=("solution", "tests"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_student_version_holds_no_solution(student_dir, path):
    instructor, student = read(path), read(student_dir / path.name)
    nbformat.validate(student)
    assert student.metadata["ponder"]["version"] == "student"
    assert len(student.cells) == len(instructor.cells)
    for index, (mine, theirs) in enumerate(zip(instructor.cells, student.cells)):
        assert mine.metadata == theirs.metadata, index
        if mine.cell_type == "code":
            assert theirs.outputs == [] and theirs.execution_count is None
        role = mine.metadata.get("ponder", {}).get("role")
        for marker in ("BEGIN SOLUTION", "END SOLUTION", "HIDDEN TESTS"):
            assert marker not in theirs.source, (path.name, index)
        if role == "answer":
            assert theirs.source.strip().endswith(course.TEXT_STUB), (path.name, index)
        elif role == "solution":
            assert course.CODE_STUB in theirs.source, (path.name, index)
            solution_lines = _region_lines(mine.source, course.BEGIN_SOLUTION, course.END_SOLUTION)
            kept = set(theirs.source.splitlines())
            assert not [line for line in solution_lines if line.strip() and line in kept], (path.name, index)
        elif role == "tests":
            hidden = _region_lines(mine.source, course.BEGIN_HIDDEN, course.END_HIDDEN)
            assert not set(line for line in hidden if line.strip()) & set(theirs.source.splitlines()), (path.name, index)
        elif course.BEGIN_SOLUTION not in mine.source and course.BEGIN_HIDDEN not in mine.source:
            assert theirs.source == mine.source, (path.name, index)


def _region_lines(source, begin, end):
    lines, inside = [], False
    for line in source.splitlines():
        if line.strip().startswith(begin):
            inside = True
        elif line.strip().startswith(end):
            inside = False
        elif inside:
            lines.append(line)
    return lines


def test_wrong_solutions_fail_the_checks_too():
    """Beyond stubs: the assigning scatter of notebook 02, and batch norm's correction applied at every
    position instead of the masked ones, fail their exercises' checks."""
    path = course.find_notebook(ROOT / "notebooks", "02")
    namespace = course.exercise_namespace(path, "ex02_3", roles=("solution",))
    base = namespace["LoopFillBackend"]

    class Assigns(base):
        def _fill_backward(self, ddense, plan, fill):
            if fill != "nearest":
                return super()._fill_backward(ddense, plan, fill)
            n, k = ddense.shape[:2]
            flat = ddense.reshape(n, k, -1)
            out = super()._fill_backward(ddense, plan, fill) * 0
            for image in range(n):
                index = plan.index_map[0 if plan.batch == 1 else image].ravel()
                out[image][:, index] = flat[image]  # duplicates overwrite
            return out

    with pytest.raises(AssertionError):
        CHECKS["ex02_3"][1]({"LoopFillBackend": Assigns})

    def correction_everywhere(dout, x, gamma, mask, eps):  # the ordinary batch-norm backward's mistake here
        m = mask[:, None]
        count = mask.sum()
        mean = (x * m).sum(axis=(0, 2, 3), keepdims=True) / count
        inv_std = 1 / np.sqrt((((x - mean) * m) ** 2).sum(axis=(0, 2, 3), keepdims=True) / count + eps)
        x_hat = (x - mean) * inv_std
        dbeta, dgamma = dout.sum(axis=(0, 2, 3)), (dout * x_hat).sum(axis=(0, 2, 3))
        correction = (dbeta[None, :, None, None] + x_hat * dgamma[None, :, None, None]) / count
        return gamma[None, :, None, None] * inv_std * (dout - correction), dgamma, dbeta

    with pytest.raises(AssertionError):
        CHECKS["ex06_4"][1]({"masked_batchnorm_backward_mine": correction_everywhere})


# --------------------------------------------------------------------------- the markup


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_every_notebook_has_autograded_exercises_with_checks_and_markers(path, pytestconfig):
    nb = read(path)
    exercises = course.check_notebook(nb, path)
    autograded = exercise_ids(nb, "ex")
    assert len(autograded) >= MIN_AUTOGRADED, f"{path.name} has {len(autograded)} autograded exercises"
    assert exercise_ids(nb, "q"), f"{path.name} has no conceptual question"
    number = path.name[:2]
    markers = {line.split(":")[0].strip() for line in pytestconfig.getini("markers")}
    assert f"nb{number}" in markers
    for exercise in autograded:
        assert exercise.startswith(f"ex{number}_")
        assert CHECKS.get(exercise, (None,))[0] == number, f"{exercise} has no check in tests/exercises"
        assert exercise in markers, f"marker {exercise} is not registered in pyproject.toml"
        roles = [nb.cells[i].metadata["ponder"]["role"] for i in exercises[exercise]]
        assert roles[0] == "prompt" and roles.count("solution") >= 1 and roles[-1] == "tests", (exercise, roles)
    for question in exercise_ids(nb, "q"):
        roles = [nb.cells[i].metadata["ponder"]["role"] for i in exercises[question]]
        assert roles == ["prompt", "answer"], (question, roles)


def test_every_check_belongs_to_an_exercise_in_the_notebooks():
    found = {e for path in NOTEBOOKS for e in exercise_ids(read(path), "ex")}
    assert set(CHECKS) == found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_nbgrader_metadata_is_complete(path):
    keys = {"grade", "grade_id", "locked", "schema_version", "solution", "task"}
    for index, cell in enumerate(read(path).cells):
        grading = cell.metadata.get("nbgrader")
        if grading is None:
            assert "exercise" not in cell.metadata.get("ponder", {}), (path.name, index)
            continue
        assert keys <= set(grading), (path.name, index)
        assert grading["schema_version"] == 3
        assert ("points" in grading) == grading["grade"], (path.name, index)
        role = cell.metadata["ponder"]["role"]
        expected = {"prompt": (False, False, True), "solution": (True, False, False),
                    "tests": (False, True, True), "answer": (True, True, False)}[role]
        assert (grading["solution"], grading["grade"], grading["locked"]) == expected, (path.name, index, role)
        assert grading["grade_id"] == f"{cell.metadata['ponder']['exercise']}_{role}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_functions_used_cell_links_existing_files(path):
    cells = [c for c in read(path).cells if c.metadata.get("ponder", {}).get("functions_used")]
    assert len(cells) == 1, f"{path.name} needs one 'Functions used' cell"
    links = re.findall(r"\]\((\.\./[^)#]+)\)", cells[0].source)
    assert any(link.startswith("../refimpl/") for link in links)
    for link in links:
        assert (path.parent / link).resolve().is_file(), f"{path.name}: {link} does not exist"


# --------------------------------------------------------------------------- stubs and errors


def notebook_with(cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = cells
    return nb


def solution_cell(source, cell_type="code", grade_id="ex01_1_solution"):
    make = nbformat.v4.new_code_cell if cell_type == "code" else nbformat.v4.new_markdown_cell
    return make(source, metadata={"nbgrader": {"grade": cell_type != "code", "grade_id": grade_id, "locked": False,
                                               "schema_version": 3, "solution": True, "task": False,
                                               **({} if cell_type == "code" else {"points": 1})}})


def test_stub_keeps_indentation_and_the_hint():
    source = "def f(x):\n    '''doc'''\n    ### BEGIN SOLUTION hint: square it\n    return x * x\n    ### END SOLUTION\n\ny = 1"
    student = course.student_notebook(notebook_with([solution_cell(source)]), "demo.ipynb")
    assert student.cells[0].source == "def f(x):\n    '''doc'''\n    # hint: square it\n    raise NotImplementedError()\n\ny = 1"
    plain = course.student_notebook(notebook_with([solution_cell("### BEGIN SOLUTION\nx = 1\n### END SOLUTION")]), "d")
    assert plain.cells[0].source == "# YOUR CODE HERE\nraise NotImplementedError()"


def test_hidden_tests_are_removed_and_answers_replaced():
    tests = nbformat.v4.new_code_cell("assert True\n### BEGIN HIDDEN TESTS\nassert secret\n### END HIDDEN TESTS\nprint(1)",
                                      metadata={"nbgrader": {"grade": True, "grade_id": "t", "locked": True, "points": 1,
                                                             "schema_version": 3, "solution": False, "task": False}})
    answer = solution_cell("Intro line.\n### BEGIN SOLUTION\nThe model answer.\n### END SOLUTION", "markdown", "a")
    student = course.student_notebook(notebook_with([tests, answer]), "demo.ipynb")
    assert student.cells[0].source == "assert True\nprint(1)"
    assert student.cells[1].source == "Intro line.\n" + course.TEXT_STUB


@pytest.mark.parametrize("source,message", [
    ("### BEGIN SOLUTION\nx = 1", "is never closed"),
    ("x = 1\n### END SOLUTION", "without a matching"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n### END SOLUTION", "cannot nest"),
    ("### BEGIN SOLUTION\nx = 1\n### END HIDDEN TESTS", "without a matching"),
    ("x = 1  ### BEGIN SOLUTION\ny = 2\n### END SOLUTION", "line 1: a delimiter must start its line"),
])
def test_unbalanced_delimiters_name_the_notebook_and_the_cell(source, message):
    nb = notebook_with([nbformat.v4.new_markdown_cell("intro"), solution_cell(source)])
    with pytest.raises(course.CourseError, match=message) as error:
        course.student_notebook(nb, "demo_notebook.ipynb")
    assert "demo_notebook.ipynb, cell 1 (ex01_1_solution)" in str(error.value)


def test_delimiters_outside_solution_cells_and_duplicate_ids_are_errors():
    stray = nbformat.v4.new_code_cell("### BEGIN SOLUTION\nx = 1\n### END SOLUTION")
    with pytest.raises(course.CourseError, match=r"demo.ipynb, cell 0: solution delimiters in a cell whose metadata"):
        course.check_notebook(notebook_with([stray]), "demo.ipynb")
    hidden = nbformat.v4.new_code_cell("### BEGIN HIDDEN TESTS\nx = 1\n### END HIDDEN TESTS")
    with pytest.raises(course.CourseError, match="hidden-test delimiters"):
        course.check_notebook(notebook_with([hidden]), "demo.ipynb")
    twice = [solution_cell("### BEGIN SOLUTION\n### END SOLUTION"), solution_cell("### BEGIN SOLUTION\n### END SOLUTION")]
    with pytest.raises(course.CourseError, match="also used by cell 0"):
        course.check_notebook(notebook_with(twice), "demo.ipynb")


def test_build_refuses_to_overwrite_the_source_or_to_stub_a_student_version(tmp_path, student_dir):
    with pytest.raises(ValueError, match="out_dir must differ from src_dir"):
        course.build_student_notebooks(student_dir, student_dir)
    with pytest.raises(course.CourseError, match="already a student version"):
        course.build_student_notebooks(student_dir, tmp_path / "again")
    with pytest.raises(FileNotFoundError, match="src_dir must be a directory"):
        course.build_student_notebooks(tmp_path / "missing", tmp_path / "out")


def test_a_bad_notebook_stops_the_build_before_anything_is_written(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    nbformat.write(notebook_with([solution_cell("### BEGIN SOLUTION\nx = 1")]), src / "09_broken.ipynb")
    with pytest.raises(course.CourseError, match="09_broken.ipynb, cell 0"):
        course.build_student_notebooks(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_command_line(tmp_path, capsys):
    assert course.main(["student", "--out", str(tmp_path / "s")]) == 0
    assert sorted(p.name for p in (tmp_path / "s").glob("*.ipynb")) == [p.name for p in NOTEBOOKS]
    assert course.main(["list"]) == 0
    listing = capsys.readouterr().out
    assert all(exercise in listing for exercise in CHECKS)
    assert course.main(["student", "--out", str(tmp_path / "t"), "--src", str(tmp_path / "nowhere")]) == 2
    assert "src_dir must be a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        course.main(["student"])  # --out is required


def test_ponder_course_builds_lists_and_checks(tmp_path, capsys, student_dir):
    from refimpl.cli import main
    from refimpl.commands.arguments import UsageExit

    assert main(["course", "student", "--out", str(tmp_path / "s")]) == 0
    assert sorted(p.name for p in (tmp_path / "s").glob("*.ipynb")) == [p.name for p in NOTEBOOKS]
    assert main(["course", "list"]) == 0
    listing = capsys.readouterr().out
    assert all(exercise in listing for exercise in CHECKS)
    # the instructor version: every solution passes its cells
    assert main(["course", "check"]) == 0
    out = capsys.readouterr().out
    assert f"{len(CHECKS)} passes, 0 not done, 0 fails (of {len(CHECKS)} exercises)" in out
    # a student version: the stubs are reported not done, status 1; one exercise can be picked
    assert main(["course", "check", "--src", str(student_dir), "--exercise", "ex06_2", "ex01_1"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1:3] for line in lines[:-1]] == [["ex01_1", "not"], ["ex06_2", "not"]]
    assert lines[-1] == "0 passes, 2 not done, 0 fails (of 2 exercises)"
    with pytest.raises(UsageExit, match=r"ponder course: error: exercises must be ids .* got \['ex99_1'\]"):
        main(["course", "check", "--exercise", "ex99_1"])
    with pytest.raises(UsageExit, match="src_dir must be a directory"):
        main(["course", "list", "--src", str(tmp_path / "nowhere")])


def test_check_reports_a_wrong_solution_as_failing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    path = course.find_notebook(ROOT / "notebooks", "06")
    nb = read(path)
    for cell in nb.cells:  # break exercise 06.1's answer: N is 4, not 3
        if cell.metadata.get("ponder", {}).get("exercise") == "ex06_1" and cell.metadata["ponder"]["role"] == "solution":
            cell.source = cell.source.replace("n_by_hand = 4", "n_by_hand = 3")
    nbformat.write(nb, src / path.name)
    rows = course.check_exercises(src, ["ex06_1", "ex06_2"])
    assert [row[1:3] for row in rows] == [("ex06_1", "fails"), ("ex06_2", "passes")]
    assert rows[0][3].startswith("AssertionError")


def test_exercise_namespace_names_a_missing_exercise():
    with pytest.raises(KeyError, match="no code cells of exercise 'ex01_9'"):
        course.exercise_namespace(NOTEBOOKS[0], "ex01_9")


def test_notebooks_are_stored_as_json_nbformat_writes():
    """Edited with nbformat: the files parse as JSON with one cell id per cell."""
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        ids = [c["id"] for c in cells]
        assert len(ids) == len(set(ids)), path.name


def test_students_select_exercises_by_marker_and_folder(student_dir):
    """The student workflow end to end: ``PONDER_NOTEBOOKS=DIR pytest -m "nb01 and ex01_2"``."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "exercises"),
               "-m", "nb01 and ex01_2"]
    env = {k: v for k, v in os.environ.items() if k != "PONDER_NOTEBOOKS"}
    instructor = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert instructor.returncode == 0 and "1 passed, " in instructor.stdout, instructor.stdout[-2000:]
    student = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300,
                             env={**env, "PONDER_NOTEBOOKS": str(student_dir)})
    assert student.returncode == 1 and "1 failed, " in student.stdout, student.stdout[-2000:]
    assert "NotImplementedError" in student.stdout
