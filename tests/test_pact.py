"""The PACT adaptive computation block: relaxed, discrete and thresholded modes."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl import distributions as D
from refimpl import pact
from refimpl.gradcheck import check_gradients

GRAD_TOL = 1e-6


class MixUnit:
    """Toy unit: U = tanh(W U_prev + b) over the channel axis; halting logit a = v·U + c per latent."""

    def __init__(self, rng, channels, scale=1.0):
        self.params = {
            "w": rng.standard_normal((channels, channels)) * scale / np.sqrt(channels),
            "b": rng.standard_normal(channels) * 0.1,
            "v": rng.standard_normal(channels),
            "c": rng.standard_normal(1),
        }
        self.grads = {k: np.zeros_like(p) for k, p in self.params.items()}
        self.calls = []

    def forward(self, state, rows):
        self.calls.append(np.array(rows))
        p = self.params
        pre = np.einsum("kc,nc...->nk...", p["w"], state) + p["b"].reshape((1, -1) + (1,) * (state.ndim - 2))
        out = np.tanh(pre)
        a = np.einsum("c,nc...->n...", p["v"], out) + p["c"][0]
        return out, a, (state, out)

    def backward(self, dout, da, cache):
        state, out = cache
        p, g = self.params, self.grads
        dout = dout + np.expand_dims(da, 1) * p["v"].reshape((1, -1) + (1,) * (out.ndim - 2))
        summed = (0,) + tuple(range(2, out.ndim))  # batch and spatial axes
        g["v"] += np.sum(np.expand_dims(da, 1) * out, axis=summed)
        g["c"] += np.sum(da)
        dpre = dout * (1 - out**2)
        g["w"] += np.tensordot(dpre, state, axes=(summed, summed))
        g["b"] += np.sum(dpre, axis=summed)
        return np.einsum("kc,nk...->nc...", p["w"], dpre)


class ScriptedUnit:
    """Unit whose output and halting logit are fixed per example (for crafted cases)."""

    def __init__(self, outputs, logits):
        self.outputs, self.logits = outputs, logits
        self.calls = []
        self.grads = {"logits": np.zeros_like(logits)}

    def forward(self, state, rows):
        self.calls.append(np.array(rows))
        return self.outputs[rows] + 0 * state, self.logits[rows], rows

    def backward(self, dout, da, rows):
        np.add.at(self.grads["logits"], rows, da)
        return np.zeros_like(dout)


def make_units(rng, n_units, channels, scale=1.0):
    return [MixUnit(rng, channels, scale) for _ in range(n_units)]


def block_check(mode, spatial, seed=0, n_units=4):
    """Gradient check of a block w.r.t. its input and every unit parameter (float64, fixed noise)."""
    rng = np.random.default_rng(seed)
    units = make_units(rng, n_units, channels=3)
    for u in units:  # halting biases below zero: every unit keeps a weight large enough to difference
        u.params["c"][...] = -1.5
    shape = (2, 3) + ((2, 3) if spatial else ())
    x = rng.standard_normal(shape)
    latent = (shape[0],) + shape[2:]
    noise = D.uniform_noise(latent + (n_units - 1,), rng)
    if mode == "discrete":  # keep every u away from its threshold 1 - h so no step count flips
        _, logits, _ = pact.unroll_forward(units, x)
        margin = noise - (1 - D.sigmoid(logits))
        noise = np.where(np.abs(margin) < 0.02, np.clip(noise + 0.05 * np.sign(margin + 1e-12), 0.01, 0.99), noise)
    inputs = {"x": x}
    for i, u in enumerate(units):
        for k, p in u.params.items():
            inputs[f"{i}.{k}"] = p
    cache = {}

    def forward(x, **_):
        if mode == "relaxed":
            result, cache["c"] = pact.relaxed_forward(units, x, 0.6, noise)
        else:
            result, cache["c"] = pact.discrete_forward(units, x, noise)
        cache["n_out"] = result.output.size
        return np.concatenate([result.output.ravel(), result.expected_steps.ravel()])

    def backward(upstream):
        for u in units:
            for g in u.grads.values():
                g[...] = 0
        dout = upstream[: cache["n_out"]].reshape(x.shape)
        dexp = upstream[cache["n_out"]:].reshape(latent)
        if mode == "relaxed":
            dx = pact.relaxed_backward(dout, dexp, cache["c"])
        else:  # the score term is not a derivative of this forward: leave it out here
            dx = pact.discrete_backward(dout, dexp, None, cache["c"])
        grads = {"x": dx}
        for i, u in enumerate(units):
            for k, g in u.grads.items():
                grads[f"{i}.{k}"] = g.copy()
        return grads

    return check_gradients(forward, backward, inputs, rng)


@pytest.mark.parametrize("spatial", [False, True])
def test_relaxed_block_gradients(spatial):
    errors = block_check("relaxed", spatial)
    assert max(errors.values()) < GRAD_TOL, errors


@pytest.mark.parametrize("spatial", [False, True])
def test_discrete_block_pathwise_and_expected_steps_gradients(spatial):
    errors = block_check("discrete", spatial, seed=1)
    assert max(errors.values()) < GRAD_TOL, errors


def test_relaxed_weights_sum_to_one_and_output_is_weighted_states():
    rng = np.random.default_rng(2)
    units = make_units(rng, 5, 4)
    x = rng.standard_normal((3, 4, 2, 2))
    result, cache = pact.relaxed_forward(units, x, 0.5, rng)
    np.testing.assert_allclose(cache.weights.sum(axis=-1), 1.0, atol=1e-12)
    expected = sum(cache.weights[:, None, ..., l] * s for l, s in enumerate(cache.states))
    np.testing.assert_allclose(result.output, expected, atol=1e-12)
    assert result.noise.shape == (3, 2, 2, 4)


def test_relaxed_block_at_low_temperature_is_the_discrete_block_with_the_same_noise():
    rng = np.random.default_rng(3)
    units = make_units(rng, 4, 3)
    x = rng.standard_normal((50, 3))
    discrete, _ = pact.discrete_forward(units, x, rng)
    relaxed, _ = pact.relaxed_forward(units, x, 1e-3, discrete.noise)
    # a relaxed sample is hard unless the logistic noise lands within ~λ of -a: rare at λ = 1e-3
    close = np.all(np.abs(relaxed.output - discrete.output) < 1e-3, axis=1)
    assert close.mean() > 0.95


def test_discrete_expected_output_is_sum_of_q_times_states():
    rng = np.random.default_rng(4)
    units = make_units(rng, 4, 3, scale=2.0)
    n = 40_000
    x = np.broadcast_to(rng.standard_normal((1, 3)), (n, 3)).copy()  # one example, n noise draws
    result, cache = pact.discrete_forward(units, x, rng)
    q, _ = D.halting_distribution(D.sigmoid(cache.logits[0]))
    exact = sum(q[l] * s[0] for l, s in enumerate(cache.states))
    se = result.output.std(axis=0) / np.sqrt(n)
    assert np.all(np.abs(result.output.mean(axis=0) - exact) < 4.5 * se + 1e-12)
    assert abs(result.steps.mean() - result.expected_steps[0]) < 4.5 * result.steps.std() / np.sqrt(n)


def test_reinforce_gradient_is_unbiased():
    # f(n) = <g, U_n> with fixed unit outputs; the halting logits are the only parameters, so
    # ∇ E_q[f] = Σ_n f(n) ∇ q(n) comes from the halting distribution's backward analytically.
    rng = np.random.default_rng(5)
    n_units, n_samples = 4, 40_000
    logits = np.array([-0.5, 0.3, -1.0])
    values = rng.standard_normal((n_units, 2))
    g = rng.standard_normal(2)
    f = values @ g
    q, qcache = D.halting_distribution(D.sigmoid(logits))
    h = D.sigmoid(logits)
    analytic = D.stick_breaking_backward(f, qcache) * h * (1 - h)

    def estimates(baseline):
        units = [ScriptedUnit(np.broadcast_to(values[l], (n_samples, 2)),
                              np.full(n_samples, logits[l] if l < n_units - 1 else 0.0))
                 for l in range(n_units)]
        x = np.zeros((n_samples, 2))
        result, cache = pact.discrete_forward(units, x, rng)
        sampled_f = result.output @ g
        pact.discrete_backward(np.zeros_like(x), None, sampled_f - baseline, cache)
        return np.stack([units[l].grads["logits"] for l in range(n_units - 1)], axis=1)

    for baseline in (0.0, float(q @ f)):
        est = estimates(baseline)
        se = est.std(axis=0) / np.sqrt(n_samples)
        assert np.all(np.abs(est.mean(axis=0) - analytic) < 4.5 * se), (baseline, est.mean(axis=0), analytic, se)
    # the baseline E[f] reduces the variance of the estimator here
    assert estimates(float(q @ f)).var(axis=0).sum() < estimates(0.0).var(axis=0).sum()


def test_moving_average_baseline():
    b = pact.MovingAverageBaseline(decay=0.5, shape=(2,))
    np.testing.assert_allclose(b.subtract(np.ones((3, 2))), 1.0)  # zero before any batch
    b.update(np.array([[1.0, 4.0], [3.0, 0.0]]))
    np.testing.assert_allclose(b.value, [2.0, 2.0])
    b.update(np.array([[4.0, 0.0]]))
    np.testing.assert_allclose(b.value, [3.0, 1.0])
    np.testing.assert_allclose(b.subtract(np.array([[3.0, 3.0]])), [[0.0, 2.0]])
    with pytest.raises(ValueError, match="shape"):
        b.update(np.ones((2, 3)))


def test_thresholded_stops_at_first_h_above_one_half_on_crafted_inputs():
    # three examples, four units; logits chosen so the first a > 0 is at unit 2, never, unit 1
    logits = np.array([[-1.0, 0.5, 3.0, 0.0], [-2.0, -0.1, -5.0, 0.0], [0.2, -3.0, 4.0, 0.0]])
    outputs = np.arange(4 * 3 * 2, dtype=float).reshape(4, 3, 2)
    units = [ScriptedUnit(outputs[l], logits[:, l]) for l in range(4)]
    result = pact.halt_early_forward(units, np.zeros((3, 2)))
    assert result.steps.tolist() == [2, 4, 1]
    np.testing.assert_array_equal(result.output, outputs[[1, 3, 0], [0, 1, 2]])
    # no wasted work: a unit runs only on examples still running
    assert [c.tolist() for c in (u.calls[0] for u in units)] == [[0, 1, 2], [0, 1], [1], [1]]
    assert result.units_run.tolist() == [2, 4, 1]


@given(st.integers(0, 10_000), st.booleans())
def test_thresholded_equals_discrete_with_noise_one_half(seed, spatial):
    rng = np.random.default_rng(seed)
    units = make_units(rng, 5, 3, scale=2.0)
    for u in units:
        u.params["c"][...] = rng.normal(0, 2)
    shape = (4, 3, 2, 2) if spatial else (4, 3)
    x = rng.standard_normal(shape)
    latent = (4,) + shape[2:]
    discrete, _ = pact.discrete_forward(units, x, np.full(latent + (4,), 0.5))
    early = pact.halt_early_forward(units, x)
    np.testing.assert_array_equal(early.steps, discrete.steps)
    np.testing.assert_allclose(early.output, discrete.output, rtol=0, atol=1e-14)
    assert np.array_equal(early.units_run, discrete.steps.reshape(4, -1).max(axis=1))


def test_sampled_early_halting_follows_q():
    rng = np.random.default_rng(6)
    units = make_units(rng, 4, 3, scale=2.0)
    n = 20_000
    x = np.broadcast_to(rng.standard_normal((1, 3)), (n, 3)).copy()
    early = pact.halt_early_forward(units, x, rule="sample", rng=rng)
    _, logits, _ = pact.unroll_forward(units, x[:1])
    q, _ = D.halting_distribution(D.sigmoid(logits[0]))
    freq = np.bincount(early.steps, minlength=5)[1:] / n
    assert np.all(np.abs(freq - q) < 4.5 * np.sqrt(q * (1 - q) / n) + 1e-12)


def test_single_unit_block():
    rng = np.random.default_rng(7)
    units = make_units(rng, 1, 3)
    x = rng.standard_normal((2, 3))
    result, _ = pact.relaxed_forward(units, x, 0.5, rng)
    np.testing.assert_allclose(result.expected_steps, 1.0)
    np.testing.assert_allclose(result.output, units[0].forward(x, np.arange(2))[0])


def test_block_input_validation():
    rng = np.random.default_rng(8)
    units = make_units(rng, 3, 2)
    x = rng.standard_normal((2, 2))
    with pytest.raises(ValueError, match="noise must have shape"):
        pact.relaxed_forward(units, x, 0.5, np.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="units"):
        pact.discrete_forward([], x, rng)
    with pytest.raises(ValueError, match="rule"):
        pact.halt_early_forward(units, x, rule="maybe")
    with pytest.raises(TypeError, match="Generator"):
        pact.halt_early_forward(units, x, rule="sample")
