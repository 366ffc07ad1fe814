/* Tests of core/ops_elementwise.c: broadcasting, binary and scalar
 * operators, unary math and activations, and where, each against a plain
 * reference loop in double over seeded random shapes, dtypes and layouts,
 * plus the out-variant and the error messages. */
#include "ops_internal.h"
#include "ops_math_internal.h"
#include "ops_testutil.h"

/* The index into t (right-aligned, size-1 dimensions pinned to 0) of the
 * broadcast result's index idx. */
static void broadcast_index(const loom_tensor *t, int ndim, const int64_t *idx, int64_t *tidx) {
    int lead = ndim - t->ndim;
    for (int d = 0; d < t->ndim; d++) tidx[d] = t->shape[d] == 1 ? 0 : idx[d + lead];
}

/* A shape that broadcasts against shape: some leading dimensions dropped,
 * some sizes replaced by 1. */
static int broadcast_partner(int ndim, const int64_t *shape, int64_t *out) {
    int drop = (int)rng_int(0, ndim - 1);
    int n = ndim - drop;
    for (int d = 0; d < n; d++) out[d] = rng_int(0, 2) == 0 ? 1 : shape[d + drop];
    return n;
}

/* ---- broadcast_shape */

static void test_broadcast_shape(void) {
    static const struct {
        int na;
        int64_t a[4];
        int nb;
        int64_t b[4];
        int nw;
        int64_t want[4];
    } cases[] = {
        {2, {2, 3}, 1, {3}, 2, {2, 3}},
        {3, {4, 1, 3}, 2, {2, 1}, 3, {4, 2, 3}},
        {0, {0}, 1, {5}, 1, {5}},
        {2, {1, 1}, 3, {7, 1, 6}, 3, {7, 1, 6}},
        {1, {0}, 2, {3, 1}, 2, {3, 0}},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int n = -1;
        int64_t got[LOOM_MAX_DIMS];
        CHECK_OK(loom_broadcast_shape(cases[i].na, cases[i].a, cases[i].nb, cases[i].b, &n, got));
        bool same = n == cases[i].nw;
        for (int d = 0; same && d < n; d++) same = got[d] == cases[i].want[d];
        CHECK(same, "case %zu: got %s, expected %s", i, loom_dims_str(n, got).s,
              loom_dims_str(cases[i].nw, cases[i].want).s);
    }
    int n;
    int64_t got[LOOM_MAX_DIMS];
    CHECK_ERROR(loom_broadcast_shape(2, (int64_t[]){2, 3}, 1, (int64_t[]){4}, &n, got),
                "cannot broadcast shapes [2, 3] and [4]");
    CHECK_ERROR(loom_broadcast_shape(2, (int64_t[]){2, 3}, 1, (int64_t[]){4}, &n, got),
                "size 3 vs 4 in dimension -1");
}

/* ---- binary operators on floats */

static const loom_binary_op all_binary_ops[] = {
    LOOM_ADD, LOOM_SUB, LOOM_MUL, LOOM_DIV, LOOM_POW, LOOM_MAXIMUM, LOOM_MINIMUM,
    LOOM_EQ,  LOOM_NE,  LOOM_LT,  LOOM_LE,  LOOM_GT,  LOOM_GE,
};
static const char *binary_names[] = {"add", "sub", "mul", "div", "pow", "maximum", "minimum",
                                     "eq",  "ne",  "lt",  "le",  "gt",  "ge"};

static double ref_binary(loom_binary_op op, double x, double y) {
    switch (op) {
    case LOOM_ADD: return x + y;
    case LOOM_SUB: return x - y;
    case LOOM_MUL: return x * y;
    case LOOM_DIV: return x / y;
    case LOOM_POW: return pow(x, y);
    case LOOM_MAXIMUM: return isnan(x) || isnan(y) ? NAN : fmax(x, y);
    case LOOM_MINIMUM: return isnan(x) || isnan(y) ? NAN : fmin(x, y);
    case LOOM_EQ: return x == y;
    case LOOM_NE: return x != y;
    case LOOM_LT: return x < y;
    case LOOM_LE: return x <= y;
    case LOOM_GT: return x > y;
    case LOOM_GE: return x >= y;
    }
    return NAN;
}

/* Allowed error of the f32 result: rounding of the result (and of the
 * operands for add and sub), a few ulp for powf, none for the rest. */
static double binary_tolerance(loom_binary_op op, double x, double y, double want) {
    switch (op) {
    case LOOM_ADD:
    case LOOM_SUB: return 1.2e-7 * (fabs(x) + fabs(y));
    case LOOM_MUL:
    case LOOM_DIV: return 1.2e-7 * fabs(want);
    case LOOM_POW: return 5e-7 * fabs(want);
    default: return 0.0;
    }
}

/* Compare out = a (op) b against the reference. Returns the max error and
 * sets *ok. */
static double compare_binary(const loom_tensor *out, const loom_tensor *a, const loom_tensor *b,
                             loom_binary_op op, bool *ok) {
    double max_err = 0.0;
    *ok = true;
    int64_t idx[LOOM_MAX_DIMS] = {0}, ia[LOOM_MAX_DIMS], ib[LOOM_MAX_DIMS];
    if (loom_tensor_numel(out) == 0) return 0.0;
    do {
        broadcast_index(a, out->ndim, idx, ia);
        broadcast_index(b, out->ndim, idx, ib);
        double x = tget(a, ia), y = tget(b, ib);
        double want = ref_binary(op, x, y);
        double got = tget(out, idx);
        double tol = binary_tolerance(op, x, y, want);
        if (!close_value(got, want, tol)) *ok = false;
        if (!isnan(want) && !isinf(want)) max_err = fmax(max_err, fabs(got - want));
    } while (index_next(out->ndim, out->shape, idx));
    return max_err;
}

static void test_binary_float_random(void) {
    rng_seed(11);
    for (int c = 0; c < 300; c++) {
        loom_binary_op op = all_binary_ops[c % 13];
        int64_t sa[LOOM_MAX_DIMS], sb[LOOM_MAX_DIMS];
        int na = random_shape(sa, 4, 6);
        int nb = broadcast_partner(na, sa, sb);
        if (rng_int(0, 1)) { /* swap which side broadcasts */
            int64_t tmp[LOOM_MAX_DIMS];
            memcpy(tmp, sa, sizeof tmp);
            memcpy(sa, sb, sizeof tmp);
            memcpy(sb, tmp, sizeof tmp);
            int t = na;
            na = nb;
            nb = t;
        }
        loom_dtype da = random_float_dtype(), db = random_float_dtype();
        layout la = random_layout(), lb = random_layout();
        /* pow gets positive bases and div gets divisors away from 0. */
        double lo = -3, hi = 3, blo = -3, bhi = 3;
        if (op == LOOM_POW) lo = 0.25, blo = -2, bhi = 2;
        if (op == LOOM_DIV) blo = 0.5, bhi = 3;
        loom_tensor a = LOOM_TENSOR_EMPTY, b = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;
        make_input(&a, da, na, sa, la, lo, hi);
        make_input(&b, db, nb, sb, lb, blo, bhi);
        if (op >= LOOM_EQ) {
            /* Whole numbers from a small range, so equal values are common. */
            fill_whole(&a, -2, 3);
            fill_whole(&b, -2, 3);
        }
        CHECK_OK(loom_binary(&out, &a, &b, op));
        int n;
        int64_t so[LOOM_MAX_DIMS];
        loom_broadcast_shape(na, sa, nb, sb, &n, so);
        char what[1024];
        snprintf(what, sizeof what, "case %d %s %s %s (%s) with %s %s (%s)", c, binary_names[op],
                 loom_dtype_name(da), loom_dims_str(na, sa).s, layout_name(la), loom_dtype_name(db),
                 loom_dims_str(nb, sb).s, layout_name(lb));
        if (check_shape(&out, op >= LOOM_EQ ? LOOM_U8 : LOOM_F32, n, so, what)) {
            bool ok;
            double err = compare_binary(&out, &a, &b, op, &ok);
            CHECK(ok, "%s: max error %g", what, err);
        }
        loom_tensor_free(&a);
        loom_tensor_free(&b);
        loom_tensor_free(&out);
    }
}

/* Comparisons between a float tensor and an integer one, with ties. */
static void test_binary_comparisons_mixed(void) {
    rng_seed(12);
    for (int c = 0; c < 60; c++) {
        loom_binary_op op = (loom_binary_op)(LOOM_EQ + c % 6);
        int64_t shape[LOOM_MAX_DIMS];
        int n = random_shape(shape, 3, 5);
        loom_dtype da = random_float_dtype();
        layout la = random_layout();
        loom_tensor a = LOOM_TENSOR_EMPTY, b = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;
        make_input(&a, da, n, shape, la, -2, 3);
        fill_whole(&a, -2, 3);
        make_input(&b, LOOM_I32, n, shape, random_layout(), -2, 3);
        CHECK_OK(loom_binary(&out, &a, &b, op));
        bool ok;
        double err = compare_binary(&out, &a, &b, op, &ok);
        CHECK(out.dtype == LOOM_U8, "mixed comparison case %d gives %s", c, loom_dtype_name(out.dtype));
        CHECK(ok, "mixed comparison case %d %s %s %s (%s): max error %g", c, binary_names[op],
              loom_dtype_name(da), loom_dims_str(n, shape).s, layout_name(la), err);
        loom_tensor_free(&a);
        loom_tensor_free(&b);
        loom_tensor_free(&out);
    }
}

static void test_binary_nan(void) {
    loom_tensor a = LOOM_TENSOR_EMPTY, b = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;
    int64_t shape[1] = {4};
    loom_tensor_init(&a, LOOM_F32, 1, shape);
    loom_tensor_init(&b, LOOM_F32, 1, shape);
    float *pa = loom_tensor_data(&a), *pb = loom_tensor_data(&b);
    float va[4] = {NAN, 1, 2, -1}, vb[4] = {1, NAN, 1, -2};
    memcpy(pa, va, sizeof va);
    memcpy(pb, vb, sizeof vb);
    CHECK_OK(loom_binary(&out, &a, &b, LOOM_MAXIMUM));
    check_flat_values(&out, (double[]){NAN, NAN, 2, -1}, 4, "maximum with NaN");
    loom_tensor_free(&out);
    CHECK_OK(loom_binary(&out, &a, &b, LOOM_MINIMUM));
    check_flat_values(&out, (double[]){NAN, NAN, 1, -2}, 4, "minimum with NaN");
    loom_tensor_free(&a);
    loom_tensor_free(&b);
    loom_tensor_free(&out);
}

/* ---- binary operators on integers */

static int64_t ref_binary_int(loom_binary_op op, int64_t x, int64_t y) {
    switch (op) {
    case LOOM_ADD: return x + y;
    case LOOM_SUB: return x - y;
    case LOOM_MUL: return x * y;
    case LOOM_DIV: return x / y;
    case LOOM_POW: {
        if (y < 0 && x == 1) return 1;
        if (y < 0 && x == -1) return y % 2 ? -1 : 1;
        if (y < 0) return 0;
        int64_t r = 1;
        for (int64_t k = 0; k < y; k++) r *= x;
        return r;
    }
    case LOOM_MAXIMUM: return x > y ? x : y;
    case LOOM_MINIMUM: return x < y ? x : y;
    case LOOM_EQ: return x == y;
    case LOOM_NE: return x != y;
    case LOOM_LT: return x < y;
    case LOOM_LE: return x <= y;
    case LOOM_GT: return x > y;
    case LOOM_GE: return x >= y;
    }
    return 0;
}

static void test_binary_integer(void) {
    rng_seed(13);
    static const loom_dtype int_dtypes[] = {LOOM_I32, LOOM_I64, LOOM_U8};
    for (int c = 0; c < 130; c++) {
        loom_binary_op op = all_binary_ops[c % 13];
        int64_t sa[LOOM_MAX_DIMS], sb[LOOM_MAX_DIMS];
        int na = random_shape(sa, 3, 5);
        int nb = broadcast_partner(na, sa, sb);
        loom_dtype da = int_dtypes[rng_int(0, 1)], db = int_dtypes[rng_int(0, 2)];
        loom_tensor a = LOOM_TENSOR_EMPTY, b = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;
        make_input(&a, da, na, sa, random_layout(), -20, 20);
        double blo = op == LOOM_POW ? 0 : (op == LOOM_DIV ? 1 : -20);
        make_input(&b, db, nb, sb, random_layout(), blo, op == LOOM_POW ? 5 : 20);
        if (op == LOOM_DIV && da != LOOM_U8) {
            /* Negative numerators check truncation toward zero. */
            fill_uniform(&a, -50, 50);
        }
        CHECK_OK(loom_binary(&out, &a, &b, op));
        loom_dtype want_dtype = op >= LOOM_EQ ? LOOM_U8 : LOOM_I64;
        bool ok = out.dtype == want_dtype;
        int64_t idx[LOOM_MAX_DIMS] = {0}, ia[LOOM_MAX_DIMS], ib[LOOM_MAX_DIMS];
        int64_t bad_x = 0, bad_y = 0, bad_got = 0;
        do {
            broadcast_index(&a, out.ndim, idx, ia);
            broadcast_index(&b, out.ndim, idx, ib);
            int64_t x = (int64_t)tget(&a, ia), y = (int64_t)tget(&b, ib);
            int64_t got = (int64_t)tget(&out, idx);
            if (ok && got != ref_binary_int(op, x, y)) {
                ok = false;
                bad_x = x, bad_y = y, bad_got = got;
            }
        } while (index_next(out.ndim, out.shape, idx));
        CHECK(ok, "int case %d %s %s %s, %s %s: dtype %s, %lld op %lld gave %lld", c,
              binary_names[op], loom_dtype_name(da), loom_dims_str(na, sa).s, loom_dtype_name(db),
              loom_dims_str(nb, sb).s, loom_dtype_name(out.dtype), (long long)bad_x, (long long)bad_y,
              (long long)bad_got);
        loom_tensor_free(&a);
        loom_tensor_free(&b);
        loom_tensor_free(&out);
    }
}

static void test_binary_mixed_and_errors(void) {
    loom_tensor a = LOOM_TENSOR_EMPTY, b = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;
    /* i32 with f16 gives f32. */
    loom_tensor_arange(&a, LOOM_I32, -3, 3, 1);
    loom_tensor_arange(&b, LOOM_F16, 0, 6, 1);
    CHECK_OK(loom_binary(&out, &a, &b, LOOM_MUL));
    CHECK(out.dtype == LOOM_F32, "i32 * f16 gives %s", loom_dtype_name(out.dtype));
    for (int64_t i = 0; i < 6; i++) {
        double want = (double)(i - 3) * (double)i;
        CHECK(loom_tensor_get_flat(&out, i) == want, "mixed mul at %lld: %g vs %g", (long long)i,
              loom_tensor_get_flat(&out, i), want);
    }
    loom_tensor_free(&out);

    /* Integer division by zero fails and leaves a preallocated out alone. */
    loom_tensor zero_div = LOOM_TENSOR_EMPTY;
    loom_tensor_arange(&zero_div, LOOM_I64, -1, 5, 1); /* contains a 0 */
    loom_tensor pre = LOOM_TENSOR_EMPTY;
    loom_tensor_init(&pre, LOOM_I64, 1, (int64_t[]){6});
    loom_tensor_fill(&pre, 7);
    CHECK_ERROR(loom_binary(&pre, &a, &zero_div, LOOM_DIV), "div: integer division by zero");
    bool untouched = true;
    for (int64_t i = 0; i < 6; i++) untouched = untouched && loom_tensor_get_flat(&pre, i) == 7;
    CHECK(untouched, "out unchanged after division by zero");
    CHECK_ERROR(loom_binary(&out, &a, &zero_div, LOOM_DIV), "integer division by zero");
    CHECK(out.storage == NULL, "empty out stays empty after an error");

    /* Incompatible shapes. */
    loom_tensor c = LOOM_TENSOR_EMPTY;
    loom_tensor_zeros(&c, LOOM_F32, 2, (int64_t[]){2, 4});
    CHECK_ERROR(loom_binary(&out, &c, &b, LOOM_ADD), "add: cannot broadcast shapes [2, 4] and [6]");

    /* Out of the wrong shape, wrong dtype, or not contiguous. */
    loom_tensor wrong = LOOM_TENSOR_EMPTY;
    loom_tensor_zeros(&wrong, LOOM_F32, 1, (int64_t[]){5});
    CHECK_ERROR(loom_binary(&wrong, &a, &b, LOOM_ADD), "add: 'out' is f32[5], expected f32[6]");
    loom_tensor_free(&wrong);
    loom_tensor_zeros(&wrong, LOOM_I64, 1, (int64_t[]){6});
    CHECK_ERROR(loom_binary(&wrong, &a, &b, LOOM_SUB), "sub: 'out' is i64[6], expected f32[6]");
    loom_tensor_free(&wrong);
    loom_tensor big = LOOM_TENSOR_EMPTY, strided = LOOM_TENSOR_EMPTY;
    loom_tensor_zeros(&big, LOOM_F32, 2, (int64_t[]){6, 2});
    loom_tensor_select(&strided, &big, 1, 0);
    CHECK_ERROR(loom_binary(&strided, &a, &b, LOOM_ADD), "must be contiguous");
    loom_tensor_free(&strided);
    loom_tensor_free(&big);

    /* An empty input. */
    loom_tensor none = LOOM_TENSOR_EMPTY;
    CHECK_ERROR(loom_binary(&out, &none, &b, LOOM_ADD), "add: 'a' is empty");
    CHECK_ERROR(loom_binary(&out, &a, &b, (loom_binary_op)99), "unknown operation 99");

    loom_tensor_free(&a);
    loom_tensor_free(&b);
    loom_tensor_free(&c);
    loom_tensor_free(&zero_div);
    loom_tensor_free(&pre);
}

/* The out-variant writes into a preallocated tensor and gives the same values. */
static void test_binary_out_variant(void) {
    rng_seed(14);
    int64_t sa[3] = {5, 1, 7}, sb[2] = {4, 7}, so[3] = {5, 4, 7};
    loom_tensor a = LOOM_TENSOR_EMPTY, b = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;
    make_input(&a, LOOM_BF16, 3, sa, LAYOUT_NARROWED, -1, 1);
    make_input(&b, LOOM_F32, 2, sb, LAYOUT_TRANSPOSED, -1, 1);
    loom_tensor_init(&out, LOOM_F32, 3, so);
    void *data = loom_tensor_data(&out);
    CHECK_OK(loom_binary(&out, &a, &b, LOOM_SUB));
    CHECK(loom_tensor_data(&out) == data, "out-variant keeps its storage");
    bool ok;
    double err = compare_binary(&out, &a, &b, LOOM_SUB, &ok);
    CHECK(ok, "out-variant sub: max error %g", err);
    loom_tensor_free(&a);
    loom_tensor_free(&b);
    loom_tensor_free(&out);
}

/* Large operands, also transposed and with a broadcast row, take the OpenMP path. */
static void test_binary_large(void) {
    rng_seed(15);
    int64_t sa[2] = {577, 1024}, sb[1] = {1024};
    loom_tensor a = LOOM_TENSOR_EMPTY, b = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;
    static const layout layouts[] = {LAYOUT_CONTIGUOUS, LAYOUT_TRANSPOSED};
    for (int l = 0; l < 2; l++) {
        make_input(&a, LOOM_F32, 2, sa, layouts[l], -2, 2);
        make_input(&b, LOOM_F32, 1, sb, LAYOUT_CONTIGUOUS, -2, 2);
        static const loom_binary_op ops[] = {LOOM_ADD, LOOM_MUL};
        for (int k = 0; k < 2; k++) {
            CHECK_OK(loom_binary(&out, &a, &b, ops[k]));
            bool ok;
            double err = compare_binary(&out, &a, &b, ops[k], &ok);
            CHECK(ok, "large %s %s: max error %g", binary_names[ops[k]], layout_name(layouts[l]), err);
            loom_tensor_free(&out);
        }
        loom_tensor_free(&a);
        loom_tensor_free(&b);
    }
}

/* ---- scalar operators */

static void test_binary_scalar(void) {
    rng_seed(16);
    static const double scalars[] = {2.0, 3.0, 0.5, -0.5, -1.0, -2.0, 1.7, -3.25};
    for (int c = 0; c < 200; c++) {
        loom_binary_op op = all_binary_ops[c % 13];
        double s = scalars[(c / 13) % 8];
        bool first = (c / 7) % 2;
        int64_t shape[LOOM_MAX_DIMS];
        int n = random_shape(shape, 3, 6);
        loom_dtype dt = random_float_dtype();
        layout l = random_layout();
        loom_tensor a = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;
        bool pow_case = op == LOOM_POW;
        make_input(&a, dt, n, shape, l, pow_case ? 0.25 : -3, 3);
        if (pow_case && first) s = fabs(s); /* a positive base */
        CHECK_OK(loom_binary_scalar(&out, &a, s, op, first));
        float sf = (float)s;
        bool ok = out.dtype == (op >= LOOM_EQ ? LOOM_U8 : LOOM_F32);
        double max_err = 0;
        int64_t idx[LOOM_MAX_DIMS] = {0};
        do {
            double x = tget(&a, idx);
            double want = first ? ref_binary(op, sf, x) : ref_binary(op, x, sf);
            double tol = first ? binary_tolerance(op, sf, x, want) : binary_tolerance(op, x, sf, want);
            double got = tget(&out, idx);
            if (!close_value(got, want, tol)) ok = false;
            if (isfinite(want)) max_err = fmax(max_err, fabs(got - want));
        } while (index_next(n, shape, idx));
        CHECK(ok, "scalar case %d: %s %s %s (%s) scalar %g first %d: max error %g", c,
              binary_names[op], loom_dtype_name(dt), loom_dims_str(n, shape).s, layout_name(l), s,
              first, max_err);
        loom_tensor_free(&a);
        loom_tensor_free(&out);
    }

    /* Integer tensors: whole scalars stay integer, fractional ones give f32. */
    loom_tensor a = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;
    loom_tensor_arange(&a, LOOM_I32, -4, 4, 1);
    CHECK_OK(loom_binary_scalar(&out, &a, 3, LOOM_DIV, false));
    CHECK(out.dtype == LOOM_I64, "i32 / 3 gives %s", loom_dtype_name(out.dtype));
    for (int64_t i = 0; i < 8; i++)
        CHECK(loom_tensor_get_flat(&out, i) == (double)((i - 4) / 3), "i32 / 3 at %lld: %g",
              (long long)i, loom_tensor_get_flat(&out, i));
    loom_tensor_free(&out);
    CHECK_OK(loom_binary_scalar(&out, &a, 0.5, LOOM_MUL, false));
    CHECK(out.dtype == LOOM_F32, "i32 * 0.5 gives %s", loom_dtype_name(out.dtype));
    check_flat_values(&out, (double[]){-2, -1.5}, 2, "i32 * 0.5");
    loom_tensor_free(&out);
    CHECK_OK(loom_binary_scalar(&out, &a, 10, LOOM_SUB, true));
    CHECK(loom_tensor_get_flat(&out, 0) == 14, "10 - a at 0: %g", loom_tensor_get_flat(&out, 0));
    loom_tensor_free(&out);
    CHECK_ERROR(loom_binary_scalar(&out, &a, 0, LOOM_DIV, false), "integer division by zero");
    loom_tensor_free(&a);
}

/* ---- unary operators */

static const loom_unary_op all_unary_ops[] = {
    LOOM_NEG,  LOOM_ABS,       LOOM_EXP,        LOOM_LOG,  LOOM_SQRT,       LOOM_RSQRT,  LOOM_SIN,
    LOOM_COS,  LOOM_TANH,      LOOM_SIGMOID,    LOOM_RELU, LOOM_GELU,       LOOM_GELU_TANH,
    LOOM_QUICK_GELU, LOOM_SILU, LOOM_RECIPROCAL, LOOM_SQUARE, LOOM_FLOOR,   LOOM_CEIL,   LOOM_ROUND,
};
#define N_UNARY ((int)(sizeof all_unary_ops / sizeof all_unary_ops[0]))
static const char *unary_names[] = {
    "neg",  "abs",        "exp",  "log",       "sqrt",   "rsqrt",      "sin",
    "cos",  "tanh",       "sigmoid", "relu",   "gelu",   "gelu_tanh",  "quick_gelu",
    "silu", "reciprocal", "square", "floor",   "ceil",   "round",
};

/* The definitions in double: GELU as x/2 (1 + erf(x / sqrt 2)), the tanh
 * form with sqrt(2/pi) and 0.044715, QuickGELU as x sigmoid(1.702 x). */
static double ref_unary(loom_unary_op op, double x) {
    switch (op) {
    case LOOM_NEG: return -x;
    case LOOM_ABS: return fabs(x);
    case LOOM_EXP: return exp(x);
    case LOOM_LOG: return log(x);
    case LOOM_SQRT: return sqrt(x);
    case LOOM_RSQRT: return 1.0 / sqrt(x);
    case LOOM_SIN: return sin(x);
    case LOOM_COS: return cos(x);
    case LOOM_TANH: return tanh(x);
    case LOOM_SIGMOID: return 1.0 / (1.0 + exp(-x));
    case LOOM_RELU: return x < 0 ? 0 : x;
    case LOOM_GELU: return 0.5 * x * (1.0 + erf(x / sqrt(2.0)));
    case LOOM_GELU_TANH:
        return 0.5 * x * (1.0 + tanh(sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
    case LOOM_QUICK_GELU: return x / (1.0 + exp(-1.702 * x));
    case LOOM_SILU: return x / (1.0 + exp(-x));
    case LOOM_RECIPROCAL: return 1.0 / x;
    case LOOM_SQUARE: return x * x;
    case LOOM_FLOOR: return floor(x);
    case LOOM_CEIL: return ceil(x);
    case LOOM_ROUND: return nearbyint(x);
    }
    return NAN;
}

/* f32 rounding at each step allows a few ulp of the result, and the
 * activations also round the argument of erf, tanh or exp. */
static double unary_tolerance(loom_unary_op op, double x, double want) {
    switch (op) {
    case LOOM_NEG: case LOOM_ABS: case LOOM_RELU: case LOOM_SQUARE:
    case LOOM_FLOOR: case LOOM_CEIL: case LOOM_ROUND:
        return 6e-8 * fabs(want);
    case LOOM_GELU: case LOOM_GELU_TANH: case LOOM_QUICK_GELU: case LOOM_SILU:
        return 4e-7 * (fabs(want) + fabs(x) * 0.5);
    default:
        return 4e-7 * fabs(want) + 1e-12;
    }
}

static void test_unary_random(void) {
    rng_seed(21);
    for (int c = 0; c < 400; c++) {
        loom_unary_op op = all_unary_ops[c % N_UNARY];
        int64_t shape[LOOM_MAX_DIMS];
        int n = random_shape(shape, 4, 6);
        loom_dtype dt = random_float_dtype();
        layout l = random_layout();
        double lo = -6, hi = 6;
        if (op == LOOM_LOG || op == LOOM_SQRT || op == LOOM_RSQRT) lo = 0.01, hi = 50;
        if (op == LOOM_EXP) lo = -80, hi = 80;
        if (op == LOOM_RECIPROCAL) lo = 0.1, hi = 10;
        loom_tensor x = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;
        make_input(&x, dt, n, shape, l, lo, hi);
        CHECK_OK(loom_unary(&out, &x, op));
        char what[1024];
        snprintf(what, sizeof what, "unary case %d %s %s %s (%s)", c, unary_names[op],
                 loom_dtype_name(dt), loom_dims_str(n, shape).s, layout_name(l));
        if (!check_shape(&out, LOOM_F32, n, shape, what)) {
            loom_tensor_free(&x);
            continue;
        }
        bool ok = true;
        double max_err = 0, bad_x = 0;
        int64_t idx[LOOM_MAX_DIMS] = {0};
        do {
            double v = tget(&x, idx);
            double want = ref_unary(op, v);
            double got = tget(&out, idx);
            if (!close_value(got, want, unary_tolerance(op, v, want))) {
                if (ok) bad_x = v;
                ok = false;
            }
            max_err = fmax(max_err, fabs(got - want));
        } while (index_next(n, shape, idx));
        CHECK(ok, "%s: max error %g, first failure at x = %.9g", what, max_err, bad_x);
        loom_tensor_free(&x);
        loom_tensor_free(&out);
    }
}

static void test_unary_special_values(void) {
    float in[] = {0.5f, 1.5f, 2.5f, -0.5f, -1.5f, NAN, -INFINITY, INFINITY};
    int64_t shape[1] = {8};
    loom_tensor x = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;
    loom_tensor_init(&x, LOOM_F32, 1, shape);
    memcpy(loom_tensor_data(&x), in, sizeof in);

    /* torch.round rounds halves to even. */
    CHECK_OK(loom_unary(&out, &x, LOOM_ROUND));
    check_flat_values(&out, (double[]){0, 2, 2, -0.0, -2}, 5, "round");
    loom_tensor_free(&out);

    CHECK_OK(loom_unary(&out, &x, LOOM_RELU));
    check_flat_values(&out, (double[]){0.5, 1.5, 2.5, 0, 0, NAN, 0, INFINITY}, 8, "relu");
    loom_tensor_free(&out);

    CHECK_OK(loom_unary(&out, &x, LOOM_SIGMOID));
    const float *o = loom_tensor_data(&out);
    CHECK(isnan(o[5]), "sigmoid(NaN) = %g", o[5]);
    CHECK(o[6] == 0, "sigmoid(-inf) = %g", o[6]);
    CHECK(o[7] == 1, "sigmoid(inf) = %g", o[7]);
    loom_tensor_free(&out);

    CHECK_OK(loom_unary(&out, &x, LOOM_EXP));
    o = loom_tensor_data(&out);
    CHECK(isnan(o[5]), "exp(NaN) = %g", o[5]);
    CHECK(o[6] == 0, "exp(-inf) = %g", o[6]);
    CHECK(o[7] == INFINITY, "exp(inf) = %g", o[7]);
    loom_tensor_free(&out);
    loom_tensor_free(&x);
}

/* loom_expf against exp in double over a sweep of bit patterns, including
 * the subnormal results and the overflow boundary. */
static void test_expf_accuracy(void) {
    double max_ulp = 0;
    float worst = 0;
    bool specials_ok = true;
    for (uint32_t u = 0; u < 0xff800000u; u += 997) {
        for (int sign = 0; sign < 2; sign++) {
            uint32_t bits = u | (sign ? 0x80000000u : 0);
            float x;
            memcpy(&x, &bits, sizeof x);
            if (isnan(x)) continue;
            float got = loom_expf(x);
            double want = exp((double)x);
            float want_f = (float)want;
            if (want_f == 0 || isinf(want_f)) {
                /* Past the ends of the range: the result may differ from
                 * the rounded value only by the smallest subnormal. */
                if (isinf(want_f) ? !isinf(got) : fabs(got - want) > 0x1.0p-149) specials_ok = false;
                continue;
            }
            double ulp_size = nextafterf(fabsf(want_f), INFINITY) - fabsf(want_f);
            double ulp = fabs(got - want) / ulp_size;
            if (ulp > max_ulp) max_ulp = ulp, worst = x;
        }
    }
    CHECK(max_ulp < 1.0, "loom_expf max error %.3f ulp at x = %.9g", max_ulp, worst);
    CHECK(specials_ok, "loom_expf at the ends of the range");
    CHECK(isnan(loom_expf(NAN)), "loom_expf(NaN) is NaN");
    CHECK(loom_expf(0.0f) == 1.0f, "loom_expf(0) = %.9g", loom_expf(0.0f));
}

/* Error of got against want in ulps of the float nearest want (the ulp below
 * 1 for results that round to +-1). */
static double ulp_error(float got, double want) {
    float want_f = (float)want;
    double ulp_size = nextafterf(fabsf(want_f), INFINITY) - fabsf(want_f);
    if (fabsf(want_f) == 1.0f) ulp_size = 0x1.0p-24;
    return fabs(got - want) / ulp_size;
}

/* Max ulp error of fn against ref over every `step`-th float bit pattern
 * from `from` to `to` (magnitudes), both signs. *worst receives the argument
 * of the largest error. */
static double max_ulp_error(float (*fn)(float), double (*ref)(double), uint32_t from, uint32_t to,
                            uint32_t step, float *worst) {
    double max_ulp = 0;
    for (uint32_t u = from; u < to; u += step) {
        for (int sign = 0; sign < 2; sign++) {
            uint32_t bits = u | (sign ? 0x80000000u : 0);
            float x;
            memcpy(&x, &bits, sizeof x);
            double e = ulp_error(fn(x), ref((double)x));
            if (e > max_ulp) max_ulp = e, *worst = x;
        }
    }
    return max_ulp;
}

static float erf_under_test(float x) { return loom_erff(x); }
static float tanh_under_test(float x) { return loom_tanhf(x); }

static uint32_t float_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* loom_erff against erf in double: a sweep over all magnitudes (subnormals
 * to the tails), and every float around the switches between its pieces at
 * 0.75 and 1.25 and the end of the fitted range at 3.92. */
static void test_erff_accuracy(void) {
    float worst = 0;
    double e = max_ulp_error(erf_under_test, erf, 0, 0x7f800000u, 997, &worst);
    CHECK(e < 1.0, "loom_erff max error %.3f ulp at x = %.9g over the sweep", e, worst);
    e = max_ulp_error(erf_under_test, erf, float_bits(0.7f), float_bits(1.3f), 1, &worst);
    CHECK(e < 1.0, "loom_erff max error %.3f ulp at x = %.9g in [0.7, 1.3]", e, worst);
    e = max_ulp_error(erf_under_test, erf, float_bits(3.8f), float_bits(4.0f), 1, &worst);
    CHECK(e < 1.0, "loom_erff max error %.3f ulp at x = %.9g near 3.92", e, worst);

    CHECK(isnan(loom_erff(NAN)), "loom_erff(NaN) = %g", loom_erff(NAN));
    CHECK(loom_erff(INFINITY) == 1.0f, "loom_erff(inf) = %g", loom_erff(INFINITY));
    CHECK(loom_erff(-INFINITY) == -1.0f, "loom_erff(-inf) = %g", loom_erff(-INFINITY));
    CHECK(loom_erff(-0.0f) == 0.0f, "loom_erff(-0) = %g", loom_erff(-0.0f));
    CHECK(signbit(loom_erff(-0.0f)), "loom_erff(-0) lost the sign of zero");
    float tiny = 0x1.0p-140f;
    CHECK(loom_erff(tiny) == (float)(tiny * 1.1283791670955126),
          "loom_erff(2^-140) = %a, expected 2/sqrt(pi) 2^-140", loom_erff(tiny));
}

static void test_tanhf_accuracy(void) {
    float worst = 0;
    double e = max_ulp_error(tanh_under_test, tanh, 0, 0x7f800000u, 997, &worst);
    CHECK(e < 1.2, "loom_tanhf max error %.3f ulp at x = %.9g over the sweep", e, worst);
    e = max_ulp_error(tanh_under_test, tanh, float_bits(0.9f), float_bits(1.1f), 1, &worst);
    CHECK(e < 1.2, "loom_tanhf max error %.3f ulp at x = %.9g near 1", e, worst);

    CHECK(isnan(loom_tanhf(NAN)), "loom_tanhf(NaN) = %g", loom_tanhf(NAN));
    CHECK(loom_tanhf(INFINITY) == 1.0f, "loom_tanhf(inf) = %g", loom_tanhf(INFINITY));
    CHECK(loom_tanhf(-INFINITY) == -1.0f, "loom_tanhf(-inf) = %g", loom_tanhf(-INFINITY));
    CHECK(loom_tanhf(-0.0f) == 0.0f, "loom_tanhf(-0) = %g", loom_tanhf(-0.0f));
    CHECK(signbit(loom_tanhf(-0.0f)), "loom_tanhf(-0) lost the sign of zero");
    CHECK(loom_tanhf(100.0f) == 1.0f, "loom_tanhf(100) = %.9g", loom_tanhf(100.0f));
}

/* Both GELUs stay within 1e-6 of the same formulas over glibc's erff and
 * tanhf, which they replaced, on a grid of step 2^-10 over [-12, 12]. */
static void test_gelu_matches_libm(void) {
    const int64_t n = 24 * 1024 + 1;
    loom_tensor x = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_tensor_init(&x, LOOM_F32, 1, &n));
    float *px = loom_tensor_data(&x);
    for (int64_t i = 0; i < n; i++) px[i] = -12.0f + (float)i / 1024.0f;

    const float sqrt1_2 = (float)M_SQRT1_2, beta = (float)(M_SQRT2 * M_2_SQRTPI * 0.5);
    CHECK_OK(loom_unary(&out, &x, LOOM_GELU));
    double max_diff = 0;
    for (int64_t i = 0; i < n && out.storage; i++) {
        float v = px[i];
        float libm = v * 0.5f * (1.0f + erff(v * sqrt1_2));
        max_diff = fmax(max_diff, fabs(((float *)loom_tensor_data(&out))[i] - libm));
    }
    CHECK(max_diff <= 1e-6, "gelu differs from the erff version by up to %g", max_diff);
    loom_tensor_free(&out);

    CHECK_OK(loom_unary(&out, &x, LOOM_GELU_TANH));
    max_diff = 0;
    for (int64_t i = 0; i < n && out.storage; i++) {
        float v = px[i];
        float libm = 0.5f * v * (1.0f + tanhf(beta * (v + 0.044715f * (v * v * v))));
        max_diff = fmax(max_diff, fabs(((float *)loom_tensor_data(&out))[i] - libm));
    }
    CHECK(max_diff <= 1e-6, "gelu_tanh differs from the tanhf version by up to %g", max_diff);
    loom_tensor_free(&out);
    loom_tensor_free(&x);
}

static void test_unary_integer_and_errors(void) {
    loom_tensor x = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;
    loom_tensor_arange(&x, LOOM_I32, -3, 3, 1);
    CHECK_OK(loom_unary(&out, &x, LOOM_NEG));
    CHECK(out.dtype == LOOM_I32, "neg keeps i32, got %s", loom_dtype_name(out.dtype));
    for (int64_t i = 0; i < 6; i++)
        CHECK(loom_tensor_get_flat(&out, i) == (double)(3 - i), "neg at %lld: %g", (long long)i,
              loom_tensor_get_flat(&out, i));
    loom_tensor_free(&out);
    CHECK_OK(loom_unary(&out, &x, LOOM_ABS));
    CHECK(out.dtype == LOOM_I32, "abs keeps i32, got %s", loom_dtype_name(out.dtype));
    check_flat_values(&out, (double[]){3, 2, 1, 0, 1, 2}, 6, "abs of i32");
    loom_tensor_free(&out);
    CHECK_OK(loom_unary(&out, &x, LOOM_SQUARE));
    CHECK(out.dtype == LOOM_F32, "square of i32 gives %s", loom_dtype_name(out.dtype));
    check_flat_values(&out, (double[]){9, 4, 1, 0, 1, 4}, 6, "square of i32");
    loom_tensor_free(&out);

    loom_tensor wrong = LOOM_TENSOR_EMPTY;
    loom_tensor_zeros(&wrong, LOOM_F32, 2, (int64_t[]){2, 3});
    CHECK_ERROR(loom_unary(&wrong, &x, LOOM_GELU), "gelu: 'out' is f32[2, 3], expected f32[6]");
    CHECK_ERROR(loom_unary(&out, &x, (loom_unary_op)77), "unary: unknown operation 77");
    loom_tensor none = LOOM_TENSOR_EMPTY;
    CHECK_ERROR(loom_unary(&out, &none, LOOM_TANH), "tanh: 'x' is empty");
    loom_tensor_free(&wrong);
    loom_tensor_free(&x);
}

/* Activations over a (577, 4096) tensor, the size of a ViT-L MLP hidden
 * state, through the parallel path, with the out-variant reused. */
static void test_unary_large(void) {
    rng_seed(22);
    int64_t shape[2] = {577, 4096};
    loom_tensor x = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;
    make_input(&x, LOOM_F32, 2, shape, LAYOUT_CONTIGUOUS, -5, 5);
    loom_tensor_init(&out, LOOM_F32, 2, shape);
    static const loom_unary_op ops[] = {LOOM_GELU, LOOM_QUICK_GELU, LOOM_SILU, LOOM_GELU_TANH};
    const float *px = loom_tensor_data(&x);
    for (int k = 0; k < 4; k++) {
        CHECK_OK(loom_unary(&out, &x, ops[k]));
        const float *po = loom_tensor_data(&out);
        double max_err = 0;
        bool ok = true;
        for (int64_t i = 0; i < shape[0] * shape[1]; i++) {
            double want = ref_unary(ops[k], px[i]);
            double err = fabs(po[i] - want);
            if (err > unary_tolerance(ops[k], px[i], want)) ok = false;
            max_err = fmax(max_err, err);
        }
        CHECK(ok, "large %s: max error %g", unary_names[ops[k]], max_err);
    }
    loom_tensor_free(&x);
    loom_tensor_free(&out);
}

/* ---- where */

static void test_where(void) {
    rng_seed(31);
    for (int c = 0; c < 120; c++) {
        int64_t so[LOOM_MAX_DIMS], sc[LOOM_MAX_DIMS], sa[LOOM_MAX_DIMS], sb[LOOM_MAX_DIMS];
        int n = random_shape(so, 4, 5);
        int nc = broadcast_partner(n, so, sc);
        int na = broadcast_partner(n, so, sa);
        int nb = broadcast_partner(n, so, sb);
        /* One of the three keeps the full shape, so the result has it. */
        int full = (int)rng_int(0, 2);
        if (full == 0) nc = n, memcpy(sc, so, sizeof so);
        if (full == 1) na = n, memcpy(sa, so, sizeof so);
        if (full == 2) nb = n, memcpy(sb, so, sizeof so);
        bool ints = c % 4 == 3;
        loom_dtype dc = c % 3 == 0 ? LOOM_I64 : LOOM_U8;
        loom_dtype da = ints ? LOOM_I32 : random_float_dtype();
        loom_dtype db = ints ? LOOM_I32 : random_float_dtype();
        loom_tensor cond = LOOM_TENSOR_EMPTY, a = LOOM_TENSOR_EMPTY, b = LOOM_TENSOR_EMPTY,
                    out = LOOM_TENSOR_EMPTY;
        make_input(&cond, dc, nc, sc, random_layout(), 0, 2);
        make_input(&a, da, na, sa, random_layout(), -5, 5);
        make_input(&b, db, nb, sb, random_layout(), -5, 5);
        CHECK_OK(loom_where(&out, &cond, &a, &b));
        int n1, nw;
        int64_t s1[LOOM_MAX_DIMS], sw[LOOM_MAX_DIMS];
        loom_broadcast_shape(nc, sc, na, sa, &n1, s1);
        loom_broadcast_shape(n1, s1, nb, sb, &nw, sw);
        char what[1024];
        snprintf(what, sizeof what, "where case %d: cond %s %s, a %s %s, b %s %s", c,
                 loom_dtype_name(dc), loom_dims_str(nc, sc).s, loom_dtype_name(da),
                 loom_dims_str(na, sa).s, loom_dtype_name(db), loom_dims_str(nb, sb).s);
        if (check_shape(&out, ints ? LOOM_I32 : LOOM_F32, nw, sw, what)) {
            bool ok = true;
            int64_t idx[LOOM_MAX_DIMS] = {0}, ic[LOOM_MAX_DIMS], ia[LOOM_MAX_DIMS], ib[LOOM_MAX_DIMS];
            do {
                broadcast_index(&cond, nw, idx, ic);
                broadcast_index(&a, nw, idx, ia);
                broadcast_index(&b, nw, idx, ib);
                double want = tget(&cond, ic) != 0 ? tget(&a, ia) : tget(&b, ib);
                if (tget(&out, idx) != want) ok = false;
            } while (index_next(nw, sw, idx));
            CHECK(ok, "%s: values differ", what);
        }
        loom_tensor_free(&cond);
        loom_tensor_free(&a);
        loom_tensor_free(&b);
        loom_tensor_free(&out);
    }

    loom_tensor cond = LOOM_TENSOR_EMPTY, a = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;
    loom_tensor_zeros(&cond, LOOM_F32, 1, (int64_t[]){3});
    loom_tensor_zeros(&a, LOOM_F32, 1, (int64_t[]){4});
    CHECK_ERROR(loom_where(&out, &cond, &a, &a), "where: 'cond' must be u8 or an integer dtype");
    loom_tensor_free(&cond);
    loom_tensor_zeros(&cond, LOOM_U8, 1, (int64_t[]){3});
    CHECK_ERROR(loom_where(&out, &cond, &a, &a), "where: cannot broadcast shapes [3] and [4]");
    loom_tensor_free(&cond);
    loom_tensor_free(&a);
}

int main(void) {
    test_broadcast_shape();
    test_binary_float_random();
    test_binary_comparisons_mixed();
    test_binary_nan();
    test_binary_integer();
    test_binary_mixed_and_errors();
    test_binary_out_variant();
    test_binary_large();
    test_binary_scalar();
    test_unary_random();
    test_unary_special_values();
    test_expf_accuracy();
    test_erff_accuracy();
    test_tanhf_accuracy();
    test_gelu_matches_libm();
    test_unary_integer_and_errors();
    test_unary_large();
    test_where();
    return check_summary();
}
