"""ACT residual blocks and networks (docs/spec.md §7): equivalence with ResNet, gradients, dead units, FLOPs."""

import numpy as np
import pytest

from refimpl.act import ACTBlock, ACTResNet, HaltingHead
from refimpl.gradcheck import numerical_gradient, relative_error
from refimpl.resnet import ResNet, make_stage
from tolerances import GRADCHECK_RTOL, assert_close

WIDTHS = (2, 3, 4)


def silence_heads(block):
    """Every head outputs h = 0 exactly: σ(−1e9) underflows to 0."""
    for head in block.heads:
        head.params["w"][...] = 0.0
        head.params["b"][...] = -1e9


def test_halting_head_golden():
    head = HaltingHead(2, np.random.default_rng(0), bias=-3.0, dtype=np.float64)
    head.params["w"][...] = [1.0, -2.0]
    u = np.zeros((1, 2, 2, 2))
    u[0, 0] = 3.0  # gap = (3, 0): logit = 3 - 3 = 0
    np.testing.assert_allclose(head(u), [0.5])
    np.testing.assert_allclose(HaltingHead(3, np.random.default_rng(0), dtype=np.float64)(np.zeros((2, 3, 1, 1))),
                               1 / (1 + np.exp(3.0)))


@pytest.mark.parametrize("stride", [1, 2])
def test_act_with_zero_halting_equals_the_plain_stage(stride):
    rng = np.random.default_rng(1)
    stage = make_stage(3, 4 if stride == 2 else 3, 3, stride, rng, dtype=np.float64)
    x = rng.standard_normal((5, 3, 6, 6))
    plain = stage(x)
    block = ACTBlock(stage.units, [HaltingHead(u.out_channels, rng, dtype=np.float64) for u in stage.units[:-1]])
    silence_heads(block)
    out = block(x)
    assert np.all(block.n_units == 3)
    np.testing.assert_array_equal(block.rho, 4.0)
    assert_close(out, plain)
    dout = rng.standard_normal(out.shape)
    stage.zero_grad()
    dx_plain = stage.backward(dout)
    grads_plain = {name: g.copy() for name, _, g in stage.named_parameters()}
    block(x)
    stage.zero_grad()
    dx = block.backward(dout)
    assert_close(dx, dx_plain)
    for name, _, g in stage.named_parameters():
        assert_close(g, grads_plain[name])


def test_act_resnet_with_zero_halting_equals_resnet():
    x = np.random.default_rng(2).standard_normal((3, 1, 8, 8))
    plain = ResNet(2, 5, 1, np.random.default_rng(7), widths=WIDTHS, dtype=np.float64)
    act = ACTResNet(2, 5, 1, np.random.default_rng(7), widths=WIDTHS, tau=0.0, dtype=np.float64)
    for block in act.stages:
        silence_heads(block)
    assert_close(act(x), plain(x))
    assert act.ponder_cost == pytest.approx(3 * 3.0)


def make_block(rng, n_units=3, channels=3, bias=-0.3):
    stage = make_stage(channels, channels, n_units, 1, rng, dtype=np.float64)
    heads = [HaltingHead(channels, rng, bias=bias, dtype=np.float64) for _ in range(n_units - 1)]
    for head in heads:
        head.params["w"][...] = rng.standard_normal(channels)
    return ACTBlock(stage.units, heads)


def computed_scores(block):
    """The scores summed by the halting rule (those before N), zero elsewhere: (..., L-1)."""
    result = block.cache.halting
    return np.where(result.cache.before, result.p, 0.0)[..., :-1]


def find_case(build, x_shape, seeds=range(60), margin=1e-3):
    """A seed where samples (or positions) halt after different units and every running sum is
    at least ``margin`` away from 1 - eps, so that a finite difference never changes N."""
    for seed in seeds:
        rng = np.random.default_rng(seed)
        model = build(rng)
        x = rng.standard_normal(x_shape)
        model(x)
        blocks = model.stages if hasattr(model, "stages") else [model]
        far = all(np.min(np.abs(np.cumsum(computed_scores(b), axis=-1) - (1 - b.eps))) > margin for b in blocks)
        mixed = all(len(np.unique(b.n_units)) > 1 for b in blocks)
        if far and mixed:
            return model, x, rng
    raise AssertionError("no seed gave a case with mixed halting away from the discontinuities")


def block_gradient_errors(block, x, rng, wanted):
    """Relative errors of d(<g, out> + <drho, rho>)/d(x, params) vs central differences, g and drho random."""
    out = block(x)
    g, drho = rng.standard_normal(out.shape), rng.standard_normal(block.rho.shape)

    def loss():
        return float(np.sum(block(x) * g) + np.sum(block.rho * drho))

    block(x)
    block.zero_grad()
    dx = block.backward(g, drho)
    grads = {name: grad.copy() for name, _, grad in block.named_parameters()}
    errors = {"x": relative_error(dx, numerical_gradient(loss, x))}
    for name, param, _ in block.named_parameters():
        if wanted(name):
            errors[name] = relative_error(grads[name], numerical_gradient(loss, param))
    return errors


def test_act_block_gradients_float64():
    block, x, rng = find_case(make_block, (6, 3, 4, 4))
    errors = block_gradient_errors(
        block, x, rng, lambda n: n.startswith("heads") or n in {"units.1.conv1.w", "units.2.bn2.gamma", "units.0.bn1.beta"})
    assert len(errors) == 1 + 4 + 3
    assert max(errors.values()) < GRADCHECK_RTOL, errors


def act_net(rng, bias=-0.3, tau=0.05, n=3):
    net = ACTResNet(n, 4, 1, rng, widths=WIDTHS, tau=tau, halting_bias=bias, dtype=np.float64)
    for block in net.stages:
        for head in block.heads:
            head.params["w"][...] = 3 * rng.standard_normal(head.params["w"].shape)
    return net


def test_act_resnet_gradients_with_ponder_cost_float64():
    net, x, rng = find_case(act_net, (4, 1, 8, 8))
    g = rng.standard_normal((4, 4))

    def loss():
        return float(np.sum(net(x) * g) + net.extra_loss())

    net(x)
    net.zero_grad()
    dx = net.backward(g)
    assert relative_error(dx, numerical_gradient(loss, x)) < GRADCHECK_RTOL
    grads = {name: grad.copy() for name, _, grad in net.named_parameters()}
    params = dict((name, p) for name, p, _ in net.named_parameters())
    for name in ("stages.0.heads.0.b", "stages.1.heads.0.w", "stages.2.units.1.conv2.w", "stem.w", "head.3.w"):
        assert relative_error(grads[name], numerical_gradient(loss, params[name])) < GRADCHECK_RTOL, name
    # the ponder term really contributes: without it the head gradient differs
    net(x)
    net.zero_grad()
    net.tau = 0.0
    net.backward(g)
    assert not np.allclose(net.stages[0].heads[0].grads["b"], grads["stages.0.heads.0.b"])


def test_dead_units_with_a_positive_halting_bias():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 1, 8, 8))
    net = ACTResNet(4, 3, 1, rng, widths=WIDTHS, halting_bias=3.0, dtype=np.float64)
    net(x)
    net.zero_grad()
    net.backward(rng.standard_normal((5, 3)))
    for block in net.stages:
        # sigma(3) + sigma(3) > 0.99 with small weights: every sample halts at unit 2 of 4
        assert np.all(block.n_units == 2)
        for index, unit in enumerate(block.units):
            grad_norm = sum(float(np.abs(g).sum()) for _, _, g in unit.named_parameters())
            assert (grad_norm > 0) == (index < 2), (index, grad_norm)
            assert (unit.conv1.cache is None) == (index >= 2)  # never executed at all
    # the default bias -3 keeps every unit alive
    net = ACTResNet(4, 3, 1, np.random.default_rng(4), widths=WIDTHS, dtype=np.float64)
    net(x)
    net.zero_grad()
    net.backward(rng.standard_normal((5, 3)))
    for block in net.stages:
        assert np.all(block.n_units == 4)
        assert all(sum(float(np.abs(g).sum()) for _, _, g in u.named_parameters()) > 0 for u in block.units)


def test_flops_per_sample_count_only_the_units_run():
    net, x, _ = find_case(act_net, (6, 1, 8, 8))
    net(x)
    expected = np.full(6, 2 * 1 * 9 * WIDTHS[0] * 8 * 8, dtype=np.int64)  # the stem, 8x8
    for stage, block in enumerate(net.stages):
        width, hw = WIDTHS[stage], 8 // 2 ** stage
        for index in range(len(block.units)):
            in_channels = WIDTHS[max(stage - 1, 0)] if index == 0 else width
            ran = block.n_units > index
            expected += ran * (2 * in_channels * 9 * width + 2 * width * 9 * width) * hw * hw
            if index < len(block.units) - 1:
                expected += ran * (2 * width)  # the halting head's linear map
    expected += 2 * WIDTHS[-1] * 4  # the classifier
    np.testing.assert_array_equal(net.flops_per_sample, expected)
    assert len(np.unique(net.flops_per_sample)) > 1


def test_ponder_map_is_constant_per_sample_for_act():
    net, x, _ = find_case(act_net, (3, 1, 8, 8))
    net(x)
    cmap = net.ponder_map((8, 8))
    assert cmap.shape == (3, 8, 8)
    expected = sum(block.rho for block in net.stages)
    np.testing.assert_allclose(cmap, np.broadcast_to(expected[:, None, None], (3, 8, 8)))


def test_bad_arguments_raise():
    rng = np.random.default_rng(0)
    stage = make_stage(2, 2, 3, 1, rng)
    with pytest.raises(ValueError, match="heads"):
        ACTBlock(stage.units, [HaltingHead(2, rng)])
    with pytest.raises(ValueError, match="units"):
        ACTBlock([], [])
    with pytest.raises(ValueError, match="eps"):
        ACTBlock(stage.units, [HaltingHead(2, rng), HaltingHead(2, rng)], eps=1.5)
    with pytest.raises(ValueError, match="tau"):
        ACTResNet(1, 2, 1, rng, tau=-1.0)
