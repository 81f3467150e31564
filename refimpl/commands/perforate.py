"""``ponder perforate``: greedily perforate a trained network and compare it with the baselines.

Example::

    ponder train --model nin --data digits --scale 6 --epochs 8 --out runs/nin
    ponder perforate --checkpoint runs/nin/checkpoint.npz --target-speedup 3 --mask impact --cost time \\
        --backend cython --out runs/nin/perf

Writes to ``--out``: ``profile.json`` (every greedy step: theoretical and measured speedup, loss,
error and the masks, loadable with :func:`refimpl.greedy.load_profile` / :func:`apply_step`),
``baselines.json`` (larger stride + upsampling, lower input resolution) and ``speed_error.png``
(error against measured and theoretical speedup for all of them). The data set is rebuilt from
the arguments stored in the checkpoint; the greedy loss is measured on its validation split.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def add_arguments(parser):
    from ..masks import MASK_TYPES

    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint.npz written by ponder train")
    parser.add_argument("--out", required=True, type=Path, help="folder for profile.json, baselines.json, speed_error.png")
    parser.add_argument("--target-speedup", type=float, default=3.0, help="stop once this speedup is reached (default 3)")
    parser.add_argument("--mask", nargs="+", default=["impact"], choices=MASK_TYPES,
                        help="mask types the greedy steps may use (default: impact)")
    parser.add_argument("--cost", choices=("time", "flops"), default="time",
                        help="cost of a move: measured forward time (default) or FLOPs")
    parser.add_argument("--backend", default="numpy", help="conv backend: numpy (default), cython, opencl")
    parser.add_argument("--held-out", type=int, default=500, help="validation images for the loss (default 500)")
    parser.add_argument("--impact-images", type=int, default=500, help="training images for impact (default 500)")
    parser.add_argument("--timing-batch", type=int, default=64, help="images in the timed forward pass (default 64)")
    parser.add_argument("--timing-repeats", type=int, default=5, help="timed runs, the median is used (default 5)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="what a time measurement reads: wall time (default) or the process's CPU time, "
                             "steadier on a shared machine with a single-threaded backend")
    parser.add_argument("--runner", choices=("auto", "layers", "implicit"), default="auto",
                        help="how timed forwards run: implicit (compact activations read through index tables, "
                             "poolings on the backend; chain networks such as nin), layers (model(x)), or auto "
                             "(default: implicit where the network allows it)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the masks")
    parser.add_argument("--stride-factors", type=int, nargs="+", default=[1, 2, 3],
                        help="baseline (a): per-layer stride factors tried in every combination (default 1 2 3)")
    parser.add_argument("--resolutions", type=float, nargs="+", default=[0.875, 0.75, 0.625, 0.5],
                        help="baseline (b): input sizes as fractions of the data's (default 0.875 0.75 0.625 0.5)")
    parser.add_argument("--no-baselines", action="store_true", help="skip the baselines")
    parser.add_argument("--finetune-step", type=int, default=None, help="fine-tune the network of this greedy step")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--quiet", action="store_true", help="no per-step lines")


def plot_speed_error(profile, baselines, path):
    """Error against measured and theoretical speedup: the greedy curve and the baseline points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key in zip(axes, ("measured_speedup", "theoretical_speedup")):
        label = "perforation (" + ", ".join(profile.settings["mask_types"]) + ")"
        ax.plot(profile.column(key), profile.column("error"), "o-", label=label, markersize=3)
        for name, marker in (("stride", "s"), ("resolution", "^")):
            points = baselines.get(name) or []
            front = sorted((p for p in points if p["pareto"]), key=lambda p: p[key])
            if points:
                ax.plot([p[key] for p in points], [p["error"] for p in points], marker, alpha=0.3, color="gray")
                ax.plot([p[key] for p in front], [p["error"] for p in front], marker + "--",
                        label=f"{name} baseline" + (" (Pareto front)" if name == "stride" else ""))
        ax.set_xlabel(key.replace("_", " "))
        ax.set_ylabel("validation error")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"speed vs error, cost={profile.settings['cost']}, backend={profile.settings['backend']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args):
    from ..backend import BackendUnavailableError
    from ..baselines import resolution_baseline, stride_baseline
    from ..checkpoint import CheckpointError, load_run, save_checkpoint
    from ..greedy import apply_step, finetune_step, measure_loss, perforate_network

    try:
        model, meta, splits = load_run(args.checkpoint, backend=args.backend)
    except (CheckpointError, FileNotFoundError, ValueError, BackendUnavailableError) as exc:
        raise SystemExit(f"ponder perforate: {exc}") from None
    if min(args.held_out, args.impact_images, args.timing_batch, args.timing_repeats) < 1:
        raise SystemExit("ponder perforate: --held-out, --impact-images, --timing-batch and --timing-repeats must be >= 1")
    held_out = splits["val"].subset(slice(0, args.held_out))
    impact = splits["train"].subset(slice(0, args.impact_images))
    import time

    from ..implicit_network import chain_layers

    runner = args.runner
    if runner == "auto":
        try:
            dtype = next(p for _, p, _ in model.named_parameters()).dtype
            chain_layers(model, held_out.images[:1].astype(dtype))
            runner = "implicit"
        except ValueError:  # not a chain network (e.g. a ResNet)
            runner = "layers"
    timing = dict(timing_batch=args.timing_batch, timing_repeats=args.timing_repeats,
                  timer=time.process_time if args.clock == "cpu" else time.perf_counter, runner=runner)
    try:
        profile = perforate_network(model, held_out, args.target_speedup, mask_types=args.mask, cost=args.cost,
                                    backend=args.backend, rng=np.random.default_rng(args.seed), impact_data=impact,
                                    progress=not args.quiet, **timing)
    except ValueError as exc:
        raise SystemExit(f"ponder perforate: {exc}") from None
    profile.settings["checkpoint"] = str(args.checkpoint)
    profile.settings["clock"] = args.clock
    out = Path(args.out)
    profile.save(out / "profile.json")
    baselines = {}
    if not args.no_baselines:
        apply_step(model, profile, 0)  # dense again
        baselines["stride"] = stride_baseline(model, held_out, args.stride_factors, args.backend, **timing)
        h, w = held_out.images.shape[2:]
        sizes = [(max(1, int(round(f * h))), max(1, int(round(f * w)))) for f in args.resolutions]
        baselines["resolution"] = resolution_baseline(model, held_out, sizes, args.backend, **timing)
        with open(out / "baselines.json", "w") as f:
            json.dump(baselines, f, indent=1)
    plot_speed_error(profile, baselines, out / "speed_error.png")
    last = profile.steps[-1]
    print(f"{len(profile.steps) - 1} greedy steps: theoretical {last['theoretical_speedup']:.2f}x, measured "
          f"{last['measured_speedup']:.2f}x, validation error {profile.steps[0]['error']:.4f} -> {last['error']:.4f}; "
          f"wrote {out}/")
    if args.finetune_step is not None:
        if not 0 <= args.finetune_step < len(profile.steps):
            raise SystemExit(f"ponder perforate: --finetune-step must be in [0, {len(profile.steps) - 1}]")
        finetune_step(model, profile, args.finetune_step, splits["train"], epochs=args.finetune_epochs,
                      lr=args.finetune_lr, rng=np.random.default_rng(args.seed + 1), progress=not args.quiet)
        loss, error, _ = measure_loss(model, held_out)
        path = out / f"finetuned_step{args.finetune_step}.npz"
        save_checkpoint(path, model, meta.get("model"), meta.get("build"), extra=meta.get("extra"))
        before = profile.steps[args.finetune_step]["error"]
        print(f"fine-tuned step {args.finetune_step}: validation error {before:.4f} -> {error:.4f}; wrote {path}")
    return 0
