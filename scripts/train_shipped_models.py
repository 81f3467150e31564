"""Train the small pretrained models shipped in ``refimpl/data/models`` (see :mod:`refimpl.pretrained`).

A plain ResNet-14, an ACT-ResNet-14, a SACT-ResNet-14 and a PACT-ResNet-14 (per-position latents,
relaxed training), all with widths 8/16/32, on 32×32 cluttered digits generated from a fixed seed
(nothing is downloaded). Each is trained with Adam and a cosine learning-rate schedule (linear
warm-up) from a fixed seed, then reloaded on the NumPy backend and evaluated there on its test
split (:func:`refimpl.pretrained.evaluate_pretrained`: accuracy, FLOPs per image, map AUC against
the digit and the centre baseline's), and saved with every setting, the seed, the exact command and
those figures in the checkpoint's metadata. The test suite recomputes the figures. About 20
minutes on one core (two processes with ``--only`` halve that on two cores; the seeds make the
weights independent of which process trains which model)::

    python scripts/train_shipped_models.py                   # all of them, into refimpl/data/models
    python scripts/train_shipped_models.py --only sact-resnet14-digits32 --out-dir /tmp/models

Training uses the Cython backend (``--backend``; one thread by default, ``--threads``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

DATA = {"generator": "refimpl.datasets.load_cluttered_digits", "canvas": 32, "n_train": 4000, "n_val": 0,
        "n_test": 250, "seed": 32}
TRAINING = {"epochs": 12, "batch_size": 64, "lr": 3e-3, "final_lr": 0.0, "warmup_fraction": 0.05}
WIDTHS = [8, 16, 32]
SEED = 0

# name -> (registry model, kind, readable network name, build options)
MODELS = {
    "resnet14-digits32": ("resnet14", "resnet", "ResNet-14", {"widths": WIDTHS}),
    "act-resnet14-digits32": ("act-resnet14", "act", "ACT-ResNet-14", {"widths": WIDTHS, "tau": 0.2}),
    "sact-resnet14-digits32": ("sact-resnet14", "sact", "SACT-ResNet-14", {"widths": WIDTHS, "tau": 0.05}),
    "pact-resnet14-digits32": ("pact-resnet14", "pact", "PACT-ResNet-14 (per-position, relaxed)",
                               {"widths": WIDTHS, "tau": 0.05, "latents": "per-position", "mode": "relaxed",
                                "temperature": 0.5}),
}


def default_out_dir():
    return Path(__file__).resolve().parent.parent / "refimpl" / "data" / "models"


def train_one(name, data, backend, threads, command, out_dir, training=TRAINING, seed=SEED, log=print):
    """Train, evaluate on NumPy and save the shipped model ``name``; returns its metadata."""
    from refimpl.checkpoint import load_checkpoint, save_checkpoint
    from refimpl.models import build_model
    from refimpl.optim import Adam, CosineSchedule
    from refimpl.pretrained import EVALUATION_BACKEND, evaluate_pretrained
    from refimpl.training import fit

    registry_name, kind, network, options = MODELS[name]
    model = build_model(registry_name, 10, 1, np.random.default_rng(seed), backend=backend, **options)
    optimizer = Adam(list(model.named_parameters()), lr=training["lr"])
    steps = training["epochs"] * -(-len(data["train"]) // training["batch_size"])
    warmup = int(training["warmup_fraction"] * steps)
    schedule = CosineSchedule(training["lr"], steps, final_lr=training["final_lr"], warmup=warmup)

    def log_epoch(record):
        log(f"  {name} epoch {record.epoch}: loss {record.train_loss:.4f}, train accuracy {record.train_accuracy:.3f}, "
            f"lr {record.lr:.2e}, {record.elapsed_seconds:.0f}s")

    history = fit(model, optimizer, data["train"], epochs=training["epochs"], batch_size=training["batch_size"],
                  rng=np.random.default_rng(seed + 1), schedule=schedule, progress=False, on_epoch_end=log_epoch)
    train_seconds = history.epochs[-1].elapsed_seconds if history.epochs else 0.0
    build = {"num_classes": 10, "in_channels": 1, "dtype": "float32", "options": options}
    metadata = {
        "name": name, "model": registry_name, "kind": kind, "network": network,
        "data": dict(DATA, n_train=len(data["train"]), n_test=len(data["test"])),
        "settings": {"depth": 14, "widths": WIDTHS, "options": options, "tau": options.get("tau"),
                     "optimizer": "Adam", "lr_schedule": {"name": "cosine", "base_lr": training["lr"],
                                                          "final_lr": training["final_lr"], "warmup_steps": warmup,
                                                          "total_steps": steps},
                     "epochs": training["epochs"], "batch_size": training["batch_size"], "backend": backend,
                     "threads": threads, "dtype": "float32"},
        "seed": seed, "command": command, "train_seconds": train_seconds,
        "history": [{"epoch": r.epoch, "train_loss": r.train_loss, "train_accuracy": r.train_accuracy}
                    for r in history.epochs],
        "evaluation_backend": EVALUATION_BACKEND,
        "versions": {"ponder": _version(), "numpy": np.__version__},
    }
    out = Path(out_dir) / f"{name}.npz"
    draft = save_checkpoint(out.with_name(out.name + ".draft"), model, registry_name, build, extra=metadata)
    try:  # the recorded figures are those of the saved weights, evaluated on the NumPy backend
        reloaded, _ = load_checkpoint(draft, backend=EVALUATION_BACKEND)
        metadata["evaluation"] = evaluate_pretrained(reloaded, metadata, split=data["test"])
        save_checkpoint(out, reloaded, registry_name, build, extra=metadata)
    finally:
        draft.unlink()
    return metadata


def _version():
    from refimpl import __version__

    return __version__


def summary(metadata):
    e = metadata["evaluation"]
    text = f"accuracy {e['accuracy']:.3f}, {e['flops_per_image'] / 1e6:.2f} MFLOPs/image"
    if "map_auc" in e:
        text += f", map AUC {e['map_auc']:.3f} (centre {e['centre_auc']:.3f}), map varies on " \
                f"{e['map_varies_fraction']:.0%} of images"
    if "modes" in e:
        text += "; " + ", ".join(f"{mode}: acc {m['accuracy']:.3f} {m['flops_per_image'] / 1e6:.2f} MFLOPs"
                                 for mode, m in e["modes"].items())
    return text


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME", help=f"train only these of {list(MODELS)}")
    parser.add_argument("--out-dir", default=None, help="where to write <name>.npz (default: refimpl/data/models)")
    parser.add_argument("--backend", default="cython", help="conv backend for training (default: cython)")
    parser.add_argument("--threads", type=int, default=1, help="threads of the backend and of BLAS (default: 1)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only or ()) - set(MODELS))
    if unknown:
        parser.error(f"--only must name models among {list(MODELS)}, got {unknown}")
    if args.threads < 1:
        parser.error(f"--threads must be a positive int, got {args.threads}")
    os.environ["PONDER_THREADS"] = str(args.threads)  # read when the Cython backend is created

    from threadpoolctl import threadpool_limits

    from refimpl.datasets import load_cluttered_digits

    command = shlex.join(["python", "scripts/train_shipped_models.py", *argv])
    out_dir = Path(args.out_dir) if args.out_dir else default_out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_cluttered_digits(canvas=DATA["canvas"], n_train=DATA["n_train"], n_val=DATA["n_val"],
                                 n_test=DATA["n_test"], seed=DATA["seed"])
    print(f"data {DATA}; training {TRAINING}; backend {args.backend}, {args.threads} thread(s)", flush=True)
    with threadpool_limits(args.threads):
        for name in MODELS:
            if args.only and name not in args.only:
                continue
            start = time.perf_counter()
            metadata = train_one(name, data, args.backend, args.threads, command, out_dir,
                                 log=lambda text: print(text, flush=True))
            print(f"{name}: {summary(metadata)}; trained in {metadata['train_seconds']:.0f}s "
                  f"({time.perf_counter() - start:.0f}s with evaluation)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
