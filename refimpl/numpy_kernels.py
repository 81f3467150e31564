r"""The NumPy reference kernels: what the ``numpy`` backend runs, and what fast backends must match.

Pure array code, one function per operation of the backend interface
(:class:`refimpl.backend.ConvBackend`), each ``*_forward`` returning ``(out, cache)`` and each
``*_backward`` taking ``(dout, cache)``. They assume checked arguments: the backend interface
validates before it calls them (:mod:`refimpl.backend_checks`), and the public functions of
:mod:`refimpl.perforation` and :mod:`refimpl.implicit` validate before they reach a backend.

* **Perforated convolution to the compact tensor** — im2row restricted to the plan's positions
  and one GEMM for the whole batch: ``compact = rows @ Wᵀ + b`` with ``rows`` the (T, C·kh·kw)
  receptive fields of the T computed positions; backward ``dW = dYᵀ rows``, ``db = Σ dY``,
  ``dX = col2im(dY W)`` over the computed windows.
* **Fills** — compact (N, K, P) to dense (N, K, Ho, Wo) through the plan's index map (nearest)
  or its positions (zero), and their adjoints.
* **Table convolution and pooling** — the same GEMM, reading its input through an int32 index
  table (B, R, T) in which -1 is zero padding (implicit interpolation).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .conv import ConvGeometry, im2row, row2im, window_coordinates


# ---------------------------------------------------------------------------------------------
# Perforated convolution and fills
# ---------------------------------------------------------------------------------------------


class CompactConvCache(NamedTuple):
    """What :func:`compact_conv_backward` needs."""

    rows: np.ndarray  # (T, C*kh*kw) gathered input windows
    w: np.ndarray  # (K, C, kh, kw)
    row_index: tuple  # (sample, slot, position), each (T,)
    x_shape: tuple
    width: int  # P, the compact axis
    geometry: ConvGeometry


def _padded_window_coordinates(position, geometry):
    """Padded-input coordinates ``(iy, ix)``, each (T, kh, kw), of the window of each raster output position."""
    return window_coordinates(position, geometry.kernel, geometry.stride, (0, 0), geometry.out_hw[1])


def gather_rows(x, plan, geometry):
    """im2row restricted to the plan: one row of C·kh·kw input values per computed position.

    Parameters
    ----------
    x : ndarray (N, C, H, W), validated
    plan : PerforationPlan for N samples
    geometry : ConvGeometry

    Returns
    -------
    rows : ndarray (T, C*kh*kw), row order of ``plan.rows(N)``
    row_index : (sample, slot, position)
    """
    sample, slot, position = plan.rows(x.shape[0])
    if plan.full:
        # Every position, in (sample, raster) order: exactly the dense im2row, which strided
        # views build far faster than a fancy-index gather.
        return im2row(x, geometry), (sample, slot, position)
    ph, pw = geometry.padding
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    iy, ix = _padded_window_coordinates(position, geometry)
    windows = xp[sample[:, None, None], :, iy, ix]  # (T, kh, kw, C): advanced indices first
    rows = windows.transpose(0, 3, 1, 2).reshape(sample.size, -1)
    return rows, (sample, slot, position)


def compact_conv_forward(x, w, b, plan, geometry):
    """Perforated convolution to the compact tensor: one GEMM over the rows of every image.

    ``compact = gather_rows(x) @ w.reshape(K, -1).T + b`` — the (T, C·kh·kw) row matrix of all
    T computed positions of the batch times the (C·kh·kw, K) kernel matrix, so the cost is
    ``(1 - r)`` of the dense GEMM.

    Parameters
    ----------
    x : ndarray (N, C, H, W); w : ndarray (K, C, kh, kw); b : ndarray (K,) — validated, one dtype
    plan : PerforationPlan for N samples
    geometry : ConvGeometry

    Returns
    -------
    compact : ndarray (N, K, P)
        ``compact[n, :, p]`` is the output at raster position ``plan.positions[n, p]``; slots past
        ``plan.counts[n]`` (per-sample masks of unequal size) are 0.
    cache : CompactConvCache
    """
    rows, row_index = gather_rows(x, plan, geometry)
    k = w.shape[0]
    out_rows = rows @ w.reshape(k, -1).T + b  # (T, K)
    compact = np.zeros((x.shape[0], k, plan.width), dtype=x.dtype)
    sample, slot, _ = row_index
    compact[sample, :, slot] = out_rows
    return compact, CompactConvCache(rows, w, row_index, x.shape, plan.width, geometry)


def compact_conv_backward(dcompact, cache):
    """Gradients of :func:`compact_conv_forward` from the compact gradient ``dcompact`` (N, K, P).

    With ``dY`` the (T, K) gradients of the computed rows: ``dW = dYᵀ · rows``, ``db = Σ dY``,
    ``dX = col2im(dY · W)`` restricted to the computed windows. Padded slots are never read.

    Returns
    -------
    dx : (N, C, H, W), dw : (K, C, kh, kw), db : (K,)
    """
    sample, slot, position = cache.row_index
    k = cache.w.shape[0]
    dy = dcompact[sample, :, slot]  # (T, K)
    dw = (dy.T @ cache.rows).reshape(cache.w.shape)
    db = dy.sum(axis=0)
    drows = (dy @ cache.w.reshape(k, -1)).reshape(sample.size, *cache.w.shape[1:])  # (T, C, kh, kw)
    n, c, h, wd = cache.x_shape
    ho, wo = cache.geometry.out_hw
    if sample.size == n * ho * wo:  # every position computed: the dense adjoint, strided slices
        return row2im(drows.reshape(sample.size, -1), cache.x_shape, cache.geometry), dw, db
    (kh, kw), (ph, pw) = cache.geometry.kernel, cache.geometry.padding
    dxp = np.zeros((n, c, h + 2 * ph, wd + 2 * pw), dtype=dcompact.dtype)
    iy, ix = _padded_window_coordinates(position, cache.geometry)
    for i in range(kh):
        for j in range(kw):
            # For one kernel offset, distinct (sample, position) rows read distinct pixels,
            # so this fancy-index += never drops a duplicate.
            dxp[sample, :, iy[:, i, j], ix[:, i, j]] += drows[:, :, i, j]
    return dxp[:, :, ph : ph + h, pw : pw + wd], dw, db


def fill_forward(compact, plan, fill):
    """Dense output (N, K, Ho, Wo) from the compact tensor (N, K, P).

    ``fill="nearest"``: ``dense[n, k, y, x] = compact[n, k, index_map[n, y, x]]`` (exact copies);
    ``fill="zero"``: the computed positions from ``compact``, 0 elsewhere.
    """
    n, k, _ = compact.shape
    ho, wo = plan.out_hw
    if fill == "nearest":
        index = np.broadcast_to(plan.index_map.reshape(plan.batch, 1, ho * wo), (n, 1, ho * wo))
        dense = np.take_along_axis(compact, index, axis=2)
    else:
        dense = np.zeros((n, k, ho * wo), dtype=compact.dtype)
        sample, slot, position = plan.rows(n)
        dense[sample, :, position] = compact[sample, :, slot]
    return dense.reshape(n, k, ho, wo)


def fill_backward(ddense, plan, fill):
    """Compact gradient (N, K, P) from the dense one ``ddense`` (N, K, Ho, Wo): the adjoint of :func:`fill_forward`.

    ``"nearest"``: ``dcompact[n, k, p] = Σ_{(y, x): index_map[n, y, x] = p} ddense[n, k, y, x]``
    (the scatter-add through the index map); ``"zero"``: ``ddense`` at the computed positions
    (filled positions are constants, their gradient is dropped).
    """
    n, k, ho, wo = ddense.shape
    flat = ddense.reshape(n, k, ho * wo)
    dcompact = np.zeros((n, k, plan.width), dtype=ddense.dtype)
    if fill == "nearest":
        index = np.broadcast_to(plan.index_map.reshape(plan.batch, ho * wo), (n, ho * wo))
        for sample in range(n):  # scatter-add: many positions copy one source
            np.add.at(dcompact[sample].T, index[sample], flat[sample].T)
    else:
        sample, slot, position = plan.rows(n)
        dcompact[sample, :, slot] = flat[sample, :, position]
    return dcompact


# ---------------------------------------------------------------------------------------------
# Convolution and pooling through an index table
# ---------------------------------------------------------------------------------------------


def _gather(src, table):
    """``src[n, c, table[n, r, t]]`` with 0 where the table says -1: shape (N, C, R, T)."""
    n, c, s = src.shape
    padded = np.concatenate([src, np.zeros((n, c, 1), dtype=src.dtype)], axis=2)
    safe = np.where(table < 0, s, table)  # -1 reads the appended zero
    flat = np.broadcast_to(safe.reshape(safe.shape[0], 1, -1), (n, 1, safe[0].size))
    return np.take_along_axis(padded, flat, axis=2).reshape(n, c, *table.shape[1:])


def _scatter_add(values, table, source_size):
    """Adjoint of :func:`_gather`: add ``values`` (N, C, R, T) into (N, C, S) at the table's indices."""
    n, c = values.shape[:2]
    out = np.zeros((n, c, source_size + 1), dtype=values.dtype)
    safe = np.where(table < 0, source_size, table)
    safe = np.broadcast_to(safe, (n, *table.shape[1:])).reshape(n, -1)
    flat = values.reshape(n, c, -1)
    for sample in range(n):  # duplicates are the point here (nearest fill), so add.at
        np.add.at(out[sample].T, safe[sample], flat[sample].T)
    return out[:, :, :source_size]


class TableConvCache(NamedTuple):
    """What :func:`table_conv_backward` needs."""

    rows: np.ndarray  # (N*R, C*T)
    w: np.ndarray  # (K, C, kh, kw)
    table: np.ndarray  # (B, R, T)
    src_shape: tuple


def table_conv_forward(src, table, w, b):
    """Convolution that reads its input through an index table.

    Parameters
    ----------
    src : ndarray (N, C, S)
    table : ndarray of int32 (B, R, T), B in {1, N}, T = kh*kw, -1 = zero padding
    w : ndarray (K, C, kh, kw)
    b : ndarray (K,)

    Returns
    -------
    out : ndarray (N, K, R)
    cache : TableConvCache
    """
    n, c, _ = src.shape
    k = w.shape[0]
    gathered = _gather(src, table)  # (N, C, R, T)
    r = table.shape[1]
    rows = gathered.transpose(0, 2, 1, 3).reshape(n * r, -1)
    out = (rows @ w.reshape(k, -1).T + b).reshape(n, r, k).transpose(0, 2, 1)
    return np.ascontiguousarray(out), TableConvCache(rows, w, table, src.shape)


def table_conv_backward(dout, cache):
    """Gradients ``(dsrc, dw, db)`` of :func:`table_conv_forward` from ``dout`` (N, K, R).

    ``dsrc`` (N, C, S) is the scatter-add of the row gradients through the table (duplicate
    indices accumulate; -1 taps are dropped).
    """
    n, c, s = cache.src_shape
    k = cache.w.shape[0]
    r, t = cache.table.shape[1:]
    dy = dout.transpose(0, 2, 1).reshape(n * r, k)
    dw = (dy.T @ cache.rows).reshape(cache.w.shape)
    db = dy.sum(axis=0)
    drows = (dy @ cache.w.reshape(k, -1)).reshape(n, r, c, t).transpose(0, 2, 1, 3)
    return _scatter_add(drows, cache.table, s), dw, db


class TablePoolCache(NamedTuple):
    """What :func:`table_pool_backward` needs."""

    mode: str
    table: np.ndarray  # (B, R, T)
    src_shape: tuple
    weights: np.ndarray  # (N, C, R, T): d out / d gathered tap


def table_pool_forward(src, table, mode):
    """Max or average pooling that reads through an index table; -1 taps are padding (ignored).

    Parameters
    ----------
    src : ndarray (N, C, S)
    table : ndarray of int32 (B, R, T), B in {1, N}; every row holds at least one tap >= 0
    mode : {"max", "avg"}

    Returns
    -------
    out : ndarray (N, C, R)
        ``max_t src[n, c, table[n, r, t]]`` or ``mean_t`` over the taps ``>= 0`` (duplicates
        counted, as if the filled tensor existed). Max ties go to the first tap.
    cache : TablePoolCache
    """
    gathered = _gather(src, table)  # (N, C, R, T)
    valid = np.broadcast_to((table >= 0)[:, None], gathered.shape)
    if mode == "max":
        masked = np.where(valid, gathered, -np.inf)
        first = np.argmax(masked, axis=3)
        out = np.take_along_axis(gathered, first[..., None], axis=3)[..., 0]
        weights = np.zeros_like(gathered)
        np.put_along_axis(weights, first[..., None], 1.0, axis=3)
    else:
        count = valid.sum(axis=3, keepdims=True)
        weights = valid / count
        out = (gathered * weights).sum(axis=3)
    return out.astype(src.dtype), TablePoolCache(mode, table, src.shape, weights.astype(src.dtype))


def table_pool_backward(dout, cache):
    """Gradient ``dsrc`` (N, C, S) of :func:`table_pool_forward` from ``dout`` (N, C, R).

    Max: each output's gradient goes to the source of its first maximal tap; average: ``1/count``
    of it to every valid tap's source (a duplicated source receives it once per tap).
    """
    return _scatter_add(dout[..., None] * cache.weights, cache.table, cache.src_shape[2])
