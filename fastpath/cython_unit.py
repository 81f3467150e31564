"""The fused sparse residual unit of the Cython backend (``CythonBackend.fused_unit``).

Same semantics as the composition of reference layers in :mod:`refimpl.sparse_unit` —
``U = x + A ⊙ f(x)``, conv1 on ``D = dilate(A)``, conv2 on ``A``, ``fill="zero"``, both batch
norms with statistics over ``D`` in training (running statistics updated) and the running ones in
evaluation, FLOPs ``|D|``- and ``|A|``-based — computed in a compact **channels-last** domain
instead of dense NCHW maps:

1. ``x`` is gathered to channels-last rows at ``E = dilate(D)``, the positions conv1 reads, and
   batch norm 1 (statistics over ``D`` first, in training) and ReLU are applied to those rows;
2. conv1: for every position of ``D`` its window is gathered through an index map (one
   contiguous copy of C values per tap) and multiplied by the weights in one BLAS GEMM per chunk
   of rows, giving the compact ``(|D|, K)`` output;
3. batch norm 2 (statistics over those rows) and ReLU on the compact rows;
4. conv2 on ``A`` gathers its windows from the compact rows through the position→row map of
   ``D`` (it reads nothing else: ``D`` is ``A`` dilated by conv2's window), one GEMM;
5. the residual rows are added onto a copy of ``x`` (the scatter).

The backward mirrors it: ``dW`` by GEMMs on re-gathered columns, the input gradient as the
transposed convolution (the same gather and GEMM, taps negated, weights transposed: no col2im
scatter, deterministic, no atomics), the masked batch-norm backwards with ReLU fused. Kernels:
:mod:`fastpath._cython_unit`.

A batch without any active position computes nothing: ``U = x``, zero FLOPs, and in training the
running statistics stay as they are (there are no statistics to fold in; the reference would
divide by zero there). The adaptive blocks never pass such a batch.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np

from refimpl.conv import conv_flops
from refimpl.layers import update_running_statistics

from . import profiling
from .unit_checks import check_unit_gradient, check_unit_input

try:
    from . import _cython_unit as _kernels
except ImportError as _exc:  # not compiled
    _kernels = None
    IMPORT_ERROR = str(_exc)
else:
    IMPORT_ERROR = ""


def _taps(kernel, map_width):
    """Offsets in the flattened padded map of the taps of a window, row-major ``(i, j)``."""
    kh, kw = kernel
    i, j = np.meshgrid(np.arange(kh) - kh // 2, np.arange(kw) - kw // 2, indexing="ij")
    return (i * map_width + j).astype(np.int64).ravel()


@lru_cache(maxsize=32)
def _grid(n, h, w, ph, pw):
    """``(map_size, allpos)``: the size of a batch's padded map and the map index of every flat position."""
    hm, wm = h + 2 * ph, w + 2 * pw
    sample, y, x = np.meshgrid(np.arange(n), np.arange(h), np.arange(w), indexing="ij")
    allpos = ((sample * hm + y + ph) * wm + x + pw).astype(np.int64).ravel()
    allpos.setflags(write=False)
    return n * hm * wm, allpos


class _Rows(NamedTuple):
    """A set of positions as rows: flat positions ``n S + s`` (sorted), map indices, per-sample starts, the map."""

    flat: np.ndarray  # (R,) int64
    pos: np.ndarray  # (R,) int64
    start: np.ndarray  # (n + 1,) int64
    rowmap: np.ndarray  # (map size,) int32, -1 where no row


@lru_cache(maxsize=32)
def _all_rows(n, h, w, ph, pw):
    """:class:`_Rows` of every position of an (n, h, w) batch (read-only, built once per shape)."""
    map_size, allpos = _grid(n, h, w, ph, pw)
    rows = _Rows(np.arange(n * h * w, dtype=np.int64), allpos, np.arange(n + 1, dtype=np.int64) * (h * w),
                 _rows_map(map_size, allpos))
    for array in rows:
        array.setflags(write=False)
    return rows


def _rows(mask, counts, allpos, map_size):
    flat = np.flatnonzero(mask)
    pos = allpos[flat]
    return _Rows(flat, pos, np.concatenate(([0], np.cumsum(counts))).astype(np.int64), _rows_map(map_size, pos))


def _rows_map(size, pos):
    """An int32 map of ``size`` entries: ``pos[r] -> r``, -1 elsewhere."""
    rowmap = np.full(size, -1, dtype=np.int32)
    rowmap[pos] = np.arange(pos.size, dtype=np.int32)
    return rowmap


def _weights(conv, dtype):
    """``(Wmat (K, kh kw C) tap-major channels-last, bias (K,), has_bias)``."""
    w = conv.params["w"]
    wmat = np.ascontiguousarray(w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1), dtype=dtype)
    bias = conv.params["b"] if conv.has_bias else np.zeros(w.shape[0], dtype=dtype)
    return wmat, np.ascontiguousarray(bias, dtype=dtype), bool(conv.has_bias)


def _gemm_scratch(backend, team, rows, width, dtype):
    """``(chunk, scratch)``: rows per GEMM and each thread's buffer of gathered windows (``width`` columns)."""
    chunk = min(max(rows, 1), backend._chunk(width, np.dtype(dtype).itemsize))
    return chunk, np.empty((team, chunk * width), dtype=dtype)


def dilate_fast(mask, kernel, team=1):
    """:func:`refimpl.sparse_unit.dilate` of a bool (N, H, W) mask by a compiled kernel (two passes)."""
    mask = np.ascontiguousarray(mask, dtype=bool)
    out = np.empty_like(mask)
    across = np.empty(mask.shape, dtype=np.uint8)
    _kernels.dilate_mask(mask.view(np.uint8), int(kernel[0]), int(kernel[1]), out.view(np.uint8), across, team)
    return out


def conv_rows(backend, src, rowmap, pos, taps, wmat, bias, has_bias, out, team, addend=None, post=None,
              out_rows=None):
    """``out[r] = Wmat · window(r) + bias``: the convolution on rows, on the backend's best kernel.

    float32 with ``backend.direct_conv``: the direct micro-kernel, which reads the source rows in
    place; otherwise the windows are gathered chunk by chunk and multiplied in BLAS (held at one
    thread by the caller). Both give every output row from one thread. Then, if given, ``addend``
    is added (a residual) and ``post = (center, scale, shift)`` applied as batch norm and ReLU —
    inside the direct kernel's store, as separate passes on the GEMM path. With ``out_rows`` (R,)
    (distinct rows of ``out``), output row r goes to ``out[out_rows[r]]`` and the addend is read
    at that row; ``addend`` may be ``out`` itself.
    """
    rows = pos.size
    if backend.direct_conv and src.dtype == np.float32:
        tile = _kernels.DIRECT_TILE_ROWS
        # about four chunks per thread (static schedule), whole tiles each
        chunk = max(tile, -(-rows // (4 * team * tile)) * tile) if team > 1 else max(rows, 1)
        center, scale, shift = post if post is not None else (None, None, None)
        _kernels.conv_rows_forward_direct(src, rowmap, pos, taps, np.ascontiguousarray(wmat.T), bias, has_bias, out,
                                          chunk, team, addend, center, scale, shift, out_rows)
        return
    chunk, scratch = _gemm_scratch(backend, team, rows, wmat.shape[1], src.dtype)
    in_place = out_rows is not None or (addend is not None and np.shares_memory(addend, out))
    result = np.empty((rows, out.shape[1]), dtype=out.dtype) if in_place else out
    _kernels.conv_rows_forward(src, rowmap, pos, taps, wmat, bias, has_bias, result, scratch, chunk, team)
    if addend is not None:
        result += addend if out_rows is None else addend[out_rows]
    if post is not None:
        _kernels.affine_relu_rows(result, *post, result, team)
    if in_place:
        out[slice(None) if out_rows is None else out_rows] = result


def weight_grad_rows(backend, src, rowmap, pos, taps, dout, width, team):
    """``(dWmat (K, T C), db (K,))`` of :func:`conv_rows` given ``dout`` (R, K) at its rows.

    float32 with ``backend.direct_conv``: the direct kernel (``direct_conv.h``); otherwise the
    windows are gathered chunk by chunk for BLAS. Both sum one partial per thread and add the
    partials in thread order (reproducible at a fixed thread count).
    """
    dtype = dout.dtype
    k = dout.shape[1]
    db_partial = np.zeros((team, k), dtype=dtype)
    if backend.direct_conv and dtype == np.float32:
        dw_partial = np.zeros((team, width, k), dtype=dtype)
        chunk = max(1, -(-pos.size // team))
        _kernels.conv_rows_weight_grad_direct(src, rowmap, pos, taps, dout, dw_partial, db_partial, chunk, team)
        transpose = True
    else:
        dw_partial = np.zeros((team, k, width), dtype=dtype)
        chunk, scratch = _gemm_scratch(backend, team, pos.size, width, dtype)
        _kernels.conv_rows_weight_grad(src, rowmap, pos, taps, dout, dw_partial, db_partial, scratch, chunk, team)
        transpose = False
    dwmat, db = dw_partial[0].copy(), db_partial[0].copy()
    for part in range(1, team):  # fixed order: reproducible at a fixed thread count
        dwmat += dw_partial[part]
        db += db_partial[part]
    return (np.ascontiguousarray(dwmat.T) if transpose else dwmat), db


def _weight_grad(dwmat, w_shape):
    k, c, kh, kw = w_shape
    return dwmat.reshape(k, kh, kw, c).transpose(0, 3, 1, 2)


class _Norm(NamedTuple):
    """A batch norm as ``y = (x - center) scale + shift`` and the statistics behind it."""

    center: np.ndarray  # (C,) dtype: the mean
    scale: np.ndarray  # (C,) dtype: γ / sqrt(σ² + ε)
    shift: np.ndarray  # (C,) dtype: β
    mean: np.ndarray  # (C,) float64
    inv_std: np.ndarray  # (C,) float64


def _norm(layer, mean, var, dtype):
    inv_std = 1.0 / np.sqrt(np.asarray(var, dtype=np.float64) + layer.eps)
    mean = np.asarray(mean, dtype=np.float64)
    scale = layer.params["gamma"].astype(np.float64) * inv_std
    return _Norm(mean.astype(dtype), scale.astype(dtype), np.ascontiguousarray(layer.params["beta"], dtype=dtype),
                 np.ascontiguousarray(mean), inv_std)


class FusedUnitCache(NamedTuple):
    """What :meth:`CythonFusedUnit.backward` needs (rows: see :class:`_Rows`)."""

    empty: bool
    training: bool
    x_shape: tuple  # (n, C, H, W) of the input and the output
    dtype: np.dtype
    shape: tuple  # (n, C, S)
    count: int  # |D| over the batch
    active: _Rows  # A: where conv2 runs
    computed: _Rows  # D = dilate(A): where conv1 runs
    read: _Rows  # E = dilate(D): the positions conv1 reads
    e_in_d: np.ndarray  # (|E|,) uint8: the row of E is in D (gave batch-norm 1's statistics)
    xe: np.ndarray  # (|E|, C) x at E, channels-last
    h1e: np.ndarray  # (|E|, C) relu(bn1(x)) at E
    h1c: np.ndarray  # (|D|, K) conv1 output
    z: np.ndarray  # (|D|, K) relu(bn2(h1c))
    norm1: _Norm
    norm2: _Norm
    w1: tuple
    w2: tuple
    taps1: np.ndarray
    taps2: np.ndarray


def _one_blas_thread():
    """Hold every BLAS at one thread (the kernels parallelise over chunks); the libraries are found once."""
    from .cython_backend import _blas_pools

    return _blas_pools().limit(limits=1)


class CythonFusedUnit:
    """``forward(unit, x, active) -> (U, cache, flops)`` and ``backward(unit, dU, cache) -> dx`` on compiled kernels.

    The contract of :func:`refimpl.sparse_unit.sparse_unit_forward` / ``sparse_unit_backward``
    (``execution="sparse"``), including the parameter gradients accumulated into the unit's layers
    and the running statistics updated in training. Threads, chunk size and the single-thread
    threshold come from the backend (:class:`~fastpath.cython_backend.CythonBackend`).
    """

    def __init__(self, backend):
        if _kernels is None:
            raise ImportError(f"the compiled extension fastpath._cython_unit is missing ({IMPORT_ERROR})")
        self.backend = backend

    # -- helpers -------------------------------------------------------------------------------

    def _partial(self, team, channels):
        return np.zeros((team, 2, channels), dtype=np.float64)

    # -- forward -------------------------------------------------------------------------------

    def forward(self, unit, x, active):
        """``(U, cache, flops)`` of the sparse residual unit (see :mod:`refimpl.sparse_unit`)."""
        dtype = check_unit_input(unit, x, active)
        n, c, h, w = x.shape
        k = unit.conv1.out_channels
        size = h * w
        kernel1, kernel2 = unit.conv1.kernel, unit.conv2.kernel
        training = bool(unit.bn1.training)
        with profiling.section("other"):
            x = np.ascontiguousarray(x)
            x3 = x.reshape(n, c, size)
            d_mask = dilate_fast(active, kernel2)
            d_counts = d_mask.sum(axis=(1, 2)).astype(np.int64)
            a_counts = active.sum(axis=(1, 2)).astype(np.int64)
            flops = (conv_flops(1, c, k, kernel1) * d_counts + conv_flops(1, k, k, kernel2) * a_counts).astype(np.int64)
            for conv, counts in ((unit.conv1, d_counts), (unit.conv2, a_counts)):
                conv.flops_per_sample = conv_flops(1, conv.in_channels, conv.out_channels, conv.kernel) * counts
                conv.dense_flops_per_sample = conv_flops(size, conv.in_channels, conv.out_channels, conv.kernel)
            count = int(d_counts.sum())
            if count == 0:
                empty = [None] * (len(FusedUnitCache._fields) - 4)
                return x.copy(), FusedUnitCache(True, training, x.shape, x.dtype, *empty), flops
            ph = max(kernel1[0], kernel2[0]) // 2
            pw = max(kernel1[1], kernel2[1]) // 2
            if int(a_counts.sum()) == n * size:  # every position active: A = D = E, the rows of a full grid
                rows_a = rows_d = rows_e = _all_rows(n, h, w, ph, pw)
                e_in_d = np.ones(count, dtype=np.uint8)
            else:
                e_mask = dilate_fast(d_mask, kernel1)
                map_size, allpos = _grid(n, h, w, ph, pw)
                rows_a = _rows(active, a_counts, allpos, map_size)
                rows_d = _rows(d_mask, d_counts, allpos, map_size)
                rows_e = _rows(e_mask, e_mask.sum(axis=(1, 2)), allpos, map_size)
                e_in_d = d_mask.reshape(-1)[rows_e.flat].view(np.uint8)
            taps1, taps2 = _taps(kernel1, w + 2 * pw), _taps(kernel2, w + 2 * pw)
            w1, w2 = _weights(unit.conv1, dtype), _weights(unit.conv2, dtype)
        team = self.backend._team(count * w1[0].size)
        with profiling.section("gather"):
            xe = np.empty((rows_e.flat.size, c), dtype=dtype)
            _kernels.planes_to_rows(x3, rows_e.flat, rows_e.start, xe, team)
            if training:
                mean, var = _kernels.masked_moments_planes(x3, rows_d.flat, rows_d.start, self._partial(team, c), team)
                update_running_statistics(unit.bn1, mean.astype(dtype), var.astype(dtype), count)
            else:
                mean, var = unit.bn1.buffers["running_mean"], unit.bn1.buffers["running_var"]
            norm1 = _norm(unit.bn1, mean, var, dtype)
            h1e = np.empty_like(xe)
            _kernels.affine_relu_rows(xe, norm1.center, norm1.scale, norm1.shift, h1e, team)
        with profiling.section("compute"), _one_blas_thread():
            h1c = np.empty((count, k), dtype=dtype)
            conv_rows(self.backend, h1e, rows_e.rowmap, rows_d.pos, taps1, *w1, h1c, team)
            if training:
                mean, var = _kernels.row_moments(h1c, self._partial(team, k), team)
                update_running_statistics(unit.bn2, mean.astype(dtype), var.astype(dtype), count)
            else:
                mean, var = unit.bn2.buffers["running_mean"], unit.bn2.buffers["running_var"]
            norm2 = _norm(unit.bn2, mean, var, dtype)
            z = np.empty_like(h1c)
            _kernels.affine_relu_rows(h1c, norm2.center, norm2.scale, norm2.shift, z, team)
            residual = np.empty((rows_a.flat.size, k), dtype=dtype)
            conv_rows(self.backend, z, rows_d.rowmap, rows_a.pos, taps2, *w2, residual, team)
        with profiling.section("scatter"):
            out = x.copy()
            _kernels.add_rows_to_planes(out.reshape(n, k, size), residual, rows_a.flat, rows_a.start, team)
        cache = FusedUnitCache(False, training, x.shape, x.dtype, (n, c, size), count, rows_a, rows_d, rows_e, e_in_d, xe, h1e, h1c, z,
                               norm1, norm2, w1, w2, taps1, taps2)
        return out, cache, flops

    # -- backward ------------------------------------------------------------------------------

    def _conv_backward(self, conv, src, rowmap, pos, taps, weights, dout, in_rows, in_pos, out_rowmap, team):
        """Accumulates the conv's gradients; returns the input gradient at the rows ``in_pos`` of the input.

        The input gradient is the transposed convolution: the windows of ``dout`` (rows through
        ``out_rowmap``) at the input positions, taps negated, weights transposed.
        """
        wmat = weights[0]
        dtype = wmat.dtype
        k = wmat.shape[0]
        dwmat, db = weight_grad_rows(self.backend, src, rowmap, pos, taps, dout, wmat.shape[1], team)
        conv.accumulate("w", _weight_grad(dwmat, conv.params["w"].shape))
        if conv.has_bias:
            conv.accumulate("b", db)
        # the forward's weights (K, T C) -> (C, T K): wmat_t[c, t K + k] = wmat[k, t C + c]
        c = wmat.shape[1] // taps.size
        wmat_t = np.ascontiguousarray(wmat.reshape(k, taps.size, c).transpose(2, 1, 0).reshape(c, -1))
        din = np.empty((in_rows, c), dtype=dtype)
        conv_rows(self.backend, dout, out_rowmap, in_pos, -taps, wmat_t, np.zeros(c, dtype=dtype), False, din, team)
        return din

    def _bn_backward(self, layer, dz, h, norm, training, in_stats, count, team):
        """In place ``dz`` ← gradient w.r.t. ``h`` of relu(bn(h)); accumulates γ's and β's."""
        dgamma, dbeta = _kernels.bn_relu_backward_rows(dz, h, norm.center, norm.scale, norm.shift, norm.mean,
                                                       norm.inv_std,
                                                       training, in_stats, count,
                                                       self._partial(team, h.shape[1]), team)
        layer.accumulate("gamma", dgamma.astype(dz.dtype))
        layer.accumulate("beta", dbeta.astype(dz.dtype))

    def backward(self, unit, dout, cache):
        """Gradient w.r.t. ``x`` of :meth:`forward`; accumulates the unit's parameter gradients."""
        if not isinstance(cache, FusedUnitCache):
            raise TypeError(f"cache must be the FusedUnitCache of this fused unit's forward, "
                            f"got {type(cache).__name__}")
        check_unit_gradient(dout, cache.x_shape, cache.dtype)
        if cache.empty:
            return np.array(dout, copy=True)
        dtype = cache.h1c.dtype
        n, c, size = cache.shape
        k = cache.h1c.shape[1]
        rows_a, rows_d, rows_e = cache.active, cache.computed, cache.read
        team = self.backend._team(cache.count * cache.w1[0].size)
        with _one_blas_thread():
            with profiling.section("gather"):
                dx = np.array(dout, dtype=dtype, order="C", copy=True)
                dx3 = dx.reshape(n, c, size)
                dres = np.empty((rows_a.flat.size, k), dtype=dtype)
                _kernels.planes_to_rows(dx3, rows_a.flat, rows_a.start, dres, team)
            with profiling.section("compute"):
                dz = self._conv_backward(unit.conv2, cache.z, rows_d.rowmap, rows_a.pos, cache.taps2, cache.w2, dres,
                                         cache.count, rows_d.pos, rows_a.rowmap, team)
                self._bn_backward(unit.bn2, dz, cache.h1c, cache.norm2, cache.training,
                                  np.ones(cache.count, dtype=np.uint8), cache.count, team)
                dh1 = self._conv_backward(unit.conv1, cache.h1e, rows_e.rowmap, rows_d.pos, cache.taps1, cache.w1, dz,
                                          rows_e.pos.size, rows_e.pos, rows_d.rowmap, team)
            with profiling.section("scatter"):
                self._bn_backward(unit.bn1, dh1, cache.xe, cache.norm1, cache.training, cache.e_in_d, cache.count,
                                  team)
                _kernels.add_rows_to_planes(dx3, dh1, rows_e.flat, rows_e.start, team)
        return dx
