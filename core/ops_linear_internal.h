/* The kernels behind LOOM_PATH_BF16, shared between ops_linear.c and
 * ops_linear_amx.c, and a switch that pins one of them so that tests and
 * benchmarks can run every fallback on a machine that has the fastest one.
 * Not part of the public API. */
#ifndef LOOM_OPS_LINEAR_INTERNAL_H
#define LOOM_OPS_LINEAR_INTERNAL_H

#include <immintrin.h>
#include <stdbool.h>
#include <stdint.h>

#include "ops_blas.h"
#include "tensor.h"

/* How loom_linear multiplies many rows of x by a 16-bit weight on
 * LOOM_PATH_BF16, fastest first. Each falls back to the next one when the
 * CPU (or the kernel, for AMX) does not support it.
 * NOTE: the AMX and AVX512-BF16 kernels flush subnormal inputs and
 * subnormal sums to zero (the instructions do, measured on Sapphire
 * Rapids), where the f32 route keeps them. */
typedef enum loom_bf16_kernel {
    LOOM_BF16_KERNEL_AUTO = 0,   /* the fastest one available */
    LOOM_BF16_KERNEL_AMX,        /* AMX-BF16 tiles (TDPBF16PS) */
    LOOM_BF16_KERNEL_AVX512BF16, /* AVX512-BF16 dot products (vdpbf16ps) */
    LOOM_BF16_KERNEL_F32,        /* the weight widened to f32 for sgemm, as LOOM_PATH_F32 */
} loom_bf16_kernel;

/* Pin the kernel that LOOM_PATH_BF16 starts from (AUTO restores the
 * default). A pinned kernel the machine lacks still falls back. Meant for
 * tests and benchmarks: it is process-wide and takes effect on the next call. */
void loom_linear_pin_bf16_kernel(loom_bf16_kernel kernel);
/* The kernel that LOOM_PATH_BF16 uses now, after the pin and the fallbacks;
 * never AUTO. */
loom_bf16_kernel loom_linear_bf16_kernel(void);

/* Whether this CPU has AMX-BF16 and the Linux kernel granted this process
 * the tile data state. The request is made once, on the first call. */
bool loom_amx_bf16_usable(void);

/* c (M, N) = x (M, K) @ w^T + bias with AMX-BF16: x is rounded to bf16 (and
 * an f16 weight too), products are summed in f32. x is the sgemm operand
 * *xm with M = xm->rows and K = xm->cols; w is (N, K) bf16 or f16 with unit
 * inner stride and ldw elements between rows; bias (N) may be NULL. The
 * caller has checked loom_amx_bf16_usable(). Fails only when memory runs out. */
int loom_linear_amx(float *c, const loom_blas_mat *xm, const uint16_t *w, int64_t ldw,
                    loom_dtype wdtype, int64_t n_out, const float *bias);

/* Rows of x up to which loom_linear_amx_few serves LOOM_PATH_BF16. */
#define LOOM_AMX_FEW_MAX_ROWS 16

/* The same product for up to LOOM_AMX_FEW_MAX_ROWS rows of x and a bf16
 * weight, for decoding one sequence or a batch of them. The weight is read
 * in place, in one pass, with its rows as the tile rows and the rows of x
 * (rounded to bf16) as the tile columns. Every output element is the sum
 * that loom_linear_amx forms for it, bias first and then k in steps of 32.
 * So a row of x gets the same bits from either kernel, whatever other rows
 * come with it. */
int loom_linear_amx_few(float *c, const loom_blas_mat *xm, const uint16_t *w, int64_t ldw,
                        int64_t n_out, const float *bias);

/* Transpose a 16x16 block of 32-bit words: col[c] receives word c of
 * row[0..15]. Three stages (32-bit, 64-bit, 128-bit lanes) of shuffles. */
__attribute__((target("avx512f"))) static inline void transpose16x16(const __m512i row[16],
                                                                    __m512i col[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(row[2 * i], row[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(row[2 * i], row[2 * i + 1]);
    }
    /* u[4g + c] contains words c, c + 4, c + 8, c + 12 of rows 4g .. 4g + 3, one per 128-bit lane. */
    for (int g = 0; g < 4; g++) {
        u[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
        u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
    for (int c = 0; c < 4; c++) {
        __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88);
        __m512i v1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xdd);
        __m512i v2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
        __m512i v3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xdd);
        col[c] = _mm512_shuffle_i32x4(v0, v2, 0x88);
        col[c + 8] = _mm512_shuffle_i32x4(v0, v2, 0xdd);
        col[c + 4] = _mm512_shuffle_i32x4(v1, v3, 0x88);
        col[c + 12] = _mm512_shuffle_i32x4(v1, v3, 0xdd);
    }
}

#endif
