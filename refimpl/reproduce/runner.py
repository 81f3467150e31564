"""Running a claim: one JSON file per (setting, seed), resumable; the summary and figure from them.

Layout under ``out``::

    out/<claim>/<tier>/seed_runs/<setting>-seed<k>.json   one finished run each (written atomically)
    out/<claim>/<tier>/summary.json                   every setting's numbers over seeds + the verdict
    out/<claim>/<tier>/<claim>.png                    the claim's figure

A run whose file exists, with the same claim, tier, setting and seed, is not run again: an
interrupted reproduction picks up where it stopped, and more seeds can be added later. The
summary is always recomputed from the run files of the seeds asked for. A run file whose settings
differ from the current ones (the tier's definition changed since) is an error, not silently
mixed in.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from threadpoolctl import threadpool_limits

from .claim import MIN_SEEDS, setting_names
from .common import compiled_threads
from .intervals import INTERVAL_METHOD, mean_interval

__all__ = ["RUN_FORMAT", "SUMMARY_FORMAT", "ReproductionError", "run_path", "run_claim", "aggregate",
           "environment", "write_json_atomically"]

RUN_FORMAT = "ponder-reproduce-run"
#: The run files' folder (not ``runs/``, the name users give their output folders and git ignores).
RUNS_FOLDER = "seed_runs"
#: BLAS and compiled-kernel threads of a run unless its setting says ``"threads"``: one, because on
#: a shared machine a multi-threaded BLAS waits for preempted threads (a small convolution ran 6x
#: slower with 2), and runs made side by side (``--jobs``) each get a core.
DEFAULT_THREADS = 1
SUMMARY_FORMAT = "ponder-reproduce-summary"


class ReproductionError(ValueError):
    """A reproduction cannot go on as asked (bad arguments, or run files from other settings)."""


def claim_folder(out, claim_name, tier):
    return Path(out) / claim_name / tier


def run_path(out, claim_name, tier, setting_name, seed):
    """Where the run of ``(setting_name, seed)`` is written."""
    return claim_folder(out, claim_name, tier) / RUNS_FOLDER / f"{setting_name}-seed{seed}.json"


def write_json_atomically(path, data):
    """Write ``data`` as JSON to ``path`` through a temporary file in the same folder, then rename.

    A reader (or a resumed run) sees either the old file or the whole new one, never half of it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; results are for sharing
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _versions():
    import matplotlib
    import numpy
    import scipy

    from .. import __version__

    return {"ponder": __version__, "python": sys.version.split()[0], "numpy": numpy.__version__,
            "scipy": scipy.__version__, "matplotlib": matplotlib.__version__}


def environment():
    """Package versions, machine, CPU count and the BLAS libraries loaded (from threadpoolctl)."""
    from threadpoolctl import threadpool_info

    blas = [{k: lib.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
            for lib in threadpool_info() if lib.get("user_api") == "blas"]
    return {"versions": _versions(), "machine": platform.machine(), "processor": platform.processor(),
            "system": platform.system(), "cpu_count": os.cpu_count(), "blas": blas}


def _read_run(path, claim, tier, setting, seed):
    """The finished run at ``path`` if it is one of these settings; raises if it is another's."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ReproductionError(f"run file {path} cannot be read ({exc}); delete it to run it again") from None
    expected = {"format": RUN_FORMAT, "claim": claim.name, "tier": tier, "seed": seed, "settings": setting}
    found = {key: record.get(key) for key in expected}
    if found != expected:
        differing = sorted(k for k in expected if found[k] != expected[k])
        raise ReproductionError(f"run file {path} was written with other {', '.join(differing)} than this "
                                f"reproduction's; delete it (or choose another --out) to run it again")
    return record


def _check_seeds(claim, tier, seeds):
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise ReproductionError(f"seeds must be an integer >= 1, got {seeds!r}")
    if seeds < MIN_SEEDS[tier]:
        raise ReproductionError(f"the {tier} tier needs at least {MIN_SEEDS[tier]} seeds (it reports intervals "
                                f"over seeds), got --seeds {seeds}")


def _run_one(claim, tier, setting, seed, out, echo):
    """Run ``(setting, seed)`` of ``claim`` and write its run file; returns the record."""
    t0 = time.perf_counter()
    threads = setting.get("threads", DEFAULT_THREADS)
    with threadpool_limits(threads), compiled_threads(threads):
        result = claim.run(setting, seed, echo)
    seconds = time.perf_counter() - t0
    record = {"format": RUN_FORMAT, "claim": claim.name, "tier": tier, "setting_name": setting["name"],
              "settings": setting, "seed": seed, "numbers": result["numbers"],
              "details": result.get("details", {}), "backend": result.get("backend"),
              "blas_threads": threads, "compiled_threads": threads,
              "seconds": seconds, "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "environment": environment()}
    write_json_atomically(run_path(out, claim.name, tier, setting["name"], seed), record)
    return record


def _run_in_worker(claim_name, tier, setting, seed, out):
    """:func:`_run_one` in a worker process (``jobs > 1``): the claim is looked up by name there."""
    from .registry import get_claim

    label = f"    [{claim_name} {setting['name']} seed {seed}]"
    return _run_one(get_claim(claim_name), tier, setting, seed, out, lambda line: print(label, line, flush=True))


def _check_jobs(jobs):
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ReproductionError(f"jobs must be an integer >= 1, got {jobs!r}")


def run_claim(claim, tier, seeds, out, echo=print, jobs=1):
    """Run every (setting, seed) of ``claim`` at ``tier`` not already in ``out``, then summarise.

    Parameters
    ----------
    claim : refimpl.reproduce.claim.Claim
    tier : "small", "medium" or "full"
    seeds : int — seeds 0 .. seeds-1 are run
    out : folder (created)
    echo : callable(str) for progress lines
    jobs : int — runs made at the same time, each in its own process (default 1: in this process,
        one after another). Each run still limits BLAS to its setting's threads, so ``jobs`` up to
        the number of cores keeps every core busy without oversubscribing it. Runs are seeded, so
        the numbers do not depend on ``jobs``; run times measured side by side do.

    Returns
    -------
    dict — the summary written to ``summary.json`` (with ``ran`` and ``skipped``: the runs done now
    and those found finished)
    """
    settings = claim.settings(tier)
    _check_seeds(claim, tier, seeds)
    _check_jobs(jobs)
    setting_names(settings)
    total = len(settings) * seeds
    records, ran, skipped, pending = {}, [], [], []
    started = time.perf_counter()
    for index, (setting, seed) in enumerate(((s, k) for s in settings for k in range(seeds)), start=1):
        path = run_path(out, claim.name, tier, setting["name"], seed)
        label = f"[{index}/{total}] {claim.name} {tier} {setting['name']} seed {seed}"
        if path.exists():
            records[setting["name"], seed] = _read_run(path, claim, tier, setting, seed)
            skipped.append(str(path))
            echo(f"{label}: finished before, skipped ({path})")
        else:
            pending.append((label, setting, seed, path))

    def finished(label, setting, seed, path, record):
        records[setting["name"], seed] = record
        ran.append(str(path))
        echo(f"{label}: done in {record['seconds']:.1f} s ({path})")

    if jobs == 1 or len(pending) <= 1:
        for label, setting, seed, path in pending:
            echo(f"{label}: running")
            finished(label, setting, seed, path, _run_one(claim, tier, setting, seed, out, echo))
    else:
        _run_in_processes(claim, tier, out, pending, min(jobs, len(pending)), echo, finished)
    summary = aggregate(claim, tier, settings, seeds, records)
    summary.update(ran=ran, skipped=skipped, seconds_this_call=time.perf_counter() - started)
    folder = claim_folder(out, claim.name, tier)
    figure = folder / f"{claim.name}.png"
    claim.plot(summary, figure)
    summary["figure"] = figure.name
    write_json_atomically(folder / "summary.json", summary)
    echo(format_summary(summary))
    echo(f"wrote {folder / 'summary.json'} and {figure}")
    return summary


def _run_in_processes(claim, tier, out, pending, workers, echo, finished):
    """Run ``pending`` runs in ``workers`` processes; each finished run is reported as it ends.

    Processes are started with ``spawn`` (a fresh interpreter, no BLAS thread pool or OpenMP state
    inherited through ``fork``). If a run fails, the runs not yet started are cancelled, those
    running finish and keep their files, and the first error is raised.
    """
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    echo(f"{len(pending)} run(s) in {workers} processes")
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {}
        for label, setting, seed, path in pending:
            echo(f"{label}: queued")
            futures[pool.submit(_run_in_worker, claim.name, tier, setting, seed, str(out))] = (label, setting,
                                                                                            seed, path)
        remaining = set(futures)
        while remaining:
            done, remaining = wait(remaining, return_when=FIRST_COMPLETED)
            for future in done:
                if future.exception() is not None:
                    for other in remaining:
                        other.cancel()
                    raise future.exception()
                finished(*futures[future], future.result())


def run_machines(records):
    """``{machine description: number of runs}`` over run records (a tier may be made on several machines)."""
    counts = {}
    for record in records:
        machine = record.get("environment", {})
        where = f"{machine.get('processor') or machine.get('machine', '?')} with {machine.get('cpu_count', '?')} CPUs"
        counts[where] = counts.get(where, 0) + 1
    return dict(sorted(counts.items()))


def aggregate(claim, tier, settings, seeds, records):
    """The summary of ``records`` (``{(setting name, seed): run record}``): intervals and the verdict."""
    per_setting = {}
    for setting in settings:
        runs = [records[setting["name"], k] for k in range(seeds)]
        # a number every run has (e.g. ponder steps at a count of non-zeros that every seed drew)
        metrics = [m for m in runs[0]["numbers"] if all(m in r["numbers"] for r in runs)]
        per_setting[setting["name"]] = {
            "settings": setting, "seeds": list(range(seeds)),
            "numbers": {m: mean_interval([r["numbers"][m] for r in runs]) for m in metrics},
            "backends": sorted({str(r.get("backend")) for r in runs}),
            "run_seconds": [r["seconds"] for r in runs],
        }
    summary = {"format": SUMMARY_FORMAT, "claim": claim.name, "title": claim.title, "statement": claim.statement,
               "source": claim.source, "tier": tier, "seeds": seeds, "interval": INTERVAL_METHOD,
               "settings": per_setting,
               "total_run_seconds": sum(sum(s["run_seconds"]) for s in per_setting.values()),
               "run_machines": run_machines(records.values()),
               "environment": environment()}
    if tier == "small":
        summary["note"] = "small tier: a smoke run of the pipeline; its numbers and verdict mean nothing"
    summary["verdict"] = claim.verdict(summary).to_dict()
    return summary


def _fmt(interval):
    if interval["low"] is None:
        return f"{interval['mean']:.4g}"
    return f"{interval['mean']:.4g} [{interval['low']:.4g}, {interval['high']:.4g}]"


def format_summary(summary):
    """The summary as text: per setting, each number's mean [95 % interval]; then the verdict."""
    lines = [f"{summary['claim']} ({summary['tier']} tier, {summary['seeds']} seed(s)): {summary['title']}",
             f"  interval: {summary['interval']}"]
    for name, entry in summary["settings"].items():
        lines.append(f"  {name}:")
        for metric, interval in entry["numbers"].items():
            lines.append(f"    {metric:36s} {_fmt(interval)}")
    verdict = summary["verdict"]
    lines.append(f"  verdict: {verdict['verdict']} — {verdict['reason']}")
    if "note" in summary:
        lines.append(f"  ({summary['note']})")
    return "\n".join(lines)
