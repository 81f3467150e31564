"""Training: optimisers and schedules, FLOP totals, checkpoints (exact round trip, clear errors),
NaN stop naming the layer, the model registry, and a real learning test (ResNet-8 overfits 64
cluttered digits)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from refimpl.backend import BackendUnavailableError, get_backend
from refimpl.checkpoint import CheckpointError, load_checkpoint, load_into, save_checkpoint
from refimpl.datasets import Split, load_cluttered_digits
from refimpl.flops import dense_flops, flops_per_image, layer_flops, network_flops
from refimpl.layers import Linear, ReLU, Sequential
from refimpl.models import build_model, model_names, register_model
from refimpl.optim import SGD, Adam, CosineSchedule, StepSchedule
from refimpl.training import History, TrainingDivergedError, evaluate, fit, plot_history, train_step


def rng(seed=0):
    return np.random.default_rng(seed)


# --- optimisers ---------------------------------------------------------------------------------


def _one_param(value, grad):
    p, g = np.array(value, dtype=np.float64), np.array(grad, dtype=np.float64)
    return p, g, [("p", p, g)]


def test_sgd_momentum_and_weight_decay_follow_the_update_rule():
    w, gw, params = _one_param([[1.0, -2.0]], [[0.5, 0.5]])
    b = np.array([3.0])
    gb = np.array([1.0])
    params.append(("b", b, gb))
    opt = SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01)
    opt.step()
    g1 = np.array([[0.5, 0.5]]) + 0.01 * np.array([[1.0, -2.0]])
    expected_w = np.array([[1.0, -2.0]]) - 0.1 * g1
    np.testing.assert_allclose(w, expected_w)
    np.testing.assert_allclose(b, [2.9])  # no decay on 1-D arrays (biases, batch-norm parameters)
    opt.step()
    g2 = np.array([[0.5, 0.5]]) + 0.01 * expected_w
    np.testing.assert_allclose(w, expected_w - 0.1 * (0.9 * g1 + g2))


def test_adam_first_steps_match_the_formula():
    p, g, params = _one_param([1.0, 1.0], [0.2, -3.0])
    opt = Adam(params, lr=0.01)
    opt.step()
    np.testing.assert_allclose(p, 1.0 - 0.01 * np.sign([0.2, -3.0]) / (1 + 1e-8 / np.abs([0.2, -3.0])))
    g[:] = [0.1, 0.1]
    before = p.copy()
    opt.step()
    m = (0.9 * 0.1 * np.array([0.2, -3.0]) + 0.1 * 0.1) / (1 - 0.9**2)
    s = (0.999 * 0.001 * np.array([0.04, 9.0]) + 0.001 * 0.01) / (1 - 0.999**2)
    np.testing.assert_allclose(p, before - 0.01 * m / (np.sqrt(s) + 1e-8))


def test_optimisers_minimise_a_quadratic():
    for make in (lambda ps: SGD(ps, 0.1, momentum=0.9), lambda ps: Adam(ps, 0.1)):
        p, g, params = _one_param([3.0, -4.0], [0.0, 0.0])
        opt = make(params)
        for _ in range(300):
            g[:] = 2 * p
            opt.step()
        assert np.abs(p).max() < 1e-2


def test_schedules():
    step = StepSchedule(1.0, [10, 20], 0.1)
    assert [step(0), step(9), step(10), step(25)] == [1.0, 1.0, pytest.approx(0.1), pytest.approx(0.01)]
    cos = CosineSchedule(1.0, 100, final_lr=0.0, warmup=10)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(10) == pytest.approx(1.0) and cos(55) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0)
    assert cos(1000) == pytest.approx(0.0)


def test_optimiser_argument_checks():
    _, _, params = _one_param([1.0], [1.0])
    with pytest.raises(ValueError, match="lr"):
        SGD(params, lr=0)
    with pytest.raises(ValueError, match="momentum"):
        SGD(params, lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="no parameters"):
        Adam([], lr=0.1)


# --- FLOPs ----------------------------------------------------------------------------------------


def test_resnet8_flops_by_hand():
    model = build_model("resnet8", 10, 1, rng(), widths=(4, 8, 16))
    x = np.zeros((2, 1, 8, 8), np.float32)
    per_image = flops_per_image(model, x)
    conv = lambda c, k, kk, positions: 2 * c * kk * kk * k * positions  # noqa: E731
    expected = (conv(1, 4, 3, 64)  # stem
                + conv(4, 4, 3, 64) * 2  # stage 1: two 3x3 convs at 8x8
                + conv(4, 8, 3, 16) + conv(8, 8, 3, 16)  # stage 2 at 4x4 (option-A shortcut: free)
                + conv(8, 16, 3, 4) + conv(16, 16, 3, 4)  # stage 3 at 2x2
                + 2 * 16 * 10)  # linear
    np.testing.assert_array_equal(per_image, [expected, expected])
    assert network_flops(model) == 2 * expected
    assert dense_flops(model) == expected


def test_perforated_network_counts_only_computed_positions():
    perforated = build_model("resnet8", 10, 1, rng(), widths=(4, 8, 16), perforation={"stem": ("grid", 0.75)})
    perforated(np.zeros((3, 1, 8, 8), np.float32))
    computed = int(perforated.stem.cache.plan.mask.sum())
    assert computed == 16  # grid: 4 rows x 4 cols of 8x8
    assert layer_flops(perforated)["stem"] == 2 * 1 * 9 * 4 * computed * 3
    assert dense_flops(perforated) - network_flops(perforated) / 3 == 2 * 9 * 4 * (64 - computed)


# --- checkpoints -------------------------------------------------------------------------------


def _trained_tiny(backend=None, perforation=None):
    model = build_model("resnet8", 4, 1, rng(1), backend=backend, widths=(2, 3, 4), perforation=perforation)
    data = Split(rng(2).random((16, 1, 8, 8), dtype=np.float32), rng(3).integers(0, 4, 16))
    opt = SGD(list(model.named_parameters()), 0.05, momentum=0.9)
    fit(model, opt, data, epochs=2, batch_size=8, rng=rng(4), progress=False)
    return model, opt, data


def test_checkpoint_round_trip_is_exact(tmp_path):
    model, opt, data = _trained_tiny(perforation={"stages.0.units.0.conv1": ("uniform", 0.5)})
    path = save_checkpoint(tmp_path / "c.npz", model, "resnet8",
                           {"num_classes": 4, "in_channels": 1, "dtype": "float32", "options": {"widths": [2, 3, 4]}},
                           opt, extra={"note": "hello"})
    loaded, meta = load_checkpoint(path)
    assert meta["extra"] == {"note": "hello"}
    for (na, pa, _), (nb, pb, _) in zip(model.named_parameters(), loaded.named_parameters()):
        assert na == nb and pa.dtype == pb.dtype
        np.testing.assert_array_equal(pa, pb)
    for (na, ba), (nb, bb) in zip(model.named_buffers(), loaded.named_buffers()):
        np.testing.assert_array_equal(ba, bb)
    model.eval()
    np.testing.assert_array_equal(model(data.images), loaded(data.images))  # same masks, same numbers
    fresh = build_model("resnet8", 4, 1, rng(9), widths=(2, 3, 4))
    opt2 = SGD(list(fresh.named_parameters()), 0.05, momentum=0.9)
    load_into(fresh, path, opt2)
    assert opt2.steps == opt.steps
    for name in opt.state:
        np.testing.assert_array_equal(opt2.state[name]["velocity"], opt.state[name]["velocity"])


def test_checkpoint_errors_are_clear(tmp_path):
    model, _, _ = _trained_tiny()
    good = save_checkpoint(tmp_path / "good.npz", model, "resnet8",
                           {"num_classes": 4, "in_channels": 1, "options": {"widths": [2, 3, 4]}})
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="damaged or not a ponder checkpoint"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(garbage)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, weights=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a ponder checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.npz")
    wider = build_model("resnet8", 4, 1, rng(), widths=(2, 3, 5))
    with pytest.raises(CheckpointError, match=r"stages.2.units.0.conv1.w' is float32\[4, 3, 3, 3\] but the model "
                                              r"expects float32\[5, 3, 3, 3\]"):
        load_into(wider, good)
    deeper = build_model("resnet14", 4, 1, rng(), widths=(2, 3, 4))
    with pytest.raises(CheckpointError, match="missing from the checkpoint.*stages.0.units.1"):
        load_into(deeper, good)
    as_float64 = build_model("resnet8", 4, 1, rng(), widths=(2, 3, 4), dtype=np.float64)
    with pytest.raises(CheckpointError, match="float32.*expects float64"):
        load_into(as_float64, good)


# --- the loop --------------------------------------------------------------------------------------


def test_nan_stops_training_and_names_the_layer():
    model = Sequential(Linear(4, 5, rng(), dtype=np.float64), ReLU(), Linear(5, 3, rng(1), dtype=np.float64))
    model[2].params["w"][1, 2] = np.nan
    data = Split(rng(2).standard_normal((8, 4)), rng(3).integers(0, 3, 8))
    opt = SGD(list(model.named_parameters()), 0.1)
    with pytest.raises(TrainingDivergedError, match="epoch 1.*output of layer '2'.*non-finite parameters: \\['2.w'\\]") as info:
        fit(model, opt, data, epochs=1, batch_size=4, rng=rng(), progress=False)
    assert info.value.layer_name == "2"
    assert opt.steps == 0  # stopped before any update


def test_nan_in_the_input_is_named_at_the_first_layer():
    model = Sequential(Linear(4, 3, rng(), dtype=np.float64))
    x = rng().standard_normal((2, 4))
    x[0, 0] = np.nan
    with pytest.raises(TrainingDivergedError, match="layer '0'"):
        train_step(model, x, np.array([0, 1]), SGD(list(model.named_parameters()), 0.1))


def test_fit_history_and_evaluate(tmp_path):
    model, opt, data = _trained_tiny()
    history = fit(model, opt, data, data, epochs=2, batch_size=8, rng=rng(5), progress=False)
    assert len(history) == 2 and history.column("epoch") == [1, 2]
    record = history.epochs[-1]
    result = evaluate(model, data)
    assert record.val_accuracy == result["accuracy"] and record.val_loss == pytest.approx(result["loss"])
    assert record.flops_per_image == result["flops_per_image"] == dense_flops(model)
    assert model.training  # evaluate restored the mode
    history.to_json(tmp_path / "h.json")
    again = History.from_dict(json.loads((tmp_path / "h.json").read_text()))
    assert again.epochs == history.epochs
    plot_history(history, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_fit_is_deterministic_under_a_seed():
    a, _, _ = _trained_tiny()
    b, _, _ = _trained_tiny()
    for (_, pa, _), (_, pb, _) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(pa, pb)


def test_extra_loss_hook_is_added():
    class WithExtra(Sequential):
        def extra_loss(self):
            return 1.5

    model = WithExtra(Linear(2, 2, rng(), dtype=np.float64))
    plain = Sequential(Linear(2, 2, rng(), dtype=np.float64))
    x, y = rng().standard_normal((4, 2)), np.array([0, 1, 1, 0])
    loss_a, _, _ = train_step(model, x, y, SGD(list(model.named_parameters()), 1e-9))
    loss_b, _, _ = train_step(plain, x, y, SGD(list(plain.named_parameters()), 1e-9))
    assert loss_a == pytest.approx(loss_b + 1.5)


def test_registry():
    assert {"resnet8", "resnet14", "resnet20", "resnet32", "resnet110", "nin"} <= set(model_names())
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("resnet9", 10, 3, rng())
    register_model("tiny-linear", lambda num_classes, in_channels, rng, **kw: Sequential(Linear(in_channels, num_classes, rng)))
    assert build_model("tiny-linear", 3, 2, rng())(np.zeros((1, 2), np.float32)).shape == (1, 3)


def _fast_backend():
    try:
        return get_backend("cython")
    except (BackendUnavailableError, ValueError):
        return get_backend("numpy")


def test_resnet8_overfits_64_cluttered_digits():
    """A real learning test: 64 cluttered 32x32 digits learned to 100% (evaluation mode)."""
    data = load_cluttered_digits(32, 64, 0, 0, seed=0)["train"]
    model = build_model("resnet8", 10, 1, rng(0), backend=_fast_backend(), widths=(8, 16, 32))
    optimizer = Adam(list(model.named_parameters()), lr=0.02)
    history = fit(model, optimizer, data, epochs=20, batch_size=32, rng=rng(1), progress=False)
    assert history.epochs[0].train_accuracy < 0.3  # it did not start out knowing the answer
    assert evaluate(model, data)["accuracy"] == 1.0
    assert math.isfinite(history.epochs[-1].train_loss) and history.epochs[-1].train_loss < 0.05


def test_training_protocol_of_a_plain_model():
    model = Sequential(Linear(2, 3, rng(), dtype=np.float64))
    assert model.extra_loss() == 0.0 and model.param_dtype == np.float64
    x = rng().standard_normal((4, 2))
    model(x)
    d = rng(1).standard_normal((4, 3))
    np.testing.assert_array_equal(model.objective_backward(d, np.ones(4)), model.backward(d))
    assert Sequential(ReLU()).param_dtype == np.float32  # no parameters
