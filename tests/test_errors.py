"""Bad input at the public boundary: the right exception, naming the argument, what was expected
and what came (docs/spec.md §1.4)."""

import re

import numpy as np
import pytest

from refimpl.conv import conv2d_backward, conv2d_forward, conv2d_naive, conv_output_shape
from refimpl.gradcheck import check_directional, check_gradients
from refimpl.implicit import (
    compose_index_table,
    implicit_conv2d_backward,
    implicit_conv2d_forward,
    implicit_pool2d_backward,
    implicit_pool2d_forward,
)
from refimpl.masks import grid_mask, impact_mask, impact_scores, make_mask, structure_mask, uniform_mask
from refimpl.perforation import PerforationPlan, nearest_index, perforated_conv2d_backward, perforated_conv2d_forward
from refimpl.pooling import pool2d_backward, pool2d_forward

rng = np.random.default_rng(0)
X = rng.standard_normal((2, 3, 5, 5))
W = rng.standard_normal((4, 3, 3, 3))
B = rng.standard_normal(4)
MASK = np.eye(3, dtype=bool)  # output of X * W is 3x3


def perforated(x=X, w=W, b=B, mask=MASK, **kwargs):
    return perforated_conv2d_forward(x, w, b, mask, **kwargs)


def dense(x=X, w=W, b=B, **kwargs):
    return conv2d_forward(x, w, b, **kwargs)


CONVS = [dense, perforated, lambda x=X, w=W, b=B, **kw: (conv2d_naive(x, w, b, **kw), None)]
CONV_IDS = ["dense", "perforated", "naive"]


@pytest.mark.parametrize("conv", CONVS, ids=CONV_IDS)
class TestConvArguments:
    def test_wrong_ndim(self, conv):
        with pytest.raises(ValueError, match=re.escape("x must be 4-dimensional, got shape (3, 5, 5)")):
            conv(x=X[0])
        with pytest.raises(ValueError, match=re.escape("w must be 4-dimensional, got shape (4, 27)")):
            conv(w=W.reshape(4, 27))
        with pytest.raises(ValueError, match=re.escape("b must be 1-dimensional, got shape (4, 1)")):
            conv(b=B[:, None])

    def test_wrong_dtype(self, conv):
        with pytest.raises(TypeError, match="x must have dtype float32 or float64, got int64"):
            conv(x=X.astype(np.int64))
        with pytest.raises(TypeError, match="w must have dtype float32 or float64, got float16"):
            conv(w=W.astype(np.float16))
        with pytest.raises(TypeError, match="x must be a numpy array, got str"):
            conv(x="image")

    def test_mixed_dtypes(self, conv):
        with pytest.raises(TypeError, match="x=float32, w=float64, b=float64"):
            conv(x=X.astype(np.float32))

    def test_channel_mismatch(self, conv):
        with pytest.raises(ValueError, match=re.escape("w has 2 input channels (w.shape[1]) but x has 3")):
            conv(w=W[:, :2])

    def test_bias_length(self, conv):
        with pytest.raises(ValueError, match=re.escape("b must have shape (4,) to match w.shape[0], got (3,)")):
            conv(b=B[:3])

    def test_kernel_larger_than_padded_input(self, conv):
        with pytest.raises(ValueError, match="kernel 6x6 is larger than the padded input 5x5"):
            conv(w=rng.standard_normal((4, 3, 6, 6)))

    def test_nan_and_inf(self, conv):
        x = X.copy()
        x[1, 2, 3, 4] = np.nan
        with pytest.raises(ValueError, match=re.escape("x must be finite, got 1 NaN/inf value(s), the first at index (1, 2, 3, 4)")):
            conv(x=x)
        w = W.copy()
        w[0, 0, 0, 0] = -np.inf
        with pytest.raises(ValueError, match="w must be finite"):
            conv(w=w)
        with pytest.raises(ValueError, match="b must be finite"):
            conv(b=np.full(4, np.inf))

    def test_empty_axis(self, conv):
        with pytest.raises(ValueError, match=re.escape("x must have no empty axis, got shape (0, 3, 5, 5)")):
            conv(x=X[:0])
        with pytest.raises(ValueError, match=re.escape("w must have no empty axis, got shape (0, 3, 3, 3)")):
            conv(w=W[:0], b=B[:0])

    def test_stride_and_padding(self, conv):
        with pytest.raises(ValueError, match="stride must be at least 1, got 0"):
            conv(stride=0)
        with pytest.raises(TypeError, match=re.escape("stride must be an int or a pair of ints, got (1.5, 1)")):
            conv(stride=(1.5, 1))  # regression: was truncated to 1 silently
        with pytest.raises(TypeError, match="padding must be an int or a pair of ints, got 1.0"):
            conv(padding=1.0)
        with pytest.raises(ValueError, match=re.escape("padding must be non-negative, got (0, -1)")):
            conv(padding=(0, -1))
        with pytest.raises(ValueError, match=re.escape("stride must be an int or a pair of ints, got 3 values (1, 1, 1)")):
            conv(stride=(1, 1, 1))


class TestMasksAtTheConvolution:
    def test_empty_mask(self):
        with pytest.raises(ValueError, match="mask must select at least one position per sample, got an empty mask"):
            perforated(mask=np.zeros((3, 3), dtype=bool))

    def test_empty_sample_of_a_per_sample_mask(self):
        mask = np.ones((2, 3, 3), dtype=bool)
        mask[1] = False
        with pytest.raises(ValueError, match=re.escape("got an empty mask (sample 1)")):
            perforated(mask=mask)

    def test_wrong_shape(self):
        with pytest.raises(ValueError, match=re.escape("mask must have shape (3, 3) or (2, 3, 3), got (3, 4)")):
            perforated(mask=np.ones((3, 4), dtype=bool))
        with pytest.raises(ValueError, match=re.escape("mask must have shape (3, 3) or (2, 3, 3), got (5, 3, 3)")):
            perforated(mask=np.ones((5, 3, 3), dtype=bool))

    def test_non_boolean(self):
        with pytest.raises(TypeError, match="mask must have dtype bool, got int64"):
            perforated(mask=np.ones((3, 3), dtype=np.int64))
        with pytest.raises(TypeError, match="mask must be a boolean numpy array, got list"):
            perforated(mask=[[True] * 3] * 3)

    def test_plan_for_another_output_size(self):
        with pytest.raises(ValueError, match=re.escape("mask is for outputs of size (2, 2), but this convolution gives (3, 3)")):
            perforated(mask=PerforationPlan(np.ones((2, 2), dtype=bool)))

    def test_per_sample_plan_for_another_batch(self):
        with pytest.raises(ValueError, match="mask is per-sample for 3 samples but the batch has 2"):
            perforated(mask=PerforationPlan(np.ones((3, 3, 3), dtype=bool)))

    def test_fill_output_backend(self):
        with pytest.raises(ValueError, match=re.escape("fill must be one of ['nearest', 'zero'], got 'linear'")):
            perforated(fill="linear")
        with pytest.raises(ValueError, match=re.escape("fill must be one of ['nearest', 'zero'], got ['zero']")):
            perforated(fill=["zero"])  # regression: "unhashable type: 'list'"
        with pytest.raises(ValueError, match="output must be one of \\['compact', 'dense'\\], got 'sparse'"):
            perforated(output="sparse")
        with pytest.raises(ValueError, match="backend must be one of .*got 'no-such-backend'"):
            perforated(backend="no-such-backend")


class TestPlanAndNearestIndex:
    def test_plan_mask_types(self):
        with pytest.raises(ValueError, match=re.escape("mask must have shape (Ho, Wo) or (N, Ho, Wo), got shape (9,)")):
            PerforationPlan(np.ones(9, dtype=bool))
        with pytest.raises(TypeError, match="mask must have dtype bool, got float64"):
            PerforationPlan(np.ones((3, 3)))
        with pytest.raises(ValueError, match="mask must not be empty, got shape \\(0, 3, 3\\)"):
            PerforationPlan(np.ones((0, 3, 3), dtype=bool))  # regression: crashed inside numpy

    def test_nearest_index_arguments(self):
        with pytest.raises(ValueError, match="got an empty mask"):
            nearest_index(np.zeros((2, 2), dtype=bool))
        with pytest.raises(ValueError, match=re.escape("mask must have shape (Ho, Wo), got shape (1, 2, 2)")):
            nearest_index(np.ones((1, 2, 2), dtype=bool))
        with pytest.raises(ValueError, match="tie_break must be one of \\['random', 'raster'\\], got 'first'"):
            nearest_index(MASK, tie_break="first")
        with pytest.raises(TypeError, match="rng must be a numpy.random.Generator .*got NoneType"):
            nearest_index(MASK, tie_break="random")
        with pytest.raises(TypeError, match="rng must be a numpy.random.Generator .*got int"):
            PerforationPlan(MASK, tie_break="random", rng=0)


class TestMaskGenerators:
    @pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan")])
    def test_rate_outside_unit_interval(self, bad):
        for make in (uniform_mask, grid_mask):
            with pytest.raises(ValueError, match=re.escape(f"rate must be in [0, 1), got {bad!r}")):
                make((4, 4), bad, np.random.default_rng(0))
        with pytest.raises(ValueError, match="rate must be in"):
            structure_mask((4, 4), bad, np.random.default_rng(0), pool_size=2)

    def test_rate_type(self):
        with pytest.raises(TypeError, match="rate must be a real number in \\[0, 1\\), got '0.5'"):
            uniform_mask((4, 4), "0.5", np.random.default_rng(0))

    def test_rng_required(self):
        with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
            uniform_mask((4, 4), 0.5, 42)

    def test_out_hw(self):
        with pytest.raises(ValueError, match=re.escape("out_hw must be at least 1, got (0, 4)")):
            grid_mask((0, 4), 0.5, np.random.default_rng(0))
        with pytest.raises(TypeError, match="out_hw must be a pair of ints \\(Ho, Wo\\), got 4"):
            grid_mask(4, 0.5, np.random.default_rng(0))
        with pytest.raises(TypeError, match=re.escape("out_hw must be an int or a pair of ints, got (4.5, 4)")):
            uniform_mask((4.5, 4), 0.5, np.random.default_rng(0))  # regression: was truncated

    def test_make_mask_arguments(self):
        r = np.random.default_rng(0)
        with pytest.raises(ValueError, match="kind must be one of .*got 'random'"):
            make_mask("random", (4, 4), 0.5, r)
        with pytest.raises(ValueError, match="kind='structure' needs pool_size="):
            make_mask("structure", (4, 4), 0.5, r)
        with pytest.raises(TypeError, match=re.escape("unexpected keyword argument(s) ['pool_sise']")):
            make_mask("structure", (4, 4), 0.5, r, pool_sise=2)  # regression: typos were ignored
        with pytest.raises(ValueError, match=re.escape("impact must have shape (4, 4), got (4, 5)")):
            make_mask("impact", (4, 4), 0.5, r, impact=np.ones((4, 5)))

    def test_structure_pool_padding(self):
        # A pooling layer with more padding than half its window does not exist in refimpl.pooling.
        with pytest.raises(ValueError, match=re.escape("pool_padding must be at most half the pooling size (3, 3), got (2, 2)")):
            structure_mask((6, 6), 0.5, np.random.default_rng(0), 3, 1, 2)

    def test_impact_arguments(self):
        v = rng.standard_normal((2, 3, 4, 5))
        with pytest.raises(ValueError, match=re.escape("gradients must have the shape of activations (2, 3, 4, 5), got (2, 3, 5, 4)")):
            impact_scores(v, v.transpose(0, 1, 3, 2))
        with pytest.raises(ValueError, match=re.escape("already_perforated must have shape (4, 5), got (5,)")):
            impact_scores(v, v, np.ones(5, dtype=bool))  # regression: was broadcast over the rows
        with pytest.raises(ValueError, match="impact must be finite"):
            impact_mask(np.array([[np.nan, 1.0]]), 0.5, np.random.default_rng(0))


class TestBackwardGradients:
    def test_dout_shape_is_checked(self):
        out, cache = dense()
        with pytest.raises(ValueError, match=re.escape("dout must have the forward output's shape (2, 4, 3, 3), got (2, 4, 9)")):
            conv2d_backward(out.reshape(2, 4, 9), cache)
        out, cache = perforated()
        with pytest.raises(ValueError, match=re.escape("dout must have the forward output's shape (2, 4, 3, 3), got (1, 4, 3, 3)")):
            perforated_conv2d_backward(out[:1], cache)  # regression: broadcast silently before
        out, cache = perforated(output="compact")
        with pytest.raises(ValueError, match=re.escape("dout must have the forward output's shape (2, 4, 3), got (2, 4, 3, 3)")):
            perforated_conv2d_backward(np.zeros((2, 4, 3, 3)), cache)
        out, cache = pool2d_forward(X, "max", 2)
        with pytest.raises(ValueError, match="dout must have the forward output's shape \\(2, 3, 2, 2\\)"):
            pool2d_backward(np.zeros((2, 3, 2)), cache)

    def test_dout_nan(self):
        out, cache = perforated()
        with pytest.raises(ValueError, match="dout must be finite"):
            perforated_conv2d_backward(np.full(out.shape, np.nan), cache)

    def test_float64_gradient_into_float32_layer_gives_float32(self):
        out, cache = perforated(x=X.astype(np.float32), w=W.astype(np.float32), b=B.astype(np.float32))
        dx, dw, db = perforated_conv2d_backward(np.ones(out.shape), cache)
        assert dx.dtype == dw.dtype == db.dtype == np.float32


class TestImplicit:
    plan = PerforationPlan(MASK)
    compact = rng.standard_normal((2, 4, 3))

    def test_compact_and_plan(self):
        with pytest.raises(ValueError, match="compact must have 3 entries on its last axis \\(the plan's P\\), got 4"):
            implicit_pool2d_forward(rng.standard_normal((2, 4, 4)), self.plan)
        with pytest.raises(TypeError, match="plan must be a PerforationPlan, got ndarray"):
            implicit_pool2d_forward(self.compact, MASK)
        with pytest.raises(ValueError, match="compact must be 3-dimensional"):
            implicit_pool2d_forward(self.compact[0], self.plan)
        with pytest.raises(ValueError, match=re.escape("compact must have no empty axis, got shape (2, 0, 3)")):
            implicit_pool2d_forward(self.compact[:, :0], self.plan)
        with pytest.raises(ValueError, match="plan is per-sample for 3 samples but the batch has 2"):
            implicit_pool2d_forward(self.compact, PerforationPlan(np.ones((3, 3, 1), dtype=bool)))

    def test_conv_arguments(self):
        with pytest.raises(ValueError, match="w has 3 input channels but compact has 4"):
            implicit_conv2d_forward(self.compact, self.plan, W)
        with pytest.raises(ValueError, match=re.escape("w must have no empty axis, got shape (0, 4, 2, 2)")):
            implicit_conv2d_forward(self.compact, self.plan, np.zeros((0, 4, 2, 2)), np.zeros(0))
        with pytest.raises(ValueError, match="kernel 4x4 is larger than the padded input 3x3"):
            implicit_conv2d_forward(self.compact, self.plan, rng.standard_normal((2, 4, 4, 4)))

    def test_pool_arguments(self):
        with pytest.raises(ValueError, match="mode must be one of \\['avg', 'max'\\], got 'median'"):
            implicit_pool2d_forward(self.compact, self.plan, "median")
        with pytest.raises(ValueError, match=re.escape("padding must be at most half the pooling size (2, 2), got (2, 2)")):
            implicit_pool2d_forward(self.compact, self.plan, "max", 2, 1, 2)
        with pytest.raises(ValueError, match="padding must be at most half"):
            pool2d_forward(X, "avg", 3, 1, 2)
        with pytest.raises(ValueError, match=re.escape("x must have no empty axis, got shape (2, 3, 0, 5)")):
            pool2d_forward(X[:, :, :0], "max", 1)
        with pytest.raises(ValueError, match="kernel 6x6 is larger than the padded input 5x5"):
            pool2d_forward(X, "max", 6)

    def test_backward_dout(self):
        out, cache = implicit_conv2d_forward(self.compact, self.plan, rng.standard_normal((5, 4, 2, 2)))
        with pytest.raises(ValueError, match=re.escape("dout must have the forward output's shape (2, 5, 2, 2), got (2, 5, 4)")):
            implicit_conv2d_backward(out.reshape(2, 5, 4), cache)
        out, cache = implicit_pool2d_forward(self.compact, self.plan, "avg", 2, 1)
        with pytest.raises(ValueError, match=re.escape("dout must have the forward output's shape (2, 4, 2, 2), got (2, 4, 2, 1)")):
            implicit_pool2d_backward(out[..., :1], cache)

    def test_compose_index_table(self):
        with pytest.raises(TypeError, match="index_map must be an integer numpy array, got float64"):
            compose_index_table(np.zeros((3, 3)), 2)
        with pytest.raises(ValueError, match="index_map must be non-negative .*got minimum -1"):
            compose_index_table(np.full((3, 3), -1), 2)
        with pytest.raises(ValueError, match=re.escape("out_positions must be raster indices in [0, 4), got values in [0, 4]")):
            compose_index_table(np.zeros((3, 3), dtype=int), 2, out_positions=[0, 4])


def test_register_backend_arguments():
    from refimpl.backend import register_backend

    with pytest.raises(TypeError, match="factory must be callable"):
        register_backend("broken", None)
    with pytest.raises(TypeError, match="name must be a non-empty str, got 3"):
        register_backend(3, object)


def test_conv_output_shape_arguments():
    with pytest.raises(ValueError, match="kernel must be at least 1, got \\(0, 3\\)"):
        conv_output_shape((5, 5), (0, 3))
    with pytest.raises(ValueError, match="in_hw must be at least 1"):
        conv_output_shape((0, 5), 3, padding=2)


class TestGradcheckArguments:
    def test_float32_inputs_are_refused(self):
        with pytest.raises(TypeError, match="inputs\\['x'\\] must be a float64 numpy array, got float32"):
            check_gradients(lambda x: x, lambda g: {"x": g}, {"x": np.ones(3, np.float32)}, np.random.default_rng(0))

    def test_gradient_of_the_wrong_shape(self):
        # Regression: relative_error broadcast (1, 3) against (3, 1) and could report a tiny error.
        def forward(x):
            return 2 * x

        with pytest.raises(ValueError, match=re.escape("gradient of 'x' has shape (1, 3), the input has (3, 1)")):
            check_gradients(forward, lambda g: {"x": 2 * g.T}, {"x": np.ones((3, 1))}, np.random.default_rng(0))
        with pytest.raises(ValueError, match="backward returned no gradient for input 'x'"):
            check_directional(forward, lambda g: {}, {"x": np.ones((3, 1))}, np.random.default_rng(0))


def test_realised_rate_wants_a_boolean_mask():
    # Regression: a float "mask" of probabilities was cast to bool (0.3 -> True) without a word.
    from refimpl.perforation import realised_rate

    with pytest.raises(TypeError, match="mask must have dtype bool, got float64"):
        realised_rate(np.full((2, 2), 0.3))


@pytest.mark.parametrize("stride", [-1, 0, (1, -2)])
def test_a_stride_below_one_is_reported_as_such(stride):
    # -1 used to be reported as "must be non-negative", although 0 is refused as well.
    x, w = np.zeros((1, 1, 5, 5)), np.zeros((1, 1, 3, 3))
    with pytest.raises(ValueError, match=re.escape(f"stride must be at least 1, got {stride!r}")):
        perforated_conv2d_forward(x, w, None, None, stride, 0)
