"""One check per exercise: what a solution must satisfy, independent of the notebooks' own test cells.

Each check receives the namespace left by the exercise's cells (:func:`refimpl.course.exercise_namespace`)
and compares the names the exercise asks for with the reference implementation, the golden values
of the specification page (docs/spec.md), central differences or the backend property suite. A
check raises (``AssertionError``, ``KeyError`` for a missing name) when the solution is wrong.

``CHECKS`` maps an exercise id (``ex01_2``: notebook 01, exercise 2) to ``(notebook prefix, check)``.
"""

from __future__ import annotations

import numpy as np

from refimpl import distributions as D
from refimpl.backend import NumpyBackend
from refimpl.conv import check_conv_args, conv_flops
from refimpl.gradcheck import numerical_gradient
from refimpl.halting import halting_backward, halting_forward, ponder_cost_grad
from refimpl.layers import batchnorm_backward, batchnorm_forward
from refimpl.masks import fmp_sequence, grid_mask, impact_scores, pooling_structure_scores
from refimpl.numpy_kernels import table_conv_backward, table_conv_forward
from refimpl.perforation import PerforationPlan, gather_rows, nearest_index, perforated_conv2d_forward, perforated_conv_flops
from refimpl.sparse_unit import masked_batchnorm_backward, masked_batchnorm_forward

CHECKS = {}
REFERENCE = NumpyBackend()


def check(exercise, notebook):
    def register(function):
        CHECKS[exercise] = (notebook, function)
        return function
    return register


def random_masks(rng, count, max_hw=9):
    """Random boolean masks (at least one computed position), checkerboards and grids: ties included."""
    masks = []
    for i in range(count):
        shape = tuple(int(s) for s in rng.integers(1, max_hw, size=2))
        if i % 5 == 0:
            mask = (np.indices(shape).sum(axis=0) % 2) == 0  # a checkerboard: four-way ties
        elif i % 5 == 1 and min(shape) > 1:
            mask = grid_mask(shape, float(rng.uniform(0.2, 0.9)), rng)
        else:
            mask = rng.random(shape) < rng.uniform(0.05, 1.0)
        mask.flat[int(rng.integers(mask.size))] = True
        masks.append(mask)
    return masks


# --------------------------------------------------------------------------- 01 perforated convolution


@check("ex01_1", "01")
def _(ns):
    mask = np.zeros((3, 4), dtype=bool)
    mask[[0, 1, 2], [0, 3, 1]] = True
    assert np.array_equal(np.asarray(ns["index_map_by_hand"]), nearest_index(mask))
    assert ns["flops_by_hand"] == perforated_conv_flops(PerforationPlan(mask), 1, 2, 4, (3, 3))


@check("ex01_2", "01")
def _(ns):
    brute = ns["nearest_index_brute"]
    for mask in random_masks(np.random.default_rng(1), 150):
        assert np.array_equal(brute(mask), nearest_index(mask)), mask.astype(int)


@check("ex01_3", "01")
def _(ns):
    mine = ns["fmp_coordinates"]
    assert np.array_equal(mine(10, 4, 0.5), [1, 3, 6, 8])  # the specification page's golden value
    rng = np.random.default_rng(3)
    for _ in range(300):
        length = int(rng.integers(1, 60))
        n_kept = int(rng.integers(1, length + 1))
        u = float(rng.uniform(1e-12, 1.0))
        assert np.array_equal(mine(length, n_kept, u), fmp_sequence(length, n_kept, u)), (length, n_kept, u)
    assert np.array_equal(mine(2, 2, 1e-45), [0, 1])  # floating point would collapse these


# --------------------------------------------------------------------------- 02 fast kernels


@check("ex02_1", "02")
def _(ns):
    plan = PerforationPlan(grid_mask((8, 8), 0.75, np.random.default_rng(0)))
    x, w, _, geometry = check_conv_args(np.zeros((4, 16, 8, 8)), np.zeros((32, 16, 3, 3)), None, 1, 1)
    assert tuple(ns["cols_shape"]) == gather_rows(x, plan, geometry)[0].T.shape
    assert ns["gemm_flops"] == perforated_conv_flops(plan, 4, 16, 32, (3, 3))
    assert ns["dense_gemm_flops"] == 4 * conv_flops(64, 16, 32, (3, 3))
    assert abs(ns["ideal_speedup"] - 4.0) < 1e-12


@check("ex02_2", "02")
def _(ns):
    rng = np.random.default_rng(22)
    for trial in range(20):
        n, c = int(rng.integers(1, 3)), int(rng.integers(1, 4))
        kernel = tuple(int(k) for k in rng.integers(1, 4, size=2))
        stride = tuple(int(s) for s in rng.integers(1, 3, size=2))
        padding = tuple(int(rng.integers(0, k)) for k in kernel)
        x = rng.standard_normal((n, c) + tuple(int(s) for s in rng.integers(3, 8, size=2)))
        w = rng.standard_normal((2, c) + kernel)
        geometry = check_conv_args(x, w, None, stride, padding)[3]
        mask = random_masks(rng, 1)[0]
        mask = np.resize(mask, geometry.out_hw)
        mask.flat[0] = True
        cols = ns["gather_columns"](x, mask, kernel, stride, padding)
        np.testing.assert_array_equal(cols, gather_rows(x, PerforationPlan(mask), geometry)[0].T)
        compact, _ = perforated_conv2d_forward(x, w, None, mask, stride=stride, padding=padding, output="compact")
        product = (w.reshape(2, -1) @ cols).reshape(2, n, -1).transpose(1, 0, 2)
        np.testing.assert_allclose(product, compact, rtol=1e-12, atol=1e-12)


@check("ex02_3", "02")
def _(ns):
    import test_backend_properties as suite  # tests/ is on sys.path (tests/conftest.py's folder)

    backend = ns["LoopFillBackend"]()
    assert isinstance(backend, NumpyBackend)
    # first a fixed example with duplicates in the index map, shared and per-sample: a wrong
    # backend fails here at once, without Hypothesis searching and shrinking
    rng = np.random.default_rng(23)
    for mask in (np.array([[True, False, False], [False, False, True]]),
                 np.array([[[True, False], [False, False]], [[False, True], [True, True]]])):
        plan = PerforationPlan(mask)
        n = 2
        compact = rng.standard_normal((n, 3, plan.width))
        ddense = rng.standard_normal((n, 3) + plan.out_hw)
        for fill in ("nearest", "zero"):
            np.testing.assert_array_equal(backend.fill_forward(compact, plan, fill), REFERENCE.fill_forward(compact, plan, fill))
            np.testing.assert_allclose(backend.fill_backward(ddense, plan, fill), REFERENCE.fill_backward(ddense, plan, fill),
                                       rtol=1e-12, atol=1e-12)
    # the suite's own Hypothesis tests, with the backend passed in place of the fixture
    for fill in ("nearest", "zero"):
        suite.test_fills_match_reference_exactly(fast_backend=backend, fill=fill)
    for output, fill in suite.OUTPUTS:
        suite.test_perforated_conv_matches_reference(fast_backend=backend, output=output, fill=fill)


# --------------------------------------------------------------------------- 03 OpenCL


@check("ex03_1", "03")
def _(ns):
    from fastpath.opencl_tables import conv_tap_table

    mask = np.zeros((3, 3), dtype=bool)
    mask[0, 0] = mask[2, 1] = True
    geometry = check_conv_args(np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 2)), None, 1, 1)[3]
    table = conv_tap_table(PerforationPlan(mask), geometry)[0]
    assert np.array_equal(np.asarray(ns["tap_table_by_hand"]), table)
    assert ns["readers_of_pixel_3"] == int(np.any(table == 3, axis=1).sum())


def random_tables(rng, count):
    for i in range(count):
        n, c, s = int(rng.integers(1, 3)), int(rng.integers(1, 4)), int(rng.integers(1, 9))
        batch = 1 if i % 2 == 0 else n
        table = rng.integers(-1, s, size=(batch, int(rng.integers(1, 10)), 4)).astype(np.int32)
        yield rng.standard_normal((n, c, s)), table, rng.standard_normal((3, c, 2, 2))


@check("ex03_2", "03")
def _(ns):
    rng = np.random.default_rng(32)
    for src, table, w in random_tables(rng, 20):
        b = rng.standard_normal(3)
        np.testing.assert_allclose(ns["table_conv_oracle"](src, table, w, b), table_conv_forward(src, table, w, b)[0],
                                   rtol=1e-12, atol=1e-12)


@check("ex03_3", "03")
def _(ns):
    rng = np.random.default_rng(33)
    for src, table, w in random_tables(rng, 20):
        out, cache = table_conv_forward(src, table, w, np.zeros(3))
        dout = rng.standard_normal(out.shape)
        np.testing.assert_allclose(ns["table_conv_dsrc_by_gather"](dout, table, w, src.shape[2]),
                                   table_conv_backward(dout, cache)[0], rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- 04 training from scratch


@check("ex04_1", "04")
def _(ns):
    x = np.array([0.0, 2.0, 4.0, 6.0]).reshape(4, 1, 1, 1)
    y, _ = batchnorm_forward(x, np.array([2.0]), np.array([1.0]), x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3)), 1e-12, True)
    np.testing.assert_allclose(np.ravel(ns["y_by_hand"]), y.ravel(), rtol=1e-9)
    assert abs(ns["sum_by_hand"] - float(y.sum())) < 1e-9


def bn_training(x, gamma, beta, eps=1e-5):
    return batchnorm_forward(x, gamma, beta, x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3)), eps, True)


@check("ex04_2", "04")
def _(ns):
    rng = np.random.default_rng(42)
    for shape in [(3, 2, 2, 3), (1, 3, 4, 1), (5, 1, 1, 1)]:
        x, dout = rng.standard_normal(shape), rng.standard_normal(shape)
        gamma, beta = rng.uniform(0.5, 1.5, shape[1]), rng.standard_normal(shape[1])
        mine = ns["batchnorm_backward_mine"](dout, x, gamma, 1e-5)
        for got, want in zip(mine, batchnorm_backward(dout, bn_training(x, gamma, beta)[1])):
            np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)
        numeric = numerical_gradient(lambda: float(np.sum(dout * bn_training(x, gamma, beta)[0])), x)
        np.testing.assert_allclose(mine[0], numeric, rtol=1e-5, atol=1e-7)


@check("ex04_3", "04")
def _(ns):
    error = ns["relative_gradient_error"]
    gamma, beta, keep = np.array([1.2, 0.7]), np.array([0.1, -0.3]), {}

    def bn(x):
        y, keep["c"] = bn_training(x, gamma, beta)
        return y

    def correct(g):
        return batchnorm_backward(g, keep["c"])[0]

    x = np.random.default_rng(0).standard_normal((3, 2, 2, 2))
    before = x.copy()
    for seed in range(1, 5):
        assert error(bn, correct, x, np.random.default_rng(seed)) < 1e-4
        assert error(bn, lambda g: np.zeros_like(g), x, np.random.default_rng(seed)) > 0.5  # the forgetful backward
        assert error(bn, lambda g: -correct(g), x, np.random.default_rng(seed)) > 0.5
    np.testing.assert_array_equal(x, before)
    # a function whose gradient is right: tanh, elementwise
    z = np.random.default_rng(5).standard_normal((4, 3))
    assert error(np.tanh, lambda g: g * (1 - np.tanh(z) ** 2), z, np.random.default_rng(6)) < 1e-6


# --------------------------------------------------------------------------- 05 accelerating a network


@check("ex05_1", "05")
def _(ns):
    assert np.array_equal(np.asarray(ns["structure_by_hand"]), pooling_structure_scores((7, 7), 3, 2, 1))


@check("ex05_2", "05")
def _(ns):
    rng = np.random.default_rng(52)
    for shape in [(3, 4, 5, 6), (1, 1, 2, 2), (4, 2, 1, 7)]:
        v, g = rng.standard_normal(shape), rng.standard_normal(shape)
        np.testing.assert_allclose(ns["impact_scores_mine"](v, g), impact_scores(v, g), rtol=1e-12)


@check("ex05_3", "05")
def _(ns):
    choose = ns["greedy_choice"]
    assert choose(1.0, 100.0, [1.1, 1.05, 0.5], [50.0, 90.0, 100.0]) == 0
    assert choose(1.0, 100.0, [1.2], [120.0]) is None
    assert choose(1.0, 100.0, [1.1, 0.99], [50.0, 99.0]) == 1
    rng = np.random.default_rng(53)
    for _ in range(200):
        losses, costs = rng.uniform(0, 2, 7), rng.uniform(50, 150, 7)
        saving = 100.0 - costs
        ratios = np.where(saving > 0, (losses - 1.0) / np.where(saving > 0, saving, 1.0), np.inf)
        expected = None if np.all(saving <= 0) else int(np.argmin(ratios))
        assert choose(1.0, 100.0, list(losses), list(costs)) == expected


# --------------------------------------------------------------------------- 06 ACT and SACT

GOLDEN_HALTING = [  # the specification page's golden vectors: h, N, R, rho, p, drho/dh
    ([0.999, 0.999, 0.999, 0.999], 1, 1.0, 2.0, [1, 0, 0, 0, 0], [0, 0, 0, 0]),
    ([0.01, 0.5, 0.6, 0.7], 3, 0.49, 3.49, [0.01, 0.5, 0.49, 0, 0], [-1, -1, 0, 0]),
    ([0.01, 0.01, 0.01, 0.01], 5, 0.96, 5.96, [0.01, 0.01, 0.01, 0.01, 0.96], [-1, -1, -1, -1]),
]


@check("ex06_1", "06")
def _(ns):
    h = np.array([0.3, 0.3, 0.3, 0.3])
    result = halting_forward(h)
    assert ns["n_by_hand"] == result.n_units
    np.testing.assert_allclose([ns["remainder_by_hand"], ns["rho_by_hand"]], [result.remainder, result.rho], atol=1e-9)
    np.testing.assert_allclose(ns["p_by_hand"], result.p, atol=1e-9)
    np.testing.assert_array_equal(ns["drho_dh_by_hand"], ponder_cost_grad(h))


@check("ex06_2", "06")
def _(ns):
    mine = ns["halting_forward_mine"]
    for h, n, r, rho, p, _ in GOLDEN_HALTING:
        got = mine(np.array(h))
        assert int(got[0]) == n
        np.testing.assert_allclose([got[1], got[3]], [r, rho], atol=1e-9)
        np.testing.assert_allclose(got[2], p, atol=1e-9)
    assert int(mine(np.array([0.5, 0.495]))[0]) == 2
    assert int(mine(np.array([0.5, 0.495]), eps=0.001)[0]) == 3
    zero = mine(np.zeros(4))
    assert int(zero[0]) == 5 and abs(zero[3] - 6.0) < 1e-12  # all-zero scores: p = (0, .., 0, 1), rho = L + 1
    scores = np.random.default_rng(62).uniform(0, 0.6, (4, 3, 5))
    reference, got = halting_forward(scores), mine(scores)
    np.testing.assert_array_equal(got[0], reference.n_units)
    for value, want in zip(got[1:], (reference.remainder, reference.p, reference.rho)):
        np.testing.assert_allclose(value, want, atol=1e-12)


@check("ex06_3", "06")
def _(ns):
    mine = ns["halting_backward_mine"]
    for h, *_, drho_dh in GOLDEN_HALTING:
        h = np.array(h)
        np.testing.assert_allclose(mine(np.zeros(5), np.ones(()), h), drho_dh, atol=1e-12)
    rng = np.random.default_rng(63)
    h = rng.uniform(0.05, 0.45, (5, 4))
    assert np.all(np.abs(np.cumsum(h, axis=-1) - 0.99) > 1e-4)  # away from jumps of N
    dp, drho = rng.standard_normal((5, 5)), rng.standard_normal(5)
    got = mine(dp, drho, h)
    np.testing.assert_allclose(got, halting_backward(dp, drho, halting_forward(h).cache), atol=1e-12)
    objective = lambda: float(np.sum(dp * halting_forward(h).p) + np.sum(drho * halting_forward(h).rho))  # noqa: E731
    np.testing.assert_allclose(got, numerical_gradient(objective, h), atol=1e-6)


@check("ex06_4", "06")
def _(ns):
    rng = np.random.default_rng(64)
    for shape in [(2, 3, 3, 4), (1, 2, 5, 5)]:
        x, dout = rng.standard_normal(shape), rng.standard_normal(shape)
        gamma, beta = rng.uniform(0.5, 1.5, shape[1]), rng.standard_normal(shape[1])
        mask = rng.random((shape[0],) + shape[2:]) < 0.4
        mask[0, 0, 0] = mask[-1, -1, -1] = True
        mine = ns["masked_batchnorm_backward_mine"](dout, x, gamma, mask, 1e-5)
        _, _, cache = masked_batchnorm_forward(x, gamma, beta, mask, 1e-5)
        for got, want in zip(mine, masked_batchnorm_backward(dout, cache)):
            np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)
        loss = lambda: float(np.sum(dout * masked_batchnorm_forward(x, gamma, beta, mask, 1e-5)[0]))  # noqa: E731
        np.testing.assert_allclose(mine[0], numerical_gradient(loss, x), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(mine[1], numerical_gradient(loss, gamma), rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- 07 probabilistic ACT


@check("ex07_1", "07")
def _(ns):
    h = np.array([0.2, 0.5, 0.5])
    np.testing.assert_allclose(ns["q_by_hand"], D.halting_distribution(h)[0], atol=1e-12)
    np.testing.assert_allclose(ns["expected_by_hand"], D.expected_steps_forward(h)[0], atol=1e-12)


@check("ex07_2", "07")
def _(ns):
    mine = ns["stick_breaking_backward_mine"]
    rng = np.random.default_rng(72)
    for shape in [(3, 4), (2, 2, 1), (5,)]:
        v, dw = rng.uniform(0.05, 0.95, shape), rng.standard_normal(shape[:-1] + (shape[-1] + 1,))
        numeric = numerical_gradient(lambda: float(np.sum(dw * D.stick_breaking_forward(v)[0])), v)
        np.testing.assert_allclose(mine(dw, v), numeric, rtol=1e-6, atol=1e-8)
    v = np.array([[0.3, 1.0, 0.4], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    dw = rng.standard_normal((3, 4))
    np.testing.assert_allclose(mine(dw, v), D.stick_breaking_backward(dw, D.stick_breaking_forward(v)[1]), atol=1e-12)


@check("ex07_3", "07")
def _(ns):
    rng = np.random.default_rng(73)
    logits = rng.standard_normal((6, 4))
    steps = rng.integers(1, 6, size=6)
    np.testing.assert_allclose(ns["log_q_score"](logits, steps), D.log_halting_probability_grad(logits, steps), atol=1e-12)
    f = rng.standard_normal(6)
    np.testing.assert_allclose(ns["reinforce_estimate"](logits, steps, f, 0.3),
                               (f - 0.3)[:, None] * D.log_halting_probability_grad(logits, steps), atol=1e-12)
    # unbiased, and a baseline at the mean lowers the variance
    a = np.array([0.4, -0.2, 0.1])
    values = np.array([2.0, 4.0, 3.0, 5.0])
    h = D.sigmoid(a)
    q, q_cache = D.halting_distribution(h)
    exact = D.stick_breaking_backward(values, q_cache) * h * (1 - h)
    draws = 100_000
    drawn = D.first_halt(D.bernoulli_from_noise(np.broadcast_to(a, (draws, 3)), D.uniform_noise((draws, 3), rng)))
    with_baseline = ns["reinforce_estimate"](np.broadcast_to(a, (draws, 3)), drawn, values[drawn - 1], float(q @ values))
    without = ns["reinforce_estimate"](np.broadcast_to(a, (draws, 3)), drawn, values[drawn - 1], 0.0)
    for estimate in (with_baseline, without):
        assert np.all(np.abs(estimate.mean(axis=0) - exact) < 5 * estimate.std(axis=0) / np.sqrt(draws))
    assert np.all(with_baseline.var(axis=0) < without.var(axis=0))


# --------------------------------------------------------------------------- 08 ACT in an RNN


@check("ex08_1", "08")
def _(ns):
    h = np.array([0.2, 0.9])
    act = halting_forward(h)
    assert ns["act_n"] == act.n_units
    np.testing.assert_allclose([ns["act_rho"], ns["pact_expected"]], [act.rho, D.expected_steps_forward(h)[0]], atol=1e-12)
    np.testing.assert_allclose(ns["act_p"], act.p, atol=1e-12)
    np.testing.assert_allclose(ns["pact_q"], D.halting_distribution(h)[0], atol=1e-12)
    assert ns["threshold_n"] == 2


@check("ex08_2", "08")
def _(ns):
    np.testing.assert_allclose(ns["kl_mine"]([0.98, 0.01, 0.01], np.log([0.5, 0.3, 0.2])), 0.59551, atol=1e-5)
    for phi, length in [(0.2, 6), (0.5, 1), (0.05, 12)]:
        np.testing.assert_allclose(ns["geometric_log_prior"](phi, length), D.truncated_geometric_log_prob(phi, length),
                                   atol=1e-12)
    rng = np.random.default_rng(82)
    q = rng.dirichlet(np.ones(5), size=6)
    q[0] = [0.5, 0.5, 0.0, 0.0, 0.0]
    log_prior = D.truncated_geometric_log_prob(0.3, 5)
    with np.errstate(divide="ignore"):
        reference = D.kl_to_prior_forward(np.log(q), log_prior)[0]
    np.testing.assert_allclose(ns["kl_mine"](q, log_prior), reference, atol=1e-12)


@check("ex08_3", "08")
def _(ns):
    mine = ns["expected_steps_backward_mine"]
    rng = np.random.default_rng(83)
    for shape in [(4, 5), (2, 3, 1), (6,)]:
        h, d = rng.uniform(0.05, 0.95, shape), rng.standard_normal(shape[:-1])
        numeric = numerical_gradient(lambda: float(np.sum(d * D.expected_steps_forward(h)[0])), h)
        np.testing.assert_allclose(mine(d, h), numeric, rtol=1e-6, atol=1e-8)
    h = np.array([[1.0, 0.3, 0.5], [0.2, 1.0, 1.0]])
    d = np.array([0.7, -1.3])
    np.testing.assert_allclose(mine(d, h), D.expected_steps_backward(d, D.expected_steps_forward(h)[1]), atol=1e-12)
