"""The OpenCL runtime of the ``opencl`` backend: pyopencl, the kernel programs, and the device choice.

* :func:`kernel_source` / :func:`build_program` — the ``.cl`` files shipped in
  ``fastpath/kernels``, built once per (context, file, options); a failed build raises
  :class:`KernelBuildError` with the compiler's log.
* :func:`probe_device` — does a trivial kernel build and run on a device (and if not, why not).
* :func:`context_choice` — *the* device choice of this process: ``PYOPENCL_CTX`` when set, else the
  first working GPU, else any working device; made once per value of ``PYOPENCL_CTX`` and cached.
  :func:`default_context` and :func:`status` both read it.

Importing this module never fails: without pyopencl, ``cl`` is None and :func:`status` says how
to install it.
"""

from __future__ import annotations

import os
import warnings
from importlib import resources

import numpy as np

from refimpl.backend import BackendUnavailableError

try:
    import pyopencl as cl
    import pyopencl.array as cla
    import pyopencl.tools as cl_tools
except ImportError as _exc:  # status() reports it; importing this module never fails
    cl = cla = cl_tools = None
    _PYOPENCL_IMPORT_ERROR = _exc
else:
    _PYOPENCL_IMPORT_ERROR = None

KERNEL_FILES = {"fast": "perforated_conv.cl", "oracle": "perforated_conv_oracle.cl", "probe": "probe.cl"}

POCL_WHEEL_NOTE = (
    "note: the PyPI wheel pocl-binary-distribution fails to build kernels on AMD CPUs with "
    "\"unknown target CPU 'generic'\"; Debian/Ubuntu's pocl-opencl-icd package works "
    "(apt-get install pocl-opencl-icd)"
)


class KernelBuildError(RuntimeError):
    """An OpenCL program failed to build; the message carries the compiler's log."""


def kernel_source(filename):
    """Text of a kernel file shipped in ``fastpath/kernels``."""
    return resources.files("fastpath").joinpath("kernels", filename).read_text(encoding="utf-8")


_PROGRAMS = {}


def build_program(context, filename, options=()):
    """Build ``kernels/filename`` for ``context`` with ``options`` (cached per context and options).

    Vendors that always print a build log (NVIDIA) make pyopencl emit ``CompilerWarning`` for a
    successful build; that warning is silenced here. A failed build raises
    :class:`KernelBuildError` with the file, the device, the options and the full build log.
    """
    key = (context.int_ptr, filename, tuple(options))
    program = _PROGRAMS.get(key)
    if program is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", cl.CompilerWarning)
                program = cl.Program(context, kernel_source(filename)).build(options=list(options))
        except cl.RuntimeError as exc:
            devices = ", ".join(d.name.strip() for d in context.devices)
            raise KernelBuildError(
                f"building fastpath/kernels/{filename} for {devices} with options {list(options)} "
                f"failed:\n{exc}"
            ) from exc
        _PROGRAMS[key] = program
    return program


def device_label(device):
    return f"{device.name.strip()} [{device.platform.name.strip()}]"


def probe_device(device):
    """Build and run the trivial probe kernel on ``device``; return None if it works, else why not."""
    try:
        context = cl.Context([device])
        queue = cl.CommandQueue(context)
        program = build_program(context, KERNEL_FILES["probe"])
        x = np.arange(8, dtype=np.float32)
        buf = cla.to_device(queue, x)
        program.probe(queue, (8,), None, buf.data)
        if not np.array_equal(buf.get(queue), 2 * x + 1):
            return "the probe kernel ran but returned wrong values"
    except Exception as exc:  # noqa: BLE001 - any driver failure means "does not work"
        message = str(exc).strip().splitlines()
        text = " ".join(message[:6])
        if "generic" in text:
            text += f" ({POCL_WHEEL_NOTE})"
        return f"{type(exc).__name__}: {text}"
    return None


def _choose_context():
    """The context to run on: ``PYOPENCL_CTX`` when set, else the first working GPU, else any device.

    Returns ``(context, None)`` or ``(None, reason)``.
    """
    if cl is None:
        return None, f"pyopencl is not installed ({_PYOPENCL_IMPORT_ERROR}); pip install 'ponder[opencl]'"
    try:
        platforms = cl.get_platforms()
    except cl.Error as exc:
        platforms, platform_error = [], exc
    else:
        platform_error = None
    if not platforms:
        return None, (
            "no OpenCL platform found"
            + (f" ({platform_error})" if platform_error else "")
            + "; install an ICD (NVIDIA driver, ROCm, intel-opencl-icd, or pocl-opencl-icd for the CPU) "
            f"and check /etc/OpenCL/vendors or OCL_ICD_VENDORS; {POCL_WHEEL_NOTE}"
        )
    if os.environ.get("PYOPENCL_CTX"):
        try:
            context = cl.create_some_context(interactive=False)
        except Exception as exc:  # noqa: BLE001
            return None, f"PYOPENCL_CTX={os.environ['PYOPENCL_CTX']!r} selects no usable device: {exc}"
        why = probe_device(context.devices[0])
        if why:
            return None, f"PYOPENCL_CTX selects {device_label(context.devices[0])}, which fails: {why}"
        return context, None
    failures = []
    devices = [d for p in platforms for d in p.get_devices()]
    devices.sort(key=lambda d: not d.type & cl.device_type.GPU)  # GPUs first, stable otherwise
    for device in devices:
        why = probe_device(device)
        if why is None:
            return cl.Context([device]), None
        failures.append(f"{device_label(device)}: {why}")
    if not failures:
        return None, f"OpenCL platforms exist but expose no device; {POCL_WHEEL_NOTE}"
    return None, "no OpenCL device builds a trivial kernel: " + "; ".join(failures)


_DEFAULT = {}  # PYOPENCL_CTX value -> (context, None) or (None, reason)


def context_choice():
    """``(context, None)`` or ``(None, reason)``: the device choice, made once per ``PYOPENCL_CTX`` value."""
    key = os.environ.get("PYOPENCL_CTX")
    if key not in _DEFAULT:
        _DEFAULT[key] = _choose_context()
    return _DEFAULT[key]


def default_context():
    """The shared context of this process (see :func:`context_choice`).

    Raises ``refimpl.backend.BackendUnavailableError`` with the reason when there is none.
    """
    context, reason = context_choice()
    if context is None:
        raise BackendUnavailableError(f"the opencl backend is unavailable: {reason}")
    return context


def status():
    """:class:`fastpath.BackendStatus` of this backend: a trivial kernel is built and run first."""
    from . import BackendStatus

    context, reason = context_choice()
    if context is None:
        return BackendStatus("opencl", False, reason)
    device = context.devices[0]
    fp64 = "float32 and float64" if "cl_khr_fp64" in device.extensions else "float32 only (no cl_khr_fp64)"
    return BackendStatus("opencl", True, f"{device_label(device)}, {fp64}")
