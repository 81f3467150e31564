"""C3: on one layer of a trained CNN, grid and impact masks lose less accuracy than uniform masks.

Figurnov et al. (PerforatedCNNs, 2016, section 4.1) perforate a single convolutional layer at
increasing rates with each mask type: the grid mask (pseudo-random, Fractional Max-Pooling
sequences, docs/spec.md §3.3) and the impact mask (docs/spec.md §3.5) raise the error less than
the uniform mask.

Per seed: a Network-in-Network CNN (:mod:`refimpl.nin`) is trained on the seed's data; its
``conv2`` (with its 1×1 follower) is perforated at each rate; the uniform and grid masks are drawn
``draws`` times (random positions; random grid phase), their test errors averaged; impact is
computed once on training images. The numbers compared are the per-seed *gains* ``error(uniform) -
error(grid or impact)`` averaged over the rates, so the interval is over seeds, paired.
"""

from __future__ import annotations

import numpy as np

from .claim import Claim, Verdict
from .common import (error_rate, interval_bars, load_setting_data, new_figure, resolve_backend, save_figure, seed_rng,
                     train_classifier)
from .intervals import above_zero

MASKS = ("uniform", "grid", "impact")
LAYER = "conv2"


def _setting(data, widths, training, rates, draws, impact_images, backend):
    return {"name": "nin-conv2", "model": "nin", "layer": LAYER, "widths": widths, "data": data,
            "training": training, "rates": rates, "draws": draws, "impact_images": impact_images,
            "backend": backend}


TIERS = {
    "small": [_setting({"kind": "digits", "scale": 2, "n_train": 128, "n_test": 64}, [4, 8, 8],
                       {"epochs": 1, "batch_size": 32, "lr": 3e-3, "warmup_fraction": 0.05}, [0.5, 0.75], 2, 32,
                       "numpy")],
    "medium": [_setting({"kind": "digits", "scale": 4, "n_train": 1078, "n_test": 539}, [16, 32, 64],
                        {"epochs": 12, "batch_size": 32, "lr": 3e-3, "warmup_fraction": 0.05},
                        [0.33, 0.5, 0.67, 0.75, 0.8], 4, 300, "fastest")],
    "full": [_setting({"kind": "cluttered", "canvas": 48, "n_train": 5000, "n_test": 1000}, [32, 64, 128],
                      {"epochs": 20, "batch_size": 32, "lr": 3e-3, "warmup_fraction": 0.05},
                      [0.33, 0.5, 0.67, 0.75, 0.8, 0.9], 8, 1000, "fastest")],
}


def _rate_key(rate):
    return f"r{rate:g}"


def run(setting, seed, echo):
    from ..greedy import make_layer_mask, set_group_mask
    from ..impact import find_perforable_layers, impact_maps

    backend, backend_name = resolve_backend(setting["backend"])
    train, test = load_setting_data(setting["data"], seed)
    model, _ = train_classifier(setting["model"], {"widths": setting["widths"]}, train, setting["training"], seed,
                                backend)
    layer = setting["layer"]
    info = {i.name: i for i in find_perforable_layers(model, test.images[:2])}[layer]
    picked = train.subset(slice(0, setting["impact_images"]))
    impact = impact_maps(model, picked.images, picked.labels, [layer])[layer]
    rng = seed_rng(seed, 3)
    numbers = {"dense_error": error_rate(model, test)}
    realised = {}
    for rate in setting["rates"]:
        key = _rate_key(rate)
        for kind in MASKS:
            errors, rates = [], []
            for _ in range(1 if kind == "impact" else setting["draws"]):
                mask = make_layer_mask(kind, info, 1.0 - rate, rng, impact)
                set_group_mask(model, info, mask)
                errors.append(error_rate(model, test))
                rates.append(1.0 - float(mask.mean()))
            numbers[f"error_{kind}_{key}"] = float(np.mean(errors))
            realised[f"{kind}_{key}"] = float(np.mean(rates))
        set_group_mask(model, info, None)
        for kind in ("grid", "impact"):
            numbers[f"gain_{kind}_{key}"] = numbers[f"error_uniform_{key}"] - numbers[f"error_{kind}_{key}"]
    for kind in ("grid", "impact"):
        numbers[f"mean_gain_{kind}"] = float(np.mean([numbers[f"gain_{kind}_{_rate_key(r)}"]
                                                      for r in setting["rates"]]))
    echo(f"    dense error {numbers['dense_error']:.4f}; mean gain over uniform: grid "
         f"{numbers['mean_gain_grid']:+.4f}, impact {numbers['mean_gain_impact']:+.4f}")
    return {"numbers": numbers, "details": {"realised_rates": realised, "out_hw": list(info.out_hw),
                                            "n_train": len(train), "n_test": len(test)},
            "backend": backend_name}


def verdict(summary):
    (entry,) = summary["settings"].values()
    gains = {kind: entry["numbers"][f"mean_gain_{kind}"] for kind in ("grid", "impact")}
    shown = [kind for kind, g in gains.items() if above_zero(g)]
    # the gain named as a difference: "lowers the error by -0.1" would hide that the mask is worse
    text = "; ".join(f"error(uniform) - error({kind}) = {g['mean']:+.4f} averaged over the rates"
                     + (f" (95 % interval [{g['low']:+.4f}, {g['high']:+.4f}])" if g["low"] is not None else
                        " (one seed: no interval)")
                     + f", {kind} {'lower' if g['mean'] > 0 else 'not lower'} on average"
                     for kind, g in gains.items())
    comparisons = {f"mean_gain_{kind}": g for kind, g in gains.items()}
    if len(shown) == 2:
        return Verdict("reproduced", text + ": both beat uniform", comparisons)
    if shown or any(g["mean"] > 0 for g in gains.values()):
        return Verdict("partly", text + (f": only {shown[0]} beats uniform with an interval above 0" if shown else
                                         ": better on average, but no interval lies above 0"), comparisons)
    return Verdict("not reproduced", text + ": neither beats uniform", comparisons)


def plot(summary, path):
    fig, (ax,) = new_figure()
    (entry,) = summary["settings"].values()
    rates = entry["settings"]["rates"]
    for offset, kind in zip((-0.006, 0.0, 0.006), MASKS):
        means, yerr = interval_bars([entry["numbers"][f"error_{kind}_{_rate_key(r)}"] for r in rates])
        ax.errorbar(np.array(rates) + offset, means, yerr=yerr, fmt="o-", capsize=3, label=kind)
    dense = entry["numbers"]["dense_error"]["mean"]
    ax.axhline(dense, color="gray", ls=":", label="dense (mean)")
    ax.set(xlabel=f"perforation rate of {entry['settings']['layer']} (with its 1×1 follower)", ylabel="test error")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path, summary)


CLAIM = Claim(
    name="C3",
    title="grid and impact masks beat uniform on one layer",
    statement=("Perforating a single layer of a trained CNN, the grid (pseudo-random) and impact masks increase "
               "the error less than the uniform random mask at the same perforation rate."),
    source="Figurnov et al., PerforatedCNNs (NIPS 2016), section 4.1, single-layer mask comparison",
    tiers=TIERS, default_seeds={"small": 1, "medium": 3, "full": 5}, run=run, verdict=verdict, plot=plot)
