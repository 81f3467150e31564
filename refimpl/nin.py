r"""A small Network-in-Network-style CNN: the conv → pool structure the perforation experiments need.

Three blocks, each a 3×3 convolution (batch norm, ReLU) followed by a 1×1 convolution ("cccp", the
NIN micro-network; ReLU); the first two blocks end with a 3×3 / stride 2 / padding 1 max pooling,
which overlaps its windows, so the *structure* mask (docs/spec.md §3.4) is not a regular grid. The last
1×1 convolution outputs one map per class and a global average pooling gives the logits
(Lin, Chen & Yan, 2014).

Layer names (for ``perforation=``): ``conv1, cccp1, pool1, conv2, cccp2, pool2, conv3, cccp3``.
The pooling that follows ``conv1``/``cccp1`` is ``pool1`` and that of ``conv2``/``cccp2`` is
``pool2``: a 1×1 convolution keeps the spatial layout, so a structure mask of ``conv1`` is the one
``pool1`` asks for.

Input (N, C, H, W) → logits (N, num_classes); H and W should be divisible by 4.
"""

from __future__ import annotations

import numpy as np

from . import _checks
from .conv_layer import Conv2d, apply_perforation
from .layers import BatchNorm2d, GlobalAvgPool2d, Layer, MaxPool2d, ReLU

POOL = {"pool_size": 3, "pool_stride": 2, "pool_padding": 1}


class NIN(Layer):
    """Network-in-Network-style CNN (see the module docstring).

    Parameters
    ----------
    num_classes, in_channels : int
    rng : numpy.random.Generator for the weights (and the masks unless ``mask_rng`` is given)
    widths : channels of the three blocks
    backend : conv backend for every convolution
    perforation : dict layer name -> spec (:func:`refimpl.conv_layer.apply_perforation`)
    dtype : float32 or float64
    """

    def __init__(self, num_classes, in_channels, rng, widths=(32, 64, 128), backend=None, perforation=None,
                 mask_rng=None, dtype=np.float32):
        super().__init__()
        rng = _checks.generator(rng)
        if len(tuple(widths)) != 3 or min(int(c) for c in widths) < 1:
            raise ValueError(f"widths must be three positive ints (the channels of the three blocks), got {widths!r}")
        w1, w2, w3 = (int(c) for c in widths)
        kw = dict(backend=backend, dtype=dtype)
        self.conv1 = Conv2d(in_channels, w1, 3, rng, padding=1, bias=False, **kw)
        self.bn1, self.relu1 = BatchNorm2d(w1, dtype=dtype), ReLU()
        self.cccp1, self.relu1b = Conv2d(w1, w1, 1, rng, **kw), ReLU()
        self.pool1 = MaxPool2d(POOL["pool_size"], POOL["pool_stride"], POOL["pool_padding"])
        self.conv2 = Conv2d(w1, w2, 3, rng, padding=1, bias=False, **kw)
        self.bn2, self.relu2 = BatchNorm2d(w2, dtype=dtype), ReLU()
        self.cccp2, self.relu2b = Conv2d(w2, w2, 1, rng, **kw), ReLU()
        self.pool2 = MaxPool2d(POOL["pool_size"], POOL["pool_stride"], POOL["pool_padding"])
        self.conv3 = Conv2d(w2, w3, 3, rng, padding=1, bias=False, **kw)
        self.bn3, self.relu3 = BatchNorm2d(w3, dtype=dtype), ReLU()
        self.cccp3 = Conv2d(w3, num_classes, 1, rng, **kw)
        self.gap = GlobalAvgPool2d()
        self.sequence = [layer for _, layer in self.children()]
        if perforation:
            following = {name: POOL for name in ("conv1", "cccp1", "conv2", "cccp2")}
            apply_perforation(self, perforation, mask_rng if mask_rng is not None else rng, following)

    def children(self):
        return [(name, layer) for name, layer in super().children() if name != "sequence" and not name.startswith("sequence.")]

    def forward(self, x):
        for layer in self.sequence:
            x = layer(x)
        return x

    def backward(self, dout):
        for layer in reversed(self.sequence):
            dout = layer.backward(dout)
        return dout

    def __repr__(self):
        return "NIN(" + ", ".join(name for name, _ in self.children()) + ")"
