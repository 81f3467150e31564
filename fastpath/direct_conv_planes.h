/* Direct float32 kernels for CythonBackend's convolutions on channels-last rows, planes out.
 *
 * CythonBackend computes a float32 convolution on rows (fastpath/_cython_conv.pyx,
 * conv_rows_to_planes): rows (R, C) with the channels contiguous and a map over the zero-padded
 * grid holding the row of every position (-1 reads zeros), as in direct_conv.h. This header adds
 * the forward for CPUs with AVX2 and FMA and channel counts that are multiples of 16
 * (ponder_planes_supported says whether it applies): ponder_conv_planes_f32, the forward of one
 * sample, out[k, p] = bias[k] + sum_t sum_c src[rowmap[pos[p] + tapoff[t]], c] wt[t C + c, k]:
 * direct_conv.h's tile of 6 rows x 16 output channels held in registers, but stored transposed,
 * straight into the compact NCHW layout (K, width) the backend returns, instead of row-major rows
 * that would need a pass to transpose. (The weight gradient is direct_conv.h's.)
 *
 * Its tiles are compiled for x86-64-v3 (AVX2 + FMA) through a target attribute and entered only
 * when the CPU has it (__builtin_cpu_supports). Where the CPU has AVX-512VL, blocks of 32 output
 * channels take a 6 x 32 forward tile of 8-float vectors in AVX-512's 32 registers (about 5 %
 * faster on 32 channels on the machine this was tuned on, AMD Zen 4). 512-bit vectors are not
 * used: Zen 4 runs them as two 256-bit halves, and 16-float tiles were no faster (for 16 channels
 * slower); nor is a 12 x 16 tile, slower than 6 x 16 (more of its rows fall in a sample's last,
 * partial tile). Elsewhere (another compiler or architecture) the caller runs
 * direct_conv.h's kernel and a transposition, or the gather and BLAS path.
 *
 * Rounding: sums in float32 with fused multiply-adds, tap-major and channel-minor like
 * direct_conv.h (a tap whose rows are all missing is skipped: it would add only zeros).
 */
#ifndef PONDER_DIRECT_CONV_PLANES_H
#define PONDER_DIRECT_CONV_PLANES_H

#include <stdint.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 11
#define PONDER_PLANES_AVX2 1
typedef float ponder_pv __attribute__((vector_size(32), aligned(4)));
#define PONDER_PLANES_ROWS 6

/* rows p .. p + rows_here of one sample, output channels k0 .. k0 + 8 nv (nv = 2 or 4 vectors of
 * 8), stored into out (K, width). Always inlined with a constant nv into the two entry points
 * below, each compiled for its instruction set. */
static inline __attribute__((always_inline)) void ponder_planes_tile_body(
    const float *src, int64_t c_count, const int32_t *rowmap, const int64_t *pos, const int64_t *tapoff,
    int64_t taps, const float *wt, int64_t k_count, int64_t k0, const float *bias, const float *zero_row,
    float *out, int64_t width, int64_t p, int64_t rows_here, const int nv)
{
    ponder_pv acc[PONDER_PLANES_ROWS][4];
    const float *rows[PONDER_PLANES_ROWS];
    for (int i = 0; i < PONDER_PLANES_ROWS; ++i)
        for (int v = 0; v < nv; ++v)
            acc[i][v] = (ponder_pv){0};
    for (int64_t t = 0; t < taps; ++t) {
        int present = 0;
        for (int i = 0; i < PONDER_PLANES_ROWS; ++i) {
            int32_t q = i < rows_here ? rowmap[pos[p + i] + tapoff[t]] : -1;
            rows[i] = q >= 0 ? src + (int64_t)q * c_count : zero_row;
            present |= q >= 0;
        }
        if (!present) /* the whole tile reads zeros here (padding, or a gradient the plan skipped) */
            continue;
        const float *w = wt + t * c_count * k_count + k0;
        for (int64_t c = 0; c < c_count; ++c) {
            ponder_pv wv[4];
            for (int v = 0; v < nv; ++v)
                wv[v] = *(const ponder_pv *)(w + c * k_count + 8 * v);
            for (int i = 0; i < PONDER_PLANES_ROWS; ++i) {
                float x = rows[i][c];
                for (int v = 0; v < nv; ++v)
                    acc[i][v] += x * wv[v];
            }
        }
    }
    for (int v = 0; v < nv; ++v)
        for (int l = 0; l < 8; ++l) {
            float b = bias[k0 + 8 * v + l];
            float *o = out + (k0 + 8 * v + l) * width + p;
            for (int i = 0; i < rows_here; ++i)
                o[i] = acc[i][v][l] + b;
        }
}

/* the tile 16 output channels wide (AVX2 + FMA: 12 sums, two weight vectors and a broadcast fill
 * the 16 vector registers) */
static __attribute__((target("arch=x86-64-v3"))) void ponder_planes_tile(
    const float *src, int64_t c_count, const int32_t *rowmap, const int64_t *pos, const int64_t *tapoff,
    int64_t taps, const float *wt, int64_t k_count, int64_t k0, const float *bias, const float *zero_row,
    float *out, int64_t width, int64_t p, int64_t rows_here)
{
    ponder_planes_tile_body(src, c_count, rowmap, pos, tapoff, taps, wt, k_count, k0, bias, zero_row, out, width, p,
                            rows_here, 2);
}

/* The same tile 32 output channels wide, for CPUs with AVX-512VL: 6 rows x 4 vectors of sums in
 * AVX-512's 32 vector registers (still 8-float vectors), so that each broadcast input value feeds
 * 4 multiply-adds instead of 2 (fewer loads per multiply-add) */
static __attribute__((target("arch=x86-64-v4"))) void ponder_planes_tile32(
    const float *src, int64_t c_count, const int32_t *rowmap, const int64_t *pos, const int64_t *tapoff,
    int64_t taps, const float *wt, int64_t k_count, int64_t k0, const float *bias, const float *zero_row,
    float *out, int64_t width, int64_t p, int64_t rows_here)
{
    ponder_planes_tile_body(src, c_count, rowmap, pos, tapoff, taps, wt, k_count, k0, bias, zero_row, out, width, p,
                            rows_here, 4);
}

#else
#define PONDER_PLANES_AVX2 0
#endif

/* Whether the kernels below run here for these channel counts (else they must not be called). */
static int ponder_planes_supported(int64_t c_count, int64_t k_count)
{
#if PONDER_PLANES_AVX2
    return c_count % 16 == 0 && k_count % 16 == 0 && c_count > 0 && k_count > 0 &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    (void)c_count; (void)k_count;
    return 0;
#endif
}

/* Rows 0 .. count of one sample (positions pos, map rowmap) into out (K, width), bias added;
 * the slots count .. width are left as they are. Only where ponder_planes_supported(C, K). */
static void ponder_conv_planes_f32(const float *src, int64_t c_count, const int32_t *rowmap, const int64_t *pos,
                                   const int64_t *tapoff, int64_t taps, const float *wt, int64_t k_count,
                                   const float *bias, const float *zero_row, float *out, int64_t width, int64_t count)
{
#if PONDER_PLANES_AVX2
    int64_t k0 = 0;
    if (__builtin_cpu_supports("avx512vl"))
        for (; k0 + 32 <= k_count; k0 += 32)
            for (int64_t p = 0; p < count; p += PONDER_PLANES_ROWS)
                ponder_planes_tile32(src, c_count, rowmap, pos, tapoff, taps, wt, k_count, k0, bias, zero_row, out,
                                     width, p, count - p < PONDER_PLANES_ROWS ? count - p : PONDER_PLANES_ROWS);
    for (; k0 + 16 <= k_count; k0 += 16)
        for (int64_t p = 0; p < count; p += PONDER_PLANES_ROWS)
            ponder_planes_tile(src, c_count, rowmap, pos, tapoff, taps, wt, k_count, k0, bias, zero_row, out, width,
                               p, count - p < PONDER_PLANES_ROWS ? count - p : PONDER_PLANES_ROWS);
#else
    (void)src; (void)c_count; (void)rowmap; (void)pos; (void)tapoff; (void)taps; (void)wt; (void)k_count;
    (void)bias; (void)zero_row; (void)out; (void)width; (void)count;
#endif
}

#endif
