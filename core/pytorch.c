/* Loom core: PyTorch zip checkpoints. The archive contains <prefix>/data.pkl
 * (the pickled object), <prefix>/data/<key> (one entry per storage, raw
 * little-endian elements), <prefix>/byteorder and <prefix>/version. The
 * pickle is run by the restricted VM of pickle.c; this file flattens the
 * result to named tensors over the storages, and sniffs checkpoint formats. */
#include "pytorch.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "pickle.h"
#include "zip.h"

/* ----------------------------------------------------------- sniffing */

loom_ckpt_format loom_checkpoint_format_bytes(const void *head, size_t n, uint64_t file_size) {
    const uint8_t *b = head;
    if (n >= 4 && memcmp(b, "PK\x03\x04", 4) == 0)
        return LOOM_CKPT_PYTORCH_ZIP;
    if (n >= 4 && memcmp(b, "GGUF", 4) == 0)
        return LOOM_CKPT_GGUF;
    if (n >= 9 && b[8] == '{') {
        uint64_t header = 0;
        for (int i = 7; i >= 0; i--)
            header = (header << 8) | b[i];
        if (header >= 2 && file_size >= 8 && header <= file_size - 8)
            return LOOM_CKPT_SAFETENSORS;
    }
    /* torch.save before 1.6 wrote a sequence of protocol 2 pickles (a PROTO
     * opcode first); before 0.4 it wrote a tar file ("ustar" at byte 257). */
    if (n >= 2 && b[0] == 0x80 && b[1] >= 2 && b[1] <= 5)
        return LOOM_CKPT_PYTORCH_LEGACY;
    if (n >= 262 && memcmp(b + 257, "ustar", 5) == 0)
        return LOOM_CKPT_PYTORCH_LEGACY;
    return LOOM_CKPT_UNKNOWN;
}

loom_ckpt_format loom_checkpoint_format(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        loom_error("%s: cannot open: %s", path, strerror(errno));
        return LOOM_CKPT_ERROR;
    }
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
        loom_error("%s: not a regular file", path);
        fclose(f);
        return LOOM_CKPT_ERROR;
    }
    uint8_t head[512];
    size_t n = fread(head, 1, sizeof head, f);
    bool failed = ferror(f);
    fclose(f);
    if (failed) {
        loom_error("%s: read failed", path);
        return LOOM_CKPT_ERROR;
    }
    return loom_checkpoint_format_bytes(head, n, (uint64_t)st.st_size);
}

const char *loom_ckpt_format_name(loom_ckpt_format format) {
    switch (format) {
    case LOOM_CKPT_SAFETENSORS: return "safetensors";
    case LOOM_CKPT_PYTORCH_ZIP: return "pytorch-zip";
    case LOOM_CKPT_PYTORCH_LEGACY: return "pytorch-legacy";
    case LOOM_CKPT_GGUF: return "gguf";
    case LOOM_CKPT_UNKNOWN: return "unknown";
    case LOOM_CKPT_ERROR: return "error";
    }
    return "unknown";
}

/* ------------------------------------------------------------ checkpoint */

typedef struct tensor_entry {
    char *name;
    loom_tensor tensor;
    loom_torch_storage_type stored;
} tensor_entry;

typedef struct meta_entry {
    char *key, *value;
} meta_entry;

struct loom_pytorch {
    char *path;
    tensor_entry *tensors;
    int ntensors, tensors_cap;
    meta_entry *meta;
    int nmeta, meta_cap;
    int *tensor_order; /* tensor indexes sorted by name */
    int *meta_order;   /* metadata indexes sorted by key */
};

void loom_pytorch_close(loom_pytorch *ckpt) {
    if (!ckpt)
        return;
    for (int i = 0; i < ckpt->ntensors; i++) {
        free(ckpt->tensors[i].name);
        loom_tensor_free(&ckpt->tensors[i].tensor);
    }
    for (int i = 0; i < ckpt->nmeta; i++) {
        free(ckpt->meta[i].key);
        free(ckpt->meta[i].value);
    }
    free(ckpt->tensors);
    free(ckpt->meta);
    free(ckpt->tensor_order);
    free(ckpt->meta_order);
    free(ckpt->path);
    free(ckpt);
}

int loom_pytorch_count(const loom_pytorch *ckpt) { return ckpt->ntensors; }

const char *loom_pytorch_name(const loom_pytorch *ckpt, int i) {
    return i >= 0 && i < ckpt->ntensors ? ckpt->tensors[i].name : NULL;
}

const loom_tensor *loom_pytorch_tensor(const loom_pytorch *ckpt, int i) {
    return i >= 0 && i < ckpt->ntensors ? &ckpt->tensors[i].tensor : NULL;
}

const char *loom_pytorch_stored_dtype(const loom_pytorch *ckpt, int i) {
    static const char *const names[LOOM_TORCH_STORAGE_TYPE_COUNT] = {
        [LOOM_TORCH_FLOAT] = "F32", [LOOM_TORCH_HALF] = "F16", [LOOM_TORCH_BFLOAT16] = "BF16",
        [LOOM_TORCH_INT] = "I32",   [LOOM_TORCH_LONG] = "I64", [LOOM_TORCH_BYTE] = "U8",
        [LOOM_TORCH_BOOL] = "BOOL", [LOOM_TORCH_DOUBLE] = "F64",
    };
    return i >= 0 && i < ckpt->ntensors ? names[ckpt->tensors[i].stored] : NULL;
}

const char *loom_pytorch_file(const loom_pytorch *ckpt, int i) {
    return i >= 0 && i < ckpt->ntensors ? ckpt->path : NULL;
}

/* Binary search over `order`, which sorts the names given by `name_of`. */
static int search_sorted(const int *order, int n, const char *key, const char *(*name_of)(const loom_pytorch *, int),
                         const loom_pytorch *ckpt) {
    int lo = 0, hi = n;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        if (strcmp(name_of(ckpt, order[mid]), key) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && strcmp(name_of(ckpt, order[lo]), key) == 0 ? order[lo] : -1;
}

int loom_pytorch_find(const loom_pytorch *ckpt, const char *name) {
    return search_sorted(ckpt->tensor_order, ckpt->ntensors, name, loom_pytorch_name, ckpt);
}

const loom_tensor *loom_pytorch_get(const loom_pytorch *ckpt, const char *name) {
    return loom_pytorch_tensor(ckpt, loom_pytorch_find(ckpt, name));
}

int loom_pytorch_metadata_count(const loom_pytorch *ckpt) { return ckpt->nmeta; }

const char *loom_pytorch_metadata_key(const loom_pytorch *ckpt, int i) {
    return i >= 0 && i < ckpt->nmeta ? ckpt->meta[i].key : NULL;
}

const char *loom_pytorch_metadata_value(const loom_pytorch *ckpt, int i) {
    return i >= 0 && i < ckpt->nmeta ? ckpt->meta[i].value : NULL;
}

const char *loom_pytorch_metadata_get(const loom_pytorch *ckpt, const char *key) {
    return loom_pytorch_metadata_value(ckpt,
                                       search_sorted(ckpt->meta_order, ckpt->nmeta, key, loom_pytorch_metadata_key, ckpt));
}

/* --------------------------------------------------------------- loading */

/* Each zip entry's storage, made on first use and shared by every tensor
 * over it: `raw` has the entry's bytes, and `as_f32` a Double storage
 * converted to f32. */
typedef struct storage_slot {
    loom_storage *raw;
    loom_storage *as_f32;
} storage_slot;

/* Flattening visits every node once per path that reaches it, so a pickle
 * whose dicts share children could expand exponentially; visits are capped. */
#define MAX_VISITS (4 * LOOM_PYTORCH_MAX_LEAVES)

typedef struct loader {
    loom_pytorch *ckpt;
    const char *label; /* file name */
    loom_zip zip;
    char *prefix; /* archive folder, e.g. "archive" */
    storage_slot *slots; /* one per zip entry */
    /* flattening state */
    char name[LOOM_PYTORCH_MAX_NAME + 1];
    size_t name_len;
    const loom_pickle_value *path[LOOM_PYTORCH_MAX_DEPTH + 1];
    int depth;
    size_t visits, text_bytes;
} loader;

static int count_text(loader *L, size_t n) {
    if (loom_add_size(L->text_bytes, n, &L->text_bytes) != 0 || L->text_bytes > LOOM_PYTORCH_MAX_TEXT)
        return loom_error("%s: names and metadata exceed %zu MiB", L->label, LOOM_PYTORCH_MAX_TEXT >> 20);
    return LOOM_OK;
}

static void release_slots(loader *L) {
    if (!L->slots)
        return;
    for (size_t i = 0; i < L->zip.count; i++) {
        loom_storage_release(L->slots[i].raw);
        loom_storage_release(L->slots[i].as_f32);
    }
    free(L->slots);
    L->slots = NULL;
}

/* The storage behind data/<key>, checked to hold `numel` elements of
 * `type`, aligned to the element size. */
static int storage_for(loader *L, const char *tensor_name, const loom_pickle_value *sv, loom_storage **out) {
    const char *key = sv->as.storage.key;
    loom_torch_storage_type type = sv->as.storage.type;
    char entry_name[300];
    snprintf(entry_name, sizeof entry_name, "%s/data/%s", L->prefix, key);
    long idx = loom_zip_find(&L->zip, entry_name);
    if (idx < 0)
        return loom_error("%s: tensor '%s': storage '%s' has no entry '%s' in the archive", L->label, tensor_name,
                          key, entry_name);
    storage_slot *slot = &L->slots[idx];
    if (!slot->raw && loom_zip_entry_storage(&L->zip, (size_t)idx, false, &slot->raw) != 0)
        return loom_error_prefix("tensor '%s'", tensor_name);

    size_t elsize = loom_torch_storage_elsize(type), need;
    if (loom_mul_size((size_t)sv->as.storage.numel, elsize, &need) != 0 || need > slot->raw->nbytes)
        return loom_error("%s: tensor '%s': entry '%s' has %zu bytes, but the persistent id declares %lld %s "
                          "elements (%zu bytes each)",
                          L->label, tensor_name, entry_name, slot->raw->nbytes, (long long)sv->as.storage.numel,
                          loom_torch_storage_name(type), elsize);

    /* torch.save pads entries to 64-byte offsets; other zip writers may not,
     * and a misaligned element cannot be read in place. */
    if ((uintptr_t)slot->raw->data % elsize != 0) {
        loom_storage *copy = loom_storage_new(slot->raw->nbytes);
        if (!copy)
            return loom_error_prefix("%s: tensor '%s'", L->label, tensor_name);
        memcpy(copy->data, slot->raw->data, slot->raw->nbytes);
        loom_log(LOOM_LOG_DEBUG, "%s: entry '%s' is not aligned to %zu bytes; copied %zu bytes", L->label,
                 entry_name, elsize, slot->raw->nbytes);
        loom_storage_release(slot->raw);
        slot->raw = copy;
    }
    if (type != LOOM_TORCH_DOUBLE) {
        *out = slot->raw;
        return LOOM_OK;
    }

    /* Double: convert the whole storage once, so that every tensor over it
     * keeps its element offsets and strides. */
    size_t count = slot->raw->nbytes / 8;
    if (slot->as_f32 && slot->as_f32->nbytes / 4 < count) {
        loom_storage_release(slot->as_f32);
        slot->as_f32 = NULL;
    }
    if (!slot->as_f32) {
        loom_storage *f = loom_storage_new(count * 4);
        if (!f)
            return loom_error_prefix("%s: tensor '%s'", L->label, tensor_name);
        const uint8_t *src = slot->raw->data;
        float *dst = f->data;
        for (size_t i = 0; i < count; i++) {
            double d;
            memcpy(&d, src + 8 * i, 8);
            dst[i] = (float)d;
        }
        loom_log(LOOM_LOG_DEBUG, "%s: converted f64 entry '%s' (%zu values) to f32", L->label, entry_name, count);
        slot->as_f32 = f;
    }
    *out = slot->as_f32;
    return LOOM_OK;
}

static int add_tensor(loader *L, const loom_pickle_value *v) {
    loom_pytorch *ck = L->ckpt;
    const loom_pickle_value *sv = v->as.tensor.storage;
    if (ck->ntensors + ck->nmeta >= LOOM_PYTORCH_MAX_LEAVES)
        return loom_error("%s: more than %d tensors and metadata values", L->label, LOOM_PYTORCH_MAX_LEAVES);
    if (ck->ntensors == ck->tensors_cap) {
        int cap = ck->tensors_cap ? ck->tensors_cap * 2 : 64;
        tensor_entry *t = realloc(ck->tensors, (size_t)cap * sizeof *t);
        if (!t)
            return loom_error("%s: out of memory", L->label);
        ck->tensors = t;
        ck->tensors_cap = cap;
    }
    loom_storage *storage = NULL;
    if (storage_for(L, L->name, sv, &storage) != 0)
        return LOOM_ERR;

    static const loom_dtype dtypes[LOOM_TORCH_STORAGE_TYPE_COUNT] = {
        [LOOM_TORCH_FLOAT] = LOOM_F32, [LOOM_TORCH_HALF] = LOOM_F16, [LOOM_TORCH_BFLOAT16] = LOOM_BF16,
        [LOOM_TORCH_INT] = LOOM_I32,   [LOOM_TORCH_LONG] = LOOM_I64, [LOOM_TORCH_BYTE] = LOOM_U8,
        [LOOM_TORCH_BOOL] = LOOM_U8,   [LOOM_TORCH_DOUBLE] = LOOM_F32,
    };
    loom_tensor t = {0};
    t.storage = storage;
    t.dtype = dtypes[sv->as.storage.type];
    t.ndim = v->as.tensor.ndim;
    memcpy(t.shape, v->as.tensor.shape, (size_t)t.ndim * sizeof *t.shape);
    memcpy(t.strides, v->as.tensor.strides, (size_t)t.ndim * sizeof *t.strides);
    /* pickle.c checked storage_offset <= numel, and numel elements fit the
     * storage (storage_for), so this product cannot overflow. */
    t.offset = (size_t)v->as.tensor.storage_offset * loom_dtype_size(t.dtype);
    if (!loom_tensor_in_bounds(&t))
        return loom_error("%s: tensor '%s' %s at byte offset %zu does not fit its storage '%s' of %zu bytes",
                          L->label, L->name, loom_shape_str(&t).s, t.offset, sv->as.storage.key, storage->nbytes);

    if (count_text(L, L->name_len + 1) != 0)
        return LOOM_ERR;
    char *name = strdup(L->name);
    if (!name)
        return loom_error("%s: out of memory", L->label);
    loom_storage_retain(storage);
    ck->tensors[ck->ntensors++] = (tensor_entry){name, t, sv->as.storage.type};
    return LOOM_OK;
}

/* Python's spelling of a float: shortest round-trip digits, and ".0" on
 * integral values. */
static void format_float(char *buf, size_t cap, double x) {
    if (isnan(x)) {
        snprintf(buf, cap, "nan");
        return;
    }
    if (isinf(x)) {
        snprintf(buf, cap, x > 0 ? "inf" : "-inf");
        return;
    }
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(buf, cap, "%.*g", prec, x);
        if (strtod(buf, NULL) == x)
            break;
    }
    if (!strpbrk(buf, ".e"))
        strncat(buf, ".0", cap - strlen(buf) - 1);
}

static int add_meta(loader *L, const loom_pickle_value *v) {
    loom_pytorch *ck = L->ckpt;
    char buf[64];
    const char *text = buf;
    size_t len;
    switch (v->kind) {
    case LOOM_PICKLE_INT:
        snprintf(buf, sizeof buf, "%lld", (long long)v->as.integer);
        break;
    case LOOM_PICKLE_FLOAT:
        format_float(buf, sizeof buf, v->as.number);
        break;
    case LOOM_PICKLE_BOOL:
        snprintf(buf, sizeof buf, "%s", v->as.boolean ? "True" : "False");
        break;
    default: /* STRING */
        if (memchr(v->as.str.data, '\0', v->as.str.len))
            return LOOM_OK; /* not representable as a C string: skipped */
        text = v->as.str.data;
        break;
    }
    len = v->kind == LOOM_PICKLE_STRING ? v->as.str.len : strlen(buf);

    if (ck->ntensors + ck->nmeta >= LOOM_PYTORCH_MAX_LEAVES)
        return loom_error("%s: more than %d tensors and metadata values", L->label, LOOM_PYTORCH_MAX_LEAVES);
    if (count_text(L, L->name_len + len + 2) != 0)
        return LOOM_ERR;
    if (ck->nmeta == ck->meta_cap) {
        int cap = ck->meta_cap ? ck->meta_cap * 2 : 16;
        meta_entry *m = realloc(ck->meta, (size_t)cap * sizeof *m);
        if (!m)
            return loom_error("%s: out of memory", L->label);
        ck->meta = m;
        ck->meta_cap = cap;
    }

    char *key = strdup(L->name), *value = malloc(len + 1);
    if (!key || !value) {
        free(key);
        free(value);
        return loom_error("%s: out of memory", L->label);
    }
    memcpy(value, text, len);
    value[len] = '\0';
    ck->meta[ck->nmeta++] = (meta_entry){key, value};
    return LOOM_OK;
}

/* Append ".segment" (or "segment" at the root) to the current name. */
static int push_segment(loader *L, const char *seg, size_t len) {
    size_t dot = L->name_len > 0 ? 1 : 0;
    if (len > LOOM_PYTORCH_MAX_NAME - L->name_len - dot) {
        char head[48];
        snprintf(head, sizeof head, "%.40s%s%.*s", L->name, dot ? "." : "", (int)(len < 40 ? len : 40), seg);
        return loom_error("%s: a name starting with '%.40s' is longer than %d bytes", L->label, head,
                          LOOM_PYTORCH_MAX_NAME);
    }
    if (dot)
        L->name[L->name_len++] = '.';
    memcpy(L->name + L->name_len, seg, len);
    L->name_len += len;
    L->name[L->name_len] = '\0';
    return LOOM_OK;
}

static int walk(loader *L, const loom_pickle_value *v);

/* Walk a container's child under a key, restoring the name afterwards. */
static int walk_child(loader *L, const char *seg, size_t len, const loom_pickle_value *child) {
    size_t saved = L->name_len;
    int rc = push_segment(L, seg, len);
    if (rc == 0)
        rc = walk(L, child);
    L->name_len = saved;
    L->name[saved] = '\0';
    return rc;
}

static int walk(loader *L, const loom_pickle_value *v) {
    if (++L->visits > MAX_VISITS)
        return loom_error("%s: the pickled object expands to more than %d values when flattened", L->label,
                          MAX_VISITS);
    switch (v->kind) {
    case LOOM_PICKLE_TENSOR:
        return add_tensor(L, v);
    case LOOM_PICKLE_INT:
    case LOOM_PICKLE_FLOAT:
    case LOOM_PICKLE_BOOL:
    case LOOM_PICKLE_STRING:
        return add_meta(L, v);
    case LOOM_PICKLE_DICT:
    case LOOM_PICKLE_LIST:
    case LOOM_PICKLE_TUPLE:
        break;
    default:
        return LOOM_OK; /* None, bytes, globals, bare storages: nothing to name */
    }

    for (int i = 0; i < L->depth; i++)
        if (L->path[i] == v)
            return loom_error("%s: '%s' contains itself (pickle offset %zu)", L->label, L->name, v->offset);
    if (L->depth >= LOOM_PYTORCH_MAX_DEPTH)
        return loom_error("%s: '%.80s' is nested more than %d levels deep (pickle offset %zu)", L->label, L->name,
                          LOOM_PYTORCH_MAX_DEPTH, v->offset);
    L->path[L->depth++] = v;

    int rc = LOOM_OK;
    char num[24];
    if (v->kind == LOOM_PICKLE_DICT) {
        for (size_t i = 0; i < v->as.dict.count && rc == 0; i++) {
            const loom_pickle_value *k = v->as.dict.keys[i];
            if (k->kind == LOOM_PICKLE_STRING && !memchr(k->as.str.data, '\0', k->as.str.len)) {
                rc = walk_child(L, k->as.str.data, k->as.str.len, v->as.dict.values[i]);
            } else if (k->kind == LOOM_PICKLE_INT) {
                snprintf(num, sizeof num, "%lld", (long long)k->as.integer);
                rc = walk_child(L, num, strlen(num), v->as.dict.values[i]);
            }
            /* Other keys (tuples, bytes, None) cannot form a name: skipped. */
        }
    } else {
        for (size_t i = 0; i < v->as.seq.count && rc == 0; i++) {
            snprintf(num, sizeof num, "%zu", i);
            rc = walk_child(L, num, strlen(num), v->as.seq.items[i]);
        }
    }
    L->depth--;
    return rc;
}

/* ---- name indexes */

typedef struct name_index {
    const char *name;
    int index;
} name_index;

static int compare_names(const void *a, const void *b) {
    return strcmp(((const name_index *)a)->name, ((const name_index *)b)->name);
}

/* Fill order[0..n) with the indexes of names[] in sorted order. Returns the
 * position in order of the first duplicate name, or -1 when all differ. */
static int sort_names(const char *const *names, int n, int *order, name_index *tmp) {
    for (int i = 0; i < n; i++)
        tmp[i] = (name_index){names[i], i};
    qsort(tmp, (size_t)n, sizeof *tmp, compare_names);
    for (int i = 0; i < n; i++)
        order[i] = tmp[i].index;
    for (int i = 1; i < n; i++)
        if (strcmp(tmp[i - 1].name, tmp[i].name) == 0)
            return i;
    return -1;
}

/* Sort tensor names and metadata keys for lookup and reject duplicates,
 * which nested dicts can produce ({"a.b": x, "a": {"b": y}}). */
static int index_names(loader *L) {
    loom_pytorch *ck = L->ckpt;
    size_t n = (size_t)(ck->ntensors > ck->nmeta ? ck->ntensors : ck->nmeta) + 1;
    const char **names = malloc(n * sizeof *names);
    name_index *tmp = malloc(n * sizeof *tmp);
    ck->tensor_order = malloc(((size_t)ck->ntensors + 1) * sizeof(int));
    ck->meta_order = malloc(((size_t)ck->nmeta + 1) * sizeof(int));
    int rc = LOOM_OK, dup;
    if (!names || !tmp || !ck->tensor_order || !ck->meta_order) {
        rc = loom_error("%s: out of memory", L->label);
        goto done;
    }
    for (int i = 0; i < ck->ntensors; i++)
        names[i] = ck->tensors[i].name;
    if ((dup = sort_names(names, ck->ntensors, ck->tensor_order, tmp)) >= 0) {
        rc = loom_error("%s: duplicate tensor name '%s'", L->label, ck->tensors[ck->tensor_order[dup]].name);
        goto done;
    }
    for (int i = 0; i < ck->nmeta; i++)
        names[i] = ck->meta[i].key;
    if ((dup = sort_names(names, ck->nmeta, ck->meta_order, tmp)) >= 0)
        rc = loom_error("%s: duplicate metadata key '%s'", L->label, ck->meta[ck->meta_order[dup]].key);
done:
    free(names);
    free(tmp);
    return rc;
}

/* ---- archive layout */

/* Find <prefix>/data.pkl: the only top-level folder torch.save writes. The
 * prefix is the file's stem or "archive", so 200 bytes are plenty. */
static int find_prefix(loader *L, long *pkl_index) {
    for (size_t i = 0; i < L->zip.count; i++) {
        const char *name = L->zip.entries[i].name;
        const char *slash = strchr(name, '/');
        if (slash && slash != name && slash - name <= 200 && strcmp(slash, "/data.pkl") == 0) {
            L->prefix = strndup(name, (size_t)(slash - name));
            if (!L->prefix)
                return loom_error("%s: out of memory", L->label);
            *pkl_index = (long)i;
            return LOOM_OK;
        }
    }
    return loom_error("%s: zip archive without a '<folder>/data.pkl' entry: not a PyTorch checkpoint", L->label);
}

/* Read a small entry <prefix>/<leaf> into buf (NUL-terminated); returns 0
 * when present, 1 when absent. */
static int read_small_entry(loader *L, const char *leaf, char *buf, size_t cap) {
    char name[300];
    snprintf(name, sizeof name, "%s/%s", L->prefix, leaf);
    long idx = loom_zip_find(&L->zip, name);
    if (idx < 0)
        return 1;
    loom_storage *s = NULL;
    if (loom_zip_entry_storage(&L->zip, (size_t)idx, true, &s) != 0)
        return LOOM_ERR;
    size_t n = s->nbytes < cap - 1 ? s->nbytes : cap - 1;
    memcpy(buf, s->data, n);
    buf[n] = '\0';
    loom_storage_release(s);
    return 0;
}

static int check_layout(loader *L) {
    char buf[32], name[300];
    snprintf(name, sizeof name, "%s/constants.pkl", L->prefix);
    if (loom_zip_find(&L->zip, name) >= 0)
        return loom_error("%s: this is a TorchScript archive (torch.jit.save), which is not supported; save the "
                          "weights with torch.save(model.state_dict(), path) instead",
                          L->label);
    /* Archives written before PyTorch 1.10 have no byteorder entry and are
     * little-endian. */
    int rc = read_small_entry(L, "byteorder", buf, sizeof buf);
    if (rc < 0)
        return LOOM_ERR;
    if (rc == 0 && strcmp(buf, "little") != 0) {
        if (strcmp(buf, "big") == 0)
            return loom_error("%s: the checkpoint was saved on a big-endian machine, which is not supported; "
                              "re-save it on a little-endian one",
                              L->label);
        return loom_error("%s: entry '%s/byteorder' holds '%.10s', expected 'little'", L->label, L->prefix, buf);
    }
    return LOOM_OK;
}

static int load(loader *L, loom_storage *file) {
    loom_ckpt_format fmt = loom_checkpoint_format_bytes(file->data, file->nbytes < 512 ? file->nbytes : 512,
                                                        file->nbytes);
    if (fmt == LOOM_CKPT_PYTORCH_LEGACY)
        return loom_error("%s: legacy PyTorch checkpoint format (torch.save before 1.6, or "
                          "_use_new_zipfile_serialization=False) is not supported; convert it with "
                          "torch.save(torch.load(path, weights_only=True), new_path) or save it as safetensors",
                          L->label);
    if (fmt == LOOM_CKPT_SAFETENSORS || fmt == LOOM_CKPT_GGUF)
        return loom_error("%s: this is a %s file, not a PyTorch checkpoint", L->label, loom_ckpt_format_name(fmt));
    if (loom_zip_open_storage(&L->zip, file, L->label) != 0)
        return LOOM_ERR;
    L->slots = calloc(L->zip.count + 1, sizeof *L->slots);
    if (!L->slots)
        return loom_error("%s: out of memory", L->label);

    long pkl_index = 0;
    if (find_prefix(L, &pkl_index) != 0 || check_layout(L) != 0)
        return LOOM_ERR;

    loom_storage *pkl_bytes = NULL;
    if (loom_zip_entry_storage(&L->zip, (size_t)pkl_index, true, &pkl_bytes) != 0)
        return LOOM_ERR;
    char label[600];
    snprintf(label, sizeof label, "%s: %s/data.pkl", L->label, L->prefix);
    loom_pickle *pickle = NULL;
    int rc = loom_pickle_load(&pickle, pkl_bytes->data, pkl_bytes->nbytes, label);
    if (rc == 0) {
        rc = walk(L, loom_pickle_root(pickle));
        loom_pickle_free(pickle);
    }
    loom_storage_release(pkl_bytes);
    if (rc != 0)
        return LOOM_ERR;
    return index_names(L);
}

static int open_storage(loom_pytorch **out, loom_storage *file, const char *label) {
    *out = NULL;
    loader *L = calloc(1, sizeof *L);
    loom_pytorch *ck = calloc(1, sizeof *ck);
    char *path = strdup(label);
    if (!L || !ck || !path) {
        free(L);
        free(ck);
        free(path);
        return loom_error("%s: out of memory", label);
    }
    ck->path = path;
    L->ckpt = ck;
    L->label = path;
    int rc = load(L, file);
    release_slots(L);
    loom_zip_close(&L->zip);
    free(L->prefix);
    free(L);
    if (rc != 0) {
        loom_pytorch_close(ck);
        return LOOM_ERR;
    }
    *out = ck;
    return LOOM_OK;
}

int loom_pytorch_open(loom_pytorch **out, const char *path) {
    *out = NULL;
    loom_storage *file = loom_storage_map_file(path);
    if (!file)
        return LOOM_ERR;
    int rc = open_storage(out, file, path);
    loom_storage_release(file);
    return rc;
}

int loom_pytorch_open_memory(loom_pytorch **out, const void *data, size_t nbytes, const char *name) {
    *out = NULL;
    loom_storage *file = loom_storage_borrow((void *)data, nbytes, true, NULL, NULL);
    if (!file)
        return LOOM_ERR;
    int rc = open_storage(out, file, name ? name : "<memory>");
    loom_storage_release(file);
    return rc;
}
