"""C4: greedy perforation beats a larger stride and a lower resolution at equal speedup.

Figurnov et al. (PerforatedCNNs, 2016, section 4.2) accelerate a whole trained network by
greedily perforating its layers (docs/spec.md §6.2) and compare it with two baselines at the same
speedup (§6.3): (a) larger strides with the outputs upsampled back, (b) a lower input resolution.
Perforation loses less accuracy, both right away and after the networks are fine-tuned.

Per seed: a Network-in-Network CNN (:mod:`refimpl.nin`) is trained on the seed's data; each method
is brought to a *theoretical* speedup of at least ``target_speedup`` (FLOPs: deterministic, unlike
times on a shared machine) — the greedy search with impact masks to its last step; each baseline's
network of lowest held-out error among those that fast (the fastest one if none is) — and its test
error taken before and after the same fine-tuning budget (SGD, learning rate 0.01, momentum 0.9,
``finetune_epochs`` epochs on the training images, the same shuffling for all). The numbers
compared are the per-seed gains ``error(baseline) - error(greedy)``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from .claim import Claim, Verdict
from .common import error_rate, interval_bars, load_setting_data, new_figure, resolve_backend, save_figure, seed_rng, \
    train_classifier
from .intervals import above_zero, below_zero

METHODS = ("greedy", "stride", "resolution")
BASELINES = ("stride", "resolution")


def _setting(data, widths, training, target, held_out, impact_images, sizes, finetune_epochs, backend):
    return {"name": f"nin-{target:g}x", "model": "nin", "widths": widths, "data": data, "training": training,
            "target_speedup": target, "held_out": held_out, "impact_images": impact_images,
            "stride_factors": [1, 2, 3], "resolution_fractions": sizes, "finetune_epochs": finetune_epochs,
            "finetune_lr": 0.01, "backend": backend}


TIERS = {
    "small": [_setting({"kind": "digits", "scale": 2, "n_train": 128, "n_test": 64}, [4, 8, 8],
                       {"epochs": 1, "batch_size": 32, "lr": 3e-3, "warmup_fraction": 0.05}, 1.5, 32, 32,
                       [0.75, 0.5], 1, "numpy")],
    "medium": [_setting({"kind": "digits", "scale": 4, "n_train": 1078, "n_test": 539}, [16, 32, 64],
                        {"epochs": 12, "batch_size": 32, "lr": 3e-3, "warmup_fraction": 0.05}, 2.0, 180, 300,
                        [0.875, 0.75, 0.625, 0.5], 2, "fastest")],
    "full": [_setting({"kind": "cluttered", "canvas": 48, "n_train": 5000, "n_test": 1000}, [32, 64, 128],
                      {"epochs": 20, "batch_size": 32, "lr": 3e-3, "warmup_fraction": 0.05}, target, 500, 1000,
                      [0.875, 0.75, 0.625, 0.5, 0.375], 3, "fastest") for target in (2.0, 3.0)],
}


def _pick(points, target):
    """The point of lowest held-out error at least ``target`` times faster (theoretically), else the fastest."""
    fast = [p for p in points if p["theoretical_speedup"] >= target]
    return min(fast, key=lambda p: p["error"]) if fast else max(points, key=lambda p: p["theoretical_speedup"])


def _finetune(model, train, setting, seed):
    from ..optim import SGD
    from ..training import fit

    fit(model, SGD(model.named_parameters(), lr=setting["finetune_lr"], momentum=0.9), train,
        epochs=setting["finetune_epochs"], batch_size=32, rng=seed_rng(seed, 8), progress=False)


def run(setting, seed, echo):
    from ..baselines import resize_images, resolution_baseline, set_stride_factor, stride_baseline
    from ..checkpoint import load_checkpoint, save_checkpoint
    from ..datasets import Split
    from ..greedy import apply_step, perforate_network
    from ..impact import find_perforable_layers

    backend, backend_name = resolve_backend(setting["backend"])
    train, test = load_setting_data(setting["data"], seed)
    # the held-out subset that chooses the networks: the end of the training split, never the test split
    held_out = train.subset(slice(len(train) - setting["held_out"], len(train)))
    model, _ = train_classifier("nin", {"widths": setting["widths"]}, train, setting["training"], seed, backend)
    target = setting["target_speedup"]
    timing = {"timing_batch": 8, "timing_repeats": 1}  # times are recorded, never used: the cost is FLOPs
    numbers, details = {"dense_error": error_rate(model, test)}, {}
    with tempfile.TemporaryDirectory() as folder:
        trained = save_checkpoint(Path(folder) / "trained.npz", model, "nin",
                                  {"num_classes": 10, "in_channels": int(train.images.shape[1]),
                                   "dtype": "float32", "options": {"widths": setting["widths"]}})

        def fresh():
            return load_checkpoint(trained, backend=backend)[0]

        # greedy perforation (impact masks), to the target
        model = fresh()
        profile = perforate_network(model, held_out, target, mask_types=("impact",), cost="flops", backend=backend,
                                    rng=seed_rng(seed, 3), impact_data=train.subset(slice(0, setting["impact_images"])),
                                    **timing)
        last = profile.steps[-1]
        apply_step(model, profile, last["step"])
        numbers["greedy_speedup"], numbers["greedy_error_before"] = last["theoretical_speedup"], error_rate(model, test)
        _finetune(model, train, setting, seed)
        numbers["greedy_error_after"] = error_rate(model, test)
        details["greedy_stop_reason"] = profile.stop_reason

        # (a) larger strides, outputs upsampled back
        model = fresh()
        points = stride_baseline(model, held_out, setting["stride_factors"], backend, cost="flops",
                                 until_speedup=target, time_trials=False, **timing)
        point = _pick(points, target)
        for info in find_perforable_layers(model, test.images[:2]):
            set_stride_factor(model, info, point["factors"][info.name])
        numbers["stride_speedup"], numbers["stride_error_before"] = point["theoretical_speedup"], error_rate(model, test)
        _finetune(model, train, setting, seed)
        numbers["stride_error_after"] = error_rate(model, test)
        details["stride_factors"] = point["factors"]

        # (b) lower input resolution
        model = fresh()
        h, w = test.images.shape[2:]
        sizes = [(int(round(f * h)), int(round(f * w))) for f in setting["resolution_fractions"]]
        point = _pick(resolution_baseline(model, held_out, sizes, backend, **timing), target)
        small = {name: Split(resize_images(split.images, point["size"]), split.labels)
                 for name, split in (("train", train), ("test", test))}
        numbers["resolution_speedup"] = point["theoretical_speedup"]
        numbers["resolution_error_before"] = error_rate(model, small["test"])
        _finetune(model, small["train"], setting, seed)
        numbers["resolution_error_after"] = error_rate(model, small["test"])
        details["resolution_size"] = point["size"]
    for baseline in BASELINES:
        for when in ("before", "after"):
            numbers[f"gain_vs_{baseline}_{when}"] = (numbers[f"{baseline}_error_{when}"]
                                                     - numbers[f"greedy_error_{when}"])
    echo("    " + ", ".join(f"{m} {numbers[f'{m}_speedup']:.2f}x: {numbers[f'{m}_error_before']:.4f} -> "
                            f"{numbers[f'{m}_error_after']:.4f}" for m in METHODS))
    return {"numbers": numbers, "details": details, "backend": backend_name}


def verdict(summary):
    comparisons, parts, shown, against = {}, [], 0, 0
    for name, entry in summary["settings"].items():
        for baseline in BASELINES:
            for when in ("before", "after"):
                gain = entry["numbers"][f"gain_vs_{baseline}_{when}"]
                comparisons[f"{name}_gain_vs_{baseline}_{when}_finetuning"] = gain
                shown += above_zero(gain)
                against += below_zero(gain)
                parts.append(f"{name} vs {baseline} {when} fine-tuning: error lower by {gain['mean']:+.4f}"
                             + (f" [{gain['low']:+.4f}, {gain['high']:+.4f}]" if gain["low"] is not None else ""))
    text = "; ".join(parts)
    total = len(comparisons)
    if shown == total:
        return Verdict("reproduced", text + ": perforation beats both baselines before and after fine-tuning",
                       comparisons)
    if shown or any(g["mean"] > 0 for g in comparisons.values()):
        return Verdict("partly", f"{text}: {shown} of {total} comparisons favour perforation (interval above 0), "
                       f"{against} favour the baseline", comparisons)
    return Verdict("not reproduced", text + ": perforation does not beat the baselines", comparisons)


def plot(summary, path):
    names = list(summary["settings"])
    fig, axes = new_figure(ncols=len(names), width=5)
    for ax, name in zip(axes, names):
        numbers = summary["settings"][name]["numbers"]
        x = np.arange(len(METHODS))
        for offset, when in zip((-0.1, 0.1), ("before", "after")):
            means, yerr = interval_bars([numbers[f"{m}_error_{when}"] for m in METHODS])
            ax.errorbar(x + offset, means, yerr=yerr, fmt="o", capsize=4, label=f"{when} fine-tuning")
        ax.axhline(numbers["dense_error"]["mean"], color="gray", ls=":", label="dense network (mean)")
        labels = [f"{m}\n{numbers[f'{m}_speedup']['mean']:.2f}x" for m in METHODS]
        ax.set(xticks=x, xticklabels=labels, xlabel="method (mean theoretical speedup)", ylabel="test error",
               title=f"target {summary['settings'][name]['settings']['target_speedup']:g}x")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path, summary)


CLAIM = Claim(
    name="C4",
    title="greedy perforation vs larger stride vs lower resolution",
    statement=("Accelerating a trained CNN to the same speedup, greedy perforation loses less accuracy than "
               "increasing the strides or lowering the input resolution, before and after equal fine-tuning."),
    source="Figurnov et al., PerforatedCNNs (NIPS 2016), section 4.2",
    tiers=TIERS, default_seeds={"small": 1, "medium": 3, "full": 5}, run=run, verdict=verdict, plot=plot)
