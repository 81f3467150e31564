"""Source rules for the Cython kernels that no test on one machine can see fail.

The kernels (``fastpath/_cython_conv.pyx``, ``fastpath/_cython_unit.pyx``) are compiled with ``wraparound=False``: a negative index there is
undefined behaviour, not Python's "from the end". It worked on one machine and raised
``IndexError`` (index -18 of a 17-element array) on another, so the rule is checked in the source.
"""

import re
from pathlib import Path

import pytest

PYX_FILES = sorted((Path(__file__).resolve().parents[1] / "fastpath").glob("_cython_*.pyx"))
NEGATIVE_INDEX = re.compile(r"\[\s*-\s*\d")  # x[-1], x[ -2], x[-1:]


def negative_indices(source):
    """``(line number, line)`` of every negative constant index outside comments."""
    found = []
    for number, line in enumerate(source.splitlines(), start=1):
        code = line.split("#", 1)[0]
        if NEGATIVE_INDEX.search(code):
            found.append((number, line.strip()))
    return found


def test_the_rule_finds_a_negative_index():
    assert negative_indices("total = bounds[-1]\nok = bounds[n - 1]  # not bounds[-1]") == [(1, "total = bounds[-1]")]


def test_every_kernel_module_is_checked():
    assert {p.name for p in PYX_FILES} >= {"_cython_conv.pyx", "_cython_unit.pyx"}


@pytest.mark.parametrize("pyx", PYX_FILES, ids=lambda p: p.name)
def test_the_kernels_are_compiled_without_wraparound_and_use_no_negative_index(pyx):
    source = pyx.read_text(encoding="utf-8")
    assert "wraparound=False" in source.splitlines()[0]
    assert negative_indices(source) == []
