"""Benchmark of the perforated convolution on every backend: ``python -m fastpath.bench`` / ``ponder bench``.

For each reference layer (float32, NCHW) and perforation rate (grid masks), every backend runs the
perforated convolution to the compact tensor — which the next layer reads through an index table
(implicit interpolation, docs/spec.md §2.6), so no filled tensor is formed; ``--output dense`` adds the
nearest fill to the dense output and its adjoint — and at rate 0 the plain convolution; forward
alone and forward + backward. Printed per run:

* median milliseconds over ``--repeat`` runs (after one warm-up run);
* GFLOP/s dense-equivalent (the dense layer's FLOPs over the time: what the user gets) and actual
  (the FLOPs really spent on the computed positions, docs/spec.md §5.1). Forward + backward counts three
  GEMM-sized products (forward, dX, dW), i.e. 3× the forward FLOPs;
* speedup over the same backend's dense run, and that speedup over the ideal ``1 / (1 - r)``
  (r = the realised rate);
* the ratio to PyTorch's dense ``conv2d`` on the same pass when torch is importable (> 1: faster
  than PyTorch's dense layer). PyTorch is a comparison only, never a dependency.

OpenCL is timed three ways: ``opencl`` (data resident on the device, wall clock after
``synchronize()``), ``opencl-kernel`` (the same calls, the sum of the kernels' device time from
profiling events) and ``opencl-e2e`` (end to end: host arrays uploaded, the result copied back,
every transfer included). ``--gpu-layers`` adds two GPU-sized layers (VGG-16 conv3 with N = 64,
ResNet 64@8 with N = 1024). On a CUDA machine ``torch`` runs on the GPU (cuDNN, TF32 off so
float32 is compared with float32).

Backends: ``numpy`` (the refimpl reference; slow at these sizes, so by default it runs once, at
rate 0 only — see ``--numpy-rates`` / ``--numpy-repeat``), ``cython``, ``opencl`` when usable and
``torch``. Backends are generic: anything implementing :class:`refimpl.backend.ConvBackend` runs;
data goes through its ``to_device`` once, the clock stops after its ``synchronize()`` if it has
one, and its ``device_name`` is printed if it has one. ``--threads`` sets the OpenMP threads of the
Cython backend, PyTorch's threads and every BLAS library's (via threadpoolctl).

``--networks`` times whole networks instead (dense, SACT and PACT ResNets against PyTorch's dense
one, inference and training): :mod:`fastpath.bench_networks`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from fastpath import bench_networks
from refimpl.commands.arguments import HelpFormatter, UsageError, int_at_least, positive_int
from refimpl.conv import check_conv_args, conv_flops
from refimpl.masks import grid_mask
from refimpl.plan import PerforationPlan

#: One line for ``ponder --help``.
HELP = "benchmark every backend (numpy, cython, opencl, torch) on reference layers"

DEFAULT_RATES = (0.0, 0.25, 0.5, 0.75)
PASSES = ("forward", "forward+backward")
BACKENDS = ("numpy", "cython", "opencl", "opencl-kernel", "opencl-e2e", "torch")


@dataclass(frozen=True)
class Layer:
    """One convolution to time: batch, channels in/out, square input side, kernel, padding."""

    title: str
    n: int
    c: int
    k: int
    hw: int
    kernel: int = 3
    padding: int = 1
    default: bool = True  # part of the default run (GPU-sized layers are only run when named)

    @property
    def out_hw(self):
        side = self.hw + 2 * self.padding - self.kernel + 1
        return side, side

    def dense_flops(self):
        ho, wo = self.out_hw
        return conv_flops(self.n * ho * wo, self.c, self.k, (self.kernel, self.kernel))


LAYERS = {
    "resnet16": Layer("ResNet CIFAR 16@32", 128, 16, 16, 32),
    "resnet32": Layer("ResNet CIFAR 32@16", 128, 32, 32, 16),
    "resnet64": Layer("ResNet CIFAR 64@8", 128, 64, 64, 8),
    "nin1": Layer("NIN conv1 3->192 5x5 @32", 128, 3, 192, 32, 5, 2),
    "nin2": Layer("NIN conv2 96->192 5x5 @16", 32, 96, 192, 16, 5, 2),
    "alexnet2": Layer("AlexNet conv2 96->256 5x5 @27", 16, 96, 256, 27, 5, 2),
    "vgg3": Layer("VGG-16 conv3 256->256 @56", 4, 256, 256, 56),
    # GPU-sized (docs/spec.md §12): run with --gpu-layers or by name.
    "vgg3_n64": Layer("VGG-16 conv3 256->256 @56 N=64", 64, 256, 256, 56, default=False),
    "resnet64_n1024": Layer("ResNet 64@8 N=1024", 1024, 64, 64, 8, default=False),
}
GPU_LAYERS = ("vgg3_n64", "resnet64_n1024")
# The "large layers" of docs/spec.md §12: the dense-speed target against PyTorch is 0.7x on these, 0.4x elsewhere.
LARGE_LAYERS = ("nin2", "alexnet2", "vgg3", "resnet64")


# ---------------------------------------------------------------------------------------------
# Runners: one per backend, each turning (layer arrays, plan) into timed callables
# ---------------------------------------------------------------------------------------------


class ConvBackendRunner:
    """Times any :class:`refimpl.backend.ConvBackend` on the perforated layer.

    ``fill = None`` (``--output compact``, the default) times the convolution to the compact tensor,
    which the next layer reads through an index table (implicit interpolation, docs/spec.md §2.6);
    ``fill = "nearest"`` (``--output dense``) adds the fill to the dense output and its adjoint.
    """

    fill = None

    def __init__(self, name, backend):
        self.name = name
        self.backend = backend
        self.device_name = getattr(backend, "device_name", None)

    def synchronize(self):
        sync = getattr(self.backend, "synchronize", None)
        if sync is not None:
            sync()

    def prepare(self, x, w, b, dout, geometry):
        be = self.backend
        self.geometry = geometry
        self.x, self.w, self.b = be.to_device(x), be.to_device(w), be.to_device(b)
        self.dout = be.to_device(dout)
        n, k = dout.shape[:2]
        self.dout_compact = be.to_device(dout.reshape(n, k, -1))
        self.synchronize()

    def compact_gradient(self, plan):
        """A (N, K, P) upstream gradient for ``plan``'s compact output (host array)."""
        dout = self.backend.to_host(self.dout_compact)
        return np.ascontiguousarray(dout[:, :, : plan.width])

    def calls(self, plan):
        """``{pass name: callable}`` for ``plan`` (the dense plan skips the fill: it is the identity)."""
        be, g = self.backend, self.geometry
        skip_fill = plan.full or self.fill is None
        dcompact_given = be.to_device(self.compact_gradient(plan)) if skip_fill else None

        def forward():
            compact, cache = be.conv_forward(self.x, self.w, self.b, plan, g)
            out = compact if skip_fill else be.fill_forward(compact, plan, self.fill)
            return out, cache

        def run_forward():
            forward()
            self.synchronize()

        def run_forward_backward():
            _, cache = forward()
            dcompact = dcompact_given if skip_fill else be.fill_backward(self.dout, plan, self.fill)
            be.conv_backward(dcompact, cache)
            self.synchronize()

        return {"forward": run_forward, "forward+backward": run_forward_backward}


class OpenCLKernelRunner(ConvBackendRunner):
    """The OpenCL backend's kernel time: the sum of the profiling events of every kernel launched."""

    def time(self, fn, repeat, warmup=True):
        be = self.backend
        if warmup:
            fn()
        times = []
        for _ in range(repeat):
            be.kernel_seconds()  # forget earlier events
            be.record_events = True
            try:
                fn()
                times.append(be.kernel_seconds() * 1e3)
            finally:
                be.record_events = False
        return times


class OpenCLEndToEndRunner(ConvBackendRunner):
    """The OpenCL backend end to end: host arrays in, host arrays out, every transfer timed."""

    def prepare(self, x, w, b, dout, geometry):
        self.geometry = geometry
        self.x, self.w, self.b, self.dout = x, w, b, dout
        n, k = dout.shape[:2]
        self.dout_compact = dout.reshape(n, k, -1)

    def calls(self, plan):
        be, g = self.backend, self.geometry
        skip_fill = plan.full or self.fill is None
        dcompact_given = self.compact_gradient(plan) if skip_fill else None

        def forward():
            compact, cache = be.conv_forward(be.to_device(self.x), be.to_device(self.w), be.to_device(self.b), plan, g)
            out = compact if skip_fill else be.fill_forward(compact, plan, self.fill)
            return be.to_host(out), cache

        def run_forward():
            forward()

        def run_forward_backward():
            _, cache = forward()
            if skip_fill:
                dcompact = be.to_device(dcompact_given)
            else:
                dcompact = be.fill_backward(be.to_device(self.dout), plan, self.fill)
            for grad in be.conv_backward(dcompact, cache):
                be.to_host(grad)

        return {"forward": run_forward, "forward+backward": run_forward_backward}


class TorchRunner:
    """PyTorch's dense ``conv2d`` (autograd for the backward); rate 0 only."""

    name = "torch"
    device_name = None

    def __init__(self, threads):
        import torch

        self.torch = torch
        torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda":
            # float32 against float32: no TF32 tensor-core shortcut in cuDNN or cuBLAS
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.benchmark = True
            self.device_name = (f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}, "
                                f"cuDNN {torch.backends.cudnn.version()}, TF32 off)")

    def synchronize(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def prepare(self, x, w, b, dout, geometry):
        t = self.torch
        self.padding = geometry.padding
        self.x, self.w, self.b = (t.from_numpy(a.copy()).to(self.device).requires_grad_() for a in (x, w, b))
        self.dout = t.from_numpy(dout).to(self.device)

    def calls(self, plan):
        if not plan.full:
            return {}
        f = self.torch.nn.functional

        def run_forward():
            with self.torch.no_grad():
                f.conv2d(self.x, self.w, self.b, padding=self.padding)
            self.synchronize()

        def run_forward_backward():
            for a in (self.x, self.w, self.b):
                a.grad = None
            f.conv2d(self.x, self.w, self.b, padding=self.padding).backward(self.dout)
            self.synchronize()

        return {"forward": run_forward, "forward+backward": run_forward_backward}


def make_runner(name, threads):
    """The runner of backend ``name``, or ``(None, reason)`` when it cannot run here."""
    if name == "torch":
        try:
            return TorchRunner(threads), None
        except ImportError as exc:
            return None, f"torch is not importable ({exc})"
    if name == "numpy":
        from refimpl.backend import NumpyBackend

        return ConvBackendRunner(name, NumpyBackend()), None
    import fastpath

    if name in ("opencl-kernel", "opencl-e2e"):
        status = fastpath.available_backends()["opencl"]
        if not status.usable:
            return None, status.reason
        from refimpl.backend import get_backend

        runner = OpenCLKernelRunner if name == "opencl-kernel" else OpenCLEndToEndRunner
        return runner(name, get_backend("opencl")), None
    status = fastpath.available_backends().get(name)
    if status is None:
        return None, f"unknown backend {name!r}"
    if not status.usable:
        return None, status.reason
    if name == "cython":
        from fastpath.cython_backend import CythonBackend

        return ConvBackendRunner(name, CythonBackend(threads=threads)), None
    from refimpl.backend import get_backend

    return ConvBackendRunner(name, get_backend(name)), None


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@dataclass
class Result:
    layer: str
    backend: str
    phase: str
    rate_requested: float
    rate: float
    ms: float  # median
    ms_all: list
    gflops_dense_equivalent: float
    gflops_actual: float
    speedup: float | None = None  # over the same backend's dense run
    speedup_over_ideal: float | None = None
    vs_torch: float | None = None  # torch dense time / this time


def time_call(fn, repeat, warmup=True):
    """Milliseconds of ``repeat`` calls of ``fn`` (after one untimed call when ``warmup``)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def make_plan(layer, rate, rng):
    if rate == 0:
        return PerforationPlan.dense(layer.out_hw)
    plan = PerforationPlan(grid_mask(layer.out_hw, rate, rng))
    _ = plan.index_map  # computed once here, not inside the timings
    return plan


def layer_arrays(layer, rng):
    """Random float32 ``(x, w, b, geometry, dout)`` of ``layer`` (input, weights, bias, geometry, upstream gradient)."""
    x = rng.standard_normal((layer.n, layer.c, layer.hw, layer.hw), dtype=np.float32)
    w = (rng.standard_normal((layer.k, layer.c, layer.kernel, layer.kernel), dtype=np.float32)
         / np.sqrt(layer.c * layer.kernel**2)).astype(np.float32)
    b = rng.standard_normal(layer.k, dtype=np.float32)
    x, w, b, geometry = check_conv_args(x, w, b, 1, layer.padding)
    dout = rng.standard_normal((layer.n, layer.k, *layer.out_hw), dtype=np.float32)
    return x, w, b, geometry, dout


def bench_layer(name, layer, runners, rates, args, rng, log):
    """Time every runner on one layer; returns a list of :class:`Result`."""
    x, w, b, geometry, dout = layer_arrays(layer, rng)
    plans = {rate: make_plan(layer, rate, rng) for rate in rates}
    results = []
    for runner in runners:
        runner.prepare(x, w, b, dout, geometry)
        is_numpy = runner.name == "numpy"
        for rate in rates:
            if is_numpy and rate not in args.numpy_rates:
                continue
            plan = plans[rate]
            for phase, fn in runner.calls(plan).items():
                repeat = args.numpy_repeat if is_numpy else args.repeat
                timer = getattr(runner, "time", None) or time_call  # opencl-kernel: device events
                times = timer(fn, repeat, warmup=not is_numpy)
                ms = statistics.median(times)
                factor = 1 if phase == "forward" else 3
                dense = factor * layer.dense_flops()
                actual = factor * conv_flops(plan.computed_positions(layer.n), layer.c, layer.k,
                                             (layer.kernel, layer.kernel))
                results.append(Result(name, runner.name, phase, rate, plan.rate, ms, times,
                                      dense / ms / 1e6, actual / ms / 1e6))
                log(f"  {layer.title:32s} {runner.name:13s} r={plan.rate:.2f} (requested {rate:.2f}) "
                    f"{phase:16s} {ms:9.2f} ms")
    add_ratios(results)
    return results


def validation_overhead(name, layer, runner, rng, repeat, calls=200):
    """What the argument checks of ``conv_forward`` cost, against the layer's forward on ``runner``.

    Every backend method validates its arguments (:mod:`refimpl.backend_checks`) before its
    kernel runs. The checks alone are timed over ``calls`` calls (their median per call) and the
    whole forward once, interleaved, ``repeat`` times; the share is checks / forward, with the
    medians. The checks do not depend on the perforation rate, so the dense plan is used: its
    forward is the layer's reference time.
    """
    from refimpl import backend_checks

    x = rng.standard_normal((layer.n, layer.c, layer.hw, layer.hw), dtype=np.float32)
    w = rng.standard_normal((layer.k, layer.c, layer.kernel, layer.kernel), dtype=np.float32)
    b = rng.standard_normal(layer.k, dtype=np.float32)
    x, w, b, geometry = check_conv_args(x, w, b, 1, layer.padding)
    dout = np.zeros((layer.n, layer.k, *layer.out_hw), dtype=np.float32)
    runner.prepare(x, w, b, dout, geometry)
    plan = make_plan(layer, 0.0, rng)
    forward = runner.calls(plan)["forward"]
    types = runner.backend.array_types

    def checks():
        for _ in range(calls):
            backend_checks.conv_forward_args(runner.x, runner.w, runner.b, plan, geometry, types)

    forward()
    forward_ms, check_us = [], []
    for _ in range(repeat):
        forward_ms += time_call(forward, 1, warmup=False)
        check_us.append(time_call(checks, 1, warmup=False)[0] * 1e3 / calls)
    fwd, chk = statistics.median(forward_ms), statistics.median(check_us)
    return {"layer": name, "backend": runner.name, "forward_ms": fwd, "checks_us": chk,
            "share": chk * 1e-3 / fwd}


def add_ratios(results):
    """Fill speedup (vs the same backend's dense run), speedup / ideal and the ratio to torch."""
    dense = {(r.layer, r.backend, r.phase): r.ms for r in results if r.rate_requested == 0}
    for r in results:
        own = dense.get((r.layer, r.backend, r.phase))
        if own is not None:
            r.speedup = own / r.ms
            r.speedup_over_ideal = r.speedup * (1.0 - r.rate)
        torch_ms = dense.get((r.layer, "torch", r.phase))
        if torch_ms is not None:
            r.vs_torch = torch_ms / r.ms


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def _fmt(value, spec):
    """``value`` formatted by ``spec`` ("7.2f"), or a right-aligned "-" of the same width when missing."""
    return format("-", f">{spec.split('.')[0]}") if value is None else format(value, spec)


def format_table(results, phase):
    """A fixed-width table of the results of one pass."""
    head = (f"{'layer':14s} {'backend':13s} {'r req':>5s} {'r':>5s} {'ms':>9s} {'GF/s eq':>8s} {'GF/s act':>8s} "
            f"{'speedup':>7s} {'/ideal':>6s} {'vs torch':>8s}")
    lines = [f"== {phase} == (r req: the requested rate; r: the rate the grid mask realises)", head, "-" * len(head)]
    for r in results:
        if r.phase != phase:
            continue
        lines.append(f"{r.layer:14s} {r.backend:13s} {r.rate_requested:5.2f} {r.rate:5.2f} {r.ms:9.2f} "
                     f"{r.gflops_dense_equivalent:8.1f} "
                     f"{r.gflops_actual:8.1f} {_fmt(r.speedup, '7.2f')} {_fmt(r.speedup_over_ideal, '6.2f')} "
                     f"{_fmt(r.vs_torch, '8.2f')}")
    return "\n".join(lines)


def blas_info():
    """The BLAS libraries loaded (kernel architecture, version, threads), from threadpoolctl."""
    from threadpoolctl import threadpool_info

    return [{k: lib.get(k) for k in ("internal_api", "version", "architecture", "num_threads", "prefix",
                                     "threading_layer")}
            for lib in threadpool_info() if lib.get("user_api") == "blas"]


def blas_line(libraries):
    """One line naming every BLAS library loaded, in a fixed order (numpy's and scipy's may differ)."""
    if not libraries:
        return "BLAS: none loaded"
    ordered = sorted(libraries, key=lambda lib: tuple(str(lib.get(k)) for k in ("internal_api", "prefix", "version")))
    return "BLAS: " + "; ".join(f"{lib['internal_api']} {lib['version']} kernel {lib['architecture']} "
                                f"({lib['num_threads']} threads, {lib['prefix']})" for lib in ordered)


def environment(args, runners):
    info = {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "output": args.output,
        "repeat": args.repeat,
        "numpy_repeat": args.numpy_repeat,
        "blas": blas_info(),
        "devices": {r.name: r.device_name for r in runners if r.device_name},
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for r in runners:
        if r.name == "torch":
            info["torch"] = r.torch.__version__
    return info


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _csv(kind):
    def parse(text):
        try:
            return tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
    return parse


def _csv_of(choices, what):
    """Argument type: a comma-separated list whose every entry is one of ``choices``."""
    def parse(text):
        items = _csv(str)(text)
        unknown = [v for v in items if v not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown) or '(none given)'}; choose a "
                                             f"comma-separated subset of {','.join(choices)}")
        return items
    return parse


def _rates(text):
    rates = _csv(float)(text)
    bad = [r for r in rates if not 0 <= r < 1]
    if bad or not rates:
        raise argparse.ArgumentTypeError(f"rates must be comma-separated numbers in [0, 1), got {text!r}")
    return rates


def add_arguments(parser):
    parser.add_argument("--threads", type=_positive_ints, default=None,
                        help="CPU threads for every backend and BLAS (default: PONDER_THREADS or the CPU count); "
                             "with --networks a comma-separated list (default 1,2)")
    parser.add_argument("--repeat", type=positive_int, default=None,
                        help="timed runs per measurement (median; default 5, with --networks --quick 2)")
    parser.add_argument("--numpy-repeat", type=positive_int, default=1, help="timed runs of the slow NumPy reference")
    parser.add_argument("--numpy-rates", type=_rates, default="0", help="rates at which the NumPy reference runs")
    parser.add_argument("--layers", type=_csv_of(tuple(LAYERS), "layer"),
                        default=",".join(k for k, v in LAYERS.items() if v.default),
                        help=f"comma-separated subset of {', '.join(LAYERS)}")
    parser.add_argument("--backends", type=_csv_of(BACKENDS, "backend"), default=",".join(BACKENDS),
                        help="comma-separated subset; those that cannot run here are listed as skipped")
    parser.add_argument("--gpu-layers", action="store_true",
                        help=f"also run the GPU-sized layers {', '.join(GPU_LAYERS)}")
    parser.add_argument("--rates", type=_rates, default=",".join(f"{r:g}" for r in DEFAULT_RATES),
                        help="perforation rates in [0, 1) (grid masks); 0 is always added")
    parser.add_argument("--output", choices=("compact", "dense"), default="compact",
                        help="compact: the convolution to the compact tensor, read by the next layer through an "
                             "index table; dense: also the nearest fill to the dense output")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the data and the masks")
    parser.add_argument("--json", metavar="PATH", help="also write every measurement to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress lines, only the tables")
    parser.add_argument("--validation-overhead", action="store_true",
                        help="instead of the speed tables: the cost of the backends' argument checks as a share "
                             "of each layer's dense forward (the smallest layer gives the largest share)")
    bench_networks.add_arguments(parser.add_argument_group(
        "whole networks (--networks; see fastpath.bench_networks)"))


def _positive_ints(text):
    """``--threads``: a comma-separated list of positive integers (one for the per-layer benchmark)."""
    return bench_networks._list_of(positive_int, "integers >= 1")(text)


def _layer_defaults():
    """The per-layer options and their parsed defaults (``--networks`` refuses any other value)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parsed = vars(parser.parse_args([]))
    return {name: parsed[name] for name in ("numpy_repeat", "numpy_rates", "layers", "backends", "gpu_layers", "rates",
                                            "output", "validation_overhead")}


def _check_args(args):
    if hasattr(args, "networks"):
        bench_networks.resolve(args, {})  # refuses the --networks options here
    if args.repeat is None:
        args.repeat = 5
    if args.threads is not None:
        if len(args.threads) > 1:
            raise UsageError(f"--threads: the per-layer benchmark takes one thread count, got "
                             f"{','.join(map(str, args.threads))} (lists are for --networks)")
        args.threads = args.threads[0]
    if args.threads is None:
        # Resolved here, not in add_arguments: building the ``ponder`` parser must not load the
        # compiled extension (nor its OpenMP runtime, which reads OMP_* variables when loaded).
        from fastpath.cython_backend import default_threads

        args.threads = default_threads()
    if getattr(args, "gpu_layers", False):
        args.layers = tuple(args.layers) + tuple(k for k in GPU_LAYERS if k not in args.layers)
    if 0.0 not in args.rates:
        args.rates = (0.0, *args.rates)  # every speedup is relative to the dense run


def run(args):
    if getattr(args, "networks", False):
        bench_networks.resolve(args, _layer_defaults())
        bench_networks.run(args)
        return 0
    _check_args(args)
    from threadpoolctl import threadpool_limits

    log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    runners, skipped = [], {}
    if not set(args.backends) - {"torch"} and not args.quiet:
        print("ponder bench: only torch was asked for; it runs at rate 0 only (a dense reference)")
    for name in args.backends:
        runner, reason = make_runner(name, args.threads)
        if runner is None:
            skipped[name] = reason
        else:
            if isinstance(runner, ConvBackendRunner):
                runner.fill = None if args.output == "compact" else "nearest"
            runners.append(runner)
    rng = np.random.default_rng(args.seed)
    results = []
    with threadpool_limits(limits=args.threads):
        info = environment(args, runners)
        print(f"ponder bench: float32, {args.output} output, {args.threads} threads, median of {args.repeat} "
              f"(numpy: {args.numpy_repeat}, at rates {list(args.numpy_rates)}) after a warm-up run")
        print(blas_line(info["blas"]))
        for name, device in info["devices"].items():
            print(f"{name} device: {device}")
        for name, reason in skipped.items():
            print(f"skipped {name}: {reason}")
        if getattr(args, "validation_overhead", False):
            return _report_overhead(args, runners, rng)
        for name in args.layers:
            results += bench_layer(name, LAYERS[name], runners, args.rates, args, rng, log)
    if not results:
        raise UsageError(f"none of the backends {', '.join(args.backends)} can run here: "
                         + "; ".join(f"{name}: {reason}" for name, reason in skipped.items()))
    for phase in PASSES:
        print()
        print(format_table(results, phase))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": info, "layers": {k: asdict(LAYERS[k]) for k in args.layers},
                       "skipped": skipped, "results": [asdict(r) for r in results]}, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


def _report_overhead(args, runners, rng):
    rows = [validation_overhead(name, LAYERS[name], runner, rng, args.repeat)
            for name in args.layers for runner in runners if isinstance(runner, ConvBackendRunner)]
    print(f"{'layer':14s} {'backend':10s} {'forward ms':>11s} {'checks us':>10s} {'share':>8s}")
    for row in rows:
        print(f"{row['layer']:14s} {row['backend']:10s} {row['forward_ms']:11.3f} {row['checks_us']:10.1f} "
              f"{100 * row['share']:7.3f}%")
    if rows:
        smallest = min(rows, key=lambda r: r["forward_ms"])
        print(f"smallest forward: {smallest['layer']} on {smallest['backend']}, checks "
              f"{100 * smallest['share']:.3f}% of it")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"validation_overhead": rows}, f, indent=1)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastpath.bench", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UsageError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
