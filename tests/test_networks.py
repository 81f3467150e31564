"""Whole networks: gradient checks of ResNet-8 and the NIN CNN (with the loss), structure of the
residual networks, perforation descriptions, numpy vs cython backends."""

from __future__ import annotations

import numpy as np
import pytest
from layer_checks import layer_gradient_errors
from tolerances import FLOAT64_REFORMULATION_RTOL, GRADCHECK_RTOL

from refimpl.backend import BackendUnavailableError, get_backend
from refimpl.conv_layer import Conv2d
from refimpl.losses import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from refimpl.nin import NIN
from refimpl.resnet import ResidualUnit, ResNet, pad_shortcut_backward, pad_shortcut_forward, resnet

F64 = np.float64


def rng(seed=0):
    return np.random.default_rng(seed)


def assert_gradients(errors):
    bad = {k: v for k, v in errors.items() if not v < GRADCHECK_RTOL}
    assert not bad, f"gradient mismatch: {bad}"


def jitter_vectors(model, rng):
    """Random biases, gammas and betas instead of the 0/1 initial values.

    With zero biases, a 1x1 convolution whose inputs are all zero after a ReLU outputs exactly 0,
    right on the next ReLU's kink, where a central difference is one-sided. Random values keep
    the check away from kinks (and test the general case).
    """
    for _, p, _ in model.named_parameters():
        if p.ndim == 1:
            p += 0.3 * rng.standard_normal(p.shape)
    return model


class WithLoss:
    """``model`` followed by softmax cross-entropy, as one layer for the gradient check."""

    def __init__(self, model, labels):
        self.model, self.labels = model, labels

    def forward(self, x):
        loss, self.cache = softmax_cross_entropy_forward(self.model.forward(x), self.labels)
        return np.array(loss)

    def backward(self, dloss):
        return self.model.backward(softmax_cross_entropy_backward(float(dloss), self.cache))

    def zero_grad(self):
        self.model.zero_grad()

    def named_parameters(self):
        return self.model.named_parameters()


@pytest.mark.parametrize("shortcut", ["pad", "projection"])
def test_resnet8_gradients_with_loss(shortcut):
    r = rng(1)
    model = resnet(8, num_classes=3, in_channels=2, rng=r, widths=(3, 4, 6), shortcut=shortcut, dtype=F64)
    jitter_vectors(model, r)
    x = r.standard_normal((3, 2, 8, 8))
    labels = np.array([0, 2, 1])
    errors = layer_gradient_errors(WithLoss(model, labels), x, r, coords_per_param=3)
    assert len(errors) == 1 + len(list(model.named_parameters()))
    assert_gradients(errors)


def test_perforated_resnet8_gradients():
    r = rng(2)
    perforation = {"stem": ("grid", 0.5), "stages.0.units.0.conv1": ("uniform", 0.4),
                   "stages.1.units.0.conv2": ("grid", 0.5, "zero")}
    model = resnet(8, 3, 1, r, widths=(2, 3, 4), perforation=perforation, dtype=F64)
    jitter_vectors(model, r)
    x = r.standard_normal((3, 1, 8, 8))
    assert_gradients(layer_gradient_errors(model, x, r, coords_per_param=3))
    assert model.stages[0].units[0].conv1.cache.plan.rate == pytest.approx(0.4, abs=0.02)


def test_nin_gradients_with_loss_and_structure_mask():
    r = rng(3)
    model = NIN(3, 1, r, widths=(3, 4, 5), perforation={"conv1": ("structure", 0.5)}, dtype=F64)
    jitter_vectors(model, r)
    x = r.standard_normal((3, 1, 8, 8))
    errors = layer_gradient_errors(WithLoss(model, np.array([2, 0, 1])), x, r, coords_per_param=4)
    assert_gradients(errors)
    assert not model.conv1.cache.plan.full


def test_residual_unit_parts_compose_to_the_unit():
    r = rng(4)
    unit = ResidualUnit(3, 5, r, stride=2, dtype=F64)
    x = r.standard_normal((2, 3, 6, 6))
    out = unit.forward(x)
    np.testing.assert_allclose(out, unit.shortcut_forward(x) + unit.branch_forward(x), rtol=FLOAT64_REFORMULATION_RTOL)
    d = r.standard_normal(out.shape)
    unit.zero_grad()
    dx = unit.backward(d)
    grads = {n: g.copy() for n, _, g in unit.named_parameters()}
    unit.zero_grad()
    unit.branch_forward(x)
    dx_parts = unit.branch_backward(d) + unit.shortcut_backward(d)
    np.testing.assert_allclose(dx, dx_parts, rtol=FLOAT64_REFORMULATION_RTOL)
    for n, _, g in unit.named_parameters():
        np.testing.assert_allclose(g, grads[n], rtol=FLOAT64_REFORMULATION_RTOL)
    assert unit.downsamples and [name for name, _ in unit.children()][:6] == [
        "bn1", "relu1", "conv1", "bn2", "relu2", "conv2"]


def test_pad_shortcut_subsamples_and_appends_zero_channels():
    x = np.arange(2 * 2 * 5 * 5, dtype=F64).reshape(2, 2, 5, 5)
    out, cache = pad_shortcut_forward(x, 4, 2)
    assert out.shape == (2, 4, 3, 3)
    np.testing.assert_array_equal(out[:, :2], x[:, :, ::2, ::2])
    assert not out[:, 2:].any()
    d = np.random.default_rng(0).standard_normal(out.shape)
    # The adjoint identity <d, S x> = <S^T d, x> for every x checks the backward exactly.
    np.testing.assert_allclose(np.sum(d * out), np.sum(pad_shortcut_backward(d, cache) * x))


@pytest.mark.parametrize("depth, n", [(8, 1), (14, 2), (20, 3), (32, 5), (110, 18)])
def test_resnet_depths_and_structure(depth, n):
    model = resnet(depth, 10, 3, rng(0))
    assert model.n == n and model.depth == depth
    assert [len(s.units) for s in model.stages] == [n, n, n]
    convs = [name for name, layer in model.named_layers() if isinstance(layer, Conv2d)]
    assert len(convs) + 1 == depth  # stem + 2 per unit, plus the linear layer
    strides = [[u.stride for u in s.units] for s in model.stages]
    assert strides == [[1] * n, [2] + [1] * (n - 1), [2] + [1] * (n - 1)]


def test_resnet_output_shapes():
    model = resnet(8, 7, 1, rng(0))
    x = np.zeros((2, 1, 12, 12), np.float32)
    h = model.stem(x)
    shapes = []
    for stage in model.stages:
        h = stage(h)
        shapes.append(h.shape)
    assert shapes == [(2, 16, 12, 12), (2, 32, 6, 6), (2, 64, 3, 3)]
    assert model(x).shape == (2, 7)


def test_resnet_rejects_bad_depth_and_shortcut():
    with pytest.raises(ValueError, match="6n \\+ 2"):
        resnet(10, rng=rng())
    with pytest.raises(ValueError, match="shortcut"):
        ResNet(1, 10, 3, rng(), shortcut="zero")


def test_same_seed_same_network():
    a, b = resnet(8, 10, 1, rng(5)), resnet(8, 10, 1, rng(5))
    for (na, pa, _), (nb, pb, _) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb
        np.testing.assert_array_equal(pa, pb)


def test_perforation_leaves_the_weights_unchanged():
    dense = resnet(8, 10, 1, rng(5))
    perforated = resnet(8, 10, 1, rng(5), perforation={"stem": ("grid", 0.5)})
    for (_, pa, _), (_, pb, _) in zip(dense.named_parameters(), perforated.named_parameters()):
        np.testing.assert_array_equal(pa, pb)


def test_network_rejects_unknown_perforation_layer():
    with pytest.raises(ValueError, match="stages.0.units.0.conv1"):
        resnet(8, 10, 1, rng(), perforation={"stages.0.conv1": ("grid", 0.5)})
    with pytest.raises(ValueError, match="structure mask.*following pooling"):
        resnet(8, 10, 1, rng(), perforation={"stem": ("structure", 0.5)})


def _cython_or_skip():
    try:
        return get_backend("cython")
    except (BackendUnavailableError, ValueError) as exc:
        pytest.skip(f"cython backend unusable here: {exc}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_and_cython_backends_agree_on_loss_and_gradients(dtype):
    backend = _cython_or_skip()
    if not backend.supports_dtype(dtype):
        pytest.skip(f"cython backend does not compute in {np.dtype(dtype)}")
    perforation = {"stem": ("grid", 0.5), "stages.1.units.0.conv1": ("uniform", 0.5)}
    results = []
    for name in ("numpy", backend):
        model = resnet(8, 5, 1, rng(6), widths=(4, 6, 8), perforation=perforation, backend=name, dtype=dtype)
        x = rng(7).standard_normal((4, 1, 12, 12)).astype(dtype)
        loss, cache = softmax_cross_entropy_forward(model.forward(x), np.array([0, 1, 2, 3]))
        dx = model.backward(softmax_cross_entropy_backward(1.0, cache))
        results.append((loss, dx, {n: g.copy() for n, _, g in model.named_parameters()}))
    (loss_a, dx_a, g_a), (loss_b, dx_b, g_b) = results
    rtol = 1e-4 if dtype == np.float32 else 1e-10
    assert loss_b == pytest.approx(loss_a, rel=rtol)
    scale = np.abs(dx_a).max()
    np.testing.assert_allclose(dx_b, dx_a, rtol=rtol, atol=rtol * scale)
    for n in g_a:
        np.testing.assert_allclose(g_b[n], g_a[n], rtol=rtol, atol=rtol * np.abs(g_a[n]).max(), err_msg=n)
