"""Time one sparse residual unit on OpenCL, fused (``fastpath.opencl_unit``) against the composition of layers.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/opencl_unit_timing.py --repeats 7

The unit has SACT-ResNet-14's sizes (``--stage`` 1, 2 or 3: 16 channels at 32x32, 32 at 16x16, 64
at 8x8), a batch of ``--batch`` samples, a random active mask with ``--active`` of the positions, in
training (batch statistics) or ``--eval``. One repeat runs forward + backward of both executions,
in alternating order (interleaved: a load change on a shared machine hits both); the medians and
the spread are printed, then the fused unit's phases (``fastpath.profiling``, host wall clock after
a queue finish). Results on a shared CPU (PoCL) are noisy; compare medians only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from fastpath import profiling
from fastpath.bench import blas_info, blas_line
from fastpath.opencl_backend import OpenCLBackend
from refimpl.resnet import ResidualUnit
from refimpl.sparse_unit import sparse_unit_backward, sparse_unit_forward

STAGES = {1: (16, 32), 2: (32, 16), 3: (64, 8)}  # channels, side


def step(unit, forward, backward, x, active, dout):
    unit.zero_grad()
    out, cache, _ = forward(unit, x, active)
    backward(unit, dout, cache)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, choices=sorted(STAGES), default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--active", type=float, default=0.5, help="fraction of active positions")
    parser.add_argument("--eval", action="store_true", help="running statistics instead of batch statistics")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    if not 0 < args.active <= 1:
        parser.error(f"--active must be in (0, 1], got {args.active}")
    if args.repeats < 1 or args.batch < 1:
        parser.error("--repeats and --batch must be positive")
    channels, side = STAGES[args.stage]
    rng = np.random.default_rng(0)
    backend = OpenCLBackend()
    unit = ResidualUnit(channels, channels, rng, backend=backend)
    if args.eval:
        unit.eval()
    x = rng.standard_normal((args.batch, channels, side, side)).astype(np.float32)
    active = rng.random((args.batch, side, side)) < args.active
    active[:, side // 2, side // 2] = True  # the composition needs an active position per sample
    dout = rng.standard_normal(x.shape).astype(np.float32)
    runs = {"fused": (backend.fused_unit.forward, backend.fused_unit.backward),
            "composition": (sparse_unit_forward, sparse_unit_backward)}
    outputs = {name: step(unit, *pair, x, active, dout) for name, pair in runs.items()}  # warm-up: builds
    difference = float(np.max(np.abs(outputs["fused"] - outputs["composition"])))
    seconds = {name: [] for name in runs}
    for repeat in range(args.repeats):
        for name in (list(runs) if repeat % 2 == 0 else list(runs)[::-1]):
            start = time.perf_counter()
            step(unit, *runs[name], x, active, dout)
            seconds[name].append(time.perf_counter() - start)
    with profiling.recording() as phases:
        step(unit, *runs["fused"], x, active, dout)

    print(f"device: {backend.device_name}; {blas_line(blas_info())}")
    print(f"unit: {channels} channels, {side}x{side}, batch {args.batch}, {active.mean():.2f} active, "
          f"{'evaluation' if args.eval else 'training'}, float32; max |U_fused - U_composition| = {difference:.2e}")
    print("forward + backward, ms (median [min, max] of interleaved repeats; shared machine, noisy):")
    for name, values in seconds.items():
        ms = [1e3 * v for v in values]
        print(f"  {name:12s} {statistics.median(ms):9.2f}  [{min(ms):.2f}, {max(ms):.2f}]")
    ratio = statistics.median(seconds["composition"]) / statistics.median(seconds["fused"])
    print(f"  composition / fused = {ratio:.2f}")
    print("fused unit phases, ms (one run): " + ", ".join(f"{k} {1e3 * v:.2f}" for k, v in sorted(phases.items())))


if __name__ == "__main__":
    main()
