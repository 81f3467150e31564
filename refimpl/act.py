r"""Adaptive computation time for residual networks (ACT, SPEC §2).

A block of ``L`` residual units :math:`U_l = U_{l-1} + f_l(U_{l-1})` gets a *halting head* after
every unit but the last: global average pooling of :math:`U_l` → linear to one value → sigmoid,

.. math:: h_l = \sigma\big(w_l^\top \operatorname{gap}(U_l) + b_l\big), \qquad b_l = -3 \text{ initially}.

The halting math of :mod:`refimpl.halting` turns the scores into the number of units ``N`` each
sample runs, the halting distribution ``p`` and the ponder cost ``ρ = N + R``; the block returns
:math:`\sum_n p_n U_n`. A sample stops once :math:`\sum_{i \le l} h_i \ge 1 - \varepsilon`, and
**units after N are not computed for it**: unit ``l`` runs on the sub-batch of samples still
running, so the work really shrinks (their FLOPs are counted per sample).

The bias −3 (:math:`\sigma(-3) \approx 0.047`) makes every unit run at the start and so receive
gradient. With a large positive bias the block halts after the first unit, and the later units
are never executed and never trained ("dead units").

Project choice: the optional batch norm of the head (SPEC §2, "(BatchNorm)") is left out; the
head is ``gap → linear → sigmoid``.

The loss adds :math:`\tau \cdot \operatorname{mean}_\text{batch}(\rho)` per block; the network
hands each block its share of that gradient through :meth:`ACTBlock.set_ponder_grad` before
calling ``backward``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import halting as _halting
from .layers import Layer, global_avg_pool_backward, global_avg_pool_forward

HALTING_BIAS = -3.0


def sigmoid(z):
    """Logistic function written with tanh, which never overflows."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


class HaltingHead(Layer):
    """ACT halting head: (N, C, H, W) → h (N,) = σ(w · gap(U) + b).

    Parameters
    ----------
    channels : int
    rng : numpy.random.Generator, draws the small initial weights (normal, std 0.01)
    bias : float, initial logit bias (default −3: every unit runs at the start)
    """

    def __init__(self, channels, rng, bias=HALTING_BIAS, dtype=np.float32):
        super().__init__()
        self.channels = int(channels)
        self.add_param("w", (0.01 * rng.standard_normal(self.channels)).astype(dtype))
        self.add_param("b", np.full(1, bias, dtype=dtype))
        self.flops_per_sample = 2 * self.channels  # the linear map; pooling adds are not counted

    def forward(self, u):
        pooled, gap_cache = global_avg_pool_forward(u)  # (N, C)
        h = sigmoid(pooled @ self.params["w"] + self.params["b"][0])
        self.cache = (pooled, gap_cache, h)
        return h.astype(u.dtype, copy=False)

    def backward(self, dh):
        pooled, gap_cache, h = self.cache
        dlogit = dh * h * (1.0 - h)
        self.accumulate("w", pooled.T @ dlogit)
        self.accumulate("b", np.array([dlogit.sum()], dtype=self.params["b"].dtype))
        dpooled = np.outer(dlogit, self.params["w"]).astype(dh.dtype, copy=False)
        return global_avg_pool_backward(dpooled, gap_cache)

    def __repr__(self):
        return f"HaltingHead({self.channels})"


class ACTCache(NamedTuple):
    unit_outputs: list  # U_1 .. U_L, each (N, C, H, W) for the whole batch (copied for skipped samples)
    ran: list  # per unit, the int indices of the samples that ran it
    halting: _halting.Halting


class ACTBlock(Layer):
    """A residual block with adaptive computation time, wrapping a list of units.

    Parameters
    ----------
    units : list of Layer
        Residual units, each ``forward(x) -> U`` and ``backward(dU) -> dx``; all but the first
        must keep the shape (the first may downsample). Typically a stage's ``units``.
    heads : list of HaltingHead, one per unit but the last (``len(units) - 1``)
    eps : float, the halting margin ε (0.01)

    After ``forward``: ``rho`` (N,) ponder cost, ``n_units`` (N,) units run per sample,
    ``flops_per_sample`` (N,) convolution + head FLOPs actually spent.
    """

    def __init__(self, units, heads, eps=_halting.EPS):
        super().__init__()
        if len(units) < 1:
            raise ValueError("units must hold at least one residual unit, got none")
        if len(heads) != len(units) - 1:
            raise ValueError(f"heads must hold len(units) - 1 = {len(units) - 1} halting heads, got {len(heads)}")
        self.units = list(units)
        self.heads = list(heads)
        self.eps = _halting.check_eps(eps)
        self.rho = None
        self.n_units = None
        self.flops_per_sample = None
        self._drho = None

    def set_ponder_grad(self, drho):
        """Gradient of the loss w.r.t. ``rho`` (N,) used by the next ``backward`` (default: none)."""
        self._drho = drho

    def forward(self, x):
        n = x.shape[0]
        running = np.arange(n)
        cumulative = np.zeros(n, dtype=x.dtype)
        scores = np.zeros((n, len(self.units) - 1), dtype=x.dtype)
        outputs, ran = [], []
        flops = np.zeros(n, dtype=np.int64)
        previous = x
        for index, unit in enumerate(self.units):
            out_sub = unit(previous[running])
            flops[running] += unit_flops(unit, running.size)
            if index == 0:
                current = out_sub
            else:
                current = previous.copy()  # skipped samples: U_l = U_{l-1}, weighted by p_l = 0
                current[running] = out_sub
            outputs.append(current)
            ran.append(running)
            if index == len(self.units) - 1:
                break
            head = self.heads[index]
            scores[running, index] = head(out_sub)
            flops[running] += head.flops_per_sample
            cumulative += scores[:, index]
            running = np.flatnonzero(_halting.still_running(cumulative, self.eps))
            previous = current
            if running.size == 0:
                outputs.extend([current] * (len(self.units) - 1 - index))
                ran.extend([running] * (len(self.units) - 1 - index))
                break
        result = _halting.halting_forward(scores, self.eps)
        self.cache = ACTCache(outputs, ran, result)
        self.rho, self.n_units, self.flops_per_sample = result.rho, result.n_units, flops
        stacked = np.stack(outputs)
        return _halting.weighted_output_forward(result.p, stacked).astype(x.dtype, copy=False)

    def backward(self, dout):
        outputs, ran, result = self.cache
        drho = self._drho
        self._drho = None
        dp, dunits = _halting.weighted_output_backward(dout, result.p, np.stack(outputs))
        dscores = _halting.halting_backward(dp, drho, result.cache).astype(dout.dtype, copy=False)
        carry = np.zeros_like(dout)
        for index in range(len(self.units) - 1, -1, -1):
            grad = dunits[index] + carry
            running = ran[index]
            if running.size == 0:
                carry = grad
                continue
            if index < len(self.units) - 1:
                grad[running] += self.heads[index].backward(dscores[running, index])
            dx_sub = self.units[index].backward(grad[running])
            if index == 0:
                carry = dx_sub
            else:
                carry = grad  # skipped samples pass the gradient straight through U_l = U_{l-1}
                carry[running] = dx_sub
        return carry

    def __repr__(self):
        return f"ACTBlock({len(self.units)} units, eps={self.eps})"


def unit_flops(unit, batch):
    """FLOPs per sample, (batch,) int64, of the unit's forward just run: the sum over its conv layers."""
    total = np.zeros(batch, dtype=np.int64)
    for layer in unit.layers():
        per_sample = getattr(layer, "flops_per_sample", None)
        if layer is not unit and isinstance(per_sample, np.ndarray) and per_sample.shape == (batch,):
            total += per_sample
    return total


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------


class AdaptiveResNet(Layer):
    """A CIFAR-style ResNet-(6n+2) whose three stages are adaptive blocks (ACT here, SACT in :mod:`refimpl.sact`).

    The stem, the residual units and the classifier head are those of :class:`refimpl.resnet.ResNet`
    (same construction, same parameter names ``stem``, ``stages.i.units.j``, ``head``); every stage
    gains halting heads ``stages.i.heads.j``.

    Forward: x (N, C, H, W) → logits (N, classes). After it: ``ponder_cost`` (Σ_blocks mean ρ),
    ``flops_per_sample`` (N,) and :meth:`extra_loss` = τ · ponder_cost, which :meth:`backward`
    differentiates along with the logits' gradient.

    Parameters
    ----------
    n, num_classes, in_channels, rng, widths, backend, dtype
        As :class:`refimpl.resnet.ResNet`.
    tau : float >= 0
        Weight of the ponder cost in the loss.
    halting_bias : float
        Initial bias of every halting logit (−3: every unit runs at first).
    eps : float
        Halting margin ε.
    """

    kind = "act"

    def __init__(self, n, num_classes, in_channels, rng, widths=(16, 32, 64), backend=None, tau=0.01,
                 halting_bias=HALTING_BIAS, eps=_halting.EPS, dtype=np.float32, **block_options):
        super().__init__()
        from . import _checks
        from .resnet import ResNet

        rng = _checks.generator(rng)
        if isinstance(tau, bool) or not isinstance(tau, (int, float, np.floating)) or tau < 0:
            raise ValueError(f"tau must be a non-negative real number, got {tau!r}")
        base = ResNet(n, num_classes, in_channels, rng, widths=widths, backend=backend, dtype=dtype)
        self.n, self.widths, self.tau = base.n, base.widths, float(tau)
        self.stem, self.head = base.stem, base.head
        self.stages = [self._make_block(stage.units, rng, halting_bias, eps, backend, dtype, **block_options)
                       for stage in base.stages]
        self.ponder_cost = None
        self.flops_per_sample = None

    def _make_block(self, units, rng, halting_bias, eps, backend, dtype):
        heads = [HaltingHead(unit.out_channels, rng, halting_bias, dtype) for unit in units[:-1]]
        return ACTBlock(units, heads, eps)

    @property
    def depth(self):
        return 6 * self.n + 2

    def forward(self, x):
        out = self.stem(x)
        flops = self.stem.flops_per_sample.copy()
        for block in self.stages:
            out = block(out)
            flops += block.flops_per_sample
        logits = self.head(out)
        flops += sum(layer.flops for layer in self.head.layers() if getattr(layer, "flops", 0)) // x.shape[0]
        self.ponder_cost = float(sum(np.mean(cost) for cost in self.block_ponder_costs()))
        self.flops_per_sample = flops
        return logits

    def block_ponder_costs(self):
        """Each block's ponder cost of the last forward (ρ = N + R; PACT overrides it with E_q[n])."""
        return [block.rho for block in self.stages]

    def extra_loss(self):
        """τ · Σ_blocks mean ρ of the last forward (add it to the task loss)."""
        return self.tau * self.ponder_cost

    def backward(self, dout):
        d = self.head.backward(dout)
        for block in reversed(self.stages):
            block.set_ponder_grad(np.full(block.rho.shape, self.tau / block.rho.size, dtype=block.rho.dtype))
            d = block.backward(d)
        return self.stem.backward(d)

    def ponder_map(self, in_hw):
        """Computation-time map (N, H, W): Σ_blocks ρ upsampled (nearest) to the input size ``in_hw``."""
        total = 0
        for block in self.stages:
            rho = block.rho if block.rho.ndim == 3 else np.broadcast_to(block.rho[:, None, None], block.rho.shape + (1, 1))
            total = total + _upsample_nearest(rho, in_hw)
        return total

    def __repr__(self):
        return f"{type(self).__name__}-{self.depth}(widths={self.widths}, tau={self.tau})"


class ACTResNet(AdaptiveResNet):
    """ResNet-(6n+2) with an ACT block per stage (see :class:`AdaptiveResNet`)."""


def _upsample_nearest(values, out_hw):
    """Nearest-neighbour resize (N, h, w) → (N, H, W): source row ``floor(i h / H)``."""
    n, h, w = values.shape
    rows = (np.arange(out_hw[0]) * h) // out_hw[0]
    cols = (np.arange(out_hw[1]) * w) // out_hw[1]
    return values[:, rows[:, None], cols[None, :]]


# ---------------------------------------------------------------------------------------------
# Builders for the model registry (refimpl.models): "act-resnet14", ...
# ---------------------------------------------------------------------------------------------


def adaptive_resnet_builder(network_class, depth):
    """A :mod:`refimpl.models` builder for ``network_class`` at ``depth`` = 6n + 2.

    Options: ``tau``, ``halting_bias``, ``eps``, ``widths`` (and ``execution`` for SACT).
    Perforation does not apply (the adaptive block decides what to compute).
    """
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"depth must be 6n + 2 with n >= 1, got {depth!r}")

    def build(num_classes, in_channels, rng, backend=None, perforation=None, dtype=np.float32, **options):
        if perforation:
            raise ValueError(f"{network_class.__name__} takes no perforation (its blocks choose what to compute), "
                             f"got perforation={perforation!r}")
        if "widths" in options:
            options["widths"] = tuple(options["widths"])
        return network_class((depth - 2) // 6, num_classes, in_channels, rng, backend=backend, dtype=dtype, **options)

    build.__name__ = f"build_{network_class.kind}_resnet{depth}"
    build.__doc__ = f"{network_class.__name__} of depth {depth}; options: tau, halting_bias, eps, widths."
    return build


build_act_resnet8 = adaptive_resnet_builder(ACTResNet, 8)
build_act_resnet14 = adaptive_resnet_builder(ACTResNet, 14)
build_act_resnet20 = adaptive_resnet_builder(ACTResNet, 20)
build_act_resnet32 = adaptive_resnet_builder(ACTResNet, 32)
build_act_resnet110 = adaptive_resnet_builder(ACTResNet, 110)
