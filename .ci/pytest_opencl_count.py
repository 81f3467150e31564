"""pytest plugin for CI: count the OpenCL tests that actually ran (not skipped).

Loaded by ``.ci/run`` through ``PYTEST_ADDOPTS=-p pytest_opencl_count`` so that the README's test
command runs verbatim. Writes the counts to the file named by ``PONDER_OPENCL_COUNT`` (if set) and
prints them at the end of the run.
"""

import os

_counts = {"collected": 0, "executed": 0, "passed": 0, "failed": 0, "skipped": 0}
_opencl_ids = set()  # node ids of tests marked opencl (keywords would also match ids like "backend=opencl")


def pytest_collection_modifyitems(items):
    _opencl_ids.update(item.nodeid for item in items if item.get_closest_marker("opencl"))
    _counts["collected"] = len(_opencl_ids)


def pytest_runtest_logreport(report):
    if report.nodeid not in _opencl_ids:
        return
    if report.skipped and report.when in ("setup", "call"):
        _counts["skipped"] += 1
    elif report.when == "call":
        _counts["executed"] += 1
        _counts["passed" if report.passed else "failed"] += 1


def pytest_terminal_summary(terminalreporter):
    line = ("OpenCL tests: {collected} collected, {executed} executed "
            "({passed} passed, {failed} failed), {skipped} skipped").format(**_counts)
    terminalreporter.write_sep("=", line)
    path = os.environ.get("PONDER_OPENCL_COUNT")
    if path:
        with open(path, "w") as f:
            f.write("{collected} {executed}\n".format(**_counts))
