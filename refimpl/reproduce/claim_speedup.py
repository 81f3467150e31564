r"""C2: a perforated convolution is faster in practice, close to its theoretical speedup.

Figurnov et al. (PerforatedCNNs, 2016, section 3.3) implement the perforated layer as im2row on the
computed positions followed by one matrix product, and report empirical speedups of a single layer
close to the theoretical one,

.. math:: S_\text{theory} = \frac{\text{dense FLOPs}}{\text{perforated FLOPs}} = \frac{1}{1 - r}

for a realised perforation rate :math:`r` (docs/spec.md §5.3). Here each layer of a setting is
timed dense and perforated (grid mask, compact output: the next layer would read it through an
index table, docs/spec.md §2.6) on one backend; the timed calls are *interleaved* (dense,
perforated, dense, ...) so a change in the machine's load hits both alike, and the median of each
is taken. The number compared is the per-seed ratio :math:`S_\text{measured} / S_\text{theory}`.
A seed draws the input, the weights and the grid mask's phase.

Timings on a shared machine are noisy; the run records the backend and the BLAS library.
"""

from __future__ import annotations

import time

import numpy as np

from .claim import Claim, Verdict
from .common import interval_bars, new_figure, resolve_backend, save_figure, seed_rng

#: Measured / theoretical speedup at or above which the speedup is "close to theoretical".
CLOSE_ENOUGH = 0.8


def _layer(title, n, c, k, hw, kernel=3, padding=1):
    return {"title": title, "n": n, "c": c, "k": k, "hw": hw, "kernel": kernel, "padding": padding}


def _setting(layer, rates, repeats):
    # The NumPy backend is the paper's implementation exactly (im2row on the computed positions,
    # one GEMM), on one BLAS thread.
    return {"name": layer["title"].split()[0], "layer": layer, "rates": rates, "repeats": repeats,
            "backend": "numpy", "threads": 1}


TIERS = {
    "small": [_setting(_layer("tiny 8->8 @16", 4, 8, 8, 16), [0.5, 0.75], 3)],
    "medium": [_setting(_layer(title, *shape), [0.25, 0.5, 0.75], 15) for title, shape in (
        ("resnet32 ResNet CIFAR 32@16", (128, 32, 32, 16)),
        ("nin2 NIN conv2 96->192 5x5 @16", (32, 96, 192, 16, 5, 2)),
        ("vgg3 VGG-16 conv3 256->256 @56", (4, 256, 256, 56)))],
    "full": [_setting(_layer(title, *shape), [0.25, 0.5, 0.67, 0.75, 0.8], 25) for title, shape in (
        ("resnet16 ResNet CIFAR 16@32", (128, 16, 16, 32)),
        ("resnet32 ResNet CIFAR 32@16", (128, 32, 32, 16)),
        ("resnet64 ResNet CIFAR 64@8", (128, 64, 64, 8)),
        ("nin2 NIN conv2 96->192 5x5 @16", (32, 96, 192, 16, 5, 2)),
        ("alexnet2 AlexNet conv2 96->256 5x5 @27", (16, 96, 256, 27, 5, 2)),
        ("vgg3 VGG-16 conv3 256->256 @56", (4, 256, 256, 56)))],
}


def _rate_key(rate):
    return f"r{rate:g}"


def run(setting, seed, echo):
    from ..masks import grid_mask
    from ..perforation import perforated_conv2d_forward
    from ..plan import PerforationPlan

    backend, backend_name = resolve_backend(setting["backend"])
    layer = setting["layer"]
    rng = seed_rng(seed, 4)
    x = rng.standard_normal((layer["n"], layer["c"], layer["hw"], layer["hw"]), dtype=np.float32)
    w = (rng.standard_normal((layer["k"], layer["c"], layer["kernel"], layer["kernel"]), dtype=np.float32)
         / np.float32(np.sqrt(layer["c"] * layer["kernel"] ** 2)))
    b = rng.standard_normal(layer["k"], dtype=np.float32)
    side = layer["hw"] + 2 * layer["padding"] - layer["kernel"] + 1
    numbers, details = {}, {"dense_ms": {}, "perforated_ms": {}, "realised_rate": {}}

    def call(plan):
        return lambda: perforated_conv2d_forward(x, w, b, mask=plan, padding=layer["padding"], output="compact",
                                                 backend=backend, check_finite=False)

    dense_plan = PerforationPlan.dense((side, side))
    for rate in setting["rates"]:
        plan = PerforationPlan(grid_mask((side, side), rate, rng))
        _ = plan.index_map  # built once, outside the timings
        dense, perforated = call(dense_plan), call(plan)
        dense(), perforated()  # warm-up
        times = {"dense": [], "perforated": []}
        for _ in range(setting["repeats"]):  # interleaved: load changes hit both
            for name, fn in (("dense", dense), ("perforated", perforated)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        key = _rate_key(rate)
        measured = float(np.median(times["dense"]) / np.median(times["perforated"]))
        theoretical = 1.0 / (1.0 - plan.rate)
        numbers[f"measured_speedup_{key}"] = measured
        numbers[f"theoretical_speedup_{key}"] = theoretical
        numbers[f"ratio_{key}"] = measured / theoretical
        details["dense_ms"][key] = [t * 1e3 for t in times["dense"]]
        details["perforated_ms"][key] = [t * 1e3 for t in times["perforated"]]
        details["realised_rate"][key] = float(plan.rate)
        echo(f"    {layer['title']} r={plan.rate:.2f}: measured {measured:.2f}x, theoretical {theoretical:.2f}x")
    numbers["mean_ratio"] = float(np.mean([numbers[f"ratio_{_rate_key(r)}"] for r in setting["rates"]]))
    return {"numbers": numbers, "details": details, "backend": backend_name}


def verdict(summary):
    ratios = {name: entry["numbers"]["mean_ratio"] for name, entry in summary["settings"].items()}
    speedups = [interval for entry in summary["settings"].values() for key, interval in entry["numbers"].items()
                if key.startswith("measured_speedup_")]
    close = [name for name, r in ratios.items() if r["low"] is not None and r["low"] >= CLOSE_ENOUGH]
    text = ", ".join(f"{name}: measured/theoretical {r['mean']:.2f}"
                     + (f" [{r['low']:.2f}, {r['high']:.2f}]" if r["low"] is not None else "")
                     for name, r in ratios.items())
    comparisons = {f"mean_ratio_{name}": r for name, r in ratios.items()}
    if len(close) == len(ratios):
        return Verdict("reproduced", f"{text}: at least {CLOSE_ENOUGH:g} of the theoretical speedup on every layer "
                       "(interval included)", comparisons)
    if all(s["mean"] > 1 for s in speedups):
        return Verdict("partly", f"{text}: every perforated layer is faster than the dense one, but not within "
                       f"{CLOSE_ENOUGH:g} of the theoretical speedup on every layer (interval included)", comparisons)
    return Verdict("not reproduced", f"{text}: some perforated layer is not faster than the dense one", comparisons)


def plot(summary, path):
    fig, (ax,) = new_figure(width=5)
    top = 1.0
    for name, entry in summary["settings"].items():
        keys = [_rate_key(r) for r in entry["settings"]["rates"]]
        theory = [entry["numbers"][f"theoretical_speedup_{k}"]["mean"] for k in keys]
        means, yerr = interval_bars([entry["numbers"][f"measured_speedup_{k}"] for k in keys])
        ax.errorbar(theory, means, yerr=yerr, fmt="o-", capsize=3, label=f"{entry['settings']['layer']['title']}")
        top = max(top, max(theory), float(np.max(means + yerr[1])))
    ax.plot([1, top], [1, top], "k:", label="measured = theoretical")
    ax.plot([1, top], [CLOSE_ENOUGH, CLOSE_ENOUGH * top], "k--", alpha=0.4,
            label=f"{CLOSE_ENOUGH:g} × theoretical")
    backends = sorted({b for entry in summary["settings"].values() for b in entry["backends"]})
    ax.set(xlabel="theoretical speedup 1 / (1 - r)", ylabel=f"measured speedup ({', '.join(backends)} backend)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path, summary)


CLAIM = Claim(
    name="C2",
    title="perforated layers: measured vs theoretical speedup",
    statement=("A perforated convolution, implemented as im2row on the computed positions followed by one matrix "
               "product, runs faster than the dense layer by close to its theoretical speedup 1 / (1 - r)."),
    source="Figurnov et al., PerforatedCNNs (NIPS 2016), section 3.3 and the per-layer benchmark",
    tiers=TIERS, default_seeds={"small": 1, "medium": 3, "full": 5}, run=run, verdict=verdict, plot=plot)
