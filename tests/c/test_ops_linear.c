/* Tests of loom_linear and loom_matmul against double-precision loops over
 * the same (already rounded) input values, on random seeded shapes, strided
 * views, 16-bit weights on both linear paths, each kernel of LOOM_PATH_BF16
 * (AMX, AVX512-BF16 and the f32 fallback) on one and two threads, and the
 * error messages. */
#include <float.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "check.h"
#include "ops.h"
#include "ops_linear_internal.h"

/* Unit roundoff of f32 (2^-24). */
#define U32 (FLT_EPSILON / 2)

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t rng_next(void) {
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Uniform integer in [lo, hi]. */
static int64_t rng_int(int64_t lo, int64_t hi) {
    return lo + (int64_t)(rng_next() % (uint64_t)(hi - lo + 1));
}

/* A contiguous tensor of normal values rounded to `dtype`. */
static loom_tensor random_tensor(loom_dtype dtype, int ndim, const int64_t *shape) {
    loom_tensor f = LOOM_TENSOR_EMPTY, t = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_tensor_init(&f, LOOM_F32, ndim, shape));
    CHECK_OK(loom_tensor_randn(&f, rng_next(), 0.0, 1.0));
    if (dtype == LOOM_F32) return f;
    CHECK_OK(loom_tensor_to(&t, &f, dtype));
    loom_tensor_free(&f);
    return t;
}

/* A (rows, cols) tensor of `dtype` in one of three layouts: contiguous (0),
 * the transpose of a contiguous (cols, rows) tensor (1), or columns narrowed
 * out of a wider tensor so that rows are further apart (2). */
static loom_tensor random_matrix(loom_dtype dtype, int64_t rows, int64_t cols, int layout) {
    if (layout == 1) {
        int64_t shape[2] = {cols, rows};
        loom_tensor t = random_tensor(dtype, 2, shape);
        CHECK_OK(loom_tensor_transpose(&t, &t, 0, 1));
        return t;
    }
    if (layout == 2) {
        int64_t shape[2] = {rows, cols + 3};
        loom_tensor t = random_tensor(dtype, 2, shape);
        CHECK_OK(loom_tensor_narrow(&t, &t, 1, 2, cols));
        return t;
    }
    int64_t shape[2] = {rows, cols};
    return random_tensor(dtype, 2, shape);
}

/* ---- linear */

typedef struct linear_case {
    int64_t lead[2];   /* leading dimensions of x; lead[1] == 0 means x is 2-D */
    int64_t k, n;
    loom_dtype xdtype, wdtype;
    int xlayout, wlayout;
    bool bias;
    loom_linear_path path;
} linear_case;

static const char *path_name(loom_linear_path p) {
    return p == LOOM_PATH_BF16 ? "bf16" : "f32";
}

static void run_linear_case(const linear_case *lc) {
    int64_t rows = lc->lead[0] * (lc->lead[1] ? lc->lead[1] : 1);
    loom_tensor x2 = random_matrix(lc->xdtype, rows, lc->k, lc->xlayout);
    loom_tensor x = LOOM_TENSOR_EMPTY;
    if (lc->lead[1]) {
        int64_t shape3[3] = {lc->lead[0], lc->lead[1], lc->k};
        CHECK_OK(loom_tensor_reshape(&x, &x2, 3, shape3));
    } else {
        CHECK_OK(loom_tensor_view_of(&x, &x2));
    }
    loom_tensor w = random_matrix(lc->wdtype, lc->n, lc->k, lc->wlayout);
    loom_tensor b = LOOM_TENSOR_EMPTY;
    if (lc->bias) b = random_tensor(lc->wdtype, 1, &lc->n);

    loom_set_linear_path(lc->path);
    loom_tensor y = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_linear(&y, &x, &w, lc->bias ? &b : NULL));
    loom_set_linear_path(LOOM_PATH_F32);

    CHECK(y.ndim == x.ndim && y.shape[y.ndim - 1] == lc->n && loom_tensor_is_contiguous(&y),
          "shape %s", loom_shape_str(&y).s);
    /* The f32 routes (sgemm, the widened route and the few-row kernel) only
     * reorder an f32 sum of k products plus the bias, so they stay within
     * the classical bound (k + 2) u sum |terms|. The bf16 route (many rows,
     * 16-bit weight) also rounds each activation to bf16, and f16 weights to
     * bf16, each at most 2^-9 relative; 2^-7 sum |x w| covers both with a
     * factor of two to spare. */
    bool few_amx = lc->wdtype == LOOM_BF16 && rows <= LOOM_AMX_FEW_MAX_ROWS &&
                   loom_linear_bf16_kernel() == LOOM_BF16_KERNEL_AMX;
    bool bf16_route = lc->path == LOOM_PATH_BF16 && lc->wdtype != LOOM_F32 && (rows > 8 || few_amx);
    double worst = 0;
    int bad = 0;
    for (int64_t m = 0; m < rows && y.storage; m++) {
        for (int64_t j = 0; j < lc->n; j++) {
            double sum = 0, mag = 0;
            for (int64_t kk = 0; kk < lc->k; kk++) {
                double t = loom_tensor_get_flat(&x, m * lc->k + kk) * loom_tensor_get_flat(&w, j * lc->k + kk);
                sum += t;
                mag += fabs(t);
            }
            double bj = lc->bias ? loom_tensor_get_flat(&b, j) : 0.0;
            double tol = (lc->k + 2) * U32 * (mag + fabs(bj)) + 1e-30;
            if (bf16_route) tol += mag / 128.0;
            double err = fabs(loom_tensor_get_flat(&y, m * lc->n + j) - (sum + bj));
            if (err > tol) bad++;
            if (err / (tol > 0 ? tol : 1) > worst) worst = err / (tol > 0 ? tol : 1);
        }
    }
    CHECK(bad == 0,
          "linear rows=%lld k=%lld n=%lld x %s layout %d, w %s layout %d, bias %d, path %s: %d "
          "values outside tolerance (worst error/tol %.3g)",
          (long long)rows, (long long)lc->k, (long long)lc->n, loom_dtype_name(lc->xdtype),
          lc->xlayout, loom_dtype_name(lc->wdtype), lc->wlayout, lc->bias, path_name(lc->path), bad,
          worst);

    loom_tensor_free(&x2);
    loom_tensor_free(&x);
    loom_tensor_free(&w);
    loom_tensor_free(&b);
    loom_tensor_free(&y);
}

static void test_linear_fixed_cases(void) {
    const linear_case cases[] = {
        /* one row (decoding) with every weight dtype and k not a multiple of 16 */
        {{1, 0}, 17, 9, LOOM_F32, LOOM_BF16, 0, 0, true, LOOM_PATH_F32},
        {{1, 0}, 64, 33, LOOM_F32, LOOM_F16, 0, 0, false, LOOM_PATH_F32},
        {{1, 0}, 5, 3, LOOM_F32, LOOM_F32, 0, 0, true, LOOM_PATH_F32},
        {{1, 0}, 1, 1, LOOM_BF16, LOOM_BF16, 0, 0, true, LOOM_PATH_BF16},
        /* up to eight rows: every row count of the few-row kernel */
        {{2, 0}, 31, 7, LOOM_F32, LOOM_BF16, 0, 0, true, LOOM_PATH_F32},
        {{3, 0}, 48, 6, LOOM_F16, LOOM_F16, 1, 0, false, LOOM_PATH_F32},
        {{4, 0}, 100, 13, LOOM_F32, LOOM_BF16, 2, 2, true, LOOM_PATH_BF16},
        {{5, 0}, 16, 5, LOOM_F32, LOOM_BF16, 0, 1, false, LOOM_PATH_F32},
        {{6, 0}, 33, 11, LOOM_F32, LOOM_F16, 0, 0, true, LOOM_PATH_F32},
        {{7, 0}, 65, 4, LOOM_F32, LOOM_BF16, 1, 0, true, LOOM_PATH_F32},
        {{8, 0}, 129, 17, LOOM_F32, LOOM_F16, 0, 2, false, LOOM_PATH_BF16},
        /* many rows on both paths, odd k, column counts around the 32-wide panels */
        {{9, 0}, 33, 31, LOOM_F32, LOOM_BF16, 0, 0, true, LOOM_PATH_F32},
        {{9, 0}, 33, 31, LOOM_F32, LOOM_BF16, 0, 0, true, LOOM_PATH_BF16},
        {{37, 0}, 257, 70, LOOM_F32, LOOM_BF16, 1, 0, true, LOOM_PATH_BF16},
        {{37, 0}, 257, 70, LOOM_F32, LOOM_F16, 2, 1, false, LOOM_PATH_BF16},
        {{130, 0}, 15, 129, LOOM_BF16, LOOM_F16, 0, 0, true, LOOM_PATH_F32},
        {{130, 0}, 1, 65, LOOM_F32, LOOM_BF16, 0, 0, true, LOOM_PATH_BF16},
        /* k above one 1024-wide block of the bf16 route, odd */
        {{20, 0}, 2051, 40, LOOM_F32, LOOM_BF16, 0, 0, true, LOOM_PATH_BF16},
        /* columns above one 256-wide packed block, split over threads */
        {{17, 0}, 64, 600, LOOM_F32, LOOM_BF16, 0, 0, true, LOOM_PATH_BF16},
        {{17, 0}, 64, 600, LOOM_F32, LOOM_F16, 0, 0, true, LOOM_PATH_F32},
        /* f32 weights: direct, transposed and row-strided views through sgemm */
        {{50, 0}, 40, 30, LOOM_F32, LOOM_F32, 1, 1, true, LOOM_PATH_BF16},
        {{50, 0}, 40, 30, LOOM_F32, LOOM_F32, 2, 2, false, LOOM_PATH_F32},
        {{50, 0}, 40, 30, LOOM_F16, LOOM_F32, 0, 0, true, LOOM_PATH_F32},
        /* 3-D x whose leading dimensions collapse (contiguous) or do not (transposed) */
        {{3, 5}, 24, 10, LOOM_F32, LOOM_F32, 0, 0, true, LOOM_PATH_F32},
        {{3, 5}, 24, 10, LOOM_F32, LOOM_BF16, 1, 0, true, LOOM_PATH_BF16},
        {{2, 2}, 24, 10, LOOM_F32, LOOM_BF16, 2, 0, false, LOOM_PATH_F32},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_linear_case(&cases[i]);
}

static void test_linear_random_cases(void) {
    const loom_dtype fdt[3] = {LOOM_F32, LOOM_F16, LOOM_BF16};
    for (int i = 0; i < 60; i++) {
        linear_case lc = {
            .lead = {rng_int(0, 3) == 0 ? 1 : rng_int(1, 70), rng_int(0, 2) == 0 ? rng_int(1, 4) : 0},
            .k = rng_int(1, 300),
            .n = rng_int(1, 90),
            .xdtype = fdt[rng_int(0, 3) == 0 ? rng_int(1, 2) : 0],
            .wdtype = fdt[rng_int(0, 2)],
            .xlayout = (int)rng_int(0, 2),
            .wlayout = (int)rng_int(0, 2),
            .bias = rng_int(0, 1),
            .path = rng_int(0, 1) ? LOOM_PATH_BF16 : LOOM_PATH_F32,
        };
        run_linear_case(&lc);
    }
}

static void test_linear_out_and_edges(void) {
    int64_t xs[2] = {3, 4}, ws[2] = {5, 4}, ys[2] = {3, 5};
    loom_tensor x = random_tensor(LOOM_F32, 2, xs), w = random_tensor(LOOM_BF16, 2, ws);
    loom_tensor y = LOOM_TENSOR_EMPTY, y2 = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_linear(&y, &x, &w, NULL));

    /* A preallocated out receives the same values in place. */
    CHECK_OK(loom_tensor_zeros(&y2, LOOM_F32, 2, ys));
    loom_storage *s = y2.storage;
    CHECK_OK(loom_linear(&y2, &x, &w, NULL));
    CHECK(y2.storage == s, "out was reallocated");
    bool same = true;
    for (int64_t i = 0; i < 15; i++) same &= loom_tensor_get_flat(&y, i) == loom_tensor_get_flat(&y2, i);
    CHECK(same, "out-variant differs from the allocating call");

    /* A wrong out shape is rejected and out keeps its storage. */
    loom_tensor bad = LOOM_TENSOR_EMPTY;
    int64_t bs[2] = {3, 4};
    CHECK_OK(loom_tensor_zeros(&bad, LOOM_F32, 2, bs));
    CHECK_ERROR(loom_linear(&bad, &x, &w, NULL), "linear: 'out' is f32[3, 4], expected f32[3, 5]");

    /* k = 0 gives the bias, and zero rows give an empty result. */
    int64_t x0s[2] = {2, 0}, w0s[2] = {3, 0}, n3 = 3;
    loom_tensor x0 = random_tensor(LOOM_F32, 2, x0s), w0 = random_tensor(LOOM_F16, 2, w0s);
    loom_tensor b3 = random_tensor(LOOM_F32, 1, &n3), y0 = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_linear(&y0, &x0, &w0, &b3));
    CHECK(y0.shape[0] == 2 && y0.shape[1] == 3 && loom_tensor_get_flat(&y0, 4) == loom_tensor_get_flat(&b3, 1),
          "k = 0 should give the bias");
    int64_t xe[2] = {0, 4};
    loom_tensor xe0 = random_tensor(LOOM_F32, 2, xe), ye = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_linear(&ye, &xe0, &w, NULL));
    CHECK(ye.ndim == 2 && ye.shape[0] == 0 && ye.shape[1] == 5, "empty x gives %s", loom_shape_str(&ye).s);

    loom_tensor_free(&x);
    loom_tensor_free(&w);
    loom_tensor_free(&y);
    loom_tensor_free(&y2);
    loom_tensor_free(&bad);
    loom_tensor_free(&x0);
    loom_tensor_free(&w0);
    loom_tensor_free(&b3);
    loom_tensor_free(&y0);
    loom_tensor_free(&xe0);
    loom_tensor_free(&ye);
}

static void test_linear_errors(void) {
    int64_t xs[2] = {2, 5}, ws[2] = {4, 6}, w1s[1] = {5}, bs[1] = {3}, okw[2] = {4, 5};
    loom_tensor x = random_tensor(LOOM_F32, 2, xs), w = random_tensor(LOOM_F32, 2, ws);
    loom_tensor w1 = random_tensor(LOOM_BF16, 1, w1s), b = random_tensor(LOOM_F32, 1, bs);
    loom_tensor wok = random_tensor(LOOM_F16, 2, okw), y = LOOM_TENSOR_EMPTY;
    loom_tensor xi = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_tensor_zeros(&xi, LOOM_I32, 2, xs));

    CHECK_ERROR(loom_linear(&y, &x, &w, NULL),
                "linear: 'weight' f32[4, 6] does not match 'x' f32[2, 5] (expected in_features 5, got 6)");
    CHECK_ERROR(loom_linear(&y, &x, &w1, NULL),
                "linear: 'weight' must be 2-D (out_features, in_features), got bf16[5]");
    CHECK_ERROR(loom_linear(&y, &x, &wok, &b),
                "linear: 'bias' f32[3] does not match 'weight' f16[4, 5] (expected [4])");
    CHECK_ERROR(loom_linear(&y, &xi, &wok, NULL), "linear: 'x' must be f32, f16 or bf16, got i32[2, 5]");
    CHECK(y.storage == NULL, "a failed call must leave out empty");

    loom_tensor_free(&x);
    loom_tensor_free(&w);
    loom_tensor_free(&w1);
    loom_tensor_free(&b);
    loom_tensor_free(&wok);
    loom_tensor_free(&xi);
}

static void test_linear_path_setting(void) {
    CHECK(loom_get_linear_path() == LOOM_PATH_F32, "default path should be f32");
    loom_set_linear_path(LOOM_PATH_BF16);
    CHECK(loom_get_linear_path() == LOOM_PATH_BF16, "path did not change");
    loom_set_linear_path(LOOM_PATH_F32);
    CHECK(loom_get_linear_path() == LOOM_PATH_F32, "path did not change back");
}


/* ---- the kernels of LOOM_PATH_BF16, one by one */

static const char *kernel_name(loom_bf16_kernel k) {
    switch (k) {
    case LOOM_BF16_KERNEL_AUTO: return "auto";
    case LOOM_BF16_KERNEL_AMX: return "amx";
    case LOOM_BF16_KERNEL_AVX512BF16: return "avx512bf16";
    case LOOM_BF16_KERNEL_F32: return "f32";
    }
    return "?";
}

/* Value of element i of a 16-bit or f32 tensor as the bf16 kernels see it:
 * rounded to bf16 (nearest even) unless it already is bf16. */
static double as_bf16(const loom_tensor *t, int64_t i) {
    float v = (float)loom_tensor_get_flat(t, i);
    return t->dtype == LOOM_BF16 ? v : loom_bf16_to_f32(loom_f32_to_bf16(v));
}

typedef struct kernel_case {
    int64_t m, k, n;
    loom_dtype wdtype;
    int xlayout, wlayout;
    bool bias;
} kernel_case;

/* Run one case with `kernel` pinned on `threads` threads. The reference
 * rounds x (and an f16 weight) to bf16 for the bf16 kernels and not for the
 * f32 fallback, and the tolerance is only that of f32 summation, (k + 2) u
 * sum |terms|: so a kernel that rounds when it should not (or the reverse)
 * fails by about 2^-9 relative, far outside it. */
static void run_kernel_case(const kernel_case *kc, loom_bf16_kernel kernel, int threads) {
    loom_tensor x = random_matrix(LOOM_F32, kc->m, kc->k, kc->xlayout);
    loom_tensor w = random_matrix(kc->wdtype, kc->n, kc->k, kc->wlayout);
    loom_tensor b = LOOM_TENSOR_EMPTY, y = LOOM_TENSOR_EMPTY;
    if (kc->bias) b = random_tensor(LOOM_F32, 1, &kc->n);

    int saved_threads = omp_get_max_threads();
    omp_set_num_threads(threads);
    loom_linear_pin_bf16_kernel(kernel);
    loom_set_linear_path(LOOM_PATH_BF16);
    CHECK_OK(loom_linear(&y, &x, &w, kc->bias ? &b : NULL));
    loom_set_linear_path(LOOM_PATH_F32);
    loom_linear_pin_bf16_kernel(LOOM_BF16_KERNEL_AUTO);
    omp_set_num_threads(saved_threads);

    /* What the pin falls back to here. Up to 8 rows the f32 few-row kernel
     * serves the bf16 path, except where the few-row AMX kernel takes them. */
    loom_linear_pin_bf16_kernel(kernel);
    loom_bf16_kernel used = loom_linear_bf16_kernel();
    loom_linear_pin_bf16_kernel(LOOM_BF16_KERNEL_AUTO);
    bool few_amx = used == LOOM_BF16_KERNEL_AMX && kc->wdtype == LOOM_BF16 &&
                   kc->m <= LOOM_AMX_FEW_MAX_ROWS;
    bool rounded = used != LOOM_BF16_KERNEL_F32 && (kc->m > 8 || few_amx);
    int bad = 0;
    double worst = 0;
    for (int64_t i = 0; i < kc->m && y.storage; i++) {
        for (int64_t j = 0; j < kc->n; j++) {
            double sum = 0, mag = 0;
            for (int64_t kk = 0; kk < kc->k; kk++) {
                double xv = rounded ? as_bf16(&x, i * kc->k + kk) : loom_tensor_get_flat(&x, i * kc->k + kk);
                double wv = rounded ? as_bf16(&w, j * kc->k + kk) : loom_tensor_get_flat(&w, j * kc->k + kk);
                sum += xv * wv;
                mag += fabs(xv * wv);
            }
            double bj = kc->bias ? loom_tensor_get_flat(&b, j) : 0.0;
            double tol = (kc->k + 2) * U32 * (mag + fabs(bj)) + 1e-30;
            double err = fabs(loom_tensor_get_flat(&y, i * kc->n + j) - (sum + bj));
            if (err > tol) bad++;
            if (err / tol > worst) worst = err / tol;
        }
    }
    CHECK(bad == 0,
          "kernel %s, %d threads, x (%lld, %lld) layout %d, w %s (%lld, %lld) layout %d, bias %d: "
          "%d of %lld values outside tolerance (worst error/tol %.3g)",
          kernel_name(kernel), threads, (long long)kc->m, (long long)kc->k, kc->xlayout,
          loom_dtype_name(kc->wdtype), (long long)kc->n, (long long)kc->k, kc->wlayout, kc->bias, bad,
          (long long)(kc->m * kc->n), worst);

    loom_tensor_free(&x);
    loom_tensor_free(&w);
    loom_tensor_free(&b);
    loom_tensor_free(&y);
}

/* On a machine with AMX (and so AVX512-BF16) every kernel is reachable by
 * pinning. Elsewhere the pins fall back, and a printed note names the
 * missing feature. */
static void test_bf16_kernel_selection(void) {
    loom_linear_pin_bf16_kernel(LOOM_BF16_KERNEL_F32);
    CHECK(loom_linear_bf16_kernel() == LOOM_BF16_KERNEL_F32, "pinned f32, got %s",
          kernel_name(loom_linear_bf16_kernel()));

    bool bf16 = __builtin_cpu_supports("avx512bf16");
    loom_linear_pin_bf16_kernel(LOOM_BF16_KERNEL_AVX512BF16);
    loom_bf16_kernel want = bf16 ? LOOM_BF16_KERNEL_AVX512BF16 : LOOM_BF16_KERNEL_F32;
    CHECK(loom_linear_bf16_kernel() == want, "pinned avx512bf16, got %s, expected %s",
          kernel_name(loom_linear_bf16_kernel()), kernel_name(want));

    bool amx = loom_amx_bf16_usable();
    want = amx ? LOOM_BF16_KERNEL_AMX : want;
    loom_linear_pin_bf16_kernel(LOOM_BF16_KERNEL_AMX);
    CHECK(loom_linear_bf16_kernel() == want, "pinned amx, got %s, expected %s",
          kernel_name(loom_linear_bf16_kernel()), kernel_name(want));
    loom_linear_pin_bf16_kernel(LOOM_BF16_KERNEL_AUTO);
    CHECK(loom_linear_bf16_kernel() == want, "auto gave %s, expected %s",
          kernel_name(loom_linear_bf16_kernel()), kernel_name(want));
    if (!amx || !bf16)
        printf("note: this CPU lacks %s, so the pinned kernel tests run the fallback\n",
               amx ? "AVX512-BF16" : "AMX-BF16");
}

static void test_bf16_kernels(void) {
    const kernel_case cases[] = {
        /* below one tile in every dimension */
        {9, 5, 3, LOOM_BF16, 0, 0, true},
        /* one row past a tile, k past one 32-input step, n past a tile */
        {17, 33, 17, LOOM_BF16, 0, 0, true},
        /* every tile shape of the kernel: 2x2, 2x1 and 1x2 pairs, 1x1 */
        {48, 64, 48, LOOM_BF16, 0, 0, false},
        {33, 100, 70, LOOM_F16, 0, 0, true},
        /* k over two K blocks of the AMX kernel (4096 inputs each), with edge
         * tiles whose sums continue from the first block */
        {37, 4133, 70, LOOM_BF16, 0, 0, true},
        {20, 4097, 129, LOOM_F16, 0, 0, false},
        /* transposed x and weight, narrowed (row-strided) weight */
        {40, 96, 50, LOOM_BF16, 1, 1, true},
        {29, 130, 65, LOOM_F16, 2, 2, true},
        /* large enough for the threaded split: by column blocks, then by rows */
        {45, 1500, 200, LOOM_BF16, 0, 0, true},
        {300, 1500, 40, LOOM_BF16, 0, 0, true},
        {131, 1100, 150, LOOM_F16, 1, 0, false},
    };
    const loom_bf16_kernel kernels[3] = {LOOM_BF16_KERNEL_AMX, LOOM_BF16_KERNEL_AVX512BF16,
                                         LOOM_BF16_KERNEL_F32};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        for (int kk = 0; kk < 3; kk++)
            for (int threads = 1; threads <= 2; threads++) run_kernel_case(&cases[i], kernels[kk], threads);
}

/* Random small shapes through the AMX kernel, whose tile edges (16 rows,
 * 16 columns, 32 inputs) every dimension crosses somewhere. */
static void test_amx_random_shapes(void) {
    for (int i = 0; i < 40; i++) {
        kernel_case kc = {
            .m = rng_int(9, 80), .k = rng_int(1, 200), .n = rng_int(1, 150),
            .wdtype = rng_int(0, 1) ? LOOM_BF16 : LOOM_F16,
            .xlayout = (int)rng_int(0, 2), .wlayout = (int)rng_int(0, 2), .bias = rng_int(0, 1),
        };
        run_kernel_case(&kc, LOOM_BF16_KERNEL_AMX, (int)rng_int(1, 2));
    }
}

/* One to sixteen rows of x with a bf16 weight take the few-row AMX kernel,
 * which reads the weight in place. The cases cover edges of every kind (k
 * short of a step, n short of a tile or a four-tile unit), transposed x, a
 * row-strided weight, and one and two threads. */
static void test_amx_few_rows(void) {
    const kernel_case cases[] = {
        {1, 1, 1, LOOM_BF16, 0, 0, true},
        {1, 4133, 129, LOOM_BF16, 0, 2, true},
        {2, 1, 1, LOOM_BF16, 0, 0, true},
        {3, 31, 17, LOOM_BF16, 0, 0, false},
        {5, 64, 64, LOOM_BF16, 0, 0, true},
        {8, 100, 65, LOOM_BF16, 1, 0, true},
        {16, 33, 200, LOOM_BF16, 0, 2, false},
        {7, 4133, 70, LOOM_BF16, 2, 2, true},
        {16, 1500, 300, LOOM_BF16, 1, 2, true},
        /* weights above 4 MiB stream in one-tile units with prefetching */
        {1, 4133, 520, LOOM_BF16, 0, 0, true},
        {9, 2100, 1031, LOOM_BF16, 2, 2, false},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        for (int threads = 1; threads <= 2; threads++)
            run_kernel_case(&cases[i], LOOM_BF16_KERNEL_AMX, threads);
    for (int i = 0; i < 30; i++) {
        kernel_case kc = {
            .m = rng_int(1, 16), .k = rng_int(1, 300), .n = rng_int(1, 200), .wdtype = LOOM_BF16,
            .xlayout = (int)rng_int(0, 2), .wlayout = (int)rng_int(0, 2), .bias = rng_int(0, 1),
        };
        run_kernel_case(&kc, LOOM_BF16_KERNEL_AMX, (int)rng_int(1, 2));
    }
}

/* On the bf16 path a row of x gets the same bits whatever rows come with
 * it: the first m rows of a 24-row product (many-row AMX kernel) equal the
 * product of those m rows alone (few-row AMX kernel). This is
 * what lets batched decoding give the tokens of a single run. The weight
 * is n x k: small ones take four-tile units, large ones one-tile units. */
static void check_rows_independent(int64_t k, int64_t n) {
    int64_t xs[2] = {24, k}, ws[2] = {n, k};
    loom_tensor x = random_tensor(LOOM_F32, 2, xs), w = random_tensor(LOOM_BF16, 2, ws);
    loom_tensor b = random_tensor(LOOM_F32, 1, &n);
    loom_tensor all = LOOM_TENSOR_EMPTY;
    loom_set_linear_path(LOOM_PATH_BF16);
    CHECK_OK(loom_linear(&all, &x, &w, &b));
    for (int64_t m = 1; m <= 16 && all.storage; m++) {
        loom_tensor part = LOOM_TENSOR_EMPTY, y = LOOM_TENSOR_EMPTY;
        CHECK_OK(loom_tensor_narrow(&part, &x, 0, 0, m));
        CHECK_OK(loom_linear(&y, &part, &w, &b));
        if (y.storage) {
            int differ = 0;
            const float *yp = loom_tensor_data(&y), *ap = loom_tensor_data(&all);
            for (int64_t i = 0; i < m * n; i++) differ += memcmp(&yp[i], &ap[i], sizeof(float)) != 0;
            CHECK(differ == 0, "weight %lld x %lld, %lld rows alone: %d of %lld values differ from the same "
                  "rows among 24", (long long)n, (long long)k, (long long)m, differ, (long long)(m * n));
        }
        loom_tensor_free(&part);
        loom_tensor_free(&y);
    }
    loom_set_linear_path(LOOM_PATH_F32);
    loom_tensor_free(&x);
    loom_tensor_free(&w);
    loom_tensor_free(&b);
    loom_tensor_free(&all);
}

static void test_amx_rows_independent(void) {
    if (!loom_amx_bf16_usable()) {
        printf("note: no AMX-BF16 here, so the row-independence test is skipped\n");
        return;
    }
    check_rows_independent(300, 150);
    check_rows_independent(4100, 700);
}

/* Infinities and NaN in x reach the output of the AMX kernel. */
static void test_amx_special_values(void) {
    int64_t xs[2] = {20, 40}, ws[2] = {18, 40};
    loom_tensor x = random_tensor(LOOM_F32, 2, xs), w = random_tensor(LOOM_BF16, 2, ws);
    float *xp = loom_tensor_data(&x);
    xp[3 * 40 + 7] = INFINITY;
    xp[11 * 40 + 39] = NAN;
    loom_tensor y = LOOM_TENSOR_EMPTY;
    loom_linear_pin_bf16_kernel(LOOM_BF16_KERNEL_AMX);
    loom_set_linear_path(LOOM_PATH_BF16);
    CHECK_OK(loom_linear(&y, &x, &w, NULL));
    loom_set_linear_path(LOOM_PATH_F32);
    loom_linear_pin_bf16_kernel(LOOM_BF16_KERNEL_AUTO);
    if (y.storage) {
        const float *yp = loom_tensor_data(&y);
        bool row3 = true, row11 = true, others = true;
        for (int64_t j = 0; j < 18; j++) {
            row3 &= isinf(yp[3 * 18 + j]) || isnan(yp[3 * 18 + j]);
            row11 &= isnan(yp[11 * 18 + j]);
            others &= isfinite(yp[4 * 18 + j]);
        }
        CHECK(row3, "an infinite x should give inf or NaN across its row");
        CHECK(row11, "a NaN in x should give NaN across its row");
        CHECK(others, "rows without special values should stay finite");
    }
    loom_tensor_free(&x);
    loom_tensor_free(&w);
    loom_tensor_free(&y);
}

/* ---- matmul */

/* Fill idx with t's batch indices for the broadcast batch index out_idx
 * (0 on t's size-1 dimensions); returns the number of t's batch dimensions. */
static int64_t bcast_index(const loom_tensor *t, int nbatch_out, const int64_t *out_idx, int64_t *idx) {
    int nb = t->ndim - 2;
    for (int d = 0; d < nb; d++) {
        int od = d + (nbatch_out - nb);
        idx[d] = t->shape[d] == 1 ? 0 : out_idx[od];
    }
    return nb;
}

/* Check loom_matmul(a, b) against torch.matmul's definition in double. */
static void check_matmul(const loom_tensor *a, const loom_tensor *b, const char *what) {
    loom_tensor c = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_matmul(&c, a, b));
    if (c.storage == NULL) return;

    /* Promote 1-D operands by hand, as torch.matmul does. */
    int64_t k = a->shape[a->ndim - 1];
    int64_t n = a->ndim == 1 ? 1 : a->shape[a->ndim - 2];
    int64_t m = b->ndim == 1 ? 1 : b->shape[b->ndim - 1];
    int nba = a->ndim > 2 ? a->ndim - 2 : 0, nbb = b->ndim > 2 ? b->ndim - 2 : 0;
    int nbatch = nba > nbb ? nba : nbb;
    int64_t bshape[LOOM_MAX_DIMS];
    for (int d = 0; d < nbatch; d++) {
        int da = d - (nbatch - nba), db = d - (nbatch - nbb);
        int64_t sa = da >= 0 ? a->shape[da] : 1, sb = db >= 0 ? b->shape[db] : 1;
        bshape[d] = sa == 1 ? sb : sa;
    }
    int64_t nbat = 1;
    for (int d = 0; d < nbatch; d++) nbat *= bshape[d];

    int want_ndim = nbatch + (a->ndim > 1) + (b->ndim > 1);
    CHECK(c.ndim == want_ndim, "%s: result %s has %d dimensions, expected %d", what,
          loom_shape_str(&c).s, c.ndim, want_ndim);
    CHECK(loom_tensor_numel(&c) == nbat * n * m, "%s: result %s has the wrong size", what,
          loom_shape_str(&c).s);

    int bad = 0;
    for (int64_t bi = 0; bi < nbat; bi++) {
        int64_t oidx[LOOM_MAX_DIMS], rem = bi;
        for (int d = nbatch - 1; d >= 0; d--) {
            oidx[d] = rem % bshape[d];
            rem /= bshape[d];
        }
        for (int64_t i = 0; i < n; i++) {
            for (int64_t j = 0; j < m; j++) {
                double sum = 0, mag = 0;
                for (int64_t kk = 0; kk < k; kk++) {
                    int64_t ia[LOOM_MAX_DIMS], ib[LOOM_MAX_DIMS];
                    double va, vb;
                    if (a->ndim == 1) {
                        ia[0] = kk;
                    } else {
                        int nb = (int)bcast_index(a, nbatch, oidx, ia);
                        ia[nb] = i;
                        ia[nb + 1] = kk;
                    }
                    if (b->ndim == 1) {
                        ib[0] = kk;
                    } else {
                        int nb = (int)bcast_index(b, nbatch, oidx, ib);
                        ib[nb] = kk;
                        ib[nb + 1] = j;
                    }
                    va = loom_tensor_get(a, ia);
                    vb = loom_tensor_get(b, ib);
                    sum += va * vb;
                    mag += fabs(va * vb);
                }
                double got = loom_tensor_get_flat(&c, (bi * n + i) * m + j);
                if (fabs(got - sum) > (k + 2) * U32 * mag + 1e-30) bad++;
            }
        }
    }
    CHECK(bad == 0, "%s: a %s @ b %s: %d values outside tolerance", what, loom_shape_str(a).s,
          loom_shape_str(b).s, bad);
    loom_tensor_free(&c);
}

static void test_matmul_shapes(void) {
    /* plain, odd sizes */
    loom_tensor a = random_matrix(LOOM_F32, 7, 13, 0), b = random_matrix(LOOM_F32, 13, 5, 0);
    check_matmul(&a, &b, "2-D");
    loom_tensor_free(&a);
    loom_tensor_free(&b);

    /* transposed and row-strided views, and 16-bit inputs */
    for (int la = 0; la < 3; la++) {
        for (int lb = 0; lb < 3; lb++) {
            a = random_matrix(la == 2 ? LOOM_BF16 : LOOM_F32, 9, 17, la);
            b = random_matrix(lb == 1 ? LOOM_F16 : LOOM_F32, 17, 6, lb);
            check_matmul(&a, &b, "2-D views");
            loom_tensor_free(&a);
            loom_tensor_free(&b);
        }
    }

    /* batched a with 2-D b (one folded sgemm), and with 2-D b transposed */
    int64_t s3[3] = {4, 6, 11};
    a = random_tensor(LOOM_F32, 3, s3);
    b = random_matrix(LOOM_F32, 11, 8, 1);
    check_matmul(&a, &b, "batched a, 2-D b");
    loom_tensor_free(&b);

    /* broadcast batch dimensions: (4, 1, 6, 11) @ (3, 11, 2) -> (4, 3, 6, 2) */
    int64_t s4[4] = {4, 1, 6, 11}, sb3[3] = {3, 11, 2};
    loom_tensor a4 = random_tensor(LOOM_F32, 4, s4), b3 = random_tensor(LOOM_F32, 3, sb3);
    check_matmul(&a4, &b3, "broadcast batch");

    /* batched b with 2-D a, and b transposed in its last two dimensions */
    loom_tensor a2 = random_matrix(LOOM_F32, 5, 11, 0), bt = LOOM_TENSOR_EMPTY;
    int64_t sbt[3] = {3, 2, 11};
    bt = random_tensor(LOOM_F32, 3, sbt);
    CHECK_OK(loom_tensor_transpose(&bt, &bt, 1, 2));
    check_matmul(&a2, &bt, "2-D a, transposed batched b");

    /* a whose last two strides are both non-unit: (4, 6, 11) permuted to (11, 6, 4) */
    loom_tensor ap = LOOM_TENSOR_EMPTY;
    int perm[3] = {2, 1, 0};
    CHECK_OK(loom_tensor_permute(&ap, &a, perm)); /* (11, 6, 4), strides (1, 11, 66) */
    int64_t sbp[2] = {4, 3};
    loom_tensor bp = random_tensor(LOOM_F32, 2, sbp);
    check_matmul(&ap, &bp, "non-BLAS strides");

    /* 1-D promotion */
    int64_t k11 = 11, k6 = 6;
    loom_tensor v11 = random_tensor(LOOM_F32, 1, &k11), v6 = random_tensor(LOOM_BF16, 1, &k6);
    check_matmul(&v11, &v11, "1-D @ 1-D");
    check_matmul(&a, &v11, "3-D @ 1-D");
    check_matmul(&v6, &a, "1-D @ 3-D");
    loom_tensor v11s = LOOM_TENSOR_EMPTY;
    int64_t s22[1] = {22};
    loom_tensor v22 = random_tensor(LOOM_F32, 1, s22);
    CHECK_OK(loom_tensor_view_of(&v11s, &v22));
    v11s.shape[0] = 11;
    v11s.strides[0] = 2;
    loom_tensor a2t = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_tensor_transpose(&a2t, &a2, 0, 1)); /* (11, 5) */
    check_matmul(&v11s, &a2t, "strided 1-D @ transposed 2-D");
    loom_tensor_free(&a2t);

    loom_tensor_free(&a);
    loom_tensor_free(&a4);
    loom_tensor_free(&b3);
    loom_tensor_free(&a2);
    loom_tensor_free(&bt);
    loom_tensor_free(&ap);
    loom_tensor_free(&bp);
    loom_tensor_free(&v11);
    loom_tensor_free(&v6);
    loom_tensor_free(&v11s);
    loom_tensor_free(&v22);
}

static void test_matmul_random(void) {
    for (int i = 0; i < 30; i++) {
        int64_t n = rng_int(1, 40), k = rng_int(1, 70), m = rng_int(1, 40), bt = rng_int(1, 3);
        int64_t sa[3] = {bt, n, k}, sb[3] = {rng_int(0, 1) ? bt : 1, k, m};
        loom_tensor a = random_tensor(LOOM_F32, 3, sa), b = random_tensor(LOOM_F32, 3, sb);
        check_matmul(&a, &b, "random batched");
        loom_tensor_free(&a);
        loom_tensor_free(&b);
    }
}

static void test_matmul_errors(void) {
    int64_t sa[2] = {2, 3}, sb[2] = {4, 5}, sa3[3] = {2, 2, 3}, sb3[3] = {3, 3, 5};
    loom_tensor a = random_tensor(LOOM_F32, 2, sa), b = random_tensor(LOOM_F32, 2, sb);
    loom_tensor a3 = random_tensor(LOOM_F32, 3, sa3), b3 = random_tensor(LOOM_F32, 3, sb3);
    loom_tensor c = LOOM_TENSOR_EMPTY;
    CHECK_ERROR(loom_matmul(&c, &a, &b),
                "matmul: 'a' f32[2, 3] and 'b' f32[4, 5] do not match (a has 3 columns, b has 4 rows)");
    CHECK_ERROR(loom_matmul(&c, &a3, &b3), "matmul: batch dimensions of 'a' f32[2, 2, 3] and 'b' f32[3, 3, 5]");
    CHECK(c.storage == NULL, "a failed matmul must leave out empty");
    loom_tensor_free(&a);
    loom_tensor_free(&b);
    loom_tensor_free(&a3);
    loom_tensor_free(&b3);
}

int main(void) {
    test_linear_path_setting();
    test_bf16_kernel_selection();
    test_bf16_kernels();
    test_amx_random_shapes();
    test_amx_few_rows();
    test_amx_rows_independent();
    test_amx_special_values();
    test_linear_fixed_cases();
    test_linear_random_cases();
    test_linear_out_and_edges();
    test_linear_errors();
    test_matmul_shapes();
    test_matmul_random();
    test_matmul_errors();
    return check_summary();
}
