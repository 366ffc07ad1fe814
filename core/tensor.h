/* Loom core: dtypes, reference-counted storage and strided tensors.
 * A loom_tensor is a small value (shape, strides in elements, byte offset)
 * over a shared loom_storage; views retain the storage and never copy. */
#ifndef LOOM_TENSOR_H
#define LOOM_TENSOR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base.h"

#define LOOM_MAX_DIMS 8

typedef enum loom_dtype {
    LOOM_F32 = 0,
    LOOM_F16,
    LOOM_BF16,
    LOOM_I32,
    LOOM_I64,
    LOOM_U8,
    LOOM_DTYPE_COUNT
} loom_dtype;

/* Size of one element in bytes, and the lower-case name ("f32", "bf16", ...). */
size_t loom_dtype_size(loom_dtype dtype);
const char *loom_dtype_name(loom_dtype dtype);
/* Parse a dtype name; returns -1 for an unknown name. Accepts Loom names and
 * safetensors names ("F32", "BF16", "I64", "U8", ...). */
int loom_dtype_parse(const char *name, loom_dtype *out);
bool loom_dtype_is_float(loom_dtype dtype);

/* Scalar conversions between f32 and the 16-bit float formats, rounding to
 * nearest even as PyTorch does. */
float loom_f16_to_f32(uint16_t h);
uint16_t loom_f32_to_f16(float f);
float loom_bf16_to_f32(uint16_t b);
uint16_t loom_f32_to_bf16(float f);

typedef enum loom_storage_kind {
    LOOM_STORAGE_OWNED = 0, /* 64-byte aligned heap memory, freed with the last reference */
    LOOM_STORAGE_MMAP,      /* read-only memory map of a file, unmapped with the last reference */
    LOOM_STORAGE_BORROWED,  /* caller's memory; the release callback (if any) runs with the last reference */
} loom_storage_kind;

typedef struct loom_storage {
    void *data;
    size_t nbytes;
    loom_storage_kind kind;
    bool readonly;
    int refcount; /* updated atomically */
    /* MMAP: the whole mapping (data may point inside it). */
    void *map_base;
    size_t map_len;
    /* BORROWED: called once when the last reference goes. */
    void (*release)(void *ctx);
    void *release_ctx;
} loom_storage;

/* Create storages with one reference held by the caller; NULL on failure. */
loom_storage *loom_storage_new(size_t nbytes);        /* owned, uninitialised */
loom_storage *loom_storage_new_zeroed(size_t nbytes); /* owned, zero-filled */
/* Map `path` read-only; an empty file gives a storage of 0 bytes. */
loom_storage *loom_storage_map_file(const char *path);
loom_storage *loom_storage_borrow(void *data, size_t nbytes, bool readonly,
                                  void (*release)(void *ctx), void *ctx);
void loom_storage_retain(loom_storage *s);
void loom_storage_release(loom_storage *s); /* accepts NULL */

/* A tensor: `storage` NULL means empty (not allocated). Strides are in
 * elements and may be 0 (expanded dimensions) or describe any view; `offset`
 * is in bytes from storage->data. A 0-dimensional tensor holds one scalar. */
typedef struct loom_tensor {
    loom_storage *storage;
    loom_dtype dtype;
    int ndim;
    int64_t shape[LOOM_MAX_DIMS];
    int64_t strides[LOOM_MAX_DIMS];
    size_t offset;
} loom_tensor;

/* An empty tensor value (no storage), for initialising declarations. */
#define LOOM_TENSOR_EMPTY ((loom_tensor){0})

/* Allocate a contiguous tensor of the given shape on owned storage.
 * loom_tensor_init leaves the values uninitialised. */
int loom_tensor_init(loom_tensor *t, loom_dtype dtype, int ndim, const int64_t *shape);
int loom_tensor_zeros(loom_tensor *t, loom_dtype dtype, int ndim, const int64_t *shape);
/* Wrap `storage` (retained) as a contiguous tensor starting at byte `offset`;
 * checks that the extent fits the storage. */
int loom_tensor_from_storage(loom_tensor *t, loom_storage *storage, size_t offset,
                             loom_dtype dtype, int ndim, const int64_t *shape);
/* Drop this tensor's storage reference and reset it to empty. */
void loom_tensor_free(loom_tensor *t);

int64_t loom_tensor_numel(const loom_tensor *t);
size_t loom_tensor_nbytes(const loom_tensor *t); /* numel * element size */
bool loom_tensor_is_contiguous(const loom_tensor *t);
/* Pointer to element 0 of the view. */
void *loom_tensor_data(const loom_tensor *t);
/* Whether every element the view can address lies inside its storage. */
bool loom_tensor_in_bounds(const loom_tensor *t);
/* Normalise a possibly negative dimension index (-1 = last) into [0, ndim);
 * returns -1 if out of range. `ndim_extra` widens the range for unsqueeze. */
int loom_dim_normalize(int dim, int ndim, int ndim_extra);

/* Human-readable shape, such as "f32[2, 3, 224, 224]"; never fails and
 * truncates visibly with "..." when too long. */
typedef struct loom_shape_text {
    char s[160];
} loom_shape_text;
loom_shape_text loom_shape_str(const loom_tensor *t);
/* The same for a bare shape without a dtype: "[2, 3]". */
loom_shape_text loom_dims_str(int ndim, const int64_t *shape);

/* ---- views: `dst` receives a new view sharing src's storage (retained).
 * `dst` must be empty or may be the same object as `src`. Dimensions are
 * 0-based and may be negative (counted from the end). */
int loom_tensor_view_of(loom_tensor *dst, const loom_tensor *src); /* same view, one more reference */
int loom_tensor_narrow(loom_tensor *dst, const loom_tensor *src, int dim, int64_t start, int64_t length);
int loom_tensor_select(loom_tensor *dst, const loom_tensor *src, int dim, int64_t index);
int loom_tensor_transpose(loom_tensor *dst, const loom_tensor *src, int dim0, int dim1);
int loom_tensor_permute(loom_tensor *dst, const loom_tensor *src, const int *dims);
/* A view with the new shape; one entry may be -1 (inferred). Fails when the
 * strides do not allow a view (use loom_tensor_reshape to copy then). */
int loom_tensor_view(loom_tensor *dst, const loom_tensor *src, int ndim, const int64_t *shape);
/* Like view, but copies into a contiguous tensor when a view is impossible. */
int loom_tensor_reshape(loom_tensor *dst, const loom_tensor *src, int ndim, const int64_t *shape);
/* Broadcast size-1 dimensions (stride 0); new leading dimensions may be added.
 * -1 keeps a dimension's size. */
int loom_tensor_expand(loom_tensor *dst, const loom_tensor *src, int ndim, const int64_t *shape);
int loom_tensor_unsqueeze(loom_tensor *dst, const loom_tensor *src, int dim);
int loom_tensor_squeeze(loom_tensor *dst, const loom_tensor *src, int dim); /* dim = INT32_MIN for all size-1 dims */

/* ---- copies and conversion */
/* A contiguous tensor with src's values: a new reference when src already is
 * contiguous, otherwise a fresh copy. */
int loom_tensor_contiguous(loom_tensor *dst, const loom_tensor *src);
/* Copy values from src into the existing view dst, converting dtype and
 * broadcasting src to dst's shape. dst must not be read-only. */
int loom_tensor_copy_into(loom_tensor *dst, const loom_tensor *src);
/* A new contiguous tensor of `dtype` with src's values (float to integer
 * truncates toward zero as PyTorch does). */
int loom_tensor_to(loom_tensor *dst, const loom_tensor *src, loom_dtype dtype);
/* A new contiguous copy (always copies). */
int loom_tensor_clone(loom_tensor *dst, const loom_tensor *src);
/* Set every element of the view to `value` (converted to its dtype). */
int loom_tensor_fill(loom_tensor *t, double value);

/* Read or write one element as double, at a multi-index (0-based). */
double loom_tensor_get(const loom_tensor *t, const int64_t *index);
void loom_tensor_set(loom_tensor *t, const int64_t *index, double value);
/* Element at a flat position in row-major order of the view's shape. */
double loom_tensor_get_flat(const loom_tensor *t, int64_t i);

/* ---- creation helpers */
int loom_tensor_arange(loom_tensor *t, loom_dtype dtype, double start, double end, double step);
/* Normal(mean, std) or uniform [lo, hi) values from a 64-bit seed; the
 * generator is Loom's own (not PyTorch's), for tests and benchmarks. */
int loom_tensor_randn(loom_tensor *t, uint64_t seed, double mean, double std);
int loom_tensor_rand(loom_tensor *t, uint64_t seed, double lo, double hi);

#endif
