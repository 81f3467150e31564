"""Mask generators (docs/spec.md §3): kept counts, FMP grid sequence, pooling structure, impact."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.conv import conv_output_shape
from refimpl.masks import (
    fmp_sequence,
    grid_mask,
    impact_mask,
    impact_scores,
    kept_count,
    make_mask,
    pooling_structure_scores,
    structure_mask,
    uniform_mask,
)
from refimpl.perforation import realised_rate
from strategies import fmp_lengths, map_sizes, pool_windows, rates, seeds, unit_floats
from tolerances import FLOAT64_REFORMULATION_RTOL



def test_kept_count_golden():
    # max(1, round((1 - r) * size)): 0.5*10 = 5; 0.75*10 = 2.5 -> 2 (round half to even); floor at 1
    assert kept_count(10, 0.5) == 5
    assert kept_count(10, 0.75) == 2
    assert kept_count(10, 0.99) == 1
    assert kept_count(10, 0.0) == 10


def test_fmp_sequence_golden():
    # L = 10, n = 4: alpha = 2.5, u = 0.5: a_i = ceil(2.5 (i + 0.5)) - 1
    # i=0: ceil(1.25)-1 = 1; i=1: ceil(3.75)-1 = 3; i=2: ceil(6.25)-1 = 6; i=3: ceil(8.75)-1 = 8
    np.testing.assert_array_equal(fmp_sequence(10, 4, 0.5), [1, 3, 6, 8])


@given(fmp_lengths(), unit_floats())
def test_fmp_sequence_properties(length_and_n, u):
    length, n = length_and_n
    a = fmp_sequence(length, n, u)
    alpha = length / n
    assert a.shape == (n,)
    assert a.min() >= 0 and a.max() <= length - 1, a
    gaps = np.diff(a)
    assert np.all(gaps > 0), "coordinates must be distinct and increasing"
    assert set(gaps.tolist()) <= {math.floor(alpha), math.ceil(alpha)}, (alpha, gaps)
    if length % n == 0:  # integer alpha: a regular grid
        assert np.all(gaps == length // n)


def test_fmp_sequence_tiny_u_keeps_coordinates_distinct():
    # Regression: in floating point 2 * (1 + 1e-45) / 2 rounds to 1, so a_1 = ceil(1) - 1 = 0 = a_0.
    # Exactly, alpha (1 + u) = 1 + 1e-45 > 1, so a_1 = 1.
    np.testing.assert_array_equal(fmp_sequence(2, 2, 1e-45), [0, 1])


@given(fmp_lengths())
def test_fmp_sequence_at_u_zero_is_the_limit_from_above(length_and_n):
    # Regression: u = 0 used ceil(alpha i), which is not the u -> 0+ limit floor(alpha i)
    # (L = 5, n = 2: the limit is [0, 2], not [0, 3]). The smallest positive float is "0+".
    length, n = length_and_n
    np.testing.assert_array_equal(fmp_sequence(length, n, 0.0), fmp_sequence(length, n, 5e-324))


@given(map_sizes(), rates, seeds)
def test_grid_mask_is_a_product_of_fmp_sequences(out_hw, rate, seed):
    mask = grid_mask(out_hw, rate, np.random.default_rng(seed))
    ho, wo = out_hw
    keep = math.sqrt(1 - rate)
    n_rows, n_cols = max(1, round(keep * ho)), max(1, round(keep * wo))
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    assert mask.shape == out_hw and mask.dtype == bool
    assert (rows.size, cols.size) == (n_rows, n_cols)
    np.testing.assert_array_equal(mask, np.outer(mask.any(axis=1), mask.any(axis=0)))  # Cartesian product
    for coords, length, n in ((rows, ho, n_rows), (cols, wo, n_cols)):
        gaps = set(np.diff(coords).tolist())
        assert gaps <= {length // n, -(-length // n)}
    assert realised_rate(mask) == pytest.approx(1 - n_rows * n_cols / (ho * wo))
    np.testing.assert_array_equal(mask, grid_mask(out_hw, rate, np.random.default_rng(seed)))


def test_grid_mask_regular_when_alpha_is_an_integer():
    # 8x12 at r = 0.75: sqrt(0.25) = 0.5 -> 4 rows (alpha 2) and 6 columns (alpha 2): every
    # second row and column, offset by the drawn u only.
    for seed in range(5):
        mask = grid_mask((8, 12), 0.75, np.random.default_rng(seed))
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        assert np.all(np.diff(rows) == 2) and np.all(np.diff(cols) == 2)
        assert mask.sum() == 24


@given(map_sizes(), rates, seeds)
def test_uniform_mask_count_and_seed(out_hw, rate, seed):
    mask = uniform_mask(out_hw, rate, np.random.default_rng(seed))
    size = out_hw[0] * out_hw[1]
    assert mask.shape == out_hw and mask.dtype == bool
    assert mask.sum() == max(1, round((1 - rate) * size))
    np.testing.assert_array_equal(mask, uniform_mask(out_hw, rate, np.random.default_rng(seed)))


def brute_force_structure(out_hw, size, stride, padding):
    """Count, for every position, the pooling windows whose in-bounds taps contain it."""
    ho, wo = out_hw
    po, qo = conv_output_shape(out_hw, size, stride, padding)
    scores = np.zeros(out_hw, dtype=int)
    for y in range(ho):
        for x in range(wo):
            for i in range(po):
                for j in range(qo):
                    top, left = i * stride[0] - padding[0], j * stride[1] - padding[1]
                    scores[y, x] += top <= y < top + size[0] and left <= x < left + size[1]
    return scores


@given(pool_windows(), map_sizes(4, 9))
def test_structure_scores_equal_brute_force(window, out_hw):
    size, stride, padding = window
    np.testing.assert_array_equal(pooling_structure_scores(out_hw, size, stride, padding),
                                  brute_force_structure(out_hw, size, stride, padding))


def test_structure_scores_golden_3x3_stride_2():
    # 5x5 map, 3x3 pooling, stride 2: windows start at rows/cols 0 and 2, so row/col 2 is read
    # by both windows of its axis: score = (1 or 2 along y) * (1 or 2 along x).
    per_axis = np.array([1, 1, 2, 1, 1])
    np.testing.assert_array_equal(pooling_structure_scores((5, 5), 3, 2), np.outer(per_axis, per_axis))


@given(pool_windows(), map_sizes(4, 9), rates, seeds)
def test_structure_mask_keeps_top_scores(window, out_hw, rate, seed):
    size, stride, padding = window
    mask = structure_mask(out_hw, rate, np.random.default_rng(seed), size, stride, padding)
    scores = pooling_structure_scores(out_hw, size, stride, padding)
    assert mask.sum() == kept_count(scores.size, rate)
    if not mask.all():
        assert scores[mask].min() >= scores[~mask].max()
    np.testing.assert_array_equal(
        mask, structure_mask(out_hw, rate, np.random.default_rng(seed), size, stride, padding))


@given(st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 5), st.integers(1, 5)), seeds, rates)
def test_impact_scores_brute_force_and_mask(shape, seed, rate):
    rng = np.random.default_rng(seed)
    v, g = rng.standard_normal(shape), rng.standard_normal(shape)
    n, c, ho, wo = shape
    expected = np.zeros((ho, wo))
    for y in range(ho):
        for x in range(wo):
            expected[y, x] = sum(abs(g[i, k, y, x] * v[i, k, y, x]) for i in range(n) for k in range(c)) / n
    impact = impact_scores(v, g)
    np.testing.assert_allclose(impact, expected, rtol=FLOAT64_REFORMULATION_RTOL, atol=1e-15)
    done = rng.random((ho, wo)) < 0.3
    np.testing.assert_array_equal(impact_scores(v, g, done)[done], 0.0)
    mask = impact_mask(impact, rate, rng)
    assert mask.sum() == kept_count(ho * wo, rate)
    if not mask.all():
        assert impact[mask].min() >= impact[~mask].max()


@given(seeds)
def test_make_mask_dispatches_with_the_same_stream(seed):
    impact = np.random.default_rng(seed).random((5, 6))
    cases = [("uniform", uniform_mask, {}, ()),
             ("grid", grid_mask, {}, ()),
             ("structure", structure_mask, {"pool_size": 3, "pool_stride": 2}, (3, 2))]
    for kind, direct, kwargs, args in cases:
        via = make_mask(kind, (5, 6), 0.5, np.random.default_rng(seed), **kwargs)
        np.testing.assert_array_equal(via, direct((5, 6), 0.5, np.random.default_rng(seed), *args))
    np.testing.assert_array_equal(make_mask("impact", (5, 6), 0.5, np.random.default_rng(seed), impact=impact),
                                  impact_mask(impact, 0.5, np.random.default_rng(seed)))


def test_score_ties_are_broken_by_the_seed():
    # 2x2/stride-2 pooling reads every position of a 6x6 map once: all scores tie, so which
    # half is kept is decided by the seeded noise alone — different seeds, different masks
    # (a fixed order, e.g. raster, would always keep the same positions).
    structure = {structure_mask((6, 6), 0.5, np.random.default_rng(s), 2).tobytes() for s in range(8)}
    impact = {impact_mask(np.ones((6, 6)), 0.5, np.random.default_rng(s)).tobytes() for s in range(8)}
    assert len(structure) > 1 and len(impact) > 1
