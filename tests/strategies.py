"""Every Hypothesis strategy of the project, in one module.

Array *values* come from a ``numpy.random.Generator`` seeded by a drawn integer (fast, and a
failing example is reproduced by its seed); the *structure* (shapes, strides, paddings, masks'
kinds and rates) is drawn by Hypothesis so that it shrinks to the smallest failing geometry.
Sizes are kept small: the whole suite has a time budget.

Edge cases the strategies reach by construction: 1x1 kernels, kernels as large as the padded
input (Ho or Wo = 1), N = 1, strides larger than the kernel, paddings up to the kernel size,
full masks, single-position masks, per-sample masks of unequal sizes, float32 and float64.

Other test modules (e.g. the fast-backend suites) import from here::

    from strategies import conv_problems, implicit_problems   # tests/ is on sys.path (conftest)
    @given(conv_problems(dtypes=(np.float32,)))
    def test_something(problem):
        x, w, b, stride, padding, mask = problem
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from hypothesis import strategies as st

from refimpl.conv import conv_output_shape
from refimpl.masks import grid_mask, uniform_mask
from refimpl.perforation import PerforationPlan

DTYPES = (np.float32, np.float64)
MASK_KINDS = ("full", "single", "bernoulli", "uniform", "grid")

seeds = st.integers(min_value=0, max_value=2**32 - 1)


def rngs():
    """A fresh ``numpy.random.Generator`` from a drawn seed."""
    return seeds.map(np.random.default_rng)


def float_dtypes(choices=DTYPES):
    """One of ``choices`` as a ``numpy.dtype``."""
    return st.sampled_from([np.dtype(d) for d in choices])


rates = st.floats(min_value=0.0, max_value=0.99, allow_nan=False)


class ConvGeometryCase(NamedTuple):
    """The shape of one convolution problem (no values)."""

    n: int
    c: int
    k: int
    in_hw: tuple
    kernel: tuple
    stride: tuple
    padding: tuple

    @property
    def out_hw(self):
        return conv_output_shape(self.in_hw, self.kernel, self.stride, self.padding)


@st.composite
def conv_geometries(draw, max_batch=2, max_channels=3, max_hw=7, max_kernel=4, max_stride=3,
                    max_padding=2):
    """A valid convolution geometry; every axis drawn independently (non-square is the norm).

    The input side is drawn *after* the kernel and padding, from ``max(1, k - 2p)`` upwards, so
    the smallest example is a kernel exactly as large as the padded input (output size 1).
    """
    n = draw(st.integers(1, max_batch))
    c = draw(st.integers(1, max_channels))
    k = draw(st.integers(1, max_channels))
    kernel, stride, padding, in_hw = [], [], [], []
    for _ in range(2):
        kk = draw(st.integers(1, max_kernel))
        p = draw(st.integers(0, min(max_padding, kk)))
        size = draw(st.integers(max(1, kk - 2 * p), max(max_hw, kk)))
        kernel.append(kk)
        padding.append(p)
        in_hw.append(size)
        stride.append(draw(st.integers(1, max_stride)))
    return ConvGeometryCase(n, c, k, tuple(in_hw), tuple(kernel), tuple(stride), tuple(padding))


def mask_for(kind, out_hw, rng, rate=0.5):
    """One (Ho, Wo) mask of ``kind`` in ``MASK_KINDS`` with at least one True, drawn with ``rng``."""
    ho, wo = out_hw
    if kind == "full":
        return np.ones(out_hw, dtype=bool)
    if kind == "single":
        mask = np.zeros(ho * wo, dtype=bool)
        mask[rng.integers(ho * wo)] = True
        return mask.reshape(out_hw)
    if kind == "bernoulli":
        mask = rng.random(out_hw) >= rate
        if not mask.any():
            mask[rng.integers(ho), rng.integers(wo)] = True
        return mask
    if kind == "uniform":
        return uniform_mask(out_hw, rate, rng)
    if kind == "grid":
        return grid_mask(out_hw, rate, rng)
    raise ValueError(f"unknown mask kind {kind!r}")


@st.composite
def masks(draw, out_hw, batch=1, per_sample=None, kinds=MASK_KINDS):
    """A boolean mask for outputs of size ``out_hw``: (Ho, Wo) shared, or (batch, Ho, Wo).

    ``per_sample=None`` draws either layout. Per-sample masks draw an independent kind and rate
    per sample, so their kept counts differ (exercising the -1 padding of the plan).
    """
    if per_sample is None:
        per_sample = draw(st.booleans())
    rng = draw(rngs())
    count = batch if per_sample else 1
    layers = [mask_for(draw(st.sampled_from(kinds)), out_hw, rng, draw(rates)) for _ in range(count)]
    return np.stack(layers) if per_sample else layers[0]


def random_conv_arrays(geometry, dtype, rng):
    """Standard-normal ``x`` (N, C, H, W), ``w`` (K, C, kh, kw), ``b`` (K,) of ``dtype``."""
    g = geometry
    x = rng.standard_normal((g.n, g.c, *g.in_hw)).astype(dtype)
    w = rng.standard_normal((g.k, g.c, *g.kernel)).astype(dtype)
    b = rng.standard_normal(g.k).astype(dtype)
    return x, w, b


@st.composite
def conv_problems(draw, dtypes=DTYPES, mask_kinds=MASK_KINDS, per_sample=None, with_mask=True,
                  **geometry_kwargs):
    """``(x, w, b, stride, padding, mask)``: a convolution problem, optionally perforated.

    Parameters
    ----------
    dtypes : float dtypes to draw from
    mask_kinds : kinds for :func:`masks`
    per_sample : True / False / None (either)
    with_mask : False gives ``mask=None`` (dense); True a boolean mask for the output
    **geometry_kwargs : limits passed to :func:`conv_geometries`
    """
    g = draw(conv_geometries(**geometry_kwargs))
    dtype = draw(float_dtypes(dtypes))
    x, w, b = random_conv_arrays(g, dtype, draw(rngs()))
    mask = draw(masks(g.out_hw, g.n, per_sample, mask_kinds)) if with_mask else None
    return x, w, b, g.stride, g.padding, mask


class ImplicitProblem(NamedTuple):
    """A perforated layer's compact output and the layer that reads it (conv or pooling).

    ``compact`` (N, C, P) holds *distinct* values (so max pooling has no ties between different
    sources), zeros in the padded slots of unequal per-sample masks. For ``layer == "conv"``,
    ``w`` (K, C, kh, kw) and ``b`` (K,) are set and ``size`` is the kernel; for ``"max"``/``"avg"``
    they are None and ``padding <= size // 2`` (the pooling rule).
    """

    compact: np.ndarray
    plan: PerforationPlan
    layer: str
    w: np.ndarray | None
    b: np.ndarray | None
    size: tuple
    stride: tuple
    padding: tuple


def distinct_values(shape, dtype, rng, spacing=0.25):
    """Random values at least ``spacing`` apart, in random order (max pooling without ties)."""
    size = int(np.prod(shape))
    values = (rng.permutation(size) - size / 2) * spacing + rng.uniform(0, spacing / 10, size)
    return values.reshape(shape).astype(dtype)


@st.composite
def implicit_problems(draw, dtypes=DTYPES, layers=("conv", "max", "avg"), per_sample=None,
                      mask_kinds=MASK_KINDS, max_batch=2, max_channels=3, max_hw=6, max_kernel=3):
    """An :class:`ImplicitProblem`: compact tensor + plan + the next layer's window."""
    dtype = draw(float_dtypes(dtypes))
    layer = draw(st.sampled_from(layers))
    n = draw(st.integers(1, max_batch))
    c = draw(st.integers(1, max_channels))
    size, stride, padding, in_hw = [], [], [], []
    for _ in range(2):
        kk = draw(st.integers(1, max_kernel))
        p = draw(st.integers(0, kk if layer == "conv" else kk // 2))
        size.append(kk)
        padding.append(p)
        in_hw.append(draw(st.integers(max(1, kk - 2 * p), max(max_hw, kk))))
        stride.append(draw(st.integers(1, 3)))
    mask = draw(masks(tuple(in_hw), n, per_sample, mask_kinds))
    plan = PerforationPlan(mask)
    rng = draw(rngs())
    compact = distinct_values((n, c, plan.width), dtype, rng)
    counts = np.broadcast_to(plan.counts, (n,))
    for sample, count in enumerate(counts):
        compact[sample, :, count:] = 0
    w = b = None
    if layer == "conv":
        k = draw(st.integers(1, max_channels))
        w = rng.standard_normal((k, c, *size)).astype(dtype)
        b = rng.standard_normal(k).astype(dtype)
    return ImplicitProblem(compact, plan, layer, w, b, tuple(size), tuple(stride), tuple(padding))


@st.composite
def pool_windows(draw, max_size=4, max_stride=3):
    """``(size, stride, padding)`` pairs of a pooling window, with ``padding <= size // 2`` (the pooling rule)."""
    size = (draw(st.integers(1, max_size)), draw(st.integers(1, max_size)))
    stride = (draw(st.integers(1, max_stride)), draw(st.integers(1, max_stride)))
    padding = (draw(st.integers(0, size[0] // 2)), draw(st.integers(0, size[1] // 2)))
    return size, stride, padding


def map_sizes(min_side=1, max_side=12):
    """A feature-map size (H, W), sides drawn independently."""
    return st.tuples(st.integers(min_side, max_side), st.integers(min_side, max_side))


class PoolProblem(NamedTuple):
    """A dense pooling problem: ``x`` (N, C, H, W) with distinct values (no max ties)."""

    x: np.ndarray
    mode: str
    size: tuple
    stride: tuple
    padding: tuple


@st.composite
def pool_problems(draw, dtypes=DTYPES, modes=("max", "avg"), max_batch=2, max_channels=3, max_hw=7):
    """A :class:`PoolProblem` whose window fits the (padded) input."""
    size, stride, padding = draw(pool_windows())
    in_hw = tuple(draw(st.integers(max(1, k - 2 * p), max(max_hw, k))) for k, p in zip(size, padding))
    shape = (draw(st.integers(1, max_batch)), draw(st.integers(1, max_channels)), *in_hw)
    x = distinct_values(shape, draw(float_dtypes(dtypes)), draw(rngs()))
    return PoolProblem(x, draw(st.sampled_from(modes)), size, stride, padding)


def fmp_lengths(max_length=60):
    """``(L, n)`` for a Fractional Max-Pooling sequence: axis length and kept count, ``1 <= n <= L``."""
    return st.integers(1, max_length).flatmap(lambda length: st.tuples(st.just(length), st.integers(1, length)))


def unit_floats():
    """u in [0, 1), both ends' neighbourhoods included (0 itself, tiny u, u just below 1)."""
    return st.floats(min_value=0.0, max_value=1.0, exclude_max=True, allow_nan=False)


def standalone_masks(max_side=8, max_batch=1, per_sample=None, kinds=MASK_KINDS):
    """A mask of a drawn size: (Ho, Wo), or (N, Ho, Wo) when ``max_batch > 1`` draws per-sample."""
    sizes = st.tuples(st.integers(1, max_batch), map_sizes(1, max_side))
    return sizes.flatmap(lambda s: masks(s[1], batch=s[0], per_sample=per_sample, kinds=kinds))
