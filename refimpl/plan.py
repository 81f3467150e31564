r"""The perforation plan: a mask turned into the integer data every convolution backend reads.

A *mask* ``M`` over a layer's output positions is boolean, (Ho, Wo) shared by the batch or
(N, Ho, Wo) per sample; ``True`` marks a position that is computed. A
:class:`PerforationPlan` derives from it, once, what every backend consumes:

* ``positions`` — the raster indices ``row * Wo + col`` of the computed positions (the *compact*
  axis of length P, padded with -1 for per-sample masks of unequal size);
* ``counts`` — how many positions each sample computes;
* ``index_map`` — for every output position, the compact index of the *nearest* computed
  position (:func:`nearest_index`), which is how ``fill="nearest"`` and implicit interpolation
  find the value to copy.

Because all backends read the same plan, they fill identically; because the plan is immutable,
its arrays can be trusted as memory offsets by compiled kernels. This module is the bottom of the
convolution stack: it imports nothing of ``refimpl`` but the argument checks.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from . import _checks

#: How the positions a plan skips are filled: a copy of the nearest computed value, or zero.
FILLS = ("nearest", "zero")
#: The dtype of every index array a backend reads (positions, counts, index maps, tables).
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
