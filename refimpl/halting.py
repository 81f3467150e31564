r"""Adaptive computation time: the halting math, as pure functions.

A block of ``L`` units produces halting scores :math:`h_1, \dots, h_{L-1} \in [0, 1]` (one per
unit but the last, :math:`h_L \equiv 1`). With :math:`\varepsilon = 0.01` (docs/spec.md §7.1):

.. math::

    N = \min\Big\{ n : \sum_{i \le n} h_i \ge 1 - \varepsilon \Big\}, \qquad
    R = 1 - \sum_{i < N} h_i, \qquad
    p_n = \begin{cases} h_n & n < N \\ R & n = N \\ 0 & n > N \end{cases}, \qquad
    \rho = N + R.

The block output is :math:`\sum_n p_n U_n` and the ponder cost :math:`\rho` enters the loss as
:math:`\tau \cdot \text{mean}(\rho)`. ``N`` is piecewise constant, so it carries no gradient:

.. math::

    \frac{\partial \rho}{\partial h_i} = -[i < N], \qquad
    \frac{\partial p_n}{\partial h_i} = [i < N]\,\big([n = i] - [n = N]\big).

Everything here works over any leading shape: ``(batch,)`` for ACT, ``(batch, H, W)`` for SACT
(one independent ACT per position). The unit axis is always the **last** axis.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import _checks

EPS = 0.01


def check_eps(eps):
    """Validate the halting threshold margin: a real number in (0, 1)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)):
        raise TypeError(f"eps must be a real number in (0, 1), got {eps!r}")
    if not 0.0 < float(eps) < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps!r}")
    return float(eps)


def still_running(cumulative, eps=EPS):
    r"""Whether the next unit runs, given :math:`c_l = \sum_{i \le l} h_i`: ``c_l < 1 - eps``.

    This is the one place the halting rule is written; blocks call it online, unit by unit,
    and :func:`halting_forward` calls it on the whole score vector.
    """
    return cumulative < 1.0 - eps


class HaltingCache(NamedTuple):
    """What :func:`halting_backward` needs."""

    before: np.ndarray  # (..., L) bool: unit n < N
    last: np.ndarray  # (..., L) bool: unit n == N


class Halting(NamedTuple):
    """Result of :func:`halting_forward` (shapes for scores of shape ``(..., L-1)``)."""

    n_units: np.ndarray  # (...,) int: N, counted from 1
    remainder: np.ndarray  # (...,): R
    p: np.ndarray  # (..., L): halting distribution
    rho: np.ndarray  # (...,): ponder cost N + R
    cache: HaltingCache


def halting_forward(h, eps=EPS):
    """N, R, the halting distribution and the ponder cost from the halting scores.

    Parameters
    ----------
    h : ndarray (..., L-1), float32 or float64, values in [0, 1]
        Halting scores of units ``1 .. L-1`` (``h_L = 1`` is implicit). Scores of units after
        ``N`` do not affect the result (a block fills them with 0: they are never computed).
    eps : float in (0, 1)

    Returns
    -------
    Halting
        ``n_units`` (...,) int64 in ``1..L``; ``remainder`` and ``rho`` (...,); ``p`` (..., L)
        summing to 1 along the last axis; and the cache for :func:`halting_backward`.
    """
    if np.ndim(h) < 1:
        raise ValueError(f"h must have a unit axis (last), got shape {np.shape(h)}")
    h = _checks.float_array(h, "h")
    if np.any(h < 0) or np.any(h > 1):
        raise ValueError(f"h must lie in [0, 1], got values in [{h.min()}, {h.max()}]")
    eps = check_eps(eps)
    lead, n_scored = h.shape[:-1], h.shape[-1]
    n_total = n_scored + 1
    halted = ~still_running(np.cumsum(h, axis=-1), eps)
    halted = np.concatenate([halted, np.ones(lead + (1,), dtype=bool)], axis=-1)  # h_L = 1
    n_units = np.argmax(halted, axis=-1) + 1  # first unit where the sum reaches 1 - eps
    unit = np.arange(1, n_total + 1)
    before = unit < n_units[..., None]
    last = unit == n_units[..., None]
    h_full = np.concatenate([h, np.ones(lead + (1,), dtype=h.dtype)], axis=-1)
    remainder = (1.0 - np.sum(np.where(before, h_full, 0.0), axis=-1)).astype(h.dtype)
    p = np.where(before, h_full, 0.0) + np.where(last, remainder[..., None], 0.0)
    rho = (n_units + remainder).astype(h.dtype)
    return Halting(n_units, remainder, p.astype(h.dtype), rho, HaltingCache(before, last))


def halting_backward(dp, drho, cache):
    r"""Gradient w.r.t. the scores ``h`` (..., L-1) from gradients of ``p`` and ``rho``.

    .. math::

        \frac{\partial \mathcal{L}}{\partial h_i} = [i < N]\Big(
            \frac{\partial \mathcal{L}}{\partial p_i} - \frac{\partial \mathcal{L}}{\partial p_N}
            - \frac{\partial \mathcal{L}}{\partial \rho}\Big)

    Parameters
    ----------
    dp : ndarray (..., L) or None (no gradient through the distribution)
    drho : ndarray (...,) or None (no gradient through the ponder cost)
    cache : HaltingCache
    """
    if not isinstance(cache, HaltingCache):
        raise TypeError(f"cache must be the HaltingCache of halting_forward, got {type(cache).__name__}")
    before, last = cache.before, cache.last
    if dp is not None:
        dp = _checks.upstream(dp, "dp", before.shape)
    if drho is not None:
        drho = _checks.upstream(drho, "drho", before.shape[:-1])
    dtype = np.result_type(*(a.dtype for a in (dp, drho) if a is not None), np.float32)
    dh = np.zeros(before.shape, dtype=dtype)
    if dp is not None:
        dp_last = np.sum(np.where(last, dp, 0.0), axis=-1, keepdims=True)
        dh += dp - dp_last
    if drho is not None:
        dh -= drho[..., None]
    dh = np.where(before, dh, 0.0).astype(dtype)
    return dh[..., :-1]  # unit L has no score


def ponder_cost_grad(h, eps=EPS):
    r""":math:`\partial \rho / \partial h`: −1 for units before N, 0 from N on (shape of ``h``)."""
    result = halting_forward(h, eps)
    return halting_backward(None, np.ones_like(result.rho), result.cache)


def weighted_output_forward(p, units):
    r"""Block output :math:`\sum_n p_n U_n`.

    Parameters
    ----------
    p : ndarray (..., L)
    units : ndarray (L, ..., F...) — the unit outputs: unit axis first, then the leading axes of ``p``, then any feature axes F

    Returns
    -------
    out : ndarray (..., F...)
    """
    p, units = _check_weighted(p, units)
    extra = units.ndim - 1 - (p.ndim - 1)
    weights = np.moveaxis(p, -1, 0).reshape(p.shape[-1:] + p.shape[:-1] + (1,) * extra)
    return np.sum(weights * units, axis=0)


def weighted_output_backward(dout, p, units):
    """Gradients ``(dp, dunits)`` of :func:`weighted_output_forward`."""
    p, units = _check_weighted(p, units)
    dout = _checks.upstream(dout, "dout", units.shape[1:])
    extra = units.ndim - 1 - (p.ndim - 1)
    weights = np.moveaxis(p, -1, 0).reshape(p.shape[-1:] + p.shape[:-1] + (1,) * extra)
    dunits = weights * dout[None]
    feature_axes = tuple(range(p.ndim, units.ndim))
    dp = np.moveaxis(np.sum(units * dout[None], axis=feature_axes), 0, -1)
    return dp, dunits


def _check_weighted(p, units):
    """Validate the halting distribution ``p`` (..., L) against the unit outputs (L, ..., F...)."""
    p = _checks.float_array(p, "p")
    units = _checks.float_array(units, "units")
    if p.ndim < 1:
        raise ValueError(f"p must have a unit axis (last), got shape {p.shape}")
    expected = p.shape[-1:] + p.shape[:-1]
    if units.shape[: p.ndim] != expected:
        raise ValueError(f"units must have shape (L, ...) = {expected} + feature axes to match p {p.shape}, "
                         f"got {units.shape}")
    return p, units
