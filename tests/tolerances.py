"""The tolerances of docs/spec.md §11.1, keyed by dtype, in one place.

A backend (or a second formulation of the same computation) agrees with the reference when

    |actual - expected| <= atol * scale + rtol * |expected|,   scale = max |expected|,

i.e. the absolute part is relative to the *output scale*: a sum of many products of magnitude 1
carries a rounding error proportional to the magnitude of its terms, not to its (possibly
cancelled) value. Integers (masks, index maps, FLOP counts) are compared exactly, never here.
"""

from __future__ import annotations

import numpy as np

TOLERANCES = {
    np.dtype(np.float32): {"rtol": 1e-4, "atol": 1e-5},
    np.dtype(np.float64): {"rtol": 1e-10, "atol": 1e-12},
}

# Central differences in float64 (refimpl.gradcheck, h = 1e-6) are accurate to about 1e-8 relative;
# a wrong gradient is off by O(1). One bound for every gradient check.
GRADCHECK_RTOL = 1e-6

# Two float64 formulations of the same quantity (a closed form against its definition, a sum taken
# in another order): they differ by a few roundings, far inside 1e-12 relative; a wrong formula is
# off by far more. One bound for every such comparison.
FLOAT64_REFORMULATION_RTOL = 1e-12


def tolerance(dtype):
    """``{"rtol": ..., "atol": ...}`` for ``dtype`` (float32 or float64)."""
    try:
        return TOLERANCES[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"no tolerance for dtype {np.dtype(dtype)}; expected float32 or float64") from None


def assert_close(actual, expected, dtype=None, scale=None):
    """Assert agreement within docs/spec.md §11.1: same shape, and within rtol/atol of ``dtype`` (default: expected's).

    ``atol`` is multiplied by ``max |expected|`` (the output scale); an all-zero ``expected``
    therefore has to be matched exactly. Where the outputs are small because their terms cancel
    (a batch norm that subtracts a mean close to its input), pass ``scale``: a bound on the
    magnitude of the terms, computed from the case (never a constant); the larger of the two is used.
    """
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"shape {actual.shape} != expected {expected.shape}"
    tol = tolerance(expected.dtype if dtype is None else dtype)
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 0.0 if scale is None else float(scale))
    np.testing.assert_allclose(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale)
