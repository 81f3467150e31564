r"""The two baselines perforation is compared with, on the same axes (docs/spec.md §6.3).

**(a) Larger stride + nearest upsampling.** A layer computed with stride ``k·s`` instead of ``s``
and its output upsampled k times by repetition has the original output size, so the network after it
is unchanged. This *is* a perforation: the computed positions are the regular grid
``(k i, k j)`` of the original output, and every position copies the grid point above-left of it,

.. math:: \text{out}[y, x] = \text{strided}[\lfloor y / k \rfloor, \lfloor x / k \rfloor],

a different fill from the perforated layer's *nearest* one. :class:`UpsamplingPlan` is that plan, so
the baseline runs through the same backend kernels (and the same 1×1 followers share it) and its
FLOPs and time are comparable with the perforated networks'. :func:`stride_baseline` searches the
per-layer factors greedily, like the perforation itself: starting from the dense network, each
step raises the factor of the one layer whose next factor costs the least loss per unit of cost
saved. With L layers and F factors that is at most L·(F−1) steps of at most L trials each — never
all F^L combinations (177,147 for the 11 layers of a ResNet-14 and factors 1, 2, 3).

**(b) Lower input resolution.** The input is downscaled (anti-aliased); the network's pooling and
global average pooling accept any size, so every layer's output shrinks and the cost falls roughly
with the pixel count. :func:`resolution_baseline` evaluates a list of sizes.

Each point carries the same keys as a greedy step (:mod:`refimpl.greedy`): FLOPs, seconds,
theoretical and measured speedup, loss and error.
"""

from __future__ import annotations

import time
from functools import cached_property

import numpy as np

from . import _checks
from .conv_layer import Conv2d
from .flops import dense_flops
from .greedy import move_cost
from .impact import find_perforable_layers
from .measurement import Bench, as_split, measure_loss, timing_batch_of, use_backend
from .perforation import PerforationPlan

COSTS = ("flops", "time")


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


def pareto_front(points, speed_key="measured_speedup"):
    """Mark each point ``"pareto": True`` when no other point is both faster and lower in error.

    Points without a ``speed_key`` value (not timed) are marked ``False`` and compared with nothing.
    """
    timed = [p for p in points if p.get(speed_key) is not None]
    for p in points:
        p["pareto"] = p in timed and not any(
            q is not p and q[speed_key] >= p[speed_key] and q["error"] <= p["error"]
            and (q[speed_key] > p[speed_key] or q["error"] < p["error"]) for q in timed)
    return points


def _reference_bench(model, split, timing_batch, timing_repeats, batch_size, timer, runner):
    """A :class:`~refimpl.measurement.Bench` whose reference is ``model`` as it is (dense)."""
    bench = Bench(split, timing_batch_of(model, split, timing_batch), timing_repeats, batch_size, timer, runner)
    measure_loss(model, split.subset(slice(0, 1)), batch_size)  # a forward pass sets the FLOPs geometry
    bench.set_reference(dense_flops(model), bench.seconds(model))
    return bench


def _progress_bar(enabled, total, desc):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


def max_stride_evaluations(n_layers, n_factors):
    """Upper bound on the networks :func:`stride_baseline` measures: the dense one, then at most
    ``n_layers * (n_factors - 1)`` steps of at most ``n_layers`` trials each."""
    return 1 + n_layers * n_layers * max(n_factors - 1, 0)


def _set_level(model, info, level, factors, index):
    """Run layer ``info`` at ``factors[index]`` and remember it in ``level``."""
    level[info.name] = index
    set_stride_factor(model, info, factors[index])


def _stride_trials(model, infos, level, factors, measure, current, cost_key):
    """Each layer not yet at the largest factor tried one factor further (then put back).

    Returns ``[(move cost, measured point, layer info)]``; the move cost is the loss increase per
    unit of ``cost_key`` saved relative to ``current`` (:func:`refimpl.greedy.move_cost`).
    """
    trials = []
    for info in infos:
        index = level[info.name]
        if index + 1 >= len(factors):
            continue
        _set_level(model, info, level, factors, index + 1)
        trial = measure()
        trials.append((move_cost(trial["loss"], current["loss"], trial[cost_key], current[cost_key]), trial, info))
        _set_level(model, info, level, factors, index)
    return trials


def stride_baseline(model, data, factors=(1, 2, 3), backend=None, timing_batch=64, timing_repeats=5, batch_size=256,
                    layers=None, timer=time.perf_counter, runner="layers", cost="flops", progress=False,
                    until_speedup=None, time_trials=True):
    """Baseline (a): per-layer stride factors, searched greedily from the dense network.

    Each step tries, for every layer not yet at the largest factor, its next factor, and keeps the
    trial of smallest loss increase per unit of cost saved (the move cost of
    :func:`refimpl.greedy.move_cost`); the search ends when every layer is at the largest factor,
    no trial lowers the cost, or the path reaches ``until_speedup``. Every network measured on the way is returned, so the points cover
    more than the path; at most :func:`max_stride_evaluations` networks are measured.

    Parameters
    ----------
    model : Layer (dense; left as it was found)
    data : Split or (images, labels), the held-out subset
    factors : increasing stride factors, starting at 1
    backend, timing_batch, timing_repeats, batch_size, timer, runner : as in
        :func:`refimpl.greedy.perforate_network` (with ``runner="implicit"`` the strided layers
        still fill explicitly; the poolings run on the backend)
    layers : names of the perforable layers to vary (default: all)
    cost : "flops" or "time" — what a step saves
    progress : a progress bar over the measured networks
    until_speedup : float or None — also stop once the path is this much faster than the dense
        network (theoretical speedup for ``cost="flops"``, measured for ``"time"``): a comparison
        with a perforated network needs the baseline up to that network's speed, not beyond
    time_trials : with ``cost="flops"``, ``False`` times only the networks on the path (the trials
        off it get ``seconds`` and ``measured_speedup`` ``None``): the search needs no time, and
        timing is most of the work

    Returns
    -------
    list of dict — per measured network: ``factors`` {layer: k}, ``step`` (the greedy step it was
    measured in; 0 = dense), ``path`` (whether the search moved there), the measurements, ``pareto``
    """
    _checks.choice(cost, "cost", set(COSTS))
    split = as_split(data)
    use_backend(model, backend)
    factors = tuple(int(f) for f in factors)
    if not factors or factors[0] != 1 or any(b <= a for a, b in zip(factors, factors[1:])):
        raise ValueError(f"factors must start at 1 and increase strictly, got {factors}")
    infos = find_perforable_layers(model, timing_batch_of(model, split, 2))
    if layers is not None:
        unknown = set(layers) - {i.name for i in infos}
        if unknown:
            raise ValueError(f"layers must be perforable layers {[i.name for i in infos]}, got {sorted(unknown)}")
        infos = [i for i in infos if i.name in layers]
    bench = _reference_bench(model, split, timing_batch, timing_repeats, batch_size, timer, runner)
    level = {info.name: 0 for info in infos}  # index into factors
    cost_key = "flops" if cost == "flops" else "seconds"
    speed_key = "theoretical_speedup" if cost == "flops" else "measured_speedup"
    bar = _progress_bar(progress, max_stride_evaluations(len(infos), len(factors)), "stride baseline")

    time_each = time_trials or cost == "time"

    def measure(step, timed=time_each):
        point = bench.measure_point(model, factors={i.name: factors[level[i.name]] for i in infos}, step=step,
                                    path=False, timed=timed)
        if bar is not None:
            bar.update()
        return point

    try:
        current = measure(0, timed=True)
        current["path"] = True
        points, step = [current], 0
        while until_speedup is None or current[speed_key] < until_speedup:
            step += 1
            trials = _stride_trials(model, infos, level, factors, lambda: measure(step), current, cost_key)
            points += [point for _, point, _ in trials]
            best = min(trials, key=lambda t: t[0], default=None)
            if best is None or not np.isfinite(best[0]):
                break
            _, current, info = best
            _set_level(model, info, level, factors, level[info.name] + 1)
            if current["seconds"] is None:  # a path point is always timed
                current.update(bench.point(current["loss"], current["error"], current["flops"], bench.seconds(model)))
            current["path"] = True
    finally:
        if bar is not None:
            bar.close()
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
                        timer=time.perf_counter, runner="layers", progress=False):
    """Baseline (b): the network on inputs downscaled to each of ``sizes`` (ints or (h, w) pairs).

    Returns a list of dicts with ``size`` [h, w], the measurements and ``pareto``. Speedups are
    relative to the network at the data's own resolution. ``progress``: a progress bar over the sizes.
    """
    split = as_split(data)
    use_backend(model, backend)
    sizes = [_checks.positive_pair(size, "sizes") for size in sizes]
    bench = _reference_bench(model, split, timing_batch, timing_repeats, batch_size, timer, runner)
    bar = _progress_bar(progress, len(sizes), "resolution baseline")
    points = []
    for h, w in sizes:
        small = type(split)(resize_images(split.images, (h, w)), split.labels)
        points.append(bench.measure_point(model, small, timing_batch_of(model, small, timing_batch), size=[h, w]))
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return pareto_front(points)
