"""C7: the computation-time maps of SACT fall on the objects, better than a centre-bias baseline.

Figurnov et al. (SACT, CVPR 2017, section 5) compare the ponder-cost maps of a SACT ResNet with
human fixations and find them a better predictor than a centre prior (AUC, NSS, CC). Here the
ground truth is the object itself: the pixels of the pasted digit in cluttered digits
(:mod:`refimpl.datasets`), scored by :mod:`refimpl.map_metrics` against the centred Gaussian
baseline. One setting per ponder penalty τ; per seed a SACT-ResNet is trained from scratch on the
seed's generated images and its maps scored on the seed's test images. The number compared is the
per-seed gain ``AUC(map) - AUC(centre)``.
"""

from __future__ import annotations

import numpy as np

from .claim import Claim, Verdict
from .common import interval_bars, load_setting_data, new_figure, resolve_backend, save_figure, train_classifier
from .intervals import above_zero

SCORES = ("auc", "nss", "cc")


def _settings(model, taus, data, widths, training, backend):
    return [{"name": f"tau{tau:g}", "model": model, "tau": tau, "widths": widths, "data": data,
             "training": training, "backend": backend} for tau in taus]


TIERS = {
    "small": _settings("sact-resnet8", [0.01, 0.1], {"kind": "cluttered", "canvas": 24, "n_train": 96, "n_test": 32},
                       [4, 8, 8], {"epochs": 1, "batch_size": 32, "lr": 3e-3, "warmup_fraction": 0.05}, "numpy"),
    "medium": _settings("sact-resnet14", [0.01, 0.05, 0.1],
                        {"kind": "cluttered", "canvas": 32, "n_train": 2000, "n_test": 250}, [8, 16, 32],
                        {"epochs": 8, "batch_size": 64, "lr": 3e-3, "warmup_fraction": 0.05}, "fastest"),
    "full": _settings("sact-resnet14", [0.005, 0.01, 0.02, 0.05, 0.1],
                      {"kind": "cluttered", "canvas": 64, "n_train": 10000, "n_test": 1000}, [16, 32, 64],
                      {"epochs": 30, "batch_size": 64, "lr": 3e-3, "warmup_fraction": 0.05}, "fastest"),
}


def run(setting, seed, echo):
    from ..map_metrics import centre_gaussian, computation_time_maps, map_scores
    from ..training import evaluate

    backend, backend_name = resolve_backend(setting["backend"])
    train, test = load_setting_data(setting["data"], seed)
    model, history = train_classifier(setting["model"], {"widths": setting["widths"], "tau": setting["tau"]}, train,
                                      setting["training"], seed, backend)
    result = evaluate(model, test)
    maps = computation_time_maps(model, test.images)
    scores = map_scores(maps, test.object_masks)
    centre = np.broadcast_to(centre_gaussian(test.object_masks.shape[1:]), test.object_masks.shape)
    centre_scores = map_scores(centre, test.object_masks)
    flat = maps.reshape(len(maps), -1)
    numbers = {"test_accuracy": result["accuracy"], "mflops_per_image": result["flops_per_image"] / 1e6}
    for name in SCORES:
        numbers[f"map_{name}"] = scores[name]["mean"]
        numbers[f"centre_{name}"] = centre_scores[name]["mean"]
    numbers["auc_gain_over_centre"] = numbers["map_auc"] - numbers["centre_auc"]
    numbers["map_varies_fraction"] = float(np.mean(flat.max(axis=1) > flat.min(axis=1)))
    echo(f"    τ={setting['tau']:g}: accuracy {numbers['test_accuracy']:.4f}, map AUC {numbers['map_auc']:.4f} "
         f"(centre {numbers['centre_auc']:.4f})")
    return {"numbers": numbers, "details": {"train_loss_by_epoch": history.column("train_loss"),
                                            "n_train": len(train), "n_test": len(test)},
            "backend": backend_name}


def verdict(summary):
    gains = {name: entry["numbers"]["auc_gain_over_centre"] for name, entry in summary["settings"].items()}
    shown = [name for name, g in gains.items() if above_zero(g)]
    positive = [name for name, g in gains.items() if g["mean"] > 0]
    text = ", ".join(f"{name}: AUC gain over the centre baseline {g['mean']:+.4f}"
                     + (f" [{g['low']:+.4f}, {g['high']:+.4f}]" if g["low"] is not None else "")
                     for name, g in gains.items())
    comparisons = {f"auc_gain_over_centre_{name}": g for name, g in gains.items()}
    if len(shown) == len(gains):
        return Verdict("reproduced", text + ": the maps beat the centre baseline at every τ", comparisons)
    if positive:
        why = (f"the interval lies above 0 only at {', '.join(shown)}" if shown else
               "better on average at " + ", ".join(positive) + ", but no interval lies above 0")
        return Verdict("partly", f"{text}: {why}", comparisons)
    return Verdict("not reproduced", text + ": the maps do no better than the centre baseline", comparisons)


def plot(summary, path):
    fig, axes = new_figure(ncols=2, width=4.5)
    names = list(summary["settings"])
    taus = [summary["settings"][n]["settings"]["tau"] for n in names]
    positions = np.arange(len(names))
    for ax, score in zip(axes, ("auc", "nss")):
        for offset, (source, label) in zip((-0.05, 0.05), (("map", "SACT map"), ("centre", "centre baseline"))):
            means, yerr = interval_bars([summary["settings"][n]["numbers"][f"{source}_{score}"] for n in names])
            ax.errorbar(positions + offset, means, yerr=yerr, fmt="o", capsize=4, label=label)
        ax.set(xlabel="ponder penalty τ", ylabel=f"{score.upper()} against the digit", xticks=positions,
               xticklabels=[f"{t:g}" for t in taus])
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].axhline(0.5, color="gray", ls=":", lw=1)
    save_figure(fig, path, summary)


CLAIM = Claim(
    name="C7",
    title="computation-time maps fall on the objects",
    statement=("The ponder-cost (computation-time) maps of a SACT ResNet concentrate on the objects of the "
               "image: they predict the object's pixels better than a centre-bias baseline (AUC, NSS, CC), "
               "at every ponder penalty τ."),
    source="Figurnov et al., Spatially Adaptive Computation Time (CVPR 2017), section 5",
    tiers=TIERS, default_seeds={"small": 1, "medium": 3, "full": 5}, run=run, verdict=verdict, plot=plot)
