r"""The training loop: ``train_step``, ``fit`` and ``evaluate``, with a history of what happened.

One step is forward → loss → backward → optimiser update:

.. math:: \theta \leftarrow \theta - \eta\, \nabla_\theta \big(L_\text{task}(f_\theta(x), y) + L_\text{extra}\big).

The task loss is softmax cross-entropy (:mod:`refimpl.losses`). Every model follows the training
protocol of :class:`refimpl.layers.Layer`: ``model.extra_loss()`` is added to it (0 for a plain
network; τ · ponder cost for an adaptive one), and ``model.objective_backward(dlogits,
per_example_loss)`` differentiates the sum (a REINFORCE-trained model makes its learning signal
from the per-example losses).

``fit`` records per epoch the training loss and accuracy, validation loss and accuracy, FLOPs
per image (:mod:`refimpl.flops`: at the positions actually computed), learning rate and time. If
the loss becomes NaN or inf, training stops with a :class:`TrainingDivergedError` naming the layer
whose output first went non-finite (found by re-running the batch with every layer's output
checked) and any parameters that are already non-finite.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from . import _checks
from .datasets import iterate_batches
from .layers import NonFiniteError, trace_non_finite
from .losses import softmax_cross_entropy_backward, softmax_cross_entropy_forward


class TrainingDivergedError(NonFiniteError):
    """The loss became NaN or inf; ``layer_name`` is where the first non-finite value appeared."""


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    flops_per_image: float  # mean over the validation set (training set if no validation)
    lr: float
    epoch_seconds: float  # training time of this epoch (no evaluation)
    elapsed_seconds: float  # cumulative training time
    train_images_per_second: float


@dataclass
class History:
    """What :func:`fit` did, epoch by epoch."""

    epochs: list = field(default_factory=list)

    def append(self, record):
        self.epochs.append(record)

    def column(self, name):
        return [getattr(r, name) for r in self.epochs]

    def to_dict(self):
        return {"epochs": [asdict(r) for r in self.epochs]}

    def to_json(self, path):
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def from_dict(cls, data):
        return cls([EpochRecord(**r) for r in data["epochs"]])

    def __len__(self):
        return len(self.epochs)


def compute_loss(model, logits, labels):
    """``(loss, dlogits, per_example_loss)``: cross-entropy plus ``model.extra_loss()``.

    ``dlogits`` is the gradient of the mean cross-entropy; ``per_example_loss`` (N,) the
    cross-entropy of each example (for :meth:`~refimpl.layers.Layer.objective_backward`).
    """
    loss, cache = softmax_cross_entropy_forward(logits, labels)
    dlogits = softmax_cross_entropy_backward(1.0, cache)
    return float(loss + model.extra_loss()), dlogits, cache.per_example


def _diverged(model, x, loss, where):
    layer = trace_non_finite(model, x)
    bad_params = [name for name, p, _ in model.named_parameters() if not np.all(np.isfinite(p))]
    if layer is None:
        origin = "no layer output is non-finite on a re-run, so the loss computation itself overflowed"
    else:
        origin = f"the first non-finite value appeared in the output of layer {layer!r}"
    params = f"; non-finite parameters: {bad_params[:5]}" if bad_params else ""
    return TrainingDivergedError(f"training stopped: the loss became {loss} at {where}; {origin}{params}. "
                                 "Lower the learning rate or check the input data.", layer)


def train_step(model, x, y, optimizer):
    """One optimisation step on the batch ``(x, y)``. Returns ``(loss, number correct, logits)``.

    Raises :class:`TrainingDivergedError` (before updating anything) if the loss is not finite.
    """
    model.zero_grad()
    logits = model(x)
    loss, dlogits, per_example_loss = compute_loss(model, logits, y)
    if not np.isfinite(loss):
        raise _diverged(model, x, loss, f"optimiser step {optimizer.steps + 1}")
    model.objective_backward(dlogits.astype(logits.dtype, copy=False), per_example_loss)
    optimizer.step()
    return loss, int(np.sum(np.argmax(logits, axis=1) == y)), logits


def evaluate(model, split, batch_size=256, progress=False):
    """Loss, accuracy and FLOPs of ``model`` on a :class:`~refimpl.datasets.Split`, in evaluation mode.

    Returns
    -------
    dict with ``loss``, ``accuracy``, ``flops_per_image`` (mean), ``flops_std``, ``seconds``,
    ``images_per_second`` and ``predictions`` (N,)
    """
    was_training = model.training
    model.eval()
    total_loss, predictions, flops = 0.0, [], []
    start = time.perf_counter()
    try:
        batches = iterate_batches(split.images, split.labels, batch_size)
        for x, y in _progress(batches, _n_batches(len(split), batch_size), "evaluate", progress):
            logits = model(x.astype(model.param_dtype, copy=False))
            loss, _, _ = compute_loss(model, logits, y)
            total_loss += loss * len(y)
            predictions.append(np.argmax(logits, axis=1))
            flops.append(model.flops_per_sample)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    predictions, flops = np.concatenate(predictions), np.concatenate(flops)
    n = len(split)
    return {"loss": total_loss / n, "accuracy": float(np.mean(predictions == split.labels)),
            "flops_per_image": float(flops.mean()), "flops_std": float(flops.std()), "seconds": seconds,
            "images_per_second": n / seconds, "predictions": predictions}


def fit(model, optimizer, train, val=None, epochs=1, batch_size=64, rng=None, schedule=None, augment=None,
        progress=True, on_epoch_end=None):
    """Train ``model`` on ``train`` for ``epochs`` epochs.

    Parameters
    ----------
    model : Layer producing logits
    optimizer : refimpl.optim.Optimizer over ``model.named_parameters()``
    train, val : refimpl.datasets.Split (``val`` optional)
    epochs, batch_size : int
    rng : numpy.random.Generator — shuffling and augmentation (required)
    schedule : callable(step) -> learning rate, optional (else the optimiser's ``lr`` stays)
    augment : callable(x, rng) -> x, e.g. :class:`refimpl.datasets.Augment`
    progress : show tqdm progress bars (False for quiet runs and tests)
    on_epoch_end : callable(record) called after each epoch (e.g. to save a checkpoint)

    Returns
    -------
    History
    """
    rng = _checks.generator(rng)
    if not isinstance(epochs, (int, np.integer)) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
    if len(train) == 0:
        raise ValueError("train must hold at least one example")
    dtype = model.param_dtype
    history, elapsed = History(), 0.0
    for epoch in range(1, epochs + 1):
        model.train()
        total_loss, correct, seen = 0.0, 0, 0
        start = time.perf_counter()
        batches = iterate_batches(train.images, train.labels, batch_size, rng, augment)
        bar = _progress(batches, _n_batches(len(train), batch_size), f"epoch {epoch}/{epochs}", progress)
        for x, y in bar:
            if schedule is not None:
                optimizer.lr = schedule(optimizer.steps)
            try:
                loss, right, _ = train_step(model, x.astype(dtype, copy=False), y, optimizer)
            except TrainingDivergedError as err:
                raise TrainingDivergedError(f"epoch {epoch}: {err}", err.layer_name) from None
            total_loss += loss * len(y)
            correct += right
            seen += len(y)
            if progress:
                bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}", lr=f"{optimizer.lr:.3g}")
        seconds = time.perf_counter() - start
        elapsed += seconds
        flops = model.flops_per_sample.mean()
        val_loss = val_accuracy = None
        if val is not None and len(val):
            result = evaluate(model, val, batch_size=max(batch_size, 128))
            val_loss, val_accuracy, flops = result["loss"], result["accuracy"], result["flops_per_image"]
        record = EpochRecord(epoch, total_loss / seen, correct / seen, val_loss, val_accuracy, float(flops),
                             float(optimizer.lr), seconds, elapsed, seen / seconds)
        history.append(record)
        if progress:
            val_text = "" if val_accuracy is None else f", val loss {val_loss:.4f}, val acc {val_accuracy:.4f}"
            _write(f"epoch {epoch}: train loss {record.train_loss:.4f}, acc {record.train_accuracy:.4f}{val_text}, "
                   f"{record.flops_per_image / 1e6:.2f} MFLOPs/image, {seconds:.1f}s")
        if on_epoch_end is not None:
            on_epoch_end(record)
    return history


def plot_history(history, path=None):
    """Loss and accuracy curves (train and validation) against the epoch; saved to ``path`` if given."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    epochs = history.column("epoch")
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, history.column("train_loss"), "o-", label="train")
    ax_acc.plot(epochs, history.column("train_accuracy"), "o-", label="train")
    if any(v is not None for v in history.column("val_loss")):
        ax_loss.plot(epochs, history.column("val_loss"), "s-", label="validation")
        ax_acc.plot(epochs, history.column("val_accuracy"), "s-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.01))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig


def _n_batches(n, batch_size):
    return -(-n // batch_size)


def _progress(iterable, total, desc, enabled):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)


def _write(message):
    from tqdm.auto import tqdm

    tqdm.write(message)
