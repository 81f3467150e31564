"""Time SACT-ResNet inference with fused and unfused sparse units against the plain ResNet; print a table and JSON.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/fused_unit_timing.py --repeats 7

Defaults: depth 32, widths 16/32/64, batch 64, 32×32 RGB inputs, float32, evaluation mode, the
cython backend with 1 thread (OpenMP and every BLAS held at 1 thread with threadpoolctl). Runs:

* ``dense``: the plain ResNet (same depth and widths), and ``dense-compiled``: the same model
  through :func:`fastpath.compile_network` (channels-last rows, the fused unit's kernels);
* ``sact-none-fused`` / ``-unfused``: SACT with a halting bias so low that nothing halts (every
  unit runs at every position: the overhead of the sparse machinery);
* ``sact-half-fused`` / ``-unfused``: SACT with the halting bias found (by bisection, on the timed
  batch) to spend about ``1 / --ratio`` of the dense FLOPs.

The runs are interleaved (one forward of each, ``--repeats`` times, after a warm-up each), and the
medians and the spread (min–max) are reported, with the speed-up over ``dense`` and, for SACT,
that speed-up divided by the FLOPs ratio (the plain ResNet's FLOPs over the run's; 1.0 = time saved
in proportion to FLOPs saved).
``--breakdown`` adds the phases recorded by :mod:`fastpath.profiling` for the fused runs.
``--torch`` adds ``torch-dense``, the same pre-activation ResNet in PyTorch (CPU, evaluation mode,
``torch.set_num_threads(--threads)``), when torch is importable: a comparison, never a dependency.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

from fastpath import compile_network, profiling
from fastpath.bench import blas_info, blas_line
from fastpath.cython_backend import CythonBackend
from refimpl.models import build_model


def flops_of(model, x):
    model(x)
    return float(np.mean(model.flops_per_sample))


def bias_for_ratio(depth, args, backend, x, target, dense_flops):
    """Halting bias whose SACT net spends ``dense_flops / target`` FLOPs on ``x`` (bisection on the bias)."""
    lo, hi = -8.0, 8.0  # FLOPs fall as the bias grows (halting earlier)
    for _ in range(12):
        mid = (lo + hi) / 2
        model = make_sact(depth, args, backend, mid)
        if dense_flops / flops_of(model, x) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def make_sact(depth, args, backend, bias):
    model = build_model(f"sact-resnet{depth}", 10, 3, np.random.default_rng(args.seed), backend=backend,
                        widths=args.widths, halting_bias=bias)
    model.eval()
    return model


def torch_resnet(depth, widths, num_classes=10, in_channels=3):
    """The pre-activation ResNet of :mod:`refimpl.resnet` (pad shortcut) in PyTorch, for timing only."""
    import torch
    from torch import nn

    class Unit(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.stride, self.pad = stride, cout - cin

        def forward(self, x):
            h = self.conv1(torch.relu(self.bn1(x)))
            h = self.conv2(torch.relu(self.bn2(h)))
            s = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
            if self.pad:
                s = nn.functional.pad(s, (0, 0, 0, 0, 0, self.pad))
            return s + h

    n = (depth - 2) // 6
    layers = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)]
    cin = widths[0]
    for stage, width in enumerate(widths):
        for index in range(n):
            layers.append(Unit(cin, width, 2 if stage and not index else 1))
            cin = width
    layers += [nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    model = nn.Sequential(*layers).eval()

    def run(x):
        with torch.no_grad():
            return model(x)

    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--widths", type=lambda s: tuple(int(v) for v in s.split(",")), default=(16, 32, 64))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--ratio", type=float, default=2.0, help="FLOPs ratio of the 'half' runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--breakdown", action="store_true")
    parser.add_argument("--torch", action="store_true", help="also time the dense net in PyTorch if importable")
    args = parser.parse_args(argv)

    with threadpool_limits(limits=args.threads):
        print(blas_line(blas_info()), file=sys.stderr)
        backend = CythonBackend(threads=args.threads)
        rng = np.random.default_rng(args.seed)
        x = rng.standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)
        dense = build_model(f"resnet{args.depth}", 10, 3, np.random.default_rng(args.seed), backend=backend,
                            widths=args.widths)
        dense.eval()
        dense_flops = flops_of(dense, x)
        half_bias = bias_for_ratio(args.depth, args, backend, x, args.ratio, dense_flops)
        runs = {"dense": dense, "dense-compiled": compile_network(dense, backend)}
        for label, bias in (("none", -50.0), ("half", half_bias)):
            for fused in (True, False):
                model = make_sact(args.depth, args, backend, bias)
                for block in model.stages:
                    block.fused = fused
                runs[f"sact-{label}-{'fused' if fused else 'unfused'}"] = model
        info = {}
        for name, model in runs.items():
            model(x)  # warm-up (plans, caches)
            flops = dense_flops if name == "dense-compiled" else float(np.mean(model.flops_per_sample))
            info[name] = {"flops_ratio": dense_flops / flops}
        if args.torch:
            try:
                import torch
            except ImportError:
                print("torch is not importable: no torch-dense run", file=sys.stderr)
            else:
                torch.set_num_threads(args.threads)
                run_torch, x_torch = torch_resnet(args.depth, args.widths), torch.from_numpy(x)
                runs["torch-dense"] = lambda _x: run_torch(x_torch)
                runs["torch-dense"](x)
                info["torch-dense"] = {"flops_ratio": 1.0, "torch": torch.__version__}
        seconds = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, model in runs.items():
                start = time.perf_counter()
                model(x)
                seconds[name].append(time.perf_counter() - start)
        breakdown = {}
        if args.breakdown:
            for name, model in runs.items():
                if name.endswith("-fused"):
                    with profiling.recording() as totals:
                        model(x)
                    breakdown[name] = {k: round(v * 1e3, 2) for k, v in totals.items()}

    base = statistics.median(seconds["dense"])
    print(f"{'run':22s} {'ms':>8s} {'min-max ms':>15s} {'img/s':>7s} {'FLOPs x':>7s} {'speedup':>7s} {'sp/FLOPs':>8s}")
    for name, values in seconds.items():
        med = statistics.median(values)
        ratio = info[name]["flops_ratio"]
        info[name].update(ms=med * 1e3, min_ms=min(values) * 1e3, max_ms=max(values) * 1e3,
                          images_per_s=args.batch / med, speedup=base / med, speedup_over_flops=base / med / ratio)
        print(f"{name:22s} {med * 1e3:8.1f} {min(values) * 1e3:7.1f}-{max(values) * 1e3:7.1f} "
              f"{args.batch / med:7.1f} {ratio:7.2f} {base / med:7.2f} {base / med / ratio:8.2f}")
    if breakdown:
        print("phases of one forward (ms):", json.dumps(breakdown))
    print(json.dumps({"args": {k: v for k, v in vars(args).items()}, "half_bias": half_bias, "runs": info}))


if __name__ == "__main__":
    main()
