"""Shared test configuration: Hypothesis profiles chosen by ``HYPOTHESIS_PROFILE``, and one skip
line per unusable backend in pytest's summary.

* ``dev`` (default): quick, for the edit-test loop;
* ``ci``: what CI runs (more examples, no deadline: the CI machine is shared and noisy);
* ``thorough``: many examples, for before a release or after touching a kernel.
"""

import functools
import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=25, deadline=None)
settings.register_profile("ci", max_examples=60, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


# ---------------------------------------------------------------------------------------------
# One skip line per missing backend
# ---------------------------------------------------------------------------------------------
# Every test of an unusable backend is skipped with that backend's reason (a long message with the
# fix). Reported as it is, pytest's summary would repeat it once per test function; rewriting the
# location of those skips to this file makes pytest fold them into one line per backend, with the
# number of tests it skipped.

@functools.cache
def _unusable_backends():
    """``{name: reason}`` of the fast backends that cannot run here."""
    try:
        import fastpath
    except ImportError as exc:  # the package itself is broken: every fast backend is missing
        return {"fastpath": str(exc)}
    return {name: status.reason for name, status in fastpath.available_backends().items() if not status.usable}


def _missing_backend(reason):
    """The unusable backend a skip reason is about, or ``None``."""
    text = reason.lower()
    for name, why in _unusable_backends().items():
        if why in reason or f"{name} backend" in text or (name == "opencl" and ("opencl" in text or "pyopencl" in text)):
            return name
    return None


def _summarise(report):
    if report.skipped and isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
        name = _missing_backend(str(report.longrepr[2]))
        if name is not None:
            why = " ".join(_unusable_backends()[name].split())
            report.longrepr = (__file__, None, f"{name} backend unavailable here, its tests skipped: {why}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _summarise(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _summarise(outcome.get_result())
