"""Halting math of ACT (docs/spec.md §7): golden vectors, properties and gradients."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from refimpl.gradcheck import check_gradients
from refimpl.halting import (
    halting_backward,
    halting_forward,
    ponder_cost_grad,
    still_running,
    weighted_output_backward,
    weighted_output_forward,
)

# docs/spec.md §7.5, verbatim: eps = 0.01, L = 5, the four given values are h_1..h_4.
GOLDEN = [
    ([0.999, 0.999, 0.999, 0.999], 1, 2.0, [1, 0, 0, 0, 0], [0, 0, 0, 0]),
    ([0.01, 0.5, 0.6, 0.7], 3, 3.49, [0.01, 0.5, 0.49, 0, 0], [-1, -1, 0, 0]),
    ([0.01, 0.01, 0.01, 0.01], 5, 5.96, [0.01, 0.01, 0.01, 0.01, 0.96], [-1, -1, -1, -1]),
]


@pytest.mark.parametrize("h, n, rho, p, drho_dh", GOLDEN)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_golden_vectors(h, n, rho, p, drho_dh, dtype):
    tol = 1e-6 if dtype == np.float32 else 1e-12
    result = halting_forward(np.array(h, dtype=dtype), eps=0.01)
    assert int(result.n_units) == n
    assert result.rho.dtype == dtype and result.p.dtype == dtype
    np.testing.assert_allclose(result.rho, rho, atol=tol)
    np.testing.assert_allclose(result.remainder, rho - n, atol=tol)
    np.testing.assert_allclose(result.p, p, atol=tol)
    np.testing.assert_array_equal(ponder_cost_grad(np.array(h, dtype=dtype)), drho_dh)


def test_golden_vectors_batched_over_any_leading_shape():
    h = np.array([g[0] for g in GOLDEN])  # (3, 4)
    h = np.broadcast_to(h[:, None, None, :], (3, 2, 4, 4)).copy()  # lead (3, 2, 4): like SACT's (N, H, W)
    result = halting_forward(h)
    assert result.p.shape == (3, 2, 4, 5) and result.rho.shape == (3, 2, 4)
    for i, (_, n, rho, p, drho) in enumerate(GOLDEN):
        assert np.all(result.n_units[i] == n)
        np.testing.assert_allclose(result.rho[i], rho, atol=1e-12)
        np.testing.assert_allclose(result.p[i], np.broadcast_to(p, (2, 4, 5)), atol=1e-12)
        np.testing.assert_array_equal(ponder_cost_grad(h)[i], np.broadcast_to(drho, (2, 4, 4)))


def test_scores_after_halting_do_not_matter():
    h = np.array([0.01, 0.5, 0.6, 0.7])
    other = h.copy()
    other[3] = 0.0  # unit 4 comes after N = 3: never computed, a block fills its score with 0
    a, b = halting_forward(h), halting_forward(other)
    np.testing.assert_array_equal(a.p, b.p)
    np.testing.assert_array_equal(a.rho, b.rho)


def test_all_zero_scores_run_every_unit_and_weight_only_the_last():
    result = halting_forward(np.zeros((6, 3)))
    assert np.all(result.n_units == 4)
    np.testing.assert_array_equal(result.p, np.tile([0, 0, 0, 1.0], (6, 1)))
    np.testing.assert_array_equal(result.rho, 5.0)


def test_eps_changes_the_threshold():
    h = np.array([0.5, 0.495])  # sum 0.995: halts at unit 2 with eps=0.01, not with eps=0.001
    assert int(halting_forward(h, eps=0.01).n_units) == 2
    assert int(halting_forward(h, eps=0.001).n_units) == 3


def test_still_running_is_the_rule_used_by_halting_forward():
    assert still_running(np.float64(0.98)) and not still_running(np.float64(0.99))


@given(hnp.arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 6)),
                  elements=st.floats(0, 1, allow_nan=False)))
def test_properties(h):
    result = halting_forward(h)
    n_total = h.shape[-1] + 1
    np.testing.assert_allclose(result.p.sum(axis=-1), 1.0, atol=1e-12)
    assert np.all(result.p >= -1e-12)
    assert np.all((result.n_units >= 1) & (result.n_units <= n_total))
    assert np.all((result.remainder > 0) | np.isclose(result.remainder, 0))
    # rho = N + R, and the remainder is positive and at most 1 (it is 1 minus a sum below 1 - eps)
    np.testing.assert_allclose(result.rho, result.n_units + result.remainder)
    assert np.all(result.remainder >= 0.01 - 1e-12) and np.all(result.remainder <= 1 + 1e-12)
    # the running sum before N is below 1 - eps, at N it reaches it (unless N = L)
    c = np.concatenate([np.zeros(h.shape[:-1] + (1,)), np.cumsum(h, axis=-1)], axis=-1)
    idx = result.n_units[..., None]
    assert np.all(np.take_along_axis(c, idx - 1, axis=-1) < 0.99)
    at_n = np.take_along_axis(np.concatenate([c[..., 1:], np.full(h.shape[:-1] + (1,), 2.0)], -1), idx - 1, -1)
    assert np.all(at_n >= 0.99)


def _scores_away_from_discontinuities(rng, shape, margin=0.05):
    """Scores whose running sums stay at least ``margin`` away from 1 - eps (N is then locally constant)."""
    while True:
        h = rng.uniform(0.0, 0.6, size=shape)
        c = np.cumsum(h, axis=-1)
        if np.all(np.abs(c - 0.99) > margin) and np.all(h > margin) and np.all(h < 1 - margin):
            return h


@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 3, 3)])
def test_backward_matches_central_differences(shape):
    rng = np.random.default_rng(0)
    h = _scores_away_from_discontinuities(rng, shape)
    upstream_rho = rng.standard_normal(shape[:-1])
    state = {}

    def forward(h):
        state["r"] = halting_forward(h)
        # one output holding both p and rho, so that one random upstream gradient tests both paths
        return np.concatenate([state["r"].p, state["r"].rho[..., None] * upstream_rho[..., None]], axis=-1)

    def backward(dout):
        dp, drho = dout[..., :-1], dout[..., -1] * upstream_rho
        return {"h": halting_backward(dp, drho, state["r"].cache)}

    errors = check_gradients(forward, backward, {"h": h}, rng)
    assert errors["h"] < 1e-7
    # the case mixes units before and after N, so both branches of the gradient are exercised
    n = halting_forward(h).n_units
    assert np.any(n < shape[-1] + 1) and np.any(n > 1)


def test_gradient_of_weighted_output_through_p():
    rng = np.random.default_rng(1)
    n, c, hw, n_units = 4, 3, 2, 4
    h = _scores_away_from_discontinuities(rng, (n, n_units - 1))
    units = rng.standard_normal((n_units, n, c, hw, hw))
    state = {}

    def forward(h, units):
        state["r"] = halting_forward(h)
        return weighted_output_forward(state["r"].p, units)

    def backward(dout):
        dp, dunits = weighted_output_backward(dout, state["r"].p, units)
        return {"h": halting_backward(dp, None, state["r"].cache), "units": dunits}

    errors = check_gradients(forward, backward, {"h": h, "units": units}, rng)
    assert errors["h"] < 1e-7 and errors["units"] < 1e-7


def test_weighted_output_of_golden_vector():
    units = np.arange(5.0)[:, None, None] * np.ones((5, 1, 2))  # U_n = n - 1 everywhere
    result = halting_forward(np.array([[0.01, 0.5, 0.6, 0.7]]))
    out = weighted_output_forward(result.p, units)
    np.testing.assert_allclose(out, 0.01 * 0 + 0.5 * 1 + 0.49 * 2)


@pytest.mark.parametrize("h, eps, error", [
    (np.array([0.5, 1.5]), 0.01, ValueError),
    (np.array([-0.1]), 0.01, ValueError),
    (np.array(0.5), 0.01, ValueError),
    (np.array([0.5]), 0.0, ValueError),
    (np.array([0.5]), 1.0, ValueError),
    (np.array([0.5]), "0.01", TypeError),
    (np.array([1, 0]), 0.01, TypeError),
])
def test_bad_input_raises(h, eps, error):
    with pytest.raises(error):
        halting_forward(h, eps)
