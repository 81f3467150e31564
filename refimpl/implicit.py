r"""Implicit interpolation: the next layer reads the compact tensor through an index table.

A perforated layer with nearest fill copies values; the copies never have to exist. If the
*next* spatial layer (a convolution or a pooling) is told, for each of its own output positions
``o`` and kernel taps ``t = (i, j)``, *which compact entry* it would have read,

.. math::

    \text{table}[n, o, t] = \text{index\_map}[n, s_h y_o - p_h + i,\; s_w x_o - p_w + j]
    \quad(-1 \text{ where the tap falls in the padding}),

it can compute directly from the (N, C, P) compact tensor. The same *table convolution*

.. math::

    \text{out}[n, k, o] = b_k + \sum_{c, t} w[k, c, t]\; \text{src}[n, c, \text{table}[n, o, t]]

also describes the ordinary convolution (``src`` = the input flattened over H·W, ``table`` = the
pixel each tap reads), which is how the tests tie the two together. Memory saved: the (N, C, Ho·Wo)
filled tensor is replaced by (N, C, P) plus an int table shared by all channels.

Pooling reads the same way. Max pooling may treat duplicate indices once or many times (the max
is the same); average pooling counts duplicates, exactly as if the filled tensor existed. Padding
taps are excluded from both (max over real values, mean over in-bounds taps).

This module builds the tables (:func:`compose_index_table`) and holds the public functions, which
validate and dispatch to a backend; the NumPy kernels of the table convolution and pooling are in
:mod:`refimpl.numpy_kernels` (and importable from here).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from . import _checks
from .backend import get_backend
from .backend_checks import POOL_MODES
from .conv import conv_output_shape, window_coordinates
from .numpy_kernels import (  # noqa: F401  (re-exported: importable from here as before)
    TableConvCache,
    TablePoolCache,
    table_conv_backward,
    table_conv_forward,
    table_pool_backward,
    table_pool_forward,
)
from .plan import INDEX_DTYPE, PerforationPlan, frozen_copy
from .pooling import check_pool_padding


def compose_index_table(index_map, kernel, stride=1, padding=0, out_positions=None):
    """Table of compact indices read by a following layer.

    Parameters
    ----------
    index_map : ndarray of int (B, H, W)
        For every input position of the following layer, where its value lives in the source
        (``PerforationPlan.index_map`` for a compact source; ``arange(H*W)`` for a dense one).
    kernel, stride, padding : the following layer's window
    out_positions : ndarray of int (R,), optional
        Raster indices of the following layer's outputs to compute (all when omitted).

    Returns
    -------
    table : ndarray of int32 (B, R, kh*kw)
        Source index read by tap ``t = i * kw + j`` of output ``o``; -1 for padding. Read-only.
    """
    if not isinstance(index_map, np.ndarray) or not np.issubdtype(index_map.dtype, np.integer):
        raise TypeError(f"index_map must be an integer numpy array, got {getattr(index_map, 'dtype', type(index_map).__name__)}")
    if index_map.ndim not in (2, 3):
        raise ValueError(f"index_map must have shape (H, W) or (B, H, W), got shape {index_map.shape}")
    if index_map.size and index_map.min() < 0:
        raise ValueError(f"index_map must be non-negative (it indexes the source), got minimum {index_map.min()}")
    if index_map.ndim == 2:
        index_map = index_map[None]
    (kh, kw) = _checks.positive_pair(kernel, "kernel")
    (sh, sw) = _checks.positive_pair(stride, "stride")
    (ph, pw) = _checks.as_pair(padding, "padding")
    b, h, w = index_map.shape
    ho, wo = conv_output_shape((h, w), (kh, kw), (sh, sw), (ph, pw))
    if out_positions is None:
        out_positions = np.arange(ho * wo)
    out_positions = np.asarray(out_positions)
    if out_positions.ndim != 1 or not np.issubdtype(out_positions.dtype, np.integer):
        raise TypeError(f"out_positions must be a 1-D integer array, got {out_positions.dtype} "
                        f"with shape {out_positions.shape}")
    if out_positions.size and not (0 <= out_positions.min() and out_positions.max() < ho * wo):
        raise ValueError(f"out_positions must be raster indices in [0, {ho * wo}), got values in "
                         f"[{out_positions.min()}, {out_positions.max()}]")
    iy, ix = window_coordinates(out_positions, (kh, kw), (sh, sw), (ph, pw), wo)  # (R, kh, kw) each
    inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    table = index_map[:, np.clip(iy, 0, h - 1), np.clip(ix, 0, w - 1)]  # (B, R, kh, kw)
    table = np.where(inside[None], table, -1)
    # Read-only over immutable memory: backends may cache it by identity and read it as offsets.
    return frozen_copy(table.reshape(b, len(out_positions), kh * kw).astype(INDEX_DTYPE))


def dense_index_map(in_hw):
    """The identity index map of an unperforated input: position (y, x) lives at ``y * W + x``."""
    h, w = in_hw
    return frozen_copy(np.arange(h * w, dtype=INDEX_DTYPE).reshape(1, h, w))


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


class ImplicitCache(NamedTuple):
    """What the implicit backward functions need: the backend, its cache, the output size."""

    backend: Any
    inner: Any
    out_hw: tuple
    out_shape: tuple | None = None  # forward output (N, K, Ho, Wo), to check the upstream gradient
    dtype: Any = None


def _check_compact(compact, plan):
    """Validate a compact tensor (N, C, P) against its plan; return it C-contiguous."""
    if not isinstance(plan, PerforationPlan):
        raise TypeError(f"plan must be a PerforationPlan, got {type(plan).__name__}")
    compact = _checks.nonempty(_checks.float_array(compact, "compact", ndim=3), "compact")
    plan.check_batch(compact.shape[0], "plan")
    if compact.shape[2] != plan.width:
        raise ValueError(f"compact must have {plan.width} entries on its last axis (the plan's P), got {compact.shape[2]}")
    return compact


def implicit_conv2d_forward(compact, plan, w, b=None, stride=1, padding=0, backend=None):
    """A convolution whose input is a perforated layer's compact output, read through an index table.

    Equal to ``conv2d(fill_forward(compact, plan, "nearest"), w, b, stride, padding)`` without
    ever forming the filled tensor.

    Parameters
    ----------
    compact : ndarray (N, C, P), the ``output="compact"`` result of a perforated convolution
    plan : PerforationPlan of that perforated convolution (its ``index_map`` is used)
    w : ndarray (K, C, kh, kw); b : ndarray (K,) or None
    stride, padding : this convolution's
    backend : ConvBackend, name, or None for the NumPy reference

    Returns
    -------
    out : ndarray (N, K, Ho, Wo)
    cache : ImplicitCache
    """
    compact = _check_compact(compact, plan)
    w = _checks.nonempty(_checks.float_array(w, "w", ndim=4), "w")
    b = np.zeros(w.shape[0], dtype=w.dtype) if b is None else _checks.float_array(b, "b", ndim=1)
    _checks.same_dtype([compact, w, b], ["compact", "w", "b"])
    if w.shape[1] != compact.shape[1]:
        raise ValueError(f"w has {w.shape[1]} input channels but compact has {compact.shape[1]}")
    if b.shape != (w.shape[0],):
        raise ValueError(f"b must have shape ({w.shape[0]},), got {b.shape}")
    out_hw = conv_output_shape(plan.out_hw, w.shape[2:], stride, padding)
    table = compose_index_table(plan.index_map, w.shape[2:], stride, padding)
    backend = get_backend(backend)
    out, inner = backend.table_conv_forward(compact, table, w, b)
    out = out.reshape(*out.shape[:2], *out_hw)
    return out, ImplicitCache(backend, inner, out_hw, out.shape, compact.dtype)


def implicit_conv2d_backward(dout, cache):
    """Gradients ``(dcompact, dw, db)`` of :func:`implicit_conv2d_forward`.

    ``dout`` (N, K, Ho, Wo) gives ``dcompact`` (N, C, P): the scatter-add through the index
    table, so a compact entry copied to many filled positions collects all their gradients.
    """
    if cache.out_shape is not None:
        dout = _checks.gradient(dout, "dout", cache.out_shape, cache.dtype)
    n, k = dout.shape[:2]
    return cache.backend.table_conv_backward(np.ascontiguousarray(dout).reshape(n, k, -1), cache.inner)


def implicit_pool2d_forward(compact, plan, mode="max", size=2, stride=None, padding=0, backend=None):
    """Max or average pooling of a compact tensor through an index table.

    Equal to ``pool2d_forward(fill_forward(compact, plan, "nearest"), mode, size, stride,
    padding)`` without forming the filled tensor. Padding taps are ignored (max over real
    values; average over in-bounds taps, duplicated sources counted once per tap).

    Parameters
    ----------
    compact : ndarray (N, C, P), the ``output="compact"`` result of a perforated convolution
    plan : PerforationPlan of that perforated convolution
    mode : {"max", "avg"}
    size : int or pair, the pooling window
    stride : int or pair, or None for ``size``
    padding : int or pair, at most half the window
    backend : ConvBackend, name, or None for the NumPy reference

    Returns
    -------
    out : ndarray (N, C, Ho, Wo)
    cache : ImplicitCache
    """
    compact = _check_compact(compact, plan)
    _checks.choice(mode, "mode", set(POOL_MODES))
    size = _checks.positive_pair(size, "size")
    stride = size if stride is None else _checks.positive_pair(stride, "stride")
    padding = _checks.as_pair(padding, "padding")
    check_pool_padding(size, padding)
    out_hw = conv_output_shape(plan.out_hw, size, stride, padding)
    table = compose_index_table(plan.index_map, size, stride, padding)
    backend = get_backend(backend)
    out, inner = backend.table_pool_forward(compact, table, mode)
    out = out.reshape(*out.shape[:2], *out_hw)
    return out, ImplicitCache(backend, inner, out_hw, out.shape, compact.dtype)


def implicit_pool2d_backward(dout, cache):
    """Gradient ``dcompact`` (N, C, P) of :func:`implicit_pool2d_forward` from ``dout`` (N, C, Ho, Wo)."""
    if cache.out_shape is not None:
        dout = _checks.gradient(dout, "dout", cache.out_shape, cache.dtype)
    n, c = dout.shape[:2]
    return cache.backend.table_pool_backward(np.ascontiguousarray(dout).reshape(n, c, -1), cache.inner)


def implicit_memory_saved(plan, batch, channels, itemsize):
    """Bytes of activations not stored: the filled (N, C, Ho·Wo) tensor minus compact (N, C, P) and index map.

    ``batch`` N, ``channels`` C, ``itemsize`` bytes per value (4 for float32, 8 for float64).

    The table of the following layer is not counted here (it replaces nothing of the dense path
    either: a dense layer computes the same addresses on the fly).
    """
    ho, wo = plan.out_hw
    dense = batch * channels * ho * wo * itemsize
    compact = batch * channels * plan.width * itemsize
    index = plan.index_map.size * plan.index_map.itemsize
    return dense - compact - index
