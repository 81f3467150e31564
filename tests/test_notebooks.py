"""Every notebook in notebooks/ runs top to bottom (small settings) and is stored without outputs.

Parametrised by file name, so a new notebook is tested by being there. ``PONDER_FULL=1`` in the
environment runs the notebooks with their full settings instead (much slower).
"""

import importlib.util
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
NOTEBOOK_TIMEOUT_S = 900  # for a whole notebook: a hang guard, not a performance check


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no .ipynb file"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, f"{path.name}: cells {dirty} hold outputs; clear them before committing"


def skip_unless_backends_usable(nb):
    """Skip (with the backend's own reason) a notebook whose metadata ``ponder.requires`` names a
    fast backend that cannot run here, e.g. the OpenCL notebook on a machine without a runtime."""
    required = nb.metadata.get("ponder", {}).get("requires", [])
    if not required:
        return
    import fastpath

    status = fastpath.available_backends()
    for name in required:
        if not status[name].usable:
            pytest.skip(f"needs the {name} backend: {status[name].reason}")


def test_backend_requirements_name_known_backends():
    import fastpath

    known = set(fastpath.available_backends())
    for path in NOTEBOOKS:
        required = nbformat.read(path, as_version=4).metadata.get("ponder", {}).get("requires", [])
        assert set(required) <= known, f"{path.name}: unknown backends in metadata ponder.requires: {required}"


def _load_executed_notebooks():
    path = Path(__file__).resolve().parents[1] / "docs" / "executed_notebooks.py"
    spec = importlib.util.spec_from_file_location("executed_notebooks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path_factory):
    nb = nbformat.read(path, as_version=4)
    skip_unless_backends_usable(nb)
    stray = path.parent / ".hypothesis"  # where Hypothesis would keep its database if not told otherwise
    existed = stray.exists()
    # Executed once per test session: the docs build (tests/test_docs.py, which runs first)
    # executes every notebook into this folder and this test reads its copy; run alone, this
    # test executes the notebook itself. Raises CellExecutionError with the failing cell's traceback.
    nb, _ = _load_executed_notebooks().executed(path, tmp_path_factory.getbasetemp() / "executed-notebooks",
                                                timeout_s=NOTEBOOK_TIMEOUT_S)
    errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
              if out.output_type == "error"]
    assert not errors
    assert existed or not stray.exists(), f"running {path.name} left {stray}"
