"""Figures the commands share (not a command): the computation-time map drawn over its image."""

from __future__ import annotations

import numpy as np


def map_colour_range(cmap, min_span=1.0):
    """``(vmin, vmax)`` for a computation-time map: its range, widened to at least ``min_span`` units.

    A map that varies by a hundredth of a unit would otherwise fill the whole colour bar and look
    like a strong pattern; widening keeps one colour step meaning a visible amount of computation.
    """
    lo, hi = float(np.min(cmap)), float(np.max(cmap))
    if hi - lo < min_span:
        centre = (lo + hi) / 2
        lo, hi = centre - min_span / 2, centre + min_span / 2
    return lo, hi


def draw_map(image, cmap, path, title=""):
    """Save ``image`` (C, H, W) in [0, 1] and the computation-time map ``cmap`` (H, W) drawn over it.

    The two panels are side by side; the colour bar spans :func:`map_colour_range`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    vmin, vmax = map_colour_range(cmap)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4), constrained_layout=True)
    axes[0].imshow(shown, cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("input")
    axes[1].imshow(shown, cmap="gray", vmin=0, vmax=1)
    overlay = axes[1].imshow(cmap, cmap="inferno", alpha=0.6, vmin=vmin, vmax=vmax)
    axes[1].set_title("computation time Σ ρ (residual units)")
    fig.colorbar(overlay, ax=axes[1], fraction=0.046)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
