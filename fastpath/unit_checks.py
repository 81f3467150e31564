"""Argument checks shared by the fused residual units (:mod:`fastpath.cython_unit`, :mod:`fastpath.opencl_unit`).

Both fused units accept what :func:`refimpl.sparse_unit.sparse_unit_forward` accepts and reject the
rest with the same message, whatever the backend.
"""

from __future__ import annotations

import numpy as np

from refimpl.sparse_unit import check_sparse_unit


def check_unit_input(unit, x, active):
    """Check a fused unit's ``(unit, x, active)``; returns the dtype of the unit's weights.

    ``x`` must be an (n, C, H, W) NumPy array of the weights' dtype with C the unit's channels (in and
    out: a sparse unit keeps the shape), ``active`` a boolean (n, H, W) NumPy array.
    """
    check_sparse_unit(unit)
    channels = unit.conv1.in_channels
    if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"x must be a NumPy array of shape (n, {channels}, H, W), got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    dtype = unit.conv1.params["w"].dtype
    if x.dtype != dtype:
        raise TypeError(f"x has dtype {x.dtype} but the unit's weights are {dtype}")
    if unit.conv2.out_channels != channels:
        raise ValueError(f"a sparse unit keeps the shape: conv2 gives {unit.conv2.out_channels} channels, "
                         f"x has {channels}")
    n, _, h, w = x.shape
    if not isinstance(active, np.ndarray) or active.dtype != np.bool_ or active.shape != (n, h, w):
        raise ValueError(f"active must be a boolean NumPy array of shape {(n, h, w)}, got "
                         f"{getattr(active, 'dtype', type(active).__name__)} {getattr(active, 'shape', '')}")
    return dtype


def check_unit_gradient(dout, shape, dtype):
    """Check the upstream gradient of a fused unit's backward against the forward's output ``shape``/``dtype``."""
    if not isinstance(dout, np.ndarray) or dout.shape != tuple(shape) or dout.dtype != dtype:
        raise ValueError(f"dout must be a {np.dtype(dtype)} NumPy array of shape {tuple(shape)} (the forward's "
                         f"output), got {getattr(dout, 'dtype', type(dout).__name__)} {getattr(dout, 'shape', '')}")
    return dout
