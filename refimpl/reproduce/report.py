"""The results section of docs/reproduce.md, written from the committed summaries (never by hand).

For every claim of :data:`~refimpl.reproduce.registry.CLAIMS`, in reading order: if
``<folder>/<claim>/<tier>/summary.json`` exists, its verdict and reason, a table of every number
(mean and 95 % interval over seeds), the figure, the command and the time the runs took; if not,
a plain sentence that the tier has not been run. Claims planned but not implemented are listed as
such.
"""

from __future__ import annotations

import json
from pathlib import Path

from .registry import CLAIMS, PLANNED

__all__ = ["read_summary", "results_markdown"]


def read_summary(folder, claim_name, tier):
    """The summary dict of ``claim_name`` at ``tier`` under ``folder``, or None when it was not run."""
    path = Path(folder) / claim_name / tier / "summary.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _cell(interval):
    if interval["low"] is None:
        return f"{interval['mean']:.4g}"
    return f"{interval['mean']:.4g} [{interval['low']:.4g}, {interval['high']:.4g}]"


def _claim_section(claim, summary, tier, figure_prefix):
    lines = [f"### {claim.name}: {claim.title}", "", f"*Statement.* {claim.statement}", "",
             f"*Source.* {claim.source}", ""]
    if summary is None:
        lines += [f"**{tier} tier not yet run.** No numbers are shown until `ponder reproduce {claim.name} "
                  f"--tier {tier}` has been run and its JSON committed.", ""]
        return lines
    verdict = summary["verdict"]
    seconds = summary.get("total_run_seconds", 0.0)
    machines = summary.get("run_machines")
    if machines:
        where = ", ".join(f"{count} on {name}" for name, count in machines.items())
    else:  # summaries written before run_machines: the machine that summarised them
        machine = summary.get("environment", {})
        where = f"{machine.get('processor') or machine.get('machine', '?')}, {machine.get('cpu_count', '?')} CPUs"
    lines += [f"**Verdict: {verdict['verdict']}.** {verdict['reason']}", "",
              f"Command: `ponder reproduce {claim.name} --tier {tier} --seeds {summary['seeds']} --out OUT`; "
              f"the runs took {seconds / 60:.1f} min of run time in all ({where}). "
              f"Intervals: {summary['interval']}.", ""]
    for name, entry in summary["settings"].items():
        backends = ", ".join(entry.get("backends", []))
        lines += [f"Setting `{name}` (backend {backends}; seeds {entry['seeds']}):", "",
                  "| number | mean [95 % interval] |", "|---|---|"]
        lines += [f"| {metric} | {_cell(interval)} |" for metric, interval in entry["numbers"].items()]
        lines.append("")
    if summary.get("figure"):
        lines += [f"![{claim.name}, {tier} tier]({figure_prefix}/{claim.name}/{tier}/{summary['figure']})", ""]
    return lines


def results_markdown(folder, tier="medium", figure_prefix="/_static/reproduce"):
    """Markdown of the results of ``tier`` for every claim, from the summaries under ``folder``.

    Parameters
    ----------
    folder : the ``--out`` folder of the committed runs
    tier : the tier to report
    figure_prefix : how the page reaches ``folder`` (a path from the docs' source root)
    """
    lines = []
    for claim in CLAIMS.values():
        lines += _claim_section(claim, read_summary(folder, claim.name, tier), tier, figure_prefix)
    for name, statement in PLANNED.items():
        lines += [f"### {name}: not implemented yet", "", f"*Claim.* {statement}.", "",
                  "`ponder reproduce` does not test this claim yet; asking for it is an error.", ""]
    return "\n".join(lines).rstrip() + "\n"
