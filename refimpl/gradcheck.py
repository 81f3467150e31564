r"""Gradient checking by central differences.

A hand-written backward is right when, for a *random* upstream gradient ``g`` (never only
``sum()``, whose all-ones gradient hides transposition and broadcasting bugs),

.. math::

    \frac{\partial \langle g, f(x) \rangle}{\partial x_i}
    \approx \frac{\langle g, f(x + h e_i) \rangle - \langle g, f(x - h e_i) \rangle}{2h}.

Run in float64: with ``h = 1e-6`` the truncation error is O(h²) and the rounding error
O(ε/h) ≈ 1e-10, so relative errors below 1e-6 mean the gradient is right.
"""

from __future__ import annotations

import numpy as np


def numerical_gradient(f, x, h=1e-6):
    """Central-difference gradient of the scalar function ``f()`` w.r.t. array ``x`` (modified in place, restored)."""
    grad = np.zeros_like(x, dtype=np.float64)
    it = np.nditer(x, flags=["multi_index"], op_flags=["readwrite"])
    for _ in it:
        i = it.multi_index
        old = x[i].copy()
        x[i] = old + h
        plus = f()
        x[i] = old - h
        minus = f()
        x[i] = old
        grad[i] = (plus - minus) / (2 * h)
    return grad


def relative_error(a, b):
    """``max |a - b| / max(|a|, |b|, tiny)``: scale-free comparison of two gradients."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(np.max(np.abs(a), initial=0.0), np.max(np.abs(b), initial=0.0), 1e-12)
    return float(np.max(np.abs(a - b), initial=0.0) / scale)


def _check_inputs(inputs, rng):
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if not isinstance(inputs, dict) or not inputs:
        raise TypeError(f"inputs must be a non-empty dict name -> float64 array, got {type(inputs).__name__}")
    for name, x in inputs.items():
        if not isinstance(x, np.ndarray) or x.dtype != np.float64:
            # float32 differences at h = 1e-6 are pure rounding noise: the check would be meaningless.
            raise TypeError(f"inputs[{name!r}] must be a float64 numpy array, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")


def _analytic(backward, upstream, inputs):
    """Call the backward and check it returned one gradient of the right shape per input."""
    grads = backward(upstream)
    for name, x in inputs.items():
        if name not in grads:
            raise ValueError(f"backward returned no gradient for input {name!r} (got {sorted(grads)})")
        if np.shape(grads[name]) != x.shape:
            # relative_error would broadcast a wrong shape and could report a small error
            raise ValueError(f"gradient of {name!r} has shape {np.shape(grads[name])}, the input has {x.shape}")
    return grads


def check_gradients(forward, backward, inputs, rng, h=1e-6):
    """Compare a backward pass against central differences for every input.

    Parameters
    ----------
    forward : callable
        ``forward(**inputs) -> ndarray``, the function. Its inputs are the float64 arrays of
        ``inputs``, modified in place while differencing and restored.
    backward : callable
        ``backward(dout) -> {name: gradient}``, the hand-written backward, called after
        ``forward(**inputs)`` with the upstream gradient; one gradient per input, of its shape.
    inputs : dict
        ``{name: float64 ndarray}``.
    rng : numpy.random.Generator
        Draws the random upstream gradient ``g`` (standard normal, the output's shape).
    h : float
        Step of the central differences.

    Returns
    -------
    errors : dict
        ``{name: relative error}`` (see :func:`relative_error`); below ~1e-6 means right.

    Raises
    ------
    TypeError
        An input that is not a float64 array (float32 differences are rounding noise).
    ValueError
        A gradient missing or of the wrong shape (it would broadcast silently).
    """
    _check_inputs(inputs, rng)
    out = forward(**inputs)
    upstream = rng.standard_normal(np.shape(out))
    analytic = _analytic(backward, upstream, inputs)
    errors = {}
    for name, x in inputs.items():
        numeric = numerical_gradient(lambda: float(np.sum(forward(**inputs) * upstream)), x, h)
        errors[name] = relative_error(analytic[name], numeric)
    return errors


def check_directional(forward, backward, inputs, rng, h=1e-6):
    """One-random-direction check for inputs too large to difference coordinate by coordinate.

    Draws a direction ``v`` (one array per input) and compares ``Σ <grad, v>`` with
    ``(L(x + h v) - L(x - h v)) / 2h`` where ``L = <g, f(x)>``: two forward passes instead of
    two per coordinate. A single direction can miss an error orthogonal to it, but a random
    direction is orthogonal to a fixed wrong gradient with probability zero.

    Parameters and inputs are as for :func:`check_gradients`.

    Returns
    -------
    error : float
        ``|predicted - numeric| / max(|predicted|, |numeric|)``.
    """
    _check_inputs(inputs, rng)
    out = forward(**inputs)
    upstream = rng.standard_normal(np.shape(out))
    analytic = _analytic(backward, upstream, inputs)
    directions = {name: rng.standard_normal(x.shape) for name, x in inputs.items()}
    predicted = sum(float(np.sum(analytic[n] * d)) for n, d in directions.items())

    def shifted(sign):
        originals = {n: x.copy() for n, x in inputs.items()}
        for n, x in inputs.items():
            x += sign * h * directions[n]
        value = float(np.sum(forward(**inputs) * upstream))
        for n, x in inputs.items():
            x[...] = originals[n]
        return value

    numeric = (shifted(+1) - shifted(-1)) / (2 * h)
    return abs(predicted - numeric) / max(abs(predicted), abs(numeric), 1e-12)
