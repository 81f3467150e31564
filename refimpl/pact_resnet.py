r"""Residual networks with probabilistic adaptive computation (PACT-ResNet, SPEC §4).

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
  trained with REINFORCE: the network's :meth:`PACTResNet.task_loss` hands each block the
  per-example learning signal (loss minus a moving-average baseline, one per block). In
  evaluation, sampling happens as the units run and only the needed work is done.
* ``thresholded`` — evaluation only: a latent halts at the first :math:`h_l > 1/2`. Per-block
  latents: units run on the sub-batch of images still running. Per-position latents: residual
  branches run **only at active positions** through the perforated convolution, exactly like SACT
  (:func:`refimpl.sact.branch_forward`), and halted positions keep their value. Group latents run
  the same way: a group's positions are active together.

Loss: cross-entropy of the block outputs' logits plus
:math:`\tau \sum_\text{blocks} \operatorname{mean}_{\text{batch}, \text{latents}} \mathbb{E}_q[n]`.
FLOPs are counted where computed (training modes: everything; early-halting evaluation: the
sub-batches or active positions actually run, heads included).
"""

from __future__ import annotations

import numbers

import numpy as np

from . import _checks, pact
from .act import HALTING_BIAS, AdaptiveResNet, _upsample_nearest, adaptive_resnet_builder, unit_flops
from .distributions import bernoulli_from_noise, uniform_noise
from .layers import Layer, global_avg_pool_backward, global_avg_pool_forward
from .losses import log_softmax
from .sact import SpatialLogitHead, branch_forward, check_sact_unit

LATENTS = ("per-block", "per-position", "group")
MODES = pact.MODES


# ---------------------------------------------------------------------------------------------
# Halting heads that return logits
# ---------------------------------------------------------------------------------------------


class LogitHead(Layer):
    """Per-image halting logit: (n, C, H, W) → (n,), ``w · gap(U) + b``."""

    def __init__(self, channels, rng, bias=HALTING_BIAS, dtype=np.float32):
        super().__init__()
        self.channels = int(channels)
        self.add_param("w", (0.01 * rng.standard_normal(self.channels)).astype(dtype))
        self.add_param("b", np.full(1, bias, dtype=dtype))

    def flops(self, u):
        return np.full(u.shape[0], 2 * self.channels, dtype=np.int64)

    def forward(self, u, active=None):
        pooled, gap_cache = global_avg_pool_forward(u)
        self.cache = (pooled, gap_cache)
        return (pooled @ self.params["w"] + self.params["b"][0]).astype(u.dtype, copy=False)

    def backward(self, dlogit):
        pooled, gap_cache = self.cache
        self.accumulate("w", pooled.T @ dlogit)
        self.accumulate("b", np.array([dlogit.sum()], dtype=self.params["b"].dtype))
        return global_avg_pool_backward(np.outer(dlogit, self.params["w"]).astype(dlogit.dtype), gap_cache)

    def __repr__(self):
        return f"LogitHead({self.channels})"


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
    instead of once per group — ``1/(2C)`` of a residual unit's FLOPs, counted in :meth:`flops`.

    The returned map repeats the group's logit at each of its positions; the backward sums the
    positions' gradients per group, then spreads them over the group's local terms (mean pooling).
    """

    def __init__(self, channels, group_size, rng, bias=HALTING_BIAS, backend=None, dtype=np.float32):
        super().__init__(channels, rng, bias, backend, dtype)
        self.group_size = _group_size(group_size)

    def forward(self, u, active=None):
        local = (self.local(u) if active is None else self.local(u, mask=active, fill="zero"))[:, 0]
        pooled, gap_cache = global_avg_pool_forward(u)
        self.cache = (pooled, gap_cache)
        grouped = group_mean_forward(local, self.group_size) + (pooled @ self.params["w_global"])[:, None, None]
        return group_broadcast(grouped.astype(u.dtype, copy=False), self.group_size, u.shape[2:])

    def backward(self, dlogit):
        pooled, gap_cache = self.cache
        dgroup = group_sum(dlogit, self.group_size)
        dlocal = group_mean_backward(dgroup, self.group_size, dlogit.shape[1:])
        du = self.local.backward(np.ascontiguousarray(dlocal[:, None]))
        dglobal = dgroup.sum(axis=(1, 2))
        self.accumulate("w_global", pooled.T @ dglobal)
        return du + global_avg_pool_backward(np.outer(dglobal, self.params["w_global"]).astype(dlogit.dtype),
                                             gap_cache)

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
    ``steps`` (units run per latent: early-halting evaluation and discrete mode) and
    ``flops_per_sample`` (N,). Group latents keep these per position (each position carries its
    group's value), so maps and means over positions read the same for every kind of latent.

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
        if len(heads) != len(units) - 1:
            raise ValueError(f"heads must hold len(units) - 1 = {len(units) - 1} halting heads, got {len(heads)}")
        self.latents = _checks.choice(latents, "latents", set(LATENTS))
        self.group_size = _latent_group_size(latents, group_size)
        if latents != "per-block":
            for unit in units[1:]:
                check_sact_unit(unit)
        self.units, self.heads = list(units), list(heads)
        self.mode = mode
        self.temperature = _positive(temperature, "temperature")
        self.rng = _checks.generator(rng)
        self.expected_steps = self.steps = self.flops_per_sample = None
        self._dexpected = self._signal = None

    @property
    def mode(self):
        return self._mode

    @mode.setter
    def mode(self, value):
        self._mode = _checks.choice(value, "mode", set(MODES))

    def _steps(self):
        return [ResidualStep(u, self.heads[i] if i < len(self.heads) else None, self.latents)
                for i, u in enumerate(self.units)]

    def set_gradients(self, dexpected_steps, learning_signal=None):
        """Gradient w.r.t. ``expected_steps`` and the REINFORCE signal (discrete) for the next backward."""
        self._dexpected, self._signal = dexpected_steps, learning_signal

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
        """Uniform noise for per-position logits ``shape`` (n, H, W, ...), drawn once per latent.

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
        n = x.shape[0]  # every unit and head ran on the whole batch
        self.flops_per_sample = sum(unit_flops(u, n) for u in self.units) + sum(h.flops(x) for h in self.heads)
        return result.output

    def backward(self, dout):
        if self.cache is None or not isinstance(self.cache, (pact.RelaxedCache, pact.DiscreteCache)):
            raise RuntimeError("backward needs a training-mode forward (relaxed or discrete) first")
        dexpected, signal = self._dexpected, self._signal
        self._dexpected = self._signal = None
        if isinstance(self.cache, pact.RelaxedCache):
            return pact.relaxed_backward(dout, dexpected, self.cache)
        return pact.discrete_backward(dout, dexpected, signal, self.cache)

    def _early_halting_forward(self, x, rule):
        """Evaluation: stop each latent by ``rule``; run only what is needed."""
        self.cache, self.expected_steps = None, None
        if self.latents == "per-block":
            steps = self._steps()
            result = pact.halt_early_forward(steps, x, rule, self.rng if rule == "sample" else None)
            self.steps = result.steps
            self.flops_per_sample = self._per_block_flops(x, result.units_run)
            return result.output
        return self._sparse_forward(x, rule)

    def _per_block_flops(self, x, units_run):
        """FLOPs per image when image i ran units 1..units_run[i] (and the heads after them)."""
        flops = np.zeros(x.shape[0], np.int64)
        for index, unit in enumerate(self.units):
            ran = units_run > index  # the images unit `index` ran on, in its last forward
            if not ran.any():
                break
            cost = int(unit_flops(unit, int(ran.sum()))[0])  # the same for every image of the sub-batch
            if index < len(self.heads):
                cost += 2 * self.heads[index].channels
            flops += cost * ran
        return flops

    def _sparse_forward(self, x, rule):
        """Per-position early halting with residual branches at active positions only (as SACT)."""
        n = x.shape[0]
        current = self.units[0](x)  # the first unit runs densely (and may downsample)
        flops = unit_flops(self.units[0], n)
        active = np.ones((n, *current.shape[2:]), dtype=bool)
        steps = np.ones(active.shape, dtype=np.int64)
        for index in range(1, len(self.units)):
            running = np.flatnonzero(active.any(axis=(1, 2)))
            if running.size == 0:
                break
            head = self.heads[index - 1]
            logits = head(current[running], active[running])
            flops[running] += head.flops(current[running])
            if rule == "threshold":
                halts = logits > 0
            else:
                halts = bernoulli_from_noise(logits, self._noise(logits.shape, logits.dtype))
            still = active[running] & ~halts
            active = active.copy()
            active[running] = still
            running = running[still.any(axis=(1, 2))]
            if running.size == 0:
                break
            residual, _, branch_flops = branch_forward(self.units[index], current[running], active[running], "sparse")
            flops[running] += branch_flops
            current = current.copy()
            current[running] += residual
            steps[running] += active[running]
        self.steps, self.flops_per_sample = steps, flops
        return current

    def __repr__(self):
        group = f", group_size={self.group_size}" if self.latents == "group" else ""
        return f"PACTBlock({len(self.units)} units, latents={self.latents!r}{group}, mode={self.mode!r})"


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
                 halting_bias=HALTING_BIAS, eps=0.01, dtype=np.float32, latents="per-block", mode="relaxed",
                 temperature=0.5, baseline_decay=0.9, group_size=None):
        rng = _checks.generator(rng)
        _checks.choice(latents, "latents", set(LATENTS))
        _latent_group_size(latents, group_size)  # before any weight is drawn
        self._noise_rng = np.random.default_rng(rng.integers(2**63))
        super().__init__(n, num_classes, in_channels, rng, widths=widths, backend=backend, tau=tau,
                         halting_bias=halting_bias, eps=eps, dtype=dtype, latents=latents, mode=mode,
                         temperature=temperature, group_size=group_size)
        self.baselines = [pact.MovingAverageBaseline(baseline_decay) for _ in self.stages]
        self._signal = None

    def _make_block(self, units, rng, halting_bias, eps, backend, dtype, latents="per-block", mode="relaxed",
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

    def block_ponder_costs(self):
        """Each block's E_q[n] of the last forward (the number of units run, in early-halting evaluation)."""
        return [b.expected_steps if b.expected_steps is not None else b.steps for b in self.stages]

    def ponder_map(self, in_hw):
        """Computation-time map (N, H, W) of the last forward, upsampled (nearest) to ``in_hw``.

        Σ_blocks of E_q[n] per latent after a relaxed or discrete-training forward, of the units run
        per latent after an early-halting evaluation (thresholded, discrete); a per-block latent
        covers its whole map, a group its positions.
        """
        total = 0
        for block in self.stages:
            steps = block.expected_steps if block.expected_steps is not None else block.steps
            if steps is None:
                raise RuntimeError("ponder_map needs a forward first")
            steps = np.asarray(steps, dtype=np.float64)
            if steps.ndim == 1:
                steps = steps[:, None, None]
            total = total + _upsample_nearest(steps, tuple(in_hw))
        return total

    def task_loss(self, logits, labels):
        """Mean cross-entropy and its gradient; in discrete mode also the REINFORCE signals per block."""
        logp = log_softmax(logits.astype(np.float64))
        per_example = -logp[np.arange(len(labels)), labels]
        dlogits = np.exp(logp)
        dlogits[np.arange(len(labels)), labels] -= 1.0
        n = len(labels)
        if self.training and self.stages[0].mode == "discrete":
            self._signal = [b.subtract(per_example) / n for b in self.baselines]
            for b in self.baselines:
                b.update(per_example)
        return float(per_example.mean()), (dlogits / n).astype(logits.dtype)

    def backward(self, dout):
        d = self.head.backward(dout)
        signals = self._signal or [None] * len(self.stages)
        self._signal = None
        for block, signal in zip(reversed(self.stages), reversed(signals)):
            e = block.expected_steps
            dexpected = np.full(e.shape, self.tau / e.size, dtype=e.dtype)
            block.set_gradients(dexpected, None if signal is None else block.latent_signal(signal))
            d = block.backward(d)
        return self.stem.backward(d)

    def __repr__(self):
        b = self.stages[0]
        group = f", group_size={b.group_size}" if b.latents == "group" else ""
        return f"PACTResNet-{self.depth}(latents={b.latents!r}{group}, mode={b.mode!r}, tau={self.tau})"


def _builder(depth):
    build = adaptive_resnet_builder(PACTResNet, depth)
    build.__doc__ = (f"PACTResNet of depth {depth}; options: tau, latents, group_size, mode, temperature, "
                     "baseline_decay, halting_bias, widths.")
    return build


build_pact_resnet8 = _builder(8)
build_pact_resnet14 = _builder(14)
build_pact_resnet20 = _builder(20)
build_pact_resnet32 = _builder(32)
build_pact_resnet110 = _builder(110)
