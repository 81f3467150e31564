"""The fast backends every backend test runs against, as pytest parameters.

``fastpath.available_backends()`` is the registry: a backend whose status is usable joins the
suite automatically (the OpenCL backend does so once its ``status()`` says usable); an unusable one
is reported as skipped with its reason, so a machine without a compiler or an OpenCL device says
*why* a backend was not tested instead of passing silently.

Besides each backend with its defaults, the Cython backend also runs as ``cython-chunked``: the gather-and-GEMM
convolution rather than the direct float32 kernel, two
threads even for tiny calls (which the default runs on one thread) and column chunks of a few
columns, so that chunk boundaries fall inside images and per-thread partial sums are merged in
every test.

Use::

    from backends import fast_backend   # the fixture; the test takes ``fast_backend``

(``fast_backend_plain`` gives each backend once, with its defaults.)
"""

from __future__ import annotations

import pytest

import fastpath
from refimpl.backend import get_backend


def _make(name):
    if name == "cython-chunked":
        from fastpath.cython_backend import CythonBackend

        # the gather-and-GEMM path (chunk_bytes sizes its chunks; float32 would otherwise take the direct kernel)
        return CythonBackend(threads=2, chunk_bytes=64, parallel_work=0, direct_conv=False)
    return get_backend(name)


def backend_params(variants=True):
    """One ``pytest.param`` per fast backend configuration; unusable backends are skipped with their reason.

    ``variants=False`` leaves out the extra configurations (``cython-chunked``): for the costly
    central-difference tests, which check the backward formulas rather than the chunking.
    """
    params = []
    for name, status in fastpath.available_backends().items():
        marks = [] if status.usable else [pytest.mark.skip(reason=f"{name} backend unavailable: {status.reason}")]
        if name == "opencl":
            marks.append(pytest.mark.opencl)
        params.append(pytest.param(name, marks=marks, id=name))
        if name == "cython" and variants:
            params.append(pytest.param("cython-chunked", marks=marks, id="cython-chunked"))
    return params


@pytest.fixture(scope="module", params=backend_params())
def fast_backend(request):
    """A usable fast backend instance (module-scoped: Hypothesis reruns the test body, not the fixture)."""
    return _make(request.param)


@pytest.fixture(scope="module", params=backend_params(variants=False))
def fast_backend_plain(request):
    """Like ``fast_backend``, each backend once with its default settings."""
    return _make(request.param)
