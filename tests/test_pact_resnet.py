"""PACT residual networks: gradients, sparse thresholded execution, FLOPs, training wiring."""

import numpy as np
import pytest

from refimpl.datasets import Split
from refimpl.gradcheck import check_gradients
from refimpl.models import build_model
from refimpl.optim import SGD
from refimpl.pact_resnet import LogitHead, PACTResNet, SpatialLogitHead
from refimpl.sparse_unit import branch_forward

from pact_checks import network_gradient_errors, tiny_net
from refimpl.training import compute_loss, fit

GRAD_TOL = 1e-6


def network_check(latents, mode, full_params):
    rng, net, x = tiny_net(latents, mode)
    return network_gradient_errors(rng, net, x, full_params)


@pytest.mark.parametrize("latents", ["per-block", "per-position"])
@pytest.mark.parametrize("mode", ["relaxed", "discrete"])
def test_network_gradients_float64_fixed_noise(latents, mode):
    # every parameter along one random direction; the halting heads of stage 1 coordinate by coordinate
    directional, heads = network_check(latents, mode, lambda name: name.startswith("stages.1."))
    assert directional < GRAD_TOL
    assert heads and max(heads.values()) < GRAD_TOL, heads


def test_discrete_heads_learn_only_through_reinforce_when_tau_is_zero():
    rng, net, x = tiny_net("per-block", "discrete", tau=0.0)
    labels = np.array([0, 1, 2])
    head_grads = []
    for with_signal in (False, True):
        net.zero_grad()
        logits = net(x)
        if with_signal:
            _, dlogits, per_example_loss = compute_loss(net, logits, labels)
            net.objective_backward(dlogits, per_example_loss)
        else:
            net.backward(np.full((3, 3), 0.1))
        head_grads.append(sum(float(np.abs(g).sum()) for name, _, g in net.named_parameters() if ".heads." in name))
    assert head_grads[0] == 0.0  # the output U_n does not depend on the heads: no pathwise gradient
    assert head_grads[1] > 0.0  # the score-function term reaches them
    assert all(b.seen for b in net.baselines)


def test_per_block_thresholded_stops_at_first_positive_logit():
    rng, net, x = tiny_net("per-block", "relaxed", halting_bias=0.0)
    for head in (h for b in net.stages for h in b.heads):
        head.params["w"][...] = 5 * rng.standard_normal(head.params["w"].shape)  # both signs across images
    net.eval()
    net.set_mode("thresholded")
    out = net.stem(x)
    for block in net.stages:
        states, logits = [], []
        state = out
        for i, unit in enumerate(block.units):
            state = unit(state)
            states.append(state)
            if i < len(block.heads):
                logits.append(block.heads[i](state))
        halted = np.concatenate([np.stack(logits, axis=1) > 0, np.ones((3, 1), bool)], axis=1)
        n = np.argmax(halted, axis=1)
        reference = np.stack(states)[n, np.arange(3)]
        got = block(out)
        np.testing.assert_allclose(got, reference, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(block.steps, n + 1)
        out = reference


def test_per_position_thresholded_sparse_equals_dense_masked_reference():
    rng, net, x = tiny_net("per-position", "relaxed", halting_bias=0.0, n=3)
    for head in (h for b in net.stages for h in b.heads):
        head.local.params["w"][...] = rng.standard_normal(head.local.params["w"].shape)
    net.eval()
    net.set_mode("thresholded")
    out = net.stem(x)
    for block in net.stages:
        current = block.units[0](out)
        active = np.ones((3, *current.shape[2:]), bool)
        for index in range(1, len(block.units)):  # dense: every branch everywhere, masked afterwards
            logits = block.heads[index - 1](current)
            active = active & ~(logits > 0)
            residual, _, _ = branch_forward(block.units[index], current, active, "dense")
            current = current + residual
        got = block(out)
        np.testing.assert_allclose(got, current, rtol=0, atol=1e-12)
        assert block.steps.min() >= 1 and block.steps.max() <= len(block.units)
        out = current


@pytest.mark.parametrize("latents", ["per-block", "per-position"])
def test_flops_follow_what_runs(latents):
    _, never, x = tiny_net(latents, "relaxed", halting_bias=-10.0)  # h ≈ 0: every unit runs everywhere
    never(x)  # training mode: every unit and head on every image and position
    dense_flops = never.flops_per_sample.copy()
    never.eval()
    never.set_mode("thresholded")
    never(x)
    np.testing.assert_array_equal(never.flops_per_sample, dense_flops)
    _, always, x = tiny_net(latents, "relaxed", halting_bias=10.0)  # h ≈ 1: one unit per block
    always.eval()
    always.set_mode("thresholded")
    always(x)
    assert np.all(always.flops_per_sample < dense_flops)
    assert all(np.all(b.steps == 1) for b in always.stages)


def test_thresholded_mode_refuses_training():
    _, net, x = tiny_net("per-block", "thresholded")
    with pytest.raises(ValueError, match="evaluation only"):
        net(x)


@pytest.mark.parametrize("mode", ["relaxed", "discrete"])
def test_registry_and_training_loop(mode):
    rng = np.random.default_rng(11)
    net = build_model("pact-resnet14", 3, 1, rng, widths=[4, 4, 4], tau=0.01, mode=mode, latents="per-position")
    images = rng.standard_normal((24, 1, 8, 8)).astype(np.float32)
    split = Split(images, rng.integers(0, 3, 24))
    before = {name: p.copy() for name, p, _ in net.named_parameters()}
    history = fit(net, SGD(net.named_parameters(), lr=0.05), split, epochs=1, batch_size=8, rng=rng, progress=False)
    assert np.isfinite(history.epochs[0].train_loss)
    changed = [name for name, p, _ in net.named_parameters() if not np.array_equal(p, before[name])]
    assert any(".heads." in name for name in changed)
    net.eval()
    for eval_mode in ("relaxed", "discrete", "thresholded"):
        net.set_mode(eval_mode)
        assert net(images[:4]).shape == (4, 3)


def test_heads_backward():
    rng = np.random.default_rng(12)
    u = rng.standard_normal((2, 3, 4, 4))
    for head in (LogitHead(3, rng, dtype=np.float64), SpatialLogitHead(3, rng, dtype=np.float64)):
        params = {"u": u, **head.params, **{f"local.{k}": v for k, v in getattr(head, "local", head).params.items()
                                            if hasattr(head, "local")}}

        def backward(d, head=head):
            head.zero_grad()
            du = head.backward(d)
            grads = {"u": du, **head.grads}
            if hasattr(head, "local"):
                grads.update({f"local.{k}": g for k, g in head.local.grads.items()})
            return grads

        errors = check_gradients(lambda u, head=head, **_: head(u), backward, params, rng)
        assert max(errors.values()) < GRAD_TOL, errors


def test_bad_options():
    rng = np.random.default_rng(13)
    with pytest.raises(ValueError, match="latents"):
        PACTResNet(1, 3, 1, rng, widths=(4, 4, 4), latents="per-pixel")
    with pytest.raises(ValueError, match="mode"):
        PACTResNet(1, 3, 1, rng, widths=(4, 4, 4), mode="greedy")
    with pytest.raises(ValueError, match="temperature"):
        PACTResNet(1, 3, 1, rng, widths=(4, 4, 4), temperature=0.0)


def test_train_and_evaluate_cli_in_every_mode(tmp_path, capsys):
    from refimpl.cli import main

    run = tmp_path / "pact"
    assert main(["train", "--model", "pact-resnet14", "--data", "cluttered-digits", "--canvas", "16",
                 "--n-train", "32", "--n-test", "16", "--epochs", "1", "--batch-size", "16", "--quiet",
                 "--option", "widths=[4,4,4]", "--option", "latents=per-position", "--option", "mode=relaxed",
                 "--option", "temperature=0.5", "--out", str(run)]) == 0
    for mode in ("thresholded", "discrete", "relaxed"):
        assert main(["evaluate", "--checkpoint", str(run / "checkpoint.npz"), "--mode", mode]) == 0
        assert f"in {mode} mode" in capsys.readouterr().out


def test_reinforce_inputs_are_refused_where_no_estimator_uses_them():
    rng, net, x = tiny_net("per-block", "relaxed")
    net(x)
    with pytest.raises(ValueError, match="per_example_loss"):
        net.backward(np.zeros((3, 3)), np.ones(3))
    block = net.stages[0]
    out = block(net.stem(x))
    with pytest.raises(ValueError, match="learning_signal"):
        block.backward(np.zeros_like(out), None, np.ones(3))


@pytest.mark.parametrize("mode", ["relaxed", "discrete"])
def test_reseed_makes_the_sampling_modes_repeat_their_noise(mode):
    _, net, x = tiny_net("per-position", mode)
    net.eval()
    net.reseed(np.random.default_rng(7))
    first = (net(x), [b.ponder_cost_map().copy() for b in net.stages])
    second_draw = net(x)
    net.reseed(np.random.default_rng(7))
    again = (net(x), [b.ponder_cost_map().copy() for b in net.stages])
    np.testing.assert_array_equal(first[0], again[0])
    for a, b in zip(first[1], again[1]):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], second_draw), "the noise does not move on between draws"
    assert len({id(block.rng) for block in net.stages}) == 1, "the blocks no longer share one generator"


def test_reseed_and_set_rng_refuse_what_is_not_a_generator():
    _, net, _ = tiny_net("per-block")
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator.*got int"):
        net.reseed(3)
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator.*got NoneType"):
        net.stages[0].set_rng(None)
