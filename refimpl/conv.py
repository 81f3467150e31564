r"""Dense 2-D convolution: a loop oracle and the im2row + GEMM reference.

Shapes everywhere: input ``x`` (N, C, H, W), weight ``w`` (K, C, kh, kw), bias ``b`` (K,),
output ``out`` (N, K, Ho, Wo) with

.. math::

    H_o = \left\lfloor \frac{H + 2 p_h - k_h}{s_h} \right\rfloor + 1, \qquad
    \text{out}[n, k, y, x] = b_k + \sum_{c, i, j} w[k, c, i, j]\,
        x_\text{pad}[n, c, s_h y + i, s_w x + j].

The loop version is the definition; the im2row version is how it is computed in practice: every
output position becomes one *row* of ``C * kh * kw`` input values, and the whole layer is one
matrix product of the (N·Ho·Wo, C·kh·kw) row matrix with the (C·kh·kw, K) kernel matrix.
Perforated convolution (:mod:`refimpl.perforation`) keeps only some of those rows.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import _checks


class ConvGeometry(NamedTuple):
    """Everything about a convolution's shape that does not depend on the values.

    ``kernel`` (kh, kw); ``stride`` (sh, sw), each at least 1; ``padding`` (ph, pw), zeros added
    on both sides of each axis; ``in_hw`` (H, W); ``out_hw`` (Ho, Wo), see
    :func:`conv_output_shape`.
    """

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]


def conv_output_shape(in_hw, kernel, stride=1, padding=0):
    r"""Output size of a convolution or pooling window: :math:`\lfloor (H + 2p - k) / s \rfloor + 1` per axis.

    Parameters
    ----------
    in_hw : pair of ints (H, W)
    kernel, stride : int or pair of ints, each at least 1
    padding : int or pair of non-negative ints

    Returns
    -------
    (Ho, Wo) : tuple of ints

    Raises
    ------
    ValueError
        If the kernel is larger than the padded input (there would be no output position).
    """
    (h, w) = _checks.positive_pair(in_hw, "in_hw")
    (kh, kw) = _checks.positive_pair(kernel, "kernel")
    (sh, sw), (ph, pw) = _checks.positive_pair(stride, "stride"), _checks.as_pair(padding, "padding")
    if kh > h + 2 * ph or kw > w + 2 * pw:
        raise ValueError(
            f"kernel {kh}x{kw} is larger than the padded input {h + 2 * ph}x{w + 2 * pw} "
            f"(input {h}x{w}, padding {(ph, pw)})"
        )
    return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1


def window_coordinates(positions, kernel, stride, padding, out_width):
    r"""Input coordinates read by the window of each output position.

    The window of output position :math:`(o_y, o_x)` reads input pixel
    :math:`(o_y s_h - p_h + i,\; o_x s_w - p_w + j)` for tap :math:`(i, j)`, :math:`0 \le i < k_h`,
    :math:`0 \le j < k_w`. A coordinate outside the input is a tap in the zero padding.

    Parameters
    ----------
    positions : integer ndarray, any shape
        Raster indices :math:`o_y W_o + o_x` of output positions.
    kernel, stride, padding : pairs of ints
        ``padding=(0, 0)`` gives coordinates in the padded input instead.
    out_width : int
        :math:`W_o`, the output's width.

    Returns
    -------
    iy, ix : int ndarrays of shape ``positions.shape + (kh, kw)``
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    oy, ox = np.divmod(np.asarray(positions), out_width)
    iy = oy[..., None, None] * sh - ph + np.arange(kh)[:, None]
    ix = ox[..., None, None] * sw - pw + np.arange(kw)[None, :]
    return np.broadcast_arrays(iy, ix)


def check_conv_args(x, w, b, stride, padding, check_finite=True):
    """Validate the arguments of a convolution and return them converted, plus the geometry.

    ``check_finite=False`` skips the scan for NaN/inf (a pass over ``x`` and ``w``): for a layer
    inside a network, where a non-finite value is the training loop's to report.

    Returns
    -------
    x, w, b : C-contiguous arrays of one float dtype (``b`` zeros when None)
    geometry : ConvGeometry

    Raises
    ------
    TypeError
        Non-array or non-float input, mixed dtypes, a non-integer stride or padding.
    ValueError
        Wrong ndim, an empty axis, a channel mismatch, a bias of the wrong length, NaN/inf
        values, a stride below 1, a negative padding, or a kernel larger than the padded input.
    """
    unchecked = not check_finite
    x = _checks.nonempty(_checks.float_array(x, "x", ndim=4, allow_nonfinite=unchecked), "x")
    w = _checks.nonempty(_checks.float_array(w, "w", ndim=4, allow_nonfinite=unchecked), "w")
    if b is None:
        b = np.zeros(w.shape[0], dtype=w.dtype)
    b = _checks.float_array(b, "b", ndim=1, allow_nonfinite=unchecked)
    _checks.same_dtype([x, w, b], ["x", "w", "b"])
    if w.shape[1] != x.shape[1]:
        raise ValueError(
            f"w has {w.shape[1]} input channels (w.shape[1]) but x has {x.shape[1]} (x.shape[1])"
        )
    if b.shape[0] != w.shape[0]:
        raise ValueError(f"b must have shape ({w.shape[0]},) to match w.shape[0], got {b.shape}")
    stride = _checks.positive_pair(stride, "stride")
    padding = _checks.as_pair(padding, "padding")
    kernel = (w.shape[2], w.shape[3])
    out_hw = conv_output_shape(x.shape[2:], kernel, stride, padding)
    return x, w, b, ConvGeometry(kernel, stride, padding, tuple(x.shape[2:]), out_hw)


def pad_input(x, padding):
    """Zero-pad the two spatial axes of ``x`` (N, C, H, W) to (N, C, H + 2 ph, W + 2 pw)."""
    ph, pw = padding
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))


def conv2d_naive(x, w, b=None, stride=1, padding=0):
    """Convolution by four nested loops: the definition, used as an oracle in the tests.

    Parameters
    ----------
    x : ndarray (N, C, H, W), float32 or float64
    w : ndarray (K, C, kh, kw), same dtype
    b : ndarray (K,) or None (no bias)
    stride : int or pair of ints, at least 1
    padding : int or pair of non-negative ints (zeros)

    Returns
    -------
    out : ndarray (N, K, Ho, Wo)
        ``out[n, k, y, x] = b[k] + Σ_{c,i,j} w[k, c, i, j] · x_pad[n, c, sh·y + i, sw·x + j]``.
    """
    x, w, b, g = check_conv_args(x, w, b, stride, padding)
    xp = pad_input(x, g.padding)
    (kh, kw), (sh, sw), (ho, wo) = g.kernel, g.stride, g.out_hw
    out = np.empty((x.shape[0], w.shape[0], ho, wo), dtype=x.dtype)
    for n in range(x.shape[0]):
        for k in range(w.shape[0]):
            for y in range(ho):
                for xx in range(wo):
                    window = xp[n, :, y * sh : y * sh + kh, xx * sw : xx * sw + kw]
                    out[n, k, y, xx] = b[k] + np.sum(window * w[k])
    return out


def im2row(x, geometry):
    """Unfold every receptive field of ``x`` into a row.

    Parameters
    ----------
    x : ndarray (N, C, H, W), validated
    geometry : ConvGeometry

    Returns
    -------
    rows : ndarray (N * Ho * Wo, C * kh * kw)
        Row ``n * Ho * Wo + y * Wo + x`` holds the padded input window of output position (y, x)
        of image n, flattened in (c, i, j) order — the order of ``w.reshape(K, -1)``.
    """
    (kh, kw), (sh, sw), (ho, wo) = geometry.kernel, geometry.stride, geometry.out_hw
    xp = pad_input(x, geometry.padding)
    windows = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))
    windows = windows[:, :, : (ho - 1) * sh + 1 : sh, : (wo - 1) * sw + 1 : sw]  # (N, C, Ho, Wo, kh, kw)
    n, c = x.shape[:2]
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw)


def row2im(drows, x_shape, geometry):
    """Adjoint of :func:`im2row`: scatter-add row gradients back onto the input.

    Parameters
    ----------
    drows : ndarray (N * Ho * Wo, C * kh * kw), gradients of the rows
    x_shape : (N, C, H, W)
    geometry : ConvGeometry

    Returns
    -------
    dx : ndarray (N, C, H, W); gradients that fell on the padding are dropped.

    Loops over the kh·kw kernel offsets; for one offset, distinct output positions read distinct
    input pixels, so a plain strided ``+=`` is safe (no two rows write the same pixel).
    """
    n, c, h, w = x_shape
    (kh, kw), (sh, sw), (ph, pw), (ho, wo) = geometry.kernel, geometry.stride, geometry.padding, geometry.out_hw
    d = drows.reshape(n, ho, wo, c, kh, kw)
    dxp = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=drows.dtype)
    for i in range(kh):
        for j in range(kw):
            dxp[:, :, i : i + (ho - 1) * sh + 1 : sh, j : j + (wo - 1) * sw + 1 : sw] += d[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    return dxp[:, :, ph : ph + h, pw : pw + w]


class Conv2dCache(NamedTuple):
    """What :func:`conv2d_backward` needs from the forward pass."""

    rows: np.ndarray  # (N*Ho*Wo, C*kh*kw) unfolded input
    w: np.ndarray  # (K, C, kh, kw)
    x_shape: tuple
    geometry: ConvGeometry


def conv2d_forward(x, w, b=None, stride=1, padding=0):
    """Dense convolution as one GEMM: ``out_rows = im2row(x) @ w.reshape(K, -1).T + b``.

    Parameters
    ----------
    x, w, b, stride, padding : as for :func:`conv2d_naive`

    Returns
    -------
    out : ndarray (N, K, Ho, Wo)
    cache : Conv2dCache
    """
    x, w, b, g = check_conv_args(x, w, b, stride, padding)
    rows = im2row(x, g)
    out_rows = rows @ w.reshape(w.shape[0], -1).T + b  # (N*Ho*Wo, K)
    n, (ho, wo) = x.shape[0], g.out_hw
    out = out_rows.reshape(n, ho, wo, -1).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(out), Conv2dCache(rows, w, x.shape, g)


def conv2d_backward(dout, cache):
    """Gradients of :func:`conv2d_forward`.

    With ``dY`` the (N·Ho·Wo, K) matrix of output gradients:
    ``dW = dYᵀ · rows``, ``db = Σ dY``, ``dX = row2im(dY · W)``.

    Parameters
    ----------
    dout : ndarray (N, K, Ho, Wo)
        Upstream gradient ∂L/∂out (cast to the forward dtype).
    cache : Conv2dCache

    Returns
    -------
    dx : (N, C, H, W), dw : (K, C, kh, kw), db : (K,)
    """
    k = cache.w.shape[0]
    dout = _checks.gradient(dout, "dout", (cache.x_shape[0], k, *cache.geometry.out_hw), cache.w.dtype)
    dy = dout.transpose(0, 2, 3, 1).reshape(-1, k)
    dw = (dy.T @ cache.rows).reshape(cache.w.shape)
    db = dy.sum(axis=0)
    dx = row2im(dy @ cache.w.reshape(k, -1), cache.x_shape, cache.geometry)
    return dx, dw, db


def conv_flops(n_positions, in_channels, out_channels, kernel):
    """FLOPs of a convolution evaluated at ``n_positions`` output positions (docs/spec.md §5.1).

    A multiply-add counts 2; padding taps are included; bias, fill and gathers are not:
    ``2 · C · kh · kw · K`` per computed position. The dense cost is this with
    ``n_positions = N · Ho · Wo``.

    Returns
    -------
    flops : int (a Python int: no overflow for large networks)
    """
    kh, kw = kernel
    return 2 * int(in_channels) * kh * kw * int(out_channels) * int(n_positions)
