r"""The mean over seeds and its 95 % interval: Student's t-interval.

For the values :math:`v_1, \dots, v_n` of one number over :math:`n` seeds,

.. math:: \bar v \pm t_{0.975,\,n-1}\, \frac{s}{\sqrt n}, \qquad s^2 = \frac{1}{n-1}\sum_i (v_i - \bar v)^2,

the interval that covers the true mean 95 % of the time when the values are independent draws
from a normal distribution. With 3–5 seeds a bootstrap interval would be too narrow (it resamples
only the few values seen); the t-interval widens with :math:`t_{0.975,\,n-1}` (12.7 for two seeds,
4.30 for three) and so says honestly how little a few seeds show. One value has no interval: its
bounds are ``None``.

A comparison between two methods run on the same seeds (same data, same initial weights) uses the
*paired* interval: the t-interval of the per-seed differences (:func:`paired_difference`), which
removes the variation the two runs share.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["CONFIDENCE", "INTERVAL_METHOD", "mean_interval", "paired_difference", "above_zero", "below_zero"]

CONFIDENCE = 0.95
INTERVAL_METHOD = "Student t-interval of the mean over seeds (95 %)"


def mean_interval(values, confidence=CONFIDENCE):
    """Mean of ``values`` and its two-sided t-interval.

    Parameters
    ----------
    values : sequence of finite numbers, one per seed (at least one)
    confidence : float in (0, 1)

    Returns
    -------
    dict with ``mean``, ``low``, ``high`` (``None`` for a single value), ``std`` (sample standard
    deviation, ``None`` for a single value), ``n`` and ``values`` (the inputs, as floats)
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("values must hold at least one number, got none")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"values must be finite, got {values.tolist()}")
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    n, mean = int(values.size), float(values.mean())
    if n == 1:
        return {"mean": mean, "low": None, "high": None, "std": None, "n": 1, "values": values.tolist()}
    from scipy.stats import t

    std = float(values.std(ddof=1))
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "std": std, "n": n, "values": values.tolist()}


def paired_difference(a, b, confidence=CONFIDENCE):
    """:func:`mean_interval` of ``a[i] - b[i]`` (two methods measured on the same seeds)."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"a and b must hold one value per seed each, got {a.size} and {b.size} values")
    return mean_interval(a - b, confidence)


def above_zero(interval):
    """True when the whole interval lies above 0 (False without an interval: one seed proves nothing)."""
    return interval["low"] is not None and interval["low"] > 0


def below_zero(interval):
    """True when the whole interval lies below 0 (False without an interval)."""
    return interval["high"] is not None and interval["high"] < 0
