"""PyOpenCL backend of the perforated convolution: the same interface as the NumPy reference.

Every convolution the interface needs is run as one *table convolution* (an implicit GEMM that
reads its input through an int32 index table; see ``kernels/perforated_conv.cl``):

======================= ===================== ========================================
operation               source (N, C, S)      table (B, R, T)
======================= ===================== ========================================
``conv_forward``        x, S = H·W            input pixel of tap t of computed position r
``table_conv_forward``  compact, S = P        the composed index table (refimpl)
dX of both              dY (N, K, R)          the inverted table: readers of each pixel
======================= ===================== ========================================

Index data (tables, their inverses, fill indices) is integer data derived on the host from the
:class:`~refimpl.plan.PerforationPlan` or the given table, uploaded once and cached with
that object. Float data may stay on the device: every method accepts NumPy arrays or
:class:`pyopencl.array.Array` and returns the kind it was given (``to_device`` / ``to_host``
move data explicitly), so a chain of backend calls whose activations live on the device copies
nothing back between layers (:func:`~fastpath.opencl_transfer.chain_transfer_share` measures what
that saves). refimpl's
network layers (batch norm, ReLU, ...) are NumPy code, so a refimpl network on this backend still
copies around each convolution.

dX is computed by gathering, not scattering: for each input pixel, the outputs that read it are
listed in an inverted table (host-side, cached with the plan) and the same GEMM kernel sums their
contributions. OpenCL 1.2 has no float atomics; the gather is deterministic and runs at the
forward's speed (the kernel file says more).

Kernels are ``.cl`` files shipped in the package, built once per (context, dtype, options) and
cached. The GEMM kernels come in three variants (``kernels=``): ``"tiled"`` (local-memory tiles,
register blocking: for GPUs, the default there), ``"direct"`` (a block of output channels per
work-item straight from global memory, no barriers: what CPU OpenCL compilers vectorise well, the
default on CPU devices) and ``"oracle"`` (one work-item per output value, the readable
reference in ``perforated_conv_oracle.cl``). The tests compare all three.

One job per module: this one is the backend. pyopencl, the kernel programs and the device choice
are in :mod:`fastpath.opencl_runtime`; the host-side index tables in :mod:`fastpath.opencl_tables`;
the transfer measurement in :mod:`fastpath.opencl_transfer`; the fused sparse residual unit
(attribute ``fused_unit``) in :mod:`fastpath.opencl_unit`. Their public names are also importable
from here. Without pyopencl or a working device, :class:`OpenCLBackend` raises
:class:`refimpl.backend.BackendUnavailableError` with the reason, like every backend.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from refimpl.backend import BackendUnavailableError, ConvBackend

from .opencl_runtime import (  # noqa: F401  (re-exported: importable from here as before)
    _PYOPENCL_IMPORT_ERROR,
    KERNEL_FILES,
    POCL_WHEEL_NOTE,
    KernelBuildError,
    build_program,
    cl,
    cl_tools,
    cla,
    context_choice,
    default_context,
    device_label,
    kernel_source,
    probe_device,
    status,
)
from .opencl_tables import IndexCache, conv_tap_table, invert_table, zero_fill_index  # noqa: F401
from .opencl_transfer import chain_transfer_share, copy_seconds  # noqa: F401
from .opencl_unit import OpenCLFusedUnit

KERNEL_VARIANTS = ("tiled", "direct", "oracle")
#: Output channels per work-item of the "direct" kernels (-D BM).
DIRECT_BLOCK = 32

#: Tile of the fast GEMM kernels: -D options of perforated_conv.cl. TM, TN: output tile; TK: step
#: along the reduction; WM x WN: register block of one work-item (work-group (TN/WN, TM/WM)).
#: 64 x 128 with a 4 x 8 block per work-item (256 work-items, each local-memory value reused 4-8
#: times): the usual starting point of SGEMM tiling on GPUs, and the fastest of the tiled shapes
#: tried on PoCL. Not tuned on GPU hardware (no GPU was available when it was written).
TILE = {"TM": 64, "TN": 128, "TK": 16, "WM": 4, "WN": 8}


class OpenCLConvCache(NamedTuple):
    """What the backward of a (table) convolution needs; arrays stay on the device."""

    src: Any  # device (N, C, S)
    w: Any  # (K, C, kh, kw) as given: NumPy or device
    table: Any  # device int32 (B, R, T)
    counts: Any  # device int32 (B,)
    table_batch: int
    inverse_key: tuple  # (owner, key) of the cached inverse table
    src_shape: tuple  # shape to return dsrc in
    rows: int  # R


class OpenCLPoolCache(NamedTuple):
    mode: str
    table: Any  # device (B, R, T)
    table_host: np.ndarray
    argmax: Any  # device int32 (N, C, R) or None
    src_shape: tuple


def _round_up(value, multiple):
    return -(-value // multiple) * multiple


class OpenCLBackend(ConvBackend):
    """The perforated convolution on an OpenCL device (GPU, or PoCL on the CPU).

    Parameters
    ----------
    context : pyopencl.Context, optional
        Defaults to :func:`default_context` (``PYOPENCL_CTX``, else the first working GPU, else
        any working device).
    kernels : {"tiled", "direct", "oracle"}, optional
        The GEMM kernel variant (see the module docstring); default "direct" on CPU devices,
        "tiled" elsewhere.
    tile : dict, optional
        Overrides of :data:`TILE` (-D options of the fast kernels).

    Attributes
    ----------
    device_name : str
    record_events : bool
        When true, every kernel launch keeps its profiling event; :meth:`kernel_seconds` sums them.
    """

    name = "opencl"

    def __init__(self, context=None, kernels=None, tile=None):
        if cl is None:
            raise BackendUnavailableError(f"the opencl backend is unavailable: {status().reason}")
        if kernels is not None and kernels not in KERNEL_VARIANTS:
            raise ValueError(f"kernels must be one of {KERNEL_VARIANTS} or None, got {kernels!r}")
        self.array_types = (np.ndarray, cla.Array)
        self.context = context if context is not None else default_context()
        self.device = self.context.devices[0]
        self.device_name = device_label(self.device)
        self.queue = cl.CommandQueue(self.context, properties=cl.command_queue_properties.PROFILING_ENABLE)
        if kernels is None:
            kernels = "direct" if self.device.type & cl.device_type.CPU else "tiled"
        self.kernels = kernels
        self.tile = dict(TILE, **(tile or {}))
        self.fp64 = "cl_khr_fp64" in self.device.extensions
        self.record_events = False
        self._events = []
        self._kernels = {}
        self._index = IndexCache()
        # Device memory is recycled through a pool: creating a buffer per call costs more than
        # the small layers' kernels on a GPU.
        self._pool = cl_tools.MemoryPool(cl_tools.ImmediateAllocator(self.queue))
        self._counts = {}
        self._reduce_size = 1 << (min(256, self.device.max_work_group_size).bit_length() - 1)
        self._group = min(64, self._reduce_size, self.device.max_work_item_sizes[0])
        # Build the float32 programs now (cached per context): a bad tile fails here, and the first
        # call is not slowed by a build (float64 is built on first use).
        self.warm_up([np.float32], oracle=kernels == "oracle")
        #: The fused sparse residual unit (:mod:`fastpath.opencl_unit`), which
        #: :func:`refimpl.sparse_unit.unit_executor` picks for units whose convolutions run here.
        self.fused_unit = OpenCLFusedUnit(self)

    # -- dtype, programs, launches -------------------------------------------------------------

    def supports_dtype(self, dtype):
        dtype = np.dtype(dtype)
        return dtype == np.float32 or (dtype == np.float64 and self.fp64)

    def _check_dtype(self, dtype):
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"the opencl backend computes in float32 or float64, got {dtype}")
        if dtype == np.float64 and not self.fp64:
            raise TypeError(
                f"float64 needs an OpenCL device with cl_khr_fp64, but {self.device_name} does not "
                "have it; use float32, or select another device with PYOPENCL_CTX"
            )
        return dtype

    def _options(self, dtype, filename):
        real = "double" if dtype == np.float64 else "float"
        options = [f"-DREAL={real}", f"-DREAL4={real}4"]
        if dtype == np.float64:
            options.append("-DUSE_FP64")
        if filename == KERNEL_FILES["fast"]:
            options += [f"-D{name}={value}" for name, value in sorted(self.tile.items())]
            options.append(f"-DBM={DIRECT_BLOCK}")
        return options

    def _kernel(self, filename, name, dtype):
        key = (filename, name, dtype)
        kernel = self._kernels.get(key)
        if kernel is None:
            program = build_program(self.context, filename, self._options(dtype, filename))
            kernel = self._kernels[key] = cl.Kernel(program, name)
        return kernel

    def warm_up(self, dtypes=(np.float32,), oracle=True):
        """Build the programs this backend runs for ``dtypes`` now (builds are cached per context)."""
        files = (KERNEL_FILES["fast"], KERNEL_FILES["oracle"]) if oracle else (KERNEL_FILES["fast"],)
        for dtype in dtypes:
            dtype = self._check_dtype(dtype)
            for filename in files:
                build_program(self.context, filename, self._options(dtype, filename))

    def _launch(self, filename, name, dtype, global_size, local_size, *args):
        kernel = self._kernel(filename, name, dtype)
        converted = []
        for arg in args:
            if isinstance(arg, cla.Array):
                converted.append(arg.data)
            elif isinstance(arg, (bool, int, np.integer)):
                converted.append(np.int32(arg))
            else:
                converted.append(arg)
        global_size = tuple(int(g) for g in global_size)
        if local_size is None:
            # A fixed work-group shape (global size rounded up; every kernel checks its bounds):
            # PoCL compiles one specialisation per work-group shape, and letting the runtime
            # choose one per problem size would recompile for almost every new shape.
            local_size = (self._group,) + (1,) * (len(global_size) - 1)
            global_size = (_round_up(max(global_size[0], 1), self._group),) + global_size[1:]
        event = kernel(self.queue, global_size, tuple(local_size), *converted)
        if self.record_events:
            self._events.append(event)
        return event

    def synchronize(self):
        """Wait until every queued command has finished."""
        self.queue.finish()

    def kernel_seconds(self):
        """Sum of the device time of the kernels recorded since the last call (then forgets them)."""
        self.queue.finish()
        total = sum(e.profile.end - e.profile.start for e in self._events) * 1e-9
        self._events = []
        return total

    # -- host <-> device ---------------------------------------------------------------------

    def to_device(self, array):
        """A C-contiguous device copy of a NumPy array (a device array is returned as is)."""
        if isinstance(array, cla.Array):
            return self._device_array(array)
        return self._upload(np.ascontiguousarray(array))

    def to_host(self, array):
        """A NumPy copy of a device array (a NumPy array is returned as is)."""
        if isinstance(array, cla.Array):
            return array.get(self.queue)
        return array

    def _device_array(self, array, dtype=None):
        if isinstance(array, cla.Array):
            if array.context.int_ptr != self.context.int_ptr:
                raise ValueError(
                    f"a pyopencl array from another context was given to the opencl backend on {self.device_name}"
                )
            if dtype is not None and array.dtype != dtype:
                raise TypeError(f"arrays must share one dtype, got {array.dtype} and {dtype}")
            if not array.flags.c_contiguous:
                # pyopencl can neither copy nor read back a strided view, so there is nothing to convert
                raise ValueError(
                    f"device arrays must be C-contiguous, got shape {array.shape} with strides {array.strides}; "
                    "pass a contiguous array (a NumPy array is converted automatically)"
                )
            return array
        array = np.asarray(array)
        if dtype is not None and array.dtype != dtype:
            raise TypeError(f"arrays must share one dtype, got {array.dtype} and {dtype}")
        return self._upload(np.ascontiguousarray(array))

    def _empty(self, shape, dtype):
        return cla.empty(self.queue, shape, dtype, allocator=self._pool)

    def _upload(self, array):
        return cla.to_device(self.queue, array, allocator=self._pool)

    def _result(self, array, on_device):
        return array if on_device else array.get(self.queue)

    def _cached(self, owner, key, make):
        store = self._index.entries(owner)
        if key not in store:
            store[key] = make()
        return store[key]

    def _upload_int(self, array):
        return self._upload(np.ascontiguousarray(array, dtype=np.int32))

    def _full_counts(self, batch, value):
        key = (batch, value)
        if key not in self._counts:
            self._counts[key] = self._upload_int(np.full(batch, value))
        return self._counts[key]

    # -- the GEMM engine -----------------------------------------------------------------------

    def _weights(self, w, dtype):
        """Weights as given (NumPy stays on the host until packed, device arrays are checked)."""
        if isinstance(w, cla.Array):
            return self._device_array(w, dtype)
        w = np.ascontiguousarray(w)
        if w.dtype != dtype:
            raise TypeError(f"arrays must share one dtype, got {dtype} and {w.dtype}")
        return w

    def _pack(self, w, k, c, taps, depth, transpose, dtype):
        """Weights as the zero-padded column-major matrix the GEMM kernels read (``pack_weights``).

        Returns the packed array and its leading dimension (padded row count).

        NumPy weights are packed on the host and uploaded once (one kernel launch less per
        call); device weights are packed on the device.
        """
        rows, cols = (c, k * taps * depth) if transpose else (k, c * taps)
        if self.kernels == "tiled":
            rows_p, cols_p = _round_up(rows, self.tile["TM"]), _round_up(cols, self.tile["TK"])
        elif self.kernels == "direct":
            rows_p, cols_p = _round_up(rows, DIRECT_BLOCK), cols
        else:
            rows_p, cols_p = rows, cols
        if isinstance(w, np.ndarray):
            packed = np.zeros((cols_p, rows_p), dtype)  # column-major: packed[col, row]
            matrix = w.reshape(k, c, taps)
            if transpose:
                matrix = np.repeat(matrix.transpose(1, 0, 2), depth, axis=2)
            packed[:cols, :rows] = matrix.reshape(rows, cols).T
            return self._upload(packed), rows_p
        packed = self._empty((cols_p, rows_p), dtype)
        self._launch(KERNEL_FILES["fast"], "pack_weights", dtype, (rows_p, cols_p), None,
                     k, c, taps, depth, int(transpose), rows_p, cols_p, w, packed)
        return packed, rows_p

    def _table_gemm(self, src, table, table_batch, counts, rows, taps, packed, ldw, m, bias):
        """out (N, m, rows) = packed · (src gathered through table); see the kernel files."""
        n, c, s = src.shape
        dtype = src.dtype
        out = self._empty((n, m, rows), dtype)
        ncols = n * rows
        has_bias = bias is not None
        bias_arg = bias if has_bias else packed  # any buffer; not read
        args = (m, c, s, rows, taps, ncols, ldw, src, table, table_batch, counts, packed, bias_arg,
                int(has_bias), out)
        if self.kernels == "tiled":
            t = self.tile
            local = (t["TN"] // t["WN"], t["TM"] // t["WM"])
            glob = (_round_up(ncols, t["TN"]) // t["TN"] * local[0], _round_up(m, t["TM"]) // t["TM"] * local[1])
            self._launch(KERNEL_FILES["fast"], "implicit_gemm", dtype, glob, local, *args)
        elif self.kernels == "direct":
            glob = (ncols, _round_up(m, DIRECT_BLOCK) // DIRECT_BLOCK)
            self._launch(KERNEL_FILES["fast"], "implicit_gemm_direct", dtype, glob, None, *args)
        else:
            self._launch(KERNEL_FILES["oracle"], "implicit_gemm_naive", dtype, (ncols, m), None, *args)
        return out

    def _weight_grad(self, dout, src, table, table_batch, counts, rows, taps):
        """dW (m, C*taps) = dout (N, m, rows) · (src gathered through table)ᵀ, over live columns."""
        n, m, _ = dout.shape
        c, s = src.shape[1:]
        dtype = dout.dtype
        ncols, ct = n * rows, c * taps
        dw = self._empty((m, ct), dtype)
        if self.kernels == "oracle":
            self._launch(KERNEL_FILES["oracle"], "weight_grad_naive", dtype, (ct, m), None,
                         m, c, s, rows, taps, ncols, dout, src, table, table_batch, counts, dw)
            return dw
        if self.kernels == "direct":
            self._launch(KERNEL_FILES["fast"], "weight_grad_direct", dtype, (ct, _round_up(m, DIRECT_BLOCK) // DIRECT_BLOCK),
                         None, m, c, s, rows, taps, ncols, dout, src, table, table_batch, counts, dw)
            return dw
        t = self.tile
        tiles = (_round_up(ct, t["TN"]) // t["TN"]) * (_round_up(m, t["TM"]) // t["TM"])
        # Split the long reduction so that the device has enough work-groups to fill its compute
        # units (a few per unit); the slices are summed in order, so the result is deterministic.
        target = 4 * self.device.max_compute_units
        splits = max(1, min(-(-target // tiles), -(-ncols // (4 * t["TK"]))))
        per_split = _round_up(-(-ncols // splits), t["TK"])
        splits = -(-ncols // per_split)
        partial = dw if splits == 1 else self._empty((splits, m, ct), dtype)
        local = (t["TN"] // t["WN"], t["TM"] // t["WM"])
        glob = (_round_up(ct, t["TN"]) // t["TN"] * local[0], _round_up(m, t["TM"]) // t["TM"] * local[1], splits)
        self._launch(KERNEL_FILES["fast"], "weight_grad", dtype, glob, (*local, 1),
                     m, c, s, rows, taps, ncols, per_split, dout, src, table, table_batch, counts, partial)
        if splits > 1:
            self._launch(KERNEL_FILES["fast"], "sum_partials", dtype, (m * ct,), None, m * ct, splits, partial, dw)
        return dw

    def _bias_grad(self, dout, table_batch, counts, rows):
        n, m, _ = dout.shape
        dtype = dout.dtype
        db = self._empty((m,), dtype)
        if self.kernels == "oracle":
            self._launch(KERNEL_FILES["oracle"], "bias_grad_naive", dtype, (m,), None,
                         m, rows, n * rows, dout, table_batch, counts, db)
        else:
            size = self._reduce_size
            self._launch(KERNEL_FILES["fast"], "bias_grad", dtype, (m * size,), (size,),
                         m, rows, n * rows, dout, table_batch, counts, db,
                         cl.LocalMemory(size * dtype.itemsize))
        return db

    def _conv(self, src, table, table_batch, counts, rows, taps, w, b):
        """Forward of a table convolution on device arrays: (N, K, rows)."""
        k, c = w.shape[:2]
        packed, ldw = self._pack(w, k, c, taps, 1, False, src.dtype)
        return self._table_gemm(src, table, table_batch, counts, rows, taps, packed, ldw, k, b)

    def _gradients(self, dout, cache, inverse, depth):
        """(dsrc, dw, db) of a table convolution; dsrc by the GEMM through the inverse table."""
        n, k, rows = dout.shape
        src, w = cache.src, cache.w
        c, s = src.shape[1:]
        taps = cache.table.shape[2]
        dw = self._weight_grad(dout, src, cache.table, cache.table_batch, cache.counts, rows, taps)
        db = self._bias_grad(dout, cache.table_batch, cache.counts, rows)
        packed, ldw = self._pack(w, k, c, taps, depth, True, dout.dtype)
        all_sources = self._full_counts(inverse.shape[0], s)
        dsrc = self._table_gemm(dout, inverse, inverse.shape[0], all_sources, s, taps * depth, packed, ldw, c, None)
        return dsrc, dw.reshape(*w.shape), db

    # -- the interface -------------------------------------------------------------------------

    def _conv_forward(self, x, w, b, plan, geometry):
        on_device = isinstance(x, cla.Array)
        dtype = self._check_dtype(x.dtype)
        n, c, h, wd = x.shape
        xd = self._device_array(x).reshape(n, c, h * wd)
        wdev = self._weights(w, dtype)
        bdev = self._device_array(b, dtype)

        def upload_taps():
            return self._upload_int(conv_tap_table(plan, geometry)), self._upload_int(plan.counts)

        table, counts = self._cached(plan, ("taps", geometry), upload_taps)
        out = self._conv(xd, table, plan.batch, counts, plan.width, table.shape[2], wdev, bdev)
        cache = OpenCLConvCache(xd, wdev, table, counts, plan.batch, (plan, ("taps_inverse", geometry)),
                                tuple(x.shape), plan.width)
        return self._result(out, on_device), cache

    def _conv_backward(self, dcompact, cache):
        on_device = isinstance(dcompact, cla.Array)
        dout = self._device_array(dcompact, cache.src.dtype)
        plan, key = cache.inverse_key
        geometry = key[1]

        def upload_inverse():
            inverse, depth = invert_table(conv_tap_table(plan, geometry), cache.src.shape[2])
            return self._upload_int(inverse), depth

        inverse, depth = self._cached(plan, key, upload_inverse)
        dx, dw, db = self._gradients(dout, cache, inverse, depth)
        dx = dx.reshape(*cache.src_shape)
        return tuple(self._result(a, on_device) for a in (dx, dw, db))

    def _fill_forward(self, compact, plan, fill):
        on_device = isinstance(compact, cla.Array)
        dtype = self._check_dtype(compact.dtype)
        src = self._device_array(compact)
        n, k, p = src.shape
        ho, wo = plan.out_hw

        def upload_index():
            index = plan.index_map.reshape(plan.batch, ho * wo) if fill == "nearest" else zero_fill_index(plan)
            return self._upload_int(index)

        index = self._cached(plan, ("fill", fill), upload_index)
        dense = self._empty((n, k, ho * wo), dtype)
        self._launch(KERNEL_FILES["fast"], "gather_sum", dtype, (ho * wo, k, n), None,
                     ho * wo, p, k, 1, plan.batch, index, src, dense)
        return self._result(dense.reshape(n, k, ho, wo), on_device)

    def _fill_backward(self, ddense, plan, fill):
        on_device = isinstance(ddense, cla.Array)
        dtype = self._check_dtype(ddense.dtype)
        n, k, ho, wo = ddense.shape
        src = self._device_array(ddense).reshape(n, k, ho * wo)

        def upload_adjoint():
            if fill == "nearest":
                inverse, depth = invert_table(plan.index_map.reshape(plan.batch, ho * wo, 1), plan.width)
            else:  # each computed slot received exactly its own position
                inverse, depth = plan.positions, 1
            return self._upload_int(inverse), depth

        inverse, depth = self._cached(plan, ("fill_adjoint", fill), upload_adjoint)
        p = plan.width
        dcompact = self._empty((n, k, p), dtype)
        self._launch(KERNEL_FILES["fast"], "gather_sum", dtype, (p, k, n), None,
                     p, ho * wo, k, depth, plan.batch, inverse, src, dcompact)
        return self._result(dcompact, on_device)

    def _host_index(self, table):
        return table.get(self.queue) if isinstance(table, cla.Array) else table

    def _table(self, host):
        """Host and device copies of a validated (read-only) index table (B, R, T)."""
        return host, self._cached(host, "table", lambda: self._upload_int(host))

    def _table_conv_forward(self, src, table, w, b):
        on_device = isinstance(src, cla.Array)
        dtype = self._check_dtype(src.dtype)
        sdev = self._device_array(src)
        wdev = self._weights(w, dtype)
        bdev = self._device_array(b, dtype)
        host, tdev = self._table(table)
        batch, rows, taps = host.shape
        counts = self._full_counts(batch, rows)
        out = self._conv(sdev, tdev, batch, counts, rows, taps, wdev, bdev)
        cache = OpenCLConvCache(sdev, wdev, tdev, counts, batch, (host, "inverse"), tuple(src.shape), rows)
        return self._result(out, on_device), cache

    def _table_conv_backward(self, dout, cache):
        on_device = isinstance(dout, cla.Array)
        ddev = self._device_array(dout, cache.src.dtype)
        host, key = cache.inverse_key
        s = cache.src.shape[2]

        def upload_inverse():
            inverse, depth = invert_table(host, s)
            return self._upload_int(inverse), depth

        inverse, depth = self._cached(host, key, upload_inverse)
        dsrc, dw, db = self._gradients(ddev, cache, inverse, depth)
        return tuple(self._result(a, on_device) for a in (dsrc, dw, db))

    def _table_pool_forward(self, src, table, mode):
        on_device = isinstance(src, cla.Array)
        dtype = self._check_dtype(src.dtype)
        sdev = self._device_array(src)
        n, c, s = sdev.shape
        host, tdev = self._table(table)
        batch, rows, taps = host.shape
        out = self._empty((n, c, rows), dtype)
        argmax = self._empty((n, c, rows), np.int32) if mode == "max" else None
        self._launch(KERNEL_FILES["fast"], "table_pool_forward", dtype, (rows, c, n), None,
                     c, s, rows, taps, batch, int(mode == "max"), sdev, tdev, out,
                     argmax if argmax is not None else out)
        return self._result(out, on_device), OpenCLPoolCache(mode, tdev, host, argmax, tuple(src.shape))

    def _table_pool_backward(self, dout, cache):
        on_device = isinstance(dout, cla.Array)
        dtype = self._check_dtype(dout.dtype)
        ddev = self._device_array(dout)
        n, c, s = cache.src_shape
        batch, rows, taps = cache.table_host.shape

        def upload_inverse():
            inverse, depth = invert_table(cache.table_host, s)
            return self._upload_int(inverse), depth

        inverse, depth = self._cached(cache.table_host, "inverse", upload_inverse)
        dsrc = self._empty((n, c, s), dtype)
        self._launch(KERNEL_FILES["fast"], "table_pool_backward", dtype, (s, c, n), None,
                     c, s, rows, taps, depth, batch, int(cache.mode == "max"), ddev, cache.table, inverse,
                     cache.argmax if cache.argmax is not None else inverse, dsrc)
        return self._result(dsrc, on_device)
