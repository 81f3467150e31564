r"""The two baselines perforation is compared with, on the same axes (SPEC §1.2).

**(a) Larger stride + nearest upsampling.** A layer computed with stride ``k·s`` instead of ``s``
and its output upsampled k times by repetition has the original output size, so the network after it
is unchanged. This *is* a perforation: the computed positions are the regular grid
``(k i, k j)`` of the original output, and every position copies the grid point above-left of it,

.. math:: \text{out}[y, x] = \text{strided}[\lfloor y / k \rfloor, \lfloor x / k \rfloor],

a different fill from the perforated layer's *nearest* one. :class:`UpsamplingPlan` is that plan, so
the baseline runs through the same backend kernels (and the same 1×1 followers share it) and its
FLOPs and time are comparable with the perforated networks'. :func:`stride_baseline` evaluates
every combination of per-layer factors and marks the Pareto front.

**(b) Lower input resolution.** The input is downscaled (anti-aliased); the network's pooling and
global average pooling accept any size, so every layer's output shrinks and the cost falls roughly
with the pixel count. :func:`resolution_baseline` evaluates a list of sizes.

Each point carries the same keys as a greedy step (:mod:`refimpl.greedy`): FLOPs, seconds,
theoretical and measured speedup, loss and error.
"""

from __future__ import annotations

import itertools
import time
from functools import cached_property

import numpy as np

from . import _checks
from .conv_layer import Conv2d
from .flops import dense_flops
from .greedy import _as_split, _dtype, measure_loss, measure_time, use_backend
from .impact import find_perforable_layers
from .perforation import PerforationPlan


class UpsamplingPlan(PerforationPlan):
    """Plan of a layer run with ``factor`` times its stride, its output upsampled by repetition.

    The mask keeps rows and columns 0, k, 2k, ... (k = ``factor``); the index map sends position
    (y, x) to the compact index of (k floor(y / k), k floor(x / k)).

    Parameters
    ----------
    out_hw : (Ho, Wo), the layer's original output size
    factor : int >= 1
    """

    def __init__(self, out_hw, factor):
        ho, wo = _checks.positive_pair(out_hw, "out_hw")
        if not isinstance(factor, (int, np.integer)) or factor < 1:
            raise ValueError(f"factor must be a positive int, got {factor!r}")
        self.factor = int(factor)
        mask = np.zeros((ho, wo), dtype=bool)
        mask[::factor, ::factor] = True
        super().__init__(mask)

    @cached_property
    def index_map(self):
        ho, wo = self.out_hw
        k = self.factor
        cols = -(-wo // k)  # computed columns per row
        rows = np.arange(ho)[:, None] // k
        return (rows * cols + np.arange(wo)[None, :] // k).astype(np.int32)[None]


def set_stride_factor(model, info, factor):
    """Run the perforable layer ``info`` (and its 1×1 followers) ``factor`` times strided, upsampled.

    ``factor=1`` restores the layer's normal forward. Works by giving each convolution of the
    group a per-call plan (``Conv2d.forward(x, mask=plan)``).
    """
    layers = dict(model.named_layers())
    plan = None if factor == 1 else UpsamplingPlan(info.out_hw, factor)
    for name in info.layers:
        layer = layers[name]
        layer.set_mask(None)
        if "forward" in vars(layer):
            del layer.forward
        if plan is not None:
            layer.forward = (lambda x, _layer=layer, mask=None, fill=None: Conv2d.forward(_layer, x, mask=plan))


def _point(model, split, timing_x, repeats, batch_size, dense, dense_seconds, timer, runner, **extra):
    loss, error, flops = measure_loss(model, split, batch_size)
    seconds = measure_time(model, timing_x, repeats, timer, runner)
    return {**extra, "flops": float(flops), "seconds": float(seconds), "theoretical_speedup": float(dense / flops),
            "measured_speedup": float(dense_seconds / seconds), "loss": float(loss), "error": float(error)}


def pareto_front(points, speed_key="measured_speedup"):
    """Mark each point ``"pareto": True`` when no other point is both faster and lower in error."""
    for p in points:
        p["pareto"] = not any(q is not p and q[speed_key] >= p[speed_key] and q["error"] <= p["error"]
                              and (q[speed_key] > p[speed_key] or q["error"] < p["error"]) for q in points)
    return points


def _reference(model, split, timing_x, repeats, batch_size, timer, runner):
    measure_loss(model, split.subset(slice(0, 1)), batch_size)
    return dense_flops(model), measure_time(model, timing_x, repeats, timer, runner)


def stride_baseline(model, data, factors=(1, 2, 3), backend=None, timing_batch=64, timing_repeats=5, batch_size=256,
                    layers=None, timer=time.perf_counter, runner="layers"):
    """Baseline (a): every combination of per-layer stride factors.

    Parameters
    ----------
    model : Layer (dense; left as it was found)
    data : Split or (images, labels), the held-out subset
    factors : the factors each perforable layer may take
    backend, timing_batch, timing_repeats, batch_size, timer, runner : as in
        :func:`refimpl.greedy.perforate_network` (with ``runner="implicit"`` the strided layers
        still fill explicitly; the poolings run on the backend)
    layers : names of the perforable layers to vary (default: all)

    Returns
    -------
    list of dict — per combination: ``factors`` {layer: k}, the measurements, ``pareto``
    """
    split = _as_split(data)
    use_backend(model, backend)
    timing_x = np.ascontiguousarray(split.images[:timing_batch].astype(_dtype(model), copy=False))
    infos = find_perforable_layers(model, timing_x[:2])
    if layers is not None:
        unknown = set(layers) - {i.name for i in infos}
        if unknown:
            raise ValueError(f"layers must be perforable layers {[i.name for i in infos]}, got {sorted(unknown)}")
        infos = [i for i in infos if i.name in layers]
    factors = tuple(int(f) for f in factors)
    dense, dense_seconds = _reference(model, split, timing_x, timing_repeats, batch_size, timer, runner)
    points = []
    try:
        for combo in itertools.product(factors, repeat=len(infos)):
            for info, k in zip(infos, combo):
                set_stride_factor(model, info, k)
            points.append(_point(model, split, timing_x, timing_repeats, batch_size, dense, dense_seconds, timer, runner,
                                 factors={i.name: k for i, k in zip(infos, combo)}))
    finally:
        for info in infos:
            set_stride_factor(model, info, 1)
    return pareto_front(points)


def resize_images(images, size):
    """Anti-aliased resize of (N, C, H, W) images to (N, C, h, w) (``size`` = h or (h, w))."""
    from skimage.transform import resize

    h, w = _checks.positive_pair(size, "size")
    images = np.asarray(images)
    out = resize(images, (*images.shape[:2], h, w), order=1, anti_aliasing=True, preserve_range=True)
    return out.astype(images.dtype)


def resolution_baseline(model, data, sizes, backend=None, timing_batch=64, timing_repeats=5, batch_size=256,
                        timer=time.perf_counter, runner="layers"):
    """Baseline (b): the network on inputs downscaled to each of ``sizes`` (ints or (h, w) pairs).

    Returns a list of dicts with ``size`` [h, w], the measurements and ``pareto``. Speedups are
    relative to the network at the data's own resolution.
    """
    split = _as_split(data)
    use_backend(model, backend)
    dtype = _dtype(model)
    timing_x = np.ascontiguousarray(split.images[:timing_batch].astype(dtype, copy=False))
    dense, dense_seconds = _reference(model, split, timing_x, timing_repeats, batch_size, timer, runner)
    points = []
    for size in sizes:
        h, w = _checks.positive_pair(size, "sizes")
        small = type(split)(resize_images(split.images, (h, w)), split.labels)
        points.append(_point(model, small, np.ascontiguousarray(small.images[:timing_batch].astype(dtype, copy=False)),
                             timing_repeats, batch_size, dense, dense_seconds, timer, runner, size=[h, w]))
    return pareto_front(points)
