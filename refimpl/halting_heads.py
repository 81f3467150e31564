r"""Halting heads: the layers that read a unit's output and say how much to stop.

Every head computes a **halting logit** :math:`a`; where a probability is wanted (ACT, SACT) the
head is followed by the sigmoid, :math:`h = \sigma(a)` (the ``halting_proba``); PACT uses the logits
directly. Two shapes of latent:

:class:`LogitHead` — one logit per sample
    :math:`a_l = w_l^\top \operatorname{gap}(U_l) + b_l`, (n, C, H, W) → (n,).
:class:`SpatialLogitHead` — one logit per position
    :math:`a_l(x, y) = (w^\text{loc}_l * U_l)(x, y) + b_l + w^{\text{glob}\,\top}_l \operatorname{gap}(U_l)`,
    (n, C, H, W) → (n, H, W): a 3×3 convolution to one channel plus a global term broadcast over space.

:class:`HaltingHead` and :class:`SpatialHaltingHead` are the same heads followed by the sigmoid
(:class:`HaltingProbability`). The bias starts at :data:`HALTING_BIAS` = −3
(:math:`\sigma(-3) \approx 0.047`): every unit runs at the start of training and so receives
gradient; the weights start as N(0, 0.01²). Project choice: the optional batch norm of the ACT
head is left out.

**The head protocol.** ``forward(u, active=None)`` returns one value per latent; ``active``
(n, S...) bool, when given, marks the latents whose value will be used, and a head may skip the
work elsewhere (the spatial head's 3×3 convolution is computed only there, perforated, zero
elsewhere). ``backward(d)`` returns the gradient w.r.t. ``u``. After ``forward``,
``flops_per_sample`` (n,) holds what was computed (see :mod:`refimpl.flops`).
"""

from __future__ import annotations

import numpy as np

from .conv_layer import Conv2d
from .distributions import sigmoid
from .layers import Layer, global_avg_pool_backward, global_avg_pool_forward

HALTING_BIAS = -3.0


def _small_normal(rng, shape, dtype):
    return (0.01 * rng.standard_normal(shape)).astype(dtype)


class LogitHead(Layer):
    """Per-sample halting logit: U (n, C, H, W) → a (n,) = ``w · gap(U) + b``.

    Parameters
    ----------
    channels : int
    rng : numpy.random.Generator, draws the small initial weights
    bias : float, initial logit bias
    dtype : float32 or float64
    """

    def __init__(self, channels, rng, bias=HALTING_BIAS, dtype=np.float32):
        super().__init__()
        self.channels = int(channels)
        self.add_param("w", _small_normal(rng, self.channels, dtype))
        self.add_param("b", np.full(1, bias, dtype=dtype))

    def forward(self, u, active=None):
        pooled, gap_cache = global_avg_pool_forward(u)
        self.cache = (pooled, gap_cache)
        self.flops_per_sample = np.full(u.shape[0], 2 * self.channels, dtype=np.int64)  # the linear map
        return (pooled @ self.params["w"] + self.params["b"][0]).astype(u.dtype, copy=False)

    def backward(self, dlogit):
        pooled, gap_cache = self.cache
        self.accumulate("w", pooled.T @ dlogit)
        self.accumulate("b", np.array([dlogit.sum()], dtype=self.params["b"].dtype))
        return global_avg_pool_backward(np.outer(dlogit, self.params["w"]).astype(dlogit.dtype), gap_cache)

    def __repr__(self):
        return f"{type(self).__name__}({self.channels})"


class SpatialLogitHead(Layer):
    """Per-position halting logits: U (n, C, H, W) → a (n, H, W), a 3×3 conv plus a global term.

    ``local``: a 3×3 convolution to one channel (with the bias); ``w_global`` (C,): the global term
    ``w_global · gap(U)`` (no bias), broadcast over space. FLOPs: the local convolution where it is
    computed plus ``2C`` per sample for the global term.

    Parameters
    ----------
    channels : int
    rng : numpy.random.Generator
    bias : float, initial logit bias
    backend : conv backend of the local convolution
    dtype : float32 or float64
    """

    def __init__(self, channels, rng, bias=HALTING_BIAS, backend=None, dtype=np.float32):
        super().__init__()
        self.channels = int(channels)
        self.local = Conv2d(channels, 1, 3, rng, padding=1, bias=True, backend=backend, dtype=dtype)
        self.local.params["w"][...] = 0.01 * rng.standard_normal(self.local.params["w"].shape)
        self.local.params["b"][...] = bias
        self.add_param("w_global", _small_normal(rng, self.channels, dtype))

    def local_logits(self, u, active=None):
        """The local term plus the bias, (n, H, W), computed only at ``active`` when given."""
        return (self.local(u) if active is None else self.local(u, mask=active, fill="zero"))[:, 0]

    def global_logits_forward(self, u):
        """The global term ``w_global · gap(U)``, (n,); its backward is :meth:`global_logits_backward`."""
        pooled, gap_cache = global_avg_pool_forward(u)
        self.cache = (pooled, gap_cache)
        self.flops_per_sample = self.local.flops_per_sample + 2 * self.channels
        return pooled @ self.params["w_global"]

    def global_logits_backward(self, dglobal):
        """Gradient w.r.t. U of the global term from its gradient (n,); accumulates ``w_global``'s."""
        pooled, gap_cache = self.cache
        self.accumulate("w_global", pooled.T @ dglobal)
        return global_avg_pool_backward(np.outer(dglobal, self.params["w_global"]).astype(dglobal.dtype), gap_cache)

    def forward(self, u, active=None):
        local = self.local_logits(u, active)
        return (local + self.global_logits_forward(u)[:, None, None]).astype(u.dtype, copy=False)

    def backward(self, dlogit):
        du = self.local.backward(np.ascontiguousarray(dlogit[:, None]))
        return du + self.global_logits_backward(dlogit.sum(axis=(1, 2)))

    def __repr__(self):
        return f"{type(self).__name__}({self.channels})"


class HaltingProbability:
    r"""Mixin that turns a logit head into a halting-probability head: :math:`h = \sigma(a)`.

    ``forward(u, active=None, execution="sparse")`` returns ``halting_proba``, zero where
    ``active`` (when given) is False; ``execution="dense"`` computes the logits everywhere before
    masking (the dense masked reference of sparse execution). ``backward(dh)`` multiplies by
    :math:`\sigma'(a) = h (1 - h)` (zero where masked) and hands the result to the logit head's backward.
    """

    def forward(self, u, active=None, execution="sparse"):
        if execution not in ("sparse", "dense"):
            raise ValueError(f"execution must be one of ['sparse', 'dense'], got {execution!r}")
        h = sigmoid(super().forward(u, active if execution == "sparse" else None))
        self.halting_proba = h if active is None else h * active
        return self.halting_proba

    def backward(self, dh):
        h = self.halting_proba
        return super().backward(dh * h * (1.0 - h))


class HaltingHead(HaltingProbability, LogitHead):
    """ACT halting head: U (n, C, H, W) → h (n,) = σ(w · gap(U) + b)."""


class SpatialHaltingHead(HaltingProbability, SpatialLogitHead):
    """SACT halting head: U (n, C, H, W) → h (n, H, W) = σ(local + global logits)."""
