"""The Cython CPU backend: the :class:`refimpl.backend.ConvBackend` interface on compiled kernels.

This module is the thin layer between validated NumPy arrays and :mod:`fastpath._cython_conv`: it
converts inputs (C-contiguous, one float dtype, int32 indices — read-only arrays are fine), allocates
outputs, and keeps in each cache exactly what the backward kernels read. A perforated convolution
takes one of three paths:

* **rows** — float32 with ``direct_conv`` (the default), 16 to 64 input and output channels,
  stride 1 and a padding smaller than the kernel (every 3×3 'same' layer of a CIFAR ResNet past
  the first): the input is
  transposed once to channels-last rows and a direct register-tiled kernel reads each window in
  place through an int32 map of the padded grid (no padded copy, no gathered columns), storing its
  tiles straight into the compact (N, K, P) output (``fastpath/direct_conv_planes.h`` where both
  channel counts are multiples of 16 on an AVX2 CPU; ``fastpath/direct_conv.h`` and a
  transposition from a per-thread scratch elsewhere). Backward: ``dW`` by a register tile that
  streams the output gradient's rows past the windows (a gather and BLAS where the channel counts
  do not fit it), ``dX`` as the direct convolution of the output gradient — zero where the plan
  skipped, padded by ``kernel - 1 - padding`` — with the weights flipped and transposed, at every
  input position (:meth:`CythonBackend._rows_forward`, :meth:`CythonBackend._rows_backward`);
* **one output channel** (a halting head's local term): a plane-wise direct convolution of the
  whole map (:meth:`CythonBackend._direct_forward`);
* **GEMM** — everything else (float64, strided convolutions, wider or narrower layers,
  ``direct_conv=False``): masked
  im2col columns of many images gathered into one buffer and one BLAS GEMM per chunk of columns,
  the backward scattering the column gradient back (col2im); see the docstring of
  ``_cython_conv.pyx`` for the matrix picture.

Thread count: ``CythonBackend(threads=...)``, else the ``PONDER_THREADS`` environment variable, else
``os.cpu_count()``; it drives every OpenMP loop. Each OpenMP thread runs its own chunks through a
single-threaded GEMM (BLAS is held at one thread with :mod:`threadpoolctl` during those calls):
two thread pools — OpenMP's and BLAS's — taking turns on the same cores cost far more than they
gain, especially on a shared machine.

Determinism: at a fixed thread count, identical calls give bit-identical results. The backward
splits its work into one static part per thread and sums the per-part partial ``dW``/``db`` in a
fixed order (see ``gemm_backward``), so a training run on this backend is reproducible from its
seed. A *different* thread count splits the sums differently and may change the last bits of
``dW`` and ``db`` (float addition is not associative); forward outputs and ``dX`` do not depend on
the thread count.

Validation happens in :class:`refimpl.backend.ConvBackend` before any method here runs: the
kernels below receive C-contiguous arrays of one float dtype, an immutable plan and read-only
int32 tables whose entries are in range.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from refimpl.backend import BackendUnavailableError, ConvBackend
from refimpl.conv import ConvGeometry

from . import BackendStatus
from . import cython_unit

try:
    from . import _cython_conv as _kernels
except ImportError as _exc:  # not compiled: status() says why and how to fix it
    _kernels = None
    _IMPORT_ERROR = str(_exc)
else:
    _IMPORT_ERROR = ""

INDEX = np.int32
CHUNK_BYTES = 1 << 20  # size of the gathered column buffer of one GEMM (see CythonBackend.chunk_bytes)
PARALLEL_WORK = 1 << 18  # smaller calls run on one thread (see CythonBackend._team)
ROWS_CHANNELS = (16, 64)  # input and output channel counts of the convolutions on rows (CythonBackend._on_rows)


def default_threads():
    """``PONDER_THREADS`` if set (a positive int), else ``os.cpu_count()``."""
    value = os.environ.get("PONDER_THREADS")
    if value is None:
        return os.cpu_count() or 1
    try:
        threads = int(value)
    except ValueError:
        raise ValueError(f"PONDER_THREADS must be a positive integer, got {value!r}") from None
    if threads < 1:
        raise ValueError(f"PONDER_THREADS must be a positive integer, got {value!r}")
    return threads


@lru_cache(maxsize=1)
def _blas_pools():
    """The loaded BLAS libraries (as a threadpoolctl selection), found once."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas")


def status():
    """Whether the compiled extension is importable, and whether it was built with OpenMP."""
    if _kernels is None:
        return BackendStatus(
            "cython", False,
            f"the compiled extension fastpath._cython_conv is missing ({_IMPORT_ERROR}); build it with "
            "`pip install -e .` on a machine with a C compiler (and OpenMP for multi-threading)",
        )
    if _kernels.OPENMP:
        return BackendStatus("cython", True, f"compiled with OpenMP ({default_threads()} threads by default)")
    return BackendStatus(
        "cython", True,
        "compiled WITHOUT OpenMP: runs single-threaded (rebuild with an OpenMP-capable compiler "
        "for threads)",
    )


def _float(a, dtype):
    return np.ascontiguousarray(a, dtype=dtype)


def _index(a):
    return np.ascontiguousarray(a, dtype=INDEX)


class ConvCache(NamedTuple):
    """What :meth:`CythonBackend.conv_backward` needs."""

    xp: np.ndarray  # (N, C, H+2ph, W+2pw) padded input, read again to rebuild the columns
    wmat: np.ndarray  # (K, C*kh*kw)
    w_shape: tuple
    x_shape: tuple
    geometry: ConvGeometry
    base: np.ndarray  # (T,) int64 window offsets into xp
    offsets: np.ndarray  # (C*kh*kw,) int64 tap offsets into xp
    sample: np.ndarray  # (T,) int32
    slot: np.ndarray  # (T,) int32
    start: np.ndarray  # (N+1,) int64 first column of each sample


class DirectConvCache(NamedTuple):
    """What :meth:`CythonBackend.conv_backward` needs for a single-output-channel convolution."""

    xp: np.ndarray  # (N, C, H+2ph, W+2pw) padded input
    w: np.ndarray  # (1, C, kh, kw)
    x_shape: tuple
    geometry: ConvGeometry
    positions: np.ndarray  # (B, P) int32 plan positions, -1 padded
    counts: np.ndarray  # (B,) int32


class RowsConvCache(NamedTuple):
    """What :meth:`CythonBackend.conv_backward` needs for a convolution computed on channels-last rows."""

    rows: np.ndarray  # (N H W, C) float32 input, channels last
    rowmap: np.ndarray  # (N (H+2ph) (W+2pw),) int32 row of every position of the padded grid, -1 outside (read-only)
    w: np.ndarray  # (K, C, kh, kw)
    x_shape: tuple
    geometry: ConvGeometry
    positions: np.ndarray  # (B, P) int32 plan positions, -1 padded
    counts: np.ndarray  # (B,) int32


class TableConvCache(NamedTuple):
    src: np.ndarray  # (N, C, S)
    table: np.ndarray  # (B, R, T)
    wmat: np.ndarray  # (K, C*T)
    w_shape: tuple
    sample: np.ndarray
    slot: np.ndarray
    start: np.ndarray


class TablePoolCache(NamedTuple):
    mode: str
    table: np.ndarray  # (B, R, T)
    src_shape: tuple
    argmax: np.ndarray  # (N, C, R) source index of the max (mode "max"), else empty


@lru_cache(maxsize=32)
def _every_position(count):
    """``(positions (1, count), counts (1,))`` int32 of a shared plan computing every position (read-only)."""
    positions = np.arange(count, dtype=INDEX)[None]
    counts = np.array([count], dtype=INDEX)
    for array in (positions, counts):
        array.setflags(write=False)
    return positions, counts


def _corner_taps(kernel, map_width):
    """Offsets of the taps of a window from its top-left corner in a flattened map, row-major ``(i, j)``."""
    kh, kw = kernel
    i, j = np.meshgrid(np.arange(kh), np.arange(kw), indexing="ij")
    return (i * map_width + j).astype(np.int64).ravel()


_EMPTY_I64 = np.zeros(1, dtype=np.int64)
_EMPTY_I32 = np.zeros(1, dtype=INDEX)


class CythonBackend(ConvBackend):
    """Compiled CPU kernels: direct convolutions on rows, or gather + BLAS GEMM + scatter; OpenMP threads.

    Parameters
    ----------
    threads : int, optional
        OpenMP threads of the gathers and scatters (default :func:`default_threads`).
    chunk_bytes : int, optional
        Size of the gathered column buffer per GEMM. Larger chunks make larger GEMMs; smaller
        ones keep the buffer in cache and bound the memory. Columns of many images share a chunk.
    parallel_work : int, optional
        Calls with less work than this (about one multiply-add or copy per unit) run on one thread.
    direct_conv : bool, optional
        Whether float32 convolutions use the register-blocked direct kernels on channels-last rows
        (``fastpath/direct_conv.h``, ``fastpath/direct_conv_planes.h``) instead of a gather and a
        BLAS GEMM: the fused residual unit, compiled networks, and ``conv_forward`` /
        ``conv_backward`` at stride 1 with a padding smaller than the kernel and 16 to 64 input
        and output channels (default True; float64 always uses BLAS). False keeps every float32
        convolution on the gather-and-GEMM path.
    """

    name = "cython"

    def __init__(self, threads=None, chunk_bytes=CHUNK_BYTES, parallel_work=PARALLEL_WORK, direct_conv=True):
        if _kernels is None:
            raise BackendUnavailableError(f"the cython backend is unavailable: {status().reason}")
        self.threads = default_threads() if threads is None else threads
        self.chunk_bytes = chunk_bytes
        self.parallel_work = parallel_work
        if not isinstance(direct_conv, bool):
            raise TypeError(f"direct_conv must be True or False, got {direct_conv!r}")
        self.direct_conv = direct_conv
        # The sparse residual unit fused in the channels-last domain (refimpl.sparse_unit.unit_executor
        # picks it for sparse SACT units); absent if its extension was not compiled.
        if cython_unit._kernels is not None:
            self.fused_unit = cython_unit.CythonFusedUnit(self)

    @property
    def threads(self):
        return self._threads

    @threads.setter
    def threads(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"threads must be a positive integer, got {value!r}")
        self._threads = int(value)

    def _team(self, work):
        """Threads for a call doing about ``work`` elementary operations: one below ``parallel_work``.

        Starting an OpenMP team costs microseconds on an idle machine and up to a scheduler tick
        on a busy one (a preempted thread holds up the barrier); small calls run faster alone.
        """
        return self.threads if work >= self.parallel_work else 1

    def _chunk(self, rows, itemsize):
        """Columns per GEMM: a (rows, chunk) buffer of about ``chunk_bytes`` (at least one column)."""
        return max(1, self.chunk_bytes // max(1, rows * itemsize))

    # -- perforated convolution ----------------------------------------------------------------

    def _conv_forward(self, x, w, b, plan, geometry):
        dtype = x.dtype
        x, w, b = _float(x, dtype), _float(w, dtype), _float(b, dtype)
        n, c, h, wd = x.shape
        k = w.shape[0]
        (kh, kw), (sh, sw), (ph, pw), (_, wo) = geometry.kernel, geometry.stride, geometry.padding, geometry.out_hw
        hp, wp = h + 2 * ph, wd + 2 * pw
        if self._on_rows(dtype, c, k, geometry):
            positions, counts = _index(plan.positions), _index(plan.counts)
            return self._rows_forward(x, w, b, geometry, positions, counts)
        if ph or pw:
            xp = np.empty((n, c, hp, wp), dtype=dtype)
            _kernels.pad_planes(x.reshape(n * c, h, wd), xp.reshape(n * c, hp, wp), ph, pw, self._team(xp.size))
        else:
            xp = x
        positions, counts = _index(plan.positions), _index(plan.counts)
        if k == 1:
            return self._direct_forward(xp, w, b, x.shape, geometry, positions, counts)
        base, sample, slot, start = _kernels.plan_columns(positions, counts, n, wo, sh, sw, c * hp * wp, wp)
        ci, ii, jj = np.meshgrid(np.arange(c), np.arange(kh), np.arange(kw), indexing="ij")
        offsets = (ci * (hp * wp) + ii * wp + jj).astype(np.int64).ravel()
        wmat = w.reshape(k, -1)
        width = positions.shape[1]
        compact = np.empty((n, k, width), dtype=dtype)
        with _blas_pools().limit(limits=1):
            _kernels.gemm_forward(False, xp.reshape(-1), wmat, b, base, offsets, _EMPTY_I32, sample, slot,
                                  compact, self._chunk(wmat.shape[1], x.itemsize), c, 0, 0, kw,
                                  False, self._team(sample.size * wmat.size))
        if not plan.shared and int(counts.min()) < width:
            _kernels.zero_padded_slots(compact, counts, self._team(compact.size))
        cache = ConvCache(xp, wmat, w.shape, x.shape, geometry, base, offsets, sample, slot, start)
        return compact, cache

    def _conv_backward(self, dcompact, cache):
        if isinstance(cache, DirectConvCache):
            return self._direct_backward(dcompact, cache)
        if isinstance(cache, RowsConvCache):
            return self._rows_backward(dcompact, cache)
        xp, wmat = cache.xp, cache.wmat
        dcompact = _float(dcompact, wmat.dtype)
        n, c, h, wd = cache.x_shape
        (_, kw), (ph, pw) = cache.geometry.kernel, cache.geometry.padding
        dxp = np.zeros(xp.shape, dtype=wmat.dtype)
        dwmat = np.zeros(wmat.shape, dtype=wmat.dtype)
        db = np.zeros(wmat.shape[0], dtype=wmat.dtype)
        with _blas_pools().limit(limits=1):
            _kernels.gemm_backward(False, xp.reshape(-1), wmat, dcompact, cache.base, cache.offsets, _EMPTY_I32,
                                   cache.sample, cache.slot, cache.start, dxp.reshape(-1), dwmat, db,
                                   self._chunk(wmat.shape[1], wmat.itemsize), c, 0, 0, kw, False,
                                   self._team(2 * cache.sample.size * wmat.size))
        if ph or pw:
            dx = np.empty(cache.x_shape, dtype=wmat.dtype)
            hp, wp = xp.shape[2:]
            _kernels.crop_planes(dxp.reshape(n * c, hp, wp), dx.reshape(n * c, h, wd), ph, pw, self._team(dx.size))
        else:
            dx = dxp
        return dx, dwmat.reshape(cache.w_shape), db

    # -- float32 on channels-last rows: the direct micro-kernel -----------------------------------

    def _on_rows(self, dtype, c, k, geometry):
        """Whether a convolution runs on channels-last rows (:meth:`_rows_forward`) rather than the GEMM path.

        float32 with ``direct_conv``; between :data:`ROWS_CHANNELS` input and output channels
        (the small-channel layers of CIFAR ResNets: with fewer, the input gradient's few output
        channels leave the kernel's vectors idle; with more, BLAS's GEMM is as fast or faster,
        measured on the benchmark's NIN, AlexNet and VGG layers); stride 1 and a padding smaller
        than the kernel, so that the input gradient is a convolution of the output gradient padded
        by ``kernel - 1 - padding`` (strided convolutions keep the GEMM path, whose backward
        scatters the windows instead).
        """
        (kh, kw), (ph, pw) = geometry.kernel, geometry.padding
        low, high = ROWS_CHANNELS
        return (self.direct_conv and dtype == np.float32 and low <= c <= high and low <= k <= high
                and cython_unit._kernels is not None and geometry.stride == (1, 1) and ph < kh and pw < kw)

    def _rows_forward(self, x, w, b, geometry, positions, counts):
        """The input to channels-last rows (one transposition), then the direct kernel at the plan's positions.

        The windows are read in place through a map of the padded grid (no padded copy, no
        gathered columns); the kernel's rows are transposed into the compact (N, K, P) output
        from a per-thread scratch that stays in cache (:func:`fastpath._cython_conv.conv_rows_to_planes`).
        """
        n, c, h, wd = x.shape
        k = w.shape[0]
        (kh, kw), (ph, pw), (_, wo) = geometry.kernel, geometry.padding, geometry.out_hw
        hp, wp = h + 2 * ph, wd + 2 * pw
        every, every_count = _every_position(h * wd)
        rows = np.empty((n * h * wd, c), dtype=np.float32)
        _kernels.planes_to_channels_last(x.reshape(n, c, h * wd), every_count,
                                         np.arange(n + 1, dtype=np.int64) * (h * wd), rows, self._team(rows.size))
        rowmap = cython_unit._all_rows(n, h, wd, ph, pw).rowmap
        wt = np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(kh * kw * c, k))
        width = positions.shape[1]
        compact = np.empty((n, k, width), dtype=np.float32)
        _kernels.conv_rows_to_planes(rows, rowmap, hp * wp, wp, positions, counts, wo, 1, 1, _corner_taps((kh, kw), wp),
                                     wt, b, compact, self._team(n * width * wt.size))
        return compact, RowsConvCache(rows, rowmap, w, x.shape, geometry, positions, counts)

    def _rows_backward(self, dcompact, cache):
        """``dW``, ``db`` and ``dX`` on rows, by direct kernels.

        The computed slots of the output gradient become rows (one transposition). ``dW`` and
        ``db``: :func:`fastpath.cython_unit.weight_grad_rows` (the direct weight-gradient kernel of
        ``direct_conv.h``, partial sums per thread added in a fixed order). ``dX``
        of a stride-1 convolution is the convolution of the output gradient — zero at the
        positions the plan skipped, padded by ``kernel - 1 - padding`` — with the weights flipped
        and their channel axes swapped, at every input position: the same direct kernel on a map
        of the output grid that holds the gradient's rows, so no col2im scatter and no atomics.
        """
        rows, rowmap, w = cache.rows, cache.rowmap, cache.w
        positions, counts = cache.positions, cache.counts
        n, c, h, wd = cache.x_shape
        k = w.shape[0]
        (kh, kw), (ph, pw), (ho, wo) = cache.geometry.kernel, cache.geometry.padding, cache.geometry.out_hw
        hp, wp = h + 2 * ph, wd + 2 * pw
        taps = kh * kw
        dcompact = _float(dcompact, np.float32)
        base, _, _, start = _kernels.plan_columns(positions, counts, n, wo, 1, 1, hp * wp, wp)
        total = base.size  # > 0: a plan computes at least one position per sample
        team = self._team(2 * total * w.size)
        dy = np.empty((total, k), dtype=np.float32)
        _kernels.planes_to_channels_last(dcompact, counts, start, dy, team)
        # float32 with direct_conv here (see _on_rows): the direct kernel, no BLAS
        dwmat, db = cython_unit.weight_grad_rows(self, rows, rowmap, base, _corner_taps((kh, kw), wp), dy, taps * c,
                                                 team)
        dw = np.ascontiguousarray(dwmat.reshape(k, kh, kw, c).transpose(0, 3, 1, 2))
        # dX: the output gradient's rows on a map of the output grid padded by (kh - 1 - ph, kw - 1 - pw)
        ah, aw = kh - 1 - ph, kw - 1 - pw
        hm, wm = ho + 2 * ah, wo + 2 * aw
        out_base = _kernels.plan_columns(positions, counts, n, wo, 1, 1, hm * wm, wm)[0]
        dymap = np.full(n * hm * wm, -1, dtype=INDEX)
        dymap[out_base + (ah * wm + aw)] = np.arange(total, dtype=INDEX)
        # wflip[(i, j, k), c] = w[k, c, kh - 1 - i, kw - 1 - j]
        wflip = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1).reshape(taps * k, c))
        every, every_count = _every_position(h * wd)
        dx = np.empty((n, c, h * wd), dtype=np.float32)
        _kernels.conv_rows_to_planes(dy, dymap, hm * wm, wm, every, every_count, wd, 1, 1, _corner_taps((kh, kw), wm),
                                     wflip, np.zeros(c, dtype=np.float32), dx, self._team(dx.size * taps * k))
        return dx.reshape(cache.x_shape), dw, db

    # -- a single output channel (e.g. a halting head's local term): direct convolution ---------

    def _direct_forward(self, xp, w, b, x_shape, geometry, positions, counts):
        """Every output position by plane-wise multiply-adds, then the plan's positions kept.

        With one output channel the gathered columns of the GEMM path cost as much as the
        arithmetic; the direct convolution of the whole map is several times faster even where
        only part of it is kept (FLOPs are still counted at the computed positions only).
        """
        n, c = x_shape[:2]
        ho, wo = geometry.out_hw
        (sh, sw) = geometry.stride
        dense = np.empty((n, ho, wo), dtype=xp.dtype)
        _kernels.direct_conv_single(xp, w.reshape(w.shape[1:]), float(b[0]), sh, sw, dense,
                                    self._team(dense.size * w.size))
        flat = dense.reshape(n, ho * wo)
        if positions.shape[0] == 1:
            compact = flat[:, positions[0]]
        else:
            compact = np.take_along_axis(flat, np.maximum(positions, 0), axis=1)
            compact[positions < 0] = 0
        return compact[:, None, :], DirectConvCache(xp, w, x_shape, geometry, positions, counts)

    def _direct_backward(self, dcompact, cache):
        xp, w = cache.xp, cache.w
        dtype = w.dtype
        n, c, h, wd = cache.x_shape
        ho, wo = cache.geometry.out_hw
        (sh, sw), (ph, pw) = cache.geometry.stride, cache.geometry.padding
        dcompact = _float(dcompact, dtype)[:, 0]
        dy = np.zeros((n, ho * wo + 1), dtype=dtype)  # the last column takes the plan's -1 padding
        slots = np.where(cache.positions < 0, ho * wo, cache.positions)
        if slots.shape[0] == 1:
            dy[:, slots[0]] = dcompact
        else:
            np.put_along_axis(dy, slots, dcompact, axis=1)
        dy = np.ascontiguousarray(dy[:, : ho * wo]).reshape(n, ho, wo)
        team = self._team(2 * dy.size * w.size)
        dxp = np.zeros(xp.shape, dtype=dtype)
        dw_partial = np.zeros((team, *w.shape[1:]), dtype=np.float64)
        dw_columns = np.zeros((team, w[0].size, wo), dtype=np.float64)
        _kernels.direct_conv_single_backward(xp, w.reshape(w.shape[1:]), dy, sh, sw, dxp, dw_partial, dw_columns,
                                             team)
        dw = dw_partial[0].copy()
        for part in range(1, team):  # fixed order: reproducible at a fixed thread count
            dw += dw_partial[part]
        db = np.array([dy.sum(dtype=np.float64)], dtype=dtype)
        if ph or pw:
            dx = np.empty(cache.x_shape, dtype=dtype)
            hp, wp = xp.shape[2:]
            _kernels.crop_planes(dxp.reshape(n * c, hp, wp), dx.reshape(n * c, h, wd), ph, pw, self._team(dx.size))
        else:
            dx = dxp
        return dx, dw.astype(dtype).reshape(w.shape), db

    # -- fills ---------------------------------------------------------------------------------

    def _fill_forward(self, compact, plan, fill):
        compact = _float(compact, compact.dtype)
        n, k, _ = compact.shape
        ho, wo = plan.out_hw
        dense = np.empty((n, k, ho * wo), dtype=compact.dtype)
        if fill == "nearest":
            _kernels.fill_nearest(compact, _index(plan.index_map).reshape(plan.batch, -1), dense, self._team(dense.size))
        else:
            _kernels.fill_zero(compact, _index(plan.positions), _index(plan.counts), dense,
                               self._team(dense.size))
        return dense.reshape(n, k, ho, wo)

    def _fill_backward(self, ddense, plan, fill):
        ddense = _float(ddense, ddense.dtype)
        n, k, ho, wo = ddense.shape
        flat = ddense.reshape(n, k, ho * wo)
        if fill == "nearest":
            dcompact = np.zeros((n, k, plan.width), dtype=ddense.dtype)
            _kernels.fill_nearest_adjoint(flat, _index(plan.index_map).reshape(plan.batch, -1), dcompact,
                                          self._team(flat.size))
        else:
            dcompact = np.empty((n, k, plan.width), dtype=ddense.dtype)
            _kernels.fill_zero_adjoint(flat, _index(plan.positions), _index(plan.counts), dcompact, self._team(flat.size))
        return dcompact

    # -- convolution and pooling through an index table ----------------------------------------

    def _table_conv_forward(self, src, table, w, b):
        dtype = src.dtype
        src, w, b, table = _float(src, dtype), _float(w, dtype), _float(b, dtype), _index(table)
        n, c, s = src.shape
        k = w.shape[0]
        r, taps = table.shape[1:]
        sample, slot, start = _kernels.table_columns(n, r)
        wmat = w.reshape(k, -1)
        out = np.empty((n, k, r), dtype=dtype)
        with _blas_pools().limit(limits=1):
            _kernels.gemm_forward(True, src.reshape(-1), wmat, b, _EMPTY_I64, _EMPTY_I64, table.reshape(-1),
                                  sample, slot, out, self._chunk(wmat.shape[1], src.itemsize), c, s, r, taps,
                                  table.shape[0] > 1, self._team(sample.size * wmat.size))
        return out, TableConvCache(src, table, wmat, w.shape, sample, slot, start)

    def _table_conv_backward(self, dout, cache):
        src, table, wmat = cache.src, cache.table, cache.wmat
        dout = _float(dout, wmat.dtype)
        n, c, s = src.shape
        r, taps = table.shape[1:]
        dsrc = np.zeros(src.shape, dtype=wmat.dtype)
        dwmat = np.zeros(wmat.shape, dtype=wmat.dtype)
        db = np.zeros(wmat.shape[0], dtype=wmat.dtype)
        with _blas_pools().limit(limits=1):
            _kernels.gemm_backward(True, src.reshape(-1), wmat, dout, _EMPTY_I64, _EMPTY_I64, table.reshape(-1),
                                   cache.sample, cache.slot, cache.start, dsrc.reshape(-1), dwmat, db,
                                   self._chunk(wmat.shape[1], wmat.itemsize), c, s, r, taps,
                                   table.shape[0] > 1, self._team(2 * cache.sample.size * wmat.size))
        return dsrc, dwmat.reshape(cache.w_shape), db

    def _table_pool_forward(self, src, table, mode):
        src, table = _float(src, src.dtype), _index(table)
        n, c, _ = src.shape
        r = table.shape[1]
        out = np.empty((n, c, r), dtype=src.dtype)
        is_max = mode == "max"
        argmax = np.empty((n, c, r) if is_max else (1, 1, 1), dtype=INDEX)
        _kernels.table_pool(src, table, is_max, out, argmax, self._team(out.size * table.shape[2]))
        return out, TablePoolCache(mode, table, src.shape, argmax)

    def _table_pool_backward(self, dout, cache):
        dout = _float(dout, dout.dtype)
        dsrc = np.zeros(cache.src_shape, dtype=dout.dtype)
        _kernels.table_pool_adjoint(dout, cache.table, cache.mode == "max", cache.argmax, dsrc,
                                    self._team(dout.size * cache.table.shape[2]))
        return dsrc

    def __repr__(self):
        return f"<CythonBackend threads={self.threads}>"
