r"""Residual networks with probabilistic adaptive computation (PACT-ResNet, docs/spec.md §9.6).

Every stage of a CIFAR ResNet-(6n+2) becomes an adaptive computation block
(:mod:`refimpl.pact`) whose units are the stage's residual units, each followed (but the last) by
a halting head that emits halting **logits**:

``latents="per-block"`` (ACT-like, one latent per image)
    :math:`a_l = w_l^\top \operatorname{gap}(U_l) + b_l` (:class:`LogitHead`).
``latents="per-position"`` (the probabilistic counterpart of SACT, one latent per position)
    :math:`a_l(x, y) = (w^\text{loc}_l * U_l)(x, y) + b_l + w^{\text{glob}\top}_l \operatorname{gap}(U_l)`
    (:class:`SpatialLogitHead`, the SACT head before its sigmoid).
``latents="group"`` with ``group_size=g`` (one latent per g×g group of positions)
    :math:`a_l(G) = \operatorname{mean}_{(x, y) \in G} a^\text{loc}_l(x, y) + w^{\text{glob}\top}_l \operatorname{gap}(U_l)`
    (:class:`GroupLogitHead`): the per-position head's local term averaged over the group, then
    broadcast back to the group's positions, each of which shares the group's halting noise — so
    the group halts (and its residual branches stop) as one. ``g = 1`` is ``per-position``; a ``g``
    covering the whole map is one latent per block.

Biases start at −3 as for ACT/SACT, so every unit is used early in training.

Modes (:attr:`PACTBlock.mode`, switched for the whole network by :meth:`PACTResNet.set_mode`):

* ``relaxed`` — every unit runs everywhere; the block outputs the stick-breaking average over
  relaxed halting indicators (temperature λ); trained by reparameterisation.
* ``discrete`` — every unit runs everywhere in training (the exact gradient of
  :math:`\mathbb{E}_q[n]` needs every :math:`h_l`); output :math:`U_n` for sampled ``n``;
  trained with REINFORCE: :meth:`PACTResNet.backward` takes the per-example task losses and hands
  each block its learning signal (loss minus a moving-average baseline, one per block). In
  evaluation, sampling happens as the units run and only the needed work is done.
* ``thresholded`` — evaluation only: a latent halts at the first :math:`h_l > 1/2`. Per-block
  latents: units run on the sub-batch of images still running. Per-position latents: residual
  branches run **only at active positions**, through the same sparse residual unit and block loop
  as SACT (:mod:`refimpl.sparse_unit`, :mod:`refimpl.adaptive_block`), and halted positions keep
  their value. Group latents run the same way: a group's positions are active together.

Loss: cross-entropy of the block outputs' logits plus
:math:`\tau \sum_\text{blocks} \operatorname{mean}_{\text{batch}, \text{latents}} \mathbb{E}_q[n]`.
FLOPs are counted where computed (training modes: everything; early-halting evaluation: the
sub-batches or active positions actually run, heads included).
"""

from __future__ import annotations

import numbers

import numpy as np

from . import _checks, pact
from .adaptive_block import SparseUnitStep, WholeUnitStep, check_units_and_heads, run_units
from .adaptive_resnet import DEPTHS, AdaptiveResNet, adaptive_resnet_builder
from .distributions import bernoulli_from_noise, uniform_noise
from .halting_heads import HALTING_BIAS, LogitHead, SpatialLogitHead
from .layers import Layer

LATENTS = ("per-block", "per-position", "group")
MODES = pact.MODES


# ---------------------------------------------------------------------------------------------
# Groups of g×g positions
# ---------------------------------------------------------------------------------------------


def group_grid(hw, group_size):
    """Groups along each axis of an (H, W) map: ``(ceil(H / g), ceil(W / g))``.

    The groups tile the map from its top-left corner; the last row and column of groups are
    smaller when ``g`` does not divide the side.
    """
    return tuple(-(-side // group_size) for side in hw)


def group_areas(hw, group_size):
    """Positions in each group, (Hg, Wg) int64 (``g²`` inside, fewer along a ragged edge)."""
    sides = [np.minimum(group_size, side - group_size * np.arange(count))
             for side, count in zip(hw, group_grid(hw, group_size))]
    return np.outer(sides[0], sides[1])


def group_sum(values, group_size):
    """Sum (N, H, W, ...) over each g×g group → (N, Hg, Wg, ...); the backward of :func:`group_broadcast`."""
    n, h, w = values.shape[:3]
    hg, wg = group_grid((h, w), group_size)
    padded = np.zeros((n, hg * group_size, wg * group_size) + values.shape[3:], values.dtype)
    padded[:, :h, :w] = values
    blocks = padded.reshape((n, hg, group_size, wg, group_size) + values.shape[3:])
    return blocks.sum(axis=(2, 4))


def group_broadcast(values, group_size, hw):
    """Copy each group's value (N, Hg, Wg, ...) to its positions → (N, H, W, ...); the backward of :func:`group_sum`."""
    spread = np.repeat(np.repeat(values, group_size, axis=1), group_size, axis=2)
    return np.ascontiguousarray(spread[:, :hw[0], :hw[1]])


def group_mean_forward(values, group_size):
    """Mean of (N, H, W) over each g×g group → (N, Hg, Wg) (ragged edge groups: over their own positions)."""
    area = group_areas(values.shape[1:], group_size)
    return (group_sum(values, group_size) / area).astype(values.dtype, copy=False)


def group_mean_backward(dmean, group_size, hw):
    """Gradient of :func:`group_mean_forward`: each position gets ``dmean / area`` of its group."""
    area = group_areas(hw, group_size)
    return group_broadcast((dmean / area).astype(dmean.dtype, copy=False), group_size, hw)


class GroupLogitHead(SpatialLogitHead):
    r"""One halting logit per g×g group of positions, broadcast to its positions: (n, C, H, W) → (n, H, W).

    .. math:: a(G) = \frac{1}{|G|}\sum_{(x, y) \in G} \big((w^\text{loc} * U)(x, y) + b\big)
              + w^{\text{glob}\top} \operatorname{gap}(U)

    Why the per-position logits are average-pooled rather than computed by a g-strided head: the
    parameters are exactly those of :class:`SpatialLogitHead` (same names, same initialisation), so
    ``g = 1`` *is* the per-position head and every ``g`` is a coarser reading of the same
    evidence; the group sees all its positions (a strided 3×3 head would skip most of them for
    ``g > 3``); and groups halt as wholes, so the perforated local convolution is still only
    computed at active positions. The cost is the local 3×3 convolution at every active position
    instead of once per group — ``1/(2C)`` of a residual unit's FLOPs, counted in ``flops_per_sample``.

    The returned map repeats the group's logit at each of its positions; the backward sums the
    positions' gradients per group, then spreads them over the group's local terms (mean pooling).
    """

    def __init__(self, channels, group_size, rng, bias=HALTING_BIAS, backend=None, dtype=np.float32):
        super().__init__(channels, rng, bias, backend, dtype)
        self.group_size = _group_size(group_size)

    def forward(self, u, active=None):
        local = group_mean_forward(self.local_logits(u, active), self.group_size)
        grouped = local + self.global_logits_forward(u)[:, None, None]
        return group_broadcast(grouped.astype(u.dtype, copy=False), self.group_size, u.shape[2:])

    def backward(self, dlogit):
        dgroup = group_sum(dlogit, self.group_size)
        dlocal = group_mean_backward(dgroup, self.group_size, dlogit.shape[1:])
        du = self.local.backward(np.ascontiguousarray(dlocal[:, None]))
        return du + self.global_logits_backward(dgroup.sum(axis=(1, 2)))

    def __repr__(self):
        return f"GroupLogitHead({self.channels}, group_size={self.group_size})"


def _group_size(value):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"group_size must be a positive int (the side g of the g×g groups) for latents='group', "
                         f"got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------------------------
# Residual units in the unit protocol of refimpl.pact
# ---------------------------------------------------------------------------------------------


class ResidualStep:
    """Unit ``l`` of a block for :mod:`refimpl.pact`: run the residual unit, then its head.

    The last unit has no head; it returns zero logits of the latent shape (they are ignored).
    The layers keep their own caches (each runs once per forward).
    """

    def __init__(self, unit, head, latents):
        self.unit, self.head, self.latents = unit, head, latents

    def forward(self, state, rows):
        u = self.unit(state)
        if self.head is not None:
            return u, self.head(u), None
        shape = (u.shape[0],) if self.latents == "per-block" else (u.shape[0], *u.shape[2:])
        return u, np.zeros(shape, u.dtype), None

    def backward(self, du, dlogits, cache):
        if self.head is not None:
            du = du + self.head.backward(dlogits.astype(du.dtype, copy=False))
        return self.unit.backward(du)


# ---------------------------------------------------------------------------------------------
# The block
# ---------------------------------------------------------------------------------------------


class PACTBlock(Layer):
    """A stage of residual units as a PACT adaptive computation block.

    After ``forward`` it holds ``expected_steps`` (N,) or (N, H, W) (E_q[n], training modes),
    ``steps`` (units run per latent: early-halting evaluation and discrete mode), ``ponder_cost``
    (``expected_steps`` after a training forward, ``steps`` after an early-halting one) and
    ``flops_per_sample`` (N,). Group latents keep these per position (each position carries its
    group's value), so maps and means over positions read the same for every kind of latent.
    ``backward(dout, dexpected_steps=None, learning_signal=None)`` takes the penalty's gradient
    and, in discrete mode, the REINFORCE learning signal as arguments.

    Parameters
    ----------
    units : list of ResidualUnit (the first may downsample)
    heads : list of LogitHead / SpatialLogitHead / GroupLogitHead, ``len(units) - 1``
    latents : "per-block", "per-position" or "group"
    mode : "relaxed", "discrete" or "thresholded"
    temperature : float > 0, relaxed-Bernoulli λ
    rng : numpy.random.Generator, the noise of the relaxed and discrete modes
    group_size : int >= 1, the side g of the groups (``latents="group"`` only)
    """

    def __init__(self, units, heads, latents="per-block", mode="relaxed", temperature=0.5, rng=None,
                 group_size=None):
        super().__init__()
        check_units_and_heads(units, heads)
        self.latents = _checks.choice(latents, "latents", set(LATENTS))
        self.group_size = _latent_group_size(latents, group_size)
        self.units, self.heads = list(units), list(heads)
        self.early_step().check(self.units)
        self.mode = mode
        self.temperature = _positive(temperature, "temperature")
        self.rng = _checks.generator(rng)
        self.expected_steps = self.steps = None

    def set_rng(self, rng):
        """Draw this block's noise (relaxed and discrete modes) from ``rng`` (a numpy.random.Generator) from now on."""
        self.rng = _checks.generator(rng)

    @property
    def mode(self):
        return self._mode

    @mode.setter
    def mode(self, value):
        self._mode = _checks.choice(value, "mode", set(MODES))

    @property
    def per_position(self):
        return self.latents != "per-block"

    def early_step(self):
        """The unit step of early-halting evaluation: whole units per image, or sparse units per position."""
        return SparseUnitStep("sparse") if self.per_position else WholeUnitStep()

    def _steps(self):
        return [ResidualStep(u, self.heads[i] if i < len(self.heads) else None, self.latents)
                for i, u in enumerate(self.units)]

    @property
    def ponder_cost(self):
        """E_q[n] per latent after a training forward; the units run per latent after an early-halting one."""
        return self.expected_steps if self.expected_steps is not None else self.steps

    def ponder_cost_map(self):
        """:attr:`ponder_cost` as a float map (N, h, w) over this block's positions."""
        cost = self.ponder_cost
        if cost is None:
            raise RuntimeError("ponder_cost_map needs a forward first")
        cost = np.asarray(cost, dtype=np.float64)
        return cost if self.per_position else cost[:, None, None]

    def latent_signal(self, signal):
        r"""Spread a per-example learning signal ``f - b`` (N,) over this block's latents.

        Per block: unchanged. Per position: repeated at every position. Per group: the group's
        ``f - b`` is shared by its positions, so each gets ``(f - b) / |G|`` — the group head sums
        the positions' score terms, and the sum must be one :math:`(f - b)\nabla \log q(n_G)`.
        """
        if self.latents == "per-block":
            return signal
        hw = self.expected_steps.shape[1:]
        spread = np.broadcast_to(signal[:, None, None], (len(signal), *hw))
        if self.latents == "group":
            spread = spread / group_broadcast(group_areas(hw, self.group_size)[None], self.group_size, hw)
        return spread

    def latent_count(self, in_hw):
        """Latents per image for an input map ``in_hw`` (H, W) of this block."""
        if self.latents == "per-block":
            return 1
        hw = self.units[0].conv1.output_hw(tuple(in_hw))
        grid = group_grid(hw, self.group_size) if self.latents == "group" else hw
        return int(grid[0] * grid[1])

    def _noise(self, shape, dtype):
        """Uniform noise for logits of ``shape`` (n, ...), drawn once per latent.

        Per group: one draw per group, repeated at its positions (every position of a group then
        takes the same relaxed / Bernoulli sample, so the group halts as one).
        """
        if self.latents != "group":
            return uniform_noise(shape, self.rng, dtype)
        grid = group_grid(shape[1:3], self.group_size)
        drawn = uniform_noise((shape[0], *grid, *shape[3:]), self.rng, dtype)
        return group_broadcast(drawn, self.group_size, shape[1:3])

    def forward(self, x):
        if not self.training and self.mode != "relaxed":
            return self._early_halting_forward(x, "threshold" if self.mode == "thresholded" else "sample")
        if self.mode == "thresholded":
            raise ValueError("mode 'thresholded' is for evaluation only (call eval()); train in 'relaxed' or 'discrete'")
        noise = self.rng
        if self.latents == "group":  # drawn per group here (pact draws per logit from a Generator)
            hw = self.units[0].conv1.output_hw(x.shape[2:])
            noise = self._noise((x.shape[0], *hw, len(self.units) - 1), x.dtype)
        if self.mode == "relaxed":
            result, cache = pact.relaxed_forward(self._steps(), x, self.temperature, noise)
        else:
            result, cache = pact.discrete_forward(self._steps(), x, noise)
        self.cache = cache
        self.expected_steps, self.steps = result.expected_steps, result.steps
        # every unit and head ran on the whole batch
        self.flops_per_sample = sum(layer.flops_per_sample for layer in self.units + self.heads)
        return result.output

    def backward(self, dout, dexpected_steps=None, learning_signal=None):
        """Gradient w.r.t. the block input after a training-mode forward.

        Parameters
        ----------
        dout : ndarray, gradient w.r.t. the block output
        dexpected_steps : ndarray shaped like ``expected_steps``, or None (no ponder penalty)
        learning_signal : ndarray shaped like ``expected_steps`` or None — discrete mode only: the
            loss of the sampled ``n`` minus a baseline, per latent (:meth:`latent_signal`)
        """
        if self.cache is None or not isinstance(self.cache, (pact.RelaxedCache, pact.DiscreteCache)):
            raise RuntimeError("backward needs a training-mode forward (relaxed or discrete) first")
        if isinstance(self.cache, pact.RelaxedCache):
            if learning_signal is not None:
                raise ValueError("learning_signal is for the discrete mode; the relaxed mode is reparameterised")
            return pact.relaxed_backward(dout, dexpected_steps, self.cache)
        return pact.discrete_backward(dout, dexpected_steps, learning_signal, self.cache)

    def _early_halting_forward(self, x, rule):
        """Evaluation: stop each latent by ``rule``; run only what is needed (the shared block loop)."""
        self.cache, self.expected_steps = None, None
        policy = EarlyHalting(None if rule == "threshold" else self._noise)
        run = run_units(self.units, self.heads, x, self.early_step(), policy, self.per_position, keep_outputs=False)
        self.steps = 1 + sum(active.astype(np.int64) for active in run.active[1:])
        self.flops_per_sample = run.flops_per_sample
        return run.outputs[-1]

    def __repr__(self):
        group = f", group_size={self.group_size}" if self.latents == "group" else ""
        return f"PACTBlock({len(self.units)} units, latents={self.latents!r}{group}, mode={self.mode!r})"


class EarlyHalting:
    r"""PACT's test-time halting policies for the block loop of :mod:`refimpl.adaptive_block`.

    Thresholded (``noise=None``): a latent halts at the first unit whose logit is positive
    (:math:`h > 1/2`). Sampled: it halts with probability :math:`h = \sigma(a)`, drawn from
    ``noise(shape, dtype)`` when the unit has run.
    """

    def __init__(self, noise=None):
        self.noise = noise

    def __call__(self, index, rows, logits, active):
        if self.noise is None:
            halts = logits > 0
        else:
            halts = bernoulli_from_noise(logits, self.noise(logits.shape, logits.dtype))
        active = active.copy()
        active[rows] &= ~halts
        return active


def _latent_group_size(latents, group_size):
    if latents == "group":
        return _group_size(group_size)
    if group_size is not None:
        raise ValueError(f"group_size applies only to latents='group', got group_size={group_size!r} "
                         f"with latents={latents!r}")
    return None


def _positive(value, name):
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name} must be a positive real number, got {value!r}")
    return float(value)


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------


class PACTResNet(AdaptiveResNet):
    """ResNet-(6n+2) with a PACT block per stage.

    Extra parameters: ``latents`` ("per-block", "per-position" or "group"), ``group_size`` (g of
    the g×g groups, with ``latents="group"`` only), ``mode`` ("relaxed", "discrete",
    "thresholded"), ``temperature`` (λ, default 0.5), ``baseline_decay`` (REINFORCE moving
    average). The loss is cross-entropy + τ Σ_blocks mean E_q[n] (:meth:`extra_loss`), the mean
    over images and positions (over groups too when ``g`` divides the map; ragged edge groups
    weigh by their area, as the work they stand for).
    """

    kind = "pact"

    def __init__(self, n, num_classes, in_channels, rng, widths=(16, 32, 64), backend=None, tau=0.01,
                 halting_bias=HALTING_BIAS, dtype=np.float32, latents="per-block", mode="relaxed",
                 temperature=0.5, baseline_decay=0.9, group_size=None):
        rng = _checks.generator(rng)
        _checks.choice(latents, "latents", set(LATENTS))
        _latent_group_size(latents, group_size)  # before any weight is drawn
        self._noise_rng = np.random.default_rng(rng.integers(2**63))
        super().__init__(n, num_classes, in_channels, rng, widths=widths, backend=backend, tau=tau, dtype=dtype,
                         halting_bias=halting_bias, latents=latents, mode=mode, temperature=temperature,
                         group_size=group_size)
        self.baselines = [pact.MovingAverageBaseline(baseline_decay) for _ in self.stages]

    def make_block(self, units, rng, backend, dtype, halting_bias=HALTING_BIAS, latents="per-block", mode="relaxed",
                   temperature=0.5, group_size=None):
        if latents == "per-block":
            heads = [LogitHead(u.out_channels, rng, halting_bias, dtype) for u in units[:-1]]
        elif latents == "per-position":
            heads = [SpatialLogitHead(u.out_channels, rng, halting_bias, backend, dtype) for u in units[:-1]]
        else:
            heads = [GroupLogitHead(u.out_channels, group_size, rng, halting_bias, backend, dtype) for u in units[:-1]]
        return PACTBlock(units, heads, latents, mode, temperature, self._noise_rng, group_size)

    def latent_count(self, in_hw):
        """Halting latents per image for inputs of ``in_hw`` (H, W): Σ over blocks.

        One per block gives 3; one per position of a 32×32 CIFAR ResNet gives 32² + 16² + 8² = 1344;
        g×g groups give Σ ceil(H_b / g) · ceil(W_b / g) over the blocks' maps H_b × W_b.
        """
        hw = self.stem.output_hw(_checks.positive_pair(in_hw, "in_hw"))
        count = 0
        for block in self.stages:
            count += block.latent_count(hw)
            hw = block.units[0].conv1.output_hw(hw)
        return count

    def set_mode(self, mode):
        for block in self.stages:
            block.mode = mode

    def reseed(self, rng):
        """Draw the noise of the relaxed and discrete modes from ``rng`` from now on.

        Every block shares the one generator, so after ``reseed(np.random.default_rng(seed))`` two
        evaluations in a sampling mode draw the same noise: that is how the recorded figures of a
        shipped PACT model are recomputed exactly (:func:`refimpl.pretrained.evaluate_pretrained`).

        Parameters
        ----------
        rng : numpy.random.Generator
        """
        self._noise_rng = _checks.generator(rng)
        for block in self.stages:
            block.set_rng(self._noise_rng)

    def learning_signals(self, per_example_loss):
        """Per block, the REINFORCE learning signal ``(f - b) / N`` of per-example losses ``f`` (N,).

        ``b`` is the block's moving-average baseline before this batch; the baselines then fold the
        batch in. Only the discrete mode in training uses a learning signal.
        """
        n = len(per_example_loss)
        signals = [baseline.subtract(per_example_loss) / n for baseline in self.baselines]
        for baseline in self.baselines:
            baseline.update(per_example_loss)
        return signals

    def backward(self, dout, per_example_loss=None):
        """Gradient of the logits (upstream ``dout``) and of :meth:`extra_loss` w.r.t. the input.

        ``per_example_loss`` (N,), the task loss of each example, makes the REINFORCE learning
        signal of discrete training (without it only the pathwise and penalty gradients flow); the
        other modes refuse it.
        """
        if per_example_loss is None:
            return super().backward(dout)
        if not (self.training and self.stages[0].mode == "discrete"):
            raise ValueError(f"per_example_loss is for training in discrete mode, not mode {self.stages[0].mode!r}")
        signals = self.learning_signals(np.asarray(per_example_loss, dtype=np.float64))
        return self.blocks_backward(dout, [{"learning_signal": block.latent_signal(signal)}
                                           for block, signal in zip(self.stages, signals)])

    def objective_backward(self, dlogits, per_example_loss):
        discrete = self.training and self.stages[0].mode == "discrete"
        return self.backward(dlogits, per_example_loss if discrete else None)

    def __repr__(self):
        b = self.stages[0]
        group = f", group_size={b.group_size}" if b.latents == "group" else ""
        return f"PACTResNet-{self.depth}(latents={b.latents!r}{group}, mode={b.mode!r}, tau={self.tau})"


OPTIONS = "tau, latents, group_size, mode, temperature, baseline_decay, halting_bias, widths"
build_pact_resnet8, build_pact_resnet14, build_pact_resnet20, build_pact_resnet32, build_pact_resnet110 = (
    adaptive_resnet_builder(PACTResNet, depth, OPTIONS) for depth in DEPTHS)
