"""Optional wall-clock accounting of the phases of fast operations, for ``fastpath.bench --breakdown``.

A fast operation wraps each phase in :func:`section` (``"gather"``, ``"compute"``, ``"scatter"``,
``"other"``); nothing is recorded — and a section costs one global lookup — unless a caller is
inside :func:`recording`::

    with profiling.recording() as totals:
        network(x)
    totals  # {"gather": seconds, "compute": seconds, ...}

Sections do not nest: time inside an inner section is counted in the outer one as well, so a fast
operation marks only its innermost phases.
"""

from __future__ import annotations

import contextlib
import time

PHASES = ("gather", "compute", "scatter", "other")

_totals = None


@contextlib.contextmanager
def section(name):
    """Add the wall-clock time of the ``with`` body to phase ``name`` while :func:`recording`."""
    if _totals is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        _totals[name] = _totals.get(name, 0.0) + time.perf_counter() - start


def is_recording():
    """Whether a :func:`recording` is active (a fast operation may then wait for its device at a phase's end)."""
    return _totals is not None


@contextlib.contextmanager
def recording():
    """Record the sections run in the ``with`` body; yields the dict ``{phase: seconds}`` it fills."""
    global _totals
    if _totals is not None:
        raise RuntimeError("profiling.recording() is already active; it does not nest")
    _totals = {}
    try:
        yield _totals
    finally:
        _totals = None
