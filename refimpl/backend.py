"""The convolution-backend seam.

Every layer that convolves calls a *backend* object. All backends implement the same small
interface (:class:`ConvBackend`), so a network runs on NumPy, Cython or OpenCL by changing one
argument, and the tests compare backends call by call.

The interface has four operation pairs, each ``*_forward`` returning ``(out, cache)`` and each
``*_backward`` taking ``(dout, cache)``:

===================== ====================================================================
``conv``              perforated convolution to the compact tensor (N, K, P) given a
                      :class:`~refimpl.perforation.PerforationPlan` (dense = full plan)
``fill``              compact (N, K, P) → dense (N, K, Ho, Wo), ``"nearest"`` or ``"zero"``
``table_conv``        convolution reading (N, C, S) through an index table (B, R, T)
``table_pool``        max/avg pooling reading through an index table
===================== ====================================================================

Inputs arrive validated (C-contiguous, one float dtype, int32 index arrays) from the public
functions of :mod:`refimpl.perforation` and :mod:`refimpl.implicit`. Masks, index maps and tables
are computed by ``refimpl`` and consumed, never re-derived, by a backend — that is how all
backends fill identically.

Backends other than NumPy live outside ``refimpl`` and are found by name through the
``ponder.backends`` entry-point group (``fastpath`` registers ``cython`` and ``opencl``) or
registered at run time with :func:`register_backend`.
"""

from __future__ import annotations

import abc
from importlib import metadata

from . import implicit, perforation


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here; the message names the fix."""


class ConvBackend(abc.ABC):
    """The interface every convolution backend implements."""

    name: str = "abstract"

    def supports_dtype(self, dtype):
        """Whether this backend computes in ``dtype`` (float32 / float64)."""
        return True

    # Host/device hooks: NumPy arrays are already "on the device" for host backends.
    def to_device(self, array):
        return array

    def to_host(self, array):
        return array

    @abc.abstractmethod
    def conv_forward(self, x, w, b, plan, geometry):
        """x (N,C,H,W), w (K,C,kh,kw), b (K,) → compact (N,K,P), cache."""

    @abc.abstractmethod
    def conv_backward(self, dcompact, cache):
        """dcompact (N,K,P) → dx (N,C,H,W), dw, db."""

    @abc.abstractmethod
    def fill_forward(self, compact, plan, fill):
        """compact (N,K,P) → dense (N,K,Ho,Wo)."""

    @abc.abstractmethod
    def fill_backward(self, ddense, plan, fill):
        """ddense (N,K,Ho,Wo) → dcompact (N,K,P)."""

    @abc.abstractmethod
    def table_conv_forward(self, src, table, w, b):
        """src (N,C,S), table (B,R,T) → out (N,K,R), cache."""

    @abc.abstractmethod
    def table_conv_backward(self, dout, cache):
        """dout (N,K,R) → dsrc (N,C,S), dw, db."""

    @abc.abstractmethod
    def table_pool_forward(self, src, table, mode):
        """src (N,C,S), table (B,R,T), mode "max"/"avg" → out (N,C,R), cache."""

    @abc.abstractmethod
    def table_pool_backward(self, dout, cache):
        """dout (N,C,R) → dsrc (N,C,S)."""

    def __repr__(self):
        return f"<{type(self).__name__} {self.name!r}>"


class NumpyBackend(ConvBackend):
    """The reference: the pure-NumPy kernels of :mod:`refimpl.perforation` and :mod:`refimpl.implicit`."""

    name = "numpy"

    def conv_forward(self, x, w, b, plan, geometry):
        return perforation.compact_conv_forward(x, w, b, plan, geometry)

    def conv_backward(self, dcompact, cache):
        return perforation.compact_conv_backward(dcompact, cache)

    def fill_forward(self, compact, plan, fill):
        return perforation.fill_forward(compact, plan, fill)

    def fill_backward(self, ddense, plan, fill):
        return perforation.fill_backward(ddense, plan, fill)

    def table_conv_forward(self, src, table, w, b):
        return implicit.table_conv_forward(src, table, w, b)

    def table_conv_backward(self, dout, cache):
        return implicit.table_conv_backward(dout, cache)

    def table_pool_forward(self, src, table, mode):
        return implicit.table_pool_forward(src, table, mode)

    def table_pool_backward(self, dout, cache):
        return implicit.table_pool_backward(dout, cache)


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
