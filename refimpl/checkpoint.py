"""Checkpoints: a model's parameters, buffers, masks and optimiser state in one ``.npz`` file.

The file is a plain NumPy archive, read with ``allow_pickle=False`` (nothing in it is executed):

=========================== ===================================================================
``__meta__``                JSON: format tag and version, the registry model name and its build
                            arguments (:mod:`refimpl.models`), and any extra JSON (history…)
``param:<name>``            every trainable array, by its dotted name
``buffer:<name>``           batch-norm running statistics
``mask:<conv name>``        the mask of each perforated convolution (so a reloaded model computes
                            at exactly the same positions)
``optim:<name>/<slot>``     optimiser state (momentum, Adam moments), if saved
=========================== ===================================================================

Loading checks that the names, shapes and dtypes match the model exactly; a mismatch or a damaged
file raises :class:`CheckpointError` naming the file and what is wrong. Values round-trip exactly.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

FORMAT = "ponder-checkpoint"
VERSION = 1
ZIP_MAGIC = b"PK\x03\x04"  # every .npz (a zip archive) starts with a local file header


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not fit the model."""


def _conv_masks(model):
    from .conv_layer import Conv2d

    out = {}
    for name, layer in model.named_layers():
        if isinstance(layer, Conv2d) and layer.is_perforated and layer.cache is not None and not layer.cache.plan.full:
            plan = layer.cache.plan
            if plan.shared:
                out[name] = (plan.mask[0], layer.cache.fill)
    return out


def save_checkpoint(path, model, model_name=None, build_args=None, optimizer=None, extra=None):
    """Write ``model`` (and optionally ``optimizer``) to ``path`` (.npz), atomically.

    Parameters
    ----------
    path : str or Path
    model : Layer
    model_name, build_args : registry name and JSON arguments to rebuild it with
        :func:`load_checkpoint` (``num_classes``, ``in_channels``, ``dtype``, ``options``, ...)
    optimizer : refimpl.optim.Optimizer, optional
    extra : JSON-serialisable dict stored in the metadata (e.g. the training history)
    """
    path = Path(path)
    masks = _conv_masks(model)
    meta = {"format": FORMAT, "version": VERSION, "model": model_name, "build": build_args or {},
            "fills": {name: fill for name, (_, fill) in masks.items()}, "extra": extra or {}}
    arrays = {"__meta__": np.array(json.dumps(meta))}
    arrays.update({f"param:{n}": p for n, p, _ in model.named_parameters()})
    arrays.update({f"buffer:{n}": b for n, b in model.named_buffers()})
    arrays.update({f"mask:{n}": m for n, (m, _) in masks.items()})
    if optimizer is not None:
        arrays.update({f"optim:{k}": v for k, v in optimizer.state_arrays().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return path


def read_checkpoint(path):
    """Read every array of a checkpoint and its metadata: ``(meta dict, {key: array})``."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a folder; expected a checkpoint file (.npz) written by "
                              f"ponder train, e.g. {str(path / 'checkpoint.npz')!r}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; expected a checkpoint file (.npz) written "
                              "by ponder train")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != ZIP_MAGIC:
        kind = "an empty file" if not head else ("a text file" if _looks_like_text(path) else "not a zip archive")
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged or not a ponder checkpoint: it is {kind}; "
                              "expected a checkpoint file (.npz, a zip archive) written by ponder train")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged or not a ponder checkpoint (.npz): {exc}") from exc
    if "__meta__" not in arrays:
        raise CheckpointError(f"{str(path)!r} is an .npz file but not a ponder checkpoint (no __meta__ entry)")
    try:
        meta = json.loads(str(arrays.pop("__meta__")))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} has unreadable metadata: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a ponder checkpoint (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format version {meta.get('version')}, this ponder reads {VERSION}")
    return meta, arrays


def _looks_like_text(path, probe=512):
    with open(path, "rb") as f:
        sample = f.read(probe)
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\0" not in sample


def _assign(target, source, key, path):
    if source.shape != target.shape or source.dtype != target.dtype:
        raise CheckpointError(f"checkpoint {str(path)!r}: {key} is {source.dtype}{list(source.shape)} but the model "
                              f"expects {target.dtype}{list(target.shape)}")
    target[...] = source


def load_into(model, path, optimizer=None):
    """Load a checkpoint's values into an existing ``model`` (and ``optimizer``); returns the metadata.

    Raises :class:`CheckpointError` unless the checkpoint holds exactly the model's parameters and
    buffers with the same shapes and dtypes.
    """
    meta, arrays = read_checkpoint(path)
    params = {n: p for n, p, _ in model.named_parameters()}
    buffers = dict(model.named_buffers())
    stored_params = {k[6:]: v for k, v in arrays.items() if k.startswith("param:")}
    stored_buffers = {k[7:]: v for k, v in arrays.items() if k.startswith("buffer:")}
    for kind, wanted, stored in (("parameters", params, stored_params), ("buffers", buffers, stored_buffers)):
        missing, unexpected = sorted(set(wanted) - set(stored)), sorted(set(stored) - set(wanted))
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {str(path)!r} does not fit this model ({type(model).__name__}): {kind} missing from "
                f"the checkpoint {missing[:5]}{'...' if len(missing) > 5 else ''}, {kind} the model lacks "
                f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for name, value in stored_params.items():
        _assign(params[name], value, f"parameter {name!r}", path)
    for name, value in stored_buffers.items():
        _assign(buffers[name], value, f"buffer {name!r}", path)
    layers = dict(model.named_layers())
    for key, mask in arrays.items():
        if key.startswith("mask:"):
            name = key[5:]
            if name not in layers or not hasattr(layers[name], "set_mask"):
                raise CheckpointError(f"checkpoint {str(path)!r} has a mask for {name!r}, not a convolution of this model")
            layers[name].set_mask(mask.astype(bool), meta.get("fills", {}).get(name, "nearest"))
    if optimizer is not None:
        optimizer.load_state_arrays({k[6:]: v for k, v in arrays.items() if k.startswith("optim:")})
    return meta


def load_checkpoint(path, backend=None):
    """Rebuild the model a checkpoint was saved from (through :mod:`refimpl.models`) and load it.

    Returns
    -------
    model : Layer (in evaluation mode)
    meta : dict — the metadata, including ``extra``
    """
    from .models import build_model

    meta, _ = read_checkpoint(path)
    if not meta.get("model"):
        raise CheckpointError(f"checkpoint {str(path)!r} does not name its model; build the model yourself and use load_into")
    build = dict(meta.get("build", {}))
    try:
        model = build_model(meta["model"], build["num_classes"], build["in_channels"], np.random.default_rng(0),
                            backend=backend, dtype=build.get("dtype", "float32"), **build.get("options", {}))
    except KeyError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks the build argument {exc}") from exc
    load_into(model, path)
    return model.eval(), meta



def load_run(path, backend=None, cifar_dir=None):
    """A checkpoint written by ``ponder train`` together with the data splits it was trained on.

    ``ponder train`` records its data arguments in the checkpoint, so evaluation and perforation
    see exactly the same (seeded) train/validation/test split.

    Parameters
    ----------
    path : str or Path
    backend : conv backend for the rebuilt model
    cifar_dir : str or Path, optional — where the CIFAR-10 batches are now, if they moved

    Returns
    -------
    model : Layer (in evaluation mode)
    meta : dict
    splits : dict name -> data set, as returned by :func:`refimpl.datasets.load_dataset`
    """
    from .datasets import load_dataset

    model, meta = load_checkpoint(path, backend=backend)
    data = dict(meta.get("extra", {}).get("data") or {})
    if not data:
        raise CheckpointError(f"checkpoint {str(path)!r} does not record its data set (it was not written by ponder train)")
    if cifar_dir is not None:
        data["cifar_dir"] = str(cifar_dir)
    splits, _ = load_dataset(data.pop("name"), **data)
    return model, meta, splits
