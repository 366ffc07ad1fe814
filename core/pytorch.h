/* Loom core: PyTorch checkpoints (.bin, .pt, .pth) in the zip format that
 * torch.save has written since PyTorch 1.6, read without running any code
 * (see pickle.h), and a sniffer that identifies checkpoint formats by
 * content. The tensor list API has the shape of loom_checkpoint's in
 * safetensors.h, so a caller can treat both formats alike. */
#ifndef LOOM_PYTORCH_H
#define LOOM_PYTORCH_H

#include "tensor.h"

/* ---- format sniffing */

typedef enum loom_ckpt_format {
    LOOM_CKPT_ERROR = -1,         /* the file could not be read (see loom_last_error) */
    LOOM_CKPT_UNKNOWN = 0,        /* none of the formats below */
    LOOM_CKPT_SAFETENSORS,        /* 8-byte header length, then a JSON header */
    LOOM_CKPT_PYTORCH_ZIP,        /* a zip archive, as torch.save writes since 1.6 */
    LOOM_CKPT_PYTORCH_LEGACY,     /* a bare pickle stream or a tar file: torch.save before 1.6 */
    LOOM_CKPT_GGUF,               /* "GGUF" magic (llama.cpp) */
} loom_ckpt_format;

/* Identify the format of the file at `path` from its first bytes. */
loom_ckpt_format loom_checkpoint_format(const char *path);
/* The same over the first `n` bytes of a file of `file_size` bytes (n may be
 * smaller than the file; 512 bytes are enough for every format). */
loom_ckpt_format loom_checkpoint_format_bytes(const void *head, size_t n, uint64_t file_size);
/* "safetensors", "pytorch-zip", "pytorch-legacy", "gguf", "unknown" or "error". */
const char *loom_ckpt_format_name(loom_ckpt_format format);

/* ---- PyTorch zip checkpoints */

/* Limits on what a checkpoint's pickle may expand to after flattening. */
#define LOOM_PYTORCH_MAX_DEPTH 64             /* nested dicts and lists */
#define LOOM_PYTORCH_MAX_NAME 4096            /* bytes in one flattened name */
#define LOOM_PYTORCH_MAX_LEAVES (1 << 20)     /* tensors plus metadata values */
#define LOOM_PYTORCH_MAX_TEXT ((size_t)64 << 20) /* bytes of all names and metadata */

/* The tensors of one checkpoint. The pickled object is flattened: nested
 * dicts give dotted names ({"model": {"fc.weight": t}} gives
 * "model.fc.weight"), list and tuple items are named by their index, and a
 * bare tensor gets the empty name. Ints, floats, bools and strings become
 * metadata pairs under the same kind of name (ints and floats in decimal,
 * bools as "True"/"False"); None, bytes and empty containers are skipped. */
typedef struct loom_pytorch loom_pytorch;

/* Open a PyTorch zip checkpoint. Tensors view the read-only file mapping in
 * place when the data is aligned to the element size, which torch.save
 * ensures by padding every entry to 64 bytes. Three cases are copied into
 * owned memory at load: misaligned data, deflated entries (when Loom is built
 * with zlib) and Double storages, which are converted to f32. Bool storages
 * load as u8. Every global named in data.pkl must be on the allow-list of
 * pickle.c; anything else is rejected by name and never run. The legacy
 * pre-1.6 format, TorchScript archives and big-endian checkpoints are
 * rejected with a message saying how to convert them. On failure *out is NULL
 * and the error names the file, the zip entry or pickle offset, and the
 * value at fault. */
int loom_pytorch_open(loom_pytorch **out, const char *path);

/* Read a checkpoint image held in memory. The buffer is borrowed, not copied:
 * it must stay valid and unchanged until the checkpoint is closed and every
 * tensor taken from it is freed. `name` labels error messages (NULL gives
 * "<memory>"). */
int loom_pytorch_open_memory(loom_pytorch **out, const void *data, size_t nbytes, const char *name);

/* Release the checkpoint (accepts NULL). Views taken from its tensors stay
 * valid, because they hold their own reference to the storage. */
void loom_pytorch_close(loom_pytorch *ckpt);

/* Tensors are numbered 0..count-1 in the order the pickle lists them (the
 * state dict's order). */
int loom_pytorch_count(const loom_pytorch *ckpt);
const char *loom_pytorch_name(const loom_pytorch *ckpt, int i);
/* The tensor at index i, owned by the checkpoint: valid until close. Take a
 * view (loom_tensor_view_of) to keep it longer. Tensors that share a torch
 * storage share one loom_storage. */
const loom_tensor *loom_pytorch_tensor(const loom_pytorch *ckpt, int i);
/* The storage type the file declares, in safetensors spelling ("F32", "F16",
 * "BF16", "I32", "I64", "U8", "BOOL", "F64"), which differs from the
 * tensor's dtype for BOOL (u8) and F64 (f32). */
const char *loom_pytorch_stored_dtype(const loom_pytorch *ckpt, int i);
/* Path (or memory name) of the checkpoint. */
const char *loom_pytorch_file(const loom_pytorch *ckpt, int i);
/* Index of the tensor called `name`, or -1 when absent. */
int loom_pytorch_find(const loom_pytorch *ckpt, const char *name);
/* The tensor called `name`, or NULL when absent. */
const loom_tensor *loom_pytorch_get(const loom_pytorch *ckpt, const char *name);

/* Non-tensor leaves (see above) in pickle order. */
int loom_pytorch_metadata_count(const loom_pytorch *ckpt);
const char *loom_pytorch_metadata_key(const loom_pytorch *ckpt, int i);
const char *loom_pytorch_metadata_value(const loom_pytorch *ckpt, int i);
/* Value stored under `key`, or NULL when absent. */
const char *loom_pytorch_metadata_get(const loom_pytorch *ckpt, const char *key);

#endif
