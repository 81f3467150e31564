"""Perforated convolution (docs/spec.md §2): computed positions equal the dense conv, fills, index map, plan."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.backend import get_backend
from refimpl.conv import conv2d_forward, conv_flops
from refimpl.perforation import (
    PerforationPlan,
    fill_backward,
    fill_forward,
    nearest_index,
    perforated_conv2d_forward,
    perforated_conv_flops,
    realised_rate,
)
from strategies import conv_problems, rngs, seeds, standalone_masks
from tolerances import assert_close


def per_sample(mask, n):
    """The (N, Ho, Wo) view of a shared or per-sample mask."""
    return np.broadcast_to(mask, (n, *mask.shape[-2:]))


def brute_force_nearest(mask):
    """For every position, the raster indices of all computed positions at minimal distance."""
    kept = np.argwhere(mask)  # raster order
    ho, wo = mask.shape
    ties = np.empty((ho, wo), dtype=object)
    for y in range(ho):
        for x in range(wo):
            d2 = [(y - r) ** 2 + (x - c) ** 2 for r, c in kept]
            best = min(d2)
            ties[y, x] = {p for p, d in enumerate(d2) if d == best}
    return ties


# ---------------------------------------------------------------------------------- goldens


def test_nearest_index_golden_with_raster_ties():
    # mask (3x3): computed (0,0) -> compact 0 and (2,2) -> compact 1.
    # (1,1), (0,2), (2,0) are equidistant (d^2 = 2, 4, 4 to both): ties go to raster index 0.
    # (1,2) and (2,1): d^2 = 5 to (0,0), 1 to (2,2) -> 1.
    mask = np.zeros((3, 3), dtype=bool)
    mask[0, 0] = mask[2, 2] = True
    expected = np.array([[0, 0, 0], [0, 0, 1], [0, 1, 1]])
    np.testing.assert_array_equal(nearest_index(mask), expected)
    assert nearest_index(mask).dtype == np.int32


def test_perforated_golden_nearest_and_zero():
    # x = [[1 2 3], [4 5 6], [7 8 9]], w = [[1 2], [3 4]], b = 1: dense out = [[38 48], [68 78]]
    # (see test_conv). Mask keeps (0,1) and (1,0): compact = [48, 68].
    # nearest: (0,0) is at distance 1 from both -> raster tie -> compact 0 = 48;
    #          (1,1) likewise -> 48.  zero: [[0 48], [68 0]].
    x = np.arange(1, 10, dtype=np.float64).reshape(1, 1, 3, 3)
    w = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    b = np.array([1.0])
    mask = np.array([[False, True], [True, False]])
    nearest, _ = perforated_conv2d_forward(x, w, b, mask, fill="nearest")
    zero, _ = perforated_conv2d_forward(x, w, b, mask, fill="zero")
    compact, _ = perforated_conv2d_forward(x, w, b, mask, output="compact")
    np.testing.assert_array_equal(nearest[0, 0], [[48, 48], [68, 48]])
    np.testing.assert_array_equal(zero[0, 0], [[0, 48], [68, 0]])
    np.testing.assert_array_equal(compact, [[[48, 68]]])


def test_realised_rate_and_flops_golden():
    # 2 of 9 kept: r = 1 - 2/9 = 7/9; FLOPs at 2 positions for N=3 images, C=2, K=4, 3x3:
    # 2 * 2 * 9 * 4 * (2 * 3) = 864
    mask = np.zeros((3, 3), dtype=bool)
    mask[0, 0] = mask[1, 2] = True
    plan = PerforationPlan(mask)
    assert realised_rate(mask) == pytest.approx(7 / 9, abs=1e-15)
    assert plan.rate == pytest.approx(7 / 9, abs=1e-15)
    assert perforated_conv_flops(plan, 3, 2, 4, (3, 3)) == 864


def test_plan_layout_per_sample_golden():
    # sample 0 keeps raster 1 and 3, sample 1 keeps raster 2 only: positions padded with -1.
    mask = np.array([[[False, True], [False, True]], [[False, False], [True, False]]])
    plan = PerforationPlan(mask)
    np.testing.assert_array_equal(plan.positions, [[1, 3], [2, -1]])
    np.testing.assert_array_equal(plan.counts, [2, 1])
    assert plan.positions.dtype == plan.counts.dtype == plan.index_map.dtype == np.int32
    assert (plan.batch, plan.width, plan.shared, plan.full) == (2, 2, False, False)
    np.testing.assert_array_equal(plan.index_map, [[[0, 0], [1, 1]], [[0, 0], [0, 0]]])
    assert plan.computed_positions(2) == 3


# ---------------------------------------------------------------------------------- properties


@given(conv_problems())
def test_computed_positions_equal_dense(problem):
    x, w, b, stride, padding, mask = problem
    dense, _ = conv2d_forward(x, w, b, stride, padding)
    compact, _ = perforated_conv2d_forward(x, w, b, mask, stride, padding, output="compact")
    plan = PerforationPlan(mask)
    n, k = dense.shape[:2]
    assert compact.shape == (n, k, plan.width) and compact.dtype == x.dtype
    flat = dense.reshape(n, k, -1)
    for sample in range(n):
        b_ = 0 if plan.shared else sample
        count = plan.counts[b_]
        assert_close(compact[sample, :, :count], flat[sample, :, plan.positions[b_, :count]].T)
        assert np.all(compact[sample, :, count:] == 0), "padded compact slots must be 0"
    for fill in ("nearest", "zero"):
        out, _ = perforated_conv2d_forward(x, w, b, mask, stride, padding, fill=fill)
        m = per_sample(mask, n)[:, None].repeat(k, axis=1)
        assert_close(out[m], dense[m])


@given(conv_problems(mask_kinds=("full",)))
def test_full_mask_equals_dense(problem):
    x, w, b, stride, padding, mask = problem
    dense, _ = conv2d_forward(x, w, b, stride, padding)
    assert PerforationPlan(mask).full
    for fill in ("nearest", "zero"):
        out, _ = perforated_conv2d_forward(x, w, b, mask, stride, padding, fill=fill)
        assert_close(out, dense)
    default, _ = perforated_conv2d_forward(x, w, b, None, stride, padding)  # mask=None is dense
    assert_close(default, dense)


@given(conv_problems())
def test_nearest_fill_copies_the_value_at_nearest_index(problem):
    x, w, b, stride, padding, mask = problem
    out, _ = perforated_conv2d_forward(x, w, b, mask, stride, padding, fill="nearest")
    compact, _ = perforated_conv2d_forward(x, w, b, mask, stride, padding, output="compact")
    index = np.broadcast_to(PerforationPlan(mask).index_map, (x.shape[0], *out.shape[2:]))
    for sample in range(x.shape[0]):
        np.testing.assert_array_equal(out[sample], compact[sample][:, index[sample]])  # exact copies


@given(conv_problems())
def test_zero_fill_is_zero_off_mask(problem):
    x, w, b, stride, padding, mask = problem
    out, _ = perforated_conv2d_forward(x, w, b, mask, stride, padding, fill="zero")
    off = ~per_sample(mask, x.shape[0])
    assert np.all(out.transpose(1, 0, 2, 3)[:, off] == 0)


@given(conv_problems(per_sample=True))
def test_per_sample_masks_equal_one_image_at_a_time(problem):
    x, w, b, stride, padding, mask = problem
    for fill in ("nearest", "zero"):
        out, _ = perforated_conv2d_forward(x, w, b, mask, stride, padding, fill=fill)
        for sample in range(x.shape[0]):
            alone, _ = perforated_conv2d_forward(x[sample:sample + 1], w, b, mask[sample], stride, padding,
                                                 fill=fill)
            assert_close(out[sample:sample + 1], alone)


@given(standalone_masks(max_side=8, per_sample=False))
def test_nearest_index_brute_force_raster_ties(mask):
    index = nearest_index(mask)
    ties = brute_force_nearest(mask)
    for (y, x), p in np.ndenumerate(index):
        assert p == min(ties[y, x]), f"position {(y, x)}: got {p}, nearest set {ties[y, x]}"


@given(standalone_masks(max_side=6, per_sample=False), seeds)
def test_nearest_index_random_ties(mask, seed):
    first = nearest_index(mask, tie_break="random", rng=np.random.default_rng(seed))
    again = nearest_index(mask, tie_break="random", rng=np.random.default_rng(seed))
    np.testing.assert_array_equal(first, again)  # deterministic under a seed
    ties = brute_force_nearest(mask)
    for (y, x), p in np.ndenumerate(first):
        assert p in ties[y, x], f"position {(y, x)}: {p} is not among the nearest {ties[y, x]}"
    plan = PerforationPlan(mask, tie_break="random", rng=np.random.default_rng(seed))
    np.testing.assert_array_equal(plan.index_map[0], first)


@pytest.mark.parametrize("density", [0.002, 0.05, 0.5, 0.95])
def test_nearest_index_matches_all_pairs_search_on_larger_maps(density):
    # The row-by-row search against the all-pairs definition (first argmin = smallest raster
    # index) on maps larger than the Hypothesis ones, sparse to dense, non-square.
    rng = np.random.default_rng(11)
    mask = rng.random((31, 44)) < density
    mask[rng.integers(31), rng.integers(44)] = True
    kept = np.argwhere(mask)
    grid = np.argwhere(np.ones(mask.shape, dtype=bool))
    d2 = ((grid[:, None, :] - kept[None, :, :]) ** 2).sum(axis=2)
    np.testing.assert_array_equal(nearest_index(mask), np.argmin(d2, axis=1).reshape(mask.shape))


@pytest.mark.parametrize("tie_break", ["raster", "random"])
def test_full_mask_index_map_is_the_identity(tie_break):
    mask = np.ones((3, 5), dtype=bool)
    index = nearest_index(mask, tie_break, np.random.default_rng(0))
    np.testing.assert_array_equal(index, np.arange(15).reshape(3, 5))
    assert index.dtype == np.int32


def test_random_ties_choose_every_candidate():
    # (1,1) is equidistant from the 4 corners of a 3x3 mask: over 200 seeds each corner is chosen
    # (the raster rule would always give 0). P(some corner never chosen) < 4 * 0.75**200.
    mask = np.zeros((3, 3), dtype=bool)
    mask[::2, ::2] = True
    chosen = {int(nearest_index(mask, "random", np.random.default_rng(s))[1, 1]) for s in range(200)}
    assert chosen == {0, 1, 2, 3}


@given(standalone_masks(max_side=5, max_batch=2))
def test_plan_fields_and_realised_rate(mask):
    plan = PerforationPlan(mask)
    m = mask.reshape(-1, *mask.shape[-2:])
    ho, wo = m.shape[1:]
    assert plan.mask.shape == m.shape and plan.shared == (mask.ndim == 2)
    np.testing.assert_array_equal(plan.counts, m.reshape(len(m), -1).sum(axis=1))
    for b in range(len(m)):
        kept = plan.positions[b, : plan.counts[b]]
        np.testing.assert_array_equal(kept, np.flatnonzero(m[b]))  # ascending raster order
        assert np.all(plan.positions[b, plan.counts[b]:] == -1)
        # computed positions map to themselves in the index map
        np.testing.assert_array_equal(plan.index_map[b].ravel()[kept], np.arange(kept.size))
        assert plan.index_map[b].min() >= 0 and plan.index_map[b].max() < plan.counts[b]
    assert plan.full == bool(m.all())
    # r = 1 - |M| / (Ho Wo), averaged over samples
    assert plan.rate == pytest.approx(1 - plan.counts.sum() / (len(m) * ho * wo), abs=1e-12)
    n = len(m)
    assert perforated_conv_flops(plan, n, 3, 2, (3, 1)) == conv_flops(int(m.sum()) * (n if plan.shared else 1),
                                                                      3, 2, (3, 1))


def test_backend_by_name_is_the_default():
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 4))
    w = np.random.default_rng(1).standard_normal((3, 2, 3, 3))
    mask = np.eye(2, dtype=bool)
    ref, _ = perforated_conv2d_forward(x, w, None, mask)
    named, _ = perforated_conv2d_forward(x, w, None, mask, backend="numpy")
    inst, _ = perforated_conv2d_forward(x, w, None, mask, backend=get_backend("numpy"))
    np.testing.assert_array_equal(named, ref)
    np.testing.assert_array_equal(inst, ref)


@given(standalone_masks(max_side=5, max_batch=3), st.integers(1, 3), rngs())
def test_fill_backward_is_the_adjoint_of_fill_forward(mask, n, rng):
    # <fill_forward(c), d> == <c, fill_backward(d)> for every fill: the identity a backend's
    # fill kernels must satisfy too (padded compact slots excluded: they are never read).
    n = mask.shape[0] if mask.ndim == 3 else n
    plan = PerforationPlan(mask)
    k = 2
    compact = rng.standard_normal((n, k, plan.width))
    counts = np.broadcast_to(plan.counts, (n,))
    for sample in range(n):
        compact[sample, :, counts[sample]:] = 0
    ddense = rng.standard_normal((n, k, *plan.out_hw))
    for fill in ("nearest", "zero"):
        lhs = np.sum(fill_forward(compact, plan, fill) * ddense)
        dcompact = fill_backward(ddense, plan, fill)
        rhs = np.sum(compact * dcompact)
        assert abs(lhs - rhs) <= 1e-12 * max(1.0, np.abs(compact).sum() * np.abs(ddense).max())
        for sample in range(n):
            assert np.all(dcompact[sample, :, counts[sample]:] == 0)


def test_plan_keeps_its_own_copy_of_the_mask():
    # Regression: the plan held the caller's array, so editing it afterwards changed plan.mask
    # while positions, counts and index_map still described the old mask.
    mask = np.zeros((2, 3), dtype=bool)
    mask[0, 0] = True
    plan = PerforationPlan(mask)
    mask[1, 2] = True
    assert plan.mask.sum() == 1 and plan.counts[0] == 1


# ---------------------------------------------------------------------------------------------
# The plan is immutable: what backends read as offsets cannot change after construction
# ---------------------------------------------------------------------------------------------


@given(mask=standalone_masks(max_batch=3))
def test_plan_arrays_are_read_only_for_good_and_agree_with_the_mask(mask):
    plan = PerforationPlan(mask)
    mask[...] = ~mask  # the caller's array is not the plan's
    for name in ("mask", "positions", "counts", "index_map"):
        array = getattr(plan, name)
        assert not array.flags.writeable, name
        with pytest.raises(ValueError):
            array.setflags(write=True)  # not even by switching the flag back on
        with pytest.raises(AttributeError, match="immutable"):
            setattr(plan, name, array.copy())
    own = plan.mask.reshape(plan.batch, -1)
    for b in range(plan.batch):
        np.testing.assert_array_equal(plan.positions[b, : plan.counts[b]], np.flatnonzero(own[b]))
        np.testing.assert_array_equal(plan.index_map[b], nearest_index(plan.mask[b]))


def test_dense_plans_are_shared_per_size():
    assert PerforationPlan.dense((4, 5)) is PerforationPlan.dense((4, 5))
    assert PerforationPlan.dense((4, 5)).full and PerforationPlan.dense((5, 4)).out_hw == (5, 4)
