/* The text form of a tensor for __tostring, laid out as PyTorch prints
 * tensors: nested brackets, one row per line, values right-aligned to a
 * common width, floats with 4 decimals (scientific notation when the
 * magnitudes need it), integers plain, then the dtype and the shape. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "loom_lua.h"

/* Tensors with more elements than this are summarized, and a summarized
 * dimension longer than 2 * EDGE_ITEMS shows its first and last EDGE_ITEMS
 * entries around "..." (PyTorch's print options threshold=1000,
 * edgeitems=3, linewidth=80). */
#define SUMMARY_THRESHOLD 1000
#define EDGE_ITEMS 3
#define LINE_WIDTH 80

typedef struct formatter {
    const loom_tensor *t;
    luaL_Buffer *b;
    int summarize;
    int is_float;
    int sci;   /* floats in %.4e instead of %.4f */
    int width; /* widest formatted value */
    double min_abs, max_abs; /* nonzero finite magnitudes seen */
    int all_integral;        /* every finite value is a whole number */
} formatter;

static int64_t read_i64(const loom_tensor *t, const int64_t *index) {
    int64_t off = 0;
    for (int i = 0; i < t->ndim; i++)
        off += index[i] * t->strides[i];
    const char *p = (const char *)loom_tensor_data(t) + off * (int64_t)loom_dtype_size(t->dtype);
    switch (t->dtype) {
    case LOOM_I64: { int64_t v; memcpy(&v, p, 8); return v; }
    case LOOM_I32: { int32_t v; memcpy(&v, p, 4); return v; }
    default: return (unsigned char)*p;
    }
}

static int format_value(const formatter *f, const int64_t *index, char *out, size_t cap) {
    if (!f->is_float)
        return snprintf(out, cap, "%lld", (long long)read_i64(f->t, index));
    double v = loom_tensor_get(f->t, index);
    if (isnan(v))
        return snprintf(out, cap, "nan");
    if (isinf(v))
        return snprintf(out, cap, v > 0 ? "inf" : "-inf");
    return snprintf(out, cap, f->sci ? "%.4e" : "%.4f", v);
}

/* Whether position i of a dimension of `size` is hidden by summarizing, and
 * the next visible position after i. */
static int64_t next_visible(const formatter *f, int64_t i, int64_t size) {
    if (f->summarize && size > 2 * EDGE_ITEMS && i == EDGE_ITEMS - 1)
        return size - EDGE_ITEMS;
    return i + 1;
}

/* Call fn on every visible element (depth-first, row-major). */
static void for_visible(formatter *f, int64_t *index, int d, void (*fn)(formatter *, const int64_t *)) {
    if (d == f->t->ndim) {
        fn(f, index);
        return;
    }
    int64_t size = f->t->shape[d];
    for (int64_t i = 0; i < size; i = next_visible(f, i, size)) {
        index[d] = i;
        for_visible(f, index, d + 1, fn);
    }
}

/* PyTorch's rule: scientific notation when the nonzero finite magnitudes
 * exceed 1e8, or (unless all are whole numbers) span more than a factor
 * 1000 or go below 1e-4. */
static void gather_range(formatter *f, const int64_t *index) {
    double v = fabs(loom_tensor_get(f->t, index));
    if (!isfinite(v) || v == 0)
        return;
    if (v != floor(v))
        f->all_integral = 0;
    if (f->min_abs == 0 || v < f->min_abs)
        f->min_abs = v;
    if (v > f->max_abs)
        f->max_abs = v;
}

static void gather_width(formatter *f, const int64_t *index) {
    char buf[64];
    int n = format_value(f, index, buf, sizeof buf);
    if (n > f->width)
        f->width = n;
}

static void add_spaces(luaL_Buffer *b, int n) {
    for (int i = 0; i < n; i++)
        luaL_addchar(b, ' ');
}

static void add_value(formatter *f, const int64_t *index) {
    char buf[64];
    int n = format_value(f, index, buf, sizeof buf);
    add_spaces(f->b, f->width - n);
    luaL_addlstring(f->b, buf, (size_t)n);
}

/* The separator before an entry of dimension d (not the first): rows of
 * the last dimension wrap at LINE_WIDTH, and blocks of higher dimensions
 * are separated by one line per dimension below them. */
static void add_separator(formatter *f, int d, int indent, int64_t count, int per_line) {
    luaL_Buffer *b = f->b;
    luaL_addchar(b, ',');
    if (d < f->t->ndim - 1) {
        for (int k = d; k < f->t->ndim - 1; k++)
            luaL_addchar(b, '\n');
        add_spaces(b, indent + 1);
    } else if (count % per_line == 0) {
        luaL_addchar(b, '\n');
        add_spaces(b, indent + 1);
    } else {
        luaL_addchar(b, ' ');
    }
}

/* Emit dimension d, whose '[' sits at column `indent`. */
static void emit(formatter *f, int64_t *index, int d, int indent) {
    luaL_Buffer *b = f->b;
    int64_t size = f->t->shape[d];
    int last = d == f->t->ndim - 1;
    int per_line = (LINE_WIDTH - indent - 1) / (f->width + 2);
    if (per_line < 1)
        per_line = 1;
    int64_t count = 0;
    luaL_addchar(b, '[');
    for (int64_t i = 0; i < size; i = next_visible(f, i, size)) {
        if (count > 0)
            add_separator(f, d, indent, count, per_line);
        index[d] = i;
        if (last)
            add_value(f, index);
        else
            emit(f, index, d + 1, indent + 1);
        count++;
        if (next_visible(f, i, size) != i + 1) {
            /* "..." stands for the hidden positions */
            add_separator(f, d, indent, count, per_line);
            luaL_addstring(b, "...");
            count++;
        }
    }
    luaL_addchar(b, ']');
}

int loom_format_tensor(lua_State *L, const loom_tensor *t) {
    luaL_Buffer b;
    formatter f = {t, &b, loom_tensor_numel(t) > SUMMARY_THRESHOLD, loom_dtype_is_float(t->dtype), 0, 1, 0, 0, 1};
    int64_t index[LOOM_MAX_DIMS] = {0};
    int64_t numel = loom_tensor_numel(t);
    if (f.is_float && numel > 0) {
        for_visible(&f, index, 0, gather_range);
        f.sci = f.max_abs > 1e8 ||
                (f.max_abs > 0 && !f.all_integral && (f.max_abs / f.min_abs > 1000 || f.min_abs < 1e-4));
    }
    if (numel > 0)
        for_visible(&f, index, 0, gather_width);
    luaL_buffinit(L, &b);
    luaL_addstring(&b, "tensor(");
    if (t->ndim == 0) {
        add_value(&f, index);
    } else if (numel == 0) {
        luaL_addstring(&b, "[]");
    } else {
        emit(&f, index, 0, 7);
    }
    luaL_addstring(&b, ", dtype=");
    luaL_addstring(&b, loom_dtype_name(t->dtype));
    luaL_addstring(&b, ", shape=");
    luaL_addstring(&b, loom_dims_str(t->ndim, t->shape).s);
    luaL_addchar(&b, ')');
    luaL_pushresult(&b);
    return 1;
}
