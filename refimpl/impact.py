r"""Masks of a *trained network*: which layers can be perforated, what follows them, and impact.

:mod:`refimpl.masks` builds a mask from numbers (a map size, a pooling window, impact scores);
this module finds those numbers in a network (docs/spec.md §3.4, §3.5 and §6.1):

* **The layer graph, by tracing.** :func:`trace_layers` runs one forward pass and records every
  leaf layer in the order it ran, with its input and output shapes. A convolution is
  *perforable* when it is not 1×1/stride 1 and the next *spatial* layer after it (a convolution
  that is not 1×1/stride 1, a pooling, a global pooling) is reached through *pointwise* layers
  only (batch norm, ReLU, dropout, 1×1/stride-1 convolutions) — :func:`find_perforable_layers`.
* **Followers.** A 1×1 convolution between a perforated one and the next spatial layer sees an
  input that is constant on every nearest-fill cell, so computing it only at the kept positions
  and filling gives the *same* output. The followers therefore share the perforated layer's mask
  (**project choice**; in the Network-in-Network CNN the 1×1 "cccp" layers cost more than the
  3×3 ones they follow, so a perforation that left them dense would save little).
* **Pooling-structure scores** of a layer come from the window of the spatial layer that
  actually follows it: its size, stride and padding (a global pooling reads every position once).
* **Impact.** For each position of a layer's output V,

  .. math:: \text{impact}(x, y) = \frac{1}{N}\sum_{n=1}^{N} \sum_c
            \left|\frac{\partial L_n}{\partial V_n(x, y, c)}\, V_n(x, y, c)\right|,

  the first-order Taylor estimate of how much the loss :math:`L_n` of image ``n`` changes when
  :math:`V_n(x, y, \cdot)` is replaced by zero, from forward/backward passes of the network *as it
  is* (already perforated layers included) over a data subset. Positions a layer already skips
  get impact 0. Recomputing after every greedy step gives *iterative impact*.

Tracing and impact install temporary wrappers on layer instances (``layer.forward`` /
``layer.backward`` attributes) and remove them afterwards; the network's classes are untouched.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from . import _checks
from .conv_layer import Conv2d
from .layers import BatchNorm, Dropout, GlobalAvgPool2d, LeakyReLU, Pool2d, ReLU
from .losses import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from .masks import impact_mask, kept_count, pooling_structure_scores, structure_mask
from .resnet import Identity

# Layers that act on each position separately (the identity shortcut of a residual unit included).
POINTWISE_TYPES = (BatchNorm, ReLU, LeakyReLU, Dropout, Identity)


@dataclass(frozen=True)
class LayerCall:
    """One leaf layer as it ran in a traced forward pass."""

    name: str
    layer: object
    in_shape: tuple
    out_shape: tuple


@dataclass(frozen=True)
class PerforableLayer:
    """A convolution that can be perforated, and what it feeds.

    Attributes
    ----------
    name : dotted layer name (``model.named_layers()``)
    followers : names of the 1×1/stride-1 convolutions that share its mask
    out_hw : (Ho, Wo) of its output for the traced input size
    next_name : the spatial layer reached next (a pooling, a convolution or a global pooling)
    window : ``{"pool_size", "pool_stride", "pool_padding"}`` of that layer; a global pooling is
        one window covering the whole map
    """

    name: str
    followers: tuple
    out_hw: tuple
    next_name: str
    window: dict

    @property
    def layers(self):
        """The perforated layer and its followers: every convolution that gets this mask."""
        return (self.name, *self.followers)


def _leaves(model):
    return [(name, layer) for name, layer in model.named_layers() if not layer.children()]


def is_pointwise_conv(layer):
    """A 1×1, stride-1, unpadded convolution: it mixes channels and nothing spatial."""
    return (isinstance(layer, Conv2d) and layer.kernel == (1, 1) and layer.stride == (1, 1)
            and layer.padding == (0, 0))


def trace_layers(model, x):
    """Run ``model(x)`` in evaluation mode and list the leaf layers in the order they ran.

    Parameters
    ----------
    model : Layer
    x : ndarray (N, C, H, W), a (small) input batch

    Returns
    -------
    calls : list of :class:`LayerCall`
    """
    calls = []
    leaves = _leaves(model)

    def recorder(name, layer, forward):
        def forward_and_record(inp, *args, **kwargs):
            out = forward(inp, *args, **kwargs)
            calls.append(LayerCall(name, layer, tuple(np.shape(inp)), tuple(np.shape(out))))
            return out
        return forward_and_record

    was_training = model.training
    model.eval()
    try:
        with _patched(leaves, "forward", recorder):
            model(x)
    finally:
        model.train(was_training)
    return calls


@contextlib.contextmanager
def _patched(named_layers, method, wrapper):
    """Replace ``layer.<method>`` by ``wrapper(name, layer, original)`` on the given instances."""
    patched = []
    try:
        for name, layer in named_layers:
            original = getattr(layer, method)
            own = vars(layer).get(method)  # an instance-level override to put back afterwards
            setattr(layer, method, wrapper(name, layer, original))
            patched.append((layer, own))
        yield
    finally:
        for layer, own in patched:
            if own is None:
                delattr(layer, method)  # the class attribute shows through again
            else:
                setattr(layer, method, own)


def _window_of(call):
    """The window of a spatial layer, as the keyword arguments of the structure-score functions."""
    layer = call.layer
    if isinstance(layer, GlobalAvgPool2d):
        return {"pool_size": tuple(call.in_shape[2:]), "pool_stride": tuple(call.in_shape[2:]), "pool_padding": 0}
    if isinstance(layer, Pool2d):
        return {"pool_size": layer.size, "pool_stride": layer.stride, "pool_padding": layer.padding}
    return {"pool_size": layer.kernel, "pool_stride": layer.stride, "pool_padding": layer.padding}


def _is_spatial(layer):
    return isinstance(layer, (Pool2d, GlobalAvgPool2d)) or (isinstance(layer, Conv2d) and not is_pointwise_conv(layer))


def find_perforable_layers(model, x):
    """The perforable convolutions of ``model`` (docs/spec.md §6.1), found by tracing one forward pass.

    A convolution qualifies when it is not 1×1/stride 1 and, walking the layers that run after
    it, only pointwise layers (batch norm, ReLU, dropout, 1×1/stride-1 convolutions) on the same
    spatial size come before a spatial layer (pooling, global pooling, convolution). Anything else
    (a linear layer, a flatten, a residual shortcut that runs in between) makes it non-perforable
    — a conservative rule: the nearest fill is then only known to feed layers that interpolate.

    Parameters
    ----------
    model : Layer
    x : ndarray (N, C, H, W), an input batch of the size the network will be run at

    Returns
    -------
    list of :class:`PerforableLayer`, in the order the convolutions run
    """
    calls = trace_layers(model, x)
    found = []
    for i, call in enumerate(calls):
        if not isinstance(call.layer, Conv2d) or is_pointwise_conv(call.layer) or len(call.out_shape) != 4:
            continue
        hw, followers = call.out_shape[2:], []
        for nxt in calls[i + 1:]:
            if len(nxt.in_shape) != 4 or nxt.in_shape[2:] != hw:
                break
            if _is_spatial(nxt.layer):
                found.append(PerforableLayer(call.name, tuple(followers), tuple(hw), nxt.name, _window_of(nxt)))
                break
            if is_pointwise_conv(nxt.layer):
                followers.append(nxt.name)
            elif not isinstance(nxt.layer, POINTWISE_TYPES):
                break
    return found


def structure_scores(info):
    """Pooling-structure scores of a perforable layer: windows of its next spatial layer per position.

    Parameters
    ----------
    info : PerforableLayer

    Returns
    -------
    scores : ndarray of int64 (Ho, Wo)
    """
    return pooling_structure_scores(info.out_hw, **info.window)


def structure_mask_for(info, kept_fraction, rng):
    """Structure mask of a perforable layer: keep ``max(1, round(f Ho Wo))`` positions read by the
    most windows of its next spatial layer (ties broken by ``rng``). Returns bool (Ho, Wo)."""
    return structure_mask(info.out_hw, 1.0 - float(kept_fraction), rng, **info.window)


def impact_maps(model, images, labels, names, batch_size=128):
    """Impact of every output position of the convolutions ``names`` (docs/spec.md §3.5).

    Runs the network in evaluation mode, as it is (perforated layers stay perforated), over the
    subset ``images``/``labels`` in batches; per batch, one forward and one backward of the
    summed per-image cross-entropy (so that ∂L_n/∂V_n is the gradient of image ``n``'s own loss).

    Parameters
    ----------
    model : Layer producing logits (N, classes)
    images : ndarray (N, C, H, W); labels : int ndarray (N,)
    names : iterable of names of :class:`Conv2d` layers
    batch_size : int

    Returns
    -------
    dict name -> ndarray float64 (Ho, Wo): mean over images of Σ_c |∂L_n/∂V · V|, zero where
    the layer's current mask skips the position
    """
    targets, images, labels = _check_impact_arguments(model, images, labels, names, batch_size)
    totals = {name: 0.0 for name, _ in targets}
    skipped = {}
    dtype = targets[0][1].params["w"].dtype if targets else images.dtype
    was_training = model.training
    model.eval()
    try:
        with _recording(targets) as (outputs, upstream):
            for start in range(0, images.shape[0], batch_size):
                x = images[start:start + batch_size].astype(dtype, copy=False)
                logits = model(x)
                model.backward(_summed_loss_gradient(logits, labels[start:start + batch_size]))
                for name, layer in targets:
                    totals[name] = totals[name] + _impact_sum(outputs[name], upstream[name])
                    plan = layer.cache.plan
                    skipped[name] = None if plan.full or not plan.shared else ~plan.mask[0]
    finally:
        model.zero_grad()
        model.train(was_training)
    return {name: _mean_impact(totals[name], skipped[name], images.shape[0]) for name, _ in targets}


def _check_impact_arguments(model, images, labels, names, batch_size):
    """The named convolutions as ``[(name, layer)]``, the images as a float array, the labels."""
    layers = dict(model.named_layers())
    names = list(names)
    for name in names:
        if not isinstance(layers.get(name), Conv2d):
            raise ValueError(f"names must name convolutions of the model, got {name!r}")
    images = _checks.float_array(images, "images", ndim=4)
    labels = np.asarray(labels)
    if labels.shape != (images.shape[0],) or images.shape[0] == 0:
        raise ValueError(f"labels must have shape ({images.shape[0]},) and the subset must be non-empty, got {labels.shape}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return [(name, layers[name]) for name in names], images, labels


@contextlib.contextmanager
def _recording(targets):
    """While active, each target layer's latest output and upstream gradient are kept by name.

    Yields ``(outputs, upstream)``, two dicts filled by the forward and backward passes.
    """
    outputs, upstream = {}, {}
    with _patched(targets, "forward", _keeping_output(outputs)), \
            _patched(targets, "backward", _keeping_gradient(upstream)):
        yield outputs, upstream


def _keeping_output(store):
    def wrap(name, layer, forward):
        def forward_and_keep(x, *args, **kwargs):
            store[name] = out = forward(x, *args, **kwargs)
            return out
        return forward_and_keep
    return wrap


def _keeping_gradient(store):
    def wrap(name, layer, backward):
        def backward_and_keep(dout):
            store[name] = dout
            return backward(dout)
        return backward_and_keep
    return wrap


def _summed_loss_gradient(logits, labels):
    """∂(Σ_n L_n)/∂logits: the mean loss's gradient times N, whose slice n is ∂L_n/∂logits_n."""
    _, cache = softmax_cross_entropy_forward(logits, labels)
    dlogits = softmax_cross_entropy_backward(1.0, cache) * len(labels)
    return dlogits.astype(logits.dtype, copy=False)


def _impact_sum(output, gradient):
    """Σ_n Σ_c |∂L_n/∂V · V| of one batch: float64 (Ho, Wo)."""
    return np.abs(output.astype(np.float64) * gradient.astype(np.float64)).sum(axis=1).sum(axis=0)


def _mean_impact(total, skipped, n):
    """The mean over ``n`` images, zero at the positions the layer skips (``skipped`` None: none)."""
    mean = np.asarray(total, dtype=np.float64) / n
    return mean if skipped is None else np.where(skipped, 0.0, mean)


def impact_mask_for(impact, kept_fraction, rng):
    """Keep the ``max(1, round(f Ho Wo))`` positions of highest impact (ties by ``rng``): bool (Ho, Wo)."""
    return impact_mask(impact, 1.0 - float(kept_fraction), rng)


def kept_positions(out_hw, kept_fraction):
    """Positions kept of an (Ho, Wo) map at kept fraction ``f``: ``max(1, round(f Ho Wo))``."""
    ho, wo = out_hw
    return kept_count(ho * wo, 1.0 - float(kept_fraction))
