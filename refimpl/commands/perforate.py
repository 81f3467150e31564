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
import time
from pathlib import Path

import numpy as np

from .arguments import (UsageError, add_backend_argument, float_at_least, float_in, non_negative_int, positive_float,
                        positive_int, required_group, resolve_backend)


#: The stride baseline is searched up to this many times the perforated network's speedup.
BASELINE_MARGIN = 1.5


def add_arguments(parser):
    from ..masks import MASK_TYPES

    required = required_group(parser)
    required.add_argument("--checkpoint", required=True, type=Path, help="checkpoint.npz written by ponder train")
    required.add_argument("--out", required=True, type=Path,
                          help="folder for profile.json, baselines.json, speed_error.png")
    parser.add_argument("--target-speedup", type=float_at_least(1.0), default=3.0,
                        help="stop once this speedup (>= 1) is reached")
    parser.add_argument("--mask", nargs="+", default=["impact"], choices=MASK_TYPES,
                        help="mask types the greedy steps may use")
    parser.add_argument("--cost", choices=("time", "flops"), default="time",
                        help="cost of a move: measured forward time or FLOPs")
    add_backend_argument(parser, default=None,
                         help_text="convolution backend (default: the one the model was trained with, if usable)")
    parser.add_argument("--held-out", type=positive_int, default=500, help="validation images for the loss")
    parser.add_argument("--impact-images", type=positive_int, default=500, help="training images for impact")
    parser.add_argument("--timing-batch", type=positive_int, default=64, help="images in the timed forward pass")
    parser.add_argument("--timing-repeats", type=positive_int, default=5, help="timed runs, the median is used")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="what a time measurement reads: wall time or the process's CPU time, "
                             "steadier on a shared machine with a single-threaded backend")
    parser.add_argument("--runner", choices=("auto", "layers", "implicit"), default="auto",
                        help="how timed forwards run: implicit (compact activations read through index tables, "
                             "poolings on the backend; chain networks such as nin), layers (model(x)), or auto "
                             "(implicit where the network allows it)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the masks")
    parser.add_argument("--stride-factors", type=positive_int, nargs="+", default=[1, 2, 3],
                        help="baseline (a): per-layer stride factors, searched greedily layer by layer up to "
                             f"{BASELINE_MARGIN}x the speedup the perforation reached")
    parser.add_argument("--resolutions", type=float_in(0.0, 1.0, closed_low=False, closed_high=True), nargs="+",
                        default=[0.875, 0.75, 0.625, 0.5],
                        help="baseline (b): input sizes as fractions in (0, 1] of the data's")
    parser.add_argument("--no-baselines", action="store_true", help="skip the baselines")
    parser.add_argument("--finetune-step", type=non_negative_int, default=None,
                        help="fine-tune the network of this greedy step (default: none)")
    parser.add_argument("--finetune-epochs", type=positive_int, default=1, help="epochs of fine-tuning")
    parser.add_argument("--finetune-lr", type=positive_float, default=0.01, help="SGD learning rate of fine-tuning")
    parser.add_argument("--quiet", action="store_true", help="no per-step lines or progress bars")


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
            points = [p for p in baselines.get(name) or [] if p[key] is not None]  # untimed trials: no x
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


def choose_runner(model, images, runner):
    """``--runner auto``: ``"implicit"`` for a chain network (e.g. NIN), else ``"layers"`` (e.g. a ResNet)."""
    from ..implicit_network import chain_layers

    if runner != "auto":
        return runner
    try:
        chain_layers(model, images[:1].astype(model.param_dtype))
        return "implicit"
    except ValueError:
        return "layers"


def run_baselines(model, held_out, args, backend, timing, until_speedup):
    """The stride and resolution baselines, each with a progress bar; written to ``baselines.json``.

    The stride search stops once it is ``until_speedup`` times faster (it only has to cover the
    speeds of the perforated networks it is compared with), and times only the networks on its
    path (with ``--cost flops`` its trials are chosen by FLOPs; timing each would be most of the work).
    """
    from ..baselines import resolution_baseline, stride_baseline

    if sorted(set(args.stride_factors)) != args.stride_factors or args.stride_factors[0] != 1:
        raise UsageError(f"--stride-factors must start at 1 and increase, got {args.stride_factors}")
    baselines = {"stride": stride_baseline(model, held_out, args.stride_factors, backend, cost=args.cost,
                                           progress=not args.quiet, until_speedup=until_speedup,
                                           time_trials=False, **timing)}
    h, w = held_out.images.shape[2:]
    sizes = [(max(1, int(round(f * h))), max(1, int(round(f * w)))) for f in args.resolutions]
    baselines["resolution"] = resolution_baseline(model, held_out, sizes, backend, progress=not args.quiet,
                                                  **timing)
    with open(Path(args.out) / "baselines.json", "w") as f:
        json.dump(baselines, f, indent=1)
    return baselines


def run(args):
    from ..checkpoint import load_run, read_checkpoint, save_checkpoint
    from ..greedy import apply_step, finetune_step, measure_loss, perforate_network

    backend, note = resolve_backend(args.backend, read_checkpoint(args.checkpoint)[0], "perforate")
    if note:
        print(note)
    model, meta, splits = load_run(args.checkpoint, backend=backend)
    held_out = splits["val"].subset(slice(0, args.held_out))
    if len(held_out) == 0:
        raise UsageError(f"--checkpoint {str(args.checkpoint)!r}: its data set has no validation images to measure "
                         "the loss on (train with --n-val > 0)")
    impact = splits["train"].subset(slice(0, args.impact_images))
    timing = dict(timing_batch=args.timing_batch, timing_repeats=args.timing_repeats,
                  timer=time.process_time if args.clock == "cpu" else time.perf_counter,
                  runner=choose_runner(model, held_out.images, args.runner))
    profile = perforate_network(model, held_out, args.target_speedup, mask_types=args.mask, cost=args.cost,
                                backend=backend, rng=np.random.default_rng(args.seed), impact_data=impact,
                                progress=not args.quiet, **timing)
    profile.settings["checkpoint"] = str(args.checkpoint)
    profile.settings["clock"] = args.clock
    out = Path(args.out)
    profile.save(out / "profile.json")
    last = profile.steps[-1]
    print(f"stopped: {profile.stop_reason}")
    print(f"{len(profile.steps) - 1} greedy steps: theoretical {last['theoretical_speedup']:.2f}x, measured "
          f"{last['measured_speedup']:.2f}x, validation error {profile.steps[0]['error']:.4f} -> {last['error']:.4f}; "
          f"wrote {out / 'profile.json'}")
    baselines = {}
    if not args.no_baselines:
        apply_step(model, profile, 0)  # dense again
        speed_key = "measured_speedup" if args.cost == "time" else "theoretical_speedup"
        until = BASELINE_MARGIN * max(args.target_speedup, last[speed_key])
        baselines = run_baselines(model, held_out, args, backend, timing, until)
        print(f"baselines: {len(baselines['stride'])} stride-factor networks, {len(baselines['resolution'])} "
              f"resolutions; wrote {out / 'baselines.json'}")
    plot_speed_error(profile, baselines, out / "speed_error.png")
    print(f"wrote {out / 'speed_error.png'}")
    if args.finetune_step is not None:
        if not args.finetune_step < len(profile.steps):
            raise UsageError(f"--finetune-step must be in [0, {len(profile.steps) - 1}], got {args.finetune_step}")
        finetune_step(model, profile, args.finetune_step, splits["train"], epochs=args.finetune_epochs,
                      lr=args.finetune_lr, rng=np.random.default_rng(args.seed + 1), progress=not args.quiet)
        loss, error, _ = measure_loss(model, held_out)
        path = out / f"finetuned_step{args.finetune_step}.npz"
        save_checkpoint(path, model, meta.get("model"), meta.get("build"), extra=meta.get("extra"))
        before = profile.steps[args.finetune_step]["error"]
        print(f"fine-tuned step {args.finetune_step}: validation error {before:.4f} -> {error:.4f}; wrote {path}")
    return 0
