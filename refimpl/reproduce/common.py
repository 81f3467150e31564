"""What several claims share: the backend choice, the data of a setting, training a classifier, figures.

Every random draw of a run comes from generators seeded with the run's seed: the data split or
the generated images, the initial weights, the shuffling and the masks. Different seeds therefore
measure the spread a reader would see when repeating the experiment from scratch.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np

__all__ = ["compiled_threads", "resolve_backend", "load_setting_data", "train_classifier", "error_rate", "interval_bars",
           "new_figure", "save_figure", "seed_rng"]

#: Tried in this order for ``backend="fastest"``; the first that runs here is used.
FASTEST_FIRST = ("cython", "numpy")


@contextmanager
def compiled_threads(threads):
    """Run the block with the compiled backend's OpenMP team limited to ``threads`` (restored after).

    BLAS is limited with threadpoolctl, but the Cython kernels choose their team themselves
    (``PONDER_THREADS``, else every core): without this a run asked to use one thread would use
    every core in its gathers, and ``--jobs`` runs side by side would oversubscribe the machine.
    The thread count also fixes the order of the kernels' partial sums, so a run's numbers do not
    depend on the machine's core count or on ``--jobs``.
    """
    from ..backend import BackendUnavailableError, get_backend

    try:  # made now if it was not, so that it has its default team to go back to
        compiled = get_backend("cython")
    except (BackendUnavailableError, ValueError):
        compiled = None
    before_env = os.environ.get("PONDER_THREADS")
    before_threads = compiled.threads if compiled is not None else None
    os.environ["PONDER_THREADS"] = str(threads)
    if compiled is not None:
        compiled.threads = threads
    try:
        yield
    finally:
        if before_env is None:
            os.environ.pop("PONDER_THREADS", None)
        else:
            os.environ["PONDER_THREADS"] = before_env
        if compiled is not None:
            compiled.threads = before_threads


def seed_rng(seed, stream):
    """The generator of one random stream (``stream``: a small int naming its use) of run ``seed``."""
    return np.random.default_rng([int(seed), int(stream)])


def resolve_backend(name):
    """``(backend instance, its name)`` for a setting's backend: a name, or ``"fastest"``."""
    from ..backend import BackendUnavailableError, get_backend

    if name != "fastest":
        return get_backend(name), name
    for candidate in FASTEST_FIRST:
        try:
            return get_backend(candidate), candidate
        except (BackendUnavailableError, ValueError):
            continue
    return get_backend("numpy"), "numpy"


def load_setting_data(data, seed):
    """Train and test :class:`~refimpl.datasets.Split` of a setting's ``data`` dict, drawn with ``seed``.

    ``data["kind"]`` is ``"digits"`` (the 8×8 digits upscaled ``scale`` times; ``n_train`` and
    ``n_test`` of the seeded split) or ``"cluttered"`` (cluttered digits on a ``canvas``; images
    generated from ``seed``).
    """
    from ..datasets import load_cluttered_digits, load_digits

    if data["kind"] == "digits":
        splits = load_digits(scale=data["scale"], seed=seed)
        train, test = splits["train"], splits["test"]
        return train.subset(slice(0, data["n_train"])), test.subset(slice(0, data["n_test"]))
    if data["kind"] == "cluttered":
        splits = load_cluttered_digits(canvas=data["canvas"], n_train=data["n_train"], n_val=0,
                                       n_test=data["n_test"], seed=seed)
        return splits["train"], splits["test"]
    raise ValueError(f"data['kind'] must be 'digits' or 'cluttered', got {data['kind']!r}")


def train_classifier(model_name, options, train, training, seed, backend):
    """Build ``model_name`` from ``seed`` and train it with Adam and a cosine schedule (linear warm-up).

    ``training`` holds ``epochs``, ``batch_size``, ``lr`` and ``warmup_fraction``. Returns the
    model and the :class:`~refimpl.training.History`.
    """
    from ..models import build_model
    from ..optim import Adam, CosineSchedule
    from ..training import fit

    model = build_model(model_name, 10, train.images.shape[1], seed_rng(seed, 1), backend=backend, **options)
    optimizer = Adam(list(model.named_parameters()), lr=training["lr"])
    steps = max(1, training["epochs"] * -(-len(train) // training["batch_size"]))
    schedule = CosineSchedule(training["lr"], steps, warmup=int(training["warmup_fraction"] * steps))
    history = fit(model, optimizer, train, epochs=training["epochs"], batch_size=training["batch_size"],
                  rng=seed_rng(seed, 2), schedule=schedule, progress=False)
    return model, history


def error_rate(model, split, batch_size=250):
    """Error rate of ``model`` on ``split`` (evaluation mode)."""
    from ..measurement import measure_loss

    return measure_loss(model, split, batch_size)[1]


# --- figures --------------------------------------------------------------------------------------


def new_figure(ncols=1, width=5.5, height=4.0):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, axes[0]


def save_figure(fig, path, summary):
    """Title with the tier and seeds, then save and close."""
    import matplotlib.pyplot as plt

    fig.suptitle(f"{summary['claim']}: {summary['title']}\n{summary['tier']} tier, {summary['seeds']} seed(s); "
                 f"bars: 95 % t-interval over seeds", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def interval_bars(intervals):
    """``(means, yerr)`` for ``ax.errorbar`` from mean_interval dicts (no bar where there is no interval)."""
    means = np.array([i["mean"] for i in intervals])
    low = np.array([i["mean"] - i["low"] if i["low"] is not None else 0.0 for i in intervals])
    high = np.array([i["high"] - i["mean"] if i["high"] is not None else 0.0 for i in intervals])
    return means, np.vstack([low, high])
