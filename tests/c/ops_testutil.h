/* Shared pieces of the operator tests: a seeded generator, random tensors in
 * several layouts (contiguous, transposed, narrowed, expanded) and dtypes,
 * multi-index walking and element reads in double for reference loops. */
#ifndef LOOM_OPS_TESTUTIL_H
#define LOOM_OPS_TESTUTIL_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "ops.h"

static uint64_t test_rng = 0x9e3779b97f4a7c15ull;

static inline void rng_seed(uint64_t seed) { test_rng = seed * 0x9e3779b97f4a7c15ull + 1; }

static inline uint64_t rng_next(void) {
    uint64_t z = (test_rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Uniform in [lo, hi). */
static inline double rng_uniform(double lo, double hi) {
    return lo + (hi - lo) * (double)(rng_next() >> 11) * 0x1.0p-53;
}

/* Uniform integer in [lo, hi]. */
static inline int64_t rng_int(int64_t lo, int64_t hi) {
    return lo + (int64_t)(rng_next() % (uint64_t)(hi - lo + 1));
}

/* Advance a row-major multi-index; false after the last one. */
static inline bool index_next(int ndim, const int64_t *shape, int64_t *idx) {
    for (int d = ndim - 1; d >= 0; d--) {
        if (++idx[d] < shape[d]) return true;
        idx[d] = 0;
    }
    return false;
}

static inline int64_t shape_numel(int ndim, const int64_t *shape) {
    int64_t n = 1;
    for (int d = 0; d < ndim; d++) n *= shape[d];
    return n;
}

static inline double tget(const loom_tensor *t, const int64_t *idx) { return loom_tensor_get(t, idx); }

/* Layouts a test input can have. */
typedef enum layout {
    LAYOUT_CONTIGUOUS,
    LAYOUT_TRANSPOSED, /* stored with the last two dimensions swapped, then transposed back */
    LAYOUT_NARROWED,   /* a window of a tensor 3 larger in the last dimension */
    LAYOUT_EXPANDED,   /* one dimension stored with size 1 and expanded with stride 0 */
    LAYOUT_COUNT
} layout;

static inline const char *layout_name(layout l) {
    static const char *names[] = {"contiguous", "transposed", "narrowed", "expanded"};
    return names[l];
}

/* Fill every element of the view with uniform values in [lo, hi); integer
 * dtypes get whole numbers. */
static inline void fill_uniform(loom_tensor *t, double lo, double hi) {
    int64_t idx[LOOM_MAX_DIMS] = {0};
    if (shape_numel(t->ndim, t->shape) == 0) return;
    do {
        double v = rng_uniform(lo, hi);
        if (!loom_dtype_is_float(t->dtype)) v = floor(v);
        loom_tensor_set(t, idx, v);
    } while (index_next(t->ndim, t->shape, idx));
}

/* Fill every element of the view with whole numbers uniform in [lo, hi). */
static inline void fill_whole(loom_tensor *t, double lo, double hi) {
    int64_t idx[LOOM_MAX_DIMS] = {0};
    if (shape_numel(t->ndim, t->shape) == 0) return;
    do {
        loom_tensor_set(t, idx, floor(rng_uniform(lo, hi)));
    } while (index_next(t->ndim, t->shape, idx));
}

/* Make *t (empty on entry) a view of the given shape, dtype and layout over
 * fresh random values in [lo, hi). Layouts that need 2 dimensions, or a
 * dimension larger than 1, fall back to contiguous. */
static inline void make_input(loom_tensor *t, loom_dtype dtype, int ndim, const int64_t *shape, layout l,
                       double lo, double hi) {
    int64_t st[LOOM_MAX_DIMS];
    memcpy(st, shape, sizeof(int64_t) * (size_t)ndim);
    loom_tensor base = LOOM_TENSOR_EMPTY;
    if (l == LAYOUT_TRANSPOSED && ndim >= 2) {
        st[ndim - 1] = shape[ndim - 2];
        st[ndim - 2] = shape[ndim - 1];
        loom_tensor_init(&base, dtype, ndim, st);
        fill_uniform(&base, lo, hi);
        loom_tensor_transpose(t, &base, ndim - 2, ndim - 1);
    } else if (l == LAYOUT_NARROWED && ndim >= 1) {
        st[ndim - 1] = shape[ndim - 1] + 3;
        loom_tensor_init(&base, dtype, ndim, st);
        fill_uniform(&base, lo, hi);
        loom_tensor_narrow(t, &base, ndim - 1, 1, shape[ndim - 1]);
    } else if (l == LAYOUT_EXPANDED && ndim >= 1) {
        int d = (int)rng_int(0, ndim - 1);
        st[d] = 1;
        loom_tensor_init(&base, dtype, ndim, st);
        fill_uniform(&base, lo, hi);
        loom_tensor_expand(t, &base, ndim, shape);
    } else {
        loom_tensor_init(t, dtype, ndim, shape);
        fill_uniform(t, lo, hi);
        return;
    }
    loom_tensor_free(&base);
}

/* A random float dtype: f32 half of the time, otherwise f16 or bf16. */
static inline loom_dtype random_float_dtype(void) {
    int r = (int)rng_int(0, 3);
    if (r == 2) return LOOM_F16;
    if (r == 3) return LOOM_BF16;
    return LOOM_F32;
}

static inline layout random_layout(void) { return (layout)rng_int(0, LAYOUT_COUNT - 1); }

/* A random shape of 1 to max_ndim dimensions with sizes in [1, max_size]. */
static inline int random_shape(int64_t *shape, int max_ndim, int64_t max_size) {
    int ndim = (int)rng_int(1, max_ndim);
    for (int d = 0; d < ndim; d++) shape[d] = rng_int(1, max_size);
    return ndim;
}

/* The flat row-major position of idx in shape. */
static inline int64_t flat_of(int ndim, const int64_t *shape, const int64_t *idx) {
    int64_t f = 0;
    for (int d = 0; d < ndim; d++) f = f * shape[d] + idx[d];
    return f;
}

/* Check that t has this dtype and shape, reporting the case on failure. */
static inline bool check_shape(const loom_tensor *t, loom_dtype dtype, int ndim, const int64_t *shape,
                        const char *what) {
    bool ok = t->storage != NULL && t->dtype == dtype && t->ndim == ndim;
    for (int d = 0; ok && d < ndim; d++) ok = t->shape[d] == shape[d];
    CHECK(ok, "%s: result is %s, expected %s %s", what, loom_shape_str(t).s, loom_dtype_name(dtype),
          loom_dims_str(ndim, shape).s);
    return ok;
}

/* Both NaN, or equal including the sign of infinity. */
static inline bool same_value(double a, double b) {
    if (isnan(a) || isnan(b)) return isnan(a) && isnan(b);
    return a == b;
}

/* Check the first n values of t in row-major order, one check per element
 * (NaN matches NaN). */
static inline void check_flat_values(const loom_tensor *t, const double *want, int n,
                                     const char *what) {
    for (int i = 0; i < n; i++) {
        double got = loom_tensor_get_flat(t, i);
        CHECK(same_value(got, want[i]), "%s at %d: got %g, expected %g", what, i, got, want[i]);
    }
}

/* |got - want| <= tol, where infinities and NaN must match exactly. */
static inline bool close_value(double got, double want, double tol) {
    if (isnan(want) || isinf(want) || isnan(got) || isinf(got)) return same_value(got, want);
    return fabs(got - want) <= tol;
}

#endif
