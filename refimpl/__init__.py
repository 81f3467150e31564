"""ponder's reference implementation: every concept of adaptive computation in plain NumPy.

Pure NumPy with hand-written backward passes; never imports :mod:`fastpath`. Start with
:mod:`refimpl.conv` (dense convolution), then :mod:`refimpl.masks` and
:mod:`refimpl.perforation` (perforated convolution), then :mod:`refimpl.implicit`
(implicit interpolation). The convolution backend seam is :mod:`refimpl.backend`.
"""

from .backend import BackendUnavailableError, ConvBackend, NumpyBackend, get_backend, register_backend
from .conv import conv2d_backward, conv2d_forward, conv2d_naive, conv_flops, conv_output_shape
from .implicit import (
    compose_index_table,
    implicit_conv2d_backward,
    implicit_conv2d_forward,
    implicit_pool2d_backward,
    implicit_pool2d_forward,
)
from .masks import MASK_TYPES, grid_mask, impact_mask, impact_scores, make_mask, structure_mask, uniform_mask
from .perforation import (
    PerforationPlan,
    nearest_index,
    perforated_conv2d_backward,
    perforated_conv2d_forward,
    perforated_conv_flops,
    realised_rate,
)
from .pooling import pool2d_backward, pool2d_forward

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError", "ConvBackend", "NumpyBackend", "get_backend", "register_backend",
    "conv2d_forward", "conv2d_backward", "conv2d_naive", "conv_flops", "conv_output_shape",
    "compose_index_table", "implicit_conv2d_forward", "implicit_conv2d_backward",
    "implicit_pool2d_forward", "implicit_pool2d_backward",
    "MASK_TYPES", "grid_mask", "impact_mask", "impact_scores", "make_mask", "structure_mask", "uniform_mask",
    "PerforationPlan", "nearest_index", "perforated_conv2d_forward", "perforated_conv2d_backward",
    "perforated_conv_flops", "realised_rate", "pool2d_forward", "pool2d_backward",
]

# Small pretrained networks shipped with the package (refimpl.pretrained).
from .pretrained import list_pretrained, load_pretrained  # noqa: E402

__all__ += ["list_pretrained", "load_pretrained"]
