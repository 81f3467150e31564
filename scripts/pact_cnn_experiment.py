"""The PACT experiments of docs/spec.md §9.8 at small scale, on the offline digits data (16×16 by default).

1. Cross-mode compatibility: train PACT-ResNets in relaxed mode and evaluate the same parameters
   in relaxed, discrete and thresholded mode at several points of training (loss, accuracy, FLOPs).
2. REINFORCE vs relaxation as the number of latents grows: discrete (REINFORCE) and relaxed
   training with one latent per block (3 per image), one per g×g group of positions
   (``--group-sizes``, default 4 and 2: 4² + 2² + 1 = 21 and 8² + 4² + 2² = 84 per image at
   16×16) and one per position (16² + 8² + 4² = 336 per image at 16×16).
3. Relaxed PACT vs SACT at the same τ: accuracy and FLOPs.

Every model is a ResNet-20-style network (3 units per stage, widths 8/16/32), Adam, the same seed.
Small by default (6 epochs per model, a quarter of an hour on one core); ``PONDER_FULL=1`` or
``--full`` trains 30 epochs on 32×32 digits. Writes JSON with every number::

    python scripts/pact_cnn_experiment.py --out runs/pact_cnn
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from refimpl.datasets import load_dataset
from refimpl.models import build_model
from refimpl.optim import Adam
from refimpl.training import evaluate, fit

def make_runs(group_sizes):
    """(name, model, options) of every run: PACT relaxed / REINFORCE by latents (few → many), then SACT."""
    latents = [("per-block", {"latents": "per-block"})]
    latents += [(f"{g}x{g} groups", {"latents": "group", "group_size": g}) for g in group_sizes]
    latents += [("per-position", {"latents": "per-position"})]
    runs = []
    for label, options in latents:
        runs.append((f"pact relaxed {label}", "pact-resnet20", {"mode": "relaxed", **options}))
        runs.append((f"pact REINFORCE {label}", "pact-resnet20", {"mode": "discrete", **options}))
    return runs + [("sact", "sact-resnet20", {})]


RUNS = make_runs((4, 2))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--scale", type=int, default=None, help="digit upscaling: 2 → 16×16, 4 → 32×32")
    parser.add_argument("--tau", type=float, default=0.05)
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=2, help="cross-mode evaluation every this many epochs")
    parser.add_argument("--group-sizes", type=int, nargs="*", default=[4, 2],
                        help="g of the g×g-group runs (default 4 2; none: no group runs)")
    parser.add_argument("--runs", nargs="+", default=None, help="subset of run names (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/pact_cnn")
    args = parser.parse_args(argv)
    full = args.full or os.environ.get("PONDER_FULL") == "1"
    epochs = args.epochs or (30 if full else 6)
    scale = args.scale or (4 if full else 2)
    splits, info = load_dataset("digits", seed=args.seed, scale=scale)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"settings": {**vars(args), "epochs": epochs, "scale": scale, "image_hw": info["image_hw"]}}
    runs = make_runs(args.group_sizes)
    unknown = set(args.runs or ()) - {name for name, _, _ in runs}
    if unknown:
        parser.error(f"unknown runs {sorted(unknown)}; the runs are {[name for name, _, _ in runs]}")
    with threadpool_limits(1):
        for name, model_name, options in runs:
            if args.runs and name not in args.runs:
                continue
            rng = np.random.default_rng(args.seed)
            extra = {"temperature": args.temperature} if model_name.startswith("pact") else {}
            net = build_model(model_name, info["num_classes"], info["in_channels"], rng, widths=[8, 16, 32],
                              tau=args.tau, **options, **extra)
            optimiser = Adam(net.named_parameters(), lr=args.lr)
            record = {"model": model_name, "options": options, "checkpoints": []}
            if model_name.startswith("pact"):
                record["latents_per_image"] = net.latent_count(info["image_hw"])
                print(f"{name}: {record['latents_per_image']} halting latents per image", flush=True)
            started = time.perf_counter()
            for epoch in range(args.eval_every, epochs + 1, args.eval_every):
                fit(net, optimiser, splits["train"], epochs=args.eval_every, batch_size=64, rng=rng, progress=False)
                record["checkpoints"].append({"epoch": epoch, "evaluation": _evaluate(net, splits["test"], options, model_name)})
                _print(name, epoch, record["checkpoints"][-1]["evaluation"])
            record["train_seconds"] = time.perf_counter() - started
            results[name] = record
            (out / "pact_cnn.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out / 'pact_cnn.json'}")


def _evaluate(net, split, options, model_name):
    """Test loss / accuracy / FLOPs in every mode the model has (PACT: relaxed, discrete, thresholded)."""
    is_pact = model_name.startswith("pact")
    modes = ["relaxed", "discrete", "thresholded"] if is_pact else [None]
    out = {}
    for mode in modes:
        if mode is not None:
            net.set_mode(mode)
        r = evaluate(net, split)
        out[mode or "act"] = {"loss": r["loss"], "accuracy": r["accuracy"], "mflops": r["flops_per_image"] / 1e6,
                              "mflops_std": r["flops_std"] / 1e6}
    if is_pact:
        net.set_mode(options["mode"])
    return out


def _print(name, epoch, evaluation):
    cells = "  ".join(f"{mode}: acc {e['accuracy']:.3f} loss {e['loss']:.3f} {e['mflops']:.2f} MFLOPs"
                      for mode, e in evaluation.items())
    print(f"{name:<28} epoch {epoch:3d}  {cells}", flush=True)


if __name__ == "__main__":
    main()
