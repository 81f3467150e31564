"""Layers: gradient checks of every layer (float64, random upstream gradient), batch norm train vs
eval, dropout, perforated convolution layers, cross-entropy, the layer tree."""

from __future__ import annotations

import numpy as np
import pytest
from layer_checks import layer_gradient_errors
from tolerances import FLOAT64_REFORMULATION_RTOL, GRADCHECK_RTOL

from refimpl.conv import conv2d_forward
from refimpl.conv_layer import Conv2d, PerforationSpec, apply_perforation, as_perforation_spec
from refimpl.gradcheck import check_gradients
from refimpl.layers import (AvgPool2d, BatchNorm1d, BatchNorm2d, Dropout, Flatten, GlobalAvgPool2d, LeakyReLU, Linear,
                            MaxPool2d, NonFiniteError, ReLU, Sequential, trace_non_finite, update_running_statistics)
from refimpl.resnet import resnet
from refimpl.losses import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from refimpl.masks import grid_mask
from refimpl.perforation import fill_forward, PerforationPlan

F64 = np.float64


def rng(seed=0):
    return np.random.default_rng(seed)


def assert_gradients(errors):
    bad = {k: v for k, v in errors.items() if not v < GRADCHECK_RTOL}
    assert not bad, f"gradient mismatch: {bad}"


def _away_from_zero(x, margin=0.05):
    """Values at least ``margin`` from 0, so a central difference never straddles a ReLU kink."""
    return np.where(np.abs(x) < margin, np.sign(x + 1e-12) * margin, x)


# --- gradient checks of every layer ----------------------------------------------------------

LAYERS = {
    "linear": (lambda r: Linear(5, 3, r, dtype=F64), (4, 5)),
    "relu": (lambda r: ReLU(), (3, 4, 5)),
    "leaky_relu": (lambda r: LeakyReLU(0.1), (3, 4, 5)),
    "batchnorm2d_train": (lambda r: BatchNorm2d(3, dtype=F64), (4, 3, 3, 2)),
    "batchnorm1d_train": (lambda r: BatchNorm1d(4, dtype=F64), (6, 4)),
    "maxpool_overlapping": (lambda r: MaxPool2d(3, 2, 1), (2, 2, 7, 6)),
    "avgpool": (lambda r: AvgPool2d(2), (2, 3, 4, 6)),
    "avgpool_padded": (lambda r: AvgPool2d(3, 2, 1), (2, 2, 5, 5)),
    "global_avg_pool": (lambda r: GlobalAvgPool2d(), (3, 4, 3, 5)),
    "flatten": (lambda r: Flatten(), (2, 3, 2, 2)),
    "conv_dense": (lambda r: Conv2d(3, 4, 3, r, stride=1, padding=1, dtype=F64), (2, 3, 5, 4)),
    "conv_strided_nobias": (lambda r: Conv2d(2, 3, (3, 2), r, stride=2, padding=(1, 0), bias=False, dtype=F64),
                            (2, 2, 7, 6)),
    "conv_perforated_grid_nearest": (lambda r: Conv2d(2, 3, 3, r, padding=1, perforation=("grid", 0.6), dtype=F64),
                                     (2, 2, 6, 6)),
    "conv_perforated_uniform_zero": (lambda r: Conv2d(2, 3, 3, r, perforation=("uniform", 0.5, "zero"), dtype=F64),
                                     (2, 2, 7, 6)),
    # The conv has no bias: batch norm removes it, so its true gradient is 0 and a relative error meaningless.
    "sequential": (lambda r: Sequential(Conv2d(2, 3, 3, r, padding=1, bias=False, dtype=F64), BatchNorm2d(3, dtype=F64),
                                        LeakyReLU(0.2), MaxPool2d(2), Flatten(), Linear(12, 2, r, dtype=F64)),
                   (3, 2, 4, 4)),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_gradients(name):
    make, shape = LAYERS[name]
    r = rng(sum(map(ord, name)))
    layer = make(r)
    x = _away_from_zero(r.standard_normal(shape))
    assert_gradients(layer_gradient_errors(layer, x, r))


def test_batchnorm_eval_gradients():
    r = rng(1)
    layer = BatchNorm2d(3, dtype=F64)
    layer.buffers["running_mean"][:] = r.standard_normal(3)
    layer.buffers["running_var"][:] = r.uniform(0.5, 2.0, 3)
    layer.params["gamma"][:] = r.uniform(0.5, 1.5, 3)
    layer.eval()
    assert_gradients(layer_gradient_errors(layer, r.standard_normal((2, 3, 3, 3)), r))


def test_dropout_gradients_with_a_fixed_generator_state():
    r = rng(2)
    layer = Dropout(0.4, rng(7))

    def reseed():
        layer.rng = rng(7)

    errors = layer_gradient_errors(layer, r.standard_normal((4, 6)), r, before_forward=reseed)
    assert_gradients(errors)


def test_conv_per_call_per_sample_mask_gradients():
    r = rng(3)
    layer = Conv2d(2, 3, 3, r, padding=1, dtype=F64)
    masks = r.random((2, 5, 5)) < 0.5
    masks[:, 0, 0] = True
    x = r.standard_normal((2, 2, 5, 5))
    errors = layer_gradient_errors(layer, x, r, forward=lambda x: layer.forward(x, mask=masks, fill="zero"))
    assert_gradients(errors)


def test_cross_entropy_gradient():
    r = rng(4)
    labels = r.integers(0, 5, size=6)
    cache = {}

    def fwd(z):
        loss, cache["c"] = softmax_cross_entropy_forward(z, labels)
        return np.array(loss)

    errors = check_gradients(fwd, lambda d: {"z": softmax_cross_entropy_backward(float(d), cache["c"])},
                             {"z": r.standard_normal((6, 5))}, r)
    assert errors["z"] < GRADCHECK_RTOL


# --- semantics --------------------------------------------------------------------------------


def test_cross_entropy_is_stable_and_correct_for_huge_logits():
    logits = np.array([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]])
    loss, _ = softmax_cross_entropy_forward(logits, np.array([1, 2]))
    assert np.isfinite(loss)
    np.testing.assert_allclose(loss, (1000.0 + np.log(3.0)) / 2, rtol=FLOAT64_REFORMULATION_RTOL)


def test_cross_entropy_rejects_bad_labels():
    with pytest.raises(ValueError, match="labels must be in"):
        softmax_cross_entropy_forward(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="labels must be an int array"):
        softmax_cross_entropy_forward(np.zeros((2, 3)), np.array([0.0, 1.0]))


def test_batchnorm_train_normalises_and_updates_running_statistics():
    r = rng(5)
    x = r.normal(3.0, 2.0, size=(8, 3, 4, 4))
    layer = BatchNorm2d(3, momentum=0.25, dtype=F64)
    out = layer.forward(x)
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0.0, atol=1e-12)
    np.testing.assert_allclose(out.var(axis=(0, 2, 3)), 1.0, rtol=1e-4)  # eps = 1e-5 shrinks it slightly
    m = 8 * 4 * 4
    np.testing.assert_allclose(layer.buffers["running_mean"], 0.25 * x.mean(axis=(0, 2, 3)), rtol=FLOAT64_REFORMULATION_RTOL)
    np.testing.assert_allclose(layer.buffers["running_var"], 0.75 + 0.25 * x.var(axis=(0, 2, 3)) * m / (m - 1),
                               rtol=FLOAT64_REFORMULATION_RTOL)


def test_batchnorm_eval_uses_running_statistics_and_leaves_them_alone():
    r = rng(6)
    layer = BatchNorm2d(2, dtype=F64)
    for _ in range(200):  # converge the running statistics to the data distribution
        layer.forward(r.normal([[[[1.0]], [[-2.0]]]], [[[[0.5]], [[3.0]]]], size=(16, 2, 3, 3)))
    layer.eval()
    before = {k: v.copy() for k, v in layer.buffers.items()}
    x = np.full((1, 2, 1, 1), 1.0)  # a single sample: batch statistics would be meaningless
    out = layer.forward(x)
    expected = (x[0, :, 0, 0] - before["running_mean"]) / np.sqrt(before["running_var"] + layer.eps)
    np.testing.assert_allclose(out[0, :, 0, 0], expected, rtol=FLOAT64_REFORMULATION_RTOL)
    for k in before:
        np.testing.assert_array_equal(layer.buffers[k], before[k])
    np.testing.assert_allclose(before["running_mean"], [1.0, -2.0], atol=0.1)
    np.testing.assert_allclose(before["running_var"], [0.25, 9.0], rtol=0.1)


def test_batchnorm_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="BatchNorm2d"):
        BatchNorm2d(3).forward(np.zeros((2, 4, 2, 2), np.float32))
    with pytest.raises(ValueError, match="at least 2 values"):
        BatchNorm1d(3).forward(np.zeros((1, 3), np.float32))


def test_dropout_is_identity_in_eval_and_scales_in_train():
    layer = Dropout(0.5, rng(0))
    x = np.ones((200, 50))
    out = layer.forward(x)
    assert set(np.unique(out)) <= {0.0, 2.0}
    assert abs(out.mean() - 1.0) < 0.05
    layer.eval()
    assert layer.forward(x) is x


def test_dropout_same_seed_same_mask():
    x = np.ones((4, 10))
    np.testing.assert_array_equal(Dropout(0.3, rng(9)).forward(x), Dropout(0.3, rng(9)).forward(x))


def test_dense_conv_layer_equals_reference_convolution():
    r = rng(8)
    layer = Conv2d(3, 5, 3, r, stride=2, padding=1, dtype=F64)
    x = r.standard_normal((2, 3, 7, 8))
    expected, _ = conv2d_forward(x, layer.params["w"], layer.params["b"], stride=2, padding=1)
    np.testing.assert_allclose(layer.forward(x), expected, rtol=FLOAT64_REFORMULATION_RTOL, atol=1e-12)
    assert layer.flops == 2 * 3 * 9 * 5 * 4 * 4 * 2


def test_perforated_conv_layer_fills_from_computed_positions_and_counts_their_flops():
    r = rng(9)
    layer = Conv2d(2, 4, 3, r, padding=1, perforation=PerforationSpec("grid", 0.75), mask_rng=rng(1), dtype=F64)
    x = r.standard_normal((3, 2, 8, 8))
    out = layer.forward(x)
    mask = grid_mask((8, 8), 0.75, rng(1))  # the same generator state gives the same mask
    np.testing.assert_array_equal(layer.cache.plan.mask[0], mask)
    dense, _ = conv2d_forward(x, layer.params["w"], layer.params["b"], padding=1)
    np.testing.assert_allclose(out[:, :, mask], dense[:, :, mask], rtol=FLOAT64_REFORMULATION_RTOL, atol=1e-12)
    plan = PerforationPlan(mask)
    compact = dense.reshape(3, 4, 64)[:, :, plan.positions[0]]
    np.testing.assert_allclose(out, fill_forward(compact, plan, "nearest"), rtol=FLOAT64_REFORMULATION_RTOL, atol=1e-12)
    assert layer.flops == 2 * 2 * 9 * 4 * int(mask.sum()) * 3
    np.testing.assert_array_equal(layer.flops_per_sample, [2 * 2 * 9 * 4 * int(mask.sum())] * 3)


def test_explicit_mask_and_impact_spec():
    r = rng(10)
    layer = Conv2d(1, 2, 3, r, padding=1, perforation=("impact", 0.5))
    with pytest.raises(ValueError, match="impact scores"):
        layer.forward(np.zeros((1, 1, 4, 4), np.float32))
    mask = np.zeros((4, 4), bool)
    mask[::2, ::2] = True
    layer.set_mask(mask)
    layer.forward(np.ones((1, 1, 4, 4), np.float32))
    np.testing.assert_array_equal(layer.cache.plan.mask[0], mask)
    with pytest.raises(ValueError, match="explicit mask"):
        layer.forward(np.ones((1, 1, 6, 6), np.float32))


def test_perforation_spec_validation():
    assert as_perforation_spec(("grid", 0.5)) == PerforationSpec("grid", 0.5)
    assert as_perforation_spec({"mask_type": "uniform", "rate": 0.2, "fill": "zero"}).fill == "zero"
    with pytest.raises(ValueError, match="mask_type"):
        PerforationSpec("checkerboard", 0.5)
    with pytest.raises(ValueError, match="rate"):
        PerforationSpec("grid", 1.0)
    with pytest.raises(TypeError, match="perforation"):
        as_perforation_spec("grid")


def test_apply_perforation_names_unknown_layers():
    model = Sequential(Conv2d(1, 2, 3, rng()), ReLU())
    with pytest.raises(ValueError, match="not a convolution.*'0'"):
        apply_perforation(model, {"1": ("grid", 0.5)}, rng())


def test_conv_layer_checks_its_input():
    layer = Conv2d(3, 2, 3, rng())
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        layer.forward(np.zeros((1, 2, 5, 5), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        layer.forward(np.zeros((1, 3, 5, 5), np.float64))


def test_gradients_accumulate_until_zero_grad():
    r = rng(11)
    layer = Linear(3, 2, r, dtype=F64)
    x, d = r.standard_normal((4, 3)), r.standard_normal((4, 2))
    layer.forward(x)
    layer.backward(d)
    once = layer.grads["w"].copy()
    layer.forward(x)
    layer.backward(d)
    np.testing.assert_allclose(layer.grads["w"], 2 * once)
    layer.zero_grad()
    assert not layer.grads["w"].any()


def test_named_parameters_and_train_eval_reach_the_whole_tree():
    r = rng(12)
    model = Sequential(Conv2d(1, 2, 3, r), BatchNorm2d(2), Sequential(Dropout(0.5, r), Linear(2, 2, r)))
    names = [n for n, _, _ in model.named_parameters()]
    assert names == ["0.w", "0.b", "1.gamma", "1.beta", "2.1.w", "2.1.b"]
    model.eval()
    assert not any(layer.training for layer in model.layers())
    model.train()
    assert all(layer.training for layer in model.layers())


def test_trace_non_finite_names_the_first_bad_layer():
    r = rng(13)
    model = Sequential(Linear(3, 3, r, dtype=F64), ReLU(), Linear(3, 2, r, dtype=F64))
    x = r.standard_normal((2, 3))
    assert trace_non_finite(model, x) is None
    model[2].params["w"][0, 0] = np.nan
    assert trace_non_finite(model, x) == "2"
    assert all(layer._finite_check_name is None for layer in model.layers())  # tracing switched off again
    model(x)  # untraced: NaN flows through without an error


def test_traced_call_raises_with_the_layer_name():
    layer = Linear(2, 2, rng(), dtype=F64)
    layer.params["b"][0] = np.inf
    layer._finite_check_name = "head.fc"
    with pytest.raises(NonFiniteError, match="'head.fc' \\(Linear\\).*input was finite") as info:
        layer(np.ones((1, 2)))
    assert info.value.layer_name == "head.fc"


def test_set_mask_none_returns_to_dense():
    layer = Conv2d(1, 1, 3, rng(), padding=1, perforation=("grid", 0.5))
    layer.set_mask(None)
    assert not layer.is_perforated
    layer.forward(np.ones((1, 1, 4, 4), np.float32))
    assert layer.cache.plan.full


# --- the FLOPs form and the running statistics ---------------------------------------------------


def test_every_layer_reports_flops_per_sample_and_composites_add_their_children():
    model = resnet(8, 10, 1, np.random.default_rng(0), widths=(2, 3, 4))
    model(np.zeros((3, 1, 8, 8), np.float32))
    for name, layer in model.named_layers():
        assert layer.flops_per_sample.shape == (3,) and layer.flops_per_sample.dtype == np.int64, name
        children = layer.children()
        if children:
            np.testing.assert_array_equal(layer.flops_per_sample, sum(c.flops_per_sample for _, c in children))
        assert layer.flops == int(layer.flops_per_sample.sum())
    assert model.stages[0].units[0].relu1.flops == 0
    assert model.stem.flops_per_sample[0] == 2 * 1 * 9 * 2 * 64  # C kh kw K per position, 8x8 positions
    assert model.head[3].flops_per_sample[0] == 2 * 4 * 10


@pytest.mark.parametrize("count, factor", [(4, 4 / 3), (1, 1.0)])
def test_running_variance_enters_unbiased_except_for_a_single_value(count, factor):
    bn = BatchNorm2d(2, momentum=0.5, dtype=F64)
    update_running_statistics(bn, np.array([2.0, 4.0]), np.array([3.0, 6.0]), count)
    np.testing.assert_allclose(bn.buffers["running_mean"], [1.0, 2.0])
    np.testing.assert_allclose(bn.buffers["running_var"], [0.5 + 1.5 * factor, 0.5 + 3.0 * factor])
