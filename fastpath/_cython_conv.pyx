# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False, nonecheck=False
"""Kernels of the Cython backend: gather + one BLAS GEMM per chunk + scatter.

The layout every convolution here shares (row-major, "K-major" output):

* ``cols`` (CKK, Tc): column ``t`` holds the receptive field of computed output ``t`` of the
  chunk; row ``r = (c, i, j)`` is one input channel and kernel tap (im2col restricted to the mask);
* ``buf`` (K, Tc) = ``Wmat`` (K, CKK) · ``cols`` — one GEMM for many images, so that a high
  perforation rate still gives a tall GEMM;
* ``buf[k, t]`` is scattered to ``out[sample[t], k, slot[t]]``: for a shared mask the slots of one
  image are consecutive, so each (n, k) row of the compact output is a contiguous copy.

Parallelism: the columns are cut into chunks (about 1 MiB of ``cols``, so that it stays in L2
between the gather and the GEMM); each OpenMP thread takes whole chunks and runs gather, a
*single-threaded* BLAS GEMM and scatter on its own buffers. There is one thread pool and no
barrier between the phases (the wrapper holds BLAS at one thread while a driver runs).

Backward runs the same chunks: dY (K, Tc) is gathered from the compact gradient,
``dW += dY · colsᵀ``, ``dcols = Wmatᵀ · dY`` and ``dcols`` is scatter-added onto the input
(col2im). Windows of one image overlap, so the parallel unit there is a group of whole images
(no two threads write the same pixel); the groups are split statically into one part per thread,
each part accumulates its own dW and db, and the parts are summed in a fixed order, so the
backward is bit-for-bit reproducible at a fixed thread count.

Everything here assumes validated input — :class:`refimpl.backend.ConvBackend` checks every
argument (shapes, dtypes, index ranges) before the Python wrapper converts and calls in — and
releases the GIL; ``threads`` is passed in from Python to every ``prange``.
"""

from cython.parallel cimport prange, threadid
from libc.stdint cimport int32_t, int64_t
from libc.string cimport memset
from scipy.linalg.cython_blas cimport dgemm, sgemm

import numpy as np

cdef extern from *:
    """
    #ifndef PONDER_HAVE_OPENMP
    #define PONDER_HAVE_OPENMP 0
    #endif
    """
    int PONDER_HAVE_OPENMP

OPENMP = bool(PONDER_HAVE_OPENMP)

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


# ----------------------------------------------------------------------------------------------
# Padding (forward) and cropping (backward)
# ----------------------------------------------------------------------------------------------

def pad_planes(const real[:, :, ::1] x, real[:, :, ::1] xp, int ph, int pw, int threads):
    """``xp[q] = x[q]`` zero-padded by (ph, pw) for every plane ``q`` of (N*C, H, W)."""
    cdef Py_ssize_t planes = x.shape[0], h = x.shape[1], w = x.shape[2]
    cdef Py_ssize_t hp = xp.shape[1], wp = xp.shape[2]
    cdef Py_ssize_t q, y, j
    for q in prange(planes, nogil=True, num_threads=threads, schedule="static"):
        for y in range(hp):
            if y < ph or y >= ph + h:
                memset(&xp[q, y, 0], 0, wp * sizeof(real))
            else:
                for j in range(pw):
                    xp[q, y, j] = 0
                for j in range(w):
                    xp[q, y, pw + j] = x[q, y - ph, j]
                for j in range(pw + w, wp):
                    xp[q, y, j] = 0


def crop_planes(const real[:, :, ::1] xp, real[:, :, ::1] x, int ph, int pw, int threads):
    """``x[q] = xp[q, ph:ph+H, pw:pw+W]`` for every plane ``q``."""
    cdef Py_ssize_t planes = x.shape[0], h = x.shape[1], w = x.shape[2]
    cdef Py_ssize_t q, y, j
    for q in prange(planes, nogil=True, num_threads=threads, schedule="static"):
        for y in range(h):
            for j in range(w):
                x[q, y, j] = xp[q, y + ph, j + pw]


# ----------------------------------------------------------------------------------------------
# Row bookkeeping: which (sample, slot) every GEMM column is
# ----------------------------------------------------------------------------------------------

def plan_columns(const int32_t[:, ::1] positions, const int32_t[::1] counts, Py_ssize_t n,
                 Py_ssize_t wo, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t plane, Py_ssize_t wp):
    """Columns of the batched GEMM for a perforation plan, sample-major then slot order.

    Returns ``base`` (T,) int64 — offset of the window's top-left corner in the flattened padded
    input (sample n at ``n * plane``) — ``sample`` (T,), ``slot`` (T,) int32 and ``start`` (N+1,)
    int64, the first column of every sample.
    """
    cdef Py_ssize_t batch = positions.shape[0]
    cdef Py_ssize_t s, p, t = 0, b, total = 0
    start_arr = np.empty(n + 1, dtype=np.int64)
    cdef int64_t[::1] start = start_arr
    for s in range(n):
        start[s] = total
        total += counts[s if batch > 1 else 0]
    start[n] = total
    base_arr = np.empty(total, dtype=np.int64)
    sample_arr = np.empty(total, dtype=np.int32)
    slot_arr = np.empty(total, dtype=np.int32)
    cdef int64_t[::1] base = base_arr
    cdef int32_t[::1] sample = sample_arr, slot = slot_arr
    cdef int32_t pos
    with nogil:
        for s in range(n):
            b = s if batch > 1 else 0
            for p in range(counts[b]):
                pos = positions[b, p]
                base[t] = s * plane + (pos // wo) * sh * wp + (pos % wo) * sw
                sample[t] = <int32_t> s
                slot[t] = <int32_t> p
                t += 1
    return base_arr, sample_arr, slot_arr, start_arr


def table_columns(Py_ssize_t n, Py_ssize_t r):
    """Columns of the batched GEMM of a table convolution: column ``n * R + r``."""
    sample = np.repeat(np.arange(n, dtype=np.int32), r)
    slot = np.tile(np.arange(r, dtype=np.int32), n)
    start = np.arange(n + 1, dtype=np.int64) * r
    return sample, slot, start


# ----------------------------------------------------------------------------------------------
# Serial pieces of one chunk (each chunk runs on one thread; chunks run in parallel)
# ----------------------------------------------------------------------------------------------

cdef Py_ssize_t window_runs(const int64_t *base, Py_ssize_t tc, Py_ssize_t *starts) noexcept nogil:
    """Split the chunk into runs of windows at consecutive offsets (``base[t] = base[t-1] + 1``).

    A dense stride-1 convolution has runs as long as an output row; the gather then copies
    contiguous memory, which vectorises. Writes the run starts (and ``tc`` last) to ``starts``,
    returns the number of runs.
    """
    cdef Py_ssize_t t, m = 1
    starts[0] = 0
    for t in range(1, tc):
        if base[t] != base[t - 1] + 1:
            starts[m] = t
            m = m + 1
    starts[m] = tc
    return m


cdef Py_ssize_t output_runs(const int32_t *sample, const int32_t *slot, Py_ssize_t tc,
                            Py_ssize_t *starts) noexcept nogil:
    """Runs of columns that fill consecutive slots of one sample (a whole image row of a shared plan)."""
    cdef Py_ssize_t t, m = 1
    starts[0] = 0
    for t in range(1, tc):
        if sample[t] != sample[t - 1] or slot[t] != slot[t - 1] + 1:
            starts[m] = t
            m = m + 1
    starts[m] = tc
    return m


cdef void gather_windows(const real *xp, const int64_t *base, const int64_t *off, real *cols,
                         Py_ssize_t rows, Py_ssize_t kw, Py_ssize_t tc, const Py_ssize_t *runs,
                         Py_ssize_t m) noexcept nogil:
    """``cols[r, t] = xp[base[t] + off[r]]``: im2col of the chunk's windows.

    Long runs (dense layers) are copied run by run; otherwise element by element.
    """
    cdef Py_ssize_t r, t, q, u, length
    cdef const real *src
    cdef const real *window
    cdef real *dst
    if 4 * m <= tc:
        for r in range(rows):
            for q in range(m):
                src = xp + off[r] + base[runs[q]]
                dst = cols + r * tc + runs[q]
                length = runs[q + 1] - runs[q]
                for u in range(length):
                    dst[u] = src[u]
    else:
        # Scattered windows: for one (channel, kernel row) the kw taps of a window are adjacent
        # in memory, so read them together (one index load per kw values).
        for q in range(rows // kw):
            r = q * kw
            src = xp + off[r]
            dst = cols + r * tc
            for t in range(tc):
                window = src + base[t]
                for u in range(kw):
                    dst[u * tc + t] = window[u]


cdef void scatter_windows(real *dxp, const int64_t *base, const int64_t *off, const real *dcols,
                          Py_ssize_t rows, Py_ssize_t kw, Py_ssize_t tc, const Py_ssize_t *runs,
                          Py_ssize_t m) noexcept nogil:
    """col2im, the adjoint of :func:`gather_windows`: ``dxp[base[t] + off[r]] += dcols[r, t]``."""
    cdef Py_ssize_t r, t, q, u, length
    cdef real *dst
    cdef real *window
    cdef const real *src
    if 4 * m <= tc:
        for r in range(rows):
            for q in range(m):
                dst = dxp + off[r] + base[runs[q]]
                src = dcols + r * tc + runs[q]
                length = runs[q + 1] - runs[q]
                for u in range(length):
                    dst[u] += src[u]
    else:
        for q in range(rows // kw):
            r = q * kw
            dst = dxp + off[r]
            src = dcols + r * tc
            for t in range(tc):
                window = dst + base[t]
                for u in range(kw):
                    window[u] += src[u * tc + t]


cdef void gather_table(const real *src, const int32_t *table, real *cols, Py_ssize_t j0,
                       Py_ssize_t tc, Py_ssize_t channels, Py_ssize_t size, Py_ssize_t r_out,
                       Py_ssize_t taps, bint per_sample) noexcept nogil:
    """``cols[(c, tap), j] = src[n, c, table[n, r, tap]]`` (0 for -1), columns ``j0 + j = n R + r``."""
    cdef Py_ssize_t c, tap, j, n, r, idx
    cdef real *dst
    for c in range(channels):
        for tap in range(taps):
            dst = cols + (c * taps + tap) * tc
            for j in range(tc):
                n = (j0 + j) // r_out
                r = (j0 + j) % r_out
                idx = table[((n if per_sample else 0) * r_out + r) * taps + tap]
                dst[j] = src[(n * channels + c) * size + idx] if idx >= 0 else 0


cdef void scatter_table(real *dsrc, const int32_t *table, const real *dcols, Py_ssize_t j0,
                        Py_ssize_t tc, Py_ssize_t channels, Py_ssize_t size, Py_ssize_t r_out,
                        Py_ssize_t taps, bint per_sample) noexcept nogil:
    """Adjoint of :func:`gather_table` (duplicates in the table add up)."""
    cdef Py_ssize_t c, tap, j, n, r, idx
    cdef const real *src
    for c in range(channels):
        for tap in range(taps):
            src = dcols + (c * taps + tap) * tc
            for j in range(tc):
                n = (j0 + j) // r_out
                r = (j0 + j) % r_out
                idx = table[((n if per_sample else 0) * r_out + r) * taps + tap]
                if idx >= 0:
                    dsrc[(n * channels + c) * size + idx] += src[j]


cdef void gather_cols(bint table_mode, const real *src, const int64_t *base, const int64_t *off,
                      const int32_t *table, real *cols, Py_ssize_t ckk, Py_ssize_t t0,
                      Py_ssize_t tc, Py_ssize_t channels, Py_ssize_t size, Py_ssize_t r_out,
                      Py_ssize_t taps, bint per_sample, const Py_ssize_t *runs,
                      Py_ssize_t m) noexcept nogil:
    if table_mode:
        gather_table(src, table, cols, t0, tc, channels, size, r_out, taps, per_sample)
    else:
        gather_windows(src, base + t0, off, cols, ckk, taps, tc, runs, m)


cdef void scatter_cols(bint table_mode, real *dsrc, const int64_t *base, const int64_t *off,
                       const int32_t *table, const real *dcols, Py_ssize_t ckk, Py_ssize_t t0,
                       Py_ssize_t tc, Py_ssize_t channels, Py_ssize_t size, Py_ssize_t r_out,
                       Py_ssize_t taps, bint per_sample, const Py_ssize_t *runs,
                       Py_ssize_t m) noexcept nogil:
    if table_mode:
        scatter_table(dsrc, table, dcols, t0, tc, channels, size, r_out, taps, per_sample)
    else:
        scatter_windows(dsrc, base + t0, off, dcols, ckk, taps, tc, runs, m)


cdef void scatter_output(const real *buf, const real *bias, const int32_t *sample,
                         const int32_t *slot, real *out, Py_ssize_t k_out, Py_ssize_t width,
                         Py_ssize_t tc, const Py_ssize_t *runs, Py_ssize_t m) noexcept nogil:
    """``out[sample[t], k, slot[t]] = buf[k, t] + bias[k]``, run by run (:func:`output_runs`)."""
    cdef Py_ssize_t k, q, u, length
    cdef real bk
    cdef real *dst
    cdef const real *src
    for k in range(k_out):
        bk = bias[k]
        for q in range(m):
            dst = out + (sample[runs[q]] * k_out + k) * width + slot[runs[q]]
            src = buf + k * tc + runs[q]
            length = runs[q + 1] - runs[q]
            for u in range(length):
                dst[u] = src[u] + bk


cdef void gather_output(const real *dout, const int32_t *sample, const int32_t *slot, real *buf,
                        real *db, Py_ssize_t k_out, Py_ssize_t width, Py_ssize_t tc,
                        const Py_ssize_t *runs, Py_ssize_t m) noexcept nogil:
    """``buf[k, t] = dout[sample[t], k, slot[t]]`` and ``db[k] += Σ_t buf[k, t]``."""
    cdef Py_ssize_t k, q, u, length
    cdef real acc
    cdef real *dst
    cdef const real *src
    for k in range(k_out):
        acc = 0
        for q in range(m):
            src = dout + (sample[runs[q]] * k_out + k) * width + slot[runs[q]]
            dst = buf + k * tc + runs[q]
            length = runs[q + 1] - runs[q]
            for u in range(length):
                dst[u] = src[u]
                acc = acc + src[u]
        db[k] += acc


# ----------------------------------------------------------------------------------------------
# The parallel drivers: BLAS must be single-threaded while they run (the wrapper sees to it),
# every OpenMP thread gathers, multiplies and scatters its own chunks.
# ----------------------------------------------------------------------------------------------

def gemm_forward(bint table_mode, const real[::1] src, const real[:, ::1] wmat,
                 const real[::1] bias, const int64_t[::1] base, const int64_t[::1] off,
                 const int32_t[::1] table, const int32_t[::1] sample, const int32_t[::1] slot,
                 real[:, :, ::1] out, Py_ssize_t chunk, Py_ssize_t channels, Py_ssize_t size,
                 Py_ssize_t r_out, Py_ssize_t taps, bint per_sample, int threads):
    """``out[sample[t], :, slot[t]] = Wmat · cols[:, t] + bias`` for every column ``t``.

    ``table_mode = 0``: ``src`` is the flattened padded input and column ``t`` is the window at
    ``base[t]`` (perforated convolution; ``taps`` is the kernel width kw, rows are (c, i, j));
    ``1``: ``src`` is (N, C, S) flattened, read through ``table`` (B, R, T) (``taps = T``,
    ``size = S``, ``r_out = R``). Columns are cut into chunks of ``chunk``; a thread takes a chunk,
    gathers its ``cols`` (CKK, tc), makes ``buf`` (K, tc) = Wmat · cols with one GEMM and
    scatters ``buf`` to ``out``. Chunks write disjoint outputs, so no synchronisation is needed.
    """
    cdef Py_ssize_t total = sample.shape[0], k_out = wmat.shape[0], ckk = wmat.shape[1]
    cdef Py_ssize_t width = out.shape[2]
    if total == 0:
        return
    chunk = max(1, min(chunk, (total + threads - 1) // threads))
    cdef Py_ssize_t n_chunks = (total + chunk - 1) // chunk, ci, t0, tc, tid
    cdef int team = <int> min(threads, n_chunks)
    dtype = np.float32 if real is float else np.float64
    cdef real[:, ::1] cols = np.empty((team, ckk * chunk), dtype=dtype)
    cdef real[:, ::1] buf = np.empty((team, k_out * chunk), dtype=dtype)
    cdef Py_ssize_t[:, ::1] wruns = np.empty((team, chunk + 1), dtype=np.intp)
    cdef Py_ssize_t[:, ::1] oruns = np.empty((team, chunk + 1), dtype=np.intp)
    cdef Py_ssize_t mw, mo
    cdef real one = 1, zero = 0
    for ci in prange(n_chunks, nogil=True, num_threads=team, schedule="dynamic"):
        tid = threadid()
        t0 = ci * chunk
        tc = min(chunk, total - t0)
        mw = 0 if table_mode else window_runs(&base[t0], tc, &wruns[tid, 0])
        mo = output_runs(&sample[t0], &slot[t0], tc, &oruns[tid, 0])
        gather_cols(table_mode, &src[0], &base[0], &off[0], &table[0], &cols[tid, 0], ckk, t0,
                    tc, channels, size, r_out, taps, per_sample, &wruns[tid, 0], mw)
        # Row-major buf (K, tc) = Wmat (K, CKK) · cols (CKK, tc); in BLAS's column-major terms
        # bufᵀ (tc, K) = colsᵀ (tc, CKK) · Wmatᵀ (CKK, K) with the arrays as stored.
        gemm(c'N', c'N', <int> tc, <int> k_out, <int> ckk, one, &cols[tid, 0], <int> tc,
             &wmat[0, 0], <int> ckk, zero, &buf[tid, 0], <int> tc)
        scatter_output(&buf[tid, 0], &bias[0], &sample[t0], &slot[t0], &out[0, 0, 0], k_out,
                       width, tc, &oruns[tid, 0], mo)


def sample_tasks(const int64_t[::1] start, Py_ssize_t chunk):
    """Cut the samples into consecutive groups of at most ``chunk`` columns (at least one sample).

    Returns the first sample of every group and, last, the number of samples.
    """
    cdef Py_ssize_t n = start.shape[0] - 1, s = 0
    bounds = [0]
    while s < n:
        first = s
        s += 1
        while s < n and start[s + 1] - start[first] <= chunk:
            s += 1
        bounds.append(s)
    return np.asarray(bounds, dtype=np.int64)


def partition_tasks(const int64_t[::1] start, const int64_t[::1] tasks, Py_ssize_t parts):
    """Cut the tasks into ``parts`` consecutive runs of about equal column counts.

    Returns ``first`` (parts + 1,) int64: part ``p`` runs tasks ``first[p] .. first[p+1] - 1``.
    The cut depends only on the shapes and ``parts``, never on which thread is faster — the
    backward's reduction order, hence its rounding, is fixed by it.
    """
    n_tasks = tasks.shape[0] - 1
    bounds = np.asarray(start)[np.asarray(tasks)]  # first column of every task, then the total
    # No negative index here: the module is compiled with wraparound=False, under which bounds[-1]
    # is undefined (on Python 3.12 with NumPy 2.5 it read index -18 of a 17-element array).
    total_columns = bounds[n_tasks]
    targets = (np.arange(parts + 1, dtype=np.int64) * total_columns) // parts
    first = np.minimum(np.searchsorted(bounds, targets, side="left"), n_tasks).astype(np.int64)
    first[0], first[parts] = 0, n_tasks
    return first


def gemm_backward(bint table_mode, const real[::1] src, const real[:, ::1] wmat,
                  const real[:, :, ::1] dout, const int64_t[::1] base, const int64_t[::1] off,
                  const int32_t[::1] table, const int32_t[::1] sample, const int32_t[::1] slot,
                  const int64_t[::1] start, real[::1] dsrc, real[:, ::1] dwmat, real[::1] db,
                  Py_ssize_t chunk, Py_ssize_t channels, Py_ssize_t size, Py_ssize_t r_out,
                  Py_ssize_t taps, bint per_sample, int threads):
    """Gradients of :func:`gemm_forward` into zeroed ``dsrc``, ``dwmat`` and ``db``.

    Per chunk: dY (K, tc) gathered from ``dout`` (and summed into db), ``dW += dY · colsᵀ``,
    ``dcols = Wmatᵀ · dY`` and the scatter-add of ``dcols`` onto ``dsrc``. Windows of one sample
    overlap, so the parallel unit is a group of whole samples (:func:`sample_tasks`), cut into
    chunks that run in order.

    Deterministic at a fixed thread count: the groups are split into ``team`` consecutive parts
    by :func:`partition_tasks` (a static partition, not first come first served); part ``p``
    accumulates its own partial dW and db in its own buffers, in task order, and the partials are
    summed in part order at the end. Identical calls therefore round identically, whichever
    thread runs which part; a different thread count cuts different parts and may change the
    last bits of dW and db (dX is a sum within one sample, so it is the same).
    """
    cdef Py_ssize_t total = sample.shape[0], k_out = wmat.shape[0], ckk = wmat.shape[1]
    cdef Py_ssize_t width = dout.shape[2]
    if total == 0:
        return
    per_thread = max(1, min(chunk, (total + threads - 1) // threads))
    cdef int64_t[::1] tasks = sample_tasks(start, per_thread)
    cdef Py_ssize_t n_tasks = tasks.shape[0] - 1, task, part, t0, t1, tc, i, j
    chunk = max(1, min(chunk, total))
    cdef int team = <int> min(threads, n_tasks)
    cdef int64_t[::1] first = partition_tasks(start, tasks, team)
    dtype = np.float32 if real is float else np.float64
    cdef real[:, ::1] cols = np.empty((team, ckk * chunk), dtype=dtype)
    cdef real[:, ::1] dcols = np.empty((team, ckk * chunk), dtype=dtype)
    cdef real[:, ::1] dy = np.empty((team, k_out * chunk), dtype=dtype)
    dw_arr = np.zeros((team, k_out, ckk), dtype=dtype)
    db_arr = np.zeros((team, k_out), dtype=dtype)
    cdef real[:, :, ::1] dw_part = dw_arr
    cdef real[:, ::1] db_part = db_arr
    cdef Py_ssize_t[:, ::1] wruns = np.empty((team, chunk + 1), dtype=np.intp)
    cdef Py_ssize_t[:, ::1] oruns = np.empty((team, chunk + 1), dtype=np.intp)
    cdef Py_ssize_t mw, mo
    cdef real one = 1, zero = 0
    for part in prange(team, nogil=True, num_threads=team, schedule="static", chunksize=1):
        for task in range(first[part], first[part + 1]):
            t0 = start[tasks[task]]
            t1 = start[tasks[task + 1]]
            while t0 < t1:
                tc = min(chunk, t1 - t0)
                mw = 0 if table_mode else window_runs(&base[t0], tc, &wruns[part, 0])
                mo = output_runs(&sample[t0], &slot[t0], tc, &oruns[part, 0])
                gather_cols(table_mode, &src[0], &base[0], &off[0], &table[0], &cols[part, 0], ckk,
                            t0, tc, channels, size, r_out, taps, per_sample, &wruns[part, 0], mw)
                gather_output(&dout[0, 0, 0], &sample[t0], &slot[t0], &dy[part, 0], &db_part[part, 0],
                              k_out, width, tc, &oruns[part, 0], mo)
                # dW (K, CKK) += dY (K, tc) · colsᵀ: column-major dWᵀ += (colsᵀ)ᵀ · dYᵀ.
                gemm(c'T', c'N', <int> ckk, <int> k_out, <int> tc, one, &cols[part, 0], <int> tc,
                     &dy[part, 0], <int> tc, one, &dw_part[part, 0, 0], <int> ckk)
                # dcols (CKK, tc) = Wmatᵀ · dY: column-major dcolsᵀ = dYᵀ · Wmat.
                gemm(c'N', c'T', <int> tc, <int> ckk, <int> k_out, one, &dy[part, 0], <int> tc,
                     &wmat[0, 0], <int> ckk, zero, &dcols[part, 0], <int> tc)
                scatter_cols(table_mode, &dsrc[0], &base[0], &off[0], &table[0], &dcols[part, 0], ckk,
                             t0, tc, channels, size, r_out, taps, per_sample, &wruns[part, 0], mw)
                t0 = t0 + tc
    with nogil:
        for part in range(team):  # the fixed-order reduction
            for i in range(k_out):
                db[i] += db_part[part, i]
                for j in range(ckk):
                    dwmat[i, j] += dw_part[part, i, j]


# ----------------------------------------------------------------------------------------------
# Fills
# ----------------------------------------------------------------------------------------------

def fill_nearest(const real[:, :, ::1] compact, const int32_t[:, ::1] index_map,
                 real[:, :, ::1] dense, int threads):
    """``dense[n, k, q] = compact[n, k, index_map[n or 0, q]]``."""
    cdef Py_ssize_t n = dense.shape[0], k = dense.shape[1], hw = dense.shape[2]
    cdef bint per_sample = index_map.shape[0] > 1
    cdef Py_ssize_t row, s, q
    cdef const int32_t *imap
    for row in prange(n * k, nogil=True, num_threads=threads, schedule="static"):
        s = row // k
        imap = &index_map[s if per_sample else 0, 0]
        for q in range(hw):
            dense[s, row % k, q] = compact[s, row % k, imap[q]]


def fill_nearest_adjoint(const real[:, :, ::1] ddense, const int32_t[:, ::1] index_map,
                         real[:, :, ::1] dcompact, int threads):
    """``dcompact[n, k, index_map[q]] += ddense[n, k, q]`` into a zeroed ``dcompact``."""
    cdef Py_ssize_t n = ddense.shape[0], k = ddense.shape[1], hw = ddense.shape[2]
    cdef bint per_sample = index_map.shape[0] > 1
    cdef Py_ssize_t row, s, q
    cdef const int32_t *imap
    for row in prange(n * k, nogil=True, num_threads=threads, schedule="static"):
        s = row // k
        imap = &index_map[s if per_sample else 0, 0]
        for q in range(hw):
            dcompact[s, row % k, imap[q]] += ddense[s, row % k, q]


def fill_zero(const real[:, :, ::1] compact, const int32_t[:, ::1] positions,
              const int32_t[::1] counts, real[:, :, ::1] dense, int threads):
    """``dense[n, k, positions[p]] = compact[n, k, p]``, 0 elsewhere."""
    cdef Py_ssize_t n = dense.shape[0], k = dense.shape[1], hw = dense.shape[2]
    cdef bint per_sample = positions.shape[0] > 1
    cdef Py_ssize_t row, s, b, p
    for row in prange(n * k, nogil=True, num_threads=threads, schedule="static"):
        s = row // k
        b = s if per_sample else 0
        memset(&dense[s, row % k, 0], 0, hw * sizeof(real))
        for p in range(counts[b]):
            dense[s, row % k, positions[b, p]] = compact[s, row % k, p]


def fill_zero_adjoint(const real[:, :, ::1] ddense, const int32_t[:, ::1] positions,
                      const int32_t[::1] counts, real[:, :, ::1] dcompact, int threads):
    """``dcompact[n, k, p] = ddense[n, k, positions[p]]``, 0 in padded slots."""
    cdef Py_ssize_t n = dcompact.shape[0], k = dcompact.shape[1], width = dcompact.shape[2]
    cdef bint per_sample = positions.shape[0] > 1
    cdef Py_ssize_t row, s, b, p
    for row in prange(n * k, nogil=True, num_threads=threads, schedule="static"):
        s = row // k
        b = s if per_sample else 0
        for p in range(width):
            if p < counts[b]:
                dcompact[s, row % k, p] = ddense[s, row % k, positions[b, p]]
            else:
                dcompact[s, row % k, p] = 0


def zero_padded_slots(real[:, :, ::1] out, const int32_t[::1] counts, int threads):
    """Set the slots past ``counts[n]`` of every (n, k) row to 0 (per-sample masks)."""
    cdef Py_ssize_t n = out.shape[0], k = out.shape[1], width = out.shape[2]
    cdef Py_ssize_t row, s, p
    for row in prange(n * k, nogil=True, num_threads=threads, schedule="static"):
        s = row // k
        for p in range(counts[s], width):
            out[s, row % k, p] = 0


# ----------------------------------------------------------------------------------------------
# Pooling through an index table
# ----------------------------------------------------------------------------------------------

def table_pool(const real[:, :, ::1] src, const int32_t[:, :, ::1] table, bint is_max,
               real[:, :, ::1] out, int32_t[:, :, ::1] argmax, int threads):
    """Max (first maximal tap; its source index into ``argmax``) or mean over the valid taps.

    A window without any valid tap gives 0 (and ``argmax = -1``).
    """
    cdef Py_ssize_t n = src.shape[0], c = src.shape[1]
    cdef Py_ssize_t r_out = table.shape[1], taps = table.shape[2]
    cdef bint per_sample = table.shape[0] > 1
    cdef Py_ssize_t q, s, ch, r, tap, count
    cdef int32_t idx, best_idx
    cdef real acc, best
    for q in prange(n * c, nogil=True, num_threads=threads, schedule="static"):
        s = q // c
        ch = q % c
        for r in range(r_out):
            count = 0
            acc = 0
            best = 0
            best_idx = -1
            for tap in range(taps):
                idx = table[s if per_sample else 0, r, tap]
                if idx >= 0:
                    if is_max:
                        if best_idx < 0 or src[s, ch, idx] > best:
                            best = src[s, ch, idx]
                            best_idx = idx
                    else:
                        acc = acc + src[s, ch, idx]
                        count = count + 1
            if is_max:
                out[s, ch, r] = best
                argmax[s, ch, r] = best_idx
            elif count > 0:
                out[s, ch, r] = acc / count
            else:
                out[s, ch, r] = 0


def table_pool_adjoint(const real[:, :, ::1] dout, const int32_t[:, :, ::1] table, bint is_max,
                       const int32_t[:, :, ::1] argmax, real[:, :, ::1] dsrc, int threads):
    """Gradient of :func:`table_pool` into a zeroed ``dsrc``, one thread per (sample, channel)."""
    cdef Py_ssize_t n = dout.shape[0], c = dout.shape[1]
    cdef Py_ssize_t r_out = table.shape[1], taps = table.shape[2]
    cdef bint per_sample = table.shape[0] > 1
    cdef Py_ssize_t q, s, ch, r, tap, count
    cdef int32_t idx
    cdef real share
    for q in prange(n * c, nogil=True, num_threads=threads, schedule="static"):
        s = q // c
        ch = q % c
        for r in range(r_out):
            if is_max:
                idx = argmax[s, ch, r]
                if idx >= 0:
                    dsrc[s, ch, idx] += dout[s, ch, r]
            else:
                count = 0
                for tap in range(taps):
                    if table[s if per_sample else 0, r, tap] >= 0:
                        count = count + 1
                if count > 0:
                    share = dout[s, ch, r] / count
                    for tap in range(taps):
                        idx = table[s if per_sample else 0, r, tap]
                        if idx >= 0:
                            dsrc[s, ch, idx] += share


# ----------------------------------------------------------------------------------------------
# One output channel: a direct convolution over whole planes
# ----------------------------------------------------------------------------------------------
# With K = 1 the GEMM degenerates to a matrix-vector product and the im2col gather costs as much
# as the arithmetic; multiply-adding shifted input rows into the output rows is several times
# faster, even when every position is computed and only the masked ones are kept (a single output
# channel costs 1/K of the layer it follows).

def direct_conv_single(const real[:, :, :, ::1] xp, const real[:, :, ::1] w, double bias, int sh, int sw,
                       real[:, :, ::1] out, int threads):
    """``out[n, y, x] = bias + Σ_{c,i,j} w[c, i, j] xp[n, c, y sh + i, x sw + j]`` at every output position."""
    cdef Py_ssize_t n_count = xp.shape[0], c_count = xp.shape[1], kh = w.shape[1], kw = w.shape[2]
    cdef Py_ssize_t ho = out.shape[1], wo = out.shape[2]
    cdef Py_ssize_t n, y, c, i, j, x
    cdef real wv
    cdef const real *row
    cdef real *dst
    for n in prange(n_count, nogil=True, num_threads=threads, schedule="static"):
        for y in range(ho):
            dst = &out[n, y, 0]
            for x in range(wo):
                dst[x] = <real> bias
            for c in range(c_count):
                for i in range(kh):
                    for j in range(kw):
                        wv = w[c, i, j]
                        row = &xp[n, c, y * sh + i, j]
                        if sw == 1:  # contiguous: vectorises
                            for x in range(wo):
                                dst[x] += wv * row[x]
                        else:
                            for x in range(wo):
                                dst[x] += wv * row[x * sw]


def direct_conv_single_backward(const real[:, :, :, ::1] xp, const real[:, :, ::1] w, const real[:, :, ::1] dy,
                                int sh, int sw, real[:, :, :, ::1] dxp, double[:, :, :, ::1] dw_partial,
                                double[:, :, ::1] dw_columns, int threads):
    """Backward of :func:`direct_conv_single`: ``dxp`` (zeroed) += and ``dW`` per static block of samples.

    ``dw_partial`` (blocks, C, kh, kw) must be zero; the caller adds the blocks in order.
    ``dw_columns`` (blocks, C kh kw, wo), zeroed, is scratch: each weight's sum is first kept per
    output column x, an element-wise update that vectorises (a sum over x in the inner loop would
    be a floating-point reduction the compiler may not reorder), and summed over x once per block.
    """
    cdef Py_ssize_t n_count = xp.shape[0], c_count = xp.shape[1], kh = w.shape[1], kw = w.shape[2]
    cdef Py_ssize_t ho = dy.shape[1], wo = dy.shape[2], blocks = dw_partial.shape[0]
    cdef Py_ssize_t b, n, y, c, i, j, x
    cdef real wv
    cdef double acc
    cdef const real *row
    cdef real *drow
    cdef const real *g
    cdef double *column
    for b in prange(blocks, nogil=True, num_threads=threads, schedule="static"):
        for n in range((n_count * b) // blocks, (n_count * (b + 1)) // blocks):
            for y in range(ho):
                g = &dy[n, y, 0]
                for c in range(c_count):
                    for i in range(kh):
                        for j in range(kw):
                            wv = w[c, i, j]
                            row = &xp[n, c, y * sh + i, j]
                            drow = &dxp[n, c, y * sh + i, j]
                            column = &dw_columns[b, (c * kh + i) * kw + j, 0]
                            if sw == 1:
                                for x in range(wo):
                                    drow[x] += wv * g[x]
                                for x in range(wo):
                                    column[x] += g[x] * row[x]
                            else:
                                for x in range(wo):
                                    drow[x * sw] += wv * g[x]
                                    column[x] += g[x] * row[x * sw]
        for c in range(c_count):
            for i in range(kh):
                for j in range(kw):
                    column = &dw_columns[b, (c * kh + i) * kw + j, 0]
                    acc = 0
                    for x in range(wo):
                        acc = acc + column[x]
                    dw_partial[b, c, i, j] += acc


# ----------------------------------------------------------------------------------------------
# float32 convolution on channels-last rows, NCHW planes in and out (the backend's direct path)
# ----------------------------------------------------------------------------------------------
#
# The same row convolution as the fused residual unit (fastpath/_cython_unit.pyx, its map and
# taps): rows (R, C) with the channels contiguous, a map over the zero-padded grid holding the row
# of every position (-1 reads zeros), and the register-blocked micro-kernel of direct_conv.h. Here
# the map's index is the window's top-left corner rather than its centre, so any padding and
# kernel size fit. The wrapper is CythonBackend._rows_forward / _rows_backward.

from fastpath.direct_conv cimport ponder_direct_conv_rows_f32, ponder_epilogue, ponder_epilogue_none

cdef extern from "direct_conv_planes.h" nogil:
    int ponder_planes_supported(int64_t c_count, int64_t k_count)
    void ponder_conv_planes_f32(const float *src, int64_t c_count, const int32_t *rowmap, const int64_t *pos,
                                const int64_t *tapoff, int64_t taps, const float *wt, int64_t k_count,
                                const float *bias, const float *zero_row, float *out, int64_t width, int64_t count)

cdef enum:
    # rows transposed at a time between a thread's scratch and the planes: 32 rows x K floats stay in L1
    TRANSPOSE_BLOCK = 32


def planes_kernels(Py_ssize_t c_count, Py_ssize_t k_count):
    """Whether the AVX2 kernels of ``direct_conv_planes.h`` run here for C input and K output channels.

    True on x86-64 CPUs with AVX2 and FMA (GCC builds) when both counts are multiples of 16:
    :func:`conv_rows_to_planes` then stores its tiles straight into the planes.
    """
    return bool(ponder_planes_supported(c_count, k_count))


def planes_to_channels_last(const real[:, :, ::1] planes, const int32_t[::1] counts, const int64_t[::1] start,
                            real[:, ::1] rows, int threads):
    """``rows[start[n] + p, c] = planes[n, c, p]`` for ``p < counts[n]`` (``counts[0]`` for all if it has one entry).

    NCHW planes (N, C, P) to channels-last rows: the input of the row convolution (every position,
    ``P = H W``) and the compact output gradient (the computed slots of each sample). Blocks of
    :data:`TRANSPOSE_BLOCK` positions, so that the strided side of the transposition stays in L1.
    """
    cdef Py_ssize_t n_count = planes.shape[0], c_count = planes.shape[1], shared = counts.shape[0] == 1
    cdef Py_ssize_t n, c, p, p0, p1, blk, count
    cdef real *dst
    for n in prange(n_count, nogil=True, num_threads=threads, schedule="static"):
        count = counts[0] if shared else counts[n]
        dst = &rows[0, 0] + start[n] * c_count
        for blk in range((count + TRANSPOSE_BLOCK - 1) // TRANSPOSE_BLOCK):
            p0 = blk * TRANSPOSE_BLOCK
            p1 = min(count, p0 + TRANSPOSE_BLOCK)
            if c_count < 32:  # few channels: runs along the planes (measured faster at 16)
                for c in range(c_count):
                    for p in range(p0, p1):
                        dst[p * c_count + c] = planes[n, c, p]
            else:  # many: runs along the rows (measured faster at 32 and 64)
                for p in range(p0, p1):
                    for c in range(c_count):
                        dst[p * c_count + c] = planes[n, c, p]


def conv_rows_to_planes(const float[:, ::1] src, const int32_t[::1] rowmap, Py_ssize_t map_stride, Py_ssize_t map_w,
                        const int32_t[:, ::1] positions, const int32_t[::1] counts, Py_ssize_t grid_w,
                        Py_ssize_t sh, Py_ssize_t sw, const int64_t[::1] tapoff, const float[:, ::1] wt,
                        const float[::1] bias, float[:, :, ::1] out, int threads):
    """``out[n, k, p] = bias[k] + Σ_t Σ_c src[rowmap[n S + pos(p) + tapoff[t]], c] wt[t C + c, k]``, 0 past the count.

    The row convolution of every sample ``n`` at its positions ``positions[b, p]`` (raster
    indices on a grid ``grid_w`` wide, ``b = n`` or 0 for a shared plan, ``p < counts[b]``), whose
    window's top-left corner is map index ``pos(p) = (q // grid_w) sh map_w + (q % grid_w) sw``
    of sample ``n``'s map (``map_stride = S`` entries each, ``map_w`` wide). ``wt`` (T C, K) holds
    the weights with the output channels contiguous. The output is the compact NCHW layout
    (N, K, P), the slots past the count set to 0. Where :func:`planes_kernels` says so, the
    tiles of ``direct_conv_planes.h`` are stored straight into the planes; elsewhere each sample's
    rows are computed by ``direct_conv.h`` into a per-thread scratch, which stays in cache, and
    transposed from there (that kernel's store is row-major). One sample per OpenMP iteration, so every
    output is written by one thread and the result does not depend on the thread count.
    """
    cdef Py_ssize_t n_count = out.shape[0], k_count = out.shape[1], width = out.shape[2]
    cdef Py_ssize_t c_count = src.shape[1], taps = tapoff.shape[0], shared = positions.shape[0] == 1
    cdef Py_ssize_t n, b, p, p0, p1, blk, k, count, q
    cdef int tid
    cdef bint planes = ponder_planes_supported(c_count, k_count)
    cdef ponder_epilogue ep
    cdef float *scr
    cdef int64_t *pos
    if n_count == 0 or k_count == 0:
        return
    scratch_arr = np.empty((threads, max(width, 1) * k_count), dtype=np.float32)
    pos_arr = np.empty((threads, max(width, 1)), dtype=np.int64)
    zero_arr = np.zeros(max(c_count, 1), dtype=np.float32)
    cdef float[:, ::1] scratch = scratch_arr
    cdef int64_t[:, ::1] posbuf = pos_arr
    cdef float[::1] zero_row = zero_arr
    ep = ponder_epilogue_none()
    ep.bias = &bias[0]
    for n in prange(n_count, nogil=True, num_threads=threads, schedule="static"):
        tid = threadid()
        b = 0 if shared else n
        count = counts[b]
        scr = &scratch[tid, 0]
        pos = &posbuf[tid, 0]
        for p in range(count):
            q = positions[b, p]
            pos[p] = (q // grid_w) * sh * map_w + (q % grid_w) * sw
        if count > 0 and planes:
            ponder_conv_planes_f32(&src[0, 0], c_count, &rowmap[0] + n * map_stride, pos, &tapoff[0], taps, &wt[0, 0],
                                   k_count, &bias[0], &zero_row[0], &out[n, 0, 0], width, count)
        elif count > 0:
            ponder_direct_conv_rows_f32(&src[0, 0], c_count, &rowmap[0] + n * map_stride, pos, &tapoff[0], taps,
                                        &wt[0, 0], k_count, &ep, &zero_row[0], scr, 0, count)
            for blk in range((count + TRANSPOSE_BLOCK - 1) // TRANSPOSE_BLOCK):
                p0 = blk * TRANSPOSE_BLOCK
                p1 = min(count, p0 + TRANSPOSE_BLOCK)
                for k in range(k_count):
                    for p in range(p0, p1):
                        out[n, k, p] = scr[p * k_count + k]
        for k in range(k_count):
            for p in range(count, width):
                out[n, k, p] = 0

