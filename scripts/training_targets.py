"""Measure the training stack's targets and print them; nothing is asserted.

    python scripts/training_targets.py digits          # NIN on the 8x8 digits: test accuracy vs training time
    python scripts/training_targets.py throughput      # images/s, training and inference, per backend
    python scripts/training_targets.py all --json out.json

The cluttered-digits target (ResNet-14, 48x48 canvas, cython backend) is measured with the command line,
so that the number comes from exactly what a user runs::

    ponder train --model resnet14 --data cluttered-digits --canvas 48 --epochs 6 --backend cython --out runs/r14

Wall-clock time and process CPU time are both reported: on a shared machine the wall clock includes
waiting for the CPU, and the CPU time over the number of cores used bounds what a dedicated machine takes.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from refimpl.backend import BackendUnavailableError, get_backend
from refimpl.datasets import load_digits
from refimpl.models import build_model
from refimpl.optim import SGD, Adam, CosineSchedule
from refimpl.training import evaluate, fit, train_step


def measure_digits(epochs=10, backend="cython", seed=0):
    """NIN (32/64/128 channels) on the 8x8 digits with Adam and a cosine schedule; test accuracy per epoch."""
    data = load_digits(scale=1, seed=seed)
    model = build_model("nin", 10, 1, np.random.default_rng(seed), backend=backend)
    optimizer = Adam(list(model.named_parameters()), 3e-3)
    steps = epochs * -(-len(data["train"]) // 32)
    per_epoch = []
    cpu0 = time.process_time()

    def record(rec):
        per_epoch.append({"epoch": rec.epoch, "train_seconds": rec.elapsed_seconds,
                          "test_accuracy": evaluate(model, data["test"])["accuracy"]})

    fit(model, optimizer, data["train"], epochs=epochs, batch_size=32, rng=np.random.default_rng(seed + 1),
        schedule=CosineSchedule(3e-3, steps), progress=False, on_epoch_end=record)
    first = next((r for r in per_epoch if r["test_accuracy"] >= 0.97), None)
    return {"model": "nin", "backend": backend, "train_images": len(data["train"]), "test_images": len(data["test"]),
            "epochs": per_epoch, "final_test_accuracy": per_epoch[-1]["test_accuracy"],
            "train_seconds": per_epoch[-1]["train_seconds"], "cpu_seconds_including_evaluation": time.process_time() - cpu0,
            "first_epoch_at_97": None if first is None else first["epoch"],
            "seconds_to_97": None if first is None else first["train_seconds"]}


def measure_throughput(backend, model_name="resnet14", canvas=48, batch=64, seconds=10.0):
    """Training and inference images/s of ``model_name`` on ``canvas``x``canvas`` inputs (wall and CPU)."""
    model = build_model(model_name, 10, 1, np.random.default_rng(0), backend=backend)
    optimizer = SGD(list(model.named_parameters()), 0.01)
    x = np.random.default_rng(0).random((batch, 1, canvas, canvas), dtype=np.float32)
    y = np.arange(batch) % 10
    train_step(model, x, y, optimizer)  # warm-up: masks, plans, caches
    out = {"backend": backend, "model": model_name, "canvas": canvas, "batch": batch}
    for mode in ("train", "inference"):
        model.train(mode == "train")
        images, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - wall0 < seconds:
            if mode == "train":
                train_step(model, x, y, optimizer)
            else:
                model(x)
            images += batch
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        out[f"{mode}_images_per_second"] = images / wall
        out[f"{mode}_images_per_cpu_second"] = images / cpu
    return out


def usable(backend):
    try:
        get_backend(backend)
        return True
    except (BackendUnavailableError, ValueError):
        return False


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("digits", "throughput", "all"))
    parser.add_argument("--backends", nargs="+", default=["numpy", "cython"])
    parser.add_argument("--seconds", type=float, default=10.0, help="timing window per throughput measurement")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    results = {}
    if args.what in ("digits", "all"):
        backend = "cython" if usable("cython") else "numpy"
        results["digits"] = r = measure_digits(backend=backend)
        for e in r["epochs"]:
            print(f"digits/NIN epoch {e['epoch']:2d}: test accuracy {e['test_accuracy']:.4f} after {e['train_seconds']:.1f}s of training")
        print(f"digits/NIN ({backend}): first >= 97% at epoch {r['first_epoch_at_97']} after {r['seconds_to_97']}s; "
              f"final {r['final_test_accuracy']:.4f} after {r['train_seconds']:.1f}s wall "
              f"({r['cpu_seconds_including_evaluation']:.1f}s CPU incl. evaluation)")
    if args.what in ("throughput", "all"):
        results["throughput"] = []
        for backend in args.backends:
            if not usable(backend):
                print(f"{backend}: unavailable, skipped")
                continue
            r = measure_throughput(backend, seconds=args.seconds)
            results["throughput"].append(r)
            print(f"{r['model']} {r['canvas']}x{r['canvas']} batch {r['batch']} on {backend}: "
                  f"train {r['train_images_per_second']:.1f} images/s ({r['train_images_per_cpu_second']:.1f}/CPU-s), "
                  f"inference {r['inference_images_per_second']:.1f} images/s ({r['inference_images_per_cpu_second']:.1f}/CPU-s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
