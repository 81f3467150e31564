"""The shipped pretrained models: recorded figures recomputed, metadata complete, targets met, errors clear."""

import glob
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

from refimpl.pretrained import (EVALUATION_BACKEND, PACT_MODES, evaluate_pretrained, list_pretrained, load_pretrained,
                                pretrained_file, pretrained_table, pretrained_test_split)

SHIPPED = ("act-resnet14-digits32", "pact-resnet14-digits32", "resnet14-digits32", "sact-resnet14-digits32")
ROOT = Path(__file__).resolve().parent.parent
DOCS_PAGE = ROOT / "docs" / "howto" / "pretrained_models.md"


@pytest.fixture(scope="module")
def loaded():
    return {name: load_pretrained(name) for name in list_pretrained()}


@pytest.fixture(scope="module")
def test_splits(loaded):
    """Each distinct recorded data set's test split, regenerated once (the models share one)."""
    splits = {}
    for _, metadata in loaded.values():
        key = json.dumps(metadata["data"], sort_keys=True)
        if key not in splits:
            splits[key] = pretrained_test_split(metadata)
    return splits


def split_of(test_splits, metadata):
    return test_splits[json.dumps(metadata["data"], sort_keys=True)]


def assert_figures_equal(recomputed, recorded, where=""):
    assert set(recomputed) == set(recorded), where
    for key, value in recorded.items():
        if isinstance(value, dict):
            assert_figures_equal(recomputed[key], value, f"{where}{key}.")
        elif key == "accuracy":  # a count of right answers over the same images: exactly equal
            assert recomputed[key] == value, f"{where}{key}"
        else:  # equal up to float rounding (BLAS may sum in another order on another machine)
            assert recomputed[key] == pytest.approx(value, rel=1e-6, abs=1e-9), f"{where}{key}"


def test_the_four_networks_are_shipped():
    assert tuple(list_pretrained()) == SHIPPED


def test_checkpoints_are_package_data_so_a_wheel_ships_them():
    """setuptools globs ``package-data`` patterns from the package folder: the models must match one."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["refimpl"]
    packaged = {path for pattern in patterns for path in glob.glob(pattern, root_dir=ROOT / "refimpl")}
    assert {f"data/models/{name}.npz" for name in SHIPPED} <= packaged


@pytest.mark.parametrize("name", SHIPPED)
def test_recorded_figures_are_recomputed_on_the_test_split(loaded, test_splits, name):
    model, metadata = loaded[name]
    assert metadata["evaluation_backend"] == EVALUATION_BACKEND == "numpy"
    recomputed = evaluate_pretrained(model, metadata, split=split_of(test_splits, metadata))
    assert_figures_equal(recomputed, metadata["evaluation"])


@pytest.mark.parametrize("name", SHIPPED)
def test_metadata_records_data_settings_seed_and_command(loaded, test_splits, name):
    model, metadata = loaded[name]
    assert metadata["name"] == name and name.startswith(metadata["model"])
    data = metadata["data"]
    assert data["generator"] == "refimpl.datasets.load_cluttered_digits"
    assert {"canvas", "n_train", "n_val", "n_test", "seed"} <= set(data)
    test = split_of(test_splits, metadata)
    assert len(set(test.labels.tolist())) == 10 and test.object_masks.shape == (data["n_test"], data["canvas"], data["canvas"])
    assert test.images.shape == (data["n_test"], 1, data["canvas"], data["canvas"])
    assert model(test.images[:2]).shape == (2, 10)
    settings = metadata["settings"]
    for key in ("depth", "widths", "tau", "lr_schedule", "epochs", "batch_size", "backend", "threads"):
        assert key in settings, key
    assert settings["lr_schedule"]["name"] == "cosine" and settings["epochs"] >= 1
    assert model.stem.params["w"].dtype == np.float32
    assert isinstance(metadata["seed"], int)
    assert metadata["command"].startswith("python scripts/train_shipped_models.py")
    assert metadata["train_seconds"] > 0 and len(metadata["history"]) == settings["epochs"]
    with pretrained_file(name) as path:
        assert path.stat().st_size < 512 * 1024  # small: a few hundred KB each


def test_sact_reaches_the_accuracy_target_and_its_map_beats_the_centre_baseline(loaded):
    _, metadata = loaded["sact-resnet14-digits32"]
    figures = metadata["evaluation"]
    assert figures["accuracy"] >= 0.9
    assert figures["map_auc"] > figures["centre_auc"]


def test_sact_and_act_save_computation_over_the_plain_resnet(loaded):
    plain = loaded["resnet14-digits32"][1]["evaluation"]["flops_per_image"]
    for name in ("act-resnet14-digits32", "sact-resnet14-digits32"):
        assert loaded[name][1]["evaluation"]["flops_per_image"] < plain, name


def test_pact_is_evaluated_in_every_mode_and_its_thresholded_map_varies(loaded):
    _, metadata = loaded["pact-resnet14-digits32"]
    figures = metadata["evaluation"]
    assert tuple(figures["modes"]) == PACT_MODES
    thresholded = figures["modes"]["thresholded"]
    assert thresholded["map_std_over_positions"] > 0 and thresholded["map_varies_fraction"] > 0.5
    assert figures["accuracy"] == thresholded["accuracy"]
    # thresholded evaluation skips the units of halted positions; relaxed runs every unit everywhere
    assert thresholded["flops_per_image"] < figures["modes"]["relaxed"]["flops_per_image"]


@pytest.mark.parametrize("bad", ["sact-resnet14", "", None, 3])
def test_unknown_name_is_refused_naming_the_argument_and_the_shipped_models(bad):
    with pytest.raises(ValueError, match=r"name must be one of the shipped models .*sact-resnet14-digits32.*got"):
        load_pretrained(bad)


def test_docs_page_shows_the_table_made_from_the_metadata():
    table = pretrained_table()
    assert len(table.splitlines()) == 2 + len(SHIPPED)
    assert table in DOCS_PAGE.read_text(encoding="utf-8")


def test_metadata_of_another_generator_or_kind_is_refused(loaded):
    model, metadata = loaded["resnet14-digits32"]
    with pytest.raises(ValueError, match=r"metadata\['data'\]\['generator'\] must be .*got 'somewhere-else'"):
        pretrained_test_split({**metadata, "data": {**metadata["data"], "generator": "somewhere-else"}})
    with pytest.raises(ValueError, match=r"metadata\['kind'\] must be one of .*got 'rnn'"):
        evaluate_pretrained(model, {**metadata, "kind": "rnn"}, split=None)
