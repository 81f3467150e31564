/*
 * Fast OpenCL kernels of the perforated convolution.
 *
 * One idea carries everything: every convolution here is a *table convolution* (an implicit
 * GEMM that reads its input through an int32 index table, see perforated_conv_oracle.cl)
 *
 *     out[n, m, r] = bias[m] + sum_{kk = c*TT + t} W[m, kk] * src[n, c, table[b, r, t]]
 *
 * - perforated forward:  src = x (N, C, H*W), table = input pixel of tap t of computed position r;
 * - implicit forward:    src = compact (N, C, P), table = composed index table;
 * - dX of both:          src = dY (N, K, R), table = the *inverse* table (for every input pixel s,
 *                        the outputs r that read it through tap t), weights transposed.
 *
 * Why a gather formulation for dX rather than atomics: the scatter-add of col2im has many writers
 * per input pixel (kh*kw of them for a dense conv, and arbitrarily many for nearest-filled compact
 * tensors). OpenCL 1.2 has no float atomic add (it must be emulated with compare-and-swap loops,
 * which serialise on hot pixels) and atomics make the result depend on scheduling. Inverting the
 * table once on the host (integer data, cached with the plan) turns the scatter into a gather that
 * runs through the same tuned GEMM kernel: deterministic, no atomics, same speed as the forward.
 * dW is a reduction over all (n, r): a GEMM with the long axis split into slices (split-K) whose
 * partial results are summed in a fixed order by `sum_partials` -- deterministic again.
 *
 * Tiling (-D options with defaults below): a work-group of (TN/WN) x (TM/WM) work-items computes
 * a TM x TN output tile; each work-item holds a WM x WN register block (strided so that local
 * memory reads are conflict-free and global writes are coalesced along r). The reduction axis is
 * walked in steps of TK: the weight tile is read with vload4 from a zero-padded, column-major
 * packed weight matrix (no bounds checks, coalesced along the output channels), the input tile is
 * gathered through the table into local memory.
 * REAL / REAL4 are float/float4 or double/double4. Shape sizes are kernel arguments.
 */
#ifdef USE_FP64
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
#endif

#ifndef TM
#define TM 64
#endif
#ifndef TN
#define TN 64
#endif
#ifndef TK
#define TK 16
#endif
#ifndef WM
#define WM 4
#endif
#ifndef WN
#define WN 4
#endif
#define LX (TN / WN)
#define LY (TM / WM)
#define NTHREADS (LX * LY)

/* The load loops below give every work-item whole rows of the tiles; these shapes make that exact. */
#if (TM % WM) || (TN % WN) || (TM % 4) || (NTHREADS % TN) || (NTHREADS % TK) || \
    ((TK * TN) % NTHREADS) || ((TK * TM) % NTHREADS)
#error "tile: need TM % WM == TN % WN == TM % 4 == 0, NTHREADS = (TN/WN)*(TM/WM) a multiple of TN and TK, and TK*TN, TK*TM multiples of NTHREADS"
#endif

/* The GEMM's weight matrix A (rows = output channels of the GEMM, cols = reduction index), stored
 * *column-major* as packed[col * rows_p + row] with zeros outside the weights, so that a tile of
 * consecutive rows is contiguous (coalesced vload4, conflict-free local stores):
 *   transpose == 0: A[k, c*T + t]         = w[k, c, t]   (forward)
 *   transpose == 1: A[c, (k*T + t)*D + d] = w[k, c, t]   (dX through the inverse table,
 *                                                          D readers per (pixel, tap))
 * Global size (rows_p, cols_p). */
__kernel void pack_weights(const int K, const int C, const int T, const int D, const int transpose,
                           const int rows_p, const int cols_p,
                           __global const REAL *w, __global REAL *packed)
{
    const int row = get_global_id(0), col = get_global_id(1);
    if (col >= cols_p || row >= rows_p) return;
    REAL v = 0;
    if (!transpose) {
        if (row < K && col < C * T) v = w[(size_t)row * C * T + col];
    } else {
        const int td = T * D;
        if (row < C && col < K * td) {
            const int k = col / td, t = (col - k * td) / D;
            v = w[((size_t)k * C + row) * T + t];
        }
    }
    packed[(size_t)col * rows_p + row] = v;
}

/* Global size (ceil(N*R / TN) * LX, ceil(M / TM) * LY); packed (column-major, see pack_weights)
 * has ldw >= ceil(M / TM) * TM rows and >= ceil(C*TT / TK) * TK columns. */
__kernel __attribute__((reqd_work_group_size(LX, LY, 1)))
void implicit_gemm(const int M, const int C, const int S, const int R, const int TT,
                   const int ncols, const int ldw,
                   __global const REAL *src, __global const int *table, const int table_batch,
                   __global const int *counts, __global const REAL *packed,
                   __global const REAL *bias, const int has_bias, __global REAL *out)
{
    __local REAL As[TK][TM];  /* weights, As[kk][m] */
    __local REAL Bs[TK][TN];  /* gathered input, Bs[kk][col] */
    const int lx = get_local_id(0), ly = get_local_id(1);
    const int lid = ly * LX + lx;
    const int col_base = get_group_id(0) * TN, m_base = get_group_id(1) * TM;
    const int CT = C * TT;

    /* The column this work-item gathers is the same at every reduction step: resolve its sample,
     * output row and table row once. */
    const int my_col = col_base + lid % TN;
    const int n_me = my_col < ncols ? my_col / R : 0;
    const int r_me = my_col - n_me * R;
    const int b_me = table_batch == 1 ? 0 : n_me;
    const int live = my_col < ncols && r_me < counts[b_me];
    __global const int *trow = table + ((size_t)b_me * R + (live ? r_me : 0)) * TT;
    __global const REAL *src_n = src + (size_t)n_me * C * S;

    REAL acc[WM][WN];
    for (int i = 0; i < WM; ++i)
        for (int j = 0; j < WN; ++j) acc[i][j] = 0;

    for (int k0 = 0; k0 < CT; k0 += TK) {
        for (int idx = lid; idx < TM * TK / 4; idx += NTHREADS) {
            const int kk = idx / (TM / 4), m = (idx % (TM / 4)) * 4;
            vstore4(vload4(0, packed + (size_t)(k0 + kk) * ldw + m_base + m), 0, &As[kk][m]);
        }
        for (int i = 0; i < (TK * TN) / NTHREADS; ++i) {
            const int row = lid / TN + i * (NTHREADS / TN);
            const int kk = k0 + row;
            REAL v = 0;
            if (live && kk < CT) {
                const int c = kk / TT;
                const int s = trow[kk - c * TT];
                if (s >= 0) v = src_n[(size_t)c * S + s];
            }
            Bs[row][lid % TN] = v;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int kk = 0; kk < TK; ++kk) {
            REAL a[WM], bv[WN];
            for (int i = 0; i < WM; ++i) a[i] = As[kk][ly + i * LY];
            for (int j = 0; j < WN; ++j) bv[j] = Bs[kk][lx + j * LX];
            for (int i = 0; i < WM; ++i)
                for (int j = 0; j < WN; ++j) acc[i][j] += a[i] * bv[j];
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }

    for (int j = 0; j < WN; ++j) {
        const int col = col_base + lx + j * LX;
        if (col >= ncols) continue;
        const int n = col / R, r = col - n * R;
        const int col_live = r < counts[table_batch == 1 ? 0 : n];
        for (int i = 0; i < WM; ++i) {
            const int m = m_base + ly + i * LY;
            if (m < M)
                out[((size_t)n * M + m) * R + r] =
                    col_live ? acc[i][j] + (has_bias ? bias[m] : (REAL)0) : (REAL)0;
        }
    }
}

/* Split-K dW: partial[z, m, kk] = sum over the z-th slice of live columns (n, r) of
 * dout[n, m, r] * src[n, c, table[b, r, t]] with kk = c*TT + t.
 * Global size (ceil(C*TT / TN) * LX, ceil(M / TM) * LY, splits). */
__kernel __attribute__((reqd_work_group_size(LX, LY, 1)))
void weight_grad(const int M, const int C, const int S, const int R, const int TT,
                 const int ncols, const int cols_per_split, __global const REAL *dout,
                 __global const REAL *src, __global const int *table, const int table_batch,
                 __global const int *counts, __global REAL *partial)
{
    /* Written column by column (consecutive work-items: consecutive columns); the +1 keeps
     * those stores in different local-memory banks. */
    __local REAL As[TK][TM + 1];  /* dY tile, As[col][m] */
    __local REAL Bs[TK][TN + 1];  /* gathered input, Bs[col][kk] */
    const int lx = get_local_id(0), ly = get_local_id(1);
    const int lid = ly * LX + lx;
    const int kk_base = get_group_id(0) * TN, m_base = get_group_id(1) * TM;
    const int split = get_group_id(2);
    const int CT = C * TT;
    const int col_begin = split * cols_per_split;
    const int col_end = min(ncols, col_begin + cols_per_split);
    /* Consecutive work-items load consecutive columns: contiguous r in dY and in the input. */
    const int my_c = lid % TK;

    REAL acc[WM][WN];
    for (int i = 0; i < WM; ++i)
        for (int j = 0; j < WN; ++j) acc[i][j] = 0;

    for (int c0 = col_begin; c0 < col_end; c0 += TK) {
        const int col = c0 + my_c;
        const int n = col < col_end ? col / R : 0;
        const int r = col - n * R;
        const int b = table_batch == 1 ? 0 : n;
        const int live = col < col_end && r < counts[b];
        for (int i = 0; i < (TK * TM) / NTHREADS; ++i) {
            const int mm = lid / TK + i * (NTHREADS / TK);
            const int m = m_base + mm;
            As[my_c][mm] = (live && m < M) ? dout[((size_t)n * M + m) * R + r] : (REAL)0;
        }
        for (int i = 0; i < (TK * TN) / NTHREADS; ++i) {
            const int jj = lid / TK + i * (NTHREADS / TK);
            const int kk = kk_base + jj;
            REAL v = 0;
            if (live && kk < CT) {
                const int c = kk / TT;
                const int s = table[((size_t)b * R + r) * TT + (kk - c * TT)];
                if (s >= 0) v = src[((size_t)n * C + c) * S + s];
            }
            Bs[my_c][jj] = v;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int cc = 0; cc < TK; ++cc) {
            REAL a[WM], bv[WN];
            for (int i = 0; i < WM; ++i) a[i] = As[cc][ly + i * LY];
            for (int j = 0; j < WN; ++j) bv[j] = Bs[cc][lx + j * LX];
            for (int i = 0; i < WM; ++i)
                for (int j = 0; j < WN; ++j) acc[i][j] += a[i] * bv[j];
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }

    for (int i = 0; i < WM; ++i) {
        const int m = m_base + ly + i * LY;
        if (m >= M) continue;
        for (int j = 0; j < WN; ++j) {
            const int kk = kk_base + lx + j * LX;
            if (kk < CT) partial[((size_t)split * M + m) * CT + kk] = acc[i][j];
        }
    }
}

/* out[i] = sum_z partial[z, i], z in order: the split-K reduction, deterministic. */
__kernel void sum_partials(const int size, const int splits, __global const REAL *partial,
                           __global REAL *out)
{
    const int i = get_global_id(0);
    if (i >= size) return;
    REAL acc = 0;
    for (int z = 0; z < splits; ++z) acc += partial[(size_t)z * size + i];
    out[i] = acc;
}

/* db[m] = sum over live (n, r) of dout[n, m, r]: one work-group per channel, a strided partial
 * sum per work-item, then a tree in local memory (local size a power of two). */
__kernel void bias_grad(const int M, const int R, const int ncols, __global const REAL *dout,
                        const int table_batch, __global const int *counts, __global REAL *db,
                        __local REAL *scratch)
{
    const int m = get_group_id(0), lid = get_local_id(0), L = get_local_size(0);
    REAL acc = 0;
    for (int col = lid; col < ncols; col += L) {
        const int n = col / R, r = col - n * R;
        if (r < counts[table_batch == 1 ? 0 : n]) acc += dout[((size_t)n * M + m) * R + r];
    }
    scratch[lid] = acc;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int width = L / 2; width > 0; width >>= 1) {
        if (lid < width) scratch[lid] += scratch[lid + width];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (lid == 0) db[m] = scratch[0];
}

/* out[n, m, q] = sum_{d < D} src[n, m, index[b, q, d]] (entries of -1 add nothing).
 * With D = 1 this is the fill (index = nearest index map, or the slot of each computed position);
 * with the inverted index it is the fill's adjoint (all positions that copied slot p).
 * Global size (Q, M, N). */
__kernel void gather_sum(const int Q, const int P, const int M, const int D, const int index_batch,
                         __global const int *index, __global const REAL *src, __global REAL *out)
{
    const int q = get_global_id(0), m = get_global_id(1), n = get_global_id(2);
    if (q >= Q) return;
    __global const int *row = index + ((size_t)(index_batch == 1 ? 0 : n) * Q + q) * D;
    __global const REAL *src_nm = src + ((size_t)n * M + m) * P;
    REAL acc = 0;
    for (int d = 0; d < D; ++d) {
        const int p = row[d];
        if (p >= 0) acc += src_nm[p];
    }
    out[((size_t)n * M + m) * Q + q] = acc;
}

/* Pooling through an index table: out[n, c, r] = max or mean over the taps t with
 * table[b, r, t] >= 0 of src[n, c, table[b, r, t]]. Max ties go to the first tap; its index is
 * stored in argmax for the backward. Global size (R, C, N). */
__kernel void table_pool_forward(const int C, const int S, const int R, const int T,
                                 const int table_batch, const int is_max,
                                 __global const REAL *src, __global const int *table,
                                 __global REAL *out, __global int *argmax)
{
    const int r = get_global_id(0), c = get_global_id(1), n = get_global_id(2);
    if (r >= R) return;
    __global const int *row = table + ((size_t)(table_batch == 1 ? 0 : n) * R + r) * T;
    __global const REAL *src_nc = src + ((size_t)n * C + c) * S;
    REAL best = 0, sum = 0;
    int arg = -1, count = 0;
    for (int t = 0; t < T; ++t) {
        const int s = row[t];
        if (s < 0) continue;
        const REAL v = src_nc[s];
        if (arg < 0 || v > best) {
            best = v;
            arg = t;
        }
        sum += v;
        ++count;
    }
    const size_t o = ((size_t)n * C + c) * R + r;
    if (is_max) {
        out[o] = best;
        argmax[o] = arg;
    } else {
        out[o] = sum / (REAL)count;
    }
}

/* dsrc[n, c, s] = sum over the readers (r, t) of source s (inverse table (B, S, T*D), entry
 * (t*D + d) = r) of dout[n, c, r] times d out / d tap: 1 at the stored argmax tap (max) or
 * 1 / (number of in-bounds taps of r) (average). Global size (S, C, N). */
__kernel void table_pool_backward(const int C, const int S, const int R, const int T, const int D,
                                  const int table_batch, const int is_max,
                                  __global const REAL *dout, __global const int *table,
                                  __global const int *inverse, __global const int *argmax,
                                  __global REAL *dsrc)
{
    const int s = get_global_id(0), c = get_global_id(1), n = get_global_id(2);
    if (s >= S) return;
    const int b = table_batch == 1 ? 0 : n;
    __global const int *readers = inverse + ((size_t)b * S + s) * T * D;
    const size_t nc = (size_t)n * C + c;
    REAL acc = 0;
    for (int e = 0; e < T * D; ++e) {
        const int r = readers[e];
        if (r < 0) continue;
        const int t = e / D;
        if (is_max) {
            if (argmax[nc * R + r] == t) acc += dout[nc * R + r];
        } else {
            int count = 0;
            for (int u = 0; u < T; ++u) count += table[((size_t)b * R + r) * T + u] >= 0;
            acc += dout[nc * R + r] / (REAL)count;
        }
    }
    dsrc[nc * S + s] = acc;
}

/* ------------------------------------------------------------------------------------------
 * The CPU variant of the two GEMM kernels ("direct"). A CPU OpenCL compiler (PoCL) runs the
 * work-items of a group as a loop and vectorises it; local-memory tiles and barriers cut that
 * loop into pieces and spill every work-item's accumulators, which made the tiled kernels 2-3x
 * slower than these on PoCL. Here one work-item accumulates a block of BM output channels
 * straight from global memory (the CPU caches do the tiling), with no local memory and no
 * barriers. Same sums, same order (increasing reduction index), as the oracle kernels.
 * ------------------------------------------------------------------------------------------ */
#ifndef BM
#define BM 32
#endif

/* Global size (N*R, ceil(M / BM)); packed (column-major) has ldw >= ceil(M / BM) * BM rows. */
__kernel void implicit_gemm_direct(const int M, const int C, const int S, const int R, const int TT,
                                   const int ncols, const int ldw,
                                   __global const REAL *src, __global const int *table,
                                   const int table_batch, __global const int *counts,
                                   __global const REAL *packed, __global const REAL *bias,
                                   const int has_bias, __global REAL *out)
{
    const int col = get_global_id(0), m0 = get_global_id(1) * BM;
    if (col >= ncols) return;
    const int n = col / R, r = col - n * R;
    const int b = table_batch == 1 ? 0 : n;
    const int live = r < counts[b];
    REAL acc[BM];
    for (int i = 0; i < BM; ++i) acc[i] = 0;
    if (live) {
        __global const int *trow = table + ((size_t)b * R + r) * TT;
        __global const REAL *src_n = src + (size_t)n * C * S;
        for (int c = 0; c < C; ++c)
            for (int t = 0; t < TT; ++t) {
                const int s = trow[t];
                const REAL v = s >= 0 ? src_n[(size_t)c * S + s] : (REAL)0;
                __global const REAL *a = packed + (size_t)(c * TT + t) * ldw + m0;
                for (int i = 0; i < BM; ++i) acc[i] += a[i] * v;
            }
    }
    for (int i = 0; i < BM && m0 + i < M; ++i)
        out[((size_t)n * M + m0 + i) * R + r] = live ? acc[i] + (has_bias ? bias[m0 + i] : (REAL)0) : (REAL)0;
}

/* dW[m, kk] for BM channels m and one reduction index kk = c*TT + t per work-item, over the live
 * columns in order. Global size (C*TT, ceil(M / BM)). */
__kernel void weight_grad_direct(const int M, const int C, const int S, const int R, const int TT,
                                 const int ncols, __global const REAL *dout,
                                 __global const REAL *src, __global const int *table,
                                 const int table_batch, __global const int *counts,
                                 __global REAL *dw)
{
    const int kk = get_global_id(0), m0 = get_global_id(1) * BM;
    if (kk >= C * TT) return;
    const int c = kk / TT, t = kk - c * TT;
    const int block = min(BM, M - m0);
    REAL acc[BM];
    for (int i = 0; i < BM; ++i) acc[i] = 0;
    for (int n = 0; n < ncols / R; ++n) {
        const int b = table_batch == 1 ? 0 : n;
        __global const REAL *src_nc = src + ((size_t)n * C + c) * S;
        __global const REAL *dout_n = dout + ((size_t)n * M + m0) * R;
        for (int r = 0; r < counts[b]; ++r) {
            const int s = table[((size_t)b * R + r) * TT + t];
            if (s < 0) continue;
            const REAL v = src_nc[s];
            for (int i = 0; i < block; ++i) acc[i] += dout_n[(size_t)i * R + r] * v;
        }
    }
    for (int i = 0; i < block; ++i) dw[(size_t)(m0 + i) * C * TT + kk] = acc[i];
}
