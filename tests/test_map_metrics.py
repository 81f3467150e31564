"""Map metrics (refimpl.map_metrics): AUC against scikit-learn, NSS and CC on known maps, the centre baseline."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from refimpl.map_metrics import auc, cc, centre_gaussian, map_scores, nss


def test_auc_equals_scikit_learn_with_ties():
    rng = np.random.default_rng(0)
    score = rng.integers(0, 4, size=(12, 12)).astype(float)  # many ties
    mask = rng.random((12, 12)) < 0.3
    assert auc(score, mask) == pytest.approx(roc_auc_score(mask.ravel(), score.ravel()), abs=1e-12)


def test_auc_nss_cc_of_perfect_inverted_and_flat_maps():
    mask = np.zeros((6, 6), dtype=bool)
    mask[2:4, 1:5] = True
    assert auc(mask.astype(float), mask) == 1.0 and auc(-mask.astype(float), mask) == 0.0
    assert auc(np.ones((6, 6)), mask) == 0.5
    assert nss(np.ones((6, 6)), mask) == 0.0 and cc(np.ones((6, 6)), mask) == 0.0
    assert cc(mask.astype(float), mask) == pytest.approx(1.0)
    assert nss(mask.astype(float), mask) > 0 > nss(-mask.astype(float), mask)


def test_auc_needs_object_and_background():
    with pytest.raises(ValueError, match="both object and background"):
        auc(np.ones((3, 3)), np.ones((3, 3), dtype=bool))


def test_centre_gaussian_peaks_at_the_centre_and_scores_a_centred_object():
    g = centre_gaussian((9, 9))
    assert np.unravel_index(np.argmax(g), g.shape) == (4, 4) and g[4, 4] == 1.0
    masks = np.zeros((2, 9, 9), dtype=bool)
    masks[:, 3:6, 3:6] = True
    scores = map_scores(np.broadcast_to(g, masks.shape), masks)
    assert scores["auc"]["mean"] == 1.0 and scores["auc"]["sem"] == 0.0
