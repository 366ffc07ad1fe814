/* Loom core: safetensors reader and writer (see safetensors.h). Every length,
 * dimension and offset read from a header is range-checked with the
 * overflow-safe helpers of base.h before it is used, and every error names
 * the file, the tensor and the byte offset involved. */
#include "safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* safetensors stores elements little-endian, and both directions copy bytes
 * unchanged. */
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors.c copies little-endian file data as is and needs a little-endian host"
#endif

/* ------------------------------------------------------------------------
 * dtypes */

typedef struct stored_dtype {
    const char *name; /* as written in the header */
    size_t size;      /* bytes per element in the file */
    int loaded;       /* loom_dtype it loads as, or -1 when rejected */
} stored_dtype;

/* Every dtype of safetensors' Dtype enum (safetensors/src/tensor.rs). */
static const stored_dtype stored_dtypes[] = {
    {"F32", 4, LOOM_F32},   {"F16", 2, LOOM_F16},    {"BF16", 2, LOOM_BF16},
    {"I32", 4, LOOM_I32},   {"I64", 8, LOOM_I64},    {"U8", 1, LOOM_U8},
    {"BOOL", 1, LOOM_U8},   {"F64", 8, LOOM_F32},    {"I8", 1, -1},
    {"I16", 2, -1},         {"U16", 2, -1},          {"U32", 4, -1},
    {"U64", 8, -1},         {"F8_E4M3", 1, -1},      {"F8_E5M2", 1, -1},
};

#define SUPPORTED_DTYPES "F32, F16, BF16, I32, I64, U8, BOOL (as u8), F64 (converted to f32)"

static const stored_dtype *find_stored_dtype(const char *name) {
    for (size_t i = 0; i < sizeof stored_dtypes / sizeof stored_dtypes[0]; i++)
        if (strcmp(stored_dtypes[i].name, name) == 0)
            return &stored_dtypes[i];
    return NULL;
}

/* The header name the writer uses for a Loom dtype, or NULL. */
static const char *written_dtype_name(loom_dtype dtype) {
    switch (dtype) {
    case LOOM_F32: return "F32";
    case LOOM_F16: return "F16";
    case LOOM_BF16: return "BF16";
    case LOOM_I32: return "I32";
    case LOOM_I64: return "I64";
    case LOOM_U8: return "U8";
    default: return NULL;
    }
}

/* ------------------------------------------------------------------------
 * checkpoint */

typedef struct entry {
    char *name;
    loom_tensor tensor; /* shape is filled while parsing, storage at the end */
    const stored_dtype *stored;
    int file;            /* index into loom_checkpoint.files */
    size_t begin, end;   /* data_offsets, relative to the data section */
    bool offsets_known;  /* begin and end are valid (for messages) */
} entry;

struct loom_checkpoint {
    entry *entries;
    int count, capacity;
    /* Name lookup by open addressing: each slot stores an entry index + 1,
     * and 0 marks an empty slot. slot_count is 0 or a power of two. */
    int *slots;
    size_t slot_count;
    struct metadata_pair {
        char *key, *value;
    } *meta;
    int meta_count, meta_capacity;
    char **files;
    int file_count, file_capacity;
};

/* Return `array` (of `elem`-byte items) resized to hold at least `need`
 * items, updating *capacity, or NULL with the error set. */
static void *reserve(void *array, int *capacity, int need, size_t elem) {
    int cap = *capacity;
    void *p;
    if (need <= cap)
        return array;
    if (need > INT32_MAX / 2) {
        loom_error("checkpoint: too many entries (%d)", need);
        return NULL;
    }
    cap = cap ? cap : 16;
    while (cap < need)
        cap *= 2;
    p = realloc(array, (size_t)cap * elem);
    if (!p) {
        loom_error("checkpoint: out of memory growing a table to %d entries", cap);
        return NULL;
    }
    *capacity = cap;
    return p;
}

static char *copy_string(const char *s) {
    size_t n = strlen(s) + 1;
    char *p = malloc(n);
    if (p)
        memcpy(p, s, n);
    else
        loom_error("checkpoint: out of memory copying a %zu-byte string", n);
    return p;
}

static uint64_t hash_name(const char *s) {
    /* FNV-1a, 64-bit */
    uint64_t h = 14695981039346656037ull;
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 1099511628211ull;
    }
    return h;
}

static int table_lookup(const loom_checkpoint *ck, const char *name) {
    size_t mask, i;
    if (ck->slot_count == 0)
        return -1;
    mask = ck->slot_count - 1;
    for (i = hash_name(name) & mask;; i = (i + 1) & mask) {
        int v = ck->slots[i];
        if (v == 0)
            return -1;
        if (strcmp(ck->entries[v - 1].name, name) == 0)
            return v - 1;
    }
}

static void table_place(int *slots, size_t slot_count, const char *name, int index) {
    size_t mask = slot_count - 1, i;
    for (i = hash_name(name) & mask; slots[i] != 0; i = (i + 1) & mask) {
    }
    slots[i] = index + 1;
}

/* Add entry `index` (already in ck->entries) to the lookup table, keeping the
 * table at most half full. */
static int table_add(loom_checkpoint *ck, int index) {
    if ((size_t)(index + 1) * 2 > ck->slot_count) {
        size_t n = ck->slot_count ? ck->slot_count * 2 : 64;
        int *slots = calloc(n, sizeof *slots);
        if (!slots)
            return loom_error("checkpoint: out of memory growing the name table");
        for (int i = 0; i < index; i++)
            table_place(slots, n, ck->entries[i].name, i);
        free(ck->slots);
        ck->slots = slots;
        ck->slot_count = n;
    }
    table_place(ck->slots, ck->slot_count, ck->entries[index].name, index);
    return LOOM_OK;
}

static int add_file(loom_checkpoint *ck, const char *path) {
    char **files = reserve(ck->files, &ck->file_capacity, ck->file_count + 1, sizeof *files);
    if (!files)
        return -1;
    ck->files = files;
    ck->files[ck->file_count] = copy_string(path);
    if (!ck->files[ck->file_count])
        return -1;
    return ck->file_count++;
}

void loom_checkpoint_close(loom_checkpoint *ck) {
    if (!ck)
        return;
    for (int i = 0; i < ck->count; i++) {
        free(ck->entries[i].name);
        loom_tensor_free(&ck->entries[i].tensor);
    }
    for (int i = 0; i < ck->meta_count; i++) {
        free(ck->meta[i].key);
        free(ck->meta[i].value);
    }
    for (int i = 0; i < ck->file_count; i++)
        free(ck->files[i]);
    free(ck->entries);
    free(ck->slots);
    free(ck->meta);
    free(ck->files);
    free(ck);
}

/* ------------------------------------------------------------------------
 * accessors */

int loom_checkpoint_count(const loom_checkpoint *ck) { return ck ? ck->count : 0; }

const char *loom_checkpoint_name(const loom_checkpoint *ck, int i) {
    return ck && i >= 0 && i < ck->count ? ck->entries[i].name : NULL;
}

const loom_tensor *loom_checkpoint_tensor(const loom_checkpoint *ck, int i) {
    return ck && i >= 0 && i < ck->count ? &ck->entries[i].tensor : NULL;
}

const char *loom_checkpoint_stored_dtype(const loom_checkpoint *ck, int i) {
    return ck && i >= 0 && i < ck->count ? ck->entries[i].stored->name : NULL;
}

const char *loom_checkpoint_file(const loom_checkpoint *ck, int i) {
    return ck && i >= 0 && i < ck->count ? ck->files[ck->entries[i].file] : NULL;
}

int loom_checkpoint_find(const loom_checkpoint *ck, const char *name) {
    return ck && name ? table_lookup(ck, name) : -1;
}

const loom_tensor *loom_checkpoint_get(const loom_checkpoint *ck, const char *name) {
    int i = loom_checkpoint_find(ck, name);
    return i < 0 ? NULL : &ck->entries[i].tensor;
}

int loom_checkpoint_metadata_count(const loom_checkpoint *ck) { return ck ? ck->meta_count : 0; }

const char *loom_checkpoint_metadata_key(const loom_checkpoint *ck, int i) {
    return ck && i >= 0 && i < ck->meta_count ? ck->meta[i].key : NULL;
}

const char *loom_checkpoint_metadata_value(const loom_checkpoint *ck, int i) {
    return ck && i >= 0 && i < ck->meta_count ? ck->meta[i].value : NULL;
}

const char *loom_checkpoint_metadata_get(const loom_checkpoint *ck, const char *key) {
    if (!ck || !key)
        return NULL;
    for (int i = 0; i < ck->meta_count; i++)
        if (strcmp(ck->meta[i].key, key) == 0)
            return ck->meta[i].value;
    return NULL;
}

/* ------------------------------------------------------------------------
 * header parsing */

/* Offset of the first byte of s[0..len) that does not belong to a well-formed
 * UTF-8 sequence (no overlong forms, surrogates or code points past
 * U+10FFFF), or len when the whole range is valid. */
static size_t utf8_invalid_at(const unsigned char *s, size_t len) {
    size_t i = 0;
    while (i < len) {
        unsigned c = s[i];
        size_t extra;
        unsigned lo = 0x80, hi = 0xBF;
        if (c < 0x80) {
            i++;
            continue;
        }
        if (c >= 0xC2 && c <= 0xDF) {
            extra = 1;
        } else if (c >= 0xE0 && c <= 0xEF) {
            extra = 2;
            if (c == 0xE0)
                lo = 0xA0; /* overlong */
            if (c == 0xED)
                hi = 0x9F; /* UTF-16 surrogates */
        } else if (c >= 0xF0 && c <= 0xF4) {
            extra = 3;
            if (c == 0xF0)
                lo = 0x90; /* overlong */
            if (c == 0xF4)
                hi = 0x8F; /* past U+10FFFF */
        } else {
            return i;
        }
        if (len - i <= extra)
            return i;
        if (s[i + 1] < lo || s[i + 1] > hi)
            return i;
        for (size_t k = 2; k <= extra; k++)
            if (s[i + k] < 0x80 || s[i + k] > 0xBF)
                return i;
        i += extra + 1;
    }
    return len;
}

/* One safetensors image being parsed. */
typedef struct parse_ctx {
    loom_checkpoint *ck;
    loom_storage *storage;
    const char *file;            /* name in messages */
    const unsigned char *bytes;  /* the whole file */
    size_t size;
    size_t header_len;           /* N, the JSON header's length */
    size_t data_start;           /* 8 + N */
    size_t data_len;             /* size - data_start */
    size_t described_len;        /* the largest data_offsets end in the header */
    int file_index;
} parse_ctx;

/* Compact JSON text of `item` for messages, cut to fit `cap`. */
static const char *json_text(const cJSON *item, char *buf, size_t cap) {
    char *text = cJSON_PrintUnformatted(item);
    if (!text) {
        snprintf(buf, cap, "(unprintable)");
        return buf;
    }
    if (strlen(text) >= cap && cap > 4) {
        memcpy(buf, text, cap - 4);
        memcpy(buf + cap - 4, "...", 4);
    } else {
        snprintf(buf, cap, "%s", text);
    }
    cJSON_free(text);
    return buf;
}

/* Describe where an entry is, for messages: its data once data_offsets are
 * known, otherwise its key in the header. */
static void describe_entry_position(const parse_ctx *cx, const entry *e, char *buf, size_t cap) {
    const unsigned char *header = cx->bytes + 8;
    size_t name_len = strlen(e->name);
    if (e->offsets_known) {
        snprintf(buf, cap, "data at file offset %zu", cx->data_start + e->begin);
        return;
    }
    /* Look for the first string with the name's text, which is the key
     * unless an earlier value has the same text. A name written with escapes
     * is not found and gets the header's range instead. */
    for (size_t i = 0; name_len + 2 <= cx->header_len && i <= cx->header_len - name_len - 2; i++) {
        if (header[i] == '"' && header[i + name_len + 1] == '"' &&
            memcmp(header + i + 1, e->name, name_len) == 0) {
            snprintf(buf, cap, "header entry at file offset %zu", 8 + i);
            return;
        }
    }
    snprintf(buf, cap, "header entry within file bytes 8..%zu", cx->data_start);
}

/* Set the error "'file': tensor 'name' (position): message". */
__attribute__((format(printf, 3, 4)))
static int entry_error(const parse_ctx *cx, const entry *e, const char *fmt, ...) {
    char message[640], where[96];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    describe_entry_position(cx, e, where, sizeof where);
    return loom_error("'%s': tensor '%s' (%s): %s", cx->file, e->name, where, message);
}

/* Test for a JSON number that is an integer in [0, 2^53], the range a
 * double represents exactly. cJSON keeps only the double, so 4.0 and 4e0 pass as 4 although
 * the safetensors library would reject them. */
static bool json_uint(const cJSON *item, uint64_t *out) {
    double d;
    if (!cJSON_IsNumber(item))
        return false;
    d = item->valuedouble;
    if (!isfinite(d) || d < 0 || d > 9007199254740992.0 || d != floor(d))
        return false;
    *out = (uint64_t)d;
    return true;
}

static int parse_data_offsets(const parse_ctx *cx, entry *e, const cJSON *offsets) {
    char text[96];
    uint64_t begin, end;
    if (!offsets)
        return entry_error(cx, e, "missing 'data_offsets'");
    if (!cJSON_IsArray(offsets) || cJSON_GetArraySize(offsets) != 2 ||
        !json_uint(cJSON_GetArrayItem(offsets, 0), &begin) ||
        !json_uint(cJSON_GetArrayItem(offsets, 1), &end))
        return entry_error(cx, e, "'data_offsets' must be two non-negative integers [begin, end], got %s",
                           json_text(offsets, text, sizeof text));
    if (begin > end)
        return entry_error(cx, e, "data_offsets [%" PRIu64 ", %" PRIu64 "] have begin > end", begin, end);
    /* described_len >= end here, so the header describes more data than the
     * file holds: say that first, then name this entry, the first one past
     * the end in header order. */
    if (end > cx->data_len) {
        char where[96];
        describe_entry_position(cx, e, where, sizeof where);
        return loom_error("'%s': file is %zu bytes but its header describes %zu bytes of data (a %zu-byte "
                          "file): the file is truncated at tensor '%s' (%s): data_offsets [%" PRIu64 ", %" PRIu64
                          "] end past the data section (expected end <= %zu, the data section spans file bytes "
                          "%zu..%zu)",
                          cx->file, cx->size, cx->described_len, cx->data_start + cx->described_len, e->name,
                          where, begin, end, cx->data_len, cx->data_start, cx->size);
    }
    e->begin = (size_t)begin;
    e->end = (size_t)end;
    e->offsets_known = true;
    return LOOM_OK;
}

/* Return the largest data_offsets end among the header's entries, skipping
 * malformed entries, which parse_entry reports later. */
static size_t described_data_len(const cJSON *root) {
    const cJSON *item;
    uint64_t largest = 0;
    cJSON_ArrayForEach(item, root) {
        const cJSON *offsets = cJSON_GetObjectItemCaseSensitive(item, "data_offsets");
        uint64_t begin, end;
        if (strcmp(item->string, "__metadata__") == 0 || !cJSON_IsArray(offsets) ||
            cJSON_GetArraySize(offsets) != 2 || !json_uint(cJSON_GetArrayItem(offsets, 0), &begin) ||
            !json_uint(cJSON_GetArrayItem(offsets, 1), &end) || begin > end)
            continue;
        if (end > largest)
            largest = end;
    }
    return largest > SIZE_MAX ? SIZE_MAX : (size_t)largest;
}

static int parse_dtype(const parse_ctx *cx, entry *e, const cJSON *dtype) {
    char text[96];
    const stored_dtype *sd;
    if (!dtype)
        return entry_error(cx, e, "missing 'dtype'");
    if (!cJSON_IsString(dtype))
        return entry_error(cx, e, "'dtype' must be a string, got %s", json_text(dtype, text, sizeof text));
    sd = find_stored_dtype(dtype->valuestring);
    if (!sd)
        return entry_error(cx, e, "unknown dtype '%.40s' (supported: " SUPPORTED_DTYPES ")",
                           dtype->valuestring);
    if (sd->loaded < 0)
        return entry_error(cx, e, "dtype '%s' is not supported by Loom (supported: " SUPPORTED_DTYPES ")",
                           sd->name);
    e->stored = sd;
    return LOOM_OK;
}

/* Fill e->tensor's ndim and shape, and check that the shape's byte size
 * equals the span of data_offsets. */
static int parse_shape(const parse_ctx *cx, entry *e, const cJSON *shape) {
    char text[96];
    const cJSON *dim;
    size_t numel = 1, nbytes;
    int ndim = 0;
    if (!shape)
        return entry_error(cx, e, "missing 'shape'");
    if (!cJSON_IsArray(shape))
        return entry_error(cx, e, "'shape' must be an array of non-negative integers, got %s",
                           json_text(shape, text, sizeof text));
    if (cJSON_GetArraySize(shape) > LOOM_MAX_DIMS)
        return entry_error(cx, e, "shape %s has %d dimensions, more than the %d Loom supports",
                           json_text(shape, text, sizeof text), cJSON_GetArraySize(shape), LOOM_MAX_DIMS);
    cJSON_ArrayForEach(dim, shape) {
        uint64_t v;
        if (!json_uint(dim, &v))
            return entry_error(cx, e, "'shape' must be an array of non-negative integers, got %s",
                               json_text(shape, text, sizeof text));
        if (loom_mul_size(numel, (size_t)v, &numel) != 0)
            return entry_error(cx, e, "shape %s has more elements than a size_t can count",
                               json_text(shape, text, sizeof text));
        e->tensor.shape[ndim++] = (int64_t)v;
    }
    e->tensor.ndim = ndim;
    if (loom_mul_size(numel, e->stored->size, &nbytes) != 0)
        return entry_error(cx, e, "shape %s of %zu-byte elements is larger than a size_t can count",
                           loom_dims_str(ndim, e->tensor.shape).s, e->stored->size);
    if (e->end - e->begin != nbytes)
        return entry_error(cx, e,
                           "dtype %s with shape %s needs %zu bytes, but data_offsets [%zu, %zu] span %zu",
                           e->stored->name, loom_dims_str(ndim, e->tensor.shape).s, nbytes, e->begin,
                           e->end, e->end - e->begin);
    return LOOM_OK;
}

/* Check one header entry and append it to the checkpoint (without storage). */
static int parse_entry(parse_ctx *cx, const cJSON *item) {
    loom_checkpoint *ck = cx->ck;
    char text[96];
    entry e = {.name = item->string, .file = cx->file_index};
    entry *entries;
    int existing;

    if (!cJSON_IsObject(item))
        return entry_error(cx, &e, "expected an object with dtype, shape and data_offsets, got %s",
                           json_text(item, text, sizeof text));
    if (parse_data_offsets(cx, &e, cJSON_GetObjectItemCaseSensitive(item, "data_offsets")) != LOOM_OK ||
        parse_dtype(cx, &e, cJSON_GetObjectItemCaseSensitive(item, "dtype")) != LOOM_OK ||
        parse_shape(cx, &e, cJSON_GetObjectItemCaseSensitive(item, "shape")) != LOOM_OK)
        return LOOM_ERR;

    existing = table_lookup(ck, e.name);
    if (existing >= 0) {
        if (ck->entries[existing].file == cx->file_index)
            return entry_error(cx, &e, "duplicate tensor name (also defined at file offset %zu)",
                               cx->data_start + ck->entries[existing].begin);
        return entry_error(cx, &e, "tensor name also present in shard '%s'",
                           ck->files[ck->entries[existing].file]);
    }

    entries = reserve(ck->entries, &ck->capacity, ck->count + 1, sizeof *entries);
    if (!entries)
        return LOOM_ERR;
    ck->entries = entries;
    e.name = copy_string(item->string);
    if (!e.name)
        return LOOM_ERR;
    ck->entries[ck->count] = e;
    ck->count++;
    return table_add(ck, ck->count - 1);
}

static int parse_metadata(parse_ctx *cx, const cJSON *meta) {
    loom_checkpoint *ck = cx->ck;
    char text[96];
    const cJSON *item;
    if (!cJSON_IsObject(meta))
        return loom_error("'%s': '__metadata__' must be an object of strings, got %s", cx->file,
                          json_text(meta, text, sizeof text));
    cJSON_ArrayForEach(item, meta) {
        if (!cJSON_IsString(item))
            return loom_error("'%s': '__metadata__' entry '%s' must be a string, got %s", cx->file,
                              item->string, json_text(item, text, sizeof text));
        if (loom_checkpoint_metadata_get(ck, item->string))
            continue;
        struct metadata_pair *meta = reserve(ck->meta, &ck->meta_capacity, ck->meta_count + 1, sizeof *meta);
        if (!meta)
            return LOOM_ERR;
        ck->meta = meta;
        meta[ck->meta_count].key = copy_string(item->string);
        meta[ck->meta_count].value = copy_string(item->valuestring);
        if (!meta[ck->meta_count].key || !meta[ck->meta_count].value) {
            free(meta[ck->meta_count].key);
            free(meta[ck->meta_count].value);
            return LOOM_ERR;
        }
        ck->meta_count++;
    }
    return LOOM_OK;
}

typedef struct span {
    size_t begin, end;
    int index;
} span;

static int compare_spans(const void *a, const void *b) {
    const span *x = a, *y = b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    return x->index - y->index;
}

/* Reject tensors of this file whose byte ranges overlap. Empty tensors own no
 * bytes and may share any offset. */
static int check_overlaps(const parse_ctx *cx, int first) {
    const loom_checkpoint *ck = cx->ck;
    span *spans;
    int n = 0, rc = LOOM_OK;
    if (ck->count - first < 2)
        return LOOM_OK;
    spans = malloc((size_t)(ck->count - first) * sizeof *spans);
    if (!spans)
        return loom_error("'%s': out of memory checking tensor offsets", cx->file);
    for (int i = first; i < ck->count; i++)
        if (ck->entries[i].end > ck->entries[i].begin)
            spans[n++] = (span){ck->entries[i].begin, ck->entries[i].end, i};
    qsort(spans, (size_t)n, sizeof *spans, compare_spans);
    for (int i = 1, widest = 0; i < n; i++) {
        if (spans[i].begin < spans[widest].end) {
            const entry *e = &ck->entries[spans[i].index], *o = &ck->entries[spans[widest].index];
            rc = entry_error(cx, e, "data_offsets [%zu, %zu] overlap tensor '%s' at [%zu, %zu]", e->begin,
                             e->end, o->name, o->begin, o->end);
            break;
        }
        if (spans[i].end > spans[widest].end)
            widest = i;
    }
    free(spans);
    return rc;
}

/* Give entry e its tensor: a view of the storage when the data is aligned to
 * the element size, otherwise an owned copy; F64 data is converted to f32.
 * Operators read elements through typed pointers (loom_load_f32 in
 * ops_internal.h, and cblas), which must be aligned, hence the copy. */
static int build_tensor(const parse_ctx *cx, entry *e) {
    size_t file_offset = cx->data_start + e->begin;
    const unsigned char *src = cx->bytes + file_offset;
    int64_t shape[LOOM_MAX_DIMS];
    int ndim = e->tensor.ndim;
    size_t nbytes = e->end - e->begin;
    loom_dtype dtype = (loom_dtype)e->stored->loaded;

    memcpy(shape, e->tensor.shape, sizeof shape);
    e->tensor = LOOM_TENSOR_EMPTY;

    if (strcmp(e->stored->name, "F64") == 0) {
        size_t count = nbytes / 8;
        float *dst;
        if (loom_tensor_init(&e->tensor, LOOM_F32, ndim, shape) != LOOM_OK)
            return loom_error_prefix("'%s': tensor '%s'", cx->file, e->name);
        dst = loom_tensor_data(&e->tensor);
        for (size_t i = 0; i < count; i++) {
            double v;
            memcpy(&v, src + i * 8, 8);
            dst[i] = (float)v;
        }
        loom_log(LOOM_LOG_DEBUG, "'%s': tensor '%s' (data at file offset %zu): F64 converted to f32", cx->file,
                 e->name, file_offset);
        return LOOM_OK;
    }

    if (nbytes == 0 || (uintptr_t)src % e->stored->size == 0) {
        if (loom_tensor_from_storage(&e->tensor, cx->storage, file_offset, dtype, ndim, shape) != LOOM_OK)
            return loom_error_prefix("'%s': tensor '%s'", cx->file, e->name);
        return LOOM_OK;
    }

    if (loom_tensor_init(&e->tensor, dtype, ndim, shape) != LOOM_OK)
        return loom_error_prefix("'%s': tensor '%s'", cx->file, e->name);
    memcpy(loom_tensor_data(&e->tensor), src, nbytes);
    loom_log(LOOM_LOG_DEBUG,
             "'%s': tensor '%s' (data at file offset %zu) is not aligned to its %zu-byte elements, "
             "copied into memory",
             cx->file, e->name, file_offset, e->stored->size);
    return LOOM_OK;
}

/* Parse the safetensors image in `storage` and add its tensors (viewing the
 * storage, which they retain) and metadata to ck. `file` names it in messages
 * and in loom_checkpoint_file. */
static int parse_image(loom_checkpoint *ck, loom_storage *storage, const char *file) {
    parse_ctx cx = {.ck = ck, .storage = storage, .file = file};
    const char *json_end = NULL;
    cJSON *root = NULL;
    const cJSON *item;
    bool seen_metadata = false;
    uint64_t header_len = 0;
    int first = ck->count, rc = LOOM_ERR;
    size_t bad;
    char text[96];

    cx.file_index = add_file(ck, file);
    if (cx.file_index < 0)
        return LOOM_ERR;
    cx.bytes = storage->data;
    cx.size = storage->nbytes;

    if (cx.size < 8)
        return loom_error("'%s': file is %zu bytes, too short for the 8-byte header length at file offset 0",
                          file, cx.size);
    for (int i = 7; i >= 0; i--)
        header_len = header_len << 8 | cx.bytes[i];
    if (header_len > LOOM_SAFETENSORS_MAX_HEADER)
        return loom_error("'%s': header length %" PRIu64 " at file offset 0 exceeds the limit of %u bytes",
                          file, header_len, LOOM_SAFETENSORS_MAX_HEADER);
    if (header_len > cx.size - 8)
        return loom_error("'%s': header length %" PRIu64 " at file offset 0 runs past the end of the file "
                          "(expected at most %zu for a %zu-byte file)",
                          file, header_len, cx.size - 8, cx.size);
    cx.header_len = (size_t)header_len;
    cx.data_start = 8 + cx.header_len;
    cx.data_len = cx.size - cx.data_start;

    bad = utf8_invalid_at(cx.bytes + 8, cx.header_len);
    if (bad < cx.header_len)
        return loom_error("'%s': header is not valid UTF-8 (byte 0x%02x at file offset %zu)", file,
                          cx.bytes[8 + bad], 8 + bad);

    /* NOTE: cJSON also stores the position of a failed parse in a global
     * (read by cJSON_GetErrorPtr, which Loom never calls), so parses that
     * fail on two threads at once race on that global. */
    root = cJSON_ParseWithLengthOpts((const char *)cx.bytes + 8, cx.header_len, &json_end, 0);
    if (!root) {
        size_t at = json_end ? (size_t)((const unsigned char *)json_end - cx.bytes) : 8;
        return loom_error("'%s': header is not valid JSON (error near file offset %zu, the header spans file "
                          "bytes 8..%zu)",
                          file, at, cx.data_start);
    }
    for (const unsigned char *p = (const unsigned char *)json_end; p < cx.bytes + cx.data_start; p++) {
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
            loom_error("'%s': unexpected byte 0x%02x after the header JSON at file offset %zu (expected "
                       "space padding up to file offset %zu)",
                       file, *p, (size_t)(p - cx.bytes), cx.data_start);
            goto done;
        }
    }
    if (!cJSON_IsObject(root)) {
        loom_error("'%s': header must be a JSON object, got %s", file, json_text(root, text, sizeof text));
        goto done;
    }

    cx.described_len = described_data_len(root);
    cJSON_ArrayForEach(item, root) {
        if (strcmp(item->string, "__metadata__") == 0) {
            if (seen_metadata) {
                loom_error("'%s': header has more than one '__metadata__' entry", file);
                goto done;
            }
            seen_metadata = true;
            if (parse_metadata(&cx, item) != LOOM_OK)
                goto done;
        } else if (parse_entry(&cx, item) != LOOM_OK) {
            goto done;
        }
    }
    /* NOTE: the safetensors library also rejects gaps between tensors and
     * bytes after the last one. Both are harmless to a reader that checks
     * every range, so they are accepted here. */
    if (check_overlaps(&cx, first) != LOOM_OK)
        goto done;
    for (int i = first; i < ck->count; i++)
        if (build_tensor(&cx, &ck->entries[i]) != LOOM_OK)
            goto done;
    rc = LOOM_OK;

done:
    cJSON_Delete(root);
    return rc;
}

/* ------------------------------------------------------------------------
 * opening files, indexes and directories */

static loom_checkpoint *new_checkpoint(void) {
    loom_checkpoint *ck = calloc(1, sizeof *ck);
    if (!ck)
        loom_error("checkpoint: out of memory");
    return ck;
}

/* Map the safetensors file at `path` and parse it into ck. */
static int open_image(loom_checkpoint *ck, const char *path) {
    loom_storage *storage = loom_storage_map_file(path);
    int rc;
    if (!storage)
        return LOOM_ERR;
    rc = parse_image(ck, storage, path);
    /* The tensors hold their own references now. */
    loom_storage_release(storage);
    return rc;
}

static bool ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* A shard must be a relative path that stays inside the index's directory. */
static bool shard_name_ok(const char *name) {
    const char *p = name;
    if (name[0] == '\0' || name[0] == '/')
        return false;
    while (*p) {
        size_t len = strcspn(p, "/");
        if (len == 2 && p[0] == '.' && p[1] == '.')
            return false;
        p += len;
        if (*p == '/')
            p++;
    }
    return true;
}

static char *join_path(const char *dir, size_t dir_len, const char *name) {
    size_t name_len = strlen(name);
    char *p = malloc(dir_len + name_len + 2);
    if (!p) {
        loom_error("checkpoint: out of memory building a path");
        return NULL;
    }
    memcpy(p, dir, dir_len);
    p[dir_len] = '/';
    memcpy(p + dir_len + 1, name, name_len + 1);
    return p;
}

/* Open every shard that the index's weight_map names, then check that each
 * listed tensor is in the shard the index gives for it. */
static int open_index(loom_checkpoint *ck, const char *index_path) {
    loom_storage *storage = NULL;
    cJSON *root = NULL;
    const cJSON *weight_map, *item;
    const char **shards = NULL;
    int *shard_file = NULL;
    int shard_count = 0, rc = LOOM_ERR;
    const char *slash = strrchr(index_path, '/');
    const char *dir = slash ? index_path : ".";
    size_t dir_len = slash ? (size_t)(slash - index_path) : 1;
    const char *json_end = NULL;
    char text[96];

    if (slash == index_path)
        dir_len = 0; /* index in "/": shards are "/name" */

    storage = loom_storage_map_file(index_path);
    if (!storage)
        return LOOM_ERR;
    root = cJSON_ParseWithLengthOpts(storage->data, storage->nbytes, &json_end, 0);
    if (!root) {
        size_t at = json_end ? (size_t)(json_end - (const char *)storage->data) : 0;
        loom_error("'%s': index is not valid JSON (error near byte %zu)", index_path, at);
        goto done;
    }
    weight_map = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    if (!cJSON_IsObject(weight_map)) {
        loom_error("'%s': index has no 'weight_map' object", index_path);
        goto done;
    }

    /* Shards in the order weight_map first names them. */
    shards = malloc(((size_t)cJSON_GetArraySize(weight_map) + 1) * sizeof *shards);
    shard_file = malloc(((size_t)cJSON_GetArraySize(weight_map) + 1) * sizeof *shard_file);
    if (!shards || !shard_file) {
        loom_error("'%s': out of memory reading the weight_map", index_path);
        goto done;
    }
    cJSON_ArrayForEach(item, weight_map) {
        int k;
        if (!cJSON_IsString(item)) {
            loom_error("'%s': weight_map entry for tensor '%s' must be a shard file name, got %s", index_path,
                       item->string, json_text(item, text, sizeof text));
            goto done;
        }
        if (!shard_name_ok(item->valuestring)) {
            loom_error("'%s': weight_map names shard '%s' for tensor '%s' (expected a relative path inside the "
                       "index's directory)",
                       index_path, item->valuestring, item->string);
            goto done;
        }
        for (k = 0; k < shard_count && strcmp(shards[k], item->valuestring) != 0; k++) {
        }
        if (k == shard_count)
            shards[shard_count++] = item->valuestring;
    }

    for (int k = 0; k < shard_count; k++) {
        char *path = join_path(dir, dir_len, shards[k]);
        int status;
        if (!path)
            goto done;
        shard_file[k] = ck->file_count; /* parse_image adds it next */
        status = open_image(ck, path);
        if (status != LOOM_OK && ck->file_count == shard_file[k])
            loom_error_prefix("'%s': cannot open shard '%s'", index_path, shards[k]);
        free(path);
        if (status != LOOM_OK)
            goto done;
    }

    cJSON_ArrayForEach(item, weight_map) {
        int k, i = table_lookup(ck, item->string);
        for (k = 0; strcmp(shards[k], item->valuestring) != 0; k++) {
        }
        if (i < 0) {
            loom_error("'%s': tensor '%s' listed in weight_map is missing from shard '%s'", index_path,
                       item->string, ck->files[shard_file[k]]);
            goto done;
        }
        if (ck->entries[i].file != shard_file[k]) {
            loom_error("'%s': tensor '%s' is listed in weight_map under shard '%s' but is in shard '%s'",
                       index_path, item->string, ck->files[shard_file[k]], ck->files[ck->entries[i].file]);
            goto done;
        }
    }
    rc = LOOM_OK;

done:
    free(shards);
    free(shard_file);
    cJSON_Delete(root);
    loom_storage_release(storage);
    return rc;
}

int loom_checkpoint_open(loom_checkpoint **out, const char *path) {
    loom_checkpoint *ck;
    struct stat st;
    int rc;

    if (!out)
        return loom_error("loom_checkpoint_open: 'out' is NULL");
    *out = NULL;
    if (!path)
        return loom_error("loom_checkpoint_open: 'path' is NULL");
    if (stat(path, &st) != 0)
        return loom_error("'%s': cannot open checkpoint: %s", path, strerror(errno));
    ck = new_checkpoint();
    if (!ck)
        return LOOM_ERR;

    if (S_ISDIR(st.st_mode)) {
        size_t len = strlen(path);
        char *single, *index;
        while (len > 1 && path[len - 1] == '/')
            len--;
        single = join_path(path, len, "model.safetensors");
        index = join_path(path, len, "model.safetensors.index.json");
        if (!single || !index)
            rc = LOOM_ERR;
        else if (access(single, F_OK) == 0)
            rc = open_image(ck, single);
        else if (access(index, F_OK) == 0)
            rc = open_index(ck, index);
        else
            rc = loom_error("'%s': directory has neither model.safetensors nor model.safetensors.index.json",
                            path);
        free(single);
        free(index);
    } else if (ends_with(path, ".json")) {
        rc = open_index(ck, path);
    } else {
        rc = open_image(ck, path);
    }

    if (rc != LOOM_OK) {
        loom_checkpoint_close(ck);
        return LOOM_ERR;
    }
    *out = ck;
    return LOOM_OK;
}

int loom_checkpoint_open_memory(loom_checkpoint **out, const void *data, size_t nbytes, const char *name) {
    loom_checkpoint *ck;
    loom_storage *storage;
    int rc;

    if (!out)
        return loom_error("loom_checkpoint_open_memory: 'out' is NULL");
    *out = NULL;
    if (!data && nbytes > 0)
        return loom_error("loom_checkpoint_open_memory: 'data' is NULL with nbytes %zu", nbytes);
    ck = new_checkpoint();
    if (!ck)
        return LOOM_ERR;
    /* The storage is read-only, so casting away const never leads to a write. */
    storage = loom_storage_borrow((void *)data, nbytes, true, NULL, NULL);
    if (!storage) {
        loom_checkpoint_close(ck);
        return LOOM_ERR;
    }
    rc = parse_image(ck, storage, name ? name : "<memory>");
    loom_storage_release(storage);
    if (rc != LOOM_OK) {
        loom_checkpoint_close(ck);
        return LOOM_ERR;
    }
    *out = ck;
    return LOOM_OK;
}

/* ------------------------------------------------------------------------
 * writer */

typedef struct text_buffer {
    char *data;
    size_t len, cap;
    bool failed;
} text_buffer;

static void put_bytes(text_buffer *b, const char *s, size_t n) {
    if (b->failed)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        char *p;
        while (cap < b->len + n + 1)
            cap *= 2;
        p = realloc(b->data, cap);
        if (!p) {
            b->failed = true;
            return;
        }
        b->data = p;
        b->cap = cap;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
}

static void put_text(text_buffer *b, const char *s) { put_bytes(b, s, strlen(s)); }

__attribute__((format(printf, 2, 3)))
static void put_format(text_buffer *b, const char *fmt, ...) {
    char tmp[128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    put_bytes(b, tmp, n < 0 ? 0 : (size_t)n);
}

/* A JSON string literal with the escapes JSON requires (quote, backslash and
 * control characters); other UTF-8 bytes are copied as they are. */
static void put_json_string(text_buffer *b, const char *s) {
    put_text(b, "\"");
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            char esc[2] = {'\\', (char)c};
            put_bytes(b, esc, 2);
        } else if (c < 0x20) {
            put_format(b, "\\u%04x", c);
        } else {
            put_bytes(b, (const char *)&c, 1);
        }
    }
    put_text(b, "\"");
}

static int compare_strings(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Byte size of a tensor argument of the writer, checking that its data is
 * readable. */
static int writer_tensor_bytes(const char *path, const char *name, const loom_tensor *t, size_t *out) {
    size_t numel = 1;
    if (!t)
        return loom_error("'%s': tensor '%s' is NULL", path, name);
    if ((unsigned)t->dtype >= LOOM_DTYPE_COUNT || !written_dtype_name(t->dtype))
        return loom_error("'%s': tensor '%s' has invalid dtype %d", path, name, (int)t->dtype);
    if (t->ndim < 0 || t->ndim > LOOM_MAX_DIMS)
        return loom_error("'%s': tensor '%s' has %d dimensions (expected 0..%d)", path, name, t->ndim,
                          LOOM_MAX_DIMS);
    for (int d = 0; d < t->ndim; d++) {
        if (t->shape[d] < 0 || loom_mul_size(numel, (size_t)t->shape[d], &numel) != 0)
            return loom_error("'%s': tensor '%s' has invalid shape %s", path, name,
                              loom_dims_str(t->ndim, t->shape).s);
    }
    if (loom_mul_size(numel, loom_dtype_size(t->dtype), out) != 0)
        return loom_error("'%s': tensor '%s' of shape %s is too large", path, name, loom_shape_str(t).s);
    if (*out > 0 && (!t->storage || !loom_tensor_in_bounds(t)))
        return loom_error("'%s': tensor '%s' %s has %s", path, name, loom_shape_str(t).s,
                          t->storage ? "a view outside its storage" : "no storage");
    return LOOM_OK;
}

static int write_all(int fd, const void *data, size_t n) {
    const char *p = data;
    while (n > 0) {
        ssize_t w = write(fd, p, n < (1u << 30) ? n : (1u << 30));
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Write the values of `t` in row-major order, gathering strided views into
 * `buf` (a multiple of 8 bytes long) first. */
static int write_tensor_data(int fd, const loom_tensor *t, size_t nbytes, unsigned char *buf, size_t buf_size) {
    size_t esize = loom_dtype_size(t->dtype), fill = 0;
    const unsigned char *base;
    int64_t index[LOOM_MAX_DIMS] = {0};
    int last;

    if (nbytes == 0)
        return 0;
    if (loom_tensor_is_contiguous(t))
        return write_all(fd, loom_tensor_data(t), nbytes);

    /* Walk the outer dimensions like an odometer and copy the innermost one
     * element by element. ndim >= 1 here, because a scalar is contiguous. */
    base = (const unsigned char *)t->storage->data + t->offset;
    last = t->ndim - 1;
    for (;;) {
        int64_t row = 0;
        for (int d = 0; d < last; d++)
            row += index[d] * t->strides[d];
        for (int64_t j = 0; j < t->shape[last]; j++) {
            memcpy(buf + fill, base + (row + j * t->strides[last]) * (int64_t)esize, esize);
            fill += esize;
            if (fill == buf_size) {
                if (write_all(fd, buf, fill) != 0)
                    return -1;
                fill = 0;
            }
        }
        int d = last - 1;
        while (d >= 0 && ++index[d] == t->shape[d])
            index[d--] = 0;
        if (d < 0)
            break;
    }
    return fill ? write_all(fd, buf, fill) : 0;
}

/* Build the JSON header, padded with spaces to a multiple of 8 bytes. */
static int build_header(text_buffer *h, const char *path, int n, const char *const *names,
                        const loom_tensor *const *tensors, const size_t *sizes, int n_meta,
                        const char *const *meta_keys, const char *const *meta_values) {
    size_t offset = 0;
    put_text(h, "{");
    if (n_meta > 0) {
        put_text(h, "\"__metadata__\":{");
        for (int i = 0; i < n_meta; i++) {
            if (i > 0)
                put_text(h, ",");
            put_json_string(h, meta_keys[i]);
            put_text(h, ":");
            put_json_string(h, meta_values[i]);
        }
        put_text(h, "}");
    }
    for (int i = 0; i < n; i++) {
        const loom_tensor *t = tensors[i];
        if (n_meta > 0 || i > 0)
            put_text(h, ",");
        put_json_string(h, names[i]);
        put_format(h, ":{\"dtype\":\"%s\",\"shape\":[", written_dtype_name(t->dtype));
        for (int d = 0; d < t->ndim; d++)
            put_format(h, d ? ",%" PRId64 : "%" PRId64, t->shape[d]);
        put_format(h, "],\"data_offsets\":[%zu,%zu]}", offset, offset + sizes[i]);
        offset += sizes[i]; /* the sum was checked by the caller */
    }
    put_text(h, "}");
    while (h->len % 8 != 0)
        put_text(h, " ");
    if (h->failed)
        return loom_error("'%s': out of memory building the safetensors header", path);
    return LOOM_OK;
}

static int check_writer_strings(const char *path, int n, const char *const *names, int n_meta,
                                 const char *const *meta_keys, const char *const *meta_values) {
    for (int i = 0; i < n; i++) {
        if (!names[i])
            return loom_error("'%s': name of tensor %d is NULL", path, i);
        if (utf8_invalid_at((const unsigned char *)names[i], strlen(names[i])) != strlen(names[i]))
            return loom_error("'%s': name of tensor %d is not valid UTF-8", path, i);
        if (strcmp(names[i], "__metadata__") == 0)
            return loom_error("'%s': '__metadata__' cannot be a tensor name", path);
    }
    for (int i = 0; i < n_meta; i++) {
        const char *k = meta_keys[i], *v = meta_values[i];
        if (!k || !v)
            return loom_error("'%s': metadata entry %d has a NULL key or value", path, i);
        if (utf8_invalid_at((const unsigned char *)k, strlen(k)) != strlen(k) ||
            utf8_invalid_at((const unsigned char *)v, strlen(v)) != strlen(v))
            return loom_error("'%s': metadata entry '%s' is not valid UTF-8", path, k);
    }
    return LOOM_OK;
}

static int check_unique_names(const char *path, int n, const char *const *names) {
    const char **sorted;
    int rc = LOOM_OK;
    if (n < 2)
        return LOOM_OK;
    sorted = malloc((size_t)n * sizeof *sorted);
    if (!sorted)
        return loom_error("'%s': out of memory checking tensor names", path);
    memcpy(sorted, names, (size_t)n * sizeof *sorted);
    qsort(sorted, (size_t)n, sizeof *sorted, compare_strings);
    for (int i = 1; i < n; i++) {
        if (strcmp(sorted[i - 1], sorted[i]) == 0) {
            rc = loom_error("'%s': duplicate tensor name '%s'", path, sorted[i]);
            break;
        }
    }
    free(sorted);
    return rc;
}

/* fsync the directory containing `path`, so that the rename survives a crash. */
static void sync_parent_directory(const char *path) {
    const char *slash = strrchr(path, '/');
    char *dir;
    int fd;
    if (!slash) {
        dir = copy_string(".");
    } else {
        size_t len = slash == path ? 1 : (size_t)(slash - path);
        dir = malloc(len + 1);
        if (dir) {
            memcpy(dir, path, len);
            dir[len] = '\0';
        }
    }
    if (!dir)
        return;
    fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0 || fsync(fd) != 0)
        loom_log(LOOM_LOG_DEBUG, "'%s': cannot sync directory '%s': %s", path, dir, strerror(errno));
    if (fd >= 0)
        close(fd);
    free(dir);
}

int loom_safetensors_write(const char *path, int n, const char *const *names, const loom_tensor *const *tensors,
                           int n_meta, const char *const *meta_keys, const char *const *meta_values) {
    static atomic_uint temp_counter;
    text_buffer header = {0};
    size_t *sizes = NULL, total = 0;
    unsigned char *buf = NULL;
    const size_t buf_size = (size_t)1 << 20;
    char *temp = NULL;
    int fd = -1, rc = LOOM_ERR;
    unsigned char length_bytes[8];

    if (!path)
        return loom_error("loom_safetensors_write: 'path' is NULL");
    if (n < 0 || (n > 0 && (!names || !tensors)))
        return loom_error("'%s': invalid tensor list (n = %d)", path, n);
    if (n_meta < 0 || (n_meta > 0 && (!meta_keys || !meta_values)))
        return loom_error("'%s': invalid metadata list (n_meta = %d)", path, n_meta);
    if (check_writer_strings(path, n, names, n_meta, meta_keys, meta_values) != LOOM_OK ||
        check_unique_names(path, n, names) != LOOM_OK)
        return LOOM_ERR;

    sizes = malloc((size_t)(n ? n : 1) * sizeof *sizes);
    if (!sizes)
        return loom_error("'%s': out of memory", path);
    for (int i = 0; i < n; i++) {
        if (writer_tensor_bytes(path, names[i], tensors[i], &sizes[i]) != LOOM_OK)
            goto done;
        if (loom_add_size(total, sizes[i], &total) != 0) {
            loom_error("'%s': total tensor size overflows a size_t", path);
            goto done;
        }
    }
    if (build_header(&header, path, n, names, tensors, sizes, n_meta, meta_keys, meta_values) != LOOM_OK)
        goto done;
    if (header.len > LOOM_SAFETENSORS_MAX_HEADER) {
        loom_error("'%s': header of %zu bytes exceeds the limit of %u bytes", path, header.len,
                   LOOM_SAFETENSORS_MAX_HEADER);
        goto done;
    }
    for (int i = 0; i < 8; i++)
        length_bytes[i] = (unsigned char)((uint64_t)header.len >> (8 * i));

    buf = malloc(buf_size);
    temp = malloc(strlen(path) + 64);
    if (!buf || !temp) {
        loom_error("'%s': out of memory", path);
        goto done;
    }
    snprintf(temp, strlen(path) + 64, "%s.tmp-%ld-%u", path, (long)getpid(), atomic_fetch_add(&temp_counter, 1));
    fd = open(temp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0) {
        loom_error("'%s': cannot create temporary file '%s': %s", path, temp, strerror(errno));
        goto done;
    }
    if (write_all(fd, length_bytes, 8) != 0 || write_all(fd, header.data, header.len) != 0)
        goto write_failed;
    for (int i = 0; i < n; i++)
        if (write_tensor_data(fd, tensors[i], sizes[i], buf, buf_size) != 0)
            goto write_failed;
    if (fsync(fd) != 0)
        goto write_failed;
    if (close(fd) != 0) {
        fd = -1;
        goto write_failed;
    }
    fd = -1;
    if (rename(temp, path) != 0) {
        loom_error("'%s': cannot rename temporary file '%s' into place: %s", path, temp, strerror(errno));
        unlink(temp);
        goto done;
    }
    sync_parent_directory(path);
    rc = LOOM_OK;
    goto done;

write_failed:
    loom_error("'%s': write failed: %s", path, strerror(errno));
    if (fd >= 0)
        close(fd);
    fd = -1;
    unlink(temp);

done:
    if (fd >= 0) {
        close(fd);
        unlink(temp);
    }
    free(temp);
    free(buf);
    free(sizes);
    free(header.data);
    return rc;
}
