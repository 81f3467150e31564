"""Every notebook in notebooks/ runs top to bottom (small settings) and is stored without outputs.

Parametrised by file name, so a new notebook is tested by being there. ``PONDER_FULL=1`` in the
environment runs the notebooks with their full settings instead (much slower).

Notebooks 05–07 end with a "What this run measured" cell (metadata ``ponder.results``) that prints
the run's figures as JSON; the tests below read that output from the executed notebook and assert
that each notebook shows its phenomenon at default settings, and that the sentences the notebooks
print agree with those figures.
"""

import importlib.util
import json
import re
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


def _executed(name, tmp_path_factory):
    path = next(p for p in NOTEBOOKS if p.name.startswith(name))
    nb = nbformat.read(path, as_version=4)
    skip_unless_backends_usable(nb)
    nb, _ = _load_executed_notebooks().executed(path, tmp_path_factory.getbasetemp() / "executed-notebooks",
                                                timeout_s=NOTEBOOK_TIMEOUT_S)
    return nb


def _stdout(cell):
    return "".join(out.text for out in cell.outputs if out.output_type == "stream" and out.name == "stdout")


def run_results(nb):
    """The JSON printed by the notebook's results cell (metadata ``ponder.results``)."""
    cells = [c for c in nb.cells if c.cell_type == "code" and c.metadata.get("ponder", {}).get("results")]
    assert len(cells) == 1, "expected one results cell (metadata ponder.results)"
    return json.loads(_stdout(cells[0]))


def printed(nb):
    return "\n".join(_stdout(c) for c in nb.cells if c.cell_type == "code")


def test_results_cells_are_marked_in_the_notebooks_that_assert_on_them():
    for name in ("05_", "06_", "07_"):
        nb = nbformat.read(next(p for p in NOTEBOOKS if p.name.startswith(name)), as_version=4)
        marked = [c for c in nb.cells if c.metadata.get("ponder", {}).get("results")]
        assert len(marked) == 1 and "json.dumps(results" in marked[0].source, name


@pytest.mark.slow
def test_notebook_06_shows_a_trained_sact_whose_map_finds_the_digit(tmp_path_factory):
    nb = _executed("06_", tmp_path_factory)
    results = run_results(nb)
    assert results["sact_accuracy"] >= 0.9
    assert results["sact_map_auc"] > results["centre_auc"]
    assert results["mflops"]["sact"] < results["mflops"]["resnet"]
    assert results["flops_ratio_dense_over_sparse"] > 1
    text = printed(nb)
    assert f"({results['sact_map_auc']:.3f} against {results['centre_auc']:.3f})" in text
    assert "The SACT map's AUC is higher than the centre baseline's" in text


@pytest.mark.slow
def test_notebook_07_evaluates_pact_in_three_modes_with_a_varying_map(tmp_path_factory):
    nb = _executed("07_", tmp_path_factory)
    results = run_results(nb)
    modes = results["modes"]
    assert set(modes) == {"thresholded", "discrete", "relaxed"}
    thresholded = modes["thresholded"]
    assert thresholded["map_std_over_positions"] > 0 and thresholded["map_varies_fraction"] > 0.5
    assert results["shown_map_range"][1] > results["shown_map_range"][0]
    assert thresholded["flops_per_image"] < modes["relaxed"]["flops_per_image"]
    assert all(m["accuracy"] >= 0.9 for m in modes.values())
    saving = 1 - thresholded["flops_per_image"] / modes["relaxed"]["flops_per_image"]
    assert f"Thresholded evaluation ran {saving:.0%} fewer FLOPs than relaxed evaluation" in printed(nb)
    # the REINFORCE toy: unbiased (within a few standard errors) and its SNR falls with the latents
    assert results["reinforce_max_deviation_se"] < 5 and results["reinforce_snr_slope"] < -0.25


@pytest.mark.slow
def test_notebook_05_states_the_mask_comparison_its_run_measured(tmp_path_factory):
    nb = _executed("05_", tmp_path_factory)
    results = run_results(nb)
    errors, rates = results["single_layer_errors"], results["rates"]
    assert set(errors) == {"uniform", "grid", "structure", "impact"}
    assert all(len(e) == len(rates) for e in errors.values())
    text = printed(nb)
    for kind in ("grid", "structure", "impact"):
        wins = sum(e < u for e, u in zip(errors[kind], errors["uniform"]))
        assert f"{kind} beats uniform at {wins} of {len(rates)} rates" in text
    # perforating a layer at the highest rate costs accuracy over the dense network, with every mask
    assert all(e[-1] > results["dense_test_error"] for e in errors.values())
    # the greedy procedure reaches a speed-up; the sentence names the method with the lowest error at 2x
    reached = {name: e for name, e in results["error_at_2x_theoretical"].items() if e is not None}
    assert reached
    best = min(reached, key=reached.get)
    assert re.search(rf"the lowest validation error is {re.escape(best)}'s", text)


def test_notebook_08_quotes_committed_parity_runs_written_by_the_script():
    """The parity figures notebook 08 quotes come from JSON that scripts/parity_experiment.py wrote."""
    root = Path(__file__).resolve().parents[1]
    runs = sorted((root / "docs" / "_static" / "parity").glob("parity-size*.json"))
    assert runs, "docs/_static/parity holds no committed parity run"
    for path in runs:
        run = json.loads(path.read_text())
        settings = run["settings"]
        assert path.stem == f"parity-size{settings['size']}"
        for objective in settings["objectives"]:
            for e in run[objective]["evaluation"].values():
                assert 0 <= e["accuracy"] <= 1 and 1 <= e["mean_steps"] <= settings["max_steps"]
    source = "\n".join(c.source for c in nbformat.read(next(p for p in NOTEBOOKS if p.name.startswith("08_")),
                                                           as_version=4).cells)
    assert "docs/_static/parity" in source and "parity_experiment.py" in source


#: the notebook of the OpenCL backend has no claim of the thesis to reproduce
REPRODUCED_ELSEWHERE = {"03_opencl.ipynb"}


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.name not in REPRODUCED_ELSEWHERE], ids=lambda p: p.name)
def test_notebook_links_the_results_page_for_the_claims_it_names(path):
    from refimpl.reproduce import CLAIMS

    nb = nbformat.read(path, as_version=4)
    cells = ["".join(cell.source) for cell in nb.cells if "../docs/reproduce.md" in "".join(cell.source)]
    assert cells, f"{path.name} does not link ../docs/reproduce.md"
    named = set(re.findall(r"\b(C\d+|sanity|parity-collapse|parity)\b", cells[0]))
    assert named and named <= set(CLAIMS), f"{path.name} names {sorted(named)}; the claims are {sorted(CLAIMS)}"
    assert (path.parents[1] / "docs" / "reproduce.md").is_file()
