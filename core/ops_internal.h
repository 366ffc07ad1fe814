/* Helpers shared by the operator files (core/ops_*.c), not part of the public
 * API: argument checks, the "out" convention of ops.h, element loads and
 * stores for every dtype, row conversion to f32, and a strided iterator. */
#ifndef LOOM_OPS_INTERNAL_H
#define LOOM_OPS_INTERNAL_H

#include <math.h>
#include <string.h>

#include "ops.h"

#if defined(__F16C__)
#include <immintrin.h> /* _cvtsh_ss, _cvtss_sh */
#endif

/* Operators split their rows over OpenMP threads only when the tensor has at
 * least this many elements, because smaller ones finish before threads start. */
#define LOOM_PARALLEL_MIN_ELEMS 65536

/* ---- argument checks: each returns LOOM_OK or LOOM_ERR with a message of the
 * form "<op>: '<arg>' ..." */

/* Check that `t` is allocated (storage not NULL) and its view stays inside
 * its storage. */
int loom_check_input(const char *op, const char *arg, const loom_tensor *t);
/* As loom_check_input, and the dtype must be f32, f16 or bf16. */
int loom_check_float_input(const char *op, const char *arg, const loom_tensor *t);
/* Normalise `dim` for a tensor of `ndim` dimensions into *out, or report
 * "<op>: dim D is out of range for a tensor with N dimensions". */
int loom_check_dim(const char *op, int dim, int ndim, int *out);

/* ---- the "out" convention of ops.h
 *
 * Usage:
 *     loom_tensor res;
 *     if (loom_out_begin(&res, out, "softmax", LOOM_F32, x->ndim, x->shape)) return LOOM_ERR;
 *     ... write the result through res ...
 *     return loom_out_end(out, &res, rc);
 *
 * loom_out_begin sets *res to a new contiguous tensor when out->storage is
 * NULL. Otherwise it checks that `out` has this dtype and shape, is
 * contiguous, writable and in bounds, and sets *res to a copy of *out that
 * holds no reference of its own (do not free it). The error names the
 * operator, the expected and the actual shape. */
int loom_out_begin(loom_tensor *res, const loom_tensor *out, const char *op, loom_dtype dtype,
                   int ndim, const int64_t *shape);
/* Finish what loom_out_begin started: when rc is LOOM_OK and `out` was empty,
 * *out takes over the new tensor; when rc is LOOM_ERR a tensor allocated by
 * loom_out_begin is freed, so `out` stays as it was. Returns rc. */
int loom_out_end(loom_tensor *out, loom_tensor *res, int rc);

/* ---- views for broadcasting */

/* Set *dst to src seen with shape (ndim, shape): leading dimensions are added
 * and size-1 dimensions expanded with stride 0, as NumPy broadcasting does.
 * The caller has checked that the shapes are compatible (loom_broadcast_shape).
 * *dst shares src's storage without a reference of its own, so it must not be
 * freed and must not outlive src. */
void loom_broadcast_view(loom_tensor *dst, const loom_tensor *src, int ndim, const int64_t *shape);

/* ---- contiguous f32 inputs */

/* Set *dst (empty on entry) to a contiguous f32 tensor with src's values: a
 * new reference to src when it already is contiguous f32, otherwise a
 * converted copy. Free it with loom_tensor_free. */
int loom_contiguous_f32(loom_tensor *dst, const loom_tensor *src);

/* ---- loads and stores of one element at a byte address */

static inline float loom_bf16_bits_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round f32 to bf16, nearest even, keeping a NaN quiet: the bits of
 * loom_f32_to_bf16, inlined for conversion loops. */
static inline uint16_t loom_f32_bits_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float loom_f16_bits_to_f32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    return loom_f16_to_f32(h);
#endif
}

/* Integer dtypes convert as C converts them to float (exact up to 2^24). */
static inline float loom_load_f32(const void *p, loom_dtype dtype) {
    switch (dtype) {
    case LOOM_F32: return *(const float *)p;
    case LOOM_F16: return loom_f16_bits_to_f32(*(const uint16_t *)p);
    case LOOM_BF16: return loom_bf16_bits_to_f32(*(const uint16_t *)p);
    case LOOM_I32: return (float)*(const int32_t *)p;
    case LOOM_I64: return (float)*(const int64_t *)p;
    case LOOM_U8: return (float)*(const uint8_t *)p;
    default: return 0.0f;
    }
}

static inline double loom_load_f64(const void *p, loom_dtype dtype) {
    switch (dtype) {
    case LOOM_I32: return (double)*(const int32_t *)p;
    case LOOM_I64: return (double)*(const int64_t *)p;
    case LOOM_U8: return (double)*(const uint8_t *)p;
    default: return (double)loom_load_f32(p, dtype);
    }
}

/* Float dtypes truncate toward zero, and NaN or a value outside int64_t
 * gives 0. */
static inline int64_t loom_load_i64(const void *p, loom_dtype dtype) {
    switch (dtype) {
    case LOOM_I32: return *(const int32_t *)p;
    case LOOM_I64: return *(const int64_t *)p;
    case LOOM_U8: return *(const uint8_t *)p;
    default: {
        float f = loom_load_f32(p, dtype);
        if (!(f > -9.2e18f && f < 9.2e18f)) return 0;
        return (int64_t)f;
    }
    }
}

/* Store `v` converted to `dtype`. f16/bf16 round to nearest even. Integer
 * dtypes get v truncated toward zero to int64_t and then wrapped to their
 * width, and NaN or a value outside int64_t gives 0. */
static inline void loom_store_f32(void *p, loom_dtype dtype, float v) {
    switch (dtype) {
    case LOOM_F32: *(float *)p = v; break;
    case LOOM_F16: *(uint16_t *)p = loom_f32_to_f16(v); break;
    case LOOM_BF16: *(uint16_t *)p = loom_f32_to_bf16(v); break;
    case LOOM_I32: *(int32_t *)p = (int32_t)(v > -9.2e18f && v < 9.2e18f ? (int64_t)v : 0); break;
    case LOOM_I64: *(int64_t *)p = (v > -9.2e18f && v < 9.2e18f ? (int64_t)v : 0); break;
    case LOOM_U8: *(uint8_t *)p = (uint8_t)(v > -9.2e18f && v < 9.2e18f ? (int64_t)v : 0); break;
    default: break;
    }
}

static inline void loom_store_i64(void *p, loom_dtype dtype, int64_t v) {
    switch (dtype) {
    case LOOM_I32: *(int32_t *)p = (int32_t)v; break;
    case LOOM_I64: *(int64_t *)p = v; break;
    case LOOM_U8: *(uint8_t *)p = (uint8_t)v; break;
    default: loom_store_f32(p, dtype, (float)v); break;
    }
}

/* ---- exp that the compiler can vectorise
 *
 * glibc's expf is a library call, so loops over it stay scalar. loom_expf is
 * plain arithmetic (Cody-Waite reduction by ln 2, a degree-7 Taylor
 * polynomial, scaling by 2^n in two steps so that subnormal results and
 * overflow to inf come out right), and inside `#pragma omp simd` GCC turns it
 * into vector code. Its error stays below 1 ulp of exp over the float range
 * (tests/c/test_ops_elementwise.c measures it), and NaN gives NaN. */
static inline float loom_expf(float x) {
    const float log2e = 1.44269504088896341f;
    const float ln2_hi = 0.693145751953125f; /* 16 significant bits, so n * ln2_hi is exact */
    const float ln2_lo = 1.42860676533018704e-06f;
    const float round_magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    x = x < -104.0f ? -104.0f : x;         /* exp(-104) is below the smallest subnormal */
    x = x > 89.0f ? 89.0f : x;             /* exp(89) overflows to inf */

    float t = x * log2e + round_magic;
    float n = t - round_magic;
    uint32_t bits;
    memcpy(&bits, &t, sizeof bits);
    int32_t ni = (int32_t)(bits - 0x4B400000u); /* the integer n, from t's low mantissa bits */
    float r = fmaf(-n, ln2_hi, x);
    r = fmaf(-n, ln2_lo, r);

    float p = 1.0f / 5040.0f;
    p = fmaf(p, r, 1.0f / 720.0f);
    p = fmaf(p, r, 1.0f / 120.0f);
    p = fmaf(p, r, 1.0f / 24.0f);
    p = fmaf(p, r, 1.0f / 6.0f);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);

    int32_t n1 = ni >> 1;
    int32_t n2 = ni - n1;
    /* Unsigned shifts, because a NaN input leaves n out of range. */
    uint32_t b1 = (uint32_t)(n1 + 127) << 23;
    uint32_t b2 = (uint32_t)(n2 + 127) << 23;
    float s1, s2;
    memcpy(&s1, &b1, sizeof s1);
    memcpy(&s2, &b2, sizeof s2);
    return p * s1 * s2;
}

/* ---- rows */

/* Convert n elements of `dtype` starting at byte address src, `stride`
 * elements apart, into contiguous floats at dst. */
void loom_row_load_f32(float *dst, const void *src, int64_t n, int64_t stride, loom_dtype dtype);
/* Store n contiguous floats into elements of `dtype` at dst, `stride`
 * elements apart. */
void loom_row_store_f32(void *dst, int64_t stride, loom_dtype dtype, const float *src, int64_t n);

/* ---- strided iteration
 *
 * Walks several tensors of one shape (broadcast them to it first with
 * loom_tensor_expand or by setting strides to 0) row by row, where a row is
 * a run along the innermost dimension left after merging. Dimensions of size
 * 1 are dropped, and neighbouring dimensions are merged when every operand
 * lays them out as one, so contiguous operands give one long row.
 *
 *     const loom_tensor *ops[2] = {&res, x};
 *     loom_iter it;
 *     loom_iter_init(&it, 2, ops, -1);
 *     for (int64_t r = 0; r < it.rows; r++, loom_iter_next(&it)) {
 *         float *o = (float *)it.ptr[0];   // it.stride[0] bytes apart, it.inner elements
 *         ...
 *     }
 *
 * For OpenMP, give each thread its own copy and call loom_iter_seek first. */
#define LOOM_ITER_MAX_OPERANDS 4

typedef struct loom_iter {
    int n;                                          /* operands */
    int ndim;                                       /* outer dimensions after merging */
    int64_t shape[LOOM_MAX_DIMS];                   /* outer dimensions, innermost last */
    int64_t bstride[LOOM_ITER_MAX_OPERANDS][LOOM_MAX_DIMS]; /* outer strides in bytes */
    int64_t index[LOOM_MAX_DIMS];                   /* position in the outer dimensions */
    char *base[LOOM_ITER_MAX_OPERANDS];             /* element 0 of each operand */
    char *ptr[LOOM_ITER_MAX_OPERANDS];              /* first element of the current row */
    int64_t inner;                                  /* elements per row */
    int64_t stride[LOOM_ITER_MAX_OPERANDS];         /* step within a row, in bytes */
    int64_t rows;                                   /* number of rows (0 when numel is 0) */
} loom_iter;

/* Set up iteration over `n` (at most LOOM_ITER_MAX_OPERANDS) tensors with
 * equal shapes and equal numbers of dimensions. Dimension `skip_dim` (none
 * when skip_dim < 0) is left out for every operand, so that a reduction can
 * walk it itself, and only ops[0]'s sizes are read. Positions the iterator at
 * row 0. */
void loom_iter_init(loom_iter *it, int n, const loom_tensor *const *ops, int skip_dim);
/* Move to row `row` (0 <= row < rows). */
void loom_iter_seek(loom_iter *it, int64_t row);
/* Processes elements [col, col + n) of the iterator's current row. It must
 * not fail, because it may run on an OpenMP thread. */
typedef void (*loom_chunk_fn)(const loom_iter *it, int64_t col, int64_t n, const void *ctx);
/* Call fn over every element of the iteration in pieces of at most `chunk`
 * elements (a piece never spans two rows), on all OpenMP threads when
 * `parallel` is true. fn gets its own positioned copy of the iterator. */
void loom_iter_chunks(const loom_iter *it, int64_t chunk, bool parallel, loom_chunk_fn fn,
                      const void *ctx);
/* Move to the next row. After the last row the pointers are unspecified. */
static inline void loom_iter_next(loom_iter *it) {
    for (int d = it->ndim - 1; d >= 0; d--) {
        if (++it->index[d] < it->shape[d]) {
            for (int k = 0; k < it->n; k++) it->ptr[k] += it->bstride[k][d];
            return;
        }
        it->index[d] = 0;
        for (int k = 0; k < it->n; k++) it->ptr[k] -= it->bstride[k][d] * (it->shape[d] - 1);
    }
}

#endif
