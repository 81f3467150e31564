"""What a reproducible claim is: its statement, settings per tier, and the functions that test it.

A :class:`Claim` is run as *(setting, seed)* pairs. Each pair is one call of ``claim.run``, which
trains or measures something and returns its numbers; :mod:`refimpl.reproduce.runner` stores each
result as one JSON file, aggregates the numbers over seeds (mean and 95 % t-interval,
:mod:`refimpl.reproduce.intervals`) and asks ``claim.verdict`` what they say.

Tiers (:data:`TIERS`):

* ``small`` — a smoke run of seconds that only shows the pipeline works; its verdict means nothing;
* ``medium`` — under an hour on 2 CPU cores, at least 3 seeds; the tier whose results are committed;
* ``full`` — settings closer to the papers', for a bigger machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

__all__ = ["TIERS", "MIN_SEEDS", "VERDICTS", "Claim", "Verdict", "setting_names"]

TIERS = ("small", "medium", "full")
#: The least number of seeds a tier may be run with (the medium and full tiers report intervals).
MIN_SEEDS = {"small": 1, "medium": 3, "full": 3}
VERDICTS = ("reproduced", "partly", "not reproduced")


@dataclass(frozen=True)
class Verdict:
    """What the aggregated numbers say about a claim, and why (the reason quotes the numbers)."""

    verdict: str
    reason: str
    comparisons: dict = field(default_factory=dict)  # name -> mean_interval dict behind the verdict

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {list(VERDICTS)}, got {self.verdict!r}")

    def to_dict(self):
        return {"verdict": self.verdict, "reason": self.reason, "comparisons": self.comparisons}


@dataclass(frozen=True)
class Claim:
    """One claim of the thesis and how to test it.

    Attributes
    ----------
    name : short identifier used on the command line (``"sanity"``, ``"C3"``...)
    title : a few words
    statement : what the thesis says, in one or two sentences
    source : where (paper and section)
    tiers : ``{tier: [setting, ...]}``; a setting is a JSON dict with a unique ``"name"``
    default_seeds : ``{tier: number of seeds when --seeds is not given}``
    run : ``run(setting, seed, echo)`` returns a dict: ``numbers`` (name → float), ``details``
        (any JSON) and ``backend`` (a name); every random draw comes from generators seeded with ``seed``
    verdict : ``verdict(summary)`` → :class:`Verdict`, from the aggregated numbers
    plot : ``plot(summary, path)`` writes the claim's figure (intervals shown)
    """

    name: str
    title: str
    statement: str
    source: str
    tiers: dict
    default_seeds: dict
    run: Callable
    verdict: Callable
    plot: Callable

    def settings(self, tier):
        """The settings of ``tier``, a list of dicts."""
        if tier not in TIERS:
            raise ValueError(f"tier must be one of {list(TIERS)}, got {tier!r}")
        return self.tiers[tier]


def setting_names(settings):
    """The names of ``settings``, checked unique (they name the run files)."""
    names = [s["name"] for s in settings]
    if len(set(names)) != len(names):
        raise ValueError(f"setting names must be unique, got {names}")
    return names
