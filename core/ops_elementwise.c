/* Element-wise operators: broadcasting, binary arithmetic and comparisons,
 * unary math and activations, and where. Float math is done in f32 with the
 * same formulas as PyTorch's CPU kernels, and integer math in i64. */
#include <math.h>

#include "ops_internal.h"
#include "ops_math_internal.h"

/* Elements handled per call of a chunk function, and the size of the f32
 * buffers that f16/bf16 and strided operands are converted into. */
#define CHUNK 8192
#define BUF 1024

static bool is_large(const loom_iter *it) {
    return it->rows * it->inner >= LOOM_PARALLEL_MIN_ELEMS;
}

/* Elements [col, col + n) of operand k as f32, n <= BUF: a pointer into the
 * operand itself when it is f32, otherwise converted into buf. *step gets the
 * distance between elements (0 for a broadcast operand). */
static const float *float_operand(const loom_iter *it, int k, int64_t col, int64_t n,
                                  loom_dtype dtype, float *buf, int64_t *step) {
    int64_t stride = it->stride[k];
    const char *p = it->ptr[k] + col * stride;
    size_t size = loom_dtype_size(dtype);
    if (dtype == LOOM_F32) {
        *step = stride / (int64_t)sizeof(float);
        return (const float *)p;
    }
    if (stride == 0) {
        buf[0] = loom_load_f32(p, dtype);
        *step = 0;
        return buf;
    }
    loom_row_load_f32(buf, p, n, stride / (int64_t)size, dtype);
    *step = 1;
    return buf;
}

/* ---- broadcasting */

int loom_broadcast_shape(int na, const int64_t *a, int nb, const int64_t *b, int *nout,
                         int64_t *out) {
    int n = na > nb ? na : nb;
    if (na < 0 || nb < 0 || n > LOOM_MAX_DIMS)
        return loom_error("cannot broadcast shapes with %d and %d dimensions (at most %d)", na, nb,
                          LOOM_MAX_DIMS);
    int64_t result[LOOM_MAX_DIMS];
    for (int i = 0; i < n; i++) {
        /* i counts from the last dimension. */
        int64_t da = i < na ? a[na - 1 - i] : 1;
        int64_t db = i < nb ? b[nb - 1 - i] : 1;
        if (da != db && da != 1 && db != 1)
            return loom_error("cannot broadcast shapes %s and %s (size %lld vs %lld in dimension %d)",
                              loom_dims_str(na, a).s, loom_dims_str(nb, b).s, (long long)da,
                              (long long)db, -1 - i);
        result[n - 1 - i] = da == 1 ? db : da;
    }
    *nout = n;
    for (int i = 0; i < n; i++) out[i] = result[i];
    return LOOM_OK;
}

/* ---- binary operators */

static const char *binary_name(loom_binary_op op) {
    switch (op) {
    case LOOM_ADD: return "add";
    case LOOM_SUB: return "sub";
    case LOOM_MUL: return "mul";
    case LOOM_DIV: return "div";
    case LOOM_POW: return "pow";
    case LOOM_MAXIMUM: return "maximum";
    case LOOM_MINIMUM: return "minimum";
    case LOOM_EQ: return "eq";
    case LOOM_NE: return "ne";
    case LOOM_LT: return "lt";
    case LOOM_LE: return "le";
    case LOOM_GT: return "gt";
    case LOOM_GE: return "ge";
    }
    return NULL;
}

static bool is_comparison(loom_binary_op op) { return op >= LOOM_EQ && op <= LOOM_GE; }

/* Runs one loop per stride pattern of the two inputs, so the common ones
 * (both contiguous, or one broadcast) vectorise. x and y name the inputs. */
#define BINARY_LOOP(OUT, EXPR)                                                                    \
    do {                                                                                          \
        if (sa == 1 && sb == 1) {                                                                 \
            _Pragma("omp simd") for (int64_t i = 0; i < n; i++) {                                \
                float x = a[i], y = b[i];                                                         \
                OUT[i] = (EXPR);                                                                  \
            }                                                                                     \
        } else if (sa == 1 && sb == 0) {                                                          \
            float y = b[0];                                                                       \
            _Pragma("omp simd") for (int64_t i = 0; i < n; i++) {                                \
                float x = a[i];                                                                   \
                OUT[i] = (EXPR);                                                                  \
            }                                                                                     \
        } else if (sa == 0 && sb == 1) {                                                          \
            float x = a[0];                                                                       \
            _Pragma("omp simd") for (int64_t i = 0; i < n; i++) {                                \
                float y = b[i];                                                                   \
                OUT[i] = (EXPR);                                                                  \
            }                                                                                     \
        } else {                                                                                  \
            for (int64_t i = 0; i < n; i++) {                                                     \
                float x = a[i * sa], y = b[i * sb];                                               \
                OUT[i] = (EXPR);                                                                  \
            }                                                                                     \
        }                                                                                         \
    } while (0)

/* pow with a broadcast exponent takes PyTorch's shortcuts for the exponents
 * 2, 3, 0.5, -0.5, -1 and -2 (aten pow_tensor_scalar_optimized_kernel). */
static bool pow_shortcut(float *o, const float *a, int64_t sa, float y, int64_t n) {
    if (sa != 1) return false;
    if (y == 2.0f) {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) o[i] = a[i] * a[i];
    } else if (y == 3.0f) {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) o[i] = a[i] * a[i] * a[i];
    } else if (y == 0.5f) {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) o[i] = sqrtf(a[i]);
    } else if (y == -0.5f) {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) o[i] = 1.0f / sqrtf(a[i]);
    } else if (y == -1.0f) {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) o[i] = 1.0f / a[i];
    } else if (y == -2.0f) {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) o[i] = 1.0f / (a[i] * a[i]);
    } else {
        return false;
    }
    return true;
}

static void binary_float_kernel(loom_binary_op op, char *out, const float *a, int64_t sa,
                                const float *b, int64_t sb, int64_t n) {
    float *o = (float *)out;
    uint8_t *c = (uint8_t *)out;
    switch (op) {
    case LOOM_ADD: BINARY_LOOP(o, x + y); break;
    case LOOM_SUB: BINARY_LOOP(o, x - y); break;
    case LOOM_MUL: BINARY_LOOP(o, x * y); break;
    case LOOM_DIV: BINARY_LOOP(o, x / y); break;
    case LOOM_POW:
        if (sb == 0 && pow_shortcut(o, a, sa, b[0], n)) break;
        BINARY_LOOP(o, powf(x, y));
        break;
    /* NaN in either input gives NaN, as torch.maximum and torch.minimum do. */
    case LOOM_MAXIMUM: BINARY_LOOP(o, x != x ? x : (x > y ? x : y)); break;
    case LOOM_MINIMUM: BINARY_LOOP(o, x != x ? x : (x < y ? x : y)); break;
    case LOOM_EQ: BINARY_LOOP(c, x == y); break;
    case LOOM_NE: BINARY_LOOP(c, x != y); break;
    case LOOM_LT: BINARY_LOOP(c, x < y); break;
    case LOOM_LE: BINARY_LOOP(c, x <= y); break;
    case LOOM_GT: BINARY_LOOP(c, x > y); break;
    case LOOM_GE: BINARY_LOOP(c, x >= y); break;
    }
}

typedef struct binary_ctx {
    loom_binary_op op;
    loom_dtype out_dtype, a_dtype, b_dtype;
} binary_ctx;

/* Operands: 0 out, 1 a, 2 b. */
static void binary_float_chunk(const loom_iter *it, int64_t col, int64_t n, const void *vctx) {
    const binary_ctx *ctx = vctx;
    float abuf[BUF], bbuf[BUF];
    size_t out_size = loom_dtype_size(ctx->out_dtype);
    for (int64_t j = 0; j < n; j += BUF) {
        int64_t m = n - j < BUF ? n - j : BUF;
        int64_t sa, sb;
        const float *a = float_operand(it, 1, col + j, m, ctx->a_dtype, abuf, &sa);
        const float *b = float_operand(it, 2, col + j, m, ctx->b_dtype, bbuf, &sb);
        char *o = it->ptr[0] + (col + j) * (int64_t)out_size;
        binary_float_kernel(ctx->op, o, a, sa, b, sb, m);
    }
}

/* Integer power by squaring; negative exponents give 0 except for the bases
 * 1 and -1, as PyTorch's integer pow does. Overflow wraps. */
static int64_t pow_i64(int64_t base, int64_t exp) {
    if (exp < 0) {
        if (base == 1) return 1;
        if (base == -1) return (exp & 1) ? -1 : 1;
        return 0;
    }
    uint64_t result = 1, b = (uint64_t)base;
    while (exp > 0) {
        if (exp & 1) result *= b;
        b *= b;
        exp >>= 1;
    }
    return (int64_t)result;
}

/* Additions, subtractions and products wrap on overflow (through uint64_t, so
 * without undefined behaviour). The caller has ruled out division by zero. */
static int64_t binary_i64(loom_binary_op op, int64_t x, int64_t y) {
    switch (op) {
    case LOOM_ADD: return (int64_t)((uint64_t)x + (uint64_t)y);
    case LOOM_SUB: return (int64_t)((uint64_t)x - (uint64_t)y);
    case LOOM_MUL: return (int64_t)((uint64_t)x * (uint64_t)y);
    case LOOM_DIV:
        if (y == 0) return 0;
        return (x == INT64_MIN && y == -1) ? INT64_MIN : x / y; /* C division truncates */
    case LOOM_POW: return pow_i64(x, y);
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

/* Integer math; a zero divisor is looked for before anything is written, so
 * a preallocated `out` stays as it was. */
static int binary_integer(loom_iter *it, const binary_ctx *ctx, const char *name) {
    if (ctx->op == LOOM_DIV) {
        loom_iter scan = *it;
        for (int64_t r = 0; r < scan.rows; r++, loom_iter_next(&scan))
            for (int64_t i = 0; i < scan.inner; i++)
                if (loom_load_i64(scan.ptr[2] + i * scan.stride[2], ctx->b_dtype) == 0)
                    return loom_error("%s: integer division by zero", name);
    }
    for (int64_t r = 0; r < it->rows; r++, loom_iter_next(it)) {
        for (int64_t i = 0; i < it->inner; i++) {
            int64_t x = loom_load_i64(it->ptr[1] + i * it->stride[1], ctx->a_dtype);
            int64_t y = loom_load_i64(it->ptr[2] + i * it->stride[2], ctx->b_dtype);
            int64_t v = binary_i64(ctx->op, x, y);
            loom_store_i64(it->ptr[0] + i * it->stride[0], ctx->out_dtype, v);
        }
    }
    return LOOM_OK;
}

/* The shared body of loom_binary and loom_binary_scalar; inputs are checked. */
static int binary_run(loom_tensor *out, const loom_tensor *a, const loom_tensor *b,
                      loom_binary_op op, const char *name) {
    int ndim;
    int64_t shape[LOOM_MAX_DIMS];
    if (loom_broadcast_shape(a->ndim, a->shape, b->ndim, b->shape, &ndim, shape))
        return loom_error_prefix("%s", name);

    bool is_float = loom_dtype_is_float(a->dtype) || loom_dtype_is_float(b->dtype);
    binary_ctx ctx = {.op = op, .a_dtype = a->dtype, .b_dtype = b->dtype};
    if (is_comparison(op))
        ctx.out_dtype = LOOM_U8;
    else
        ctx.out_dtype = is_float ? LOOM_F32 : LOOM_I64;

    loom_tensor res;
    if (loom_out_begin(&res, out, name, ctx.out_dtype, ndim, shape)) return LOOM_ERR;
    loom_tensor av, bv;
    loom_broadcast_view(&av, a, ndim, shape);
    loom_broadcast_view(&bv, b, ndim, shape);
    const loom_tensor *ops[3] = {&res, &av, &bv};
    loom_iter it;
    loom_iter_init(&it, 3, ops, -1);

    int rc = LOOM_OK;
    if (is_float)
        loom_iter_chunks(&it, CHUNK, is_large(&it), binary_float_chunk, &ctx);
    else
        rc = binary_integer(&it, &ctx, name);
    return loom_out_end(out, &res, rc);
}

int loom_binary(loom_tensor *out, const loom_tensor *a, const loom_tensor *b, loom_binary_op op) {
    const char *name = binary_name(op);
    if (name == NULL) return loom_error("binary: unknown operation %d", (int)op);
    if (loom_check_input(name, "a", a) || loom_check_input(name, "b", b)) return LOOM_ERR;
    return binary_run(out, a, b, op, name);
}

/* The scalar becomes a 0-dimensional tensor over this stack storage: f32 when
 * `a` is float or the scalar is not an integer, otherwise i64 (so an integer
 * tensor with a whole-number scalar stays in integer math). */
int loom_binary_scalar(loom_tensor *out, const loom_tensor *a, double scalar, loom_binary_op op,
                       bool scalar_first) {
    const char *name = binary_name(op);
    if (name == NULL) return loom_error("binary: unknown operation %d", (int)op);
    if (loom_check_input(name, "a", a)) return LOOM_ERR;

    union {
        float f;
        int64_t i;
    } value;
    loom_storage storage = {.data = &value, .nbytes = sizeof value, .kind = LOOM_STORAGE_BORROWED,
                            .readonly = true, .refcount = 1};
    loom_tensor s = {.storage = &storage, .ndim = 0};
    bool whole = scalar == floor(scalar) && scalar >= -9.2e18 && scalar <= 9.2e18;
    if (loom_dtype_is_float(a->dtype) || !whole) {
        s.dtype = LOOM_F32;
        value.f = (float)scalar;
    } else {
        s.dtype = LOOM_I64;
        value.i = (int64_t)scalar;
    }
    return scalar_first ? binary_run(out, &s, a, op, name) : binary_run(out, a, &s, op, name);
}

/* ---- unary operators */

static const char *unary_name(loom_unary_op op) {
    switch (op) {
    case LOOM_NEG: return "neg";
    case LOOM_ABS: return "abs";
    case LOOM_EXP: return "exp";
    case LOOM_LOG: return "log";
    case LOOM_SQRT: return "sqrt";
    case LOOM_RSQRT: return "rsqrt";
    case LOOM_SIN: return "sin";
    case LOOM_COS: return "cos";
    case LOOM_TANH: return "tanh";
    case LOOM_SIGMOID: return "sigmoid";
    case LOOM_RELU: return "relu";
    case LOOM_GELU: return "gelu";
    case LOOM_GELU_TANH: return "gelu_tanh";
    case LOOM_QUICK_GELU: return "quick_gelu";
    case LOOM_SILU: return "silu";
    case LOOM_RECIPROCAL: return "reciprocal";
    case LOOM_SQUARE: return "square";
    case LOOM_FLOOR: return "floor";
    case LOOM_CEIL: return "ceil";
    case LOOM_ROUND: return "round";
    }
    return NULL;
}

#define UNARY_LOOP(EXPR)                                                                          \
    do {                                                                                          \
        _Pragma("omp simd") for (int64_t i = 0; i < n; i++) {                                    \
            float x = a[i];                                                                       \
            o[i] = (EXPR);                                                                        \
        }                                                                                         \
    } while (0)

/* The formulas of PyTorch's CPU kernels (aten/src/ATen/native/cpu), in f32,
 * with loom_expf, loom_erff and loom_tanhf for exp, erf and tanh so that the
 * loops vectorise. 512-bit vectors, where the CPU has them, because GCC 12's
 * default for recent Intel CPUs (256) left the GELU loops half as fast. */
__attribute__((target("prefer-vector-width=512"), noinline)) static void
unary_float_kernel(loom_unary_op op, float *o, const float *a, int64_t n) {
    const float sqrt1_2 = (float)M_SQRT1_2;
    const float tanh_beta = (float)(M_SQRT2 * M_2_SQRTPI * 0.5); /* sqrt(2 / pi) */
    const float tanh_kappa = 0.044715f;
    const float quick_gelu_alpha = 1.702f; /* OpenAI CLIP's QuickGELU */
    switch (op) {
    case LOOM_NEG: UNARY_LOOP(-x); break;
    case LOOM_ABS: UNARY_LOOP(fabsf(x)); break;
    case LOOM_EXP: UNARY_LOOP(loom_expf(x)); break;
    case LOOM_LOG: UNARY_LOOP(logf(x)); break;
    case LOOM_SQRT: UNARY_LOOP(sqrtf(x)); break;
    case LOOM_RSQRT: UNARY_LOOP(1.0f / sqrtf(x)); break;
    case LOOM_SIN: UNARY_LOOP(sinf(x)); break;
    case LOOM_COS: UNARY_LOOP(cosf(x)); break;
    case LOOM_TANH: UNARY_LOOP(loom_tanhf(x)); break;
    case LOOM_SIGMOID: UNARY_LOOP(1.0f / (1.0f + loom_expf(-x))); break;
    case LOOM_RELU: UNARY_LOOP(x < 0.0f ? 0.0f : x); break; /* NaN stays NaN */
    case LOOM_GELU: UNARY_LOOP(x * 0.5f * (1.0f + loom_erff(x * sqrt1_2))); break;
    case LOOM_GELU_TANH:
        UNARY_LOOP(0.5f * x * (1.0f + loom_tanhf(tanh_beta * (x + tanh_kappa * (x * x * x)))));
        break;
    case LOOM_QUICK_GELU:
        UNARY_LOOP(x * (1.0f / (1.0f + loom_expf(-(quick_gelu_alpha * x)))));
        break;
    case LOOM_SILU: UNARY_LOOP(x / (1.0f + loom_expf(-x))); break;
    case LOOM_RECIPROCAL: UNARY_LOOP(1.0f / x); break;
    case LOOM_SQUARE: UNARY_LOOP(x * x); break;
    case LOOM_FLOOR: UNARY_LOOP(floorf(x)); break;
    case LOOM_CEIL: UNARY_LOOP(ceilf(x)); break;
    case LOOM_ROUND: UNARY_LOOP(nearbyintf(x)); break; /* halves to even, as torch.round */
    }
}

typedef struct unary_ctx {
    loom_unary_op op;
    loom_dtype x_dtype, out_dtype;
} unary_ctx;

/* Operands: 0 out (f32, contiguous), 1 x. */
static void unary_float_chunk(const loom_iter *it, int64_t col, int64_t n, const void *vctx) {
    const unary_ctx *ctx = vctx;
    float buf[BUF];
    for (int64_t j = 0; j < n; j += BUF) {
        int64_t m = n - j < BUF ? n - j : BUF;
        float *o = (float *)it->ptr[0] + col + j;
        const char *p = it->ptr[1] + (col + j) * it->stride[1];
        const float *a;
        if (ctx->x_dtype == LOOM_F32 && it->stride[1] == (int64_t)sizeof(float)) {
            a = (const float *)p;
        } else {
            loom_row_load_f32(buf, p, m, it->stride[1] / (int64_t)loom_dtype_size(ctx->x_dtype),
                              ctx->x_dtype);
            a = buf;
        }
        unary_float_kernel(ctx->op, o, a, m);
    }
}

/* NEG and ABS of an integer tensor keep its dtype; both wrap at the type's
 * minimum as two's complement does. */
static void unary_integer_chunk(const loom_iter *it, int64_t col, int64_t n, const void *vctx) {
    const unary_ctx *ctx = vctx;
    size_t size = loom_dtype_size(ctx->out_dtype);
    for (int64_t i = col; i < col + n; i++) {
        int64_t v = loom_load_i64(it->ptr[1] + i * it->stride[1], ctx->x_dtype);
        if (ctx->op == LOOM_NEG || v < 0) v = (int64_t)(0 - (uint64_t)v);
        loom_store_i64(it->ptr[0] + i * (int64_t)size, ctx->out_dtype, v);
    }
}

int loom_unary(loom_tensor *out, const loom_tensor *x, loom_unary_op op) {
    const char *name = unary_name(op);
    if (name == NULL) return loom_error("unary: unknown operation %d", (int)op);
    if (loom_check_input(name, "x", x)) return LOOM_ERR;

    bool keep_integer = !loom_dtype_is_float(x->dtype) && (op == LOOM_NEG || op == LOOM_ABS);
    unary_ctx ctx = {.op = op, .x_dtype = x->dtype, .out_dtype = keep_integer ? x->dtype : LOOM_F32};
    loom_tensor res;
    if (loom_out_begin(&res, out, name, ctx.out_dtype, x->ndim, x->shape)) return LOOM_ERR;
    const loom_tensor *ops[2] = {&res, x};
    loom_iter it;
    loom_iter_init(&it, 2, ops, -1);
    loom_chunk_fn fn = keep_integer ? unary_integer_chunk : unary_float_chunk;
    loom_iter_chunks(&it, CHUNK, is_large(&it), fn, &ctx);
    return loom_out_end(out, &res, LOOM_OK);
}

/* ---- where */

typedef struct where_ctx {
    loom_dtype out_dtype, cond_dtype, a_dtype, b_dtype;
} where_ctx;

/* Operands: 0 out, 1 cond, 2 a, 3 b. */
static void where_chunk(const loom_iter *it, int64_t col, int64_t n, const void *vctx) {
    const where_ctx *ctx = vctx;
    const int64_t *s = it->stride;
    if (ctx->out_dtype == LOOM_F32 && ctx->cond_dtype == LOOM_U8 && ctx->a_dtype == LOOM_F32 &&
        ctx->b_dtype == LOOM_F32) {
        float *o = (float *)it->ptr[0] + col;
        const uint8_t *c = (const uint8_t *)it->ptr[1] + col * s[1];
        const char *a = it->ptr[2] + col * s[2];
        const char *b = it->ptr[3] + col * s[3];
        for (int64_t i = 0; i < n; i++)
            o[i] = c[i * s[1]] ? *(const float *)(a + i * s[2]) : *(const float *)(b + i * s[3]);
        return;
    }
    size_t out_size = loom_dtype_size(ctx->out_dtype);
    for (int64_t i = col; i < col + n; i++) {
        bool take_a = loom_load_i64(it->ptr[1] + i * s[1], ctx->cond_dtype) != 0;
        const char *p = take_a ? it->ptr[2] + i * s[2] : it->ptr[3] + i * s[3];
        loom_dtype dtype = take_a ? ctx->a_dtype : ctx->b_dtype;
        char *o = it->ptr[0] + i * (int64_t)out_size;
        if (ctx->out_dtype == LOOM_F32)
            *(float *)o = loom_load_f32(p, dtype);
        else
            loom_store_i64(o, ctx->out_dtype, loom_load_i64(p, dtype));
    }
}

/* The result is f32 when a or b is float, a's dtype when a and b share an
 * integer dtype, and i64 for two different integer dtypes. */
int loom_where(loom_tensor *out, const loom_tensor *cond, const loom_tensor *a,
               const loom_tensor *b) {
    const char *name = "where";
    if (loom_check_input(name, "cond", cond) || loom_check_input(name, "a", a) ||
        loom_check_input(name, "b", b))
        return LOOM_ERR;
    if (loom_dtype_is_float(cond->dtype))
        return loom_error("where: 'cond' must be u8 or an integer dtype, got %s",
                          loom_shape_str(cond).s);

    int n1, ndim;
    int64_t s1[LOOM_MAX_DIMS], shape[LOOM_MAX_DIMS];
    if (loom_broadcast_shape(cond->ndim, cond->shape, a->ndim, a->shape, &n1, s1) ||
        loom_broadcast_shape(n1, s1, b->ndim, b->shape, &ndim, shape))
        return loom_error_prefix("where");

    where_ctx ctx = {.cond_dtype = cond->dtype, .a_dtype = a->dtype, .b_dtype = b->dtype};
    if (loom_dtype_is_float(a->dtype) || loom_dtype_is_float(b->dtype))
        ctx.out_dtype = LOOM_F32;
    else
        ctx.out_dtype = a->dtype == b->dtype ? a->dtype : LOOM_I64;

    loom_tensor res;
    if (loom_out_begin(&res, out, name, ctx.out_dtype, ndim, shape)) return LOOM_ERR;
    loom_tensor cv, av, bv;
    loom_broadcast_view(&cv, cond, ndim, shape);
    loom_broadcast_view(&av, a, ndim, shape);
    loom_broadcast_view(&bv, b, ndim, shape);
    const loom_tensor *ops[4] = {&res, &cv, &av, &bv};
    loom_iter it;
    loom_iter_init(&it, 4, ops, -1);
    loom_iter_chunks(&it, CHUNK, is_large(&it), where_chunk, &ctx);
    return loom_out_end(out, &res, LOOM_OK);
}
