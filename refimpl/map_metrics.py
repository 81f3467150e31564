r"""Scoring a computation-time map against where the object is: AUC, NSS and CC, and the centre baseline.

A computation-time map (Σ over blocks of the ponder cost ρ(x, y), see
:meth:`refimpl.adaptive_resnet.AdaptiveResNet.ponder_map`) says where a network spent its units. On
cluttered digits (:func:`refimpl.datasets.load_cluttered_digits`) the ground truth is the digit's
object mask, and the map is scored with the eye-fixation metrics of saliency research, the digit's
pixels playing the fixations:

* **AUC** — area under the ROC curve of the map as a detector of object pixels: the probability
  that a random object pixel scores above a random background pixel (0.5 for a flat or random map);
* **NSS** — normalised scanpath saliency, the mean of the z-scored map over the object pixels;
* **CC** — Pearson's correlation between the map and the mask.

A map earns its keep only if it beats the *centre bias*: objects tend to lie near the image centre,
so an isotropic Gaussian at the centre (:func:`centre_gaussian`) already scores well above chance.
"""

from __future__ import annotations

import numpy as np

__all__ = ["auc", "nss", "cc", "centre_gaussian", "map_scores", "computation_time_maps"]


def auc(score, mask):
    """Area under the ROC curve of ``score`` as a detector of ``mask`` pixels (ties count half)."""
    from scipy.stats import rankdata

    score, mask = np.asarray(score, dtype=np.float64).ravel(), np.asarray(mask, dtype=bool).ravel()
    positives, negatives = int(mask.sum()), int((~mask).sum())
    if positives == 0 or negatives == 0:
        raise ValueError("the mask must contain both object and background pixels")
    ranks = rankdata(score)  # average ranks: ties count half
    return float((ranks[mask].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def nss(score, mask):
    """Normalised scanpath saliency: mean of the z-scored map over the object pixels (0 for a flat map)."""
    score = np.asarray(score, dtype=np.float64)
    std = score.std()
    if std == 0:
        return 0.0
    return float(((score - score.mean()) / std)[np.asarray(mask, dtype=bool)].mean())


def cc(score, mask):
    """Pearson correlation between the map and the mask (0 for a flat map)."""
    score, target = np.asarray(score, dtype=np.float64).ravel(), np.asarray(mask, dtype=np.float64).ravel()
    if score.std() == 0 or target.std() == 0:
        return 0.0
    return float(np.corrcoef(score, target)[0, 1])


def centre_gaussian(hw, sigma_fraction=0.25):
    """The centre-bias baseline map: an isotropic Gaussian at the image centre, σ = fraction × side."""
    h, w = hw
    y, x = np.mgrid[0:h, 0:w]
    sigma = sigma_fraction * max(h, w)
    return np.exp(-(((y - (h - 1) / 2) ** 2 + (x - (w - 1) / 2) ** 2) / (2 * sigma ** 2)))


def map_scores(maps, masks):
    """Mean and standard error of AUC, NSS and CC of ``maps`` (N, H, W) against ``masks`` (N, H, W)."""
    rows = np.array([[auc(m, k), nss(m, k), cc(m, k)] for m, k in zip(maps, masks)])
    mean, sem = rows.mean(axis=0), rows.std(axis=0) / np.sqrt(len(rows))
    return {name: {"mean": float(mean[i]), "sem": float(sem[i])} for i, name in enumerate(("auc", "nss", "cc"))}


def computation_time_maps(model, images, batch_size=64):
    """Σ_blocks ρ upsampled to the image, for every image (evaluation mode)."""
    model.eval()
    maps = []
    dtype = model.stem.params["w"].dtype
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].astype(dtype)
        model(x)
        maps.append(model.ponder_map(x.shape[2:]))
    return np.concatenate(maps)
