r"""The convolution layer, dense or perforated, running on a conv backend.

:class:`Conv2d` owns a weight (K, C, kh, kw), a bias (K,) and its perforation plans, and computes
with the functional pair :func:`~refimpl.perforation.perforated_conv2d_forward` /
:func:`~refimpl.perforation.perforated_conv2d_backward` on its backend: the convolution to the
compact tensor (N, K, P), then the fill to the dense output (N, K, Ho, Wo). A dense layer is the
perforated one with the full plan, whose compact tensor already *is* the dense output in raster
order, so the fill is a reshape.

**Perforation** is described by a :class:`PerforationSpec` — mask type, rate and fill — and the
mask is built at the first forward pass, when (Ho, Wo) is known, from the layer's own
``numpy.random.Generator``; or the mask is given explicitly (:meth:`Conv2d.set_mask`). A network
accepts ``perforation={layer name: spec}`` so it can be perforated without rewriting it.
A per-call ``mask=`` (shared or per-sample, e.g. SACT's active positions) overrides both.

FLOPs (docs/spec.md §5.1): :func:`~refimpl.conv.conv_flops` per computed output position, recorded after
every forward in ``flops_per_sample`` (the layer protocol's form, :mod:`refimpl.layers`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import _checks
from . import init as _init
from .backend import get_backend
from .conv import conv_flops, conv_output_shape
from .layers import Layer
from .masks import MASK_TYPES, make_mask
from .perforation import perforated_conv2d_backward, perforated_conv2d_forward
from .plan import FILLS, PerforationPlan, as_plan


@dataclass(frozen=True)
class PerforationSpec:
    """How to perforate one convolution.

    Parameters
    ----------
    mask_type : one of ``refimpl.masks.MASK_TYPES`` ("uniform", "grid", "structure", "impact")
    rate : float in [0, 1), the requested fraction of output positions skipped
    fill : "nearest" or "zero"
    pool : dict, optional
        For ``"structure"``: the following pooling layer's ``pool_size`` (and ``pool_stride``,
        ``pool_padding``). Networks fill it in from their own structure.
    """

    mask_type: str
    rate: float
    fill: str = "nearest"
    pool: dict = field(default_factory=dict)

    def __post_init__(self):
        _checks.choice(self.mask_type, "mask_type", set(MASK_TYPES))
        _checks.rate(self.rate, "rate")
        _checks.choice(self.fill, "fill", set(FILLS))


def as_perforation_spec(value, name="perforation"):
    """Accept ``None``, a :class:`PerforationSpec`, ``(mask_type, rate)``, ``(mask_type, rate, fill)``
    or a dict with keys ``mask_type``, ``rate`` (and ``fill``, ``pool``)."""
    if value is None or isinstance(value, PerforationSpec):
        return value
    if isinstance(value, dict):
        unknown = set(value) - {"mask_type", "rate", "fill", "pool"}
        if unknown or not {"mask_type", "rate"} <= set(value):
            raise ValueError(f"{name} as a dict needs keys mask_type, rate (optional fill, pool), got {sorted(value)}")
        return PerforationSpec(**value)
    if isinstance(value, (tuple, list)) and len(value) in (2, 3):
        return PerforationSpec(*value)
    raise TypeError(f"{name} must be None, a PerforationSpec, (mask_type, rate[, fill]) or a dict, got {value!r}")


class Conv2d(Layer):
    """2-D convolution (N, C, H, W) → (N, K, Ho, Wo), dense or perforated, on a conv backend.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size, stride, padding : int or pair
    rng : numpy.random.Generator, draws the He-normal weights
    bias : bool
    backend : ConvBackend, backend name or None (NumPy)
    perforation : PerforationSpec, (mask_type, rate[, fill]), dict, or None (dense)
    mask_rng : numpy.random.Generator for the mask; by default one seeded from ``rng`` (drawn only
        when the layer is perforated, so dense networks consume ``rng`` identically)
    dtype : float32 or float64
    """

    def __init__(self, in_channels, out_channels, kernel_size, rng, stride=1, padding=0, bias=True,
                 backend=None, perforation=None, mask_rng=None, dtype=np.float32):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel = _checks.positive_pair(kernel_size, "kernel_size")
        self.stride = _checks.positive_pair(stride, "stride")
        self.padding = _checks.as_pair(padding, "padding")
        shape = (self.out_channels, self.in_channels, *self.kernel)
        fan_in, _ = _init.conv_fans(shape)
        self.add_param("w", _init.he_normal(shape, rng, fan_in, dtype))
        self.has_bias = bool(bias)
        if self.has_bias:
            self.add_param("b", np.zeros(self.out_channels, dtype=dtype))
        self.backend = get_backend(backend)
        self.perforation = as_perforation_spec(perforation)
        if self.perforation is not None and mask_rng is None:
            mask_rng = np.random.default_rng(rng.integers(2**63))
        self.mask_rng = None if mask_rng is None else _checks.generator(mask_rng, "mask_rng")
        self._explicit_mask = None
        self._plans = {}  # out_hw -> PerforationPlan, built at first use

    # --- perforation ----------------------------------------------------------------------
    def set_perforation(self, perforation, mask_rng=None):
        """Change the spec (``None`` = dense); masks are rebuilt at the next forward."""
        self.perforation = as_perforation_spec(perforation)
        if mask_rng is not None:
            self.mask_rng = _checks.generator(mask_rng, "mask_rng")
        if self.perforation is not None and self.mask_rng is None:
            raise ValueError("a perforated Conv2d needs mask_rng (a numpy.random.Generator)")
        self._explicit_mask = None
        self._plans = {}

    def set_mask(self, mask, fill="nearest"):
        """Use this explicit boolean (Ho, Wo) mask (e.g. an impact mask); ``None`` returns to dense."""
        _checks.choice(fill, "fill", set(FILLS))
        if mask is not None and (not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.ndim != 2):
            raise TypeError(f"mask must be a boolean (Ho, Wo) array, got {getattr(mask, 'dtype', type(mask))}")
        self.perforation = None
        self._explicit_mask = None if mask is None else (PerforationPlan(mask), fill)
        self._plans = {}

    def output_hw(self, in_hw):
        return conv_output_shape(in_hw, self.kernel, self.stride, self.padding)

    def plan_for(self, out_hw):
        """The layer's own plan for outputs of size ``out_hw`` and its fill (built on first use)."""
        if self._explicit_mask is not None:
            plan, fill = self._explicit_mask
            if plan.out_hw != tuple(out_hw):
                raise ValueError(f"the explicit mask is {plan.out_hw} but this input gives outputs {tuple(out_hw)}")
            return plan, fill
        if out_hw not in self._plans:
            if self.perforation is None:
                self._plans[out_hw] = PerforationPlan.dense(out_hw)
            else:
                spec = self.perforation
                if spec.mask_type == "impact":
                    raise ValueError("an impact mask needs impact scores: compute them with "
                                     "refimpl.masks.impact_scores and pass the mask to Conv2d.set_mask")
                if spec.mask_type == "structure" and "pool_size" not in spec.pool:
                    raise ValueError("a structure mask needs the following pooling layer: give "
                                     "PerforationSpec(pool={'pool_size': ..., 'pool_stride': ...})")
                mask = make_mask(spec.mask_type, out_hw, spec.rate, self.mask_rng, **spec.pool)
                self._plans[out_hw] = PerforationPlan(mask)
        return self._plans[out_hw], (self.perforation.fill if self.perforation is not None else "nearest")

    @property
    def is_perforated(self):
        return self.perforation is not None or self._explicit_mask is not None

    # --- forward / backward ---------------------------------------------------------------
    def _check_input(self, x):
        if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (N, {self.in_channels}, H, W), got {getattr(x, 'shape', type(x))}")
        if x.dtype != self.params["w"].dtype:
            raise TypeError(f"x has dtype {x.dtype} but the layer's weights are {self.params['w'].dtype}")
        return np.ascontiguousarray(x)

    def forward(self, x, mask=None, fill=None):
        """Convolve ``x`` (N, C, H, W).

        ``mask`` (bool (Ho, Wo) / (N, Ho, Wo) or a PerforationPlan) and ``fill`` override the
        layer's own perforation for this call.
        """
        x = self._check_input(x)
        n = x.shape[0]
        out_hw = self.output_hw(x.shape[2:])
        if mask is None:
            plan, own_fill = self.plan_for(out_hw)
        else:
            plan, own_fill = as_plan(mask, out_hw, n), "nearest"
        fill = own_fill if fill is None else _checks.choice(fill, "fill", set(FILLS))
        b = self.params["b"] if self.has_bias else None
        # check_finite=False: a NaN in a network is reported by the training loop, with the layer.
        out, self.cache = perforated_conv2d_forward(x, self.params["w"], b, plan, self.stride, self.padding,
                                                    fill=fill, backend=self.backend, check_finite=False)
        counts = np.broadcast_to(plan.counts.astype(np.int64), (n,)) if plan.shared else plan.counts.astype(np.int64)
        self.flops_per_sample = conv_flops(1, self.in_channels, self.out_channels, self.kernel) * counts
        self.dense_flops_per_sample = conv_flops(out_hw[0] * out_hw[1], self.in_channels, self.out_channels, self.kernel)
        return out

    def backward(self, dout):
        dx, dw, db = perforated_conv2d_backward(dout, self.cache)
        self.accumulate("w", dw)
        if self.has_bias:
            self.accumulate("b", db)
        return dx

    def __repr__(self):
        extra = f", perforation={self.perforation}" if self.perforation is not None else ""
        return (f"Conv2d({self.in_channels}, {self.out_channels}, kernel={self.kernel}, stride={self.stride}, "
                f"padding={self.padding}, backend={self.backend.name!r}{extra})")


def perforable_layers(model):
    """Names of the :class:`Conv2d` layers of ``model`` (what a ``perforation=`` dict may name)."""
    return [name for name, layer in model.named_layers() if isinstance(layer, Conv2d)]


def apply_perforation(model, perforation, mask_rng, following_pool=None):
    """Perforate the convolutions of ``model`` named in ``perforation``.

    Parameters
    ----------
    model : Layer
    perforation : dict layer name -> spec
        A spec is anything :func:`as_perforation_spec` accepts, or a boolean (Ho, Wo) mask.
        Names are dotted paths from :meth:`Layer.named_layers`, e.g. ``"stages.0.units.1.conv1"``.
    mask_rng : numpy.random.Generator; each named layer gets its own generator seeded from it,
        in the order of ``perforation``
    following_pool : dict layer name -> {"pool_size", "pool_stride", "pool_padding"}, optional
        The pooling layer that follows each conv; filled into ``"structure"`` specs that lack it.
    """
    if not isinstance(perforation, dict):
        raise TypeError(f"perforation must be a dict layer name -> spec, got {type(perforation).__name__}")
    mask_rng = _checks.generator(mask_rng, "mask_rng")
    layers = dict(model.named_layers())
    for name, value in perforation.items():
        layer = layers.get(name)
        if not isinstance(layer, Conv2d):
            raise ValueError(f"perforation names {name!r}, which is not a convolution of this model; "
                             f"the convolutions are {perforable_layers(model)}")
        if isinstance(value, np.ndarray):
            layer.set_mask(value)
            continue
        spec = as_perforation_spec(value, f"perforation[{name!r}]")
        if spec is not None and spec.mask_type == "structure" and not spec.pool:
            pool = (following_pool or {}).get(name)
            if pool is None:
                raise ValueError(f"a structure mask for {name!r} needs a following pooling layer, and none follows it")
            spec = PerforationSpec(spec.mask_type, spec.rate, spec.fill, dict(pool))
        layer.set_perforation(spec, np.random.default_rng(mask_rng.integers(2**63)))
