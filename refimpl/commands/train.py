"""``ponder train``: train a registered model on an offline data set and write the run folder.

Example::

    ponder train --model resnet14 --data cluttered-digits --canvas 48 --epochs 5 --backend cython --out runs/x

The run folder gets ``checkpoint.npz`` (the weights after the latest epoch, rewritten after every
epoch), ``history.json`` (per-epoch records, the
arguments, the final test evaluation) and ``curves.png`` (loss and accuracy). Any model of
:mod:`refimpl.models` can be trained, including those other modules register (ACT/SACT/PACT
ResNets); model-specific options go through ``--option key=value`` (JSON values, e.g.
``--option tau=0.01 --option widths=[8,16,32]``).

``--task parity --objective act|pact|pondernet`` trains an ACT RNN on the parity task instead, with
the experiment ``ponder parity`` runs (:mod:`refimpl.commands.parity_experiment`; no ``--model``
or ``--data``; ``--batch-size``, ``--lr``, ``--tau``, ``--seed`` as here, the other settings of
``ponder parity`` through ``--option``, e.g. ``--option size=8``; results in ``OUT/parity.json``)::

    ponder train --task parity --objective pondernet --option size=8 --option steps=3000 --out runs/parity
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .arguments import (UsageError, add_backend_argument, key_value, key_value_text, non_negative_float,
                        non_negative_int, positive_float, positive_int, required_group)

DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3}


def add_arguments(parser):
    from ..act_rnn import OBJECTIVES
    from ..datasets import DATASETS
    from ..masks import MASK_TYPES
    from ..models import model_names

    required_group(parser).add_argument("--out", required=True, type=Path, help="run folder to write (created)")
    parser.add_argument("--task", choices=("image", "parity"), default="image",
                        help="image: --model on --data; parity: an ACT RNN on parity (needs --objective)")
    parser.add_argument("--model", choices=model_names(), metavar="MODEL",
                        help=f"registered model (--task image): {', '.join(model_names())}")
    parser.add_argument("--data", choices=DATASETS, help="data set (--task image)")
    parser.add_argument("--objective", choices=OBJECTIVES, help="--task parity: act, pact or pondernet")
    data = parser.add_argument_group("data")
    data.add_argument("--canvas", type=positive_int, default=48, help="cluttered digits: canvas side")
    data.add_argument("--digit-scale", type=positive_int, default=2,
                      help="cluttered digits: digit upscaling (2: 16x16 digits)")
    data.add_argument("--clutter", type=non_negative_int, default=None,
                      help="cluttered digits: fragments per image (default: canvas // 8)")
    data.add_argument("--scale", type=positive_int, default=1, help="digits: upscaling of the 8x8 images")
    data.add_argument("--n-train", type=positive_int, default=5000, help="cluttered digits: training images")
    data.add_argument("--n-val", type=non_negative_int, default=None,
                      help="validation images (default: 500 for cluttered digits, 5000 for cifar10)")
    data.add_argument("--n-test", type=positive_int, default=1000, help="cluttered digits: test images")
    data.add_argument("--cifar-dir", type=Path, default=None, help="cifar10: folder with the binary batches")
    data.add_argument("--crop-padding", type=non_negative_int, default=0,
                      help="augmentation: random crop with this zero padding")
    data.add_argument("--flip", action="store_true", help="augmentation: random horizontal flips (not for digits)")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=positive_int, default=5, help="passes over the training images")
    opt.add_argument("--batch-size", type=positive_int, default=64, help="images per step")
    opt.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd", help="sgd (with momentum) or adam")
    opt.add_argument("--lr", type=positive_float, default=None,
                     help="base learning rate (default: 0.1 for sgd, 1e-3 for adam)")
    opt.add_argument("--momentum", type=non_negative_float, default=0.9, help="sgd momentum")
    opt.add_argument("--weight-decay", type=non_negative_float, default=5e-4, help="L2 weight decay")
    opt.add_argument("--schedule", choices=("cosine", "step", "constant"), default="cosine",
                     help="learning-rate schedule over the whole run")
    opt.add_argument("--seed", type=non_negative_int, default=0, help="seed of data, weights, masks and shuffling")
    model = parser.add_argument_group("model")
    add_backend_argument(model, help_text="convolution backend")
    model.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="parameter dtype")
    model.add_argument("--option", action="append", type=key_value_text, default=[], metavar="KEY=VALUE",
                       help="model option, JSON value (repeatable), e.g. tau=0.01 or widths=[8,16,32] "
                            "(default: none)")
    model.add_argument("--tau", type=non_negative_float, default=None,
                       help="ACT/SACT models: ponder-cost weight, same as --option tau=VALUE")
    model.add_argument("--mode", choices=("relaxed", "discrete", "thresholded"), default=None,
                       help="PACT models: training mode, same as --option mode=VALUE")
    model.add_argument("--temperature", type=positive_float, default=None,
                       help="PACT models, relaxed mode: temperature λ, same as --option temperature=VALUE")
    model.add_argument("--latents", default=None, metavar="per-block|per-position|GxG",
                       help="PACT models: one latent per block, per position, or per GxG group (e.g. 4x4)")
    model.add_argument("--perforate", action="append", default=[], metavar="LAYER=MASK:RATE[:FILL]",
                       help=f"perforate a convolution (repeatable), mask in {', '.join(MASK_TYPES[:3])}, "
                            "e.g. stem=grid:0.5 (default: none)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def pact_options(args):
    """The PACT shorthand flags as model options: ``--latents 4x4`` → ``latents="group", group_size=4``."""
    options = {}
    if args.mode is not None:
        options["mode"] = args.mode
    if args.temperature is not None:
        options["temperature"] = args.temperature
    if args.latents is not None:
        side = args.latents.partition("x")
        if side[1] and side[0] == side[2] and side[0].isdigit():
            options.update(latents="group", group_size=int(side[0]))
        elif args.latents in ("per-block", "per-position"):
            options["latents"] = args.latents
        else:
            raise ValueError(f"--latents must be per-block, per-position or GxG (e.g. 4x4), got {args.latents!r}")
    return options


def parse_options(items):
    """``["tau=0.01", "widths=[8,16]"]`` → ``{"tau": 0.01, "widths": [8, 16]}`` (JSON values, else strings)."""
    import argparse

    options = {}
    for item in items:
        try:
            key, value = key_value(item)
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"--option {exc}") from None
        options[key] = value
    return options


def parse_perforation(items):
    """``["stem=grid:0.5", "conv1=uniform:0.3:zero"]`` → ``{"stem": ("grid", 0.5), ...}``."""
    perforation = {}
    for item in items:
        name, sep, spec = item.partition("=")
        parts = spec.split(":")
        if not sep or len(parts) not in (2, 3):
            raise ValueError(f"--perforate must look like LAYER=MASK:RATE[:FILL], got {item!r}")
        try:
            rate = float(parts[1])
        except ValueError:
            raise ValueError(f"--perforate rate must be a number, got {parts[1]!r} in {item!r}") from None
        perforation[name] = (parts[0], rate, *parts[2:])
    return perforation


def make_schedule(name, lr, total_steps):
    from ..optim import ConstantSchedule, CosineSchedule, StepSchedule

    if name == "cosine":  # a short linear warm-up keeps a large first learning rate from blowing up
        return CosineSchedule(lr, total_steps, warmup=min(100, total_steps // 10))
    if name == "step":
        return StepSchedule(lr, [int(total_steps * 0.5), int(total_steps * 0.75)], 0.1)
    return ConstantSchedule(lr)


def data_arguments(args):
    """The data arguments as stored in the checkpoint (so ``ponder evaluate`` rebuilds the same data)."""
    return {"name": args.data, "seed": args.seed, "scale": args.scale, "canvas": args.canvas,
            "n_train": args.n_train, "n_val": args.n_val, "n_test": args.n_test, "digit_scale": args.digit_scale,
            "n_clutter": args.clutter, "cifar_dir": None if args.cifar_dir is None else str(args.cifar_dir)}


# ---------------------------------------------------------------------------------------------
# --task image, step by step
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainingRun:
    """What :func:`run` builds before training: the data, the model and how to optimise it."""

    splits: dict
    info: dict
    model: object
    options: dict
    optimizer: object
    schedule: object
    augment: object


def check_task_arguments(args):
    """``--task image`` needs ``--model`` and ``--data`` and takes no ``--objective``."""
    if args.model is None or args.data is None or args.objective is not None:
        raise UsageError("--task image needs --model and --data (and takes no --objective), "
                         f"got --model {args.model}, --data {args.data}, --objective {args.objective}")


def model_options(args):
    """The model options of ``--option`` and the shorthand flags, and the ``--perforate`` layers."""
    try:
        options = parse_options(args.option)
        if args.tau is not None:
            options["tau"] = args.tau
        options.update(pact_options(args))
        return options, parse_perforation(args.perforate)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def build_run(args):
    """Load the data set, build the model, the optimiser, the schedule and the augmentation."""
    from ..datasets import Augment, load_dataset
    from ..models import build_model
    from ..optim import SGD, Adam

    options, perforation = model_options(args)
    data_kwargs = {k: v for k, v in data_arguments(args).items() if k != "name"}
    splits, info = load_dataset(args.data, **data_kwargs)
    try:
        model = build_model(args.model, info["num_classes"], info["in_channels"], np.random.default_rng(args.seed),
                            backend=args.backend, perforation=perforation or None, dtype=args.dtype, **options)
    except (ValueError, TypeError) as exc:
        given = ", ".join(f"{k}={v!r}" for k, v in options.items())
        raise UsageError(f"--model {args.model}" + (f" with {given}" if given else "") + f": {exc}") from None
    lr = DEFAULT_LR[args.optimizer] if args.lr is None else args.lr
    params = list(model.named_parameters())
    if args.optimizer == "sgd":
        optimizer = SGD(params, lr, momentum=args.momentum, weight_decay=args.weight_decay)
    else:
        optimizer = Adam(params, lr, weight_decay=args.weight_decay)
    steps = args.epochs * -(-len(splits["train"]) // args.batch_size)
    augment = Augment(args.crop_padding, args.flip) if (args.crop_padding or args.flip) else None
    return TrainingRun(splits, info, model, options, optimizer, make_schedule(args.schedule, lr, steps), augment)


def train_and_save(args, run_, out):
    """Train for ``--epochs``, rewriting ``out/checkpoint.npz`` after every epoch; returns (history, seconds)."""
    from ..checkpoint import save_checkpoint
    from ..training import fit

    build = {"num_classes": run_.info["num_classes"], "in_channels": run_.info["in_channels"], "dtype": args.dtype,
             "options": run_.options}
    arguments = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")}

    def save(record):
        save_checkpoint(out / "checkpoint.npz", run_.model, args.model, build, run_.optimizer,
                        extra={"data": data_arguments(args), "arguments": arguments, "epoch": record.epoch})

    start = time.perf_counter()
    history = fit(run_.model, run_.optimizer, run_.splits["train"], run_.splits["val"], epochs=args.epochs,
                  batch_size=args.batch_size, rng=np.random.default_rng(args.seed + 1), schedule=run_.schedule,
                  augment=run_.augment, progress=not args.quiet, on_epoch_end=save)
    return history, time.perf_counter() - start


def write_summary(args, run_, history, train_seconds, out):
    """Evaluate on the test split; write ``history.json`` and ``curves.png``; returns the test results."""
    from ..training import evaluate, plot_history

    test = evaluate(run_.model, run_.splits["test"], batch_size=max(args.batch_size, 128), progress=not args.quiet)
    test.pop("predictions")
    arguments = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")}
    summary = {"model": args.model, "data": data_arguments(args), "arguments": arguments,
               "train_seconds": train_seconds, "test": test, **history.to_dict()}
    with open(out / "history.json", "w") as f:
        json.dump(summary, f, indent=2)
    plot_history(history, out / "curves.png")
    return test


def run(args):
    if args.task == "parity":
        return run_parity_task(args)
    check_task_arguments(args)
    run_ = build_run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.quiet:
        hw = run_.info["image_hw"]
        print(f"ponder train: {args.model} ({run_.model.num_parameters():,} parameters) on {args.data} "
              f"{hw[0]}x{hw[1]}, {len(run_.splits['train'])} training images, {args.epochs} epochs, "
              f"backend {model_backend_name(run_.model)}")
    history, train_seconds = train_and_save(args, run_, out)
    test = write_summary(args, run_, history, train_seconds, out)
    print(f"stopped after {args.epochs} epochs (--epochs); test accuracy {test['accuracy']:.4f}, "
          f"loss {test['loss']:.4f}, {test['flops_per_image'] / 1e6:.2f} MFLOPs/image; trained "
          f"{train_seconds:.1f}s; wrote {out}/ (checkpoint.npz, history.json, curves.png)")
    return 0


# ---------------------------------------------------------------------------------------------
# --task parity
# ---------------------------------------------------------------------------------------------


def parity_settings(objective, options, batch_size, lr, tau, seed):
    """The :class:`~refimpl.commands.parity_experiment.ParitySettings` of ``--task parity``.

    ``options`` (the ``--option`` values) set any other field; ``lr`` and ``tau`` of ``None``
    keep the experiment's defaults.

    Raises
    ------
    UsageError
        an option that is not a setting of the experiment, or a value of the wrong type.
    """
    import numbers

    from .parity_experiment import ParitySettings

    shared = {"objective", "batch_size", "lr", "tau", "seed"}
    types = {k: v for k, v in ParitySettings.field_types().items() if k not in shared}
    values = {"objective": objective, "batch_size": batch_size, "seed": seed}
    if lr is not None:
        values["lr"] = lr
    if tau is not None:
        values["tau"] = tau
    for key, value in options.items():
        kind = types.get(key)
        if kind is None:
            raise UsageError(f"--option {key} does not apply to --task parity; it takes {', '.join(types)}")
        numeric = numbers.Integral if kind is int else numbers.Real
        if not isinstance(value, numeric) or isinstance(value, bool):
            raise UsageError(f"--option {key} must be {'an int' if kind is int else 'a number'} for --task parity, "
                             f"got {value!r}")
        values[key] = kind(value)
    return ParitySettings(**values)


def run_parity_task(args):
    """``--task parity``: the parity experiment of ``ponder parity`` with this command's shared arguments."""
    from .parity_experiment import run_parity_experiment

    if args.objective is None or args.model is not None or args.data is not None:
        raise UsageError("--task parity needs --objective (act, pact or pondernet) and takes no --model or --data, "
                         f"got --objective {args.objective}, --model {args.model}, --data {args.data}")
    try:
        options = parse_options(args.option)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    settings = parity_settings(args.objective, options, args.batch_size, args.lr, args.tau, args.seed)
    run_parity_experiment(settings, out=Path(args.out) / "parity.json")
    return 0


def model_backend_name(model):
    from ..conv_layer import Conv2d

    names = {layer.backend.name for layer in model.layers() if isinstance(layer, Conv2d)}
    return ", ".join(sorted(names)) or "none"
