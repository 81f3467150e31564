"""refimpl.measurement: interleaved timing of several callables."""

from __future__ import annotations

import pytest

from refimpl.measurement import interleaved_times


def test_interleaved_rounds_rotate_the_order_after_one_warm_up_each():
    log = []
    clock = iter(range(1000))
    calls = [lambda name=name: log.append(name) for name in "abc"]
    times = interleaved_times(calls, 3, timer=lambda: next(clock))
    assert log[:3] == ["a", "b", "c"]  # warm-up
    assert log[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    # each timed call is one tick of the fake clock apart: start and stop
    assert times == [[1, 1, 1]] * 3


@pytest.mark.parametrize("repeat", [0, -1, 2.0, True])
def test_a_bad_repeat_is_refused(repeat):
    with pytest.raises(ValueError, match="repeat must be a positive int"):
        interleaved_times([lambda: None], repeat)
