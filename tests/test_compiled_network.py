"""``fastpath.network.compile_network``: a plain ResNet on channels-last rows equals ``model(x)`` in evaluation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import float_dtypes, seeds
from tolerances import assert_close

import fastpath
from refimpl.act import ACTResNet
from refimpl.resnet import ResNet
from refimpl.sact import SACTResNet

pytestmark = pytest.mark.skipif(not fastpath.available_backends()["cython"].usable,
                                reason="cython backend unavailable: compile_network needs its kernels")


def logit_term_scale(model, x):
    """A bound on the magnitude of the terms summed into the logits (``tolerances.assert_close``'s ``scale``).

    The head computes ``W · mean(relu((f - μ) s + β)) + b``: when ``f - μ`` cancels, the logits are
    small but carry the rounding error of terms of size ``(|f| + |μ|) |s| + |β|``, then ``|W|`` of them.
    """
    features = model.stem(x)
    for stage in model.stages:
        features = stage(features)
    bn, _, _, linear = model.head.layers_
    size = 1.0 / np.sqrt(bn.buffers["running_var"].astype(np.float64) + bn.eps) * np.abs(bn.params["gamma"])
    terms = ((np.abs(features) + np.abs(bn.buffers["running_mean"])[:, None, None]) * size[:, None, None]
             + np.abs(bn.params["beta"])[:, None, None])
    pooled = terms.mean(axis=(2, 3))
    return float(np.max(pooled @ np.abs(linear.params["w"]) + np.abs(linear.params.get("b", 0.0))))


def randomised(model, rng):
    """Random batch-norm parameters and running statistics (so that evaluation mode is not the identity)."""
    for name, layer in model.named_layers():
        if hasattr(layer, "buffers") and "running_mean" in layer.buffers:
            c = layer.channels
            layer.params["gamma"][...] = rng.uniform(0.5, 1.5, c)
            layer.params["beta"][...] = rng.standard_normal(c)
            layer.buffers["running_mean"][...] = rng.standard_normal(c)
            layer.buffers["running_var"][...] = rng.uniform(0.5, 2.0, c)
    model.eval()
    return model


@given(n=st.integers(1, 2), batch=st.integers(1, 3), in_channels=st.integers(1, 3),
       widths=st.lists(st.integers(1, 4), min_size=3, max_size=3).map(lambda v: tuple(np.cumsum(v))),
       hw=st.tuples(st.integers(1, 9), st.integers(1, 9)), shortcut=st.sampled_from(["pad", "projection"]),
       dtype=float_dtypes(), seed=seeds)
def test_compiled_resnet_equals_the_model_in_evaluation(n, batch, in_channels, widths, hw, shortcut, dtype, seed):
    rng = np.random.default_rng(seed)
    model = randomised(ResNet(n, 5, in_channels, rng, widths=widths, backend="cython", shortcut=shortcut,
                              dtype=dtype), rng)
    x = rng.standard_normal((batch, in_channels, *hw)).astype(dtype)
    compiled = fastpath.compile_network(model)
    out = compiled(x)
    assert out.dtype == dtype
    assert_close(out, model(x), scale=logit_term_scale(model, x))


def test_compiled_resnet_reads_the_current_parameters():
    rng = np.random.default_rng(3)
    model = randomised(ResNet(1, 4, 2, rng, widths=(2, 3, 4), backend="cython", dtype=np.float64), rng)
    compiled = fastpath.compile_network(model)
    x = rng.standard_normal((2, 2, 6, 5))
    before = compiled(x)
    model.stages[1].units[0].conv1.params["w"] *= 2
    model.head.layers_[0].buffers["running_var"] *= 3
    after = compiled(x)
    assert not np.allclose(after, before)
    assert_close(after, model(x))


def test_compile_network_refuses_what_it_cannot_run():
    rng = np.random.default_rng(4)
    with pytest.raises(TypeError, match="model must be a refimpl.resnet.ResNet or a refimpl.sact.SACTResNet"):
        fastpath.compile_network(ACTResNet(1, 4, 1, rng, widths=(2, 2, 2)))
    perforated = ResNet(1, 4, 1, rng, widths=(2, 2, 2), perforation={"stem": ("grid", 0.5)})
    with pytest.raises(ValueError, match="stem is perforated"):
        fastpath.compile_network(perforated)
    model = ResNet(1, 4, 1, rng, widths=(2, 2, 2))
    with pytest.raises(TypeError, match="backend must be a fastpath.cython_backend.CythonBackend"):
        fastpath.compile_network(model, backend="numpy")
    compiled = fastpath.compile_network(model)
    with pytest.raises(ValueError, match="evaluation mode only"):
        compiled(np.zeros((1, 1, 4, 4), dtype=np.float32))
    model.eval()
    with pytest.raises(ValueError, match=r"x must have shape \(N, 1, H, W\)"):
        compiled(np.zeros((1, 2, 4, 4), dtype=np.float32))
    with pytest.raises(TypeError, match="x has dtype float64"):
        compiled(np.zeros((1, 1, 4, 4)))


def shift_halting_biases(model, offset):
    for block in model.stages:
        for head in block.heads:
            head.local.params["b"][...] += offset


@given(n=st.integers(1, 3), batch=st.integers(1, 3), in_channels=st.integers(1, 3),
       widths=st.lists(st.integers(1, 4), min_size=3, max_size=3).map(lambda v: tuple(np.cumsum(v))),
       hw=st.tuples(st.integers(1, 9), st.integers(1, 9)), halting_bias=st.sampled_from([-30.0, -3.0, 0.0, 1.0, 30.0]),
       global_scale=st.floats(0.0, 3.0), dtype=float_dtypes(), seed=seeds)
def test_compiled_sact_equals_the_model_in_evaluation(n, batch, in_channels, widths, hw, halting_bias, global_scale,
                                                       dtype, seed):
    rng = np.random.default_rng(seed)
    model = randomised(SACTResNet(n, 5, in_channels, rng, widths=widths, backend="cython", halting_bias=halting_bias,
                                  dtype=dtype), rng)
    for block in model.stages:  # local and global terms large enough that halting varies over space and samples
        for head in block.heads:
            head.local.params["w"][...] = rng.standard_normal(head.local.params["w"].shape)
            head.params["w_global"][...] = global_scale * rng.standard_normal(head.channels)
    x = rng.standard_normal((batch, in_channels, *hw)).astype(dtype)
    compiled = fastpath.compile_network(model)
    out = compiled(x)
    expected = model(x)
    assert out.dtype == dtype
    np.testing.assert_array_equal(compiled.flops_per_sample, model.flops_per_sample)
    for rho, block in zip(compiled.rho, model.stages):
        assert_close(rho, block.rho)
    assert np.isclose(compiled.ponder_cost, model.ponder_cost)
    assert_close(out, expected, scale=logit_term_scale(model, x))  # last: it runs the model again


def test_compiled_sact_covers_no_some_and_all_halted_positions():
    """Halting biases far below, near and far above the logits: every unit runs, some halt, all halt after the first."""
    rng = np.random.default_rng(7)
    model = randomised(SACTResNet(2, 4, 2, rng, widths=(2, 3, 4), backend="cython", dtype=np.float64), rng)
    for block in model.stages:
        for head in block.heads:
            head.local.params["w"][...] = rng.standard_normal(head.local.params["w"].shape)
    x = rng.standard_normal((3, 2, 7, 6))
    compiled = fastpath.compile_network(model)
    seen = set()
    for offset in (-300.0, 303.0, 300.0):
        shift_halting_biases(model, offset)
        out = compiled(x)  # the compiled network reads the shifted biases
        assert_close(out, model(x))
        np.testing.assert_array_equal(compiled.flops_per_sample, model.flops_per_sample)
        units = np.concatenate([block.n_units.ravel() for block in model.stages])
        seen.add("all run" if np.all(units == 2) else "all halt" if np.all(units == 1) else "mixed")
    assert seen == {"all run", "all halt", "mixed"}


@pytest.mark.parametrize("kind", ["resnet", "sact"])
def test_calls_that_reuse_the_workspace_do_not_change_earlier_results(kind):
    """The compiled network keeps its intermediate arrays from call to call; results must not share them."""
    rng = np.random.default_rng(11)
    if kind == "resnet":
        model = randomised(ResNet(2, 4, 2, rng, widths=(3, 4, 6), backend="cython", dtype=np.float32), rng)
    else:
        model = randomised(SACTResNet(2, 4, 2, rng, widths=(3, 4, 6), backend="cython", dtype=np.float32), rng)
        for block in model.stages:
            for head in block.heads:
                head.local.params["w"][...] = rng.standard_normal(head.local.params["w"].shape)
    compiled = fastpath.compile_network(model)
    first_x = rng.standard_normal((3, 2, 9, 7)).astype(np.float32)
    first = compiled(first_x)
    kept = first.copy()
    for shape in ((5, 2, 12, 12), (1, 2, 4, 5), (3, 2, 9, 7)):  # larger, smaller, the same again
        x = rng.standard_normal(shape).astype(np.float32)
        assert_close(compiled(x), model(x))
    np.testing.assert_array_equal(first, kept)  # the first result was not overwritten
    again = compiled(first_x)
    np.testing.assert_array_equal(again, first)  # same input, same output, whatever ran in between


def test_compile_network_refuses_dense_masked_sact():
    rng = np.random.default_rng(5)
    model = SACTResNet(1, 4, 1, rng, widths=(2, 2, 2), backend="cython", execution="dense")
    with pytest.raises(ValueError, match="execution='dense'"):
        fastpath.compile_network(model)


@given(rows=st.integers(1, 30), channels=st.integers(1, 5), dtype=float_dtypes(), threads=st.integers(1, 3), seed=seeds)
def test_the_row_update_kernels_equal_numpy(rows, channels, dtype, threads, seed):
    from fastpath.cython_unit import _kernels

    rng = np.random.default_rng(seed)
    dst = rng.standard_normal((rows, channels)).astype(dtype)
    index = np.sort(rng.choice(rows, size=rng.integers(0, rows + 1), replace=False)).astype(np.int64)
    weight = rng.standard_normal(index.size).astype(dtype)
    state = rng.standard_normal((rows, channels)).astype(dtype)
    expected = dst.copy()
    expected[index] += weight[:, None] * state[index]
    out = dst.copy()
    _kernels.add_scaled_rows_at(out, state, weight, index, threads)
    assert_close(out, expected)


@given(positions=st.integers(1, 40), channels=st.integers(1, 5), index=st.integers(1, 6), dtype=float_dtypes(),
       threads=st.integers(1, 3), seed=seeds)
def test_the_act_step_kernel_equals_the_numpy_bookkeeping(positions, channels, index, dtype, threads, seed):
    # one unit of ACT per position (refimpl.halting's rule), as the compiled SACT block applied it before
    # the kernel: scatter the new cumulative score, record N and R where a position halts, add h U where
    # it goes on, and leave A where it halts
    from fastpath.cython_unit import _kernels
    from refimpl import halting

    rng = np.random.default_rng(seed)
    cumulative = rng.uniform(0, 0.9, positions).astype(dtype)
    remainder = rng.uniform(0, 1, positions).astype(dtype)
    n_units = rng.integers(1, 5, positions).astype(np.int64)
    weighted = rng.standard_normal((positions, channels)).astype(dtype)
    rows = rng.standard_normal((positions, channels)).astype(dtype)
    active_flat = np.sort(rng.choice(positions, size=rng.integers(0, positions + 1), replace=False)).astype(np.int64)
    active = np.zeros(positions, dtype=bool)
    active[active_flat] = True
    h = rng.uniform(0, 0.6, active_flat.size).astype(dtype)
    after = cumulative[active_flat] + h
    going_on = halting.still_running(after, 0.01)

    expected = {"cumulative": cumulative.copy(), "remainder": remainder.copy(), "n_units": n_units.copy(),
                "weighted": weighted.copy(), "active": np.zeros(positions, dtype=bool)}
    halts = active_flat[~going_on]
    expected["remainder"][halts] = 1 - cumulative[halts]
    expected["n_units"][halts] = index
    continuing = active_flat[going_on]
    expected["weighted"][continuing] += h[going_on][:, None] * rows[continuing]
    expected["cumulative"][active_flat] = after
    expected["active"][continuing] = True

    _kernels.act_step(h, after, going_on.view(np.uint8), active_flat, index, cumulative, remainder, n_units,
                      active.view(np.uint8), weighted, rows, threads)
    got = {"cumulative": cumulative, "remainder": remainder, "n_units": n_units, "weighted": weighted,
           "active": active}
    for name in ("n_units", "active"):
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    for name in ("cumulative", "remainder", "weighted"):
        assert_close(got[name], expected[name])
