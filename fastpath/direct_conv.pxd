# Declarations of fastpath/direct_conv.h for the Cython modules that call its kernels
# (_cython_unit.pyx, _cython_conv.pyx): one place, so that the struct and signatures cannot drift.

from libc.stdint cimport int32_t, int64_t

cdef extern from "direct_conv.h" nogil:
    int PONDER_ROWS
    ctypedef struct ponder_epilogue:
        const float *bias
        const float *addend
        const float *center
        const float *scale
        const float *shift
        const int64_t *out_rows
    ponder_epilogue ponder_epilogue_none()
    void ponder_direct_conv_rows_f32(const float *src, int64_t c_count, const int32_t *rowmap, const int64_t *pos,
                                     const int64_t *tapoff, int64_t taps, const float *wt, int64_t k_count,
                                     const ponder_epilogue *ep, const float *zero_row, float *out,
                                     int64_t r0, int64_t r1)
    void ponder_direct_weight_grad_f32(const float *src, int64_t c_count, const int32_t *rowmap,
                                       const int64_t *pos, const int64_t *tapoff, int64_t taps,
                                       const float *dout, int64_t k_count, float *dwt, int64_t r0, int64_t r1)
