"""The convolution-backend seam.

Every layer that convolves calls a *backend* object. All backends implement the same small
interface (:class:`ConvBackend`), so a network runs on NumPy, Cython or OpenCL by changing one
argument, and the tests compare backends call by call.

The interface has four operation pairs, each ``*_forward`` returning ``(out, cache)`` and each
``*_backward`` taking ``(dout, cache)``:

===================== ====================================================================
``conv``              perforated convolution to the compact tensor (N, K, P) given a
                      :class:`~refimpl.plan.PerforationPlan` (dense = full plan)
``fill``              compact (N, K, P) → dense (N, K, Ho, Wo), ``"nearest"`` or ``"zero"``
``table_conv``        convolution reading (N, C, S) through an index table (B, R, T)
``table_pool``        max/avg pooling reading through an index table
===================== ====================================================================

Each public method above *validates, then calls the backend's kernel*: ``conv_forward`` checks
its arguments with :mod:`refimpl.backend_checks` and calls ``_conv_forward``, and likewise for the
others (the template-method pattern). A backend implements only the underscored kernel methods,
which receive C-contiguous arrays of one float dtype, a valid plan and read-only int32 tables
whose entries are in range — so no backend can forget a check, and all of them reject the same
input with the same message. The checks cost O(1) per array plus O(table size), never a pass over
the float data. Masks, index maps and tables are computed by ``refimpl`` and consumed, never
re-derived, by a backend — that is how all backends fill identically.

The layering (each module imports only those above it in this list): :mod:`refimpl.plan` (the
immutable plan) → :mod:`refimpl.numpy_kernels` (the reference kernels) and
:mod:`refimpl.backend_checks` → this module (the interface, :class:`NumpyBackend` as the adapter
onto the kernels, the registry) → the public functions of :mod:`refimpl.perforation` and
:mod:`refimpl.implicit`, which validate and dispatch here. Nothing below calls back up.

Backends other than NumPy live outside ``refimpl`` and are found by name through the
``ponder.backends`` entry-point group (``fastpath`` registers ``cython`` and ``opencl``) or
registered at run time with :func:`register_backend`.
"""

from __future__ import annotations

import abc
from importlib import metadata

import numpy as np

from . import backend_checks as checks
from . import numpy_kernels


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here; the message names the fix."""


class ConvBackend(abc.ABC):
    """The interface every convolution backend implements.

    Subclasses implement the eight kernel methods ``_conv_forward``, ``_conv_backward``,
    ``_fill_forward``, ``_fill_backward``, ``_table_conv_forward``, ``_table_conv_backward``,
    ``_table_pool_forward`` and ``_table_pool_backward`` (same arguments as the public methods,
    validated; a backward receives the kernel's own cache). The public methods below validate
    and dispatch; a forward wraps the kernel's cache in a
    :class:`~refimpl.backend_checks.BackendCache` so that its backward can check ``dout``.
    """

    name: str = "abstract"
    #: The array classes this backend accepts for float data (a device backend adds its own).
    array_types: tuple = (np.ndarray,)

    def supports_dtype(self, dtype):
        """Whether this backend computes in ``dtype`` (float32 / float64)."""
        return True

    # Host/device hooks: NumPy arrays are already "on the device" for host backends.
    def to_device(self, array):
        return array

    def to_host(self, array):
        return array

    def _host_index(self, table):
        """An index table as a NumPy array (a device backend downloads a device table here)."""
        return table

    # -- perforated convolution ------------------------------------------------------------------

    def conv_forward(self, x, w, b, plan, geometry):
        """x (N,C,H,W), w (K,C,kh,kw), b (K,) or None, plan, geometry → compact (N,K,P), cache."""
        x, w, b = checks.conv_forward_args(x, w, b, plan, geometry, self.array_types)
        compact, inner = self._conv_forward(x, w, b, plan, geometry)
        out_shape = (x.shape[0], w.shape[0], plan.width)
        return compact, checks.BackendCache("conv", self.name, out_shape, x.dtype, inner)

    def conv_backward(self, dcompact, cache):
        """dcompact (N,K,P) → dx (N,C,H,W), dw, db."""
        cache = checks.cache(cache, "conv", self.name)
        dcompact = checks.gradient(dcompact, "dcompact", cache.out_shape, cache.dtype, self.array_types, "(N, K, P)")
        return self._conv_backward(dcompact, cache.inner)

    # -- fills -----------------------------------------------------------------------------------

    def fill_forward(self, compact, plan, fill):
        """compact (N,K,P) → dense (N,K,Ho,Wo), ``fill`` "nearest" or "zero"."""
        compact = checks.fill_forward_args(compact, plan, fill, self.array_types)
        return self._fill_forward(compact, plan, fill)

    def fill_backward(self, ddense, plan, fill):
        """ddense (N,K,Ho,Wo) → dcompact (N,K,P)."""
        ddense = checks.fill_backward_args(ddense, plan, fill, self.array_types)
        return self._fill_backward(ddense, plan, fill)

    # -- through an index table ------------------------------------------------------------------

    def table_conv_forward(self, src, table, w, b):
        """src (N,C,S), table int32 (B,R,T), w (K,C,kh,kw), b (K,) or None → out (N,K,R), cache."""
        src, table, w, b = checks.table_conv_args(src, self._host_index(table), w, b, self.array_types)
        out, inner = self._table_conv_forward(src, table, w, b)
        out_shape = (src.shape[0], w.shape[0], table.shape[1])
        return out, checks.BackendCache("table_conv", self.name, out_shape, src.dtype, inner)

    def table_conv_backward(self, dout, cache):
        """dout (N,K,R) → dsrc (N,C,S), dw, db."""
        cache = checks.cache(cache, "table_conv", self.name)
        dout = checks.gradient(dout, "dout", cache.out_shape, cache.dtype, self.array_types, "(N, K, R)")
        return self._table_conv_backward(dout, cache.inner)

    def table_pool_forward(self, src, table, mode):
        """src (N,C,S), table int32 (B,R,T), mode "max"/"avg" → out (N,C,R), cache."""
        src, table = checks.table_pool_args(src, self._host_index(table), mode, self.array_types)
        out, inner = self._table_pool_forward(src, table, mode)
        out_shape = (src.shape[0], src.shape[1], table.shape[1])
        return out, checks.BackendCache("table_pool", self.name, out_shape, src.dtype, inner)

    def table_pool_backward(self, dout, cache):
        """dout (N,C,R) → dsrc (N,C,S)."""
        cache = checks.cache(cache, "table_pool", self.name)
        dout = checks.gradient(dout, "dout", cache.out_shape, cache.dtype, self.array_types, "(N, C, R)")
        return self._table_pool_backward(dout, cache.inner)

    # -- the kernels a backend implements --------------------------------------------------------

    @abc.abstractmethod
    def _conv_forward(self, x, w, b, plan, geometry):
        """Kernel of :meth:`conv_forward` (validated arguments) → compact, the backend's cache."""

    @abc.abstractmethod
    def _conv_backward(self, dcompact, cache):
        """Kernel of :meth:`conv_backward` (``cache`` is the one ``_conv_forward`` returned)."""

    @abc.abstractmethod
    def _fill_forward(self, compact, plan, fill):
        """Kernel of :meth:`fill_forward`."""

    @abc.abstractmethod
    def _fill_backward(self, ddense, plan, fill):
        """Kernel of :meth:`fill_backward`."""

    @abc.abstractmethod
    def _table_conv_forward(self, src, table, w, b):
        """Kernel of :meth:`table_conv_forward` → out, the backend's cache."""

    @abc.abstractmethod
    def _table_conv_backward(self, dout, cache):
        """Kernel of :meth:`table_conv_backward`."""

    @abc.abstractmethod
    def _table_pool_forward(self, src, table, mode):
        """Kernel of :meth:`table_pool_forward` → out, the backend's cache."""

    @abc.abstractmethod
    def _table_pool_backward(self, dout, cache):
        """Kernel of :meth:`table_pool_backward`."""

    def __repr__(self):
        return f"<{type(self).__name__} {self.name!r}>"


class NumpyBackend(ConvBackend):
    """The reference: the interface on the pure-NumPy kernels of :mod:`refimpl.numpy_kernels`."""

    name = "numpy"

    def _conv_forward(self, x, w, b, plan, geometry):
        return numpy_kernels.compact_conv_forward(x, w, b, plan, geometry)

    def _conv_backward(self, dcompact, cache):
        return numpy_kernels.compact_conv_backward(dcompact, cache)

    def _fill_forward(self, compact, plan, fill):
        return numpy_kernels.fill_forward(compact, plan, fill)

    def _fill_backward(self, ddense, plan, fill):
        return numpy_kernels.fill_backward(ddense, plan, fill)

    def _table_conv_forward(self, src, table, w, b):
        return numpy_kernels.table_conv_forward(src, table, w, b)

    def _table_conv_backward(self, dout, cache):
        return numpy_kernels.table_conv_backward(dout, cache)

    def _table_pool_forward(self, src, table, mode):
        return numpy_kernels.table_pool_forward(src, table, mode)

    def _table_pool_backward(self, dout, cache):
        return numpy_kernels.table_pool_backward(dout, cache)


_REGISTRY = {"numpy": NumpyBackend}
_INSTANCES = {}
ENTRY_POINT_GROUP = "ponder.backends"


def register_backend(name, factory):
    """Make ``get_backend(name)`` return ``factory()`` (created once, then reused)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory must be callable (a ConvBackend subclass or a function), got {factory!r}")
    _REGISTRY[name] = factory
    _INSTANCES.pop(name, None)


def known_backends():
    """Names of every backend known here (registered or advertised by an installed package)."""
    names = set(_REGISTRY)
    names.update(ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def get_backend(backend=None):
    """Return a backend instance from an instance, a name, or ``None`` (the NumPy reference).

    Raises
    ------
    ValueError
        For an unknown name (the message lists the known ones).
    BackendUnavailableError
        When the backend exists but cannot run here (no compiled extension, no OpenCL device);
        the message says how to fix it.
    """
    if backend is None:
        backend = "numpy"
    if isinstance(backend, ConvBackend):
        return backend
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a ConvBackend, a name or None, got {type(backend).__name__}")
    if backend in _INSTANCES:
        return _INSTANCES[backend]
    factory = _REGISTRY.get(backend)
    if factory is None:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name == backend:
                factory = ep.load()
                break
    if factory is None:
        raise ValueError(f"backend must be one of {known_backends()}, got {backend!r}")
    instance = factory()
    _INSTANCES[backend] = instance
    return instance
