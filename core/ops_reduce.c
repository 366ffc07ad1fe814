/* Reductions over one dimension (sum, mean, max, min, argmax), softmax with
 * masks, layer norm and RMS norm. Sums are accumulated in double so that long
 * rows stay accurate. Everything else follows PyTorch's CPU float32 formulas. */
#include <math.h>
#include <omp.h>

#include "ops_internal.h"

/* Work per call of a chunk function, in input elements. */
#define CHUNK_WORK 8192
#define BUF 1024

static int64_t chunk_for_row_length(int64_t k) { return k >= CHUNK_WORK ? 1 : CHUNK_WORK / (k ? k : 1); }

/* An unreferenced view of `res` with x's number of dimensions, where
 * dimension `dim` has size 1 and the others x's sizes, for loom_iter_init with
 * skip_dim = dim. `res` is contiguous with the reduced shape, with or without
 * the kept dimension. */
static void reduced_view(loom_tensor *v, const loom_tensor *res, const loom_tensor *x, int dim,
                         bool keepdim) {
    *v = *res;
    v->ndim = x->ndim;
    for (int d = 0, r = 0; d < x->ndim; d++) {
        if (d == dim) {
            v->shape[d] = 1;
            v->strides[d] = 0;
            if (keepdim) r++;
            continue;
        }
        v->shape[d] = x->shape[d];
        v->strides[d] = res->strides[r++];
    }
}

/* Write the shape of x reduced over `dim` into shape and return its number
 * of dimensions. */
static int reduced_shape(const loom_tensor *x, int dim, bool keepdim, int64_t *shape) {
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

static const char *reduce_name(loom_reduce_op op) {
    switch (op) {
    case LOOM_SUM: return "sum";
    case LOOM_MEAN: return "mean";
    case LOOM_MAX: return "max";
    case LOOM_MIN: return "min";
    }
    return NULL;
}

typedef struct reduce_ctx {
    loom_reduce_op op;
    loom_dtype x_dtype, out_dtype;
    int64_t k;        /* length of the reduced dimension */
    int64_t k_stride; /* its stride in x, in bytes */
} reduce_ctx;

/* max and min let NaN win, as torch.max and torch.min do. */
static inline float max_nan(float m, float x) { return (x > m || x != x) && m == m ? x : m; }
static inline float min_nan(float m, float x) { return (x < m || x != x) && m == m ? x : m; }

/* Reduce n contiguous floats into the running state: *sum for SUM/MEAN,
 * *extreme for MAX/MIN. */
static void reduce_floats(loom_reduce_op op, const float *p, int64_t n, double *sum, float *extreme) {
    if (op == LOOM_SUM || op == LOOM_MEAN) {
        double s = 0.0;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < n; i++) s += p[i];
        *sum += s;
    } else if (op == LOOM_MAX) {
        float m = *extreme;
        for (int64_t i = 0; i < n; i++) m = max_nan(m, p[i]);
        *extreme = m;
    } else {
        float m = *extreme;
        for (int64_t i = 0; i < n; i++) m = min_nan(m, p[i]);
        *extreme = m;
    }
}

/* Reduce k elements of a float dtype, `stride` bytes apart, into one f32. */
static float reduce_float_run(const reduce_ctx *ctx, const char *p, int64_t stride) {
    double sum = 0.0;
    float extreme = ctx->op == LOOM_MAX ? -INFINITY : INFINITY;
    size_t size = loom_dtype_size(ctx->x_dtype);
    if (ctx->x_dtype == LOOM_F32 && stride == (int64_t)size) {
        reduce_floats(ctx->op, (const float *)p, ctx->k, &sum, &extreme);
    } else {
        float buf[BUF];
        for (int64_t j = 0; j < ctx->k; j += BUF) {
            int64_t m = ctx->k - j < BUF ? ctx->k - j : BUF;
            loom_row_load_f32(buf, p + j * stride, m, stride / (int64_t)size, ctx->x_dtype);
            reduce_floats(ctx->op, buf, m, &sum, &extreme);
        }
    }
    if (ctx->op == LOOM_SUM) return (float)sum;
    if (ctx->op == LOOM_MEAN) return (float)(sum / (double)ctx->k);
    return extreme;
}

/* Operands: 0 out (f32), 1 x. Each output element reduces its own run of x. */
static void reduce_float_chunk(const loom_iter *it, int64_t col, int64_t n, const void *vctx) {
    const reduce_ctx *ctx = vctx;
    for (int64_t i = col; i < col + n; i++) {
        const char *p = it->ptr[1] + i * it->stride[1];
        *(float *)(it->ptr[0] + i * it->stride[0]) = reduce_float_run(ctx, p, ctx->k_stride);
    }
}

/* The same when the reduced dimension is not the innermost one in memory:
 * accumulate whole rows of outputs at once, so that x is read along its
 * rows. */
static void reduce_float_rows_chunk(const loom_iter *it, int64_t col, int64_t n, const void *vctx) {
    const reduce_ctx *ctx = vctx;
    size_t size = loom_dtype_size(ctx->x_dtype);
    double sum[BUF];
    float extreme[BUF], buf[BUF];
    for (int64_t j = col; j < col + n; j += BUF) {
        int64_t m = col + n - j < BUF ? col + n - j : BUF;
        for (int64_t i = 0; i < m; i++) {
            sum[i] = 0.0;
            extreme[i] = ctx->op == LOOM_MAX ? -INFINITY : INFINITY;
        }
        for (int64_t r = 0; r < ctx->k; r++) {
            const char *p = it->ptr[1] + r * ctx->k_stride + j * it->stride[1];
            loom_row_load_f32(buf, p, m, it->stride[1] / (int64_t)size, ctx->x_dtype);
            if (ctx->op == LOOM_SUM || ctx->op == LOOM_MEAN) {
#pragma omp simd
                for (int64_t i = 0; i < m; i++) sum[i] += buf[i];
            } else if (ctx->op == LOOM_MAX) {
                for (int64_t i = 0; i < m; i++) extreme[i] = max_nan(extreme[i], buf[i]);
            } else {
                for (int64_t i = 0; i < m; i++) extreme[i] = min_nan(extreme[i], buf[i]);
            }
        }
        float *o = (float *)(it->ptr[0] + j * it->stride[0]);
        int64_t os = it->stride[0] / (int64_t)sizeof(float);
        for (int64_t i = 0; i < m; i++) {
            if (ctx->op == LOOM_SUM)
                o[i * os] = (float)sum[i];
            else if (ctx->op == LOOM_MEAN)
                o[i * os] = (float)(sum[i] / (double)ctx->k);
            else
                o[i * os] = extreme[i];
        }
    }
}

/* Integer inputs: SUM in i64 (wrapping), MAX and MIN in the input dtype,
 * MEAN as f32 of the exact i64 sum divided by k. */
static void reduce_integer_chunk(const loom_iter *it, int64_t col, int64_t n, const void *vctx) {
    const reduce_ctx *ctx = vctx;
    for (int64_t i = col; i < col + n; i++) {
        const char *p = it->ptr[1] + i * it->stride[1];
        int64_t acc = ctx->op == LOOM_SUM || ctx->op == LOOM_MEAN ? 0 : loom_load_i64(p, ctx->x_dtype);
        for (int64_t r = 0; r < ctx->k; r++) {
            int64_t v = loom_load_i64(p + r * ctx->k_stride, ctx->x_dtype);
            if (ctx->op == LOOM_SUM || ctx->op == LOOM_MEAN)
                acc = (int64_t)((uint64_t)acc + (uint64_t)v);
            else if (ctx->op == LOOM_MAX)
                acc = v > acc ? v : acc;
            else
                acc = v < acc ? v : acc;
        }
        char *o = it->ptr[0] + i * it->stride[0];
        if (ctx->op == LOOM_MEAN)
            *(float *)o = (float)((double)acc / (double)ctx->k);
        else
            loom_store_i64(o, ctx->out_dtype, acc);
    }
}

/* A 0-dimensional x is reduced over itself when dim is 0 or -1, as in
 * PyTorch. The result is then x's value (as f32 for MEAN and float inputs). */
int loom_reduce(loom_tensor *out, const loom_tensor *x, int dim, bool keepdim, loom_reduce_op op) {
    const char *name = reduce_name(op);
    if (name == NULL) return loom_error("reduce: unknown operation %d", (int)op);
    if (loom_check_input(name, "x", x)) return LOOM_ERR;
    int d;
    if (x->ndim == 0) {
        if (dim != 0 && dim != -1)
            return loom_error("%s: dim %d is out of range for a 0-dimensional tensor", name, dim);
        d = -1;
    } else if (loom_check_dim(name, dim, x->ndim, &d)) {
        return LOOM_ERR;
    }

    reduce_ctx ctx = {.op = op, .x_dtype = x->dtype};
    ctx.k = d < 0 ? 1 : x->shape[d];
    ctx.k_stride = d < 0 ? 0 : x->strides[d] * (int64_t)loom_dtype_size(x->dtype);
    if (ctx.k == 0 && (op == LOOM_MAX || op == LOOM_MIN))
        return loom_error("%s: cannot reduce %s over dimension %d of size 0", name,
                          loom_shape_str(x).s, d);
    bool is_float = loom_dtype_is_float(x->dtype);
    if (is_float || op == LOOM_MEAN)
        ctx.out_dtype = LOOM_F32;
    else
        ctx.out_dtype = op == LOOM_SUM ? LOOM_I64 : x->dtype;

    int64_t shape[LOOM_MAX_DIMS];
    int ndim = d < 0 ? 0 : reduced_shape(x, d, keepdim, shape);
    loom_tensor res;
    if (loom_out_begin(&res, out, name, ctx.out_dtype, ndim, shape)) return LOOM_ERR;

    loom_tensor rv;
    if (d < 0)
        rv = res;
    else
        reduced_view(&rv, &res, x, d, keepdim);
    const loom_tensor *ops[2] = {&rv, x};
    loom_iter it;
    loom_iter_init(&it, 2, ops, d);

    bool parallel = it.rows * it.inner * (ctx.k ? ctx.k : 1) >= LOOM_PARALLEL_MIN_ELEMS;
    int64_t chunk = chunk_for_row_length(ctx.k);
    if (!is_float) {
        loom_iter_chunks(&it, chunk, parallel, reduce_integer_chunk, &ctx);
    } else if (ctx.k_stride == (int64_t)loom_dtype_size(x->dtype) || it.inner == 1 || ctx.k == 0) {
        loom_iter_chunks(&it, chunk, parallel, reduce_float_chunk, &ctx);
    } else {
        /* Each call covers up to BUF outputs for all k, so pieces of BUF outputs. */
        loom_iter_chunks(&it, BUF, parallel, reduce_float_rows_chunk, &ctx);
    }
    return loom_out_end(out, &res, LOOM_OK);
}

/* ---- argmax */

typedef struct argmax_ctx {
    loom_dtype x_dtype;
    int64_t k, k_stride;
} argmax_ctx;

/* Operands: 0 out (i64), 1 x. NaN counts as larger than any number, and the
 * first of equal maxima wins, as torch.argmax does. */
static void argmax_chunk(const loom_iter *it, int64_t col, int64_t n, const void *vctx) {
    const argmax_ctx *ctx = vctx;
    bool is_float = loom_dtype_is_float(ctx->x_dtype);
    for (int64_t i = col; i < col + n; i++) {
        const char *p = it->ptr[1] + i * it->stride[1];
        int64_t best = 0;
        if (is_float) {
            float m = loom_load_f32(p, ctx->x_dtype);
            for (int64_t r = 1; r < ctx->k && m == m; r++) {
                float v = loom_load_f32(p + r * ctx->k_stride, ctx->x_dtype);
                if (v > m || v != v) {
                    m = v;
                    best = r;
                }
            }
        } else {
            int64_t m = loom_load_i64(p, ctx->x_dtype);
            for (int64_t r = 1; r < ctx->k; r++) {
                int64_t v = loom_load_i64(p + r * ctx->k_stride, ctx->x_dtype);
                if (v > m) {
                    m = v;
                    best = r;
                }
            }
        }
        *(int64_t *)(it->ptr[0] + i * it->stride[0]) = best;
    }
}

int loom_argmax(loom_tensor *out, const loom_tensor *x, int dim, bool keepdim) {
    const char *name = "argmax";
    if (loom_check_input(name, "x", x)) return LOOM_ERR;
    int d;
    if (x->ndim == 0) {
        if (dim != 0 && dim != -1)
            return loom_error("%s: dim %d is out of range for a 0-dimensional tensor", name, dim);
        d = -1;
    } else if (loom_check_dim(name, dim, x->ndim, &d)) {
        return LOOM_ERR;
    }
    argmax_ctx ctx = {.x_dtype = x->dtype};
    ctx.k = d < 0 ? 1 : x->shape[d];
    ctx.k_stride = d < 0 ? 0 : x->strides[d] * (int64_t)loom_dtype_size(x->dtype);
    if (ctx.k == 0)
        return loom_error("%s: cannot reduce %s over dimension %d of size 0", name,
                          loom_shape_str(x).s, d);

    int64_t shape[LOOM_MAX_DIMS];
    int ndim = d < 0 ? 0 : reduced_shape(x, d, keepdim, shape);
    loom_tensor res;
    if (loom_out_begin(&res, out, name, LOOM_I64, ndim, shape)) return LOOM_ERR;
    loom_tensor rv;
    if (d < 0)
        rv = res;
    else
        reduced_view(&rv, &res, x, d, keepdim);
    const loom_tensor *ops[2] = {&rv, x};
    loom_iter it;
    loom_iter_init(&it, 2, ops, d);
    bool parallel = it.rows * it.inner * ctx.k >= LOOM_PARALLEL_MIN_ELEMS;
    loom_iter_chunks(&it, chunk_for_row_length(ctx.k), parallel, argmax_chunk, &ctx);
    return loom_out_end(out, &res, LOOM_OK);
}

/* ---- rows along one dimension, shared by softmax and the norms */

/* The row of `k` elements that a chunk function works on in place: the
 * output row itself when it is contiguous, otherwise this thread's part of a
 * scratch buffer. */
static float *work_row(const loom_iter *it, int64_t i, int64_t out_stride, float *scratch, int64_t k) {
    if (out_stride == 1) return (float *)it->ptr[0] + i * (it->stride[0] / (int64_t)sizeof(float));
    return scratch + (int64_t)omp_get_thread_num() * k;
}

static void store_work_row(const loom_iter *it, int64_t i, int64_t out_stride, const float *row,
                           int64_t k) {
    float *o = (float *)it->ptr[0] + i * (it->stride[0] / (int64_t)sizeof(float));
    if (o != row)
        for (int64_t r = 0; r < k; r++) o[r * out_stride] = row[r];
}

/* Scratch rows for every OpenMP thread when the output rows are strided;
 * NULL (and LOOM_OK) when they are contiguous. */
static int alloc_scratch(const char *op, int64_t out_stride, int64_t k, float **scratch) {
    *scratch = NULL;
    if (out_stride == 1 || k == 0) return LOOM_OK;
    size_t nbytes;
    if (loom_mul_size((size_t)omp_get_max_threads() * sizeof(float), (size_t)k, &nbytes))
        return loom_error("%s: scratch size overflows for rows of %lld", op, (long long)k);
    *scratch = loom_alloc(nbytes);
    if (*scratch == NULL) return loom_error_prefix("%s", op);
    return LOOM_OK;
}

/* ---- softmax */

typedef struct softmax_ctx {
    bool log;
    loom_dtype x_dtype, mask_dtype; /* mask_dtype is meaningful when has_mask */
    bool has_mask;
    int64_t k;
    int64_t x_stride, mask_stride, out_stride; /* along dim: bytes, bytes, elements */
    float *scratch;
} softmax_ctx;

/* Add the mask row to the work row: an additive float mask is added, and a
 * u8 mask sets the excluded positions (zeros) to -inf. */
static void apply_mask(const softmax_ctx *ctx, float *row, const char *m) {
    int64_t k = ctx->k;
    int64_t ms = ctx->mask_stride;
    if (ctx->mask_dtype == LOOM_U8) {
        for (int64_t r = 0; r < k; r++)
            if (m[r * ms] == 0) row[r] = -INFINITY;
    } else if (ctx->mask_dtype == LOOM_F32 && ms == (int64_t)sizeof(float)) {
        const float *mf = (const float *)m;
#pragma omp simd
        for (int64_t r = 0; r < k; r++) row[r] += mf[r];
    } else {
        for (int64_t r = 0; r < k; r++) row[r] += loom_load_f32(m + r * ms, ctx->mask_dtype);
    }
}

/* Softmax of one row in place, as PyTorch's vectorised last-dimension kernel
 * computes it: exp(x - max) scaled by 1 / sum, and for log_softmax
 * x - (max + log(sum)). A row whose max is -inf (all positions excluded)
 * gives zeros, or -inf for log_softmax. */
static void softmax_row(float *row, int64_t k, bool log_softmax) {
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t r = 0; r < k; r++) m = row[r] > m ? row[r] : m;
    if (m == -INFINITY) {
        float fill = log_softmax ? -INFINITY : 0.0f;
        for (int64_t r = 0; r < k; r++) row[r] = fill;
        return;
    }
    double sum = 0.0;
    if (log_softmax) {
#pragma omp simd reduction(+ : sum)
        for (int64_t r = 0; r < k; r++) sum += loom_expf(row[r] - m);
        float shift = m + logf((float)sum);
#pragma omp simd
        for (int64_t r = 0; r < k; r++) row[r] = row[r] - shift;
    } else {
#pragma omp simd reduction(+ : sum)
        for (int64_t r = 0; r < k; r++) {
            float e = loom_expf(row[r] - m);
            row[r] = e;
            sum += e;
        }
        float scale = (float)(1.0 / sum);
#pragma omp simd
        for (int64_t r = 0; r < k; r++) row[r] *= scale;
    }
}

/* Operands: 0 out, 1 x, 2 mask (when present); each element of the iteration
 * is one row along dim. */
static void softmax_chunk(const loom_iter *it, int64_t col, int64_t n, const void *vctx) {
    const softmax_ctx *ctx = vctx;
    size_t x_size = loom_dtype_size(ctx->x_dtype);
    for (int64_t i = col; i < col + n; i++) {
        float *row = work_row(it, i, ctx->out_stride, ctx->scratch, ctx->k);
        const char *x = it->ptr[1] + i * it->stride[1];
        loom_row_load_f32(row, x, ctx->k, ctx->x_stride / (int64_t)x_size, ctx->x_dtype);
        if (ctx->has_mask) apply_mask(ctx, row, it->ptr[2] + i * it->stride[2]);
        softmax_row(row, ctx->k, ctx->log);
        store_work_row(it, i, ctx->out_stride, row, ctx->k);
    }
}

int loom_softmax(loom_tensor *out, const loom_tensor *x, const loom_tensor *mask, int dim, bool log) {
    const char *name = log ? "log_softmax" : "softmax";
    if (loom_check_float_input(name, "x", x)) return LOOM_ERR;
    if (x->ndim == 0) return loom_error("%s: 'x' must have at least 1 dimension, got %s", name,
                                        loom_shape_str(x).s);
    int d;
    if (loom_check_dim(name, dim, x->ndim, &d)) return LOOM_ERR;

    softmax_ctx ctx = {.log = log, .x_dtype = x->dtype, .k = x->shape[d]};
    loom_tensor mv = LOOM_TENSOR_EMPTY;
    if (mask != NULL) {
        if (loom_check_input(name, "mask", mask)) return LOOM_ERR;
        if (!loom_dtype_is_float(mask->dtype) && mask->dtype != LOOM_U8)
            return loom_error("%s: 'mask' must be an additive float mask or a u8 keep-mask, got %s",
                              name, loom_shape_str(mask).s);
        int nb;
        int64_t bshape[LOOM_MAX_DIMS];
        bool fits = loom_broadcast_shape(mask->ndim, mask->shape, x->ndim, x->shape, &nb, bshape) == 0 &&
                    nb == x->ndim;
        for (int i = 0; fits && i < nb; i++) fits = bshape[i] == x->shape[i];
        if (!fits)
            return loom_error("%s: 'mask' %s cannot be broadcast to the shape of 'x' %s", name,
                              loom_shape_str(mask).s, loom_shape_str(x).s);
        loom_broadcast_view(&mv, mask, x->ndim, x->shape);
        ctx.has_mask = true;
        ctx.mask_dtype = mask->dtype;
        ctx.mask_stride = mv.strides[d] * (int64_t)loom_dtype_size(mask->dtype);
    }
    ctx.x_stride = x->strides[d] * (int64_t)loom_dtype_size(x->dtype);

    loom_tensor res;
    if (loom_out_begin(&res, out, name, LOOM_F32, x->ndim, x->shape)) return LOOM_ERR;
    ctx.out_stride = res.strides[d];
    if (alloc_scratch(name, ctx.out_stride, ctx.k, &ctx.scratch))
        return loom_out_end(out, &res, LOOM_ERR);

    const loom_tensor *ops[3] = {&res, x, &mv};
    loom_iter it;
    loom_iter_init(&it, ctx.has_mask ? 3 : 2, ops, d);
    bool parallel = it.rows * it.inner * ctx.k >= LOOM_PARALLEL_MIN_ELEMS;
    loom_iter_chunks(&it, chunk_for_row_length(ctx.k), parallel, softmax_chunk, &ctx);
    loom_free(ctx.scratch);
    return loom_out_end(out, &res, LOOM_OK);
}

/* ---- layer norm and RMS norm over the last dimension */

typedef struct norm_ctx {
    loom_dtype x_dtype;
    int64_t k, x_stride;         /* x_stride in elements */
    const float *weight, *bias;  /* contiguous f32, or NULL */
    float eps;
} norm_ctx;

/* Operands: 0 out, 1 x. out is contiguous, so each output row is too. */
static void layer_norm_chunk(const loom_iter *it, int64_t col, int64_t n, const void *vctx) {
    const norm_ctx *ctx = vctx;
    int64_t k = ctx->k;
    const float *w = ctx->weight;
    const float *b = ctx->bias;
    for (int64_t i = col; i < col + n; i++) {
        float *row = (float *)(it->ptr[0] + i * it->stride[0]);
        loom_row_load_f32(row, it->ptr[1] + i * it->stride[1], k, ctx->x_stride, ctx->x_dtype);

        /* Mean and biased variance in double, in two passes. */
        double sum = 0.0;
#pragma omp simd reduction(+ : sum)
        for (int64_t r = 0; r < k; r++) sum += row[r];
        double mean = sum / (double)k;
        double sq = 0.0;
#pragma omp simd reduction(+ : sq)
        for (int64_t r = 0; r < k; r++) sq += (row[r] - mean) * (row[r] - mean);
        double var = sq / (double)k;

        /* PyTorch's CPU kernel (aten layer_norm_kernel.cpp), in f32:
         * y = (x * rstd + (-rstd * mean)) * weight + bias. */
        float rstd = 1.0f / sqrtf((float)var + ctx->eps);
        float shift = -rstd * (float)mean;
        if (w && b) {
#pragma omp simd
            for (int64_t r = 0; r < k; r++) row[r] = (row[r] * rstd + shift) * w[r] + b[r];
        } else if (w) {
#pragma omp simd
            for (int64_t r = 0; r < k; r++) row[r] = (row[r] * rstd + shift) * w[r];
        } else if (b) {
#pragma omp simd
            for (int64_t r = 0; r < k; r++) row[r] = (row[r] * rstd + shift) + b[r];
        } else {
#pragma omp simd
            for (int64_t r = 0; r < k; r++) row[r] = row[r] * rstd + shift;
        }
    }
}

/* As Hugging Face's LlamaRMSNorm in float32: variance = mean(x^2),
 * y = weight * (x * rsqrt(variance + eps)). */
static void rms_norm_chunk(const loom_iter *it, int64_t col, int64_t n, const void *vctx) {
    const norm_ctx *ctx = vctx;
    int64_t k = ctx->k;
    const float *w = ctx->weight;
    for (int64_t i = col; i < col + n; i++) {
        float *row = (float *)(it->ptr[0] + i * it->stride[0]);
        loom_row_load_f32(row, it->ptr[1] + i * it->stride[1], k, ctx->x_stride, ctx->x_dtype);
        double sq = 0.0;
#pragma omp simd reduction(+ : sq)
        for (int64_t r = 0; r < k; r++) sq += (double)row[r] * row[r];
        float variance = (float)(sq / (double)k);
        float scale = 1.0f / sqrtf(variance + ctx->eps);
        if (w) {
#pragma omp simd
            for (int64_t r = 0; r < k; r++) row[r] = w[r] * (row[r] * scale);
        } else {
#pragma omp simd
            for (int64_t r = 0; r < k; r++) row[r] = row[r] * scale;
        }
    }
}

/* Check a 1-D parameter of length k and set *dst to a contiguous f32 copy or
 * reference (left empty when p is NULL). */
static int norm_param(const char *op, const char *arg, const loom_tensor *p, int64_t k,
                      loom_tensor *dst) {
    *dst = LOOM_TENSOR_EMPTY;
    if (p == NULL) return LOOM_OK;
    if (loom_check_float_input(op, arg, p)) return LOOM_ERR;
    if (p->ndim != 1 || p->shape[0] != k)
        return loom_error("%s: '%s' is %s, expected [%lld] (the last dimension of 'x')", op, arg,
                          loom_shape_str(p).s, (long long)k);
    if (loom_contiguous_f32(dst, p)) return loom_error_prefix("%s", op);
    return LOOM_OK;
}

static int norm_run(loom_tensor *out, const loom_tensor *x, const loom_tensor *weight,
                    const loom_tensor *bias, float eps, const char *name, loom_chunk_fn fn) {
    if (loom_check_float_input(name, "x", x)) return LOOM_ERR;
    if (x->ndim == 0)
        return loom_error("%s: 'x' must have at least 1 dimension, got %s", name,
                          loom_shape_str(x).s);
    int d = x->ndim - 1;
    norm_ctx ctx = {.x_dtype = x->dtype, .k = x->shape[d], .x_stride = x->strides[d], .eps = eps};

    loom_tensor w, b;
    if (norm_param(name, "weight", weight, ctx.k, &w)) return LOOM_ERR;
    if (norm_param(name, "bias", bias, ctx.k, &b)) {
        loom_tensor_free(&w);
        return LOOM_ERR;
    }
    ctx.weight = w.storage ? loom_tensor_data(&w) : NULL;
    ctx.bias = b.storage ? loom_tensor_data(&b) : NULL;

    loom_tensor res;
    int rc = loom_out_begin(&res, out, name, LOOM_F32, x->ndim, x->shape);
    if (rc == LOOM_OK) {
        const loom_tensor *ops[2] = {&res, x};
        loom_iter it;
        loom_iter_init(&it, 2, ops, d);
        bool parallel = it.rows * it.inner * ctx.k >= LOOM_PARALLEL_MIN_ELEMS;
        loom_iter_chunks(&it, chunk_for_row_length(ctx.k), parallel, fn, &ctx);
        rc = loom_out_end(out, &res, LOOM_OK);
    }
    loom_tensor_free(&w);
    loom_tensor_free(&b);
    return rc;
}

int loom_layer_norm(loom_tensor *out, const loom_tensor *x, const loom_tensor *weight,
                    const loom_tensor *bias, float eps) {
    return norm_run(out, x, weight, bias, eps, "layer_norm", layer_norm_chunk);
}

int loom_rms_norm(loom_tensor *out, const loom_tensor *x, const loom_tensor *weight, float eps) {
    return norm_run(out, x, weight, NULL, eps, "rms_norm", rms_norm_chunk);
}
