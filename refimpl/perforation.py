r"""Perforated convolution: evaluate a convolution only at the positions of a mask.

A *mask* ``M`` over output positions is boolean, (Ho, Wo) shared by the batch or (N, Ho, Wo) per
sample. The layer computes, for every computed position, exactly the value of the dense
convolution (the im2row rows of :mod:`refimpl.conv` restricted to ``M``, one GEMM for the whole
batch) and *fills* the others:

* ``fill="nearest"`` — the value of the nearest computed position (Euclidean distance on the
  (row, col) grid; ties go to the smallest raster index ``row * Wo + col``);
* ``fill="zero"`` — zero (SACT: a skipped residual is a zero residual);
* ``output="compact"`` — no fill: the (N, K, P) tensor of computed values, in raster order, which
  the next layer can read through an index table (:mod:`refimpl.implicit`).

The cost is ``(1 - r)`` of the dense cost for perforation rate ``r = 1 - |M| / (Ho Wo)``.

Backward: the compact gradient is the scatter-add of ``dY`` through the index map (nearest) or
``dY`` at the computed positions (zero); then ``dW = rowsᵀ dY_c``, ``db = Σ dY_c`` and
``dX = col2im`` of ``dY_c W`` restricted to ``M``.

The :class:`PerforationPlan` turns a mask into the integer data every backend consumes — positions,
counts and the nearest-neighbour index map — computed once, here, so that all backends fill
identically.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np

from . import _checks
from .conv import ConvGeometry, check_conv_args, conv_flops, im2row, row2im

FILLS = ("nearest", "zero")
INDEX_DTYPE = np.int32


def realised_rate(mask):
    """Fraction of output positions *not* computed: ``r = 1 - |M| / (Ho Wo)``.

    Parameters
    ----------
    mask : array of bool (Ho, Wo) or (N, Ho, Wo); per-sample masks give the mean over samples.

    Returns
    -------
    rate : float in [0, 1)
        The *realised* rate, which can differ from the rate a mask was requested with
        (kept counts are rounded, grid masks are products of rounded per-axis counts).
    """
    _check_mask_type(mask, ndims=(2, 3))
    return 1.0 - float(mask.mean())


def nearest_index(mask, tie_break="raster", rng=None):
    """Index, for every output position, of the nearest computed position in the compact list.

    Parameters
    ----------
    mask : ndarray of bool (Ho, Wo)
        Computed positions; the compact list holds them in raster order.
    tie_break : {"raster", "random"}
        Among computed positions at the same Euclidean distance, ``"raster"`` picks the one with
        the smallest raster index ``row * Wo + col`` (project choice, deterministic);
        ``"random"`` picks uniformly with ``rng`` (what the released code did).
    rng : numpy.random.Generator, required for ``tie_break="random"``

    Returns
    -------
    index_map : ndarray of int32 (Ho, Wo)
        ``index_map[y, x] = p`` such that compact position ``p`` is nearest to (y, x); computed
        positions map to themselves.

    Notes
    -----
    Each computed position gets a *priority*: its compact index (``"raster"``) or a random
    permutation of them (``"random"``); the answer is the computed position of smallest
    squared distance, and among equal distances the smallest priority. Comparing with every
    computed position costs O(Ho·Wo·P) for P computed positions — 14 s for a 256x256 map — so the search goes row by
    row instead: within one row of the mask the nearest computed columns to ``x`` are the
    closest one on the left and on the right (found by binary search), so each mask row with a
    computed position adds one O(Ho Wo) candidate sweep: O(Ho² Wo) in total. Squared distances
    are exact integers, so ties are real ties.
    """
    _checks.choice(tie_break, "tie_break", {"raster", "random"})
    if tie_break == "random":
        _checks.generator(rng)
    _check_mask_type(mask, ndims=(2,))
    _checks.bool_mask(mask, "mask", mask.shape)
    ho, wo = mask.shape
    n_kept = int(mask.sum())
    priority = rng.permutation(n_kept) if tie_break == "random" else np.arange(n_kept)
    if n_kept == ho * wo:  # every position is its own nearest (distance 0 is never tied)
        return np.arange(ho * wo, dtype=INDEX_DTYPE).reshape(ho, wo)
    compact_index = (np.cumsum(mask.ravel()) - 1).reshape(ho, wo)  # valid where mask is True
    cols, rows = np.arange(wo), np.arange(ho)
    best_d2 = np.full((ho, wo), np.iinfo(np.int64).max, dtype=np.int64)
    best_priority = np.full((ho, wo), n_kept, dtype=np.int64)
    index_map = np.zeros((ho, wo), dtype=INDEX_DTYPE)
    for r in np.flatnonzero(mask.any(axis=1)):
        kept_cols = np.flatnonzero(mask[r])
        right = np.minimum(np.searchsorted(kept_cols, cols), kept_cols.size - 1)  # first kept >= x
        left = np.maximum(right - (kept_cols[right] > cols), 0)  # last kept <= x (if any)
        candidates = []
        for side in (left, right):
            c = kept_cols[side]
            p = compact_index[r, c]
            candidates.append((np.abs(c - cols), p, priority[p]))
        (dl, pl, ql), (dr, pr, qr) = candidates
        take_left = (dl < dr) | ((dl == dr) & (ql <= qr))
        dc, p, q = np.where(take_left, dl, dr), np.where(take_left, pl, pr), np.where(take_left, ql, qr)
        d2 = (rows[:, None] - r) ** 2 + (dc**2)[None, :]
        better = (d2 < best_d2) | ((d2 == best_d2) & (q[None, :] < best_priority))
        best_d2 = np.where(better, d2, best_d2)
        best_priority = np.where(better, q[None, :], best_priority)
        index_map = np.where(better, p[None, :], index_map).astype(INDEX_DTYPE)
    return index_map


def _check_mask_type(mask, ndims):
    """TypeError for a non-array or non-boolean mask, ValueError for a wrong number of axes."""
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"mask must be a boolean numpy array, got {type(mask).__name__}")
    if mask.dtype != np.bool_:
        raise TypeError(f"mask must have dtype bool, got {mask.dtype}")
    if mask.ndim not in ndims:
        shapes = " or ".join({2: "(Ho, Wo)", 3: "(N, Ho, Wo)"}[d] for d in ndims)
        raise ValueError(f"mask must have shape {shapes}, got shape {mask.shape}")


def frozen_copy(array):
    """A read-only copy of ``array`` whose memory is an immutable ``bytes`` object.

    ``flags.writeable = False`` alone can be switched back on by anyone holding the array; an
    array over ``bytes`` cannot (nor can any view of it), so data derived from it stays valid.
    """
    array = np.ascontiguousarray(array)
    if array.size == 0:
        frozen = array.copy()
        frozen.flags.writeable = False
        return frozen
    return np.frombuffer(array.tobytes(), dtype=array.dtype).reshape(array.shape)


def is_frozen(array):
    """Whether ``array`` was made by :func:`frozen_copy` (its memory chain ends in ``bytes``)."""
    base = array
    while isinstance(base, np.ndarray):
        if base.flags.writeable:
            return False
        base = base.base
    return isinstance(base, bytes)


class PerforationPlan:
    """A mask turned into the integer arrays that every convolution backend consumes.

    A plan is immutable: it keeps its own copy of the mask, every array it holds is read-only
    (over immutable memory, see :func:`frozen_copy`) and attributes cannot be reassigned, so the
    positions, counts and index map always describe the same mask. Backends rely on this: they
    read ``positions`` and ``index_map`` as memory offsets.

    Parameters
    ----------
    mask : ndarray of bool, (Ho, Wo) shared or (N, Ho, Wo) per sample
    tie_break, rng : see :func:`nearest_index`

    Attributes
    ----------
    mask : ndarray of bool (B, Ho, Wo)
        ``B = 1`` for a shared mask, ``N`` for per-sample masks.
    shared : bool
    out_hw : (Ho, Wo)
    positions : ndarray of int32 (B, P)
        Raster indices ``row * Wo + col`` of the computed positions of each sample, ascending,
        padded with -1 to the largest count ``P`` (per-sample masks differ in size).
    counts : ndarray of int32 (B,)
        Number of computed positions of each sample.
    index_map : ndarray of int32 (B, Ho, Wo)
        Nearest computed position, as an index into the compact axis. Derived from the plan's own
        read-only mask on first use (per-sample plans of zero-fill layers never need it, and it
        costs O(Ho² Wo) per sample), so it cannot disagree with ``positions``.
    full : bool
        Every position is computed (the layer is the dense convolution).
    """

    __slots__ = ("mask", "shared", "out_hw", "counts", "positions", "full", "tie_break", "_rng", "_index_map",
                 "__weakref__")

    def __init__(self, mask, tie_break="raster", rng=None):
        _check_mask_type(mask, ndims=(2, 3))
        _checks.choice(tie_break, "tie_break", {"raster", "random"})
        if tie_break == "random":
            _checks.generator(rng)
        shared = mask.ndim == 2
        # A copy: the plan's integer arrays are derived from the mask, so a caller editing their
        # array afterwards must not change the plan's mask behind its back.
        own = np.array(mask[None] if shared else mask, dtype=bool, order="C", copy=True)
        _checks.bool_mask(own, "mask", own.shape[1:])
        flat = own.reshape(own.shape[0], -1)
        counts = flat.sum(axis=1).astype(INDEX_DTYPE)
        positions = np.full((flat.shape[0], int(counts.max())), -1, dtype=INDEX_DTYPE)
        for b, row in enumerate(flat):
            kept = np.flatnonzero(row)
            positions[b, : kept.size] = kept
        init = object.__setattr__
        init(self, "mask", frozen_copy(own))
        init(self, "shared", shared)
        init(self, "out_hw", tuple(int(v) for v in own.shape[1:]))
        init(self, "counts", frozen_copy(counts))
        init(self, "positions", frozen_copy(positions))
        init(self, "full", bool(flat.all()))
        init(self, "tie_break", tie_break)
        init(self, "_rng", rng)
        init(self, "_index_map", None)
        if tie_break == "random":
            _ = self.index_map  # draw the ties now, so the generator is consumed at a known time

    def __setattr__(self, name, value):
        # The plan's own fields are fixed; a subclass may keep state of its own (a plan with a
        # different fill map, say), whose index map the backends then check before use.
        if name in _PLAN_FIELDS:
            raise AttributeError(f"PerforationPlan is immutable (cannot set {name!r}); build a new plan from a mask")
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        if name in _PLAN_FIELDS:
            raise AttributeError(f"PerforationPlan is immutable (cannot delete {name!r})")
        object.__delattr__(self, name)

    @classmethod
    def dense(cls, out_hw):
        """The plan of the ordinary convolution: every position computed (one shared plan per size)."""
        return _dense_plan(tuple(_checks.positive_pair(out_hw, "out_hw")))

    @property
    def index_map(self):
        if self._index_map is None:
            index_map = np.stack([nearest_index(m, self.tie_break, self._rng) for m in self.mask])
            object.__setattr__(self, "_index_map", frozen_copy(index_map))
            object.__setattr__(self, "_rng", None)  # consumed: the map is fixed from now on
        return self._index_map

    @property
    def batch(self):
        """B: 1 for a shared mask, N for per-sample masks."""
        return self.mask.shape[0]

    @property
    def width(self):
        """P: the size of the compact axis."""
        return self.positions.shape[1]

    @property
    def rate(self):
        """Realised perforation rate (mean over samples)."""
        return realised_rate(self.mask)

    def check_batch(self, n, name="mask"):
        """Raise unless this plan applies to a batch of ``n`` samples."""
        if not self.shared and self.batch != n:
            raise ValueError(f"{name} is per-sample for {self.batch} samples but the batch has {n}")

    def computed_positions(self, n):
        """Total computed output positions over a batch of ``n`` samples."""
        return int(self.counts[0]) * n if self.shared else int(self.counts.sum())

    def rows(self, n):
        """The computed (sample, slot, position) triples in sample-major order.

        Returns three int arrays of length ``T = computed_positions(n)``: the sample index, the
        slot in the compact axis, and the raster position. This is the row order of the
        batched GEMM.
        """
        self.check_batch(n)
        positions = np.broadcast_to(self.positions, (n, self.width))
        sample, slot = np.nonzero(positions >= 0)
        return sample, slot, positions[sample, slot]

    def __repr__(self):
        kind = "shared" if self.shared else f"per-sample x{self.batch}"
        return f"<PerforationPlan {kind} {self.out_hw[0]}x{self.out_hw[1]}, rate {self.rate:.3f}>"


_PLAN_FIELDS = frozenset(PerforationPlan.__slots__) | {"index_map"}


@lru_cache(maxsize=64)
def _dense_plan(out_hw):
    return PerforationPlan(np.ones(out_hw, dtype=bool))


def as_plan(mask, out_hw, batch, name="mask"):
    """Accept a boolean mask, a :class:`PerforationPlan` or None; check it fits (Ho, Wo) and the batch.

    Returns
    -------
    plan : PerforationPlan (the dense plan for ``mask=None``)
    """
    if mask is None:
        return PerforationPlan.dense(out_hw)
    plan = mask if isinstance(mask, PerforationPlan) else None
    if plan is None:
        _checks.bool_mask(mask, name, out_hw, batch)
        plan = PerforationPlan(mask)
    if plan.out_hw != tuple(out_hw):
        raise ValueError(f"{name} is for outputs of size {plan.out_hw}, but this convolution gives {tuple(out_hw)}")
    plan.check_batch(batch, name)
    return plan


# ---------------------------------------------------------------------------------------------
# The reference kernels (what the NumPy backend runs; fast backends must agree with these)
# ---------------------------------------------------------------------------------------------


class CompactConvCache(NamedTuple):
    """What :func:`compact_conv_backward` needs."""

    rows: np.ndarray  # (T, C*kh*kw) gathered input windows
    w: np.ndarray  # (K, C, kh, kw)
    row_index: tuple  # (sample, slot, position), each (T,)
    x_shape: tuple
    width: int  # P, the compact axis
    geometry: ConvGeometry


def _window_coordinates(position, geometry):
    """Padded-input coordinates ``(iy, ix)``, each (T, kh, kw), of the window of each raster output position."""
    (kh, kw), (sh, sw), (_, wo) = geometry.kernel, geometry.stride, geometry.out_hw
    oy, ox = np.divmod(position, wo)
    iy = oy[:, None, None] * sh + np.arange(kh)[None, :, None]
    ix = ox[:, None, None] * sw + np.arange(kw)[None, None, :]
    return np.broadcast_arrays(iy, ix)


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
    iy, ix = _window_coordinates(position, geometry)
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
    iy, ix = _window_coordinates(position, cache.geometry)
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
# Public functions: validate, then run on a backend
# ---------------------------------------------------------------------------------------------


class PerforatedConvCache(NamedTuple):
    """What :func:`perforated_conv2d_backward` needs: the backend, its cache, the plan and fill."""

    backend: Any
    conv_cache: Any
    plan: PerforationPlan
    fill: str | None  # None for output="compact"
    out_shape: tuple | None = None  # forward output shape, to check the upstream gradient
    dtype: Any = None


def perforated_conv2d_forward(x, w, b=None, mask=None, stride=1, padding=0, fill="nearest",
                              output="dense", backend=None):
    """Perforated convolution.

    Parameters
    ----------
    x : ndarray (N, C, H, W), float32 or float64
    w : ndarray (K, C, kh, kw)
    b : ndarray (K,) or None
    mask : ndarray of bool (Ho, Wo) or (N, Ho, Wo), or PerforationPlan, or None (dense)
    stride, padding : int or pair
    fill : {"nearest", "zero"}
        How the dense output is completed (ignored for ``output="compact"``).
    output : {"dense", "compact"}
        ``"dense"`` gives (N, K, Ho, Wo); ``"compact"`` gives (N, K, P) without filling.
    backend : ConvBackend, name, or None for the NumPy reference

    Returns
    -------
    out : ndarray (N, K, Ho, Wo) or (N, K, P)
    cache : PerforatedConvCache
    """
    from .backend import get_backend

    x, w, b, geometry = check_conv_args(x, w, b, stride, padding)
    _checks.choice(fill, "fill", set(FILLS))
    _checks.choice(output, "output", {"dense", "compact"})
    plan = as_plan(mask, geometry.out_hw, x.shape[0])
    backend = get_backend(backend)
    compact, conv_cache = backend.conv_forward(x, w, b, plan, geometry)
    if output == "compact":
        return compact, PerforatedConvCache(backend, conv_cache, plan, None, compact.shape, x.dtype)
    dense = backend.fill_forward(compact, plan, fill)
    return dense, PerforatedConvCache(backend, conv_cache, plan, fill, dense.shape, x.dtype)


def perforated_conv2d_backward(dout, cache):
    """Gradients of :func:`perforated_conv2d_forward`.

    Parameters
    ----------
    dout : ndarray, the forward output's shape: (N, K, Ho, Wo), or (N, K, P) for ``output="compact"``
    cache : PerforatedConvCache

    Returns
    -------
    dx : (N, C, H, W), dw : (K, C, kh, kw), db : (K,)
        With nearest fill the compact gradient is the scatter-add of ``dout`` through the index
        map; with zero fill the filled positions' gradient is dropped.
    """
    backend = cache.backend
    if cache.out_shape is not None:
        dout = _checks.gradient(dout, "dout", cache.out_shape, cache.dtype)
    dcompact = dout if cache.fill is None else backend.fill_backward(dout, cache.plan, cache.fill)
    return backend.conv_backward(dcompact, cache.conv_cache)


def perforated_conv_flops(plan, batch, in_channels, out_channels, kernel):
    """FLOPs actually spent (SPEC §1): ``2 · C · kh · kw · K`` per computed position over the batch.

    ``plan.computed_positions(batch)`` positions: ``|M| · N`` for a shared mask, ``Σ_n |M_n|``
    for per-sample masks. Returns a Python int.
    """
    return conv_flops(plan.computed_positions(batch), in_channels, out_channels, kernel)
