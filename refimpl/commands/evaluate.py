"""``ponder evaluate``: load a checkpoint written by ``ponder train`` and evaluate it.

Example::

    ponder evaluate --checkpoint runs/x/checkpoint.npz

By default the data set is rebuilt exactly as it was for training (its arguments are stored in the
checkpoint) and the test split is evaluated; ``--split`` picks another. The model runs on the
backend it was trained with when that backend runs here (else the fastest usable one, said in one
line); ``--backend`` overrides. Prints loss, accuracy, FLOPs per image and images per second;
``--json`` also writes them to a file.
"""

from __future__ import annotations

import json
from pathlib import Path

from .arguments import UsageError, add_backend_argument, positive_int, required_group, resolve_backend


def add_arguments(parser):
    required_group(parser).add_argument("--checkpoint", required=True, type=Path,
                                        help="checkpoint.npz written by ponder train")
    parser.add_argument("--split", choices=("train", "val", "test"), default="test", help="which split to evaluate")
    add_backend_argument(parser, default=None,
                         help_text="convolution backend (default: the one the model was trained with, if usable)")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="images per forward pass")
    parser.add_argument("--cifar-dir", type=Path, default=None,
                        help="cifar10 checkpoints: where the binary batches are now (default: as at training)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--mode", choices=("relaxed", "discrete", "thresholded"), default=None,
                        help="PACT models: evaluate in this mode (default: the mode stored in the checkpoint)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args):
    from ..checkpoint import load_run, read_checkpoint
    from ..training import evaluate

    meta, _ = read_checkpoint(args.checkpoint)
    backend, note = resolve_backend(args.backend, meta, "evaluate")
    if note:
        print(note)
    model, meta, splits = load_run(args.checkpoint, backend=backend, cifar_dir=args.cifar_dir)
    if args.mode is not None:
        if not hasattr(model, "set_mode"):
            raise UsageError(f"--mode applies to PACT models only, the checkpoint holds {meta.get('model')!r}")
        model.set_mode(args.mode)
    result = evaluate(model, splits[args.split], batch_size=args.batch_size, progress=not args.quiet)
    result.pop("predictions")
    result.update(model=meta.get("model"), split=args.split, checkpoint=str(args.checkpoint), backend=backend,
                  mode=args.mode)
    mode = f" in {args.mode} mode" if args.mode else ""
    print(f"{meta.get('model')}{mode} on the {args.split} split ({len(splits[args.split])} images, backend {backend}): "
          f"accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f}, "
          f"{result['flops_per_image'] / 1e6:.2f} MFLOPs/image, {result['images_per_second']:.0f} images/s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0
