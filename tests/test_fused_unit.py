"""Fused sparse residual units (a backend's ``fused_unit``) against the composition of reference layers.

The definition is :func:`refimpl.sparse_unit.sparse_unit_forward` / ``sparse_unit_backward``; a
fused unit must give the same output, FLOPs, input gradient, parameter gradients (accumulated) and
running statistics, in training and evaluation, float32 and float64. Every test here runs on each
backend of ``FUSED_BACKENDS`` that offers a ``fused_unit`` (others are skipped, saying so).

The reference refuses a sample without an active position (the adaptive blocks never pass one);
a fused unit accepts it, and such a sample contributes nothing: the fused unit on a batch with
empty samples equals the reference on the other samples, and leaves ``U = x``, ``dx = dU`` on the
empty ones.
"""

from __future__ import annotations

import numpy as np
import pytest
from backends import _make as make_backend
from backends import backend_params
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import float_dtypes, seeds
from test_act import find_case
from test_sact import run, sact_net
from tolerances import GRADCHECK_RTOL, assert_close

from refimpl.conv_layer import Conv2d
from refimpl.gradcheck import check_gradients
from refimpl.resnet import ResidualUnit
from refimpl.sparse_unit import dilate, sparse_unit_backward, sparse_unit_forward

FUSED_BACKENDS = backend_params()  # every fast backend configuration; those without fused_unit skip


@pytest.fixture(scope="module", params=FUSED_BACKENDS)
def fused_backend(request):
    backend = make_backend(request.param)
    if getattr(backend, "fused_unit", None) is None:
        pytest.skip(f"the {request.param} backend has no fused_unit")
    return backend


KERNELS = [(3, 3), (1, 1), (1, 3), (5, 3)]
MIN_FLOAT32_STATISTICS = 16  # positions behind the batch statistics of a float32 check in training
MASK_KINDS = ("full", "single", "bernoulli", "empty")


def make_unit(seed, channels, kernels, bias, backend, dtype, training):
    """A residual unit with random batch-norm parameters, running statistics and (non-zero) gradients.

    Built from ``seed`` alone, so two calls with different backends give the same unit.
    """
    rng = np.random.default_rng(seed)
    unit = ResidualUnit(channels, channels, rng, backend=backend, dtype=dtype)
    for name, kernel in zip(("conv1", "conv2"), kernels):
        if kernel != (3, 3) or bias:
            setattr(unit, name, Conv2d(channels, channels, kernel, rng, padding=(kernel[0] // 2, kernel[1] // 2),
                                       bias=bias, backend=backend, dtype=dtype))
    for bn in (unit.bn1, unit.bn2):
        bn.params["gamma"][...] = rng.uniform(0.5, 1.5, channels)
        bn.params["beta"][...] = rng.standard_normal(channels)
        bn.buffers["running_mean"][...] = rng.standard_normal(channels)
        bn.buffers["running_var"][...] = rng.uniform(0.5, 2.0, channels)
    for _, param, grad in unit.named_parameters():
        grad[...] = rng.standard_normal(param.shape)
    if not training:
        unit.eval()
    return unit


@st.composite
def unit_problems(draw):
    n = draw(st.integers(1, 4))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    rng = np.random.default_rng(draw(seeds))
    active = np.zeros((n, h, w), dtype=bool)
    for s in range(n):
        kind = draw(st.sampled_from(MASK_KINDS))
        if kind == "full":
            active[s] = True
        elif kind == "single":
            active[s].flat[rng.integers(h * w)] = True
        elif kind == "bernoulli":
            active[s] = rng.random((h, w)) < draw(st.floats(0.05, 0.95))
    return dict(n=n, channels=draw(st.integers(1, 8)), hw=(h, w), active=active, dtype=draw(float_dtypes()),
                training=draw(st.booleans()), kernels=(draw(st.sampled_from(KERNELS)), draw(st.sampled_from(KERNELS))),
                bias=draw(st.booleans()), seed=draw(seeds))


def state_of(unit):
    """Every parameter gradient and running statistic of ``unit`` (copies), by name."""
    out = {f"{name}.grad": grad.copy() for name, _, grad in unit.named_parameters()}
    for name, layer in unit.named_layers():
        for key, buffer in getattr(layer, "buffers", {}).items():
            out[f"{name}.{key}"] = buffer.copy()
    return out


@given(unit_problems())
def test_fused_unit_equals_the_reference_composition(fused_backend, problem):
    active, dtype = problem["active"], problem["dtype"]
    computed = active.any(axis=(1, 2))
    assume(computed.any())  # a batch without any active position: see the test below
    # Batch norm over a handful of values is ill-conditioned: over two values it outputs ±1 whatever
    # the input, so its input gradient is 0 up to rounding, and float32 rounding there exceeds the
    # float32 tolerance in the reference itself. Few positions are checked in float64 only.
    conv2_kernel = problem["kernels"][1]
    assume(dtype == np.float64 or not problem["training"]
           or dilate(active, conv2_kernel).sum() >= MIN_FLOAT32_STATISTICS)
    # bn2 with batch statistics makes the unit invariant to the scale of each of conv1's output
    # filters, so conv1's weight gradient is orthogonal to the weights; a filter of one weight (one
    # channel, a 1x1 window) therefore has an exactly zero gradient, which float32 rounding (of the
    # reference too) cannot match within tolerance. That case is checked in float64 only.
    assume(dtype == np.float64 or not problem["training"]
           or problem["channels"] * np.prod(problem["kernels"][0]) > 1)
    n, c, (h, w) = problem["n"], problem["channels"], problem["hw"]
    build = dict(channels=c, kernels=problem["kernels"], bias=problem["bias"], dtype=dtype,
                 training=problem["training"])
    reference = make_unit(problem["seed"], backend=None, **build)
    fused = make_unit(problem["seed"], backend=fused_backend, **build)
    rng = np.random.default_rng(problem["seed"])
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    dout = rng.standard_normal((n, c, h, w)).astype(dtype)

    out_r, cache_r, flops_r = sparse_unit_forward(reference, x[computed], active[computed])
    dx_r = sparse_unit_backward(reference, dout[computed], cache_r)
    before = state_of(fused)
    out_f, cache_f, flops_f = fused_backend.fused_unit.forward(fused, x, active)
    dx_f = fused_backend.fused_unit.backward(fused, dout, cache_f)

    assert out_f.dtype == dtype and dx_f.dtype == dtype
    assert_close(out_f[computed], out_r)
    np.testing.assert_array_equal(out_f[~computed], x[~computed])
    np.testing.assert_array_equal(flops_f[computed], flops_r)
    np.testing.assert_array_equal(flops_f[~computed], 0)
    assert_close(dx_f[computed], dx_r)
    np.testing.assert_array_equal(dx_f[~computed], dout[~computed])
    expected, actual = state_of(reference), state_of(fused)
    assert expected.keys() == actual.keys()
    exact = {}
    if problem["training"] and "conv1.b.grad" in expected:
        # bn2 with batch statistics subtracts conv1's bias again, so its gradient's exact increment
        # is zero; both implementations add rounding noise of the size of the cancelled terms, which
        # agrees with nothing but zero (in float32 the reference's own noise can exceed the tolerance).
        exact["conv1.b.grad"] = before["conv1.b.grad"]
        scale = max(np.abs(actual["conv1.w.grad"] - before["conv1.w.grad"]).max(), np.abs(dout).max())
        noise = np.abs(actual["conv1.b.grad"] - before["conv1.b.grad"]).max()
        assert noise <= 1e3 * np.finfo(dtype).eps * scale, (noise, scale)
    for name in expected:
        if name not in exact:
            # a gradient is accumulated onto the one before: the sum carries the rounding of both terms,
            # which can cancel (a value near -before), so the tolerance scales with the terms' size
            terms = np.abs(before[name]).max() + np.abs(expected[name] - before[name]).max()
            assert_close(actual[name], expected[name], dtype=dtype, scale=terms)


@given(n=st.integers(1, 3), dtype=float_dtypes(), training=st.booleans(), seed=seeds)
def test_a_batch_without_active_positions_computes_nothing(fused_backend, n, dtype, training, seed):
    unit = make_unit(seed, 3, ((3, 3), (3, 3)), False, fused_backend, dtype, training)
    before = state_of(unit)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, 4, 5)).astype(dtype)
    out, cache, flops = fused_backend.fused_unit.forward(unit, x, np.zeros((n, 4, 5), dtype=bool))
    np.testing.assert_array_equal(out, x)
    np.testing.assert_array_equal(flops, np.zeros(n, dtype=np.int64))
    dout = rng.standard_normal(x.shape).astype(dtype)
    np.testing.assert_array_equal(fused_backend.fused_unit.backward(unit, dout, cache), dout)
    after = state_of(unit)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


@pytest.mark.parametrize("training", [True, False])
def test_fused_unit_gradients_float64(fused_backend, training):
    rng = np.random.default_rng(31)
    unit = make_unit(31, 3, ((3, 3), (3, 3)), False, fused_backend, np.float64, training)
    active = rng.random((2, 5, 6)) < 0.3
    active[:, 2, 2] = True
    inputs = {"x": rng.standard_normal((2, 3, 5, 6)), **{name: p for name, p, _ in unit.named_parameters()}}
    state = {}

    def forward(x, **_):  # the parameters are changed in place by the check
        out, state["cache"], _ = fused_backend.fused_unit.forward(unit, x, active)
        return out

    def backward(dout):
        unit.zero_grad()
        dx = fused_backend.fused_unit.backward(unit, dout, state["cache"])
        return {"x": dx, **{name: g.copy() for name, _, g in unit.named_parameters()}}

    errors = check_gradients(forward, backward, inputs, rng)
    assert len(errors) == 1 + 6  # x, bn1.gamma/beta, conv1.w, bn2.gamma/beta, conv2.w
    assert max(errors.values()) < GRADCHECK_RTOL, errors


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_unit_is_reproducible(fused_backend, dtype):
    """Two identical calls give bit-identical outputs and gradients (at the backend's thread count)."""
    rng = np.random.default_rng(41)
    x = rng.standard_normal((4, 6, 9, 8)).astype(dtype)
    active = rng.random((4, 9, 8)) < 0.4
    dout = rng.standard_normal(x.shape).astype(dtype)
    results = []
    for _ in range(2):
        unit = make_unit(41, 6, ((3, 3), (3, 3)), False, fused_backend, dtype, True)
        out, cache, _ = fused_backend.fused_unit.forward(unit, x, active)
        dx = fused_backend.fused_unit.backward(unit, dout, cache)
        results.append((out, dx, state_of(unit)))
    (out0, dx0, state0), (out1, dx1, state1) = results
    np.testing.assert_array_equal(out0, out1)
    np.testing.assert_array_equal(dx0, dx1)
    for name in state0:
        np.testing.assert_array_equal(state0[name], state1[name], err_msg=name)


def test_fused_unit_refuses_bad_input_naming_it(fused_backend):
    unit = make_unit(5, 3, ((3, 3), (3, 3)), False, fused_backend, np.float32, True)
    x = np.zeros((2, 3, 4, 4), dtype=np.float32)
    active = np.ones((2, 4, 4), dtype=bool)
    with pytest.raises(TypeError, match="x has dtype float64"):
        fused_backend.fused_unit.forward(unit, x.astype(np.float64), active)
    with pytest.raises(ValueError, match=r"x must be a NumPy array of shape \(n, 3, H, W\)"):
        fused_backend.fused_unit.forward(unit, x[:, :2], active)
    with pytest.raises(ValueError, match=r"active must be a boolean NumPy array of shape \(2, 4, 4\)"):
        fused_backend.fused_unit.forward(unit, x, active[:, :3])
    with pytest.raises(ValueError, match="active must be a boolean NumPy array"):
        fused_backend.fused_unit.forward(unit, x, active.astype(np.float32))
    _, cache, _ = fused_backend.fused_unit.forward(unit, x, active)
    with pytest.raises(ValueError, match=r"dout must be a float32 NumPy array of shape \(2, 3, 4, 4\)"):
        fused_backend.fused_unit.backward(unit, x[:1], cache)
    with pytest.raises(ValueError, match=r"dout must be a float32 NumPy array .* got float64"):
        fused_backend.fused_unit.backward(unit, x.astype(np.float64), cache)


class CountingFusedUnit:
    """Delegates to a fused unit and counts the calls (so a test knows the fused path ran)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def forward(self, unit, x, active):
        self.calls += 1
        return self.inner.forward(unit, x, active)

    def backward(self, unit, dout, cache):
        return self.inner.backward(unit, dout, cache)


def test_sact_network_with_fused_units_equals_the_composition(fused_backend):
    counting = CountingFusedUnit(fused_backend.fused_unit)
    fused_backend.fused_unit = counting
    try:
        net, x, rng = find_case(lambda r: sact_net(r, backend=fused_backend), (3, 1, 8, 8), margin=1e-6)
        g = rng.standard_normal((3, 4))
        buffers = [layer.buffers for _, layer in net.named_layers() if hasattr(layer, "buffers")]
        start = [{k: v.copy() for k, v in b.items()} for b in buffers]
        counting.calls = 0
        logits_f, dx_f, grads_f = run(net, x, g)
        assert counting.calls > 0
        # a meaningful case: some unit ran on part of the positions only
        assert any(0 < m.mean() < 1 for block in net.stages for m in block.active_masks[1:])
        flops_f, cost_f = [b.flops_per_sample.copy() for b in net.stages], net.ponder_cost
        stats_f = [{k: v.copy() for k, v in b.items()} for b in buffers]
        for b, values in zip(buffers, start):
            for k in b:
                b[k][...] = values[k]
        for block in net.stages:
            block.fused = False
        counting.calls = 0
        logits_c, dx_c, grads_c = run(net, x, g)
        assert counting.calls == 0
    finally:
        fused_backend.fused_unit = counting.inner
    assert_close(logits_f, logits_c)
    assert_close(dx_f, dx_c)
    assert net.ponder_cost == pytest.approx(cost_f, rel=1e-12)
    for block, flops in zip(net.stages, flops_f):
        np.testing.assert_array_equal(block.flops_per_sample, flops)
    for name in grads_c:
        assert_close(grads_f[name], grads_c[name])
    for fused_stats, b in zip(stats_f, buffers):
        for k in b:
            assert_close(fused_stats[k], b[k])
