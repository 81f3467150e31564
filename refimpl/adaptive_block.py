r"""The loop every adaptive block shares: run units over the samples or positions still active.

A block has ``L`` units and ``L - 1`` halting heads (one after every unit but the last). Its
*latents* — what halts — are samples (ACT, PACT per block: shape (n,)) or positions (SACT, PACT
per position or group: shape (n, H, W)). :func:`run_units` runs

1. the first unit on every sample (nothing has halted yet; it may downsample), then, for each
   further unit ``l``:
2. head ``l - 1`` on the samples still running (``active`` tells it where its value is used),
3. the method's **halting policy**, which turns the head's output into the new active mask,
4. unit ``l`` through a **unit step** on the samples with an active latent; a sample or position
   that is not active keeps :math:`U_l = U_{l-1}`.

What differs between the methods is only the policy and the step:

* policies — ACT's cumulative rule :math:`\sum_{i \le l} h_i < 1 - \varepsilon`
  (:class:`CumulativeHalting`, ACT and SACT), PACT's thresholded and sampled rules
  (:mod:`refimpl.pact_resnet`);
* steps — :class:`WholeUnitStep` (the unit on its sub-batch, per-sample latents) and
  :class:`SparseUnitStep` (the sparse residual unit of :mod:`refimpl.sparse_unit` on the active
  positions, per-position latents).

:class:`PonderCostBlock` is the ACT-rule block on top of the loop: the halting distribution
:math:`p`, the output :math:`\sum_n p_n U_n` and the ponder cost :math:`\rho = N + R`
(:mod:`refimpl.halting`), with the explicit backward ``backward(dout, dponder_cost)``.

Latent-shaped arrays broadcast against a state (n, F..., S...) with the latent axes ``S`` last
(:func:`expand_latent`): (n,) against (n, C, H, W), or (n, H, W) against (n, C, H, W).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import halting
from .layers import Layer
from .sparse_unit import EXECUTIONS, check_sparse_unit, unit_executor


def expand_latent(latent, state):
    """A latent-shaped array (n, S...) as one that broadcasts against ``state`` (n, F..., S...)."""
    extra = state.ndim - latent.ndim
    return latent.reshape(latent.shape[:1] + (1,) * extra + latent.shape[1:])


def weighted_sum_forward(weights, states):
    r"""Block output :math:`\sum_l w_l U_l` from weights (n, S..., L) and ``L`` states (n, F..., S...)."""
    return sum(expand_latent(weights[..., l], s) * s for l, s in enumerate(states))


def weighted_sum_backward(dout, weights, states):
    """Gradients ``(dweights (n, S..., L), dstates list of L)`` of :func:`weighted_sum_forward`."""
    feature_axes = tuple(range(1, 1 + dout.ndim - (weights.ndim - 1)))
    dweights = np.stack([np.sum(dout * s, axis=feature_axes) for s in states], axis=-1)
    dstates = [expand_latent(weights[..., l], s) * dout for l, s in enumerate(states)]
    return dweights, dstates


# ---------------------------------------------------------------------------------------------
# Unit steps
# ---------------------------------------------------------------------------------------------


class WholeUnitStep:
    """Unit ``l`` on its sub-batch: ``U_l = unit(U_{l-1})`` for every sample still running (per-sample latents)."""

    def check(self, units):
        """Any layers; all after the first keep the shape (checked when they run)."""

    def head_mask(self, active):
        return None  # a per-sample head is needed wherever its sample runs

    def running_rows(self, active):
        return np.flatnonzero(active)

    def forward(self, unit, state, active):
        out = unit(state)
        return out, None, unit.flops_per_sample

    def backward(self, unit, dout, cache):
        return unit.backward(dout)


class SparseUnitStep:
    """Unit ``l`` at the active positions: the sparse residual unit (per-position latents).

    ``execution="dense"`` is the masked reference: every unit and head computed everywhere on every
    sample, the residual and the halting scores multiplied by the active mask. ``fused=True`` runs a
    unit through its backend's fused unit where there is one (:func:`~refimpl.sparse_unit.unit_executor`).
    """

    def __init__(self, execution="sparse", fused=True):
        if execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {list(EXECUTIONS)}, got {execution!r}")
        self.execution, self.fused = execution, bool(fused)

    def check(self, units):
        for unit in units[1:]:
            check_sparse_unit(unit)

    def head_mask(self, active):
        return active if self.execution == "sparse" else None

    def running_rows(self, active):
        rows = np.flatnonzero(active.any(axis=(1, 2)))
        return np.arange(len(active)) if self.execution == "dense" and rows.size else rows

    def forward(self, unit, state, active):
        forward, backward = unit_executor(unit, self.execution, self.fused)
        out, cache, flops = forward(unit, state, active)
        return out, (backward, cache), flops

    def backward(self, unit, dout, cache):
        backward, inner = cache
        return backward(unit, dout, inner)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


class UnitRun(NamedTuple):
    """What :func:`run_units` did (lists indexed by unit; entries past an early stop are repeats)."""

    outputs: list  # U_1 .. U_L, each (N, F..., S...) over the whole batch (only the last if not kept)
    ran: list  # the samples unit l ran on (head l ran on the same samples)
    step_caches: list  # per unit: what step.backward needs (None for the first unit)
    active: list  # per unit: the active mask (N, S...) it ran with (all True for the first)
    flops_per_sample: np.ndarray  # (N,) int64: units and heads actually run


def check_units_and_heads(units, heads):
    if len(units) < 1:
        raise ValueError("units must hold at least one residual unit, got none")
    if len(heads) != len(units) - 1:
        raise ValueError(f"heads must hold len(units) - 1 = {len(units) - 1} halting heads, got {len(heads)}")


def run_units(units, heads, x, step, policy, per_position, keep_outputs=True):
    """Run the units of a block over the latents still active (see the module docstring).

    Parameters
    ----------
    units, heads : lists of layers, ``L`` and ``L - 1``
    x : ndarray (N, C, H, W), the block input
    step : WholeUnitStep or SparseUnitStep
    policy : ``policy(index, rows, head_output, active) -> active``: head ``index``'s output on
        ``rows`` and the active mask (N, S...) before it give the new active mask
    per_position : bool, latents (N, H, W) rather than (N,)
    keep_outputs : keep every unit's output (training) or only the current state (evaluation)

    Returns
    -------
    UnitRun
    """
    n = x.shape[0]
    current = units[0](x)
    flops = units[0].flops_per_sample.copy()
    active = np.ones((n, *current.shape[2:]) if per_position else (n,), dtype=bool)
    rows = np.arange(n)
    run = UnitRun([current], [rows], [None], [active], flops)
    for index in range(1, len(units)):
        head = heads[index - 1]
        head_output = head(current[rows], step.head_mask(active[rows]))  # halting_proba or halting_logit
        flops[rows] += head.flops_per_sample
        active = policy(index - 1, rows, head_output, active)
        rows = step.running_rows(active)
        if rows.size == 0:
            for entries, value in zip(run[:4], (current, rows, None, active)):
                entries.extend([value] * (len(units) - index))
            break
        current = current.copy()
        current[rows], cache, unit_flops = step.forward(units[index], current[rows], active[rows])
        flops[rows] += unit_flops
        for entries, value in zip(run[:4], (current, rows, cache, active)):
            entries.append(value)
        if not keep_outputs:
            del run.outputs[0]
    return run


def run_units_backward(units, heads, run, step, dunits, dheads):
    """Gradient w.r.t. the block input from gradients w.r.t. every unit output and head output.

    Parameters
    ----------
    units, heads, run, step : as for :func:`run_units` (``run`` from the forward just done)
    dunits : list of ``L`` ndarrays (N, F..., S...), gradients w.r.t. U_1 .. U_L from the block output
        (not counting what flows back from later units, which this function adds)
    dheads : list of ``L - 1`` ndarrays (N, S...), gradients w.r.t. the heads' outputs
    """
    carry = None
    for index in range(len(units) - 1, -1, -1):
        grad = dunits[index] if carry is None else dunits[index] + carry
        rows = run.ran[index]
        if index < len(heads) and rows.size:
            grad[rows] += heads[index].backward(dheads[index][rows])
        if index == 0:
            return units[0].backward(grad)
        carry = grad  # unit l did not run elsewhere: U_l = U_{l-1} passes the gradient straight through
        if rows.size:
            carry[rows] = step.backward(units[index], grad[rows], run.step_caches[index])


# ---------------------------------------------------------------------------------------------
# ACT's halting rule and the ponder-cost block
# ---------------------------------------------------------------------------------------------


class CumulativeHalting:
    r"""ACT's policy: a latent keeps running while :math:`\sum_{i \le l} h_i < 1 - \varepsilon`.

    Records the halting probabilities (zero where a latent was not active) as ``halting_proba`` (N, S..., L-1).
    """

    def __init__(self, eps, n_heads, dtype):
        self.eps, self.n_heads, self.dtype = eps, n_heads, dtype
        self.cumulative = self.halting_proba = None

    def __call__(self, index, rows, halting_proba, active):
        if self.halting_proba is None:  # the latent shape is known once the first unit has run
            self.cumulative = np.zeros(active.shape, dtype=self.dtype)
            self.halting_proba = np.zeros((*active.shape, self.n_heads), dtype=self.dtype)
        self.halting_proba[rows, ..., index] = halting_proba * active[rows]
        self.cumulative += self.halting_proba[..., index]
        return halting.still_running(self.cumulative, self.eps)


class PonderCache(NamedTuple):
    run: UnitRun
    step: object  # the unit step of the forward
    halting: halting.Halting


class PonderCostBlock(Layer):
    r"""A block halted by ACT's rule; :class:`~refimpl.act.ACTBlock` and :class:`~refimpl.sact.SACTBlock` choose the step.

    Forward: x (N, C, H, W) → :math:`\sum_n p_n U_n` (N, C', H', W'). After it: ``rho`` (N, S...),
    the ponder cost :math:`\rho = N + R` per latent (also ``ponder_cost``), ``remainder`` ``R``,
    ``n_units`` ``N``, ``active_masks`` (per unit, the latents it ran at) and ``flops_per_sample``.

    Parameters
    ----------
    units : list of Layer, the first may downsample
    heads : list of halting-probability heads, ``len(units) - 1``
    eps : float, the halting margin ε
    """

    per_position = False

    def __init__(self, units, heads, eps=halting.EPS):
        super().__init__()
        check_units_and_heads(units, heads)
        self.units, self.heads = list(units), list(heads)
        self.eps = halting.check_eps(eps)
        self.rho = self.remainder = self.n_units = None
        self.active_masks = []

    def step(self):
        """The unit step (see :mod:`refimpl.adaptive_block`)."""
        raise NotImplementedError

    @property
    def ponder_cost(self):
        """ρ per latent of the last forward, (N,) or (N, H, W)."""
        return self.rho

    def ponder_cost_map(self):
        """ρ as a map (N, h, w) over this block's positions (a per-sample value covers its whole map)."""
        return self.rho if self.per_position else self.rho[:, None, None]

    def forward(self, x):
        step = self.step()
        policy = CumulativeHalting(self.eps, len(self.heads), x.dtype)
        run = run_units(self.units, self.heads, x, step, policy, self.per_position)
        halting_proba = policy.halting_proba
        if halting_proba is None:  # a single unit: no head ran
            halting_proba = np.zeros((*run.active[0].shape, 0), x.dtype)
        result = halting.halting_forward(halting_proba, self.eps)
        self.cache = PonderCache(run, step, result)
        self.rho, self.remainder, self.n_units = result.rho, result.remainder, result.n_units
        self.active_masks, self.flops_per_sample = run.active, run.flops_per_sample
        return weighted_sum_forward(result.p, run.outputs).astype(x.dtype, copy=False)

    def backward(self, dout, dponder_cost=None):
        """Gradient w.r.t. the block input.

        Parameters
        ----------
        dout : ndarray, gradient w.r.t. the block output
        dponder_cost : ndarray (N, S...) or None, gradient w.r.t. ``rho`` (e.g. τ / size for the loss
            term τ · mean ρ); None: ρ is not part of the loss
        """
        run, step, result = self.cache
        dp, dunits = weighted_sum_backward(dout, result.p, run.outputs)
        dhalting_proba = halting.halting_backward(dp, dponder_cost, result.cache).astype(dout.dtype, copy=False)
        dheads = [dhalting_proba[..., l] * run.active[l] for l in range(len(self.heads))]
        return run_units_backward(self.units, self.heads, run, step, dunits, dheads).astype(dout.dtype, copy=False)
