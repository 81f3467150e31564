"""Print the whole-network benchmark's headline ratios from its JSON, as a Markdown table.

    python scripts/bench_networks_table.py docs/_static/bench/networks-final-cpu.json

Reads the rows written by ``python -m fastpath.bench --networks --json FILE`` and prints, for every
(size, threads) cell of that run, the ratios the docs' benchmark page quotes: ponder's compiled
dense ResNet against PyTorch's, the compiled SACT-ResNet at each FLOPs ratio against PyTorch's
dense network, its time with nothing halted over the compiled dense network's, and its speedup
over the compiled dense network divided by the realised FLOPs ratio; then the training rows. Every
number is computed from the one run in the file, so the table can be regenerated, never retyped.
"""

from __future__ import annotations

import argparse
import json
import sys


def _cells(rows):
    return sorted({(r["size"], r["threads"]) for r in rows if r["part"] == "inference"})


def _find(rows, cell, runner, ratio_target=None):
    size, threads = cell
    for r in rows:
        if (r["part"] == "inference" and r["size"] == size and r["threads"] == threads and r["runner"] == runner
                and r["ratio_target"] == ratio_target):
            return r
    return None


def inference_table(rows):
    """Markdown lines of the inference ratios, one column per (size, threads) cell."""
    cells = _cells(rows)
    header = "| | " + " | ".join(f"{size} px, {threads} thread{'s' if threads > 1 else ''}" for size, threads in cells)
    lines = [header + " |", "|---" * (len(cells) + 1) + "|"]

    def line(label, values):
        lines.append(f"| {label} | " + " | ".join("–" if v is None else f"{v:.2f}" for v in values) + " |")

    def ms(cell, runner, ratio_target=None):
        r = _find(rows, cell, runner, ratio_target)
        return None if r is None else r["ms"]

    def ratio_of(a, b):
        return None if a is None or b is None else a / b

    line("ponder compiled dense vs PyTorch",
         [ratio_of(ms(c, "torch dense"), ms(c, "ponder compiled")) for c in cells])
    targets = sorted({r["ratio_target"] for r in rows if r["runner"] == "SACT compiled" and r["ratio_target"]})
    for target in targets:
        if target == 1:
            continue
        realised = [(_find(rows, c, "SACT compiled", target) or {}).get("ratio") for c in cells]
        line(f"SACT compiled, FLOPs ratio {target:g} (realised {min(v for v in realised if v):.2f}–"
             f"{max(v for v in realised if v):.2f}), vs PyTorch",
             [ratio_of(ms(c, "torch dense"), ms(c, "SACT compiled", target)) for c in cells])
    line("SACT compiled, nothing halted, time ÷ compiled dense",
         [ratio_of(ms(c, "SACT compiled", 1.0), ms(c, "ponder compiled")) for c in cells])
    for target in targets:
        if target == 1:
            continue
        values = []
        for c in cells:
            r = _find(rows, c, "SACT compiled", target)
            dense = ms(c, "ponder compiled")
            values.append(None if r is None or dense is None else dense / r["ms"] / r["ratio"])
        line(f"speedup ÷ FLOPs ratio vs compiled dense, ratio {target:g}", values)
    return lines


def training_lines(rows):
    """One Markdown bullet per training row: images/s and the ratio to PyTorch's."""
    out = []
    for r in rows:
        if r["part"] == "training":
            vs = f", {r['vs_torch']:.2f}× PyTorch" if r.get("vs_torch") else ""
            out.append(f"- training {r['runner']}, {r['threads']} thread{'s' if r['threads'] > 1 else ''}: "
                       f"{r['images_per_s']:.1f} images/s{vs}")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="a file written by python -m fastpath.bench --networks --json")
    args = parser.parse_args(argv)
    try:
        with open(args.json) as f:
            data = json.load(f)
        rows = data["rows"]
    except (OSError, ValueError, KeyError) as exc:
        parser.error(f"json must be a file written by `python -m fastpath.bench --networks --json`: {exc}")
    print("\n".join(inference_table(rows)))
    print()
    print("\n".join(training_lines(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
