"""``ponder parity``: train an ACT RNN on the parity task with one objective and report ponder steps.

Examples::

    ponder parity --objective act --size 8 --steps 3000
    ponder parity --objective pact --temperature 0.5 --tau 0.001 --size 8 --out runs/parity-pact.json
    ponder parity --objective pondernet --beta 0.01 --prior-rate 0.2 --size 64 --steps 100000

After training it evaluates fresh examples with every halting rule that fits the objective
(``act`` for ACT; ``thresholded`` and ``sample`` for PACT and PonderNet) and prints the accuracy
and the mean ponder steps by the number of non-zero entries. ``--out`` writes the same as JSON.

``ponder train --task parity`` runs the same trainer (:func:`train_task_arguments`): the objective
by ``--objective``; ``--batch-size``, ``--lr``, ``--tau``, ``--seed`` as for ``ponder train``; the
other settings of this command through ``--option key=value`` (``size``, ``steps``, ``hidden``,
``max_steps``, ``temperature``, ``beta``, ``prior_rate``, ``halting_bias``, ``eval_size``,
``threads``); the results go to ``OUT/parity.json``::

    ponder train --task parity --objective pact --option size=8 --option steps=3000 --out runs/parity-pact
"""

from __future__ import annotations

import argparse
import json
import numbers
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from ..act_rnn import OBJECTIVES
from ..parity import evaluate_parity, train_parity


def add_arguments(parser):
    parser.add_argument("--objective", choices=OBJECTIVES, required=True,
                        help="act: Graves' N+R ponder cost; pact: relaxed probabilistic ACT; pondernet: PonderNet loss")
    parser.add_argument("--size", type=int, default=64, help="entries per parity vector (default 64, as the paper)")
    parser.add_argument("--steps", type=int, default=2000, help="training iterations (default 2000)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128, help="tanh units (default 128)")
    parser.add_argument("--max-steps", type=int, default=12, help="cap M on ponder steps per input (default 12)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--tau", type=float, default=1e-3, help="ponder penalty (act, pact)")
    parser.add_argument("--temperature", type=float, default=0.5, help="relaxed Bernoulli temperature (pact)")
    parser.add_argument("--beta", type=float, default=0.01, help="KL weight (pondernet)")
    parser.add_argument("--prior-rate", type=float, default=0.2, help="λ_p of the truncated geometric prior (pondernet)")
    parser.add_argument("--halting-bias", type=float, default=1.0, help="initial bias of the halting unit")
    parser.add_argument("--eval-size", type=int, default=2000, help="fresh examples for evaluation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1: the matrices are small)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")


# settings ``ponder train --task parity`` takes through --option, and the type each must have
TRAIN_TASK_OPTIONS = {"size": int, "steps": int, "hidden": int, "max_steps": int, "eval_size": int, "threads": int,
                      "temperature": float, "beta": float, "prior_rate": float, "halting_bias": float}


def train_task_arguments(objective, options, batch_size, lr, tau, seed, out):
    """The settings of this command for ``ponder train --task parity`` (defaults: this command's).

    Parameters
    ----------
    objective : "act", "pact" or "pondernet"
    options : dict, the ``--option`` values (keys of :data:`TRAIN_TASK_OPTIONS`)
    batch_size : int; lr, tau : float or None (None: this command's default); seed : int
    out : pathlib.Path, the run folder (the JSON goes to ``out / "parity.json"``)

    Returns
    -------
    argparse.Namespace for :func:`run`

    Raises
    ------
    ValueError
        an unknown option, or a value of the wrong type.
    """
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    if objective not in OBJECTIVES:
        raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)} for --task parity, got {objective!r}")
    args = parser.parse_args(["--objective", objective])
    for key, value in options.items():
        kind = TRAIN_TASK_OPTIONS.get(key)
        if kind is None:
            raise ValueError(f"--option {key} does not apply to --task parity; it takes {', '.join(TRAIN_TASK_OPTIONS)}")
        numeric = numbers.Integral if kind is int else numbers.Real
        if not isinstance(value, numeric) or isinstance(value, bool):
            raise ValueError(f"--option {key} must be {'an int' if kind is int else 'a number'} for --task parity, "
                             f"got {value!r}")
        setattr(args, key, kind(value))
    args.batch_size, args.seed = batch_size, seed
    if lr is not None:
        args.lr = lr
    if tau is not None:
        args.tau = tau
    args.out = str(Path(out) / "parity.json")
    return args


def run(args):
    for name in ("size", "steps", "batch_size", "hidden", "max_steps", "eval_size", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    with threadpool_limits(args.threads):
        rnn, log = train_parity(
            args.objective, size=args.size, steps=args.steps, batch_size=args.batch_size,
            hidden_size=args.hidden, max_steps=args.max_steps, lr=args.lr, tau=args.tau,
            temperature=args.temperature, beta=args.beta, prior_rate=args.prior_rate,
            halting_bias=args.halting_bias, rng=rng, log_every=max(1, args.steps // 10))
        seconds = time.perf_counter() - started
        rules = ["act"] if args.objective == "act" else ["thresholded", "sample"]
        reports = {rule: evaluate_parity(rnn, args.size, rule, args.eval_size, np.random.default_rng(args.seed + 1))
                   for rule in rules}
    print(f"parity size {args.size}, objective {args.objective}, {args.steps} steps in {seconds:.1f} s")
    for step, loss, ponder in zip(log.step, log.task_loss, log.ponder):
        print(f"  step {step:6d}  task loss {loss:.4f}  ponder {ponder:.2f}")
    for rule, report in reports.items():
        print(f"{rule:>12}: accuracy {report.accuracy:.3f}, mean ponder steps {report.mean_steps:.2f}")
        print("              steps by non-zero entries: "
              + ", ".join(f"{k}:{v:.2f}" for k, v in sorted(report.steps_by_nonzero.items())))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "settings": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"},
            "train_seconds": seconds,
            "log": log._asdict(),
            "evaluation": {rule: r._asdict() for rule, r in reports.items()},
        }
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
    return 0
