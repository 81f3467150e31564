"""SACT (docs/spec.md §8): sparse == dense masked execution on every backend, SACT == ACT for constant
halting, gradients, FLOPs at the computed positions, dead units, masked batch norm."""

import numpy as np
import pytest

from backends import _make as make_backend
from backends import backend_params
from refimpl.act import ACTResNet
from refimpl.backend import NumpyBackend
from refimpl.gradcheck import check_gradients, numerical_gradient, relative_error
from refimpl.layers import batchnorm_forward
from refimpl.resnet import make_stage
from refimpl.sact import SACTBlock, SACTResNet, SpatialHaltingHead
from refimpl.sparse_unit import (dilate, masked_batchnorm_backward, masked_batchnorm_forward, sparse_unit_backward,
                                 sparse_unit_forward)
from test_act import block_gradient_errors, find_case
from tolerances import GRADCHECK_RTOL, assert_close

# NumPy plus every fast backend configuration of tests/backends.py (unusable ones are reported as skipped)
BACKENDS = [pytest.param("numpy", id="numpy")] + backend_params()
WIDTHS = (2, 3, 4)


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------


def test_dilate_golden_and_brute_force():
    mask = np.zeros((1, 4, 5), dtype=bool)
    mask[0, 0, 0] = mask[0, 3, 3] = True
    expected = np.array([[1, 1, 0, 0, 0],
                         [1, 1, 0, 0, 0],
                         [0, 0, 1, 1, 1],
                         [0, 0, 1, 1, 1]], dtype=bool)
    np.testing.assert_array_equal(dilate(mask, (3, 3))[0], expected)
    rng = np.random.default_rng(0)
    masks = rng.random((3, 6, 7)) < 0.2
    out = dilate(masks, (3, 5))
    for n, y, x in np.ndindex(*masks.shape):
        window = masks[n, max(y - 1, 0): y + 2, max(x - 2, 0): x + 3]
        assert out[n, y, x] == window.any()


def test_masked_batchnorm_with_full_mask_is_batchnorm():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 5, 5))
    gamma, beta = rng.standard_normal(4), rng.standard_normal(4)
    out, (mean, var), _ = masked_batchnorm_forward(x, gamma, beta, np.ones((3, 5, 5), dtype=bool), 1e-5)
    ref, _ = batchnorm_forward(x, gamma, beta, x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3)), 1e-5, True)
    assert_close(out, ref)


def test_masked_batchnorm_ignores_values_outside_the_mask():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 4, 4))
    mask = rng.random((2, 4, 4)) < 0.5
    out, (mean, _), _ = masked_batchnorm_forward(x, np.ones(3), np.zeros(3), mask, 1e-5)
    changed = np.where(mask[:, None], x, 100.0)
    out2, _, _ = masked_batchnorm_forward(changed, np.ones(3), np.zeros(3), mask, 1e-5)
    assert_close(out2[np.broadcast_to(mask[:, None], x.shape)], out[np.broadcast_to(mask[:, None], x.shape)])
    np.testing.assert_allclose(mean, [x[:, c][mask].mean() for c in range(3)])


def test_masked_batchnorm_gradients():
    rng = np.random.default_rng(3)
    inputs = {"x": rng.standard_normal((2, 3, 4, 4)), "gamma": rng.standard_normal(3), "beta": rng.standard_normal(3)}
    mask = rng.random((2, 4, 4)) < 0.6
    state = {}

    def forward(x, gamma, beta):
        out, _, state["cache"] = masked_batchnorm_forward(x, gamma, beta, mask, 1e-5)
        return out

    def backward(dout):
        dx, dgamma, dbeta = masked_batchnorm_backward(dout, state["cache"])
        return {"x": dx, "gamma": dgamma, "beta": dbeta}

    errors = check_gradients(forward, backward, inputs, rng)
    assert max(errors.values()) < GRADCHECK_RTOL, errors


def unit_with_statistics(rng, training):
    """A float64 residual unit (3 channels); in evaluation, with running statistics from one batch."""
    unit = make_stage(3, 3, 1, 1, rng, dtype=np.float64).units[0]
    if not training:
        unit(rng.standard_normal((4, 3, 5, 5)))
        unit.eval()
    return unit


@pytest.mark.parametrize("training", [True, False])
def test_sparse_unit_gradients_float64(training):
    rng = np.random.default_rng(11)
    unit = unit_with_statistics(rng, training)
    active = rng.random((2, 5, 5)) < 0.4
    active[:, 2, 2] = True
    inputs = {"x": rng.standard_normal((2, 3, 5, 5)), **{name: p for name, p, _ in unit.named_parameters()}}
    state = {}

    def forward(x, **_):  # the parameters are changed in place by the check
        out, state["cache"], _ = sparse_unit_forward(unit, x, active)
        return out

    def backward(dout):
        unit.zero_grad()
        dx = sparse_unit_backward(unit, dout, state["cache"])
        return {"x": dx, **{name: g.copy() for name, _, g in unit.named_parameters()}}

    errors = check_gradients(forward, backward, inputs, rng)
    assert len(errors) == 1 + 6  # x, bn1.gamma/beta, conv1.w, bn2.gamma/beta, conv2.w
    assert max(errors.values()) < GRADCHECK_RTOL, errors


@pytest.mark.parametrize("training", [True, False])
def test_sparse_unit_with_every_position_active_is_the_unit(training):
    rng = np.random.default_rng(12)
    unit = unit_with_statistics(rng, training)
    x = rng.standard_normal((2, 3, 5, 5))
    out, cache, flops = sparse_unit_forward(unit, x, np.ones((2, 5, 5), dtype=bool))
    assert_close(out, unit(x))
    np.testing.assert_array_equal(flops, unit.flops_per_sample)
    dout = rng.standard_normal(out.shape)
    assert_close(sparse_unit_backward(unit, dout, cache), unit.backward(dout))


def test_spatial_head_is_zero_where_inactive_and_sparse_equals_dense():
    rng = np.random.default_rng(4)
    head = SpatialHaltingHead(3, rng, dtype=np.float64)
    u = rng.standard_normal((2, 3, 5, 5))
    active = rng.random((2, 5, 5)) < 0.5
    active[:, 0, 0] = True
    sparse = head(u, active, "sparse")
    assert np.all(sparse[~active] == 0) and np.all(sparse[active] > 0)
    g = rng.standard_normal(sparse.shape)
    du_sparse = head.backward(g)
    dense = head(u, active, "dense")
    assert_close(sparse, dense)
    assert_close(du_sparse, head.backward(g))


# ---------------------------------------------------------------------------------------------
# Blocks and networks
# ---------------------------------------------------------------------------------------------


def sact_block(rng, n_units=3, channels=3, bias=0.3, local_scale=3.0, backend=None, execution="sparse"):
    stage = make_stage(channels, channels, n_units, 1, rng, backend=backend, dtype=np.float64)
    heads = [SpatialHaltingHead(channels, rng, bias, backend, np.float64) for _ in range(n_units - 1)]
    for head in heads:
        head.local.params["w"][...] = local_scale * rng.standard_normal(head.local.params["w"].shape) / 3
    return SACTBlock(stage.units, heads, execution=execution)


def sact_net(rng, bias=0.3, tau=0.05, n=3, backend=None, local_scale=3.0):
    net = SACTResNet(n, 4, 1, rng, widths=WIDTHS, tau=tau, halting_bias=bias, backend=backend, dtype=np.float64)
    for block in net.stages:
        for head in block.heads:
            head.local.params["w"][...] = local_scale * rng.standard_normal(head.local.params["w"].shape) / 3
    return net


def run(model, x, g, drho=None):
    model.zero_grad()
    out = model(x)
    dx = model.backward(g) if drho is None else model.backward(g, drho)
    return out, dx, {name: grad.copy() for name, _, grad in model.named_parameters()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_execution_equals_dense_masked_execution(backend):
    backend = make_backend(backend)
    block, x, rng = find_case(lambda r: sact_block(r, backend=backend), (3, 3, 6, 6), margin=1e-6)
    masks = block.active_masks
    # a meaningful case: some later unit runs on part of the positions only
    assert any(0 < m.mean() < 1 for m in masks[1:])
    g = rng.standard_normal((3, 3, 6, 6))
    drho = rng.standard_normal((3, 6, 6))
    out_s, dx_s, grads_s = run(block, x, g, drho)
    rho_s, n_s, flops_s = block.rho.copy(), block.n_units.copy(), block.flops_per_sample.copy()
    block.execution = "dense"
    out_d, dx_d, grads_d = run(block, x, g, drho)
    np.testing.assert_array_equal(block.n_units, n_s)
    assert_close(out_s, out_d)
    assert_close(block.rho, rho_s)
    assert_close(dx_s, dx_d)
    for name in grads_d:
        assert_close(grads_s[name], grads_d[name])
    assert np.all(flops_s < block.flops_per_sample)  # the sparse path really skipped work


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_network_equals_dense_masked_network(backend):
    backend = make_backend(backend)
    net, x, rng = find_case(lambda r: sact_net(r, backend=backend), (3, 1, 8, 8), margin=1e-6)
    g = rng.standard_normal((3, 4))
    logits_s, dx_s, grads_s = run(net, x, g)
    net.set_execution("dense")
    logits_d, dx_d, grads_d = run(net, x, g)
    assert_close(logits_s, logits_d)
    assert_close(dx_s, dx_d)
    for name in grads_d:
        assert_close(grads_s[name], grads_d[name])


def test_sact_with_zero_local_weights_equals_act():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 1, 8, 8))
    act = ACTResNet(3, 4, 1, np.random.default_rng(9), widths=WIDTHS, halting_bias=0.0, dtype=np.float64)
    sact = SACTResNet(3, 4, 1, np.random.default_rng(9), widths=WIDTHS, halting_bias=0.0, dtype=np.float64)
    act_params = {name: p for name, p, _ in act.named_parameters()}
    for name, p, _ in sact.named_parameters():
        if ".heads." not in name:
            p[...] = act_params[name]
    for a_block, s_block in zip(act.stages, sact.stages):
        for a_head, s_head in zip(a_block.heads, s_block.heads):
            a_head.params["w"][...] = 20 * rng.standard_normal(a_head.params["w"].shape)
            s_head.params["w_global"][...] = a_head.params["w"]
            s_head.local.params["w"][...] = 0.0
            s_head.local.params["b"][...] = a_head.params["b"]
    g = rng.standard_normal((6, 4))
    logits_a, dx_a, grads_a = run(act, x, g)
    logits_s, dx_s, grads_s = run(sact, x, g)
    for a_block, s_block in zip(act.stages, sact.stages):
        # per sample, every position: the same number of units and the same ponder cost
        np.testing.assert_array_equal(s_block.n_units, np.broadcast_to(a_block.n_units[:, None, None], s_block.n_units.shape))
        assert_close(s_block.rho, np.broadcast_to(a_block.rho[:, None, None], s_block.rho.shape))
        np.testing.assert_array_equal(s_block.flops_per_sample - a_block.flops_per_sample,
                                      _spatial_head_extra_flops(s_block))
    assert any(len(np.unique(b.n_units)) > 1 for b in act.stages)  # samples halt differently
    assert_close(logits_s, logits_a)
    assert_close(dx_s, dx_a)
    assert_close(sact.ponder_cost, np.float64(act.ponder_cost))
    for name, grad in grads_a.items():
        if ".heads." not in name:
            assert_close(grads_s[name], grad)


def _spatial_head_extra_flops(block):
    """The SACT head's 3x3 conv at the active positions (ACT has only the linear term both share)."""
    extra = np.zeros(block.flops_per_sample.shape, dtype=np.int64)
    for index, head in enumerate(block.heads):
        extra += 2 * head.channels * 9 * block.active_masks[index].sum(axis=(1, 2))
    return extra


class CountingBackend(NumpyBackend):
    """The NumPy backend, counting the FLOPs of the rows it really computes."""

    name = "counting"

    def __init__(self):
        self.flops = 0

    def conv_forward(self, x, w, b, plan, geometry):
        k, c, kh, kw = w.shape
        self.flops += 2 * c * kh * kw * k * plan.computed_positions(x.shape[0])
        return super().conv_forward(x, w, b, plan, geometry)


def test_flops_counted_equal_positions_computed():
    backend = CountingBackend()
    net, x, rng = find_case(lambda r: sact_net(r, backend=backend), (4, 1, 8, 8), margin=1e-6)
    backend.flops = 0
    net(x)
    head_linear = sum(2 * h.channels * len(b.cache.run.ran[i]) for b in net.stages for i, h in enumerate(b.heads))
    classifier = 2 * WIDTHS[-1] * 4 * x.shape[0]
    assert int(net.flops_per_sample.sum()) == backend.flops + head_linear + classifier
    # and from the masks alone: conv1 on the dilated mask, conv2 and the head conv on the active mask
    for stage, block in enumerate(net.stages):
        width, hw = WIDTHS[stage], 8 // 2 ** stage
        in_channels = WIDTHS[max(stage - 1, 0)]
        expected = np.full(4, (2 * in_channels * 9 * width + 2 * width * 9 * width) * hw * hw, dtype=np.int64)
        for index, mask in enumerate(block.active_masks):
            if index > 0:
                expected += 2 * width * 9 * width * (dilate(mask, (3, 3)).sum(axis=(1, 2)) + mask.sum(axis=(1, 2)))
            if index < len(block.heads):
                ran = mask.any(axis=(1, 2))
                expected += ran * (2 * width * 9 * mask.sum(axis=(1, 2)) + 2 * width)
        np.testing.assert_array_equal(block.flops_per_sample, expected)
    assert any(m.mean() < 1 for b in net.stages for m in b.active_masks)


def test_sact_block_gradients_float64():
    block, x, rng = find_case(lambda r: sact_block(r), (3, 3, 5, 5))
    errors = block_gradient_errors(
        block, x, rng, lambda n: n.startswith("heads") or n in {"units.1.conv1.w", "units.2.bn2.gamma", "units.1.bn1.beta"})
    assert len(errors) == 1 + 6 + 3
    assert max(errors.values()) < GRADCHECK_RTOL, errors


def test_sact_network_gradients_with_ponder_cost_float64():
    net, x, rng = find_case(lambda r: sact_net(r), (2, 1, 8, 8))
    g = rng.standard_normal((2, 4))

    def loss():
        return float(np.sum(net(x) * g) + net.extra_loss())

    _, dx, grads = run(net, x, g)
    assert relative_error(dx, numerical_gradient(loss, x)) < GRADCHECK_RTOL
    params = {name: p for name, p, _ in net.named_parameters()}
    for name in ("stages.0.heads.1.local.b", "stages.1.heads.0.w_global", "stages.2.heads.0.local.w",
                 "stages.0.units.2.conv1.w", "stem.w"):
        assert relative_error(grads[name], numerical_gradient(loss, params[name])) < GRADCHECK_RTOL, name


def test_dead_units_with_a_positive_halting_bias():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 1, 8, 8))
    net = SACTResNet(4, 3, 1, rng, widths=WIDTHS, halting_bias=3.0, dtype=np.float64)
    run(net, x, rng.standard_normal((3, 3)))
    for block in net.stages:
        assert np.all(block.n_units == 2)
        for index, unit in enumerate(block.units):
            grad_norm = sum(float(np.abs(g).sum()) for _, _, g in unit.named_parameters())
            assert (grad_norm > 0) == (index < 2), (index, grad_norm)
            assert (unit.conv1.cache is None) == (index >= 2)


def test_ponder_map_sums_the_upsampled_block_costs():
    net, x, _ = find_case(lambda r: sact_net(r), (2, 1, 8, 8))
    net(x)
    cmap = net.ponder_map((8, 8))
    expected = (net.stages[0].rho
                + np.repeat(np.repeat(net.stages[1].rho, 2, axis=1), 2, axis=2)
                + np.repeat(np.repeat(net.stages[2].rho, 4, axis=1), 4, axis=2))
    assert_close(cmap, expected)
    assert cmap.std() > 0


def test_bad_arguments_raise():
    rng = np.random.default_rng(0)
    stage = make_stage(2, 2, 2, 1, rng)
    head = SpatialHaltingHead(2, rng)
    with pytest.raises(ValueError, match="execution"):
        SACTBlock(stage.units, [head], execution="masked")
    with pytest.raises(ValueError, match="heads"):
        SACTBlock(stage.units, [])
    down = make_stage(2, 4, 2, 2, rng)
    with pytest.raises(ValueError, match="downsample"):
        SACTBlock(down.units[::-1], [head])


# ---------------------------------------------------------------------------------------------
# ponder map
# ---------------------------------------------------------------------------------------------


def _save_tiny(tmp_path, name):
    from refimpl.checkpoint import save_checkpoint
    from refimpl.models import build_model

    build = {"num_classes": 3, "in_channels": 1, "dtype": "float32", "options": {"widths": [2, 3, 4]}}
    model = build_model(name, 3, 1, np.random.default_rng(0), **build["options"])
    model(np.zeros((2, 1, 16, 16), dtype=np.float32))
    return save_checkpoint(tmp_path / f"{name}.npz", model, name, build)


def test_ponder_map_command_writes_the_map(tmp_path, capsys):
    import matplotlib.image

    from refimpl.cli import main

    checkpoint = _save_tiny(tmp_path, "sact-resnet8")
    out = tmp_path / "maps" / "map.png"
    assert main(["map", "--checkpoint", str(checkpoint), "--image", "camera", "--size", "24", "--out", str(out)]) == 0
    picture = matplotlib.image.imread(out)
    assert picture.ndim == 3 and picture.shape[0] > 100
    assert "ponder cost" in capsys.readouterr().out
    # an image file works too, and is converted to the model's single channel
    rgb = tmp_path / "rgb.png"
    matplotlib.image.imsave(rgb, np.random.default_rng(0).random((20, 18, 3)))
    assert main(["map", "--checkpoint", str(checkpoint), "--image", str(rgb), "--out", str(tmp_path / "b.png")]) == 0


def test_ponder_map_command_refuses_bad_input(tmp_path):
    from refimpl.cli import main

    checkpoint = _save_tiny(tmp_path, "sact-resnet8")
    with pytest.raises(SystemExit, match="--image"):
        main(["map", "--checkpoint", str(checkpoint), "--image", "no-such-photo", "--out", str(tmp_path / "m.png")])
    plain = _save_tiny(tmp_path, "resnet8")
    with pytest.raises(SystemExit, match="computation-time map"):
        main(["map", "--checkpoint", str(plain), "--image", "camera", "--size", "16", "--out", str(tmp_path / "m.png")])


def test_ponder_train_then_map_end_to_end(tmp_path):
    from refimpl.checkpoint import load_checkpoint
    from refimpl.cli import main

    run = tmp_path / "run"
    assert main(["train", "--model", "sact-resnet14", "--tau", "0.02", "--option", "widths=[2,3,4]",
                 "--data", "cluttered-digits", "--canvas", "32", "--n-train", "16", "--n-val", "4", "--n-test", "4",
                 "--epochs", "1", "--batch-size", "8", "--quiet", "--out", str(run)]) == 0
    model, meta = load_checkpoint(run / "checkpoint.npz")
    assert meta["model"] == "sact-resnet14" and model.tau == 0.02 and model.widths == (2, 3, 4)
    assert main(["map", "--checkpoint", str(run / "checkpoint.npz"), "--image", "coffee", "--size", "32",
                 "--out", str(run / "map.png")]) == 0
    assert (run / "map.png").stat().st_size > 0


def test_demo_section_runs_the_shipped_sact_sparsely(tmp_path):
    import argparse

    from refimpl.commands import demo
    from refimpl.commands.demo import sact_demo_section

    assert sact_demo_section in demo.SECTIONS
    args = argparse.Namespace(out=tmp_path, rate=0.5, seed=0, backend="numpy", size=32)
    result = sact_demo_section(demo.make_context(args))
    assert result.failures == []
    active = [row[3] for row in result.rows[:3]]
    assert any(0 < a < 1 for a in active), active  # some positions halted after the first unit, some did not
    sparse_mflops, dense_mflops, error = result.rows[3][4:7]
    assert sparse_mflops < dense_mflops and error <= 1e-5
    assert (tmp_path / "sact_map.png").is_file()


# ---------------------------------------------------------------------------------------------
# The fused-unit seam: a backend's fused unit is used by sparse SACT blocks, never by the reference
# ---------------------------------------------------------------------------------------------


class CountingFusedUnit:
    """A fused unit that delegates to the reference composition and counts its calls."""

    def __init__(self):
        self.calls = {"forward": 0, "backward": 0}

    def forward(self, unit, x, active):
        self.calls["forward"] += 1
        return sparse_unit_forward(unit, x, active)

    def backward(self, unit, dout, cache):
        self.calls["backward"] += 1
        return sparse_unit_backward(unit, dout, cache)


@pytest.mark.parametrize("execution, fused, used", [("sparse", True, True), ("sparse", False, False),
                                                    ("dense", True, False)])
def test_sact_block_uses_the_backends_fused_unit_only_for_fused_sparse_execution(execution, fused, used):
    backend = NumpyBackend()
    backend.fused_unit = CountingFusedUnit()
    rng = np.random.default_rng(21)
    net = SACTResNet(2, 4, 3, rng, widths=(4, 4, 4), backend=backend, dtype=np.float64, halting_bias=-3.0,
                     execution=execution)
    for block in net.stages:
        block.fused = fused
    x = rng.standard_normal((2, 3, 8, 8))
    logits = net(x)
    net.backward(rng.standard_normal(logits.shape))
    calls = backend.fused_unit.calls
    assert (calls["forward"] > 0) == used and calls["forward"] == calls["backward"], calls


def test_ponder_map_without_a_checkpoint_draws_the_shipped_sact_model(tmp_path, capsys):
    import matplotlib.image

    from refimpl.cli import build_parser, main
    from refimpl.commands.map import DEFAULT_MODEL
    from refimpl.pretrained import list_pretrained, load_pretrained

    assert DEFAULT_MODEL in list_pretrained() and load_pretrained(DEFAULT_MODEL)[1]["kind"] == "sact"
    out = tmp_path / "map.png"
    assert main(["map", "--image", "coffee", "--size", "32", "--out", str(out), "--backend", "numpy"]) == 0
    printed = capsys.readouterr().out
    assert f"shipped model {DEFAULT_MODEL}" in printed and "sact-resnet14" in printed
    assert matplotlib.image.imread(out).ndim == 3
    map_help = build_parser()._subparsers._group_actions[0].choices["map"].format_help()
    assert DEFAULT_MODEL in " ".join(map_help.split())
