r"""The sparse residual unit: a pre-activation residual unit computed only at active positions.

Given a unit's input :math:`x` (n, C, H, W), an **active mask** :math:`A` (n, H, W) and the
unit's parameters, the unit outputs

.. math:: U = x + A \odot f(x), \qquad f = \text{conv}_2 \circ \text{relu} \circ \text{bn}_2 \circ
          \text{conv}_1 \circ \text{relu} \circ \text{bn}_1,

computing the residual branch :math:`f` only where it is needed, with the perforated convolution
and ``fill="zero"`` (a skipped residual is a zero residual, so inactive positions keep
:math:`U = x`):

* conv2 runs on the active mask ``A``;
* conv1 runs on ``D``, ``A`` dilated by conv2's window (:func:`dilate`): the positions conv2 reads;
* masks are per sample (a :class:`~refimpl.perforation.PerforationPlan` of shape (n, H, W)).

**Batch norm under a mask (project choice).** In training both batch norms normalise with
statistics over ``D`` (the positions where the branch is computed) of the samples given, not over
every position, so the values at computed positions never depend on values the sparse path does
not compute (:func:`masked_batchnorm_forward`); the running statistics are updated from these. In
evaluation the running statistics are used and the mask plays no role. With every position active,
``D`` is everything and the unit is the ordinary one.

The reference for the sparse execution is the *dense masked* execution (``execution="dense"``):
compute the branch everywhere (same masked statistics) and multiply it by ``A``. Both give the same
output and gradients.

**The executor's interface** — :func:`sparse_unit_forward` ``(unit, x, active, execution) ->
(U, cache, flops)`` and :func:`sparse_unit_backward` ``(unit, dU, cache) -> dx`` (accumulating the
unit's parameter gradients), training or evaluation batch norm after ``unit.training`` — is the one
ACT-style spatial blocks (SACT, PACT per position) call. **Fused units.** A convolution backend
may offer a fused implementation of the same pair as its attribute ``fused_unit`` (an object with
``forward(unit, x, active) -> (U, cache, flops)`` and ``backward(unit, dU, cache) -> dx``, the
same semantics, ``execution="sparse"`` only); :func:`unit_executor` picks it when the unit's
convolutions run on such a backend, and this module's composition stays the definition the fused
unit is tested against.

FLOPs are counted where computed: ``|D|`` positions for conv1, ``|A|`` for conv2.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .layers import batchnorm_backward, batchnorm_forward, update_running_statistics

EXECUTIONS = ("sparse", "dense")


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


def dilate(mask, kernel):
    """Positions read by a stride-1 "same" convolution with window ``kernel`` evaluated on ``mask``.

    Parameters
    ----------
    mask : ndarray of bool (N, H, W)
    kernel : (kh, kw), odd sizes

    Returns
    -------
    ndarray of bool (N, H, W): ``mask`` dilated by the window, clipped to the image.
    """
    kh, kw = kernel
    rh, rw = kh // 2, kw // 2
    n, h, w = mask.shape
    padded = np.zeros((n, h + 2 * rh, w + 2 * rw), dtype=bool)
    padded[:, rh : rh + h, rw : rw + w] = mask
    out = np.zeros_like(mask)
    for i in range(kh):
        for j in range(kw):
            out |= padded[:, i : i + h, j : j + w]
    return out


# ---------------------------------------------------------------------------------------------
# Batch norm with statistics over a mask
# ---------------------------------------------------------------------------------------------


class MaskedBatchNormCache(NamedTuple):
    x_hat: np.ndarray  # (N, C, H, W)
    inv_std: np.ndarray  # (C,)
    gamma: np.ndarray
    mask: np.ndarray  # (N, 1, H, W) bool: the positions that gave the statistics
    count: int


def masked_batchnorm_forward(x, gamma, beta, mask, eps):
    r"""Batch norm of x (N, C, H, W) with statistics over the positions of ``mask`` (N, H, W) only.

    .. math:: \mu = \frac{1}{|M|}\sum_{M} x, \quad \sigma^2 = \frac{1}{|M|}\sum_{M} (x - \mu)^2,
              \quad y = \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta \text{ everywhere.}

    Returns ``y``, the batch ``(mean, var)`` (for running statistics) and the cache.
    """
    m = mask[:, None]
    count = int(mask.sum())
    mean = np.sum(x * m, axis=(0, 2, 3)) / count
    centred = x - mean[None, :, None, None]
    var = np.sum((centred * m) ** 2, axis=(0, 2, 3)) / count
    inv_std = 1.0 / np.sqrt(var + eps)
    x_hat = centred * inv_std[None, :, None, None]
    out = gamma[None, :, None, None] * x_hat + beta[None, :, None, None]
    return out.astype(x.dtype, copy=False), (mean, var), MaskedBatchNormCache(x_hat, inv_std, gamma, m, count)


def masked_batchnorm_backward(dout, cache):
    r"""Gradients ``(dx, dgamma, dbeta)`` of :func:`masked_batchnorm_forward`.

    Every output depends on the statistics, but only masked inputs produce them:

    .. math:: dx = \frac{\gamma}{\sqrt{\sigma^2+\epsilon}}\Big(dy - \frac{[x \in M]}{|M|}
              \big(\textstyle\sum dy + \hat x \sum dy\,\hat x\big)\Big).
    """
    dbeta = dout.sum(axis=(0, 2, 3))
    dgamma = (dout * cache.x_hat).sum(axis=(0, 2, 3))
    scale = (cache.gamma * cache.inv_std)[None, :, None, None]
    correction = (dbeta[None, :, None, None] + cache.x_hat * dgamma[None, :, None, None]) / cache.count
    dx = scale * (dout - cache.mask * correction)
    return dx.astype(dout.dtype, copy=False), dgamma, dbeta


def batchnorm_layer_forward(layer, x, mask):
    """Run a :class:`~refimpl.layers.BatchNorm2d` layer with statistics over ``mask`` (training) or its
    running statistics (evaluation). Returns ``(y, cache)`` for :func:`batchnorm_layer_backward`."""
    gamma, beta = layer.params["gamma"], layer.params["beta"]
    if not layer.training:
        out, cache = batchnorm_forward(x, gamma, beta, layer.buffers["running_mean"],
                                       layer.buffers["running_var"], layer.eps, False)
        return out.astype(x.dtype, copy=False), (batchnorm_backward, cache)
    out, (mean, var), cache = masked_batchnorm_forward(x, gamma, beta, mask, layer.eps)
    update_running_statistics(layer, mean, var, cache.count)
    return out, (masked_batchnorm_backward, cache)


def batchnorm_layer_backward(layer, dout, cache):
    """Gradient w.r.t. the input of :func:`batchnorm_layer_forward`; accumulates γ's and β's."""
    backward, inner = cache
    dx, dgamma, dbeta = backward(dout, inner)
    layer.accumulate("gamma", dgamma)
    layer.accumulate("beta", dbeta)
    return dx.astype(dout.dtype, copy=False)


# ---------------------------------------------------------------------------------------------
# The unit
# ---------------------------------------------------------------------------------------------


class SparseUnitCache(NamedTuple):
    active: np.ndarray  # (n, H, W) bool
    bn1: tuple
    bn2: tuple
    execution: str


def check_sparse_unit(unit):
    """A unit that can run sparsely: ``bn1, conv1, bn2, conv2`` stride-1 "same" convolutions and an identity shortcut."""
    for name in ("bn1", "relu1", "conv1", "bn2", "relu2", "conv2", "shortcut", "downsamples"):
        if not hasattr(unit, name):
            raise TypeError(f"a sparse unit needs attribute {name!r} (a refimpl.resnet.ResidualUnit), got {unit!r}")
    if unit.downsamples:
        raise ValueError(f"only the first unit of a block may downsample, got {unit!r} later in the block")
    for conv in (unit.conv1, unit.conv2):
        if conv.stride != (1, 1) or any(k % 2 == 0 or p != k // 2 for k, p in zip(conv.kernel, conv.padding)):
            raise ValueError(f"a sparse unit needs stride-1 'same' convolutions with odd kernels, got {conv!r}")


def branch_forward(unit, x, active, execution="sparse"):
    """Residual ``A ⊙ f(x)`` of a :class:`~refimpl.resnet.ResidualUnit`, computed only where needed.

    Parameters
    ----------
    unit : ResidualUnit with an identity shortcut
    x : ndarray (n, C, H, W)
    active : ndarray of bool (n, H, W); for ``"sparse"`` every sample has an active position
    execution : "sparse" (perforated convolutions on D and A) or "dense" (everything, then masked)

    Returns
    -------
    residual : ndarray (n, C, H, W), zero outside ``active``
    cache : SparseUnitCache
    flops : ndarray (n,) int64, conv1 + conv2 FLOPs actually spent per sample
    """
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {list(EXECUTIONS)}, got {execution!r}")
    compute = dilate(active, unit.conv2.kernel)
    h, bn1 = batchnorm_layer_forward(unit.bn1, x, compute)
    h = unit.relu1(h)
    h = unit.conv1(h, mask=compute, fill="zero") if execution == "sparse" else unit.conv1(h)
    flops = unit.conv1.flops_per_sample.copy()
    h, bn2 = batchnorm_layer_forward(unit.bn2, h, compute)
    h = unit.relu2(h)
    if execution == "sparse":
        residual = unit.conv2(h, mask=active, fill="zero")
    else:
        residual = unit.conv2(h) * active[:, None]
    flops += unit.conv2.flops_per_sample
    return residual, SparseUnitCache(active, bn1, bn2, execution), flops


def branch_backward(unit, dresidual, cache):
    """Gradient w.r.t. the branch input from the gradient of :func:`branch_forward`'s residual."""
    if cache.execution == "dense":
        dresidual = dresidual * cache.active[:, None]
    d = unit.conv2.backward(dresidual)
    d = batchnorm_layer_backward(unit.bn2, unit.relu2.backward(d), cache.bn2)
    d = unit.conv1.backward(d)
    return batchnorm_layer_backward(unit.bn1, unit.relu1.backward(d), cache.bn1)


def sparse_unit_forward(unit, x, active, execution="sparse"):
    """The unit's output ``U = x + A ⊙ f(x)`` (n, C, H, W); returns ``(U, cache, flops)`` as :func:`branch_forward`."""
    residual, cache, flops = branch_forward(unit, x, active, execution)
    return x + residual, cache, flops


def sparse_unit_backward(unit, dout, cache):
    """Gradient w.r.t. ``x`` of :func:`sparse_unit_forward`: the identity path plus the branch."""
    return dout + branch_backward(unit, dout, cache)


def unit_executor(unit, execution="sparse", fused=True):
    """The ``(forward, backward)`` pair that runs ``unit``: the fused unit of its backend or the composition here.

    Parameters
    ----------
    unit : ResidualUnit accepted by :func:`check_sparse_unit`
    execution : "sparse" or "dense"; the dense masked reference is never fused
    fused : bool, use the backend's ``fused_unit`` when both convolutions run on a backend that has one

    Returns
    -------
    forward : ``forward(unit, x, active) -> (U, cache, flops)``
    backward : ``backward(unit, dU, cache) -> dx``
    """
    backend = unit.conv1.backend
    fused_unit = getattr(backend, "fused_unit", None)
    if fused and execution == "sparse" and fused_unit is not None and unit.conv2.backend is backend:
        return fused_unit.forward, fused_unit.backward
    return (lambda u, x, active: sparse_unit_forward(u, x, active, execution)), sparse_unit_backward
