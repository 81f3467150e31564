"""``ponder map``: the computation-time map of an ACT/SACT checkpoint on one image, drawn over it.

The map is Σ_blocks ρ(x, y) — how many residual units (plus remainders) each position ran —
upsampled (nearest) to the image size (SPEC §3). Example::

    ponder train --model sact-resnet14 --tau 0.01 --data cluttered-digits --canvas 48 --out runs/sact
    ponder map --checkpoint runs/sact/checkpoint.npz --image astronaut --size 96 --out map.png

``--image`` is a file (PNG, JPEG…) or the name of a scikit-image sample photo.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def add_arguments(parser):
    parser.add_argument("--checkpoint", required=True, help="an ACT/SACT checkpoint (.npz) written by ponder train")
    parser.add_argument("--image", required=True,
                        help="an image file, or a scikit-image photo name (astronaut, camera, coffee, chelsea, rocket, cat)")
    parser.add_argument("--out", default="map.png", help="output PNG (default: map.png)")
    parser.add_argument("--size", type=int, nargs="+", default=None, metavar="PIXELS",
                        help="resize the image to SIZE (square) or H W before running the model")
    parser.add_argument("--backend", default=None, help="conv backend: numpy (default), cython, opencl")


def load_image(spec, channels, size=None):
    """The image named by ``spec`` (a path or a sample-photo name) as float32 (1, channels, H, W) in [0, 1]."""
    from skimage import color, io, transform

    from ..datasets import PHOTOS, load_photo

    if os.path.exists(spec):
        image = io.imread(spec)
        image = image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
        if image.ndim == 3 and image.shape[2] == 4:
            image = image[..., :3]
        image = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
    elif spec in PHOTOS:
        image = load_photo(spec)
    else:
        raise ValueError(f"--image must be an existing file or one of {list(PHOTOS)}, got {spec!r}")
    if channels == 1 and image.shape[0] == 3:
        image = color.rgb2gray(image.transpose(1, 2, 0))[None]
    elif channels == 3 and image.shape[0] == 1:
        image = np.repeat(image, 3, axis=0)
    elif image.shape[0] != channels:
        raise ValueError(f"the model takes {channels} channels, the image has {image.shape[0]}")
    if size is not None:
        if len(size) not in (1, 2) or min(size) < 1:
            raise ValueError(f"--size must be one or two positive ints, got {size}")
        hw = (size[0], size[0]) if len(size) == 1 else tuple(size)
        image = transform.resize(image, (image.shape[0], *hw), anti_aliasing=True)
    return np.ascontiguousarray(image[None], dtype=np.float32)


def draw_map(image, cmap, path, title=""):
    """Save the image and the computation-time map drawn over it, side by side, to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4), constrained_layout=True)
    axes[0].imshow(shown, cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("input")
    axes[1].imshow(shown, cmap="gray", vmin=0, vmax=1)
    overlay = axes[1].imshow(cmap, cmap="inferno", alpha=0.6)
    axes[1].set_title("computation time Σ ρ")
    fig.colorbar(overlay, ax=axes[1], fraction=0.046)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args):
    from ..checkpoint import load_checkpoint

    model, meta = load_checkpoint(args.checkpoint, backend=args.backend)
    if not hasattr(model, "ponder_map"):
        raise SystemExit(f"ponder map: model {meta.get('model')!r} has no computation-time map "
                         f"(use an act-resnetN or sact-resnetN checkpoint)")
    in_channels = int(meta["build"]["in_channels"])
    try:
        image = load_image(args.image, in_channels, args.size)
    except (ValueError, OSError) as exc:
        raise SystemExit(f"ponder map: {exc}") from None
    dtype = model.stem.params["w"].dtype
    logits = model(image.astype(dtype))
    cmap = model.ponder_map(image.shape[2:])[0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    title = (f"{meta.get('model')}: class {int(np.argmax(logits[0]))}, "
             f"ponder cost {model.ponder_cost:.2f}, {model.flops_per_sample[0] / 1e6:.1f} MFLOPs")
    draw_map(image[0], cmap, out, title)
    print(f"{title}\nmap range {cmap.min():.2f} .. {cmap.max():.2f}; wrote {out}")
    return 0


def sact_demo_section(ctx):
    """``ponder demo`` section: a tiny SACT network trained on the spot and its map over the photo.

    A SACT-ResNet-14 (widths 4, 8, 8) trains for one step on cluttered digits (τ = 0). Such a short
    run does not learn to halt by itself, so its halting biases start at +4.6
    (σ(4.6) ≈ 0.99 = 1 − ε): about half of the positions halt after the first unit of a block, where
    the local 3×3 term says so. The check: sparse execution equals the dense masked execution.
    """
    from ..datasets import load_cluttered_digits
    from ..models import build_model
    from ..optim import Adam
    from ..training import fit
    from .demo import SectionResult

    data = load_cluttered_digits(canvas=32, n_train=32, n_val=0, n_test=8, seed=0)
    model = build_model("sact-resnet14", 10, 1, ctx.rng, backend=ctx.backend, widths=(4, 8, 8), tau=0.0,
                        halting_bias=4.6)
    fit(model, Adam(list(model.named_parameters()), lr=1e-3), data["train"], epochs=1, batch_size=32, rng=ctx.rng,
        progress=False)
    model.eval()
    gray = ctx.x.mean(axis=1, keepdims=True).astype(np.float32)
    sparse = model(gray)
    sparse_flops, cmap = float(model.flops_per_sample[0]), model.ponder_map(gray.shape[2:])[0]
    blocks = [(float(b.rho.mean()), float(b.active_masks[1].mean())) for b in model.stages]
    model.set_execution("dense")
    dense = model(gray)
    dense_flops = float(model.flops_per_sample[0])
    error = float(np.abs(sparse - dense).max())
    result = SectionResult(
        f"SACT: a SACT-ResNet-14 trained on the spot (one step) on cluttered digits, run on the {gray.shape[2]}px photo (gray)",
        ["block", "-", "mean rho", "active after unit 1", "MFLOPs sparse", "MFLOPs dense", "max|err| vs dense"],
        [[f"stage {i + 1}", "", rho, active, "", "", ""] for i, (rho, active) in enumerate(blocks)]
        + [["network", "", "", "", sparse_flops / 1e6, dense_flops / 1e6, error]])
    if not error <= ctx.tolerance * max(1.0, float(np.abs(dense).max())):
        result.failures.append(f"SACT sparse vs dense masked execution: max error {error:.3g}")
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    path = ctx.out_dir / "sact_map.png"
    draw_map(ctx.x[0], cmap, path, f"SACT computation time: {sparse_flops / 1e6:.1f} of {dense_flops / 1e6:.1f} MFLOPs")
    result.files.append(path)
    return result
