"""What every convolution backend checks before running a kernel.

A backend's kernels read the plan's positions, index maps and tables as memory offsets, so a
wrong shape or an index out of range would make a compiled backend read or write outside its
buffers. :class:`refimpl.backend.ConvBackend` calls these functions in each of its public
methods before handing the arguments to the backend's kernel, so that every backend — NumPy,
Cython, OpenCL, or one a user writes — rejects the same inputs with the same message.

The checks are cheap by design: dtypes, shapes and geometry (O(1)) and the range of every index
table entry (O(table size)), never a pass over the float data (values are the public functions'
business: they reject NaN/inf). Plans are immutable (:class:`~refimpl.plan.PerforationPlan`),
so their integer arrays were checked when they were built.

Every error names the argument, says what was expected and what came.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np

from . import _checks
from .conv import ConvGeometry, conv_output_shape
from .plan import FILLS, INDEX_DTYPE, PerforationPlan, frozen_copy, is_frozen

POOL_MODES = ("max", "avg")
FLOAT_DTYPES = _checks.FLOAT_DTYPES
_FLOAT32, _FLOAT64 = FLOAT_DTYPES


@lru_cache(maxsize=None)
def _ndim(axes):
    """Number of axes named in ``"(N, C, H, W)"``."""
    return len([axis for axis in axes.strip("()").split(",") if axis.strip()])


class BackendCache(NamedTuple):
    """What a backend's forward returns as its cache: its own data plus what its backward checks.

    ``op`` names the forward ("conv", "table_conv", "table_pool"); ``backend`` the backend's
    name; ``out_shape`` and ``dtype`` are the forward output's, which the upstream gradient must
    match; ``inner`` is the backend's own cache, given to its backward kernel.
    """

    op: str
    backend: str
    out_shape: tuple
    dtype: Any
    inner: Any


def float_array(a, name, axes, array_types=(np.ndarray,)):
    """Check a float array argument of a backend method: type, dtype float32/float64, ndim, no empty axis.

    Parameters
    ----------
    a : the argument
    name : its name, for the message
    axes : str, the expected axes, e.g. ``"(N, C, H, W)"``; its length in axes is the ndim
    array_types : the array classes this backend accepts (NumPy arrays, and device arrays)

    Returns
    -------
    ``a``, C-contiguous when it is a NumPy array (device arrays are returned as given).
    """
    if not isinstance(a, array_types):
        kinds = " or ".join(t.__module__.split(".")[0] + "." + t.__name__ for t in array_types)
        raise TypeError(f"{name} must be a {kinds} of shape {axes}, got {type(a).__name__}")
    dtype = a.dtype
    if not (dtype is _FLOAT32 or dtype is _FLOAT64 or dtype in FLOAT_DTYPES):  # identity first: cheap
        raise TypeError(f"{name} must have dtype float32 or float64, got {a.dtype}")
    ndim = _ndim(axes)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional {axes}, got shape {tuple(a.shape)}")
    if 0 in a.shape:
        raise ValueError(f"{name} must have no empty axis, got shape {tuple(a.shape)}")
    return np.ascontiguousarray(a) if isinstance(a, np.ndarray) else a


def same_dtype(arrays, names):
    """Raise TypeError unless all arrays share the first one's dtype (the message lists them all)."""
    _checks.same_dtype(arrays, names)


def shape(a, name, expected, why):
    """Raise ValueError unless ``a.shape == expected``; ``why`` says where the expectation comes from."""
    if tuple(a.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({why}), got {tuple(a.shape)}")


def plan(value, name="plan"):
    """Require a :class:`PerforationPlan` (immutable, so its index arrays are known to be valid)."""
    if not isinstance(value, PerforationPlan):
        raise TypeError(f"{name} must be a refimpl.PerforationPlan, got {type(value).__name__}")
    return value


def fill_map(value, name="plan.index_map"):
    """Check the index map a nearest fill reads: the plan's own is frozen (valid by construction);
    a subclass's own map is checked here — int, shape (B, Ho, Wo), entries in [0, P)."""
    index_map = value.index_map
    if isinstance(index_map, np.ndarray) and is_frozen(index_map):
        return
    expected = (value.batch, *value.out_hw)
    if not isinstance(index_map, np.ndarray) or not np.issubdtype(index_map.dtype, np.integer):
        raise TypeError(f"{name} must be an integer numpy array {expected}, got {type(index_map).__name__}")
    if index_map.shape != expected:
        raise ValueError(f"{name} must have shape {expected}, got {index_map.shape}")
    bad = (index_map < 0) | (index_map >= value.width)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name} entries must be compact indices in [0, {value.width}), "
                         f"got {int(index_map[first])} at index {first}")


def plan_batch(value, n, name="plan"):
    """Raise unless the plan serves a batch of ``n`` samples (shared, or per-sample for exactly ``n``)."""
    if not value.shared and value.batch != n:
        raise ValueError(f"{name} is per-sample for {value.batch} samples but the batch has {n}")


def geometry(value, x_shape, w_shape):
    """Check a :class:`ConvGeometry` against the input and kernel shapes; return it."""
    if not isinstance(value, ConvGeometry):
        raise TypeError(f"geometry must be a refimpl.conv.ConvGeometry, got {type(value).__name__}")
    kernel = tuple(w_shape[2:])
    if tuple(value.kernel) != kernel:
        raise ValueError(f"geometry.kernel must be w's kernel {kernel}, got {tuple(value.kernel)}")
    in_hw = tuple(x_shape[2:])
    if tuple(value.in_hw) != in_hw:
        raise ValueError(f"geometry.in_hw must be x's spatial size {in_hw}, got {tuple(value.in_hw)}")
    out_hw = conv_output_shape(in_hw, kernel, value.stride, value.padding)
    if tuple(value.out_hw) != out_hw:
        raise ValueError(f"geometry.out_hw must be {out_hw} (from in_hw, kernel, stride and padding), "
                         f"got {tuple(value.out_hw)}")
    return value


def weights(w, b, channels, array_types, name_channels="x"):
    """Check ``w`` (K, C, kh, kw) against ``channels`` and ``b`` (K,) against ``w``; ``b=None`` is zeros."""
    w = float_array(w, "w", "(K, C, kh, kw)", array_types)
    if w.shape[1] != channels:
        raise ValueError(f"w has {w.shape[1]} input channels (w.shape[1]) but {name_channels} has {channels}")
    if b is None:
        b = np.zeros(w.shape[0], dtype=w.dtype)
    b = float_array(b, "b", "(K,)", array_types)
    if b.shape[0] != w.shape[0]:
        raise ValueError(f"b must have shape ({w.shape[0]},) to match w.shape[0], got {tuple(b.shape)}")
    return w, b


def index_table(table, source_size, batch, taps=None, pooling=False, name="table"):
    """Check an index table (B, R, T) and return it read-only (copied unless already immutable).

    Entries must be -1 (padding) or a source index in ``[0, source_size)``; the table must be
    int32 exactly (a wider integer would be cut silently); ``B`` is 1 or the batch ``N``; for a
    convolution ``T`` is the kernel's ``kh * kw``; for pooling every window needs a valid tap.
    The first bad entry is named. The returned copy is immutable, so a caller who edits its
    table between a forward and its backward cannot make the backward read out of range.
    """
    if not isinstance(table, np.ndarray):
        raise TypeError(f"{name} must be a numpy int32 array (B, R, T), got {type(table).__name__}")
    if table.dtype != INDEX_DTYPE:
        raise TypeError(f"{name} must have dtype int32 exactly (wider indices would be truncated), "
                        f"got {table.dtype}")
    if table.ndim != 3:
        raise ValueError(f"{name} must be 3-dimensional (B, R, T), got shape {table.shape}")
    if 0 in table.shape:
        raise ValueError(f"{name} must have no empty axis, got shape {table.shape}")
    if table.shape[0] not in (1, batch):
        raise ValueError(f"{name} must have 1 or {batch} (the batch) rows on axis 0, got shape {table.shape}")
    if taps is not None and table.shape[2] != taps:
        raise ValueError(f"{name} must have {taps} taps on its last axis (kh * kw of w), got shape {table.shape}")
    low, high = int(table.min()), int(table.max())
    if low < -1 or high >= source_size:
        bad = (table < -1) | (table >= source_size)
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name} entries must be -1 (padding) or source indices in [0, {source_size}), "
                         f"got {int(table[first])} at index {first}")
    if pooling:
        empty = ~(table >= 0).any(axis=2)
        if empty.any():
            first = tuple(int(i) for i in np.argwhere(empty)[0])
            raise ValueError(f"{name} must give every pooling window at least one tap >= 0, "
                             f"but window {first} has only padding")
    return table if is_frozen(table) else frozen_copy(table)


def mode(value):
    """Check a pooling mode."""
    return _checks.choice(value, "mode", set(POOL_MODES))


def fill(value):
    """Check a fill."""
    return _checks.choice(value, "fill", set(FILLS))


# ---------------------------------------------------------------------------------------------
# The arguments of each forward method, checked together
# ---------------------------------------------------------------------------------------------


def conv_forward_args(x, w, b, plan_, geometry_, array_types=(np.ndarray,)):
    """Arguments of ``conv_forward``: returns ``x, w, b`` (``b=None`` becomes zeros)."""
    x = float_array(x, "x", "(N, C, H, W)", array_types)
    w, b = weights(w, b, x.shape[1], array_types)
    same_dtype([x, w, b], ["x", "w", "b"])
    plan(plan_)
    geometry(geometry_, x.shape, w.shape)
    if plan_.out_hw != tuple(geometry_.out_hw):
        raise ValueError(f"plan is for outputs of size {plan_.out_hw}, but geometry.out_hw is {tuple(geometry_.out_hw)}")
    plan_batch(plan_, x.shape[0])
    return x, w, b


def fill_forward_args(compact, plan_, fill_, array_types=(np.ndarray,)):
    """Arguments of ``fill_forward``: returns ``compact``."""
    compact = float_array(compact, "compact", "(N, K, P)", array_types)
    plan(plan_)
    plan_batch(plan_, compact.shape[0])
    if compact.shape[2] != plan_.width:
        raise ValueError(f"compact must have {plan_.width} entries on its last axis (the plan's P), "
                         f"got shape {tuple(compact.shape)}")
    if fill(fill_) == "nearest":
        fill_map(plan_)
    return compact


def fill_backward_args(ddense, plan_, fill_, array_types=(np.ndarray,)):
    """Arguments of ``fill_backward``: returns ``ddense``."""
    ddense = float_array(ddense, "ddense", "(N, K, Ho, Wo)", array_types)
    plan(plan_)
    plan_batch(plan_, ddense.shape[0])
    if tuple(ddense.shape[2:]) != plan_.out_hw:
        raise ValueError(f"ddense must have the plan's output size {plan_.out_hw} on its last two axes, "
                         f"got shape {tuple(ddense.shape)}")
    if fill(fill_) == "nearest":
        fill_map(plan_)
    return ddense


def table_conv_args(src, table, w, b, array_types=(np.ndarray,)):
    """Arguments of ``table_conv_forward``: returns ``src, table`` (read-only), ``w, b``."""
    src = float_array(src, "src", "(N, C, S)", array_types)
    w, b = weights(w, b, src.shape[1], array_types, name_channels="src")
    same_dtype([src, w, b], ["src", "w", "b"])
    n, _, s = src.shape
    table = index_table(table, s, n, taps=w.shape[2] * w.shape[3])
    return src, table, w, b


def table_pool_args(src, table, mode_, array_types=(np.ndarray,)):
    """Arguments of ``table_pool_forward``: returns ``src, table`` (read-only)."""
    src = float_array(src, "src", "(N, C, S)", array_types)
    mode(mode_)
    n, _, s = src.shape
    return src, index_table(table, s, n, pooling=True)


def cache(value, op, backend_name):
    """Check that ``value`` is a cache of this backend's ``op`` forward; return it."""
    if not isinstance(value, BackendCache):
        raise TypeError(f"cache must be the cache returned by this backend's {op}_forward, got {type(value).__name__}")
    if value.op != op:
        raise ValueError(f"cache comes from {value.op}_forward, but this is {op}_backward")
    if value.backend != backend_name:
        raise ValueError(f"cache comes from the {value.backend!r} backend, but this is the {backend_name!r} backend")
    return value


def gradient(dout, name, expected_shape, dtype, array_types, axes):
    """Check an upstream gradient against the forward output's shape; cast a NumPy one to ``dtype``."""
    dout = float_array(dout, name, axes, array_types)
    shape(dout, name, expected_shape, "the forward output's shape")
    if isinstance(dout, np.ndarray):
        return np.ascontiguousarray(dout, dtype=dtype)
    return dout
