"""Greedy perforation of a whole network (refimpl.greedy) and the implicit runner (refimpl.implicit_network)."""

from __future__ import annotations

import numpy as np
import pytest

import fastpath

from refimpl.backend import get_backend
from refimpl.datasets import Split
from refimpl.flops import network_flops
from refimpl.greedy import (KEPT_FRACTIONS, apply_step, finetune_step, load_profile, measure_time, move_cost,
                            perforate_network, set_group_mask)
from refimpl.impact import find_perforable_layers
from refimpl.implicit_network import chain_layers, run_implicit
from refimpl.nin import NIN
from refimpl.resnet import resnet
from tolerances import FLOAT64_REFORMULATION_RTOL

F64 = np.float64


def tiny_nin(seed=0, dtype=F64):
    model = NIN(10, 1, np.random.default_rng(seed), widths=(4, 5, 6), dtype=dtype)
    for _, p, _ in model.named_parameters():
        if p.ndim == 1:
            p += 0.2 * np.random.default_rng(seed + 1).standard_normal(p.shape)
    return model.eval()


def held_out(n=12, hw=(8, 8), seed=0, dtype=F64):
    rng = np.random.default_rng(seed)
    return Split(rng.random((n, 1, *hw)).astype(dtype), rng.integers(0, 10, n))


def run_greedy(seed=0, **kwargs):
    model = tiny_nin()
    options = dict(mask_types=("impact", "grid"), cost="flops", rng=np.random.default_rng(seed), timing_batch=4,
                   timing_repeats=1, max_steps=6)
    options.update(kwargs)
    profile = perforate_network(model, held_out(), 100.0, **options)
    return model, profile


def test_fractions_are_those_of_the_released_code():
    assert KEPT_FRACTIONS[:4] == (1.0, 1 / 1.5, 0.5, 1 / 3) and KEPT_FRACTIONS[-1] == 1 / 20 and len(KEPT_FRACTIONS) == 21


def test_move_cost_is_infinite_when_nothing_is_saved():
    assert move_cost(1.5, 1.0, 10.0, 20.0) == pytest.approx(0.05)
    assert move_cost(0.5, 1.0, 10.0, 20.0) == pytest.approx(-0.05)
    assert move_cost(1.5, 1.0, 20.0, 20.0) == float("inf")
    assert move_cost(0.5, 1.0, 25.0, 20.0) == float("inf")


def steps_without_timings(profile):
    return [{k: v for k, v in s.items() if k not in ("seconds", "measured_speedup")} for s in profile.steps]


def test_greedy_with_a_fixed_seed_is_deterministic():
    _, first = run_greedy(seed=3)
    _, second = run_greedy(seed=3)
    assert steps_without_timings(first) == steps_without_timings(second)
    assert len(first.steps) == 7


def test_greedy_cost_decreases_monotonically_and_speedup_grows():
    _, profile = run_greedy(mask_types=("impact", "grid", "uniform", "structure"))
    flops = profile.column("flops")
    assert all(b < a for a, b in zip(flops, flops[1:])), flops
    speedups = profile.column("theoretical_speedup")
    assert speedups[0] == pytest.approx(1.0) and all(b > a for a, b in zip(speedups, speedups[1:]))
    assert profile.steps[0]["move"] is None and profile.steps[0]["perforation"] == {}
    for step in profile.steps[1:]:  # each step perforates one layer one or more notches further
        assert step["move"]["mask_type"] in ("impact", "grid", "uniform", "structure")


def test_recorded_move_cost_is_loss_increase_per_flop_saved():
    _, profile = run_greedy(mask_types=("impact",), max_steps=4)
    for before, after in zip(profile.steps, profile.steps[1:]):
        assert after["move"]["move_cost"] == pytest.approx(
            (after["loss"] - before["loss"]) / (before["flops"] - after["flops"]), rel=1e-12)


def test_stops_at_the_target_speedup():
    model = tiny_nin()
    profile = perforate_network(model, held_out(), 1.5, mask_types=("grid",), cost="flops",
                                rng=np.random.default_rng(0), timing_batch=4, timing_repeats=1)
    speedups = profile.column("theoretical_speedup")
    assert speedups[-1] >= 1.5 and all(s < 1.5 for s in speedups[:-1])


def test_profile_json_rebuilds_the_network_of_every_step(tmp_path):
    model, profile = run_greedy()
    path = profile.save(tmp_path / "profile.json")
    loaded = load_profile(path)
    x = held_out(5, seed=9).images
    last = len(loaded.steps) - 1
    rebuilt = apply_step(tiny_nin(), loaded, last)
    np.testing.assert_array_equal(rebuilt(x), model(x))
    # an earlier step gives a different network, and step 0 the dense one
    np.testing.assert_array_equal(apply_step(tiny_nin(), loaded, 0)(x), tiny_nin()(x))
    assert not np.array_equal(apply_step(tiny_nin(), loaded, 2)(x), model(x))
    layers = dict(rebuilt.named_layers())
    for name, entry in loaded.steps[last]["perforation"].items():
        assert int(layers[name].cache.plan.counts[0]) == entry["kept"]


def test_load_profile_rejects_other_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"steps": []}')
    with pytest.raises(ValueError, match="not a ponder perforation profile"):
        load_profile(path)


def test_pointwise_followers_sharing_the_mask_change_nothing():
    """A 1x1 conv after a nearest-filled one computed only at the kept positions gives the same output."""
    x = held_out(4).images
    mask = np.random.default_rng(1).random((8, 8)) < 0.3
    only_conv = tiny_nin()
    only_conv.conv1.set_mask(mask)
    with_followers = tiny_nin()
    info = find_perforable_layers(with_followers, x)[0]
    set_group_mask(with_followers, info, mask)
    np.testing.assert_allclose(with_followers(x), only_conv(x), rtol=FLOAT64_REFORMULATION_RTOL, atol=1e-14)
    assert with_followers.cccp1.flops < only_conv.cccp1.flops


def test_time_cost_with_a_clock_that_reads_flops_makes_the_flops_choices():
    """cost="time" measures the forward with the clock; a clock that advances by the FLOPs of the
    forward just run (a perfectly efficient machine) must reproduce cost="flops" move for move."""
    model = tiny_nin()
    ticks = [0.0]

    def flop_clock():
        ticks[0] += network_flops(model)
        return ticks[0]

    profile = perforate_network(model, held_out(), 100.0, mask_types=("impact", "grid"), cost="time",
                                rng=np.random.default_rng(3), timing_batch=4, timing_repeats=1, max_steps=6,
                                timer=flop_clock)
    _, by_flops = run_greedy(seed=3)
    assert [s["move"] for s in profile.steps[1:]] == [
        {**s["move"], "move_cost": pytest.approx(s["move"]["move_cost"] / 4)} for s in by_flops.steps[1:]]
    np.testing.assert_allclose(profile.column("measured_speedup"), by_flops.column("theoretical_speedup"))


def test_measure_time_runs_either_runner_and_names_a_bad_one():
    model, _ = run_greedy(max_steps=3)
    x = held_out(4).images
    calls = []

    def counting_clock():
        calls.append(1)
        return float(len(calls))

    assert measure_time(model, x, repeats=3, timer=counting_clock, runner="implicit") == 1.0
    assert len(calls) == 6
    assert measure_time(model, x, repeats=2, runner="layers") > 0
    with pytest.raises(ValueError, match="runner"):
        measure_time(model, x, runner="fast")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="cost"):
        run_greedy(cost="speed")
    with pytest.raises(ValueError, match="mask_types"):
        run_greedy(mask_types=("checkerboard",))
    with pytest.raises(ValueError, match="target_speedup"):
        perforate_network(tiny_nin(), held_out(), 0.5, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="fractions"):
        run_greedy(fractions=(1.0, 0.7, 0.8))


def test_finetuning_a_step_keeps_its_masks():
    model, profile = run_greedy(max_steps=3)
    history = finetune_step(model, profile, 3, held_out(16, seed=5), epochs=1, lr=0.01, rng=np.random.default_rng(0),
                            batch_size=8)
    assert len(history) == 1 and np.isfinite(history.epochs[0].train_loss)
    for name, entry in profile.steps[3]["perforation"].items():
        assert int(dict(model.named_layers())[name].cache.plan.counts[0]) == entry["kept"]


def backend_params():
    params = [pytest.param("numpy", id="numpy")]
    for name, status in fastpath.available_backends().items():
        marks = [] if status.usable else [pytest.mark.skip(reason=f"{name} unavailable: {status.reason}")]
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.mark.parametrize("backend", backend_params())
def test_implicit_network_equals_the_explicit_fill_path(backend):
    model, profile = run_greedy(max_steps=5)
    dtype_model = tiny_nin(dtype=np.float32)
    apply_step(dtype_model, profile, len(profile.steps) - 1)
    for x, check_model, rtol in ((held_out(6, seed=3).images, model, 1e-12),
                                 (held_out(6, seed=3, dtype=np.float32).images, dtype_model, 1e-4)):
        if not get_backend(backend).supports_dtype(x.dtype):
            continue
        expected = check_model(x)
        out, memory = run_implicit(check_model, x, backend=backend)
        np.testing.assert_allclose(out, expected, rtol=rtol, atol=rtol * 1e-2)
        assert memory.saved_bytes > 0 and memory.implicit_bytes < memory.explicit_bytes
    # the dense network: every pooling of a dense map goes through the backend's table pooling
    if not get_backend(backend).supports_dtype(np.float64):
        return
    dense = tiny_nin()
    x = held_out(6, seed=4).images
    out, memory = run_implicit(dense, x, backend=backend)
    np.testing.assert_allclose(out, dense(x), rtol=FLOAT64_REFORMULATION_RTOL, atol=1e-14)
    assert memory.saved_bytes < 0  # nothing is compact; the pooling index tables are extra
    out_layers, _ = run_implicit(dense, x, backend=backend, pool_on_backend=False)
    np.testing.assert_allclose(out_layers, dense(x), rtol=FLOAT64_REFORMULATION_RTOL, atol=1e-14)


def test_implicit_runner_refuses_a_residual_network():
    model = resnet(8, 10, 1, np.random.default_rng(0), dtype=F64).eval()
    with pytest.raises(ValueError, match="chain network"):
        chain_layers(model, held_out(2).images)


def test_ponder_perforate_on_a_checkpoint_from_ponder_train(tmp_path, capsys):
    from refimpl.cli import main

    run = tmp_path / "nin"
    main(["train", "--model", "nin", "--data", "cluttered-digits", "--canvas", "16", "--digit-scale", "1",
          "--n-train", "32", "--n-val", "24", "--n-test", "8", "--epochs", "1", "--batch-size", "16",
          "--option", "widths=[4,4,4]", "--out", str(run), "--quiet"])
    out = tmp_path / "perf"
    main(["perforate", "--checkpoint", str(run / "checkpoint.npz"), "--target-speedup", "2", "--mask", "impact", "grid",
          "--cost", "flops", "--out", str(out), "--held-out", "24", "--impact-images", "16", "--timing-batch", "4",
          "--timing-repeats", "1", "--stride-factors", "1", "2", "--resolutions", "0.5", "--clock", "cpu",
          "--quiet"])
    profile = load_profile(out / "profile.json")
    assert profile.settings["cost"] == "flops" and profile.steps[-1]["theoretical_speedup"] >= 2
    # --runner auto: the NIN CNN is a chain network, so its timed forwards run implicitly
    assert profile.settings["runner"] == "implicit" and profile.settings["clock"] == "cpu"
    baselines = json_load(out / "baselines.json")
    # the stride search over 3 layers with factors 1, 2: the dense network, then 3 + 2 + 1 trials
    assert len(baselines["stride"]) == 7 and [p["size"] for p in baselines["resolution"]] == [[8, 8]]
    assert (out / "speed_error.png").stat().st_size > 5000
    printed = capsys.readouterr().out
    assert "greedy steps: theoretical" in printed
    assert "stopped: target reached: theoretical speedup" in printed and profile.stop_reason in printed
    with pytest.raises(SystemExit, match="does not exist"):
        main(["perforate", "--checkpoint", str(tmp_path / "missing.npz"), "--out", str(out)])


def json_load(path):
    import json

    return json.loads(path.read_text())


def test_greedy_on_a_residual_network_and_its_stride_baseline():
    from refimpl.baselines import stride_baseline

    def build():
        return resnet(8, 10, 1, np.random.default_rng(0), dtype=F64, widths=(4, 4, 8)).eval()

    model = build()
    data = held_out(8)
    profile = perforate_network(model, data, 100.0, mask_types=("impact", "structure"), cost="flops",
                                rng=np.random.default_rng(0), timing_batch=2, timing_repeats=1, max_steps=3)
    flops = profile.column("flops")
    assert len(flops) == 4 and all(b < a for a, b in zip(flops, flops[1:]))
    x = data.images[:3]
    np.testing.assert_array_equal(apply_step(build(), profile, 3)(x), model(x))
    points = stride_baseline(build(), data, factors=(1, 2), timing_batch=2, timing_repeats=1,
                             layers=[entry["name"] for entry in profile.layers[:2]])
    assert len(points) == 1 + 2 + 1 and points[0]["theoretical_speedup"] == 1.0


def test_the_profile_says_why_the_search_stopped(tmp_path):
    _, profile = run_greedy(max_steps=2)
    assert profile.stop_reason == "max_steps (2) reached" and len(profile.steps) == 3
    _, profile = run_greedy(fractions=(1.0, 0.5), max_steps=None)
    assert profile.stop_reason.startswith("no layer left to perforate")
    assert len(profile.steps) == 1 + 3  # each of the three layers once
    _, profile = run_greedy(max_steps=None)
    assert profile.stop_reason.startswith("no layer left") or profile.stop_reason.startswith("no move lowers")
    model = tiny_nin()
    profile = perforate_network(model, held_out(), 1.0, cost="flops", rng=np.random.default_rng(0), timing_batch=4,
                                timing_repeats=1)
    assert profile.stop_reason == "target reached: theoretical speedup 1.00x" and len(profile.steps) == 1
    assert load_profile(profile.save(tmp_path / "p.json")).stop_reason == profile.stop_reason


def test_implicit_network_fills_before_a_pointwise_conv_with_another_mask():
    """A 1x1 convolution perforated with a mask of its own cannot read the compact tensor position
    by position: the runner fills first, and the result still equals the explicit network."""
    from refimpl.masks import grid_mask, uniform_mask

    model = tiny_nin()
    x = held_out(4, seed=5).images
    info = find_perforable_layers(model, x)[0]
    set_group_mask(model, info, grid_mask(info.out_hw, 0.5, np.random.default_rng(0)))
    layers = dict(model.named_layers())
    follower = layers[info.followers[0]]
    follower.set_mask(uniform_mask(info.out_hw, 0.3, np.random.default_rng(1)), "nearest")
    out, _ = run_implicit(model, x)
    np.testing.assert_allclose(out, model(x), rtol=FLOAT64_REFORMULATION_RTOL, atol=1e-14)
