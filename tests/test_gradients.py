"""Every hand-written backward against central differences (float64, random upstream gradient)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.conv import conv2d_backward, conv2d_forward
from refimpl.gradcheck import check_directional, check_gradients
from refimpl.implicit import (
    implicit_conv2d_backward,
    implicit_conv2d_forward,
    implicit_pool2d_backward,
    implicit_pool2d_forward,
)
from refimpl.perforation import perforated_conv2d_backward, perforated_conv2d_forward
from refimpl.pooling import pool2d_backward, pool2d_forward
from strategies import conv_problems, implicit_problems, pool_problems, rngs
from tolerances import GRADCHECK_RTOL

SMALL = {"max_batch": 2, "max_channels": 2, "max_hw": 5, "max_kernel": 3}
F64 = (np.float64,)


class Recorder:
    """Wraps a ``*_forward`` so that the backward can use the cache of the latest call."""

    def __init__(self, forward, backward, names):
        self.forward_fn, self.backward_fn, self.names = forward, backward, names
        self.cache = None

    def forward(self, **inputs):
        out, self.cache = self.forward_fn(**inputs)
        return out

    def backward(self, dout):
        grads = self.backward_fn(dout, self.cache)
        grads = grads if isinstance(grads, tuple) else (grads,)
        return dict(zip(self.names, grads))


def assert_gradients_ok(recorder, inputs, rng):
    errors = check_gradients(recorder.forward, recorder.backward, inputs, rng)
    assert set(errors) == set(inputs)
    assert max(errors.values()) < GRADCHECK_RTOL, errors


@given(conv_problems(dtypes=F64, with_mask=False, **SMALL), rngs())
def test_dense_conv_backward(problem, rng):
    x, w, b, stride, padding, _ = problem
    rec = Recorder(lambda x, w, b: conv2d_forward(x, w, b, stride, padding), conv2d_backward, ("x", "w", "b"))
    assert_gradients_ok(rec, {"x": x, "w": w, "b": b}, rng)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("output,fill", [("dense", "nearest"), ("dense", "zero"), ("compact", "nearest")])
@given(data=st.data(), rng=rngs())
def test_perforated_conv_backward(per_sample, output, fill, data, rng):
    # masks: full, single-position, random, uniform, grid; per-sample ones differ in size
    x, w, b, stride, padding, mask = data.draw(conv_problems(dtypes=F64, per_sample=per_sample, **SMALL))
    rec = Recorder(lambda x, w, b: perforated_conv2d_forward(x, w, b, mask, stride, padding, fill=fill,
                                                             output=output),
                   perforated_conv2d_backward, ("x", "w", "b"))
    assert_gradients_ok(rec, {"x": x, "w": w, "b": b}, rng)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
@given(data=st.data(), rng=rngs())
def test_implicit_conv_backward(per_sample, data, rng):
    problem = data.draw(implicit_problems(dtypes=F64, layers=("conv",), per_sample=per_sample, max_hw=5))
    compact, plan, _, w, b, _, stride, padding = problem
    rec = Recorder(lambda compact, w, b: implicit_conv2d_forward(compact, plan, w, b, stride, padding),
                   implicit_conv2d_backward, ("compact", "w", "b"))
    assert_gradients_ok(rec, {"compact": compact, "w": w, "b": b}, rng)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("mode", ["max", "avg"])
@given(data=st.data(), rng=rngs())
def test_implicit_pool_backward(per_sample, mode, data, rng):
    # compact values are >= 0.25 apart, so max pooling has no ties within h = 1e-6
    problem = data.draw(implicit_problems(dtypes=F64, layers=(mode,), per_sample=per_sample, max_hw=5))
    compact, plan, mode, _, _, size, stride, padding = problem
    rec = Recorder(lambda compact: implicit_pool2d_forward(compact, plan, mode, size, stride, padding),
                   implicit_pool2d_backward, ("compact",))
    assert_gradients_ok(rec, {"compact": compact}, rng)


@pytest.mark.parametrize("mode", ["max", "avg"])
@given(data=st.data(), rng=rngs())
def test_dense_pool_backward(mode, data, rng):
    x, mode, size, stride, padding = data.draw(pool_problems(dtypes=F64, modes=(mode,), max_hw=6))  # no max ties
    rec = Recorder(lambda x: pool2d_forward(x, mode, size, stride, padding), pool2d_backward, ("x",))
    assert_gradients_ok(rec, {"x": x}, rng)


def wrong_conv_backward(dout, cache):
    """A plausible bug: the bias gradient scaled by the batch size (a sum/mean mix-up)."""
    dx, dw, db = conv2d_backward(dout, cache)
    return dx, dw, db * dout.shape[0]


def test_check_directional_accepts_right_and_rejects_wrong_gradients():
    # Directional check on a layer too large to difference coordinate by coordinate (~4000 inputs).
    rng = np.random.default_rng(7)
    x, w, b = rng.standard_normal((2, 4, 16, 16)), rng.standard_normal((5, 4, 3, 3)), rng.standard_normal(5)
    mask = rng.random((8, 8)) < 0.5
    mask[0, 0] = True
    inputs = {"x": x, "w": w, "b": b}
    right = Recorder(lambda x, w, b: perforated_conv2d_forward(x, w, b, mask, 2, 1), perforated_conv2d_backward,
                     ("x", "w", "b"))
    assert check_directional(right.forward, right.backward, inputs, rng) < GRADCHECK_RTOL
    wrong = Recorder(lambda x, w, b: conv2d_forward(x, w, b, 2, 1), wrong_conv_backward, ("x", "w", "b"))
    assert check_directional(wrong.forward, wrong.backward, inputs, rng) > 1e-3


def test_check_gradients_rejects_a_wrong_gradient():
    rng = np.random.default_rng(8)
    inputs = {"x": rng.standard_normal((2, 1, 3, 3)), "w": rng.standard_normal((2, 1, 2, 2)),
              "b": rng.standard_normal(2)}
    wrong = Recorder(lambda x, w, b: conv2d_forward(x, w, b), wrong_conv_backward, ("x", "w", "b"))
    errors = check_gradients(wrong.forward, wrong.backward, inputs, rng)
    assert errors["b"] > 0.1 and errors["x"] < GRADCHECK_RTOL and errors["w"] < GRADCHECK_RTOL


def test_random_upstream_catches_what_sum_hides():
    # f(x) = 3x; the backward returns the upstream gradient reversed (a transposition bug).
    # With the all-ones gradient of sum() it would be right; a random upstream exposes it.
    def forward(x):
        return 3 * x

    def reversed_backward(dout):
        return {"x": 3 * dout[::-1]}

    x = np.random.default_rng(1).standard_normal(6)
    assert check_gradients(forward, reversed_backward, {"x": x}, np.random.default_rng(2))["x"] > 0.1
    assert check_directional(forward, reversed_backward, {"x": x}, np.random.default_rng(2)) > 1e-3
    assert check_gradients(forward, lambda d: {"x": 3 * d}, {"x": x}, np.random.default_rng(2))["x"] < GRADCHECK_RTOL
