/* Loom core: safetensors checkpoints. The reader checks every header field
 * against the file before use, and its tensors view the read-only file
 * mapping in place. The writer produces the layout of Hugging Face's
 * safetensors library and replaces its output file atomically. */
#ifndef LOOM_SAFETENSORS_H
#define LOOM_SAFETENSORS_H

#include "tensor.h"

/* Largest accepted header, in bytes: the same limit as the safetensors
 * library's MAX_HEADER_SIZE (safetensors/src/tensor.rs). */
#define LOOM_SAFETENSORS_MAX_HEADER 100000000u

/* A set of named tensors read from one .safetensors file or from the shards
 * of an index, plus the string pairs of the files' `__metadata__`. */
typedef struct loom_checkpoint loom_checkpoint;

/* Open a checkpoint. `path` is one of:
 *   - a .safetensors file;
 *   - a *.json index (model.safetensors.index.json): every shard named in its
 *     weight_map is opened from the index's directory, and each listed tensor
 *     must be in the shard the index names;
 *   - a directory holding model.safetensors or, failing that,
 *     model.safetensors.index.json.
 * Tensors are views of the file mapping where the data is aligned to the
 * element size. Two cases are copied into owned memory at load (logged at
 * debug level): data whose offset is not a multiple of its element size, and
 * F64 tensors, which are converted to f32. BOOL tensors load as u8. Other
 * safetensors dtypes (I8, I16, U16, U32, U64, F8_*) are rejected.
 * On failure *out is NULL and the error names the file, the tensor and the
 * byte offset involved. */
int loom_checkpoint_open(loom_checkpoint **out, const char *path);

/* Parse a safetensors image held in memory. The buffer is borrowed, not
 * copied: it must stay valid and unchanged until the checkpoint is closed and
 * every tensor taken from it is freed. `name` labels error messages (NULL
 * gives "<memory>"). */
int loom_checkpoint_open_memory(loom_checkpoint **out, const void *data, size_t nbytes,
                                const char *name);

/* Release the checkpoint (accepts NULL). Views taken from its tensors with
 * loom_tensor_view_of and the like stay valid, because they hold their own
 * reference to the storage. */
void loom_checkpoint_close(loom_checkpoint *ckpt);

/* Tensors are numbered 0..count-1: shard by shard in the order the index
 * first names them, and within a file in header order. */
int loom_checkpoint_count(const loom_checkpoint *ckpt);
const char *loom_checkpoint_name(const loom_checkpoint *ckpt, int i);
/* The tensor at index i, owned by the checkpoint: valid until close. Take a
 * view (loom_tensor_view_of) to keep it longer. */
const loom_tensor *loom_checkpoint_tensor(const loom_checkpoint *ckpt, int i);
/* The dtype name the file declares ("F32", "BOOL", "F64", ...), which differs
 * from the tensor's dtype for BOOL (u8) and F64 (f32). */
const char *loom_checkpoint_stored_dtype(const loom_checkpoint *ckpt, int i);
/* Path of the file that contains tensor i (a shard, for an index). */
const char *loom_checkpoint_file(const loom_checkpoint *ckpt, int i);
/* Index of the tensor called `name`, or -1 when absent. */
int loom_checkpoint_find(const loom_checkpoint *ckpt, const char *name);
/* The tensor called `name`, or NULL when absent. */
const loom_tensor *loom_checkpoint_get(const loom_checkpoint *ckpt, const char *name);

/* `__metadata__` pairs in file order. For an index, the pairs of all shards
 * are merged, and the first shard that sets a key wins. */
int loom_checkpoint_metadata_count(const loom_checkpoint *ckpt);
const char *loom_checkpoint_metadata_key(const loom_checkpoint *ckpt, int i);
const char *loom_checkpoint_metadata_value(const loom_checkpoint *ckpt, int i);
/* Value stored under `key`, or NULL when absent. */
const char *loom_checkpoint_metadata_get(const loom_checkpoint *ckpt, const char *key);

/* Write `n` tensors to a .safetensors file, in the order given, with data
 * offsets packed back to back and the header padded with spaces to a
 * multiple of 8 bytes, as the safetensors library does. Tensors may have any
 * dtype and any strides. Metadata pairs (n_meta may be 0) go to
 * `__metadata__`. Names and metadata must be valid UTF-8 and names unique.
 * The file is written to a temporary file in the same directory, synced and
 * renamed over `path`, so readers never see a partial file.
 * NOTE: no padding is inserted between tensors, because the safetensors
 * library rejects gaps. A tensor stays aligned on reload only when the bytes
 * before it are a multiple of its element size, so put wider dtypes first. */
int loom_safetensors_write(const char *path, int n, const char *const *names,
                           const loom_tensor *const *tensors, int n_meta,
                           const char *const *meta_keys, const char *const *meta_values);

#endif
