/* Build a stored (uncompressed) zip archive in memory, laid out as torch.save
 * lays out a checkpoint: each entry's data starts at a multiple of 64 bytes,
 * padded through an extra field in the local header. Used by
 * tests/c/test_pytorch.c and tests/fuzz/fuzz_pickle.c to wrap hand-written
 * pickles into checkpoints. */
#ifndef LOOM_ZIP_BUILD_H
#define LOOM_ZIP_BUILD_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "zip.h"

typedef struct zip_build_entry {
    const char *name;
    const void *data;
    size_t len;
} zip_build_entry;

static void zip_build_put16(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static void zip_build_put32(uint8_t *p, uint32_t v) {
    zip_build_put16(p, v);
    zip_build_put16(p + 2, v >> 16);
}

/* Returns a malloc'd archive of *out_len bytes, or NULL when out of memory. */
static uint8_t *zip_build(const zip_build_entry *entries, int n, size_t *out_len) {
    size_t cap = 22;
    for (int i = 0; i < n; i++)
        cap += 30 + 4 + 64 + entries[i].len + 46 + 2 * strlen(entries[i].name) + 4 + 64;
    uint8_t *buf = calloc(1, cap), *central = calloc(1, cap);
    size_t len = 0, clen = 0;
    if (!buf || !central) {
        free(buf);
        free(central);
        return NULL;
    }
    for (int i = 0; i < n; i++) {
        const zip_build_entry *e = &entries[i];
        uint32_t nlen = (uint32_t)strlen(e->name);
        uint32_t crc = loom_zip_crc32(0, e->data, e->len);
        size_t start = len + 30 + nlen + 4;
        uint32_t pad = (uint32_t)((64 - start % 64) % 64);
        uint32_t offset = (uint32_t)len;

        uint8_t *l = buf + len;
        zip_build_put32(l, 0x04034b50u);
        zip_build_put16(l + 4, 20);
        zip_build_put32(l + 14, crc);
        zip_build_put32(l + 18, (uint32_t)e->len);
        zip_build_put32(l + 22, (uint32_t)e->len);
        zip_build_put16(l + 26, nlen);
        zip_build_put16(l + 28, 4 + pad);
        memcpy(l + 30, e->name, nlen);
        zip_build_put16(l + 30 + nlen, 0x4246); /* "FB", torch's padding field */
        zip_build_put16(l + 32 + nlen, pad);
        memset(l + 34 + nlen, 'Z', pad);
        len += 34 + nlen + pad;
        if (e->len)
            memcpy(buf + len, e->data, e->len);
        len += e->len;

        uint8_t *c = central + clen;
        zip_build_put32(c, 0x02014b50u);
        zip_build_put16(c + 4, 20);
        zip_build_put16(c + 6, 20);
        zip_build_put32(c + 16, crc);
        zip_build_put32(c + 20, (uint32_t)e->len);
        zip_build_put32(c + 24, (uint32_t)e->len);
        zip_build_put16(c + 28, nlen);
        zip_build_put32(c + 42, offset);
        memcpy(c + 46, e->name, nlen);
        clen += 46 + nlen;
    }
    memcpy(buf + len, central, clen);
    uint8_t *eocd = buf + len + clen;
    zip_build_put32(eocd, 0x06054b50u);
    zip_build_put16(eocd + 8, (uint32_t)n);
    zip_build_put16(eocd + 10, (uint32_t)n);
    zip_build_put32(eocd + 12, (uint32_t)clen);
    zip_build_put32(eocd + 16, (uint32_t)len);
    free(central);
    *out_len = len + clen + 22;
    return buf;
}

#endif
