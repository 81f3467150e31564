/*
 * The readable version of the perforated convolution: one work-item per output value.
 *
 * Every convolution of the project (the perforated one reading the input through the taps of
 * its computed positions, the implicit one reading a compact tensor through an index table, and
 * the dX of both) is one *table convolution*
 *
 *     out[n, m, r] = bias[m] + sum_{c, t} w[m, c*TT + t] * src[n, c, table[b, r, t]]
 *
 * with b = 0 for a shared table and b = n for per-sample tables, a table entry of -1 reading 0
 * (padding), and output rows r >= counts[b] (padding slots of per-sample masks) set to 0.
 * The weight matrix is the column-major packed matrix built by `pack_weights` in
 * perforated_conv.cl: w[m, kk] = packed[kk * ldw + m].
 *
 * These kernels are the oracle the fast kernels are tested against; they are slow on purpose.
 * REAL is float or double (-D REAL=...). Sizes are kernel arguments.
 */
#ifdef USE_FP64
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
#endif

/* One work-item per (r, m, n): global size (ncols = N*R, M). */
__kernel void implicit_gemm_naive(const int M, const int C, const int S, const int R, const int TT,
                                  const int ncols, const int ldw,
                                  __global const REAL *src, __global const int *table,
                                  const int table_batch, __global const int *counts,
                                  __global const REAL *packed, __global const REAL *bias,
                                  const int has_bias, __global REAL *out)
{
    const int col = get_global_id(0), m = get_global_id(1);
    if (col >= ncols || m >= M) return;
    const int n = col / R, r = col - n * R;
    const int b = table_batch == 1 ? 0 : n;
    REAL acc = 0;
    if (r < counts[b]) {
        for (int c = 0; c < C; ++c)
            for (int t = 0; t < TT; ++t) {
                const int s = table[((size_t)b * R + r) * TT + t];
                if (s >= 0)
                    acc += packed[(size_t)(c * TT + t) * ldw + m] * src[((size_t)n * C + c) * S + s];
            }
        if (has_bias) acc += bias[m];
    }
    out[((size_t)n * M + m) * R + r] = acc;
}

/* dW[m, c*TT + t] = sum over live (n, r) of dout[n, m, r] * src[n, c, table[b, r, t]].
 * One work-item per weight: global size (C*TT, M). */
__kernel void weight_grad_naive(const int M, const int C, const int S, const int R, const int TT,
                                const int ncols, __global const REAL *dout,
                                __global const REAL *src, __global const int *table,
                                const int table_batch, __global const int *counts,
                                __global REAL *dw)
{
    const int kk = get_global_id(0), m = get_global_id(1);
    if (kk >= C * TT || m >= M) return;
    const int c = kk / TT, t = kk - c * TT;
    REAL acc = 0;
    for (int col = 0; col < ncols; ++col) {
        const int n = col / R, r = col - n * R;
        const int b = table_batch == 1 ? 0 : n;
        if (r >= counts[b]) continue;
        const int s = table[((size_t)b * R + r) * TT + t];
        if (s >= 0) acc += dout[((size_t)n * M + m) * R + r] * src[((size_t)n * C + c) * S + s];
    }
    dw[(size_t)m * C * TT + kk] = acc;
}

/* db[m] = sum over live (n, r) of dout[n, m, r]. One work-item per output channel. */
__kernel void bias_grad_naive(const int M, const int R, const int ncols, __global const REAL *dout,
                              const int table_batch, __global const int *counts,
                              __global REAL *db)
{
    const int m = get_global_id(0);
    if (m >= M) return;
    REAL acc = 0;
    for (int col = 0; col < ncols; ++col) {
        const int n = col / R, r = col - n * R;
        if (r < counts[table_batch == 1 ? 0 : n]) acc += dout[((size_t)n * M + m) * R + r];
    }
    db[m] = acc;
}
