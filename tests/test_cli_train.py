"""``ponder train`` and ``ponder evaluate`` on a tiny setting, run as a user would."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from refimpl.checkpoint import load_checkpoint
from refimpl.commands.train import parse_options, parse_perforation
from refimpl.flops import dense_flops, network_flops


def ponder(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "refimpl", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "x"
    result = ponder("train", "--model", "resnet8", "--data", "cluttered-digits", "--canvas", "24",
                    "--n-train", "48", "--n-val", "16", "--n-test", "24", "--epochs", "2", "--batch-size", "16",
                    "--option", "widths=[4,4,8]", "--perforate", "stem=grid:0.5", "--crop-padding", "2",
                    "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    return out, result


def test_train_writes_checkpoint_history_and_curves(run_dir):
    out, result = run_dir
    assert (out / "checkpoint.npz").is_file() and (out / "curves.png").stat().st_size > 1000
    history = json.loads((out / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2]
    assert history["model"] == "resnet8" and history["data"]["canvas"] == 24
    assert 0.0 <= history["test"]["accuracy"] <= 1.0
    assert f"test accuracy {history['test']['accuracy']:.4f}" in result.stdout
    model, meta = load_checkpoint(out / "checkpoint.npz")
    assert meta["extra"]["epoch"] == 2 and meta["build"]["options"] == {"widths": [4, 4, 8]}
    assert model.stem.is_perforated and model.stem.cache is None  # the mask came from the checkpoint
    model(np.zeros((1, 1, 24, 24), np.float32))
    # grid at rate 0.5 keeps round(sqrt(0.5) * 24) = 17 rows and 17 columns of the stem's 24x24 outputs
    assert int(model.stem.cache.plan.mask.sum()) == 17 * 17
    assert dense_flops(model) - network_flops(model) == 2 * 1 * 9 * 4 * (24 * 24 - 17 * 17)
    assert history["test"]["flops_per_image"] == network_flops(model)


def test_evaluate_reproduces_the_test_accuracy(run_dir, tmp_path):
    out, _ = run_dir
    history = json.loads((out / "history.json").read_text())
    result = ponder("evaluate", "--checkpoint", str(out / "checkpoint.npz"), "--json", str(tmp_path / "e.json"))
    assert result.returncode == 0, result.stderr
    evaluation = json.loads((tmp_path / "e.json").read_text())
    assert evaluation["accuracy"] == history["test"]["accuracy"]
    assert evaluation["loss"] == pytest.approx(history["test"]["loss"], rel=1e-6)
    assert evaluation["flops_per_image"] == history["test"]["flops_per_image"]
    assert "accuracy" in result.stdout and "images/s" in result.stdout


def test_evaluate_reports_a_damaged_checkpoint(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a checkpoint")
    result = ponder("evaluate", "--checkpoint", str(bad))
    assert result.returncode != 0
    assert "damaged or not a ponder checkpoint" in result.stderr


def test_train_reports_bad_arguments_clearly(tmp_path):
    result = ponder("train", "--model", "resnet9", "--data", "digits", "--out", str(tmp_path / "r"))
    assert result.returncode == 2 and "argument --model: invalid choice: 'resnet9'" in result.stderr
    result = ponder("train", "--model", "resnet8", "--data", "cifar10", "--out", str(tmp_path / "r"))
    assert result.returncode != 0 and "cifar-10-binary.tar.gz" in result.stderr


def test_option_and_perforation_parsing():
    assert parse_options(["tau=0.01", "widths=[8,16]", "shortcut=projection"]) == {
        "tau": 0.01, "widths": [8, 16], "shortcut": "projection"}
    assert parse_perforation(["stem=grid:0.5", "conv1=uniform:0.25:zero"]) == {
        "stem": ("grid", 0.5), "conv1": ("uniform", 0.25, "zero")}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_options(["tau"])
    with pytest.raises(ValueError, match="LAYER=MASK:RATE"):
        parse_perforation(["stem=grid"])


def test_train_rejects_zero_epochs_and_writes_nothing(tmp_path):
    out = tmp_path / "nin"
    result = ponder("train", "--model", "nin", "--data", "digits", "--epochs", "0", "--out", str(out))
    assert result.returncode == 2 and "argument --epochs: must be an integer >= 1, got '0'" in result.stderr
    assert not out.exists()


def test_train_digits_with_nin_one_epoch_writes_a_checkpoint(tmp_path):
    out = tmp_path / "nin"
    result = ponder("train", "--model", "nin", "--data", "digits", "--epochs", "1", "--option", "widths=[4,4,4]",
                    "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "stopped after 1 epochs (--epochs)" in result.stdout
    model, meta = load_checkpoint(out / "checkpoint.npz")
    assert meta["model"] == "nin"
    assert model(np.zeros((2, 1, 8, 8), np.float32)).shape == (2, 10)


def test_pact_shorthand_flags_become_model_options():
    from refimpl.cli import build_parser
    from refimpl.commands.train import pact_options

    parse = lambda *flags: build_parser().parse_args(["train", "--out", "x", *flags])  # noqa: E731
    assert pact_options(parse()) == {}
    assert pact_options(parse("--mode", "discrete", "--temperature", "0.3", "--latents", "per-position")) == {
        "mode": "discrete", "temperature": 0.3, "latents": "per-position"}
    assert pact_options(parse("--latents", "4x4")) == {"latents": "group", "group_size": 4}
    for bad in ("3x4", "x", "per-image", "0.5x0.5"):
        with pytest.raises(ValueError, match="--latents must be"):
            pact_options(parse("--latents", bad))
