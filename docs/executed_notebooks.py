"""Execute the notebooks once and keep the executed copies, for the docs build and the notebook tests.

The notebooks are stored without outputs. The documentation shows them *with* their outputs, and
the test suite checks that they run; both need the same executed notebooks, so both go through
:func:`executed`, which runs a notebook with :mod:`nbclient` (from ``notebooks/``, as a reader's
Jupyter would) and keeps the result in a cache folder. A second caller in the same folder with
the same inputs reads the executed copy instead of running the notebook again: under ``pytest``
the docs build (``tests/test_docs.py``) executes each notebook and ``tests/test_notebooks.py``
asserts on those results, so CI executes every notebook once.

A cached copy is reused only while everything that could change its outputs is unchanged: the
notebook file, the sources of ``refimpl`` and ``fastpath`` (and their data files), the committed
results the notebooks read (JSON under ``docs/_static``, e.g. notebook 08's parity runs), the Python
version and the ``PONDER_*`` / thread-count environment variables. The folder is
``$PONDER_NOTEBOOK_CACHE`` if set (the test suite points it at its session's temporary folder),
else ``docs/_build/executed-notebooks`` (ignored by git), so a rebuild of the docs after editing
only a page does not execute the notebooks again.

A notebook whose metadata ``ponder.requires`` names a fast backend that cannot run here (the
OpenCL notebook without an OpenCL runtime) is not executed: :func:`unusable_requirements` says why,
and the docs show it without outputs, with a note saying so.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

from refimpl import course

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
DEFAULT_CACHE = ROOT / "docs" / "_build" / "executed-notebooks"
NOTEBOOK_TIMEOUT_S = 900  # for a whole notebook: a hang guard, not a performance check
# Inputs a notebook's outputs depend on besides its own text.
SOURCE_FOLDERS = ("refimpl", "fastpath", "docs/_static")  # the last: committed JSON that notebooks read
SOURCE_SUFFIXES = {".py", ".pyx", ".pxd", ".cl", ".npz", ".json", ".npy"}
ENVIRONMENT_PREFIXES = ("PONDER_", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                        "PYOPENCL_CTX")
NOT_INPUTS = {"PONDER_NOTEBOOK_CACHE", "PONDER_DOCS_EXECUTE", "PONDER_DOCS_SOLUTIONS"}  # how the site shows them


def cache_folder() -> Path:
    """Where executed copies are kept: ``$PONDER_NOTEBOOK_CACHE`` or ``docs/_build/executed-notebooks``."""
    folder = os.environ.get("PONDER_NOTEBOOK_CACHE")
    return Path(folder) if folder else DEFAULT_CACHE


def unusable_requirements(nb) -> list[tuple[str, str]]:
    """``(backend, reason)`` for each backend in the notebook's ``ponder.requires`` that cannot run here."""
    required = nb.metadata.get("ponder", {}).get("requires", [])
    if not required:
        return []
    import fastpath

    status = fastpath.available_backends()
    unknown = [name for name in required if name not in status]
    if unknown:
        raise ValueError(f"notebook metadata ponder.requires names unknown backends {unknown}; "
                         f"expected some of {sorted(status)}")
    return [(name, status[name].reason) for name in required if not status[name].usable]


def _inputs_digest(path: Path) -> str:
    digest = hashlib.sha256()
    digest.update(path.read_bytes())
    for folder in SOURCE_FOLDERS:
        for source in sorted((ROOT / folder).rglob("*")):
            if source.suffix in SOURCE_SUFFIXES and "__pycache__" not in source.parts and source.is_file():
                digest.update(str(source.relative_to(ROOT)).encode())
                digest.update(source.read_bytes())
    digest.update(sys.version.encode())
    for name in sorted(os.environ):
        if name.startswith(ENVIRONMENT_PREFIXES) and name not in NOT_INPUTS:
            digest.update(f"{name}={os.environ[name]}".encode())
    return digest.hexdigest()[:16]


def cached_path(path: Path, folder: Path | None = None) -> Path:
    """The file the executed copy of ``path`` is (or would be) kept in."""
    return (folder or cache_folder()) / f"{path.stem}-{_inputs_digest(path)}.ipynb"


def executed(path: Path, folder: Path | None = None, timeout_s: float = NOTEBOOK_TIMEOUT_S):
    """The notebook at ``path`` with its outputs: read from the cache, or executed now and cached.

    Returns ``(notebook, seconds)``: ``seconds`` is the execution time, or ``None`` when the copy
    came from the cache. Raises :class:`nbclient.exceptions.CellExecutionError` (with the failing
    cell's traceback) if a cell fails; nothing is cached then.
    """
    import nbclient
    import nbformat

    path = Path(path)
    target = cached_path(path, folder)
    if target.is_file():
        return nbformat.read(target, as_version=4), None
    nb = nbformat.read(path, as_version=4)
    start = time.monotonic()
    deadline = start + timeout_s
    # nbclient times cells one by one; giving each cell what is left of the notebook's budget
    # makes the limit apply to the notebook as a whole.
    client = nbclient.NotebookClient(nb, kernel_name="python3",
                                     timeout_func=lambda cell: max(1, int(deadline - time.monotonic())),
                                     resources={"metadata": {"path": str(path.parent)}})
    # Hypothesis in a notebook keeps its example database under the kernel's working folder
    # (notebooks/) unless told otherwise; keep it beside the executed copies, out of the sources.
    previous = os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY")
    os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = str(target.parent / ".hypothesis")
    try:
        client.execute()
    finally:
        if previous is None:
            del os.environ["HYPOTHESIS_STORAGE_DIRECTORY"]
        else:
            os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = previous
    seconds = time.monotonic() - start
    nb.metadata.setdefault("ponder", {})["execution_seconds"] = round(seconds, 1)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.partial")
    nbformat.write(nb, partial)
    partial.replace(target)  # atomic: a reader never sees half a notebook
    for stale in target.parent.glob(f"{path.stem}-*.ipynb"):  # copies made from older inputs
        if stale != target and len(stale.stem) == len(target.stem):
            stale.unlink(missing_ok=True)
    return nb, seconds


SOLUTION = (course.BEGIN_SOLUTION, course.END_SOLUTION)  # nbgrader's delimiters
HIDDEN_TESTS = (course.BEGIN_HIDDEN, course.END_HIDDEN)


def without_solutions(nb):
    """The notebook as a student sees it, outputs kept: every ``### BEGIN SOLUTION`` ...
    ``### END SOLUTION`` region replaced by nbgrader's stub, hidden tests removed.

    The site shows the executed instructor version this way: the outputs a solution produces are
    the expected outputs a student compares with; the solution's code is not shown.
    """
    for cell in nb.cells:  # the same stubs as the student version (refimpl.course)
        cell.source = course.stub_source(cell.source, cell.cell_type)
    return nb


def for_the_site(path: Path, folder: Path | None = None):
    """The notebook as the docs show it: ``(notebook, note, error)``.

    Executed (``note`` and ``error`` are ``None``), or unexecuted with ``note``, a sentence for the
    top of its page saying why: the build was asked not to execute (``PONDER_DOCS_EXECUTE=0``), a
    backend it needs is unusable here, or it failed; then ``error`` holds the failing cell's
    traceback (the docs build reports it as a warning). Solutions are replaced by stubs
    (:func:`without_solutions`) unless ``PONDER_DOCS_SOLUTIONS=1`` (an instructors' build).
    """
    nb, note, error = _for_the_site(Path(path), folder)
    if os.environ.get("PONDER_DOCS_SOLUTIONS", "0") != "1":
        nb = without_solutions(nb)
    return nb, note, error


def _for_the_site(path: Path, folder: Path | None):
    import nbformat
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    if os.environ.get("PONDER_DOCS_EXECUTE", "1") == "0":
        return nb, ("This build was made with `PONDER_DOCS_EXECUTE=0`: the page shows the "
                    "notebook's code without its outputs."), None
    missing = unusable_requirements(nb)
    if missing:
        needs = "; ".join(f"the `{name}` backend ({reason})" for name, reason in missing)
        return nb, (f"This page shows the notebook without its outputs: it needs {needs}, which "
                    "could not run on the machine that built this site. Run it yourself where "
                    "`fastpath.available_backends()` reports the backend usable."), None
    try:
        nb, _ = executed(path, folder)
    except CellExecutionError as error:
        return nb, ("This notebook failed to execute when the site was built: the page shows "
                    "no outputs."), str(error)
    return nb, None, None


if __name__ == "__main__":  # python docs/executed_notebooks.py [NOTEBOOK ...]: execute and time
    for name in sys.argv[1:] or sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")):
        nb_path = NOTEBOOKS / Path(name).name
        _, took = executed(nb_path)
        print(f"{nb_path.name}: {'cached' if took is None else f'{took:.1f} s'}", flush=True)
