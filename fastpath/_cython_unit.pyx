# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False, nonecheck=False
"""Kernels of the fused sparse residual unit (:mod:`fastpath.cython_unit`), channels-last.

The unit's branch runs on compact *rows*: one row per computed position, its channels contiguous
(an (R, C) matrix). Positions are found through a **map**: an int32 array over the zero-padded
grid (N, H + 2P, W + 2Q), flattened, holding the row of every position that has one and -1
elsewhere (outside the image, or a position that was not computed). A convolution at row ``r``
centred at map index ``pos[r]`` reads tap ``t`` from row ``map[pos[r] + tapoff[t]]`` (zero for
-1), so the im2col of scattered windows is one index load and one contiguous copy of C values
per tap, which vectorises; the GEMM ``out (R, K) = cols (R, T C) · Wmatᵀ`` runs in BLAS.

The input gradient is the transposed convolution, the same gather and GEMM with the taps negated
(position ``q`` reads the output gradient of the windows centred at ``q - tapoff[t]``) and the
weights transposed: no col2im scatter, no atomics, every output written by one thread, so the
results are bit-identical at any thread count.

Parallelism: OpenMP ``prange`` with ``schedule="static"`` over rows or over chunks of rows; GEMMs
run single-threaded inside each chunk (the wrapper holds BLAS at one thread). Sums over rows
(batch statistics, ``dW``, ``db``, ``dγ``, ``dβ``) are accumulated in one partial per static
block of rows and the partials added in block order, so they are reproducible at a fixed thread
count. Every function assumes validated, C-contiguous input (the wrapper checks) and releases the
GIL.
"""

from cython.parallel cimport prange, threadid
from libc.math cimport sqrt
from libc.stdint cimport int32_t, int64_t, uint8_t
from libc.string cimport memcpy, memset
from scipy.linalg.cython_blas cimport dgemm, sgemm

import numpy as np

from fastpath.direct_conv cimport (PONDER_ROWS, ponder_direct_conv_rows_f32, ponder_direct_weight_grad_f32,
                                   ponder_epilogue, ponder_epilogue_none)

#: Output rows of one register tile of the direct float32 kernel (direct_conv.h).
DIRECT_TILE_ROWS = PONDER_ROWS

ctypedef fused real:
    float
    double


cdef inline void gemm(char transa, char transb, int m, int n, int k, real alpha,
                      const real *a, int lda, const real *b, int ldb, real beta,
                      real *c, int ldc) noexcept nogil:
    """Column-major GEMM ``C = alpha op(A) op(B) + beta C`` in the precision of ``real``."""
    if real is float:
        sgemm(&transa, &transb, &m, &n, &k, &alpha, <float *> a, &lda, <float *> b, &ldb,
              &beta, c, &ldc)
    else:
        dgemm(&transa, &transb, &m, &n, &k, &alpha, <double *> a, &lda, <double *> b, &ldb,
              &beta, c, &ldc)


cdef inline void add_row_sums(const real *rows, Py_ssize_t k_count, Py_ssize_t r0, Py_ssize_t r1,
                              real *total) noexcept nogil:
    """``total[k] += Σ_{r0 <= r < r1} rows[r, k]``: a bias gradient's share of one chunk of rows."""
    cdef Py_ssize_t r, k
    for r in range(r0, r1):
        for k in range(k_count):
            total[k] += rows[r * k_count + k]


cdef inline Py_ssize_t block_start(Py_ssize_t b, Py_ssize_t blocks, Py_ssize_t total) noexcept nogil:
    """First item of static block ``b`` of ``blocks`` over ``total`` items."""
    return (total * b) // blocks


# ----------------------------------------------------------------------------------------------
# Batch-norm statistics and the channels-last input
# ----------------------------------------------------------------------------------------------

def masked_moments_planes(const real[:, :, ::1] x, const int64_t[::1] positions, const int64_t[::1] start,
                          double[:, :, ::1] partial, int threads):
    """Per-channel mean and biased variance of ``x`` (N, C, S) over the flat positions ``n S + s`` (sorted).

    ``start`` (N + 1) holds each sample's first position. Two passes in double precision (mean,
    then squared deviations); ``partial`` (blocks, 2, C) is the per-block scratch, blocks of
    samples. Returns ``(mean, var)`` as double arrays; ``positions`` must not be empty.
    """
    cdef Py_ssize_t n_count = x.shape[0], c_count = x.shape[1], size = x.shape[2], rows = positions.shape[0]
    cdef Py_ssize_t blocks = partial.shape[0], b, r, c, n, base
    cdef double value, total
    mean_arr = np.zeros(c_count, dtype=np.float64)
    var_arr = np.zeros(c_count, dtype=np.float64)
    cdef double[::1] mean = mean_arr, var = var_arr
    partial[...] = 0
    for b in prange(blocks, nogil=True, num_threads=threads, schedule="static"):
        for n in range(block_start(b, blocks, n_count), block_start(b + 1, blocks, n_count)):
            base = n * size
            for c in range(c_count):
                total = 0
                for r in range(start[n], start[n + 1]):
                    total = total + x[n, c, positions[r] - base]
                partial[b, 0, c] += total
    for b in range(blocks):
        for c in range(c_count):
            mean[c] += partial[b, 0, c]
    for c in range(c_count):
        mean[c] /= rows
    for b in prange(blocks, nogil=True, num_threads=threads, schedule="static"):
        for n in range(block_start(b, blocks, n_count), block_start(b + 1, blocks, n_count)):
            base = n * size
            for c in range(c_count):
                total = 0
                for r in range(start[n], start[n + 1]):
                    value = x[n, c, positions[r] - base] - mean[c]
                    total = total + value * value
                partial[b, 1, c] += total
    for b in range(blocks):
        for c in range(c_count):
            var[c] += partial[b, 1, c]
    for c in range(c_count):
        var[c] /= rows
    return mean_arr, var_arr


def row_moments(const real[:, ::1] h, double[:, :, ::1] partial, int threads):
    """Per-column mean and biased variance of the rows of ``h`` (R, K), R > 0 (as :func:`masked_moments_planes`)."""
    cdef Py_ssize_t rows = h.shape[0], k_count = h.shape[1]
    cdef Py_ssize_t blocks = partial.shape[0], b, r, k, lo, hi
    cdef double value
    mean_arr = np.zeros(k_count, dtype=np.float64)
    var_arr = np.zeros(k_count, dtype=np.float64)
    cdef double[::1] mean = mean_arr, var = var_arr
    partial[...] = 0
    for b in prange(blocks, nogil=True, num_threads=threads, schedule="static"):
        lo = block_start(b, blocks, rows)
        hi = block_start(b + 1, blocks, rows)
        for r in range(lo, hi):
            for k in range(k_count):
                partial[b, 0, k] += h[r, k]
    for b in range(blocks):
        for k in range(k_count):
            mean[k] += partial[b, 0, k]
    for k in range(k_count):
        mean[k] /= rows
    for b in prange(blocks, nogil=True, num_threads=threads, schedule="static"):
        lo = block_start(b, blocks, rows)
        hi = block_start(b + 1, blocks, rows)
        for r in range(lo, hi):
            for k in range(k_count):
                value = h[r, k] - mean[k]
                partial[b, 1, k] += value * value
    for b in range(blocks):
        for k in range(k_count):
            var[k] += partial[b, 1, k]
    for k in range(k_count):
        var[k] /= rows
    return mean_arr, var_arr


def affine_relu_rows(const real[:, ::1] h, const real[::1] center, const real[::1] scale, const real[::1] shift,
                     real[:, ::1] out, int threads):
    """``out[r, k] = max(0, (h[r, k] - center[k]) scale[k] + shift[k])``: batch norm and ReLU.

    Centred first, as the reference does: folding the mean into the shift would cancel
    catastrophically in float32 when the variance is tiny (a large ``scale``).
    """
    cdef Py_ssize_t rows = h.shape[0], k_count = h.shape[1], r, k
    cdef real value
    for r in prange(rows, nogil=True, num_threads=threads, schedule="static"):
        for k in range(k_count):
            value = (h[r, k] - center[k]) * scale[k] + shift[k]
            out[r, k] = value if value > 0 else 0


# ----------------------------------------------------------------------------------------------
# The convolution on rows: gather through the map, one GEMM per chunk
# ----------------------------------------------------------------------------------------------

cdef void gather_rows(const real *src, Py_ssize_t c_count, const int32_t *rowmap, const int64_t *pos,
                      const int64_t *tapoff, Py_ssize_t taps, Py_ssize_t r0, Py_ssize_t r1,
                      real *cols) noexcept nogil:
    """``cols[r - r0, t C + c] = src[rowmap[pos[r] + tapoff[t]], c]`` (0 where the map says -1)."""
    cdef Py_ssize_t r, t
    cdef int32_t row
    cdef real *dst
    for r in range(r0, r1):
        dst = cols + (r - r0) * taps * c_count
        for t in range(taps):
            row = rowmap[pos[r] + tapoff[t]]
            if row >= 0:
                memcpy(dst + t * c_count, src + row * c_count, c_count * sizeof(real))
            else:
                memset(dst + t * c_count, 0, c_count * sizeof(real))


def conv_rows_forward(const real[:, ::1] src, const int32_t[::1] rowmap, const int64_t[::1] pos,
                      const int64_t[::1] tapoff, const real[:, ::1] wmat, const real[::1] bias, bint has_bias,
                      real[:, ::1] out, real[:, ::1] scratch, Py_ssize_t chunk, int threads):
    """``out[r] = Wmat · cols[r] (+ bias)`` for every row ``r`` of ``pos`` (see the module docstring).

    ``wmat`` (K, T C) holds the weights tap-major, channels last; ``scratch`` (threads, chunk T C)
    holds each thread's gathered columns.
    """
    cdef Py_ssize_t rows = pos.shape[0], k_count = wmat.shape[0], width = wmat.shape[1]
    cdef Py_ssize_t c_count = src.shape[1], taps = tapoff.shape[0]
    cdef Py_ssize_t chunks = (rows + chunk - 1) // chunk, q, r0, r1, r, k
    cdef int tid
    cdef real one = 1, zero = 0
    if rows == 0:
        return
    for q in prange(chunks, nogil=True, num_threads=threads, schedule="static"):
        tid = threadid()
        r0 = q * chunk
        r1 = min(rows, r0 + chunk)
        gather_rows(&src[0, 0], c_count, &rowmap[0], &pos[0], &tapoff[0], taps, r0, r1, &scratch[tid, 0])
        gemm(c'T', c'N', <int> k_count, <int> (r1 - r0), <int> width, one, &wmat[0, 0], <int> width,
             &scratch[tid, 0], <int> width, zero, &out[r0, 0], <int> k_count)
        if has_bias:
            for r in range(r0, r1):
                for k in range(k_count):
                    out[r, k] += bias[k]


def conv_rows_forward_direct(const float[:, ::1] src, const int32_t[::1] rowmap, const int64_t[::1] pos,
                             const int64_t[::1] tapoff, const float[:, ::1] wt, const float[::1] bias, bint has_bias,
                             float[:, ::1] out, Py_ssize_t chunk, int threads, const float[:, ::1] addend=None,
                             const float[::1] center=None, const float[::1] scale=None,
                             const float[::1] shift=None, const int64_t[::1] out_rows=None):
    """:func:`conv_rows_forward` in float32 without the gather: the micro-kernel of ``direct_conv.h``.

    ``wt`` (T C, K) holds the weights with the output channels contiguous (``Wmatᵀ``). Rows are
    split into chunks of ``chunk`` (a multiple of the kernel's tile keeps every tile full), one
    chunk per static OpenMP iteration; each output row is written by one thread. Fused into the
    store, in this order: ``+ addend[r]`` (R, K) if given, then ``max(0, (v - center) scale +
    shift)`` if ``center`` is given (``scale`` and ``shift`` with it). With ``out_rows`` (R,) distinct rows of ``out``, output row r is stored at row
    ``out_rows[r]`` and ``addend`` is read at that row too; ``addend`` may then be ``out`` itself
    (the residual added in place onto the rows it updates).
    """
    cdef Py_ssize_t rows = pos.shape[0], k_count = wt.shape[1], c_count = src.shape[1], taps = tapoff.shape[0]
    cdef Py_ssize_t chunks, q, r0, r1
    cdef ponder_epilogue ep
    if rows == 0:
        return
    zero_arr = np.zeros(max(c_count, 1), dtype=np.float32)
    cdef float[::1] zero_row = zero_arr
    ep = ponder_epilogue_none()
    ep.bias = &bias[0] if has_bias else NULL
    ep.addend = &addend[0, 0] if addend is not None else NULL
    if center is not None:
        ep.center, ep.scale, ep.shift = &center[0], &scale[0], &shift[0]
    ep.out_rows = &out_rows[0] if out_rows is not None else NULL
    chunks = (rows + chunk - 1) // chunk
    for q in prange(chunks, nogil=True, num_threads=threads, schedule="static"):
        r0 = q * chunk
        r1 = min(rows, r0 + chunk)
        ponder_direct_conv_rows_f32(&src[0, 0], c_count, &rowmap[0], &pos[0], &tapoff[0], taps, &wt[0, 0],
                                    k_count, &ep, &zero_row[0], &out[0, 0], r0, r1)


def conv_rows_weight_grad(const real[:, ::1] src, const int32_t[::1] rowmap, const int64_t[::1] pos,
                          const int64_t[::1] tapoff, const real[:, ::1] dout, real[:, :, ::1] dw_partial,
                          real[:, ::1] db_partial, real[:, ::1] scratch, Py_ssize_t chunk, int threads):
    """``dW`` and ``db`` of :func:`conv_rows_forward`, one partial per thread: ``dW += doutᵀ · cols``.

    ``dw_partial`` (threads, K, T C) and ``db_partial`` (threads, K) must be zero; the caller adds
    them in thread order (the static schedule gives every thread the same chunks on every call).
    The input gradient is the transposed convolution, :func:`conv_rows_forward` with the taps
    negated and the weights transposed (the wrapper's job): a gather and a GEMM as well.
    """
    cdef Py_ssize_t rows = pos.shape[0], k_count = dout.shape[1], width = dw_partial.shape[2]
    cdef Py_ssize_t c_count = src.shape[1], taps = tapoff.shape[0]
    cdef Py_ssize_t chunks = (rows + chunk - 1) // chunk, q, r0, r1
    cdef int tid
    cdef real one = 1
    if rows == 0:
        return
    for q in prange(chunks, nogil=True, num_threads=threads, schedule="static"):
        tid = threadid()
        r0 = q * chunk
        r1 = min(rows, r0 + chunk)
        gather_rows(&src[0, 0], c_count, &rowmap[0], &pos[0], &tapoff[0], taps, r0, r1, &scratch[tid, 0])
        # dWᵀ (T C, K) += colsᵀ · dout, column-major
        gemm(c'N', c'T', <int> width, <int> k_count, <int> (r1 - r0), one, &scratch[tid, 0], <int> width,
             &dout[r0, 0], <int> k_count, one, &dw_partial[tid, 0, 0], <int> width)
        add_row_sums(&dout[0, 0], k_count, r0, r1, &db_partial[tid, 0])


def conv_rows_weight_grad_direct(const float[:, ::1] src, const int32_t[::1] rowmap, const int64_t[::1] pos,
                                 const int64_t[::1] tapoff, const float[:, ::1] dout, float[:, :, ::1] dwt_partial,
                                 float[:, ::1] db_partial, Py_ssize_t chunk, int threads):
    """:func:`conv_rows_weight_grad` in float32 without the gather: ``direct_conv.h``'s weight-gradient tile.

    ``dwt_partial`` (threads, T C, K) — the forward's ``Wmatᵀ`` layout — and ``db_partial``
    (threads, K) must be zero; the caller adds them in thread order (static schedule: every thread
    gets the same chunks of ``chunk`` rows on every call, so the sums are reproducible at a fixed
    thread count).
    """
    cdef Py_ssize_t rows = pos.shape[0], k_count = dout.shape[1], c_count = src.shape[1], taps = tapoff.shape[0]
    cdef Py_ssize_t chunks = (rows + chunk - 1) // chunk, q, r0, r1
    cdef int tid
    if rows == 0:
        return
    for q in prange(chunks, nogil=True, num_threads=threads, schedule="static"):
        tid = threadid()
        r0 = q * chunk
        r1 = min(rows, r0 + chunk)
        ponder_direct_weight_grad_f32(&src[0, 0], c_count, &rowmap[0], &pos[0], &tapoff[0], taps, &dout[0, 0],
                                      k_count, &dwt_partial[tid, 0, 0], r0, r1)
        add_row_sums(&dout[0, 0], k_count, r0, r1, &db_partial[tid, 0])


# ----------------------------------------------------------------------------------------------
# Residual add (forward) and the batch-norm backwards
# ----------------------------------------------------------------------------------------------

def add_rows_to_planes(real[:, :, ::1] out, const real[:, ::1] rows_value, const int64_t[::1] positions,
                       const int64_t[::1] start, int threads):
    """``out[n, k, s] += rows_value[r, k]`` for the flat positions ``positions[r] = n S + s`` (distinct, sorted).

    ``start`` (N + 1) holds each sample's first row. Channel-outer loops per sample, so that the
    writes run along the planes.
    """
    cdef Py_ssize_t n_count = out.shape[0], k_count = out.shape[1], size = out.shape[2]
    cdef Py_ssize_t r, k, n, base
    for n in prange(n_count, nogil=True, num_threads=threads, schedule="static"):
        base = n * size
        for k in range(k_count):
            for r in range(start[n], start[n + 1]):
                out[n, k, positions[r] - base] += rows_value[r, k]


def planes_to_rows(const real[:, :, ::1] x, const int64_t[::1] positions, const int64_t[::1] start,
                   real[:, ::1] out, int threads):
    """``out[r, k] = x[n, k, s]`` for the flat positions ``positions[r] = n S + s`` (sorted; ``start`` as above)."""
    cdef Py_ssize_t n_count = x.shape[0], k_count = x.shape[1], size = x.shape[2]
    cdef Py_ssize_t r, k, n, base
    for n in prange(n_count, nogil=True, num_threads=threads, schedule="static"):
        base = n * size
        for k in range(k_count):
            for r in range(start[n], start[n + 1]):
                out[r, k] = x[n, k, positions[r] - base]


def bn_relu_backward_rows(real[:, ::1] dz, const real[:, ::1] h, const real[::1] center, const real[::1] scale,
                          const real[::1] shift,
                          const double[::1] mean, const double[::1] inv_std, bint training,
                          const unsigned char[::1] in_stats, Py_ssize_t count, double[:, :, ::1] partial,
                          int threads):
    """In place ``dz`` ← gradient w.r.t. ``h`` of ``z = relu(bn(h))`` on rows (R, C).

    ``center``/``scale``/``shift`` are the batch norm as :func:`affine_relu_rows` takes it,
    ``mean``/``inv_std`` the statistics it used (double). In training those came from the
    ``count`` rows with ``in_stats`` set, and only they get the statistics' term (rows outside
    receive gradient but gave no statistics). ``partial`` (blocks, 2, C) is scratch. Returns
    ``(dgamma, dbeta)`` (double).

    The loops run over raw row pointers, so that the compiler sees contiguous channel loops it
    can vectorise (the float rows and the double partial sums cannot alias), and the statistics'
    term is ``dβ / count`` and ``dγ / count`` computed once per channel, not divided per element.
    """
    cdef Py_ssize_t rows = h.shape[0], k_count = h.shape[1]
    cdef Py_ssize_t blocks = partial.shape[0], b, r, k, lo, hi
    cdef double xhat
    cdef double *sum_g
    cdef double *sum_gx
    cdef real *dz_row
    cdef const real *h_row
    dgamma_arr = np.zeros(k_count, dtype=np.float64)
    dbeta_arr = np.zeros(k_count, dtype=np.float64)
    per_beta_arr = np.zeros(k_count, dtype=np.float64)
    per_gamma_arr = np.zeros(k_count, dtype=np.float64)
    cdef double[::1] dgamma = dgamma_arr, dbeta = dbeta_arr
    cdef double[::1] per_beta = per_beta_arr, per_gamma = per_gamma_arr
    if rows == 0:
        return dgamma_arr, dbeta_arr
    partial[...] = 0
    for b in prange(blocks, nogil=True, num_threads=threads, schedule="static"):
        lo = block_start(b, blocks, rows)
        hi = block_start(b + 1, blocks, rows)
        sum_g = &partial[b, 0, 0]
        sum_gx = &partial[b, 1, 0]
        for r in range(lo, hi):
            dz_row = &dz[r, 0]
            h_row = &h[r, 0]
            for k in range(k_count):  # unconditional stores: the loop vectorises
                dz_row[k] = dz_row[k] if (h_row[k] - center[k]) * scale[k] + shift[k] > 0 else 0
            for k in range(k_count):
                sum_g[k] += dz_row[k]
                sum_gx[k] += dz_row[k] * (h_row[k] - mean[k]) * inv_std[k]
    for b in range(blocks):
        for k in range(k_count):
            dbeta[k] += partial[b, 0, k]
            dgamma[k] += partial[b, 1, k]
    for k in range(k_count):
        per_beta[k] = dbeta[k] / count if count > 0 else 0
        per_gamma[k] = dgamma[k] / count if count > 0 else 0
    for r in prange(rows, nogil=True, num_threads=threads, schedule="static"):
        dz_row = &dz[r, 0]
        h_row = &h[r, 0]
        if training and in_stats[r]:
            for k in range(k_count):
                xhat = (h_row[k] - mean[k]) * inv_std[k]
                dz_row[k] = <real> (scale[k] * (dz_row[k] - (per_beta[k] + xhat * per_gamma[k])))
        else:
            for k in range(k_count):
                dz_row[k] = scale[k] * dz_row[k]
    return dgamma_arr, dbeta_arr


# ---------------------------------------------------------------------------------------------
# Compiled SACT inference (fastpath.network): row updates in place
# ---------------------------------------------------------------------------------------------

def add_scaled_rows_at(real[:, ::1] dst, const real[:, ::1] src, const real[::1] weight,
                       const int64_t[::1] index, int threads):
    """``dst[index[r]] += weight[r] src[index[r]]`` (``index`` distinct): a weighted sum on the rows that take part."""
    cdef Py_ssize_t rows = index.shape[0], c_count = dst.shape[1], r, c, i
    for r in prange(rows, nogil=True, num_threads=threads, schedule="static"):
        i = index[r]
        for c in range(c_count):
            dst[i, c] += weight[r] * src[i, c]


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------

def dilate_mask(const uint8_t[:, :, ::1] mask, Py_ssize_t kh, Py_ssize_t kw, uint8_t[:, :, ::1] out,
                uint8_t[:, :, ::1] across, int threads):
    """``out`` = ``mask`` dilated by a (kh, kw) window centred on each position, clipped to the image.

    :func:`refimpl.sparse_unit.dilate` on 0/1 uint8 masks, in two passes (a window is a product
    of two intervals): ``across`` (N, H, W) takes the dilation along each row, ``out`` the
    dilation of that along each column. Each pass ORs shifted copies of whole rows, loops the
    compiler vectorises. One sample per OpenMP iteration.
    """
    cdef Py_ssize_t n_count = mask.shape[0], h = mask.shape[1], w = mask.shape[2]
    cdef Py_ssize_t rh = kh // 2, rw = kw // 2, n, y, x, d, j
    cdef const uint8_t *m
    cdef uint8_t *a
    cdef uint8_t *o
    cdef const uint8_t *above
    for n in prange(n_count, nogil=True, num_threads=threads, schedule="static"):
        for y in range(h):
            m = &mask[n, y, 0]
            a = &across[n, y, 0]
            memcpy(a, m, w)
            for d in range(1, min(rw, w - 1) + 1):
                for x in range(d, w):
                    a[x] = a[x] | m[x - d]
                for x in range(w - d):
                    a[x] = a[x] | m[x + d]
        for y in range(h):
            o = &out[n, y, 0]
            memcpy(o, &across[n, y, 0], w)
            for j in range(max(0, y - rh), min(h, y + rh + 1)):
                if j != y:
                    above = &across[n, j, 0]
                    for x in range(w):
                        o[x] = o[x] | above[x]


# ----------------------------------------------------------------------------------------------
# ACT's bookkeeping per position (compiled networks)
# ----------------------------------------------------------------------------------------------

def act_step(const real[::1] h, const real[::1] after, const uint8_t[::1] going_on, const int64_t[::1] active_flat,
             Py_ssize_t index, real[::1] cumulative, real[::1] remainder, int64_t[::1] n_units,
             uint8_t[::1] active, real[:, ::1] weighted, const real[:, ::1] rows, int threads):
    """One unit's update of ACT's per-position state, for the positions ``active_flat`` that ran it.

    ``h`` is each position's halting score at unit ``index``, ``after`` = ``cumulative + h`` and
    ``going_on`` the halting rule applied to it (:func:`refimpl.halting.still_running`, evaluated
    by the caller: the rule is written in one place). A position that goes on adds ``h U`` to
    ``weighted`` (its p_n = h_n, U its current row); one that halts records N = ``index`` and
    R = 1 - (its cumulative score before this unit) and leaves ``active``. ``cumulative`` takes
    ``after`` everywhere. One OpenMP iteration per position; positions are distinct.
    """
    cdef Py_ssize_t count = active_flat.shape[0], c_count = rows.shape[1], r, c, i
    cdef real p
    for r in prange(count, nogil=True, num_threads=threads, schedule="static"):
        i = active_flat[r]
        if going_on[r]:
            p = h[r]
            for c in range(c_count):
                weighted[i, c] += p * rows[i, c]
        else:
            remainder[i] = 1 - cumulative[i]
            n_units[i] = index
            active[i] = 0
        cumulative[i] = after[r]

