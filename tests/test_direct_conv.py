"""The direct float32 row convolution (``fastpath/direct_conv.h``) against NumPy and the GEMM path.

The kernel computes ``out[r, k] = bias[k] + Σ_t Σ_c src[map[pos[r] + tap[t]], c] W[k, t, c]`` with
a map entry of -1 reading zeros. Its code has three column paths (blocks of 16 output channels,
one block of 8, single channels) and full and partial row tiles, so the channel counts and row
counts drawn here cross every boundary; several threads and chunk sizes split the rows.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import seeds
from tolerances import assert_close

import fastpath

pytestmark = pytest.mark.skipif(not fastpath.available_backends()["cython"].usable,
                                reason="cython backend unavailable: the direct kernel is compiled")

KERNELS = [(1, 1), (3, 3), (1, 3), (5, 3)]


def _case(rng, n, h, w, kernel, c_count, k_count):
    """Source rows at a random subset of an (n, h, w) grid, output rows at another, weights and bias."""
    from fastpath.cython_unit import _rows_map, _taps

    ph, pw = kernel[0] // 2, kernel[1] // 2
    hm, wm = h + 2 * ph, w + 2 * pw
    sample, y, x = np.meshgrid(np.arange(n), np.arange(h), np.arange(w), indexing="ij")
    interior = ((sample * hm + y + ph) * wm + x + pw).astype(np.int64).ravel()
    present = np.sort(rng.choice(interior, size=rng.integers(0, interior.size + 1), replace=False))
    pos = np.sort(rng.choice(interior, size=rng.integers(0, interior.size + 1), replace=False))
    rowmap = _rows_map(n * hm * wm, present)
    src = rng.standard_normal((present.size, c_count)).astype(np.float32)
    taps = _taps(kernel, wm)
    wmat = rng.standard_normal((k_count, taps.size * c_count)).astype(np.float32)
    bias = rng.standard_normal(k_count).astype(np.float32)
    return src, rowmap, pos, taps, wmat, bias


def _numpy_rows(src, rowmap, pos, taps, wmat, bias, has_bias):
    """The definition in float64: gather every window (zeros where the map says -1), one matrix product."""
    rows = rowmap[pos[:, None] + taps[None, :]]  # (R, T)
    padded = np.vstack([src.astype(np.float64), np.zeros((1, src.shape[1]))])
    cols = padded[np.where(rows >= 0, rows, src.shape[0])].reshape(pos.size, taps.size * src.shape[1])  # tap-major
    return cols @ wmat.T.astype(np.float64) + (bias if has_bias else 0)


@given(n=st.integers(1, 2), h=st.integers(1, 7), w=st.integers(1, 7), kernel=st.sampled_from(KERNELS),
       c_count=st.integers(1, 40), k_count=st.integers(1, 40), has_bias=st.booleans(), threads=st.integers(1, 3),
       tiles=st.integers(1, 5), seed=seeds)
def test_direct_rows_equal_numpy_and_the_gemm_path(n, h, w, kernel, c_count, k_count, has_bias, threads, tiles,
                                                   seed):
    from fastpath.cython_unit import _kernels

    rng = np.random.default_rng(seed)
    src, rowmap, pos, taps, wmat, bias = _case(rng, n, h, w, kernel, c_count, k_count)
    expected = _numpy_rows(src, rowmap, pos, taps, wmat, bias, has_bias)
    direct = np.full((pos.size, k_count), np.nan, dtype=np.float32)
    chunk = tiles * _kernels.DIRECT_TILE_ROWS  # whole tiles per chunk, as the dispatcher uses
    _kernels.conv_rows_forward_direct(src, rowmap, pos, taps, np.ascontiguousarray(wmat.T), bias, has_bias, direct,
                                      chunk, threads)
    assert_close(direct, expected, np.float32)
    gemm = np.empty_like(direct)
    width = wmat.shape[1]
    gemm_chunk = max(1, pos.size)
    _kernels.conv_rows_forward(src, rowmap, pos, taps, wmat, bias, has_bias, gemm,
                               np.empty((threads, gemm_chunk * width), np.float32), gemm_chunk, threads)
    assert_close(direct, gemm, np.float32)


@given(n=st.integers(1, 2), h=st.integers(1, 7), w=st.integers(1, 7), kernel=st.sampled_from(KERNELS),
       c_count=st.integers(1, 40), with_addend=st.booleans(), threads=st.integers(1, 3), seed=seeds)
def test_the_one_output_channel_path_equals_numpy(n, h, w, kernel, c_count, with_addend, threads, seed):
    # K = 1 (the halting heads) has its own path: blocks of 16 and 8 input channels over four rows at a
    # time, a scalar tail of channels, and single rows past the last group of four
    from fastpath.cython_unit import _kernels

    rng = np.random.default_rng(seed)
    src, rowmap, pos, taps, wmat, bias = _case(rng, n, h, w, kernel, c_count, 1)
    addend = rng.standard_normal((pos.size, 1)).astype(np.float32) if with_addend else None
    expected = _numpy_rows(src, rowmap, pos, taps, wmat, bias, True) + (addend if with_addend else 0)
    out = np.full((pos.size, 1), np.nan, dtype=np.float32)
    chunk = -(-max(pos.size, 1) // threads)
    _kernels.conv_rows_forward_direct(src, rowmap, pos, taps, np.ascontiguousarray(wmat.T), bias, True, out, chunk,
                                      threads, addend)
    assert_close(out, expected, np.float32)


def _finish(value, addend, post):
    """The definition of the fused epilogue: ``+ addend``, then batch norm and ReLU."""
    if addend is not None:
        value = value + addend
    if post is not None:
        center, scale, shift = post
        value = np.maximum(0, (value - center) * scale + shift)
    return value


@given(c_count=st.integers(1, 20), k_count=st.integers(1, 40), with_addend=st.booleans(), with_post=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64]), direct=st.booleans(), threads=st.integers(1, 2), seed=seeds)
def test_the_fused_residual_and_batch_norm_equal_separate_passes(c_count, k_count, with_addend, with_post, dtype,
                                                                 direct, threads, seed):
    # conv_rows fuses them into the direct kernel's store, and applies them as passes on the GEMM path
    from fastpath.cython_backend import CythonBackend
    from fastpath.cython_unit import conv_rows

    rng = np.random.default_rng(seed)
    src, rowmap, pos, taps, wmat, bias = _case(rng, 2, 5, 4, (3, 3), c_count, k_count)
    addend = rng.standard_normal((pos.size, k_count)).astype(dtype) if with_addend else None
    post = tuple(rng.standard_normal(k_count).astype(dtype) for _ in range(3)) if with_post else None
    expected = _finish(_numpy_rows(src, rowmap, pos, taps, wmat, bias, True), addend, post)
    out = np.full((pos.size, k_count), np.nan, dtype=dtype)
    conv_rows(CythonBackend(threads=threads, direct_conv=direct), src.astype(dtype), rowmap, pos, taps,
              wmat.astype(dtype), bias.astype(dtype), True, out, threads, addend, post)
    # float32 rounding of the inputs: both sides start from the same float32 values, so compare in float32
    assert_close(out, expected, np.float32)


@given(c_count=st.integers(1, 20), k_count=st.integers(1, 40), with_addend=st.booleans(), with_post=st.booleans(),
       scattered=st.booleans(), dtype=st.sampled_from([np.float32, np.float64]),
       direct=st.booleans(), threads=st.integers(1, 3), seed=seeds)
def test_a_store_to_other_rows_and_in_place_equals_the_definition(c_count, k_count, with_addend, with_post, scattered,
                                                                  dtype, direct, threads, seed):
    # out[out_rows[r]] = finish(conv(r) + out[out_rows[r]]): the residual added in place onto the rows it
    # updates (the sparse unit's conv2), or onto all rows in order; rows not named keep their values
    from fastpath.cython_backend import CythonBackend
    from fastpath.cython_unit import conv_rows

    rng = np.random.default_rng(seed)
    src, rowmap, pos, taps, wmat, bias = _case(rng, 2, 5, 4, (3, 3), c_count, k_count)
    size = pos.size + (int(rng.integers(0, 6)) if scattered else 0)
    out_rows = np.sort(rng.choice(size, size=pos.size, replace=False)).astype(np.int64) if scattered else None
    out = rng.standard_normal((size, k_count)).astype(dtype)
    before = out.copy()
    post = tuple(rng.standard_normal(k_count).astype(dtype) for _ in range(3)) if with_post else None
    value = _numpy_rows(src, rowmap, pos, taps, wmat, bias, True)
    target = np.arange(pos.size) if out_rows is None else out_rows
    value = _finish(value, before[target] if with_addend else None, post)
    expected = before.astype(np.float64)
    expected[target] = value
    conv_rows(CythonBackend(threads=threads, direct_conv=direct), src.astype(dtype), rowmap, pos, taps,
              wmat.astype(dtype), bias.astype(dtype), True, out, threads, out if with_addend else None, post,
              out_rows)
    assert_close(out, expected, np.float32)


@given(n=st.integers(1, 2), h=st.integers(1, 7), w=st.integers(1, 7), kernel=st.sampled_from(KERNELS),
       c_count=st.integers(1, 20), k_count=st.integers(1, 40), dtype=st.sampled_from([np.float32, np.float64]),
       direct=st.booleans(), threads=st.integers(1, 3), seed=seeds)
def test_the_weight_gradient_on_rows_equals_numpy(n, h, w, kernel, c_count, k_count, dtype, direct, threads, seed):
    # dW = doutᵀ · windows, db = Σ_r dout[r]: the direct kernel (float32, with
    # blocks of 6 channels and 16 / 8 / 1 output channels) and the gathered GEMM
    from fastpath.cython_backend import CythonBackend
    from fastpath.cython_unit import weight_grad_rows

    rng = np.random.default_rng(seed)
    src, rowmap, pos, taps, wmat, _ = _case(rng, n, h, w, kernel, c_count, k_count)
    dout = rng.standard_normal((pos.size, k_count)).astype(dtype)
    rows = rowmap[pos[:, None] + taps[None, :]]
    padded = np.vstack([src.astype(np.float64), np.zeros((1, c_count))])
    cols = padded[np.where(rows >= 0, rows, src.shape[0])].reshape(pos.size, taps.size * c_count)
    dwmat, db = weight_grad_rows(CythonBackend(threads=threads, direct_conv=direct), src.astype(dtype), rowmap, pos,
                                 taps, dout, wmat.shape[1], threads)
    assert dwmat.shape == wmat.shape and dwmat.dtype == dtype
    assert_close(dwmat, dout.T.astype(np.float64) @ cols, np.float32)
    assert_close(db, dout.sum(axis=0, dtype=np.float64), np.float32)


@pytest.mark.parametrize("c_count, k_count, threads", [(16, 16, 1), (13, 24, 2), (7, 1, 3)])
def test_the_direct_weight_gradient_over_many_row_blocks(c_count, k_count, threads):
    # more rows than one cache block of the kernel (256), split over threads
    from fastpath.cython_backend import CythonBackend
    from fastpath.cython_unit import weight_grad_rows

    rng = np.random.default_rng(c_count)
    src, rowmap, pos, taps, wmat, _ = _case(rng, 4, 24, 23, (3, 3), c_count, k_count)
    assert pos.size > 2 * 256, "the case must cross several row blocks"  # a property of the seed
    dout = rng.standard_normal((pos.size, k_count)).astype(np.float32)
    direct = weight_grad_rows(CythonBackend(threads=threads, direct_conv=True), src, rowmap, pos, taps, dout,
                              wmat.shape[1], threads)
    gemm = weight_grad_rows(CythonBackend(threads=threads, direct_conv=False), src, rowmap, pos, taps, dout,
                            wmat.shape[1], threads)
    for got, expected in zip(direct, gemm):
        assert_close(got, expected, np.float32)


@given(n=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9), kernel=st.sampled_from(KERNELS),
       density=st.floats(0, 1), threads=st.integers(1, 3), seed=seeds)
def test_the_compiled_dilation_equals_the_reference(n, h, w, kernel, density, threads, seed):
    from fastpath.cython_unit import dilate_fast
    from refimpl.sparse_unit import dilate

    mask = np.random.default_rng(seed).random((n, h, w)) < density
    np.testing.assert_array_equal(dilate_fast(mask, kernel, threads), dilate(mask, kernel))


@pytest.mark.parametrize("chunk", [1, 5, 7])
def test_direct_rows_with_chunks_that_split_tiles(chunk):
    # the dispatcher gives whole tiles, but the kernel must be right for any chunk (a partial tile per chunk)
    from fastpath.cython_unit import _kernels

    rng = np.random.default_rng(chunk)
    src, rowmap, pos, taps, wmat, bias = _case(rng, 2, 6, 5, (3, 3), 17, 25)
    assert pos.size > 2 * chunk
    out = np.empty((pos.size, 25), dtype=np.float32)
    _kernels.conv_rows_forward_direct(src, rowmap, pos, taps, np.ascontiguousarray(wmat.T), bias, True, out, chunk, 2)
    assert_close(out, _numpy_rows(src, rowmap, pos, taps, wmat, bias, True), np.float32)


def test_the_backend_takes_the_direct_kernel_only_for_float32(monkeypatch):
    from fastpath import cython_unit
    from fastpath.cython_backend import CythonBackend

    calls = []
    real = cython_unit._kernels

    class Spy:
        def __getattr__(self, name):
            if name.startswith("conv_rows_forward"):
                calls.append(name)
            return getattr(real, name)

    monkeypatch.setattr(cython_unit, "_kernels", Spy())
    rng = np.random.default_rng(0)
    for dtype, direct, expected in ((np.float32, True, "conv_rows_forward_direct"),
                                    (np.float64, True, "conv_rows_forward"),
                                    (np.float32, False, "conv_rows_forward")):
        src, rowmap, pos, taps, wmat, bias = _case(rng, 1, 4, 4, (3, 3), 3, 4)
        out = np.empty((pos.size, 4), dtype=dtype)
        cython_unit.conv_rows(CythonBackend(threads=1, direct_conv=direct), src.astype(dtype), rowmap, pos, taps,
                              wmat.astype(dtype), bias.astype(dtype), True, out, 1)
        assert calls[-1] == expected
        assert_close(out, _numpy_rows(src, rowmap, pos, taps, wmat, bias, True), np.float32)


def test_direct_conv_must_be_a_bool():
    from fastpath.cython_backend import CythonBackend

    with pytest.raises(TypeError, match="direct_conv must be True or False, got 'yes'"):
        CythonBackend(direct_conv="yes")
