r"""The parity task of Graves (2016) and a training loop for :class:`refimpl.act_rnn.ACTRNN`.

Each input is one vector of ``size`` entries (64 in the paper): a random number ``k ~ U{1..size}``
of randomly placed entries are set to ±1 (random signs), the rest are 0. The target is the parity
of the number of +1 entries. The input is presented at a single timestep, so whatever the network
computes it must compute by pondering; with ACT, the number of ponder steps grows with ``k``
(Graves 2016, Fig. 5). Smaller ``size`` gives quick runs.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

from . import _checks
from .act_rnn import ACTRNN, OBJECTIVES, evaluate, objective_backward, objective_forward
from .optim import Adam


class ParityBatch(NamedTuple):
    inputs: np.ndarray  # (N, 1, size) entries in {-1, 0, +1}
    targets: np.ndarray  # (N, 1) parity of the number of +1 entries
    nonzero: np.ndarray  # (N,) number of non-zero entries k


def parity_batch(batch_size, size, rng, dtype=np.float32):
    """Draw a batch of parity examples.

    Parameters
    ----------
    batch_size : int >= 1
    size : int >= 1, entries per vector
    rng : numpy.random.Generator

    Returns
    -------
    ParityBatch
    """
    rng = _checks.generator(rng)
    for name, value in (("batch_size", batch_size), ("size", size)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    nonzero = rng.integers(1, size + 1, size=batch_size)
    rank = np.argsort(rng.random((batch_size, size)), axis=1)  # a random permutation per row
    chosen = rank < nonzero[:, None]  # k random positions
    signs = rng.choice(np.array([-1.0, 1.0]), size=(batch_size, size))
    x = (chosen * signs).astype(dtype)
    y = (np.sum(x > 0, axis=1) % 2).astype(np.int64)
    return ParityBatch(x[:, None, :], y[:, None], nonzero)


class TrainingLog(NamedTuple):
    step: list  # iteration numbers of the log entries
    loss: list  # mean objective over the logged interval
    task_loss: list
    ponder: list  # mean ρ / E_q[n] over the logged interval


def train_parity(objective, size=64, steps=2000, batch_size=128, hidden_size=128, max_steps=20, lr=1e-3,
                 tau=0.01, temperature=0.5, beta=0.01, prior_rate=0.2, halting_bias=1.0, rng=None,
                 log_every=100, dtype=np.float32, callback=None):
    """Train an :class:`~refimpl.act_rnn.ACTRNN` on parity with one of the three objectives (Adam).

    Parameters
    ----------
    objective : "act", "pact" or "pondernet"
    size : entries per parity vector
    steps, batch_size, lr : optimisation (fresh batches every step)
    hidden_size, max_steps, halting_bias : the cell (128 tanh units in the paper)
    tau, temperature, beta, prior_rate : objective settings (see :func:`refimpl.act_rnn.objective_forward`)
    rng : numpy.random.Generator — initialisation, data and relaxed-Bernoulli noise
    log_every : int, average the training statistics over this many steps
    callback : callable(step, rnn, log) or None, called after each logged interval (``log`` holds it)

    Returns
    -------
    rnn : ACTRNN
    log : TrainingLog
    """
    _checks.choice(objective, "objective", OBJECTIVES)
    rng = _checks.generator(rng)
    rnn = ACTRNN(size, hidden_size, max_steps, halting_bias, rng, dtype)
    optimiser = Adam(rnn.named_parameters(), lr=lr)
    log = TrainingLog([], [], [], [])
    sums = np.zeros(3)
    for step in range(1, steps + 1):
        batch = parity_batch(batch_size, size, rng, dtype)
        rnn.zero_grad()
        result, cache = objective_forward(rnn, batch.inputs, batch.targets, objective, tau=tau, temperature=temperature,
                                          beta=beta, prior_rate=prior_rate, noise=rng)
        objective_backward(np.full(batch_size, 1.0 / batch_size), cache, rnn)
        optimiser.step()
        sums += [result.loss.mean(), result.task_loss.mean(), result.ponder_cost.mean()]
        if step % log_every == 0 or step == steps:
            count = log_every if step % log_every == 0 else step % log_every
            for column, value in zip((log.loss, log.task_loss, log.ponder), sums / count):
                column.append(float(value))
            log.step.append(step)
            sums[:] = 0
            if callback is not None:
                callback(step, rnn, log)
    return rnn, log


class ParityReport(NamedTuple):
    accuracy: float
    mean_steps: float
    steps_by_nonzero: dict  # k -> mean ponder steps of the examples with k non-zero entries


def evaluate_parity(rnn, size, rule, batch_size=2000, rng=None):
    """Accuracy and ponder steps on fresh parity examples, steps broken down by the number of non-zeros."""
    rng = _checks.generator(rng)
    batch = parity_batch(batch_size, size, rng, rnn.dtype)
    ev = evaluate(rnn, batch.inputs, batch.targets, rule, rng)
    steps = ev.steps[:, 0]
    by_k = {int(k): float(steps[batch.nonzero == k].mean()) for k in np.unique(batch.nonzero)}
    return ParityReport(ev.accuracy, float(steps.mean()), by_k)
