"""Time one sparse residual unit on OpenCL, fused (``fastpath.opencl_unit``) against the composition of layers.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/opencl_unit_timing.py --repeats 7
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/opencl_unit_timing.py --network --repeats 5

The unit has SACT-ResNet-14's sizes (``--stage`` 1, 2 or 3: 16 channels at 32x32, 32 at 16x16, 64
at 8x8), a batch of ``--batch`` samples, a random active mask with ``--active`` of the positions, in
training (batch statistics) or ``--eval``. One repeat runs forward + backward of both executions,
in alternating order (interleaved: a load change on a shared machine hits both); the medians and
the spread are printed, then the fused unit's phases (``fastpath.profiling``, host wall clock after
a queue finish). ``--network`` times forward + backward of a whole SACT-ResNet-14 instead (3 input
channels, 32x32; the default ``--halting-bias`` 4.6 makes the untrained network halt at about half
of the positions after a block's first unit), its blocks switched between ``fused=True`` and
``fused=False``. Results on a shared CPU (PoCL) are noisy; compare medians only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from fastpath import profiling
from fastpath.bench import blas_info, blas_line
from fastpath.opencl_backend import OpenCLBackend
from refimpl.models import build_model
from refimpl.resnet import ResidualUnit
from refimpl.sparse_unit import sparse_unit_backward, sparse_unit_forward

STAGES = {1: (16, 32), 2: (32, 16), 3: (64, 8)}  # channels, side


def step(unit, forward, backward, x, active, dout):
    unit.zero_grad()
    out, cache, _ = forward(unit, x, active)
    backward(unit, dout, cache)
    return out


def network_step(model, fused, x, upstream):
    for block in model.stages:
        block.fused = fused
    model.zero_grad()
    logits = model(x)
    model.backward(upstream)
    return logits


def time_network(args, backend, rng):
    model = build_model("sact-resnet14", 10, 3, rng, backend=backend, halting_bias=args.halting_bias)
    if args.eval:
        model.eval()
    x = rng.standard_normal((args.batch, 3, 32, 32)).astype(np.float32)
    upstream = rng.standard_normal((args.batch, 10)).astype(np.float32)
    logits = {fused: network_step(model, fused, x, upstream) for fused in (True, False)}  # warm-up: builds
    difference = float(np.max(np.abs(logits[True] - logits[False])))
    active = [float(m.mean()) for block in model.stages for m in block.active_masks[1:]]
    seconds = {True: [], False: []}
    for repeat in range(args.repeats):
        for fused in ((True, False) if repeat % 2 == 0 else (False, True)):
            start = time.perf_counter()
            network_step(model, fused, x, upstream)
            seconds[fused].append(time.perf_counter() - start)
    print(f"device: {backend.device_name}; {blas_line(blas_info())}")
    print(f"SACT-ResNet-14, batch {args.batch}, 3x32x32, halting bias {args.halting_bias}, "
          f"{'evaluation' if args.eval else 'training'}, float32; active fraction of the sparse units "
          f"{min(active):.2f}-{max(active):.2f}; max |logits fused - composition| = {difference:.2e}")
    print("network forward + backward, ms (median [min, max] of interleaved repeats; shared machine, noisy):")
    for fused, values in seconds.items():
        ms = [1e3 * v for v in values]
        print(f"  {'fused' if fused else 'composition':12s} {statistics.median(ms):9.2f}  [{min(ms):.2f}, {max(ms):.2f}]")
    print(f"  composition / fused = {statistics.median(seconds[False]) / statistics.median(seconds[True]):.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, choices=sorted(STAGES), default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--active", type=float, default=0.5, help="fraction of active positions")
    parser.add_argument("--eval", action="store_true", help="running statistics instead of batch statistics")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--network", action="store_true", help="time a whole SACT-ResNet-14 instead of one unit")
    parser.add_argument("--halting-bias", type=float, default=4.6, help="with --network")
    args = parser.parse_args(argv)
    if not 0 < args.active <= 1:
        parser.error(f"--active must be in (0, 1], got {args.active}")
    if args.repeats < 1 or args.batch < 1:
        parser.error("--repeats and --batch must be positive")
    rng = np.random.default_rng(0)
    backend = OpenCLBackend()
    if args.network:
        time_network(args, backend, rng)
        return
    channels, side = STAGES[args.stage]
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
