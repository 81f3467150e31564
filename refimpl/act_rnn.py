r"""Adaptive computation time for recurrent networks (Graves 2016), three ways (docs/spec.md §10).

At every input timestep ``t`` an RNN cell is applied up to ``M`` times ("ponder steps") before
the next input is read. Step ``n`` of timestep ``t`` is

.. math::

    s_t^n = \tanh\big(W_x [x_t;\ \delta_{n,1}] + W_s s_t^{n-1} + b\big), \qquad
    h_t^n = \sigma(w_h \cdot s_t^n + b_h),

with :math:`s_t^0 = s_{t-1}` and the binary flag :math:`\delta_{n,1}` telling the cell that a new
input has arrived. The ``M`` applications are the units of an adaptive computation block
(:mod:`refimpl.pact` unit protocol, :class:`RNNStep`), and one cell is trained with any of three
objectives:

``act``
    Graves' ACT: :math:`N_t = \min\{n : \sum_{l \le n} h_t^l \ge 1 - \varepsilon\}` (capped at
    ``M``), :math:`p_t^n = h_t^n` before :math:`N_t` and the remainder :math:`R_t` at
    :math:`N_t`, state :math:`s_t = \sum_n p_t^n s_t^n`, loss
    :math:`\sum_t \mathcal{L}(y_t, \hat y(s_t)) + \tau \sum_t (N_t + R_t)`
    (halting math from :mod:`refimpl.halting`).
``pact``
    Relaxed probabilistic ACT: :math:`s_t` is the stick-breaking average over relaxed halting
    indicators (:func:`refimpl.pact.relaxed_forward`), loss
    :math:`\sum_t \mathcal{L}(y_t, \hat y(s_t)) + \tau \sum_t \mathbb{E}_q[n_t]`.
``pondernet``
    PonderNet (Banino et al. 2021): a prediction :math:`\hat y_t^n` at *every* step, the halting
    distribution :math:`p_t^n = \lambda_t^n \prod_{j<n}(1 - \lambda_t^j)` (``λ`` is the halting
    unit, :math:`\lambda_t^M \equiv 1`), loss
    :math:`\sum_t \big[\sum_n p_t^n \mathcal{L}(y_t, \hat y_t^n) + \beta\,
    \mathrm{KL}(p_t \,\|\, \text{TruncGeom}(\lambda_p))\big]` — the halting distribution first.
    Its first term is exactly :math:`\mathbb{E}_q[-\log p(y \mid x, n)]` of PACT, summed over
    ``n`` instead of sampled. PonderNet is defined for one input; for longer sequences the
    state carried to the next timestep is :math:`\sum_n p_t^n s_t^n` **(project choice)**.

Training unrolls all ``M`` steps (the exact penalty terms need every halting probability);
evaluation with :func:`evaluate` runs only the steps needed, on the examples still pondering.
The output is one logit per timestep, :math:`\hat y = w_o \cdot s + b_o`, with the logistic
loss :math:`\mathcal{L}(y, \hat y) = \log(1 + e^{\hat y}) - y \hat y` (binary targets, as parity).

Shapes: inputs ``x`` (N, T, D), binary targets ``y`` (N, T), state (N, H).
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

from . import _checks, halting, pact
from .distributions import (
    kl_to_prior_backward,
    kl_to_prior_forward,
    log_halting_distribution_backward,
    log_halting_distribution_forward,
    sigmoid,
    truncated_geometric_log_prob,
)
from .init import glorot_uniform
from .layers import Layer

OBJECTIVES = ("act", "pact", "pondernet")
RULES = ("act", "thresholded", "sample")


# --------------------------------------------------------------------------- the cell


class ACTRNN(Layer):
    """A tanh RNN cell with a halting unit and a logistic read-out.

    Parameters
    ----------
    input_size : int, ``D``
    hidden_size : int, ``H`` (128 in Graves' parity experiment)
    max_steps : int, ``M``, the cap on ponder steps per timestep
    halting_bias : float, initial ``b_h`` (positive: few ponder steps early in training)
    rng : numpy.random.Generator
    dtype : float32 or float64
    """

    def __init__(self, input_size, hidden_size=128, max_steps=20, halting_bias=1.0, rng=None, dtype=np.float32):
        super().__init__()
        rng = _checks.generator(rng)
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("max_steps", max_steps)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        dtype = np.dtype(dtype)
        if dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        d, h = int(input_size), int(hidden_size)
        self.input_size, self.hidden_size, self.max_steps = d, h, int(max_steps)
        self.add_param("w_in", glorot_uniform((h, d + 1), rng, d + 1, h, dtype))
        self.add_param("w_rec", glorot_uniform((h, h), rng, h, h, dtype))
        self.add_param("b", np.zeros(h, dtype))
        self.add_param("w_halt", glorot_uniform((h,), rng, h, 1, dtype))
        self.add_param("b_halt", np.full(1, halting_bias, dtype))
        self.add_param("w_out", glorot_uniform((h,), rng, h, 1, dtype))
        self.add_param("b_out", np.zeros(1, dtype))

    @property
    def dtype(self):
        return self.params["w_rec"].dtype

    def step_units(self, x_t):
        """The ``M`` ponder steps of one timestep as a unit sequence for :mod:`refimpl.pact`."""
        return [RNNStep(self, x_t, first=(n == 0)) for n in range(self.max_steps)]

    def readout(self, state):
        """Output logit :math:`w_o \\cdot s + b_o`: (..., H) → (...)."""
        return state @ self.params["w_out"] + self.params["b_out"][0]

    def readout_backward(self, dlogit, state):
        """Accumulate the read-out gradients; return ``dstate`` (..., H)."""
        self.grads["w_out"] += np.tensordot(dlogit, state, axes=dlogit.ndim)
        self.grads["b_out"] += np.sum(dlogit)
        return dlogit[..., None] * self.params["w_out"]

    def __repr__(self):
        return f"ACTRNN(input_size={self.input_size}, hidden_size={self.hidden_size}, max_steps={self.max_steps})"


class RNNStepCache(NamedTuple):
    inputs: np.ndarray  # (n, D+1) input with the first-step flag
    state: np.ndarray  # (n, H) previous state
    new_state: np.ndarray  # (n, H)


class RNNStep:
    """One ponder step of an :class:`ACTRNN` at one timestep, in the :mod:`refimpl.pact` unit protocol."""

    def __init__(self, rnn, x_t, first):
        self.rnn, self.x_t, self.first = rnn, x_t, first

    def forward(self, state, rows):
        p = self.rnn.params
        flag = np.full((len(rows), 1), 1.0 if self.first else 0.0, dtype=state.dtype)
        inputs = np.concatenate([self.x_t[rows], flag], axis=1)
        new_state = np.tanh(inputs @ p["w_in"].T + state @ p["w_rec"].T + p["b"])
        logit = new_state @ p["w_halt"] + p["b_halt"][0]
        return new_state, logit, RNNStepCache(inputs, state, new_state)

    def backward(self, dnew_state, dlogit, cache):
        p, g = self.rnn.params, self.rnn.grads
        inputs, state, new_state = cache
        g["w_halt"] += dlogit @ new_state
        g["b_halt"] += np.sum(dlogit)
        dpre = (dnew_state + dlogit[:, None] * p["w_halt"]) * (1.0 - new_state**2)
        g["w_in"] += dpre.T @ inputs
        g["w_rec"] += dpre.T @ state
        g["b"] += dpre.sum(axis=0)
        return dpre @ p["w_rec"]


# --------------------------------------------------------------------------- the logistic loss


def logistic_loss(logit, target):
    """``log(1 + e^z) - y z`` elementwise (stable), and its derivative ``σ(z) - y``."""
    loss = np.maximum(logit, 0.0) - target * logit + np.log1p(np.exp(-np.abs(logit)))
    return loss, sigmoid(logit) - target


# --------------------------------------------------------------------------- objectives


class ObjectiveSettings(NamedTuple):
    objective: str
    tau: float  # ponder penalty (act, pact)
    temperature: float  # relaxed Bernoulli λ (pact)
    beta: float  # KL weight (pondernet)
    prior_rate: float  # λ_p of the truncated geometric prior (pondernet)
    eps: float  # ACT threshold margin (act)


class TimestepCache(NamedTuple):
    block: object  # what the objective's block backward needs
    state: np.ndarray  # (N, H) carried state s_t
    extra: tuple  # objective-specific arrays


class ObjectiveCache(NamedTuple):
    settings: ObjectiveSettings
    steps: list  # TimestepCache per timestep
    targets: np.ndarray  # (N, T)


class ObjectiveResult(NamedTuple):
    loss: np.ndarray  # (N,) per-example objective (to minimise)
    task_loss: np.ndarray  # (N,) the data term alone
    ponder_cost: np.ndarray  # (N, T) ρ (act) or E_q[n] (pact, pondernet)
    noise: np.ndarray | None  # (T, N, M-1) relaxed-Bernoulli noise used (pact)


def objective_forward(rnn, x, y, objective, tau=0.01, temperature=0.5, beta=0.01, prior_rate=0.2,
                      eps=halting.EPS, noise=None):
    """Per-example training objective of an :class:`ACTRNN` on a batch (to be minimised).

    Parameters
    ----------
    rnn : ACTRNN
    x : ndarray (N, T, D)
    y : ndarray (N, T) of 0/1 targets
    objective : "act", "pact" or "pondernet"
    tau : float >= 0, ponder penalty weight (act: on N + R; pact: on E_q[n])
    temperature : float > 0, relaxed Bernoulli temperature (pact)
    beta, prior_rate : KL weight and truncated-geometric rate λ_p (pondernet)
    eps : ACT's margin (act)
    noise : numpy.random.Generator or ndarray (T, N, M-1) of uniform noise (pact only)

    Returns
    -------
    result : ObjectiveResult
    cache : ObjectiveCache for :func:`objective_backward`
    """
    _checks.choice(objective, "objective", OBJECTIVES)
    x, y = _check_batch(rnn, x, y)
    if objective == "pact" and noise is None:
        raise ValueError("noise must be a numpy.random.Generator or an array (T, N, M-1) for objective='pact'")
    settings = ObjectiveSettings(objective, float(tau), float(temperature), float(beta), float(prior_rate),
                                 halting.check_eps(eps))
    n, t_len, _ = x.shape
    state = np.zeros((n, rnn.hidden_size), rnn.dtype)
    loss = np.zeros(n, rnn.dtype)
    task = np.zeros(n, rnn.dtype)
    ponder_cost = np.zeros((n, t_len), rnn.dtype)
    caches, used_noise = [], []
    log_prior = truncated_geometric_log_prob(settings.prior_rate, rnn.max_steps) if objective == "pondernet" else None
    for t in range(t_len):
        units = rnn.step_units(x[:, t])
        target = y[:, t]
        if objective == "act":
            states, logits, unroll = pact.unroll_forward(units, state)
            halt = halting.halting_forward(sigmoid(logits), settings.eps)
            state = halting.weighted_output_forward(halt.p, np.stack(states))
            step_loss, dlogit = logistic_loss(rnn.readout(state), target)
            loss += step_loss + settings.tau * halt.rho
            ponder_cost[:, t] = halt.rho
            cache = TimestepCache((unroll, states, logits, halt), state, (dlogit,))
        elif objective == "pact":
            step_noise = noise if isinstance(noise, np.random.Generator) else noise[t]
            result, block = pact.relaxed_forward(units, state, settings.temperature, step_noise)
            used_noise.append(result.noise)
            state = result.output
            step_loss, dlogit = logistic_loss(rnn.readout(state), target)
            loss += step_loss + settings.tau * result.expected_steps
            ponder_cost[:, t] = result.expected_steps
            cache = TimestepCache(block, state, (dlogit,))
        else:
            states, logits, unroll = pact.unroll_forward(units, state)
            log_q, log_q_cache = log_halting_distribution_forward(logits)
            q = np.exp(log_q)  # (N, M)
            stacked = np.stack(states)  # (M, N, H)
            step_losses, dlogits = logistic_loss(rnn.readout(stacked), target)  # (M, N)
            kl, kl_cache = kl_to_prior_forward(log_q, log_prior)
            step_loss = np.sum(q.T * step_losses, axis=0)
            loss += step_loss + settings.beta * kl
            ponder_cost[:, t] = q @ np.arange(1, rnn.max_steps + 1)
            state = halting.weighted_output_forward(q, stacked)
            cache = TimestepCache((unroll, stacked, log_q_cache, kl_cache, q), state, (step_losses, dlogits))
        task += step_loss
        caches.append(cache)
    result = ObjectiveResult(loss, task, ponder_cost, np.stack(used_noise) if used_noise else None)
    return result, ObjectiveCache(settings, caches, y)


def objective_backward(dloss, cache, rnn):
    """Backpropagation through time of :func:`objective_forward`; accumulates ``rnn.grads``.

    Parameters
    ----------
    dloss : ndarray (N,), gradient w.r.t. each example's objective (``1/N`` for the batch mean)
    cache : ObjectiveCache
    rnn : ACTRNN
    """
    settings = cache.settings
    dloss = np.asarray(dloss, dtype=rnn.dtype)
    dstate = np.zeros((dloss.shape[0], rnn.hidden_size), rnn.dtype)  # gradient arriving at s_t from t + 1
    for step in reversed(cache.steps):
        if settings.objective == "act":
            unroll, states, logits, halt = step.block
            (dlogit,) = step.extra
            dstate = dstate + rnn.readout_backward(dloss * dlogit, step.state)
            dp, dstates = halting.weighted_output_backward(dstate, halt.p, np.stack(states))
            dh = halting.halting_backward(dp, settings.tau * dloss, halt.cache)
            h = sigmoid(logits)
            dstate = pact.unroll_backward(list(dstates), dh * h * (1.0 - h), unroll)
        elif settings.objective == "pact":
            (dlogit,) = step.extra
            dstate = dstate + rnn.readout_backward(dloss * dlogit, step.state)
            dstate = pact.relaxed_backward(dstate, settings.tau * dloss, step.block)
        else:
            unroll, stacked, log_q_cache, kl_cache, q = step.block
            step_losses, dlogits = step.extra
            # loss = Σ_n q_n L_n + β KL(q ‖ prior); carried state Σ_n q_n s^n
            dq_carry, dstates = halting.weighted_output_backward(dstate, q, stacked)
            dstates = dstates + rnn.readout_backward((q.T * dloss) * dlogits, stacked)
            dlog_q = q * (step_losses.T * dloss[:, None] + dq_carry)  # ∂/∂log q = q ∂/∂q
            dlog_q += kl_to_prior_backward(settings.beta * dloss, kl_cache)
            dlogits_halt = log_halting_distribution_backward(dlog_q, log_q_cache)
            dstate = pact.unroll_backward(list(dstates), dlogits_halt, unroll)
    return dstate


def _check_batch(rnn, x, y):
    x = _checks.float_array(x, "x", ndim=3)
    if x.shape[2] != rnn.input_size:
        raise ValueError(f"x must have shape (N, T, {rnn.input_size}), got {x.shape}")
    y = np.asarray(y)
    if y.shape != x.shape[:2]:
        raise ValueError(f"y must have shape {x.shape[:2]} (N, T), got {y.shape}")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("y must hold binary targets 0 or 1")
    return x.astype(rnn.dtype, copy=False), y.astype(rnn.dtype)


# --------------------------------------------------------------------------- evaluation


class Evaluation(NamedTuple):
    predictions: np.ndarray  # (N, T) 0/1
    accuracy: float  # fraction of correct (example, timestep) pairs
    steps: np.ndarray  # (N, T) ponder steps executed


def evaluate(rnn, x, y, rule="thresholded", rng=None, eps=halting.EPS):
    """Predict with a halting rule and count the ponder steps it runs.

    ``rule="act"``: Graves' rule (run until the halting sum reaches ``1 - eps``), state
    :math:`\\sum_n p_n s^n`, steps ``N`` (:func:`act_halt_early`). ``"thresholded"``: stop at the
    first ``h > 1/2``; ``"sample"``: stop with probability ``h`` at each step (``rng`` required);
    both read out the state of the step where they stop. Every rule runs only the steps needed,
    on the examples still pondering, and keeps no stored states.
    """
    _checks.choice(rule, "rule", RULES)
    x, y = _check_batch(rnn, x, y)
    n, t_len, _ = x.shape
    state = np.zeros((n, rnn.hidden_size), rnn.dtype)
    steps = np.zeros((n, t_len), np.int64)
    logits = np.zeros((n, t_len), rnn.dtype)
    for t in range(t_len):
        units = rnn.step_units(x[:, t])
        if rule == "act":
            state, steps[:, t] = act_halt_early(units, state, eps)
        else:
            result = pact.halt_early_forward(units, state, "threshold" if rule == "thresholded" else "sample", rng)
            state = result.output
            steps[:, t] = result.steps
        logits[:, t] = rnn.readout(state)
    predictions = (logits > 0).astype(np.int64)
    return Evaluation(predictions, float(np.mean(predictions == y)), steps)


def act_halt_early(units, state, eps=halting.EPS):
    r"""Graves' ACT at test time: accumulate :math:`p_n s^n` online and stop each example at ``N``.

    Step ``n`` runs only on the examples whose halting sum is still below ``1 - eps``; an example
    halts at the first ``n`` where it is not (or at the last unit), with weight the remainder
    :math:`R = 1 - \sum_{l<N} h_l`. Equals the training-time computation
    (:func:`refimpl.halting.halting_forward` on all steps) without running steps after ``N``.

    Returns
    -------
    state : ndarray (N, H), :math:`\sum_n p_n s^n`
    steps : ndarray (N,) int, ``N``
    """
    n = state.shape[0]
    rows = np.arange(n)
    output = np.zeros_like(state)
    cumulative = np.zeros(n, state.dtype)
    steps = np.zeros(n, np.int64)
    for l, unit in enumerate(units, start=1):
        state, logit, _ = unit.forward(state, rows)
        h = sigmoid(logit) if l < len(units) else np.ones_like(logit)
        total = cumulative[rows] + h
        halts = ~halting.still_running(total, eps) | (l == len(units))
        weight = np.where(halts, 1.0 - cumulative[rows], h)
        output[rows] += weight[:, None] * state
        cumulative[rows] = total
        steps[rows] = l
        rows, state = rows[~halts], state[~halts]
        if rows.size == 0:
            break
    return output, steps
