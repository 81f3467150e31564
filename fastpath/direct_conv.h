/* Direct convolution on channels-last rows for float32: a register-blocked micro-kernel.
 *
 * The row convolution of fastpath/_cython_unit.pyx computes, for every output row r,
 *
 *     out[r, k] = bias[k] + sum_t sum_c src[rowmap[pos[r] + tapoff[t]], c] * W[k, t, c]
 *
 * (a map entry of -1 reads zeros). The general path gathers the windows into a column buffer and
 * calls BLAS; for the small channel counts of CIFAR ResNets (C, K <= 64) that GEMM is skinny, and
 * the gathered buffer is copied twice (once by the gather, once by BLAS packing it). This kernel
 * reads the source rows in place instead: a tile of ROWS output rows x 16 (or 8) output channels
 * is held in vector registers while the loop runs over taps and input channels, each step
 * broadcasting one input value per row and multiplying it by a vector of 16 weights. Weights are
 * laid out (T C, K), so that vector is contiguous.
 *
 * With one output channel (K = 1, the halting heads) there is nothing to hold across outputs; the
 * kernel then vectorises each window's dot product over the input channels instead.
 *
 * SIMD is chosen when the library is loaded, not when it is compiled: with GCC on x86-64 Linux the
 * kernel is built three times (x86-64-v4 = AVX-512, x86-64-v3 = AVX2 + FMA, and the baseline
 * SSE2) through function multiversioning (target_clones), and the loader picks the best the CPU
 * has. One portable wheel therefore uses AVX2/FMA where present without -march=native. Other
 * compilers build the baseline only.
 *
 * A finished output is completed before it is stored for good (ponder_epilogue): the bias, a
 * residual row added (the unit's shortcut, or a halting head's global term) and the next batch
 * norm with its ReLU, each saving a pass over the outputs. Output row r may
 * be stored at another row, out_rows[r] (a sparse unit adds its residual in place onto the rows
 * of its active positions: the store is the scatter).
 *
 * Rounding: the sums run in float32 in tap-major, channel-minor order (with fused multiply-adds
 * where the CPU has them), not in BLAS's order; both agree with the float64 reference within the
 * float32 tolerance of docs/spec.md section 11.1.
 */
#ifndef PONDER_DIRECT_CONV_H
#define PONDER_DIRECT_CONV_H

#include <stdint.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && __GNUC__ >= 11
#define PONDER_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PONDER_MULTIVERSION
#endif

#if defined(__GNUC__)
#define PONDER_HAVE_VECTORS 1
/* eight floats; aligned(4) allows loads and stores at any float address */
typedef float ponder_v8 __attribute__((vector_size(32), aligned(4)));
#else
#define PONDER_HAVE_VECTORS 0
#endif

/* output rows held in registers at once: ROWS x 2 accumulators of 8 floats, plus two weight
 * vectors and a broadcast, fit the 16 vector registers of AVX2 */
#define PONDER_ROWS 6

/* Source rows of the ROWS windows at tap t: a row of src, or zero_row where the map says -1 (and
 * for the rows past r1 in the last, partial tile). */
static inline void ponder_tap_rows(const float *src, int64_t c_count, const int32_t *rowmap, const int64_t *pos,
                                   int64_t offset, const float *zero_row, int64_t r, int64_t rows_here,
                                   const float **rows)
{
    for (int64_t i = 0; i < PONDER_ROWS; ++i) {
        int32_t q = i < rows_here ? rowmap[pos[r + i] + offset] : -1;
        rows[i] = q >= 0 ? src + (int64_t)q * c_count : zero_row;
    }
}

/* What is done to a finished output value of the row stored at `row`, output channel k: + bias[k]
 * and + addend[row, k] (a residual) while it is still in a register (ponder_sum8, ponder_sum1),
 * then, once stored, batch norm and ReLU in place (ponder_finish). Fusing these
 * saves a pass over the outputs each. The addend is read before the output is written, so it may
 * be the output array itself. */
typedef struct {
    const float *bias;      /* (K,) or NULL */
    const float *addend;    /* rows added to the outputs, indexed like the stored rows, or NULL; it may
                             * be the output array itself (an in-place residual add: every output
                             * element is read, then written, by the one thread that computes it) */
    const float *center;    /* (K,) batch norm + ReLU of the outputs: max(0, (v - center) scale + shift), */
    const float *scale;     /* or NULL for none */
    const float *shift;
    const int64_t *out_rows; /* (R,) the row of out (and of addend) that output row r is stored at, or
                              * NULL for row r itself */
} ponder_epilogue;

/* An epilogue that does nothing (every field NULL): callers start from it and set what they use,
 * so a field added later is never left uninitialised. */
static inline ponder_epilogue ponder_epilogue_none(void)
{
    ponder_epilogue ep = {0};
    return ep;
}

static inline int64_t ponder_out_row(const ponder_epilogue *ep, int64_t r)
{
    return ep->out_rows ? ep->out_rows[r] : r;
}

static inline float ponder_sum1(const ponder_epilogue *ep, float v, int64_t row, int64_t k_count, int64_t k)
{
    if (ep->bias)
        v += ep->bias[k];
    if (ep->addend)
        v += ep->addend[row * k_count + k];
    return v;
}

#if PONDER_HAVE_VECTORS
static inline ponder_v8 ponder_sum8(const ponder_epilogue *ep, ponder_v8 v, int64_t row, int64_t k_count,
                                    int64_t k0)
{
    if (ep->bias)
        v += *(const ponder_v8 *)(ep->bias + k0);
    if (ep->addend)
        v += *(const ponder_v8 *)(ep->addend + row * k_count + k0);
    return v;
}
#endif

static inline void ponder_finish(float *o, int64_t n, const ponder_epilogue *ep, int64_t k0)
{
    if (ep->center)
        for (int64_t j = 0; j < n; ++j) {
            float v = (o[j] - ep->center[k0 + j]) * ep->scale[k0 + j] + ep->shift[k0 + j];
            o[j] = v > 0.0f ? v : 0.0f;
        }
}

PONDER_MULTIVERSION
static void ponder_direct_conv_rows_f32(const float *src, int64_t c_count, const int32_t *rowmap, const int64_t *pos,
                                        const int64_t *tapoff, int64_t taps, const float *wt, int64_t k_count,
                                        const ponder_epilogue *ep, const float *zero_row, float *out,
                                        int64_t r0, int64_t r1)
{
    const float *rows[PONDER_ROWS];
#if PONDER_HAVE_VECTORS
    if (k_count == 1 && c_count >= 8) {
        /* one output channel (a halting head's local term): a dot product of each window with the
         * weights, vectorised over the input channels instead of over the outputs; four rows at a
         * time with two accumulators each, so that eight independent chains of multiply-adds
         * overlap (one row waits on its map lookups and on the latency of its chain) */
        int64_t r = r0;
        for (; r + 4 <= r1; r += 4) {
            ponder_v8 acc[4][2];
            float sum[4];
            for (int i = 0; i < 4; ++i) {
                acc[i][0] = acc[i][1] = (ponder_v8){0, 0, 0, 0, 0, 0, 0, 0};
                sum[i] = 0.0f;
            }
            for (int64_t t = 0; t < taps; ++t) {
                const float *x[4];
                for (int i = 0; i < 4; ++i) {
                    int32_t q = rowmap[pos[r + i] + tapoff[t]];
                    x[i] = q >= 0 ? src + (int64_t)q * c_count : zero_row;
                }
                const float *w = wt + t * c_count;
                int64_t c = 0;
                for (; c + 16 <= c_count; c += 16) {
                    ponder_v8 w0 = *(const ponder_v8 *)(w + c), w1 = *(const ponder_v8 *)(w + c + 8);
                    for (int i = 0; i < 4; ++i) {
                        acc[i][0] += *(const ponder_v8 *)(x[i] + c) * w0;
                        acc[i][1] += *(const ponder_v8 *)(x[i] + c + 8) * w1;
                    }
                }
                for (; c + 8 <= c_count; c += 8) {
                    ponder_v8 wv = *(const ponder_v8 *)(w + c);
                    for (int i = 0; i < 4; ++i)
                        acc[i][0] += *(const ponder_v8 *)(x[i] + c) * wv;
                }
                for (; c < c_count; ++c)
                    for (int i = 0; i < 4; ++i)
                        sum[i] += x[i][c] * w[c];
            }
            for (int i = 0; i < 4; ++i) {
                ponder_v8 both = acc[i][0] + acc[i][1];
                for (int lane = 0; lane < 8; ++lane)
                    sum[i] += both[lane];
                int64_t row = ponder_out_row(ep, r + i);
                out[row] = ponder_sum1(ep, sum[i], row, 1, 0);
                ponder_finish(out + row, 1, ep, 0);
            }
        }
        for (; r < r1; ++r) {
            ponder_v8 acc = {0, 0, 0, 0, 0, 0, 0, 0};
            float tail = 0.0f;
            for (int64_t t = 0; t < taps; ++t) {
                int32_t q = rowmap[pos[r] + tapoff[t]];
                if (q < 0)
                    continue;
                const float *x = src + (int64_t)q * c_count, *w = wt + t * c_count;
                int64_t c = 0;
                for (; c + 8 <= c_count; c += 8)
                    acc += *(const ponder_v8 *)(x + c) * *(const ponder_v8 *)(w + c);
                for (; c < c_count; ++c)
                    tail += x[c] * w[c];
            }
            float total = tail;
            for (int lane = 0; lane < 8; ++lane)
                total += acc[lane];
            int64_t row = ponder_out_row(ep, r);
            out[row] = ponder_sum1(ep, total, row, 1, 0);
            ponder_finish(out + row, 1, ep, 0);
        }
        return;
    }
#endif
    for (int64_t r = r0; r < r1; r += PONDER_ROWS) {
        int64_t rows_here = r1 - r < PONDER_ROWS ? r1 - r : PONDER_ROWS;
        int64_t k0 = 0;
#if PONDER_HAVE_VECTORS
        for (; k0 + 16 <= k_count; k0 += 16) {
            ponder_v8 acc[PONDER_ROWS][2];
            for (int64_t i = 0; i < PONDER_ROWS; ++i)
                acc[i][0] = acc[i][1] = (ponder_v8){0, 0, 0, 0, 0, 0, 0, 0};
            for (int64_t t = 0; t < taps; ++t) {
                ponder_tap_rows(src, c_count, rowmap, pos, tapoff[t], zero_row, r, rows_here, rows);
                const float *w = wt + t * c_count * k_count + k0;
                for (int64_t c = 0; c < c_count; ++c) {
                    ponder_v8 w0 = *(const ponder_v8 *)(w + c * k_count);
                    ponder_v8 w1 = *(const ponder_v8 *)(w + c * k_count + 8);
                    for (int64_t i = 0; i < PONDER_ROWS; ++i) {
                        float x = rows[i][c];
                        acc[i][0] += x * w0;
                        acc[i][1] += x * w1;
                    }
                }
            }
            for (int64_t i = 0; i < rows_here; ++i) {
                int64_t row = ponder_out_row(ep, r + i);
                float *o = out + row * k_count + k0;
                *(ponder_v8 *)o = ponder_sum8(ep, acc[i][0], row, k_count, k0);
                *(ponder_v8 *)(o + 8) = ponder_sum8(ep, acc[i][1], row, k_count, k0 + 8);
                ponder_finish(o, 16, ep, k0);
            }
        }
        for (; k0 + 8 <= k_count; k0 += 8) {
            ponder_v8 acc[PONDER_ROWS];
            for (int64_t i = 0; i < PONDER_ROWS; ++i)
                acc[i] = (ponder_v8){0, 0, 0, 0, 0, 0, 0, 0};
            for (int64_t t = 0; t < taps; ++t) {
                ponder_tap_rows(src, c_count, rowmap, pos, tapoff[t], zero_row, r, rows_here, rows);
                const float *w = wt + t * c_count * k_count + k0;
                for (int64_t c = 0; c < c_count; ++c) {
                    ponder_v8 w0 = *(const ponder_v8 *)(w + c * k_count);
                    for (int64_t i = 0; i < PONDER_ROWS; ++i)
                        acc[i] += rows[i][c] * w0;
                }
            }
            for (int64_t i = 0; i < rows_here; ++i) {
                int64_t row = ponder_out_row(ep, r + i);
                float *o = out + row * k_count + k0;
                *(ponder_v8 *)o = ponder_sum8(ep, acc[i], row, k_count, k0);
                ponder_finish(o, 8, ep, k0);
            }
        }
#endif
        /* the last k_count % 8 channels (all of them without vector support), one at a time */
        for (; k0 < k_count; ++k0) {
            float acc[PONDER_ROWS] = {0};
            for (int64_t t = 0; t < taps; ++t) {
                ponder_tap_rows(src, c_count, rowmap, pos, tapoff[t], zero_row, r, rows_here, rows);
                const float *w = wt + t * c_count * k_count + k0;
                for (int64_t c = 0; c < c_count; ++c)
                    for (int64_t i = 0; i < PONDER_ROWS; ++i)
                        acc[i] += rows[i][c] * w[c * k_count];
            }
            for (int64_t i = 0; i < rows_here; ++i) {
                int64_t row = ponder_out_row(ep, r + i);
                out[row * k_count + k0] = ponder_sum1(ep, acc[i], row, k_count, k0);
                ponder_finish(out + row * k_count + k0, 1, ep, k0);
            }
        }
    }
}


/* The weight gradient of the row convolution, float32, one thread's share of the rows:
 *
 *     dwt[t C + c, k] += sum_{r in [r0, r1)} src[rowmap[pos[r] + tapoff[t]], c] * dout[r, k]
 *
 * (dwt has the forward's (T C, K) layout, the output channels contiguous). The sum over rows is
 * the long one, so the register tile is now a block of the gradient itself, ROWS input channels
 * x 16 (or 8) output channels, held while the loop runs over rows: each row broadcasts ROWS
 * source values and multiplies them by a vector of 16 output gradients. Rows are taken in blocks
 * small enough to stay in cache while every tap and channel block passes over them. */
#define PONDER_DW_BLOCK 256

#if PONDER_HAVE_VECTORS
/* One cn x (8 nv) block of dW^T (input channels c0 .. c0 + cn, output channels k0 .. k0 + 8 nv,
 * nv = 1 or 2) summed over the rows b0 .. b1. Always inlined with constant cn and nv, so every
 * loop is unrolled and the accumulators are registers. */
static inline __attribute__((always_inline)) void
ponder_dw_tile(const float *src, int64_t c_count, const int32_t *source, int64_t b0, int64_t b1, const float *dout,
               int64_t k_count, int64_t k0, int64_t c0, const int cn, const int nv, float *d)
{
    ponder_v8 acc[PONDER_ROWS][2];
    for (int i = 0; i < cn; ++i)
        for (int v = 0; v < nv; ++v)
            acc[i][v] = (ponder_v8){0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t r = b0; r < b1; ++r) {
        int32_t q = source[r - b0];
        if (q < 0)
            continue;
        const float *x = src + (int64_t)q * c_count + c0;
        ponder_v8 g[2];
        for (int v = 0; v < nv; ++v)
            g[v] = *(const ponder_v8 *)(dout + r * k_count + k0 + 8 * v);
        for (int i = 0; i < cn; ++i)
            for (int v = 0; v < nv; ++v)
                acc[i][v] += x[i] * g[v];
    }
    for (int i = 0; i < cn; ++i)
        for (int v = 0; v < nv; ++v)
            *(ponder_v8 *)(d + i * k_count + k0 + 8 * v) += acc[i][v];
}

/* ponder_dw_tile with the block height as a constant (the switch is outside the row loop) */
static inline __attribute__((always_inline)) void
ponder_dw_tiles(const float *src, int64_t c_count, const int32_t *source, int64_t b0, int64_t b1, const float *dout,
                int64_t k_count, int64_t k0, int64_t c0, int64_t cn, const int nv, float *d)
{
    switch (cn) {
    case 6: ponder_dw_tile(src, c_count, source, b0, b1, dout, k_count, k0, c0, 6, nv, d); break;
    case 5: ponder_dw_tile(src, c_count, source, b0, b1, dout, k_count, k0, c0, 5, nv, d); break;
    case 4: ponder_dw_tile(src, c_count, source, b0, b1, dout, k_count, k0, c0, 4, nv, d); break;
    case 3: ponder_dw_tile(src, c_count, source, b0, b1, dout, k_count, k0, c0, 3, nv, d); break;
    case 2: ponder_dw_tile(src, c_count, source, b0, b1, dout, k_count, k0, c0, 2, nv, d); break;
    default: ponder_dw_tile(src, c_count, source, b0, b1, dout, k_count, k0, c0, 1, nv, d); break;
    }
}
#endif

PONDER_MULTIVERSION
static void ponder_direct_weight_grad_f32(const float *src, int64_t c_count, const int32_t *rowmap,
                                          const int64_t *pos, const int64_t *tapoff, int64_t taps,
                                          const float *dout, int64_t k_count, float *dwt, int64_t r0, int64_t r1)
{
    int32_t source[PONDER_DW_BLOCK];
    for (int64_t b0 = r0; b0 < r1; b0 += PONDER_DW_BLOCK) {
        int64_t b1 = r1 - b0 < PONDER_DW_BLOCK ? r1 : b0 + PONDER_DW_BLOCK;
        for (int64_t t = 0; t < taps; ++t) {
            /* the source row of every row's tap t, looked up once for all channel blocks */
            for (int64_t r = b0; r < b1; ++r)
                source[r - b0] = rowmap[pos[r] + tapoff[t]];
            for (int64_t c0 = 0; c0 < c_count; c0 += PONDER_ROWS) {
                int64_t cn = c_count - c0 < PONDER_ROWS ? c_count - c0 : PONDER_ROWS;
                float *d = dwt + (t * c_count + c0) * k_count;
                int64_t k0 = 0;
#if PONDER_HAVE_VECTORS
                for (; k0 + 16 <= k_count; k0 += 16)
                    ponder_dw_tiles(src, c_count, source, b0, b1, dout, k_count, k0, c0, cn, 2, d);
                for (; k0 + 8 <= k_count; k0 += 8)
                    ponder_dw_tiles(src, c_count, source, b0, b1, dout, k_count, k0, c0, cn, 1, d);
#endif
                /* the last k_count % 8 output channels (all of them without vector support) */
                for (; k0 < k_count; ++k0) {
                    float acc[PONDER_ROWS] = {0};
                    for (int64_t r = b0; r < b1; ++r) {
                        int32_t q = source[r - b0];
                        if (q < 0)
                            continue;
                        const float *x = src + (int64_t)q * c_count + c0;
                        float g = dout[r * k_count + k0];
                        for (int64_t i = 0; i < cn; ++i)
                            acc[i] += x[i] * g;
                    }
                    for (int64_t i = 0; i < cn; ++i)
                        d[i * k_count + k0] += acc[i];
                }
            }
        }
    }
}

#endif
