"""Distributions of probabilistic ACT: relaxed Bernoulli, halting distribution, prior, KL."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import integrate

from refimpl import distributions as D
from refimpl.gradcheck import check_gradients, numerical_gradient, relative_error
from tolerances import FLOAT64_REFORMULATION_RTOL

GRAD_TOL = 1e-6


def halting_probs(min_units=1, max_units=6, lo=0.0, hi=1.0):
    """Halting probabilities of shape (batch, L-1), endpoints included unless excluded."""
    return hnp.arrays(
        np.float64,
        st.tuples(st.integers(1, 3), st.integers(min_units, max_units)),
        elements=st.floats(lo, hi, exclude_min=lo > 0, exclude_max=hi < 1),
    )


# --------------------------------------------------------------------------- relaxed Bernoulli


@pytest.mark.parametrize("h, lam", [(0.3, 0.5), (0.8, 1.0), (0.5, 2.0)])
def test_relaxed_bernoulli_matches_closed_form_cdf_and_mean(h, lam):
    rng = np.random.default_rng(0)
    n = 200_000
    a = np.full(n, np.log(h) - np.log1p(-h))
    z, _ = D.relaxed_bernoulli_forward(a, lam, D.uniform_noise(n, rng))
    # empirical CDF against σ(λ logit t - logit h); binomial standard error, 4.5 sigma
    for t in (0.05, 0.25, 0.5, 0.75, 0.95):
        closed = float(D.relaxed_bernoulli_cdf(np.array(t), h, lam))
        se = np.sqrt(closed * (1 - closed) / n)
        assert abs(np.mean(z <= t) - closed) < 4.5 * se + 1e-12, t
    # P(z > 1/2) = h exactly for every temperature
    assert abs(np.mean(z > 0.5) - h) < 4.5 * np.sqrt(h * (1 - h) / n)
    # E[z] = ∫_0^1 (1 - F(t)) dt by quadrature of the closed-form CDF
    mean, _ = integrate.quad(lambda t: 1.0 - float(D.relaxed_bernoulli_cdf(np.array(t), h, lam)), 0, 1)
    assert abs(np.mean(z) - mean) < 4.5 * np.std(z) / np.sqrt(n)


def test_relaxed_bernoulli_symmetric_case_mean_is_one_half():
    # h = 1/2, λ = 1: z = σ(g) with logistic g, symmetric about 1/2
    rng = np.random.default_rng(1)
    n = 100_000
    z, _ = D.relaxed_bernoulli_forward(np.zeros(n), 1.0, D.uniform_noise(n, rng))
    assert abs(z.mean() - 0.5) < 4.5 * z.std() / np.sqrt(n)


@pytest.mark.parametrize("h", [0.1, 0.6])
def test_relaxed_bernoulli_approaches_bernoulli_as_temperature_vanishes(h):
    rng = np.random.default_rng(2)
    n = 50_000
    a = np.full(n, np.log(h) - np.log1p(-h))
    u = D.uniform_noise(n, rng)
    distances = []
    for lam in (1.0, 0.1, 0.01):
        z, _ = D.relaxed_bernoulli_forward(a, lam, u)
        distances.append(np.mean(np.minimum(z, 1 - z)))  # mean distance to {0, 1}
    assert distances[0] > distances[1] > distances[2]
    assert distances[2] < 0.01
    z, _ = D.relaxed_bernoulli_forward(a, 0.01, u)
    assert abs(z.mean() - h) < 4.5 * np.sqrt(h * (1 - h) / n) + distances[2]
    # and the limit is exactly the Bernoulli indicator drawn from the same noise
    hard = D.bernoulli_from_noise(a, u)
    assert np.mean(np.round(z) == hard) > 0.999


def test_relaxed_bernoulli_reparameterised_gradient_fixed_noise():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((4, 5)) * 2
    u = D.uniform_noise((4, 5), rng)
    cache = {}

    def forward(logits):
        z, cache["c"] = D.relaxed_bernoulli_forward(logits, 0.7, u)
        return z

    errors = check_gradients(forward, lambda dz: {"logits": D.relaxed_bernoulli_backward(dz, cache["c"])},
                             {"logits": logits}, rng)
    assert errors["logits"] < GRAD_TOL


def test_bernoulli_indicators_have_probability_h():
    rng = np.random.default_rng(4)
    h = np.array([0.05, 0.5, 0.9])
    n = 100_000
    a = np.broadcast_to(np.log(h) - np.log1p(-h), (n, 3))
    z = D.bernoulli_from_noise(a, D.uniform_noise((n, 3), rng))
    assert np.all(np.abs(z.mean(axis=0) - h) < 4.5 * np.sqrt(h * (1 - h) / n))
    # u = 1/2 is the threshold rule h > 1/2
    assert D.bernoulli_from_noise(np.array([-0.1, 0.1]), np.full(2, 0.5)).tolist() == [False, True]


# --------------------------------------------------------------------------- halting distribution


def test_halting_distribution_golden():
    # h = (0.5, 0.2): q = (0.5, 0.5·0.2, 0.5·0.8) = (0.5, 0.1, 0.4); E[n] = 1 + 0.5 + 0.4 = 1.9
    q, _ = D.halting_distribution(np.array([0.5, 0.2]))
    np.testing.assert_allclose(q, [0.5, 0.1, 0.4])
    e, _ = D.expected_steps_forward(np.array([0.5, 0.2]))
    np.testing.assert_allclose(e, 1.9)


@given(halting_probs())
def test_halting_distribution_sums_to_one_and_mean_is_expected_steps(h):
    q, _ = D.halting_distribution(h)
    assert np.all(q >= 0)
    np.testing.assert_allclose(q.sum(axis=-1), 1.0, rtol=0, atol=1e-12)
    e, _ = D.expected_steps_forward(h)
    np.testing.assert_allclose(e, q @ np.arange(1, q.shape[-1] + 1), rtol=FLOAT64_REFORMULATION_RTOL, atol=1e-12)


@given(halting_probs(lo=0.0, hi=1.0))
def test_log_halting_distribution_matches_log_q(h):
    h = np.clip(h, 1e-6, 1 - 1e-6)
    q, _ = D.halting_distribution(h)
    log_q, _ = D.log_halting_distribution_forward(np.log(h) - np.log1p(-h))
    np.testing.assert_allclose(log_q, np.log(q), rtol=1e-9, atol=1e-9)


def test_log_halting_distribution_is_finite_for_saturated_units():
    log_q, _ = D.log_halting_distribution_forward(np.array([60.0, -60.0]))
    assert np.all(np.isfinite(log_q))
    np.testing.assert_allclose(np.exp(log_q), [1.0, 0.0, 0.0], atol=1e-25)


def test_expected_steps_matches_monte_carlo():
    rng = np.random.default_rng(5)
    h = np.array([0.3, 0.1, 0.6, 0.2])
    n = 100_000
    a = np.broadcast_to(np.log(h) - np.log1p(-h), (n, 4))
    steps = D.first_halt(D.bernoulli_from_noise(a, D.uniform_noise((n, 4), rng)))
    e, _ = D.expected_steps_forward(h)
    assert abs(steps.mean() - e) < 4.5 * steps.std() / np.sqrt(n)
    q, _ = D.halting_distribution(h)
    freq = np.bincount(steps, minlength=6)[1:] / n
    assert np.all(np.abs(freq - q) < 4.5 * np.sqrt(q * (1 - q) / n))


def test_first_halt():
    z = np.array([[False, True, True], [False, False, False], [True, False, False]])
    assert D.first_halt(z).tolist() == [2, 4, 1]


@given(halting_probs(min_units=1, max_units=5))
def test_stick_breaking_weights_sum_to_one(v):
    w, _ = D.stick_breaking_forward(v)
    assert np.all(w >= 0)
    np.testing.assert_allclose(w.sum(axis=-1), 1.0, atol=1e-12)


def test_stick_breaking_backward():
    rng = np.random.default_rng(6)
    v = rng.uniform(0.05, 0.95, (3, 4))
    cache = {}

    def forward(v):
        w, cache["c"] = D.stick_breaking_forward(v)
        return w

    errors = check_gradients(forward, lambda d: {"v": D.stick_breaking_backward(d, cache["c"])}, {"v": v}, rng)
    assert errors["v"] < GRAD_TOL


def test_stick_breaking_backward_with_a_fraction_of_one():
    # v = 1 leaves nothing for later iterations; the backward must not divide by 1 - v.
    # The weights are polynomials in v, so the gradient at 1 is the limit of interior gradients.
    rng = np.random.default_rng(10)
    v = rng.uniform(0.05, 0.95, (2, 4))
    v[0, 1] = 1.0
    upstream = rng.standard_normal((2, 5))
    _, cache = D.stick_breaking_forward(v)
    analytic = D.stick_breaking_backward(upstream, cache)
    near = v.copy()
    near[0, 1] = 1.0 - 1e-6
    numeric = numerical_gradient(lambda: float(np.sum(D.stick_breaking_forward(near)[0] * upstream)), near, h=1e-7)
    assert np.all(np.isfinite(analytic))
    assert relative_error(analytic, numeric) < 1e-5


def test_expected_steps_backward():
    rng = np.random.default_rng(7)
    h = rng.uniform(0.05, 0.95, (2, 3, 4))
    cache = {}

    def forward(h):
        e, cache["c"] = D.expected_steps_forward(h)
        return e

    errors = check_gradients(forward, lambda d: {"h": D.expected_steps_backward(d, cache["c"])}, {"h": h}, rng)
    assert errors["h"] < GRAD_TOL


def test_log_halting_distribution_backward_and_score():
    rng = np.random.default_rng(8)
    a = rng.standard_normal((3, 4)) * 2
    cache = {}

    def forward(a):
        log_q, cache["c"] = D.log_halting_distribution_forward(a)
        return log_q

    errors = check_gradients(forward, lambda d: {"a": D.log_halting_distribution_backward(d, cache["c"])},
                             {"a": a}, rng)
    assert errors["a"] < GRAD_TOL
    steps = np.array([1, 3, 5])
    score = D.log_halting_probability_grad(a, steps)
    for i, n in enumerate(steps):
        row = a[i].copy()
        numeric = numerical_gradient(lambda: float(D.log_halting_distribution_forward(row)[0][n - 1]), row)
        assert relative_error(score[i], numeric) < GRAD_TOL


# --------------------------------------------------------------------------- prior and KL


def test_truncated_geometric_prior():
    phi, length = 0.2, 6
    log_p = D.truncated_geometric_log_prob(phi, length)
    np.testing.assert_allclose(np.exp(log_p).sum(), 1.0, atol=1e-14)
    beta = D.geometric_beta(phi)
    np.testing.assert_allclose(beta, -np.log(0.8))
    # log p(n) = -β n + const
    np.testing.assert_allclose(np.diff(log_p), -beta)
    # untruncated limit: p(1) → φ
    np.testing.assert_allclose(np.exp(D.truncated_geometric_log_prob(phi, 400)[0]), phi)


def test_kl_is_in_ponder_net_direction():
    # q = (0.98, 0.01, 0.01), prior p = (0.5, 0.3, 0.2):
    # KL(q‖p) = 0.98 ln(0.98/0.5) + 0.01 ln(0.01/0.3) + 0.01 ln(0.01/0.2)
    #         = 0.65948 - 0.03401 - 0.02996 = 0.59551
    # KL(p‖q) = 0.5 ln(0.5/0.98) + 0.3 ln(0.3/0.01) + 0.2 ln(0.2/0.01)
    #         = -0.33647 + 1.02036 + 0.59915 = 1.28304
    q = np.array([0.98, 0.01, 0.01])
    p = np.array([0.5, 0.3, 0.2])
    kl, _ = D.kl_to_prior_forward(np.log(q), np.log(p))
    forward_kl = np.sum(q * np.log(q / p))
    reverse_kl = np.sum(p * np.log(p / q))
    np.testing.assert_allclose(kl, forward_kl, rtol=FLOAT64_REFORMULATION_RTOL)
    np.testing.assert_allclose(kl, 0.59551, atol=1e-5)
    assert abs(reverse_kl - 1.28304) < 1e-5 and abs(kl - reverse_kl) > 0.5


def test_kl_backward_and_zero_at_prior():
    rng = np.random.default_rng(9)
    log_prior = D.truncated_geometric_log_prob(0.3, 5)
    kl, _ = D.kl_to_prior_forward(log_prior, log_prior)
    assert abs(kl) < 1e-14
    a = rng.standard_normal((4, 4))
    cache = {}

    def forward(a):  # the whole chain used by PonderNet: logits → log q → KL
        log_q, cache["q"] = D.log_halting_distribution_forward(a)
        kl, cache["kl"] = D.kl_to_prior_forward(log_q, log_prior)
        return kl

    def backward(dkl):
        return {"a": D.log_halting_distribution_backward(D.kl_to_prior_backward(dkl, cache["kl"]), cache["q"])}

    assert check_gradients(forward, backward, {"a": a}, rng)["a"] < GRAD_TOL
    assert np.all(forward(a) >= 0)


# --------------------------------------------------------------------------- validation


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="temperature"):
        D.relaxed_bernoulli_forward(np.zeros(2), 0.0, np.full(2, 0.5))
    with pytest.raises(ValueError, match="u must lie"):
        D.relaxed_bernoulli_forward(np.zeros(2), 1.0, np.array([0.0, 0.5]))
    with pytest.raises(ValueError, match="shape"):
        D.relaxed_bernoulli_forward(np.zeros(2), 1.0, np.full(3, 0.5))
    with pytest.raises(ValueError, match=r"h must lie in \[0, 1\]"):
        D.expected_steps_forward(np.array([1.5]))
    with pytest.raises(ValueError, match="phi"):
        D.truncated_geometric_log_prob(1.0, 3)
    with pytest.raises(ValueError, match="length"):
        D.truncated_geometric_log_prob(0.5, 0)
    with pytest.raises(TypeError, match="Generator"):
        D.uniform_noise(3, 0)
    with pytest.raises(ValueError, match="steps"):
        D.log_halting_probability_grad(np.zeros((1, 2)), np.array([4]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_noise_stays_strictly_inside_the_unit_interval(dtype):
    # a double just below 1 rounds to exactly 1.0 in float32 (found by a PACT-ResNet training run)
    u = D.open_unit_interval(np.array([0.0, 0.5, 1.0 - 1e-9, 1.0]), dtype)
    assert u.dtype == dtype and np.all((u > 0) & (u < 1))
    assert np.all(np.isfinite(np.log(u) - np.log1p(-u)))
    noise = D.uniform_noise((1000,), np.random.default_rng(0), dtype)
    assert noise.dtype == dtype and np.all((noise > 0) & (noise < 1))


def test_kl_with_a_zero_probability_is_finite():
    # q(3) = 0, so log q(3) = -inf: the term is 0 log 0 = 0, not NaN, and its gradient is 0.
    q = np.array([0.7, 0.3, 0.0])
    log_prior = D.truncated_geometric_log_prob(0.4, 3)
    with np.errstate(divide="ignore"):
        log_q = np.log(q)
    kl, cache = D.kl_to_prior_forward(log_q, log_prior)
    expected = 0.7 * (np.log(0.7) - log_prior[0]) + 0.3 * (np.log(0.3) - log_prior[1])
    np.testing.assert_allclose(kl, expected, rtol=FLOAT64_REFORMULATION_RTOL)
    dlog_q = D.kl_to_prior_backward(np.float64(2.0), cache)
    assert np.all(np.isfinite(dlog_q)) and dlog_q[2] == 0.0
    np.testing.assert_allclose(dlog_q[:2], 2.0 * q[:2] * (log_q[:2] - log_prior[:2] + 1.0), rtol=FLOAT64_REFORMULATION_RTOL)


def test_kl_rejects_what_is_not_a_log_distribution():
    log_prior = D.truncated_geometric_log_prob(0.4, 3)
    with pytest.raises(ValueError, match="log_q must be the log of a distribution"):
        D.kl_to_prior_forward(np.log([0.5, 0.6, 0.2]), log_prior)  # sums to 1.3
    with pytest.raises(ValueError, match="log_q must be the log of a distribution"):
        D.kl_to_prior_forward(np.array([0.5, 0.3, 0.2]), log_prior)  # q itself, not its log
    with pytest.raises(ValueError, match="log_q must be log-probabilities"):
        D.kl_to_prior_forward(np.array([np.inf, 0.0, 0.0]), log_prior)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_relaxed_bernoulli_rejects_a_non_positive_or_non_finite_temperature(temperature):
    with pytest.raises(ValueError, match="temperature must be positive and finite"):
        D.relaxed_bernoulli_forward(np.zeros(2), temperature, np.full(2, 0.5))
