/* Gathering operators: embedding lookup, concatenation, index_select and
 * gather. Indices are checked before anything is written, so a bad index
 * leaves `out` as it was. */
#include <stdio.h>

#include "ops_internal.h"

/* Rows of this many elements or more are worth a parallel loop. */
#define CHUNK_WORK 8192

static bool is_index_dtype(loom_dtype dtype) { return dtype == LOOM_I32 || dtype == LOOM_I64; }

static int64_t load_index(const char *p, loom_dtype dtype) {
    return dtype == LOOM_I32 ? *(const int32_t *)p : *(const int64_t *)p;
}

/* Find the first index of `index` (i32 or i64, any view) outside [0, limit).
 * Returns its flat position in row-major order and stores the index in
 * *value, or returns -1 when all are valid. */
static int64_t find_bad_index(const loom_tensor *index, int64_t limit, int64_t *value) {
    const loom_tensor *ops[1] = {index};
    loom_iter it;
    loom_iter_init(&it, 1, ops, -1);
    for (int64_t r = 0; r < it.rows; r++, loom_iter_next(&it)) {
        for (int64_t i = 0; i < it.inner; i++) {
            int64_t v = load_index(it.ptr[0] + i * it.stride[0], index->dtype);
            if (v < 0 || v >= limit) {
                /* The iterator walks in row-major order, so this is the flat position. */
                *value = v;
                return r * it.inner + i;
            }
        }
    }
    return -1;
}

/* The multi-index of flat position `flat` in `shape`, as "[i, j, ...]". */
static loom_shape_text position_str(int ndim, const int64_t *shape, int64_t flat) {
    int64_t pos[LOOM_MAX_DIMS];
    for (int d = ndim - 1; d >= 0; d--) {
        pos[d] = shape[d] ? flat % shape[d] : 0;
        flat = shape[d] ? flat / shape[d] : 0;
    }
    return loom_dims_str(ndim, pos);
}

/* An unreferenced view of t narrowed to [start, start + length) along dim. */
static loom_tensor narrow_view(const loom_tensor *t, int dim, int64_t start, int64_t length) {
    loom_tensor v = *t;
    v.offset += (size_t)(start * t->strides[dim] * (int64_t)loom_dtype_size(t->dtype));
    v.shape[dim] = length;
    return v;
}

/* ---- embedding */

typedef struct embedding_ctx {
    const char *weight;   /* element 0 of the weight */
    loom_dtype w_dtype;
    int64_t row_stride;   /* weight stride between rows, in bytes */
    int64_t col_stride;   /* weight stride within a row, in elements */
    int64_t dim;          /* D */
    loom_dtype id_dtype;
} embedding_ctx;

/* Operands: 0 out viewed with the ids' shape (one element per output row),
 * 1 ids. */
static void embedding_chunk(const loom_iter *it, int64_t col, int64_t n, const void *vctx) {
    const embedding_ctx *ctx = vctx;
    for (int64_t i = col; i < col + n; i++) {
        int64_t id = load_index(it->ptr[1] + i * it->stride[1], ctx->id_dtype);
        float *o = (float *)(it->ptr[0] + i * it->stride[0]);
        loom_row_load_f32(o, ctx->weight + id * ctx->row_stride, ctx->dim, ctx->col_stride,
                          ctx->w_dtype);
    }
}

int loom_embedding(loom_tensor *out, const loom_tensor *weight, const loom_tensor *ids) {
    const char *name = "embedding";
    if (loom_check_float_input(name, "weight", weight) || loom_check_input(name, "ids", ids))
        return LOOM_ERR;
    if (weight->ndim != 2)
        return loom_error("embedding: 'weight' must be 2-D (V, D), got %s", loom_shape_str(weight).s);
    if (!is_index_dtype(ids->dtype))
        return loom_error("embedding: 'ids' must be i32 or i64, got %s", loom_shape_str(ids).s);
    if (ids->ndim + 1 > LOOM_MAX_DIMS)
        return loom_error("embedding: 'ids' %s has too many dimensions (at most %d)",
                          loom_shape_str(ids).s, LOOM_MAX_DIMS - 1);

    int64_t vocab = weight->shape[0];
    int64_t bad;
    int64_t at = find_bad_index(ids, vocab, &bad);
    if (at >= 0)
        return loom_error("embedding: id %lld at position %s of 'ids' %s is out of range [0, %lld) "
                          "for 'weight' %s",
                          (long long)bad, position_str(ids->ndim, ids->shape, at).s,
                          loom_shape_str(ids).s, (long long)vocab, loom_shape_str(weight).s);

    int ndim = ids->ndim + 1;
    int64_t shape[LOOM_MAX_DIMS];
    for (int d = 0; d < ids->ndim; d++) shape[d] = ids->shape[d];
    shape[ids->ndim] = weight->shape[1];
    loom_tensor res;
    if (loom_out_begin(&res, out, name, LOOM_F32, ndim, shape)) return LOOM_ERR;

    size_t w_size = loom_dtype_size(weight->dtype);
    embedding_ctx ctx = {.weight = loom_tensor_data(weight),
                         .w_dtype = weight->dtype,
                         .row_stride = weight->strides[0] * (int64_t)w_size,
                         .col_stride = weight->strides[1],
                         .dim = weight->shape[1],
                         .id_dtype = ids->dtype};
    /* One element of this view per output row. */
    loom_tensor rows = res;
    rows.ndim = ids->ndim;
    const loom_tensor *ops[2] = {&rows, ids};
    loom_iter it;
    loom_iter_init(&it, 2, ops, -1);
    int64_t chunk = ctx.dim >= CHUNK_WORK ? 1 : CHUNK_WORK / (ctx.dim ? ctx.dim : 1);
    bool parallel = it.rows * it.inner * ctx.dim >= LOOM_PARALLEL_MIN_ELEMS;
    loom_iter_chunks(&it, chunk, parallel, embedding_chunk, &ctx);
    return loom_out_end(out, &res, LOOM_OK);
}

/* ---- cat */

/* A 1-D input of size 0 is skipped whatever the other shapes are, as
 * torch.cat does for legacy empty tensors. */
static bool is_legacy_empty(const loom_tensor *t) { return t->ndim == 1 && t->shape[0] == 0; }

int loom_cat(loom_tensor *out, const loom_tensor *const *inputs, int n, int dim) {
    const char *name = "cat";
    if (n < 1) return loom_error("cat: expected at least 1 input, got %d", n);
    const loom_tensor *ref = NULL;
    bool all_same_dtype = true, any_float = false;
    for (int i = 0; i < n; i++) {
        char arg[32];
        snprintf(arg, sizeof arg, "inputs[%d]", i);
        if (loom_check_input(name, arg, inputs[i])) return LOOM_ERR;
        if (inputs[i]->dtype != inputs[0]->dtype) all_same_dtype = false;
        if (loom_dtype_is_float(inputs[i]->dtype)) any_float = true;
        if (ref == NULL && !is_legacy_empty(inputs[i])) ref = inputs[i];
    }
    if (ref == NULL) ref = inputs[0];
    if (ref->ndim == 0) return loom_error("cat: inputs must have at least 1 dimension, got %s",
                                          loom_shape_str(ref).s);
    int d;
    if (loom_check_dim(name, dim, ref->ndim, &d)) return LOOM_ERR;

    int64_t shape[LOOM_MAX_DIMS];
    for (int k = 0; k < ref->ndim; k++) shape[k] = ref->shape[k];
    shape[d] = 0;
    for (int i = 0; i < n; i++) {
        const loom_tensor *t = inputs[i];
        if (t != ref && is_legacy_empty(t) && ref->ndim != 1) continue;
        bool match = t->ndim == ref->ndim;
        for (int k = 0; match && k < ref->ndim; k++) match = k == d || t->shape[k] == ref->shape[k];
        if (!match)
            return loom_error("cat: inputs[%d] is %s, expected %s except in dimension %d", i,
                              loom_shape_str(t).s, loom_shape_str(ref).s, d);
        shape[d] += t->shape[d];
    }

    loom_dtype dtype = all_same_dtype ? inputs[0]->dtype : (any_float ? LOOM_F32 : LOOM_I64);
    loom_tensor res;
    if (loom_out_begin(&res, out, name, dtype, ref->ndim, shape)) return LOOM_ERR;
    int rc = LOOM_OK;
    int64_t start = 0;
    for (int i = 0; i < n && rc == LOOM_OK; i++) {
        const loom_tensor *t = inputs[i];
        if (t != ref && is_legacy_empty(t) && ref->ndim != 1) continue;
        loom_tensor part = narrow_view(&res, d, start, t->shape[d]);
        start += t->shape[d];
        if (loom_tensor_numel(t) == 0) continue;
        rc = loom_tensor_copy_into(&part, t);
        if (rc) loom_error_prefix("cat");
    }
    return loom_out_end(out, &res, rc);
}

/* ---- index_select */

int loom_index_select(loom_tensor *out, const loom_tensor *x, int dim, const loom_tensor *index) {
    const char *name = "index_select";
    if (loom_check_input(name, "x", x) || loom_check_input(name, "index", index)) return LOOM_ERR;
    if (x->ndim == 0)
        return loom_error("index_select: 'x' must have at least 1 dimension, got %s",
                          loom_shape_str(x).s);
    if (!is_index_dtype(index->dtype) || index->ndim > 1)
        return loom_error("index_select: 'index' must be a 1-D i32 or i64 tensor, got %s",
                          loom_shape_str(index).s);
    int d;
    if (loom_check_dim(name, dim, x->ndim, &d)) return LOOM_ERR;

    int64_t bad;
    int64_t at = find_bad_index(index, x->shape[d], &bad);
    if (at >= 0)
        return loom_error("index_select: index %lld at position %lld is out of range [0, %lld) for "
                          "dimension %d of 'x' %s",
                          (long long)bad, (long long)at, (long long)x->shape[d], d,
                          loom_shape_str(x).s);

    int64_t count = index->ndim == 0 ? 1 : index->shape[0];
    int64_t shape[LOOM_MAX_DIMS];
    for (int k = 0; k < x->ndim; k++) shape[k] = x->shape[k];
    shape[d] = count;
    loom_tensor res;
    if (loom_out_begin(&res, out, name, x->dtype, x->ndim, shape)) return LOOM_ERR;

    const char *ip = loom_tensor_data(index);
    int64_t istride = index->ndim == 0 ? 0 : index->strides[0] * (int64_t)loom_dtype_size(index->dtype);
    int rc = LOOM_OK;
    for (int64_t j = 0; j < count && rc == LOOM_OK; j++) {
        int64_t src = load_index(ip + j * istride, index->dtype);
        loom_tensor dst_part = narrow_view(&res, d, j, 1);
        loom_tensor src_part = narrow_view(x, d, src, 1);
        rc = loom_tensor_copy_into(&dst_part, &src_part);
        if (rc) loom_error_prefix("index_select");
    }
    return loom_out_end(out, &res, rc);
}

/* ---- gather */

typedef struct gather_ctx {
    loom_dtype index_dtype;
    size_t elem_size;
    int64_t dim_stride; /* x's stride along dim, in bytes */
} gather_ctx;

/* Operands: 0 out, 1 index, 2 x viewed with index's shape and stride 0 along
 * dim, so that x's element is ptr[2] + index * dim_stride. */
static void gather_chunk(const loom_iter *it, int64_t col, int64_t n, const void *vctx) {
    const gather_ctx *ctx = vctx;
    for (int64_t i = col; i < col + n; i++) {
        int64_t k = load_index(it->ptr[1] + i * it->stride[1], ctx->index_dtype);
        memcpy(it->ptr[0] + i * it->stride[0], it->ptr[2] + i * it->stride[2] + k * ctx->dim_stride,
               ctx->elem_size);
    }
}

int loom_gather(loom_tensor *out, const loom_tensor *x, int dim, const loom_tensor *index) {
    const char *name = "gather";
    if (loom_check_input(name, "x", x) || loom_check_input(name, "index", index)) return LOOM_ERR;
    if (!is_index_dtype(index->dtype))
        return loom_error("gather: 'index' must be i32 or i64, got %s", loom_shape_str(index).s);
    if (x->ndim == 0)
        return loom_error("gather: 'x' must have at least 1 dimension, got %s", loom_shape_str(x).s);
    int d;
    if (loom_check_dim(name, dim, x->ndim, &d)) return LOOM_ERR;
    bool fits = index->ndim == x->ndim;
    for (int k = 0; fits && k < x->ndim; k++) fits = k == d || index->shape[k] <= x->shape[k];
    if (!fits)
        return loom_error("gather: 'index' %s must have the dimensions of 'x' %s and no larger "
                          "sizes outside dimension %d",
                          loom_shape_str(index).s, loom_shape_str(x).s, d);

    int64_t bad;
    int64_t at = find_bad_index(index, x->shape[d], &bad);
    if (at >= 0)
        return loom_error("gather: index %lld at position %s is out of range [0, %lld) for "
                          "dimension %d of 'x' %s",
                          (long long)bad, position_str(index->ndim, index->shape, at).s,
                          (long long)x->shape[d], d, loom_shape_str(x).s);

    loom_tensor res;
    if (loom_out_begin(&res, out, name, x->dtype, index->ndim, index->shape)) return LOOM_ERR;
    loom_tensor xv = *x;
    for (int k = 0; k < x->ndim; k++) xv.shape[k] = index->shape[k];
    xv.strides[d] = 0;
    gather_ctx ctx = {.index_dtype = index->dtype,
                      .elem_size = loom_dtype_size(x->dtype),
                      .dim_stride = x->strides[d] * (int64_t)loom_dtype_size(x->dtype)};
    const loom_tensor *ops[3] = {&res, index, &xv};
    loom_iter it;
    loom_iter_init(&it, 3, ops, -1);
    loom_iter_chunks(&it, CHUNK_WORK, it.rows * it.inner >= LOOM_PARALLEL_MIN_ELEMS, gather_chunk,
                     &ctx);
    return loom_out_end(out, &res, LOOM_OK);
}
