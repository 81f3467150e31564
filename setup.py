"""Build the compiled extensions of ``fastpath``.

All metadata lives in ``pyproject.toml``; this file only declares the Cython extensions, because
they need a compile-time probe for OpenMP. Adding an extension means adding one name to
``CYTHON_MODULES``. Without an OpenMP-capable compiler the extensions build single-threaded and the
build says so; ``fastpath.available_backends()`` reports it at run time too.
"""

import os
import sys
import tempfile
import textwrap
from setuptools import setup
from setuptools.command.build_ext import build_ext

CYTHON_MODULES = ["fastpath._cython_conv", "fastpath._cython_unit"]


def _openmp_flags():
    """Return (compile_args, link_args) for OpenMP, or empty lists when the compiler lacks it."""
    if os.environ.get("PONDER_NO_OPENMP"):
        return [], []
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler

    compiler = new_compiler()
    customize_compiler(compiler)
    flag = "/openmp" if sys.platform == "win32" else "-fopenmp"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(textwrap.dedent("""\
                #include <omp.h>
                int main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }
            """))
        try:
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=[flag])
            compiler.link_executable(objs, os.path.join(tmp, "probe"), extra_postargs=[flag])
        except Exception:
            print("ponder: OpenMP not available; building fastpath single-threaded", file=sys.stderr)
            return [], []
    return [flag], ([] if sys.platform == "win32" else [flag])


def _extensions():
    if not CYTHON_MODULES:
        return []
    import numpy
    from Cython.Build import cythonize
    from setuptools import Extension

    cflags, lflags = _openmp_flags()
    opt = ["/O2"] if sys.platform == "win32" else ["-O3"]
    exts = [
        Extension(
            name,
            [name.replace(".", "/") + ".pyx"],
            include_dirs=[numpy.get_include(), "fastpath"],
            depends=["fastpath/direct_conv.h", "fastpath/direct_conv.pxd", "fastpath/direct_conv_planes.h"],
            extra_compile_args=opt + cflags,
            extra_link_args=lflags,
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_9_API_VERSION"),
                           ("PONDER_HAVE_OPENMP", "1" if cflags else "0")],
        )
        for name in CYTHON_MODULES
    ]
    return cythonize(exts, language_level=3, compile_time_env={"HAVE_OPENMP": bool(cflags)})


setup(ext_modules=_extensions(), cmdclass={"build_ext": build_ext})
