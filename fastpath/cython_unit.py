"""The fused sparse residual unit of the Cython backend (``CythonBackend.fused_unit``).

Same semantics as the composition of reference layers in :mod:`refimpl.sparse_unit` —
``U = x + A ⊙ f(x)``, conv1 on ``D = dilate(A)``, conv2 on ``A``, ``fill="zero"``, both batch
norms with statistics over ``D`` in training (running statistics updated) and the running ones in
evaluation, FLOPs ``|D|``- and ``|A|``-based — computed in a compact **channels-last** domain
instead of dense NCHW maps:

1. batch norm 1 (statistics over ``D`` first, in training) and ReLU are applied while
   transposing ``x`` to channels-last rows (N H W, C);
2. conv1: for every position of ``D`` its window is gathered through an index map (one
   contiguous copy of C values per tap) and multiplied by the weights in one BLAS GEMM per chunk
   of rows, giving the compact (|D|, K) output;
3. batch norm 2 (statistics over those rows) and ReLU on the compact rows;
4. conv2 on ``A`` gathers its windows from the compact rows through the position→row map of
   ``D`` (it reads nothing else: ``D`` is ``A`` dilated by conv2's window), one GEMM;
5. the residual rows are added onto a copy of ``x`` (the scatter).

The backward mirrors it: ``dW`` by GEMMs on re-gathered columns, ``dcols`` by GEMM, col2im written
as a gather over the receiving positions (deterministic, no atomics), the masked batch-norm
backwards with ReLU fused. Kernels: :mod:`fastpath._cython_unit`.

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
from refimpl.sparse_unit import check_sparse_unit, dilate

from . import profiling

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
    """``(allmap, allpos)`` of a batch's padded map: every in-image position maps to its flat index."""
    hm, wm = h + 2 * ph, w + 2 * pw
    index = np.arange(n * h * w, dtype=np.int64).reshape(n, h, w)
    padded = np.full((n, hm, wm), -1, dtype=np.int32)
    padded[:, ph : ph + h, pw : pw + w] = index
    allpos = np.flatnonzero(padded.ravel() >= 0).astype(np.int64)  # row-major: same order as index
    for array in (padded, allpos):
        array.setflags(write=False)
    return padded.ravel(), allpos


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


def _weight_grad(dwmat, w_shape):
    k, c, kh, kw = w_shape
    return dwmat.reshape(k, kh, kw, c).transpose(0, 3, 1, 2)


class _Norm(NamedTuple):
    """A batch norm in affine form ``y = scale x + shift`` and the statistics behind it."""

    scale: np.ndarray  # (C,) dtype
    shift: np.ndarray  # (C,) dtype
    mean: np.ndarray  # (C,) float64
    inv_std: np.ndarray  # (C,) float64


def _norm(layer, mean, var, dtype):
    inv_std = 1.0 / np.sqrt(np.asarray(var, dtype=np.float64) + layer.eps)
    mean = np.asarray(mean, dtype=np.float64)
    scale = layer.params["gamma"].astype(np.float64) * inv_std
    shift = layer.params["beta"].astype(np.float64) - mean * scale
    return _Norm(scale.astype(dtype), shift.astype(dtype), np.ascontiguousarray(mean), inv_std)


class FusedUnitCache(NamedTuple):
    """What :meth:`CythonFusedUnit.backward` needs."""

    empty: bool
    training: bool
    x: np.ndarray  # (n, C, S) the unit input
    in_d: np.ndarray  # (n S,) uint8: position in D
    count: int  # |D| over the batch
    d_pos: np.ndarray  # (|D|,) map indices of D
    a_flat: np.ndarray  # (|A|,) flat positions n S + s of A (sorted)
    a_start: np.ndarray  # (n + 1,) first row of A of every sample
    a_pos: np.ndarray  # (|A|,) map indices of A
    dmap: np.ndarray  # map -> row of D
    amap: np.ndarray  # map -> row of A
    allmap: np.ndarray
    allpos: np.ndarray
    h1rows: np.ndarray  # (n S, C) relu(bn1(x)) channels-last
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

    def _scratch(self, team, rows, width, dtype):
        chunk = min(max(rows, 1), self.backend._chunk(width, np.dtype(dtype).itemsize))
        return chunk, np.empty((team, chunk * width), dtype=dtype)

    def _partial(self, team, channels):
        return np.zeros((team, 2, channels), dtype=np.float64)

    @staticmethod
    def _check(unit, x, active):
        check_sparse_unit(unit)
        if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[1] != unit.conv1.in_channels:
            raise ValueError(f"x must have shape (n, {unit.conv1.in_channels}, H, W), got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        dtype = unit.conv1.params["w"].dtype
        if x.dtype != dtype:
            raise TypeError(f"x has dtype {x.dtype} but the unit's weights are {dtype}")
        if unit.conv2.out_channels != x.shape[1]:
            raise ValueError(f"a sparse unit keeps the shape: conv2 gives {unit.conv2.out_channels} channels, "
                             f"x has {x.shape[1]}")
        n, _, h, w = x.shape
        if not isinstance(active, np.ndarray) or active.dtype != np.bool_ or active.shape != (n, h, w):
            raise ValueError(f"active must be a boolean array of shape {(n, h, w)}, got "
                             f"{getattr(active, 'dtype', type(active).__name__)} {getattr(active, 'shape', '')}")
        return dtype

    # -- forward -------------------------------------------------------------------------------

    def forward(self, unit, x, active):
        """``(U, cache, flops)`` of the sparse residual unit (see :mod:`refimpl.sparse_unit`)."""
        dtype = self._check(unit, x, active)
        n, c, h, w = x.shape
        k = unit.conv1.out_channels
        size = h * w
        kernel1, kernel2 = unit.conv1.kernel, unit.conv2.kernel
        training = bool(unit.bn1.training)
        with profiling.section("other"):
            x = np.ascontiguousarray(x)
            x3 = x.reshape(n, c, size)
            d_mask = dilate(active, kernel2)
            d_counts = d_mask.sum(axis=(1, 2)).astype(np.int64)
            a_counts = active.sum(axis=(1, 2)).astype(np.int64)
            flops = (conv_flops(1, c, k, kernel1) * d_counts + conv_flops(1, k, k, kernel2) * a_counts).astype(np.int64)
            for conv, counts in ((unit.conv1, d_counts), (unit.conv2, a_counts)):
                conv.flops_per_sample = conv_flops(1, conv.in_channels, conv.out_channels, conv.kernel) * counts
                conv.dense_flops_per_sample = conv_flops(size, conv.in_channels, conv.out_channels, conv.kernel)
            count = int(d_counts.sum())
            if count == 0:
                return x.copy(), FusedUnitCache(True, training, *([None] * 20)), flops
            ph = max(kernel1[0], kernel2[0]) // 2
            pw = max(kernel1[1], kernel2[1]) // 2
            allmap, allpos = _grid(n, h, w, ph, pw)
            map_size = allmap.size
            d_flat = np.flatnonzero(d_mask)
            a_flat = np.flatnonzero(active)
            d_start = np.concatenate(([0], np.cumsum(d_counts)))
            a_start = np.concatenate(([0], np.cumsum(a_counts)))
            d_pos, a_pos = allpos[d_flat], allpos[a_flat]
            dmap, amap = _rows_map(map_size, d_pos), _rows_map(map_size, a_pos)
            taps1, taps2 = _taps(kernel1, w + 2 * pw), _taps(kernel2, w + 2 * pw)
            w1, w2 = _weights(unit.conv1, dtype), _weights(unit.conv2, dtype)
        team = self.backend._team(count * w1[0].size)
        with profiling.section("gather"):
            if training:
                mean, var = _kernels.masked_moments_planes(x3, d_flat, d_start, self._partial(team, c), team)
                update_running_statistics(unit.bn1, mean.astype(dtype), var.astype(dtype), count)
            else:
                mean, var = unit.bn1.buffers["running_mean"], unit.bn1.buffers["running_var"]
            norm1 = _norm(unit.bn1, mean, var, dtype)
            h1rows = np.empty((n * size, c), dtype=dtype)
            _kernels.affine_relu_planes_to_rows(x3, norm1.scale, norm1.shift, h1rows, self.backend._team(x.size))
        with profiling.section("compute"), _one_blas_thread():
            h1c = np.empty((count, k), dtype=dtype)
            chunk, scratch = self._scratch(team, count, w1[0].shape[1], dtype)
            _kernels.conv_rows_forward(h1rows, allmap, d_pos, taps1, *w1, h1c, scratch, chunk, team)
            if training:
                mean, var = _kernels.row_moments(h1c, self._partial(team, k), team)
                update_running_statistics(unit.bn2, mean.astype(dtype), var.astype(dtype), count)
            else:
                mean, var = unit.bn2.buffers["running_mean"], unit.bn2.buffers["running_var"]
            norm2 = _norm(unit.bn2, mean, var, dtype)
            z = np.empty_like(h1c)
            _kernels.affine_relu_rows(h1c, norm2.scale, norm2.shift, z, team)
            residual = np.empty((a_flat.size, k), dtype=dtype)
            chunk, scratch = self._scratch(team, a_flat.size, w2[0].shape[1], dtype)
            _kernels.conv_rows_forward(z, dmap, a_pos, taps2, *w2, residual, scratch, chunk, team)
        with profiling.section("scatter"):
            out = x.copy()
            _kernels.add_rows_to_planes(out.reshape(n, k, size), residual, a_flat, a_start,
                                        self.backend._team(residual.size))
        in_d = d_mask.reshape(-1).view(np.uint8)
        cache = FusedUnitCache(False, training, x3, in_d, count, d_pos, a_flat, a_start, a_pos, dmap, amap, allmap, allpos,
                               h1rows, h1c, z, norm1, norm2, w1, w2, taps1, taps2)
        return out, cache, flops

    # -- backward ------------------------------------------------------------------------------

    def _conv_backward(self, conv, src, rowmap, pos, taps, weights, dout, team):
        """Accumulates the conv's gradients, returns ``dcols`` (R, T C)."""
        wmat = weights[0]
        rows, dtype = pos.size, wmat.dtype
        dw_partial = np.zeros((team, *wmat.shape), dtype=dtype)
        db_partial = np.zeros((team, wmat.shape[0]), dtype=dtype)
        dcols = np.empty((rows, wmat.shape[1]), dtype=dtype)
        chunk, scratch = self._scratch(team, rows, wmat.shape[1], dtype)
        _kernels.conv_rows_backward(src, rowmap, pos, taps, wmat, dout, dw_partial, db_partial, dcols, scratch,
                                    chunk, team)
        dwmat, db = dw_partial[0].copy(), db_partial[0].copy()
        for part in range(1, team):  # fixed order: reproducible at a fixed thread count
            dwmat += dw_partial[part]
            db += db_partial[part]
        conv.accumulate("w", _weight_grad(dwmat, conv.params["w"].shape))
        if conv.has_bias:
            conv.accumulate("b", db)
        return dcols

    def backward(self, unit, dout, cache):
        """Gradient w.r.t. ``x`` of :meth:`forward`; accumulates the unit's parameter gradients."""
        if not isinstance(cache, FusedUnitCache):
            raise TypeError(f"cache must be the FusedUnitCache of this fused unit's forward, got {type(cache).__name__}")
        if cache.empty:
            return np.array(dout, copy=True)
        dtype = cache.h1c.dtype
        n, c, size = cache.x.shape
        if not isinstance(dout, np.ndarray) or dout.shape[:2] != (n, c) or dout[0, 0].size != size:
            raise ValueError(f"dout must have the shape of the unit's output (n={n}, C={c}, {size} positions), "
                             f"got {getattr(dout, 'shape', type(dout).__name__)}")
        dout = np.ascontiguousarray(dout, dtype=dtype)
        d3 = dout.reshape(n, c, size)
        k = cache.h1c.shape[1]
        team = self.backend._team(cache.count * cache.w1[0].size)
        with _one_blas_thread():
            with profiling.section("gather"):
                dres = np.empty((cache.a_flat.size, k), dtype=dtype)
                _kernels.planes_to_rows(d3, cache.a_flat, cache.a_start, dres, team)
            with profiling.section("compute"):
                dcols2 = self._conv_backward(unit.conv2, cache.z, cache.dmap, cache.a_pos, cache.taps2, cache.w2,
                                             dres, team)
            with profiling.section("scatter"):
                dz = np.empty((cache.count, k), dtype=dtype)
                _kernels.col2im_rows(dcols2, cache.amap, cache.d_pos, cache.taps2, dz, team)
            with profiling.section("compute"):
                n2 = cache.norm2
                dgamma, dbeta = _kernels.bn_relu_backward_rows(dz, cache.h1c, n2.scale, n2.shift, n2.mean, n2.inv_std,
                                                               cache.training, self._partial(team, k), team)
                unit.bn2.accumulate("gamma", dgamma.astype(dtype))
                unit.bn2.accumulate("beta", dbeta.astype(dtype))
                dcols1 = self._conv_backward(unit.conv1, cache.h1rows, cache.allmap, cache.d_pos, cache.taps1,
                                             cache.w1, dz, team)
            with profiling.section("scatter"):
                dh1 = np.empty((n * size, c), dtype=dtype)
                _kernels.col2im_rows(dcols1, cache.dmap, cache.allpos, cache.taps1, dh1, self.backend._team(dh1.size))
            with profiling.section("other"):
                dx = np.empty_like(dout)
                n1 = cache.norm1
                dgamma, dbeta = _kernels.bn_relu_backward_planes(
                    d3, cache.x, dh1, n1.scale, n1.shift, n1.mean, n1.inv_std, cache.in_d, cache.count,
                    cache.training, dx.reshape(n, c, size), self._partial(team, c), team)
                unit.bn1.accumulate("gamma", dgamma.astype(dtype))
                unit.bn1.accumulate("beta", dbeta.astype(dtype))
        return dx
