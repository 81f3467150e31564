r"""Spatially adaptive computation time (SACT, docs/spec.md §8): ACT at every position, with sparse execution.

Every position (x, y) of a block runs its own ACT: after unit ``l`` a halting probability

.. math::

    h_l(x, y) = \sigma\Big( (w^\text{loc}_l * U_l)(x, y) + b_l + w^{\text{glob}\,\top}_l \operatorname{gap}(U_l) \Big),
    \qquad b_l = -3 \text{ initially},

(:class:`~refimpl.halting_heads.SpatialHaltingHead`: a 3×3 convolution to one channel plus a
global term broadcast over space), then the halting math of :mod:`refimpl.halting` per position
gives ``N(x, y)``, ``p_n(x, y)`` and the ponder cost map ``ρ(x, y) = N + R``; the block outputs
:math:`\sum_n p_n(x, y)\, U_n(x, y, :)`.

**Sparse execution.** A position is *active* for unit ``l`` while it has not halted before ``l``.
Unit ``l`` is the sparse residual unit of :mod:`refimpl.sparse_unit` on the active mask ``A``:
its residual branch is computed only where needed (conv2 on ``A``, conv1 on ``A`` dilated by
conv2's window), inactive positions keep :math:`U_l = U_{l-1}`, and it runs only on the sub-batch of
samples with at least one active position (:class:`~refimpl.adaptive_block.SparseUnitStep`).

* the first unit of every block runs densely (every position is active before any halting; in
  stages 2 and 3 it is also the downsampling unit, which changes the resolution);
* the halting head's 3×3 convolution runs on ``A`` too (scores of halted positions are unused).

The reference for all of this is the *dense masked* execution (``execution="dense"``): compute
every unit everywhere and multiply the residual (and the scores) by ``A``. Both give the same
output and gradients (a test, on every backend). Batch norm uses statistics over the computed
positions in both (see :mod:`refimpl.sparse_unit`), so SACT with spatially constant halting
equals ACT.

FLOPs are counted where computed (the convention of docs/spec.md §5): ``|D|`` positions for conv1, ``|A|`` for
conv2 and the head's 3×3 conv, plus ``2C`` per sample for the head's global linear term.
"""

from __future__ import annotations

from . import halting
from .adaptive_block import PonderCostBlock, SparseUnitStep
from .adaptive_resnet import DEPTHS, AdaptiveResNet, adaptive_resnet_builder
from .halting_heads import HALTING_BIAS, SpatialHaltingHead
from .sparse_unit import EXECUTIONS

__all__ = ["EXECUTIONS", "SACTBlock", "SACTResNet", "SpatialHaltingHead"]


class SACTBlock(PonderCostBlock):
    """A residual block with spatially adaptive computation time: halting per position.

    ``execution`` (a property) switches between "sparse", the point of SACT, and "dense", the
    masked reference. After ``forward``: ``rho`` (N, H, W) ponder cost map, ``n_units`` (N, H, W),
    ``active_masks`` (list of (N, H, W): the positions each unit's residual was kept at) and
    ``flops_per_sample`` (N,); the backward takes the gradient w.r.t. ``rho`` explicitly
    (:meth:`~refimpl.adaptive_block.PonderCostBlock.backward`).

    Parameters
    ----------
    units : list of ResidualUnit; the first may downsample, the others must keep the shape
    heads : list of SpatialHaltingHead, ``len(units) - 1``
    eps : float, halting margin ε
    execution : "sparse" or "dense"
    fused : bool, run sparse units through the backend's fused unit where it has one (the
        attribute can be switched later, e.g. to time the composition of reference layers)
    """

    per_position = True

    def __init__(self, units, heads, eps=halting.EPS, execution="sparse", fused=True):
        super().__init__(units, heads, eps)
        self.execution, self.fused = execution, bool(fused)
        self.step().check(self.units)

    @property
    def execution(self):
        return self._execution

    @execution.setter
    def execution(self, value):
        if value not in EXECUTIONS:
            raise ValueError(f"execution must be one of {list(EXECUTIONS)}, got {value!r}")
        self._execution = value

    def step(self):
        return SparseUnitStep(self.execution, self.fused)

    def __repr__(self):
        return f"SACTBlock({len(self.units)} units, eps={self.eps}, execution={self.execution!r})"


class SACTResNet(AdaptiveResNet):
    """ResNet-(6n+2) with a SACT block per stage (see :class:`~refimpl.adaptive_resnet.AdaptiveResNet`).

    Extra parameters: ``halting_bias``, ``eps`` (as :class:`~refimpl.act.ACTResNet`) and
    ``execution``: "sparse" (default) or "dense" (the masked reference); the loss adds
    τ · Σ_blocks mean over batch and positions of ρ.
    """

    kind = "sact"

    def make_block(self, units, rng, backend, dtype, halting_bias=HALTING_BIAS, eps=halting.EPS, execution="sparse"):
        heads = [SpatialHaltingHead(unit.out_channels, rng, halting_bias, backend, dtype) for unit in units[:-1]]
        return SACTBlock(units, heads, eps, execution)

    def set_execution(self, execution):
        """Switch every block between "sparse" and "dense" (masked) execution."""
        for block in self.stages:
            block.execution = execution


OPTIONS = "tau, halting_bias, eps, widths, execution"
build_sact_resnet8, build_sact_resnet14, build_sact_resnet20, build_sact_resnet32, build_sact_resnet110 = (
    adaptive_resnet_builder(SACTResNet, depth, OPTIONS) for depth in DEPTHS)
