/* Loom core: a restricted unpickler for the data.pkl of PyTorch checkpoints.
 * It runs the pickle opcodes of protocols 0-5 that torch.save produces and
 * builds plain values (numbers, strings, tuples, lists, dicts) and tensor
 * records. Only an allow-list of globals is accepted, and nothing named in
 * the pickle is ever imported or called, so a hostile file cannot run code. */
#ifndef LOOM_PICKLE_H
#define LOOM_PICKLE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tensor.h"

/* Limits on untrusted input. Each error message names the limit it hit. */
#define LOOM_PICKLE_MAX_STACK 1000000 /* values on the VM stack */
#define LOOM_PICKLE_MAX_MARKS 1000    /* open MARKs (nesting while building) */

typedef enum loom_pickle_kind {
    LOOM_PICKLE_NONE = 0,
    LOOM_PICKLE_BOOL,
    LOOM_PICKLE_INT,
    LOOM_PICKLE_FLOAT,
    LOOM_PICKLE_STRING, /* str: UTF-8 as stored, possibly with NUL bytes */
    LOOM_PICKLE_BYTES,  /* bytes, bytearray and protocol-1 strings */
    LOOM_PICKLE_TUPLE,
    LOOM_PICKLE_LIST, /* also sets and frozensets */
    LOOM_PICKLE_DICT, /* also OrderedDict, with keys in insertion order */
    LOOM_PICKLE_GLOBAL,
    LOOM_PICKLE_STORAGE,
    LOOM_PICKLE_TENSOR,
} loom_pickle_kind;

/* Element types of torch storages (torch.<Name>Storage). */
typedef enum loom_torch_storage_type {
    LOOM_TORCH_FLOAT = 0,
    LOOM_TORCH_HALF,
    LOOM_TORCH_BFLOAT16,
    LOOM_TORCH_INT,
    LOOM_TORCH_LONG,
    LOOM_TORCH_BYTE,
    LOOM_TORCH_BOOL,
    LOOM_TORCH_DOUBLE,
    LOOM_TORCH_STORAGE_TYPE_COUNT
} loom_torch_storage_type;

/* Bytes per element of a storage type, and its name without "Storage"
 * ("Float", "BFloat16", ...). */
size_t loom_torch_storage_elsize(loom_torch_storage_type type);
const char *loom_torch_storage_name(loom_torch_storage_type type);

typedef struct loom_pickle_value loom_pickle_value;

/* One value built by the VM. Values live in the loom_pickle that made them;
 * strings point into the pickle bytes passed to loom_pickle_load, which must
 * outlive the result. Containers may share children (memo references), so
 * the values form a graph that can contain cycles. */
struct loom_pickle_value {
    loom_pickle_kind kind;
    size_t offset; /* byte offset in the pickle of the opcode that made it */
    union {
        bool boolean;
        int64_t integer;
        double number;
        struct {
            const char *data;
            size_t len;
        } str; /* STRING and BYTES */
        struct {
            loom_pickle_value **items;
            size_t count, cap;
        } seq; /* TUPLE and LIST */
        struct {
            loom_pickle_value **keys, **values;
            size_t count, cap;
        } dict;
        struct {
            int id; /* which allowed global (private to pickle.c) */
            const char *module, *name;
        } global;
        struct {
            loom_torch_storage_type type;
            const char *key; /* NUL-terminated <key> of the archive's data/<key> entry */
            int64_t numel;   /* elements of `type`, from the persistent id */
        } storage; /* a persistent id ('storage', type, key, location, numel) */
        struct {
            const loom_pickle_value *storage; /* kind STORAGE */
            int64_t storage_offset;           /* in elements */
            int ndim;                         /* at most LOOM_MAX_DIMS */
            const int64_t *shape;             /* ndim sizes */
            const int64_t *strides;           /* ndim strides, in elements */
        } tensor; /* from torch._utils._rebuild_tensor_v2 and its relatives */
    } as;
};

typedef struct loom_pickle loom_pickle;

/* Run the pickle in data[0..len) until STOP. `label` prefixes every error
 * message (for example "model.pt: archive/data.pkl"), which goes on to give
 * the byte offset and the opcode or global at fault. On failure *out is NULL. */
int loom_pickle_load(loom_pickle **out, const void *data, size_t len, const char *label);
/* The object the pickle returned at STOP. */
const loom_pickle_value *loom_pickle_root(const loom_pickle *p);
void loom_pickle_free(loom_pickle *p); /* accepts NULL */

#endif
