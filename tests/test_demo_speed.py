"""The demo's speed section: the dense twin and the consistency of the figures it prints."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from refimpl.commands import demo
from refimpl.pretrained import load_pretrained


def test_the_dense_twin_has_the_adaptive_networks_stem_units_and_head():
    model, _ = load_pretrained(demo.SACT_MODEL)
    twin = demo.dense_twin(model)
    params = {name: p for name, p, _ in model.named_parameters()}
    names = [name for name, _, _ in twin.named_parameters()]
    assert names and all(not name.startswith("stages.0.heads") for name in names)
    for name, p, _ in twin.named_parameters():
        np.testing.assert_array_equal(p, params[name])
        assert p is not params[name]  # copied: training one does not change the other
    buffers = dict(model.named_buffers())
    for name, b in twin.named_buffers():
        np.testing.assert_array_equal(b, buffers[name])
    assert not twin.training


def test_the_speed_table_follows_from_its_timings(tmp_path):
    ctx = demo.make_context(argparse.Namespace(seed=0, size=16, rate=0.5, backend="numpy", out=tmp_path))
    result = demo.adaptive_speed_section(ctx)
    (dense, sact) = result.rows
    assert [dense[0], sact[0]] == ["dense ResNet-14", "SACT-ResNet-14"]
    for name, mflops, ratio, median, low, high, images_per_s, speedup in result.rows:
        assert low <= median <= high
        assert images_per_s == pytest.approx(demo.SPEED_IMAGES * 1e3 / median)
        assert ratio == pytest.approx(dense[1] / mflops)
        assert speedup == pytest.approx(dense[3] / median)
    assert sact[2] > 1  # the trained network halts: fewer FLOPs than dense
    assert ("not faster" in result.explanation) == (sact[7] <= 1)
    assert f"{sact[7]:.2f}x" in result.explanation and not result.failures
