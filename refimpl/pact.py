r"""Probabilistic adaptive computation (PACT): one block, three interchangeable modes (docs/spec.md §9).

An *adaptive computation block* runs a sequence of ``L`` units. Unit ``l`` maps the previous
state :math:`U_{l-1}` to its output :math:`U_l` and a halting logit :math:`a_l`
(:math:`h_l = \sigma(a_l)`; the last unit's logit is ignored, :math:`h_L \equiv 1`). The number of
units run, ``n``, is a latent variable with the halting distribution
:math:`q(n) = h_n \prod_{l<n}(1-h_l)`, and training maximises, per example,

.. math:: \mathbb{E}_{q}[\log p(y \mid x, n)] - \tau\, \mathbb{E}_q[n].

The same units (the same parameters) run in three modes:

``relaxed``
    Relaxed halting indicators :math:`\tilde z_l \sim \text{RelaxedBernoulli}(h_l, \lambda)`,
    stick-breaking weights :math:`w_l = \tilde z_l \prod_{j<l}(1-\tilde z_j)`,
    :math:`w_L = \prod_{j<L}(1-\tilde z_j)`, output :math:`\sum_l w_l U_l`; differentiable by
    reparameterisation (:func:`relaxed_forward` / :func:`relaxed_backward`).
``discrete``
    Indicators :math:`z_l \sim \text{Bernoulli}(h_l)` (the λ → 0 limit of the relaxed sample with
    the same noise), ``n`` = the first ``l`` with
    :math:`z_l = 1`, output :math:`U_n`. The gradient of :math:`\mathbb{E}_q[f(n)]` is
    :math:`\mathbb{E}_q[\nabla f(n)] + \mathbb{E}_q[(f(n) - b)\nabla \log q(n)]` (REINFORCE with a
    baseline ``b``, :class:`MovingAverageBaseline`), estimated with one sample; the penalty
    :math:`\tau \mathbb{E}_q[n]` is differentiated exactly (:func:`discrete_forward` /
    :func:`discrete_backward`).
``thresholded``
    Deterministic: stop at the first ``l`` with :math:`h_l > 1/2` and output :math:`U_l`. No
    averaging and no stored states (:func:`halt_early_forward`, which also runs the discrete
    mode at test time: sample each indicator when it is needed and stop).

The relaxed and discrete training modes run *all* ``L`` units: the exact gradient of
:math:`\mathbb{E}_q[n]` needs every :math:`h_l`. Only :func:`halt_early_forward` skips work.

The unit protocol
-----------------
A unit is any object with

``forward(state, rows) -> (new_state, halting_logits, cache)``
    ``state`` (n, F..., S...) holds the rows ``rows`` (int array (n,), indices into the batch) of
    the batch; ``halting_logits`` has shape (n, S...). ``S...`` are the latent axes and ``F...``
    the feature axes in front of them: one latent per example (``S = ()``; an RNN step with
    ``F = (H,)``, or an ACT-like residual block with ``F = (C, H, W)``) or one per position
    (``S = (H, W)``, ``F = (C,)``: spatial PACT).
``backward(dnew_state, dhalting_logits, cache) -> dstate``
    accumulates the unit's parameter gradients and returns the gradient w.r.t. its input state.

So one block serves RNN updates (the same cell, unrolled) and residual units alike.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import _checks
from .adaptive_block import expand_latent, weighted_sum_backward, weighted_sum_forward
from .distributions import (
    bernoulli_from_noise,
    expected_steps_backward,
    expected_steps_forward,
    first_halt,
    log_halting_probability_grad,
    relaxed_bernoulli_backward,
    relaxed_bernoulli_forward,
    sigmoid,
    stick_breaking_backward,
    stick_breaking_forward,
    uniform_noise,
)

MODES = ("relaxed", "discrete", "thresholded")


# --------------------------------------------------------------------------- unrolling all units


class UnrollCache(NamedTuple):
    units: tuple
    unit_caches: list
    logits_shape: tuple  # (n, S...)


def unroll_forward(units, state):
    """Run every unit on the whole batch and keep its output and halting logit.

    Parameters
    ----------
    units : sequence of ``L >= 1`` units (see the module docstring)
    state : ndarray (N, F..., S...), the block input :math:`U_0`

    Returns
    -------
    states : list of ``L`` ndarrays (N, F..., S...), :math:`U_1 .. U_L`
    logits : ndarray (N, S..., L-1), halting logits :math:`a_1 .. a_{L-1}`
    cache : UnrollCache
    """
    units = tuple(units)
    if not units:
        raise ValueError("units must hold at least one unit, got an empty sequence")
    rows = np.arange(state.shape[0])
    states, logits, caches = [], [], []
    for unit in units:
        state, a, cache = unit.forward(state, rows)
        states.append(state)
        logits.append(a)
        caches.append(cache)
    logits_shape = np.shape(logits[0])
    stacked = np.stack(logits[:-1], axis=-1) if len(units) > 1 else np.zeros(logits_shape + (0,), state.dtype)
    return states, stacked, UnrollCache(units, caches, logits_shape)


def unroll_backward(dstates, dlogits, cache):
    """Backpropagate through the unrolled units (last to first).

    Parameters
    ----------
    dstates : list of ``L`` ndarrays (N, F..., S...) or None, gradients w.r.t. each unit's output
        (not counting the gradient that flows from later units, which this function adds)
    dlogits : ndarray (N, S..., L-1)
    cache : UnrollCache

    Returns
    -------
    dstate : ndarray (N, F..., S...), gradient w.r.t. the block input
    """
    units, caches, logits_shape = cache
    dflow = None  # gradient arriving at U_l from unit l + 1
    for l in range(len(units) - 1, -1, -1):
        dout = dstates[l]
        if dflow is not None:
            dout = dflow if dout is None else dout + dflow
        da = dlogits[..., l] if l < len(units) - 1 else np.zeros(logits_shape, dlogits.dtype)
        dflow = units[l].backward(dout, da, caches[l])
    return dflow


def _noise(noise, shape, dtype, name="noise"):
    """Accept fixed noise (an array of ``shape``) or draw it from a Generator."""
    if isinstance(noise, np.random.Generator):
        return uniform_noise(shape, noise, dtype)
    noise = _checks.float_array(noise, name)
    if noise.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (latents x (L-1) units), got {noise.shape}")
    if np.any((noise <= 0) | (noise >= 1)):
        raise ValueError(f"{name} must lie strictly inside (0, 1)")
    return noise


# --------------------------------------------------------------------------- relaxed mode


class RelaxedCache(NamedTuple):
    unroll: UnrollCache
    states: list
    relaxed: object  # RelaxedBernoulliCache
    stick: object  # StickBreakingCache
    expected: object  # ExpectedStepsCache
    weights: np.ndarray  # (N, S..., L)
    logits: np.ndarray  # (N, S..., L-1)


class BlockResult(NamedTuple):
    output: np.ndarray  # (N, F..., S...)
    expected_steps: np.ndarray  # (N, S...), E_q[n] (exact, differentiable)
    steps: np.ndarray | None  # (N, S...) int, the sampled n (discrete mode only)
    noise: np.ndarray  # (N, S..., L-1), the uniform noise used


def relaxed_forward(units, state, temperature, noise):
    r"""Relaxed block: :math:`\sum_l w_l U_l` with stick-breaking weights over relaxed indicators.

    Parameters
    ----------
    units : sequence of ``L`` units
    state : ndarray (N, F..., S...)
    temperature : float > 0, ``λ`` of the relaxed Bernoulli
    noise : numpy.random.Generator, or ndarray (N, S..., L-1) in (0, 1) — fixed noise reproduces a
        sample exactly (what the gradient check needs)

    Returns
    -------
    result : BlockResult (``steps`` is None)
    cache : RelaxedCache
    """
    states, logits, unroll = unroll_forward(units, state)
    u = _noise(noise, logits.shape, logits.dtype)
    z, relaxed = relaxed_bernoulli_forward(logits, temperature, u)
    weights, stick = stick_breaking_forward(z)
    expected, expected_cache = expected_steps_forward(sigmoid(logits))
    output = weighted_sum_forward(weights, states)
    cache = RelaxedCache(unroll, states, relaxed, stick, expected_cache, weights, logits)
    return BlockResult(output, expected, None, u), cache


def relaxed_backward(doutput, dexpected_steps, cache):
    """Gradient of the relaxed block w.r.t. its input (unit parameter gradients accumulate).

    Parameters
    ----------
    doutput : ndarray (N, F..., S...)
    dexpected_steps : ndarray (N, S...) or None — e.g. ``τ`` per latent for the ponder penalty
    cache : RelaxedCache

    Returns
    -------
    dstate : ndarray (N, F..., S...)
    """
    dweights, dstates = weighted_sum_backward(doutput, cache.weights, cache.states)
    dlogits = relaxed_bernoulli_backward(stick_breaking_backward(dweights, cache.stick), cache.relaxed)
    dlogits = dlogits + _expected_steps_logit_grad(dexpected_steps, cache.expected, cache.logits)
    return unroll_backward(dstates, dlogits, cache.unroll)


def _expected_steps_logit_grad(dexpected_steps, expected_cache, logits):
    if dexpected_steps is None:
        return np.zeros_like(logits)
    h = expected_cache.h
    return expected_steps_backward(dexpected_steps, expected_cache) * h * (1.0 - h)


# --------------------------------------------------------------------------- discrete mode


class DiscreteCache(NamedTuple):
    unroll: UnrollCache
    states: list
    chosen: np.ndarray  # (N, S..., L) one-hot of n
    steps: np.ndarray  # (N, S...)
    expected: object
    logits: np.ndarray


def discrete_forward(units, state, noise):
    r"""Discrete block: sample :math:`z_l = [u_l > 1 - h_l]`, stop at the first one, output :math:`U_n`.

    Parameters
    ----------
    units : sequence of ``L`` units
    state : ndarray (N, F..., S...)
    noise : numpy.random.Generator, or ndarray (N, S..., L-1) in (0, 1)

    Returns
    -------
    result : BlockResult (``steps`` = the sampled ``n``, in 1..L)
    cache : DiscreteCache
    """
    states, logits, unroll = unroll_forward(units, state)
    u = _noise(noise, logits.shape, logits.dtype)
    steps = first_halt(bernoulli_from_noise(logits, u))
    chosen = (np.arange(1, len(states) + 1) == steps[..., None]).astype(state.dtype)
    output = weighted_sum_forward(chosen, states)
    expected, expected_cache = expected_steps_forward(sigmoid(logits))
    cache = DiscreteCache(unroll, states, chosen, steps, expected_cache, logits)
    return BlockResult(output, expected, steps, u), cache


def discrete_backward(doutput, dexpected_steps, learning_signal, cache):
    r"""One-sample gradient estimate for the discrete block.

    Three parts: the pathwise gradient through :math:`U_n` (``doutput``), the exact gradient of
    :math:`\mathbb{E}_q[n]` (``dexpected_steps``), and the score-function (REINFORCE) term
    :math:`(f - b) \nabla \log q(n)` with ``learning_signal = f - b`` per latent.

    Parameters
    ----------
    doutput : ndarray (N, F..., S...)
    dexpected_steps : ndarray (N, S...) or None
    learning_signal : ndarray (N, S...) or None — the loss of the sampled ``n`` minus a baseline
        (broadcast a per-example signal over the latents of that example)
    cache : DiscreteCache

    Returns
    -------
    dstate : ndarray (N, F..., S...)
    """
    dstates = [expand_latent(cache.chosen[..., l], s) * doutput for l, s in enumerate(cache.states)]
    dlogits = _expected_steps_logit_grad(dexpected_steps, cache.expected, cache.logits)
    if learning_signal is not None and cache.logits.shape[-1] > 0:
        score = log_halting_probability_grad(cache.logits, cache.steps)
        dlogits = dlogits + np.asarray(learning_signal)[..., None] * score
    return unroll_backward(dstates, dlogits, cache.unroll)


class MovingAverageBaseline:
    r"""Exponential moving average of the learning signal, the REINFORCE baseline ``b``.

    ``b ← decay · b + (1 - decay) · mean_batch(f)``. :meth:`subtract` uses the value *before* the
    current batch is folded in, so ``b`` does not depend on the sample it is subtracted from and
    the estimator stays unbiased. ``shape`` gives per-group baselines (one per block, timestep or
    latent group); the batch axis is always the first axis of ``f``.
    """

    def __init__(self, decay=0.9, shape=()):
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.value = np.zeros(shape)
        self.seen = False

    def subtract(self, f):
        """Learning signal ``f - b`` for a batch ``f`` of shape (N,) + shape."""
        return np.asarray(f) - self.value

    def update(self, f):
        """Fold the batch mean of ``f`` into the average (the first batch sets it)."""
        mean = np.mean(np.asarray(f, dtype=np.float64), axis=0)
        if mean.shape != self.value.shape:
            raise ValueError(f"f must have shape (N, *{self.value.shape}), got {np.shape(f)}")
        self.value = mean if not self.seen else self.decay * self.value + (1 - self.decay) * mean
        self.seen = True


# --------------------------------------------------------------------------- test-time halting


class EarlyHaltResult(NamedTuple):
    output: np.ndarray  # (N, F..., S...)
    steps: np.ndarray  # (N, S...) int, units run per latent
    units_run: np.ndarray  # (N,) int, units executed per example (max over its latents)


def halt_early_forward(units, state, rule="threshold", rng=None):
    r"""Run units only while needed: the thresholded mode, or the discrete mode at test time.

    ``rule="threshold"``: a latent halts at the first ``l`` with :math:`h_l > 1/2`
    (:math:`a_l > 0`). ``rule="sample"``: it halts with probability :math:`h_l` at each ``l``
    (indicators drawn from ``rng`` when needed). Either way the last unit halts every latent.
    Unit ``l`` runs only on the examples with a latent still running (``rows``); no unit output
    is stored — each latent's output is copied when it halts — and no caches are kept.

    Parameters
    ----------
    units : sequence of ``L`` units
    state : ndarray (N, F..., S...)
    rule : "threshold" or "sample"
    rng : numpy.random.Generator, required for ``rule="sample"``

    Returns
    -------
    EarlyHaltResult
    """
    _checks.choice(rule, "rule", ("threshold", "sample"))
    if rule == "sample":
        rng = _checks.generator(rng)
    units = tuple(units)
    if not units:
        raise ValueError("units must hold at least one unit, got an empty sequence")
    batch = state.shape[0]
    rows = np.arange(batch)
    output = steps = None
    units_run = np.zeros(batch, dtype=np.int64)
    for l, unit in enumerate(units, start=1):
        state, a, _ = unit.forward(state, rows)
        units_run[rows] = l
        if output is None:
            output = np.zeros((batch,) + state.shape[1:], state.dtype)
            steps = np.zeros((batch,) + np.shape(a)[1:], dtype=np.int64)
        if l == len(units):
            halts = np.ones(np.shape(a), dtype=bool)
        elif rule == "threshold":
            halts = a > 0
        else:
            halts = bernoulli_from_noise(a, uniform_noise(np.shape(a), rng, state.dtype))
        running = steps[rows] == 0
        newly = halts & running
        output[rows] = np.where(expand_latent(newly, state), state, output[rows])
        steps[rows] = np.where(newly, l, steps[rows])
        still = (running & ~newly).reshape(len(rows), -1).any(axis=1)
        rows, state = rows[still], state[still]
        if rows.size == 0:
            break
    return EarlyHaltResult(output, steps, units_run)
