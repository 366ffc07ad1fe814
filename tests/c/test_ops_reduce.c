/* Tests of core/ops_reduce.c: sum, mean, max, min and argmax over one
 * dimension, softmax and log_softmax with float and u8 masks, layer norm and
 * RMS norm. Each is compared with a reference loop in double over seeded
 * random shapes, dtypes and layouts, and the out-variant and the error
 * messages are checked too. */
#include "ops_testutil.h"

static const char *reduce_names[] = {"sum", "mean", "max", "min"};

/* Copy idx (of the reduced output) into the full index of x with position k
 * along dim. */
static void expand_index(int ndim, int dim, bool keepdim, const int64_t *oidx, int64_t k,
                         int64_t *xidx) {
    for (int d = 0, o = 0; d < ndim; d++) {
        if (d == dim) {
            xidx[d] = k;
            if (keepdim) o++;
        } else {
            xidx[d] = oidx[o++];
        }
    }
}

static int reduced_dims(const loom_tensor *x, int dim, bool keepdim, int64_t *shape) {
    int n = 0;
    for (int d = 0; d < x->ndim; d++) {
        if (d != dim)
            shape[n++] = x->shape[d];
        else if (keepdim)
            shape[n++] = 1;
    }
    return n;
}

/* ---- sum, mean, max, min */

static void test_reduce_random(void) {
    rng_seed(41);
    static const loom_dtype dtypes[] = {LOOM_F32, LOOM_F16, LOOM_BF16, LOOM_I32, LOOM_I64, LOOM_F32};
    for (int c = 0; c < 400; c++) {
        loom_reduce_op op = (loom_reduce_op)(c % 4);
        int64_t shape[LOOM_MAX_DIMS];
        int n = random_shape(shape, 4, 7);
        if (c % 5 == 0) shape[n - 1] = rng_int(100, 3000); /* long rows use the blocked sums */
        int dim_arg = (int)rng_int(-n, n - 1);
        int dim = dim_arg < 0 ? dim_arg + n : dim_arg;
        bool keepdim = rng_int(0, 1);
        loom_dtype dt = dtypes[rng_int(0, 5)];
        layout l = random_layout();
        loom_tensor x = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;
        make_input(&x, dt, n, shape, l, -10, 10);
        CHECK_OK(loom_reduce(&out, &x, dim_arg, keepdim, op));

        bool is_float = loom_dtype_is_float(dt);
        loom_dtype want_dtype = is_float || op == LOOM_MEAN ? LOOM_F32
                                : op == LOOM_SUM           ? LOOM_I64
                                                           : dt;
        int64_t oshape[LOOM_MAX_DIMS];
        int on = reduced_dims(&x, dim, keepdim, oshape);
        char what[1024];
        snprintf(what, sizeof what, "reduce case %d %s %s %s (%s) dim %d keepdim %d", c,
                 reduce_names[op], loom_dtype_name(dt), loom_dims_str(n, shape).s, layout_name(l),
                 dim_arg, keepdim);
        if (!check_shape(&out, want_dtype, on, oshape, what)) {
            loom_tensor_free(&x);
            continue;
        }
        bool ok = true;
        double max_err = 0;
        int64_t oidx[LOOM_MAX_DIMS] = {0}, xidx[LOOM_MAX_DIMS];
        do {
            double sum = 0, abs_sum = 0, mx = -INFINITY, mn = INFINITY;
            for (int64_t k = 0; k < shape[dim]; k++) {
                expand_index(n, dim, keepdim, oidx, k, xidx);
                double v = tget(&x, xidx);
                sum += v;
                abs_sum += fabs(v);
                mx = fmax(mx, v);
                mn = fmin(mn, v);
            }
            double want = op == LOOM_SUM ? sum : op == LOOM_MEAN ? sum / (double)shape[dim]
                        : op == LOOM_MAX ? mx : mn;
            /* f32 rounding of the result. Integer sums are exact. */
            double tol = (op == LOOM_SUM || op == LOOM_MEAN) && want_dtype == LOOM_F32
                             ? 1.2e-7 * fabs(want) + 1e-12 * abs_sum
                             : 0.0;
            double got = tget(&out, oidx);
            if (!close_value(got, want, tol)) ok = false;
            max_err = fmax(max_err, fabs(got - want));
        } while (index_next(on, oshape, oidx));
        CHECK(ok, "%s: max error %g", what, max_err);
        loom_tensor_free(&x);
        loom_tensor_free(&out);
    }
}

/* A long row of values that do not add up exactly in f32 stays within one
 * rounding of the exact sum. */
static void test_reduce_long_row(void) {
    int64_t shape[1] = {1 << 21};
    loom_tensor x = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;
    loom_tensor_init(&x, LOOM_F32, 1, shape);
    float *p = loom_tensor_data(&x);
    double exact = 0;
    for (int64_t i = 0; i < shape[0]; i++) {
        p[i] = 0.1f + (float)(i % 7) * 1e-3f;
        exact += p[i];
    }
    CHECK_OK(loom_reduce(&out, &x, 0, false, LOOM_SUM));
    double got = loom_tensor_get_flat(&out, 0);
    CHECK(fabs(got - exact) <= 1.2e-7 * exact, "long sum %.9g vs exact %.9g (relative error %g)", got,
          exact, fabs(got - exact) / exact);
    loom_tensor_free(&out);
    CHECK_OK(loom_reduce(&out, &x, -1, true, LOOM_MEAN));
    got = loom_tensor_get_flat(&out, 0);
    double mean = exact / (double)shape[0];
    check_shape(&out, LOOM_F32, 1, (int64_t[]){1}, "long mean with keepdim");
    CHECK(fabs(got - mean) <= 1.2e-7 * mean, "long mean %.9g vs %.9g", got, mean);
    loom_tensor_free(&out);
    loom_tensor_free(&x);
}

static void test_reduce_edges_and_errors(void) {
    loom_tensor x = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;

    /* NaN wins in max and min. */
    loom_tensor_init(&x, LOOM_F32, 2, (int64_t[]){2, 3});
    float v[6] = {1, NAN, 3, -1, -2, -3};
    memcpy(loom_tensor_data(&x), v, sizeof v);
    CHECK_OK(loom_reduce(&out, &x, 1, false, LOOM_MAX));
    check_flat_values(&out, (double[]){NAN, -1}, 2, "max with NaN");
    loom_tensor_free(&out);
    CHECK_OK(loom_reduce(&out, &x, 1, false, LOOM_MIN));
    check_flat_values(&out, (double[]){NAN, -3}, 2, "min with NaN");
    loom_tensor_free(&out);

    /* Bad dim, wrong out shape. */
    CHECK_ERROR(loom_reduce(&out, &x, 2, false, LOOM_SUM),
                "sum: dim 2 is out of range for a tensor with 2 dimensions");
    CHECK_ERROR(loom_reduce(&out, &x, -3, false, LOOM_MEAN), "mean: dim -3 is out of range");
    loom_tensor wrong = LOOM_TENSOR_EMPTY;
    loom_tensor_zeros(&wrong, LOOM_F32, 1, (int64_t[]){3});
    CHECK_ERROR(loom_reduce(&wrong, &x, 1, false, LOOM_SUM), "sum: 'out' is f32[3], expected f32[2]");
    CHECK_ERROR(loom_reduce(&wrong, &x, 1, true, LOOM_SUM), "expected f32[2, 1]");
    loom_tensor_free(&wrong);

    /* Out-variant with keepdim. */
    loom_tensor pre = LOOM_TENSOR_EMPTY;
    loom_tensor_zeros(&pre, LOOM_F32, 2, (int64_t[]){1, 3});
    CHECK_OK(loom_reduce(&pre, &x, 0, true, LOOM_MIN));
    check_flat_values(&pre, (double[]){-1, NAN, -3}, 3, "min over dim 0 into out");
    loom_tensor_free(&pre);
    loom_tensor_free(&x);

    /* A dimension of size 0: sum gives 0, mean NaN, max an error. */
    loom_tensor_zeros(&x, LOOM_F32, 2, (int64_t[]){3, 0});
    CHECK_OK(loom_reduce(&out, &x, 1, false, LOOM_SUM));
    check_shape(&out, LOOM_F32, 1, (int64_t[]){3}, "sum over size 0");
    check_flat_values(&out, (double[]){0, 0, 0}, 3, "sum over size 0");
    loom_tensor_free(&out);
    CHECK_OK(loom_reduce(&out, &x, 1, false, LOOM_MEAN));
    CHECK(isnan(loom_tensor_get_flat(&out, 0)), "mean over size 0: %g", loom_tensor_get_flat(&out, 0));
    loom_tensor_free(&out);
    CHECK_ERROR(loom_reduce(&out, &x, 1, false, LOOM_MAX),
                "max: cannot reduce f32[3, 0] over dimension 1 of size 0");
    CHECK(out.storage == NULL, "out stays empty after an error");
    loom_tensor_free(&x);

    /* A 0-dimensional tensor reduces over itself. */
    loom_tensor_zeros(&x, LOOM_F32, 0, NULL);
    loom_tensor_fill(&x, 2.5);
    CHECK_OK(loom_reduce(&out, &x, -1, false, LOOM_SUM));
    check_shape(&out, LOOM_F32, 0, NULL, "sum of a scalar");
    check_flat_values(&out, (double[]){2.5}, 1, "sum of a scalar");
    loom_tensor_free(&out);
    CHECK_ERROR(loom_reduce(&out, &x, 1, false, LOOM_SUM),
                "sum: dim 1 is out of range for a 0-dimensional tensor");
    loom_tensor_free(&x);
    CHECK_ERROR(loom_reduce(&out, &x, 0, false, LOOM_SUM), "sum: 'x' is empty");
}

/* ---- argmax */

static void test_argmax(void) {
    rng_seed(42);
    for (int c = 0; c < 150; c++) {
        int64_t shape[LOOM_MAX_DIMS];
        int n = random_shape(shape, 4, 7);
        int dim_arg = (int)rng_int(-n, n - 1);
        int dim = dim_arg < 0 ? dim_arg + n : dim_arg;
        bool keepdim = rng_int(0, 1);
        loom_dtype dt = c % 4 == 3 ? LOOM_I32 : random_float_dtype();
        layout l = random_layout();
        loom_tensor x = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;
        make_input(&x, dt, n, shape, l, -3, 3);
        fill_whole(&x, -3, 3); /* ties, so the first maximum must win */
        CHECK_OK(loom_argmax(&out, &x, dim_arg, keepdim));
        int64_t oshape[LOOM_MAX_DIMS];
        int on = reduced_dims(&x, dim, keepdim, oshape);
        char what[1024];
        snprintf(what, sizeof what, "argmax case %d %s %s (%s) dim %d keepdim %d", c,
                 loom_dtype_name(dt), loom_dims_str(n, shape).s, layout_name(l), dim_arg, keepdim);
        if (!check_shape(&out, LOOM_I64, on, oshape, what)) {
            loom_tensor_free(&x);
            continue;
        }
        bool ok = true;
        int64_t oidx[LOOM_MAX_DIMS] = {0}, xidx[LOOM_MAX_DIMS];
        do {
            int64_t best = 0;
            double m = -INFINITY;
            for (int64_t k = 0; k < shape[dim]; k++) {
                expand_index(n, dim, keepdim, oidx, k, xidx);
                double v = tget(&x, xidx);
                if (v > m) m = v, best = k;
            }
            if ((int64_t)tget(&out, oidx) != best) ok = false;
        } while (index_next(on, oshape, oidx));
        CHECK(ok, "%s: indices differ", what);
        loom_tensor_free(&x);
        loom_tensor_free(&out);
    }

    loom_tensor x = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;
    loom_tensor_init(&x, LOOM_F32, 1, (int64_t[]){4});
    float v[4] = {1, 5, NAN, 5};
    memcpy(loom_tensor_data(&x), v, sizeof v);
    CHECK_OK(loom_argmax(&out, &x, 0, false));
    check_shape(&out, LOOM_I64, 0, NULL, "argmax of a 1-D tensor");
    check_flat_values(&out, (double[]){2}, 1, "argmax picks NaN");
    loom_tensor_free(&out);
    CHECK_ERROR(loom_argmax(&out, &x, 1, false),
                "argmax: dim 1 is out of range for a tensor with 1 dimensions");
    loom_tensor_free(&x);
}

/* ---- softmax */

typedef enum mask_kind { MASK_NONE, MASK_FLOAT, MASK_U8, MASK_KIND_COUNT } mask_kind;

/* Reference softmax of one row whose excluded positions are -inf already. */
static void ref_softmax_row(double *row, int64_t k, bool log_softmax) {
    double m = -INFINITY;
    for (int64_t r = 0; r < k; r++) m = fmax(m, row[r]);
    if (m == -INFINITY) {
        for (int64_t r = 0; r < k; r++) row[r] = log_softmax ? -INFINITY : 0.0;
        return;
    }
    double sum = 0;
    for (int64_t r = 0; r < k; r++) sum += exp(row[r] - m);
    for (int64_t r = 0; r < k; r++)
        row[r] = log_softmax ? row[r] - m - log(sum) : exp(row[r] - m) / sum;
}

/* Check out = softmax(x + mask) along dim and return the max error. Each
 * x - max (and x + mask) is rounded in f32, so the tolerance grows with
 * the magnitudes involved, as it does in PyTorch. */
static double compare_softmax(const loom_tensor *out, const loom_tensor *x, const loom_tensor *mask,
                              int dim, bool log_softmax, bool *ok) {
    int n = x->ndim;
    int64_t k = x->shape[dim];
    double *row = malloc(sizeof(double) * (size_t)(k ? k : 1));
    double *mag = malloc(sizeof(double) * (size_t)(k ? k : 1));
    int64_t oshape[LOOM_MAX_DIMS];
    memcpy(oshape, x->shape, sizeof oshape);
    oshape[dim] = 1;
    int64_t idx[LOOM_MAX_DIMS] = {0}, mi[LOOM_MAX_DIMS];
    double max_err = 0;
    *ok = true;
    do {
        double row_mag = 0;
        for (int64_t r = 0; r < k; r++) {
            idx[dim] = r;
            double v = tget(x, idx);
            mag[r] = fabs(v);
            if (mask) {
                int lead = n - mask->ndim;
                for (int d = 0; d < mask->ndim; d++) mi[d] = mask->shape[d] == 1 ? 0 : idx[d + lead];
                double mv = tget(mask, mi);
                if (mask->dtype == LOOM_U8) {
                    if (mv == 0) v = -INFINITY;
                } else {
                    v += mv;
                    if (isfinite(mv)) mag[r] += fabs(mv);
                }
            }
            row[r] = v;
            if (isfinite(v)) row_mag = fmax(row_mag, fabs(v));
        }
        ref_softmax_row(row, k, log_softmax);
        for (int64_t r = 0; r < k; r++) {
            idx[dim] = r;
            double got = tget(out, idx);
            double scale = 1.0 + mag[r] + row_mag;
            double tol = log_softmax ? 3e-7 * (scale + fabs(row[r])) : 3e-7 * scale * row[r] + 1e-30;
            if (!close_value(got, row[r], tol)) *ok = false;
            if (isfinite(row[r])) max_err = fmax(max_err, fabs(got - row[r]));
        }
        idx[dim] = 0;
    } while (index_next(n, oshape, idx));
    free(row);
    free(mag);
    return max_err;
}

static void test_softmax_random(void) {
    rng_seed(43);
    static const char *mask_names[] = {"none", "float", "u8"};
    for (int c = 0; c < 300; c++) {
        int64_t shape[LOOM_MAX_DIMS];
        int n = random_shape(shape, 4, 6);
        if (c % 6 == 0) shape[n - 1] = rng_int(50, 700);
        int dim_arg = c % 3 == 0 ? -1 : (int)rng_int(-n, n - 1);
        int dim = dim_arg < 0 ? dim_arg + n : dim_arg;
        bool log_softmax = c % 2;
        mask_kind mk = (mask_kind)((c / 2) % MASK_KIND_COUNT);
        loom_dtype dt = random_float_dtype();
        layout l = random_layout();
        loom_tensor x = LOOM_TENSOR_EMPTY, mask = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;
        make_input(&x, dt, n, shape, l, -8, 8);

        int64_t ms[LOOM_MAX_DIMS];
        int mn = 0;
        if (mk != MASK_NONE) {
            int drop = (int)rng_int(0, n - 1);
            mn = n - drop;
            for (int d = 0; d < mn; d++) ms[d] = rng_int(0, 2) == 0 ? 1 : shape[d + drop];
            if (mk == MASK_U8) {
                make_input(&mask, LOOM_U8, mn, ms, random_layout(), 0, 1);
                /* About 40% excluded, so some rows lose every position. */
                int64_t idx[LOOM_MAX_DIMS] = {0};
                do {
                    loom_tensor_set(&mask, idx, rng_uniform(0, 1) < 0.4 ? 0 : 1);
                } while (index_next(mn, ms, idx));
            } else {
                make_input(&mask, random_float_dtype(), mn, ms, random_layout(), -3, 3);
                int64_t idx[LOOM_MAX_DIMS] = {0};
                do {
                    if (rng_uniform(0, 1) < 0.3) loom_tensor_set(&mask, idx, -INFINITY);
                } while (index_next(mn, ms, idx));
            }
        }
        const loom_tensor *mp = mk == MASK_NONE ? NULL : &mask;
        CHECK_OK(loom_softmax(&out, &x, mp, dim_arg, log_softmax));
        char what[1024];
        snprintf(what, sizeof what, "softmax case %d log %d %s %s (%s) dim %d, mask %s %s", c,
                 log_softmax, loom_dtype_name(dt), loom_dims_str(n, shape).s, layout_name(l), dim_arg,
                 mask_names[mk], mk == MASK_NONE ? "" : loom_shape_str(&mask).s);
        if (check_shape(&out, LOOM_F32, n, shape, what)) {
            bool ok;
            double err = compare_softmax(&out, &x, mp, dim, log_softmax, &ok);
            CHECK(ok, "%s: max error %g", what, err);
        }
        loom_tensor_free(&x);
        loom_tensor_free(&mask);
        loom_tensor_free(&out);
    }
}

/* Attention-sized scores (B*H, Q, K) with a causal additive mask, through
 * the parallel path and the out-variant. */
static void test_softmax_large(void) {
    rng_seed(44);
    int64_t shape[3] = {4, 300, 577}, ms[2] = {300, 577};
    loom_tensor x = LOOM_TENSOR_EMPTY, mask = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;
    make_input(&x, LOOM_F32, 3, shape, LAYOUT_CONTIGUOUS, -10, 10);
    loom_tensor_zeros(&mask, LOOM_F32, 2, ms);
    float *m = loom_tensor_data(&mask);
    for (int64_t q = 0; q < ms[0]; q++)
        for (int64_t k = q + 277 + 1; k < ms[1]; k++) m[q * ms[1] + k] = -INFINITY;
    loom_tensor_init(&out, LOOM_F32, 3, shape);
    for (int log_softmax = 0; log_softmax < 2; log_softmax++) {
        CHECK_OK(loom_softmax(&out, &x, &mask, -1, log_softmax));
        bool ok;
        double err = compare_softmax(&out, &x, &mask, 2, log_softmax, &ok);
        CHECK(ok, "large causal softmax log %d: max error %g", log_softmax, err);
    }
    loom_tensor_free(&x);
    loom_tensor_free(&mask);
    loom_tensor_free(&out);
}

static void test_softmax_fully_masked_and_errors(void) {
    loom_tensor x = LOOM_TENSOR_EMPTY, mask = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;
    loom_tensor_zeros(&x, LOOM_F32, 2, (int64_t[]){2, 3});
    loom_tensor_zeros(&mask, LOOM_U8, 2, (int64_t[]){2, 1});
    loom_tensor_set(&mask, (int64_t[]){1, 0}, 1); /* row 0 fully excluded, row 1 kept */
    CHECK_OK(loom_softmax(&out, &x, &mask, -1, false));
    check_flat_values(&out, (double[]){0, 0, 0}, 3, "fully masked softmax row");
    CHECK(fabs(loom_tensor_get_flat(&out, 3) - 1.0 / 3) < 1e-7, "kept row: %g",
          loom_tensor_get_flat(&out, 3));
    loom_tensor_free(&out);
    CHECK_OK(loom_softmax(&out, &x, &mask, -1, true));
    CHECK(loom_tensor_get_flat(&out, 1) == -INFINITY, "fully masked log_softmax row gives -inf: %g",
          loom_tensor_get_flat(&out, 1));
    loom_tensor_free(&out);

    loom_tensor bad = LOOM_TENSOR_EMPTY;
    loom_tensor_zeros(&bad, LOOM_F32, 2, (int64_t[]){3, 3});
    CHECK_ERROR(loom_softmax(&out, &x, &bad, -1, false),
                "softmax: 'mask' f32[3, 3] cannot be broadcast to the shape of 'x' f32[2, 3]");
    loom_tensor_free(&bad);
    loom_tensor_zeros(&bad, LOOM_F32, 3, (int64_t[]){1, 2, 3});
    CHECK_ERROR(loom_softmax(&out, &x, &bad, -1, false), "cannot be broadcast to the shape of 'x'");
    loom_tensor_free(&bad);
    loom_tensor_zeros(&bad, LOOM_I32, 1, (int64_t[]){3});
    CHECK_ERROR(loom_softmax(&out, &x, &bad, -1, true),
                "log_softmax: 'mask' must be an additive float mask or a u8 keep-mask, got i32[3]");
    loom_tensor_free(&bad);
    CHECK_ERROR(loom_softmax(&out, &x, NULL, 2, false),
                "softmax: dim 2 is out of range for a tensor with 2 dimensions");
    loom_tensor_zeros(&bad, LOOM_F32, 2, (int64_t[]){3, 2});
    CHECK_ERROR(loom_softmax(&bad, &x, NULL, -1, false), "softmax: 'out' is f32[3, 2], expected f32[2, 3]");
    loom_tensor_free(&bad);
    loom_tensor_zeros(&bad, LOOM_I64, 1, (int64_t[]){3});
    CHECK_ERROR(loom_softmax(&out, &bad, NULL, -1, false), "softmax: 'x' must be f32, f16 or bf16, got i64[3]");
    loom_tensor_free(&bad);
    CHECK(out.storage == NULL, "out stays empty after errors");
    loom_tensor_free(&x);
    loom_tensor_free(&mask);
}

/* ---- layer norm and RMS norm */

typedef enum norm_kind { NORM_LAYER, NORM_RMS } norm_kind;

/* Check a layer norm or RMS norm result against the definition in double.
 * The f32 kernel rounds x * rstd before the mean is subtracted, so rows with a
 * large mean allow an error proportional to |mean| * rstd. */
static double compare_norm(norm_kind kind, const loom_tensor *out, const loom_tensor *x,
                           const loom_tensor *w, const loom_tensor *b, double eps, bool *ok) {
    int n = x->ndim;
    int64_t k = x->shape[n - 1];
    int64_t oshape[LOOM_MAX_DIMS];
    memcpy(oshape, x->shape, sizeof oshape);
    oshape[n - 1] = 1;
    int64_t idx[LOOM_MAX_DIMS] = {0};
    double max_err = 0;
    *ok = true;
    do {
        double sum = 0, sq = 0;
        for (int64_t r = 0; r < k; r++) {
            idx[n - 1] = r;
            double v = tget(x, idx);
            sum += v;
            sq += v * v;
        }
        double mean = sum / (double)k;
        double var = 0;
        for (int64_t r = 0; r < k; r++) {
            idx[n - 1] = r;
            double v = tget(x, idx);
            var += (v - mean) * (v - mean);
        }
        var /= (double)k;
        double rstd = kind == NORM_LAYER ? 1.0 / sqrt(var + eps) : 1.0 / sqrt(sq / (double)k + eps);
        for (int64_t r = 0; r < k; r++) {
            idx[n - 1] = r;
            double v = tget(x, idx);
            double wv = w ? tget(w, (int64_t[]){r}) : 1.0;
            double bv = b ? tget(b, (int64_t[]){r}) : 0.0;
            double want = kind == NORM_LAYER ? (v - mean) * rstd * wv + bv : v * rstd * wv;
            double base = kind == NORM_LAYER ? fabs(v) * rstd + fabs(mean) * rstd + 1 : fabs(v) * rstd + 1;
            double tol = 6e-7 * (base * fabs(wv) + fabs(bv)) + 1e-30;
            double got = tget(out, idx);
            if (!close_value(got, want, tol)) *ok = false;
            max_err = fmax(max_err, fabs(got - want));
        }
        idx[n - 1] = 0;
    } while (index_next(n, oshape, idx));
    return max_err;
}

static void test_norms_random(void) {
    rng_seed(45);
    static const double eps_values[] = {1e-5, 1e-6, 1e-12};
    for (int c = 0; c < 240; c++) {
        norm_kind kind = c % 2 ? NORM_RMS : NORM_LAYER;
        int64_t shape[LOOM_MAX_DIMS];
        int n = random_shape(shape, 4, 6);
        if (c % 4 < 2) shape[n - 1] = rng_int(16, 1100);
        loom_dtype dt = random_float_dtype();
        layout l = random_layout();
        double offset = c % 5 == 0 ? 100.0 : 0.0; /* rows with a large mean */
        bool has_w = rng_int(0, 3) > 0, has_b = kind == NORM_LAYER && rng_int(0, 3) > 0;
        double eps = eps_values[c % 3];
        loom_tensor x = LOOM_TENSOR_EMPTY, w = LOOM_TENSOR_EMPTY, b = LOOM_TENSOR_EMPTY,
                    out = LOOM_TENSOR_EMPTY;
        make_input(&x, dt, n, shape, l, offset - 3, offset + 3);
        int64_t k = shape[n - 1];
        layout lw = rng_int(0, 1) ? LAYOUT_NARROWED : LAYOUT_CONTIGUOUS;
        if (has_w) make_input(&w, random_float_dtype(), 1, &k, lw, 0.5, 1.5);
        if (has_b) make_input(&b, random_float_dtype(), 1, &k, lw, -1, 1);
        const loom_tensor *wp = has_w ? &w : NULL, *bp = has_b ? &b : NULL;
        if (kind == NORM_LAYER)
            CHECK_OK(loom_layer_norm(&out, &x, wp, bp, (float)eps));
        else
            CHECK_OK(loom_rms_norm(&out, &x, wp, (float)eps));
        char what[1024];
        snprintf(what, sizeof what, "%s case %d %s %s (%s) offset %g weight %d bias %d eps %g",
                 kind == NORM_LAYER ? "layer_norm" : "rms_norm", c, loom_dtype_name(dt),
                 loom_dims_str(n, shape).s, layout_name(l), offset, has_w, has_b, eps);
        if (check_shape(&out, LOOM_F32, n, shape, what)) {
            bool ok;
            double err = compare_norm(kind, &out, &x, wp, bp, (double)(float)eps, &ok);
            CHECK(ok, "%s: max error %g", what, err);
        }
        loom_tensor_free(&x);
        loom_tensor_free(&w);
        loom_tensor_free(&b);
        loom_tensor_free(&out);
    }
}

/* Hidden states of a ViT-L/14-336 vision tower (577 tokens) at LLaMA-7B width,
 * through the parallel path and the out-variant. */
static void test_norms_large(void) {
    rng_seed(46);
    int64_t shape[2] = {577, 4096}, k = 4096;
    loom_tensor x = LOOM_TENSOR_EMPTY, w = LOOM_TENSOR_EMPTY, b = LOOM_TENSOR_EMPTY,
                out = LOOM_TENSOR_EMPTY;
    make_input(&x, LOOM_F32, 2, shape, LAYOUT_CONTIGUOUS, -4, 4);
    make_input(&w, LOOM_BF16, 1, &k, LAYOUT_CONTIGUOUS, 0.5, 1.5);
    make_input(&b, LOOM_F32, 1, &k, LAYOUT_CONTIGUOUS, -1, 1);
    loom_tensor_init(&out, LOOM_F32, 2, shape);
    bool ok;
    CHECK_OK(loom_layer_norm(&out, &x, &w, &b, 1e-5f));
    double err = compare_norm(NORM_LAYER, &out, &x, &w, &b, (double)1e-5f, &ok);
    CHECK(ok, "large layer_norm: max error %g", err);
    CHECK_OK(loom_rms_norm(&out, &x, &w, 1e-6f));
    err = compare_norm(NORM_RMS, &out, &x, &w, NULL, (double)1e-6f, &ok);
    CHECK(ok, "large rms_norm: max error %g", err);
    loom_tensor_free(&x);
    loom_tensor_free(&w);
    loom_tensor_free(&b);
    loom_tensor_free(&out);
}

static void test_norm_errors(void) {
    loom_tensor x = LOOM_TENSOR_EMPTY, w = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;
    loom_tensor_zeros(&x, LOOM_F32, 2, (int64_t[]){2, 4});
    loom_tensor_zeros(&w, LOOM_F32, 1, (int64_t[]){5});
    CHECK_ERROR(loom_layer_norm(&out, &x, &w, NULL, 1e-5f),
                "layer_norm: 'weight' is f32[5], expected [4] (the last dimension of 'x')");
    CHECK_ERROR(loom_layer_norm(&out, &x, NULL, &w, 1e-5f), "layer_norm: 'bias' is f32[5], expected [4]");
    CHECK_ERROR(loom_rms_norm(&out, &x, &w, 1e-6f), "rms_norm: 'weight' is f32[5], expected [4]");
    loom_tensor_free(&w);
    loom_tensor_zeros(&w, LOOM_I32, 1, (int64_t[]){4});
    CHECK_ERROR(loom_rms_norm(&out, &x, &w, 1e-6f), "rms_norm: 'weight' must be f32, f16 or bf16, got i32[4]");
    loom_tensor_free(&w);
    loom_tensor_zeros(&w, LOOM_F32, 2, (int64_t[]){2, 3});
    CHECK_ERROR(loom_layer_norm(&w, &x, NULL, NULL, 1e-5f),
                "layer_norm: 'out' is f32[2, 3], expected f32[2, 4]");
    CHECK(out.storage == NULL, "out stays empty after errors");
    loom_tensor_free(&w);
    loom_tensor_free(&x);
    loom_tensor_zeros(&x, LOOM_F32, 0, NULL);
    CHECK_ERROR(loom_layer_norm(&out, &x, NULL, NULL, 1e-5f),
                "layer_norm: 'x' must have at least 1 dimension");
    loom_tensor_free(&x);
}

int main(void) {
    test_reduce_random();
    test_reduce_long_row();
    test_reduce_edges_and_errors();
    test_argmax();
    test_softmax_random();
    test_softmax_large();
    test_softmax_fully_masked_and_errors();
    test_norms_random();
    test_norms_large();
    test_norm_errors();
    return check_summary();
}
