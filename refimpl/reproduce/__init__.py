"""Reproducing the thesis's claims with several seeds, intervals and a verdict (``ponder reproduce``).

* :mod:`.claim` — what a claim is (:class:`~.claim.Claim`: statement, settings per tier, run,
  verdict, figure) and the tiers;
* :mod:`.intervals` — the mean over seeds and its 95 % t-interval;
* :mod:`.runner` — running a claim resumably, one JSON file per (setting, seed), and the summary;
* :mod:`.registry` — the claims implemented and those planned;
* ``claim_*`` — one module per claim (:mod:`.claim_sanity`, :mod:`.claim_speedup` (C2),
  :mod:`.claim_masks` (C3), :mod:`.claim_acceleration` (C4),
  :mod:`.claim_flops` (C6), :mod:`.claim_maps` (C7), :mod:`.claim_pact` (C8, C9),
  :mod:`.claim_parity`), each reusing the library;
* :mod:`.report` — the results section of the docs, from committed summaries.

Example::

    from refimpl.reproduce import get_claim, run_claim
    summary = run_claim(get_claim("C3"), "small", seeds=2, out="runs/reproduce")
    summary["verdict"]
"""

from .claim import MIN_SEEDS, TIERS, Claim, Verdict
from .intervals import mean_interval, paired_difference
from .registry import CLAIMS, PLANNED, claim_names, get_claim
from .runner import ReproductionError, run_claim

__all__ = ["CLAIMS", "PLANNED", "TIERS", "MIN_SEEDS", "Claim", "Verdict", "ReproductionError", "claim_names",
           "get_claim", "mean_interval", "paired_difference", "run_claim"]
