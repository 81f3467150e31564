"""OpenCL-specific tests: device probing, oracle == fast kernels, device-resident data, errors.

The properties every fast backend shares (forward and gradients against refimpl for all shapes,
masks, fills and dtypes) live in the parametrised suite; here are the things only OpenCL has.
A session fixture first builds a trivial kernel on every device and skips everything with the
reason when none works; it also builds every program before Hypothesis starts timing examples.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from refimpl import gradcheck
from refimpl.backend import BackendUnavailableError, NumpyBackend
from refimpl.conv import check_conv_args
from refimpl.implicit import compose_index_table, implicit_conv2d_backward, implicit_conv2d_forward
from refimpl.perforation import PerforationPlan, perforated_conv2d_backward, perforated_conv2d_forward
from strategies import DTYPES, conv_problems, implicit_problems, mask_for
from tolerances import assert_close

ocl = pytest.importorskip("fastpath.opencl_backend")
rt = pytest.importorskip("fastpath.opencl_runtime")  # pyopencl, programs, the device choice
pytestmark = pytest.mark.opencl

if ocl.cl is None:
    pytest.skip(f"pyopencl cannot be imported: {ocl._PYOPENCL_IMPORT_ERROR}", allow_module_level=True)


@pytest.fixture(scope="session")
def devices():
    """Every OpenCL device, each probed by building and running a trivial kernel."""
    from fastpath.opencl_devices import list_devices

    reports = list_devices()
    if not any(r.works for r in reports):
        listing = "; ".join(str(r) for r in reports) or "no OpenCL platform/device found"
        pytest.skip(f"no OpenCL device builds a trivial kernel ({listing}). {ocl.POCL_WHEEL_NOTE}")
    status = ocl.status()
    if not status.usable:  # a device works, but PYOPENCL_CTX selects another
        pytest.skip(f"the opencl backend is unavailable: {status.reason}")
    return reports


@pytest.fixture(scope="session")
def variants(devices):
    """The backend on the default device with each GEMM kernel variant, every program already built."""
    first = ocl.OpenCLBackend(kernels="tiled")
    built = {"tiled": first, "default": ocl.OpenCLBackend(context=first.context)}
    for name in ("direct", "oracle"):
        built[name] = ocl.OpenCLBackend(context=first.context, kernels=name)
    first.warm_up([d for d in DTYPES if first.supports_dtype(d)])  # builds are shared per context
    return built


@pytest.fixture(scope="session", params=["tiled", "direct"])
def backends(request, variants):
    """(a fast variant, the oracle)."""
    return variants[request.param], variants["oracle"]


@pytest.fixture(scope="session")
def fast(variants):
    """The backend as users get it on this device (its default variant)."""
    return variants["default"]


def _dtypes_of(backend):
    return tuple(d for d in DTYPES if backend.supports_dtype(d))


def _plan_and_geometry(x, w, b, stride, padding, mask):
    x, w, b, geometry = check_conv_args(x, w, b, stride, padding)
    plan = PerforationPlan.dense(geometry.out_hw) if mask is None else PerforationPlan(mask)
    return x, w, b, plan, geometry


# --------------------------------------------------------------------------------------------
# Devices and status
# --------------------------------------------------------------------------------------------


def test_status_is_usable_and_names_the_device(devices):
    status = ocl.status()
    assert status.usable, status.reason
    assert status.name == "opencl"
    working = [r.name for r in devices if r.works]
    assert any(name in status.reason for name in working)


def test_bad_pyopencl_ctx_is_reported_not_raised(devices, monkeypatch):
    monkeypatch.setenv("PYOPENCL_CTX", "99")
    monkeypatch.setattr(rt, "_DEFAULT", {})
    status = ocl.status()
    assert not status.usable
    assert "PYOPENCL_CTX='99'" in status.reason


def test_missing_pyopencl_is_reported_with_the_fix(monkeypatch):
    monkeypatch.setattr(rt, "cl", None)
    monkeypatch.setattr(rt, "_PYOPENCL_IMPORT_ERROR", ImportError("No module named 'pyopencl'"))
    monkeypatch.setattr(rt, "_DEFAULT", {})
    status = ocl.status()
    assert not status.usable
    assert "pyopencl is not installed" in status.reason and "ponder[opencl]" in status.reason
    # the backend itself says so with the error every backend raises, not an ImportError
    monkeypatch.setattr(ocl, "cl", None)
    with pytest.raises(BackendUnavailableError, match=r"opencl backend is unavailable: pyopencl is not installed"):
        ocl.OpenCLBackend()


def test_the_device_is_chosen_once_and_shared(devices, monkeypatch):
    monkeypatch.setattr(rt, "_DEFAULT", {})
    calls = []
    choose = rt._choose_context
    monkeypatch.setattr(rt, "_choose_context", lambda: calls.append(1) or choose())
    context = rt.default_context()
    assert ocl.status().usable and rt.context_choice()[0] is context and rt.default_context() is context
    assert calls == [1]


def test_no_platform_is_reported_with_the_icd_hint(devices, monkeypatch):
    monkeypatch.setattr(ocl.cl, "get_platforms", lambda: [])
    monkeypatch.setattr(rt, "_DEFAULT", {})
    monkeypatch.delenv("PYOPENCL_CTX", raising=False)
    status = ocl.status()
    assert not status.usable
    assert "no OpenCL platform" in status.reason and "/etc/OpenCL/vendors" in status.reason
    assert "pocl-opencl-icd" in status.reason


def test_devices_that_fail_the_probe_are_listed_with_their_error(devices, monkeypatch):
    monkeypatch.setattr(rt, "probe_device", lambda device: "KernelBuildError: error: unknown target CPU 'generic'")
    monkeypatch.setattr(rt, "_DEFAULT", {})
    monkeypatch.delenv("PYOPENCL_CTX", raising=False)
    status = ocl.status()
    assert not status.usable
    assert "no OpenCL device builds a trivial kernel" in status.reason
    assert "unknown target CPU 'generic'" in status.reason


def test_probe_names_the_pocl_wheel_problem(devices, monkeypatch):
    def failing_context(devices):
        raise RuntimeError("clBuildProgram failed: error: unknown target CPU 'generic'")

    monkeypatch.setattr(ocl.cl, "Context", failing_context)
    why = ocl.probe_device(object())
    assert "unknown target CPU 'generic'" in why
    assert "pocl-binary-distribution" in why and "pocl-opencl-icd" in why


def test_device_listing_gives_selectors(devices):
    for report in devices:
        platform, device = report.selector.split(":")
        assert int(platform) >= 0 and int(device) >= 0
        assert ("works" in str(report)) == report.works


# --------------------------------------------------------------------------------------------
# Builds: cached, CompilerWarning silenced, real errors shown with the log
# --------------------------------------------------------------------------------------------


def test_programs_are_built_once_per_context_and_options(fast):
    options = fast._options(np.dtype(np.float32), ocl.KERNEL_FILES["fast"])
    first = ocl.build_program(fast.context, ocl.KERNEL_FILES["fast"], options)
    assert ocl.build_program(fast.context, ocl.KERNEL_FILES["fast"], options) is first


def test_build_error_carries_the_compiler_log(fast, monkeypatch):
    monkeypatch.setattr(rt, "kernel_source", lambda name: "__kernel void broken(__global float *x) { x[0] = undeclared_name; }")
    with pytest.raises(ocl.KernelBuildError) as info:
        ocl.build_program(fast.context, "broken_test_only.cl", ("-DTEST_BROKEN=1",))
    message = str(info.value)
    assert "broken_test_only.cl" in message and "-DTEST_BROKEN=1" in message
    assert "undeclared_name" in message  # the compiler's own diagnostic, not just "build failed"


def test_compiler_warning_of_a_successful_build_is_silenced(fast, monkeypatch):
    cl = ocl.cl

    class ChattyProgram:
        """Stands in for a vendor (NVIDIA) that prints a build log on success."""

        def __init__(self, context, source):
            self.source = source

        def build(self, options=()):
            warnings.warn("Built kernel retrieved from cache. Build log: ptxas info", cl.CompilerWarning)
            return self

    monkeypatch.setattr(cl, "Program", ChattyProgram)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = ocl.build_program(fast.context, ocl.KERNEL_FILES["probe"], ("-DCHATTY_TEST=1",))
    assert isinstance(program, ChattyProgram)
    assert not [w for w in caught if issubclass(w.category, cl.CompilerWarning)]
    rt._PROGRAMS.pop((fast.context.int_ptr, ocl.KERNEL_FILES["probe"], ("-DCHATTY_TEST=1",)))


# --------------------------------------------------------------------------------------------
# float64 only where the device has it
# --------------------------------------------------------------------------------------------


def test_float64_without_cl_khr_fp64_is_a_clear_error(fast):
    no_fp64 = ocl.OpenCLBackend(context=fast.context)
    no_fp64.fp64 = False  # what a device without the extension reports
    assert not no_fp64.supports_dtype(np.float64)
    assert no_fp64.supports_dtype(np.float32)
    x = np.zeros((1, 1, 3, 3))
    w, b = np.zeros((1, 1, 3, 3)), np.zeros(1)
    with pytest.raises(TypeError, match="cl_khr_fp64"):
        perforated_conv2d_forward(x, w, b, padding=1, backend=no_fp64)


def test_float64_support_follows_the_device_extension(fast):
    assert fast.supports_dtype(np.float64) == ("cl_khr_fp64" in fast.device.extensions)


# --------------------------------------------------------------------------------------------
# Oracle kernels == fast kernels (and both == refimpl)
# --------------------------------------------------------------------------------------------


def _conv_all(backend, x, w, b, plan, geometry, dcompact):
    out, cache = backend.conv_forward(x, w, b, plan, geometry)
    return (out, *backend.conv_backward(dcompact, cache))


@given(problem=conv_problems(max_channels=4, max_hw=8), seed=st.integers(0, 2**32 - 1))
def test_oracle_and_fast_kernels_agree_on_perforated_conv(backends, problem, seed):
    fast, oracle = backends
    x, w, b, plan, geometry = _plan_and_geometry(*problem)
    assume(fast.supports_dtype(x.dtype))
    dcompact = np.random.default_rng(seed).standard_normal((x.shape[0], w.shape[0], plan.width)).astype(x.dtype)
    got_fast = _conv_all(fast, x, w, b, plan, geometry, dcompact)
    got_oracle = _conv_all(oracle, x, w, b, plan, geometry, dcompact)
    expected = _conv_all(NumpyBackend(), x, w, b, plan, geometry, dcompact)
    for a, o, e in zip(got_fast, got_oracle, expected):
        assert_close(a, o)
        assert_close(o, e)


@given(problem=implicit_problems(layers=("conv",)), seed=st.integers(0, 2**32 - 1))
def test_oracle_and_fast_kernels_agree_on_table_conv(backends, problem, seed):
    fast, oracle = backends
    assume(fast.supports_dtype(problem.compact.dtype))
    table = compose_index_table(problem.plan.index_map, problem.size, problem.stride, problem.padding)
    results = []
    for backend in (fast, oracle, NumpyBackend()):
        out, cache = backend.table_conv_forward(problem.compact, table, problem.w, problem.b)
        dout = np.random.default_rng(seed).standard_normal(out.shape).astype(out.dtype)
        results.append((out, *backend.table_conv_backward(dout, cache)))
    for a, o, e in zip(*results):
        assert_close(a, o)
        assert_close(o, e)


@pytest.mark.parametrize("kernels,tile", [("direct", None), ("tiled", None),
                                          ("tiled", {"TM": 64, "TN": 64, "TK": 16, "WM": 4, "WN": 4}),
                                          ("tiled", {"TM": 32, "TN": 32, "TK": 8, "WM": 2, "WN": 4})])
def test_large_problem_crosses_tiles_and_splits_the_reduction(variants, kernels, tile):
    """More channels than a tile or block, more columns than one split: every edge and split-K path."""
    oracle = variants["oracle"]
    backend = variants[kernels] if tile is None else ocl.OpenCLBackend(context=oracle.context, kernels=kernels, tile=tile)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 5, 13, 11)).astype(np.float32)
    w = rng.standard_normal((70, 5, 3, 3)).astype(np.float32)
    b = rng.standard_normal(70).astype(np.float32)
    masks = np.stack([mask_for(kind, (13, 11), rng, 0.4) for kind in ("grid", "uniform", "single")])
    x, w, b, plan, geometry = _plan_and_geometry(x, w, b, 1, 1, masks)
    dcompact = rng.standard_normal((3, 70, plan.width)).astype(np.float32)
    got = _conv_all(backend, x, w, b, plan, geometry, dcompact)
    for a, o, e in zip(got, _conv_all(oracle, x, w, b, plan, geometry, dcompact),
                       _conv_all(NumpyBackend(), x, w, b, plan, geometry, dcompact)):
        assert_close(a, o)
        assert_close(a, e)


def test_backward_is_deterministic(backends):
    """The gather formulation (no atomics) gives bit-identical gradients run after run."""
    fast, _ = backends
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 6, 12, 12)).astype(np.float32)
    w = rng.standard_normal((8, 6, 3, 3)).astype(np.float32)
    b = np.zeros(8, dtype=np.float32)
    x, w, b, plan, geometry = _plan_and_geometry(x, w, b, 1, 1, mask_for("grid", (12, 12), rng, 0.5))
    out, cache = fast.conv_forward(x, w, b, plan, geometry)
    dcompact = rng.standard_normal(out.shape).astype(np.float32)
    first = fast.conv_backward(dcompact, cache)
    for a, again in zip(first, fast.conv_backward(dcompact, cache)):
        assert np.array_equal(a, again)


# --------------------------------------------------------------------------------------------
# Gradients by central differences on the device (float64)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fill", ["nearest", "zero"])
def test_perforated_conv_gradients_by_central_differences(fast, fill):
    if not fast.supports_dtype(np.float64):
        pytest.skip(f"{fast.device_name} has no cl_khr_fp64")
    rng = np.random.default_rng(11)
    mask = np.stack([mask_for("bernoulli", (4, 4), rng, 0.5), mask_for("single", (4, 4), rng)])
    inputs = {"x": rng.standard_normal((2, 2, 5, 4)), "w": rng.standard_normal((3, 2, 2, 3)),
              "b": rng.standard_normal(3)}
    state = {}

    def forward(x, w, b):
        out, state["cache"] = perforated_conv2d_forward(x, w, b, mask, stride=(1, 1), padding=(0, 1),
                                                        fill=fill, backend=fast)
        return out

    def backward(dout):
        dx, dw, db = perforated_conv2d_backward(dout, state["cache"])
        return {"x": dx, "w": dw, "b": db}

    errors = gradcheck.check_gradients(forward, backward, inputs, rng)
    assert max(errors.values()) < 1e-6, errors


def test_implicit_conv_gradients_by_central_differences(fast):
    if not fast.supports_dtype(np.float64):
        pytest.skip(f"{fast.device_name} has no cl_khr_fp64")
    rng = np.random.default_rng(12)
    plan = PerforationPlan(mask_for("uniform", (5, 4), rng, 0.6))
    inputs = {"compact": rng.standard_normal((2, 2, plan.width)), "w": rng.standard_normal((3, 2, 3, 3)),
              "b": rng.standard_normal(3)}
    state = {}

    def forward(compact, w, b):
        out, state["cache"] = implicit_conv2d_forward(compact, plan, w, b, stride=1, padding=1, backend=fast)
        return out

    def backward(dout):
        dcompact, dw, db = implicit_conv2d_backward(dout, state["cache"])
        return {"compact": dcompact, "w": dw, "b": db}

    errors = gradcheck.check_gradients(forward, backward, inputs, rng)
    assert max(errors.values()) < 1e-6, errors


# --------------------------------------------------------------------------------------------
# Data on the device: every method takes and returns pyopencl arrays
# --------------------------------------------------------------------------------------------


def test_to_device_and_back_is_exact(fast):
    rng = np.random.default_rng(0)
    for dtype in _dtypes_of(fast):
        a = rng.standard_normal((2, 3, 4)).astype(dtype)
        on_device = fast.to_device(a)
        assert isinstance(on_device, ocl.cla.Array)
        back = fast.to_host(on_device)
        assert isinstance(back, np.ndarray) and back.dtype == a.dtype
        assert np.array_equal(back, a)
    assert fast.to_device(on_device) is on_device
    strided = rng.standard_normal((4, 6)).astype(np.float32)[:, ::2]
    assert np.array_equal(fast.to_host(fast.to_device(strided)), strided)  # NumPy views are converted
    with pytest.raises(ValueError, match="C-contiguous"):
        fast.to_device(fast.to_device(rng.standard_normal((4, 6)).astype(np.float32))[:, ::2])


def test_every_method_returns_the_kind_it_was_given(fast):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 6, 5)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    x, w, b, plan, geometry = _plan_and_geometry(x, w, b, 1, 1, mask_for("grid", (6, 5), rng, 0.5))
    pool_table = compose_index_table(plan.index_map, 2, 2, 0)
    conv_table = compose_index_table(plan.index_map, 3, 1, 1)
    w2 = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    d = fast.to_device

    def run(host):
        put = (lambda a: a) if host else d
        compact, ccache = fast.conv_forward(put(x), put(w), put(b), plan, geometry)
        dense = fast.fill_forward(compact, plan, "nearest")
        dcompact = fast.fill_backward(dense, plan, "nearest")
        grads = fast.conv_backward(dcompact, ccache)
        pooled, pcache = fast.table_pool_forward(compact, pool_table, "max")
        dpool = fast.table_pool_backward(pooled, pcache)
        tout, tcache = fast.table_conv_forward(compact, conv_table, put(w2), put(b[:2]))
        tgrads = fast.table_conv_backward(tout, tcache)
        return [compact, dense, dcompact, *grads, pooled, dpool, tout, *tgrads]

    on_host, on_device = run(True), run(False)
    for h, dv in zip(on_host, on_device):
        assert isinstance(h, np.ndarray)
        assert isinstance(dv, ocl.cla.Array)
        assert np.array_equal(h, dv.get())


def test_chain_transfer_share_is_measured(fast):
    result = ocl.chain_transfer_share(fast, np.random.default_rng(0), batch=2, channels=4, size=8, repeat=2)
    assert result["resident"] > 0 and result["round_trips"] > 0 and result["kernel_seconds"] > 0
    assert result["bytes_round_trips"] > result["bytes_resident"]
    assert 0 < result["copy_seconds_resident"] < result["copy_seconds_round_trips"]
    assert 0 < result["transfer_share_resident"] < result["transfer_share_round_trips"] < 1


def test_mixed_dtypes_on_the_device_are_rejected(fast):
    if not fast.supports_dtype(np.float64):
        pytest.skip("needs float64")
    rng = np.random.default_rng(1)
    x = fast.to_device(rng.standard_normal((1, 2, 4, 4)).astype(np.float32))
    w, b = rng.standard_normal((1, 2, 3, 3)), np.zeros(1)
    plan = PerforationPlan.dense((2, 2))
    geometry = check_conv_args(np.zeros((1, 2, 4, 4)), w, b, 1, 0)[3]
    with pytest.raises(TypeError, match="share one dtype"):
        fast.conv_forward(x, w, b, plan, geometry)


# --------------------------------------------------------------------------------------------
# Index data
# --------------------------------------------------------------------------------------------


@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 4), st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_invert_table_lists_every_reader_once(batch, rows, taps, sources, seed):
    table = np.random.default_rng(seed).integers(-1, sources, size=(batch, rows, taps)).astype(np.int32)
    inverse, depth = ocl.invert_table(table, sources)
    assert inverse.shape == (batch, sources, taps * depth)
    readers = inverse.reshape(batch, sources, taps, depth)
    for b in range(batch):
        for s in range(sources):
            for t in range(taps):
                expected = [r for r in range(rows) if table[b, r, t] == s]
                got = [r for r in readers[b, s, t] if r >= 0]
                assert got == expected
