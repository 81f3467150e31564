"""ACT and SACT on cluttered digits: FLOPs–accuracy, wall-clock of sparse execution, maps vs objects.

Three experiments (what docs/spec.md §8.4 asks to report):

1. **FLOPs–accuracy** at two canvas sizes: plain ResNets of several depths, ACT and SACT at
   several τ. Reported: test accuracy and FLOPs per image (mean and spread) at the positions
   actually computed.
2. **Wall-clock**: SACT inference on one backend (Cython when available) with sparse execution vs
   the same network run densely (``execution="dense"``: every unit everywhere, then masked), next
   to the FLOPs ratio of the two. Measured on the trained SACT models, and on a copy whose halting
   biases are all shifted by one δ chosen so that the FLOPs ratio reaches given targets (labelled as
   such: networks that halt earlier, to see how the speed-up follows the FLOPs ratio over a range of
   sparsity — their accuracy is not the point).
3. **Computation-time maps vs the digit**: AUC, NSS and linear correlation (CC) of the map
   Σ_blocks ρ against the object mask, compared with a centred-Gaussian baseline map.

Small settings by default (minutes on 2 cores); ``PONDER_FULL=1`` (or ``--full``) for the full
run. ``--out results.json`` writes every number. Example::

    python scripts/sact_experiments.py --out runs/sact_small.json
    PONDER_FULL=1 python scripts/sact_experiments.py --out runs/sact_full.json
    python scripts/sact_experiments.py --kernel-timing 64 32 16   # experiment 2 only, untrained

Any setting can be overridden on the command line (``--canvases 48 --n-train 2000 --epochs 8
--taus 0.01 0.05 --halting-bias -1 ...``; see ``--help``); the settings used are printed and written
to the JSON file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import numpy as np

# The map metrics (AUC, NSS, CC, the centre baseline) live in refimpl.map_metrics; they stay
# importable from this script under the same names (notebook 06 uses them as experiments.auc, ...).
from refimpl.map_metrics import auc, cc, centre_gaussian, computation_time_maps, map_scores, nss  # noqa: F401

SMALL = {
    "canvases": (32, 48),
    "n_train": 256,
    "n_test": 256,
    "epochs": 3,
    "batch_size": 32,
    "lr": 2e-3,
    "widths": (8, 16, 32),
    "plain_depths": (8, 14),
    "adaptive_depth": 14,
    "taus": (0.01, 0.05),
    "timing_batch": 32,
    "timing_repeats": 5,
    "timing_flops_ratios": (1.5, 2.0),
}
FULL = {
    "canvases": (32, 64),
    "n_train": 4000,
    "n_test": 1000,
    "epochs": 12,
    "batch_size": 64,
    "lr": 2e-3,
    "widths": (16, 32, 64),
    "plain_depths": (8, 14, 20, 32),
    "adaptive_depth": 32,
    "taus": (0.002, 0.005, 0.01, 0.02, 0.05),
    "timing_batch": 64,
    "timing_repeats": 5,
    "timing_flops_ratios": (1.5, 2.0, 3.0, 4.0),
}


def settings(full=None):
    """The experiment settings: ``FULL`` when ``full`` (default: ``PONDER_FULL=1``), else ``SMALL``."""
    if full is None:
        full = os.environ.get("PONDER_FULL") == "1"
    return dict(FULL if full else SMALL)


def pick_backend():
    """"cython" when it is usable here, else "numpy"."""
    try:
        import fastpath

        return "cython" if "cython" in fastpath.usable_backends() else "numpy"
    except ImportError:
        return "numpy"


# ---------------------------------------------------------------------------------------------
# Experiments
# ---------------------------------------------------------------------------------------------


def train(name, data, cfg, backend, tau=None, seed=0):
    """Train the registered model ``name`` on ``data["train"]``; returns (model, test metrics, seconds)."""
    from refimpl.models import build_model
    from refimpl.optim import Adam
    from refimpl.training import evaluate, fit

    options = {"widths": cfg["widths"]}
    if tau is not None:
        options["tau"] = tau
        if cfg.get("halting_bias") is not None:
            options["halting_bias"] = cfg["halting_bias"]
    model = build_model(name, 10, 1, np.random.default_rng(seed), backend=backend, **options)
    optimizer = Adam(list(model.named_parameters()), lr=cfg["lr"])

    def log_epoch(record):
        if cfg.get("log_epochs"):
            print(f"    {name} epoch {record.epoch}: train loss {record.train_loss:.4f}, acc {record.train_accuracy:.3f}, "
                  f"{record.flops_per_image / 1e6:.2f} MFLOPs/image (last batch), {record.epoch_seconds:.1f}s", flush=True)

    start = time.perf_counter()
    fit(model, optimizer, data["train"], epochs=cfg["epochs"], batch_size=cfg["batch_size"],
        rng=np.random.default_rng(seed + 1), progress=False, on_epoch_end=log_epoch)
    seconds = time.perf_counter() - start
    result = evaluate(model, data["test"])
    return model, result, seconds


def flops_accuracy(cfg, backend, log=print):
    """Experiment 1. Returns (rows, trained adaptive models by (canvas, kind, tau), data by canvas)."""
    from refimpl.datasets import load_cluttered_digits

    rows, models, datasets = [], {}, {}
    for canvas in cfg["canvases"]:
        data = load_cluttered_digits(canvas=canvas, n_train=cfg["n_train"], n_val=0, n_test=cfg["n_test"], seed=canvas)
        datasets[canvas] = data
        runs = [(f"resnet{d}", None) for d in cfg["plain_depths"]]
        runs += [(f"{kind}-resnet{cfg['adaptive_depth']}", tau) for kind in ("act", "sact") for tau in cfg["taus"]]
        for name, tau in runs:
            model, result, seconds = train(name, data, cfg, backend, tau)
            row = {"canvas": canvas, "model": name, "tau": tau, "accuracy": result["accuracy"],
                   "mflops": result["flops_per_image"] / 1e6, "mflops_std": result["flops_std"] / 1e6,
                   "train_seconds": seconds}
            rows.append(row)
            log(f"canvas {canvas:3d}  {name:15s} tau={'-' if tau is None else tau:<6}  "
                f"acc {row['accuracy']:.3f}  {row['mflops']:7.2f} ± {row['mflops_std']:5.2f} MFLOPs  ({seconds:.0f}s)")
            if tau is not None:
                models[(canvas, name.split("-")[0], tau)] = model
    return rows, models, datasets


def time_inference(model, x, repeats):
    """Median seconds of one evaluation-mode forward of ``x``, sparse and dense, and their FLOPs per image.

    "dense" is the same network computing every unit at every position: dense execution with the
    halting biases pushed to −10⁴ (nothing halts). Sparse and dense runs are interleaved, so that load
    from other processes hits both alike.
    """
    model.eval()

    def forward(execution):
        model.set_execution(execution)
        if execution == "sparse":
            return model(x)
        with halting_shift(model, -1e4):
            return model(x)

    times = {"sparse": [], "dense": []}
    flops = {}
    for execution in times:  # warm-up: plans, caches, thread pools
        forward(execution)
        flops[execution] = float(model.flops_per_sample.mean())
    for _ in range(repeats):
        for execution in times:
            start = time.perf_counter()
            forward(execution)
            times[execution].append(time.perf_counter() - start)
    model.set_execution("sparse")
    return {e: float(np.median(t)) for e, t in times.items()}, flops


def wall_clock(model, images, cfg, label, log=print):
    """Experiment 2 for one SACT model: sparse vs dense execution on the model's backend."""
    x = images[: cfg["timing_batch"]].astype(model.stem.params["w"].dtype)
    seconds, flops = time_inference(model, x, cfg["timing_repeats"])
    (sparse_s, dense_s), (sparse_flops, dense_flops) = (seconds["sparse"], seconds["dense"]), (flops["sparse"], flops["dense"])
    row = {"model": label, "batch": len(x), "sparse_ms": 1e3 * sparse_s, "dense_ms": 1e3 * dense_s,
           "speedup": dense_s / sparse_s, "flops_ratio": dense_flops / sparse_flops,
           "speedup_over_flops_ratio": (dense_s / sparse_s) / (dense_flops / sparse_flops)}
    log(f"{label:40s} sparse {row['sparse_ms']:8.1f} ms  dense {row['dense_ms']:8.1f} ms  "
        f"speed-up {row['speedup']:.2f}x  FLOPs ratio {row['flops_ratio']:.2f}x  "
        f"(speed-up / FLOPs ratio {row['speedup_over_flops_ratio']:.2f})")
    return row


@contextlib.contextmanager
def halting_shift(model, delta):
    """Temporarily add ``delta`` to every halting logit's bias (δ > 0: positions halt earlier)."""
    heads = [head for block in model.stages for head in block.heads]
    saved = [head.local.params["b"].copy() for head in heads]
    for head in heads:
        head.local.params["b"][...] += delta
    try:
        yield model
    finally:
        for head, value in zip(heads, saved):
            head.local.params["b"][...] = value


def shift_for_flops_ratio(model, x, target, steps=14):
    """The bias shift δ (by bisection) at which (dense FLOPs) / (sparse FLOPs) of ``model`` on ``x`` is ``target``.

    Dense = every unit at every position (see :func:`time_inference`); the sparse FLOPs fall as δ grows.
    """
    model.eval()
    model.set_execution("sparse")
    with halting_shift(model, -1e4):
        model(x)
    dense = float(model.flops_per_sample.mean())
    low, high = -10.0, 10.0
    for _ in range(steps):
        mid = (low + high) / 2
        with halting_shift(model, mid):
            model(x)
        ratio = dense / float(model.flops_per_sample.mean())
        low, high = (mid, high) if ratio < target else (low, mid)
    return (low + high) / 2


def kernel_wall_clock(cfg, backend, canvas, depth, widths, log=print):
    """Experiment 2 without training: an untrained SACT network whose halting biases are shifted to
    reach each target FLOPs ratio. Isolates how well the sparse kernels turn FLOPs into time."""
    from refimpl.datasets import load_cluttered_digits
    from refimpl.models import build_model

    images = load_cluttered_digits(canvas=canvas, n_train=0, n_val=0, n_test=cfg["timing_batch"], seed=1)["test"].images
    model = build_model(f"sact-resnet{depth}", 10, 1, np.random.default_rng(0), backend=backend, widths=widths)
    x = images.astype(model.stem.params["w"].dtype)
    rows = [wall_clock(model, x, cfg, f"untrained sact-resnet{depth} {canvas}px, all units")]
    for target in cfg["timing_flops_ratios"]:
        delta = shift_for_flops_ratio(model, x, target)
        with halting_shift(model, delta) as shifted:
            rows.append(wall_clock(shifted, x, cfg, f"untrained sact-resnet{depth} {canvas}px, shift {delta:+.2f}"))
    return rows


OVERRIDES = (  # (setting, type, nargs) settable from the command line
    ("canvases", int, "+"), ("n_train", int, None), ("n_test", int, None), ("epochs", int, None),
    ("batch_size", int, None), ("lr", float, None), ("widths", int, 3), ("plain_depths", int, "+"),
    ("adaptive_depth", int, None), ("taus", float, "+"), ("halting_bias", float, None),
    ("timing_batch", int, None), ("timing_repeats", int, None), ("timing_flops_ratios", float, "+"),
)


def write_results(path, results):
    """Write ``results`` as JSON to ``path`` (creating its folder)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="full settings (same as PONDER_FULL=1)")
    parser.add_argument("--backend", default=None, help="conv backend (default: cython if usable, else numpy)")
    parser.add_argument("--out", default=None, help="write every number to this JSON file")
    parser.add_argument("--kernel-timing", nargs=3, type=int, metavar=("CANVAS", "DEPTH", "WIDTH"), default=None,
                        help="only experiment 2 on an untrained SACT-ResNet-DEPTH with widths (W, 2W, 4W) at CANVAS px")
    for key, kind, nargs in OVERRIDES:
        parser.add_argument("--" + key.replace("_", "-"), type=kind, nargs=nargs, default=None,
                            help=f"override the {key!r} setting" + (
                                " (initial halting-logit bias of ACT/SACT; default that of refimpl.act)"
                                if key == "halting_bias" else ""))
    parser.add_argument("--log-epochs", action="store_true", help="print every training epoch")
    args = parser.parse_args(argv)
    cfg = settings(True if args.full else None)
    preset = "full" if cfg == FULL else "small"
    for key, _, nargs in OVERRIDES:
        value = getattr(args, key)
        if value is not None:
            cfg[key] = tuple(value) if nargs else value
    cfg["log_epochs"] = args.log_epochs
    backend = args.backend or pick_backend()
    print(f"settings: {preset} with overrides {cfg}; backend {backend}", flush=True)
    if args.kernel_timing:
        canvas, depth, width = args.kernel_timing
        rows = kernel_wall_clock(cfg, backend, canvas, depth, (width, 2 * width, 4 * width))
        if args.out:
            Path(args.out).write_text(json.dumps({"settings": cfg, "backend": backend, "wall_clock": rows}, indent=1))
        return 0

    print("\n== 1. FLOPs–accuracy ==")
    rows, models, datasets = flops_accuracy(cfg, backend)
    if args.out:  # experiment 1 on disk even if the rest is cut short
        write_results(args.out, {"settings": cfg, "backend": backend, "flops_accuracy": rows})

    print("\n== 2. wall-clock: SACT sparse vs dense execution on the same backend ==")
    timing = []
    big = max(cfg["canvases"])
    for (canvas, kind, tau), model in models.items():
        if kind == "sact":
            timing.append(wall_clock(model, datasets[canvas]["test"].images, cfg, f"sact canvas {canvas} tau {tau}"))
    # The same trained network with all its halting biases shifted by one δ, chosen so that the FLOPs
    # ratio hits each target: how the measured speed-up follows the FLOPs ratio at higher sparsity
    # (the accuracy of these shifted variants is not the point).
    model = models[(big, "sact", max(cfg["taus"]))]
    images = datasets[big]["test"].images
    x = images[: cfg["timing_batch"]].astype(model.stem.params["w"].dtype)
    for target in cfg["timing_flops_ratios"]:
        delta = shift_for_flops_ratio(model, x, target)
        with halting_shift(model, delta) as shifted:
            timing.append(wall_clock(shifted, images, cfg, f"sact {big}px, biases shifted {delta:+.2f}"))

    print("\n== 3. computation-time maps vs the digit (object masks) ==")
    maps_rows = []
    for canvas in cfg["canvases"]:
        test = datasets[canvas]["test"]
        baseline = np.broadcast_to(centre_gaussian(test.object_masks.shape[1:]), test.object_masks.shape)
        base = map_scores(baseline, test.object_masks)
        maps_rows.append({"canvas": canvas, "map": "centre Gaussian", **base})
        print(f"canvas {canvas:3d}  centre Gaussian        AUC {base['auc']['mean']:.3f}  NSS {base['nss']['mean']:.3f}  "
              f"CC {base['cc']['mean']:.3f}")
        for tau in cfg["taus"]:
            model = models[(canvas, "sact", tau)]
            scores = map_scores(computation_time_maps(model, test.images), test.object_masks)
            maps_rows.append({"canvas": canvas, "map": f"sact tau {tau}", **scores})
            print(f"canvas {canvas:3d}  SACT tau {tau:<6}        AUC {scores['auc']['mean']:.3f} ± {scores['auc']['sem']:.3f}  "
                  f"NSS {scores['nss']['mean']:.3f}  CC {scores['cc']['mean']:.3f}")
    if args.out:
        out = write_results(args.out, {"settings": cfg, "backend": backend, "flops_accuracy": rows,
                                       "wall_clock": timing, "maps": maps_rows})
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
