"""``ponder evaluate``: load a checkpoint written by ``ponder train`` and evaluate it.

Example::

    ponder evaluate --checkpoint runs/x/checkpoint.npz --backend cython

By default the data set is rebuilt exactly as it was for training (its arguments are stored in the
checkpoint) and the test split is evaluated; ``--split`` picks another. Prints loss, accuracy,
FLOPs per image and images per second; ``--json`` also writes them to a file.
"""

from __future__ import annotations

import json
from pathlib import Path


def add_arguments(parser):
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint.npz written by ponder train")
    parser.add_argument("--split", choices=("train", "val", "test"), default="test")
    parser.add_argument("--backend", default="numpy", help="conv backend: numpy (default), cython, opencl")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--cifar-dir", type=Path, default=None, help="cifar10 checkpoints: where the binary batches are now")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--mode", choices=("relaxed", "discrete", "thresholded"), default=None,
                        help="PACT models: evaluate in this mode (default: the mode stored in the checkpoint)")


def run(args):
    from ..backend import BackendUnavailableError
    from ..checkpoint import CheckpointError, load_run
    from ..training import evaluate

    try:
        model, meta, splits = load_run(args.checkpoint, backend=args.backend, cifar_dir=args.cifar_dir)
        if args.mode is not None:
            if not hasattr(model, "set_mode"):
                raise ValueError(f"--mode applies to PACT models only, got {meta.get('model')!r}")
            model.set_mode(args.mode)
    except (CheckpointError, FileNotFoundError, ValueError, BackendUnavailableError) as exc:
        raise SystemExit(f"ponder evaluate: {exc}") from None
    result = evaluate(model, splits[args.split], batch_size=args.batch_size)
    result.pop("predictions")
    result.update(model=meta.get("model"), split=args.split, checkpoint=str(args.checkpoint), backend=args.backend,
                  mode=args.mode)
    mode = f" in {args.mode} mode" if args.mode else ""
    print(f"{meta.get('model')}{mode} on the {args.split} split ({len(splits[args.split])} images, backend {args.backend}): "
          f"accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f}, "
          f"{result['flops_per_image'] / 1e6:.2f} MFLOPs/image, {result['images_per_second']:.0f} images/s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0
