/*
 * The sparse residual unit U = x + A * f(x), f = conv2 . relu . bn2 . conv1 . relu . bn1, as a
 * handful of kernels in the *compact domain* (fastpath/opencl_unit.py drives them).
 *
 * Only three sets of positions matter (per sample, flattened over the batch into rows):
 *   A  the active positions (conv2 is computed there),
 *   D  A dilated by conv2's window (conv1 is computed there; the batch-norm statistics are over D),
 *   E  D dilated by conv1's window (the positions conv1 reads), ordered with D's rows first.
 * Activations are compact, channels-last matrices (rows, channels): a row is one position, its
 * channels contiguous. Dense NCHW tensors (x, U, dU, dx) are read and written through an int32
 * `offset` per row (b*C*H*W + y*W + x) and a channel stride H*W.
 *
 * - gather_bn_relu    compact = relu(gamma * (src - mean) * inv_std + beta): batch norm and ReLU
 *                     fused into the gather (dense x -> E rows, or conv1's compact output -> itself);
 * - table_gemm        a convolution at compact rows: out[r, m] = sum_{t, c} w[t, c, m] * src[table[r, t], c]
 *                     (table = the source row of tap t, -1 = zero padding); with the inverse table
 *                     and transposed weights it is the convolution's input gradient; `gate` multiplies
 *                     the result by [gate > 0] (the ReLU backward of the layer below, fused);
 * - scatter_add       dense[offset[r] + c*stride] += compact[r, c]: the residual add of the forward;
 * - bn_backward_scatter  the batch-norm input gradient written to compact rows or added into dense dx;
 * - column_partials, bn_grad_partials, weight_grad_partials: reductions over rows as per-chunk
 *                     partial sums (a fixed number of rows each, summed sequentially), then reduce_partials adds
 *                     the chunks in index order. No atomics: the result does not depend on scheduling.
 *
 * Every kernel checks its bounds: the host rounds global sizes up to a fixed work-group shape so
 * that PoCL compiles one specialisation per kernel, not one per problem size.
 * REAL is float or double (-D REAL=..., -D USE_FP64).
 */
#ifdef USE_FP64
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
#endif

/* out[r, c] = relu(gamma[c] * (src[offset[r] + c*cstride] - mean[c]) * inv_std[c] + beta[c]) */
__kernel void gather_bn_relu(const int rows, const int channels, const int cstride,
                             __global const int *offset, __global const REAL *src,
                             __global const REAL *mean, __global const REAL *inv_std,
                             __global const REAL *gamma, __global const REAL *beta,
                             __global REAL *out)
{
    const int c = get_global_id(0);
    const int r = get_global_id(1);
    if (c >= channels || r >= rows) return;
    const REAL x_hat = (src[offset[r] + c * cstride] - mean[c]) * inv_std[c];
    const REAL y = gamma[c] * x_hat + beta[c];
    out[r * channels + c] = y > (REAL)0 ? y : (REAL)0;
}

/* out[r, c] = src[offset[r] + c*cstride] */
__kernel void gather_rows(const int rows, const int channels, const int cstride,
                          __global const int *offset, __global const REAL *src, __global REAL *out)
{
    const int c = get_global_id(0);
    const int r = get_global_id(1);
    if (c >= channels || r >= rows) return;
    out[r * channels + c] = src[offset[r] + c * cstride];
}

/* dense[offset[r] + c*cstride] += compact[r, c]; rows are distinct positions, so no two work-items
 * write one element. */
__kernel void scatter_add(const int rows, const int channels, const int cstride,
                          __global const int *offset, __global const REAL *compact, __global REAL *dense)
{
    const int c = get_global_id(0);
    const int r = get_global_id(1);
    if (c >= channels || r >= rows) return;
    dense[offset[r] + c * cstride] += compact[r * channels + c];
}

#ifndef BM
#define BM 16
#endif
/* BM values as one OpenCL vector (BM is 16). */
#ifdef USE_FP64
#define REALV double16
#else
#define REALV float16
#endif
#define VLOAD vload16
#define VSTORE vstore16

/* out[r, m] = bias[m] + sum_t sum_c w[(t*cin + c)*ldw + m] * src[table[r*taps + t]*cin + c],
 * times [gate[r, m] > 0] when use_gate. Global size (ceil(rows / RB), ceil(cout / BM)): a
 * work-item holds BM output channels of RB rows as RB vectors (explicit vectors: on PoCL several
 * times faster than leaving the vectorisation to the compiler), so each weight vector loaded
 * serves RB rows. w has ldw >= ceil(cout/BM)*BM zero-padded columns, so the vector loads need no
 * bounds check; a padding tap or a row past the end reads row 0 and uses zero instead. */
#define RB 4
__kernel void table_gemm(const int rows, const int taps, const int cin, const int cout, const int ldw,
                         __global const int *table, __global const REAL *src, __global const REAL *w,
                         const int use_bias, __global const REAL *bias,
                         const int use_gate, __global const REAL *gate, __global REAL *out)
{
    const int r0 = get_global_id(0) * RB;
    const int m0 = get_global_id(1) * BM;
    if (r0 >= rows || m0 >= cout) return;
    REALV acc0 = (REALV)0, acc1 = (REALV)0, acc2 = (REALV)0, acc3 = (REALV)0;
    for (int t = 0; t < taps; ++t) {
        int s[RB];
        for (int j = 0; j < RB; ++j)
            s[j] = r0 + j < rows ? table[(r0 + j) * taps + t] : -1;
        if (s[0] < 0 && s[1] < 0 && s[2] < 0 && s[3] < 0) continue;
        __global const REAL *p0 = src + (size_t)max(s[0], 0) * cin;
        __global const REAL *p1 = src + (size_t)max(s[1], 0) * cin;
        __global const REAL *p2 = src + (size_t)max(s[2], 0) * cin;
        __global const REAL *p3 = src + (size_t)max(s[3], 0) * cin;
        __global const REAL *wt = w + (size_t)t * cin * ldw + m0;
        for (int c = 0; c < cin; ++c) {
            const REALV a = VLOAD(0, wt + (size_t)c * ldw);
            acc0 += a * (s[0] >= 0 ? p0[c] : (REAL)0);
            acc1 += a * (s[1] >= 0 ? p1[c] : (REAL)0);
            acc2 += a * (s[2] >= 0 ? p2[c] : (REAL)0);
            acc3 += a * (s[3] >= 0 ? p3[c] : (REAL)0);
        }
    }
    REAL values[RB][BM];
    VSTORE(acc0, 0, values[0]);
    VSTORE(acc1, 0, values[1]);
    VSTORE(acc2, 0, values[2]);
    VSTORE(acc3, 0, values[3]);
    const int block = min(BM, cout - m0);
    for (int j = 0; j < RB && r0 + j < rows; ++j) {
        const int r = r0 + j;
        for (int i = 0; i < block; ++i) {
            const int m = m0 + i;
            REAL value = values[j][i] + (use_bias ? bias[m] : (REAL)0);
            if (use_gate && !(gate[r * cout + m] > (REAL)0)) value = (REAL)0;
            out[r * cout + m] = value;
        }
    }
}

/* partial[g, c] = sum over rows r of chunk g of v, v = src[offset[r] + c*cstride] (squared_from_mean
 * = 0) or (that - mean[c])^2 (squared_from_mean = 1). */
__kernel void column_partials(const int rows, const int channels, const int cstride, const int chunk,
                              __global const int *offset, __global const REAL *src,
                              __global const REAL *mean, const int squared_from_mean,
                              __global REAL *partial)
{
    const int c = get_global_id(0);
    const int g = get_global_id(1);
    const int start = g * chunk;
    if (c >= channels || start >= rows) return;
    const int stop = min(rows, start + chunk);
    REAL acc = (REAL)0;
    for (int r = start; r < stop; ++r) {
        REAL v = src[offset[r] + c * cstride];
        if (squared_from_mean) {
            v -= mean[c];
            v *= v;
        }
        acc += v;
    }
    partial[g * channels + c] = acc;
}

/* Per chunk g: sum dy and sum dy * x_hat over its rows, x_hat = (src - mean) * inv_std; the
 * partial sums of dbeta and dgamma. */
__kernel void bn_grad_partials(const int rows, const int channels, const int cstride, const int chunk,
                               __global const int *offset, __global const REAL *src,
                               __global const REAL *mean, __global const REAL *inv_std,
                               __global const REAL *dy, __global REAL *partial_beta,
                               __global REAL *partial_gamma)
{
    const int c = get_global_id(0);
    const int g = get_global_id(1);
    const int start = g * chunk;
    if (c >= channels || start >= rows) return;
    const int stop = min(rows, start + chunk);
    REAL sum_dy = (REAL)0, sum_dy_xhat = (REAL)0;
    for (int r = start; r < stop; ++r) {
        const REAL d = dy[r * channels + c];
        const REAL x_hat = (src[offset[r] + c * cstride] - mean[c]) * inv_std[c];
        sum_dy += d;
        sum_dy_xhat += d * x_hat;
    }
    partial_beta[g * channels + c] = sum_dy;
    partial_gamma[g * channels + c] = sum_dy_xhat;
}

/* out[c] = scale * sum_{g < groups} partial[g, c], the chunks in index order. */
__kernel void reduce_partials(const int groups, const int channels, const REAL scale,
                              __global const REAL *partial, __global REAL *out)
{
    const int c = get_global_id(0);
    if (c >= channels) return;
    REAL acc = (REAL)0;
    for (int g = 0; g < groups; ++g)
        acc += partial[g * channels + c];
    out[c] = acc * scale;
}

/* inv_std[c] = 1 / sqrt(var[c] + eps) */
__kernel void inverse_std(const int channels, const REAL eps, __global const REAL *var, __global REAL *inv_std)
{
    const int c = get_global_id(0);
    if (c >= channels) return;
    inv_std[c] = (REAL)1 / sqrt(var[c] + eps);
}

/* The batch-norm input gradient at row r, channel c:
 *     d = gamma * inv_std * (dy - [r < corrected] * (dbeta + x_hat * dgamma) / count)
 * (corrected = 0 with running statistics: the layer is then affine), x_hat from src as in
 * bn_grad_partials. Written to out[offset_out[r] + c*ostride], or added there when accumulate. */
__kernel void bn_backward_scatter(const int rows, const int channels, const int cstride,
                                  __global const int *offset, __global const REAL *src,
                                  __global const REAL *mean, __global const REAL *inv_std,
                                  __global const REAL *gamma, __global const REAL *dy,
                                  __global const REAL *dbeta, __global const REAL *dgamma,
                                  const int corrected, const REAL inv_count,
                                  __global const int *offset_out, const int ostride, const int accumulate,
                                  __global REAL *out)
{
    const int c = get_global_id(0);
    const int r = get_global_id(1);
    if (c >= channels || r >= rows) return;
    REAL d = dy[r * channels + c];
    if (r < corrected) {
        const REAL x_hat = (src[offset[r] + c * cstride] - mean[c]) * inv_std[c];
        d -= (dbeta[c] + x_hat * dgamma[c]) * inv_count;
    }
    d *= gamma[c] * inv_std[c];
    const int o = offset_out[r] + c * ostride;
    out[o] = accumulate ? out[o] + d : d;
}

/* partial[g, m, c*taps + t] = sum over rows r of chunk g of dout[r, m] * src[table[r, t], c]: the
 * chunk's share of the weight gradient (K, C, kh*kw), the layout of the layer's weights. Global size
 * (taps * ceil(cin / CB), ceil(cout / BM), chunks): a work-item holds BM output channels of CB input
 * channels of one tap as CB vectors, so each dout vector loaded serves CB input channels (a scalar
 * loop for the partial blocks at the ends). */
#define CB 4
__kernel void weight_grad_partials(const int rows, const int taps, const int cin, const int cout,
                                   const int chunk, __global const int *table,
                                   __global const REAL *src, __global const REAL *dout,
                                   __global REAL *partial)
{
    const int t = get_global_id(0) % taps;
    const int c0 = get_global_id(0) / taps * CB;
    const int m0 = get_global_id(1) * BM;
    const int g = get_global_id(2);
    const int start = g * chunk;
    if (c0 >= cin || m0 >= cout || start >= rows) return;
    const int stop = min(rows, start + chunk);
    const int block = min(BM, cout - m0);
    const int cblock = min(CB, cin - c0);
    REAL acc[CB][BM];
    if (block == BM && cblock == CB) {  /* whole vectors: the fast path */
        REALV sum0 = (REALV)0, sum1 = (REALV)0, sum2 = (REALV)0, sum3 = (REALV)0;
        for (int r = start; r < stop; ++r) {
            const int s = table[r * taps + t];
            if (s < 0) continue;
            const REALV d = VLOAD(0, dout + (size_t)r * cout + m0);
            __global const REAL *v = src + (size_t)s * cin + c0;
            sum0 += d * v[0];
            sum1 += d * v[1];
            sum2 += d * v[2];
            sum3 += d * v[3];
        }
        VSTORE(sum0, 0, acc[0]);
        VSTORE(sum1, 0, acc[1]);
        VSTORE(sum2, 0, acc[2]);
        VSTORE(sum3, 0, acc[3]);
    } else {
        for (int k = 0; k < CB; ++k)
            for (int i = 0; i < BM; ++i) acc[k][i] = (REAL)0;
        for (int r = start; r < stop; ++r) {
            const int s = table[r * taps + t];
            if (s < 0) continue;
            __global const REAL *d = dout + (size_t)r * cout + m0;
            for (int k = 0; k < cblock; ++k) {
                const REAL v = src[(size_t)s * cin + c0 + k];
                for (int i = 0; i < block; ++i) acc[k][i] += d[i] * v;
            }
        }
    }
    for (int k = 0; k < cblock; ++k)
        for (int i = 0; i < block; ++i)
            partial[((size_t)g * cout + m0 + i) * cin * taps + (c0 + k) * taps + t] = acc[k][i];
}
