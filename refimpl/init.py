r"""Seeded parameter initialisation.

* **He** (Kaiming, 2015) for layers followed by a ReLU: :math:`w \sim \mathcal N(0, 2 / \text{fan\_in})`,
  which keeps the variance of the activations constant through a ReLU network.
* **Glorot** (Xavier, 2010) for linear maps without a rectifier:
  :math:`w \sim U(-a, a)`, :math:`a = \sqrt{6 / (\text{fan\_in} + \text{fan\_out})}`.

``fan_in`` of a convolution is ``C · kh · kw`` and ``fan_out`` is ``K · kh · kw``. Every function
draws from an explicit ``numpy.random.Generator``.
"""

from __future__ import annotations

import numpy as np

from . import _checks


def he_normal(shape, rng, fan_in, dtype=np.float32):
    """Normal with standard deviation ``sqrt(2 / fan_in)``."""
    rng = _checks.generator(rng)
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dtype)


def glorot_uniform(shape, rng, fan_in, fan_out, dtype=np.float32):
    """Uniform on ``[-a, a]`` with ``a = sqrt(6 / (fan_in + fan_out))``."""
    rng = _checks.generator(rng)
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(dtype)


def conv_fans(weight_shape):
    """``(fan_in, fan_out)`` of a convolution weight (K, C, kh, kw)."""
    k, c, kh, kw = weight_shape
    return c * kh * kw, k * kh * kw
