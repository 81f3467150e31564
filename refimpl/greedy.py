r"""Perforating a whole network, greedily (docs/spec.md §6.2).

Every perforable convolution (:func:`refimpl.impact.find_perforable_layers`) starts dense, at
kept fraction 1. The candidate kept fractions are those of the released code,

.. math:: f \in \{1,\ 1/1.5,\ 1/2,\ 1/3,\ 1/4,\ \dots,\ 1/20\}.

Each step tries, for every layer and every allowed mask type, the layer one notch further (random
masks — uniform, grid, and structure with its random tie-breaks — are drawn twice and the better
kept), measures the loss on a held-out subset and the cost (FLOPs per image, or the measured
forward time on the chosen backend), and applies the move of smallest

.. math:: \frac{L - L_0}{C_0 - C}\qquad(+\infty \text{ when } C \ge C_0),

where :math:`L_0, C_0` are the loss and cost of the current network. Impact masks are recomputed
on the current (already perforated) network before every step: *iterative impact*. Each step
records the theoretical speedup (dense FLOPs / FLOPs), the measured speedup (dense forward time /
forward time), loss, error and the masks themselves, so the :class:`Profile` saved as JSON rebuilds
the network of any step (:func:`apply_step`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import _checks
from .conv_layer import Conv2d
from .flops import dense_flops
from .impact import find_perforable_layers, impact_mask_for, impact_maps, kept_positions, structure_mask_for
from .masks import MASK_TYPES, grid_mask, uniform_mask
from .measurement import RUNNERS, Bench, as_split, measure_loss, measure_time, timing_batch_of, use_backend

__all__ = ["KEPT_FRACTIONS", "Profile", "apply_step", "finetune_step", "load_profile", "make_layer_mask",
           "measure_loss", "measure_time", "move_cost", "perforate_network", "set_group_mask", "use_backend"]

KEPT_FRACTIONS = (1.0, 1 / 1.5) + tuple(1.0 / k for k in range(2, 21))
RANDOM_MASK_TYPES = ("uniform", "grid", "structure")
COSTS = ("time", "flops")
PROFILE_FORMAT = "ponder-perforation-profile"


# ---------------------------------------------------------------------------------------------
# Masks on a network
# ---------------------------------------------------------------------------------------------


def set_group_mask(model, info, mask):
    """Give the perforable layer ``info`` and its followers the mask ``mask`` (``None`` = dense)."""
    layers = dict(model.named_layers())
    for name in info.layers:
        layers[name].set_mask(mask, "nearest")


def make_layer_mask(mask_type, info, kept_fraction, rng, impact=None):
    """A mask of ``mask_type`` for the perforable layer ``info`` keeping the fraction ``kept_fraction``.

    Parameters
    ----------
    mask_type : "uniform", "grid", "structure" or "impact"
    info : refimpl.impact.PerforableLayer
    kept_fraction : float in (0, 1]
    rng : numpy.random.Generator
    impact : ndarray (Ho, Wo), needed for ``"impact"``

    Returns
    -------
    mask : bool (Ho, Wo)
    """
    _checks.choice(mask_type, "mask_type", set(MASK_TYPES))
    rate = 1.0 - float(kept_fraction)
    if mask_type == "uniform":
        return uniform_mask(info.out_hw, rate, rng)
    if mask_type == "grid":
        return grid_mask(info.out_hw, rate, rng)
    if mask_type == "structure":
        return structure_mask_for(info, kept_fraction, rng)
    if impact is None:
        raise ValueError("mask_type='impact' needs impact= (from refimpl.impact.impact_maps)")
    return impact_mask_for(impact, kept_fraction, rng)


# ---------------------------------------------------------------------------------------------
# The profile
# ---------------------------------------------------------------------------------------------


def describe_mask(info, mask_type, kept_fraction, mask):
    """JSON description of one perforated layer (enough to rebuild it exactly)."""
    return {"mask_type": mask_type, "kept_fraction": float(kept_fraction), "out_hw": list(info.out_hw),
            "followers": list(info.followers), "kept": int(mask.sum()),
            "rate": float(1.0 - mask.mean()), "positions": np.flatnonzero(mask).tolist()}


def mask_from_description(entry):
    """The boolean (Ho, Wo) mask of a :func:`describe_mask` entry."""
    ho, wo = entry["out_hw"]
    mask = np.zeros(ho * wo, dtype=bool)
    mask[np.asarray(entry["positions"], dtype=np.int64)] = True
    return mask.reshape(ho, wo)


@dataclass
class Profile:
    """The speed/quality curve of a greedy perforation and the networks along it.

    Attributes
    ----------
    settings : dict — cost, backend, mask types, fractions, data sizes, seed, …
    layers : list of dict — the perforable layers (name, followers, out_hw, next layer, window)
    steps : list of dict — per step: ``step``, ``move`` (layer, mask type, kept fraction, move
        cost; ``None`` for step 0), ``flops``, ``seconds``, ``theoretical_speedup``,
        ``measured_speedup``, ``loss``, ``error`` and ``perforation`` (layer -> description)
    stop_reason : str — why the search stopped (target reached, no move left, ...)
    """

    settings: dict
    layers: list
    steps: list = field(default_factory=list)
    stop_reason: str = ""  # why the search stopped, in words

    def to_dict(self):
        return {"format": PROFILE_FORMAT, "version": 1, "settings": self.settings, "layers": self.layers,
                "steps": self.steps, "stop_reason": self.stop_reason}

    def save(self, path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    def column(self, key):
        return [step[key] for step in self.steps]

    def first_reaching(self, speedup, key="measured_speedup"):
        """The first step whose ``key`` is at least ``speedup`` (``None`` if none is)."""
        return next((s for s in self.steps if s[key] >= speedup), None)


def load_profile(path):
    """Read a :class:`Profile` written by :meth:`Profile.save`."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        raise ValueError(f"{str(path)!r} is not a ponder perforation profile (format {PROFILE_FORMAT!r})")
    return Profile(data["settings"], data["layers"], data["steps"], data.get("stop_reason", ""))


def apply_step(model, profile, step):
    """Set the masks of step ``step`` of ``profile`` on ``model`` (same architecture, same input size).

    Layers the step does not name are made dense. Returns ``model``.
    """
    if not 0 <= int(step) < len(profile.steps):
        raise ValueError(f"step must be in [0, {len(profile.steps) - 1}], got {step}")
    layers = dict(model.named_layers())
    description = profile.steps[int(step)]["perforation"]
    for entry in profile.layers:
        for name in [entry["name"], *entry["followers"]]:
            if not isinstance(layers.get(name), Conv2d):
                raise ValueError(f"the profile names {name!r}, which is not a convolution of this model")
            item = description.get(entry["name"])
            layers[name].set_mask(None if item is None else mask_from_description(item), "nearest")
    return model


# ---------------------------------------------------------------------------------------------
# The greedy procedure: search state, candidate moves, the loop
# ---------------------------------------------------------------------------------------------


@dataclass
class _LayerState:
    mask_type: str | None = None
    notch: int = 0
    mask: np.ndarray | None = None  # None = dense


@dataclass
class Move:
    """One candidate step: perforate ``info`` with ``mask`` (of ``mask_type``, at ``fractions[notch]``)."""

    info: object
    mask_type: str
    notch: int
    mask: np.ndarray
    loss: float
    error: float
    flops: float
    seconds: float | None = None
    value: float = float("inf")  # move cost: loss increase per unit of cost saved


def move_cost(loss, loss0, cost, cost0):
    """``(loss - loss0) / (cost0 - cost)``, or ``+inf`` when the move saves nothing."""
    saved = cost0 - cost
    return (loss - loss0) / saved if saved > 0 else float("inf")


def check_search_arguments(target_speedup, mask_types, cost, runner, fractions):
    """Validate the settings of :func:`perforate_network`; returns ``(mask_types, fractions)`` as tuples."""
    _checks.choice(cost, "cost", set(COSTS))
    _checks.choice(runner, "runner", set(RUNNERS))
    mask_types = tuple(mask_types)
    if not mask_types:
        raise ValueError("mask_types must name at least one mask type")
    for kind in mask_types:
        _checks.choice(kind, "mask_types", set(MASK_TYPES))
    if not (isinstance(target_speedup, (int, float)) and target_speedup >= 1):
        raise ValueError(f"target_speedup must be a number >= 1, got {target_speedup!r}")
    fractions = tuple(float(f) for f in fractions)
    if not fractions or fractions[0] != 1.0 or any(b >= a for a, b in zip(fractions, fractions[1:])) or fractions[-1] <= 0:
        raise ValueError(f"fractions must start at 1 and decrease strictly to a positive value, got {fractions}")
    return mask_types, fractions


def next_notch(info, state, fractions):
    """The next kept fraction (index into ``fractions``) that keeps fewer positions, or ``None``.

    On small maps several notches round to the same number of kept positions; those are no move.
    """
    current_kept = int(np.prod(info.out_hw)) if state.mask is None else int(state.mask.sum())
    notch = state.notch + 1
    while notch < len(fractions) and kept_positions(info.out_hw, fractions[notch]) >= current_kept:
        notch += 1
    return notch if notch < len(fractions) else None


def best_mask_for(model, info, state, kind, kept_fraction, rng, impact, bench, tries):
    """The lowest-loss of ``tries`` masks of ``kind`` for one layer, as ``(loss, error, flops, mask)``.

    ``None`` when no draw keeps fewer positions than the layer keeps now. The model is left as found.
    """
    current_kept = int(np.prod(info.out_hw)) if state.mask is None else int(state.mask.sum())
    best = None
    for _ in range(tries):
        mask = make_layer_mask(kind, info, kept_fraction, rng, impact)
        if mask.sum() >= current_kept:
            continue
        set_group_mask(model, info, mask)
        loss, error, flops = bench.loss(model)
        if best is None or loss < best[0]:
            best = (loss, error, flops, mask)
    set_group_mask(model, info, state.mask)
    return best


def candidate_moves(model, infos, states, mask_types, fractions, rng, impacts, bench, random_repeats, cost):
    """Every move one notch further, for every layer and mask type, measured (loss; time if ``cost="time"``)."""
    for info in infos:
        state = states[info.name]
        notch = next_notch(info, state, fractions)
        if notch is None:
            continue
        for kind in mask_types:
            tries = random_repeats if kind in RANDOM_MASK_TYPES else 1
            found = best_mask_for(model, info, state, kind, fractions[notch], rng, impacts.get(info.name), bench, tries)
            if found is None:
                continue
            move = Move(info, kind, notch, found[3], *found[:3])
            if cost == "time":
                set_group_mask(model, info, move.mask)
                move.seconds = bench.seconds(model)
                set_group_mask(model, info, state.mask)
            yield move


def new_profile(settings, infos):
    """An empty :class:`Profile` with ``settings`` and the description of the perforable layers."""
    return Profile(settings=settings, layers=[
        {"name": i.name, "followers": list(i.followers), "out_hw": list(i.out_hw), "next": i.next_name,
         "window": {k: (list(v) if isinstance(v, tuple) else v) for k, v in i.window.items()}} for i in infos])


def record_step(profile, bench, infos, states, fractions, move, loss, error, flops, seconds):
    """Append a step to ``profile``: the measurements and the masks of every perforated layer."""
    perforation = {info.name: describe_mask(info, st.mask_type, fractions[st.notch], st.mask)
                   for info in infos if (st := states[info.name]).mask is not None}
    profile.steps.append({"step": len(profile.steps), "move": move,
                          **bench.point(loss, error, flops, seconds), "perforation": perforation})
    return profile.steps[-1]


def describe_step(step):
    """One line for a recorded step (the progress output of :func:`perforate_network`)."""
    move = step["move"]
    return (f"step {step['step']:3d}: theoretical {step['theoretical_speedup']:.2f}x, measured "
            f"{step['measured_speedup']:.2f}x, loss {step['loss']:.4f}, error {step['error']:.4f}"
            + (f"  <- {move['layer']} {move['mask_type']} f={move['kept_fraction']:.3f}" if move else ""))


def perforate_network(model, data, target_speedup, mask_types=("impact", "grid"), cost="flops", backend=None,
                      rng=None, impact_data=None, fractions=KEPT_FRACTIONS, timing_batch=64, timing_repeats=5,
                      random_repeats=2, max_steps=None, batch_size=256, progress=False, timer=time.perf_counter,
                      runner="layers"):
    """Greedily perforate ``model`` until it is ``target_speedup`` times faster (see the specification
    page, docs/spec.md, on whole-network perforation).

    Parameters
    ----------
    model : Layer producing logits (a trained network; its perforable convolutions start dense)
    data : Split or (images, labels) — the held-out subset on which loss and error are measured;
        its first ``timing_batch`` images are the batch whose forward time is measured
    target_speedup : float >= 1 — stop once the speedup (measured for ``cost="time"``,
        theoretical for ``"flops"``) reaches it
    mask_types : subset of ("uniform", "grid", "structure", "impact")
    cost : "time" (median measured forward time) or "flops"
    backend : conv backend for every convolution (name or object; None keeps the model's own)
    rng : numpy.random.Generator for every random mask and tie-break
    impact_data : Split or (images, labels) for the impact statistics (default ``data``)
    fractions : candidate kept fractions, decreasing from 1
    timing_batch, timing_repeats : the timed batch size and the number of timed runs (median)
    random_repeats : draws of each random mask type per candidate, the lowest loss kept
    max_steps : int or None — stop after this many steps
    batch_size : batch size of the loss and impact passes
    progress : print one line per step and a progress bar over each step's candidates
    timer : the clock of the time measurements (default ``time.perf_counter``)
    runner : how the timed forward runs: ``"layers"`` (``model(x)``, filled maps) or
        ``"implicit"`` (:func:`refimpl.implicit_network.run_implicit`; chain networks only)

    Returns
    -------
    Profile — step 0 is the dense network; ``stop_reason`` says why the search ended; the model is
    left in the state of the last step
    """
    rng = _checks.generator(rng)
    split = as_split(data)
    impact_split = split if impact_data is None else as_split(impact_data, "impact_data")
    mask_types, fractions = check_search_arguments(target_speedup, mask_types, cost, runner, fractions)
    if len(split) == 0:
        raise ValueError("data must hold at least one example")
    backend = use_backend(model, backend)
    bench = Bench(split, timing_batch_of(model, split, timing_batch), timing_repeats, batch_size, timer, runner)
    infos = find_perforable_layers(model, bench.timing_x[:2])
    if not infos:
        raise ValueError("the model has no perforable convolution (a conv that is not 1x1/stride 1 followed by a "
                         "spatial layer)")
    for info in infos:
        set_group_mask(model, info, None)
    states = {info.name: _LayerState() for info in infos}

    loss0, error0, flops0 = bench.loss(model)
    seconds0 = bench.seconds(model)
    bench.set_reference(dense_flops(model), seconds0)  # per image, from the geometry of the forward just run
    profile = new_profile(
        {"cost": cost, "backend": backend.name, "mask_types": list(mask_types), "fractions": list(fractions),
         "target_speedup": float(target_speedup), "held_out": len(split), "impact_images": len(impact_split),
         "timing_batch": int(bench.timing_x.shape[0]), "timing_repeats": int(timing_repeats),
         "random_repeats": int(random_repeats), "runner": runner, "dense_flops": bench.dense_flops,
         "dense_seconds": bench.dense_seconds}, infos)
    step = record_step(profile, bench, infos, states, fractions, None, loss0, error0, flops0, seconds0)
    if progress:
        print(describe_step(step), flush=True)
    cost_now = seconds0 if cost == "time" else flops0
    speed_key = "measured_speedup" if cost == "time" else "theoretical_speedup"
    while True:
        if profile.steps[-1][speed_key] >= target_speedup:
            profile.stop_reason = f"target reached: {speed_key.replace('_', ' ')} {profile.steps[-1][speed_key]:.2f}x"
            break
        if max_steps is not None and len(profile.steps) > max_steps:
            profile.stop_reason = f"max_steps ({max_steps}) reached"
            break
        impacts = (impact_maps(model, impact_split.images, impact_split.labels, [i.name for i in infos], batch_size)
                   if "impact" in mask_types else {})
        moves = candidate_moves(model, infos, states, mask_types, fractions, rng, impacts, bench, random_repeats, cost)
        if progress:
            from tqdm.auto import tqdm

            moves = tqdm(moves, desc=f"step {len(profile.steps)} candidates", leave=False,
                         total=len(infos) * len(mask_types))
        best = None
        for move in moves:
            move.value = move_cost(move.loss, loss0, move.seconds if cost == "time" else move.flops, cost_now)
            if best is None or move.value < best.value:
                best = move
        if best is None:
            profile.stop_reason = "no layer left to perforate: every layer is at its smallest kept fraction"
            break
        if not np.isfinite(best.value):
            profile.stop_reason = (f"no move lowers the {cost} any more" + (" (measured time is noisy: try "
                                   "--cost flops or --clock cpu)" if cost == "time" else ""))
            break
        set_group_mask(model, best.info, best.mask)
        states[best.info.name] = _LayerState(best.mask_type, best.notch, best.mask)
        seconds = bench.seconds(model)
        loss0, cost_now = best.loss, (seconds if cost == "time" else best.flops)
        step = record_step(profile, bench, infos, states, fractions,
                           {"layer": best.info.name, "mask_type": best.mask_type,
                            "kept_fraction": fractions[best.notch], "move_cost": float(best.value)},
                           best.loss, best.error, best.flops, seconds)
        if progress:
            print(describe_step(step), flush=True)
    return profile


def finetune_step(model, profile, step, train, epochs=1, lr=0.01, rng=None, batch_size=64, val=None, progress=False):
    """Fine-tune the network of step ``step`` (its masks fixed) with SGD and momentum.

    Returns the :class:`refimpl.training.History`; ``model`` is left perforated and fine-tuned.
    """
    from .optim import SGD
    from .training import fit

    apply_step(model, profile, step)
    optimizer = SGD(model.named_parameters(), lr=lr, momentum=0.9)
    return fit(model, optimizer, as_split(train, "train"), val=None if val is None else as_split(val, "val"),
               epochs=epochs, batch_size=batch_size, rng=_checks.generator(rng), progress=progress)
