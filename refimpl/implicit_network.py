r"""Running a perforated network with implicit interpolation: the filled maps never exist.

:mod:`refimpl.implicit` shows one layer reading a perforated layer's *compact* output (N, C, P)
through an index table. This module runs a whole chain network that way (inference only):

* a perforated convolution (shared mask, nearest fill) produces its compact output and stops there;
* pointwise layers — batch norm, ReLU, dropout in evaluation, and 1×1/stride-1 convolutions that
  are dense or share that mask — act on the compact tensor position by position (seen as an
  (N, C, 1, P) image), since on a nearest-fill cell their input is one repeated value;
* the next spatial layer reads the compact tensor through the composed index table: a pooling
  (:func:`refimpl.implicit.implicit_pool2d_forward`), a dense convolution
  (:func:`refimpl.implicit.implicit_conv2d_forward`), a perforated convolution (the table restricted
  to its own computed positions, giving a compact output again), or a global average pooling
  (a weighted mean: each compact entry weighs the number of positions that copy it);
* anything else gets the explicit fill first.

The result equals the explicit path (fill, then the next layer) exactly up to floating-point
summation order, and :class:`ActivationMemory` says how many bytes of layer outputs each path
stores. Works on any backend: the table functions are part of the backend interface.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .backend import get_backend
from .conv import ConvGeometry, conv_output_shape
from .conv_layer import Conv2d
from .impact import POINTWISE_TYPES, is_pointwise_conv, trace_layers
from .implicit import compose_index_table, dense_index_map, implicit_conv2d_forward, implicit_pool2d_forward
from .layers import GlobalAvgPool2d, Pool2d
from .perforation import PerforationPlan, fill_forward
from .pooling import pool_padding_is_valid


@dataclass
class ActivationMemory:
    """Bytes of layer outputs stored by the explicit (filled) and the implicit (compact) path.

    ``per_layer`` lists ``(layer name, explicit bytes, implicit bytes)``; implicit bytes include
    the index tables the implicit path builds.
    """

    per_layer: list = field(default_factory=list)

    @property
    def explicit_bytes(self):
        return int(sum(e for _, e, _ in self.per_layer))

    @property
    def implicit_bytes(self):
        return int(sum(i for _, _, i in self.per_layer))

    @property
    def saved_bytes(self):
        return self.explicit_bytes - self.implicit_bytes

    def to_dict(self):
        return {"explicit_bytes": self.explicit_bytes, "implicit_bytes": self.implicit_bytes,
                "saved_bytes": self.saved_bytes, "per_layer": [list(t) for t in self.per_layer]}


def chain_layers(model, x):
    """The leaf layers of ``model`` as a chain ``[(name, layer), ...]``, or ``ValueError`` if it is not one.

    A chain network is one whose forward pass is its leaves applied one after the other (the NIN
    CNN, a :class:`~refimpl.layers.Sequential`); residual networks are not.
    """
    calls = trace_layers(model, x)
    for prev, call in zip(calls, calls[1:]):
        if prev.out_shape != call.in_shape:
            raise ValueError(f"the implicit runner needs a chain network; {call.name!r} does not read the output of "
                             f"{prev.name!r} ({call.in_shape} vs {prev.out_shape})")
    return [(c.name, c.layer) for c in calls]


def _own_plan(layer, out_hw):
    """The layer's shared nearest-fill plan if it is perforated, else ``None``."""
    if not layer.is_perforated:
        return None
    plan, fill = layer.plan_for(out_hw)
    if plan.full or not plan.shared or fill != "nearest":
        return None
    return plan


def _pointwise_on_compact(layer, compact):
    """Apply a pointwise layer to (N, C, P) by viewing it as an (N, C, 1, P) image."""
    image = np.ascontiguousarray(compact[:, :, None, :])
    if isinstance(layer, Conv2d):  # every compact entry is computed, whatever the layer's own mask
        return layer(image, mask=PerforationPlan.dense((1, compact.shape[2])))[:, :, 0, :]
    return layer(image)[:, :, 0, :]


@dataclass
class _Activation:
    """The activation between two layers: dense ``x``, or ``compact`` (N, C, P) with its ``plan``."""

    x: np.ndarray | None = None
    compact: np.ndarray | None = None
    plan: PerforationPlan | None = None

    @property
    def is_compact(self):
        return self.compact is not None

    def compact_bytes_if_filled(self):
        """Bytes the filled (explicit) version of the compact tensor would take."""
        n, c = self.compact.shape[:2]
        return n * c * int(np.prod(self.plan.out_hw)) * self.compact.itemsize

    def filled(self):
        return fill_forward(self.compact, self.plan, "nearest")


def _weights_and_bias(layer):
    w = layer.params["w"]
    return w, (layer.params["b"] if layer.has_bias else np.zeros(layer.out_channels, dtype=w.dtype))


def _reads_compact_pointwise(layer, plan):
    """Whether ``layer`` acts position by position on the compact tensor of ``plan``: a pointwise
    layer, or a 1×1 convolution that is dense or shares exactly that mask."""
    if isinstance(layer, POINTWISE_TYPES):
        return True
    if not is_pointwise_conv(layer):
        return False
    if not layer.is_perforated:
        return True
    own = _own_plan(layer, plan.out_hw)
    return own is not None and np.array_equal(own.mask, plan.mask)


def _conv_on_compact(name, layer, act, backend):
    """A spatial convolution reading a compact input: dense output, or compact again if perforated."""
    out_hw = layer.output_hw(act.plan.out_hw)
    own = _own_plan(layer, out_hw)
    w, b = _weights_and_bias(layer)
    if own is None and not layer.is_perforated:
        x, _ = implicit_conv2d_forward(act.compact, act.plan, w, b, layer.stride, layer.padding, backend)
        table_bytes = int(np.prod(out_hw)) * layer.kernel[0] * layer.kernel[1] * 4
        return _Activation(x=x), (name, x.nbytes, x.nbytes + table_bytes)
    if own is not None:
        table = compose_index_table(act.plan.index_map, layer.kernel, layer.stride, layer.padding,
                                    out_positions=own.positions[0])
        compact, _ = backend.table_conv_forward(act.compact, table, w, b)
        new = _Activation(compact=compact, plan=own)
        return new, (name, new.compact_bytes_if_filled(), compact.nbytes + table.nbytes)
    x = layer(act.filled())  # a perforated convolution with a fill not read implicitly
    return _Activation(x=x), (name, x.nbytes, x.nbytes)


def _step_from_compact(name, layer, act, backend):
    """Run ``layer`` on a compact activation; returns the new activation and the memory record."""
    if _reads_compact_pointwise(layer, act.plan):
        new = _Activation(compact=_pointwise_on_compact(layer, act.compact), plan=act.plan)
        return new, (name, new.compact_bytes_if_filled(), new.compact.nbytes)
    if isinstance(layer, Conv2d) and not is_pointwise_conv(layer):
        return _conv_on_compact(name, layer, act, backend)
    table_bytes = 0
    if isinstance(layer, Pool2d):
        x, _ = implicit_pool2d_forward(act.compact, act.plan, layer.mode, layer.size, layer.stride, layer.padding,
                                       backend)
        table_bytes = int(np.prod(x.shape[2:])) * layer.size[0] * layer.size[1] * 4
    elif isinstance(layer, GlobalAvgPool2d):
        # each compact entry weighs the number of positions that copy it
        index_map = act.plan.index_map[0]
        weights = np.bincount(index_map.ravel(), minlength=act.plan.width) / index_map.size
        x = act.compact @ weights.astype(act.compact.dtype)
    else:
        x = layer(act.filled())
    return _Activation(x=x), (name, x.nbytes, x.nbytes + table_bytes)


def _pool_on_backend(name, layer, x, backend):
    """A pooling of a dense map through the backend's table pooling (the identity index map)."""
    n, c, h, w = x.shape
    table = compose_index_table(dense_index_map((h, w)), layer.size, layer.stride, layer.padding)
    out_hw = conv_output_shape((h, w), layer.size, layer.stride, layer.padding)
    out, _ = backend.table_pool_forward(np.ascontiguousarray(x).reshape(n, c, h * w), table, layer.mode)
    out = out.reshape(n, c, *out_hw)
    return _Activation(x=out), (name, out.nbytes, out.nbytes + table.nbytes)


def _step_from_dense(name, layer, x, backend, pool_on_backend):
    """Run ``layer`` on a dense activation; a perforated convolution stops at its compact output."""
    if isinstance(layer, Conv2d) and not is_pointwise_conv(layer):
        out_hw = layer.output_hw(x.shape[2:])
        own = _own_plan(layer, out_hw)
        if own is not None:
            w, b = _weights_and_bias(layer)
            geometry = ConvGeometry(layer.kernel, layer.stride, layer.padding, tuple(x.shape[2:]), out_hw)
            compact, _ = layer.backend.conv_forward(np.ascontiguousarray(x), w, b, own, geometry)
            new = _Activation(compact=compact, plan=own)
            return new, (name, new.compact_bytes_if_filled(), compact.nbytes + own.index_map.nbytes)
    if isinstance(layer, Pool2d) and pool_on_backend and pool_padding_is_valid(layer.size, layer.padding):
        return _pool_on_backend(name, layer, x, backend)
    out = layer(x)
    return _Activation(x=out), (name, out.nbytes, out.nbytes)


def run_implicit(model, x, backend=None, chain=None, pool_on_backend=True):
    """Evaluate a chain network on ``x`` with implicit interpolation (evaluation mode, no backward).

    Parameters
    ----------
    model : Layer — a chain network (see :func:`chain_layers`) whose perforated convolutions have
        shared masks (e.g. set by :func:`refimpl.greedy.apply_step`)
    x : ndarray (N, C, H, W)
    backend : conv backend for the table convolutions and poolings (default: each convolution's
        own, and the first convolution's for the poolings)
    chain : the result of :func:`chain_layers` for this model, to skip tracing on repeated calls
    pool_on_backend : run the poolings of *dense* maps through the backend's table pooling too
        (the identity index map), instead of the layer's NumPy pooling

    Returns
    -------
    out : the network output (equal to ``model(x)`` in evaluation mode)
    memory : ActivationMemory
    """
    model.eval()
    chain = chain_layers(model, x[:1]) if chain is None else chain
    # the backend of table operations that belong to no convolution (poolings): the one asked
    # for, else the network's (that of its first convolution)
    convs = [layer for _, layer in chain if isinstance(layer, Conv2d)]
    network_backend = get_backend(backend) if backend is not None else (convs[0].backend if convs else get_backend(None))
    memory = ActivationMemory()
    act = _Activation(x=x)
    for name, layer in chain:
        layer_backend = getattr(layer, "backend", network_backend) if backend is None else network_backend
        if act.is_compact:
            act, record = _step_from_compact(name, layer, act, layer_backend)
        else:
            act, record = _step_from_dense(name, layer, act.x, layer_backend, pool_on_backend)
        memory.per_layer.append(record)
    return (act.filled() if act.is_compact else act.x), memory


__all__ = ["ActivationMemory", "chain_layers", "run_implicit"]
