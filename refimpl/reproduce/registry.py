"""Every claim ``ponder reproduce`` knows: those implemented, and those planned but not yet written.

The order is the reading order of the results page (docs/reproduce.md): the sanity check first,
then the claims in the thesis's order.
"""

from __future__ import annotations

from .claim_acceleration import CLAIM as ACCELERATION
from .claim_collapse import CLAIM as COLLAPSE
from .claim_flops import CLAIM as FLOPS
from .claim_maps import CLAIM as MAPS
from .claim_masks import CLAIM as MASKS
from .claim_pact import C8, C9
from .claim_parity import CLAIM as PARITY
from .claim_sanity import CLAIM as SANITY
from .claim_speedup import CLAIM as SPEEDUP

__all__ = ["CLAIMS", "PLANNED", "claim_names", "get_claim"]

#: name -> Claim, in reading order.
CLAIMS = {c.name: c for c in (SANITY, SPEEDUP, MASKS, ACCELERATION, FLOPS, MAPS, C8, C9, PARITY, COLLAPSE)}

#: Claims of the thesis that ``ponder reproduce`` will test but does not yet: name -> statement.
PLANNED = {}


def claim_names():
    """Every claim name, implemented or planned, in reading order (planned ones last)."""
    return list(CLAIMS) + [name for name in PLANNED if name not in CLAIMS]


def get_claim(name):
    """The :class:`~refimpl.reproduce.claim.Claim` called ``name``.

    Raises
    ------
    NotImplementedError
        For a planned claim not written yet (the message says which claims run).
    ValueError
        For an unknown name (the message lists the known ones).
    """
    if name in CLAIMS:
        return CLAIMS[name]
    if name in PLANNED:
        raise NotImplementedError(f"claim {name} ({PLANNED[name]}) is not implemented yet; implemented: "
                                  f"{', '.join(CLAIMS)}")
    raise ValueError(f"claim must be one of {claim_names()}, got {name!r}")
