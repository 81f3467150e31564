"""``ponder train``: train a registered model on an offline data set and write the run folder.

Example::

    ponder train --model resnet14 --data cluttered-digits --canvas 48 --epochs 5 --backend cython --out runs/x

The run folder gets ``checkpoint.npz`` (the weights after the latest epoch, rewritten after every
epoch), ``history.json`` (per-epoch records, the
arguments, the final test evaluation) and ``curves.png`` (loss and accuracy). Any model of
:mod:`refimpl.models` can be trained, including those other modules register (ACT/SACT/PACT
ResNets); model-specific options go through ``--option key=value`` (JSON values, e.g.
``--option tau=0.01 --option widths=[8,16,32]``).

``--task parity --objective act|pact|pondernet`` trains an ACT RNN on the parity task instead,
with the trainer of ``ponder parity`` (see :mod:`refimpl.commands.parity`; no ``--model`` or
``--data``; its settings through ``--option``, results in ``OUT/parity.json``)::

    ponder train --task parity --objective pondernet --option size=8 --option steps=3000 --out runs/parity
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3}


def add_arguments(parser):
    from ..act_rnn import OBJECTIVES
    from ..datasets import DATASETS
    from ..masks import MASK_TYPES
    from ..models import model_names

    parser.add_argument("--task", choices=("image", "parity"), default="image",
                        help="image (default): --model on --data; parity: an ACT RNN on parity (needs --objective)")
    parser.add_argument("--model", help=f"registered model (--task image): {', '.join(model_names())}")
    parser.add_argument("--data", choices=DATASETS, help="data set (--task image)")
    parser.add_argument("--objective", choices=OBJECTIVES, help="--task parity: act, pact or pondernet")
    parser.add_argument("--out", required=True, type=Path, help="run folder to write (created)")
    data = parser.add_argument_group("data")
    data.add_argument("--canvas", type=int, default=48, help="cluttered digits: canvas side (default 48)")
    data.add_argument("--digit-scale", type=int, default=2, help="cluttered digits: digit upscaling (default 2: 16x16)")
    data.add_argument("--clutter", type=int, default=None, help="cluttered digits: fragments per image (default canvas // 8)")
    data.add_argument("--scale", type=int, default=1, help="digits: upscaling of the 8x8 images (default 1)")
    data.add_argument("--n-train", type=int, default=5000, help="cluttered digits: training images (default 5000)")
    data.add_argument("--n-val", type=int, default=None,
                      help="validation images (default 500 for cluttered digits, 5000 for cifar10)")
    data.add_argument("--n-test", type=int, default=1000, help="cluttered digits: test images (default 1000)")
    data.add_argument("--cifar-dir", type=Path, default=None, help="cifar10: folder with the binary batches")
    data.add_argument("--crop-padding", type=int, default=0, help="augmentation: random crop with this zero padding")
    data.add_argument("--flip", action="store_true", help="augmentation: random horizontal flips (not for digits)")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=5)
    opt.add_argument("--batch-size", type=int, default=64)
    opt.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    opt.add_argument("--lr", type=float, default=None, help="base learning rate (default 0.1 for sgd, 1e-3 for adam)")
    opt.add_argument("--momentum", type=float, default=0.9)
    opt.add_argument("--weight-decay", type=float, default=5e-4)
    opt.add_argument("--schedule", choices=("cosine", "step", "constant"), default="cosine")
    opt.add_argument("--seed", type=int, default=0, help="seed of data, weights, masks and shuffling")
    model = parser.add_argument_group("model")
    model.add_argument("--backend", default="numpy", help="conv backend: numpy (default), cython, opencl")
    model.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    model.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="model option, JSON value (repeatable), e.g. tau=0.01 or widths=[8,16,32]")
    model.add_argument("--tau", type=float, default=None,
                       help="ACT/SACT models: ponder-cost weight, same as --option tau=VALUE")
    model.add_argument("--mode", choices=("relaxed", "discrete", "thresholded"), default=None,
                       help="PACT models: training mode, same as --option mode=VALUE")
    model.add_argument("--temperature", type=float, default=None,
                       help="PACT models, relaxed mode: temperature λ, same as --option temperature=VALUE")
    model.add_argument("--latents", default=None, metavar="per-block|per-position|GxG",
                       help="PACT models: one latent per block, per position, or per GxG group (e.g. 4x4)")
    model.add_argument("--perforate", action="append", default=[], metavar="LAYER=MASK:RATE[:FILL]",
                       help=f"perforate a convolution (repeatable), mask in {', '.join(MASK_TYPES[:3])}, "
                            "e.g. stem=grid:0.5")
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
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option must look like KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
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


def run(args):
    from ..backend import BackendUnavailableError
    from ..checkpoint import save_checkpoint
    from ..datasets import Augment, load_dataset
    from ..models import build_model
    from ..optim import SGD, Adam
    from ..training import evaluate, fit, plot_history

    if args.task == "parity":
        return run_parity_task(args)
    if args.model is None or args.data is None or args.objective is not None:
        raise SystemExit("ponder train: --task image needs --model and --data (and takes no --objective), "
                         f"got --model {args.model}, --data {args.data}, --objective {args.objective}")
    if args.epochs < 0 or args.batch_size < 1:
        raise SystemExit(f"ponder train: --epochs must be >= 0 and --batch-size >= 1, got {args.epochs} and {args.batch_size}")
    try:
        options = parse_options(args.option)
        if args.tau is not None:
            options["tau"] = args.tau
        options.update(pact_options(args))
        perforation = parse_perforation(args.perforate)
    except ValueError as exc:
        raise SystemExit(f"ponder train: {exc}") from None
    data_args = data_arguments(args)
    data_kwargs = {k: v for k, v in data_args.items() if k != "name"}
    try:
        splits, info = load_dataset(args.data, **data_kwargs)
        model = build_model(args.model, info["num_classes"], info["in_channels"], np.random.default_rng(args.seed),
                            backend=args.backend, perforation=perforation or None, dtype=args.dtype, **options)
    except (FileNotFoundError, ValueError, TypeError, BackendUnavailableError) as exc:
        raise SystemExit(f"ponder train: {exc}") from None
    lr = DEFAULT_LR[args.optimizer] if args.lr is None else args.lr
    params = list(model.named_parameters())
    if args.optimizer == "sgd":
        optimizer = SGD(params, lr, momentum=args.momentum, weight_decay=args.weight_decay)
    else:
        optimizer = Adam(params, lr, weight_decay=args.weight_decay)
    steps = max(1, args.epochs * -(-len(splits["train"]) // args.batch_size))
    augment = Augment(args.crop_padding, args.flip) if (args.crop_padding or args.flip) else None
    build = {"num_classes": info["num_classes"], "in_channels": info["in_channels"], "dtype": args.dtype,
             "options": options}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint.npz"
    arguments = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")}

    def save(record=None):
        save_checkpoint(checkpoint, model, args.model, build, optimizer,
                        extra={"data": data_args, "arguments": arguments, "epoch": None if record is None else record.epoch})

    if not args.quiet:
        print(f"ponder train: {args.model} ({model.num_parameters():,} parameters) on {args.data} "
              f"{info['image_hw'][0]}x{info['image_hw'][1]}, {len(splits['train'])} training images, "
              f"backend {model_backend_name(model)}")
    start = time.perf_counter()
    history = fit(model, optimizer, splits["train"], splits["val"], epochs=args.epochs, batch_size=args.batch_size,
                  rng=np.random.default_rng(args.seed + 1), schedule=make_schedule(args.schedule, lr, steps),
                  augment=augment, progress=not args.quiet, on_epoch_end=save)
    train_seconds = time.perf_counter() - start
    if args.epochs == 0:
        save()
    test = evaluate(model, splits["test"], batch_size=max(args.batch_size, 128))
    test.pop("predictions")
    summary = {"model": args.model, "data": data_args, "arguments": arguments, "train_seconds": train_seconds,
               "test": test, **history.to_dict()}
    with open(out / "history.json", "w") as f:
        json.dump(summary, f, indent=2)
    if len(history):
        plot_history(history, out / "curves.png")
    print(f"test accuracy {test['accuracy']:.4f}, loss {test['loss']:.4f}, "
          f"{test['flops_per_image'] / 1e6:.2f} MFLOPs/image; trained {train_seconds:.1f}s; wrote {out}/")
    return 0


def run_parity_task(args):
    """``--task parity``: the ``ponder parity`` trainer with this command's shared arguments."""
    from . import parity

    if args.objective is None or args.model is not None or args.data is not None:
        raise SystemExit("ponder train: --task parity needs --objective (act, pact or pondernet) and takes no "
                         f"--model or --data, got --objective {args.objective}, --model {args.model}, --data {args.data}")
    try:
        parity_args = parity.train_task_arguments(args.objective, parse_options(args.option), args.batch_size,
                                                  args.lr, args.tau, args.seed, args.out)
    except ValueError as exc:
        raise SystemExit(f"ponder train: {exc}") from None
    return parity.run(parity_args)


def model_backend_name(model):
    from ..conv_layer import Conv2d

    names = {layer.backend.name for layer in model.layers() if isinstance(layer, Conv2d)}
    return ", ".join(sorted(names)) or "none"
