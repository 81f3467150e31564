r"""Dense max and average pooling over (N, C, H, W), forward and backward.

The window, stride and padding follow convolution's conventions (:func:`refimpl.conv.conv_output_shape`).
Padding taps are never read: max pooling takes the max over in-bounds values, average pooling
divides by the number of in-bounds taps. Max ties go to the first tap in (i, j) raster order.
Padding must be at most half the window, so every window holds at least one real value.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import _checks
from .conv import conv_output_shape


class Pool2dCache(NamedTuple):
    """What :func:`pool2d_backward` needs."""

    mode: str
    x_shape: tuple
    weights: np.ndarray  # (N, C, Ho, Wo, kh, kw): d out / d window tap
    size: tuple
    stride: tuple
    padding: tuple


def pool_padding_is_valid(size, padding):
    """Whether every window of a pooling with this ``size`` and ``padding`` reads a real value.

    That holds when the padding is at most half the window in each direction; with more, a window
    at the border would read nothing but padding (undefined for max, a division by zero for avg).
    """
    return padding[0] <= size[0] // 2 and padding[1] <= size[1] // 2


def check_pool_padding(size, padding, name="padding"):
    """Raise ``ValueError`` naming ``name`` unless :func:`pool_padding_is_valid`."""
    if not pool_padding_is_valid(size, padding):
        raise ValueError(f"{name} must be at most half the pooling size {tuple(size)}, got {tuple(padding)}")


def check_pool_args(x, mode, size, stride, padding):
    """Validate pooling arguments; ``stride=None`` means ``stride = size``. Returns them converted."""
    x = _checks.nonempty(_checks.float_array(x, "x", ndim=4), "x")
    _checks.choice(mode, "mode", {"max", "avg"})
    size = _checks.positive_pair(size, "size")
    stride = size if stride is None else _checks.positive_pair(stride, "stride")
    padding = _checks.as_pair(padding, "padding")
    check_pool_padding(size, padding)
    return x, size, stride, padding


def pool2d_forward(x, mode="max", size=2, stride=None, padding=0):
    """Max or average pooling.

    Parameters
    ----------
    x : ndarray (N, C, H, W), float32 or float64
    mode : {"max", "avg"}
    size : int or pair, the window (kh, kw)
    stride : int or pair, or None for ``size`` (non-overlapping windows)
    padding : int or pair, at most half the window

    Returns
    -------
    out : ndarray (N, C, Ho, Wo)
        Max or mean over the in-bounds taps of each window (padding is never read).
    cache : Pool2dCache
    """
    x, size, stride, padding = check_pool_args(x, mode, size, stride, padding)
    (kh, kw), (sh, sw), (ph, pw) = size, stride, padding
    ho, wo = conv_output_shape(x.shape[2:], size, stride, padding)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    inside = np.pad(np.ones(x.shape[2:], dtype=bool), ((ph, ph), (pw, pw)))
    view = np.lib.stride_tricks.sliding_window_view
    windows = view(xp, (kh, kw), axis=(2, 3))[:, :, : (ho - 1) * sh + 1 : sh, : (wo - 1) * sw + 1 : sw]
    valid = view(inside, (kh, kw))[: (ho - 1) * sh + 1 : sh, : (wo - 1) * sw + 1 : sw]
    flat = windows.reshape(*windows.shape[:4], kh * kw)
    valid_flat = np.broadcast_to(valid.reshape(ho, wo, kh * kw), flat.shape)
    if mode == "max":
        first = np.argmax(np.where(valid_flat, flat, -np.inf), axis=-1)
        out = np.take_along_axis(flat, first[..., None], axis=-1)[..., 0]
        weights = np.zeros(flat.shape, dtype=x.dtype)
        np.put_along_axis(weights, first[..., None], 1.0, axis=-1)
    else:
        weights = (valid_flat / valid_flat.sum(axis=-1, keepdims=True)).astype(x.dtype)
        out = (flat * weights).sum(axis=-1)
    cache = Pool2dCache(mode, x.shape, weights.reshape(*flat.shape[:4], kh, kw), size, stride, padding)
    return np.ascontiguousarray(out, dtype=x.dtype), cache


def pool2d_backward(dout, cache):
    """Gradient ``dx`` (N, C, H, W) of :func:`pool2d_forward` from ``dout`` (N, C, Ho, Wo).

    Max pooling routes each output's gradient to its (first) maximal tap; average pooling
    spreads it evenly over the in-bounds taps.
    """
    dout = _checks.gradient(dout, "dout", cache.weights.shape[:4], cache.weights.dtype)
    n, c, h, w = cache.x_shape
    (kh, kw), (sh, sw), (ph, pw) = cache.size, cache.stride, cache.padding
    ho, wo = dout.shape[2:]
    dxp = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=dout.dtype)
    contrib = dout[..., None, None] * cache.weights
    for i in range(kh):
        for j in range(kw):
            dxp[:, :, i : i + (ho - 1) * sh + 1 : sh, j : j + (wo - 1) * sw + 1 : sw] += contrib[..., i, j]
    return dxp[:, :, ph : ph + h, pw : pw + w]
