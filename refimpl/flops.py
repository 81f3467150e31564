r"""FLOPs of a whole network, at the positions actually computed.

One convention everywhere (SPEC §1): a multiply-add counts 2; a convolution costs
``2 · C · kh · kw · K`` per *computed* output position (a perforated layer counts only its mask,
an SACT branch only its active positions), padding taps included; a linear layer costs
``2 · D · M`` per sample. Bias additions, batch norm, activations, pooling, fills and gathers are
not counted.

Every :class:`~refimpl.conv_layer.Conv2d` and :class:`~refimpl.layers.Linear` records in
``flops`` what its last forward spent (summed over the batch); these functions add them up. A
model that skips work for some samples (ACT, SACT) runs layers on sub-batches and records its own
per-image total in ``flops_per_sample``; :func:`flops_per_image` prefers that when present.
"""

from __future__ import annotations

import numpy as np


def layer_flops(model):
    """``{layer name: FLOPs of its last forward}`` for every layer that counts FLOPs."""
    return {name: int(layer.flops) for name, layer in model.named_layers()
            if layer is not model and isinstance(getattr(layer, "flops", None), (int, np.integer))}


def network_flops(model):
    """Total FLOPs of the last forward of ``model`` over its whole batch."""
    return int(sum(layer_flops(model).values()))


def last_flops_per_image(model, batch):
    """FLOPs per image of the last forward, (batch,) float array.

    Uses ``model.flops_per_sample`` when the model records it (adaptive models whose cost differs
    per image), else the network total divided evenly.
    """
    per_sample = getattr(model, "flops_per_sample", None)
    if isinstance(per_sample, np.ndarray) and per_sample.shape == (batch,):
        return per_sample.astype(np.float64)
    return np.full(batch, network_flops(model) / batch)


def flops_per_image(model, x):
    """Run ``model`` in evaluation mode on ``x`` (N, C, H, W) and return its FLOPs per image (N,)."""
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was_training)
    return last_flops_per_image(model, x.shape[0])


def dense_flops(model):
    """FLOPs per image of ``model`` with every convolution dense (the baseline for speed-ups).

    Computed from the geometry of the last forward (run one first): each convolution's
    per-position cost times all its output positions.
    """
    from .conv_layer import Conv2d

    total = 0
    for _, layer in model.named_layers():
        if isinstance(layer, Conv2d) and layer.cache is not None:
            ho, wo = layer.cache.plan.out_hw
            total += 2 * layer.in_channels * layer.kernel[0] * layer.kernel[1] * layer.out_channels * ho * wo
        elif hasattr(layer, "in_features") and hasattr(layer, "out_features"):
            total += 2 * layer.in_features * layer.out_features
    return total
