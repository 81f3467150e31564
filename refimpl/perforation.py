r"""Perforated convolution: evaluate a convolution only at the positions of a mask.

A *mask* ``M`` over output positions is boolean, (Ho, Wo) shared by the batch or (N, Ho, Wo) per
sample. The layer computes, for every computed position, exactly the value of the dense
convolution (the im2row rows of :mod:`refimpl.conv` restricted to ``M``, one GEMM for the whole
batch) and *fills* the others:

* ``fill="nearest"`` — the value of the nearest computed position (Euclidean distance on the
  (row, col) grid; ties go to the smallest raster index ``row * Wo + col``);
* ``fill="zero"`` — zero (SACT: a skipped residual is a zero residual);
* ``output="compact"`` — no fill: the (N, K, P) tensor of computed values, in raster order, which
  the next layer can read through an index table (:mod:`refimpl.implicit`).

The cost is ``(1 - r)`` of the dense cost for perforation rate ``r = 1 - |M| / (Ho Wo)``.

Backward: the compact gradient is the scatter-add of ``dY`` through the index map (nearest) or
``dY`` at the computed positions (zero); then ``dW = rowsᵀ dY_c``, ``db = Σ dY_c`` and
``dX = col2im`` of ``dY_c W`` restricted to ``M``.

Where things live: the plan — :class:`~refimpl.plan.PerforationPlan`, which turns a mask into
positions, counts and the nearest-neighbour index map (:func:`~refimpl.plan.nearest_index`) — is
in :mod:`refimpl.plan`; the NumPy kernels (:func:`~refimpl.numpy_kernels.compact_conv_forward`,
:func:`~refimpl.numpy_kernels.fill_forward`, ...) in :mod:`refimpl.numpy_kernels`. This module
holds the public pair :func:`perforated_conv2d_forward` / :func:`perforated_conv2d_backward`,
which validate and dispatch to a backend (:mod:`refimpl.backend`); those names are also
importable from here.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from . import _checks
from .backend import get_backend
from .conv import check_conv_args, conv_flops
from .numpy_kernels import (  # noqa: F401  (re-exported: importable from here as before)
    CompactConvCache,
    compact_conv_backward,
    compact_conv_forward,
    fill_backward,
    fill_forward,
    gather_rows,
)
from .plan import (  # noqa: F401  (re-exported)
    FILLS,
    INDEX_DTYPE,
    PerforationPlan,
    as_plan,
    frozen_copy,
    is_frozen,
    nearest_index,
    realised_rate,
)


class PerforatedConvCache(NamedTuple):
    """What :func:`perforated_conv2d_backward` needs: the backend, its cache, the plan and fill."""

    backend: Any
    conv_cache: Any
    plan: PerforationPlan
    fill: str | None  # None for output="compact"
    out_shape: tuple | None = None  # forward output shape, to check the upstream gradient
    dtype: Any = None
    check_finite: bool = True  # also reject a non-finite upstream gradient


def perforated_conv2d_forward(x, w, b=None, mask=None, stride=1, padding=0, fill="nearest",
                              output="dense", backend=None, check_finite=True):
    """Perforated convolution.

    Parameters
    ----------
    x : ndarray (N, C, H, W), float32 or float64
    w : ndarray (K, C, kh, kw)
    b : ndarray (K,) or None
    mask : ndarray of bool (Ho, Wo) or (N, Ho, Wo), or PerforationPlan, or None (dense)
    stride, padding : int or pair
    fill : {"nearest", "zero"}
        How the dense output is completed (ignored for ``output="compact"``).
    output : {"dense", "compact"}
        ``"dense"`` gives (N, K, Ho, Wo); ``"compact"`` gives (N, K, P) without filling.
    backend : ConvBackend, name, or None for the NumPy reference
    check_finite : bool
        Reject NaN/inf in ``x``, ``w``, ``b`` (and, in the backward, in ``dout``). A layer inside a
        network passes False: a non-finite activation is the training loop's to report, with the
        layer where it appeared, and scanning every activation costs a pass over it.

    Returns
    -------
    out : ndarray (N, K, Ho, Wo) or (N, K, P)
    cache : PerforatedConvCache

    Notes
    -----
    A full plan (every position computed, e.g. ``mask=None``) needs no fill: its compact tensor
    already holds the outputs in raster order, so it is returned reshaped (and the backward
    reshapes ``dout``) — exactly what either fill would give, without the copy.
    """
    x, w, b, geometry = check_conv_args(x, w, b, stride, padding, check_finite=check_finite)
    _checks.choice(fill, "fill", set(FILLS))
    _checks.choice(output, "output", {"dense", "compact"})
    plan = as_plan(mask, geometry.out_hw, x.shape[0])
    backend = get_backend(backend)
    compact, conv_cache = backend.conv_forward(x, w, b, plan, geometry)
    check_finite = bool(check_finite)
    if output == "compact":
        return compact, PerforatedConvCache(backend, conv_cache, plan, None, compact.shape, x.dtype, check_finite)
    if plan.full:
        dense = compact.reshape(x.shape[0], w.shape[0], *plan.out_hw)
    else:
        dense = backend.fill_forward(compact, plan, fill)
    return dense, PerforatedConvCache(backend, conv_cache, plan, fill, dense.shape, x.dtype, check_finite)


def perforated_conv2d_backward(dout, cache):
    """Gradients of :func:`perforated_conv2d_forward`.

    Parameters
    ----------
    dout : ndarray, the forward output's shape: (N, K, Ho, Wo), or (N, K, P) for ``output="compact"``
    cache : PerforatedConvCache

    Returns
    -------
    dx : (N, C, H, W), dw : (K, C, kh, kw), db : (K,)
        With nearest fill the compact gradient is the scatter-add of ``dout`` through the index
        map; with zero fill the filled positions' gradient is dropped.
    """
    if not isinstance(cache, PerforatedConvCache):
        raise TypeError(f"cache must be the PerforatedConvCache of perforated_conv2d_forward, got {type(cache).__name__}")
    backend = cache.backend
    if cache.out_shape is not None:
        dout = _checks.gradient(dout, "dout", cache.out_shape, cache.dtype, allow_nonfinite=not cache.check_finite)
    if cache.fill is None:
        dcompact = dout
    elif cache.plan.full:
        dcompact = dout.reshape(dout.shape[0], dout.shape[1], -1)
    else:
        dcompact = backend.fill_backward(dout, cache.plan, cache.fill)
    return backend.conv_backward(dcompact, cache.conv_cache)


def perforated_conv_flops(plan, batch, in_channels, out_channels, kernel):
    """FLOPs actually spent (docs/spec.md §5.1): ``2 · C · kh · kw · K`` per computed position over the batch.

    ``plan.computed_positions(batch)`` positions: ``|M| · N`` for a shared mask, ``Σ_n |M_n|``
    for per-sample masks. Returns a Python int.
    """
    return conv_flops(plan.computed_positions(batch), in_channels, out_channels, kernel)
