"""ACT for RNNs: the cell, the three objectives (act, pact, pondernet), evaluation and parity."""

import numpy as np
import pytest

from refimpl import distributions as D
from refimpl import halting, pact
from refimpl.act_rnn import ACTRNN, RNNStep, act_halt_early, evaluate, logistic_loss, objective_backward, objective_forward
from refimpl.gradcheck import check_gradients
from refimpl.parity import evaluate_parity, parity_batch, train_parity
from tolerances import FLOAT64_REFORMULATION_RTOL

GRAD_TOL = 1e-6


def small_problem(seed, max_steps=4, halting_bias=-0.5):
    rng = np.random.default_rng(seed)
    rnn = ACTRNN(3, hidden_size=5, max_steps=max_steps, halting_bias=halting_bias, rng=rng, dtype=np.float64)
    for p in rnn.params.values():  # non-zero biases, so every parameter gets a generic gradient
        p += 0.3 * rng.standard_normal(p.shape)
    x = rng.standard_normal((3, 2, 3))  # N = 3 examples, T = 2 timesteps: BPTT across timesteps
    y = rng.integers(0, 2, (3, 2))
    return rng, rnn, x, y


@pytest.mark.parametrize("objective", ["act", "pact", "pondernet"])
def test_objective_gradients_float64(objective):
    rng, rnn, x, y = small_problem(seed={"act": 0, "pact": 1, "pondernet": 2}[objective])
    noise = D.uniform_noise((2, 3, rnn.max_steps - 1), rng)
    settings = dict(tau=0.05, temperature=0.7, beta=0.3, prior_rate=0.3, noise=noise)
    if objective == "act":  # keep the cumulative halting sums away from ACT's jump at 1 - ε
        units = rnn.step_units(x[:, 0])
        _, logits, _ = pact.unroll_forward(units, np.zeros((3, 5)))
        cumulative = np.cumsum(D.sigmoid(logits), axis=-1)
        assert np.min(np.abs(cumulative - 0.99)) > 1e-3
    cache = {}

    def forward(x, **_):
        result, cache["c"] = objective_forward(rnn, x, y, objective, **settings)
        return result.loss

    def backward(dloss):
        rnn.zero_grad()
        dstate0 = objective_backward(dloss, cache["c"], rnn)
        assert dstate0.shape == (3, 5)
        return {"x": np.zeros_like(x), **{k: g.copy() for k, g in rnn.grads.items()}}

    inputs = {"x": x, **rnn.params}
    errors = check_gradients(forward, backward, inputs, rng)
    errors.pop("x")  # the objective's input gradient is not returned (inputs are data)
    assert max(errors.values()) < GRAD_TOL, errors
    for name in rnn.params:
        assert np.any(rnn.grads[name] != 0), name


def test_rnn_step_gradients_including_state():
    rng, rnn, x, _ = small_problem(3)
    step = RNNStep(rnn, x[:, 0], first=False)
    state = rng.standard_normal((3, 5))
    cache = {}

    def forward(state, **_):
        new, a, cache["c"] = step.forward(state, np.arange(3))
        return np.concatenate([new.ravel(), a])

    def backward(up):
        rnn.zero_grad()
        dstate = step.backward(up[:15].reshape(3, 5), up[15:], cache["c"])
        return {"state": dstate, **{k: g.copy() for k, g in rnn.grads.items()}}

    inputs = {"state": state, **{k: rnn.params[k] for k in ("w_in", "w_rec", "b", "w_halt", "b_halt")}}
    errors = check_gradients(forward, backward, inputs, rng)
    assert max(errors.values()) < GRAD_TOL, errors


def test_first_step_flag_reaches_the_cell():
    rng, rnn, x, _ = small_problem(4)
    state = rng.standard_normal((3, 5))
    first = RNNStep(rnn, x[:, 0], first=True).forward(state, np.arange(3))[0]
    later = RNNStep(rnn, x[:, 0], first=False).forward(state, np.arange(3))[0]
    flag_column = rnn.params["w_in"][:, -1]
    np.testing.assert_allclose(np.arctanh(first) - np.arctanh(later), np.broadcast_to(flag_column, (3, 5)),
                               atol=1e-10)


def test_act_objective_matches_halting_math_by_hand():
    rng, rnn, x, y = small_problem(5, max_steps=3)
    x1, y1 = x[:, :1], y[:, :1]
    result, _ = objective_forward(rnn, x1, y1, "act", tau=0.1)
    states, logits, _ = pact.unroll_forward(rnn.step_units(x1[:, 0]), np.zeros((3, 5)))
    halt = halting.halting_forward(D.sigmoid(logits))
    state = sum(halt.p[:, n, None] * states[n] for n in range(3))
    task, _ = logistic_loss(rnn.readout(state), y1[:, 0])
    np.testing.assert_allclose(result.loss, task + 0.1 * halt.rho, rtol=FLOAT64_REFORMULATION_RTOL)
    np.testing.assert_allclose(result.ponder_cost[:, 0], halt.rho)


def test_pondernet_objective_uses_kl_of_halting_distribution_to_prior():
    # Crafted: a halting unit that nearly always stops at step 1 (q ≈ (1, 0, 0, 0)) against a
    # slow prior. KL(q‖prior) ≈ -log prior(1) is small-ish; KL(prior‖q) is huge. The objective
    # must contain the first.
    rng, rnn, x, y = small_problem(6, max_steps=4)
    rnn.params["w_halt"][...] = 0.0
    rnn.params["b_halt"][...] = 4.0  # λ = σ(4) ≈ 0.982 at every step
    x1, y1 = x[:, :1], y[:, :1]
    beta = 1.0
    with_kl, _ = objective_forward(rnn, x1, y1, "pondernet", beta=beta, prior_rate=0.1)
    without, _ = objective_forward(rnn, x1, y1, "pondernet", beta=0.0, prior_rate=0.1)
    kl_in_objective = with_kl.loss - without.loss
    log_q, _ = D.log_halting_distribution_forward(np.full((3, 3), 4.0))
    log_prior = D.truncated_geometric_log_prob(0.1, 4)
    q, p = np.exp(log_q[0]), np.exp(log_prior)
    forward_kl, reverse_kl = np.sum(q * (log_q[0] - log_prior)), np.sum(p * (log_prior - log_q[0]))
    assert reverse_kl > 2 * forward_kl  # the two directions really differ here
    np.testing.assert_allclose(kl_in_objective, forward_kl, rtol=1e-10)


def test_evaluate_thresholded_matches_first_h_above_one_half():
    rng, rnn, x, y = small_problem(7, max_steps=5, halting_bias=0.0)
    rnn.params["w_halt"] *= 5  # spread the halting logits across both signs
    ev = evaluate(rnn, x, y, "thresholded")
    state = np.zeros((3, 5))
    for t in range(2):
        states, logits, _ = pact.unroll_forward(rnn.step_units(x[:, t]), state)
        above = np.concatenate([logits > 0, np.ones((3, 1), bool)], axis=1)
        n = np.argmax(above, axis=1) + 1
        np.testing.assert_array_equal(ev.steps[:, t], n)
        state = np.stack(states)[n - 1, np.arange(3)]
        np.testing.assert_array_equal(ev.predictions[:, t], (rnn.readout(state) > 0).astype(int))
    # ACT's online early halting equals the halting math on all unrolled steps
    act = evaluate(rnn, x, y, "act")
    state = np.zeros((3, 5))
    for t in range(2):
        states, logits, _ = pact.unroll_forward(rnn.step_units(x[:, t]), state)
        halt = halting.halting_forward(D.sigmoid(logits))
        state = halting.weighted_output_forward(halt.p, np.stack(states))
        np.testing.assert_array_equal(act.steps[:, t], halt.n_units)
        np.testing.assert_array_equal(act.predictions[:, t], (rnn.readout(state) > 0).astype(int))
    early_state, _ = act_halt_early(rnn.step_units(x[:, 0]), np.zeros((3, 5)))
    states, logits, _ = pact.unroll_forward(rnn.step_units(x[:, 0]), np.zeros((3, 5)))
    halt = halting.halting_forward(D.sigmoid(logits))
    np.testing.assert_allclose(early_state, halting.weighted_output_forward(halt.p, np.stack(states)), atol=1e-14)
    assert len(set(act.steps.ravel())) > 1  # the crafted weights give different N per example
    sampled = evaluate(rnn, x, y, "sample", rng=np.random.default_rng(0))
    assert np.all((sampled.steps >= 1) & (sampled.steps <= 5))


def test_parity_batch():
    rng = np.random.default_rng(8)
    batch = parity_batch(500, 10, rng)
    assert batch.inputs.shape == (500, 1, 10) and batch.targets.shape == (500, 1)
    assert set(np.unique(batch.inputs)) <= {-1.0, 0.0, 1.0}
    np.testing.assert_array_equal(np.sum(batch.inputs[:, 0] != 0, axis=1), batch.nonzero)
    np.testing.assert_array_equal(batch.targets[:, 0], np.sum(batch.inputs[:, 0] == 1, axis=1) % 2)
    assert batch.nonzero.min() == 1 and batch.nonzero.max() == 10
    # the positions are random, not always the first k entries
    assert np.any(batch.inputs[:, 0, -1] != 0) and np.any((batch.nonzero < 10) & (batch.inputs[:, 0, 0] == 0))
    # seeded: the same Generator state gives the same batch
    again = parity_batch(500, 10, np.random.default_rng(8))
    np.testing.assert_array_equal(again.inputs, batch.inputs)


@pytest.mark.parametrize("objective", ["act", "pact", "pondernet"])
def test_parity_training_reduces_the_loss(objective):
    rng = np.random.default_rng(9)
    rnn, log = train_parity(objective, size=3, steps=300, batch_size=64, hidden_size=32, max_steps=5,
                            lr=3e-3, rng=rng, log_every=50)
    assert log.task_loss[-1] < 0.6 * log.task_loss[0], log.task_loss
    report = evaluate_parity(rnn, 3, "act" if objective == "act" else "thresholded", batch_size=500,
                             rng=np.random.default_rng(10))
    assert report.accuracy > 0.8
    assert set(report.steps_by_nonzero) == {1, 2, 3}


def test_bad_inputs():
    rng, rnn, x, y = small_problem(11)
    with pytest.raises(ValueError, match="objective"):
        objective_forward(rnn, x, y, "graves")
    with pytest.raises(ValueError, match="noise"):
        objective_forward(rnn, x, y, "pact")
    with pytest.raises(ValueError, match="x must have shape"):
        objective_forward(rnn, x[..., :2], y, "act")
    with pytest.raises(ValueError, match="binary"):
        objective_forward(rnn, x, y + 2, "act")
    with pytest.raises(ValueError, match="rule"):
        evaluate(rnn, x, y, "median")
    with pytest.raises(ValueError, match="size"):
        parity_batch(4, 0, rng)


def test_parity_cli(tmp_path, capsys):
    from refimpl.cli import main

    out = tmp_path / "parity.json"
    assert main(["parity", "--objective", "pondernet", "--size", "3", "--steps", "20", "--hidden", "8",
                 "--max-steps", "4", "--eval-size", "50", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "thresholded: accuracy" in printed and "sample: accuracy" in printed
    import json

    result = json.loads(out.read_text())
    assert result["settings"]["objective"] == "pondernet"
    assert set(result["evaluation"]) == {"thresholded", "sample"}
    assert len(result["log"]["task_loss"]) == 10
