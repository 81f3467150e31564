"""A plain ResNet or a SACT-ResNet compiled for inference on channels-last rows: :func:`compile_network`.

``compile_network(model)`` returns a callable that computes ``model(x)`` in evaluation mode (batch
norm with the running statistics) without ever forming an NCHW feature map: the input is
transposed once to rows (N H W, C), and every layer then works on rows with the kernels of the
fused sparse unit (:mod:`fastpath._cython_unit`):

* batch norm + ReLU as one affine-and-clamp pass over the rows;
* each convolution (stem, conv1 — strided in a downsampling unit —, conv2, a projection
  shortcut) reads its windows through an index map of the input grid: in float32 the direct
  register-tiled kernel (``fastpath/direct_conv.h``) reads the rows in place, with a following
  batch norm + ReLU or the residual add fused into its store; otherwise the windows are gathered,
  one contiguous copy of C values per tap, and multiplied by one BLAS GEMM per chunk of rows;
* the option-A shortcut takes the rows of the subsampled positions and adds them to the first
  channels; the head pools the rows of each sample and applies the linear layer.

A :class:`refimpl.sact.SACTResNet` (sparse execution) runs the same way; each block runs its first
unit densely (the path above), then, for every further unit (:func:`refimpl.adaptive_block.run_units`):

* the halting head on the rows of the still-active positions: the local 3×3 term as the row
  convolution to one channel at those positions, each sample's global term (from its pooled
  rows) added as the kernel stores it, then the sigmoid;
* ACT's cumulative rule per position (:func:`refimpl.halting.still_running`, evaluated in NumPy on
  the active positions' scores), then one compiled pass (``act_step``) that records N and
  R = 1 − Σ_{i<N} h_i where a position halts, removes it from A, and accumulates
  ``Σ_{n<N} h_n U_n`` on the rows where it goes on;
* the sparse unit ``U = x + A ⊙ f(x)`` in place on the rows: bn1 + ReLU on E = dilate(D),
  conv1 on D = dilate(A) (masks dilated by a compiled kernel), bn2 + ReLU fused into conv1's
  store, conv2 on A, whose store adds each output onto the row of its position.

The block output adds ``R · U_N`` from the final rows (a halted position's later outputs equal
its last one). After a call, ``flops_per_sample`` (N,) is the model's own accounting, and ``rho``
(the per-block ρ maps) and ``ponder_cost`` are recorded as well.

The compiled network shares the model's parameter arrays and running statistics (it reads them at
every call), so it stays valid while the model is trained; it refuses a model in training mode.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit

from refimpl import halting
from refimpl.conv import conv_flops
from refimpl.conv_layer import Conv2d
from refimpl.resnet import Identity, PadShortcut, ResNet
from refimpl.sact import SACTResNet

from . import cython_unit, profiling
from .cython_unit import _kernels, _one_blas_thread, _rows_map, _taps, _weights, conv_rows, dilate_fast


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


class _Workspace:
    """Arrays reused from call to call: one buffer per *role*, grown when a call needs more.

    A compiled network takes its large intermediate arrays (the rows of every layer) from here
    rather than allocating them per layer. A fresh multi-megabyte NumPy array is memory the
    allocator maps from the operating system, and every 4 KiB page of it costs a page fault when
    first written: on a SACT-ResNet-32 at 32 px that was about a fifth of the forward time (it
    went away when the C library was told to keep freed memory). A role's buffer is only ever
    used for one array at a time, which is what the callers keep to.
    """

    def __init__(self):
        self._buffers = {}

    def take(self, role, shape, dtype):
        """An uninitialised C-contiguous array of ``shape``, the front of ``role``'s buffer."""
        dtype = np.dtype(dtype)
        size = int(np.prod(shape))
        buffer = self._buffers.get((role, dtype))
        if buffer is None or buffer.size < size:
            buffer = np.empty(size, dtype=dtype)
            self._buffers[(role, dtype)] = buffer
        return buffer[:size].reshape(shape)


class CompiledResNet:
    """``compiled(x)``: the logits of a :class:`refimpl.resnet.ResNet` in evaluation mode, on rows.

    Built by :func:`compile_network`; see the module docstring.
    """

    def __init__(self, model, backend):
        self.model, self.backend = model, backend
        self._geometry = {}
        self._workspace = _Workspace()
        # map padding: the widest half-window of any convolution
        convs = [layer for _, layer in model.named_layers() if isinstance(layer, Conv2d)]
        self.pad = max(max(k // 2 for k in conv.kernel) for conv in convs)

    def _conv(self, conv, src, grid, centres, dtype, role, addend=None, post=None):
        return self._conv_at(conv, src, grid.rowmap, grid, centres, dtype, role, addend, post)

    def _conv_at(self, conv, src, rowmap, grid, centres, dtype, role, addend=None, post=None, out=None,
                 out_rows=None):
        """The convolution at the map indices ``centres`` of ``grid``, reading ``src`` through ``rowmap``.

        The output is ``role``'s workspace array, or ``out`` at the rows ``out_rows`` if given.
        ``addend`` (a residual added to the outputs) and ``post`` (a batch norm and ReLU applied
        to them, as ``_affine`` gives it) are fused into the store
        (:func:`fastpath.cython_unit.conv_rows`).
        """
        weights = _weights(conv, dtype)
        if out is None:
            out = self._workspace.take(role, (centres.size, conv.out_channels), dtype)
        with profiling.section("compute"):
            conv_rows(self.backend, src, rowmap, centres, _taps(conv.kernel, grid.wm), *weights, out,
                      self.backend._team(centres.size * weights[0].size), addend, post, out_rows)
        return out

    def _bn_relu(self, bn, rows, dtype):
        out = self._workspace.take("activated", rows.shape, dtype)
        with profiling.section("gather"):
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

    def _check_input(self, x):
        model = self.model
        if model.training:
            raise ValueError("compile_network runs a model in evaluation mode only; call model.eval() first")
        dtype = model.stem.params["w"].dtype
        if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[1] != model.stem.in_channels:
            raise ValueError(f"x must have shape (N, {model.stem.in_channels}, H, W), got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        if x.dtype != dtype:
            raise TypeError(f"x has dtype {x.dtype} but the model's weights are {dtype}")
        return dtype

    def _stem(self, x, plan, dtype):
        n, c, h, w = x.shape
        with profiling.section("gather"):
            rows = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).reshape(n * h * w, c)
        grid, _, centres = plan["stem"]
        self._rows_role = 0
        return self._conv(self.model.stem, rows, grid, centres, dtype, "rows0")

    def _next_rows_role(self):
        """The role of a unit's output rows: the other of two buffers than its input rows' (ping-pong)."""
        self._rows_role = 1 - self._rows_role
        return f"rows{self._rows_role}"

    def _dense_unit(self, unit, rows, entry, dtype):
        """A residual unit at every position (it may downsample): rows of its input grid → rows of its output grid."""
        grid, out_grid, conv1, conv2, shortcut = entry
        h1 = self._bn_relu(unit.bn1, rows, dtype)
        z = self._conv(unit.conv1, h1, grid, conv1, dtype, "conv1", post=_affine(unit.bn2, dtype))
        identity = isinstance(unit.shortcut, Identity)  # then conv2 adds the rows as it stores its outputs
        out = self._conv(unit.conv2, z, out_grid, conv2, dtype, self._next_rows_role(),
                         addend=rows if identity else None)
        if isinstance(unit.shortcut, PadShortcut):
            with profiling.section("other"):
                out[:, : rows.shape[1]] += rows[shortcut]
        elif not identity:
            out += self._conv(unit.shortcut, rows, grid, shortcut, dtype, "shortcut")
        return out

    def _head(self, rows, n, dtype):
        bn, _, _, linear = self.model.head.layers_
        rows = self._bn_relu(bn, rows, dtype)
        with profiling.section("other"):
            pooled = rows.reshape(n, -1, rows.shape[1]).mean(axis=1, dtype=dtype)
            logits = pooled @ linear.params["w"]
            if linear.has_bias:
                logits += linear.params["b"]
        return logits.astype(dtype, copy=False)

    def __call__(self, x):
        dtype = self._check_input(x)
        n = x.shape[0]
        plan = self._plan(n, x.shape[2:])
        with _one_blas_thread():
            rows = self._stem(x, plan, dtype)
            for s, stage in enumerate(self.model.stages):
                for u, unit in enumerate(stage.units):
                    rows = self._dense_unit(unit, rows, plan[(s, u)], dtype)
            return self._head(rows, n, dtype)

    def __repr__(self):
        return f"CompiledResNet({self.model!r}, backend={self.backend!r})"


class CompiledSACTResNet(CompiledResNet):
    """``compiled(x)``: the logits of a :class:`refimpl.sact.SACTResNet` in evaluation mode (sparse execution), on rows.

    After a call: ``flops_per_sample`` (N,) int64, the model's accounting of what was computed;
    ``rho`` (list per block of (N, H, W) ponder-cost maps) and ``ponder_cost`` (Σ_blocks mean ρ).
    Built by :func:`compile_network`; see the module docstring.
    """

    def __init__(self, model, backend):
        super().__init__(model, backend)
        self.flops_per_sample, self.rho, self.ponder_cost = None, [], None

    def _head_logits(self, head, rows, grid, active_flat, dtype):
        """Halting probabilities at ``active_flat``: the local 3×3 term there plus each sample's global term, σ.

        The local term is the row convolution to one channel at the active positions only (in
        float32 the direct kernel's dot-product path, vectorised over the input channels), which
        adds the global term as it stores each value.
        """
        n, size = grid.n, grid.h * grid.w
        with profiling.section("other"):
            pooled = (np.ones((1, size), dtype=dtype) @ rows.reshape(n, size, rows.shape[1]))[:, 0] / dtype.type(size)
            global_term = (pooled @ head.params["w_global"]).astype(dtype, copy=False)
            global_rows = global_term[active_flat // size].reshape(-1, 1)  # added as the kernel stores each local term
        logits = self._conv_at(head.local, rows, grid.rowmap, grid, grid.pos[active_flat], dtype, "head",
                               addend=global_rows)[:, 0]
        with profiling.section("other"):
            # σ of refimpl.distributions, as SciPy's ufunc: one pass, 2.7x faster on 65,536 float32 values
            return expit(logits).astype(dtype, copy=False)

    def _sparse_unit(self, unit, rows, grid, active, dtype):
        """In place ``rows[A] += f(x)[A]``: conv1 on D = dilate(A), conv2 on A; returns the FLOPs per sample."""
        n, h, w = grid.n, grid.h, grid.w
        mask = active.reshape(n, h, w)
        src, src_map, gather = rows, grid.rowmap, None  # bn1 + ReLU on every row, unless E is gathered first
        with profiling.section("other"):  # the position sets and their index maps
            a_flat = np.flatnonzero(active)
            every = a_flat.size == active.size
            if every:  # every position: the rows of the whole grid, nothing to dilate
                d_mask, d_flat, d_map = mask, a_flat, grid.rowmap
            else:
                team = self.backend._team(active.size * 9)
                d_mask = dilate_fast(mask, unit.conv2.kernel, team)
                d_flat = np.flatnonzero(d_mask)
                e_flat = np.flatnonzero(dilate_fast(d_mask, unit.conv1.kernel, team))
                if 2 * e_flat.size <= active.size:  # else bn1 + ReLU on every row costs less than gathering E
                    gather, src_map = e_flat, _rows_map(grid.rowmap.size, grid.pos[e_flat])
                d_map = _rows_map(grid.rowmap.size, grid.pos[d_flat])
        if gather is not None:
            with profiling.section("gather"):
                src = np.take(rows, gather, axis=0,
                              out=self._workspace.take("gathered", (gather.size, rows.shape[1]), dtype))
        h1 = self._bn_relu(unit.bn1, src, dtype)
        z = self._conv_at(unit.conv1, h1, src_map, grid, grid.pos[d_flat], dtype, "conv1",
                          post=_affine(unit.bn2, dtype))
        # conv2 reads z only, so it can add its outputs onto the rows of A as it stores them
        self._conv_at(unit.conv2, z, d_map, grid, grid.pos[a_flat], dtype, "residual", addend=rows, out=rows,
                      out_rows=None if every else a_flat)
        c, k = unit.conv1.in_channels, unit.conv1.out_channels
        with profiling.section("other"):
            return (conv_flops(1, c, k, unit.conv1.kernel) * d_mask.sum(axis=(1, 2))
                    + conv_flops(1, k, k, unit.conv2.kernel) * mask.sum(axis=(1, 2))).astype(np.int64)

    def _block(self, block, rows, plan, s, dtype, flops):
        """One SACT block on rows (see :func:`refimpl.adaptive_block.run_units`); returns Σ_n p_n U_n and ρ."""
        rows = self._dense_unit(block.units[0], rows, plan[(s, 0)], dtype)
        grid = plan[(s, 0)][1]
        n, size = grid.n, grid.h * grid.w
        total = n * size
        # ACT per position (refimpl.halting), online: N, R = 1 - Σ_{i<N} h_i, and Σ_{n<N} h_n U_n so far
        with profiling.section("other"):
            cumulative = np.zeros(total, dtype=dtype)
            remainder = np.ones(total, dtype=dtype)
            n_units = np.ones(total, dtype=np.int64)
            weighted = self._workspace.take("weighted", rows.shape, dtype)
            weighted[...] = 0
            active = np.ones(total, dtype=bool)
            active_flat = np.arange(total)
        for index in range(1, len(block.units)):
            head = block.heads[index - 1]
            h = self._head_logits(head, rows, grid, active_flat, dtype)
            with profiling.section("other"):  # ACT's bookkeeping
                per_sample = np.bincount(active_flat // size, minlength=n)
                flops += np.where(per_sample > 0, conv_flops(1, head.channels, 1, head.local.kernel) * per_sample
                                  + 2 * head.channels, 0)
                after = cumulative[active_flat] + h
                going_on = halting.still_running(after, block.eps)
                # p_n = h_n before the halting unit; a halting position records N and R and leaves A
                _kernels.act_step(h, after, going_on.view(np.uint8), active_flat, index, cumulative, remainder,
                                  n_units, active.view(np.uint8), weighted, rows, self.backend._team(rows.size))
                active_flat = active_flat[going_on]
            if active_flat.size == 0:
                break
            flops += self._sparse_unit(block.units[index], rows, grid, active, dtype)
        with profiling.section("other"):
            remainder[active_flat] = 1 - cumulative[active_flat]  # ran every unit: N = L
            n_units[active_flat] = len(block.units)
            # p_N = R, and U_N is the last state of a position halted at N
            _kernels.add_scaled_rows_at(weighted, rows, remainder, np.arange(total, dtype=np.int64),
                                        self.backend._team(rows.size))
            rho = (n_units + remainder).astype(dtype)
        return weighted, rho.reshape(n, grid.h, grid.w)

    def __call__(self, x):
        dtype = self._check_input(x)
        n = x.shape[0]
        plan = self._plan(n, x.shape[2:])
        flops = np.full(n, self._dense_flops(plan, n), dtype=np.int64)
        rho = []
        with _one_blas_thread():
            rows = self._stem(x, plan, dtype)
            for s, block in enumerate(self.model.stages):
                rows, block_rho = self._block(block, rows, plan, s, dtype, flops)
                rho.append(block_rho)
            logits = self._head(rows, n, dtype)
        self.flops_per_sample, self.rho = flops, rho
        self.ponder_cost = float(sum(np.mean(r) for r in rho))
        return logits

    def _dense_flops(self, plan, n):
        """FLOPs per sample of the dense parts: the stem, each block's first unit, the classifier."""
        model = self.model
        grid = plan["stem"][0]
        stem = model.stem
        total = conv_flops(grid.h * grid.w, stem.in_channels, stem.out_channels, stem.kernel)
        for s, block in enumerate(model.stages):
            unit = block.units[0]
            out_grid = plan[(s, 0)][1]
            size = out_grid.h * out_grid.w
            convs = [unit.conv1, unit.conv2] + ([unit.shortcut] if isinstance(unit.shortcut, Conv2d) else [])
            total += sum(conv_flops(size, c.in_channels, c.out_channels, c.kernel) for c in convs)
        linear = model.head.layers_[3]
        return total + 2 * linear.in_features * linear.out_features

    def __repr__(self):
        return f"CompiledSACTResNet({self.model!r}, backend={self.backend!r})"


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
    if not isinstance(model, (ResNet, SACTResNet)):
        raise TypeError(f"model must be a refimpl.resnet.ResNet or a refimpl.sact.SACTResNet, got {type(model).__name__}")
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
    if isinstance(model, SACTResNet):
        for s, block in enumerate(model.stages):
            if block.execution != "sparse":
                raise ValueError(f"compile_network runs SACT's sparse execution; stages.{s} has "
                                 f"execution={block.execution!r}")
        return CompiledSACTResNet(model, backend)
    return CompiledResNet(model, backend)
