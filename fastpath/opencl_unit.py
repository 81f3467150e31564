r"""The sparse residual unit as one fused operation on the OpenCL backend.

:class:`OpenCLFusedUnit` computes :func:`refimpl.sparse_unit.sparse_unit_forward` /
:func:`~refimpl.sparse_unit.sparse_unit_backward` (``execution="sparse"``) — the unit
:math:`U = x + A \odot f(x)`, :math:`f = \text{conv}_2 \circ \text{relu} \circ \text{bn}_2 \circ
\text{conv}_1 \circ \text{relu} \circ \text{bn}_1` — with the same semantics, NumPy NCHW arrays in and
out, but entirely in the *compact domain* on the device:

* three row sets per batch, from the active mask ``A`` (n, H, W): ``A`` itself (conv2 runs there),
  ``D`` = ``A`` dilated by conv2's window (conv1 runs there; the batch norms' training statistics
  are over ``D``) and ``E`` = ``D`` dilated by conv1's window (what conv1 reads), with ``D``'s rows
  first in ``E``;
* ``x`` is uploaded once; batch norm 1 and ReLU are applied in the gather of the ``E`` rows into a
  channels-last matrix (E, C); conv1 is a table GEMM at the ``D`` rows; batch norm 2 and ReLU are
  applied in place of a gather; conv2 is a table GEMM at the ``A`` rows; the residual add is the
  scatter of those rows into a copy of ``x``;
* the backward runs the same structure in reverse: input gradients of the convolutions are table
  GEMMs through the inverted tables (a gather per row, so no atomics), the ReLU masks are fused
  into them, and batch norm 1's input gradient is added into ``dU`` in the final scatter;
* the training statistics (mean, biased variance over ``D``) and every parameter gradient are
  reductions computed on the device as per-chunk partial sums added in a fixed order, so results
  are deterministic; the running statistics are then updated on the host with
  :func:`refimpl.layers.update_running_statistics`, exactly as the reference does.

The index data (rows, tap tables and their inverses) is built on the host from the mask with
NumPy — it is integer work linear in the number of positions — and uploaded per call.

Each phase is wrapped in :func:`fastpath.profiling.section` (``"gather"``, ``"compute"``,
``"scatter"``, ``"other"``); while profiling records, a phase ends with a queue finish so that its
host wall clock covers its kernels.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import numpy as np

from refimpl.conv import conv_flops
from refimpl.layers import update_running_statistics
from refimpl.sparse_unit import check_sparse_unit, dilate

from . import profiling
from .opencl_runtime import build_program
from .unit_checks import check_unit_gradient, check_unit_input

KERNEL_FILE = "sparse_unit.cl"
#: Rows per partial sum of the reductions (statistics, parameter gradients): fixed, so the order in
#: which values are added, hence the result, does not depend on the device.
CHUNK = 64
#: Rows per partial sum of the weight gradients (longer: each chunk is a small GEMM).
WEIGHT_CHUNK = 256
#: Work-items per work-group along the first axis (the others: 1); global sizes are rounded up to it
#: (PoCL compiles one specialisation per work-group shape).
GROUP = 16
#: Output channels held in registers per work-item of the GEMM kernels (the kernel's BM), and
#: rows per work-item of table_gemm (its RB), input channels per work-item of the weight gradient (CB).
BM = 16
RB = 4
CB = 4
_INT32_MAX = np.iinfo(np.int32).max


def _round_up(value, multiple):
    return -(-max(int(value), 1) // multiple) * multiple


class UnitRows(NamedTuple):
    """The host-side index data of one mask (see the module docstring)."""

    n_d: int  # rows of D (the first rows of E)
    n_e: int
    n_a: int
    e_positions: np.ndarray  # int64 (n_e,): b * H*W + y * W + x
    a_positions: np.ndarray  # int64 (n_a,)
    conv1_table: np.ndarray  # int32 (n_d, kh1*kw1): E row read by each tap, -1 = padding
    conv2_table: np.ndarray  # int32 (n_a, kh2*kw2): D row read by each tap
    d_counts: np.ndarray  # int64 (n,): |D| per sample
    a_counts: np.ndarray  # int64 (n,)


def _tap_table(positions, row_of, shape, kernel, mirrored=False):
    """The row of ``row_of`` read by each tap of a stride-1 "same" window at ``positions``; -1 outside the image.

    ``mirrored``: the window's offsets negated, which gives the inverse table: for each position
    and tap, the row whose window reads this position through that tap.

    Parameters
    ----------
    positions : int64 (P,), flat positions ``b * H*W + y * W + x``
    row_of : int (n*H*W,), the row of every position, -1 where there is none
    shape : (n, H, W)
    kernel : (kh, kw), odd

    Returns
    -------
    int32 (P, kh*kw), tap ``t = i * kw + j``.
    """
    n, h, w = shape
    kh, kw = kernel
    rh, rw = kh // 2, kw // 2
    hp, wp = h + 2 * rh, w + 2 * rw
    padded = np.full((n, hp, wp), -1, dtype=np.int32)  # the border reads "no row": zero padding
    padded[:, rh : rh + h, rw : rw + w] = row_of.reshape(n, h, w)
    b, rest = np.divmod(positions, h * w)
    y, x = np.divmod(rest, w)
    centre = (b * hp + y + rh) * wp + x + rw
    sign = -1 if mirrored else 1
    offsets = np.array([sign * ((i - rh) * wp + (j - rw)) for i in range(kh) for j in range(kw)], dtype=np.int64)
    return padded.reshape(-1)[centre[:, None] + offsets[None, :]]


def unit_rows(active, kernel1, kernel2):
    """The rows A, D, E of an active mask (n, H, W) and the tap tables of conv1 (at D) and conv2 (at A)."""
    n, h, w = active.shape
    d_mask = dilate(active, kernel2)
    e_mask = dilate(d_mask, kernel1)
    d_positions = np.flatnonzero(d_mask)
    e_positions = np.concatenate([d_positions, np.flatnonzero(e_mask & ~d_mask)])
    a_positions = np.flatnonzero(active)
    row_of = np.full(n * h * w, -1, dtype=np.int64)
    row_of[e_positions] = np.arange(e_positions.size)
    conv1_table = _tap_table(d_positions, row_of, active.shape, kernel1)
    conv2_table = _tap_table(a_positions, row_of, active.shape, kernel2)  # D's rows are E's first
    return UnitRows(d_positions.size, e_positions.size, a_positions.size, e_positions, a_positions,
                    conv1_table, conv2_table, d_mask.sum(axis=(1, 2)).astype(np.int64),
                    active.sum(axis=(1, 2)).astype(np.int64))


def inverse_tables(rows, shape, kernel1, kernel2):
    """The gather form of both convolutions' scatter: for every E row (D row) and tap of conv1 (conv2),
    the D row (A row) whose window reads it through that tap, -1 if none.

    A stride-1 window has at most one such reader per (row, tap), at the mirrored offset; this is
    what :func:`fastpath.opencl_tables.invert_table` computes for any table, in one pass per tap.
    """
    size = int(np.prod(shape))
    d_row = np.full(size, -1, dtype=np.int64)
    d_row[rows.e_positions[: rows.n_d]] = np.arange(rows.n_d)
    a_row = np.full(size, -1, dtype=np.int64)
    a_row[rows.a_positions] = np.arange(rows.n_a)
    return (_tap_table(rows.e_positions, d_row, shape, kernel1, mirrored=True),
            _tap_table(rows.e_positions[: rows.n_d], a_row, shape, kernel2, mirrored=True))


class _BatchNormState(NamedTuple):
    training: bool
    mean: Any  # device (C,)
    inv_std: Any  # device (C,)
    gamma: Any  # device (C,)
    count: int


class OpenCLUnitCache(NamedTuple):
    """What :meth:`OpenCLFusedUnit.backward` needs; device arrays stay on the device."""

    shape: tuple  # (n, C, H, W)
    dtype: np.dtype
    rows: UnitRows
    index: dict  # device int32 arrays
    x: Any  # device (n*C*H*W,)
    xe: Any  # device (n_e, C): relu(bn1(x)) at E
    h1: Any  # device (n_d, K): conv1's output at D
    z: Any  # device (n_d, K): relu(bn2(h1))
    bn1: _BatchNormState
    bn2: _BatchNormState
    w1: tuple  # device packed (forward, transposed)
    w2: tuple

    @classmethod
    def nothing_active(cls, x):
        """The cache of a forward with no active position (``rows`` None: U = x, nothing to differentiate)."""
        return cls(x.shape, x.dtype, *([None] * (len(cls._fields) - 2)))


class OpenCLFusedUnit:
    """The fused sparse residual unit of an :class:`~fastpath.opencl_backend.OpenCLBackend`.

    ``forward(unit, x, active) -> (U, cache, flops)`` and ``backward(unit, dU, cache) -> dx`` have
    exactly the semantics of :func:`refimpl.sparse_unit.sparse_unit_forward` (``execution="sparse"``)
    and :func:`~refimpl.sparse_unit.sparse_unit_backward`: batch norm with statistics over ``D`` in
    training (running statistics updated) and running statistics in evaluation, parameter
    gradients accumulated into the unit's layers, FLOPs per sample of conv1 at ``|D|`` and conv2
    at ``|A|`` positions (also recorded as the convolutions' ``flops_per_sample``).

    Parameters
    ----------
    backend : OpenCLBackend, whose context, queue, memory pool and launch bookkeeping are used
    """

    def __init__(self, backend):
        self.backend = backend

    # -- plumbing ------------------------------------------------------------------------------

    def _launch(self, name, dtype, global_size, *args):
        local = (GROUP,) + (1,) * (len(global_size) - 1)
        glob = tuple(_round_up(g, l) for g, l in zip(global_size, local))
        return self.backend._launch(KERNEL_FILE, name, dtype, glob, local, *args)

    def warm_up(self, dtypes=(np.float32,)):
        """Build the unit's program for ``dtypes`` now (cached per context)."""
        for dtype in dtypes:
            dtype = self.backend._check_dtype(dtype)
            build_program(self.backend.context, KERNEL_FILE, self.backend._options(dtype, KERNEL_FILE))

    @contextlib.contextmanager
    def _phase(self, name):
        with profiling.section(name):
            yield
            if profiling.is_recording():
                self.backend.queue.finish()

    def _upload(self, array, dtype=None):
        array = np.ascontiguousarray(array if dtype is None else np.asarray(array, dtype=dtype))
        return self.backend._upload(array)

    def _empty(self, shape, dtype):
        return self.backend._empty(shape, dtype)

    # -- checks --------------------------------------------------------------------------------

    def _check(self, unit, x, active):
        dtype = self.backend._check_dtype(check_unit_input(unit, x, active))
        if x.size > _INT32_MAX:
            raise ValueError(f"x has {x.size} elements; the fused unit indexes with int32 (at most {_INT32_MAX})")
        return dtype

    # -- batch norm pieces ---------------------------------------------------------------------

    def _column_sums(self, rows, channels, cstride, offset, src, mean, squared, scale, dtype):
        groups = -(-rows // CHUNK)
        partial = self._empty((groups, channels), dtype)
        self._launch("column_partials", dtype, (channels, groups), rows, channels, cstride, CHUNK, offset, src,
                     mean, int(squared), partial)
        out = self._empty((channels,), dtype)
        self._launch("reduce_partials", dtype, (channels,), groups, channels, dtype.type(scale), partial, out)
        return out

    def _bn_state(self, layer, rows, channels, cstride, offset, src, dtype):
        """Batch statistics over the first ``rows`` rows (training) or the running ones (evaluation)."""
        gamma = self._upload(layer.params["gamma"], dtype)
        if not layer.training:
            mean = layer.buffers["running_mean"].astype(dtype, copy=False)
            inv_std = (1.0 / np.sqrt(layer.buffers["running_var"] + layer.eps)).astype(dtype, copy=False)
            return _BatchNormState(False, self._upload(mean), self._upload(inv_std), gamma, rows), None
        if rows == 0:
            raise ValueError("batch norm in training needs statistics over at least one computed position; "
                             "active has no True entry")
        mean = self._column_sums(rows, channels, cstride, offset, src, mean=src, squared=False,
                                 scale=1.0 / rows, dtype=dtype)
        var = self._column_sums(rows, channels, cstride, offset, src, mean=mean, squared=True,
                                scale=1.0 / rows, dtype=dtype)
        inv_std = self._empty((channels,), dtype)
        self._launch("inverse_std", dtype, (channels,), channels, dtype.type(layer.eps), var, inv_std)
        return _BatchNormState(True, mean, inv_std, gamma, rows), (mean, var)

    def _bn_gradients(self, state, rows, channels, cstride, offset, src, dy, dtype):
        """(dbeta, dgamma) on the device: sums of dy and dy * x_hat over ``rows`` rows."""
        groups = -(-rows // CHUNK)
        partial_beta = self._empty((groups, channels), dtype)
        partial_gamma = self._empty((groups, channels), dtype)
        self._launch("bn_grad_partials", dtype, (channels, groups), rows, channels, cstride, CHUNK, offset, src,
                     state.mean, state.inv_std, dy, partial_beta, partial_gamma)
        dbeta, dgamma = self._empty((channels,), dtype), self._empty((channels,), dtype)
        one = dtype.type(1)
        self._launch("reduce_partials", dtype, (channels,), groups, channels, one, partial_beta, dbeta)
        self._launch("reduce_partials", dtype, (channels,), groups, channels, one, partial_gamma, dgamma)
        return dbeta, dgamma

    # -- convolutions --------------------------------------------------------------------------

    def _packed(self, conv, dtype):
        """conv's weights (K, C, kh, kw) as (taps, C, K) for the forward and (taps, K, C) for dX,
        the last axis zero-padded to a multiple of BM."""
        w = conv.params["w"]
        k, c = w.shape[:2]
        matrix = w.reshape(k, c, -1)
        packed = []
        for order in ((2, 1, 0), (2, 0, 1)):
            m = matrix.transpose(order)
            padded = np.zeros(m.shape[:2] + (_round_up(m.shape[2], BM),), dtype)
            padded[..., : m.shape[2]] = m
            packed.append(self._upload(padded))
        return tuple(packed)

    def _gemm(self, rows, table, taps, src, cin, w, cout, dtype, bias=None, gate=None):
        out = self._empty((rows, cout), dtype)
        self._launch("table_gemm", dtype, (-(-rows // RB), -(-cout // BM)), rows, taps, cin, cout, w.shape[2], table, src, w,
                     int(bias is not None), bias if bias is not None else w,
                     int(gate is not None), gate if gate is not None else w, out)
        return out

    def _weight_grad(self, rows, table, taps, src, cin, dout, cout, dtype):
        groups = -(-rows // WEIGHT_CHUNK)
        partial = self._empty((groups, cout, cin * taps), dtype)
        self._launch("weight_grad_partials", dtype, (taps * -(-cin // CB), -(-cout // BM), groups), rows, taps, cin, cout,
                     WEIGHT_CHUNK, table, src, dout, partial)
        dw = self._empty((cout * cin * taps,), dtype)
        self._launch("reduce_partials", dtype, (cout * cin * taps,), groups, cout * cin * taps, dtype.type(1),
                     partial, dw)
        return dw

    def _bias(self, conv, dtype):
        return self._upload(conv.params["b"], dtype) if conv.has_bias else None

    # -- the operation -------------------------------------------------------------------------

    def forward(self, unit, x, active):
        """``(U, cache, flops)`` of :func:`refimpl.sparse_unit.sparse_unit_forward` with ``execution="sparse"``."""
        dtype = self._check(unit, x, active)
        n, c, h, w = x.shape
        k = unit.conv1.out_channels
        hw = h * w
        with self._phase("other"):
            rows = unit_rows(active, unit.conv1.kernel, unit.conv2.kernel)
        flops1 = conv_flops(1, c, k, unit.conv1.kernel) * rows.d_counts
        flops2 = conv_flops(1, k, k, unit.conv2.kernel) * rows.a_counts
        unit.conv1.flops_per_sample = flops1
        unit.conv1.dense_flops_per_sample = conv_flops(hw, c, k, unit.conv1.kernel)
        unit.conv2.flops_per_sample = flops2
        unit.conv2.dense_flops_per_sample = conv_flops(hw, k, k, unit.conv2.kernel)
        flops = flops1 + flops2
        if rows.n_a == 0:  # nothing to compute, and no position to take batch statistics from: U = x
            return x.copy(), OpenCLUnitCache.nothing_active(x), flops
        with self._phase("gather"):
            b, p = np.divmod(rows.e_positions, hw)
            index = {
                "e_offset": self._upload(b * c * hw + p, np.int32),
                "a_offset": self._upload((rows.a_positions // hw) * k * hw + rows.a_positions % hw, np.int32),
                "d_rows": self._upload(np.arange(max(rows.n_d, 1)) * k, np.int32),
                "conv1": self._upload(rows.conv1_table),
                "conv2": self._upload(rows.conv2_table),
            }
            xd = self._upload(x.reshape(-1))
            bn1, stats1 = self._bn_state(unit.bn1, rows.n_d, c, hw, index["e_offset"], xd, dtype)
            xe = self._empty((rows.n_e, c), dtype)
            beta1 = self._upload(unit.bn1.params["beta"], dtype)
            self._launch("gather_bn_relu", dtype, (c, rows.n_e), rows.n_e, c, hw, index["e_offset"], xd,
                         bn1.mean, bn1.inv_std, bn1.gamma, beta1, xe)
        with self._phase("compute"):
            w1, w2 = self._packed(unit.conv1, dtype), self._packed(unit.conv2, dtype)
            taps1, taps2 = rows.conv1_table.shape[1], rows.conv2_table.shape[1]
            h1 = self._gemm(rows.n_d, index["conv1"], taps1, xe, c, w1[0], k, dtype, bias=self._bias(unit.conv1, dtype))
            bn2, stats2 = self._bn_state(unit.bn2, rows.n_d, k, 1, index["d_rows"], h1, dtype)
            z = self._empty((rows.n_d, k), dtype)
            beta2 = self._upload(unit.bn2.params["beta"], dtype)
            self._launch("gather_bn_relu", dtype, (k, rows.n_d), rows.n_d, k, 1, index["d_rows"], h1,
                         bn2.mean, bn2.inv_std, bn2.gamma, beta2, z)
            residual = self._gemm(rows.n_a, index["conv2"], taps2, z, k, w2[0], k, dtype,
                                  bias=self._bias(unit.conv2, dtype))
        with self._phase("scatter"):
            u = xd.copy(self.backend.queue)
            self._launch("scatter_add", dtype, (k, rows.n_a), rows.n_a, k, hw, index["a_offset"], residual, u)
            out = u.get(self.backend.queue).reshape(n, k, h, w)
        with self._phase("other"):
            for layer, stats in ((unit.bn1, stats1), (unit.bn2, stats2)):
                if stats is not None:
                    mean, var = (s.get(self.backend.queue) for s in stats)
                    update_running_statistics(layer, mean, var, rows.n_d)
        cache = OpenCLUnitCache(x.shape, dtype, rows, index, xd, xe, h1, z, bn1, bn2, w1, w2)
        return out, cache, flops

    def backward(self, unit, dout, cache):
        """Gradient w.r.t. ``x`` of :meth:`forward` (``dout + ∂ residual``); accumulates the unit's parameter gradients."""
        check_sparse_unit(unit)
        if not isinstance(cache, OpenCLUnitCache):
            raise TypeError(f"cache must be the cache this fused unit's forward returned, got {type(cache).__name__}")
        check_unit_gradient(dout, cache.shape, cache.dtype)
        if cache.rows is None:  # nothing was active: U = x
            return dout.copy()
        dtype = cache.dtype
        n, c, h, w = cache.shape
        k, hw = c, h * w
        rows, index = cache.rows, cache.index
        taps1, taps2 = rows.conv1_table.shape[1], rows.conv2_table.shape[1]
        queue = self.backend.queue
        with self._phase("other"):
            inverse1, inverse2 = inverse_tables(rows, (n, h, w), unit.conv1.kernel, unit.conv2.kernel)
            inverse1, inverse2 = self._upload(inverse1), self._upload(inverse2)
        with self._phase("gather"):
            dx = self._upload(dout.reshape(-1))
            dres = self._empty((rows.n_a, k), dtype)
            if rows.n_a:
                self._launch("gather_rows", dtype, (k, rows.n_a), rows.n_a, k, hw, index["a_offset"], dx, dres)
        grads = {}
        with self._phase("compute"):
            grads["conv2.w"] = self._weight_grad(rows.n_a, index["conv2"], taps2, cache.z, k, dres, k, dtype)
            if unit.conv2.has_bias:
                grads["conv2.b"] = self._column_sums(rows.n_a, k, 1, index["d_rows"], dres, dres, False, 1.0, dtype)
            dy2 = self._gemm(rows.n_d, inverse2, taps2, dres, k, cache.w2[1], k, dtype, gate=cache.z)
            dbeta2, dgamma2 = self._bn_gradients(cache.bn2, rows.n_d, k, 1, index["d_rows"], cache.h1, dy2, dtype)
            dh1 = self._empty((rows.n_d, k), dtype)
            corrected = rows.n_d if cache.bn2.training else 0
            self._launch("bn_backward_scatter", dtype, (k, rows.n_d), rows.n_d, k, 1, index["d_rows"], cache.h1,
                         cache.bn2.mean, cache.bn2.inv_std, cache.bn2.gamma, dy2, dbeta2, dgamma2, corrected,
                         dtype.type(1.0 / max(cache.bn2.count, 1)), index["d_rows"], 1, 0, dh1)
            grads["conv1.w"] = self._weight_grad(rows.n_d, index["conv1"], taps1, cache.xe, c, dh1, k, dtype)
            if unit.conv1.has_bias:
                grads["conv1.b"] = self._column_sums(rows.n_d, k, 1, index["d_rows"], dh1, dh1, False, 1.0, dtype)
            dy1 = self._gemm(rows.n_e, inverse1, taps1, dh1, k, cache.w1[1], c, dtype, gate=cache.xe)
            dbeta1, dgamma1 = self._bn_gradients(cache.bn1, rows.n_e, c, hw, index["e_offset"], cache.x, dy1, dtype)
        with self._phase("scatter"):
            corrected = rows.n_d if cache.bn1.training else 0
            self._launch("bn_backward_scatter", dtype, (c, rows.n_e), rows.n_e, c, hw, index["e_offset"], cache.x,
                         cache.bn1.mean, cache.bn1.inv_std, cache.bn1.gamma, dy1, dbeta1, dgamma1, corrected,
                         dtype.type(1.0 / max(cache.bn1.count, 1)), index["e_offset"], hw, 1, dx)
            result = dx.get(queue).reshape(cache.shape)
        with self._phase("other"):
            conv1_w, conv2_w = unit.conv1.params["w"], unit.conv2.params["w"]
            unit.conv2.accumulate("w", grads["conv2.w"].get(queue).reshape(conv2_w.shape))
            unit.conv1.accumulate("w", grads["conv1.w"].get(queue).reshape(conv1_w.shape))
            for name in ("conv1", "conv2"):
                if f"{name}.b" in grads:
                    getattr(unit, name).accumulate("b", grads[f"{name}.b"].get(queue))
            unit.bn2.accumulate("gamma", dgamma2.get(queue))
            unit.bn2.accumulate("beta", dbeta2.get(queue))
            unit.bn1.accumulate("gamma", dgamma1.get(queue))
            unit.bn1.accumulate("beta", dbeta1.get(queue))
        return result

