"""The OpenCL fused sparse residual unit (fastpath.opencl_unit) against the reference composition.

The reference is refimpl.sparse_unit.sparse_unit_forward / sparse_unit_backward on a NumPy unit
with the same parameters (its dense masked execution where a sample has no active position, which
the sparse composition refuses): U, FLOPs, dx, every parameter gradient and the running statistics
must agree within docs/spec.md §11.1, for random shapes, per-sample masks (empty and full
included), training and evaluation, float32 and float64. Its backward is also checked by central
differences, and a SACT-ResNet with fused units must equal the same network composed layer by layer.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from refimpl import gradcheck
from refimpl.resnet import ResidualUnit
from refimpl.sact import SACTResNet
from refimpl.sparse_unit import dilate, sparse_unit_backward, sparse_unit_forward, unit_executor
from strategies import DTYPES, seeds
from tolerances import GRADCHECK_RTOL, assert_close, tolerance

ocl = pytest.importorskip("fastpath.opencl_backend")
pytestmark = pytest.mark.opencl

if ocl.cl is None:
    pytest.skip(f"pyopencl cannot be imported: {ocl._PYOPENCL_IMPORT_ERROR}", allow_module_level=True)

MASK_KINDS = ("random", "empty", "full", "some samples empty")


@pytest.fixture(scope="module")
def backend():
    status = ocl.status()
    if not status.usable:
        pytest.skip(f"the opencl backend is unavailable: {status.reason}")
    backend = ocl.OpenCLBackend()
    backend.fused_unit.warm_up([d for d in DTYPES if backend.supports_dtype(d)])
    return backend


def make_units(rng, channels, training, specs):
    """The same residual unit once per ``(backend, dtype)`` of ``specs`` (backend None: the NumPy reference).

    Batch-norm parameters and running statistics are random, so that no term vanishes; every
    unit holds the first one's values, cast to its dtype.
    """
    seed = int(rng.integers(2**32))
    units = [ResidualUnit(channels, channels, np.random.default_rng(seed), backend=backend, dtype=dtype)
             for backend, dtype in specs]
    for bn in ("bn1", "bn2"):
        values = {"gamma": rng.uniform(0.5, 1.5, channels), "beta": rng.normal(0, 0.5, channels),
                  "running_mean": rng.normal(0, 0.5, channels), "running_var": rng.uniform(0.5, 2.0, channels)}
        for name, value in values.items():
            layer = getattr(units[0], bn)
            (layer.params if name in layer.params else layer.buffers)[name][...] = value
    first = dict(units[0].named_layers())
    for unit in units:
        for name, layer in unit.named_layers():
            for store in ("params", "buffers"):
                for key, value in getattr(layer, store).items():
                    value[...] = getattr(first[name], store)[key]
        if not training:
            unit.eval()
    return units


def make_unit_pair(rng, channels, dtype, backend, training):
    """The reference unit (NumPy) and the same unit on ``backend``."""
    return make_units(rng, channels, training, [(None, dtype), (backend, dtype)])


def make_mask(rng, kind, shape, density):
    n, h, w = shape
    if kind == "empty":
        return np.zeros(shape, dtype=bool)
    if kind == "full":
        return np.ones(shape, dtype=bool)
    mask = rng.random(shape) < density
    if kind == "some samples empty":
        mask[rng.random(n) < 0.5] = False
    return mask


@st.composite
def unit_problems(draw):
    n, channels = draw(st.integers(1, 4)), draw(st.integers(1, 8))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    return {"n": n, "channels": channels, "hw": (h, w), "dtype": draw(st.sampled_from(DTYPES)),
            "training": draw(st.booleans()), "kind": draw(st.sampled_from(MASK_KINDS)),
            "density": draw(st.floats(0.05, 0.9)), "seed": draw(seeds)}


def run_unit(unit, forward, backward, x, active, dout):
    """Forward and backward of one unit: everything the comparison looks at, as NumPy arrays."""
    unit.zero_grad()
    with np.errstate(divide="raise", invalid="raise"):
        out, cache, flops = forward(unit, x, active)
        dx = backward(unit, dout, cache)
    result = {"out": out, "dx": dx, "flops": flops}
    result.update({f"grad {name}": g.copy() for name, _, g in unit.named_parameters()})
    result.update({f"{bn} {stat}": getattr(unit, bn).buffers[stat].copy()
                   for bn in ("bn1", "bn2") for stat in ("running_mean", "running_var")})
    return result


def well_conditioned(result, other, dtype):
    """Whether every float result of the reference is within a tenth of ``dtype``'s tolerance of ``other``:
    the float64 reference (for float32), or the reference on inputs moved by a few units in the
    last place (for float64, which has nothing more precise to compare with).

    Tiny batch-norm statistics (one channel, two or three positions) make some gradients the
    cancelled remainder of O(1) terms, as small as ``eps``'s effect: then not even the reference
    gets them to the tolerance at this precision, and no implementation can be asked to agree with
    it that closely. Such problems are not compared (float64 covers what float32 leaves out).
    """
    tol = tolerance(dtype)
    for key, value in result.items():
        if key == "flops":
            continue
        scale = float(np.max(np.abs(other[key]), initial=0.0))
        if not np.allclose(value, other[key], rtol=tol["rtol"] / 10, atol=tol["atol"] / 10 * scale):
            return False
    return True


@given(unit_problems())
def test_fused_unit_equals_the_reference_composition(backend, problem):
    """U, FLOPs, dx, parameter gradients and running statistics as the reference's.

    The sparse composition needs an active position in every sample; a mask with empty samples
    is compared with the dense masked execution, which defines the same unit for any mask.
    """
    dtype = problem["dtype"]
    assume(backend.supports_dtype(dtype))
    rng = np.random.default_rng(problem["seed"])
    n, c, (h, w) = problem["n"], problem["channels"], problem["hw"]
    reference, fused, other_unit = make_units(rng, c, problem["training"],
                                              [(None, dtype), (backend, dtype), (None, np.float64)])
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    active = make_mask(rng, problem["kind"], (n, h, w), problem["density"])
    dout = rng.standard_normal(x.shape).astype(dtype)
    # Training normalises with statistics over the computed positions: a batch without active
    # positions has none (the reference divides by zero; the fused unit refuses, tested below).
    assume(not problem["training"] or active.any())
    execution = "sparse" if active.any(axis=(1, 2)).all() else "dense"

    def reference_forward(unit, x, active):
        return sparse_unit_forward(unit, x, active, execution)

    ref = run_unit(reference, reference_forward, sparse_unit_backward, x, active, dout)
    # The yardstick of conditioning (see well_conditioned): the float64 reference for float32
    # problems, the reference on inputs moved by a few units in the last place for float64 ones.
    moved = 1 + 4 * np.finfo(np.float64).eps * rng.uniform(-1, 1, x.shape) if dtype == np.float64 else 1
    other = run_unit(other_unit, reference_forward, sparse_unit_backward, x.astype(np.float64) * moved, active,
                     dout.astype(np.float64) * moved)
    assume(well_conditioned(ref, other, dtype))
    got = run_unit(fused, backend.fused_unit.forward, backend.fused_unit.backward, x, active, dout)

    assert got["out"].dtype == dtype and got["dx"].dtype == dtype
    assert set(got) == set(ref) and len(got) == 3 + 6 + 4
    for key, value in ref.items():
        if key != "flops":
            assert_close(got[key], value, dtype)
    np.testing.assert_array_equal(np.where(active[:, None], 0, got["out"]), np.where(active[:, None], 0, x))
    per_position = 2 * c * 9 * c  # a 3x3 convolution C -> C, a multiply-add counting 2
    expected_flops = {"conv1": per_position * dilate(active, (3, 3)).sum(axis=(1, 2)),
                      "conv2": per_position * active.sum(axis=(1, 2))}
    np.testing.assert_array_equal(got["flops"], expected_flops["conv1"] + expected_flops["conv2"])
    for conv in ("conv1", "conv2"):
        np.testing.assert_array_equal(getattr(fused, conv).flops_per_sample, expected_flops[conv])
    if execution == "sparse":
        np.testing.assert_array_equal(got["flops"], ref["flops"])


@pytest.mark.parametrize("training", [True, False])
def test_fused_unit_gradients_float64(backend, training):
    if not backend.supports_dtype(np.float64):
        pytest.skip(f"{backend.device_name} has no float64")
    rng = np.random.default_rng(11)
    _, unit = make_unit_pair(rng, 3, np.float64, backend, training)
    active = rng.random((2, 5, 5)) < 0.3
    active[:, 2, 2] = True
    active[1, 0, 4] = True  # a corner: windows that reach the padding
    inputs = {"x": rng.standard_normal((2, 3, 5, 5)), **{name: p for name, p, _ in unit.named_parameters()}}
    state = {}

    def forward(x, **_):  # the parameters are changed in place by the check
        out, state["cache"], _ = backend.fused_unit.forward(unit, x, active)
        return out

    def backward(dout):
        unit.zero_grad()
        dx = backend.fused_unit.backward(unit, dout, state["cache"])
        return {"x": dx, **{name: g.copy() for name, _, g in unit.named_parameters()}}

    errors = gradcheck.check_gradients(forward, backward, inputs, rng)
    assert len(errors) == 1 + 6  # x, bn1.gamma/beta, conv1.w, bn2.gamma/beta, conv2.w
    assert max(errors.values()) < GRADCHECK_RTOL, errors


def test_fused_unit_is_deterministic(backend):
    rng = np.random.default_rng(5)
    _, unit = make_unit_pair(rng, 6, np.float32, backend, training=True)
    x = rng.standard_normal((3, 6, 9, 9)).astype(np.float32)
    active = rng.random((3, 9, 9)) < 0.5
    dout = rng.standard_normal(x.shape).astype(np.float32)
    runs = []
    for _ in range(2):
        unit.zero_grad()
        out, cache, _ = backend.fused_unit.forward(unit, x, active)
        dx = backend.fused_unit.backward(unit, dout, cache)
        runs.append((out, dx, [g.copy() for _, _, g in unit.named_parameters()]))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    for a, b in zip(runs[0][2], runs[1][2]):
        np.testing.assert_array_equal(a, b)


def test_rows_cover_what_each_convolution_reads():
    from fastpath.opencl_tables import invert_table
    from fastpath.opencl_unit import inverse_tables, unit_rows

    rng = np.random.default_rng(3)
    active = rng.random((2, 6, 7)) < 0.15
    rows = unit_rows(active, (3, 3), (3, 3))
    d = dilate(active, (3, 3))
    e = dilate(d, (3, 3))
    assert rows.n_a == active.sum() and rows.n_d == d.sum() and rows.n_e == e.sum()
    np.testing.assert_array_equal(rows.e_positions[: rows.n_d], np.flatnonzero(d))  # D first, in raster order
    assert set(rows.e_positions.tolist()) == set(np.flatnonzero(e).tolist())
    assert rows.conv2_table.max(initial=-1) < rows.n_d  # conv2 reads only D
    # Tap (1, 1) is the centre: a row reads itself.
    np.testing.assert_array_equal(rows.e_positions[rows.conv1_table[:, 4]], rows.e_positions[: rows.n_d])
    # The mirrored tables are the general inversion's, with one reader per (row, tap).
    for inverse, table, sources in zip(inverse_tables(rows, active.shape, (3, 3), (3, 3)),
                                       (rows.conv1_table, rows.conv2_table), (rows.n_e, rows.n_d)):
        expected, depth = invert_table(table[None], sources)
        assert depth == 1
        np.testing.assert_array_equal(inverse, expected[0])


def test_fused_unit_rejects_bad_input(backend):
    rng = np.random.default_rng(1)
    _, unit = make_unit_pair(rng, 3, np.float32, backend, training=False)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    active = np.ones((2, 4, 4), dtype=bool)
    with pytest.raises(ValueError, match="x must"):
        backend.fused_unit.forward(unit, x[:, :2], active)
    with pytest.raises(TypeError, match="dtype float64"):
        backend.fused_unit.forward(unit, x.astype(np.float64), active)
    with pytest.raises(ValueError, match="active must"):
        backend.fused_unit.forward(unit, x, active.astype(np.float32))
    with pytest.raises(ValueError, match="active must"):
        backend.fused_unit.forward(unit, x, active[:, :3])
    _, cache, _ = backend.fused_unit.forward(unit, x, active)
    with pytest.raises(ValueError, match="dout must"):
        backend.fused_unit.backward(unit, x[:1], cache)
    with pytest.raises(TypeError, match="cache must"):
        backend.fused_unit.backward(unit, x, ("not", "a cache"))


def test_unit_executor_picks_the_opencl_fused_unit(backend):
    _, unit = make_unit_pair(np.random.default_rng(2), 2, np.float32, backend, training=True)
    assert unit_executor(unit)[0] == backend.fused_unit.forward
    assert unit_executor(unit, fused=False)[0] != backend.fused_unit.forward


@pytest.mark.parametrize("training", [True, False])
def test_sact_resnet_with_fused_units_equals_the_composition(backend, training, monkeypatch):
    calls = []
    forward = backend.fused_unit.forward
    monkeypatch.setattr(backend.fused_unit, "forward", lambda *args: calls.append(1) or forward(*args))
    dtype = np.float64 if backend.supports_dtype(np.float64) else np.float32
    nets = []
    for fused in (True, False):
        rng = np.random.default_rng(7)
        net = SACTResNet(3, 4, 3, rng, widths=(4, 6, 8), backend=backend, dtype=dtype, halting_bias=0.3)
        for block in net.stages:
            block.fused = fused
            for head in block.heads:  # spatially varied halting: units run on part of the positions
                head.local.params["w"][...] = rng.standard_normal(head.local.params["w"].shape)
        if not training:
            rng_stats = np.random.default_rng(8)
            net(rng_stats.standard_normal((4, 3, 12, 12)).astype(dtype))  # running statistics from one batch
            net.eval()
        nets.append(net)
    x = np.random.default_rng(9).standard_normal((4, 3, 12, 12)).astype(dtype)
    calls.clear()  # the batch that gave the running statistics ran fused units too
    logits = [net(x) for net in nets]
    assert len(calls) == 3 * 2  # the fused net ran every sparse unit (two per stage) fused, the other none
    assert_close(logits[0], logits[1], dtype)
    ran = [block.active_masks for block in nets[1].stages]
    assert any(0 < m.mean() < 1 for masks in ran for m in masks[1:]), "the test needs partly active units"
    upstream = np.random.default_rng(10).standard_normal(logits[0].shape).astype(dtype)
    for net in nets:
        net.zero_grad()
        net.backward(upstream)
    fused_grads = {name: g for name, _, g in nets[0].named_parameters()}
    for name, _, grad in nets[1].named_parameters():
        assert_close(fused_grads[name], grad, dtype)
    for a, b in zip(nets[0].named_layers(), nets[1].named_layers()):
        for key, buffer in b[1].buffers.items():
            assert_close(a[1].buffers[key], buffer, dtype)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kernel1, kernel2", [((1, 3), (5, 5)), ((5, 1), (1, 1))])
def test_fused_unit_with_other_odd_windows_and_biases_equals_the_reference(backend, kernel1, kernel2, training):
    from refimpl.conv_layer import Conv2d

    dtype = np.float64 if backend.supports_dtype(np.float64) else np.float32
    rng = np.random.default_rng(4)
    reference, fused = make_unit_pair(rng, 3, dtype, backend, training=training)
    for name, kernel in (("conv1", kernel1), ("conv2", kernel2)):
        seed = int(rng.integers(2**32))
        for unit, unit_backend in ((reference, None), (fused, backend)):
            padding = tuple(k // 2 for k in kernel)
            setattr(unit, name, Conv2d(3, 3, kernel, np.random.default_rng(seed), padding=padding, bias=True,
                                       backend=unit_backend, dtype=dtype))
            getattr(unit, name).params["b"][...] = np.random.default_rng(seed).normal(size=3)
    x = rng.standard_normal((2, 3, 7, 6)).astype(dtype)
    active = rng.random((2, 7, 6)) < 0.3
    active[:, 0, 0] = True
    dout = rng.standard_normal(x.shape).astype(dtype)
    ref = run_unit(reference, sparse_unit_forward, sparse_unit_backward, x, active, dout)
    got = run_unit(fused, backend.fused_unit.forward, backend.fused_unit.backward, x, active, dout)
    assert set(got) == set(ref) and len(got) == 3 + 8 + 4  # two biases
    np.testing.assert_array_equal(got["flops"], ref["flops"])
    exact_zero = set()
    if training:
        # bn2 with batch statistics subtracts conv1's bias again: its exact gradient is zero, and
        # both implementations give rounding noise, which agrees with nothing but zero.
        exact_zero.add("grad conv1.b")
        scale = np.max(np.abs(ref["grad conv1.w"]))
        assert np.max(np.abs(got["grad conv1.b"])) <= 1e3 * np.finfo(dtype).eps * scale
    for key, value in ref.items():
        if key not in exact_zero | {"flops"}:
            assert_close(got[key], value, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels", [16, 20])
def test_fused_unit_with_whole_channel_blocks_equals_the_reference(backend, channels, dtype):
    """16 channels fill the kernels' register block exactly; 20 add a partial block (the property
    test's 1-8 channels only ever have a partial one)."""
    if not backend.supports_dtype(dtype):
        pytest.skip(f"{backend.device_name} has no {np.dtype(dtype)}")
    rng = np.random.default_rng(channels)
    reference, fused = make_unit_pair(rng, channels, dtype, backend, training=True)
    x = rng.standard_normal((2, channels, 6, 5)).astype(dtype)
    active = rng.random((2, 6, 5)) < 0.4
    active[:, 3, 2] = True
    dout = rng.standard_normal(x.shape).astype(dtype)
    ref = run_unit(reference, sparse_unit_forward, sparse_unit_backward, x, active, dout)
    got = run_unit(fused, backend.fused_unit.forward, backend.fused_unit.backward, x, active, dout)
    np.testing.assert_array_equal(got["flops"], ref["flops"])
    for key, value in ref.items():
        if key != "flops":
            assert_close(got[key], value, dtype)


def test_fused_unit_reports_its_phases_while_profiling_records(backend):
    from fastpath import profiling

    rng = np.random.default_rng(6)
    _, unit = make_unit_pair(rng, 4, np.float32, backend, training=True)
    x = rng.standard_normal((2, 4, 6, 6)).astype(np.float32)
    active = rng.random((2, 6, 6)) < 0.5
    active[:, 0, 0] = True
    with profiling.recording() as phases:
        out, cache, _ = backend.fused_unit.forward(unit, x, active)
        backend.fused_unit.backward(unit, np.ones_like(out), cache)
    assert set(phases) == {"gather", "compute", "scatter", "other"}
    assert all(seconds > 0 for seconds in phases.values())
