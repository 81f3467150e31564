"""``ponder map``: the computation-time map of an ACT/SACT/PACT network on one image, drawn over it.

The map is Σ_blocks ρ(x, y) — how many residual units (plus remainders) each position ran —
upsampled (nearest) to the image size. Without ``--checkpoint`` the command uses the shipped SACT
model (:data:`DEFAULT_MODEL`, see :mod:`refimpl.pretrained`), so it works right after installing.
Examples::

    ponder map --image coffee --size 64 --out map.png        # the shipped sact-resnet14-digits32
    ponder train --model sact-resnet14 --tau 0.01 --data cluttered-digits --canvas 48 --out runs/sact
    ponder map --checkpoint runs/sact/checkpoint.npz --image astronaut --size 96 --out map.png

``--image`` is a file (PNG, JPEG…) or the name of a scikit-image sample photo. The model runs on
the backend it was trained with when that backend runs here (else the fastest usable one).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .arguments import UsageError, add_backend_argument, positive_int, required_group, resolve_backend

#: The shipped model drawn when no ``--checkpoint`` is given (a name of :func:`refimpl.pretrained.list_pretrained`).
DEFAULT_MODEL = "sact-resnet14-digits32"


def add_arguments(parser):
    from ..datasets import PHOTOS

    required = required_group(parser)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="an ACT/SACT/PACT checkpoint (.npz) written by ponder train (default: the shipped "
                             f"{DEFAULT_MODEL}, trained on 32x32 cluttered digits)")
    required.add_argument("--image", required=True,
                          help=f"an image file, or a scikit-image photo name ({', '.join(PHOTOS)})")
    parser.add_argument("--out", type=Path, default=Path("map.png"), help="output PNG")
    parser.add_argument("--size", type=positive_int, nargs="+", default=None, metavar="PIXELS",
                        help="resize the image to SIZE (square) or H W before running the model (default: as is)")
    add_backend_argument(parser, default=None,
                         help_text="convolution backend (default: the one the model was trained with, if usable)")


def run(args):
    from ..datasets import load_image

    if args.size is not None and len(args.size) > 2:
        raise UsageError(f"--size takes one or two integers (SIZE or H W), got {len(args.size)}")
    if args.checkpoint is None:
        from ..pretrained import pretrained_file

        with pretrained_file(DEFAULT_MODEL) as path:
            model, meta, backend = _load(path, args.backend)
        print(f"no --checkpoint: using the shipped model {DEFAULT_MODEL}")
    else:
        model, meta, backend = _load(args.checkpoint, args.backend)
    if not hasattr(model, "ponder_map"):
        raise UsageError(f"--checkpoint {str(args.checkpoint)!r} holds a {meta.get('model')!r} model, which has no "
                         "computation-time map; expected an act-resnetN, sact-resnetN or pact-resnetN checkpoint")
    in_channels = int(meta["build"]["in_channels"])
    size = None if args.size is None else tuple(args.size * 2)[:2]  # SIZE -> (SIZE, SIZE)
    try:
        image = load_image(args.image, in_channels, size)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(f"--image: {exc}") from None
    dtype = model.stem.params["w"].dtype
    logits = model(image.astype(dtype))
    cmap = model.ponder_map(image.shape[2:])[0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    title = (f"{meta.get('model')}: class {int(np.argmax(logits[0]))}, "
             f"ponder cost {model.ponder_cost:.2f}, {model.flops_per_sample[0] / 1e6:.1f} MFLOPs")
    from .drawing import draw_map

    draw_map(image[0], cmap, out, title)
    print(f"{title} (backend {backend})\nmap range {cmap.min():.2f} .. {cmap.max():.2f} residual units; wrote {out}")
    return 0


def _load(path, backend_name):
    """``(model, metadata, backend)`` of the checkpoint at ``path``, on ``backend_name`` (None: the one it was
    trained with, if usable here)."""
    from ..checkpoint import load_checkpoint, read_checkpoint

    meta, _ = read_checkpoint(path)
    backend, note = resolve_backend(backend_name, meta, "map")
    if note:
        print(note)
    model, meta = load_checkpoint(path, backend=backend)
    return model, meta, backend
