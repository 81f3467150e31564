"""Malformed input never crashes the process and never passes silently.

Every case below calls a public function or a backend method with one thing wrong and states the
exception it must raise and words its message must contain (the argument's name, and what was
wrong). The cases run in *subprocesses* — this file is also the worker script — because the
failure being guarded against is a compiled kernel reading out of bounds: a segmentation fault
must fail the one case that caused it, not kill the test session.

A worker runs a group of cases and prints one JSON line when it starts a case and one with the
outcome; if it dies, the case it had started is recorded as a crash and a fresh worker goes on
with the rest. Backend cases run once per backend (``numpy``, ``cython``, ``opencl``).

Besides the cases: the Cython backward is bit-for-bit deterministic at a fixed thread count
(20 repeated 2-thread calls, and a short 2-thread training run repeated from its seed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

# ---------------------------------------------------------------------------------------------
# The cases: (id, code, exception type, words the message must contain)
# ---------------------------------------------------------------------------------------------

# Run once per backend, with ``be`` the backend and the fixtures of ``_namespace``.
BACKEND_CASES = [
    ("conv_forward x 3-D", "be.conv_forward(x[0], w, b, plan, g)", "ValueError", ["x must be 4-dimensional"]),
    ("conv_forward x int64", "be.conv_forward(x.astype(np.int64), w, b, plan, g)", "TypeError",
     ["x must have dtype float32 or float64, got int64"]),
    ("conv_forward x float16", "be.conv_forward(x.astype(np.float16), w, b, plan, g)", "TypeError",
     ["x must have dtype", "float16"]),
    ("conv_forward x list", "be.conv_forward(x.tolist(), w, b, plan, g)", "TypeError", ["x must be a", "list"]),
    ("conv_forward x empty batch", "be.conv_forward(x[:0], w, b, plan, g)", "ValueError", ["x must have no empty axis"]),
    ("conv_forward w more channels than x", "be.conv_forward(x, w5, b, plan, g)", "ValueError",
     ["w has 5 input channels", "x has 3"]),
    ("conv_forward b length", "be.conv_forward(x, w, b[:3], plan, g)", "ValueError", ["b must have shape (4,)"]),
    ("conv_forward mixed dtypes", "be.conv_forward(x.astype(np.float32), w, b, plan, g)", "TypeError",
     ["x=float32", "w=float64"]),
    ("conv_forward mask instead of plan", "be.conv_forward(x, w, b, np.ones((6, 6), bool), g)", "TypeError",
     ["plan must be a refimpl.PerforationPlan"]),
    ("conv_forward plan of another size", "be.conv_forward(x, w, b, PerforationPlan(np.ones((5, 5), bool)), g)",
     "ValueError", ["plan is for outputs of size (5, 5)", "geometry.out_hw"]),
    ("conv_forward per-sample plan for 2, batch of 3", "be.conv_forward(x3, w, b, plan2, g)", "ValueError",
     ["plan is per-sample for 2 samples but the batch has 3"]),
    ("conv_forward geometry not a ConvGeometry", "be.conv_forward(x, w, b, plan, tuple(g))", "TypeError",
     ["geometry must be"]),
    ("conv_forward geometry kernel", "be.conv_forward(x, w, b, plan, g._replace(kernel=(5, 5)))", "ValueError",
     ["geometry.kernel"]),
    ("conv_forward geometry out_hw", "be.conv_forward(x, w, b, plan, g._replace(out_hw=(7, 7)))", "ValueError",
     ["geometry.out_hw must be (6, 6)"]),
    ("conv_forward geometry stride 0", "be.conv_forward(x, w, b, plan, g._replace(stride=(0, 1)))", "ValueError",
     ["stride"]),
    ("conv_backward dcompact shape", "be.conv_backward(np.zeros((2, 4, 35)), be.conv_forward(x, w, b, plan, g)[1])",
     "ValueError", ["dcompact must have shape (2, 4, 36)"]),
    ("conv_backward dcompact 4-D", "be.conv_backward(np.zeros((2, 4, 6, 6)), be.conv_forward(x, w, b, plan, g)[1])",
     "ValueError", ["dcompact must be 3-dimensional"]),
    ("conv_backward not a cache", "be.conv_backward(np.zeros((2, 4, 36)), None)", "TypeError", ["cache must be"]),
    ("conv_backward cache of a table convolution",
     "be.conv_backward(np.zeros((2, 4, 36)), be.table_conv_forward(src, table, w, b)[1])", "ValueError",
     ["cache comes from table_conv_forward"]),
    ("conv_backward cache of another backend",
     "be.conv_backward(np.zeros((2, 4, 36)), be.conv_forward(x, w, b, plan, g)[1]._replace(backend='other'))",
     "ValueError", ["cache comes from the 'other' backend"]),
    ("fill_forward compact width", "be.fill_forward(np.zeros((2, 4, 37)), plan, 'nearest')", "ValueError",
     ["compact must have 36 entries"]),
    ("fill_forward per-sample plan for 2, batch of 3", "be.fill_forward(np.zeros((3, 4, plan2.width)), plan2, 'nearest')",
     "ValueError", ["plan is per-sample for 2 samples but the batch has 3"]),
    ("fill_forward unknown fill", "be.fill_forward(np.zeros((2, 4, 36)), plan, 'linear')", "ValueError",
     ["fill must be one of"]),
    ("fill_forward object with an out-of-range index map", "be.fill_forward(np.zeros((2, 4, 36)), FakePlan(), 'nearest')",
     "TypeError", ["plan must be a refimpl.PerforationPlan"]),
    ("fill_forward subclass index map out of range",
     "be.fill_forward(np.zeros((2, 4, 36)), BadMapPlan(np.ones((6, 6), bool)), 'nearest')", "ValueError",
     ["plan.index_map entries must be compact indices in [0, 36)", "36 at index (0, 5, 5)"]),
    ("fill_backward subclass index map out of range",
     "be.fill_backward(np.zeros((2, 4, 6, 6)), BadMapPlan(np.ones((6, 6), bool)), 'nearest')", "ValueError",
     ["plan.index_map entries"]),
    ("fill_forward compact int", "be.fill_forward(np.zeros((2, 4, 36), np.int32), plan, 'zero')", "TypeError",
     ["compact must have dtype"]),
    ("fill_backward output size", "be.fill_backward(np.zeros((2, 4, 5, 6)), plan, 'nearest')", "ValueError",
     ["ddense must have the plan's output size (6, 6)"]),
    ("fill_backward per-sample plan for 2, batch of 3", "be.fill_backward(np.zeros((3, 4, 6, 6)), plan2, 'zero')",
     "ValueError", ["plan is per-sample for 2 samples but the batch has 3"]),
    ("table_conv_forward entry 10**8", "be.table_conv_forward(src, poke(table, 10**8), w, b)", "ValueError",
     ["table entries must be -1 (padding) or source indices in [0, 36)", "100000000 at index (0, 0, 0)"]),
    ("table_conv_forward entry S", "be.table_conv_forward(src, poke(table, 36, (0, 5, 4)), w, b)", "ValueError",
     ["table entries", "got 36 at index (0, 5, 4)"]),
    ("table_conv_forward entry -2", "be.table_conv_forward(src, poke(table, -2, (0, 1, 1)), w, b)", "ValueError",
     ["table entries", "got -2 at index (0, 1, 1)"]),
    ("table_conv_forward int64 2**32+3", "be.table_conv_forward(src, poke(table.astype(np.int64), 2**32 + 3), w, b)",
     "TypeError", ["table must have dtype int32 exactly", "int64"]),
    ("table_conv_forward float table", "be.table_conv_forward(src, table.astype(np.float64), w, b)", "TypeError",
     ["table must have dtype int32"]),
    ("table_conv_forward table 2-D", "be.table_conv_forward(src, table[0], w, b)", "ValueError",
     ["table must be 3-dimensional"]),
    ("table_conv_forward taps", "be.table_conv_forward(src, table[:, :, :4].copy(), w, b)", "ValueError",
     ["table must have 9 taps"]),
    ("table_conv_forward table batch", "be.table_conv_forward(src, np.repeat(table, 3, axis=0), w, b)", "ValueError",
     ["table must have 1 or 2 (the batch) rows"]),
    ("table_conv_forward w more channels than src", "be.table_conv_forward(src, table, w5, b)", "ValueError",
     ["w has 5 input channels", "src has 3"]),
    ("table_conv_forward src 4-D", "be.table_conv_forward(x, table, w, b)", "ValueError", ["src must be 3-dimensional"]),
    ("table_conv_backward dout shape", "be.table_conv_backward(np.zeros((2, 4, 35)), be.table_conv_forward(src, table, w, b)[1])",
     "ValueError", ["dout must have shape (2, 4, 36)"]),
    ("table_conv_backward cache of a pooling",
     "be.table_conv_backward(np.zeros((2, 4, 9)), be.table_pool_forward(src, pool_table, 'max')[1])", "ValueError",
     ["cache comes from table_pool_forward"]),
    ("table_pool_forward entry 10**8", "be.table_pool_forward(src, poke(pool_table, 10**8), 'max')", "ValueError",
     ["table entries", "100000000 at index (0, 0, 0)"]),
    ("table_pool_forward mode median", "be.table_pool_forward(src, pool_table, 'median')", "ValueError",
     ["mode must be one of ['avg', 'max'], got 'median'"]),
    ("table_pool_forward window of padding only", "be.table_pool_forward(src, poke(pool_table, -1, (0, 2)), 'avg')",
     "ValueError", ["at least one tap", "window (0, 2)"]),
    ("table_pool_forward int64 table", "be.table_pool_forward(src, pool_table.astype(np.int64), 'max')", "TypeError",
     ["table must have dtype int32"]),
    ("table_pool_backward dout shape", "be.table_pool_backward(np.zeros((2, 3, 8)), be.table_pool_forward(src, pool_table, 'avg')[1])",
     "ValueError", ["dout must have shape (2, 3, 9)"]),
    ("table_pool_backward cache of a convolution",
     "be.table_pool_backward(np.zeros((2, 3, 9)), be.conv_forward(x, w, b, plan, g)[1])", "ValueError",
     ["cache comes from conv_forward"]),
]

# Public functions and the plan; run once, on the NumPy reference unless the code names a backend.
PUBLIC_CASES = [
    # the plan and index tables are immutable
    ("plan.positions written", "plan.positions[0, 0] = 10**6", "ValueError", ["read-only"]),
    ("plan.counts written", "plan.counts[0] = plan.width + 50", "ValueError", ["read-only"]),
    ("plan.mask written", "plan.mask[:] = True", "ValueError", ["read-only"]),
    ("plan.index_map written", "plan.index_map[0, 0, 0] = 5", "ValueError", ["read-only"]),
    ("plan.positions made writeable", "plan.positions.setflags(write=True)", "ValueError", ["WRITEABLE"]),
    ("plan.positions replaced", "plan.positions = np.zeros((1, 36), np.int32)", "AttributeError",
     ["PerforationPlan is immutable", "positions"]),
    ("composed table written", "compose_index_table(plan.index_map, 3, 1, 1)[0, 0, 0] = 10**8", "ValueError",
     ["read-only"]),
    # perforated convolution
    ("perforated_conv2d_forward x 3-D on cython", "perforated_conv2d_forward(x[0], w, b, None, 1, 1, backend=fast)",
     "ValueError", ["x must be 4-dimensional"]),
    ("perforated_conv2d_forward x int64 on cython", "perforated_conv2d_forward(x.astype(np.int64), w, b, backend=fast)",
     "TypeError", ["x must have dtype float32 or float64, got int64"]),
    ("perforated_conv2d_forward w more channels", "perforated_conv2d_forward(x, w5, b, backend=fast)", "ValueError",
     ["w has 5 input channels"]),
    ("perforated_conv2d_forward per-sample mask for 2, batch of 3",
     "perforated_conv2d_forward(x3, w, b, np.ones((2, 6, 6), bool), 1, 1, backend=fast)", "ValueError", ["mask"]),
    ("perforated_conv2d_forward output", "perforated_conv2d_forward(x, w, b, output='sparse')", "ValueError",
     ["output must be one of"]),
    ("perforated_conv2d_forward backend name", "perforated_conv2d_forward(x, w, b, backend='cuda')", "ValueError",
     ["backend must be one of", "'cuda'"]),
    ("perforated_conv2d_backward dout shape",
     "perforated_conv2d_backward(np.zeros((2, 4, 6, 5)), perforated_conv2d_forward(x, w, b, None, 1, 1)[1])",
     "ValueError", ["dout must have the forward output's shape (2, 4, 6, 6)"]),
    ("perforated_conv2d_backward NaN dout",
     "perforated_conv2d_backward(np.full((2, 4, 6, 6), np.nan), perforated_conv2d_forward(x, w, b, None, 1, 1)[1])",
     "ValueError", ["dout must be finite"]),
    ("PerforationPlan empty mask", "PerforationPlan(np.zeros((3, 3), bool))", "ValueError",
     ["mask must select at least one position"]),
    ("PerforationPlan int mask", "PerforationPlan(np.ones((3, 3), int))", "TypeError", ["mask must have dtype bool"]),
    ("PerforationPlan tie_break", "PerforationPlan(np.ones((3, 3), bool), tie_break='first')", "ValueError",
     ["tie_break must be one of"]),
    ("PerforationPlan random ties without rng", "PerforationPlan(np.ones((3, 3), bool), tie_break='random')",
     "TypeError", ["rng must be a numpy.random.Generator"]),
    ("nearest_index 3-D mask", "nearest_index(np.ones((2, 3, 3), bool))", "ValueError", ["mask must have shape"]),
    ("realised_rate list", "realised_rate([[True]])", "TypeError", ["mask must be a boolean numpy array"]),
    # implicit interpolation
    ("implicit_conv2d_forward mask instead of plan", "implicit_conv2d_forward(src, np.ones((6, 6), bool), w, b)",
     "TypeError", ["plan must be a PerforationPlan"]),
    ("implicit_conv2d_forward compact width", "implicit_conv2d_forward(src[:, :, :30], plan, w, b)", "ValueError",
     ["compact must have 36 entries"]),
    ("implicit_conv2d_forward w more channels on cython", "implicit_conv2d_forward(src, plan, w5, b, backend=fast)",
     "ValueError", ["w has 5 input channels"]),
    ("implicit_conv2d_backward dout shape",
     "implicit_conv2d_backward(np.zeros((2, 4, 3, 3)), implicit_conv2d_forward(src, plan, w, b, 1, 1)[1])",
     "ValueError", ["dout must have the forward output's shape"]),
    ("implicit_pool2d_forward mode median on cython", "implicit_pool2d_forward(src, plan, mode='median', backend=fast)",
     "ValueError", ["mode must be one of"]),
    ("implicit_pool2d_forward padding", "implicit_pool2d_forward(src, plan, size=2, padding=2)", "ValueError",
     ["padding must be at most half"]),
    ("implicit_pool2d_backward dout shape",
     "implicit_pool2d_backward(np.zeros((2, 3, 2, 2)), implicit_pool2d_forward(src, plan)[1])", "ValueError",
     ["dout must have the forward output's shape (2, 3, 3, 3)"]),
    ("compose_index_table float index_map", "compose_index_table(np.zeros((6, 6)), 3)", "TypeError",
     ["index_map must be an integer numpy array"]),
    ("compose_index_table negative index_map", "compose_index_table(np.full((6, 6), -3), 3)", "ValueError",
     ["index_map must be non-negative"]),
    ("compose_index_table out_positions", "compose_index_table(plan.index_map, 3, 1, 1, out_positions=[99])",
     "ValueError", ["out_positions must be raster indices"]),
    # dense convolution and pooling
    ("conv2d_forward w 2-D", "conv2d_forward(x, w.reshape(4, 27))", "ValueError", ["w must be 4-dimensional"]),
    ("conv2d_backward dout shape", "conv2d_backward(np.zeros((2, 4, 4, 5)), conv2d_forward(x, w)[1])", "ValueError",
     ["dout must have the forward output's shape"]),
    ("conv2d_naive x str", "conv2d_naive('image', w)", "TypeError", ["x must be a numpy array"]),
    ("conv_output_shape kernel too large", "conv_output_shape((3, 3), 5)", "ValueError", ["kernel 5x5 is larger"]),
    ("pool2d_forward mode", "pool2d_forward(x, mode='median')", "ValueError", ["mode must be one of"]),
    ("pool2d_backward dout shape", "pool2d_backward(np.zeros((2, 3, 2, 2)), pool2d_forward(x)[1])", "ValueError",
     ["dout must have the forward output's shape (2, 3, 3, 3)"]),
    # halting
    ("halting_forward h above 1", "halting_forward(np.array([[1.5, 0.2]]))", "ValueError", ["h must lie in [0, 1]"]),
    ("halting_forward eps", "halting_forward(np.array([[0.5]]), eps=1.5)", "ValueError", ["eps must be in (0, 1)"]),
    ("halting_backward dp shape", "halting_backward(np.ones((2, 2)), None, halting_forward(h)[-1])", "ValueError",
     ["dp must have shape (2, 3)"]),
    ("halting_backward drho shape", "halting_backward(None, np.ones(3), halting_forward(h)[-1])", "ValueError",
     ["drho must have shape (2,)"]),
    ("halting_backward not a cache", "halting_backward(None, np.ones(2), None)", "TypeError", ["cache must be"]),
    ("weighted_output_forward units", "weighted_output_forward(np.full((2, 3), 1 / 3), np.ones((2, 2, 5)))",
     "ValueError", ["units must have shape"]),
    ("weighted_output_backward dout shape",
     "weighted_output_backward(np.ones((2, 4)), np.full((2, 3), 1 / 3), np.ones((3, 2, 5)))", "ValueError",
     ["dout must have shape (2, 5)"]),
    # distributions
    ("relaxed_bernoulli_forward temperature nan", "relaxed_bernoulli_forward(np.zeros(2), float('nan'), u2)",
     "ValueError", ["temperature must be positive and finite"]),
    ("relaxed_bernoulli_forward temperature inf", "relaxed_bernoulli_forward(np.zeros(2), float('inf'), u2)",
     "ValueError", ["temperature must be positive and finite"]),
    ("relaxed_bernoulli_forward temperature 0", "relaxed_bernoulli_forward(np.zeros(2), 0.0, u2)", "ValueError",
     ["temperature"]),
    ("relaxed_bernoulli_forward temperature -1", "relaxed_bernoulli_forward(np.zeros(2), -1.0, u2)", "ValueError",
     ["temperature"]),
    ("relaxed_bernoulli_forward temperature str", "relaxed_bernoulli_forward(np.zeros(2), '1', u2)", "TypeError",
     ["temperature"]),
    ("relaxed_bernoulli_backward dz shape", "relaxed_bernoulli_backward(np.ones(3), relaxed_bernoulli_forward(np.zeros(2), 1.0, u2)[1])",
     "ValueError", ["dz must have shape (2,)"]),
    ("kl_to_prior_forward q not a distribution", "kl_to_prior_forward(np.log([0.5, 0.6, 0.2]), log_prior)",
     "ValueError", ["log_q must be the log of a distribution", "1.3"]),
    ("kl_to_prior_forward logits for log q", "kl_to_prior_forward(np.array([0.3, -1.0, 2.0]), log_prior)",
     "ValueError", ["log_q must be the log of a distribution"]),
    ("kl_to_prior_forward NaN log q", "kl_to_prior_forward(np.array([np.nan, 0.0, 0.0]), log_prior)", "ValueError",
     ["log_q must be log-probabilities", "nan"]),
    ("kl_to_prior_forward prior not a distribution", "kl_to_prior_forward(np.log([0.5, 0.3, 0.2]), np.zeros(3))",
     "ValueError", ["log_prior must be the log of a distribution"]),
    ("kl_to_prior_forward axes", "kl_to_prior_forward(np.log([0.5, 0.5]), log_prior)", "ValueError",
     ["log_q and log_prior must share the last axis"]),
    ("kl_to_prior_backward dkl shape",
     "kl_to_prior_backward(np.ones(2), kl_to_prior_forward(np.log([0.5, 0.3, 0.2]), log_prior)[1])", "ValueError",
     ["dkl must have shape ()"]),
    ("stick_breaking_forward fraction 1.5", "stick_breaking_forward(np.array([1.5]))", "ValueError",
     ["fractions must lie in [0, 1]"]),
    ("stick_breaking_backward shape", "stick_breaking_backward(np.ones(3), stick_breaking_forward(np.array([0.5]))[1])",
     "ValueError", ["dweights must have shape (2,)"]),
    ("expected_steps_forward scalar", "expected_steps_forward(0.5)", "ValueError", ["h must have at least one axis"]),
    ("expected_steps_backward shape", "expected_steps_backward(np.ones(2), expected_steps_forward(np.array([0.5]))[1])",
     "ValueError", ["dexpected must have shape ()"]),
    ("log_halting_distribution_forward scalar", "log_halting_distribution_forward(0.5)", "ValueError",
     ["logits must have at least one axis"]),
    ("log_halting_distribution_backward shape",
     "log_halting_distribution_backward(np.ones(2), log_halting_distribution_forward(np.zeros(2))[1])", "ValueError",
     ["dlog_q must have shape (3,)"]),
    ("log_halting_probability_grad steps", "log_halting_probability_grad(np.zeros((1, 2)), np.array([4]))",
     "ValueError", ["steps must be integers in [1, 3]"]),
    ("uniform_noise rng", "uniform_noise(3, 0)", "TypeError", ["rng must be a numpy.random.Generator"]),
    ("bernoulli_from_noise u", "bernoulli_from_noise(np.zeros(2), np.array([0.0, 0.5]))", "ValueError",
     ["u must lie strictly inside (0, 1)"]),
    ("first_halt scalar", "first_halt(True)", "ValueError", ["indicators must have at least one axis"]),
    ("relaxed_bernoulli_cdf temperature", "relaxed_bernoulli_cdf(0.5, 0.5, 0.0)", "ValueError", ["temperature"]),
    ("geometric_beta phi", "geometric_beta(1.0)", "ValueError", ["phi must be in (0, 1)"]),
    ("truncated_geometric_log_prob length", "truncated_geometric_log_prob(0.5, 0)", "ValueError",
     ["length must be a positive int"]),
    # the backend registry and the layer
    ("get_backend unknown", "get_backend('cuda')", "ValueError", ["backend must be one of", "'cuda'"]),
    ("get_backend int", "get_backend(3)", "TypeError", ["backend must be a ConvBackend"]),
    ("register_backend name", "register_backend('', NumpyBackend)", "TypeError", ["name must be a non-empty str"]),
    ("Conv2d input channels", "Conv2d(3, 4, 3, np.random.default_rng(0), backend=fast)(x[:, :2].astype(np.float32))",
     "ValueError", ["x must have shape (N, 3, H, W)"]),
    ("Conv2d backward dout shape on cython",
     "layer = Conv2d(3, 4, 3, np.random.default_rng(0), padding=1, backend=fast, dtype=np.float64); layer(x); "
     "layer.backward(np.zeros((2, 4, 6, 5)))", "ValueError", ["dout", "(2, 4, 6, 6)"]),
]

GROUPS = ("public", "numpy", "cython", "opencl")


def _cases():
    """``{case id: (group, code, error, needles)}`` for every group."""
    cases = {f"public: {name}": ("public", code, error, needles) for name, code, error, needles in PUBLIC_CASES}
    for group in GROUPS[1:]:
        for name, code, error, needles in BACKEND_CASES:
            cases[f"{group}: {name}"] = (group, code, error, needles)
    return cases


CASES = _cases()


# ---------------------------------------------------------------------------------------------
# The worker (this file run as a script)
# ---------------------------------------------------------------------------------------------


def _namespace(group):
    """The names the cases use: fixtures, the public API, and ``be`` (this group's backend)."""
    import refimpl
    from refimpl import conv, distributions, halting, implicit, perforation, pooling
    from refimpl.backend import NumpyBackend, get_backend, register_backend
    from refimpl.conv import ConvGeometry
    from refimpl.conv_layer import Conv2d

    ns = {"np": np, "NumpyBackend": NumpyBackend, "get_backend": get_backend,
          "register_backend": register_backend, "Conv2d": Conv2d, "refimpl": refimpl}
    for module in (conv, distributions, halting, implicit, perforation, pooling):
        ns.update({k: v for k, v in vars(module).items() if not k.startswith("_")})
    rng = np.random.default_rng(0)
    ns["x"] = rng.standard_normal((2, 3, 6, 6))
    ns["x3"] = rng.standard_normal((3, 3, 6, 6))
    ns["w"] = rng.standard_normal((4, 3, 3, 3))
    ns["w5"] = rng.standard_normal((4, 5, 3, 3))
    ns["b"] = rng.standard_normal(4)
    ns["plan"] = perforation.PerforationPlan(np.ones((6, 6), bool))
    ns["plan2"] = perforation.PerforationPlan(rng.random((2, 6, 6)) < 0.5)
    ns["g"] = ConvGeometry((3, 3), (1, 1), (1, 1), (6, 6), (6, 6))
    ns["src"] = rng.standard_normal((2, 3, 36))
    ns["table"] = implicit.compose_index_table(implicit.dense_index_map((6, 6)), 3, 1, 1)
    ns["pool_table"] = implicit.compose_index_table(implicit.dense_index_map((6, 6)), 2, 2, 0)
    ns["h"] = np.array([[0.2, 0.3], [0.9, 0.5]])
    ns["u2"] = np.full(2, 0.5)
    ns["log_prior"] = distributions.truncated_geometric_log_prob(0.3, 3)

    def poke(table, value, index=(0, 0, 0)):
        """A writable copy of ``table`` with one entry changed."""
        table = np.array(table)
        table[index] = value
        return table

    class FakePlan:
        """Looks like a plan, with an index map pointing far outside the compact tensor."""

        shared, batch, width, out_hw, full = True, 1, 36, (6, 6), False
        index_map = np.full((1, 6, 6), 10**8, dtype=np.int32)
        positions = np.arange(36, dtype=np.int32)[None]
        counts = np.array([36], dtype=np.int32)

    class BadMapPlan(perforation.PerforationPlan):
        """A subclass with its own fill map, one entry past the compact axis."""

        @property
        def index_map(self):
            index_map = np.arange(36, dtype=np.int32).reshape(1, 6, 6)
            index_map[0, 5, 5] = 36
            return index_map

    ns["poke"], ns["FakePlan"], ns["BadMapPlan"] = poke, FakePlan, BadMapPlan
    if group in ("cython", "opencl"):
        ns["be"] = get_backend(group)
    elif group == "numpy":
        ns["be"] = NumpyBackend()
    ns["fast"] = get_backend("cython") if group == "public" and _usable("cython") else None
    return ns


def _usable(name):
    import fastpath

    return fastpath.available_backends()[name].usable


def _worker(group, cases):
    ns = _namespace(group)
    for name, code in cases.items():
        print(json.dumps({"case": name, "started": True}), flush=True)
        try:
            exec(code, dict(ns))  # noqa: S102 - the case table above, nothing from outside
        except Exception as exc:  # noqa: BLE001 - the type is what the test checks
            outcome = {"raised": type(exc).__name__, "message": str(exc)}
        else:
            outcome = {"raised": None, "message": "returned without an error"}
        print(json.dumps({"case": name, **outcome}), flush=True)


def run_cases(group, cases, timeout=120):
    """Run ``cases`` (name -> code) of ``group`` in worker subprocesses.

    Returns ``{name: outcome}``; a case that kills its worker gets ``{"crashed": ...}`` and a new
    worker runs the cases after it.
    """
    results, pending = {}, list(cases)
    while pending:
        proc = subprocess.run([sys.executable, __file__, group], input=json.dumps({n: cases[n] for n in pending}),
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PONDER_THREADS": "2"})
        started = None
        for line in proc.stdout.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("started"):
                started = record["case"]
            else:
                results[record["case"]] = record
                started = None
        if proc.returncode != 0 or started is not None:
            if started is None:  # died before its first case: report it on every pending one
                for name in pending:
                    results.setdefault(name, {"crashed": f"worker failed (exit {proc.returncode}): {proc.stderr[-2000:]}"})
                break
            results[started] = {"crashed": f"exit status {proc.returncode}: {proc.stderr[-2000:]}"}
        pending = [n for n in pending if n not in results]
    return results


# ---------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------


def _group_status(group):
    if group in ("public", "numpy"):
        return True, ""
    import fastpath

    status = fastpath.available_backends()[group]
    return status.usable, status.reason


@pytest.fixture(scope="module")
def outcomes():
    """Every case's outcome, run once per module in one worker per group (more after a crash)."""
    results = {}
    for group in GROUPS:
        usable, _ = _group_status(group)
        if usable:
            results.update(run_cases(group, {n: c[1] for n, c in CASES.items() if c[0] == group}))
    return results


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_malformed_input_is_rejected_by_name(outcomes, case):
    group, code, error, needles = CASES[case]
    usable, reason = _group_status(group)
    if not usable:
        pytest.skip(f"{group} backend unavailable: {reason}")
    outcome = outcomes[case]
    assert "crashed" not in outcome, f"{code!r} crashed the process: {outcome['crashed']}"
    assert outcome["raised"] == error, f"{code!r}: expected {error}, got {outcome['raised']}: {outcome['message']}"
    for needle in needles:
        assert needle in outcome["message"], f"{code!r}: {needle!r} not in the message {outcome['message']!r}"


def test_a_crash_is_attributed_to_its_case():
    # The harness itself: a case that kills its worker fails alone, and the cases after it still run.
    results = run_cases("public", {"before": "realised_rate([[True]])", "crash": "import os; os.abort()",
                                   "after": "get_backend(3)"})
    assert results["before"]["raised"] == "TypeError"
    assert "crashed" in results["crash"]
    assert results["after"]["raised"] == "TypeError"


# ---------------------------------------------------------------------------------------------
# Determinism of the Cython backward at a fixed thread count
# ---------------------------------------------------------------------------------------------


def _cython(threads):
    from fastpath import cython_backend

    if cython_backend._kernels is None:
        pytest.skip(cython_backend.status().reason)
    # Tiny chunks and no single-thread shortcut: both threads work and every call merges partials.
    return cython_backend.CythonBackend(threads=threads, chunk_bytes=512, parallel_work=0)


@pytest.mark.parametrize("table", [False, True], ids=["perforated", "table"])
def test_cython_backward_is_bit_identical_over_20_calls_with_2_threads(table):
    from refimpl.implicit import compose_index_table
    from refimpl.masks import uniform_mask
    from refimpl.perforation import PerforationPlan, perforated_conv2d_backward, perforated_conv2d_forward

    backend = _cython(2)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((16, 8, 12, 12))
    w = rng.standard_normal((8, 8, 3, 3))
    plan = PerforationPlan(uniform_mask((12, 12), 0.3, rng))
    if table:
        src = rng.standard_normal((16, 8, plan.width))
        out, cache = backend.table_conv_forward(src, compose_index_table(plan.index_map, 3, 1, 1), w, None)
        backward = backend.table_conv_backward
    else:
        out, cache = perforated_conv2d_forward(x, w, None, plan, 1, 1, backend=backend)
        backward = perforated_conv2d_backward
    dout = rng.standard_normal(out.shape)
    first = backward(dout, cache)
    for _ in range(20):
        for got, want in zip(backward(dout, cache), first):
            np.testing.assert_array_equal(got, want)


def test_two_thread_training_run_is_reproducible_from_its_seed():
    from refimpl.models import build_model
    from refimpl.optim import SGD
    from refimpl.training import train_step

    backend = _cython(2)

    def run(seed):
        rng = np.random.default_rng(seed)
        model = build_model("resnet8", 4, 1, rng, backend=backend, widths=(4, 8, 8),
                            perforation={"stages.0.units.0.conv1": ("uniform", 0.5)})
        optimizer = SGD(list(model.named_parameters()), 0.05, momentum=0.9)
        for _ in range(4):
            x = rng.random((16, 1, 8, 8), dtype=np.float32)
            train_step(model, x, rng.integers(0, 4, 16), optimizer)
        return {name: value.copy() for name, value, _ in model.named_parameters()}

    first, second = run(7), run(7)
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    assert any(not np.array_equal(first[n], v) for n, v in run(8).items())  # the seed matters


if __name__ == "__main__":
    _worker(sys.argv[1], json.loads(sys.stdin.read()))
