/* Loom core: a read-only zip archive reader for PyTorch checkpoints. It reads
 * the central directory (zip64 included, for archives over 4 GiB), checks
 * every offset and size against the file, and hands out stored entries as
 * zero-copy storages over the file mapping. Deflated entries are inflated
 * when Loom is built with LOOM_HAVE_ZLIB and rejected otherwise. */
#ifndef LOOM_ZIP_H
#define LOOM_ZIP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tensor.h"

typedef struct loom_zip_entry {
    char *name;       /* NUL-terminated copy of the entry name */
    uint16_t method;  /* 0 = stored, 8 = deflated */
    uint16_t flags;   /* general purpose bit flags */
    uint32_t crc32;   /* from the central directory */
    uint64_t compressed_size;
    uint64_t size;          /* uncompressed */
    uint64_t header_offset; /* local file header */
    uint64_t data_offset;   /* first byte of the entry's (compressed) data */
} loom_zip_entry;

typedef struct loom_zip {
    char *label;         /* file name used in messages */
    loom_storage *file;  /* the whole archive, one reference held */
    const uint8_t *data; /* file->data */
    size_t len;
    loom_zip_entry *entries; /* in central directory order */
    size_t count;
    size_t *by_name; /* entry indexes sorted by name, for loom_zip_find */
} loom_zip;

/* Map `path` and read its central directory. On failure *z is left empty
 * (safe to close) and the error names the file and the byte offset. */
int loom_zip_open(loom_zip *z, const char *path);
/* The same over an existing storage holding the archive (retained). `label`
 * names the archive in messages. */
int loom_zip_open_storage(loom_zip *z, loom_storage *file, const char *label);
void loom_zip_close(loom_zip *z); /* accepts an empty or failed zip */

/* Index of the entry called `name`, or -1. With duplicate names the first
 * in central directory order wins. */
long loom_zip_find(const loom_zip *z, const char *name);

/* A storage with entry i's uncompressed bytes, with one reference for the
 * caller. A stored entry borrows the archive's bytes in place and keeps the
 * archive storage alive. A deflated one is inflated into owned memory and
 * its CRC-32 checked. With `verify_crc` a stored entry's CRC-32 is checked
 * too, which reads all of its bytes. */
int loom_zip_entry_storage(const loom_zip *z, size_t i, bool verify_crc, loom_storage **out);

/* CRC-32 (the zip and zlib polynomial) of n bytes, continuing from `crc`
 * (start with 0). */
uint32_t loom_zip_crc32(uint32_t crc, const void *data, size_t n);

#endif
