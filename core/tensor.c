/* Loom core: dtypes, storages (owned, memory-mapped, borrowed) and strided
 * tensor views, with copies and dtype conversion over any view. */
#include "tensor.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---------------------------------------------------------------- dtypes */

static const struct {
    const char *name;
    const char *st_name; /* safetensors spelling */
    size_t size;
    bool is_float;
} dtype_info[LOOM_DTYPE_COUNT] = {
    [LOOM_F32] = {"f32", "F32", 4, true},   [LOOM_F16] = {"f16", "F16", 2, true},
    [LOOM_BF16] = {"bf16", "BF16", 2, true}, [LOOM_I32] = {"i32", "I32", 4, false},
    [LOOM_I64] = {"i64", "I64", 8, false},  [LOOM_U8] = {"u8", "U8", 1, false},
};

static bool dtype_valid(loom_dtype d) { return (unsigned)d < LOOM_DTYPE_COUNT; }

size_t loom_dtype_size(loom_dtype dtype) { return dtype_valid(dtype) ? dtype_info[dtype].size : 0; }

const char *loom_dtype_name(loom_dtype dtype) {
    return dtype_valid(dtype) ? dtype_info[dtype].name : "invalid";
}

bool loom_dtype_is_float(loom_dtype dtype) { return dtype_valid(dtype) && dtype_info[dtype].is_float; }

int loom_dtype_parse(const char *name, loom_dtype *out) {
    for (int d = 0; d < LOOM_DTYPE_COUNT; d++) {
        if (strcmp(name, dtype_info[d].name) == 0 || strcmp(name, dtype_info[d].st_name) == 0) {
            *out = (loom_dtype)d;
            return 0;
        }
    }
    if (strcmp(name, "float32") == 0 || strcmp(name, "float") == 0) {
        *out = LOOM_F32;
        return 0;
    }
    if (strcmp(name, "float16") == 0 || strcmp(name, "half") == 0) {
        *out = LOOM_F16;
        return 0;
    }
    if (strcmp(name, "bfloat16") == 0) {
        *out = LOOM_BF16;
        return 0;
    }
    if (strcmp(name, "int32") == 0) {
        *out = LOOM_I32;
        return 0;
    }
    if (strcmp(name, "int64") == 0 || strcmp(name, "long") == 0) {
        *out = LOOM_I64;
        return 0;
    }
    if (strcmp(name, "uint8") == 0 || strcmp(name, "BOOL") == 0 || strcmp(name, "bool") == 0) {
        *out = LOOM_U8;
        return 0;
    }
    return -1;
}

/* ------------------------------------------------- 16-bit float formats */

float loom_bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t loom_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep it quiet, never round to infinity */
        return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(u >> 16);
}

float loom_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t u;
    float f;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (mant << 13);
    } else if (exp == 0) {
        if (mant == 0) {
            u = sign;
        } else { /* subnormal: value = mant * 2^-24 */
            f = (float)mant * 5.9604644775390625e-08f;
            memcpy(&u, &f, 4);
            u |= sign;
        }
    } else {
        u = sign | ((exp + 112u) << 23) | (mant << 13);
    }
    memcpy(&f, &u, 4);
    return f;
}

uint16_t loom_f32_to_f16(float f) {
    uint32_t u, sign, absu;
    memcpy(&u, &f, 4);
    sign = (u >> 16) & 0x8000u;
    absu = u & 0x7fffffffu;
    if (absu > 0x7f800000u) /* NaN */
        return (uint16_t)(sign | 0x7e00u | ((absu >> 13) & 0x3ffu));
    if (absu >= 0x477ff000u) /* rounds to >= 65520: infinity */
        return (uint16_t)(sign | 0x7c00u);
    if (absu < 0x38800000u) { /* below the smallest normal 2^-14: subnormal or zero */
        float a;
        memcpy(&a, &absu, 4);
        /* Scale to units of 2^-24 and round to nearest even via the FPU. */
        return (uint16_t)(sign | (uint32_t)lrintf(a * 16777216.0f));
    }
    /* Normal: re-bias the exponent, then round the 13 dropped bits to even. */
    uint32_t h = ((absu >> 13) - (112u << 10));
    uint32_t rest = absu & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u)))
        h++;
    return (uint16_t)(sign | h);
}

/* -------------------------------------------------------------- storage */

static loom_storage *storage_alloc_struct(void) {
    loom_storage *s = calloc(1, sizeof *s);
    if (!s)
        loom_error("out of memory allocating a storage record");
    else
        s->refcount = 1;
    return s;
}

static loom_storage *storage_new(size_t nbytes, bool zeroed) {
    loom_storage *s = storage_alloc_struct();
    if (!s)
        return NULL;
    /* Allocate at least one byte so that data is never NULL. */
    size_t alloc_bytes = nbytes ? nbytes : 1;
    s->data = zeroed ? loom_alloc_zeroed(alloc_bytes) : loom_alloc(alloc_bytes);
    if (!s->data) {
        free(s);
        return NULL;
    }
    s->nbytes = nbytes;
    s->kind = LOOM_STORAGE_OWNED;
    return s;
}

loom_storage *loom_storage_new(size_t nbytes) { return storage_new(nbytes, false); }

loom_storage *loom_storage_new_zeroed(size_t nbytes) { return storage_new(nbytes, true); }

loom_storage *loom_storage_map_file(const char *path) {
    struct stat st;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        loom_error("%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    if (fstat(fd, &st) != 0) {
        loom_error("%s: cannot stat: %s", path, strerror(errno));
        close(fd);
        return NULL;
    }
    if (!S_ISREG(st.st_mode)) {
        loom_error("%s: not a regular file", path);
        close(fd);
        return NULL;
    }
    loom_storage *s = storage_alloc_struct();
    if (!s) {
        close(fd);
        return NULL;
    }
    s->kind = LOOM_STORAGE_MMAP;
    s->readonly = true;
    s->nbytes = (size_t)st.st_size;
    if (st.st_size > 0) {
        void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            loom_error("%s: cannot map %lld bytes: %s", path, (long long)st.st_size, strerror(errno));
            close(fd);
            free(s);
            return NULL;
        }
        s->map_base = p;
        s->map_len = (size_t)st.st_size;
        s->data = p;
    } else {
        static char empty_file[1];
        s->data = empty_file;
    }
    close(fd);
    return s;
}

loom_storage *loom_storage_borrow(void *data, size_t nbytes, bool readonly,
                                  void (*release)(void *ctx), void *ctx) {
    loom_storage *s = storage_alloc_struct();
    if (!s)
        return NULL;
    s->kind = LOOM_STORAGE_BORROWED;
    s->data = data;
    s->nbytes = nbytes;
    s->readonly = readonly;
    s->release = release;
    s->release_ctx = ctx;
    return s;
}

void loom_storage_retain(loom_storage *s) {
    if (s)
        __atomic_add_fetch(&s->refcount, 1, __ATOMIC_RELAXED);
}

void loom_storage_release(loom_storage *s) {
    if (!s || __atomic_sub_fetch(&s->refcount, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    switch (s->kind) {
    case LOOM_STORAGE_OWNED:
        loom_free(s->data);
        break;
    case LOOM_STORAGE_MMAP:
        if (s->map_base)
            munmap(s->map_base, s->map_len);
        break;
    case LOOM_STORAGE_BORROWED:
        if (s->release)
            s->release(s->release_ctx);
        break;
    }
    free(s);
}

/* --------------------------------------------------------------- tensors */

static int check_shape(const char *op, int ndim, const int64_t *shape, int64_t *numel) {
    int64_t n = 1;
    if (ndim < 0 || ndim > LOOM_MAX_DIMS)
        return loom_error("%s: %d dimensions requested, the maximum is %d", op, ndim, LOOM_MAX_DIMS);
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0)
            return loom_error("%s: negative size %lld in dimension %d of %s", op, (long long)shape[i], i,
                              loom_dims_str(ndim, shape).s);
        if (loom_mul_i64(n, shape[i], &n) != 0)
            return loom_error("%s: shape %s has too many elements", op, loom_dims_str(ndim, shape).s);
    }
    *numel = n;
    return LOOM_OK;
}

static void set_contiguous_strides(loom_tensor *t) {
    int64_t stride = 1;
    for (int i = t->ndim - 1; i >= 0; i--) {
        t->strides[i] = stride;
        stride *= t->shape[i];
    }
}

static int tensor_alloc(loom_tensor *t, loom_dtype dtype, int ndim, const int64_t *shape, bool zeroed) {
    int64_t numel;
    size_t nbytes;
    if (!dtype_valid(dtype))
        return loom_error("tensor: invalid dtype %d", (int)dtype);
    if (check_shape("tensor", ndim, shape, &numel) != 0)
        return LOOM_ERR;
    if (loom_mul_size((size_t)numel, loom_dtype_size(dtype), &nbytes) != 0)
        return loom_error("tensor: %s is too large", loom_dims_str(ndim, shape).s);
    loom_storage *s = zeroed ? loom_storage_new_zeroed(nbytes) : loom_storage_new(nbytes);
    if (!s)
        return loom_error_prefix("tensor %s %s", loom_dtype_name(dtype), loom_dims_str(ndim, shape).s);
    memset(t, 0, sizeof *t);
    t->storage = s;
    t->dtype = dtype;
    t->ndim = ndim;
    if (ndim > 0)
        memcpy(t->shape, shape, (size_t)ndim * sizeof *shape);
    set_contiguous_strides(t);
    return LOOM_OK;
}

int loom_tensor_init(loom_tensor *t, loom_dtype dtype, int ndim, const int64_t *shape) {
    return tensor_alloc(t, dtype, ndim, shape, false);
}

int loom_tensor_zeros(loom_tensor *t, loom_dtype dtype, int ndim, const int64_t *shape) {
    return tensor_alloc(t, dtype, ndim, shape, true);
}

int loom_tensor_from_storage(loom_tensor *t, loom_storage *storage, size_t offset, loom_dtype dtype,
                             int ndim, const int64_t *shape) {
    int64_t numel;
    size_t nbytes, end;
    if (!dtype_valid(dtype))
        return loom_error("tensor: invalid dtype %d", (int)dtype);
    if (check_shape("tensor", ndim, shape, &numel) != 0)
        return LOOM_ERR;
    if (loom_mul_size((size_t)numel, loom_dtype_size(dtype), &nbytes) != 0 ||
        loom_add_size(nbytes, offset, &end) != 0 || end > storage->nbytes)
        return loom_error("tensor: %s %s at byte offset %zu does not fit a storage of %zu bytes",
                          loom_dtype_name(dtype), loom_dims_str(ndim, shape).s, offset, storage->nbytes);
    loom_tensor r = {0};
    r.storage = storage;
    r.dtype = dtype;
    r.ndim = ndim;
    r.offset = offset;
    if (ndim > 0)
        memcpy(r.shape, shape, (size_t)ndim * sizeof *shape);
    set_contiguous_strides(&r);
    loom_storage_retain(storage);
    *t = r;
    return LOOM_OK;
}

void loom_tensor_free(loom_tensor *t) {
    if (!t)
        return;
    loom_storage_release(t->storage);
    memset(t, 0, sizeof *t);
}

int64_t loom_tensor_numel(const loom_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++)
        n *= t->shape[i];
    return n;
}

size_t loom_tensor_nbytes(const loom_tensor *t) {
    return (size_t)loom_tensor_numel(t) * loom_dtype_size(t->dtype);
}

bool loom_tensor_is_contiguous(const loom_tensor *t) {
    int64_t expected = 1;
    for (int i = t->ndim - 1; i >= 0; i--) {
        if (t->shape[i] == 1)
            continue;
        if (t->strides[i] != expected)
            return false;
        expected *= t->shape[i];
    }
    return true;
}

void *loom_tensor_data(const loom_tensor *t) {
    return t->storage ? (char *)t->storage->data + t->offset : NULL;
}

bool loom_tensor_in_bounds(const loom_tensor *t) {
    if (!t->storage)
        return false;
    int64_t lo = 0, hi = 0;
    for (int i = 0; i < t->ndim; i++) {
        if (t->shape[i] == 0)
            return t->offset <= t->storage->nbytes;
        int64_t span = (t->shape[i] - 1) * t->strides[i];
        if (span < 0)
            lo += span;
        else
            hi += span;
    }
    int64_t es = (int64_t)loom_dtype_size(t->dtype);
    int64_t first = (int64_t)t->offset + lo * es;
    int64_t last = (int64_t)t->offset + (hi + 1) * es;
    return first >= 0 && last <= (int64_t)t->storage->nbytes;
}

int loom_dim_normalize(int dim, int ndim, int ndim_extra) {
    int n = ndim + ndim_extra;
    if (dim < 0)
        dim += n;
    if (dim < 0 || dim >= n)
        return -1;
    return dim;
}

/* ------------------------------------------------------- shape printing */

/* Write "[d0, d1, ...]" into buf (capacity cap >= 8), ending with "...]"
 * when the dimensions do not fit. */
static void dims_into(char *buf, size_t cap, int ndim, const int64_t *shape) {
    size_t len = 1;
    buf[0] = '[';
    if (ndim < 0 || ndim > LOOM_MAX_DIMS)
        ndim = 0;
    for (int i = 0; i < ndim; i++) {
        char piece[32];
        int n = snprintf(piece, sizeof piece, i ? ", %lld" : "%lld", (long long)shape[i]);
        if (len + (size_t)n + 5 > cap) { /* keep room for "...]" and the terminator */
            memcpy(buf + len, "...", 3);
            len += 3;
            break;
        }
        memcpy(buf + len, piece, (size_t)n);
        len += (size_t)n;
    }
    buf[len++] = ']';
    buf[len] = '\0';
}

loom_shape_text loom_dims_str(int ndim, const int64_t *shape) {
    loom_shape_text r;
    dims_into(r.s, sizeof r.s, ndim, shape);
    return r;
}

loom_shape_text loom_shape_str(const loom_tensor *t) {
    loom_shape_text r;
    const char *name = loom_dtype_name(t->dtype);
    size_t n = strlen(name);
    memcpy(r.s, name, n);
    dims_into(r.s + n, sizeof r.s - n, t->ndim, t->shape);
    return r;
}

/* ----------------------------------------------------------------- views */

static int require_storage(const char *op, const loom_tensor *t) {
    if (!t->storage)
        return loom_error("%s: the tensor is empty (released or never allocated)", op);
    return LOOM_OK;
}

/* Give dst the view `v` (whose storage is src's): retain first, then drop
 * whatever dst held, so dst may be the same object as src. */
static int set_view(loom_tensor *dst, const loom_tensor *v) {
    loom_tensor r = *v;
    loom_storage_retain(r.storage);
    if (dst->storage)
        loom_storage_release(dst->storage);
    *dst = r;
    return LOOM_OK;
}

int loom_tensor_view_of(loom_tensor *dst, const loom_tensor *src) {
    if (require_storage("view", src) != 0)
        return LOOM_ERR;
    return set_view(dst, src);
}

int loom_tensor_narrow(loom_tensor *dst, const loom_tensor *src, int dim, int64_t start, int64_t length) {
    if (require_storage("narrow", src) != 0)
        return LOOM_ERR;
    int d = loom_dim_normalize(dim, src->ndim, 0);
    if (d < 0)
        return loom_error("narrow: dimension %d out of range for %s", dim, loom_shape_str(src).s);
    if (start < 0 || length < 0 || start > src->shape[d] || length > src->shape[d] - start)
        return loom_error("narrow: range [%lld, %lld) out of bounds for dimension %d of size %lld (%s)",
                          (long long)start, (long long)(start + length), d, (long long)src->shape[d],
                          loom_shape_str(src).s);
    loom_tensor v = *src;
    v.shape[d] = length;
    if (length > 0)
        v.offset = (size_t)((int64_t)src->offset +
                            start * src->strides[d] * (int64_t)loom_dtype_size(src->dtype));
    return set_view(dst, &v);
}

int loom_tensor_select(loom_tensor *dst, const loom_tensor *src, int dim, int64_t index) {
    if (require_storage("select", src) != 0)
        return LOOM_ERR;
    int d = loom_dim_normalize(dim, src->ndim, 0);
    if (d < 0)
        return loom_error("select: dimension %d out of range for %s", dim, loom_shape_str(src).s);
    if (index < 0 || index >= src->shape[d])
        return loom_error("select: index %lld out of range for dimension %d of size %lld (%s)",
                          (long long)index, d, (long long)src->shape[d], loom_shape_str(src).s);
    loom_tensor v = *src;
    v.offset = (size_t)((int64_t)src->offset + index * src->strides[d] * (int64_t)loom_dtype_size(src->dtype));
    for (int i = d; i < src->ndim - 1; i++) {
        v.shape[i] = src->shape[i + 1];
        v.strides[i] = src->strides[i + 1];
    }
    v.ndim = src->ndim - 1;
    return set_view(dst, &v);
}

int loom_tensor_transpose(loom_tensor *dst, const loom_tensor *src, int dim0, int dim1) {
    if (require_storage("transpose", src) != 0)
        return LOOM_ERR;
    int a = loom_dim_normalize(dim0, src->ndim, 0), b = loom_dim_normalize(dim1, src->ndim, 0);
    if (a < 0 || b < 0)
        return loom_error("transpose: dimensions (%d, %d) out of range for %s", dim0, dim1,
                          loom_shape_str(src).s);
    loom_tensor v = *src;
    v.shape[a] = src->shape[b];
    v.shape[b] = src->shape[a];
    v.strides[a] = src->strides[b];
    v.strides[b] = src->strides[a];
    return set_view(dst, &v);
}

int loom_tensor_permute(loom_tensor *dst, const loom_tensor *src, const int *dims) {
    if (require_storage("permute", src) != 0)
        return LOOM_ERR;
    bool seen[LOOM_MAX_DIMS] = {false};
    loom_tensor v = *src;
    for (int i = 0; i < src->ndim; i++) {
        int d = loom_dim_normalize(dims[i], src->ndim, 0);
        if (d < 0 || seen[d])
            return loom_error("permute: dimension %d invalid or repeated for %s", dims[i],
                              loom_shape_str(src).s);
        seen[d] = true;
        v.shape[i] = src->shape[d];
        v.strides[i] = src->strides[d];
    }
    return set_view(dst, &v);
}

/* Resolve one -1 entry of a requested shape against numel. */
static int infer_shape(const char *op, const loom_tensor *src, int ndim, const int64_t *shape,
                       int64_t *out) {
    int64_t known = 1, numel = loom_tensor_numel(src);
    int infer = -1;
    if (ndim < 0 || ndim > LOOM_MAX_DIMS)
        return loom_error("%s: %d dimensions requested, the maximum is %d", op, ndim, LOOM_MAX_DIMS);
    for (int i = 0; i < ndim; i++) {
        if (shape[i] == -1) {
            if (infer >= 0)
                return loom_error("%s: only one dimension can be -1 in %s", op, loom_dims_str(ndim, shape).s);
            infer = i;
        } else if (shape[i] < 0) {
            return loom_error("%s: invalid size %lld in %s", op, (long long)shape[i],
                              loom_dims_str(ndim, shape).s);
        } else if (loom_mul_i64(known, shape[i], &known) != 0) {
            return loom_error("%s: shape %s overflows", op, loom_dims_str(ndim, shape).s);
        }
        out[i] = shape[i];
    }
    if (infer >= 0) {
        if (known == 0 || numel % known != 0)
            return loom_error("%s: cannot infer -1 in %s for %s", op, loom_dims_str(ndim, shape).s,
                              loom_shape_str(src).s);
        out[infer] = numel / known;
        known = numel;
    }
    if (known != numel)
        return loom_error("%s: shape %s is invalid for %s (%lld elements)", op, loom_dims_str(ndim, shape).s,
                          loom_shape_str(src).s, (long long)numel);
    return LOOM_OK;
}

/* Strides for viewing src with `shape` without copying, following the rule
 * that each run of merged source dimensions must be contiguous within
 * itself. Returns false when no such view exists. */
static bool view_strides(const loom_tensor *src, int ndim, const int64_t *shape, int64_t *strides) {
    int64_t numel = loom_tensor_numel(src);
    if (numel == 0 || src->ndim == 0) {
        int64_t s = 1;
        for (int i = ndim - 1; i >= 0; i--) {
            strides[i] = s;
            s *= shape[i] > 0 ? shape[i] : 1;
        }
        return true;
    }
    int view_d = ndim - 1;
    int64_t chunk_base_stride = src->strides[src->ndim - 1];
    int64_t tensor_numel = 1, view_numel = 1;
    for (int d = src->ndim - 1; d >= 0; d--) {
        tensor_numel *= src->shape[d];
        if (d == 0 || (src->shape[d - 1] != 1 && src->strides[d - 1] != tensor_numel * chunk_base_stride)) {
            while (view_d >= 0 && (view_numel < tensor_numel || shape[view_d] == 1)) {
                strides[view_d] = view_numel * chunk_base_stride;
                view_numel *= shape[view_d];
                view_d--;
            }
            if (view_numel != tensor_numel)
                return false;
            if (d > 0) {
                chunk_base_stride = src->strides[d - 1];
                tensor_numel = 1;
                view_numel = 1;
            }
        }
    }
    return view_d == -1;
}

int loom_tensor_view(loom_tensor *dst, const loom_tensor *src, int ndim, const int64_t *shape) {
    int64_t resolved[LOOM_MAX_DIMS];
    if (require_storage("view", src) != 0 || infer_shape("view", src, ndim, shape, resolved) != 0)
        return LOOM_ERR;
    loom_tensor v = *src;
    if (!view_strides(src, ndim, resolved, v.strides))
        return loom_error("view: %s cannot be viewed as %s because its strides do not allow it; "
                          "use reshape, which copies", loom_shape_str(src).s, loom_dims_str(ndim, resolved).s);
    v.ndim = ndim;
    memcpy(v.shape, resolved, (size_t)ndim * sizeof *resolved);
    return set_view(dst, &v);
}

int loom_tensor_reshape(loom_tensor *dst, const loom_tensor *src, int ndim, const int64_t *shape) {
    int64_t resolved[LOOM_MAX_DIMS];
    if (require_storage("reshape", src) != 0 || infer_shape("reshape", src, ndim, shape, resolved) != 0)
        return LOOM_ERR;
    loom_tensor v = *src;
    if (view_strides(src, ndim, resolved, v.strides)) {
        v.ndim = ndim;
        memcpy(v.shape, resolved, (size_t)ndim * sizeof *resolved);
        return set_view(dst, &v);
    }
    loom_tensor c = {0};
    if (loom_tensor_clone(&c, src) != 0)
        return LOOM_ERR;
    c.ndim = ndim;
    memcpy(c.shape, resolved, (size_t)ndim * sizeof *resolved);
    set_contiguous_strides(&c);
    if (dst->storage)
        loom_storage_release(dst->storage);
    *dst = c;
    return LOOM_OK;
}

int loom_tensor_expand(loom_tensor *dst, const loom_tensor *src, int ndim, const int64_t *shape) {
    if (require_storage("expand", src) != 0)
        return LOOM_ERR;
    if (ndim < src->ndim || ndim > LOOM_MAX_DIMS)
        return loom_error("expand: cannot expand %s to %s", loom_shape_str(src).s, loom_dims_str(ndim, shape).s);
    loom_tensor v = *src;
    int lead = ndim - src->ndim;
    v.ndim = ndim;
    for (int i = ndim - 1; i >= 0; i--) {
        int s = i - lead;
        int64_t want = shape[i];
        if (s >= 0) {
            int64_t have = src->shape[s];
            if (want == -1)
                want = have;
            if (have == want) {
                v.shape[i] = have;
                v.strides[i] = src->strides[s];
            } else if (have == 1 && want >= 0) {
                v.shape[i] = want;
                v.strides[i] = 0;
            } else {
                return loom_error("expand: cannot expand %s to %s (dimension %d has size %lld)",
                                  loom_shape_str(src).s, loom_dims_str(ndim, shape).s, s, (long long)have);
            }
        } else {
            if (want < 0)
                return loom_error("expand: new leading dimension %d cannot be %lld in %s", i,
                                  (long long)want, loom_dims_str(ndim, shape).s);
            v.shape[i] = want;
            v.strides[i] = 0;
        }
    }
    return set_view(dst, &v);
}

int loom_tensor_unsqueeze(loom_tensor *dst, const loom_tensor *src, int dim) {
    if (require_storage("unsqueeze", src) != 0)
        return LOOM_ERR;
    int d = loom_dim_normalize(dim, src->ndim, 1);
    if (d < 0 || src->ndim >= LOOM_MAX_DIMS)
        return loom_error("unsqueeze: dimension %d out of range for %s", dim, loom_shape_str(src).s);
    loom_tensor v = *src;
    for (int i = src->ndim; i > d; i--) {
        v.shape[i] = src->shape[i - 1];
        v.strides[i] = src->strides[i - 1];
    }
    v.shape[d] = 1;
    v.strides[d] = d < src->ndim ? src->shape[d] * src->strides[d] : 1;
    v.ndim = src->ndim + 1;
    return set_view(dst, &v);
}

int loom_tensor_squeeze(loom_tensor *dst, const loom_tensor *src, int dim) {
    if (require_storage("squeeze", src) != 0)
        return LOOM_ERR;
    loom_tensor v = *src;
    int d = -1, n = 0;
    if (dim != INT32_MIN) {
        d = loom_dim_normalize(dim, src->ndim, 0);
        if (d < 0)
            return loom_error("squeeze: dimension %d out of range for %s", dim, loom_shape_str(src).s);
    }
    for (int i = 0; i < src->ndim; i++) {
        bool drop = src->shape[i] == 1 && (d < 0 || i == d);
        if (!drop) {
            v.shape[n] = src->shape[i];
            v.strides[n] = src->strides[i];
            n++;
        }
    }
    v.ndim = n;
    return set_view(dst, &v);
}

/* ------------------------------------------------------- element access */

static inline double read_elem(const char *p, loom_dtype dt) {
    switch (dt) {
    case LOOM_F32: { float v; memcpy(&v, p, 4); return v; }
    case LOOM_F16: { uint16_t v; memcpy(&v, p, 2); return loom_f16_to_f32(v); }
    case LOOM_BF16: { uint16_t v; memcpy(&v, p, 2); return loom_bf16_to_f32(v); }
    case LOOM_I32: { int32_t v; memcpy(&v, p, 4); return v; }
    case LOOM_I64: { int64_t v; memcpy(&v, p, 8); return (double)v; }
    case LOOM_U8: return (unsigned char)*p;
    default: return 0;
    }
}

static inline void write_elem(char *p, loom_dtype dt, double x) {
    switch (dt) {
    case LOOM_F32: { float v = (float)x; memcpy(p, &v, 4); break; }
    case LOOM_F16: { uint16_t v = loom_f32_to_f16((float)x); memcpy(p, &v, 2); break; }
    case LOOM_BF16: { uint16_t v = loom_f32_to_bf16((float)x); memcpy(p, &v, 2); break; }
    case LOOM_I32: { int32_t v = isfinite(x) ? (int32_t)x : 0; memcpy(p, &v, 4); break; }
    case LOOM_I64: { int64_t v = isfinite(x) ? (int64_t)x : 0; memcpy(p, &v, 8); break; }
    case LOOM_U8: *p = (char)(unsigned char)(isfinite(x) ? (int64_t)x : 0); break;
    default: break;
    }
}

static char *elem_ptr(const loom_tensor *t, const int64_t *index) {
    int64_t off = 0;
    for (int i = 0; i < t->ndim; i++)
        off += index[i] * t->strides[i];
    return (char *)loom_tensor_data(t) + off * (int64_t)loom_dtype_size(t->dtype);
}

double loom_tensor_get(const loom_tensor *t, const int64_t *index) {
    return read_elem(elem_ptr(t, index), t->dtype);
}

void loom_tensor_set(loom_tensor *t, const int64_t *index, double value) {
    write_elem(elem_ptr(t, index), t->dtype, value);
}

double loom_tensor_get_flat(const loom_tensor *t, int64_t i) {
    int64_t index[LOOM_MAX_DIMS];
    for (int d = t->ndim - 1; d >= 0; d--) {
        index[d] = t->shape[d] ? i % t->shape[d] : 0;
        i = t->shape[d] ? i / t->shape[d] : 0;
    }
    return loom_tensor_get(t, index);
}

/* ---------------------------------------------------------------- copies */

/* Merge dimensions that are contiguous with each other in both layouts, so
 * the inner loop runs as long as possible. */
static int coalesce(int ndim, int64_t *shape, int64_t *sa, int64_t *sb) {
    int n = 0;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] == 1)
            continue;
        if (n > 0 && sa[n - 1] == sa[i] * shape[i] && sb[n - 1] == sb[i] * shape[i]) {
            shape[n - 1] *= shape[i];
            sa[n - 1] = sa[i];
            sb[n - 1] = sb[i];
        } else {
            shape[n] = shape[i];
            sa[n] = sa[i];
            sb[n] = sb[i];
            n++;
        }
    }
    if (n == 0) {
        shape[0] = 1;
        sa[0] = sb[0] = 1;
        n = 1;
    }
    return n;
}

/* Copy a row of `len` elements with element strides ds (destination) and ss
 * (source), converting between dtypes. */
static void copy_row(char *dst, loom_dtype ddt, int64_t ds, const char *src, loom_dtype sdt, int64_t ss,
                     int64_t len) {
    size_t des = loom_dtype_size(ddt), ses = loom_dtype_size(sdt);
    if (ddt == sdt) {
        if (ds == 1 && ss == 1) {
            memcpy(dst, src, (size_t)len * des);
            return;
        }
        switch (des) {
        case 4:
            for (int64_t i = 0; i < len; i++)
                memcpy(dst + i * ds * 4, src + i * ss * 4, 4);
            return;
        case 2:
            for (int64_t i = 0; i < len; i++)
                memcpy(dst + i * ds * 2, src + i * ss * 2, 2);
            return;
        default:
            for (int64_t i = 0; i < len; i++)
                memcpy(dst + i * ds * (int64_t)des, src + i * ss * (int64_t)des, des);
            return;
        }
    }
    if (ddt == LOOM_F32 && sdt == LOOM_BF16) {
        float *d = (float *)dst;
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t i = 0; i < len; i++) {
            uint32_t u = (uint32_t)s[i * ss] << 16;
            memcpy(&d[i * ds], &u, 4);
        }
        return;
    }
    if (ddt == LOOM_F32 && sdt == LOOM_F16) {
        float *d = (float *)dst;
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t i = 0; i < len; i++)
            d[i * ds] = loom_f16_to_f32(s[i * ss]);
        return;
    }
    if (ddt == LOOM_I64 && sdt == LOOM_I32) {
        for (int64_t i = 0; i < len; i++) {
            int32_t v;
            int64_t w;
            memcpy(&v, src + i * ss * 4, 4);
            w = v;
            memcpy(dst + i * ds * 8, &w, 8);
        }
        return;
    }
    if (!loom_dtype_is_float(ddt) && !loom_dtype_is_float(sdt)) {
        /* integer to integer through int64, wrapping as C casts do */
        for (int64_t i = 0; i < len; i++) {
            int64_t v = 0;
            const char *p = src + i * ss * (int64_t)ses;
            if (sdt == LOOM_I64) memcpy(&v, p, 8);
            else if (sdt == LOOM_I32) { int32_t w; memcpy(&w, p, 4); v = w; }
            else v = (unsigned char)*p;
            char *q = dst + i * ds * (int64_t)des;
            if (ddt == LOOM_I64) memcpy(q, &v, 8);
            else if (ddt == LOOM_I32) { int32_t w = (int32_t)v; memcpy(q, &w, 4); }
            else *q = (char)(unsigned char)v;
        }
        return;
    }
    for (int64_t i = 0; i < len; i++)
        write_elem(dst + i * ds * (int64_t)des, ddt, read_elem(src + i * ss * (int64_t)ses, sdt));
}

int loom_tensor_copy_into(loom_tensor *dst, const loom_tensor *src) {
    loom_tensor b = {0};
    if (require_storage("copy", dst) != 0 || require_storage("copy", src) != 0)
        return LOOM_ERR;
    if (dst->storage->readonly)
        return loom_error("copy: destination %s is read-only (memory-mapped or borrowed read-only)",
                          loom_shape_str(dst).s);
    /* Broadcast src to dst's shape (a view, no copy). */
    if (loom_tensor_expand(&b, src, dst->ndim, dst->shape) != 0)
        return loom_error("copy: cannot broadcast source %s to destination %s", loom_shape_str(src).s,
                          loom_shape_str(dst).s);
    int64_t shape[LOOM_MAX_DIMS], sd[LOOM_MAX_DIMS], ss[LOOM_MAX_DIMS];
    int n = dst->ndim;
    memcpy(shape, dst->shape, sizeof shape);
    memcpy(sd, dst->strides, sizeof sd);
    memcpy(ss, b.strides, sizeof ss);
    if (loom_tensor_numel(dst) == 0) {
        loom_tensor_free(&b);
        return LOOM_OK;
    }
    n = coalesce(n, shape, sd, ss);
    char *dp = loom_tensor_data(dst);
    const char *sp = loom_tensor_data(&b);
    int64_t des = (int64_t)loom_dtype_size(dst->dtype), ses = (int64_t)loom_dtype_size(src->dtype);
    int64_t rows = 1;
    for (int i = 0; i < n - 1; i++)
        rows *= shape[i];
    int64_t len = shape[n - 1];
    int64_t idx[LOOM_MAX_DIMS] = {0};
    for (int64_t r = 0; r < rows; r++) {
        int64_t od = 0, os = 0;
        for (int i = 0; i < n - 1; i++) {
            od += idx[i] * sd[i];
            os += idx[i] * ss[i];
        }
        copy_row(dp + od * des, dst->dtype, sd[n - 1], sp + os * ses, src->dtype, ss[n - 1], len);
        for (int i = n - 2; i >= 0; i--) {
            if (++idx[i] < shape[i])
                break;
            idx[i] = 0;
        }
    }
    loom_tensor_free(&b);
    return LOOM_OK;
}

int loom_tensor_to(loom_tensor *dst, const loom_tensor *src, loom_dtype dtype) {
    loom_tensor r = {0};
    if (require_storage("to", src) != 0)
        return LOOM_ERR;
    if (loom_tensor_init(&r, dtype, src->ndim, src->shape) != 0)
        return LOOM_ERR;
    if (loom_tensor_copy_into(&r, src) != 0) {
        loom_tensor_free(&r);
        return LOOM_ERR;
    }
    if (dst->storage)
        loom_storage_release(dst->storage);
    *dst = r;
    return LOOM_OK;
}

int loom_tensor_clone(loom_tensor *dst, const loom_tensor *src) {
    if (require_storage("clone", src) != 0)
        return LOOM_ERR;
    return loom_tensor_to(dst, src, src->dtype);
}

int loom_tensor_contiguous(loom_tensor *dst, const loom_tensor *src) {
    if (require_storage("contiguous", src) != 0)
        return LOOM_ERR;
    if (loom_tensor_is_contiguous(src))
        return set_view(dst, src);
    return loom_tensor_clone(dst, src);
}

int loom_tensor_fill(loom_tensor *t, double value) {
    loom_tensor one = {0};
    int64_t shape1 = 1;
    if (require_storage("fill", t) != 0)
        return LOOM_ERR;
    if (loom_tensor_init(&one, t->dtype, 0, &shape1) != 0)
        return LOOM_ERR;
    write_elem(loom_tensor_data(&one), t->dtype, value);
    int rc = loom_tensor_copy_into(t, &one);
    loom_tensor_free(&one);
    return rc;
}

/* ------------------------------------------------------------- creation */

int loom_tensor_arange(loom_tensor *t, loom_dtype dtype, double start, double end, double step) {
    if (step == 0 || !isfinite(start) || !isfinite(end) || !isfinite(step))
        return loom_error("arange: invalid range start=%g end=%g step=%g", start, end, step);
    double count = ceil((end - start) / step);
    if (count < 0)
        count = 0;
    if (count > 1e12)
        return loom_error("arange: %g elements is too many", count);
    int64_t n = (int64_t)count;
    loom_tensor r = {0};
    if (loom_tensor_init(&r, dtype, 1, &n) != 0)
        return LOOM_ERR;
    char *p = loom_tensor_data(&r);
    size_t es = loom_dtype_size(dtype);
    for (int64_t i = 0; i < n; i++)
        write_elem(p + (size_t)i * es, dtype, start + (double)i * step);
    loom_tensor_free(t);
    *t = r;
    return LOOM_OK;
}

/* splitmix64: a small, well-mixed generator for test and benchmark data. */
static uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double uniform01(uint64_t *state) { return (double)(splitmix64(state) >> 11) * 0x1.0p-53; }

static int fill_random(loom_tensor *t, uint64_t seed, double a, double b, bool normal) {
    if (require_storage("random fill", t) != 0)
        return LOOM_ERR;
    if (t->storage->readonly)
        return loom_error("random fill: %s is read-only", loom_shape_str(t).s);
    int64_t n = loom_tensor_numel(t);
    uint64_t state = seed;
    int64_t index[LOOM_MAX_DIMS] = {0};
    for (int64_t i = 0; i < n; i++) {
        double v;
        if (normal) {
            double u1 = uniform01(&state), u2 = uniform01(&state);
            v = a + b * sqrt(-2.0 * log(u1 > 0 ? u1 : 0x1.0p-53)) * cos(6.283185307179586 * u2);
        } else {
            v = a + (b - a) * uniform01(&state);
        }
        loom_tensor_set(t, index, v);
        for (int d = t->ndim - 1; d >= 0; d--) {
            if (++index[d] < t->shape[d])
                break;
            index[d] = 0;
        }
    }
    return LOOM_OK;
}

int loom_tensor_randn(loom_tensor *t, uint64_t seed, double mean, double std) {
    return fill_random(t, seed, mean, std, true);
}

int loom_tensor_rand(loom_tensor *t, uint64_t seed, double lo, double hi) {
    return fill_random(t, seed, lo, hi, false);
}
