"""Whole-network benchmark: ``python -m fastpath.bench --networks`` / ``ponder bench --networks``.

Where :mod:`fastpath.bench` times one convolution, this times whole networks, side by side and
with interleaved repeats (every round runs each network once, the order rotated per round, so a
slow minute on a shared machine hits them all alike), float32, after one warm-up call each:

**Inference** (evaluation mode) of a pre-activation CIFAR ResNet-32 (widths 16/32/64,
identity/pad shortcuts, :mod:`refimpl.resnet`) at each ``--sizes`` and ``--threads``, batch 64:

* ``torch dense`` — the same network mirrored in PyTorch (:func:`torch_resnet`, the ponder
  network's weights copied in), when torch is importable; a comparison only, never a dependency;
* ``ponder dense`` — :class:`refimpl.resnet.ResNet` on the Cython backend, layer by layer;
* ``ponder compiled`` — the same network through :func:`fastpath.compile_network` (inference on
  channels-last rows, activations never in NCHW between layers; Cython backend only);
* ``SACT`` / ``SACT unfused`` — :class:`refimpl.sact.SACTResNet`, sparse execution, with the
  backend's fused residual unit where it has one (``fused=True``) or the composition of reference
  layers (``fused=False``, :func:`refimpl.sparse_unit.unit_executor`);
* ``SACT compiled`` — the same SACT network (same weights, same calibrated biases) through
  :func:`fastpath.compile_network`: the whole network on channels-last rows (Cython backend only);
* ``PACT`` — :class:`refimpl.pact_resnet.PACTResNet`, per-position latents, thresholded mode;

the adaptive ones at FLOPs ratios ``--ratios`` (dense FLOPs ÷ FLOPs spent, the dense FLOPs being
ponder dense's), reached by shifting every halting bias by one offset found by bisection on a
calibration batch (:func:`calibrate`); the table shows the ratio realised on the timed batch.

**Training** (forward + backward + SGD update, :func:`refimpl.training.train_step`) of ResNet-14
and SACT-ResNet-14 at 48 px (the halting biases as built: what training starts from).

Printed per row: the median milliseconds and the min–max spread, images/s, the ratio to torch
(> 1: faster than PyTorch's dense network), the speedup over ponder dense and that speedup ÷ the
FLOPs ratio (1: every FLOP saved is time saved). ``--breakdown`` adds the time per phase recorded
by :mod:`fastpath.profiling` (fused units mark ``gather``/``compute``/``scatter``/``other``) next to
the total; what no section covers is shown as ``unrecorded``.

**Weights and inputs.** Random (seeded) weights and standard-normal images: the benchmark times
the machinery, not a trained network. The halting heads' local weights are scaled by
:data:`HALTING_SPREAD` so the halting logits vary over space as a trained network's do (with the
initial N(0, 0.01²) weights every position would halt at the same unit, and only a few FLOPs
ratios would be reachable).

**Adding a runner.** :data:`INFERENCE_RUNNERS` maps a name to a factory ``factory(context) ->
list of runners`` (a :class:`Runner` has ``name``, ``ratio_target``, ``prepare(x, threads)``
returning the timed callable, and ``flops_per_image()``); append to it to time another way of
running the networks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from refimpl.commands.arguments import UsageError

DEFAULT_SIZES = (32, 64)
DEFAULT_THREADS = (1, 2)
DEFAULT_RATIOS = (1.0, 2.0, 3.0, 4.0)
DEFAULT_BATCH = 64
DEFAULT_DEPTH = 32
DEFAULT_TRAIN_DEPTH = 14
DEFAULT_TRAIN_SIZE = 48
PARTS = ("inference", "training")
#: ``--quick``: a smoke run in seconds (any of these given explicitly wins).
QUICK = {"sizes": (16,), "threads": (1,), "ratios": (1.0, 2.0), "repeat": 2, "batch": 4, "depth": 14,
         "train_depth": 14, "train_size": 16}
#: Scale of the halting heads' local 3×3 weights relative to their initial N(0, 0.01²) draw.
HALTING_SPREAD = 4.0
#: Bisection of the halting-bias offset: the interval searched and the number of halvings.
BIAS_RANGE = (-12.0, 12.0)
BISECTION_STEPS = 11
CALIBRATION_BATCH = 16
NUM_CLASSES = 10


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------


def dense_network(depth, backend, seed):
    """Pre-activation ResNet-``depth`` on ``backend`` in evaluation mode."""
    from refimpl.resnet import resnet

    model = resnet(depth, NUM_CLASSES, 3, np.random.default_rng(seed), backend=backend)
    model.eval()
    return model


def adaptive_network(kind, depth, backend, seed, fused=True):
    """SACT-ResNet (``kind="sact"``) or thresholded per-position PACT-ResNet (``"pact"``), evaluation mode.

    The heads' local weights are scaled by :data:`HALTING_SPREAD`; ``fused`` sets every SACT block's
    ``fused`` switch (PACT always takes the backend's fused unit where there is one).
    """
    from refimpl.pact_resnet import PACTResNet
    from refimpl.sact import SACTResNet

    n, rng = (depth - 2) // 6, np.random.default_rng(seed)
    if kind == "sact":
        model = SACTResNet(n, NUM_CLASSES, 3, rng, backend=backend)
        for block in model.stages:
            block.fused = fused
    elif kind == "pact":
        model = PACTResNet(n, NUM_CLASSES, 3, rng, backend=backend, latents="per-position", mode="thresholded")
    else:
        raise ValueError(f"kind must be 'sact' or 'pact', got {kind!r}")
    for block in model.stages:
        for head in block.heads:
            head.local.params["w"] *= HALTING_SPREAD
    model.base_biases = [head.local.params["b"].copy() for block in model.stages for head in block.heads]
    model.eval()
    return model


def batch_norm_layers(model):
    """``{name: layer}`` of the batch norms of ``model``."""
    return {name: layer for name, layer in model.named_layers() if "running_var" in getattr(layer, "buffers", {})}


def set_batch_norm_statistics(model, x):
    """Set every running statistic of ``model`` to the batch statistics of one training-mode forward of ``x``.

    With random weights and the initial statistics (mean 0, variance 1) the activations of a deep
    residual network grow unit after unit; statistics of real data keep them at the scale a trained
    network works at, and so keep the halting logits in a realistic range.
    """
    layers = batch_norm_layers(model)
    momenta = {name: layer.momentum for name, layer in layers.items()}
    for layer in layers.values():
        layer.momentum = 1.0
    was_training = model.training
    model.train()
    try:
        model(x)
    finally:
        for name, layer in layers.items():
            layer.momentum = momenta[name]
        model.train(was_training)


def copy_batch_norm_statistics(source, target):
    """Copy the running statistics of ``source``'s batch norms into ``target``'s of the same names."""
    wanted = batch_norm_layers(target)
    for name, layer in batch_norm_layers(source).items():
        if name in wanted:
            for key in ("running_mean", "running_var"):
                wanted[name].buffers[key][...] = layer.buffers[key]


def smooth_images(rng, batch, size):
    """Float32 images (batch, 3, size, size): standard-normal values at a quarter of the resolution,
    upsampled (nearest) — structure at a scale, so halting comes in patches rather than salt and pepper."""
    coarse = rng.standard_normal((batch, 3, -(-size // 4), -(-size // 4)), dtype=np.float32)
    return np.ascontiguousarray(coarse.repeat(4, axis=2).repeat(4, axis=3)[:, :, :size, :size])


def shift_halting_biases(model, offset):
    """Set every halting bias of ``model`` (built by :func:`adaptive_network`) to its initial value + ``offset``."""
    heads = [head for block in model.stages for head in block.heads]
    for head, base in zip(heads, model.base_biases):
        head.local.params["b"][...] = base + offset
    model.bias_offset = float(offset)


def flops_ratio(model, x, dense_flops):
    """Dense FLOPs per image ÷ the mean FLOPs per image ``model`` spends on ``x`` (one forward)."""
    model(x)
    return dense_flops / float(np.mean(model.flops_per_sample))


def calibrate(model, x, target, dense_flops, bias_range=BIAS_RANGE, steps=BISECTION_STEPS):
    """The halting-bias offset whose FLOPs ratio on ``x`` is closest to ``target`` (bisection).

    A larger bias halts earlier, so the ratio grows with the offset. A target outside what the
    interval reaches gives the interval's end (e.g. ratio 1: nothing halts, and the heads make the
    realised ratio a little below 1). Returns ``(offset, ratio on x)``.
    """
    low, high = bias_range
    shift_halting_biases(model, low)
    at_low = flops_ratio(model, x, dense_flops)
    if target <= at_low:
        return low, at_low
    shift_halting_biases(model, high)
    at_high = flops_ratio(model, x, dense_flops)
    if target >= at_high:
        return high, at_high
    best = (abs(at_low - target), low, at_low)
    for _ in range(steps):
        middle = 0.5 * (low + high)
        shift_halting_biases(model, middle)
        ratio = flops_ratio(model, x, dense_flops)
        best = min(best, (abs(ratio - target), middle, ratio))
        if ratio < target:
            low = middle
        else:
            high = middle
    _, offset, ratio = best
    shift_halting_biases(model, offset)
    return offset, ratio


def torch_resnet(model):
    """The ponder :class:`refimpl.resnet.ResNet` ``model`` mirrored in PyTorch, with its weights and statistics.

    Same layers in the same order: 3×3 stem; pre-activation units (bn → relu → conv → bn → relu →
    conv) with identity shortcuts, or for a downsampling unit the pad shortcut (option A: subsample
    by the stride, append zero channels); head bn → relu → global average pool → linear.
    """
    import torch
    from torch import nn
    from torch.nn import functional as F

    from refimpl.resnet import PadShortcut

    def tensor(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    def conv(layer):
        out = nn.Conv2d(layer.params["w"].shape[1], layer.params["w"].shape[0], layer.kernel, layer.stride,
                        layer.padding, bias="b" in layer.params)
        out.weight.data = tensor(layer.params["w"])
        if "b" in layer.params:
            out.bias.data = tensor(layer.params["b"])
        return out

    def batch_norm(layer):
        out = nn.BatchNorm2d(layer.channels, eps=layer.eps, momentum=layer.momentum)
        out.weight.data, out.bias.data = tensor(layer.params["gamma"]), tensor(layer.params["beta"])
        out.running_mean.data = tensor(layer.buffers["running_mean"])
        out.running_var.data = tensor(layer.buffers["running_var"])
        return out

    class Unit(nn.Module):
        def __init__(self, unit):
            super().__init__()
            self.bn1, self.conv1 = batch_norm(unit.bn1), conv(unit.conv1)
            self.bn2, self.conv2 = batch_norm(unit.bn2), conv(unit.conv2)
            self.pad = isinstance(unit.shortcut, PadShortcut)
            if not self.pad and unit.downsamples:
                raise ValueError(f"torch_resnet mirrors identity and pad shortcuts, got {unit.shortcut!r}")
            self.stride, self.extra = unit.stride, unit.out_channels - unit.in_channels

        def forward(self, x):
            branch = self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))
            if not self.pad:
                return x + branch
            short = x[:, :, :: self.stride, :: self.stride]
            return F.pad(short, (0, 0, 0, 0, 0, self.extra)) + branch

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = conv(model.stem)
            self.units = nn.Sequential(*(Unit(u) for stage in model.stages for u in stage.units))
            bn, linear = model.head[0], model.head[3]
            self.bn = batch_norm(bn)
            self.fc = nn.Linear(linear.in_features, linear.out_features)
            self.fc.weight.data = tensor(linear.params["w"].T)
            self.fc.bias.data = tensor(linear.params["b"])

        def forward(self, x):
            h = F.relu(self.bn(self.units(self.stem(x))))
            return self.fc(h.mean(dim=(2, 3)))

    net = Net()
    net.train(model.training)
    return net


# ---------------------------------------------------------------------------------------------
# Runners: one per way of running a network, each turning (input, threads) into a timed callable
# ---------------------------------------------------------------------------------------------


class Runner:
    """One row of the tables: ``prepare(x, threads)`` returns the callable to time.

    ``flops_per_image()`` (after a call) is what the last call spent per image; ``ratio_target``
    is None for a dense network.
    """

    name = None
    network = None
    ratio_target = None
    phases = False  # runs ponder layers that profiling sections can mark

    def set_threads(self, threads):
        pass

    def flops_per_image(self):
        raise NotImplementedError


class PonderRunner(Runner):
    """A ponder network: inference ``model(x)`` or a training step (``optimizer`` given)."""

    phases = True

    def __init__(self, name, network, model, backend, ratio_target=None, optimizer=None):
        self.name, self.network, self.model, self.backend = name, network, model, backend
        self.ratio_target, self.optimizer = ratio_target, optimizer
        self.offsets = {}  # input size -> calibrated halting-bias offset

    def set_threads(self, threads):
        if hasattr(self.backend, "threads"):  # the Cython backend's OpenMP threads; a device backend has none
            self.backend.threads = threads

    def prepare(self, x, labels=None):
        model = self.model
        if hasattr(model, "base_biases") and x.shape[-1] in self.offsets:
            shift_halting_biases(model, self.offsets[x.shape[-1]])
        if self.optimizer is None:
            return lambda: model(x)
        from refimpl.training import train_step

        return lambda: train_step(model, x, labels, self.optimizer)

    def flops_per_image(self):
        return float(np.mean(self.model.flops_per_sample))


class TorchRunner(Runner):
    """The dense network mirrored in PyTorch (:func:`torch_resnet`): inference or an SGD step."""

    network = "resnet"

    def __init__(self, name, model, dense_flops, training=False, lr=0.01):
        import torch

        self.torch, self.name, self.dense_flops = torch, name, dense_flops
        self.device = torch_device(torch)
        self.net = torch_resnet(model).to(self.device)
        self.net.train(training)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=lr, momentum=0.9) if training else None

    def set_threads(self, threads):
        self.torch.set_num_threads(threads)

    def prepare(self, x, labels=None):
        torch, net = self.torch, self.net
        tx = torch.from_numpy(x).to(self.device)  # on a GPU the input is resident, as cuDNN users keep it
        synchronize = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        if self.optimizer is None:
            def call():
                with torch.no_grad():
                    net(tx)
                synchronize()
            return call
        ty = torch.from_numpy(labels.astype(np.int64)).to(self.device)
        loss_fn = torch.nn.CrossEntropyLoss()

        def step():
            self.optimizer.zero_grad()
            loss_fn(net(tx), ty).backward()
            self.optimizer.step()
            synchronize()
        return step

    def flops_per_image(self):
        return float(self.dense_flops)


def torch_device(torch):
    """CUDA when PyTorch sees a GPU (TF32 off, so float32 is compared with float32), else the CPU."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass
class Context:
    """What runner factories get: the settings, the backend, the dense FLOPs and where to note skips."""

    depth: int
    backend: object
    seed: int
    dense_model: object
    skipped: dict = field(default_factory=dict)
    ratios: tuple = DEFAULT_RATIOS


def torch_runners(context):
    try:
        return [TorchRunner("torch dense", context.dense_model, None)]
    except ImportError as exc:
        context.skipped["torch dense"] = f"torch is not importable ({exc})"
        return []


def ponder_dense_runners(context):
    return [PonderRunner("ponder dense", "resnet", context.dense_model, context.backend)]


class CompiledRunner(PonderRunner):
    """A network compiled by :func:`fastpath.compile_network` (inference on channels-last rows)."""

    def __init__(self, name, network, model, backend, compiled, ratio_target=None):
        super().__init__(name, network, model, backend, ratio_target)
        self.compiled = compiled

    def prepare(self, x, labels=None):
        if hasattr(self.model, "base_biases") and x.shape[-1] in self.offsets:
            shift_halting_biases(self.model, self.offsets[x.shape[-1]])
        compiled = self.compiled
        return lambda: compiled(x)

    def flops_per_image(self):
        flops = getattr(self.compiled, "flops_per_sample", None)  # an adaptive compiled network counts its own
        return float(self.model.dense_flops_per_sample if flops is None else np.mean(flops))


def compiled_dense_runners(context):
    """ponder dense through :func:`fastpath.compile_network` (Cython backend only)."""
    from fastpath.cython_backend import CythonBackend

    if not isinstance(context.backend, CythonBackend):
        context.skipped["ponder compiled"] = "compile_network runs on the cython backend only"
        return []
    from fastpath.network import compile_network

    model = context.dense_model
    model.eval()
    return [CompiledRunner("ponder compiled", "resnet", model, context.backend,
                           compile_network(model, context.backend))]


def adaptive_runners(kind, label, fused=True):
    """A factory of one runner per FLOPs ratio, each with its own copy of the network (same seed, same weights)."""
    def factory(context):
        runners = []
        for ratio in context.ratios:
            model = adaptive_network(kind, context.depth, context.backend, context.seed, fused)
            copy_batch_norm_statistics(context.dense_model, model)
            runners.append(PonderRunner(label, kind, model, context.backend, ratio))
        return runners
    factory.__name__ = f"{kind}_runners"
    return factory


def compiled_sact_runners(context):
    """SACT through :func:`fastpath.compile_network`, one per FLOPs ratio (Cython backend only; weights as "SACT")."""
    from fastpath.cython_backend import CythonBackend

    if not isinstance(context.backend, CythonBackend):
        context.skipped["SACT compiled"] = "compile_network runs on the cython backend only"
        return []
    from fastpath.network import compile_network

    runners = []
    for ratio in context.ratios:
        model = adaptive_network("sact", context.depth, context.backend, context.seed)
        copy_batch_norm_statistics(context.dense_model, model)
        runners.append(CompiledRunner("SACT compiled", "sact", model, context.backend,
                                      compile_network(model, context.backend), ratio))
    return runners


#: name -> factory(context) -> runners, in table order. Append here to time another runner.
INFERENCE_RUNNERS = {
    "torch dense": torch_runners,
    "ponder dense": ponder_dense_runners,
    "ponder compiled": compiled_dense_runners,
    "SACT": adaptive_runners("sact", "SACT"),
    "SACT unfused": adaptive_runners("sact", "SACT unfused", fused=False),
    "SACT compiled": compiled_sact_runners,
    "PACT": adaptive_runners("pact", "PACT"),
}


def inference_runners(depth, backend, seed, ratios, statistics_x, skipped=None, names=None):
    """The dense network (batch-norm statistics from ``statistics_x``) and the runners of :data:`INFERENCE_RUNNERS`.

    ``names`` picks a subset of :data:`INFERENCE_RUNNERS` (default: all); a runner that cannot run
    here is noted in ``skipped``. The adaptive runners still need :func:`calibrate_runners`.
    """
    dense = dense_network(depth, backend, seed)
    set_batch_norm_statistics(dense, statistics_x)
    context = Context(depth, backend, seed, dense, {} if skipped is None else skipped, tuple(ratios))
    chosen = INFERENCE_RUNNERS if names is None else {name: INFERENCE_RUNNERS[name] for name in names}
    return dense, [runner for factory in chosen.values() for runner in factory(context)]


def calibrate_runners(runners, dense, calibration, log=None):
    """Find each adaptive runner's halting-bias offset for inputs like ``calibration`` (its size); returns the dense FLOPs per image.

    Runners of the same network kind and target share the offset (they are built from the same seed).
    """
    size = calibration.shape[-1]
    dense(calibration)
    dense_flops = float(dense.dense_flops_per_sample)
    found = {}
    for runner in runners:
        if isinstance(runner, TorchRunner):
            runner.dense_flops = dense_flops
        if runner.ratio_target is None:
            continue
        key = (runner.network, runner.ratio_target)
        if key not in found:
            found[key] = calibrate(runner.model, calibration, runner.ratio_target, dense_flops)
            if log is not None:
                log(f"  calibrated {runner.network} at {size} px: ratio {found[key][1]:.2f} on the calibration batch "
                    f"(target {runner.ratio_target:g}), bias offset {found[key][0]:+.3f}")
        runner.offsets[size] = found[key][0]
    return dense_flops


def training_runners(depth, backend, seed, skipped, lr=0.01):
    """ResNet-``depth`` (torch when importable, ponder) and SACT-ResNet-``depth`` (fused, unfused) in training mode."""
    from refimpl.optim import SGD
    from refimpl.resnet import resnet
    from refimpl.sact import SACTResNet

    def sgd(model):
        return SGD(model.named_parameters(), lr=lr, momentum=0.9)

    dense = resnet(depth, NUM_CLASSES, 3, np.random.default_rng(seed), backend=backend)
    runners = []
    try:
        runners.append(TorchRunner("torch dense", dense, None, training=True, lr=lr))
    except ImportError as exc:
        skipped["torch dense (training)"] = f"torch is not importable ({exc})"
    runners.append(PonderRunner("ponder dense", "resnet", dense, backend, optimizer=sgd(dense)))
    for label, fused in (("SACT", True), ("SACT unfused", False)):
        model = SACTResNet((depth - 2) // 6, NUM_CLASSES, 3, np.random.default_rng(seed), backend=backend)
        for block in model.stages:
            block.fused = fused
        runners.append(PonderRunner(label, "sact", model, backend, optimizer=sgd(model)))
    return runners


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def interleaved_times(calls, repeat):
    """Milliseconds of ``repeat`` interleaved rounds (:func:`refimpl.measurement.interleaved_times`)."""
    from refimpl.measurement import interleaved_times as seconds

    return [[t * 1e3 for t in times] for times in seconds(calls, repeat)]


@dataclass
class Row:
    part: str  # "inference" or "training"
    runner: str
    network: str
    depth: int
    size: int
    threads: int
    batch: int
    ratio_target: float | None
    ratio: float  # dense FLOPs / FLOPs spent (per image)
    flops_per_image: float
    dense_flops_per_image: float
    ms: float  # median
    ms_all: list
    images_per_s: float
    bias_offset: float | None = None
    vs_torch: float | None = None  # images/s ÷ torch dense's
    speedup: float | None = None  # over ponder dense (its ms / this ms)
    speedup_over_ratio: float | None = None


def add_ratios(rows):
    """Fill ``vs_torch``, ``speedup`` and ``speedup_over_ratio`` from the dense rows of the same setting."""
    def key(row):
        return row.part, row.size, row.threads

    torch_ms = {key(r): r.ms for r in rows if r.runner == "torch dense"}
    dense_ms = {key(r): r.ms for r in rows if r.runner == "ponder dense"}
    for r in rows:
        if key(r) in torch_ms:
            r.vs_torch = torch_ms[key(r)] / r.ms
        if key(r) in dense_ms:
            r.speedup = dense_ms[key(r)] / r.ms
            r.speedup_over_ratio = r.speedup / r.ratio


def time_setting(part, runners, x, labels, threads, repeat, depth, dense_flops, log):
    """Time every runner on ``x`` with ``threads`` threads, interleaved; one :class:`Row` each."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads):
        for runner in runners:
            runner.set_threads(threads)
        calls = [runner.prepare(x, labels) for runner in runners]
        times = interleaved_times(calls, repeat)
        rows = []
        for runner, call, ms_all in zip(runners, calls, times):
            call()  # the FLOPs of this input (adaptive networks: the same every call in evaluation)
            flops = runner.flops_per_image()
            ms = statistics.median(ms_all)
            rows.append(Row(part, runner.name, runner.network, depth, x.shape[-1], threads, len(x), runner.ratio_target,
                            dense_flops / flops, flops, dense_flops, ms, ms_all, len(x) * 1e3 / ms,
                            getattr(runner.model, "bias_offset", None) if hasattr(runner, "model") else None))
            log(f"  {part:9s} {x.shape[-1]:3d} px {threads} thr {runner.name:13s} "
                f"ratio {rows[-1].ratio:5.2f} {ms:9.1f} ms")
    return rows


def breakdown(runners, x, threads):
    """One call of each ponder runner inside :func:`fastpath.profiling.recording`: ms per phase and in total."""
    from threadpoolctl import threadpool_limits

    from fastpath import profiling

    out = []
    with threadpool_limits(limits=threads):
        for runner in runners:
            if not runner.phases:
                continue
            runner.set_threads(threads)
            call = runner.prepare(x)
            call()
            start = time.perf_counter()
            with profiling.recording() as totals:
                call()
            total = (time.perf_counter() - start) * 1e3
            phases = {name: totals.get(name, 0.0) * 1e3 for name in profiling.PHASES}
            out.append({"runner": runner.name, "ratio_target": runner.ratio_target, "size": x.shape[-1],
                        "threads": threads, "total_ms": total, "phases_ms": phases,
                        "unrecorded_ms": total - sum(phases.values())})
    return out


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def _fmt(value, spec):
    return format("-", f">{spec.split('.')[0]}") if value is None else format(value, spec)


def format_table(rows, title):
    head = (f"{'runner':15s} {'ratio req':>9s} {'ratio':>6s} {'ms':>9s} {'min':>9s} {'max':>9s} {'img/s':>8s} "
            f"{'vs torch':>8s} {'speedup':>7s} {'/ratio':>6s}")
    lines = [f"== {title} ==", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.runner:15s} {_fmt(r.ratio_target, '9.1f')} {r.ratio:6.2f} {r.ms:9.1f} {min(r.ms_all):9.1f} "
                     f"{max(r.ms_all):9.1f} {r.images_per_s:8.1f} {_fmt(r.vs_torch, '8.2f')} "
                     f"{_fmt(r.speedup, '7.2f')} {_fmt(r.speedup_over_ratio, '6.2f')}")
    return "\n".join(lines)


def format_breakdown(entries):
    from fastpath.profiling import PHASES

    head = f"{'runner':15s} {'ratio req':>9s} {'px':>4s} {'thr':>3s} {'total ms':>9s} " + " ".join(
        f"{p:>8s}" for p in PHASES) + f" {'unrecorded':>10s}"
    lines = ["== breakdown (ms per phase of one call, fastpath.profiling sections) ==", head, "-" * len(head)]
    for e in entries:
        lines.append(f"{e['runner']:15s} {_fmt(e['ratio_target'], '9.1f')} {e['size']:4d} {e['threads']:3d} "
                     f"{e['total_ms']:9.1f} " + " ".join(f"{e['phases_ms'][p]:8.1f}" for p in PHASES)
                     + f" {e['unrecorded_ms']:10.1f}")
    return "\n".join(lines)


def tables(result):
    """The printed tables of a result dict (as written to ``--json``): one per part, size and thread count."""
    rows = [Row(**r) for r in result["rows"]]
    s = result["settings"]
    out = []
    for part, depth, batch in (("inference", s["depth"], s["batch"]), ("training", s["train_depth"], s["batch"])):
        settings = sorted({(r.size, r.threads) for r in rows if r.part == part})
        for size, threads in settings:
            chosen = [r for r in rows if r.part == part and r.size == size and r.threads == threads]
            what = "forward, evaluation mode" if part == "inference" else "forward + backward + SGD update"
            out.append(format_table(chosen, f"{part}: ResNet-{depth} family, batch {batch}, {size} px, "
                                            f"{threads} thread{'s' if threads > 1 else ''} ({what})"))
    if result.get("breakdown"):
        out.append(format_breakdown(result["breakdown"]))
    return "\n\n".join(out)


def cpu_name():
    """The CPU model from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(backend):
    from fastpath.bench import blas_info

    info = {"python": sys.version.split()[0], "numpy": np.__version__, "machine": platform.machine(),
            "cpu": cpu_name(), "cpu_count": os.cpu_count(), "blas": blas_info(),
            "backend": repr(backend), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = list(os.getloadavg())
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        info["ponder"] = version("ponder")
    except Exception:  # not installed as a distribution (a source tree on sys.path)
        info["ponder"] = None
    return info


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


def _list_of(parse_one, accepted):
    """Argument type: a non-empty comma-separated list, each entry parsed by ``parse_one``."""
    def parse(text):
        items = [v.strip() for v in str(text).split(",") if v.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"must be a comma-separated list of {accepted}, got {text!r}")
        try:
            return tuple(parse_one(v) for v in items)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"must be a comma-separated list of {accepted}, got {text!r}") from None
    return parse


def _depth(text):
    from refimpl.commands.arguments import int_at_least

    value = int_at_least(14)(text)
    if (value - 2) % 6:
        raise argparse.ArgumentTypeError(f"must be a depth 6n + 2 with n >= 2 (14, 20, 32, 110, ...), got {text!r}")
    return value


def add_arguments(group):
    """The options of ``--networks`` (on ``group``, an argument group of the bench parser)."""
    from refimpl.commands.arguments import float_at_least, int_at_least, positive_int

    group.add_argument("--networks", action="store_true",
                       help="time whole networks (dense, SACT, PACT ResNets; torch when importable) instead of layers")
    group.add_argument("--sizes", type=_list_of(int_at_least(8), "integers >= 8"), default=None,
                       help=f"input sides in pixels (default {','.join(map(str, DEFAULT_SIZES))})")
    group.add_argument("--ratios", type=_list_of(float_at_least(1), "numbers >= 1"), default=None,
                       help="FLOPs ratios (dense FLOPs / FLOPs spent) of the adaptive networks "
                            f"(default {','.join(f'{r:g}' for r in DEFAULT_RATIOS)})")
    group.add_argument("--batch", type=positive_int, default=None, help=f"images per batch (default {DEFAULT_BATCH})")
    group.add_argument("--depth", type=_depth, default=None,
                       help=f"depth of the inference networks (default {DEFAULT_DEPTH})")
    group.add_argument("--train-depth", type=_depth, default=None,
                       help=f"depth of the training networks (default {DEFAULT_TRAIN_DEPTH})")
    group.add_argument("--train-size", type=int_at_least(8), default=None,
                       help=f"input side of the training benchmark (default {DEFAULT_TRAIN_SIZE})")
    group.add_argument("--parts", type=_list_of(_part, f"parts among {', '.join(PARTS)}"), default=None,
                       help=f"what to time (default {','.join(PARTS)})")
    group.add_argument("--quick", action="store_true",
                       help="a smoke run in seconds: " + ", ".join(f"{k.replace('_', '-')} {_show(v)}"
                                                                   for k, v in QUICK.items()))
    group.add_argument("--breakdown", action="store_true",
                       help="also time one call of each ponder network per phase (fastpath.profiling sections)")
    group.add_argument("--network-backend", choices=NETWORK_BACKENDS, default=None,
                       help="conv backend of the ponder networks (default cython; opencl runs them through "
                            "PyOpenCL, e.g. on a GPU, with NumPy arrays between layers)")


def _part(text):
    if text not in PARTS:
        raise argparse.ArgumentTypeError(f"unknown part {text!r}")
    return text


def _show(value):
    return ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else f"{value:g}"


NETWORK_ONLY = ("sizes", "ratios", "batch", "depth", "train_depth", "train_size", "parts", "quick", "breakdown",
                "network_backend")
NETWORK_BACKENDS = ("cython", "opencl")


def resolve(args, layer_defaults):
    """Check the ``--networks`` options against each other and fill in the defaults (in place).

    ``layer_defaults``: ``{dest: default}`` of the per-layer options, which ``--networks`` refuses.
    """
    given = {name for name in NETWORK_ONLY if getattr(args, name) not in (None, False)}
    if not args.networks:
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in sorted(given))
            raise UsageError(f"{flags}: only with --networks (the whole-network benchmark)")
        return args
    wrong = [name for name, default in layer_defaults.items() if getattr(args, name) != default]
    if wrong:
        flags = ", ".join("--" + name.replace("_", "-") for name in wrong)
        raise UsageError(f"{flags}: options of the per-layer benchmark; --networks does not take them")
    defaults = {"sizes": DEFAULT_SIZES, "threads": DEFAULT_THREADS, "ratios": DEFAULT_RATIOS, "batch": DEFAULT_BATCH,
                "depth": DEFAULT_DEPTH, "train_depth": DEFAULT_TRAIN_DEPTH, "train_size": DEFAULT_TRAIN_SIZE,
                "parts": PARTS, "network_backend": "cython"}
    if args.quick:
        defaults.update(QUICK)
    for name, value in defaults.items():
        if name == "repeat":
            continue
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.repeat is None:
        args.repeat = defaults.get("repeat", 5)
    return args


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def run(args):
    """Run the whole-network benchmark with resolved ``args`` (see :func:`resolve`); prints and returns the result dict."""
    import fastpath

    name = args.network_backend
    status = fastpath.available_backends()[name]
    if not status.usable:
        raise UsageError(f"--networks --network-backend {name}: the {name} backend is not usable here: {status.reason}")
    if name == "cython":
        from fastpath.cython_backend import CythonBackend

        backend = CythonBackend(threads=max(args.threads))
    else:
        from refimpl.backend import get_backend

        backend = get_backend(name)
    log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    rng = np.random.default_rng(args.seed)
    info = environment(backend)
    settings = {k: getattr(args, k) for k in ("sizes", "threads", "ratios", "batch", "depth", "train_depth",
                                               "train_size", "repeat", "seed", "parts", "breakdown",
                                               "network_backend")}
    settings.update(halting_spread=HALTING_SPREAD, calibration_batch=min(CALIBRATION_BATCH, args.batch),
                    bias_range=list(BIAS_RANGE), bisection_steps=BISECTION_STEPS)
    print(f"ponder bench --networks: float32, batch {args.batch}, median of {args.repeat} interleaved rounds after a "
          f"warm-up call; threads {list(args.threads)}")
    print(f"CPU: {info['cpu']} ({info['cpu_count']} logical CPUs)"
          + (f", load average {info['load_average_at_start'][0]:.2f} at start" if "load_average_at_start" in info
             else ""))
    from fastpath.bench import blas_line

    print(blas_line(info["blas"]))
    rows, skipped, entries = [], {}, []
    if "inference" in args.parts:
        statistics_x = smooth_images(rng, min(CALIBRATION_BATCH, args.batch), args.sizes[0])
        dense, runners = inference_runners(args.depth, backend, args.seed, args.ratios, statistics_x, skipped)
        for size in args.sizes:
            x = smooth_images(rng, args.batch, size)
            calibration = smooth_images(rng, min(CALIBRATION_BATCH, args.batch), size)
            dense_flops = calibrate_runners(runners, dense, calibration, log)
            for threads in args.threads:
                rows += time_setting("inference", runners, x, None, threads, args.repeat, args.depth, dense_flops, log)
                if args.breakdown:
                    entries += breakdown(runners, x, threads)
    if "training" in args.parts:
        runners = training_runners(args.train_depth, backend, args.seed, skipped)
        size = args.train_size
        x = smooth_images(rng, args.batch, size)
        labels = rng.integers(0, NUM_CLASSES, args.batch)
        dense = next(r for r in runners if r.name == "ponder dense").model
        dense(x)
        dense_flops = float(dense.dense_flops_per_sample)
        for runner in runners:
            if isinstance(runner, TorchRunner):
                runner.dense_flops = dense_flops
        for threads in args.threads:
            rows += time_setting("training", runners, x, labels, threads, args.repeat, args.train_depth, dense_flops,
                                 log)
    add_ratios(rows)
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    result = {"environment": info, "settings": settings, "skipped": skipped,
              "rows": [asdict(r) for r in rows], "breakdown": entries}
    print()
    print(tables(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.json}")
    return result
