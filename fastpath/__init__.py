"""Compiled backends of the perforated convolution: Cython (CPU) and PyOpenCL (any OpenCL device).

``import fastpath`` always works; whether a backend can run here is a question answered by
:func:`available_backends`. Asking for one that cannot run raises
:class:`refimpl.backend.BackendUnavailableError` with the fix in its message.
"""

from __future__ import annotations

from dataclasses import dataclass

from refimpl.backend import BackendUnavailableError


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here, and why not."""

    name: str
    usable: bool
    reason: str

    def __str__(self):
        return f"{self.name:8s} {'usable' if self.usable else 'unavailable'}: {self.reason}"


def _cython_status():
    try:
        from . import cython_backend
    except ImportError as exc:  # the Python wrapper itself is missing or broken
        return BackendStatus("cython", False, f"fastpath.cython_backend cannot be imported ({exc})")
    return cython_backend.status()


def _opencl_status():
    try:
        from . import opencl_runtime
    except ImportError as exc:
        return BackendStatus("opencl", False, f"fastpath.opencl_runtime cannot be imported ({exc})")
    return opencl_runtime.status()


def available_backends():
    """Status of every fast backend: a dict name -> :class:`BackendStatus`."""
    return {"cython": _cython_status(), "opencl": _opencl_status()}


def usable_backends():
    """Names of the fast backends that run here."""
    return [name for name, st in available_backends().items() if st.usable]


def _require(status):
    if not status.usable:
        raise BackendUnavailableError(f"the {status.name} backend is unavailable: {status.reason}")


def make_cython_backend():
    """Factory for the ``ponder.backends`` entry point ``cython``."""
    _require(_cython_status())
    from .cython_backend import CythonBackend

    return CythonBackend()


def make_opencl_backend():
    """Factory for the ``ponder.backends`` entry point ``opencl``."""
    _require(_opencl_status())
    from .opencl_backend import OpenCLBackend

    return OpenCLBackend()


def compile_network(model, backend=None):
    """A plain ResNet compiled for inference on the Cython kernels (:func:`fastpath.network.compile_network`)."""
    from .network import compile_network as compile_resnet

    return compile_resnet(model, backend)


__all__ = ["BackendStatus", "compile_network", "available_backends", "usable_backends", "make_cython_backend", "make_opencl_backend"]
