"""fastpath.profiling: sections are recorded only inside recording(), which does not nest."""

import time

import pytest

from fastpath import profiling


def test_sections_are_recorded_only_while_recording():
    with profiling.section("gather"):
        pass
    with profiling.recording() as totals:
        with profiling.section("gather"):
            time.sleep(0.01)
        with profiling.section("gather"):
            pass
        with profiling.section("compute"):
            pass
    assert set(totals) == {"gather", "compute"}
    assert totals["gather"] >= 0.01 > totals["compute"] >= 0.0
    with profiling.section("scatter"):
        pass
    assert "scatter" not in totals


def test_recording_does_not_nest():
    with profiling.recording():
        with pytest.raises(RuntimeError, match="does not nest"):
            with profiling.recording():
                pass


def test_is_recording_says_whether_a_recording_is_active():
    assert not profiling.is_recording()
    with profiling.recording():
        assert profiling.is_recording()
    assert not profiling.is_recording()
