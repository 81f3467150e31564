"""Host-side index data of the ``opencl`` backend: integer tables derived from a plan or a table.

The OpenCL kernels run every convolution as a *table convolution* (see ``opencl_backend``); the
tables they read are built here, in NumPy, once per plan or table, and kept on the device by
:class:`IndexCache` for as long as the plan (or the read-only table) lives:

* :func:`conv_tap_table` — the input pixel each kernel tap of each computed position reads;
* :func:`invert_table` — the readers of every source entry: the gather form of a scatter-add,
  which is how dX is computed without atomics;
* :func:`zero_fill_index` — each output position's compact slot, or -1, for the zero fill.
"""

from __future__ import annotations

import weakref

import numpy as np

from refimpl.conv import window_coordinates


def conv_tap_table(plan, geometry):
    """Input pixel ``iy * W + ix`` read by tap ``t = i * kw + j`` of each computed position.

    Returns int32 (B, P, kh*kw); -1 for taps in the padding and for the padding slots of
    per-sample plans.
    """
    (kh, kw), (sh, sw), (ph, pw), (h, w), (_, wo) = geometry
    position = plan.positions
    iy, ix = window_coordinates(np.maximum(position, 0), (kh, kw), (sh, sw), (ph, pw), wo)
    inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w) & (position >= 0)[..., None, None]
    table = np.where(inside, iy * w + ix, -1)
    return table.reshape(*position.shape, kh * kw).astype(np.int32)


def invert_table(table, source_size):
    """The readers of every source entry: the gather form of the table's scatter-add.

    Parameters
    ----------
    table : int array (B, R, T), -1 = reads nothing
    source_size : S

    Returns
    -------
    inverse : int32 (B, S, T*D)
        ``inverse[b, s, t*D + d]`` is the d-th output row r (ascending) with ``table[b, r, t] == s``,
        -1 when there are fewer; D is the largest number of rows reading one (source, tap) pair
        (1 for an ordinary convolution, up to R after nearest fill).
    depth : D
    """
    table = np.asarray(table)
    batch, _, taps = table.shape
    b, r, t = np.nonzero(table >= 0)  # raster order: r ascending within each (b, s, t) group
    if b.size == 0:
        return np.full((batch, source_size, taps), -1, dtype=np.int32), 1
    s = table[b, r, t].astype(np.int64)
    key = (b * source_size + s) * taps + t
    order = np.argsort(key, kind="stable")
    key = key[order]
    first = np.r_[True, key[1:] != key[:-1]]
    start = np.maximum.accumulate(np.where(first, np.arange(key.size), 0))
    rank = np.arange(key.size) - start
    depth = int(rank.max()) + 1
    inverse = np.full((batch, source_size, taps, depth), -1, dtype=np.int32)
    inverse[b[order], s[order], t[order], rank] = r[order]
    return inverse.reshape(batch, source_size, taps * depth), depth


def zero_fill_index(plan):
    """For every output position, its slot in the compact axis, or -1 (not computed): (B, Ho*Wo)."""
    ho, wo = plan.out_hw
    index = np.full((plan.batch, ho * wo), -1, dtype=np.int32)
    b, slot = np.nonzero(plan.positions >= 0)
    index[b, plan.positions[b, slot]] = slot
    return index


class IndexCache:
    """Device copies of integer data derived from a plan or a table, kept as long as that object lives.

    Keyed by identity, which is sound because what is cached is immutable: plans are
    (:class:`refimpl.plan.PerforationPlan`), and the backend interface hands over tables read-only
    over immutable memory (a writable table is copied first).
    """

    def __init__(self):
        self._by_plan = weakref.WeakKeyDictionary()
        self._by_array = {}

    def entries(self, owner):
        if isinstance(owner, np.ndarray):
            key = id(owner)
            hit = self._by_array.get(key)
            if hit is not None and hit[0]() is owner:
                return hit[1]
            store = {}
            self._by_array[key] = (weakref.ref(owner, lambda _, key=key: self._by_array.pop(key, None)), store)
            return store
        return self._by_plan.setdefault(owner, {})
