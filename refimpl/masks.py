r"""Perforation masks: which output positions a perforated convolution computes.

Every generator returns a boolean (Ho, Wo) array (``True`` = computed) and takes an explicit
``numpy.random.Generator`` where it is random. The *kept* count for rate ``r`` is
``max(1, round((1 - r) Ho Wo))`` (uniform, structure, impact) or the product of per-axis counts
(grid); the realised rate can therefore differ from the requested one — report
:func:`refimpl.perforation.realised_rate`.

* **uniform** — positions drawn uniformly without replacement.
* **grid** — the pseudorandom sequence of Fractional Max-Pooling (Graham, 2014) on each axis:
  for length ``L`` and ``n`` kept coordinates, ``α = L / n``, ``u ~ U(0, 1)``,
  :math:`a_i = \lceil α (i + u) \rceil - 1`; rows and columns independent, mask = their product.
* **structure** — positions read by the most windows of the following pooling layer.
* **impact** — positions whose removal the first-order Taylor estimate says costs the most loss:
  :math:`\text{impact}(x, y) = \text{mean}_\text{images} \sum_c |\partial L/\partial V(x,y,c)\; V(x,y,c)|`.
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction

import numpy as np

from . import _checks
from .conv import conv_output_shape
from .pooling import check_pool_padding

MASK_TYPES = ("uniform", "grid", "structure", "impact")


def _check_hw(out_hw):
    """``out_hw`` as a pair of positive ints (Ho, Wo)."""
    if isinstance(out_hw, numbers.Integral):
        raise TypeError(f"out_hw must be a pair of ints (Ho, Wo), got {out_hw!r}")
    return _checks.positive_pair(out_hw, "out_hw")


def kept_count(size, rate):
    """Positions kept out of ``size`` at perforation rate ``rate``: ``max(1, round((1 - r) size))``.

    ``round`` is Python's (half to even: 2.5 -> 2). ``rate`` must be in [0, 1).
    """
    return max(1, int(round((1.0 - _checks.rate(rate)) * size)))


def uniform_mask(out_hw, rate, rng):
    """``kept_count(Ho·Wo, rate)`` positions drawn uniformly without replacement.

    Parameters
    ----------
    out_hw : pair of ints (Ho, Wo)
    rate : float in [0, 1), the requested perforation rate
    rng : numpy.random.Generator

    Returns
    -------
    mask : ndarray of bool (Ho, Wo), True = computed
    """
    ho, wo = _check_hw(out_hw)
    rng = _checks.generator(rng)
    mask = np.zeros(ho * wo, dtype=bool)
    mask[rng.choice(ho * wo, size=kept_count(ho * wo, rate), replace=False)] = True
    return mask.reshape(ho, wo)


def fmp_sequence(length, n_kept, u):
    r"""Fractional Max-Pooling coordinates :math:`a_i = \lceil α (i + u) \rceil - 1`, ``α = length / n_kept``.

    Parameters
    ----------
    length : int
        L, the axis length.
    n_kept : int
        n, the number of coordinates, ``1 <= n <= L``.
    u : float in [0, 1)
        The sequence's random offset.

    Returns
    -------
    coords : ndarray of int64 (n_kept,)
        Distinct increasing coordinates in ``[0, L - 1]`` whose gaps are ``floor(α)`` or
        ``ceil(α)``; a regular grid with step α when α is an integer.

    Notes
    -----
    The ceiling is taken in exact rational arithmetic (a float ``u`` is an exact binary
    fraction): in floating point, ``α (i + u)`` can round onto an integer and two coordinates
    collapse (``L = n = 2``, ``u = 1e-45`` gives ``[0, 0]``).
    """
    if not 1 <= n_kept <= length:
        raise ValueError(f"n_kept must be in [1, {length}], got {n_kept}")
    if not 0.0 <= u < 1.0:
        raise ValueError(f"u must be in [0, 1), got {u}")
    alpha, offset = Fraction(length, n_kept), Fraction(float(u))
    if offset == 0:
        # The formula would give a_0 = -1. The sequence is meant for u in (0, 1); at u = 0 use its
        # limit as u -> 0+, which is floor(α i) (in range, same gaps).
        return np.array([math.floor(alpha * i) for i in range(n_kept)], dtype=np.int64)
    return np.array([math.ceil(alpha * (i + offset)) - 1 for i in range(n_kept)], dtype=np.int64)


def grid_mask(out_hw, rate, rng):
    """Cartesian product of FMP row and column sequences.

    ``n_rows = max(1, round(sqrt(1 - r) Ho))`` and ``n_cols = max(1, round(sqrt(1 - r) Wo))``
    (project choice for non-square maps); each axis draws its own ``u``. When ``Ho / n_rows`` is
    an integer the rows form a regular grid. Parameters and return as for :func:`uniform_mask`;
    the realised rate is ``1 - n_rows n_cols / (Ho Wo)``.
    """
    ho, wo = _check_hw(out_hw)
    keep = np.sqrt(1.0 - _checks.rate(rate))
    rng = _checks.generator(rng)
    n_rows, n_cols = max(1, int(round(keep * ho))), max(1, int(round(keep * wo)))
    rows = fmp_sequence(ho, n_rows, rng.uniform(0.0, 1.0))
    cols = fmp_sequence(wo, n_cols, rng.uniform(0.0, 1.0))
    mask = np.zeros((ho, wo), dtype=bool)
    mask[np.ix_(rows, cols)] = True
    return mask


def pooling_structure_scores(out_hw, pool_size, pool_stride=None, pool_padding=0):
    """How many windows of the following pooling layer read each position.

    Parameters
    ----------
    out_hw : (Ho, Wo), the perforated layer's output = the pooling layer's input
    pool_size : int or pair, the pooling window
    pool_stride : int or pair, or None for ``pool_size``
    pool_padding : int or pair

    Returns
    -------
    scores : ndarray of int64 (Ho, Wo)
        ``scores[y, x]`` = number of pooling windows whose in-bounds taps include (y, x).
        Overlapping windows (3x3, stride 2) make some positions count twice or four times.
    """
    ho, wo = _check_hw(out_hw)
    (kh, kw) = _checks.positive_pair(pool_size, "pool_size")
    (sh, sw) = (kh, kw) if pool_stride is None else _checks.positive_pair(pool_stride, "pool_stride")
    (ph, pw) = _checks.as_pair(pool_padding, "pool_padding")
    check_pool_padding((kh, kw), (ph, pw), "pool_padding")
    ph_out, pw_out = conv_output_shape((ho, wo), (kh, kw), (sh, sw), (ph, pw))
    scores = np.zeros((ho + 2 * ph, wo + 2 * pw), dtype=np.int64)
    for y in range(ph_out):
        for x in range(pw_out):
            scores[y * sh : y * sh + kh, x * sw : x * sw + kw] += 1
    return scores[ph : ph + ho, pw : pw + wo]


def _top_positions(scores, n_kept, rng):
    """Boolean mask of the ``n_kept`` highest scores, ties broken by seeded noise."""
    flat = scores.ravel()
    noise = rng.permutation(flat.size)  # a random order among equal scores
    order = np.lexsort((noise, -flat))  # primary key: score descending
    mask = np.zeros(flat.size, dtype=bool)
    mask[order[:n_kept]] = True
    return mask.reshape(scores.shape)


def structure_mask(out_hw, rate, rng, pool_size, pool_stride=None, pool_padding=0):
    """Keep the ``kept_count(Ho·Wo, rate)`` positions read by the most pooling windows.

    Ties in the score are broken by a random order drawn from ``rng``. Arguments as for
    :func:`uniform_mask` and :func:`pooling_structure_scores`.
    """
    scores = pooling_structure_scores(out_hw, pool_size, pool_stride, pool_padding)
    return _top_positions(scores, kept_count(scores.size, rate), _checks.generator(rng))


def impact_scores(activations, gradients, already_perforated=None):
    """First-order Taylor impact of zeroing each position (docs/spec.md §3.5).

    Parameters
    ----------
    activations, gradients : ndarray (N, C, Ho, Wo)
        The layer's output V and ∂L/∂V over a data subset.
    already_perforated : ndarray of bool (Ho, Wo), optional
        Positions skipped already; their impact is 0.

    Returns
    -------
    impact : ndarray (Ho, Wo) — mean over images of Σ_c |∂L/∂V · V|
    """
    v = _checks.float_array(activations, "activations", ndim=4)
    g = _checks.float_array(gradients, "gradients", ndim=4)
    if v.shape != g.shape:
        raise ValueError(f"gradients must have the shape of activations {v.shape}, got {g.shape}")
    impact = np.abs(v * g).sum(axis=1).mean(axis=0)
    if already_perforated is not None:
        done = already_perforated
        if not isinstance(done, np.ndarray) or done.dtype != np.bool_:
            raise TypeError(f"already_perforated must be a boolean array, got {getattr(done, 'dtype', type(done).__name__)}")
        if done.shape != impact.shape:
            # np.where would broadcast e.g. a (Wo,) array over the rows without complaint
            raise ValueError(f"already_perforated must have shape {impact.shape}, got {done.shape}")
        impact = np.where(done, 0.0, impact)
    return impact


def impact_mask(impact, rate, rng):
    """Keep the ``kept_count(Ho·Wo, rate)`` positions of highest impact (ties broken by ``rng``).

    Parameters
    ----------
    impact : ndarray (Ho, Wo), from :func:`impact_scores`
    rate : float in [0, 1)
    rng : numpy.random.Generator

    Returns
    -------
    mask : ndarray of bool (Ho, Wo)
    """
    impact = _checks.float_array(impact, "impact", ndim=2)
    return _top_positions(impact, kept_count(impact.size, rate), _checks.generator(rng))


def make_mask(kind, out_hw, rate, rng, **kwargs):
    """Dispatch by name to the generator of ``kind`` in ``MASK_TYPES``.

    ``structure`` needs ``pool_size`` (and optionally ``pool_stride``, ``pool_padding``);
    ``impact`` needs ``impact`` (an (Ho, Wo) score array). Keyword arguments a kind does not
    use are ignored; unknown names raise ``TypeError``.

    Returns
    -------
    mask : ndarray of bool (Ho, Wo)
    """
    _checks.choice(kind, "kind", set(MASK_TYPES))
    unknown = set(kwargs) - {"pool_size", "pool_stride", "pool_padding", "impact"}
    if unknown:
        # Arguments a kind does not use are ignored (so one call site can serve every kind),
        # but a misspelt name must not be.
        raise TypeError(f"make_mask got unexpected keyword argument(s) {sorted(unknown)}")
    if kind == "uniform":
        return uniform_mask(out_hw, rate, rng)
    if kind == "grid":
        return grid_mask(out_hw, rate, rng)
    if kind == "structure":
        if "pool_size" not in kwargs:
            raise ValueError("kind='structure' needs pool_size= (the following pooling layer's window)")
        pool = {k: kwargs[k] for k in ("pool_size", "pool_stride", "pool_padding") if k in kwargs}
        return structure_mask(out_hw, rate, rng, **pool)
    if "impact" not in kwargs:
        raise ValueError("kind='impact' needs impact= (an (Ho, Wo) array from impact_scores)")
    impact = kwargs["impact"]
    if np.shape(impact) != tuple(_check_hw(out_hw)):
        raise ValueError(f"impact must have shape {tuple(out_hw)}, got {np.shape(impact)}")
    return impact_mask(impact, rate, rng)
