"""The parity experiment of docs/spec.md §10.4: parity with ACT, relaxed PACT and PonderNet on one RNN cell.

Trains the same cell (128 tanh units) with each objective on parity vectors of ``--size``
entries, then measures accuracy and the mean number of ponder steps as a function of the number
of non-zero entries, with each objective's test-time halting rule (ACT: Graves' rule; PACT and
PonderNet: the threshold h > 1/2, and sampling). Graves (2016, Fig. 5) reports that with ACT the
ponder time grows with the number of non-zero entries on 64-entry vectors.

Small by default (size 8, 4000 iterations per objective: a few minutes on one core);
``PONDER_FULL=1`` or ``--full`` uses 64 entries and 60000 iterations (hours). Writes a JSON with
every number and a PNG of steps vs non-zero entries::

    python scripts/parity_experiment.py --out runs/parity
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from refimpl.parity import evaluate_parity, train_parity

SMALL = {"size": 8, "steps": 4000}
FULL = {"size": 64, "steps": 60000}
RULES = {"act": ["act"], "pact": ["thresholded", "sample"], "pondernet": ["thresholded", "sample"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="64 entries, 60000 iterations (also PONDER_FULL=1)")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--objectives", nargs="+", default=list(RULES), choices=list(RULES))
    parser.add_argument("--tau", type=float, default=1e-3, help="ponder penalty of ACT and PACT")
    parser.add_argument("--beta", type=float, default=0.01, help="PonderNet's KL weight")
    parser.add_argument("--prior-rate", type=float, default=0.2, help="PonderNet's λ_p")
    parser.add_argument("--temperature", type=float, default=0.5, help="PACT's relaxed-Bernoulli temperature")
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--halting-bias", type=float, default=1.0, help="initial halting-unit bias (all objectives)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/parity")
    args = parser.parse_args(argv)
    settings = dict(FULL if args.full or os.environ.get("PONDER_FULL") == "1" else SMALL)
    settings.update({k: v for k, v in (("size", args.size), ("steps", args.steps)) if v is not None})

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"settings": {**settings, **{k: v for k, v in vars(args).items() if k not in ("size", "steps")}}}
    with threadpool_limits(1):  # the matrices are small: threads only add contention
        for objective in args.objectives:
            started = time.perf_counter()
            rnn, log = train_parity(objective, size=settings["size"], steps=settings["steps"], max_steps=args.max_steps,
                                    lr=args.lr, tau=args.tau, temperature=args.temperature, beta=args.beta,
                                    prior_rate=args.prior_rate, halting_bias=args.halting_bias,
                                    rng=np.random.default_rng(args.seed),
                                    log_every=max(1, settings["steps"] // 10))
            seconds = time.perf_counter() - started
            evaluation = {rule: evaluate_parity(rnn, settings["size"], rule, 4000, np.random.default_rng(args.seed + 1))
                          for rule in RULES[objective]}
            results[objective] = {"train_seconds": seconds, "log": log._asdict(),
                                  "evaluation": {r: e._asdict() for r, e in evaluation.items()}}
            for rule, e in evaluation.items():
                slope = _slope(e.steps_by_nonzero)
                print(f"{objective:>9} / {rule:<11} accuracy {e.accuracy:.3f}  mean steps {e.mean_steps:.2f}  "
                      f"steps-vs-k slope {slope:+.3f}  ({seconds:.0f} s training)")
                print("            steps by k: " + " ".join(f"{k}:{v:.2f}" for k, v in sorted(e.steps_by_nonzero.items())))
                results[objective]["evaluation"][rule]["slope"] = slope
    (out / "parity.json").write_text(json.dumps(results, indent=1))
    _plot(results, args.objectives, out / "parity_steps.png")
    print(f"wrote {out / 'parity.json'} and {out / 'parity_steps.png'}")


def _slope(steps_by_k):
    """Least-squares slope of mean ponder steps against the number of non-zero entries."""
    k = np.array(sorted(steps_by_k), dtype=float)
    return float(np.polyfit(k, [steps_by_k[int(v)] for v in k], 1)[0]) if len(k) > 1 else 0.0


def _plot(results, objectives, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for objective in objectives:
        for rule, e in results[objective]["evaluation"].items():
            k = sorted(int(v) for v in e["steps_by_nonzero"])
            ax.plot(k, [e["steps_by_nonzero"][v] for v in k], marker="o",
                    label=f"{objective} ({rule}), acc {e['accuracy']:.2f}")
    ax.set_xlabel("non-zero entries")
    ax.set_ylabel("mean ponder steps")
    ax.set_title(f"parity, {results['settings']['size']} entries")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
