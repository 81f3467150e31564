"""parity: ACT, PACT and PonderNet learn parity, pondering longer on vectors with more non-zero entries.

Graves (2016, section 3.1) trains an RNN with adaptive computation time on the parity of vectors
with a random number of non-zero (±1) entries and finds the number of ponder steps growing with
the number of non-zero entries; the thesis's probabilistic ACT (PACT) and PonderNet (Banino et
al., 2021) are trained on the same task (docs/spec.md §10.4). Scaled down here: 8 entries rather
than 64 (64 needs about 100 times more steps). One setting per objective; per seed the cell, its
data and its noise are drawn from the seed. The numbers are the accuracy on fresh vectors and the
least-squares slope of the mean ponder steps against the number of non-zero entries.
"""

from __future__ import annotations

import numpy as np

from .claim import Claim, Verdict
from .common import interval_bars, new_figure, save_figure, seed_rng

OBJECTIVES = ("act", "pact", "pondernet")
#: Accuracy above which parity counts as learned (chance is 0.5).
LEARNED = 0.9


def _settings(size, steps, batch_size, hidden, max_steps, eval_size):
    return [{"name": objective, "objective": objective, "size": size, "steps": steps, "batch_size": batch_size,
             "hidden": hidden, "max_steps": max_steps, "lr": 3e-3, "tau": 1e-3, "temperature": 0.5, "beta": 0.01,
             "prior_rate": 0.2, "halting_bias": 1.0, "eval_size": eval_size} for objective in OBJECTIVES]


TIERS = {
    "small": _settings(size=4, steps=60, batch_size=32, hidden=16, max_steps=6, eval_size=200),
    "medium": _settings(size=8, steps=5000, batch_size=128, hidden=128, max_steps=12, eval_size=4000),
    "full": _settings(size=16, steps=40000, batch_size=128, hidden=128, max_steps=20, eval_size=10000),
}


def halting_rule(objective):
    """The deterministic evaluation rule of an objective: ACT's own, else thresholded at 1/2 (docs/spec.md §10.3)."""
    return "act" if objective == "act" else "thresholded"


def run(setting, seed, echo):
    from threadpoolctl import threadpool_limits

    from ..parity import evaluate_parity, train_parity

    with threadpool_limits(1):
        rnn, log = train_parity(setting["objective"], size=setting["size"], steps=setting["steps"],
                                batch_size=setting["batch_size"], hidden_size=setting["hidden"],
                                max_steps=setting["max_steps"], lr=setting["lr"], tau=setting["tau"],
                                temperature=setting["temperature"], beta=setting["beta"],
                                prior_rate=setting["prior_rate"], halting_bias=setting["halting_bias"],
                                rng=seed_rng(seed, 5), log_every=max(1, setting["steps"] // 10))
        report = evaluate_parity(rnn, setting["size"], halting_rule(setting["objective"]), setting["eval_size"],
                                 seed_rng(seed, 6))
    ks = np.array(sorted(report.steps_by_nonzero), dtype=float)
    steps = np.array([report.steps_by_nonzero[int(k)] for k in ks])
    slope = float(np.polyfit(ks, steps, 1)[0]) if len(ks) > 1 else 0.0
    numbers = {"accuracy": float(report.accuracy), "mean_ponder_steps": float(report.mean_steps),
               "ponder_steps_slope_per_nonzero": slope}
    numbers.update({f"ponder_steps_k{int(k)}": float(s) for k, s in zip(ks, steps)})
    echo(f"    {setting['objective']}: accuracy {report.accuracy:.3f}, mean ponder steps {report.mean_steps:.2f}, "
         f"slope {slope:+.3f} steps per non-zero entry")
    return {"numbers": numbers, "details": {"rule": halting_rule(setting["objective"]), "log": log._asdict()},
            "backend": "numpy"}


def _interval_text(i, digits=3):
    if i["low"] is None:
        return f"{i['mean']:.{digits}f}"
    return f"{i['mean']:.{digits}f} [{i['low']:.{digits}f}, {i['high']:.{digits}f}]"


def verdict(summary):
    parts, comparisons, learned, grows = [], {}, [], []
    for name, entry in summary["settings"].items():
        accuracy, slope = entry["numbers"]["accuracy"], entry["numbers"]["ponder_steps_slope_per_nonzero"]
        comparisons[f"accuracy_{name}"], comparisons[f"slope_{name}"] = accuracy, slope
        parts.append(f"{name}: accuracy {_interval_text(accuracy)}, slope {_interval_text(slope)}")
        if accuracy["low"] is not None and accuracy["low"] > LEARNED:
            learned.append(name)
        if slope["low"] is not None and slope["low"] > 0:
            grows.append(name)
    text = "; ".join(parts)
    everyone = len(summary["settings"])
    if len(learned) == everyone and len(grows) == everyone:
        return Verdict("reproduced", f"{text}: every objective learns parity (accuracy interval above {LEARNED:g}) "
                       "and ponders longer with more non-zero entries", comparisons)
    if learned or grows:
        return Verdict("partly", f"{text}: learned (interval above {LEARNED:g}) by {learned or 'none'}; ponder steps "
                       f"grow (slope interval above 0) for {grows or 'none'}", comparisons)
    return Verdict("not reproduced", f"{text}: no objective shows either (intervals above {LEARNED:g} and 0)",
                   comparisons)


def plot(summary, path):
    fig, axes = new_figure(ncols=2, width=4.5)
    names = list(summary["settings"])
    accuracies = [summary["settings"][n]["numbers"]["accuracy"] for n in names]
    means, yerr = interval_bars(accuracies)
    axes[0].errorbar(np.arange(len(names)), means, yerr=yerr, fmt="o", capsize=4, label="mean over seeds")
    for i, interval in enumerate(accuracies):
        axes[0].plot([i + 0.08] * interval["n"], interval["values"], "x", color="gray",
                     label="single seeds" if i == 0 else None)
    axes[0].axhline(0.5, color="gray", ls=":", label="chance")
    axes[0].set(xticks=np.arange(len(names)), xticklabels=names, xlabel="objective",
                ylabel="accuracy on fresh vectors", ylim=(0.4, 1.02))
    for name in names:
        numbers = summary["settings"][name]["numbers"]
        keys = sorted((k for k in numbers if k.startswith("ponder_steps_k")), key=lambda k: int(k[len("ponder_steps_k"):]))
        ks = [int(k[len("ponder_steps_k"):]) for k in keys]
        m, e = interval_bars([numbers[k] for k in keys])
        axes[1].errorbar(ks, m, yerr=e, fmt="o-", capsize=3, label=name)
    axes[1].set(xlabel="non-zero entries in the vector", ylabel="mean ponder steps")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path, summary)


CLAIM = Claim(
    name="parity",
    title="ACT, PACT and PonderNet on parity",
    statement=("On the parity task, an RNN trained with ACT, with probabilistic ACT or with PonderNet learns the "
               "parity, and its number of ponder steps grows with the number of non-zero entries."),
    source="Graves, Adaptive Computation Time (2016), section 3.1; the thesis's PACT; Banino et al., PonderNet (2021)",
    tiers=TIERS, default_seeds={"small": 1, "medium": 3, "full": 5}, run=run, verdict=verdict, plot=plot)
