r"""FLOPs of a whole network, at the positions actually computed.

One convention everywhere (docs/spec.md §5): a multiply-add counts 2; a convolution costs
``2 · C · kh · kw · K`` per *computed* output position (:func:`refimpl.conv.conv_flops`, the one
place the formula is written; a perforated layer counts only its mask, a sparse residual unit only
its active positions), padding taps included; a linear layer costs ``2 · D · M`` per sample. Bias
additions, batch norm, activations, pooling, fills and gathers are not counted.

**One form.** Every layer reports ``flops_per_sample`` after its forward: an int64 array (N,), the
FLOPs each sample of the batch spent in the layer and everything inside it (the layer protocol of
:mod:`refimpl.layers`). Adaptive blocks, whose cost differs per sample, set it themselves; other
composites add up their children. ``dense_flops_per_sample`` is the per-sample cost with every
convolution dense (from the geometry of the last forward). The functions here only read these.
"""

from __future__ import annotations

import numpy as np


def layer_flops(model):
    """``{layer name: FLOPs of its last forward over the batch}`` for every leaf layer of ``model``."""
    return {name: layer.flops for name, layer in model.named_layers() if layer is not model and not layer.children()}


def network_flops(model):
    """Total FLOPs of the last forward of ``model`` over its whole batch."""
    return model.flops


def flops_per_image(model, x):
    """Run ``model`` in evaluation mode on ``x`` (N, C, H, W) and return its FLOPs per image (N,) float."""
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was_training)
    return model.flops_per_sample.astype(np.float64)


def dense_flops(model):
    """FLOPs per image of ``model`` with every convolution dense (the baseline for speed-ups).

    Computed from the geometry of the last forward (run one first): each convolution's
    per-position cost times all its output positions.
    """
    return model.dense_flops_per_sample
