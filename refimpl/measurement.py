"""Measuring a network for a speed/quality trade-off: loss and error, FLOPs, forward time.

Shared by the greedy perforation (:mod:`refimpl.greedy`) and the baselines it is compared with
(:mod:`refimpl.baselines`), so that every point of a speed/error plot is measured the same way:

* :func:`measure_loss` — mean cross-entropy, error rate and FLOPs per image on a held-out split;
* :func:`measure_time` — median forward time of a fixed batch (after one warm-up run);
* :func:`measure_point` — both, as the speedups relative to a dense reference;
* :func:`interleaved_times` — several callables timed side by side, round after round, so that a
  slow moment of a shared machine slows them all alike rather than whichever ran then.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from . import _checks
from .backend import get_backend
from .conv_layer import Conv2d
from .datasets import Split
from .flops import network_flops
from .losses import softmax_cross_entropy_forward

RUNNERS = ("layers", "implicit")


def as_split(data, name="data"):
    """``data`` as a :class:`~refimpl.datasets.Split` (it may be one, or ``(images, labels)``)."""
    if isinstance(data, Split):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return Split(np.asarray(data[0]), np.asarray(data[1]))
    raise TypeError(f"{name} must be a refimpl.datasets.Split or (images, labels), got {type(data).__name__}")




def use_backend(model, backend):
    """Run every convolution of ``model`` on ``backend`` (a name or a ConvBackend); ``None`` keeps
    the model's own. Returns the backend of the first convolution."""
    convs = [layer for layer in model.layers() if isinstance(layer, Conv2d)]
    if backend is not None:
        backend = get_backend(backend)
        for layer in convs:
            layer.backend = backend
    return convs[0].backend if convs else get_backend(backend)


def timing_batch_of(model, split, size):
    """The first ``size`` images of ``split`` in the model's dtype, C-contiguous: the timed batch."""
    return np.ascontiguousarray(split.images[:size].astype(model.param_dtype, copy=False))


def measure_loss(model, split, batch_size=256):
    """``(mean cross-entropy, error rate, FLOPs per image)`` of ``model`` in evaluation mode on ``split``."""
    model.eval()
    dtype = model.param_dtype
    total, wrong, flops = 0.0, 0, 0.0
    for start in range(0, len(split), batch_size):
        x = split.images[start:start + batch_size].astype(dtype, copy=False)
        y = split.labels[start:start + batch_size]
        logits = model(x)
        loss, _ = softmax_cross_entropy_forward(logits, y)
        total += float(loss) * len(y)
        wrong += int(np.sum(np.argmax(logits, axis=1) != y))
        flops = network_flops(model) / len(y)
    return total / len(split), wrong / len(split), flops


def measure_time(model, x, repeats=5, timer=time.perf_counter, runner="layers"):
    """Median time (seconds) of a forward pass of ``x`` in evaluation mode over ``repeats`` runs, after one warm-up.

    ``runner="layers"`` times ``model(x)``; ``"implicit"`` times
    :func:`refimpl.implicit_network.run_implicit` (compact activations read through index tables,
    poolings on the backend). ``timer`` is the clock (a function returning seconds): wall time by
    default, ``time.process_time`` for the CPU time of a single-threaded backend, or a fake in tests.
    """
    _checks.choice(runner, "runner", set(RUNNERS))
    model.eval()
    if runner == "implicit":
        from .implicit_network import chain_layers, run_implicit

        chain = chain_layers(model, x[:1])

        def forward():
            return run_implicit(model, x, chain=chain)
    else:
        def forward():
            return model(x)
    forward()
    times = []
    for _ in range(repeats):
        start = timer()
        forward()
        times.append(timer() - start)
    return float(np.median(times))


def interleaved_times(calls, repeat, timer=time.perf_counter):
    """Seconds of ``repeat`` rounds in which every callable of ``calls`` runs once, the order rotated per round.

    Each callable first runs once untimed (warm-up). Rotating the order means no callable always
    runs first (after a pause) or last. Compare the medians; the spread (min to max) shows the noise.

    Parameters
    ----------
    calls : sequence of callables taking no argument
    repeat : int >= 1, timed rounds
    timer : the clock, a function returning seconds

    Returns
    -------
    list of lists: ``times[i]`` holds the ``repeat`` durations of ``calls[i]``, in seconds.
    """
    calls = list(calls)
    if not isinstance(repeat, (int, np.integer)) or isinstance(repeat, bool) or repeat < 1:
        raise ValueError(f"repeat must be a positive int, got {repeat!r}")
    for call in calls:
        call()
    times = [[] for _ in calls]
    for round_ in range(repeat):
        for offset in range(len(calls)):
            i = (round_ + offset) % len(calls)
            start = timer()
            calls[i]()
            times[i].append(timer() - start)
    return times


@dataclass
class Bench:
    """How a network is measured: the held-out split, the timed batch and the clock.

    Attributes
    ----------
    split : Split — loss and error are measured on it
    timing_x : ndarray — the batch whose forward time is measured
    repeats : timed runs (the median is used)
    batch_size : batch size of the loss pass
    timer : the clock (a function returning seconds; default ``time.perf_counter``)
    runner : ``"layers"`` or ``"implicit"`` (see :func:`measure_time`)
    dense_flops, dense_seconds : the reference of the speedups (set by :meth:`set_reference`)
    """

    split: Split
    timing_x: np.ndarray
    repeats: int = 5
    batch_size: int = 256
    timer: object = None  # None: time.perf_counter
    runner: str = "layers"
    dense_flops: float = None
    dense_seconds: float = None
    evaluations: int = 0  # measure_point calls so far

    def __post_init__(self):
        if self.timer is None:
            self.timer = time.perf_counter

    def loss(self, model):
        """``(loss, error, FLOPs per image)`` on the split."""
        return measure_loss(model, self.split, self.batch_size)

    def seconds(self, model):
        """Median forward time of the timed batch."""
        return measure_time(model, self.timing_x, self.repeats, self.timer, self.runner)

    def set_reference(self, flops, seconds):
        self.dense_flops, self.dense_seconds = float(flops), float(seconds)

    def point(self, loss, error, flops, seconds, **extra):
        """A measured point as a dict: ``extra``, FLOPs, seconds, both speedups, loss and error.

        ``seconds=None`` (not timed) gives ``None`` for the seconds and the measured speedup.
        """
        return {**extra, "flops": float(flops), "seconds": None if seconds is None else float(seconds),
                "theoretical_speedup": float(self.dense_flops / flops),
                "measured_speedup": None if seconds is None else float(self.dense_seconds / seconds),
                "loss": float(loss), "error": float(error)}

    def measure_point(self, model, split=None, timing_x=None, timed=True, **extra):
        """Measure ``model`` (loss on ``split``, time on ``timing_x``; default: the bench's) as a point.

        ``timed=False`` skips the timing (the costliest part for a small held-out split).
        """
        self.evaluations += 1
        loss, error, flops = measure_loss(model, self.split if split is None else split, self.batch_size)
        seconds = None
        if timed:
            seconds = measure_time(model, self.timing_x if timing_x is None else timing_x, self.repeats, self.timer,
                                   self.runner)
        return self.point(loss, error, flops, seconds, **extra)
