"""Gradient checks of whole layers (input and every parameter) by central differences.

A layer's ``forward`` reads its parameter arrays in place, so the differencing perturbs
``layer.params[name]`` directly. For layers with many parameters a random subset of coordinates
of each parameter array is checked (every array is still covered).
"""

from __future__ import annotations

import numpy as np

from refimpl.gradcheck import relative_error


def _numeric(loss, array, index, h):
    old = array[index]
    array[index] = old + h
    plus = loss()
    array[index] = old - h
    minus = loss()
    array[index] = old
    return (plus - minus) / (2 * h)


def layer_gradient_errors(layer, x, rng, coords_per_param=None, h=1e-6, forward=None, before_forward=None):
    """Relative errors of ``layer.backward`` against central differences of ``<g, layer(x)>``.

    Parameters
    ----------
    layer : Layer (float64 parameters)
    x : float64 input (perturbed in place and restored)
    rng : Generator for the random upstream gradient g and the coordinate subsets
    coords_per_param : None (every coordinate) or how many random coordinates per array
    forward : callable(x) -> out, defaults to ``layer.forward``
    before_forward : callable() run before every forward (e.g. re-seeding a dropout generator)

    Returns
    -------
    dict name -> relative error ("x" for the input, parameter names otherwise)
    """
    forward = forward or layer.forward

    def run():
        if before_forward is not None:
            before_forward()
        return forward(x)

    out = run()
    upstream = rng.standard_normal(out.shape)
    layer.zero_grad()
    dx = layer.backward(upstream.copy())
    analytic = {"x": dx}
    arrays = {"x": x}
    for name, param, grad in layer.named_parameters():
        analytic[name] = grad.copy()
        arrays[name] = param

    def loss():
        return float(np.sum(run() * upstream))

    errors = {}
    for name, array in arrays.items():
        if coords_per_param is None or array.size <= coords_per_param:
            indices = list(np.ndindex(array.shape))
        else:
            flat = rng.choice(array.size, size=coords_per_param, replace=False)
            indices = [np.unravel_index(i, array.shape) for i in flat]
        numeric = np.array([_numeric(loss, array, i, h) for i in indices])
        exact = np.array([analytic[name][i] for i in indices])
        errors[name] = relative_error(exact, numeric)
    return errors
