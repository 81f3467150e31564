"""The stride and resolution baselines (refimpl.baselines): shapes, FLOPs, equivalences."""

from __future__ import annotations

import json

import numpy as np
import pytest

from refimpl.baselines import (UpsamplingPlan, max_stride_evaluations, pareto_front, resize_images,
                               resolution_baseline, set_stride_factor, stride_baseline)
from refimpl.conv import conv2d_forward, conv_output_shape
from refimpl.datasets import Split
from refimpl.greedy import load_profile
from refimpl.impact import find_perforable_layers
from refimpl.nin import NIN
from refimpl.perforation import fill_forward
from tolerances import FLOAT64_REFORMULATION_RTOL

F64 = np.float64


def tiny_nin(seed=0):
    return NIN(10, 1, np.random.default_rng(seed), widths=(4, 5, 6), dtype=F64).eval()


def data(n=6, hw=(12, 12), seed=0):
    rng = np.random.default_rng(seed)
    return Split(rng.random((n, 1, *hw)), rng.integers(0, 10, n))


@pytest.mark.parametrize("out_hw,k", [((6, 6), 2), ((7, 5), 2), ((7, 9), 3), ((4, 4), 1)])
def test_upsampling_plan_repeats_the_strided_output(out_hw, k):
    plan = UpsamplingPlan(out_hw, k)
    rows, cols = -(-out_hw[0] // k), -(-out_hw[1] // k)
    assert plan.width == rows * cols
    strided = np.random.default_rng(0).standard_normal((2, 3, rows, cols))
    dense = fill_forward(strided.reshape(2, 3, -1), plan, "nearest")
    expected = strided.repeat(k, axis=2).repeat(k, axis=3)[:, :, : out_hw[0], : out_hw[1]]
    np.testing.assert_array_equal(dense, expected)


def test_stride_factor_equals_a_strided_convolution_upsampled_and_counts_its_flops():
    model = tiny_nin()
    x = data().images
    info = find_perforable_layers(model, x)[0]
    set_stride_factor(model, info, 2)
    model(x)
    conv1 = model.conv1
    w, b = conv1.params["w"], np.zeros(conv1.out_channels)
    strided, _ = conv2d_forward(x, w, b, stride=2, padding=1)
    assert strided.shape[2:] == (6, 6)
    v = conv1.forward(x)
    np.testing.assert_allclose(v, strided.repeat(2, axis=2).repeat(2, axis=3), rtol=FLOAT64_REFORMULATION_RTOL)
    assert model(x).shape == (6, 10)
    assert conv1.flops == 2 * 1 * 9 * 4 * 36 * 6  # 36 computed positions of 144, per image
    assert model.cccp1.flops == 2 * 4 * 4 * 36 * 6  # the 1x1 follower shares the strided positions
    set_stride_factor(model, info, 1)  # back to the dense layer
    np.testing.assert_array_equal(model(x), tiny_nin()(x))
    assert model.conv1.flops == 2 * 9 * 4 * 144 * 6


def test_stride_baseline_searches_layer_by_layer_and_marks_the_front():
    model = tiny_nin()
    points = stride_baseline(model, data(), factors=(1, 2), timing_batch=2, timing_repeats=1)
    # dense, then 3 + 2 + 1 trials (each step raises one layer's factor): 7 networks, not all 2 ** 3 combinations
    assert len(points) == 1 + 3 + 2 + 1 <= max_stride_evaluations(3, 2)
    dense = points[0]
    assert dense["factors"] == {"conv1": 1, "conv2": 1, "conv3": 1} and dense["theoretical_speedup"] == 1.0
    path = [p for p in points if p["path"]]
    assert [p["step"] for p in path] == [0, 1, 2, 3]
    for before, after in zip(path, path[1:]):
        changed = [name for name in before["factors"] if before["factors"][name] != after["factors"][name]]
        assert len(changed) == 1 and after["factors"][changed[0]] == 2
        assert after["flops"] < before["flops"]
        # the step taken is the trial of that step with the smallest loss increase per FLOP saved
        trials = [p for p in points if p["step"] == after["step"]]
        assert after is min(trials, key=lambda p: (p["loss"] - before["loss"]) / (before["flops"] - p["flops"]))
    all_two = path[-1]
    assert set(all_two["factors"].values()) == {2}
    # every perforable layer and its follower compute a quarter of their positions (12x12, 6x6, 3x3 maps)
    per_pos = {"conv1": 2 * 9 * 4 + 2 * 4 * 4, "conv2": 2 * 4 * 9 * 5 + 2 * 5 * 5, "conv3": 2 * 5 * 9 * 6 + 2 * 6 * 10}
    expected = per_pos["conv1"] * 36 + per_pos["conv2"] * 9 + per_pos["conv3"] * 4
    assert all_two["flops"] == expected
    assert dense["flops"] / all_two["flops"] == pytest.approx(all_two["theoretical_speedup"])
    assert any(p["pareto"] for p in points)
    np.testing.assert_array_equal(model(data().images), tiny_nin()(data().images))  # model restored


def test_stride_baseline_refuses_factors_that_do_not_start_at_1():
    for factors in [(2, 3), (1, 3, 2), ()]:
        with pytest.raises(ValueError, match="factors must start at 1"):
            stride_baseline(tiny_nin(), data(), factors=factors, timing_batch=2, timing_repeats=1)


def test_ponder_perforate_with_baselines_on_a_resnet14_measures_a_bounded_number_of_networks(tmp_path, monkeypatch,
                                                                                               capsys):
    """Every combination of 3 factors over a ResNet-14's 11 perforable layers would be 3 ** 11 = 177,147
    networks; the greedy search measures at most 1 + 11 * 11 * 2 = 243."""
    from refimpl import measurement
    from refimpl.cli import main

    run = tmp_path / "r14"
    assert main(["train", "--model", "resnet14", "--data", "cluttered-digits", "--canvas", "16", "--digit-scale", "1",
                 "--n-train", "16", "--n-val", "8", "--n-test", "4", "--epochs", "1", "--batch-size", "8",
                 "--option", "widths=[2,2,2]", "--out", str(run), "--quiet"]) == 0
    calls = []
    measure_loss = measurement.measure_loss
    monkeypatch.setattr(measurement, "measure_loss", lambda *a, **k: calls.append(1) or measure_loss(*a, **k))
    out = tmp_path / "perf"
    assert main(["perforate", "--checkpoint", str(run / "checkpoint.npz"), "--target-speedup", "1", "--cost", "flops",
                 "--out", str(out), "--held-out", "8", "--impact-images", "8", "--timing-batch", "2",
                 "--timing-repeats", "1", "--stride-factors", "1", "2", "3", "--resolutions", "0.5", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "stopped: target reached" in printed
    profile = load_profile(out / "profile.json")
    layers = len(profile.layers)
    assert layers == 11
    stride_points = len(json.loads((out / "baselines.json").read_text())["stride"])
    assert stride_points <= max_stride_evaluations(layers, 3) == 243
    # greedy: the dense network once; stride: every point once; resolution: one size
    assert len(calls) == 1 + stride_points + 1
    assert stride_points > 2 * layers  # it did search: more than one step


def test_resolution_baseline_shapes_and_flops():
    model = tiny_nin()
    split = data(hw=(16, 16))
    small = resize_images(split.images, (8, 8))
    assert small.shape == (6, 1, 8, 8) and small.dtype == split.images.dtype
    np.testing.assert_allclose(resize_images(np.ones((1, 1, 16, 16)), 8), np.ones((1, 1, 8, 8)))
    points = resolution_baseline(model, split, [16, 12, 8], timing_batch=2, timing_repeats=1)

    def flops_at(h):
        total, hw = 0, (h, h)
        for c, k, kernel in ((1, 4, 3), (4, 4, 1)):
            total += 2 * c * kernel * kernel * k * hw[0] * hw[1]
        hw = conv_output_shape(hw, 3, 2, 1)
        for c, k, kernel in ((4, 5, 3), (5, 5, 1)):
            total += 2 * c * kernel * kernel * k * hw[0] * hw[1]
        hw = conv_output_shape(hw, 3, 2, 1)
        for c, k, kernel in ((5, 6, 3), (6, 10, 1)):
            total += 2 * c * kernel * kernel * k * hw[0] * hw[1]
        return total

    assert [p["flops"] for p in points] == [flops_at(16), flops_at(12), flops_at(8)]
    assert points[0]["theoretical_speedup"] == 1.0
    assert points[2]["theoretical_speedup"] == pytest.approx(flops_at(16) / flops_at(8))


def test_pareto_front():
    points = [{"measured_speedup": 1.0, "error": 0.1}, {"measured_speedup": 2.0, "error": 0.2},
              {"measured_speedup": 1.5, "error": 0.3}, {"measured_speedup": 2.0, "error": 0.25}]
    assert [p["pareto"] for p in pareto_front(points)] == [True, True, False, False]


def test_bad_stride_factor_is_refused():
    with pytest.raises(ValueError, match="factor"):
        UpsamplingPlan((4, 4), 0)


def test_stride_baseline_stops_once_the_path_is_fast_enough():
    assert len(stride_baseline(tiny_nin(), data(), factors=(1, 2), timing_batch=2, timing_repeats=1,
                               until_speedup=1.0)) == 1  # the dense network is already that fast
    points = stride_baseline(tiny_nin(), data(), factors=(1, 2), timing_batch=2, timing_repeats=1, until_speedup=1.2)
    path = [p for p in points if p["path"]]
    assert path[-1]["theoretical_speedup"] >= 1.2 > path[-2]["theoretical_speedup"]
    assert len(path) < 4  # it stopped before every layer reached factor 2


def test_stride_baseline_can_time_only_its_path(monkeypatch):
    from refimpl import measurement

    timed = []
    measure_time = measurement.measure_time
    monkeypatch.setattr(measurement, "measure_time", lambda *a, **k: timed.append(1) or measure_time(*a, **k))
    points = stride_baseline(tiny_nin(), data(), factors=(1, 2), timing_batch=2, timing_repeats=1, time_trials=False)
    path = [p for p in points if p["path"]]
    assert len(points) == 7 and len(path) == 4
    assert all(p["seconds"] is not None and p["measured_speedup"] is not None for p in path)
    assert all(p["seconds"] is None and p["measured_speedup"] is None and not p["pareto"]
               for p in points if not p["path"])
    assert len(timed) == 1 + len(path)  # the dense reference, then each network on the path
    # the same search, every trial timed: the same path
    again = stride_baseline(tiny_nin(), data(), factors=(1, 2), timing_batch=2, timing_repeats=1)
    assert [p["factors"] for p in again if p["path"]] == [p["factors"] for p in path]
