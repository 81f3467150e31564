"""The whole-network benchmark (``ponder bench --networks``): its JSON's structure and internal consistency.

Speed is never asserted: the run is tiny (``--quick``, 8 px, two images) and the checks are that
every figure the tables print follows from the measurements written next to it.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastpath

pytestmark = pytest.mark.skipif(not fastpath.available_backends()["cython"].usable,
                                reason="the network benchmark runs on the cython backend")

ARGS = ["bench", "--networks", "--quick", "--sizes", "8,12", "--batch", "2", "--ratios", "1,1.5", "--repeat", "3",
        "--train-size", "8", "--breakdown", "--quiet"]


def ponder(*args):
    return subprocess.run([sys.executable, "-m", "refimpl", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "networks.json"
    result = ponder(*ARGS, "--json", path)
    assert result.returncode == 0, result.stderr
    return json.loads(path.read_text()), result.stdout


def test_the_json_has_every_setting_runner_and_part(run):
    data, _ = run
    rows = data["rows"]
    assert data["settings"]["sizes"] == [8, 12] and data["settings"]["threads"] == [1]
    assert data["settings"]["repeat"] == 3 and data["settings"]["batch"] == 2
    inference = [r for r in rows if r["part"] == "inference"]
    expected = {"ponder dense", "ponder compiled", "SACT", "SACT unfused", "SACT compiled", "PACT"} | ({"torch dense"} if "torch" in data["environment"]
                                                                   else set())
    for size in (8, 12):
        names = {r["runner"] for r in inference if r["size"] == size}
        assert names == expected
        for name in ("SACT", "SACT unfused", "SACT compiled", "PACT"):
            targets = sorted(r["ratio_target"] for r in inference if r["size"] == size and r["runner"] == name)
            assert targets == [1.0, 1.5]
    training = {r["runner"] for r in rows if r["part"] == "training"}
    assert {"ponder dense", "SACT", "SACT unfused"} <= training
    assert all(r["depth"] == 14 for r in rows)
    assert data["environment"]["blas"] is not None and data["environment"]["cpu"]


def test_every_derived_figure_follows_from_the_measurements(run):
    data, _ = run
    rows = data["rows"]
    for r in rows:
        assert len(r["ms_all"]) == 3 and all(t > 0 for t in r["ms_all"])
        assert r["ms"] == pytest.approx(statistics.median(r["ms_all"]))
        assert r["images_per_s"] == pytest.approx(r["batch"] * 1e3 / r["ms"])
        assert r["ratio"] == pytest.approx(r["dense_flops_per_image"] / r["flops_per_image"])
        same = [s for s in rows if (s["part"], s["size"], s["threads"]) == (r["part"], r["size"], r["threads"])]
        dense = next(s for s in same if s["runner"] == "ponder dense")
        assert r["speedup"] == pytest.approx(dense["ms"] / r["ms"])
        assert r["speedup_over_ratio"] == pytest.approx(r["speedup"] / r["ratio"])
        torch_rows = [s for s in same if s["runner"] == "torch dense"]
        if torch_rows:
            assert r["vs_torch"] == pytest.approx(torch_rows[0]["ms"] / r["ms"])
        else:
            assert r["vs_torch"] is None
        if r["runner"] in ("ponder dense", "torch dense"):
            assert r["ratio"] == pytest.approx(1.0) and r["ratio_target"] is None


def test_the_adaptive_networks_spend_less_at_a_larger_ratio(run):
    data, _ = run
    for size in (8, 12):
        for name in ("SACT", "SACT unfused", "SACT compiled", "PACT"):
            chosen = {r["ratio_target"]: r for r in data["rows"]
                      if r["part"] == "inference" and r["size"] == size and r["runner"] == name}
            assert chosen[1.5]["ratio"] > chosen[1.0]["ratio"]
            assert chosen[1.5]["bias_offset"] > chosen[1.0]["bias_offset"]
        # fused, unfused and compiled SACT run the same weights with the same calibrated biases: the same FLOPs
        for target in (1.0, 1.5):
            fused, unfused, compiled = ([r for r in data["rows"] if r["part"] == "inference" and r["size"] == size
                                         and r["runner"] == name and r["ratio_target"] == target]
                                        for name in ("SACT", "SACT unfused", "SACT compiled"))
            assert fused[0]["flops_per_image"] == unfused[0]["flops_per_image"] == compiled[0]["flops_per_image"]


@pytest.mark.parametrize("kind", ["sact", "pact"])
def test_calibration_reaches_the_ratio_it_reports(kind):
    """The bisection leaves the biases at the offset whose ratio it returns, near the target when reachable."""
    from fastpath import bench_networks as bn

    rng = np.random.default_rng(5)
    x = bn.smooth_images(rng, 4, 16)
    dense = bn.dense_network(14, "numpy", seed=1)
    bn.set_batch_norm_statistics(dense, x)
    dense(x)
    model = bn.adaptive_network(kind, 14, "numpy", seed=1)
    bn.copy_batch_norm_statistics(dense, model)
    dense_flops = float(dense.dense_flops_per_sample)
    ratios = []
    for target in (1.0, 1.25):
        offset, ratio = bn.calibrate(model, x, target, dense_flops)
        assert model.bias_offset == offset
        assert bn.flops_ratio(model, x, dense_flops) == pytest.approx(ratio)
        assert abs(ratio - target) < 0.05, (target, ratio)
        ratios.append(ratio)
    offset, ratio = bn.calibrate(model, x, 100.0, dense_flops)  # beyond reach: the largest bias searched
    assert offset == bn.BIAS_RANGE[1] and ratios[-1] < ratio < 100


def test_the_breakdown_adds_up_to_its_total(run):
    data, stdout = run
    entries = data["breakdown"]
    assert {e["runner"] for e in entries} >= {"ponder dense", "SACT", "PACT"}
    for e in entries:
        assert set(e["phases_ms"]) == {"gather", "compute", "scatter", "other"}
        assert e["unrecorded_ms"] == pytest.approx(e["total_ms"] - sum(e["phases_ms"].values()))
        assert e["total_ms"] > 0 and all(v >= 0 for v in e["phases_ms"].values())
    assert "breakdown" in stdout


def test_the_printed_tables_are_those_of_the_json(run):
    from fastpath.bench_networks import tables

    data, stdout = run
    assert tables(data) in stdout
    assert "BLAS:" in stdout and "CPU:" in stdout


def test_the_docs_table_script_computes_its_ratios_from_the_json(run, tmp_path):
    # scripts/bench_networks_table.py: the headline ratios the benchmark page quotes, from one run's rows
    data, _ = run
    path = tmp_path / "networks.json"
    path.write_text(json.dumps(data))
    result = subprocess.run([sys.executable, "scripts/bench_networks_table.py", str(path)], capture_output=True,
                            text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    rows = [r for r in data["rows"] if r["part"] == "inference"]
    cells = sorted({(r["size"], r["threads"]) for r in rows})
    line = next(x for x in result.stdout.splitlines() if x.startswith("| SACT compiled, nothing halted"))

    def ms(cell, runner, target=None):
        return next(r["ms"] for r in rows if (r["size"], r["threads"]) == cell and r["runner"] == runner
                    and r["ratio_target"] == target)

    expected = [f"{ms(c, 'SACT compiled', 1.0) / ms(c, 'ponder compiled'):.2f}" for c in cells]
    assert line.split("|")[2:-1] == [f" {v} " for v in expected]
    trained = [x for x in result.stdout.splitlines() if x.startswith("- training ")]
    assert len(trained) == sum(r["part"] == "training" for r in data["rows"])


def test_the_docs_table_script_refuses_a_file_that_is_not_a_benchmark(tmp_path):
    path = tmp_path / "other.json"
    path.write_text("{}")
    result = subprocess.run([sys.executable, "scripts/bench_networks_table.py", str(path)], capture_output=True,
                            text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 2
    assert "json must be a file written by `python -m fastpath.bench --networks --json`" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_torch_mirror_computes_the_ponder_network():
    torch = pytest.importorskip("torch")
    from fastpath.bench_networks import dense_network, torch_resnet

    model = dense_network(14, "numpy", seed=3)
    for layer in model.layers():  # non-trivial statistics, so that a swapped buffer shows
        if hasattr(layer, "buffers") and "running_var" in getattr(layer, "buffers", {}):
            rng = np.random.default_rng(len(layer.buffers["running_mean"]))
            layer.buffers["running_mean"][...] = rng.standard_normal(layer.channels)
            layer.buffers["running_var"][...] = rng.uniform(0.5, 2.0, layer.channels)
    x = np.random.default_rng(0).standard_normal((2, 3, 12, 12)).astype(np.float32)
    want = model(x)
    with torch.no_grad():
        got = torch_resnet(model)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


@pytest.mark.parametrize("args, names", [
    (["--networks", "--sizes", "4"], ["--sizes", ">= 8", "'4'"]),
    (["--networks", "--ratios", "0.5"], ["--ratios", ">= 1"]),
    (["--networks", "--threads", "0,1"], ["--threads", ">= 1"]),
    (["--networks", "--depth", "15"], ["--depth", "6n + 2"]),
    (["--networks", "--parts", "inference,speed"], ["--parts", "inference"]),
    (["--networks", "--layers", "resnet16"], ["--layers", "per-layer"]),
    (["--sizes", "32"], ["--sizes", "only with --networks"]),
    (["--networks", "--network-backend", "cuda"], ["--network-backend", "'cuda'", "cython"]),
    (["--network-backend", "opencl"], ["--network-backend", "only with --networks"]),
    (["--threads", "1,2"], ["--threads", "one thread count"]),
])
def test_bad_arguments_are_refused_in_one_line(args, names):
    result = ponder("bench", *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    for name in names:
        assert name in line, (name, line)


@pytest.mark.opencl
def test_the_networks_run_on_the_opencl_backend(tmp_path):
    if not fastpath.available_backends()["opencl"].usable:
        pytest.skip("the opencl backend is not usable here")
    path = tmp_path / "networks.json"
    result = ponder("bench", "--networks", "--quick", "--sizes", "8", "--batch", "2", "--ratios", "1",
                    "--repeat", "2", "--parts", "inference", "--network-backend", "opencl", "--quiet", "--json", path)
    assert result.returncode == 0, result.stderr
    data = json.loads(path.read_text())
    assert data["settings"]["network_backend"] == "opencl"
    assert "OpenCL" in data["environment"]["backend"] or "opencl" in data["environment"]["backend"]
    runners = {row["runner"] for row in data["rows"]}
    assert {"ponder dense", "SACT", "SACT unfused", "PACT"} <= runners
    assert "ponder compiled" not in runners and "cython" in data["skipped"]["ponder compiled"]
    assert "SACT compiled" not in runners and "cython" in data["skipped"]["SACT compiled"]
