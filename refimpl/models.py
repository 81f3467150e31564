"""The model registry: a name such as ``"resnet14"`` → a function that builds the network.

``ponder train --model NAME`` and checkpoints (which store the name and the build arguments) go
through :func:`build_model`, so a new model becomes trainable, savable and loadable by adding one
line to :data:`MODELS` (``name: ("module", "builder function")``, imported only when used) or by
calling :func:`register_model` at run time.

A builder is called as ``builder(num_classes=..., in_channels=..., rng=..., backend=...,
perforation=..., dtype=..., **options)`` and returns a :class:`refimpl.layers.Layer` mapping
(N, C, H, W) images to (N, num_classes) logits. ``options`` are model-specific (``tau`` for ACT,
``widths``, ``shortcut``...); they are stored in checkpoints as JSON, so keep them JSON values.
"""

from __future__ import annotations

import importlib

import numpy as np

from . import _checks

# name -> (module, builder function); builders are imported on first use.
MODELS = {
    "resnet8": ("refimpl.models", "build_resnet8"),
    "resnet14": ("refimpl.models", "build_resnet14"),
    "resnet20": ("refimpl.models", "build_resnet20"),
    "resnet32": ("refimpl.models", "build_resnet32"),
    "resnet110": ("refimpl.models", "build_resnet110"),
    "nin": ("refimpl.models", "build_nin"),
    "act-resnet8": ("refimpl.act", "build_act_resnet8"),
    "act-resnet14": ("refimpl.act", "build_act_resnet14"),
    "act-resnet20": ("refimpl.act", "build_act_resnet20"),
    "act-resnet32": ("refimpl.act", "build_act_resnet32"),
    "act-resnet110": ("refimpl.act", "build_act_resnet110"),
    "sact-resnet8": ("refimpl.sact", "build_sact_resnet8"),
    "sact-resnet14": ("refimpl.sact", "build_sact_resnet14"),
    "sact-resnet20": ("refimpl.sact", "build_sact_resnet20"),
    "sact-resnet32": ("refimpl.sact", "build_sact_resnet32"),
    "sact-resnet110": ("refimpl.sact", "build_sact_resnet110"),
    "pact-resnet8": ("refimpl.pact_resnet", "build_pact_resnet8"),
    "pact-resnet14": ("refimpl.pact_resnet", "build_pact_resnet14"),
    "pact-resnet20": ("refimpl.pact_resnet", "build_pact_resnet20"),
    "pact-resnet32": ("refimpl.pact_resnet", "build_pact_resnet32"),
    "pact-resnet110": ("refimpl.pact_resnet", "build_pact_resnet110"),
}

_RUNTIME = {}


def register_model(name, builder):
    """Make ``build_model(name, ...)`` call ``builder`` (see the module docstring for its signature)."""
    if not callable(builder):
        raise TypeError(f"builder must be callable, got {type(builder).__name__}")
    _RUNTIME[name] = builder


def model_names():
    return sorted(set(MODELS) | set(_RUNTIME))


def get_builder(name):
    if name in _RUNTIME:
        return _RUNTIME[name]
    if name not in MODELS:
        raise ValueError(f"model must be one of {model_names()}, got {name!r}")
    module, function = MODELS[name]
    return getattr(importlib.import_module(module), function)


def build_model(name, num_classes, in_channels, rng, backend=None, perforation=None, dtype=np.float32, **options):
    """Build the registered model ``name`` (weights drawn from ``rng``)."""
    rng = _checks.generator(rng)
    return get_builder(name)(num_classes=int(num_classes), in_channels=int(in_channels), rng=rng, backend=backend,
                             perforation=perforation, dtype=np.dtype(dtype).type, **options)


# --- the builders of this package ------------------------------------------------------------


def _resnet_builder(depth):
    def build(num_classes, in_channels, rng, backend=None, perforation=None, dtype=np.float32, **options):
        from .resnet import resnet

        if "widths" in options:
            options["widths"] = tuple(options["widths"])
        return resnet(depth, num_classes, in_channels, rng, backend=backend, perforation=perforation, dtype=dtype,
                      **options)

    build.__name__ = f"build_resnet{depth}"
    build.__doc__ = f"Pre-activation ResNet-{depth} (:mod:`refimpl.resnet`); options: widths, shortcut."
    return build


build_resnet8 = _resnet_builder(8)
build_resnet14 = _resnet_builder(14)
build_resnet20 = _resnet_builder(20)
build_resnet32 = _resnet_builder(32)
build_resnet110 = _resnet_builder(110)


def build_nin(num_classes, in_channels, rng, backend=None, perforation=None, dtype=np.float32, **options):
    """The Network-in-Network-style CNN (:mod:`refimpl.nin`); option: widths."""
    from .nin import NIN

    if "widths" in options:
        options["widths"] = tuple(options["widths"])
    return NIN(num_classes, in_channels, rng, backend=backend, perforation=perforation, dtype=dtype, **options)
