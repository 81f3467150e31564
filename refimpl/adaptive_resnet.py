r"""A CIFAR ResNet whose stages are adaptive blocks: the network ACT, SACT and PACT share.

The stem, the residual units and the classifier head are those of :class:`refimpl.resnet.ResNet`
(same construction, same parameter names ``stem``, ``stages.i.units.j``, ``head``); every stage
becomes an adaptive block built by the subclass (:meth:`AdaptiveResNet.make_block`) and gains
halting heads ``stages.i.heads.j``.

The training objective is the cross-entropy of the logits plus
:math:`\tau \cdot \texttt{ponder\_cost}`, where ``ponder_cost`` is
:math:`\sum_\text{blocks} \operatorname{mean}_{\text{batch}, \text{latents}}` of each block's
``ponder_cost`` (ρ for ACT and SACT, :math:`\mathbb{E}_q[n]` for PACT). :meth:`AdaptiveResNet.backward`
differentiates both: it hands every block its share of the penalty's gradient explicitly,
``block.backward(d, dponder_cost)``.
"""

from __future__ import annotations

import numpy as np

from . import _checks
from .layers import Layer
from .resnet import ResNet

DEPTHS = (8, 14, 20, 32, 110)  # the registered depths 6n + 2 (refimpl.models)


class AdaptiveResNet(Layer):
    """ResNet-(6n+2) with an adaptive block per stage; subclasses give :meth:`make_block`.

    Forward: x (N, C, H, W) → logits (N, classes). After it: ``ponder_cost`` (Σ_blocks mean of the
    blocks' ``ponder_cost``), ``flops_per_sample`` (N,), and :meth:`extra_loss` = τ · ponder_cost.

    Parameters
    ----------
    n, num_classes, in_channels, rng, widths, backend, dtype
        As :class:`refimpl.resnet.ResNet`.
    tau : float >= 0
        Weight of the ponder cost in the loss.
    **block_options
        Passed to :meth:`make_block` (the halting bias and the method's own options).
    """

    kind = None

    def __init__(self, n, num_classes, in_channels, rng, widths=(16, 32, 64), backend=None, tau=0.01,
                 dtype=np.float32, **block_options):
        super().__init__()
        rng = _checks.generator(rng)
        if isinstance(tau, bool) or not isinstance(tau, (int, float, np.floating)) or tau < 0:
            raise ValueError(f"tau must be a non-negative real number, got {tau!r}")
        base = ResNet(n, num_classes, in_channels, rng, widths=widths, backend=backend, dtype=dtype)
        self.n, self.widths, self.tau = base.n, base.widths, float(tau)
        self.stem, self.head = base.stem, base.head
        self.stages = [self.make_block(stage.units, rng, backend=backend, dtype=dtype, **block_options)
                       for stage in base.stages]
        self.ponder_cost = None

    def make_block(self, units, rng, backend, dtype, **options):
        """The adaptive block over a stage's ``units`` (with new halting heads drawn from ``rng``)."""
        raise NotImplementedError

    @property
    def depth(self):
        return 6 * self.n + 2

    def forward(self, x):
        out = self.stem(x)
        for block in self.stages:
            out = block(out)
        logits = self.head(out)
        self.ponder_cost = float(sum(np.mean(block.ponder_cost) for block in self.stages))
        return logits

    def extra_loss(self):
        """τ · Σ_blocks mean ponder cost of the last forward (added to the task loss)."""
        return self.tau * self.ponder_cost

    def ponder_cost_grad(self, block):
        """Gradient of :meth:`extra_loss` w.r.t. ``block.ponder_cost``: τ / its size everywhere."""
        cost = block.ponder_cost
        return np.full(cost.shape, self.tau / cost.size, dtype=cost.dtype)

    def backward(self, dout):
        """Gradient of the logits (upstream ``dout``) and of :meth:`extra_loss` w.r.t. the input."""
        return self.blocks_backward(dout, [{}] * len(self.stages))

    def blocks_backward(self, dout, block_arguments):
        """Backward through head, blocks (each also given its ponder-cost gradient and ``block_arguments[i]``) and stem."""
        d = self.head.backward(dout)
        for block, extra in zip(reversed(self.stages), reversed(block_arguments)):
            d = block.backward(d, self.ponder_cost_grad(block), **extra)
        return self.stem.backward(d)

    def ponder_map(self, in_hw):
        """Computation-time map (N, H, W): Σ_blocks of each block's ponder-cost map, upsampled (nearest) to ``in_hw``."""
        return sum(upsample_nearest(block.ponder_cost_map(), tuple(in_hw)) for block in self.stages)

    def __repr__(self):
        return f"{type(self).__name__}-{self.depth}(widths={self.widths}, tau={self.tau})"


def upsample_nearest(values, out_hw):
    """Nearest-neighbour resize (N, h, w) → (N, H, W): source row ``floor(i h / H)``."""
    n, h, w = values.shape
    rows = (np.arange(out_hw[0]) * h) // out_hw[0]
    cols = (np.arange(out_hw[1]) * w) // out_hw[1]
    return values[:, rows[:, None], cols[None, :]]


def adaptive_resnet_builder(network_class, depth, options_doc):
    """A :mod:`refimpl.models` builder for ``network_class`` at ``depth`` = 6n + 2.

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
    build.__doc__ = f"{network_class.__name__} of depth {depth}; options: {options_doc}."
    return build
