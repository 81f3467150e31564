"""Plot a whole-network benchmark JSON (``ponder bench --networks --json``): images/s against FLOPs ratio.

One panel per input size and thread count: the adaptive networks (SACT, SACT unfused, SACT compiled, PACT) as
lines over their realised FLOPs ratio, the dense ones (ponder, PyTorch) as horizontal lines; the
bars span the fastest and slowest of the interleaved repeats (the median is the marker)::

    python scripts/plot_bench_networks.py docs/_static/bench/networks-before-cpu.json \
        docs/_static/bench/networks-before-cpu-64px.json --out docs/_static/bench/networks.png
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ADAPTIVE = ("SACT", "SACT unfused", "SACT compiled", "PACT")
DENSE = {"torch dense": ("C3", ":"), "ponder dense": ("k", "--"), "ponder compiled": ("0.5", "-.")}


def plot(datasets, title=None):
    """The figure of benchmark result dicts (JSON files as loaded): one panel per size and thread count."""
    data = datasets[0]
    rows = [r for d in datasets for r in d["rows"] if r["part"] == "inference"]
    settings = sorted({(r["size"], r["threads"]) for r in rows})
    columns = min(3, len(settings))
    lines = -(-len(settings) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(5.6 * columns, 4.4 * lines), squeeze=False)
    for ax in axes.flat[len(settings):]:
        ax.set_visible(False)
    for ax, (size, threads) in zip(axes.flat, settings):
        chosen = [r for r in rows if r["size"] == size and r["threads"] == threads]
        for i, name in enumerate(ADAPTIVE):
            points = sorted((r for r in chosen if r["runner"] == name), key=lambda r: r["ratio"])
            if not points:
                continue
            ratios = [r["ratio"] for r in points]
            speed = [r["images_per_s"] for r in points]
            low = [s - r["batch"] * 1e3 / max(r["ms_all"]) for s, r in zip(speed, points)]
            high = [r["batch"] * 1e3 / min(r["ms_all"]) - s for s, r in zip(speed, points)]
            ax.errorbar(ratios, speed, yerr=[low, high], marker="o", capsize=3, color=f"C{i}", label=name)
        for name, (color, style) in DENSE.items():
            for r in chosen:
                if r["runner"] == name:
                    ax.axhline(r["images_per_s"], color=color, linestyle=style, label=f"{name} (median)")
        ax.set_xlabel("FLOPs ratio realised (dense FLOPs / FLOPs spent)")
        ax.set_ylabel("images / s (median; bars: min–max of the repeats)")
        ax.set_title(f"ResNet-{data['settings']['depth']}, batch {data['settings']['batch']}, {size} px, "
                     f"{threads} thread{'s' if threads > 1 else ''}")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    env = data["environment"]
    fig.suptitle(title or f"{env['cpu']} — {env['date_utc'][:10]} (shared machine: noisy)", fontsize=10)
    fig.tight_layout()
    return fig


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="the benchmark's JSON files (their panels side by side)")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--title", help="the figure title (default: CPU, date and a noise note)")
    args = parser.parse_args(argv)
    datasets = []
    for path in args.json:
        with open(path) as f:
            datasets.append(json.load(f))
    plot(datasets, args.title).savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
