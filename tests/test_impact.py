"""Masks of a trained network (refimpl.impact): perforable layers, structure scores, impact."""

from __future__ import annotations

import numpy as np
import pytest

from refimpl.conv_layer import Conv2d
from refimpl.impact import find_perforable_layers, impact_maps, structure_mask_for, structure_scores, trace_layers
from refimpl.layers import AvgPool2d, Flatten, Linear, Sequential
from refimpl.losses import softmax_cross_entropy_forward
from refimpl.nin import NIN
from refimpl.resnet import resnet

F64 = np.float64


def tiny_nin(seed=0, dtype=F64):
    model = NIN(10, 1, np.random.default_rng(seed), widths=(4, 5, 6), dtype=dtype)
    for _, p, _ in model.named_parameters():  # non-trivial batch-norm and bias values
        if p.ndim == 1:
            p += 0.2 * np.random.default_rng(seed + 1).standard_normal(p.shape)
    return model.eval()


def images(n, hw, seed=0, dtype=F64):
    return np.random.default_rng(seed).random((n, 1, *hw)).astype(dtype)


def test_trace_lists_leaves_in_execution_order():
    names = [c.name for c in trace_layers(tiny_nin(), images(2, (8, 8)))]
    assert names == ["conv1", "bn1", "relu1", "cccp1", "relu1b", "pool1", "conv2", "bn2", "relu2", "cccp2",
                     "relu2b", "pool2", "conv3", "bn3", "relu3", "cccp3", "gap"]


def test_perforable_layers_of_nin_and_their_following_windows():
    infos = find_perforable_layers(tiny_nin(), images(2, (12, 16)))
    assert [(i.name, i.followers, i.out_hw, i.next_name) for i in infos] == [
        ("conv1", ("cccp1",), (12, 16), "pool1"), ("conv2", ("cccp2",), (6, 8), "pool2"),
        ("conv3", ("cccp3",), (3, 4), "gap")]
    assert infos[0].window == {"pool_size": (3, 3), "pool_stride": (2, 2), "pool_padding": (1, 1)}
    assert infos[2].window["pool_size"] == (3, 4)  # the global pooling: one window over the map


def test_resnet_convs_feeding_a_residual_downsampling_are_not_perforable():
    model = resnet(8, 10, 1, np.random.default_rng(0), dtype=F64).eval()
    infos = {i.name: i for i in find_perforable_layers(model, images(2, (8, 8)))}
    # the stem feeds unit 0 through its identity shortcut, bn and relu: the next spatial layer is a 3x3 conv
    assert infos["stem"].next_name == "stages.0.units.0.conv1"
    assert infos["stages.0.units.0.conv1"].window == {"pool_size": (3, 3), "pool_stride": (1, 1), "pool_padding": (1, 1)}
    # unit 0 of stage 0 ends before a downsampling unit whose option-A shortcut runs first: conservative no
    assert "stages.0.units.0.conv2" not in infos
    assert infos["stages.2.units.0.conv2"].next_name == "head.2"


def brute_force_window_counts(pool, hw):
    """Number of windows of ``pool`` reading each position: pool a one-hot image per position."""
    counts = np.zeros(hw, dtype=np.int64)
    for y in range(hw[0]):
        for x in range(hw[1]):
            one_hot = np.zeros((1, 1, *hw))
            one_hot[0, 0, y, x] = 1.0
            counts[y, x] = int(np.sum(pool(one_hot) == 1.0))
    return counts


@pytest.mark.parametrize("hw", [(8, 8), (9, 12), (13, 7)])
def test_structure_scores_equal_brute_force_window_counts_of_the_network_pooling(hw):
    model = tiny_nin()
    infos = find_perforable_layers(model, images(2, hw))
    conv1, conv2 = infos[0], infos[1]
    assert np.array_equal(structure_scores(conv1), brute_force_window_counts(model.pool1, conv1.out_hw))
    assert np.array_equal(structure_scores(conv2), brute_force_window_counts(model.pool2, conv2.out_hw))
    # overlapping 3x3/stride-2 windows: the scores really vary (1, 2 and 4 windows)
    assert set(np.unique(structure_scores(conv1))) >= {1, 2, 4}


def test_structure_mask_keeps_the_most_read_positions():
    info = find_perforable_layers(tiny_nin(), images(2, (12, 12)))[0]
    scores = structure_scores(info)
    mask = structure_mask_for(info, 0.25, np.random.default_rng(3))
    assert mask.sum() == 36
    assert scores[mask].min() >= scores[~mask].max()


def crafted_network(scale):
    """conv (1 -> 1 channel, 3x3) -> 2x2 average pooling -> linear: the loss is smooth in V."""
    rng = np.random.default_rng(7)
    conv = Conv2d(1, 1, 3, rng, padding=1, dtype=F64)
    conv.params["w"] *= scale
    conv.params["b"][:] = scale * 0.3
    return Sequential(conv, AvgPool2d(2), Flatten(), Linear(16, 3, rng, dtype=F64)).eval()


def loss_with_position_zeroed(model, x, y, position):
    conv, rest = model[0], model.layers_[1:]
    v = conv(x).copy()
    if position is not None:
        v[:, :, position[0], position[1]] = 0.0
    for layer in rest:
        v = layer(v)
    return float(softmax_cross_entropy_forward(v, y)[0])


def test_impact_is_the_first_order_change_of_zeroing_a_position_and_ranks_like_it():
    model = crafted_network(scale=1e-3)  # small activations: zeroing one is a small perturbation
    x, y = images(1, (8, 8), seed=2), np.array([1])
    impact = impact_maps(model, x, y, ["0"])["0"]
    base = loss_with_position_zeroed(model, x, y, None)
    true = np.array([[abs(loss_with_position_zeroed(model, x, y, (r, c)) - base) for c in range(8)] for r in range(8)])
    assert impact.shape == (8, 8) and impact.min() > 0
    np.testing.assert_allclose(impact, true, rtol=2e-3)
    assert np.array_equal(np.argsort(impact.ravel()), np.argsort(true.ravel()))


def test_first_order_estimate_drifts_from_the_true_change_for_large_perturbations():
    # the same comparison with large activations is *not* accurate: the test above can fail
    model = crafted_network(scale=30.0)
    x, y = images(1, (8, 8), seed=2), np.array([1])
    impact = impact_maps(model, x, y, ["0"])["0"]
    base = loss_with_position_zeroed(model, x, y, None)
    true = np.array([[abs(loss_with_position_zeroed(model, x, y, (r, c)) - base) for c in range(8)] for r in range(8)])
    assert not np.allclose(impact, true, rtol=2e-3)


def test_impact_is_the_mean_over_images_of_per_image_gradients_whatever_the_batching():
    model = tiny_nin()
    x = images(5, (8, 8), seed=4)
    y = np.array([0, 3, 3, 9, 1])
    batched = impact_maps(model, x, y, ["conv1", "conv2"], batch_size=2)
    # reference: each image alone, its own loss, Σ_c |∂L/∂V · V|, then the mean
    expected = {"conv1": np.zeros((8, 8)), "conv2": np.zeros((4, 4))}
    for n in range(5):
        one = impact_maps(model, x[n:n + 1], y[n:n + 1], ["conv1", "conv2"], batch_size=1)
        for k in expected:
            expected[k] += one[k] / 5
    for k in expected:
        np.testing.assert_allclose(batched[k], expected[k], rtol=1e-10, atol=1e-14)
        assert batched[k].max() > 0
    assert all(np.all(p[2] == 0) for p in model.named_parameters()), "impact must leave no gradients behind"


def test_already_perforated_positions_get_zero_impact():
    model = tiny_nin()
    x, y = images(3, (8, 8)), np.array([1, 2, 3])
    dense = impact_maps(model, x, y, ["conv1"])["conv1"]
    mask = np.random.default_rng(5).random((8, 8)) < 0.5
    model.conv1.set_mask(mask)
    impact = impact_maps(model, x, y, ["conv1"])["conv1"]
    assert np.count_nonzero(dense[~mask]) > 5  # so the zeros below are the rule, not max pooling's sparsity
    assert np.all(impact[~mask] == 0)
    assert np.count_nonzero(impact[mask]) > 5


def test_impact_rejects_a_layer_that_is_not_a_convolution():
    with pytest.raises(ValueError, match="names must name convolutions"):
        impact_maps(tiny_nin(), images(2, (8, 8)), np.array([0, 1]), ["pool1"])
    with pytest.raises(ValueError, match="labels must have shape"):
        impact_maps(tiny_nin(), images(2, (8, 8)), np.array([0, 1, 2]), ["conv1"])

