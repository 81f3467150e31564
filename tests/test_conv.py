"""Dense convolution: hand-computed goldens, and the im2row reference against the loop oracle."""

import numpy as np
import pytest
from hypothesis import given

from refimpl.conv import ConvGeometry, conv2d_forward, conv2d_naive, conv_flops, conv_output_shape, im2row, row2im
from strategies import conv_geometries, conv_problems, random_conv_arrays, rngs
from tolerances import assert_close


def as_image(rows, dtype):
    """A (1, 1, H, W) image from nested lists."""
    return np.array(rows, dtype=dtype)[None, None]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])  # small integers are exact in both
@pytest.mark.parametrize("conv", [conv2d_naive, lambda *a, **k: conv2d_forward(*a, **k)[0]],
                         ids=["naive", "im2row"])
class TestGolden:
    def test_3x3_input_2x2_kernel(self, conv, dtype):
        # x = [[1 2 3]     w = [[1 2]    b = 1
        #      [4 5 6]          [3 4]]
        #      [7 8 9]]
        # out[0,0] = 1*1 + 2*2 + 3*4 + 4*5 + 1 = 38
        # out[0,1] = 1*2 + 2*3 + 3*5 + 4*6 + 1 = 48
        # out[1,0] = 1*4 + 2*5 + 3*7 + 4*8 + 1 = 68
        # out[1,1] = 1*5 + 2*6 + 3*8 + 4*9 + 1 = 78
        out = conv(as_image([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype), as_image([[1, 2], [3, 4]], dtype),
                   np.array([1.0], dtype))
        assert out.dtype == dtype
        np.testing.assert_array_equal(out, as_image([[38, 48], [68, 78]], dtype))

    def test_stride_2(self, conv, dtype):
        # x = arange(16) as 4x4, w = [[1 2], [3 4]], stride 2: windows start at (0,0), (0,2), (2,0), (2,2)
        # out[0,0] = 0*1 + 1*2 + 4*3 + 5*4     = 34
        # out[0,1] = 2*1 + 3*2 + 6*3 + 7*4     = 54
        # out[1,0] = 8*1 + 9*2 + 12*3 + 13*4   = 114
        # out[1,1] = 10*1 + 11*2 + 14*3 + 15*4 = 134
        x = np.arange(16, dtype=dtype).reshape(1, 1, 4, 4)
        out = conv(x, as_image([[1, 2], [3, 4]], dtype), None, stride=2)
        np.testing.assert_array_equal(out, as_image([[34, 54], [114, 134]], dtype))

    def test_padding_1(self, conv, dtype):
        # x = [[1 2], [3 4]] zero-padded to 4x4; w has 1 at (0,0) and 2 at (2,2):
        # out[y,x] = xp[y,x] + 2*xp[y+2,x+2]
        # out[0,0] = xp[0,0] + 2*xp[2,2] = 0 + 2*4 = 8
        # out[0,1] = xp[0,1] + 2*xp[2,3] = 0 + 0   = 0
        # out[1,0] = xp[1,0] + 2*xp[3,2] = 0 + 0   = 0
        # out[1,1] = xp[1,1] + 2*xp[3,3] = 1 + 0   = 1
        w = as_image([[1, 0, 0], [0, 0, 0], [0, 0, 2]], dtype)
        out = conv(as_image([[1, 2], [3, 4]], dtype), w, None, padding=1)
        np.testing.assert_array_equal(out, as_image([[8, 0], [0, 1]], dtype))

    def test_channels_1x1_kernel(self, conv, dtype):
        # 1x1 kernel mixes channels only: out[k] = sum_c w[k,c] x[c] + b[k]
        # x[0] = [[1 2]], x[1] = [[10 20]]; w = [[1, 1], [2, -1]]; b = [0, 5]
        # out[0] = [[1+10, 2+20]] = [[11 22]]; out[1] = [[2-10+5, 4-20+5]] = [[-3 -11]]
        x = np.array([[[[1, 2]], [[10, 20]]]], dtype=dtype)
        w = np.array([[1, 1], [2, -1]], dtype=dtype).reshape(2, 2, 1, 1)
        out = conv(x, w, np.array([0.0, 5.0], dtype))
        np.testing.assert_array_equal(out, np.array([[[[11, 22]], [[-3, -11]]]]))


def test_output_shape_formula():
    # Ho = floor((H + 2p - k) / s) + 1: (7 + 2 - 3) // 2 + 1 = 4 and (5 + 0 - 5) // 1 + 1 = 1
    assert conv_output_shape((7, 5), (3, 5), stride=(2, 1), padding=(1, 0)) == (4, 1)


def test_conv_flops_golden():
    # 2 * C * kh * kw * K per position: 2 * 2 * 3 * 3 * 3 * 5 = 540
    assert conv_flops(5, 2, 3, (3, 3)) == 540


@given(conv_problems(with_mask=False))
def test_im2row_equals_naive(problem):
    x, w, b, stride, padding, _ = problem
    out, _ = conv2d_forward(x, w, b, stride, padding)
    expected = conv2d_naive(x, w, b, stride, padding)
    assert out.dtype == x.dtype
    assert_close(out, expected)


@given(conv_geometries(), rngs())
def test_row2im_is_the_adjoint_of_im2row(geometry, rng):
    # <im2row(x), r> == <x, row2im(r)> for random x and r: row2im is the exact transpose.
    x, _, _ = random_conv_arrays(geometry, np.float64, rng)
    g = ConvGeometry(geometry.kernel, geometry.stride, geometry.padding, geometry.in_hw, geometry.out_hw)
    rows = im2row(x, g)
    r = rng.standard_normal(rows.shape)
    lhs, rhs = np.sum(rows * r), np.sum(x * row2im(r, x.shape, g))
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs))
