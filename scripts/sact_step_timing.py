"""Time one training step and one inference of an adaptive ResNet; print the times as JSON.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python scripts/sact_step_timing.py --repeats 3

Defaults: SACT-ResNet-14, 32×32 single-channel inputs, batch 64, cython backend, halting bias +1
(so that positions really halt and the sparse path is exercised), one warm-up step. To compare two
checkouts, run the script of each in turn, interleaved, several times (``PYTHONPATH=CHECKOUT``
picks the ``refimpl`` that is timed; the module path is printed to stderr), and compare medians.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

import refimpl
from refimpl.models import build_model
from refimpl.optim import SGD
from refimpl.training import train_step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sact-resnet14")
    parser.add_argument("--size", type=int, default=32, help="input side in pixels")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--backend", default="cython")
    parser.add_argument("--halting-bias", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"refimpl from {refimpl.__file__}", file=sys.stderr)
    rng = np.random.default_rng(0)
    model = build_model(args.model, 10, 1, rng, backend=args.backend, tau=0.01, halting_bias=args.halting_bias)
    x = rng.standard_normal((args.batch, 1, args.size, args.size)).astype(np.float32)
    y = rng.integers(0, 10, args.batch)
    optimizer = SGD(list(model.named_parameters()), lr=1e-4)
    train_step(model, x, y, optimizer)  # warm-up: plans, caches, thread pools
    seconds = {"train": [], "infer": []}
    for _ in range(args.repeats):
        model.train()
        start = time.perf_counter()
        train_step(model, x, y, optimizer)
        seconds["train"].append(time.perf_counter() - start)
        model.eval()
        start = time.perf_counter()
        model(x)
        seconds["infer"].append(time.perf_counter() - start)
    print(json.dumps(seconds))


if __name__ == "__main__":
    main()
