r"""Ordinary layers with hand-written backward: the layer protocol and its building blocks.

**The layer protocol.** A layer holds

* ``params`` — a dict name -> ndarray of trainable values (updated in place by an optimiser),
* ``grads`` — a dict with the same keys; ``backward`` *adds* to it (call :meth:`Layer.zero_grad`
  before each step), so a layer that is skipped for a batch (ACT) contributes a zero gradient
  instead of a stale one,
* ``buffers`` — non-trainable state saved in checkpoints (batch-norm running statistics),
* ``training`` — train or evaluation behaviour (batch norm, dropout), switched by
  :meth:`Layer.train` / :meth:`Layer.eval` for the whole tree,

and two methods, ``forward(x) -> y`` and ``backward(dy) -> dx``. What backward needs travels in
``self.cache``, a small named tuple produced by a pure ``thing_forward`` function; the matching
``thing_backward(dout, cache)`` turns it into gradients. The pure pairs are what a student reads
and what the gradient checks call directly; the classes only hold parameters and caches.

**FLOPs.** After a forward every layer reports ``flops_per_sample``, an int64 array (N,): the
FLOPs each sample spent in the layer and everything inside it (:mod:`refimpl.flops` states the
counting convention). A layer that computes counted arithmetic (convolution, linear map, halting
head) or decides per sample what runs (an adaptive block) sets it in ``forward``; any other layer
reports the sum over its children (zero for a leaf such as ReLU). ``flops`` is the batch total.

**Training objective.** A model trained by :mod:`refimpl.training` minimises the softmax
cross-entropy of its logits plus :meth:`Layer.extra_loss` (0 unless the model adds a term, such as
an adaptive network's ponder cost); its ``backward(dlogits)`` differentiates both, and
:meth:`Layer.objective_backward` hands it the per-example task losses too (what a REINFORCE
learning signal is made of).

Composite layers (:class:`Sequential`, residual units, networks) hold their children as plain
attributes (a layer, or a list of layers); :meth:`Layer.named_layers` finds them, which gives every
parameter a dotted name such as ``stages.1.units.0.conv1.w`` for optimisers and checkpoints.
Composite layers call children as ``child(x)`` (:meth:`Layer.__call__`), which lets the training
loop trace where a NaN first appears.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import _checks
from . import init as _init
from .pooling import pool2d_backward, pool2d_forward


class NonFiniteError(FloatingPointError):
    """A layer produced NaN or inf; ``layer_name`` says which one."""

    def __init__(self, message, layer_name=None):
        super().__init__(message)
        self.layer_name = layer_name


# =============================================================================================
# The protocol
# =============================================================================================


class Layer:
    """Base class of every layer: parameter bookkeeping, train/eval, the child tree.

    Subclasses set ``self.params`` / ``self.buffers`` in ``__init__`` and implement
    :meth:`forward` and :meth:`backward`.
    """

    def __init__(self):
        self.params = {}
        self.grads = {}
        self.buffers = {}
        self.training = True
        self.cache = None
        self._flops_per_sample = None  # set by layers that count their own FLOPs
        self._dense_flops_per_sample = None  # likewise, with every convolution dense
        self._batch_size = 0  # of the last call, for layers that spend no counted FLOPs
        self._finite_check_name = None  # set by :func:`trace_non_finite`

    # --- the two methods every layer implements -------------------------------------------
    def forward(self, x):
        raise NotImplementedError(f"{type(self).__name__} does not implement forward")

    def backward(self, dout):
        raise NotImplementedError(f"{type(self).__name__} does not implement backward")

    def __call__(self, x, *args, **kwargs):
        self._batch_size = len(x)
        out = self.forward(x, *args, **kwargs)
        if self._finite_check_name is not None and not np.all(np.isfinite(out)):
            name = self._finite_check_name or "<model>"
            raise NonFiniteError(
                f"the output of layer {name!r} ({type(self).__name__}) contains NaN or inf; "
                f"its input was {'finite' if np.all(np.isfinite(x)) else 'already non-finite'}",
                name,
            )
        return out

    # --- FLOPs ----------------------------------------------------------------------------
    @property
    def flops_per_sample(self):
        """FLOPs per sample of the last forward, (N,) int64: this layer's own, else its children's sum."""
        if self._flops_per_sample is not None:
            return self._flops_per_sample
        parts = [child.flops_per_sample for _, child in self.children()]
        return np.sum(parts, axis=0, dtype=np.int64) if parts else np.zeros(self._batch_size, dtype=np.int64)

    @flops_per_sample.setter
    def flops_per_sample(self, per_sample):
        self._flops_per_sample = np.asarray(per_sample, dtype=np.int64)

    @property
    def dense_flops_per_sample(self):
        """FLOPs per sample (an int) of the last forward's geometry with every convolution dense."""
        if self._dense_flops_per_sample is not None:
            return self._dense_flops_per_sample
        return sum(child.dense_flops_per_sample for _, child in self.children())

    @dense_flops_per_sample.setter
    def dense_flops_per_sample(self, value):
        self._dense_flops_per_sample = int(value)

    @property
    def flops(self):
        """FLOPs of the last forward summed over the batch (a Python int)."""
        return int(self.flops_per_sample.sum())

    # --- training objective ---------------------------------------------------------------
    def extra_loss(self):
        """Term the model adds to the task loss of its last forward (0 here); ``backward`` differentiates it."""
        return 0.0

    def objective_backward(self, dlogits, per_example_loss):
        """Backward of task loss + :meth:`extra_loss`, given ``dlogits`` and the per-example task losses (N,).

        Most models need only ``dlogits``; a model whose gradient estimator uses the loss values
        (REINFORCE) overrides this.
        """
        return self.backward(dlogits)

    # --- parameters -----------------------------------------------------------------------
    @property
    def param_dtype(self):
        """dtype of the model's parameters (float32 for a layer without any)."""
        return next((p.dtype for _, p, _ in self.named_parameters()), np.dtype(np.float32))

    def add_param(self, name, value):
        """Register a trainable array and its zero gradient."""
        self.params[name] = value
        self.grads[name] = np.zeros_like(value)

    def accumulate(self, name, grad):
        self.grads[name] += grad

    def zero_grad(self):
        for layer in self.layers():
            for g in layer.grads.values():
                g[...] = 0

    # --- the tree -------------------------------------------------------------------------
    def children(self):
        """Direct sub-layers as (attribute name, layer), in definition order.

        Attributes holding a layer, or a list/tuple of layers (named ``attr.i``), count.
        """
        out = []
        for attr, value in vars(self).items():
            if attr.startswith("_") or attr == "cache":
                continue
            if isinstance(value, Layer):
                out.append((attr, value))
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Layer) for v in value):
                out.extend((f"{attr}.{i}", v) for i, v in enumerate(value))
        return out

    def named_layers(self, prefix=""):
        """Every layer of the tree (this one first) with its dotted path."""
        yield prefix, self
        for name, child in self.children():
            yield from child.named_layers(f"{prefix}.{name}" if prefix else name)

    def layers(self):
        return [layer for _, layer in self.named_layers()]

    def named_parameters(self):
        """(dotted name, param array, grad array) for every trainable array of the tree."""
        for path, layer in self.named_layers():
            for key, value in layer.params.items():
                yield (f"{path}.{key}" if path else key), value, layer.grads[key]

    def named_buffers(self):
        for path, layer in self.named_layers():
            for key, value in layer.buffers.items():
                yield (f"{path}.{key}" if path else key), value

    def num_parameters(self):
        return int(sum(p.size for _, p, _ in self.named_parameters()))

    def train(self, mode=True):
        for layer in self.layers():
            layer.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def __repr__(self):
        return f"{type(self).__name__}()"


def trace_non_finite(model, x):
    """Run ``model(x)`` checking every layer's output; return the name of the first non-finite one.

    Layers are checked in the order they run, children before their parent, so the innermost
    layer that first produced a NaN or inf is named. Returns ``None`` when everything is finite.
    Used by the training loop after a non-finite loss.
    """
    named = list(model.named_layers())
    for path, layer in named:
        layer._finite_check_name = path
    try:
        model(x)
    except NonFiniteError as err:
        return err.layer_name
    finally:
        for _, layer in named:
            layer._finite_check_name = None
    return None


class Sequential(Layer):
    """Layers applied one after the other; backward runs them in reverse."""

    def __init__(self, *layers):
        super().__init__()
        for layer in layers:
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential takes Layer objects, got {type(layer).__name__}")
        self.layers_ = list(layers)

    def children(self):
        return [(str(i), layer) for i, layer in enumerate(self.layers_)]

    def __getitem__(self, i):
        return self.layers_[i]

    def __len__(self):
        return len(self.layers_)

    def forward(self, x):
        for layer in self.layers_:
            x = layer(x)
        return x

    def backward(self, dout):
        for layer in reversed(self.layers_):
            dout = layer.backward(dout)
        return dout

    def __repr__(self):
        inner = ",\n  ".join(repr(layer) for layer in self.layers_)
        return f"Sequential(\n  {inner}\n)"


# =============================================================================================
# Linear
# =============================================================================================


class LinearCache(NamedTuple):
    x: np.ndarray  # (N, D)
    w: np.ndarray  # (D, M)


def linear_forward(x, w, b):
    """``out = x w + b`` with x (N, D), w (D, M), b (M,) → out (N, M)."""
    return x @ w + b, LinearCache(x, w)


def linear_backward(dout, cache):
    """``dx = dout wᵀ``, ``dw = xᵀ dout``, ``db = Σ_n dout``."""
    return dout @ cache.w.T, cache.x.T @ dout, dout.sum(axis=0)


class Linear(Layer):
    """Fully connected layer (N, D) → (N, M); weights Glorot-uniform, bias zero."""

    def __init__(self, in_features, out_features, rng, bias=True, dtype=np.float32):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.add_param("w", _init.glorot_uniform((self.in_features, self.out_features), rng,
                                                 self.in_features, self.out_features, dtype))
        self.has_bias = bool(bias)
        if self.has_bias:
            self.add_param("b", np.zeros(self.out_features, dtype=dtype))

    def forward(self, x):
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x must have shape (N, {self.in_features}), got {x.shape}")
        b = self.params["b"] if self.has_bias else np.zeros(self.out_features, dtype=x.dtype)
        out, self.cache = linear_forward(x, self.params["w"], b)
        self.dense_flops_per_sample = 2 * self.in_features * self.out_features
        self.flops_per_sample = np.full(x.shape[0], self.dense_flops_per_sample)
        return out

    def backward(self, dout):
        dx, dw, db = linear_backward(dout, self.cache)
        self.accumulate("w", dw)
        if self.has_bias:
            self.accumulate("b", db)
        return dx

    def __repr__(self):
        return f"Linear({self.in_features}, {self.out_features})"


# =============================================================================================
# Activations
# =============================================================================================


class ReluCache(NamedTuple):
    positive: np.ndarray  # bool, where x > 0


def relu_forward(x):
    """``max(x, 0)``."""
    positive = x > 0
    return x * positive, ReluCache(positive)


def relu_backward(dout, cache):
    """The gradient passes where x > 0 (the subgradient at 0 is taken as 0)."""
    return dout * cache.positive


def leaky_relu_forward(x, slope):
    """``x`` where x > 0, else ``slope · x``."""
    positive = x > 0
    return np.where(positive, x, slope * x), ReluCache(positive)


def leaky_relu_backward(dout, cache, slope):
    return np.where(cache.positive, dout, slope * dout)


class ReLU(Layer):
    def forward(self, x):
        out, self.cache = relu_forward(x)
        return out

    def backward(self, dout):
        return relu_backward(dout, self.cache)

    def __repr__(self):
        return "ReLU()"


class LeakyReLU(Layer):
    def __init__(self, slope=0.01):
        super().__init__()
        self.slope = float(slope)

    def forward(self, x):
        out, self.cache = leaky_relu_forward(x, self.slope)
        return out

    def backward(self, dout):
        return leaky_relu_backward(dout, self.cache, self.slope)

    def __repr__(self):
        return f"LeakyReLU({self.slope})"


# =============================================================================================
# Batch normalisation
# =============================================================================================


class BatchNormCache(NamedTuple):
    x_hat: np.ndarray  # normalised input, the layout of x
    inv_std: np.ndarray  # 1 / sqrt(var + eps), shape (C,)
    gamma: np.ndarray
    axes: tuple  # the axes averaged over: (0,) or (0, 2, 3)
    training: bool  # batch statistics (True) or fixed running statistics (False)


def _channel_shape(x):
    return (1, -1) + (1,) * (x.ndim - 2)


def batchnorm_forward(x, gamma, beta, mean, var, eps, training):
    r"""Batch normalisation over every axis except channels (axis 1).

    .. math:: \hat x = (x - \mu) / \sqrt{\sigma^2 + \epsilon}, \qquad y = \gamma \hat x + \beta.

    In training ``mean``/``var`` must be the batch statistics (biased variance); in evaluation,
    the running ones. Returns ``y`` and a :class:`BatchNormCache`.
    """
    shape = _channel_shape(x)
    axes = (0,) + tuple(range(2, x.ndim))
    inv_std = 1.0 / np.sqrt(var + eps)
    x_hat = (x - mean.reshape(shape)) * inv_std.reshape(shape)
    out = gamma.reshape(shape) * x_hat + beta.reshape(shape)
    return out, BatchNormCache(x_hat, inv_std, gamma, axes, training)


def batchnorm_backward(dout, cache):
    r"""Gradients ``(dx, dgamma, dbeta)`` of :func:`batchnorm_forward`.

    With batch statistics the mean and variance depend on x, which gives (m = values per channel)

    .. math:: dx = \frac{\gamma}{m \sqrt{\sigma^2+\epsilon}}
              \left(m\, d\hat y - \textstyle\sum d\hat y - \hat x \sum d\hat y\, \hat x\right);

    with running statistics the layer is an affine map and ``dx = γ dy / sqrt(σ² + ε)``.
    """
    shape = _channel_shape(dout)
    dgamma = (dout * cache.x_hat).sum(axis=cache.axes)
    dbeta = dout.sum(axis=cache.axes)
    scale = (cache.gamma * cache.inv_std).reshape(shape)
    if not cache.training:
        return dout * scale, dgamma, dbeta
    m = dout.size // dout.shape[1]
    dx = scale * (dout - (dbeta.reshape(shape) + cache.x_hat * dgamma.reshape(shape)) / m)
    return dx, dgamma, dbeta


class BatchNorm(Layer):
    """Batch normalisation over channels (axis 1) of (N, C) or (N, C, H, W) inputs.

    Training uses batch statistics and updates the running ones,
    ``running = (1 - momentum) · running + momentum · batch`` (the running variance uses the
    unbiased batch variance, m / (m - 1) · σ²_biased, as PyTorch does); evaluation uses the
    running statistics.
    """

    expected_ndim = None

    def __init__(self, channels, momentum=0.1, eps=1e-5, dtype=np.float32):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.channels, self.momentum, self.eps = int(channels), float(momentum), float(eps)
        self.add_param("gamma", np.ones(self.channels, dtype=dtype))
        self.add_param("beta", np.zeros(self.channels, dtype=dtype))
        self.buffers = {"running_mean": np.zeros(self.channels, dtype=dtype),
                        "running_var": np.ones(self.channels, dtype=dtype)}

    def forward(self, x):
        if (self.expected_ndim is not None and x.ndim != self.expected_ndim) or x.shape[1] != self.channels:
            raise ValueError(f"{type(self).__name__}({self.channels}) got an input of shape {x.shape}")
        if self.training:
            axes = (0,) + tuple(range(2, x.ndim))
            m = x.size // x.shape[1]
            if m < 2:
                raise ValueError(f"batch norm in training needs at least 2 values per channel, got input {x.shape}")
            mean, var = x.mean(axis=axes), x.var(axis=axes)
            update_running_statistics(self, mean, var, m)
        else:
            mean, var = self.buffers["running_mean"], self.buffers["running_var"]
        out, self.cache = batchnorm_forward(x, self.params["gamma"], self.params["beta"], mean, var,
                                            self.eps, self.training)
        return out.astype(x.dtype, copy=False)

    def backward(self, dout):
        dx, dgamma, dbeta = batchnorm_backward(dout, self.cache)
        self.accumulate("gamma", dgamma)
        self.accumulate("beta", dbeta)
        return dx.astype(dout.dtype, copy=False)

    def __repr__(self):
        return f"{type(self).__name__}({self.channels})"


def update_running_statistics(layer, mean, var, count):
    r"""Fold batch statistics over ``count`` values per channel into a batch-norm layer's running ones.

    ``running = (1 - momentum) · running + momentum · batch``; with :math:`m` = ``count`` the
    variance enters unbiased, :math:`\frac{m}{m - 1}\sigma^2_\text{biased}` (as PyTorch does), and
    as it is when :math:`m = 1` (a single value has no unbiased variance). The one place both batch
    norms (:class:`BatchNorm` and the masked one of :mod:`refimpl.sparse_unit`) update them.
    """
    rm, rv = layer.buffers["running_mean"], layer.buffers["running_var"]
    rm *= 1 - layer.momentum
    rm += layer.momentum * mean
    rv *= 1 - layer.momentum
    rv += layer.momentum * var * (count / max(count - 1, 1))


class BatchNorm1d(BatchNorm):
    """Batch norm of (N, C) features."""

    expected_ndim = 2


class BatchNorm2d(BatchNorm):
    """Batch norm of (N, C, H, W) feature maps, statistics over N, H and W."""

    expected_ndim = 4


# =============================================================================================
# Pooling, flatten, dropout
# =============================================================================================


class Pool2d(Layer):
    """Max or average pooling (:mod:`refimpl.pooling`)."""

    mode = "max"

    def __init__(self, size=2, stride=None, padding=0):
        super().__init__()
        self.size = _checks.positive_pair(size, "size")
        self.stride = self.size if stride is None else _checks.positive_pair(stride, "stride")
        self.padding = _checks.as_pair(padding, "padding")

    def forward(self, x):
        out, self.cache = pool2d_forward(x, self.mode, self.size, self.stride, self.padding)
        return out

    def backward(self, dout):
        return pool2d_backward(dout, self.cache)

    def __repr__(self):
        return f"{type(self).__name__}(size={self.size}, stride={self.stride}, padding={self.padding})"


class MaxPool2d(Pool2d):
    mode = "max"


class AvgPool2d(Pool2d):
    mode = "avg"


class GlobalAvgPoolCache(NamedTuple):
    x_shape: tuple


def global_avg_pool_forward(x):
    """(N, C, H, W) → (N, C): the mean over each feature map."""
    return x.mean(axis=(2, 3)), GlobalAvgPoolCache(x.shape)


def global_avg_pool_backward(dout, cache):
    """Every position receives ``dout / (H W)``."""
    n, c, h, w = cache.x_shape
    return np.broadcast_to((dout / (h * w))[:, :, None, None], cache.x_shape).copy()


class GlobalAvgPool2d(Layer):
    def forward(self, x):
        if x.ndim != 4:
            raise ValueError(f"GlobalAvgPool2d needs (N, C, H, W) input, got shape {x.shape}")
        out, self.cache = global_avg_pool_forward(x)
        return out

    def backward(self, dout):
        return global_avg_pool_backward(dout, self.cache)

    def __repr__(self):
        return "GlobalAvgPool2d()"


class Flatten(Layer):
    """(N, ...) → (N, D)."""

    def forward(self, x):
        self.cache = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dout):
        return dout.reshape(self.cache)

    def __repr__(self):
        return "Flatten()"


class DropoutCache(NamedTuple):
    keep: np.ndarray  # the scaled keep mask, 0 or 1 / (1 - p)


def dropout_forward(x, p, rng):
    """Inverted dropout: zero each value with probability ``p``, scale the rest by 1 / (1 - p)."""
    keep = (rng.random(x.shape) >= p).astype(x.dtype) / (1.0 - p)
    return x * keep, DropoutCache(keep)


def dropout_backward(dout, cache):
    return dout * cache.keep


class Dropout(Layer):
    """Inverted dropout in training, identity in evaluation. Randomness from ``rng``."""

    def __init__(self, p, rng):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"p must be in [0, 1), got {p}")
        self.p = float(p)
        self.rng = _checks.generator(rng)

    def forward(self, x):
        if not self.training or self.p == 0.0:
            self.cache = None
            return x
        out, self.cache = dropout_forward(x, self.p, self.rng)
        return out

    def backward(self, dout):
        return dout if self.cache is None else dropout_backward(dout, self.cache)

    def __repr__(self):
        return f"Dropout({self.p})"
