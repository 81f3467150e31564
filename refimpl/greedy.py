r"""Perforating a whole network, greedily (SPEC §1.2).

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
from .backend import get_backend
from .conv_layer import Conv2d
from .datasets import Split
from .flops import dense_flops, network_flops
from .impact import find_perforable_layers, impact_mask_for, impact_maps, kept_positions, structure_mask_for
from .losses import softmax_cross_entropy_forward
from .masks import MASK_TYPES, grid_mask, uniform_mask

KEPT_FRACTIONS = (1.0, 1 / 1.5) + tuple(1.0 / k for k in range(2, 21))
RANDOM_MASK_TYPES = ("uniform", "grid", "structure")
COSTS = ("time", "flops")
RUNNERS = ("layers", "implicit")
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


def use_backend(model, backend):
    """Run every convolution of ``model`` on ``backend`` (a name or a ConvBackend); ``None`` keeps
    the model's own. Returns the backend of the first convolution."""
    convs = [layer for layer in model.layers() if isinstance(layer, Conv2d)]
    if backend is not None:
        backend = get_backend(backend)
        for layer in convs:
            layer.backend = backend
    return convs[0].backend if convs else get_backend(backend)


# ---------------------------------------------------------------------------------------------
# Measuring a network: loss, error, FLOPs, time
# ---------------------------------------------------------------------------------------------


def _as_split(data, name="data"):
    if isinstance(data, Split):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return Split(np.asarray(data[0]), np.asarray(data[1]))
    raise TypeError(f"{name} must be a refimpl.datasets.Split or (images, labels), got {type(data).__name__}")


def _dtype(model):
    return next(p for _, p, _ in model.named_parameters()).dtype


def measure_loss(model, split, batch_size=256):
    """``(mean cross-entropy, error rate, FLOPs per image)`` of ``model`` in evaluation mode on ``split``."""
    model.eval()
    dtype = _dtype(model)
    total, wrong, flops = 0.0, 0, 0.0
    for start in range(0, len(split), batch_size):
        x = split.images[start:start + batch_size].astype(dtype, copy=False)
        y = split.labels[start:start + batch_size]
        logits = model(x)
        loss, _ = softmax_cross_entropy_forward(logits, y)
        total += float(loss) * len(y)
        wrong += int(np.sum(np.argmax(logits, axis=1) != y))
        flops = network_flops(model) / len(y)
    return total / len(split), wrong / len(split), flops


def measure_time(model, x, repeats=5, timer=time.perf_counter, runner="layers"):
    """Median time (seconds) of a forward pass of ``x`` in evaluation mode over ``repeats`` runs, after one warm-up.

    ``runner="layers"`` times ``model(x)``; ``"implicit"`` times
    :func:`refimpl.implicit_network.run_implicit` (compact activations read through index tables,
    poolings on the backend). ``timer`` is the clock (a function returning seconds): wall time by
    default, ``time.process_time`` for the CPU time of a single-threaded backend, or a fake in tests.
    """
    _checks.choice(runner, "runner", set(RUNNERS))
    model.eval()
    if runner == "implicit":
        from .implicit_network import chain_layers, run_implicit

        chain = chain_layers(model, x[:1])

        def forward():
            return run_implicit(model, x, chain=chain)
    else:
        def forward():
            return model(x)
    forward()
    times = []
    for _ in range(repeats):
        start = timer()
        forward()
        times.append(timer() - start)
    return float(np.median(times))


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
    """

    settings: dict
    layers: list
    steps: list = field(default_factory=list)

    def to_dict(self):
        return {"format": PROFILE_FORMAT, "version": 1, "settings": self.settings, "layers": self.layers,
                "steps": self.steps}

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
    return Profile(data["settings"], data["layers"], data["steps"])


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
# The greedy procedure
# ---------------------------------------------------------------------------------------------


@dataclass
class _LayerState:
    mask_type: str | None = None
    notch: int = 0
    mask: np.ndarray | None = None  # None = dense


def move_cost(loss, loss0, cost, cost0):
    """``(loss - loss0) / (cost0 - cost)``, or ``+inf`` when the move saves nothing."""
    saved = cost0 - cost
    return (loss - loss0) / saved if saved > 0 else float("inf")


def perforate_network(model, data, target_speedup, mask_types=("impact", "grid"), cost="flops", backend=None,
                      rng=None, impact_data=None, fractions=KEPT_FRACTIONS, timing_batch=64, timing_repeats=5,
                      random_repeats=2, max_steps=None, batch_size=256, progress=False, timer=time.perf_counter,
                      runner="layers"):
    """Greedily perforate ``model`` until it is ``target_speedup`` times faster (SPEC §1.2).

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
    progress : print one line per step
    timer : the clock of the time measurements (default ``time.perf_counter``)
    runner : how the timed forward runs: ``"layers"`` (``model(x)``, filled maps) or
        ``"implicit"`` (:func:`refimpl.implicit_network.run_implicit`; chain networks only)

    Returns
    -------
    Profile — step 0 is the dense network; the model is left in the state of the last step
    """
    rng = _checks.generator(rng)
    split = _as_split(data)
    impact_split = split if impact_data is None else _as_split(impact_data, "impact_data")
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
    if len(split) == 0:
        raise ValueError("data must hold at least one example")
    backend = use_backend(model, backend)
    dtype = _dtype(model)
    timing_x = np.ascontiguousarray(split.images[:timing_batch].astype(dtype, copy=False))

    infos = find_perforable_layers(model, timing_x[:2])
    if not infos:
        raise ValueError("the model has no perforable convolution (a conv that is not 1x1/stride 1 followed by a "
                         "spatial layer)")
    for info in infos:
        set_group_mask(model, info, None)
    states = {info.name: _LayerState() for info in infos}
    uses_impact = "impact" in mask_types

    def evaluate():
        loss, error, flops = measure_loss(model, split, batch_size)
        return loss, error, flops

    def description():
        return {info.name: describe_mask(info, st.mask_type, fractions[st.notch], st.mask)
                for info in infos if (st := states[info.name]).mask is not None}

    loss0, error0, flops0 = evaluate()
    dense = dense_flops(model)  # per image, from the geometry of the forward just run
    seconds0 = measure_time(model, timing_x, timing_repeats, timer, runner)
    dense_seconds = seconds0
    profile = Profile(
        settings={"cost": cost, "backend": backend.name, "mask_types": list(mask_types), "fractions": list(fractions),
                  "target_speedup": float(target_speedup), "held_out": len(split), "impact_images": len(impact_split),
                  "timing_batch": int(timing_x.shape[0]), "timing_repeats": int(timing_repeats),
                  "random_repeats": int(random_repeats), "runner": runner, "dense_flops": float(dense),
                  "dense_seconds": float(dense_seconds)},
        layers=[{"name": i.name, "followers": list(i.followers), "out_hw": list(i.out_hw), "next": i.next_name,
                 "window": {k: (list(v) if isinstance(v, tuple) else v) for k, v in i.window.items()}}
                for i in infos])

    def record(move, loss, error, flops, seconds):
        profile.steps.append({"step": len(profile.steps), "move": move, "flops": float(flops),
                              "seconds": float(seconds), "theoretical_speedup": float(dense / flops),
                              "measured_speedup": float(dense_seconds / seconds), "loss": float(loss),
                              "error": float(error), "perforation": description()})
        if progress:
            s = profile.steps[-1]
            print(f"step {s['step']:3d}: theoretical {s['theoretical_speedup']:.2f}x, measured "
                  f"{s['measured_speedup']:.2f}x, loss {loss:.4f}, error {error:.4f}"
                  + (f"  <- {move['layer']} {move['mask_type']} f={move['kept_fraction']:.3f}" if move else ""),
                  flush=True)

    record(None, loss0, error0, flops0, seconds0)
    cost_now = seconds0 if cost == "time" else flops0

    def reached():
        last = profile.steps[-1]
        return last["measured_speedup" if cost == "time" else "theoretical_speedup"] >= target_speedup

    while not reached() and (max_steps is None or len(profile.steps) <= max_steps):
        impacts = impact_maps(model, impact_split.images, impact_split.labels, [i.name for i in infos],
                              batch_size) if uses_impact else {}
        best = None  # (move cost, loss, error, flops, seconds, info, kind, notch, mask)
        for info in infos:
            st = states[info.name]
            current_kept = int(np.prod(info.out_hw)) if st.mask is None else int(st.mask.sum())
            notch = st.notch + 1
            while notch < len(fractions) and kept_positions(info.out_hw, fractions[notch]) >= current_kept:
                notch += 1  # small maps: a notch that keeps as many positions is no move
            if notch >= len(fractions):
                continue
            for kind in mask_types:
                tries = random_repeats if kind in RANDOM_MASK_TYPES else 1
                candidate = None
                for _ in range(tries):
                    mask = make_layer_mask(kind, info, fractions[notch], rng, impacts.get(info.name))
                    if mask.sum() >= current_kept:
                        continue
                    set_group_mask(model, info, mask)
                    loss, error, flops = evaluate()
                    if candidate is None or loss < candidate[0]:
                        candidate = (loss, error, flops, mask)
                set_group_mask(model, info, st.mask)
                if candidate is None:
                    continue
                loss, error, flops, mask = candidate
                seconds = None
                if cost == "time":
                    set_group_mask(model, info, mask)
                    seconds = measure_time(model, timing_x, timing_repeats, timer, runner)
                    set_group_mask(model, info, st.mask)
                value = move_cost(loss, loss0, seconds if cost == "time" else flops, cost_now)
                if best is None or value < best[0]:
                    best = (value, loss, error, flops, seconds, info, kind, notch, mask)
        if best is None or not np.isfinite(best[0]):
            break  # nothing left to perforate, or no move saves anything
        value, loss, error, flops, _, info, kind, notch, mask = best
        set_group_mask(model, info, mask)
        states[info.name] = _LayerState(kind, notch, mask)
        seconds = measure_time(model, timing_x, timing_repeats, timer, runner)
        loss0 = loss
        cost_now = seconds if cost == "time" else flops
        record({"layer": info.name, "mask_type": kind, "kept_fraction": fractions[notch], "move_cost": float(value)},
               loss, error, flops, seconds)
    return profile


def finetune_step(model, profile, step, train, epochs=1, lr=0.01, rng=None, batch_size=64, val=None, progress=False):
    """Fine-tune the network of step ``step`` (its masks fixed) with SGD and momentum.

    Returns the :class:`refimpl.training.History`; ``model`` is left perforated and fine-tuned.
    """
    from .optim import SGD
    from .training import fit

    apply_step(model, profile, step)
    optimizer = SGD(model.named_parameters(), lr=lr, momentum=0.9)
    return fit(model, optimizer, _as_split(train, "train"), val=None if val is None else _as_split(val, "val"),
               epochs=epochs, batch_size=batch_size, rng=_checks.generator(rng), progress=progress)
