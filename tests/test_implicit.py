"""Implicit interpolation (docs/spec.md §2.6): reading the compact tensor through an index table equals
filling it explicitly and running the next layer."""

import numpy as np
import pytest
from hypothesis import given

from refimpl.conv import conv2d_forward
from refimpl.implicit import (
    compose_index_table,
    dense_index_map,
    implicit_conv2d_forward,
    implicit_memory_saved,
    implicit_pool2d_forward,
    table_conv_forward,
    table_pool_forward,
)
from refimpl.perforation import PerforationPlan, fill_forward
from refimpl.pooling import pool2d_forward
from strategies import conv_problems, implicit_problems, pool_problems
from tolerances import assert_close


@given(implicit_problems())
def test_implicit_equals_explicit_fill_then_next_layer(problem):
    compact, plan, layer, w, b, size, stride, padding = problem
    filled = fill_forward(compact, plan, "nearest")
    if layer == "conv":
        out, _ = implicit_conv2d_forward(compact, plan, w, b, stride, padding)
        expected, _ = conv2d_forward(filled, w, b, stride, padding)
    else:
        out, _ = implicit_pool2d_forward(compact, plan, layer, size, stride, padding)
        expected, _ = pool2d_forward(filled, layer, size, stride, padding)
    assert out.dtype == compact.dtype
    assert_close(out, expected)


@given(conv_problems(with_mask=False))
def test_table_conv_over_a_dense_index_map_is_the_convolution(problem):
    # With the identity index map the table holds the pixel each tap reads: table conv == conv.
    x, w, b, stride, padding, _ = problem
    n, c, h, wd = x.shape
    table = compose_index_table(dense_index_map((h, wd)), w.shape[2:], stride, padding)
    out, _ = table_conv_forward(x.reshape(n, c, h * wd), table, w, b)
    expected, _ = conv2d_forward(x, w, b, stride, padding)
    assert_close(out.reshape(expected.shape), expected)


def test_compose_index_table_golden():
    # index_map (2x3) = [[0 0 1], [2 2 1]]; a 2x2 window, stride 1, padding 1 -> output 3x4.
    # Output (0,0) reads rows -1..0, cols -1..0: taps (-1,-1) (-1,0) (0,-1) pad, (0,0) -> 0.
    # Output (1,1) reads rows 0..1, cols 0..1: [0, 0, 2, 2].
    # Output (2,3) reads rows 1..2, cols 2..3: [1, pad, pad, pad].
    index_map = np.array([[0, 0, 1], [2, 2, 1]])
    table = compose_index_table(index_map, 2, 1, 1)
    assert table.shape == (1, 12, 4) and table.dtype == np.int32
    np.testing.assert_array_equal(table[0, 0], [-1, -1, -1, 0])
    np.testing.assert_array_equal(table[0, 1 * 4 + 1], [0, 0, 2, 2])
    np.testing.assert_array_equal(table[0, 2 * 4 + 3], [1, -1, -1, -1])
    # out_positions selects rows of the full table
    np.testing.assert_array_equal(compose_index_table(index_map, 2, 1, 1, out_positions=[5, 11])[0],
                                  table[0, [5, 11]])


def test_average_pooling_counts_duplicates_golden():
    # compact [10, 40] with a 1x3 map [0, 0, 1] (nearest fill gives [10, 10, 40]).
    # avg over the whole row counts 10 twice: (10 + 10 + 40) / 3 = 20 (unique values would give 25);
    # max gives 40.
    mask = np.array([[True, False, True]])
    plan = PerforationPlan(mask)
    np.testing.assert_array_equal(plan.index_map, [[[0, 0, 1]]])
    compact = np.array([[[10.0, 40.0]]])
    avg, _ = implicit_pool2d_forward(compact, plan, "avg", size=(1, 3))
    mx, _ = implicit_pool2d_forward(compact, plan, "max", size=(1, 3))
    assert avg.item() == 20.0 and mx.item() == 40.0


def pool_naive(x, mode, size, stride, padding):
    """Pooling by loops over the in-bounds taps of every window: the definition."""
    n, c, h, w = x.shape
    ho, wo = (h + 2 * padding[0] - size[0]) // stride[0] + 1, (w + 2 * padding[1] - size[1]) // stride[1] + 1
    out = np.empty((n, c, ho, wo), dtype=x.dtype)
    for y in range(ho):
        for xx in range(wo):
            top, left = y * stride[0] - padding[0], xx * stride[1] - padding[1]
            window = x[:, :, max(top, 0):top + size[0], max(left, 0):left + size[1]]
            out[:, :, y, xx] = window.max(axis=(2, 3)) if mode == "max" else window.mean(axis=(2, 3))
    return out


@given(pool_problems())
def test_pooling_equals_the_loop_definition(problem):
    x, mode, size, stride, padding = problem
    out, _ = pool2d_forward(x, mode, size, stride, padding)
    assert out.dtype == x.dtype
    assert_close(out, pool_naive(x, mode, size, stride, padding))


def test_pooling_golden_ignores_padding():
    # x = [[1 -2], [-3 -4]], 2x2 window, stride 1, padding 1 -> 3x3 outputs.
    # Corner (0,0) sees only x[0,0] = 1: max 1, avg 1 (padding is not counted).
    # Centre (1,1) sees all four: max 1, avg (1 - 2 - 3 - 4) / 4 = -2.
    # (2,2) sees only -4: max -4 (a zero pad must not win), avg -4.
    x = np.array([[[[1.0, -2.0], [-3.0, -4.0]]]])
    mx, _ = pool2d_forward(x, "max", 2, 1, 1)
    avg, _ = pool2d_forward(x, "avg", 2, 1, 1)
    np.testing.assert_array_equal(mx[0, 0], [[1, 1, -2], [1, 1, -2], [-3, -3, -4]])
    np.testing.assert_array_equal(avg[0, 0], [[1, -0.5, -2], [-1, -2, -3], [-3, -3.5, -4]])


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_table_pool_over_dense_map_is_pooling(mode):
    x = np.random.default_rng(3).standard_normal((2, 3, 5, 6))
    table = compose_index_table(dense_index_map((5, 6)), (3, 2), (2, 1), (1, 1))
    out, _ = table_pool_forward(x.reshape(2, 3, 30), table, mode)
    expected, _ = pool2d_forward(x, mode, (3, 2), (2, 1), (1, 1))
    assert_close(out.reshape(expected.shape), expected)


def test_implicit_memory_saved_golden():
    # 4x4 map, 4 kept, N=2, C=3, float64: dense 2*3*16*8 = 768 bytes, compact 2*3*4*8 = 192,
    # index map 16 int32 = 64 -> saved 768 - 192 - 64 = 512.
    mask = np.zeros((4, 4), dtype=bool)
    mask[::2, ::2] = True
    assert implicit_memory_saved(PerforationPlan(mask), 2, 3, 8) == 512
