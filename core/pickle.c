/* Loom core: a restricted pickle VM for PyTorch's data.pkl. Globals are
 * looked up in a fixed allow-list and "called" by C code that builds plain
 * values, so nothing named by the file is imported or run. Every length and
 * index read from the input is checked against the bytes that remain, and the
 * stack, the MARK depth and the memory the VM may use are capped. */
#include "pickle.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ arena */

/* All values and container arrays live in one arena freed with the result,
 * so the value graph may share nodes and contain cycles. */
typedef struct arena_chunk {
    struct arena_chunk *next;
    size_t used, cap;
    _Alignas(16) unsigned char data[];
} arena_chunk;

struct loom_pickle {
    arena_chunk *chunks;
    size_t arena_bytes, arena_limit;
    const loom_pickle_value *root;
};

#define ARENA_CHUNK_BYTES ((size_t)64 * 1024)

static void *arena_alloc(loom_pickle *p, size_t nbytes) {
    nbytes = (nbytes + 15) & ~(size_t)15;
    arena_chunk *c = p->chunks;
    if (!c || c->cap - c->used < nbytes) {
        size_t cap = nbytes > ARENA_CHUNK_BYTES ? nbytes : ARENA_CHUNK_BYTES;
        if (p->arena_bytes + cap > p->arena_limit)
            return NULL;
        c = malloc(sizeof *c + cap);
        if (!c)
            return NULL;
        c->cap = cap;
        c->used = 0;
        c->next = p->chunks;
        p->chunks = c;
        p->arena_bytes += cap;
    }
    void *r = c->data + c->used;
    c->used += nbytes;
    memset(r, 0, nbytes);
    return r;
}

void loom_pickle_free(loom_pickle *p) {
    if (!p)
        return;
    arena_chunk *c = p->chunks;
    while (c) {
        arena_chunk *next = c->next;
        free(c);
        c = next;
    }
    free(p);
}

const loom_pickle_value *loom_pickle_root(const loom_pickle *p) { return p->root; }

/* ----------------------------------------------------------- storage types */

static const struct {
    const char *name;
    size_t elsize;
} storage_types[LOOM_TORCH_STORAGE_TYPE_COUNT] = {
    [LOOM_TORCH_FLOAT] = {"Float", 4}, [LOOM_TORCH_HALF] = {"Half", 2},
    [LOOM_TORCH_BFLOAT16] = {"BFloat16", 2}, [LOOM_TORCH_INT] = {"Int", 4},
    [LOOM_TORCH_LONG] = {"Long", 8}, [LOOM_TORCH_BYTE] = {"Byte", 1},
    [LOOM_TORCH_BOOL] = {"Bool", 1}, [LOOM_TORCH_DOUBLE] = {"Double", 8},
};

size_t loom_torch_storage_elsize(loom_torch_storage_type type) {
    return (unsigned)type < LOOM_TORCH_STORAGE_TYPE_COUNT ? storage_types[type].elsize : 0;
}

const char *loom_torch_storage_name(loom_torch_storage_type type) {
    return (unsigned)type < LOOM_TORCH_STORAGE_TYPE_COUNT ? storage_types[type].name : "invalid";
}

/* --------------------------------------------------------- allowed globals */

enum {
    G_REBUILD_TENSOR_V2,
    G_REBUILD_TENSOR,
    G_REBUILD_PARAMETER,
    G_REBUILD_PARAMETER_WITH_STATE,
    G_REBUILD_FROM_TYPE_V2,
    G_TENSOR_CLASS,
    G_PARAMETER_CLASS,
    G_ORDERED_DICT,
    G_SIZE,
    G_SET,
    G_FROZENSET,
    G_LIST,
    G_TUPLE,
    G_DICT,
    G_BYTES,
    G_CODECS_ENCODE,
    G_STORAGE, /* G_STORAGE + loom_torch_storage_type */
};

/* Protocol 2 pickles written by Python 3 spell the builtins module
 * "__builtin__" (pickle's fix_imports), so both spellings are listed. */
static const struct {
    const char *module, *name;
    int id;
} allowed_globals[] = {
    {"torch._utils", "_rebuild_tensor_v2", G_REBUILD_TENSOR_V2},
    {"torch._utils", "_rebuild_tensor", G_REBUILD_TENSOR},
    {"torch._utils", "_rebuild_parameter", G_REBUILD_PARAMETER},
    {"torch._utils", "_rebuild_parameter_with_state", G_REBUILD_PARAMETER_WITH_STATE},
    {"torch._tensor", "_rebuild_from_type_v2", G_REBUILD_FROM_TYPE_V2},
    {"torch", "Tensor", G_TENSOR_CLASS},
    {"torch.nn.parameter", "Parameter", G_PARAMETER_CLASS},
    {"collections", "OrderedDict", G_ORDERED_DICT},
    {"torch", "Size", G_SIZE},
    {"builtins", "set", G_SET},
    {"__builtin__", "set", G_SET},
    {"builtins", "frozenset", G_FROZENSET},
    {"__builtin__", "frozenset", G_FROZENSET},
    {"builtins", "list", G_LIST},
    {"__builtin__", "list", G_LIST},
    {"builtins", "tuple", G_TUPLE},
    {"__builtin__", "tuple", G_TUPLE},
    {"builtins", "dict", G_DICT},
    {"__builtin__", "dict", G_DICT},
    {"builtins", "bytes", G_BYTES},
    {"__builtin__", "bytes", G_BYTES},
    {"_codecs", "encode", G_CODECS_ENCODE},
    {"torch", "FloatStorage", G_STORAGE + LOOM_TORCH_FLOAT},
    {"torch", "HalfStorage", G_STORAGE + LOOM_TORCH_HALF},
    {"torch", "BFloat16Storage", G_STORAGE + LOOM_TORCH_BFLOAT16},
    {"torch", "IntStorage", G_STORAGE + LOOM_TORCH_INT},
    {"torch", "LongStorage", G_STORAGE + LOOM_TORCH_LONG},
    {"torch", "ByteStorage", G_STORAGE + LOOM_TORCH_BYTE},
    {"torch", "BoolStorage", G_STORAGE + LOOM_TORCH_BOOL},
    {"torch", "DoubleStorage", G_STORAGE + LOOM_TORCH_DOUBLE},
};

/* ------------------------------------------------------------------- VM */

typedef struct vm {
    const uint8_t *data;
    size_t len, pos;
    const char *label;
    loom_pickle *p;
    size_t op_offset; /* offset of the opcode being run, for messages */
    loom_pickle_value **stack;
    size_t sp, stack_cap;
    size_t *marks;
    size_t nmarks, marks_cap;
    loom_pickle_value **memo;
    size_t memo_cap, memo_count;
} vm;

static int vm_error(vm *m, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static int vm_error(vm *m, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return loom_error("%s offset %zu: %s", m->label, m->op_offset, msg);
}

/* Copy at most 120 bytes of untrusted text into buf for a message, with
 * non-printable bytes shown as '?'. */
static const char *printable(char *buf, size_t cap, const char *s, size_t len) {
    size_t n = len < cap - 4 ? len : cap - 4;
    if (n > 120)
        n = 120;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        buf[i] = (c >= 32 && c < 127) ? (char)c : '?';
    }
    if (n < len) {
        memcpy(buf + n, "...", 3);
        n += 3;
    }
    buf[n] = '\0';
    return buf;
}

static const char *kind_name(loom_pickle_kind k) {
    static const char *const names[] = {"None", "bool",  "int",  "float",  "str",     "bytes",
                                        "tuple", "list", "dict", "global", "storage", "tensor"};
    return (unsigned)k < sizeof names / sizeof names[0] ? names[k] : "invalid";
}

static loom_pickle_value *new_value(vm *m, loom_pickle_kind kind) {
    loom_pickle_value *v = arena_alloc(m->p, sizeof *v);
    if (!v) {
        vm_error(m, "pickle needs more than %zu bytes of memory", m->p->arena_limit);
        return NULL;
    }
    v->kind = kind;
    v->offset = m->op_offset;
    return v;
}

/* Bytes available after the opcode's argument position. */
static int need(vm *m, size_t n, const char *what) {
    if (m->len - m->pos < n)
        return vm_error(m, "truncated %s: needs %zu bytes, %zu remain", what, n, m->len - m->pos);
    return LOOM_OK;
}

static uint64_t read_le(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* The next '\n'-terminated line (without the newline), for text opcodes. */
static int read_line(vm *m, const char **line, size_t *n, const char *what) {
    const uint8_t *start = m->data + m->pos;
    const uint8_t *nl = memchr(start, '\n', m->len - m->pos);
    if (!nl)
        return vm_error(m, "truncated %s: no newline before end of data", what);
    *line = (const char *)start;
    *n = (size_t)(nl - start);
    m->pos += *n + 1;
    return LOOM_OK;
}

/* ---- stack */

static size_t stack_base(const vm *m) { return m->nmarks ? m->marks[m->nmarks - 1] : 0; }

static int push(vm *m, loom_pickle_value *v) {
    if (!v)
        return LOOM_ERR;
    if (m->sp == m->stack_cap) {
        if (m->stack_cap >= LOOM_PICKLE_MAX_STACK)
            return vm_error(m, "stack holds more than %d values", LOOM_PICKLE_MAX_STACK);
        size_t cap = m->stack_cap ? m->stack_cap * 2 : 64;
        if (cap > LOOM_PICKLE_MAX_STACK)
            cap = LOOM_PICKLE_MAX_STACK;
        loom_pickle_value **s = realloc(m->stack, cap * sizeof *s);
        if (!s)
            return vm_error(m, "out of memory growing the stack to %zu values", cap);
        m->stack = s;
        m->stack_cap = cap;
    }
    m->stack[m->sp++] = v;
    return LOOM_OK;
}

static loom_pickle_value *pop(vm *m, const char *opname) {
    if (m->sp <= stack_base(m)) {
        vm_error(m, "%s: stack underflow", opname);
        return NULL;
    }
    return m->stack[--m->sp];
}

static loom_pickle_value *top(vm *m, const char *opname) {
    if (m->sp <= stack_base(m)) {
        vm_error(m, "%s: stack underflow", opname);
        return NULL;
    }
    return m->stack[m->sp - 1];
}

static int push_mark(vm *m) {
    if (m->nmarks == m->marks_cap) {
        if (m->marks_cap >= LOOM_PICKLE_MAX_MARKS)
            return vm_error(m, "more than %d nested MARKs", LOOM_PICKLE_MAX_MARKS);
        size_t cap = m->marks_cap ? m->marks_cap * 2 : 16;
        if (cap > LOOM_PICKLE_MAX_MARKS)
            cap = LOOM_PICKLE_MAX_MARKS;
        size_t *s = realloc(m->marks, cap * sizeof *s);
        if (!s)
            return vm_error(m, "out of memory growing the MARK stack");
        m->marks = s;
        m->marks_cap = cap;
    }
    m->marks[m->nmarks++] = m->sp;
    return LOOM_OK;
}

/* Take the values above the last MARK: *items points at them (valid until
 * the next push) and the mark is removed. */
static int pop_mark(vm *m, const char *opname, loom_pickle_value ***items, size_t *count) {
    if (m->nmarks == 0)
        return vm_error(m, "%s: no MARK on the stack", opname);
    size_t base = m->marks[--m->nmarks];
    *items = m->stack + base;
    *count = m->sp - base;
    m->sp = base;
    return LOOM_OK;
}

/* ---- containers */

static int seq_reserve(vm *m, loom_pickle_value *v, size_t extra) {
    size_t need_count;
    if (loom_add_size(v->as.seq.count, extra, &need_count) != 0)
        return vm_error(m, "container size overflows");
    if (need_count <= v->as.seq.cap)
        return LOOM_OK;
    size_t cap = v->as.seq.cap ? v->as.seq.cap * 2 : 8;
    if (cap < need_count)
        cap = need_count;
    loom_pickle_value **items = arena_alloc(m->p, cap * sizeof *items);
    if (!items)
        return vm_error(m, "pickle needs more than %zu bytes of memory", m->p->arena_limit);
    if (v->as.seq.count)
        memcpy(items, v->as.seq.items, v->as.seq.count * sizeof *items);
    v->as.seq.items = items;
    v->as.seq.cap = cap;
    return LOOM_OK;
}

static int seq_append(vm *m, loom_pickle_value *seq, loom_pickle_value *const *items, size_t n) {
    if (n == 0)
        return LOOM_OK;
    if (seq_reserve(m, seq, n) != 0)
        return LOOM_ERR;
    memcpy(seq->as.seq.items + seq->as.seq.count, items, n * sizeof *items);
    seq->as.seq.count += n;
    return LOOM_OK;
}

static loom_pickle_value *new_seq(vm *m, loom_pickle_kind kind, loom_pickle_value *const *items, size_t n) {
    loom_pickle_value *v = new_value(m, kind);
    if (v && seq_append(m, v, items, n) != 0)
        return NULL;
    return v;
}

/* Add key/value pairs. Duplicate keys are kept here, and the checkpoint
 * loader rejects duplicate names once it has flattened the dicts. */
static int dict_add(vm *m, loom_pickle_value *d, loom_pickle_value *const *kv, size_t npairs) {
    size_t need_count;
    if (loom_add_size(d->as.dict.count, npairs, &need_count) != 0)
        return vm_error(m, "dict size overflows");
    if (need_count > d->as.dict.cap) {
        size_t cap = d->as.dict.cap ? d->as.dict.cap * 2 : 8;
        if (cap < need_count)
            cap = need_count;
        loom_pickle_value **keys = arena_alloc(m->p, cap * sizeof *keys);
        loom_pickle_value **values = keys ? arena_alloc(m->p, cap * sizeof *values) : NULL;
        if (!values)
            return vm_error(m, "pickle needs more than %zu bytes of memory", m->p->arena_limit);
        if (d->as.dict.count) {
            memcpy(keys, d->as.dict.keys, d->as.dict.count * sizeof *keys);
            memcpy(values, d->as.dict.values, d->as.dict.count * sizeof *values);
        }
        d->as.dict.keys = keys;
        d->as.dict.values = values;
        d->as.dict.cap = cap;
    }
    for (size_t i = 0; i < npairs; i++) {
        d->as.dict.keys[d->as.dict.count] = kv[2 * i];
        d->as.dict.values[d->as.dict.count] = kv[2 * i + 1];
        d->as.dict.count++;
    }
    return LOOM_OK;
}

/* A new container sharing `src`'s items without copying them. Its capacity
 * equals its count, so an append to either one moves that one to a new array
 * and leaves the other's items unchanged. This keeps list(x), set(x) and
 * dict(x) O(1), so a pickle cannot multiply its size by copying one big
 * container many times. */
static loom_pickle_value *share_container(vm *m, loom_pickle_kind kind, const loom_pickle_value *src) {
    loom_pickle_value *v = new_value(m, kind);
    if (!v)
        return NULL;
    if (kind == LOOM_PICKLE_DICT) {
        v->as.dict.keys = src->as.dict.keys;
        v->as.dict.values = src->as.dict.values;
        v->as.dict.count = v->as.dict.cap = src->as.dict.count;
    } else {
        v->as.seq.items = src->as.seq.items;
        v->as.seq.count = v->as.seq.cap = src->as.seq.count;
    }
    return v;
}

static bool is_seq(const loom_pickle_value *v) {
    return v->kind == LOOM_PICKLE_TUPLE || v->kind == LOOM_PICKLE_LIST;
}

/* ---- globals */

static int find_global(vm *m, const char *module, size_t mlen, const char *name, size_t nlen,
                       loom_pickle_value **out) {
    for (size_t i = 0; i < sizeof allowed_globals / sizeof allowed_globals[0]; i++) {
        const char *am = allowed_globals[i].module, *an = allowed_globals[i].name;
        if (strlen(am) == mlen && memcmp(am, module, mlen) == 0 && strlen(an) == nlen &&
            memcmp(an, name, nlen) == 0) {
            loom_pickle_value *v = new_value(m, LOOM_PICKLE_GLOBAL);
            if (!v)
                return LOOM_ERR;
            v->as.global.id = allowed_globals[i].id;
            v->as.global.module = am;
            v->as.global.name = an;
            *out = v;
            return LOOM_OK;
        }
    }
    char mb[128], nb[128];
    printable(mb, sizeof mb, module, mlen);
    printable(nb, sizeof nb, name, nlen);
    if (mlen == 5 && memcmp(module, "torch", 5) == 0 && nlen > 7 &&
        memcmp(name + nlen - 7, "Storage", 7) == 0)
        return vm_error(m, "storage type 'torch.%s' is not supported (supported: Float, Half, BFloat16, "
                           "Int, Long, Byte, Bool and Double storages)", nb);
    return vm_error(m, "global '%s.%s' is not allowed", mb, nb);
}

/* ---- calls: REDUCE, NEWOBJ, OBJ and INST apply an allowed global */

static int int_arg(vm *m, const loom_pickle_value *v, const char *fn, const char *what, int64_t *out) {
    if (v->kind == LOOM_PICKLE_INT) {
        *out = v->as.integer;
        return LOOM_OK;
    }
    if (v->kind == LOOM_PICKLE_BOOL) {
        *out = v->as.boolean;
        return LOOM_OK;
    }
    return vm_error(m, "%s: %s must be an int, got %s", fn, what, kind_name(v->kind));
}

static int dims_arg(vm *m, const loom_pickle_value *v, const char *fn, const char *what, int64_t *dims,
                    int *ndim) {
    if (!is_seq(v))
        return vm_error(m, "%s: %s must be a tuple, got %s", fn, what, kind_name(v->kind));
    if (v->as.seq.count > LOOM_MAX_DIMS)
        return vm_error(m, "%s: %s has %zu dimensions, at most %d are supported", fn, what, v->as.seq.count,
                        LOOM_MAX_DIMS);
    for (size_t i = 0; i < v->as.seq.count; i++) {
        if (int_arg(m, v->as.seq.items[i], fn, what, &dims[i]) != 0)
            return LOOM_ERR;
        if (dims[i] < 0)
            return vm_error(m, "%s: %s[%zu] is negative (%lld)", fn, what, i, (long long)dims[i]);
    }
    *ndim = (int)v->as.seq.count;
    return LOOM_OK;
}

/* _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
 * backward_hooks[, metadata]) and _rebuild_tensor(storage, storage_offset,
 * size, stride). Only the first four arguments matter here. */
static loom_pickle_value *rebuild_tensor(vm *m, const char *fn, loom_pickle_value *const *args, size_t nargs) {
    if (nargs < 4) {
        vm_error(m, "%s: expected at least 4 arguments, got %zu", fn, nargs);
        return NULL;
    }
    const loom_pickle_value *storage = args[0];
    if (storage->kind != LOOM_PICKLE_STORAGE) {
        vm_error(m, "%s: argument 1 must be a storage, got %s", fn, kind_name(storage->kind));
        return NULL;
    }
    loom_pickle_value *t = new_value(m, LOOM_PICKLE_TENSOR);
    int64_t *dims = t ? arena_alloc(m->p, 2 * LOOM_MAX_DIMS * sizeof *dims) : NULL;
    if (!dims) {
        vm_error(m, "pickle needs more than %zu bytes of memory", m->p->arena_limit);
        return NULL;
    }
    int64_t *shape = dims, *strides = dims + LOOM_MAX_DIMS;
    int ndim_stride;
    if (int_arg(m, args[1], fn, "storage_offset", &t->as.tensor.storage_offset) != 0 ||
        dims_arg(m, args[2], fn, "size", shape, &t->as.tensor.ndim) != 0 ||
        dims_arg(m, args[3], fn, "stride", strides, &ndim_stride) != 0)
        return NULL;
    t->as.tensor.shape = shape;
    t->as.tensor.strides = strides;
    if (t->as.tensor.storage_offset < 0) {
        vm_error(m, "%s: storage_offset is negative (%lld)", fn, (long long)t->as.tensor.storage_offset);
        return NULL;
    }
    if (ndim_stride != t->as.tensor.ndim) {
        vm_error(m, "%s: size has %d dimensions but stride has %d", fn, t->as.tensor.ndim, ndim_stride);
        return NULL;
    }

    /* The element count, and the byte count loom_tensor_nbytes derives from
     * it, must fit 64 bits even when stride-0 dimensions keep the storage
     * small. */
    int64_t numel = (int64_t)loom_torch_storage_elsize(storage->as.storage.type);
    for (int i = 0; i < t->as.tensor.ndim; i++) {
        if (loom_mul_i64(numel, shape[i], &numel) != 0) {
            vm_error(m, "%s: size %s has more than 2^63 bytes", fn, loom_dims_str(t->as.tensor.ndim, shape).s);
            return NULL;
        }
    }

    /* The last element touched is storage_offset + sum((size - 1) * stride),
     * and it must lie inside the storage's numel. An empty tensor touches
     * nothing. */
    int64_t last = t->as.tensor.storage_offset, span;
    bool empty = false;
    for (int i = 0; i < t->as.tensor.ndim; i++)
        empty |= shape[i] == 0;
    for (int i = 0; i < t->as.tensor.ndim && !empty; i++) {
        if (loom_mul_i64(shape[i] - 1, strides[i], &span) != 0 ||
            __builtin_add_overflow(last, span, &last)) {
            vm_error(m, "%s: size and stride overflow 64 bits", fn);
            return NULL;
        }
    }
    if (empty && t->as.tensor.storage_offset > storage->as.storage.numel) {
        vm_error(m, "%s: storage offset %lld is past the end of storage '%s' (%lld elements)", fn,
                 (long long)t->as.tensor.storage_offset, storage->as.storage.key,
                 (long long)storage->as.storage.numel);
        return NULL;
    }
    if (!empty && last >= storage->as.storage.numel) {
        vm_error(m, "%s: tensor %s with stride %s at storage offset %lld reaches element %lld, "
                    "but storage '%s' has %lld elements",
                 fn, loom_dims_str(t->as.tensor.ndim, t->as.tensor.shape).s,
                 loom_dims_str(t->as.tensor.ndim, t->as.tensor.strides).s,
                 (long long)t->as.tensor.storage_offset, (long long)last, storage->as.storage.key,
                 (long long)storage->as.storage.numel);
        return NULL;
    }
    t->as.tensor.storage = storage;
    return t;
}

/* _codecs.encode(text, 'latin1'): how protocol 2 spells a bytes object. */
static loom_pickle_value *codecs_encode(vm *m, loom_pickle_value *const *args, size_t nargs) {
    if (nargs != 2 || args[0]->kind != LOOM_PICKLE_STRING || args[1]->kind != LOOM_PICKLE_STRING) {
        vm_error(m, "_codecs.encode: expected (str, 'latin1')");
        return NULL;
    }
    const char *enc = args[1]->as.str.data;
    size_t elen = args[1]->as.str.len;
    if (!(elen == 6 && memcmp(enc, "latin1", 6) == 0) && !(elen == 7 && memcmp(enc, "latin-1", 7) == 0)) {
        vm_error(m, "_codecs.encode: only the 'latin1' encoding is supported");
        return NULL;
    }

    const unsigned char *s = (const unsigned char *)args[0]->as.str.data;
    size_t n = args[0]->as.str.len, out_len = 0;
    char *out = arena_alloc(m->p, n + 1);
    loom_pickle_value *v = out ? new_value(m, LOOM_PICKLE_BYTES) : NULL;
    if (!v) {
        vm_error(m, "pickle needs more than %zu bytes of memory", m->p->arena_limit);
        return NULL;
    }
    /* Decode UTF-8 code points U+0000..U+00FF, the only ones latin1 holds. */
    for (size_t i = 0; i < n; i++) {
        if (s[i] < 0x80) {
            out[out_len++] = (char)s[i];
        } else if ((s[i] == 0xC2 || s[i] == 0xC3) && i + 1 < n && (s[i + 1] & 0xC0) == 0x80) {
            out[out_len++] = (char)(((s[i] & 0x03) << 6) | (s[i + 1] & 0x3F));
            i++;
        } else {
            vm_error(m, "_codecs.encode: text is not latin1 at byte %zu", i);
            return NULL;
        }
    }

    v->as.str.data = out;
    v->as.str.len = out_len;
    return v;
}

static loom_pickle_value *call_global(vm *m, const loom_pickle_value *fn, const loom_pickle_value *argv,
                                      int depth);

/* OrderedDict(), OrderedDict(pairs), dict(...): pairs may be a dict or a
 * sequence of 2-element sequences. */
static loom_pickle_value *make_dict(vm *m, const char *fn, loom_pickle_value *const *args, size_t nargs) {
    if (nargs == 0)
        return new_value(m, LOOM_PICKLE_DICT);
    if (nargs > 1) {
        vm_error(m, "%s: expected at most 1 argument, got %zu", fn, nargs);
        return NULL;
    }
    if (args[0]->kind == LOOM_PICKLE_DICT)
        return share_container(m, LOOM_PICKLE_DICT, args[0]);
    if (!is_seq(args[0])) {
        vm_error(m, "%s: argument must be a dict or a sequence of pairs, got %s", fn, kind_name(args[0]->kind));
        return NULL;
    }
    loom_pickle_value *d = new_value(m, LOOM_PICKLE_DICT);
    if (!d)
        return NULL;
    for (size_t i = 0; i < args[0]->as.seq.count; i++) {
        const loom_pickle_value *pair = args[0]->as.seq.items[i];
        if (!is_seq(pair) || pair->as.seq.count != 2) {
            vm_error(m, "%s: item %zu is not a (key, value) pair", fn, i);
            return NULL;
        }
        if (dict_add(m, d, pair->as.seq.items, 1) != 0)
            return NULL;
    }
    return d;
}

/* Apply the allowed global `fn` to the tuple `argv`. `depth` counts nested
 * _rebuild_from_type_v2 calls. */
static loom_pickle_value *call_global(vm *m, const loom_pickle_value *fn, const loom_pickle_value *argv,
                                      int depth) {
    if (fn->kind != LOOM_PICKLE_GLOBAL) {
        vm_error(m, "cannot call a %s: only allowed globals can be called", kind_name(fn->kind));
        return NULL;
    }
    const char *name = fn->as.global.name;
    if (!is_seq(argv)) {
        vm_error(m, "%s.%s: arguments must be a tuple, got %s", fn->as.global.module, name,
                 kind_name(argv->kind));
        return NULL;
    }
    loom_pickle_value *const *args = argv->as.seq.items;
    size_t nargs = argv->as.seq.count;

    switch (fn->as.global.id) {
    case G_REBUILD_TENSOR_V2:
    case G_REBUILD_TENSOR:
        return rebuild_tensor(m, name, args, nargs);
    case G_REBUILD_PARAMETER:
    case G_REBUILD_PARAMETER_WITH_STATE:
        /* (data, requires_grad, backward_hooks[, state]): the tensor itself. */
        if (nargs < 1 || args[0]->kind != LOOM_PICKLE_TENSOR) {
            vm_error(m, "%s: argument 1 must be a tensor", name);
            return NULL;
        }
        return args[0];
    case G_REBUILD_FROM_TYPE_V2:
        /* (func, new_type, args, state): func(*args), for tensors that carry
         * Python attributes. The attributes are dropped. */
        if (nargs != 4 || args[1]->kind != LOOM_PICKLE_GLOBAL ||
            (args[1]->as.global.id != G_TENSOR_CLASS && args[1]->as.global.id != G_PARAMETER_CLASS)) {
            vm_error(m, "%s: expected (func, torch.Tensor or torch.nn.parameter.Parameter, args, state)", name);
            return NULL;
        }
        if (depth >= 4) {
            vm_error(m, "%s: nested more than 4 deep", name);
            return NULL;
        }
        return call_global(m, args[0], args[2], depth + 1);
    case G_ORDERED_DICT:
    case G_DICT:
        return make_dict(m, name, args, nargs);
    case G_SIZE:
    case G_SET:
    case G_FROZENSET:
    case G_LIST:
    case G_TUPLE: {
        loom_pickle_kind kind = (fn->as.global.id == G_SIZE || fn->as.global.id == G_TUPLE) ? LOOM_PICKLE_TUPLE
                                                                                            : LOOM_PICKLE_LIST;
        if (nargs == 0)
            return new_value(m, kind);
        if (nargs == 1 && is_seq(args[0]))
            return share_container(m, kind, args[0]);
        vm_error(m, "%s: expected no argument or one tuple or list", name);
        return NULL;
    }
    case G_BYTES:
        if (nargs == 0)
            return new_value(m, LOOM_PICKLE_BYTES);
        vm_error(m, "bytes: only bytes() without arguments is supported");
        return NULL;
    case G_CODECS_ENCODE:
        return codecs_encode(m, args, nargs);
    default:
        vm_error(m, "global '%s.%s' cannot be called", fn->as.global.module, name);
        return NULL;
    }
}

/* ---- persistent ids */

/* ('storage', torch.<Type>Storage, key, location, numel) names the archive
 * entry data/<key>. The location ("cpu", "cuda:0") is ignored: everything
 * loads to host memory. */
static loom_pickle_value *persistent_load(vm *m, const loom_pickle_value *pid) {
    static const char *const shape_msg = "persistent id must be ('storage', storage_type, key, location, numel)";
    if (pid->kind != LOOM_PICKLE_TUPLE || pid->as.seq.count != 5) {
        vm_error(m, "%s, got a %s", shape_msg, kind_name(pid->kind));
        return NULL;
    }

    loom_pickle_value *const *f = pid->as.seq.items;
    if (f[0]->kind != LOOM_PICKLE_STRING || f[0]->as.str.len != 7 || memcmp(f[0]->as.str.data, "storage", 7) != 0 ||
        f[1]->kind != LOOM_PICKLE_GLOBAL || f[1]->as.global.id < G_STORAGE || f[2]->kind != LOOM_PICKLE_STRING ||
        f[3]->kind != LOOM_PICKLE_STRING || f[4]->kind != LOOM_PICKLE_INT) {
        vm_error(m, "%s", shape_msg);
        return NULL;
    }

    const char *key = f[2]->as.str.data;
    size_t klen = f[2]->as.str.len;
    if (klen == 0 || klen > 255 || memchr(key, '\0', klen) || memchr(key, '/', klen)) {
        char kb[160];
        vm_error(m, "invalid storage key '%s': expected 1 to 255 bytes without '/' or NUL",
                 printable(kb, sizeof kb, key, klen));
        return NULL;
    }
    if (f[4]->as.integer < 0) {
        vm_error(m, "storage numel is negative (%lld)", (long long)f[4]->as.integer);
        return NULL;
    }

    char *key_copy = arena_alloc(m->p, klen + 1);
    loom_pickle_value *v = key_copy ? new_value(m, LOOM_PICKLE_STORAGE) : NULL;
    if (!v) {
        vm_error(m, "pickle needs more than %zu bytes of memory", m->p->arena_limit);
        return NULL;
    }
    memcpy(key_copy, key, klen);
    v->as.storage.type = (loom_torch_storage_type)(f[1]->as.global.id - G_STORAGE);
    v->as.storage.key = key_copy;
    v->as.storage.numel = f[4]->as.integer;
    return v;
}

/* ---- memo */

static int memo_put(vm *m, uint64_t index, loom_pickle_value *v) {
    /* Picklers number memo entries 0, 1, 2, ..., one per PUT opcode, so a
     * valid index is below the pickle's length. Larger indexes are rejected
     * so that the memo array stays proportional to the input. */
    if (index > m->len)
        return vm_error(m, "memo index %llu out of range (the pickle has %zu bytes)", (unsigned long long)index,
                        m->len);
    if (index >= m->memo_cap) {
        size_t cap = m->memo_cap ? m->memo_cap : 64;
        while (cap <= index)
            cap *= 2;
        loom_pickle_value **memo = realloc(m->memo, cap * sizeof *memo);
        if (!memo)
            return vm_error(m, "out of memory growing the memo to %zu entries", cap);
        memset(memo + m->memo_cap, 0, (cap - m->memo_cap) * sizeof *memo);
        m->memo = memo;
        m->memo_cap = cap;
    }
    if (!m->memo[index])
        m->memo_count++;
    m->memo[index] = v;
    return LOOM_OK;
}

static int memo_get(vm *m, uint64_t index) {
    if (index >= m->memo_cap || !m->memo[index])
        return vm_error(m, "memo index %llu is not set", (unsigned long long)index);
    return push(m, m->memo[index]);
}

/* ---- text opcodes of protocol 0 */

static int parse_decimal(vm *m, const char *s, size_t n, int64_t *out, const char *what) {
    size_t i = 0;
    bool neg = false;
    uint64_t v = 0;
    if (i < n && (s[i] == '-' || s[i] == '+'))
        neg = s[i++] == '-';
    if (i == n)
        return vm_error(m, "%s: invalid integer", what);
    for (; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return vm_error(m, "%s: invalid integer", what);
        if (v > (UINT64_MAX - 9) / 10)
            return vm_error(m, "%s: integer does not fit 64 bits", what);
        v = v * 10 + (uint64_t)(s[i] - '0');
    }
    if ((!neg && v > (uint64_t)INT64_MAX) || (neg && v > (uint64_t)INT64_MAX + 1))
        return vm_error(m, "%s: integer does not fit 64 bits", what);
    *out = neg ? (int64_t)(0 - v) : (int64_t)v;
    return LOOM_OK;
}

/* A quoted protocol-0 string: accepted when it has no escapes. */
static loom_pickle_value *text_string(vm *m, const char *line, size_t n, bool quoted, const char *what) {
    if (quoted) {
        if (n < 2 || (line[0] != '\'' && line[0] != '"') || line[n - 1] != line[0]) {
            vm_error(m, "%s: string is not quoted", what);
            return NULL;
        }
        line++;
        n -= 2;
    }
    if (memchr(line, '\\', n)) {
        vm_error(m, "%s: escaped strings are not supported", what);
        return NULL;
    }
    loom_pickle_value *v = new_value(m, LOOM_PICKLE_STRING);
    if (v) {
        v->as.str.data = line;
        v->as.str.len = n;
    }
    return v;
}

/* ---- the interpreter loop */

/* Little-endian two's-complement integer of n bytes (LONG1, LONG4). */
static int long_bytes(vm *m, const uint8_t *b, uint64_t n, int64_t *out) {
    if (n == 0) {
        *out = 0;
        return LOOM_OK;
    }
    uint8_t fill = (b[n - 1] & 0x80) ? 0xFF : 0x00;
    for (uint64_t i = 8; i < n; i++)
        if (b[i] != fill)
            return vm_error(m, "integer of %llu bytes does not fit 64 bits", (unsigned long long)n);
    if (n > 8 && ((b[7] & 0x80) ? 0xFF : 0x00) != fill)
        return vm_error(m, "integer of %llu bytes does not fit 64 bits", (unsigned long long)n);
    int k = n < 8 ? (int)n : 8;
    uint64_t v = read_le(b, k);
    if (k < 8 && (b[k - 1] & 0x80))
        v |= ~(uint64_t)0 << (8 * k);
    *out = (int64_t)v;
    return LOOM_OK;
}

static loom_pickle_value *new_int(vm *m, int64_t x) {
    loom_pickle_value *v = new_value(m, LOOM_PICKLE_INT);
    if (v)
        v->as.integer = x;
    return v;
}

static loom_pickle_value *new_str(vm *m, loom_pickle_kind kind, uint64_t n) {
    if (n > m->len - m->pos) {
        vm_error(m, "truncated string: length %llu exceeds the %zu bytes that remain", (unsigned long long)n,
                 m->len - m->pos);
        return NULL;
    }
    loom_pickle_value *v = new_value(m, kind);
    if (v) {
        v->as.str.data = (const char *)m->data + m->pos;
        v->as.str.len = (size_t)n;
        m->pos += (size_t)n;
    }
    return v;
}

static int run(vm *m) {
    loom_pickle_value **items = NULL, *v, *w, *x;
    size_t count = 0;
    const char *line;
    size_t n;
    int64_t iv;

    while (m->pos < m->len) {
        m->op_offset = m->pos;
        uint8_t op = m->data[m->pos++];
        switch (op) {
        case 0x80: /* PROTO */
            if (need(m, 1, "PROTO") != 0)
                return LOOM_ERR;
            if (m->data[m->pos] > 5)
                return vm_error(m, "unsupported pickle protocol %d (at most 5)", m->data[m->pos]);
            m->pos++;
            break;
        case 0x95: /* FRAME: a length prefix for buffering, ignored */
            if (need(m, 8, "FRAME") != 0)
                return LOOM_ERR;
            if (read_le(m->data + m->pos, 8) > m->len - m->pos - 8)
                return vm_error(m, "FRAME length %llu exceeds the %zu bytes that remain",
                                (unsigned long long)read_le(m->data + m->pos, 8), m->len - m->pos - 8);
            m->pos += 8;
            break;
        case '.': /* STOP */
            if (!(v = pop(m, "STOP")))
                return LOOM_ERR;
            m->p->root = v;
            return LOOM_OK;

        /* -- stack and memo */
        case '(': /* MARK */
            if (push_mark(m) != 0)
                return LOOM_ERR;
            break;
        case '0': /* POP: the top value, or the last MARK when nothing is above it */
            if (m->sp > stack_base(m))
                m->sp--;
            else if (m->nmarks > 0)
                m->nmarks--;
            else
                return vm_error(m, "POP: stack underflow");
            break;
        case '1': /* POP_MARK */
            if (pop_mark(m, "POP_MARK", &items, &count) != 0)
                return LOOM_ERR;
            break;
        case '2': /* DUP */
            if (!(v = top(m, "DUP")) || push(m, v) != 0)
                return LOOM_ERR;
            break;
        case 'q': /* BINPUT */
        case 'r': /* LONG_BINPUT */
        case 'p': /* PUT */ {
            uint64_t index;
            if (op == 'p') {
                if (read_line(m, &line, &n, "PUT") != 0 || parse_decimal(m, line, n, &iv, "PUT") != 0)
                    return LOOM_ERR;
                if (iv < 0)
                    return vm_error(m, "PUT: negative memo index");
                index = (uint64_t)iv;
            } else {
                int w_len = op == 'q' ? 1 : 4;
                if (need(m, (size_t)w_len, op == 'q' ? "BINPUT" : "LONG_BINPUT") != 0)
                    return LOOM_ERR;
                index = read_le(m->data + m->pos, w_len);
                m->pos += (size_t)w_len;
            }
            if (!(v = top(m, "PUT")) || memo_put(m, index, v) != 0)
                return LOOM_ERR;
            break;
        }
        case 0x94: /* MEMOIZE */
            if (!(v = top(m, "MEMOIZE")) || memo_put(m, m->memo_count, v) != 0)
                return LOOM_ERR;
            break;
        case 'h': /* BINGET */
            if (need(m, 1, "BINGET") != 0 || memo_get(m, m->data[m->pos++]) != 0)
                return LOOM_ERR;
            break;
        case 'j': /* LONG_BINGET */
            if (need(m, 4, "LONG_BINGET") != 0)
                return LOOM_ERR;
            m->pos += 4;
            if (memo_get(m, read_le(m->data + m->pos - 4, 4)) != 0)
                return LOOM_ERR;
            break;
        case 'g': /* GET */
            if (read_line(m, &line, &n, "GET") != 0 || parse_decimal(m, line, n, &iv, "GET") != 0)
                return LOOM_ERR;
            if (iv < 0)
                return vm_error(m, "GET: negative memo index");
            if (memo_get(m, (uint64_t)iv) != 0)
                return LOOM_ERR;
            break;

        /* -- scalars */
        case 'N': /* NONE */
            if (push(m, new_value(m, LOOM_PICKLE_NONE)) != 0)
                return LOOM_ERR;
            break;
        case 0x88: /* NEWTRUE */
        case 0x89: /* NEWFALSE */
            if (!(v = new_value(m, LOOM_PICKLE_BOOL)))
                return LOOM_ERR;
            v->as.boolean = op == 0x88;
            if (push(m, v) != 0)
                return LOOM_ERR;
            break;
        case 'J': /* BININT */
            if (need(m, 4, "BININT") != 0)
                return LOOM_ERR;
            iv = (int32_t)(uint32_t)read_le(m->data + m->pos, 4);
            m->pos += 4;
            if (push(m, new_int(m, iv)) != 0)
                return LOOM_ERR;
            break;
        case 'K': /* BININT1 */
            if (need(m, 1, "BININT1") != 0 || push(m, new_int(m, m->data[m->pos++])) != 0)
                return LOOM_ERR;
            break;
        case 'M': /* BININT2 */
            if (need(m, 2, "BININT2") != 0)
                return LOOM_ERR;
            m->pos += 2;
            if (push(m, new_int(m, (int64_t)read_le(m->data + m->pos - 2, 2))) != 0)
                return LOOM_ERR;
            break;
        case 0x8a: /* LONG1 */
        case 0x8b: /* LONG4 */ {
            int w_len = op == 0x8a ? 1 : 4;
            if (need(m, (size_t)w_len, op == 0x8a ? "LONG1" : "LONG4") != 0)
                return LOOM_ERR;
            uint64_t nb = read_le(m->data + m->pos, w_len);
            m->pos += (size_t)w_len;
            if (op == 0x8b && nb > INT32_MAX)
                return vm_error(m, "LONG4: negative byte count");
            if (nb > m->len - m->pos)
                return vm_error(m, "truncated LONG: %llu bytes needed, %zu remain", (unsigned long long)nb,
                                m->len - m->pos);
            if (long_bytes(m, m->data + m->pos, nb, &iv) != 0)
                return LOOM_ERR;
            m->pos += (size_t)nb;
            if (push(m, new_int(m, iv)) != 0)
                return LOOM_ERR;
            break;
        }
        case 'I': /* INT: decimal text, or 01/00 for True/False */
        case 'L': /* LONG: decimal text with an optional 'L' suffix */
            if (read_line(m, &line, &n, op == 'I' ? "INT" : "LONG") != 0)
                return LOOM_ERR;
            if (op == 'I' && n == 2 && line[0] == '0' && (line[1] == '0' || line[1] == '1')) {
                if (!(v = new_value(m, LOOM_PICKLE_BOOL)))
                    return LOOM_ERR;
                v->as.boolean = line[1] == '1';
            } else {
                if (op == 'L' && n > 0 && line[n - 1] == 'L')
                    n--;
                if (parse_decimal(m, line, n, &iv, op == 'I' ? "INT" : "LONG") != 0 || !(v = new_int(m, iv)))
                    return LOOM_ERR;
            }
            if (push(m, v) != 0)
                return LOOM_ERR;
            break;
        case 'G': /* BINFLOAT: big-endian IEEE 754 double */ {
            if (need(m, 8, "BINFLOAT") != 0)
                return LOOM_ERR;
            uint64_t bits = 0;
            for (int i = 0; i < 8; i++)
                bits = (bits << 8) | m->data[m->pos + (size_t)i];
            m->pos += 8;
            if (!(v = new_value(m, LOOM_PICKLE_FLOAT)))
                return LOOM_ERR;
            memcpy(&v->as.number, &bits, sizeof bits);
            if (push(m, v) != 0)
                return LOOM_ERR;
            break;
        }
        case 'F': /* FLOAT: text */ {
            char buf[64], *end;
            if (read_line(m, &line, &n, "FLOAT") != 0)
                return LOOM_ERR;
            if (n == 0 || n >= sizeof buf)
                return vm_error(m, "FLOAT: invalid number");
            memcpy(buf, line, n);
            buf[n] = '\0';
            if (!(v = new_value(m, LOOM_PICKLE_FLOAT)))
                return LOOM_ERR;
            v->as.number = strtod(buf, &end);
            if (*end != '\0')
                return vm_error(m, "FLOAT: invalid number");
            if (push(m, v) != 0)
                return LOOM_ERR;
            break;
        }

        /* -- strings and bytes */
        case 0x8c: /* SHORT_BINUNICODE */
        case 'U':  /* SHORT_BINSTRING */
        case 'C':  /* SHORT_BINBYTES */
            if (need(m, 1, "string length") != 0)
                return LOOM_ERR;
            n = m->data[m->pos++];
            if (push(m, new_str(m, op == 'C' ? LOOM_PICKLE_BYTES : LOOM_PICKLE_STRING, n)) != 0)
                return LOOM_ERR;
            break;
        case 'X': /* BINUNICODE */
        case 'T': /* BINSTRING (signed length) */
        case 'B': /* BINBYTES */ {
            if (need(m, 4, "string length") != 0)
                return LOOM_ERR;
            uint64_t len = read_le(m->data + m->pos, 4);
            m->pos += 4;
            if (op == 'T' && len > INT32_MAX)
                return vm_error(m, "BINSTRING: negative length");
            if (push(m, new_str(m, op == 'B' ? LOOM_PICKLE_BYTES : LOOM_PICKLE_STRING, len)) != 0)
                return LOOM_ERR;
            break;
        }
        case 0x8d: /* BINUNICODE8 */
        case 0x8e: /* BINBYTES8 */
        case 0x96: /* BYTEARRAY8 */ {
            if (need(m, 8, "string length") != 0)
                return LOOM_ERR;
            uint64_t len = read_le(m->data + m->pos, 8);
            m->pos += 8;
            if (push(m, new_str(m, op == 0x8d ? LOOM_PICKLE_STRING : LOOM_PICKLE_BYTES, len)) != 0)
                return LOOM_ERR;
            break;
        }
        case 'S': /* STRING: quoted text */
        case 'V': /* UNICODE: raw-unicode-escape text */
            if (read_line(m, &line, &n, op == 'S' ? "STRING" : "UNICODE") != 0 ||
                push(m, text_string(m, line, n, op == 'S', op == 'S' ? "STRING" : "UNICODE")) != 0)
                return LOOM_ERR;
            break;

        /* -- containers */
        case ')': /* EMPTY_TUPLE */
            if (push(m, new_value(m, LOOM_PICKLE_TUPLE)) != 0)
                return LOOM_ERR;
            break;
        case 0x85: /* TUPLE1 */
        case 0x86: /* TUPLE2 */
        case 0x87: /* TUPLE3 */ {
            size_t k = (size_t)(op - 0x84);
            if (m->sp < stack_base(m) + k)
                return vm_error(m, "TUPLE%zu: stack underflow", k);
            m->sp -= k;
            if (push(m, new_seq(m, LOOM_PICKLE_TUPLE, m->stack + m->sp, k)) != 0)
                return LOOM_ERR;
            break;
        }
        case 't': /* TUPLE */
            if (pop_mark(m, "TUPLE", &items, &count) != 0 ||
                push(m, new_seq(m, LOOM_PICKLE_TUPLE, items, count)) != 0)
                return LOOM_ERR;
            break;
        case 'l':  /* LIST */
        case 0x91: /* FROZENSET */
            if (pop_mark(m, op == 'l' ? "LIST" : "FROZENSET", &items, &count) != 0 ||
                push(m, new_seq(m, LOOM_PICKLE_LIST, items, count)) != 0)
                return LOOM_ERR;
            break;
        case ']':  /* EMPTY_LIST */
        case 0x8f: /* EMPTY_SET */
            if (push(m, new_value(m, LOOM_PICKLE_LIST)) != 0)
                return LOOM_ERR;
            break;
        case '}': /* EMPTY_DICT */
            if (push(m, new_value(m, LOOM_PICKLE_DICT)) != 0)
                return LOOM_ERR;
            break;
        case 'd': /* DICT */
            if (pop_mark(m, "DICT", &items, &count) != 0)
                return LOOM_ERR;
            if (count % 2)
                return vm_error(m, "DICT: odd number of items (%zu)", count);
            if (!(v = new_value(m, LOOM_PICKLE_DICT)) || dict_add(m, v, items, count / 2) != 0 || push(m, v) != 0)
                return LOOM_ERR;
            break;
        case 'a': /* APPEND */
            if (!(v = pop(m, "APPEND")) || !(w = top(m, "APPEND")))
                return LOOM_ERR;
            if (w->kind != LOOM_PICKLE_LIST)
                return vm_error(m, "APPEND to a %s", kind_name(w->kind));
            if (seq_append(m, w, &v, 1) != 0)
                return LOOM_ERR;
            break;
        case 'e':  /* APPENDS */
        case 0x90: /* ADDITEMS */
            if (pop_mark(m, op == 'e' ? "APPENDS" : "ADDITEMS", &items, &count) != 0 ||
                !(w = top(m, op == 'e' ? "APPENDS" : "ADDITEMS")))
                return LOOM_ERR;
            if (w->kind != LOOM_PICKLE_LIST)
                return vm_error(m, "%s to a %s", op == 'e' ? "APPENDS" : "ADDITEMS", kind_name(w->kind));
            if (seq_append(m, w, items, count) != 0)
                return LOOM_ERR;
            break;
        case 's': /* SETITEM */
            if (!(x = pop(m, "SETITEM")) || !(v = pop(m, "SETITEM")) || !(w = top(m, "SETITEM")))
                return LOOM_ERR;
            if (w->kind != LOOM_PICKLE_DICT)
                return vm_error(m, "SETITEM on a %s", kind_name(w->kind));
            {
                loom_pickle_value *kv[2] = {v, x};
                if (dict_add(m, w, kv, 1) != 0)
                    return LOOM_ERR;
            }
            break;
        case 'u': /* SETITEMS */
            if (pop_mark(m, "SETITEMS", &items, &count) != 0 || !(w = top(m, "SETITEMS")))
                return LOOM_ERR;
            if (w->kind != LOOM_PICKLE_DICT)
                return vm_error(m, "SETITEMS on a %s", kind_name(w->kind));
            if (count % 2)
                return vm_error(m, "SETITEMS: odd number of items (%zu)", count);
            if (dict_add(m, w, items, count / 2) != 0)
                return LOOM_ERR;
            break;

        /* -- globals, calls and persistent ids */
        case 'c': /* GLOBAL: module and name on two lines */ {
            const char *mod;
            size_t mlen;
            if (read_line(m, &mod, &mlen, "GLOBAL") != 0 || read_line(m, &line, &n, "GLOBAL") != 0 ||
                find_global(m, mod, mlen, line, n, &v) != 0 || push(m, v) != 0)
                return LOOM_ERR;
            break;
        }
        case 0x93: /* STACK_GLOBAL */
            if (!(w = pop(m, "STACK_GLOBAL")) || !(v = pop(m, "STACK_GLOBAL")))
                return LOOM_ERR;
            if (v->kind != LOOM_PICKLE_STRING || w->kind != LOOM_PICKLE_STRING)
                return vm_error(m, "STACK_GLOBAL: module and name must be str, got %s and %s", kind_name(v->kind),
                                kind_name(w->kind));
            if (find_global(m, v->as.str.data, v->as.str.len, w->as.str.data, w->as.str.len, &x) != 0 ||
                push(m, x) != 0)
                return LOOM_ERR;
            break;
        case 'R': /* REDUCE: callable, args */
            if (!(v = pop(m, "REDUCE")) || !(w = pop(m, "REDUCE")) || push(m, call_global(m, w, v, 0)) != 0)
                return LOOM_ERR;
            break;
        case 0x81: /* NEWOBJ: cls, args */
            if (!(v = pop(m, "NEWOBJ")) || !(w = pop(m, "NEWOBJ")) || push(m, call_global(m, w, v, 0)) != 0)
                return LOOM_ERR;
            break;
        case 0x92: /* NEWOBJ_EX: cls, args, kwargs (kwargs ignored) */
            if (!pop(m, "NEWOBJ_EX") || !(v = pop(m, "NEWOBJ_EX")) || !(w = pop(m, "NEWOBJ_EX")) ||
                push(m, call_global(m, w, v, 0)) != 0)
                return LOOM_ERR;
            break;
        case 'o': /* OBJ: MARK cls args... */
            if (pop_mark(m, "OBJ", &items, &count) != 0)
                return LOOM_ERR;
            if (count == 0)
                return vm_error(m, "OBJ: no class after MARK");
            if (!(v = new_seq(m, LOOM_PICKLE_TUPLE, items + 1, count - 1)) ||
                push(m, call_global(m, items[0], v, 0)) != 0)
                return LOOM_ERR;
            break;
        case 'i': /* INST: module and name lines, MARK args... */ {
            const char *mod;
            size_t mlen;
            if (read_line(m, &mod, &mlen, "INST") != 0 || read_line(m, &line, &n, "INST") != 0 ||
                find_global(m, mod, mlen, line, n, &w) != 0 || pop_mark(m, "INST", &items, &count) != 0 ||
                !(v = new_seq(m, LOOM_PICKLE_TUPLE, items, count)) || push(m, call_global(m, w, v, 0)) != 0)
                return LOOM_ERR;
            break;
        }
        case 'b': /* BUILD: the state sets Python attributes, which are dropped */
            if (!pop(m, "BUILD") || !top(m, "BUILD"))
                return LOOM_ERR;
            break;
        case 'Q': /* BINPERSID */
            if (!(v = pop(m, "BINPERSID")) || push(m, persistent_load(m, v)) != 0)
                return LOOM_ERR;
            break;
        case 'P': /* PERSID: a text id, which torch never writes */
            if (read_line(m, &line, &n, "PERSID") != 0)
                return LOOM_ERR;
            return vm_error(m, "PERSID: text persistent ids are not supported");

        case 0x82: /* EXT1 */
        case 0x83: /* EXT2 */
        case 0x84: /* EXT4 */
            return vm_error(m, "opcode 0x%02x (EXT): the extension registry is not supported", op);
        case 0x97:
        case 0x98:
            return vm_error(m, "opcode 0x%02x (%s): out-of-band buffers are not supported", op,
                            op == 0x97 ? "NEXT_BUFFER" : "READONLY_BUFFER");
        default:
            return vm_error(m, "invalid opcode 0x%02x", op);
        }
    }
    m->op_offset = m->len;
    return vm_error(m, "truncated pickle: no STOP opcode before the end of the data");
}

int loom_pickle_load(loom_pickle **out, const void *data, size_t len, const char *label) {
    *out = NULL;
    loom_pickle *p = calloc(1, sizeof *p);
    if (!p)
        return loom_error("%s: out of memory", label);
    /* A one-byte opcode can make one value (48 bytes) plus container slots,
     * so the arena needs a small multiple of the input. The cap stops a
     * pickle that multiplies a container through the memo from exhausting
     * memory. */
    size_t limit;
    if (loom_mul_size(len, 128, &limit) != 0 || loom_add_size(limit, (size_t)16 << 20, &limit) != 0)
        limit = SIZE_MAX;
    p->arena_limit = limit;

    /* The stack starts allocated, so that a MARK on an empty stack gives a
     * valid (empty) item range. */
    vm m = {.data = data, .len = len, .label = label, .p = p};
    m.stack = malloc(64 * sizeof *m.stack);
    if (!m.stack) {
        loom_pickle_free(p);
        return loom_error("%s: out of memory", label);
    }
    m.stack_cap = 64;
    int rc = run(&m);
    free(m.stack);
    free(m.marks);
    free(m.memo);
    if (rc != 0) {
        loom_pickle_free(p);
        return LOOM_ERR;
    }
    *out = p;
    return LOOM_OK;
}
