"""A plain ResNet compiled for inference on channels-last rows: :func:`compile_network`.

``compile_network(model)`` returns a callable that computes ``model(x)`` in evaluation mode (batch
norm with the running statistics) without ever forming an NCHW feature map: the input is
transposed once to rows (N H W, C), and every layer then works on rows with the kernels of the
fused sparse unit (:mod:`fastpath._cython_unit`):

* batch norm + ReLU as one affine-and-clamp pass over the rows;
* each convolution (stem, conv1 — strided in a downsampling unit —, conv2, a projection
  shortcut) gathers its windows through an index map of the input grid, one contiguous copy of C
  values per tap, and makes one BLAS GEMM per chunk of rows;
* the option-A shortcut takes the rows of the subsampled positions and adds them to the first
  channels; the head pools the rows of each sample and applies the linear layer.

The compiled network shares the model's parameter arrays and running statistics (it reads them at
every call), so it stays valid while the model is trained; it refuses a model in training mode.
"""

from __future__ import annotations

import numpy as np

from refimpl.conv_layer import Conv2d
from refimpl.resnet import Identity, PadShortcut, ResNet

from . import cython_unit
from .cython_unit import _kernels, _one_blas_thread, _rows_map, _taps, _weights


def _affine(bn, dtype):
    """Batch norm with its running statistics as ``(center, scale, shift)`` in ``dtype`` (see ``affine_relu_rows``)."""
    inv_std = 1.0 / np.sqrt(bn.buffers["running_var"].astype(np.float64) + bn.eps)
    scale = bn.params["gamma"].astype(np.float64) * inv_std
    return (np.ascontiguousarray(bn.buffers["running_mean"], dtype=dtype), scale.astype(dtype),
            np.ascontiguousarray(bn.params["beta"], dtype=dtype))


class _Grid:
    """The rows of an (n, h, w) grid: its padded map (every position maps to its row) and geometry."""

    def __init__(self, n, h, w, pad):
        self.n, self.h, self.w, self.pad = n, h, w, pad
        self.hm, self.wm = h + 2 * pad, w + 2 * pad
        sample, y, x = np.meshgrid(np.arange(n), np.arange(h), np.arange(w), indexing="ij")
        self.pos = ((sample * self.hm + y + pad) * self.wm + x + pad).astype(np.int64).ravel()
        self.rowmap = _rows_map(n * self.hm * self.wm, self.pos)

    def centres(self, out_hw, stride, padding, kernel):
        """Map indices of the window centres of a convolution from this grid to ``out_hw``."""
        ho, wo = out_hw
        sample, yo, xo = np.meshgrid(np.arange(self.n), np.arange(ho), np.arange(wo), indexing="ij")
        y = yo * stride[0] - padding[0] + kernel[0] // 2
        x = xo * stride[1] - padding[1] + kernel[1] // 2
        return ((sample * self.hm + y + self.pad) * self.wm + x + self.pad).astype(np.int64).ravel()


class CompiledResNet:
    """``compiled(x)``: the logits of a :class:`refimpl.resnet.ResNet` in evaluation mode, on rows.

    Built by :func:`compile_network`; see the module docstring.
    """

    def __init__(self, model, backend):
        self.model, self.backend = model, backend
        self._geometry = {}
        # map padding: the widest half-window of any convolution
        convs = [layer for _, layer in model.named_layers() if isinstance(layer, Conv2d)]
        self.pad = max(max(k // 2 for k in conv.kernel) for conv in convs)

    def _conv(self, conv, src, grid, out_grid, centres, dtype):
        weights = _weights(conv, dtype)
        taps = _taps(conv.kernel, grid.wm)
        rows = centres.size
        out = np.empty((rows, conv.out_channels), dtype=dtype)
        team = self.backend._team(rows * weights[0].size)
        width = weights[0].shape[1]
        chunk = min(max(rows, 1), self.backend._chunk(width, np.dtype(dtype).itemsize))
        scratch = np.empty((team, chunk * width), dtype=dtype)
        _kernels.conv_rows_forward(src, grid.rowmap, centres, taps, *weights, out, scratch, chunk, team)
        return out

    def _bn_relu(self, bn, rows, dtype):
        out = np.empty_like(rows)
        _kernels.affine_relu_rows(rows, *_affine(bn, dtype), out, self.backend._team(rows.size))
        return out

    def _plan(self, n, hw):
        """Grids and window centres of every convolution for inputs (n, ·, *hw), built once per shape."""
        key = (n, tuple(hw))
        if key not in self._geometry:
            model = self.model
            grid = _Grid(n, *hw, self.pad)
            plan = {"stem": (grid, grid, grid.centres(hw, model.stem.stride, model.stem.padding, model.stem.kernel))}
            for s, stage in enumerate(model.stages):
                for u, unit in enumerate(stage.units):
                    out_hw = unit.conv1.output_hw(hw)
                    out_grid = grid if tuple(out_hw) == tuple(hw) else _Grid(n, *out_hw, self.pad)
                    conv1 = grid.centres(out_hw, unit.conv1.stride, unit.conv1.padding, unit.conv1.kernel)
                    conv2 = out_grid.centres(out_hw, unit.conv2.stride, unit.conv2.padding, unit.conv2.kernel)
                    shortcut = None
                    if isinstance(unit.shortcut, PadShortcut):
                        step = unit.shortcut.stride
                        sample, y, x = np.meshgrid(np.arange(n), np.arange(0, hw[0], step), np.arange(0, hw[1], step),
                                                   indexing="ij")
                        shortcut = ((sample * hw[0] + y) * hw[1] + x).astype(np.int64).ravel()
                    elif isinstance(unit.shortcut, Conv2d):
                        sc = unit.shortcut
                        shortcut = grid.centres(out_hw, sc.stride, sc.padding, sc.kernel)
                    plan[(s, u)] = (grid, out_grid, conv1, conv2, shortcut)
                    grid, hw = out_grid, out_hw
            self._geometry[key] = plan
        return self._geometry[key]

    def __call__(self, x):
        model = self.model
        if model.training:
            raise ValueError("compile_network runs a model in evaluation mode only; call model.eval() first")
        dtype = model.stem.params["w"].dtype
        if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[1] != model.stem.in_channels:
            raise ValueError(f"x must have shape (N, {model.stem.in_channels}, H, W), got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        if x.dtype != dtype:
            raise TypeError(f"x has dtype {x.dtype} but the model's weights are {dtype}")
        n, c, h, w = x.shape
        plan = self._plan(n, (h, w))
        with _one_blas_thread():
            rows = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).reshape(n * h * w, c)
            grid, _, centres = plan["stem"]
            rows = self._conv(model.stem, rows, grid, grid, centres, dtype)
            for s, stage in enumerate(model.stages):
                for u, unit in enumerate(stage.units):
                    grid, out_grid, conv1, conv2, shortcut = plan[(s, u)]
                    h1 = self._bn_relu(unit.bn1, rows, dtype)
                    h1 = self._conv(unit.conv1, h1, grid, out_grid, conv1, dtype)
                    h1 = self._bn_relu(unit.bn2, h1, dtype)
                    out = self._conv(unit.conv2, h1, out_grid, out_grid, conv2, dtype)
                    if isinstance(unit.shortcut, Identity):
                        out += rows
                    elif isinstance(unit.shortcut, PadShortcut):
                        out[:, : rows.shape[1]] += rows[shortcut]
                    else:
                        out += self._conv(unit.shortcut, rows, grid, out_grid, shortcut, dtype)
                    rows = out
            bn, _, _, linear = model.head.layers_
            rows = self._bn_relu(bn, rows, dtype)
            pooled = rows.reshape(n, -1, rows.shape[1]).mean(axis=1, dtype=dtype)
            logits = pooled @ linear.params["w"]
            if linear.has_bias:
                logits += linear.params["b"]
        return logits.astype(dtype, copy=False)

    def __repr__(self):
        return f"CompiledResNet({self.model!r}, backend={self.backend!r})"


def compile_network(model, backend=None):
    """Compile a plain :class:`refimpl.resnet.ResNet` for inference on channels-last rows.

    Parameters
    ----------
    model : refimpl.resnet.ResNet, not perforated (every convolution dense)
    backend : CythonBackend, optional
        Threads, chunk size and the single-thread threshold; default: the model's convolution
        backend if it is a Cython backend, else a new one.

    Returns
    -------
    CompiledResNet : ``compiled(x)`` (N, C, H, W) → logits (N, classes), equal to ``model(x)`` in
    evaluation mode; it reads the model's parameters at every call.
    """
    from .cython_backend import CythonBackend

    if cython_unit._kernels is None:
        raise ImportError(f"compile_network needs the compiled extension fastpath._cython_unit "
                          f"({cython_unit.IMPORT_ERROR})")
    if not isinstance(model, ResNet):
        raise TypeError(f"model must be a refimpl.resnet.ResNet (plain, not adaptive), got {type(model).__name__}")
    for name, layer in model.named_layers():
        if isinstance(layer, Conv2d):
            if layer.is_perforated:
                raise ValueError(f"compile_network needs dense convolutions; {name} is perforated")
            if any(k % 2 == 0 or p != k // 2 for k, p in zip(layer.kernel, layer.padding)):
                raise ValueError(f"compile_network needs odd kernels with 'same' padding; {name} is {layer!r}")
    if backend is None:
        backend = model.stem.backend if isinstance(model.stem.backend, CythonBackend) else CythonBackend()
    elif not isinstance(backend, CythonBackend):
        raise TypeError(f"backend must be a fastpath.cython_backend.CythonBackend, got {type(backend).__name__}")
    return CompiledResNet(model, backend)
