"""Every usable fast backend against refimpl's NumPy backend (docs/spec.md §11), call by call.

One parametrised suite (the ``fast_backend`` fixture of :mod:`backends`): a backend that reports
itself usable in ``fastpath.available_backends()`` joins it. Values must agree within the
dtype-keyed tolerances of :mod:`tolerances`; integer facts (which positions are computed, hence
the FLOP count, and the copies made by the fills) must agree exactly.

Shapes, strides, paddings, masks (full, single-position, random, grid; shared and per-sample of
unequal sizes), fills and dtypes come from :mod:`strategies`, which reaches 1×1 kernels, kernels
as large as the padded input (Ho or Wo = 1) and N = 1 by construction.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from backends import fast_backend, fast_backend_plain  # noqa: F401  (the fixtures)
from refimpl.backend import NumpyBackend
from refimpl.conv import check_conv_args, conv2d_forward, conv_flops
from refimpl.gradcheck import check_gradients
from refimpl.implicit import (
    implicit_conv2d_backward,
    implicit_conv2d_forward,
    implicit_pool2d_backward,
    implicit_pool2d_forward,
)
from refimpl.perforation import (
    PerforationPlan,
    perforated_conv2d_backward,
    perforated_conv2d_forward,
    perforated_conv_flops,
)
from strategies import conv_problems, implicit_problems, rngs
from tolerances import GRADCHECK_RTOL, assert_close

REFERENCE = NumpyBackend()
OUTPUTS = [("dense", "nearest"), ("dense", "zero"), ("compact", None)]


def supported(backend, dtype):
    """Whether ``backend`` computes in ``dtype`` (an OpenCL device without fp64 does not float64).

    Used with ``assume``: Hypothesis discards the example and draws another, instead of counting
    an example that tested nothing as a pass.
    """
    return backend.supports_dtype(dtype)


def host(backend, array):
    return np.asarray(backend.to_host(array))


# ---------------------------------------------------------------------------------------------
# Perforated convolution: forward and every gradient
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output,fill", OUTPUTS, ids=["nearest", "zero", "compact"])
@given(problem=conv_problems(), dense=st.booleans(), rng=rngs())
def test_perforated_conv_matches_reference(fast_backend, output, fill, problem, dense, rng):
    x, w, b, stride, padding, mask = problem
    assume(supported(fast_backend, x.dtype))
    mask = None if dense else mask
    kwargs = dict(stride=stride, padding=padding, fill=fill or "nearest", output=output)
    out, cache = perforated_conv2d_forward(x, w, b, mask, backend=fast_backend, **kwargs)
    ref, ref_cache = perforated_conv2d_forward(x, w, b, mask, **kwargs)
    out = host(fast_backend, out)
    assert out.dtype == x.dtype
    assert_close(out, ref)

    dout = rng.standard_normal(ref.shape).astype(x.dtype)
    grads = perforated_conv2d_backward(dout, cache)
    ref_grads = perforated_conv2d_backward(dout, ref_cache)
    for name, got, want in zip(("dx", "dw", "db"), grads, ref_grads):
        got = host(fast_backend, got)
        assert got.dtype == x.dtype, name
        assert_close(got, want)


@pytest.mark.parametrize("fill", ["nearest", "zero"])
@given(problem=conv_problems(), rng=rngs())
def test_fills_match_reference_exactly(fast_backend, fill, problem, rng):
    # A fill only copies (forward) or adds copies (adjoint): forward must be bit-identical, and
    # the adjoint too for "zero" (one source per slot); "nearest" sums, so it gets the tolerance.
    x, w, b, stride, padding, mask = problem
    assume(supported(fast_backend, x.dtype))
    plan = PerforationPlan(mask)
    n, k = x.shape[0], w.shape[0]
    compact = rng.standard_normal((n, k, plan.width)).astype(x.dtype)
    for sample, count in enumerate(np.broadcast_to(plan.counts, (n,))):
        compact[sample, :, count:] = 0
    ref = REFERENCE.fill_forward(compact, plan, fill)
    got = host(fast_backend, fast_backend.fill_forward(fast_backend.to_device(compact), plan, fill))
    assert got.dtype == ref.dtype
    np.testing.assert_array_equal(got, ref)

    ddense = rng.standard_normal(ref.shape).astype(x.dtype)
    want = REFERENCE.fill_backward(ddense, plan, fill)
    got = host(fast_backend, fast_backend.fill_backward(fast_backend.to_device(ddense), plan, fill))
    if fill == "zero":
        np.testing.assert_array_equal(got, want)
    else:
        assert_close(got, want)


@given(problem=conv_problems())
def test_backend_computes_exactly_the_plan_positions(fast_backend, problem):
    # Zero weights and unit bias make every computed entry exactly 1 and every padded slot of a
    # per-sample plan exactly 0: the set of positions computed — hence the FLOPs — is exact.
    x, w, b, stride, padding, mask = problem
    assume(supported(fast_backend, x.dtype))
    x, w, b, geometry = check_conv_args(x, w, b, stride, padding)
    plan = PerforationPlan(mask)
    n, c = x.shape[:2]
    k = w.shape[0]
    compact, _ = fast_backend.conv_forward(fast_backend.to_device(x), fast_backend.to_device(np.zeros_like(w)),
                                           fast_backend.to_device(np.ones_like(b)), plan, geometry)
    compact = host(fast_backend, compact)
    counts = np.broadcast_to(plan.counts, (n,))
    computed_slots = np.arange(plan.width)[None, None, :] < counts[:, None, None]
    np.testing.assert_array_equal(compact, np.broadcast_to(computed_slots, compact.shape).astype(x.dtype))
    computed = int(np.count_nonzero(compact)) // k
    assert computed == plan.computed_positions(n)
    assert conv_flops(computed, c, k, geometry.kernel) == perforated_conv_flops(plan, n, c, k, geometry.kernel)


@given(problem=conv_problems())
def test_compact_output_is_the_dense_convolution_at_the_plan_positions(fast_backend, problem):
    x, w, b, stride, padding, mask = problem
    assume(supported(fast_backend, x.dtype))
    compact, _ = perforated_conv2d_forward(x, w, b, mask, stride, padding, output="compact", backend=fast_backend)
    compact = host(fast_backend, compact)
    dense, _ = conv2d_forward(x, w, b, stride, padding)
    plan = PerforationPlan(mask)
    n, k = dense.shape[:2]
    flat = dense.reshape(n, k, -1)
    for sample in range(n):
        row = 0 if plan.shared else sample
        count = plan.counts[row]
        assert_close(compact[sample, :, :count], flat[sample][:, plan.positions[row, :count]], dtype=x.dtype)
        assert not compact[sample, :, count:].any()


# ---------------------------------------------------------------------------------------------
# Implicit interpolation: conv and pooling through an index table
# ---------------------------------------------------------------------------------------------


@given(problem=implicit_problems(), rng=rngs())
def test_implicit_layers_match_reference(fast_backend, problem, rng):
    p = problem
    assume(supported(fast_backend, p.compact.dtype))
    if p.layer == "conv":
        run = lambda backend: implicit_conv2d_forward(p.compact, p.plan, p.w, p.b, p.stride, p.padding,  # noqa: E731
                                                      backend=backend)
        backward = implicit_conv2d_backward
    else:
        run = lambda backend: implicit_pool2d_forward(p.compact, p.plan, p.layer, p.size, p.stride,  # noqa: E731
                                                      p.padding, backend=backend)
        backward = implicit_pool2d_backward
    out, cache = run(fast_backend)
    ref, ref_cache = run(None)
    out = host(fast_backend, out)
    assert out.dtype == p.compact.dtype
    assert_close(out, ref)

    dout = rng.standard_normal(ref.shape).astype(p.compact.dtype)
    grads, ref_grads = backward(dout, cache), backward(dout, ref_cache)
    if p.layer != "conv":
        grads, ref_grads = (grads,), (ref_grads,)
    assert len(grads) == len(ref_grads)
    for got, want in zip(grads, ref_grads):
        got = host(fast_backend, got)
        assert got.dtype == p.compact.dtype
        assert_close(got, want)


# ---------------------------------------------------------------------------------------------
# The fast backward against central differences (float64, random upstream gradient); each
# backend once with its defaults (the chunked variant's backward is compared with the reference above)
# ---------------------------------------------------------------------------------------------

SMALL = {"max_batch": 2, "max_channels": 2, "max_hw": 5, "max_kernel": 3}


class Recorder:
    def __init__(self, forward, backward, names):
        self.forward_fn, self.backward_fn, self.names = forward, backward, names
        self.cache = None

    def forward(self, **inputs):
        out, self.cache = self.forward_fn(**inputs)
        return np.asarray(out)

    def backward(self, dout):
        grads = self.backward_fn(dout, self.cache)
        grads = grads if isinstance(grads, tuple) else (grads,)
        return dict(zip(self.names, grads))


@pytest.mark.parametrize("output,fill", OUTPUTS, ids=["nearest", "zero", "compact"])
@given(problem=conv_problems(dtypes=(np.float64,), **SMALL), rng=rngs())
def test_perforated_conv_gradients_by_central_differences(fast_backend_plain, output, fill, problem, rng):
    x, w, b, stride, padding, mask = problem
    assume(supported(fast_backend_plain, x.dtype))
    plan = PerforationPlan(mask)  # once: every difference quotient reuses its index map
    rec = Recorder(lambda x, w, b: perforated_conv2d_forward(x, w, b, plan, stride, padding, fill=fill or "nearest",
                                                             output=output, backend=fast_backend_plain),
                   perforated_conv2d_backward, ("x", "w", "b"))
    errors = check_gradients(rec.forward, rec.backward, {"x": x, "w": w, "b": b}, rng)
    assert max(errors.values()) < GRADCHECK_RTOL, errors


@given(problem=implicit_problems(dtypes=(np.float64,), max_hw=5), rng=rngs())
def test_implicit_gradients_by_central_differences(fast_backend_plain, problem, rng):
    # compact holds distinct values, so max pooling is differentiable at this point.
    p = problem
    assume(supported(fast_backend_plain, p.compact.dtype))
    if p.layer == "conv":
        rec = Recorder(lambda compact, w, b: implicit_conv2d_forward(compact, p.plan, w, b, p.stride, p.padding,
                                                                     backend=fast_backend_plain),
                       implicit_conv2d_backward, ("compact", "w", "b"))
        inputs = {"compact": p.compact, "w": p.w, "b": p.b}
    else:
        rec = Recorder(lambda compact: implicit_pool2d_forward(compact, p.plan, p.layer, p.size, p.stride, p.padding,
                                                               backend=fast_backend_plain),
                       implicit_pool2d_backward, ("compact",))
        inputs = {"compact": p.compact}
    errors = check_gradients(rec.forward, rec.backward, inputs, rng, h=1e-6 if p.layer == "conv" else 1e-7)
    assert max(errors.values()) < GRADCHECK_RTOL, errors


# ---------------------------------------------------------------------------------------------
# What the wrapper accepts and refuses
# ---------------------------------------------------------------------------------------------


def awkward(array, how):
    """The same values as a non-contiguous view or a read-only array."""
    if how == "readonly":
        array = array.copy()
        array.setflags(write=False)
        return array
    wide = np.empty(array.shape[:-1] + (2 * array.shape[-1],), dtype=array.dtype)
    wide[..., ::2] = array
    view = wide[..., ::2]
    assert not view.flags.c_contiguous or array.shape[-1] == 1
    return view


@pytest.mark.parametrize("how", ["readonly", "strided"])
@given(problem=conv_problems(), rng=rngs())
def test_noncontiguous_and_readonly_inputs_are_accepted(fast_backend, how, problem, rng):
    x, w, b, stride, padding, mask = problem
    assume(supported(fast_backend, x.dtype))
    out, cache = perforated_conv2d_forward(awkward(x, how), awkward(w, how), awkward(b, how), mask, stride, padding,
                                           backend=fast_backend)
    ref, ref_cache = perforated_conv2d_forward(x, w, b, mask, stride, padding)
    assert_close(host(fast_backend, out), ref)
    dout = rng.standard_normal(ref.shape).astype(x.dtype)
    for got, want in zip(perforated_conv2d_backward(awkward(dout, how), cache),
                         perforated_conv2d_backward(dout, ref_cache)):
        assert_close(host(fast_backend, got), want)

    # The backend methods themselves, given read-only arrays (as a caller holding frozen
    # weights would): they must not write to their inputs, and must accept them.
    if how == "readonly":
        x_, w_, b_, geometry = check_conv_args(x, w, b, stride, padding)
        plan = PerforationPlan(mask)
        frozen = [awkward(a, "readonly") for a in (x_, w_, b_)]
        compact, conv_cache = fast_backend.conv_forward(*[fast_backend.to_device(a) for a in frozen], plan, geometry)
        ref_compact, _ = perforated_conv2d_forward(x, w, b, mask, stride, padding, output="compact")
        assert_close(host(fast_backend, compact), ref_compact)
        for a, original in zip(frozen, (x_, w_, b_)):
            np.testing.assert_array_equal(a, original)


X = np.random.default_rng(0).standard_normal((2, 3, 5, 5))
W = np.random.default_rng(1).standard_normal((4, 3, 3, 3))

BAD_CALLS = {
    "integer x": lambda be: perforated_conv2d_forward(X.astype(np.int64), W, backend=be),
    "mixed dtypes": lambda be: perforated_conv2d_forward(X.astype(np.float32), W, backend=be),
    "channel mismatch": lambda be: perforated_conv2d_forward(X, W[:, :2], backend=be),
    "NaN input": lambda be: perforated_conv2d_forward(np.where(X > 1, np.nan, X), W, backend=be),
    "kernel too large": lambda be: perforated_conv2d_forward(X, np.ones((1, 3, 7, 7)), backend=be),
    "mask shape": lambda be: perforated_conv2d_forward(X, W, mask=np.ones((4, 4), dtype=bool), backend=be),
    "empty mask": lambda be: perforated_conv2d_forward(X, W, mask=np.zeros((3, 3), dtype=bool), backend=be),
    "per-sample batch": lambda be: perforated_conv2d_forward(X, W, mask=np.ones((3, 3, 3), dtype=bool), backend=be),
    "fill": lambda be: perforated_conv2d_forward(X, W, fill="linear", backend=be),
    "dout shape": lambda be: perforated_conv2d_backward(np.ones((2, 4, 3, 2)),
                                                       perforated_conv2d_forward(X, W, backend=be)[1]),
    "pool mode": lambda be: implicit_pool2d_forward(X[:, :, 0], PerforationPlan(np.ones((1, 5), dtype=bool)),
                                                    mode="median", backend=be),
}


@pytest.mark.parametrize("call", list(BAD_CALLS), ids=list(BAD_CALLS))
def test_wrong_input_gets_the_reference_error(fast_backend, call):
    with pytest.raises((TypeError, ValueError)) as ref_error:
        BAD_CALLS[call](None)
    with pytest.raises(ref_error.type) as error:
        BAD_CALLS[call](fast_backend)
    assert str(error.value) == str(ref_error.value)


# ---------------------------------------------------------------------------------------------
# The Cython backend's status and settings (how a missing extension is reported)
# ---------------------------------------------------------------------------------------------


def test_cython_status_names_the_fix_when_the_extension_is_missing(monkeypatch):
    import fastpath
    from fastpath import cython_backend
    from refimpl.backend import BackendUnavailableError

    monkeypatch.setattr(cython_backend, "_kernels", None)
    monkeypatch.setattr(cython_backend, "_IMPORT_ERROR", "No module named 'fastpath._cython_conv'")
    status = fastpath.available_backends()["cython"]
    assert not status.usable
    assert "pip install -e ." in status.reason and "C compiler" in status.reason
    with pytest.raises(BackendUnavailableError, match=r"cython backend is unavailable: .*pip install -e \."):
        fastpath.make_cython_backend()


def test_cython_status_reports_openmp():
    from fastpath import cython_backend

    if cython_backend._kernels is None:
        pytest.skip(cython_backend.status().reason)
    status = cython_backend.status()
    assert status.usable
    assert ("WITHOUT OpenMP" in status.reason) != cython_backend._kernels.OPENMP


def test_cython_threads_setting(monkeypatch):
    from fastpath import cython_backend

    if cython_backend._kernels is None:
        pytest.skip(cython_backend.status().reason)
    monkeypatch.setenv("PONDER_THREADS", "3")
    assert cython_backend.CythonBackend().threads == 3
    assert cython_backend.CythonBackend(threads=1).threads == 1
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="threads must be a positive integer"):
            cython_backend.CythonBackend(threads=bad)
    monkeypatch.setenv("PONDER_THREADS", "many")
    with pytest.raises(ValueError, match="PONDER_THREADS must be a positive integer, got 'many'"):
        cython_backend.CythonBackend()
