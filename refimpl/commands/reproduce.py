"""``ponder reproduce``: run one claim of the thesis with several seeds; intervals, a verdict and a figure.

Examples::

    ponder reproduce --list
    ponder reproduce C3 --tier small --out runs/reproduce
    ponder reproduce parity --tier medium --seeds 3 --out runs/reproduce
    ponder reproduce C6 --tier medium --jobs 2 --out runs/reproduce   # two runs at a time

Each (setting, seed) run is written as one JSON file under ``OUT/CLAIM/TIER/seed_runs/``; a run whose
file exists is not run again, so an interrupted command resumes, and ``--seeds`` can be raised
later. The summary (mean and 95 % t-interval over seeds of every number, and the verdict with its
reason) goes to ``OUT/CLAIM/TIER/summary.json`` and the figure to ``OUT/CLAIM/TIER/CLAIM.png``.

Tiers: ``small`` is a smoke run of seconds (its verdict means nothing); ``medium`` runs in under an
hour on 2 cores with at least 3 seeds; ``full`` needs a bigger machine. The library behind it is
:mod:`refimpl.reproduce`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .arguments import UsageError, positive_int

HELP = "reproduce a claim of the thesis over several seeds: intervals, verdict, figure (resumable)"


def claim_name(text):
    """Argument type: an implemented claim (a planned or unknown one is refused, saying which run)."""
    from ..reproduce import get_claim

    try:
        get_claim(text)
    except NotImplementedError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("claim must be", "must be")) from None
    return text


def add_arguments(parser):
    from ..reproduce import TIERS

    parser.add_argument("claim", nargs="?", type=claim_name, metavar="CLAIM",
                        help="the claim to reproduce (see --list)")
    parser.add_argument("--tier", choices=TIERS, default="small",
                        help="small: seconds, checks the pipeline; medium: < 1 hour on 2 cores, >= 3 seeds; "
                             "full: a bigger machine")
    parser.add_argument("--seeds", type=positive_int, default=None,
                        help="run seeds 0 .. SEEDS-1 (default: the claim's default for the tier)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (created; finished runs are kept)")
    parser.add_argument("--jobs", type=positive_int, default=1,
                        help="runs made at the same time, each in its own process with one BLAS thread "
                             "(default 1; up to the number of cores)")
    parser.add_argument("--list", action="store_true", help="list the claims, implemented and planned, and stop")


def list_claims():
    from ..reproduce import CLAIMS, PLANNED

    lines = ["implemented:"]
    lines += [f"  {name:8s} {claim.title}" for name, claim in CLAIMS.items()]
    lines.append("not implemented yet:" + ("" if PLANNED else " none"))
    lines += [f"  {name:8s} {statement}" for name, statement in PLANNED.items()]
    return "\n".join(lines)


def run(args):
    from ..reproduce import MIN_SEEDS, ReproductionError, get_claim, run_claim

    if args.list:
        print(list_claims())
        return 0
    if args.claim is None:
        raise UsageError("CLAIM is required (ponder reproduce --list shows the claims)")
    if args.out is None:
        raise UsageError("--out is required: the folder for the runs' JSON, the summary and the figure")
    claim = get_claim(args.claim)
    seeds = args.seeds if args.seeds is not None else claim.default_seeds[args.tier]
    if seeds < MIN_SEEDS[args.tier]:
        raise UsageError(f"argument --seeds: the {args.tier} tier needs at least {MIN_SEEDS[args.tier]} seeds "
                         f"(it reports intervals over seeds), got {seeds}")
    print(f"ponder reproduce {claim.name} ({claim.title}), {args.tier} tier, seeds 0..{seeds - 1}, out {args.out}",
          flush=True)
    try:
        summary = run_claim(claim, args.tier, seeds, args.out, echo=lambda line: print(line, flush=True),
                            jobs=args.jobs)
    except ReproductionError as exc:
        raise UsageError(str(exc)) from None
    print(f"{len(summary['ran'])} run(s) now, {len(summary['skipped'])} finished before; "
          f"{summary['seconds_this_call']:.1f} s")
    return 0
