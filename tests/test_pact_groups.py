"""PACT-ResNets with one halting latent per g×g group of positions (refimpl.pact_resnet, latents="group")."""

import numpy as np
import pytest

from refimpl.gradcheck import check_gradients
from refimpl.models import build_model
from refimpl.training import compute_loss
from refimpl.pact_resnet import (
    GroupLogitHead,
    PACTResNet,
    group_areas,
    group_broadcast,
    group_mean_forward,
    group_sum,
)
from refimpl.sparse_unit import branch_forward

from pact_checks import fixed_noise, network_gradient_errors, tiny_net
from tolerances import FLOAT64_REFORMULATION_RTOL

GRAD_TOL = 1e-6


def train_step(net, x, labels):
    """Forward, cross-entropy (+ REINFORCE signals in discrete mode), backward; the gradients by name."""
    net.zero_grad()
    logits = net(x)
    _, dlogits, per_example_loss = compute_loss(net, logits, labels)
    dx = net.objective_backward(dlogits, per_example_loss)
    return logits, dx, {name: g.copy() for name, _, g in net.named_parameters()}


# --------------------------------------------------------------------------- the pooling helpers


def test_group_areas_tile_the_map_from_the_top_left():
    np.testing.assert_array_equal(group_areas((8, 7), 3), [[9, 9, 3], [9, 9, 3], [6, 6, 2]])
    np.testing.assert_array_equal(group_areas((4, 4), 4), [[16]])
    np.testing.assert_array_equal(group_areas((2, 3), 5), [[6]])


def test_group_mean_matches_a_loop_and_sum_is_the_adjoint_of_broadcast():
    rng = np.random.default_rng(0)
    values = rng.standard_normal((2, 7, 5))
    g = 3
    mean = group_mean_forward(values, g)
    assert mean.shape == (2, 3, 2)
    for i in range(3):
        for j in range(2):
            np.testing.assert_allclose(mean[:, i, j], values[:, 3 * i:3 * i + 3, 3 * j:3 * j + 3].mean(axis=(1, 2)))
    small = rng.standard_normal((2, 3, 2, 4))  # trailing axes ride along
    big = rng.standard_normal((2, 7, 5, 4))
    np.testing.assert_allclose(np.sum(group_broadcast(small, g, (7, 5)) * big), np.sum(small * group_sum(big, g)))


def test_group_head_gradients_float64():
    rng = np.random.default_rng(1)
    head = GroupLogitHead(3, 3, rng, dtype=np.float64)
    head.local.params["w"][...] = rng.standard_normal(head.local.params["w"].shape)
    u = rng.standard_normal((2, 3, 7, 5))  # ragged groups along both axes
    logits = head(u)
    groups = logits[:, ::3, ::3]  # one value per group, repeated at its positions
    np.testing.assert_array_equal(logits, group_broadcast(groups, 3, (7, 5)))
    params = {"u": u, "w_global": head.params["w_global"], "local.w": head.local.params["w"],
              "local.b": head.local.params["b"]}

    def backward(d):
        head.zero_grad()
        du = head.backward(d)
        return {"u": du, "w_global": head.grads["w_global"], "local.w": head.local.grads["w"],
                "local.b": head.local.grads["b"]}

    errors = check_gradients(lambda **_: head(u), backward, params, rng)
    assert max(errors.values()) < GRAD_TOL, errors


# --------------------------------------------------------------------------- the network


@pytest.mark.parametrize("mode", ["relaxed", "discrete"])
def test_group_network_gradients_float64_fixed_noise(mode):
    rng, net, x = tiny_net("group", mode, group_size=3)
    directional, heads = network_gradient_errors(rng, net, x, lambda name: name.startswith("stages.0.heads."))
    assert directional < GRAD_TOL
    assert max(heads.values()) < GRAD_TOL, heads


@pytest.mark.parametrize("mode", ["relaxed", "discrete"])
def test_group_size_one_is_per_position(mode):
    labels = np.array([0, 1, 2])
    _, positions, x = tiny_net("per-position", mode)
    _, groups, _ = tiny_net("group", mode, group_size=1)
    for net in (positions, groups):
        fixed_noise(net)
    results = [train_step(net, x, labels) for net in (positions, groups)]
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    assert results[0][2].keys() == results[1][2].keys()
    for name, grad in results[0][2].items():
        np.testing.assert_array_equal(grad, results[1][2][name], err_msg=name)
    for eval_mode in ("thresholded", "discrete"):
        outputs = []
        for net in (positions, groups):
            fixed_noise(net)
            net.eval()
            net.set_mode(eval_mode)
            outputs.append((net(x), net.flops_per_sample.copy(), [b.steps.copy() for b in net.stages]))
        np.testing.assert_array_equal(outputs[0][0], outputs[1][0])
        np.testing.assert_array_equal(outputs[0][1], outputs[1][1])
        for a, b in zip(outputs[0][2], outputs[1][2]):
            np.testing.assert_array_equal(a, b)


def copy_per_block_into_one_group(per_block, grouped):
    """Same units; group heads that compute the per-block logit (no local weights, b and w moved over)."""
    source = {name: p for name, p, _ in per_block.named_parameters()}
    for name, p, _ in grouped.named_parameters():
        if ".heads." not in name:
            p[...] = source[name]
    for block_a, block_b in zip(per_block.stages, grouped.stages):
        for head_a, head_b in zip(block_a.heads, block_b.heads):
            head_b.local.params["w"][...] = 0.0
            head_b.local.params["b"][...] = head_a.params["b"]
            head_b.params["w_global"][...] = head_a.params["w"]


@pytest.mark.parametrize("mode", ["relaxed", "discrete"])
def test_one_group_covering_each_map_is_one_latent_per_block(mode):
    labels = np.array([0, 1, 2])
    tau = 0.1 if mode == "relaxed" else 0.0  # discrete, τ = 0: the heads learn only through REINFORCE
    _, per_block, x = tiny_net("per-block", mode, seed=1, tau=tau)
    _, grouped, _ = tiny_net("group", mode, group_size=100, seed=2, tau=tau)  # g beyond every map: one group each
    assert grouped.latent_count((8, 8)) == per_block.latent_count((8, 8)) == 3
    copy_per_block_into_one_group(per_block, grouped)
    for net in (per_block, grouped):
        fixed_noise(net)  # per-block noise (N, L-1) and one-group noise (N, 1, 1, L-1): the same draws
    (out_a, dx_a, grads_a), (out_b, dx_b, grads_b) = (train_step(net, x, labels) for net in (per_block, grouped))
    np.testing.assert_allclose(out_b, out_a, rtol=FLOAT64_REFORMULATION_RTOL, atol=1e-12)
    np.testing.assert_allclose(dx_b, dx_a, rtol=1e-9, atol=1e-12)
    for block_a, block_b in zip(per_block.stages, grouped.stages):
        expected_b = block_b.expected_steps
        np.testing.assert_allclose(expected_b, np.broadcast_to(block_a.expected_steps[:, None, None], expected_b.shape),
                                   rtol=FLOAT64_REFORMULATION_RTOL)
    for name, grad in grads_a.items():
        if ".heads." not in name:
            np.testing.assert_allclose(grads_b[name], grad, rtol=1e-9, atol=1e-12, err_msg=name)
        else:  # the per-block bias and weights live on as the local bias and the global weights
            other = name.replace(".b", ".local.b") if name.endswith(".b") else name.replace(".w", ".w_global")
            np.testing.assert_allclose(grads_b[other], grad, rtol=1e-9, atol=1e-12, err_msg=name)
    if mode == "discrete":  # so the REINFORCE signal reached the heads, once per group (not once per position)
        assert all(np.abs(g).sum() > 0 for name, g in grads_a.items() if ".heads." in name)
    per_block.eval()
    grouped.eval()
    for net in (per_block, grouped):
        net.set_mode("thresholded")
    np.testing.assert_allclose(grouped(x), per_block(x), rtol=FLOAT64_REFORMULATION_RTOL, atol=1e-12)
    for block_a, block_b in zip(per_block.stages, grouped.stages):
        np.testing.assert_array_equal(block_b.steps, np.broadcast_to(block_a.steps[:, None, None], block_b.steps.shape))


def test_groups_halt_as_one():
    rng, net, x = tiny_net("group", "relaxed", group_size=3, n=3)
    for head in (h for b in net.stages for h in b.heads):
        head.local.params["w"][...] = rng.standard_normal(head.local.params["w"].shape)
    net(x)  # relaxed: every position of a group gets the group's stick-breaking weights
    for block in net.stages:
        weights = block.cache.weights  # (N, H, W, L)
        hw = weights.shape[1:3]
        np.testing.assert_array_equal(weights, group_broadcast(weights[:, ::3, ::3], 3, hw))
    net.set_mode("discrete")
    net(x)
    for block in net.stages:
        np.testing.assert_array_equal(block.steps, group_broadcast(block.steps[:, ::3, ::3], 3, block.steps.shape[1:]))
    assert any(len(np.unique(b.steps)) > 1 for b in net.stages)  # the check above is not about constant maps


def test_group_thresholded_sparse_equals_dense_masked_reference():
    rng, net, x = tiny_net("group", "relaxed", group_size=2, n=3)
    for head in (h for b in net.stages for h in b.heads):
        head.local.params["w"][...] = rng.standard_normal(head.local.params["w"].shape)
    net.eval()
    net.set_mode("thresholded")
    out = net.stem(x)
    stopped_early = False
    for block in net.stages:
        current = block.units[0](out)
        active = np.ones((3, *current.shape[2:]), bool)
        for index in range(1, len(block.units)):  # dense: every branch everywhere, masked afterwards
            logits = block.heads[index - 1](current)
            active = active & ~(logits > 0)
            residual, _, _ = branch_forward(block.units[index], current, active, "dense")
            current = current + residual
        stopped_early |= not active.all()
        got = block(out)
        np.testing.assert_allclose(got, current, rtol=0, atol=1e-12)
        out = current
    assert stopped_early


def test_latent_counts():
    def count(latents, group_size=None, hw=(32, 32)):
        rng = np.random.default_rng(0)
        net = build_model("pact-resnet32", 10, 3, rng, widths=[4, 4, 4], latents=latents, group_size=group_size)
        return net.latent_count(hw)

    assert count("per-block") == 3
    assert count("per-position") == 32**2 + 16**2 + 8**2 == 1344
    assert count("group", 1) == 1344
    assert count("group", 2) == 16**2 + 8**2 + 4**2
    assert count("group", 3) == 11**2 + 6**2 + 3**2  # ragged: ceil(32/3) = 11, ceil(16/3) = 6, ceil(8/3) = 3
    assert count("group", 8) == 16 + 4 + 1
    assert count("group", 32) == 3
    assert count("per-position", hw=(16, 12)) == 16 * 12 + 8 * 6 + 4 * 3
    _, net, x = tiny_net("per-position")
    net(x)
    assert net.latent_count(x.shape[2:]) == sum(b.expected_steps[0].size for b in net.stages)


def test_bad_group_options():
    rng = np.random.default_rng(3)
    for bad in (None, 0, -2, 2.5, True, "4"):
        with pytest.raises(ValueError, match="group_size must be a positive int"):
            PACTResNet(1, 3, 1, rng, widths=(4, 4, 4), latents="group", group_size=bad)
    with pytest.raises(ValueError, match="group_size applies only to latents='group'"):
        PACTResNet(1, 3, 1, rng, widths=(4, 4, 4), latents="per-position", group_size=2)
    with pytest.raises(ValueError, match="latents must be one of"):
        PACTResNet(1, 3, 1, rng, widths=(4, 4, 4), latents="groups", group_size=2)


def test_train_cli_with_group_latents(tmp_path, capsys):
    from refimpl.cli import main

    common = ["train", "--model", "pact-resnet8", "--data", "cluttered-digits", "--canvas", "16", "--n-train", "16",
              "--n-val", "8", "--n-test", "8", "--batch-size", "8", "--quiet", "--option", "widths=[4,4,4]"]
    with pytest.raises(SystemExit, match="group_size must be a positive int"):
        main(common + ["--epochs", "1", "--option", "latents=group", "--out", str(tmp_path / "bad")])
    with pytest.raises(SystemExit, match="group_size must be a positive int.*got 0"):
        main(common + ["--epochs", "1", "--option", "latents=group", "--option", "group_size=0",
                       "--out", str(tmp_path / "bad")])
    run = tmp_path / "group"
    assert main(common + ["--epochs", "1", "--option", "latents=group", "--option", "group_size=4",
                          "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run / "checkpoint.npz"), "--mode", "thresholded"]) == 0
    assert "in thresholded mode" in capsys.readouterr().out


def test_ponder_map_sums_the_blocks_per_latent():
    rng, net, x = tiny_net("group", "relaxed", group_size=2, n=3)
    for head in (h for b in net.stages for h in b.heads):
        head.local.params["w"][...] = rng.standard_normal(head.local.params["w"].shape)
    net.eval()
    net.set_mode("thresholded")
    net(x)
    cmap = net.ponder_map((8, 8))  # stage maps 8×8, 4×4, 2×2: nearest upsampling by 1, 2, 4
    expected = sum(np.kron(b.steps, np.ones((1, 8 // b.steps.shape[1], 8 // b.steps.shape[2]))) for b in net.stages)
    np.testing.assert_array_equal(cmap, expected)
    assert len(np.unique(cmap)) > 1
    net.set_mode("relaxed")
    net(x)
    np.testing.assert_allclose(net.ponder_map((8, 8)).mean(), net.ponder_cost, rtol=FLOAT64_REFORMULATION_RTOL)
    _, per_block, _ = tiny_net("per-block", "relaxed")
    per_block(x)
    np.testing.assert_allclose(per_block.ponder_map((8, 8)),
                               np.broadcast_to(sum(b.expected_steps for b in per_block.stages)[:, None, None], (3, 8, 8)))
