r"""Spatially adaptive computation time (SACT, SPEC §3): ACT at every position, with sparse execution.

Every position (x, y) of a block runs its own ACT: after unit ``l`` a halting score

.. math::

    h_l(x, y) = \sigma\Big( (w^\text{loc}_l * U_l)(x, y) + b_l + w^{\text{glob}\,\top}_l \operatorname{gap}(U_l) \Big),
    \qquad b_l = -3 \text{ initially},

(a 3×3 convolution to one channel plus a global term broadcast over space), then the halting math
of :mod:`refimpl.halting` per position gives ``N(x, y)``, ``p_n(x, y)`` and the ponder cost map
``ρ(x, y) = N + R``; the block outputs :math:`\sum_n p_n(x, y)\, U_n(x, y, :)`.

**Sparse execution.** A position is *active* for unit ``l`` while it has not halted before ``l``.
The residual branch :math:`f_l` is computed only where it is needed, with the perforated
convolution and ``fill="zero"`` (a skipped residual is a zero residual, so inactive positions
keep :math:`U_l = U_{l-1}`):

* the last convolution (conv2) runs on the active mask ``A``;
* the first (conv1) runs on ``D``, ``A`` dilated by conv2's window (3×3), the positions conv2 reads;
* masks are per sample (a :class:`~refimpl.perforation.PerforationPlan` of shape (n, H, W)), and a
  unit runs only on the sub-batch of samples with at least one active position;
* the first unit of every block runs densely (every position is active before any halting; in
  stages 2 and 3 it is also the downsampling unit, which changes the resolution);
* the halting head's 3×3 convolution runs on ``A`` too (scores of halted positions are unused).

The reference for all of this is the *dense masked* execution (``execution="dense"``): compute
every unit everywhere and multiply the residual (and the scores) by ``A``. Both give the same
output and gradients (a test, on every backend).

**Batch norm under sparse execution (project choice).** In training, both batch norms of a unit
normalise with statistics over the positions ``D`` where its branch is computed, over the samples
that run it — not over every position — so that the values at computed positions do not depend on
the values the sparse path never computes. The dense masked execution uses the same masked
statistics, which is what makes the two equal; when every position is active, ``D`` is everything
and the unit is the ordinary one (so SACT with spatially constant halting equals ACT). In
evaluation the running statistics are used and the mask plays no role.

FLOPs are counted where computed (SPEC §1 convention): ``|D|`` positions for conv1, ``|A|`` for
conv2 and the head's 3×3 conv, plus ``2C`` per sample for the head's global linear term.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import halting as _halting
from .act import HALTING_BIAS, AdaptiveResNet, adaptive_resnet_builder, sigmoid, unit_flops
from .conv_layer import Conv2d
from .layers import Layer, batchnorm_backward, batchnorm_forward, global_avg_pool_backward, global_avg_pool_forward

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


def _bn_forward(layer, x, mask):
    """Run a :class:`~refimpl.layers.BatchNorm2d` layer's parameters with masked batch statistics."""
    gamma, beta = layer.params["gamma"], layer.params["beta"]
    if not layer.training:
        out, cache = batchnorm_forward(x, gamma, beta, layer.buffers["running_mean"],
                                       layer.buffers["running_var"], layer.eps, False)
        return out.astype(x.dtype, copy=False), ("eval", cache)
    out, (mean, var), cache = masked_batchnorm_forward(x, gamma, beta, mask, layer.eps)
    m = cache.count
    rm, rv = layer.buffers["running_mean"], layer.buffers["running_var"]
    rm *= 1 - layer.momentum
    rm += layer.momentum * mean
    rv *= 1 - layer.momentum
    rv += layer.momentum * var * (m / max(m - 1, 1))
    return out, ("masked", cache)


def _bn_backward(layer, dout, cache):
    kind, inner = cache
    backward = batchnorm_backward if kind == "eval" else masked_batchnorm_backward
    dx, dgamma, dbeta = backward(dout, inner)
    layer.accumulate("gamma", dgamma)
    layer.accumulate("beta", dbeta)
    return dx.astype(dout.dtype, copy=False)


# ---------------------------------------------------------------------------------------------
# The residual branch at active positions
# ---------------------------------------------------------------------------------------------


class BranchCache(NamedTuple):
    active: np.ndarray  # (n, H, W) bool
    bn1: tuple
    bn2: tuple
    execution: str


def check_sact_unit(unit):
    """A unit SACT can run sparsely: ``bn1, conv1, bn2, conv2`` stride-1 same-size 3×3-style convs and an identity shortcut."""
    for name in ("bn1", "relu1", "conv1", "bn2", "relu2", "conv2", "shortcut"):
        if not hasattr(unit, name):
            raise TypeError(f"a SACT unit needs attribute {name!r} (a refimpl.resnet.ResidualUnit), got {unit!r}")
    if getattr(unit, "downsamples", True):
        raise ValueError(f"only the first unit of a block may downsample, got {unit!r} later in the block")
    for conv in (unit.conv1, unit.conv2):
        if conv.stride != (1, 1) or any(k % 2 == 0 or p != k // 2 for k, p in zip(conv.kernel, conv.padding)):
            raise ValueError(f"SACT needs stride-1 'same' convolutions with odd kernels, got {conv!r}")


def branch_forward(unit, x, active, execution="sparse"):
    """Residual ``f(x)`` of a :class:`~refimpl.resnet.ResidualUnit`, kept only at ``active`` positions.

    Parameters
    ----------
    unit : ResidualUnit with an identity shortcut
    x : ndarray (n, C, H, W)
    active : ndarray of bool (n, H, W); for ``"sparse"`` every sample has an active position
    execution : "sparse" (perforated convolutions on D and A) or "dense" (everything, then masked)

    Returns
    -------
    residual : ndarray (n, C, H, W), zero outside ``active``
    cache : BranchCache
    flops : ndarray (n,) int64, conv1 + conv2 FLOPs actually spent per sample
    """
    compute = dilate(active, unit.conv2.kernel)
    h, bn1 = _bn_forward(unit.bn1, x, compute)
    h = unit.relu1(h)
    h = unit.conv1(h, mask=compute, fill="zero") if execution == "sparse" else unit.conv1(h)
    flops = unit.conv1.flops_per_sample.copy()
    h, bn2 = _bn_forward(unit.bn2, h, compute)
    h = unit.relu2(h)
    if execution == "sparse":
        residual = unit.conv2(h, mask=active, fill="zero")
    else:
        residual = unit.conv2(h) * active[:, None]
    flops += unit.conv2.flops_per_sample
    return residual, BranchCache(active, bn1, bn2, execution), flops


def branch_backward(unit, dresidual, cache):
    """Gradient w.r.t. the branch input from the gradient of :func:`branch_forward`'s residual."""
    if cache.execution == "dense":
        dresidual = dresidual * cache.active[:, None]
    d = unit.conv2.backward(dresidual)
    d = _bn_backward(unit.bn2, unit.relu2.backward(d), cache.bn2)
    d = unit.conv1.backward(d)
    return _bn_backward(unit.bn1, unit.relu1.backward(d), cache.bn1)


# ---------------------------------------------------------------------------------------------
# Halting head and block
# ---------------------------------------------------------------------------------------------


class SpatialLogitHead(Layer):
    """Per-position halting logits: U (n, C, H, W) → (n, H, W), a 3×3 conv plus a global term.

    ``local``: a 3×3 convolution to one channel (bias −3); ``w_global`` (C,): the global term
    ``w_global · gap(U)`` (no bias), broadcast over space. Weights start as N(0, 0.01²).
    ``active`` (n, H, W), if given, computes the local convolution only there (perforated, zero
    elsewhere): logits of halted positions are never used. PACT uses the logits directly
    (:mod:`refimpl.pact_resnet`); SACT takes their sigmoid (:class:`SpatialHaltingHead`).
    """

    def __init__(self, channels, rng, bias=HALTING_BIAS, backend=None, dtype=np.float32):
        super().__init__()
        self.channels = int(channels)
        self.local = Conv2d(channels, 1, 3, rng, padding=1, bias=True, backend=backend, dtype=dtype)
        self.local.params["w"][...] = 0.01 * rng.standard_normal(self.local.params["w"].shape)
        self.local.params["b"][...] = bias
        self.add_param("w_global", (0.01 * rng.standard_normal(self.channels)).astype(dtype))

    def flops(self, u):
        """FLOPs per sample of the last forward: the local conv where computed, plus 2C for the global term."""
        return self.local.flops_per_sample + 2 * self.channels

    def forward(self, u, active=None):
        local = (self.local(u) if active is None else self.local(u, mask=active, fill="zero"))[:, 0]
        pooled, gap_cache = global_avg_pool_forward(u)
        self.cache = (pooled, gap_cache)
        return (local + (pooled @ self.params["w_global"])[:, None, None]).astype(u.dtype, copy=False)

    def backward(self, dlogit):
        pooled, gap_cache = self.cache
        du = self.local.backward(np.ascontiguousarray(dlogit[:, None]))
        dglobal = dlogit.sum(axis=(1, 2))
        self.accumulate("w_global", pooled.T @ dglobal)
        return du + global_avg_pool_backward(np.outer(dglobal, self.params["w_global"]).astype(dlogit.dtype),
                                             gap_cache)

    def __repr__(self):
        return f"{type(self).__name__}({self.channels})"


class SpatialHaltingHead(SpatialLogitHead):
    """SACT halting head: U (n, C, H, W), active (n, H, W) → h = σ(logit) (n, H, W), zero where not active.

    ``execution="dense"`` computes the local convolution everywhere (the dense-masked reference).
    """

    flops_per_sample = None  # (n,) after a forward

    def forward(self, u, active, execution="sparse"):
        logit = super().forward(u, active if execution == "sparse" else None)
        h = sigmoid(logit) * active
        self.halting_cache = (h, active)
        self.flops_per_sample = self.flops(u)
        return h.astype(u.dtype, copy=False)

    def backward(self, dh):
        h, active = self.halting_cache
        return super().backward(dh * h * (1.0 - h) * active)


class SACTCache(NamedTuple):
    unit_outputs: list  # U_1 .. U_L for the whole batch
    ran: list  # per unit, the samples it ran on
    branch_caches: list
    halting: _halting.Halting


class SACTBlock(Layer):
    """A residual block with spatially adaptive computation time.

    Parameters
    ----------
    units : list of ResidualUnit; the first may downsample, the others must keep the shape
    heads : list of SpatialHaltingHead, ``len(units) - 1``
    eps : float, halting margin ε
    execution : "sparse" (the point of SACT) or "dense" (the masked reference)

    After ``forward``: ``rho`` (N, H, W) ponder cost map, ``n_units`` (N, H, W),
    ``active_masks`` (list of (N, H, W): the positions each unit's residual was kept at),
    ``flops_per_sample`` (N,).
    """

    def __init__(self, units, heads, eps=_halting.EPS, execution="sparse"):
        super().__init__()
        if len(units) < 1:
            raise ValueError("units must hold at least one residual unit, got none")
        if len(heads) != len(units) - 1:
            raise ValueError(f"heads must hold len(units) - 1 = {len(units) - 1} halting heads, got {len(heads)}")
        for unit in units[1:]:
            check_sact_unit(unit)
        self.units, self.heads = list(units), list(heads)
        self.eps = _halting.check_eps(eps)
        self.execution = execution
        self.rho = self.n_units = self.flops_per_sample = None
        self.active_masks = []
        self._drho = None

    @property
    def execution(self):
        return self._execution

    @execution.setter
    def execution(self, value):
        if value not in EXECUTIONS:
            raise ValueError(f"execution must be one of {list(EXECUTIONS)}, got {value!r}")
        self._execution = value

    def set_ponder_grad(self, drho):
        """Gradient of the loss w.r.t. ``rho`` (N, H, W) used by the next ``backward``."""
        self._drho = drho

    def forward(self, x):
        n, n_units = x.shape[0], len(self.units)
        current = self.units[0](x)  # dense: nothing has halted yet
        flops = unit_flops(self.units[0], n)
        hw = current.shape[2:]
        active = np.ones((n, *hw), dtype=bool)
        running = np.arange(n)
        cumulative = np.zeros((n, *hw), dtype=x.dtype)
        scores = np.zeros((n, *hw, n_units - 1), dtype=x.dtype)
        outputs, ran, branch_caches, masks = [current], [running], [None], [active]
        for index in range(1, n_units):
            head = self.heads[index - 1]
            scores[running, ..., index - 1] = head(current[running], active[running], self.execution)
            flops[running] += head.flops_per_sample
            cumulative += scores[..., index - 1]
            active = _halting.still_running(cumulative, self.eps)
            running = np.flatnonzero(active.any(axis=(1, 2)))
            if running.size == 0:
                outputs.extend([current] * (n_units - index))
                ran.extend([running] * (n_units - index))
                branch_caches.extend([None] * (n_units - index))
                masks.extend([active] * (n_units - index))
                break
            if self.execution == "dense":
                running = np.arange(n)
            residual, cache, branch_flops = branch_forward(self.units[index], current[running], active[running],
                                                         self.execution)
            flops[running] += branch_flops
            current = current.copy()
            current[running] += residual
            outputs.append(current)
            ran.append(running)
            branch_caches.append(cache)
            masks.append(active)
        result = _halting.halting_forward(scores, self.eps)
        self.cache = SACTCache(outputs, ran, branch_caches, result)
        self.rho, self.n_units, self.flops_per_sample, self.active_masks = result.rho, result.n_units, flops, masks
        return np.einsum("nhwl,lnchw->nchw", result.p, np.stack(outputs)).astype(x.dtype, copy=False)

    def backward(self, dout):
        outputs, ran, branch_caches, result = self.cache
        drho = self._drho
        self._drho = None
        stacked = np.stack(outputs)
        dp = np.einsum("nchw,lnchw->nhwl", dout, stacked)
        dscores = _halting.halting_backward(dp, drho, result.cache).astype(dout.dtype, copy=False)
        carry = np.zeros_like(dout)
        for index in range(len(self.units) - 1, -1, -1):
            grad = result.p[..., index][:, None] * dout + carry
            if index < len(self.units) - 1 and ran[index].size:
                rows = ran[index]
                grad[rows] += self.heads[index].backward(dscores[rows, ..., index])
            if index == 0:
                carry = self.units[0].backward(grad)
            else:
                carry = grad  # U_l = U_{l-1} + residual: the identity path
                rows = ran[index]
                if rows.size:
                    carry[rows] += branch_backward(self.units[index], grad[rows], branch_caches[index])
        return carry.astype(dout.dtype, copy=False)

    def __repr__(self):
        return f"SACTBlock({len(self.units)} units, eps={self.eps}, execution={self.execution!r})"


class SACTResNet(AdaptiveResNet):
    """ResNet-(6n+2) with a SACT block per stage (see :class:`refimpl.act.AdaptiveResNet`).

    Extra parameter ``execution``: "sparse" (default) or "dense" (the masked reference); the
    loss adds τ · Σ_blocks mean over batch and positions of ρ.
    """

    kind = "sact"

    def _make_block(self, units, rng, halting_bias, eps, backend, dtype, execution="sparse"):
        heads = [SpatialHaltingHead(unit.out_channels, rng, halting_bias, backend, dtype) for unit in units[:-1]]
        return SACTBlock(units, heads, eps, execution)

    def set_execution(self, execution):
        """Switch every block between "sparse" and "dense" (masked) execution."""
        for block in self.stages:
            block.execution = execution


build_sact_resnet8 = adaptive_resnet_builder(SACTResNet, 8)
build_sact_resnet14 = adaptive_resnet_builder(SACTResNet, 14)
build_sact_resnet20 = adaptive_resnet_builder(SACTResNet, 20)
build_sact_resnet32 = adaptive_resnet_builder(SACTResNet, 32)
build_sact_resnet110 = adaptive_resnet_builder(SACTResNet, 110)
