"""Small pretrained networks shipped with the package, and the figures they were shipped with.

Training an adaptive network long enough for its computation-time map to mean something takes
minutes; these checkpoints let a notebook, the demo or ``ponder map`` start from a trained model.
They are trained by ``scripts/train_shipped_models.py`` from a fixed seed on generated cluttered
digits (:func:`refimpl.datasets.load_cluttered_digits`: nothing is downloaded), saved with
:func:`refimpl.checkpoint.save_checkpoint` as package data (``refimpl/data/models/<name>.npz``),
and loaded through :mod:`importlib.resources`, so they work from an installed wheel too::

    from refimpl.pretrained import list_pretrained, load_pretrained
    model, metadata = load_pretrained("sact-resnet14-digits32")
    metadata["evaluation"]["accuracy"]          # the recorded test accuracy

Each checkpoint's metadata (the checkpoint's ``extra`` JSON) records the data (generator, canvas,
split sizes, seed), the training settings, the seed, the exact command, the training time and the
figures of :func:`evaluate_pretrained` on the test split: accuracy, FLOPs per image and, for the
spatially adaptive networks, the computation-time map's AUC against the digit next to the centre
baseline's (:mod:`refimpl.map_metrics`). The figures are computed on the NumPy backend, so anyone
can recompute them exactly (:func:`evaluate_pretrained`; the test suite does).
"""

from __future__ import annotations

import contextlib
import importlib.resources

import numpy as np

from .checkpoint import load_checkpoint, read_checkpoint
from .datasets import iterate_batches, load_cluttered_digits
from .map_metrics import centre_gaussian, map_scores

__all__ = ["list_pretrained", "load_pretrained", "pretrained_file", "pretrained_test_split", "evaluate_pretrained",
           "pretrained_table", "PACT_MODES", "EVALUATION_BACKEND"]

EVALUATION_BACKEND = "numpy"  # the recorded figures are recomputed exactly on this backend
KINDS = ("resnet", "act", "sact", "pact")  # plain, ACT, SACT and PACT ResNets
PACT_MODES = ("thresholded", "discrete", "relaxed")  # the first is the headline figure (deterministic)
_SUFFIX = ".npz"


def _folder():
    return importlib.resources.files("refimpl").joinpath("data", "models")


def list_pretrained():
    """Names of the shipped models, sorted (e.g. ``"sact-resnet14-digits32"``)."""
    folder = _folder()
    if not folder.is_dir():
        return []
    return sorted(entry.name[:-len(_SUFFIX)] for entry in folder.iterdir() if entry.name.endswith(_SUFFIX))


def _resource(name):
    names = list_pretrained()
    if not isinstance(name, str) or name not in names:
        raise ValueError(f"name must be one of the shipped models {names}, got {name!r}")
    return _folder().joinpath(name + _SUFFIX)


@contextlib.contextmanager
def pretrained_file(name):
    """A context manager giving the path of the shipped checkpoint ``name`` (for ``ponder map --checkpoint``).

    The path is a real file for as long as the ``with`` block lasts (a temporary copy if the package
    is installed as a zip archive).
    """
    with importlib.resources.as_file(_resource(name)) as path:
        yield path


def load_pretrained(name, backend=None):
    """Load the shipped model ``name`` (in evaluation mode) and its metadata.

    Parameters
    ----------
    name : str, one of :func:`list_pretrained`
    backend : conv backend for the model (a name such as ``"cython"``, an instance, or None: NumPy)

    Returns
    -------
    model : refimpl.layers.Layer mapping (N, 1, H, W) images to (N, 10) logits
    metadata : dict — ``name``, ``model`` (registry name), ``kind``, ``data``, ``settings``, ``seed``,
        ``command``, ``train_seconds``, ``evaluation`` (the recorded test figures) and more

    Raises
    ------
    ValueError
        For an unknown ``name`` (the message lists the shipped ones).
    """
    with pretrained_file(name) as path:
        model, meta = load_checkpoint(path, backend=backend)
    return model, dict(meta["extra"])


def pretrained_test_split(metadata):
    """The test split a shipped model was evaluated on, regenerated from its recorded data seed.

    Returns
    -------
    refimpl.datasets.Split with images (n_test, 1, canvas, canvas), labels and object masks
    """
    data = metadata["data"]
    if data.get("generator") != "refimpl.datasets.load_cluttered_digits":
        raise ValueError(f"metadata['data']['generator'] must be 'refimpl.datasets.load_cluttered_digits', "
                         f"got {data.get('generator')!r}")
    return load_cluttered_digits(canvas=data["canvas"], n_train=data["n_train"], n_val=data["n_val"],
                                 n_test=data["n_test"], seed=data["seed"])["test"]


def _figures(model, split, maps=False, batch_size=250):
    """Accuracy and FLOPs per image of ``model`` on ``split`` and, if ``maps``, its computation-time maps' scores.

    One evaluation-mode pass: the map of each batch is read right after its forward.
    """
    model.eval()
    predictions, flops, ponder_maps = [], [], []
    for x, _ in iterate_batches(split.images, split.labels, batch_size):
        logits = model(x.astype(model.param_dtype, copy=False))
        predictions.append(np.argmax(logits, axis=1))
        flops.append(model.flops_per_sample)
        if maps:
            ponder_maps.append(model.ponder_map(x.shape[2:]))
    flops = np.concatenate(flops)
    figures = {"accuracy": float(np.mean(np.concatenate(predictions) == split.labels)),
               "flops_per_image": float(flops.mean()), "flops_std": float(flops.std())}
    if not maps:
        return figures
    ponder_maps = np.concatenate(ponder_maps)
    scores = map_scores(ponder_maps, split.object_masks)
    flat = ponder_maps.reshape(len(ponder_maps), -1)
    return {**figures, "map_auc": scores["auc"]["mean"], "map_nss": scores["nss"]["mean"],
            "map_cc": scores["cc"]["mean"],
            # mean over images of the map's spread over positions (0: every position ran the same units)
            "map_std_over_positions": float(flat.std(axis=1).mean()),
            "map_varies_fraction": float(np.mean(flat.max(axis=1) > flat.min(axis=1)))}


def evaluate_pretrained(model, metadata, split=None):
    """The figures recorded in a shipped model's metadata, recomputed on its test split.

    Plain ResNet and ACT: ``accuracy``, ``flops_per_image`` (mean), ``flops_std``. SACT adds the
    computation-time map's scores (``map_auc``, ``map_nss``, ``map_cc``, ``map_std_over_positions``,
    ``map_varies_fraction``) and the centre-Gaussian baseline's AUC (``centre_auc``). PACT gives the
    figures of each mode in ``modes`` (thresholded, discrete, relaxed; the noise of the last two
    drawn from ``default_rng(metadata["seed"])``), the thresholded ones also at the top level, and
    leaves the model in the mode it was trained in.

    Deterministic for a given backend; the shipped figures were computed with
    :data:`EVALUATION_BACKEND`.

    Parameters
    ----------
    model : the network of :func:`load_pretrained`
    metadata : its metadata
    split : the test split (default: :func:`pretrained_test_split` of ``metadata``)
    """
    kind = metadata["kind"]
    if kind not in KINDS:
        raise ValueError(f"metadata['kind'] must be one of {list(KINDS)}, got {kind!r}")
    split = pretrained_test_split(metadata) if split is None else split
    centre = centre_gaussian(split.object_masks.shape[1:])
    centre_auc = map_scores(np.broadcast_to(centre, split.object_masks.shape), split.object_masks)["auc"]["mean"]
    if kind in ("resnet", "act"):
        return _figures(model, split)
    if kind == "sact":
        return {**_figures(model, split, maps=True), "centre_auc": centre_auc}
    modes = {}
    for mode in PACT_MODES:
        model.set_mode(mode)
        model.reseed(np.random.default_rng(metadata["seed"]))
        modes[mode] = _figures(model, split, maps=True)
    model.set_mode(metadata["settings"]["options"].get("mode", "relaxed"))
    return {**modes[PACT_MODES[0]], "centre_auc": centre_auc, "modes": modes}


def pretrained_table():
    """A Markdown table of the shipped models and their recorded figures (the docs page prints it).

    Every number comes from the checkpoints' metadata; PACT's figures are those of its thresholded mode.
    """
    rows = ["| name | network | canvas | size (KB) | test accuracy | MFLOPs / image | map AUC (centre baseline) "
            "| training time (s) |",
            "|---|---|---|---|---|---|---|---|"]
    for name in list_pretrained():
        with pretrained_file(name) as path:
            meta, size_kb = read_checkpoint(path)[0]["extra"], path.stat().st_size / 1024
        figures = meta["evaluation"]
        auc = (f"{figures['map_auc']:.3f} ({figures['centre_auc']:.3f})" if "map_auc" in figures else "–")
        canvas = meta["data"]["canvas"]
        rows.append(f"| `{name}` | {meta['network']} | {canvas}×{canvas} | {size_kb:.0f} "
                    f"| {figures['accuracy']:.3f} | {figures['flops_per_image'] / 1e6:.2f} | {auc} "
                    f"| {meta['train_seconds']:.0f} |")
    return "\n".join(rows)
