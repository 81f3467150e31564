"""C8 and C9: probabilistic ACT (PACT) in residual networks, trained with the relaxation or REINFORCE.

**C8** — a PACT-ResNet trained in the *relaxed* mode (Gumbel-Softmax stick-breaking,
docs/spec.md §9.3) can be run in the *discrete* (sampled, §9.4) and *thresholded* (deterministic,
early halting, §9.5) modes at test time: during training, the accuracy of the relaxed parameters
evaluated in those modes follows the relaxed accuracy closely. Per seed one network is trained
relaxed and evaluated in all three modes after every epoch (the noise of the sampled modes drawn
from the seed); the numbers compared are the final accuracy gaps ``mode - relaxed``.

**C9** — the relaxation trains better than REINFORCE (the score-function estimator, §9.4), and
more so as the number of halting latents grows (REINFORCE's variance grows with it). One setting
per latent layout, from one latent per block to one per position (docs/spec.md §9.6); per seed the
same network (same initial weights) is trained once relaxed and once discrete (REINFORCE), both
evaluated in the thresholded mode. The number compared is the per-seed gain ``accuracy(relaxed) -
accuracy(REINFORCE)``, and how it changes from the fewest to the most latents.
"""

from __future__ import annotations

import numpy as np

from .claim import Claim, Verdict
from .common import interval_bars, load_setting_data, new_figure, resolve_backend, save_figure, seed_rng, train_classifier
from .intervals import above_zero, paired_difference

EVALUATION_MODES = ("relaxed", "discrete", "thresholded")
#: The network of C8 and C9. Not ResNet-8: its stages hold one residual unit each, so there is no
#: halting head and nothing to halt — every mode and both estimators would compute the same network.
PACT_MODEL = "pact-resnet14"
#: C8: a test-time mode "follows" the relaxed accuracy when the gap's interval lies above this.
TOLERATED_GAP = -0.02


def _pact_options(setting, mode):
    options = {"widths": setting["widths"], "tau": setting["tau"], "latents": setting["latents"], "mode": mode,
               "temperature": setting["temperature"]}
    if setting.get("group_size") is not None:
        options["group_size"] = setting["group_size"]
    return options


def _reset_noise(model, seed):
    """The noise of the sampled modes, drawn the same way for every evaluation of run ``seed``."""
    state = seed_rng(seed, 7).bit_generator.state
    for block in model.stages:
        block.rng.bit_generator.state = state


def _accuracy_in(model, mode, split, seed, trained_mode):
    from ..training import evaluate

    model.set_mode(mode)
    _reset_noise(model, seed)
    result = evaluate(model, split)
    model.set_mode(trained_mode)
    return result["accuracy"], result["flops_per_image"] / 1e6


# --- C8 -------------------------------------------------------------------------------------------


def _c8_setting(data, widths, training, latents):
    return {"name": f"pact-{latents}", "model": PACT_MODEL, "latents": latents, "widths": widths, "tau": 0.05,
            "temperature": 0.5, "data": data, "training": training, "backend": "fastest" if data["n_train"] > 500
            else "numpy"}


C8_TIERS = {
    "small": [_c8_setting({"kind": "cluttered", "canvas": 24, "n_train": 64, "n_test": 32}, [4, 8, 8],
                          {"epochs": 2, "batch_size": 32, "lr": 3e-3, "warmup_fraction": 0.05}, "per-position")],
    "medium": [_c8_setting({"kind": "cluttered", "canvas": 32, "n_train": 2000, "n_test": 250}, [8, 16, 32],
                           {"epochs": 8, "batch_size": 64, "lr": 3e-3, "warmup_fraction": 0.05}, latents)
               for latents in ("per-block", "per-position")],
    "full": [_c8_setting({"kind": "cluttered", "canvas": 32, "n_train": 10000, "n_test": 1000}, [16, 32, 64],
                         {"epochs": 20, "batch_size": 64, "lr": 3e-3, "warmup_fraction": 0.05}, latents)
             for latents in ("per-block", "per-position")],
}


def run_c8(setting, seed, echo):
    from ..models import build_model
    from ..optim import Adam, CosineSchedule
    from ..training import fit

    backend, backend_name = resolve_backend(setting["backend"])
    train, test = load_setting_data(setting["data"], seed)
    model = build_model(setting["model"], 10, train.images.shape[1], seed_rng(seed, 1), backend=backend,
                        **_pact_options(setting, "relaxed"))
    training = setting["training"]
    optimizer = Adam(list(model.named_parameters()), lr=training["lr"])
    steps = max(1, training["epochs"] * -(-len(train) // training["batch_size"]))
    schedule = CosineSchedule(training["lr"], steps, warmup=int(training["warmup_fraction"] * steps))
    curves = {mode: [] for mode in EVALUATION_MODES}
    mflops = {mode: [] for mode in EVALUATION_MODES}

    def after_epoch(record):
        for mode in EVALUATION_MODES:
            accuracy, flops = _accuracy_in(model, mode, test, seed, "relaxed")
            curves[mode].append(accuracy)
            mflops[mode].append(flops)

    fit(model, optimizer, train, epochs=training["epochs"], batch_size=training["batch_size"], rng=seed_rng(seed, 2),
        schedule=schedule, progress=False, on_epoch_end=after_epoch)
    numbers = {f"accuracy_{mode}": curves[mode][-1] for mode in EVALUATION_MODES}
    numbers.update({f"mflops_{mode}": mflops[mode][-1] for mode in EVALUATION_MODES})
    for mode in ("discrete", "thresholded"):
        numbers[f"gap_{mode}_minus_relaxed"] = curves[mode][-1] - curves["relaxed"][-1]
    numbers.update({f"accuracy_{mode}_epoch{e + 1}": a for mode in EVALUATION_MODES
                    for e, a in enumerate(curves[mode])})
    echo("    " + ", ".join(f"{mode} {curves[mode][-1]:.4f}" for mode in EVALUATION_MODES))
    return {"numbers": numbers, "details": {"curves": curves, "mflops": mflops}, "backend": backend_name}


def verdict_c8(summary):
    comparisons, parts, follows, total = {}, [], 0, 0
    for name, entry in summary["settings"].items():
        for mode in ("discrete", "thresholded"):
            gap = entry["numbers"][f"gap_{mode}_minus_relaxed"]
            comparisons[f"{name}_{mode}_minus_relaxed"] = gap
            total += 1
            shown = gap["low"] is not None and gap["low"] > TOLERATED_GAP
            follows += shown
            parts.append(f"{name} {mode} − relaxed accuracy {gap['mean']:+.4f}"
                         + (f" [{gap['low']:+.4f}, {gap['high']:+.4f}]" if gap["low"] is not None else ""))
    text = "; ".join(parts)
    if follows == total:
        return Verdict("reproduced", f"{text}: every test-time mode is within {-TOLERATED_GAP:g} of the relaxed "
                       "accuracy (interval included)", comparisons)
    means = [g["mean"] for g in comparisons.values()]
    if follows or any(m > TOLERATED_GAP for m in means):
        return Verdict("partly", f"{text}: {follows} of {total} gaps have their interval above {TOLERATED_GAP:g}",
                       comparisons)
    return Verdict("not reproduced", f"{text}: the relaxed parameters lose more than {-TOLERATED_GAP:g} in every "
                   "other mode", comparisons)


def plot_c8(summary, path):
    names = list(summary["settings"])
    fig, axes = new_figure(ncols=len(names), width=4.5)
    for ax, name in zip(axes, names):
        numbers = summary["settings"][name]["numbers"]
        for mode in EVALUATION_MODES:
            keys = sorted((k for k in numbers if k.startswith(f"accuracy_{mode}_epoch")),
                          key=lambda k: int(k.rsplit("epoch", 1)[1]))
            epochs = [int(k.rsplit("epoch", 1)[1]) for k in keys]
            means, yerr = interval_bars([numbers[k] for k in keys])
            ax.errorbar(epochs, means, yerr=yerr, fmt="o-", capsize=3, label=f"evaluated {mode}")
        ax.set(xlabel="epoch of relaxed training", ylabel="test accuracy", title=name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path, summary)


C8 = Claim(
    name="C8",
    title="relaxed PACT parameters run in discrete and thresholded modes",
    statement=("A PACT-ResNet trained with the relaxation can be evaluated in the discrete (sampled) and "
               "thresholded (deterministic, early-halting) modes: during training their accuracy follows the "
               "relaxed accuracy closely."),
    source="Figurnov, Sobolev & Vetrov, Probabilistic Adaptive Computation Time (2018), experiments",
    tiers=C8_TIERS, default_seeds={"small": 1, "medium": 3, "full": 5}, run=run_c8, verdict=verdict_c8,
    plot=plot_c8)


# --- C9 -------------------------------------------------------------------------------------------


def _c9_settings(data, widths, training, layouts, backend):
    return [{"name": name, "model": PACT_MODEL, "latents": latents, "group_size": group, "widths": widths,
             "tau": 0.05, "temperature": 0.5, "data": data, "training": training, "backend": backend}
            for name, latents, group in layouts]


C9_LAYOUTS = (("per-block", "per-block", None), ("groups-4", "group", 4), ("per-position", "per-position", None))
C9_TIERS = {
    "small": _c9_settings({"kind": "cluttered", "canvas": 24, "n_train": 64, "n_test": 32}, [4, 8, 8],
                          {"epochs": 1, "batch_size": 32, "lr": 3e-3, "warmup_fraction": 0.05},
                          (C9_LAYOUTS[0], C9_LAYOUTS[2]), "numpy"),
    "medium": _c9_settings({"kind": "cluttered", "canvas": 32, "n_train": 1500, "n_test": 250}, [8, 16, 32],
                           {"epochs": 6, "batch_size": 64, "lr": 3e-3, "warmup_fraction": 0.05}, C9_LAYOUTS,
                           "fastest"),
    "full": _c9_settings({"kind": "cluttered", "canvas": 32, "n_train": 10000, "n_test": 1000}, [16, 32, 64],
                         {"epochs": 20, "batch_size": 64, "lr": 3e-3, "warmup_fraction": 0.05},
                         C9_LAYOUTS + (("groups-2", "group", 2),), "fastest"),
}


def run_c9(setting, seed, echo):
    backend, backend_name = resolve_backend(setting["backend"])
    train, test = load_setting_data(setting["data"], seed)
    numbers, details = {}, {}
    for mode, label in (("relaxed", "relaxed"), ("discrete", "reinforce")):
        model, history = train_classifier(setting["model"], _pact_options(setting, mode), train, setting["training"],
                                          seed, backend)
        accuracy, mflops = _accuracy_in(model, "thresholded", test, seed, mode)
        numbers[f"accuracy_{label}"], numbers[f"mflops_{label}"] = accuracy, mflops
        details[f"train_loss_{label}"] = history.column("train_loss")
        if mode == "relaxed":
            numbers["latents_per_image"] = float(model.latent_count(train.images.shape[2:]))
    numbers["gain_relaxed_minus_reinforce"] = numbers["accuracy_relaxed"] - numbers["accuracy_reinforce"]
    echo(f"    {setting['name']}: relaxed {numbers['accuracy_relaxed']:.4f}, REINFORCE "
         f"{numbers['accuracy_reinforce']:.4f} ({numbers['latents_per_image']:.0f} latents per image)")
    return {"numbers": numbers, "details": details, "backend": backend_name}


def verdict_c9(summary):
    entries = list(summary["settings"].items())
    gains = {name: entry["numbers"]["gain_relaxed_minus_reinforce"] for name, entry in entries}
    (fewest, first), (most, last) = entries[0], entries[-1]
    growth = paired_difference(gains[most]["values"], gains[fewest]["values"])
    comparisons = {**{f"gain_{name}": g for name, g in gains.items()}, f"gain_{most}_minus_gain_{fewest}": growth}
    text = ", ".join(f"{name}: relaxed − REINFORCE accuracy {g['mean']:+.4f}"
                     + (f" [{g['low']:+.4f}, {g['high']:+.4f}]" if g["low"] is not None else "")
                     for name, g in gains.items())
    text += f"; growth from {fewest} to {most} {growth['mean']:+.4f}" + (
        f" [{growth['low']:+.4f}, {growth['high']:+.4f}]" if growth["low"] is not None else "")
    if above_zero(gains[most]) and above_zero(growth):
        return Verdict("reproduced", text + ": the relaxation wins, and by more with more latents", comparisons)
    if any(above_zero(g) for g in gains.values()) or (gains[most]["mean"] > 0 and growth["mean"] > 0):
        return Verdict("partly", text + ": the relaxation wins somewhere, but not shown to win more with more "
                       "latents (intervals)", comparisons)
    return Verdict("not reproduced", text + ": the relaxation does not train better than REINFORCE", comparisons)


def plot_c9(summary, path):
    fig, (ax,) = new_figure()
    names = list(summary["settings"])
    latents = [summary["settings"][n]["numbers"]["latents_per_image"]["mean"] for n in names]
    for offset, (label, key) in zip((0.97, 1.03), (("relaxed", "accuracy_relaxed"),
                                                   ("REINFORCE (discrete)", "accuracy_reinforce"))):
        means, yerr = interval_bars([summary["settings"][n]["numbers"][key] for n in names])
        ax.errorbar(np.array(latents) * offset, means, yerr=yerr, fmt="o-", capsize=4, label=f"trained {label}")
    ax.set_xscale("log")
    ax.set(xlabel="halting latents per image (log scale)", ylabel="test accuracy, thresholded evaluation")
    for x, name in zip(latents, names):
        ax.annotate(name, (x, ax.get_ylim()[0]), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=7)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path, summary)


C9 = Claim(
    name="C9",
    title="relaxation vs REINFORCE as the latents grow",
    statement=("Training PACT with the relaxation gives better networks than REINFORCE, and the advantage grows "
               "with the number of halting latents (from one per block to one per position)."),
    source="Figurnov, Sobolev & Vetrov, Probabilistic Adaptive Computation Time (2018), experiments",
    tiers=C9_TIERS, default_seeds={"small": 1, "medium": 3, "full": 5}, run=run_c9, verdict=verdict_c9,
    plot=plot_c9)
