"""The Cython backend's float32 convolution on channels-last rows against the NumPy reference.

``CythonBackend`` (``direct_conv=True``, the default) computes a float32 convolution with 16 to
64 input and output channels, stride 1 and a padding smaller than the kernel on channels-last
rows: the direct kernels of ``fastpath/direct_conv_planes.h`` where both channel counts are
multiples of 16 (and the CPU has AVX2), ``fastpath/direct_conv.h`` plus a transposition
elsewhere, the input gradient as the direct convolution of the output gradient. Channel counts
are therefore drawn on both sides of those lines, and strides 2 and paddings as large as the
kernel, which keep the GEMM path, are drawn too: whichever path a call takes, it must agree with
the reference.

The backward is checked three ways: against the float64 reference backward (itself checked by
central differences in float64, tests/test_gradients.py), by central differences of the rows
forward itself (the convolution is linear in ``x`` and in ``w``, so a difference quotient with a
step of 1 is exact up to float32 rounding), and bit for bit across thread counts.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import mask_for, rngs, seeds
from tolerances import assert_close

import fastpath
from refimpl.backend import NumpyBackend
from refimpl.conv import check_conv_args
from refimpl.plan import PerforationPlan

pytestmark = pytest.mark.skipif(not fastpath.available_backends()["cython"].usable,
                                reason="cython backend unavailable: the rows path is compiled")

REFERENCE = NumpyBackend()
# multiples of 16 (both channel counts, 16..64) take direct_conv_planes.h's kernels, the others in
# 16..64 direct_conv.h's and a transposition; fewer or more channels keep the GEMM path (one output
# channel: the backend's single-channel kernel)
SIXTEENS = st.sampled_from([16, 32, 48, 64])  # 48: a 32-channel tile (AVX-512VL) then a 16-channel one
IN_RANGE = st.integers(16, 40)
OUT_OF_RANGE = st.sampled_from([1, 2, 3, 8, 15, 65, 80])
MASK_KINDS = ("full", "single", "bernoulli", "uniform", "grid")  # plans select at least one position per sample


def _mask(kind, out_hw, rng):
    return mask_for(kind, out_hw, rng, rate=float(rng.uniform(0.0, 0.9)))


@st.composite
def rows_problems(draw, routes=("rows", "rows", "rows", "strided", "wide padding", "channels")):
    """``(x, w, b, geometry, plan)`` in float32; ``routes`` weighs the geometries the rows path takes.

    "rows": 16..64 channels, stride 1, padding below the kernel; "strided": a stride of 2 on one
    axis or both; "wide padding": a padding as large as the kernel on one axis (the input
    gradient is then no plain convolution); "channels": fewer than 16 or more than 64 input or
    output channels. The last three keep the GEMM path.
    """
    route = draw(st.sampled_from(routes))
    n = draw(st.integers(1, 3))
    if draw(st.booleans()):
        c, k = draw(SIXTEENS), draw(SIXTEENS)
    else:
        c, k = draw(IN_RANGE), draw(IN_RANGE)
    if route == "channels":
        if draw(st.booleans()):
            c = draw(OUT_OF_RANGE)
        else:
            k = draw(OUT_OF_RANGE)
    wide_axis = draw(st.integers(0, 1))
    kernel, padding, in_hw, stride = [], [], [], []
    for axis in range(2):
        kk = draw(st.integers(1, 4))
        p = kk if route == "wide padding" and axis == wide_axis else draw(st.integers(0, kk - 1))
        s = draw(st.integers(1, 2)) if route == "strided" else 1
        size = draw(st.integers(max(1, kk - 2 * p), 9))
        kernel.append(kk)
        padding.append(p)
        in_hw.append(size)
        stride.append(s)
    if route == "strided":
        stride[draw(st.integers(0, 1))] = 2
    rng = draw(rngs())
    x = rng.standard_normal((n, c, *in_hw)).astype(np.float32)
    w = rng.standard_normal((k, c, *kernel)).astype(np.float32)
    b = rng.standard_normal(k).astype(np.float32)
    geometry = check_conv_args(x, w, b, tuple(stride), tuple(padding))[3]
    per_sample = draw(st.booleans())
    kinds = [draw(st.sampled_from(MASK_KINDS)) for _ in range(n if per_sample else 1)]
    mask = np.stack([_mask(kind, geometry.out_hw, rng) for kind in kinds])
    return x, w, b, geometry, PerforationPlan(mask if per_sample else mask[0])


def _on_rows(w, geometry):
    k, c = w.shape[:2]
    (kh, kw), (ph, pw) = geometry.kernel, geometry.padding
    return 16 <= c <= 64 and 16 <= k <= 64 and geometry.stride == (1, 1) and ph < kh and pw < kw


def _backend(threads=2, **kwargs):
    from fastpath.cython_backend import CythonBackend

    return CythonBackend(threads=threads, parallel_work=0, **kwargs)


def _valid(plan, n):
    """(N, 1, P) bool: the slots of the compact output that hold a computed position."""
    counts = np.broadcast_to(plan.counts, (n,))
    return (np.arange(plan.width)[None, :] < counts[:, None])[:, None, :]


@given(problem=rows_problems(), threads=st.integers(1, 3), seed=seeds)
def test_conv_forward_and_backward_equal_the_float64_reference(problem, threads, seed):
    from fastpath.cython_backend import ConvCache, DirectConvCache, RowsConvCache

    x, w, b, geometry, plan = problem
    backend = _backend(threads)
    compact, cache = backend.conv_forward(x, w, b, plan, geometry)
    expected_cache = RowsConvCache if _on_rows(w, geometry) else DirectConvCache if w.shape[0] == 1 else ConvCache
    assert isinstance(cache.inner, expected_cache)
    x64, w64, b64 = x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)
    ref, ref_cache = REFERENCE.conv_forward(x64, w64, b64, plan, geometry)
    assert compact.dtype == np.float32
    assert_close(compact, ref, dtype=np.float32)
    assert not np.any(compact[~np.broadcast_to(_valid(plan, x.shape[0]), compact.shape)])  # padding slots are 0
    dcompact = np.random.default_rng(seed).standard_normal(compact.shape).astype(np.float32)
    got = backend.conv_backward(dcompact, cache)
    want = REFERENCE.conv_backward(dcompact.astype(np.float64), ref_cache)
    for name, g, r in zip(("dx", "dw", "db"), got, want):
        assert g.dtype == np.float32, name
        assert_close(g, r, dtype=np.float32)


@given(problem=rows_problems(routes=("rows",)), seed=seeds)
def test_rows_backward_by_central_differences_of_the_rows_forward(problem, seed):
    """``<dY, (f(x + d) - f(x - d)) / 2> = <dX, d>`` and likewise for ``w``: exact for a linear map.

    ``f`` is the rows forward itself (bias cancels in the difference), so the backward is checked
    against the forward it belongs to; the only error is float32 rounding, bounded by the sum of
    the magnitudes of the terms.
    """
    from fastpath.cython_backend import RowsConvCache

    x, w, b, geometry, plan = problem
    assume(_on_rows(w, geometry))
    rng = np.random.default_rng(seed)
    backend = _backend()
    compact, cache = backend.conv_forward(x, w, b, plan, geometry)
    assert isinstance(cache.inner, RowsConvCache)
    valid = np.broadcast_to(_valid(plan, x.shape[0]), compact.shape)
    dcompact = np.where(valid, rng.standard_normal(compact.shape), 0).astype(np.float32)
    dx, dw, db = backend.conv_backward(dcompact, cache)
    for direction, grad, shift in (("x", dx, lambda d: (x + d, w)), ("w", dw, lambda d: (x, w + d))):
        d = rng.standard_normal(grad.shape).astype(np.float32)
        plus = backend.conv_forward(*shift(d), b, plan, geometry)[0].astype(np.float64)
        minus = backend.conv_forward(*shift(-d), b, plan, geometry)[0].astype(np.float64)
        lhs = np.sum(dcompact * (plus - minus) / 2)
        rhs = np.sum(grad.astype(np.float64) * d)
        scale = np.sum(np.abs(dcompact) * (np.abs(plus) + np.abs(minus))) + np.sum(np.abs(grad * d))
        assert abs(lhs - rhs) <= 1e-5 * scale, direction
    assert_close(db, dcompact.astype(np.float64).sum(axis=(0, 2)), dtype=np.float32)


@given(problem=rows_problems(routes=("rows",)), seed=seeds)
def test_rows_forward_and_input_gradient_do_not_depend_on_the_thread_count(problem, seed):
    x, w, b, geometry, plan = problem
    assume(_on_rows(w, geometry))
    outs = []
    for threads in (1, 3):
        backend = _backend(threads)
        compact, cache = backend.conv_forward(x, w, b, plan, geometry)
        dcompact = np.random.default_rng(seed).standard_normal(compact.shape).astype(np.float32)
        outs.append((compact, backend.conv_backward(dcompact, cache)[0]))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("dtype,direct_conv,channels,stride,padding,expected", [
    (np.float32, True, (16, 16), 1, 1, "RowsConvCache"),
    (np.float32, True, (64, 24), 1, 1, "RowsConvCache"),
    (np.float64, True, (16, 16), 1, 1, "ConvCache"),  # float64 keeps the GEMM path
    (np.float32, False, (16, 16), 1, 1, "ConvCache"),  # the switch that keeps it for float32
    (np.float32, True, (16, 16), 2, 1, "ConvCache"),  # strided: the GEMM path's scatter backward
    (np.float32, True, (16, 16), 1, 3, "ConvCache"),  # padding as large as the kernel
    (np.float32, True, (3, 16), 1, 1, "ConvCache"),  # an RGB input: too few channels
    (np.float32, True, (16, 96), 1, 1, "ConvCache"),  # too many: BLAS is as fast
])
def test_which_path_a_convolution_takes(dtype, direct_conv, channels, stride, padding, expected):
    rng = np.random.default_rng(0)
    c, k = channels
    x = rng.standard_normal((2, c, 6, 6)).astype(dtype)
    w = rng.standard_normal((k, c, 3, 3)).astype(dtype)
    b = rng.standard_normal(k).astype(dtype)
    geometry = check_conv_args(x, w, b, stride, padding)[3]
    plan = PerforationPlan(np.ones(geometry.out_hw, dtype=bool))
    compact, cache = _backend(direct_conv=direct_conv).conv_forward(x, w, b, plan, geometry)
    assert type(cache.inner).__name__ == expected
    ref = REFERENCE.conv_forward(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), plan, geometry)[0]
    assert_close(compact, ref, dtype=dtype)


def test_the_avx2_kernels_take_channel_counts_that_are_multiples_of_16():
    from fastpath import _cython_conv

    assert not _cython_conv.planes_kernels(16, 15)
    assert not _cython_conv.planes_kernels(8, 16)
    assert not _cython_conv.planes_kernels(0, 16)
    if _cython_conv.planes_kernels(16, 16):  # an x86-64 CPU with AVX2 and FMA, a GCC build
        assert _cython_conv.planes_kernels(32, 64)
