r"""CIFAR-style pre-activation residual networks, ResNet-(6n+2).

A *residual unit* computes :math:`U_l = s(U_{l-1}) + f_l(U_{l-1})` where the branch ``f`` is the
pre-activation pair (He et al., 2016, "Identity mappings in deep residual networks")

.. math:: f(x) = \text{conv}_2(\text{relu}(\text{bn}_2(\text{conv}_1(\text{relu}(\text{bn}_1(x)))))),

both convolutions 3×3, and the shortcut ``s`` is the identity when shapes match. A *stage* (the
papers' "block") is a list of units at one resolution; the network is a 3×3 stem convolution,
three stages of ``n`` units with 16, 32 and 64 channels (the first unit of stages 2 and 3 halves
the resolution with stride 2), and a head bn → relu → global average pool → linear. Depth
``6n + 2`` counts the stem, ``2`` convs per unit times ``3n`` units, and the linear layer:
ResNet-8 (n=1), 14 (2), 20 (3), 32 (5), 110 (18).

**Shortcut of a downsampling unit** (project choice, a parameter): ``"pad"`` (default) is the
parameter-free option A of the CIFAR ResNet paper, as in the TensorFlow CIFAR ResNet the SACT
code builds on: subsample the input with stride 2 and append zero channels. It costs no FLOPs and
no parameters, so ACT/SACT FLOP counts are those of the branches. ``"projection"`` is a strided
1×1 convolution of the input (no batch norm).

The parts are exposed for adaptive computation (ACT/SACT wrap stages and run branches on
sub-batches or at active positions only): a unit has ``bn1, conv1, bn2, conv2, shortcut``,
:meth:`ResidualUnit.branch_forward` / ``branch_backward`` and ``shortcut_forward`` /
``shortcut_backward``; a stage has ``units``; the network has ``stem``, ``stages`` and ``head``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import _checks
from .conv_layer import Conv2d, apply_perforation
from .layers import BatchNorm2d, GlobalAvgPool2d, Layer, Linear, ReLU, Sequential

SHORTCUTS = ("pad", "projection")
DEPTHS = {8: 1, 14: 2, 20: 3, 32: 5, 110: 18}


# ---------------------------------------------------------------------------------------------
# Option-A shortcut: subsample and zero-pad channels
# ---------------------------------------------------------------------------------------------


class PadShortcutCache(NamedTuple):
    x_shape: tuple
    stride: int


def pad_shortcut_forward(x, out_channels, stride):
    """``x[:, :, ::s, ::s]`` followed by ``out_channels - C`` zero channels: (N, C, H, W) → (N, K, ⌈H/s⌉, ⌈W/s⌉)."""
    sub = x[:, :, ::stride, ::stride]
    out = np.zeros((x.shape[0], out_channels, *sub.shape[2:]), dtype=x.dtype)
    out[:, : x.shape[1]] = sub
    return out, PadShortcutCache(x.shape, stride)


def pad_shortcut_backward(dout, cache):
    """The gradient of the kept channels goes back to the subsampled positions; the rest is 0."""
    dx = np.zeros(cache.x_shape, dtype=dout.dtype)
    s = cache.stride
    dx[:, :, ::s, ::s] = dout[:, : cache.x_shape[1]]
    return dx


class PadShortcut(Layer):
    """Parameter-free shortcut of a downsampling unit (option A)."""

    def __init__(self, out_channels, stride):
        super().__init__()
        self.out_channels, self.stride = int(out_channels), int(stride)

    def forward(self, x):
        out, self.cache = pad_shortcut_forward(x, self.out_channels, self.stride)
        return out

    def backward(self, dout):
        return pad_shortcut_backward(dout, self.cache)

    def __repr__(self):
        return f"PadShortcut(out_channels={self.out_channels}, stride={self.stride})"


class Identity(Layer):
    def forward(self, x):
        return x

    def backward(self, dout):
        return dout

    def __repr__(self):
        return "Identity()"


# ---------------------------------------------------------------------------------------------
# Unit, stage, network
# ---------------------------------------------------------------------------------------------


class ResidualUnit(Layer):
    """Pre-activation residual unit ``s(x) + f(x)`` (see the module docstring).

    Parameters
    ----------
    in_channels, out_channels : int
    stride : 1, or 2 for the downsampling unit
    rng : numpy.random.Generator for the weights
    backend : conv backend (instance, name or None)
    shortcut : "pad" or "projection" (used only when the shape changes)
    dtype : float32 or float64
    """

    def __init__(self, in_channels, out_channels, rng, stride=1, backend=None, shortcut="pad", dtype=np.float32):
        super().__init__()
        _checks.choice(shortcut, "shortcut", set(SHORTCUTS))
        self.in_channels, self.out_channels, self.stride = int(in_channels), int(out_channels), int(stride)
        self.bn1 = BatchNorm2d(in_channels, dtype=dtype)
        self.relu1 = ReLU()
        self.conv1 = Conv2d(in_channels, out_channels, 3, rng, stride=stride, padding=1, bias=False,
                            backend=backend, dtype=dtype)
        self.bn2 = BatchNorm2d(out_channels, dtype=dtype)
        self.relu2 = ReLU()
        self.conv2 = Conv2d(out_channels, out_channels, 3, rng, padding=1, bias=False, backend=backend, dtype=dtype)
        if stride == 1 and in_channels == out_channels:
            self.shortcut = Identity()
        elif shortcut == "pad":
            if out_channels < in_channels:
                raise ValueError(f"the 'pad' shortcut needs out_channels >= in_channels, got {in_channels} -> {out_channels}")
            self.shortcut = PadShortcut(out_channels, stride)
        else:
            self.shortcut = Conv2d(in_channels, out_channels, 1, rng, stride=stride, bias=False,
                                   backend=backend, dtype=dtype)

    @property
    def downsamples(self):
        return not isinstance(self.shortcut, Identity)

    def branch_forward(self, x, mask1=None, mask2=None, fill=None):
        """The residual branch ``f(x)``; ``mask1``/``mask2`` (and ``fill``) perforate conv1/conv2 for this call."""
        h = self.relu1(self.bn1(x))
        h = self.conv1(h, mask=mask1, fill=fill)
        h = self.relu2(self.bn2(h))
        return self.conv2(h, mask=mask2, fill=fill)

    def branch_backward(self, dout):
        d = self.conv2.backward(dout)
        d = self.bn2.backward(self.relu2.backward(d))
        d = self.conv1.backward(d)
        return self.bn1.backward(self.relu1.backward(d))

    def shortcut_forward(self, x):
        return self.shortcut(x)

    def shortcut_backward(self, dout):
        return self.shortcut.backward(dout)

    def forward(self, x):
        return self.shortcut_forward(x) + self.branch_forward(x)

    def backward(self, dout):
        return self.shortcut_backward(dout) + self.branch_backward(dout)

    def __repr__(self):
        return f"ResidualUnit({self.in_channels}, {self.out_channels}, stride={self.stride}, shortcut={self.shortcut!r})"


class ResidualStage(Layer):
    """A sequence of residual units at one resolution; ``units[0]`` may downsample."""

    def __init__(self, units):
        super().__init__()
        self.units = list(units)

    def forward(self, x):
        for unit in self.units:
            x = unit(x)
        return x

    def backward(self, dout):
        for unit in reversed(self.units):
            dout = unit.backward(dout)
        return dout

    def __repr__(self):
        return f"ResidualStage({len(self.units)} units)"


def make_stage(in_channels, out_channels, n_units, stride, rng, backend=None, shortcut="pad", dtype=np.float32):
    """``n_units`` residual units; the first goes ``in_channels → out_channels`` with ``stride``."""
    units = [ResidualUnit(in_channels, out_channels, rng, stride, backend, shortcut, dtype)]
    units += [ResidualUnit(out_channels, out_channels, rng, 1, backend, shortcut, dtype) for _ in range(n_units - 1)]
    return ResidualStage(units)


def make_head(channels, num_classes, rng, dtype=np.float32):
    """bn → relu → global average pool → linear."""
    return Sequential(BatchNorm2d(channels, dtype=dtype), ReLU(), GlobalAvgPool2d(),
                      Linear(channels, num_classes, rng, dtype=dtype))


class ResNet(Layer):
    """CIFAR-style pre-activation ResNet-(6n+2).

    Parameters
    ----------
    n : int, units per stage (depth ``6n + 2``)
    num_classes, in_channels : int
    rng : numpy.random.Generator for the weights (and, unless ``mask_rng`` is given, the masks)
    widths : channels of the three stages
    backend : conv backend for every convolution
    shortcut : "pad" (option A, default) or "projection"
    perforation : dict layer name -> spec (see :func:`refimpl.conv_layer.apply_perforation`),
        e.g. ``{"stages.0.units.0.conv1": ("grid", 0.5)}``
    dtype : float32 or float64

    Forward: x (N, in_channels, H, W) → logits (N, num_classes).
    """

    def __init__(self, n, num_classes, in_channels, rng, widths=(16, 32, 64), backend=None, shortcut="pad",
                 perforation=None, mask_rng=None, dtype=np.float32):
        super().__init__()
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n (units per stage) must be a positive int, got {n!r}")
        rng = _checks.generator(rng)
        self.n, self.widths = int(n), tuple(int(c) for c in widths)
        self.stem = Conv2d(in_channels, self.widths[0], 3, rng, padding=1, bias=False, backend=backend, dtype=dtype)
        stages, previous = [], self.widths[0]
        for i, width in enumerate(self.widths):
            stages.append(make_stage(previous, width, self.n, 1 if i == 0 else 2, rng, backend, shortcut, dtype))
            previous = width
        self.stages = stages
        self.head = make_head(previous, num_classes, rng, dtype)
        if perforation:
            apply_perforation(self, perforation, mask_rng if mask_rng is not None else rng)

    @property
    def depth(self):
        return 6 * self.n + 2

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)

    def backward(self, dout):
        d = self.head.backward(dout)
        for stage in reversed(self.stages):
            d = stage.backward(d)
        return self.stem.backward(d)

    def __repr__(self):
        return f"ResNet-{self.depth}(widths={self.widths})"


def resnet(depth, num_classes=10, in_channels=3, rng=None, **kwargs):
    """ResNet of a given depth (8, 14, 20, 32, 110 or any 6n+2)."""
    if not isinstance(depth, (int, np.integer)) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 110, ...), got {depth!r}")
    return ResNet((depth - 2) // 6, num_classes, in_channels, _checks.generator(rng), **kwargs)
