"""Sanity check: plain ResNets get better with depth (ResNet-14 at least as good as ResNet-8).

Not a claim of the thesis but the ground every later comparison stands on: trained the same way,
on the same data, with a learning-rate schedule, the deeper plain ResNet should not be worse. If it
is, the training set-up is broken and no adaptive-computation result on top of it means much.

Each seed draws the data (digit split or generated cluttered digits), the weights and the
shuffling; both depths are trained on the same seed, so the comparison is paired.
"""

from __future__ import annotations

from .claim import Claim, Verdict
from .common import error_rate, interval_bars, load_setting_data, new_figure, resolve_backend, save_figure, train_classifier
from .intervals import above_zero, below_zero, paired_difference

DEPTHS = (8, 14)


def _settings(data, widths, training, backend):
    return [{"name": f"resnet{d}", "model": f"resnet{d}", "depth": d, "widths": widths, "data": data,
             "training": training, "backend": backend} for d in DEPTHS]


TIERS = {
    "small": _settings({"kind": "digits", "scale": 2, "n_train": 128, "n_test": 64}, [4, 8, 8],
                       {"epochs": 1, "batch_size": 32, "lr": 3e-3, "warmup_fraction": 0.05}, "numpy"),
    "medium": _settings({"kind": "cluttered", "canvas": 32, "n_train": 2000, "n_test": 500}, [8, 16, 32],
                        {"epochs": 10, "batch_size": 64, "lr": 3e-3, "warmup_fraction": 0.05}, "fastest"),
    "full": _settings({"kind": "cluttered", "canvas": 48, "n_train": 10000, "n_test": 2000}, [16, 32, 64],
                      {"epochs": 30, "batch_size": 64, "lr": 3e-3, "warmup_fraction": 0.05}, "fastest"),
}


def run(setting, seed, echo):
    backend, backend_name = resolve_backend(setting["backend"])
    train, test = load_setting_data(setting["data"], seed)
    model, history = train_classifier(setting["model"], {"widths": setting["widths"]}, train, setting["training"],
                                      seed, backend)
    error = error_rate(model, test)
    echo(f"    {setting['name']}: test accuracy {1 - error:.4f}")
    return {"numbers": {"test_accuracy": 1.0 - error, "final_train_loss": history.epochs[-1].train_loss,
                        "train_seconds": history.epochs[-1].elapsed_seconds},
            "details": {"train_loss_by_epoch": history.column("train_loss"), "n_train": len(train),
                        "n_test": len(test)},
            "backend": backend_name}


def verdict(summary):
    deep, shallow = (summary["settings"][f"resnet{d}"]["numbers"]["test_accuracy"] for d in reversed(DEPTHS))
    gain = paired_difference(deep["values"], shallow["values"])
    comparisons = {"resnet14_minus_resnet8_accuracy": gain}
    text = f"ResNet-14 minus ResNet-8 test accuracy {gain['mean']:+.4f}"
    if gain["low"] is not None:
        text += f" (95 % interval [{gain['low']:+.4f}, {gain['high']:+.4f}], paired over {gain['n']} seeds)"
    if above_zero(gain):
        return Verdict("reproduced", text + ": the deeper network is better", comparisons)
    if below_zero(gain) or gain["mean"] < 0:
        return Verdict("not reproduced", text + ": the deeper network is worse", comparisons)
    why = "one seed gives no interval" if gain["low"] is None else "the interval includes 0"
    return Verdict("partly", text + f": not worse on average, but {why}", comparisons)


def plot(summary, path):
    fig, (ax,) = new_figure(width=4.5)
    names = list(summary["settings"])
    intervals = [summary["settings"][n]["numbers"]["test_accuracy"] for n in names]
    means, yerr = interval_bars(intervals)
    depths = [summary["settings"][n]["settings"]["depth"] for n in names]
    ax.errorbar(depths, means, yerr=yerr, fmt="o-", capsize=4, label="mean over seeds")
    for depth, interval in zip(depths, intervals):
        ax.plot([depth] * interval["n"], interval["values"], "x", color="gray", alpha=0.7)
    ax.plot([], [], "x", color="gray", label="single seeds")
    ax.set(xlabel="ResNet depth", ylabel="test accuracy", xticks=depths)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path, summary)


CLAIM = Claim(
    name="sanity",
    title="plain ResNets improve with depth",
    statement=("Trained the same way on the same data with a learning-rate schedule, a plain ResNet-14 is at "
               "least as accurate as a ResNet-8 (the ground the later comparisons stand on)."),
    source="sanity check of the training set-up (He et al. 2016, as used throughout the thesis)",
    tiers=TIERS, default_seeds={"small": 1, "medium": 3, "full": 5}, run=run, verdict=verdict, plot=plot)
