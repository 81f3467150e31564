"""Validation at the public boundary.

Every public function of ``refimpl`` checks its arguments with these helpers, so that a mistake
gets an error naming the argument, what was expected and what came. Kernels below the boundary
(and every backend) assume validated input.
"""

from __future__ import annotations

import numbers

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _is_int(value):
    # type() first: the ABC check of numbers.Integral is slow, and these run on every layer call
    return type(value) is int or (isinstance(value, numbers.Integral) and not isinstance(value, bool))


def int_pair(value, name):
    """Return ``value`` as a pair of ints (``3 -> (3, 3)``, ``(1, 2) -> (1, 2)``), any sign.

    Floats (even ``2.0``), bools and strings are refused: a stride of ``1.5`` is a mistake to
    report, not to truncate.
    """
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        pair = value  # the common case, already in canonical form
    elif _is_int(value):
        pair = (int(value), int(value))
    else:
        try:
            items = tuple(value)
        except TypeError:
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
        if isinstance(value, str) or not all(_is_int(v) for v in items):
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
        if len(items) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {len(items)} values {value!r}")
        pair = (int(items[0]), int(items[1]))
    return pair


def as_pair(value, name):
    """:func:`int_pair` whose entries must be non-negative (a padding)."""
    pair = int_pair(value, name)
    if min(pair) < 0:
        raise ValueError(f"{name} must be non-negative, got {value!r}")
    return pair


def positive_pair(value, name):
    """:func:`int_pair` whose entries must be at least 1 (a kernel size or a stride)."""
    pair = int_pair(value, name)
    if min(pair) < 1:
        raise ValueError(f"{name} must be at least 1, got {value!r}")
    return pair


def float_array(x, name, ndim=None, allow_nonfinite=False):
    """Return ``x`` as a C-contiguous float32/float64 array, checking ndim and finiteness.

    Lists and Python scalars are converted to float64; any other non-array, and arrays of
    other dtypes (integers, bool, float16), raise ``TypeError`` — silently casting would hide
    a mixed-precision mistake.
    """
    if not isinstance(x, np.ndarray):
        if isinstance(x, (list, tuple)) or (np.isscalar(x) and isinstance(x, numbers.Real)):
            x = np.asarray(x, dtype=np.float64)
        else:
            raise TypeError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {x.shape}")
    if not allow_nonfinite:
        bad = ~np.isfinite(x)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"{name} must be finite, got {int(bad.sum())} NaN/inf value(s), the first at index {first}"
            )
    return np.ascontiguousarray(x)


def nonempty(x, name):
    """Raise ValueError if any axis of ``x`` has length 0 (an empty batch, channel or kernel)."""
    if 0 in x.shape:
        raise ValueError(f"{name} must have no empty axis, got shape {x.shape}")
    return x


def gradient(dout, name, shape, dtype, allow_nonfinite=False):
    """Check an upstream gradient: a finite float array of exactly ``shape``, cast to ``dtype``.

    The cast lets a float64 gradient flow into a float32 layer (the result is float32, like the
    forward pass); the shape check is strict, because broadcasting a wrong-shaped gradient would
    give wrong numbers without an error.
    """
    dout = float_array(dout, name, allow_nonfinite=allow_nonfinite)
    if dout.shape != tuple(shape):
        raise ValueError(f"{name} must have the forward output's shape {tuple(shape)}, got {dout.shape}")
    return np.ascontiguousarray(dout, dtype=dtype)


def upstream(dout, name, shape):
    """Check an upstream gradient of a pure function: a finite float array of exactly ``shape``.

    Like :func:`gradient` without the cast (these functions compute in the gradient's dtype).
    """
    dout = float_array(dout, name).reshape(np.shape(dout))  # keep a 0-d gradient 0-d
    if dout.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (the forward output's), got {dout.shape}")
    return dout


def same_dtype(arrays, names):
    """Raise TypeError unless every array in ``arrays`` has the dtype of the first."""
    dtypes = [a.dtype for a in arrays]
    if any(d != dtypes[0] for d in dtypes):
        listing = ", ".join(f"{n}={d}" for n, d in zip(names, dtypes))
        raise TypeError(f"arrays must share one dtype, got {listing}")


def rate(value, name="rate"):
    """Check a perforation rate: a real number in [0, 1)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def generator(rng, name="rng"):
    """Require an explicit ``numpy.random.Generator`` (no global seeding anywhere)."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"{name} must be a numpy.random.Generator (e.g. numpy.random.default_rng(0)), "
            f"got {type(rng).__name__}"
        )
    return rng


def choice(value, name, allowed):
    """Check that ``value`` is one of ``allowed``."""
    try:
        ok = value in allowed
    except TypeError:  # unhashable (a list, a dict) cannot be in a set
        ok = False
    if not ok:
        raise ValueError(f"{name} must be one of {sorted(allowed)}, got {value!r}")
    return value


def bool_mask(mask, name, out_hw, batch=None):
    """Check a perforation mask: boolean, shape (Ho, Wo) or (N, Ho, Wo), at least one True per sample."""
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"{name} must be a boolean numpy array, got {type(mask).__name__}")
    if mask.dtype != np.bool_:
        raise TypeError(f"{name} must have dtype bool, got {mask.dtype}")
    ho, wo = out_hw
    shared_ok = mask.shape == (ho, wo)
    per_sample_ok = mask.ndim == 3 and mask.shape[1:] == (ho, wo) and (
        batch is None or mask.shape[0] == batch
    )
    if not (shared_ok or per_sample_ok):
        expected = f"({ho}, {wo})" + (f" or ({batch}, {ho}, {wo})" if batch is not None else f" or (N, {ho}, {wo})")
        raise ValueError(f"{name} must have shape {expected}, got {mask.shape}")
    if mask.shape[0] == 0 or ho * wo == 0:
        raise ValueError(f"{name} must not be empty, got shape {mask.shape}")
    counts = mask.reshape(-1, ho * wo).sum(axis=1)
    if np.any(counts == 0):
        where = "" if mask.ndim == 2 else f" (sample {int(np.argmin(counts))})"
        raise ValueError(f"{name} must select at least one position per sample, got an empty mask{where}")
    return np.ascontiguousarray(mask)
