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
    compact, plan = None, None  # set while the current activation is compact
    for name, layer in chain:
        table_bytes = 0
        layer_backend = getattr(layer, "backend", network_backend) if backend is None else network_backend
        if compact is not None:
            same_mask = isinstance(layer, Conv2d) and (not layer.is_perforated or (
                (p := _own_plan(layer, plan.out_hw)) is not None and np.array_equal(p.mask, plan.mask)))
            if isinstance(layer, POINTWISE_TYPES) or (is_pointwise_conv(layer) and same_mask):
                compact = _pointwise_on_compact(layer, compact)
                memory.per_layer.append((name, compact.shape[0] * compact.shape[1] * int(np.prod(plan.out_hw))
                                         * compact.itemsize, compact.nbytes))
                continue
            if isinstance(layer, Pool2d):
                x, _ = implicit_pool2d_forward(compact, plan, layer.mode, layer.size, layer.stride, layer.padding,
                                               layer_backend)
                table_bytes = int(np.prod(x.shape[2:])) * layer.size[0] * layer.size[1] * 4
            elif isinstance(layer, GlobalAvgPool2d):
                weights = np.bincount(plan.index_map[0].ravel(), minlength=plan.width) / plan.index_map[0].size
                x = compact @ weights.astype(compact.dtype)
            elif isinstance(layer, Conv2d) and not is_pointwise_conv(layer):
                out_hw = layer.output_hw(plan.out_hw)
                own = _own_plan(layer, out_hw)
                w = layer.params["w"]
                b = layer.params["b"] if layer.has_bias else np.zeros(layer.out_channels, dtype=w.dtype)
                if own is None and not layer.is_perforated:
                    x, _ = implicit_conv2d_forward(compact, plan, w, b, layer.stride, layer.padding, layer_backend)
                    table_bytes = int(np.prod(out_hw)) * layer.kernel[0] * layer.kernel[1] * 4
                elif own is not None:
                    table = compose_index_table(plan.index_map, layer.kernel, layer.stride, layer.padding,
                                                out_positions=own.positions[0])
                    new_compact, _ = layer_backend.table_conv_forward(compact, table, w, b)
                    memory.per_layer.append((name, new_compact.shape[0] * new_compact.shape[1] * int(np.prod(out_hw))
                                             * new_compact.itemsize, new_compact.nbytes + table.nbytes))
                    compact, plan = new_compact, own
                    continue
                else:  # a perforated convolution with a fill we do not read implicitly
                    x = layer(fill_forward(compact, plan, "nearest"))
            else:
                x = layer(fill_forward(compact, plan, "nearest"))
            compact, plan = None, None
            memory.per_layer.append((name, x.nbytes, x.nbytes + table_bytes))
            continue
        # the current activation is dense
        if isinstance(layer, Conv2d) and not is_pointwise_conv(layer):
            out_hw = layer.output_hw(x.shape[2:])
            own = _own_plan(layer, out_hw)
            if own is not None:
                w = layer.params["w"]
                b = layer.params["b"] if layer.has_bias else np.zeros(layer.out_channels, dtype=w.dtype)
                geometry = ConvGeometry(layer.kernel, layer.stride, layer.padding, tuple(x.shape[2:]), out_hw)
                compact, _ = layer.backend.conv_forward(np.ascontiguousarray(x), w, b, own, geometry)
                plan = own
                memory.per_layer.append((name, compact.shape[0] * compact.shape[1] * int(np.prod(out_hw))
                                         * compact.itemsize, compact.nbytes + own.index_map.nbytes))
                continue
        if isinstance(layer, Pool2d) and pool_on_backend and layer.padding[0] <= layer.size[0] // 2 \
                and layer.padding[1] <= layer.size[1] // 2:
            # a dense input is a compact one whose index map is the identity: the backend's table
            # pooling serves both (and is compiled where the backend is)
            n, c, h, w = x.shape
            table = compose_index_table(dense_index_map((h, w)), layer.size, layer.stride, layer.padding)
            out_hw = conv_output_shape((h, w), layer.size, layer.stride, layer.padding)
            x, _ = layer_backend.table_pool_forward(np.ascontiguousarray(x).reshape(n, c, h * w), table, layer.mode)
            x = x.reshape(n, c, *out_hw)
            memory.per_layer.append((name, x.nbytes, x.nbytes + table.nbytes))
            continue
        x = layer(x)
        memory.per_layer.append((name, x.nbytes, x.nbytes))
    if compact is not None:  # the network ended on a compact tensor
        x = fill_forward(compact, plan, "nearest")
    return x, memory


__all__ = ["ActivationMemory", "chain_layers", "run_implicit"]
