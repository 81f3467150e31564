"""C6: ACT and SACT trade FLOPs for accuracy better than plain ResNets of several depths.

Figurnov et al. (SACT, CVPR 2017, section 5.1) train plain ResNets of several depths and ACT and
SACT ResNets at several ponder penalties τ, and plot accuracy against FLOPs per image: the
adaptive networks' points lie above the plain networks' curve, SACT's highest. Here: cluttered
digits at two canvas sizes (the larger has more clutter and a smaller object share, where
spatial adaptivity should pay more). One setting per (network, τ, canvas); per seed every network
is trained on the same generated images from the same seed, so the comparison is paired.

The number compared is, per seed, an adaptive network's accuracy minus the plain ResNets' curve
at the same FLOPs: the piecewise-linear interpolation between the plain depths' (FLOPs, accuracy)
points of that seed and canvas, held flat beyond the cheapest and the most expensive.
"""

from __future__ import annotations

import numpy as np

from .claim import Claim, Verdict
from .common import interval_bars, load_setting_data, new_figure, resolve_backend, save_figure, train_classifier
from .intervals import above_zero, below_zero, mean_interval

ADAPTIVE = ("act", "sact")


def _settings(canvases, depths, taus, data, widths, training, backend):
    settings = []
    for canvas in canvases:
        common = {"widths": widths, "data": dict(data, canvas=canvas), "training": training, "backend": backend,
                  "canvas": canvas}
        settings += [{"name": f"resnet{d}-c{canvas}", "kind": "resnet", "model": f"resnet{d}", "tau": None,
                      **common} for d in depths]
        settings += [{"name": f"{kind}-tau{tau:g}-c{canvas}", "kind": kind, "model": f"{kind}-resnet{max(depths)}",
                      "tau": tau, **common} for kind in ADAPTIVE for tau in taus]
    return settings


TIERS = {
    "small": _settings((20, 24), (8, 14), (0.1,), {"kind": "cluttered", "n_train": 64, "n_test": 32}, [4, 8, 8],
                       {"epochs": 1, "batch_size": 32, "lr": 3e-3, "warmup_fraction": 0.05}, "numpy"),
    # the sanity check's medium training, under which ResNet-14 beats ResNet-8 on 32 px
    "medium": _settings((32, 48), (8, 14), (0.01, 0.05, 0.1), {"kind": "cluttered", "n_train": 2000, "n_test": 500},
                        [8, 16, 32], {"epochs": 10, "batch_size": 64, "lr": 3e-3, "warmup_fraction": 0.05},
                        "fastest"),
    "full": _settings((32, 64), (8, 14, 20, 32), (0.005, 0.01, 0.02, 0.05, 0.1),
                      {"kind": "cluttered", "n_train": 10000, "n_test": 1000}, [16, 32, 64],
                      {"epochs": 30, "batch_size": 64, "lr": 3e-3, "warmup_fraction": 0.05}, "fastest"),
}


def run(setting, seed, echo):
    from ..training import evaluate

    backend, backend_name = resolve_backend(setting["backend"])
    train, test = load_setting_data(setting["data"], seed)
    options = {"widths": setting["widths"]}
    if setting["tau"] is not None:
        options["tau"] = setting["tau"]
    model, history = train_classifier(setting["model"], options, train, setting["training"], seed, backend)
    result = evaluate(model, test)
    numbers = {"test_accuracy": result["accuracy"], "mflops_per_image": result["flops_per_image"] / 1e6}
    echo(f"    {setting['name']}: accuracy {numbers['test_accuracy']:.4f}, {numbers['mflops_per_image']:.3f} MFLOPs")
    return {"numbers": numbers, "details": {"train_loss_by_epoch": history.column("train_loss")},
            "backend": backend_name}


def gains_over_plain_curve(summary):
    """``{setting name: mean_interval of accuracy minus the plain curve at equal FLOPs}`` for every adaptive setting."""
    settings = summary["settings"]
    gains = {}
    for canvas in sorted({entry["settings"]["canvas"] for entry in settings.values()}):
        here = {name: entry for name, entry in settings.items() if entry["settings"]["canvas"] == canvas}
        plain = [entry for entry in here.values() if entry["settings"]["kind"] == "resnet"]
        n = len(plain[0]["numbers"]["test_accuracy"]["values"])
        for name, entry in here.items():
            if entry["settings"]["kind"] == "resnet":
                continue
            per_seed = []
            for k in range(n):
                flops = np.array([p["numbers"]["mflops_per_image"]["values"][k] for p in plain])
                accuracy = np.array([p["numbers"]["test_accuracy"]["values"][k] for p in plain])
                order = np.argsort(flops)
                curve = np.interp(entry["numbers"]["mflops_per_image"]["values"][k], flops[order], accuracy[order])
                per_seed.append(entry["numbers"]["test_accuracy"]["values"][k] - curve)
            gains[name] = mean_interval(per_seed)
    return gains


def verdict(summary):
    gains = gains_over_plain_curve(summary)
    canvases = sorted({entry["settings"]["canvas"] for entry in summary["settings"].values()})
    above = [name for name, g in gains.items() if above_zero(g)]
    below = [name for name, g in gains.items() if below_zero(g)]
    text = ", ".join(f"{name} {g['mean']:+.4f}" + (f" [{g['low']:+.4f}, {g['high']:+.4f}]" if g["low"] is not None
                                                  else "") for name, g in gains.items())
    text = "accuracy minus the plain ResNets' curve at equal FLOPs: " + text
    comparisons = {f"gain_{name}": g for name, g in gains.items()}
    sact_above_everywhere = all(any(name.startswith("sact-") and name.endswith(f"-c{c}") for name in above)
                                for c in canvases)
    if sact_above_everywhere and not below:
        return Verdict("reproduced", text + ": SACT lies above the plain curve at every canvas and no adaptive "
                       "network below it", comparisons)
    if above or any(g["mean"] > 0 for g in gains.values()):
        return Verdict("partly", text + f": above the curve (interval) {above or 'nowhere'}; below it (interval) "
                       f"{below or 'nowhere'}", comparisons)
    return Verdict("not reproduced", text + ": no adaptive network beats the plain ResNets at equal FLOPs",
                   comparisons)


def plot(summary, path):
    canvases = sorted({entry["settings"]["canvas"] for entry in summary["settings"].values()})
    fig, axes = new_figure(ncols=len(canvases), width=4.8)
    styles = {"resnet": ("s-", "plain ResNets"), "act": ("^--", "ACT-ResNet"), "sact": ("o--", "SACT-ResNet")}
    for ax, canvas in zip(axes, canvases):
        for kind, (fmt, label) in styles.items():
            entries = [e for e in summary["settings"].values()
                       if e["settings"]["canvas"] == canvas and e["settings"]["kind"] == kind]
            if not entries:
                continue
            entries.sort(key=lambda e: e["numbers"]["mflops_per_image"]["mean"])
            x, xerr = interval_bars([e["numbers"]["mflops_per_image"] for e in entries])
            y, yerr = interval_bars([e["numbers"]["test_accuracy"] for e in entries])
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=fmt, capsize=3, label=label)
            for e, xi, yi in zip(entries, x, y):
                tag = f"τ={e['settings']['tau']:g}" if e["settings"]["tau"] is not None else e["settings"]["model"]
                ax.annotate(tag, (xi, yi), textcoords="offset points", xytext=(4, -10), fontsize=6)
        ax.set(xlabel="MFLOPs per image", ylabel="test accuracy", title=f"cluttered digits, {canvas}×{canvas}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path, summary)


CLAIM = Claim(
    name="C6",
    title="FLOPs–accuracy of ACT, SACT and plain ResNets",
    statement=("At equal FLOPs per image, ACT and SACT ResNets are at least as accurate as plain ResNets of "
               "several depths, and SACT lies above the plain networks' curve, at each image resolution."),
    source="Figurnov et al., Spatially Adaptive Computation Time (CVPR 2017), section 5.1",
    tiers=TIERS, default_seeds={"small": 1, "medium": 3, "full": 5}, run=run, verdict=verdict, plot=plot)
