r"""Adaptive computation time for residual networks (ACT, docs/spec.md §7): halting per sample.

A block of ``L`` residual units :math:`U_l = U_{l-1} + f_l(U_{l-1})` gets a halting head after
every unit but the last (:class:`~refimpl.halting_heads.HaltingHead`: global average pooling →
linear → sigmoid),

.. math:: h_l = \sigma\big(w_l^\top \operatorname{gap}(U_l) + b_l\big), \qquad b_l = -3 \text{ initially}.

The halting math of :mod:`refimpl.halting` turns the halting probabilities into the number of
units ``N`` each sample runs, the halting distribution ``p`` and the ponder cost ``ρ = N + R``;
the block returns :math:`\sum_n p_n U_n`. A sample stops once
:math:`\sum_{i \le l} h_i \ge 1 - \varepsilon`, and **units after N are not computed for it**:
unit ``l`` runs on the sub-batch of samples still running (the loop of
:mod:`refimpl.adaptive_block` with its :class:`~refimpl.adaptive_block.WholeUnitStep`), so the
work really shrinks (FLOPs are counted per sample).

The bias −3 (:math:`\sigma(-3) \approx 0.047`) makes every unit run at the start and so receive
gradient. With a large positive bias the block halts after the first unit, and the later units
are never executed and never trained ("dead units").

The loss adds :math:`\tau \cdot \operatorname{mean}_\text{batch}(\rho)` per block; the network
hands each block that term's gradient explicitly, ``block.backward(dout, dponder_cost)``.
"""

from __future__ import annotations

from . import halting
from .adaptive_block import PonderCostBlock, WholeUnitStep
from .adaptive_resnet import DEPTHS, AdaptiveResNet, adaptive_resnet_builder
from .halting_heads import HALTING_BIAS, HaltingHead

__all__ = ["HALTING_BIAS", "ACTBlock", "ACTResNet", "HaltingHead"]


class ACTBlock(PonderCostBlock):
    """A residual block with adaptive computation time, wrapping a list of units: halting per sample.

    After ``forward``: ``rho`` (N,) ponder cost, ``n_units`` (N,) units run per sample,
    ``flops_per_sample`` (N,) convolution + head FLOPs actually spent. The backward takes the
    gradient w.r.t. ``rho`` explicitly (:meth:`~refimpl.adaptive_block.PonderCostBlock.backward`).

    Parameters
    ----------
    units : list of Layer
        Residual units, each ``forward(x) -> U`` and ``backward(dU) -> dx``; all but the first
        must keep the shape (the first may downsample). Typically a stage's ``units``.
    heads : list of HaltingHead, one per unit but the last (``len(units) - 1``)
    eps : float, the halting margin ε (0.01)
    """

    per_position = False

    def step(self):
        return WholeUnitStep()

    def __repr__(self):
        return f"ACTBlock({len(self.units)} units, eps={self.eps})"


class ACTResNet(AdaptiveResNet):
    """ResNet-(6n+2) with an ACT block per stage (see :class:`~refimpl.adaptive_resnet.AdaptiveResNet`).

    Extra parameters: ``halting_bias`` (initial bias of every halting logit, −3: every unit runs at
    first) and ``eps`` (the halting margin ε).
    """

    kind = "act"

    def make_block(self, units, rng, backend, dtype, halting_bias=HALTING_BIAS, eps=halting.EPS):
        heads = [HaltingHead(unit.out_channels, rng, halting_bias, dtype) for unit in units[:-1]]
        return ACTBlock(units, heads, eps)


OPTIONS = "tau, halting_bias, eps, widths"
build_act_resnet8, build_act_resnet14, build_act_resnet20, build_act_resnet32, build_act_resnet110 = (
    adaptive_resnet_builder(ACTResNet, depth, OPTIONS) for depth in DEPTHS)
