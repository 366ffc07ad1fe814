/* Helpers shared by the operator files: argument checks, output preparation,
 * f32 views of inputs, row conversion and the strided iterator declared in
 * ops_internal.h. */
#include "ops_internal.h"

/* ---- argument checks */

int loom_check_input(const char *op, const char *arg, const loom_tensor *t) {
    if (t == NULL || t->storage == NULL)
        return loom_error("%s: '%s' is empty (no storage)", op, arg);
    if (t->ndim < 0 || t->ndim > LOOM_MAX_DIMS)
        return loom_error("%s: '%s' has %d dimensions, expected 0 to %d", op, arg, t->ndim,
                          LOOM_MAX_DIMS);
    /* An empty view reads nothing, wherever its offset points. */
    if (loom_tensor_numel(t) != 0 && !loom_tensor_in_bounds(t))
        return loom_error("%s: '%s' %s reaches outside its storage", op, arg,
                          loom_shape_str(t).s);
    return LOOM_OK;
}

int loom_check_float_input(const char *op, const char *arg, const loom_tensor *t) {
    if (loom_check_input(op, arg, t)) return LOOM_ERR;
    if (!loom_dtype_is_float(t->dtype))
        return loom_error("%s: '%s' must be f32, f16 or bf16, got %s", op, arg,
                          loom_shape_str(t).s);
    return LOOM_OK;
}

int loom_check_dim(const char *op, int dim, int ndim, int *out) {
    int d = loom_dim_normalize(dim, ndim, 0);
    if (d < 0)
        return loom_error("%s: dim %d is out of range for a tensor with %d dimensions", op, dim,
                          ndim);
    *out = d;
    return LOOM_OK;
}

/* ---- output preparation */

int loom_out_begin(loom_tensor *res, const loom_tensor *out, const char *op, loom_dtype dtype,
                   int ndim, const int64_t *shape) {
    *res = LOOM_TENSOR_EMPTY;
    if (out == NULL) return loom_error("%s: 'out' is NULL", op);
    if (out->storage == NULL) {
        if (loom_tensor_init(res, dtype, ndim, shape)) return loom_error_prefix("%s", op);
        return LOOM_OK;
    }

    bool same = out->dtype == dtype && out->ndim == ndim;
    for (int d = 0; same && d < ndim; d++) same = out->shape[d] == shape[d];
    if (!same) {
        loom_tensor want = {.dtype = dtype, .ndim = ndim};
        memcpy(want.shape, shape, (size_t)ndim * sizeof shape[0]);
        return loom_error("%s: 'out' is %s, expected %s", op, loom_shape_str(out).s,
                          loom_shape_str(&want).s);
    }
    if (!loom_tensor_is_contiguous(out))
        return loom_error("%s: 'out' %s must be contiguous", op, loom_shape_str(out).s);
    if (out->storage->readonly)
        return loom_error("%s: 'out' %s is read-only", op, loom_shape_str(out).s);
    if (!loom_tensor_in_bounds(out))
        return loom_error("%s: 'out' %s reaches outside its storage", op, loom_shape_str(out).s);
    *res = *out;
    return LOOM_OK;
}

int loom_out_end(loom_tensor *out, loom_tensor *res, int rc) {
    if (out->storage != NULL) {
        /* res is an unreferenced copy of *out. */
        *res = LOOM_TENSOR_EMPTY;
        return rc;
    }
    if (rc == LOOM_OK) {
        *out = *res;
    } else {
        loom_tensor_free(res);
    }
    *res = LOOM_TENSOR_EMPTY;
    return rc;
}

/* ---- views for broadcasting */

void loom_broadcast_view(loom_tensor *dst, const loom_tensor *src, int ndim, const int64_t *shape) {
    loom_tensor v = *src;
    int lead = ndim - src->ndim;
    v.ndim = ndim;
    for (int d = 0; d < ndim; d++) {
        int s = d - lead;
        bool keep = s >= 0 && src->shape[s] == shape[d];
        v.shape[d] = shape[d];
        v.strides[d] = keep ? src->strides[s] : 0;
    }
    *dst = v;
}

/* ---- contiguous f32 inputs */

int loom_contiguous_f32(loom_tensor *dst, const loom_tensor *src) {
    if (src->dtype == LOOM_F32 && loom_tensor_is_contiguous(src))
        return loom_tensor_view_of(dst, src);
    return loom_tensor_to(dst, src, LOOM_F32);
}

/* ---- rows */

void loom_row_load_f32(float *dst, const void *src, int64_t n, int64_t stride, loom_dtype dtype) {
    if (stride == 1) {
        switch (dtype) {
        case LOOM_F32:
            if ((const void *)dst != src) memmove(dst, src, (size_t)n * sizeof(float));
            return;
        case LOOM_BF16: {
            const uint16_t *s = src;
#pragma omp simd
            for (int64_t i = 0; i < n; i++) dst[i] = loom_bf16_bits_to_f32(s[i]);
            return;
        }
        case LOOM_F16: {
            const uint16_t *s = src;
            for (int64_t i = 0; i < n; i++) dst[i] = loom_f16_bits_to_f32(s[i]);
            return;
        }
        default: break;
        }
    }
    size_t size = loom_dtype_size(dtype);
    const char *p = src;
    for (int64_t i = 0; i < n; i++) dst[i] = loom_load_f32(p + i * stride * (int64_t)size, dtype);
}

void loom_row_store_f32(void *dst, int64_t stride, loom_dtype dtype, const float *src, int64_t n) {
    if (stride == 1 && dtype == LOOM_F32) {
        if (dst != (const void *)src) memmove(dst, src, (size_t)n * sizeof(float));
        return;
    }
    size_t size = loom_dtype_size(dtype);
    char *p = dst;
    for (int64_t i = 0; i < n; i++) loom_store_f32(p + i * stride * (int64_t)size, dtype, src[i]);
}

/* ---- strided iteration */

void loom_iter_init(loom_iter *it, int n, const loom_tensor *const *ops, int skip_dim) {
    memset(it, 0, sizeof *it);
    it->n = n;
    const loom_tensor *t0 = ops[0];

    /* Gather the dimensions taking part, without size-1 ones, with strides in bytes. */
    int nd = 0;
    int64_t shape[LOOM_MAX_DIMS];
    int64_t bs[LOOM_ITER_MAX_OPERANDS][LOOM_MAX_DIMS];
    bool empty = false;
    for (int d = 0; d < t0->ndim; d++) {
        if (d == skip_dim) continue;
        if (t0->shape[d] == 0) empty = true;
        if (t0->shape[d] == 1) continue;
        shape[nd] = t0->shape[d];
        for (int k = 0; k < n; k++)
            bs[k][nd] = ops[k]->strides[d] * (int64_t)loom_dtype_size(ops[k]->dtype);
        nd++;
    }
    for (int k = 0; k < n; k++) {
        it->base[k] = ops[k]->storage ? (char *)loom_tensor_data(ops[k]) : NULL;
        it->ptr[k] = it->base[k];
    }
    if (empty) {
        it->rows = 0;
        it->inner = 0;
        return;
    }

    /* Merge dimension d into d + 1 when every operand steps over d as one
     * step over the whole of d + 1. */
    int64_t mshape[LOOM_MAX_DIMS];
    int64_t mbs[LOOM_ITER_MAX_OPERANDS][LOOM_MAX_DIMS];
    int m = 0;
    for (int d = 0; d < nd; d++) {
        if (m > 0) {
            bool merge = true;
            for (int k = 0; k < n && merge; k++) merge = mbs[k][m - 1] == bs[k][d] * shape[d];
            if (merge) {
                mshape[m - 1] *= shape[d];
                for (int k = 0; k < n; k++) mbs[k][m - 1] = bs[k][d];
                continue;
            }
        }
        mshape[m] = shape[d];
        for (int k = 0; k < n; k++) mbs[k][m] = bs[k][d];
        m++;
    }

    /* The innermost merged dimension becomes the row. */
    if (m == 0) {
        it->inner = 1;
        for (int k = 0; k < n; k++) it->stride[k] = 0;
    } else {
        m--;
        it->inner = mshape[m];
        for (int k = 0; k < n; k++) it->stride[k] = mbs[k][m];
    }
    it->ndim = m;
    it->rows = 1;
    for (int d = 0; d < m; d++) {
        it->shape[d] = mshape[d];
        it->rows *= mshape[d];
        for (int k = 0; k < n; k++) it->bstride[k][d] = mbs[k][d];
    }
}

void loom_iter_seek(loom_iter *it, int64_t row) {
    for (int k = 0; k < it->n; k++) it->ptr[k] = it->base[k];
    for (int d = it->ndim - 1; d >= 0; d--) {
        int64_t i = row % it->shape[d];
        row /= it->shape[d];
        it->index[d] = i;
        for (int k = 0; k < it->n; k++) it->ptr[k] += i * it->bstride[k][d];
    }
}

void loom_iter_chunks(const loom_iter *it0, int64_t chunk, bool parallel, loom_chunk_fn fn,
                      const void *ctx) {
    int64_t inner = it0->inner;
    int64_t rows = it0->rows;
    if (inner == 0 || rows == 0) return;
    if (chunk < 1) chunk = 1;

    if (inner >= chunk) {
        /* Long rows: each piece is part of one row. */
        int64_t per_row = (inner + chunk - 1) / chunk;
        int64_t pieces = rows * per_row;
#pragma omp parallel for if (parallel) schedule(static)
        for (int64_t p = 0; p < pieces; p++) {
            loom_iter it = *it0;
            int64_t col = (p % per_row) * chunk;
            loom_iter_seek(&it, p / per_row);
            fn(&it, col, inner - col < chunk ? inner - col : chunk, ctx);
        }
    } else {
        /* Short rows: each piece is a run of whole rows. */
        int64_t rows_per = chunk / inner;
        int64_t pieces = (rows + rows_per - 1) / rows_per;
#pragma omp parallel for if (parallel) schedule(static)
        for (int64_t p = 0; p < pieces; p++) {
            loom_iter it = *it0;
            int64_t r0 = p * rows_per;
            int64_t r1 = r0 + rows_per < rows ? r0 + rows_per : rows;
            loom_iter_seek(&it, r0);
            for (int64_t r = r0; r < r1; r++, loom_iter_next(&it)) fn(&it, 0, inner, ctx);
        }
    }
}
