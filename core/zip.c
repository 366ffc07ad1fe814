/* Loom core: zip archive reader. Field layouts follow PKWARE's APPNOTE.TXT
 * (sections 4.3.7 local file header, 4.3.12 central directory header, 4.3.14
 * to 4.3.16 zip64 end of central directory and the end of central directory
 * record, 4.5.3 zip64 extended information). Every value read from the file
 * is checked with the helpers of base.h before it is used as an offset. */
#include "zip.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef LOOM_HAVE_ZLIB
#include <zlib.h>
#endif

#define SIG_LOCAL 0x04034b50u
#define SIG_CENTRAL 0x02014b50u
#define SIG_EOCD 0x06054b50u
#define SIG_EOCD64 0x06064b50u
#define SIG_EOCD64_LOCATOR 0x07064b50u

#define LOCAL_HEADER_SIZE 30
#define CENTRAL_HEADER_SIZE 46
#define EOCD_SIZE 22
#define EOCD64_SIZE 56
#define EOCD64_LOCATOR_SIZE 20
#define MAX_COMMENT 65535

static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t rd32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }
static uint64_t rd64(const uint8_t *p) { return (uint64_t)rd32(p) | (uint64_t)rd32(p + 4) << 32; }

/* True when [offset, offset + n) lies inside the archive. */
static bool in_file(const loom_zip *z, uint64_t offset, uint64_t n) {
    return offset <= z->len && n <= z->len - offset;
}

uint32_t loom_zip_crc32(uint32_t crc, const void *data, size_t n) {
#ifdef LOOM_HAVE_ZLIB
    const uint8_t *p = data;
    while (n > 0) {
        uInt chunk = n > 0x40000000u ? 0x40000000u : (uInt)n;
        crc = (uint32_t)crc32(crc, p, chunk);
        p += chunk;
        n -= chunk;
    }
    return crc;
#else
    /* Bitwise CRC-32 with the reflected polynomial 0xEDB88320: slow, but only
     * small entries (data.pkl, byteorder) are checked without zlib. */
    const uint8_t *p = data;
    crc = ~crc;
    for (size_t i = 0; i < n; i++) {
        crc ^= p[i];
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    }
    return ~crc;
#endif
}

/* ------------------------------------------------------ central directory */

typedef struct eocd_info {
    uint64_t count, cd_size, cd_offset;
} eocd_info;

/* Find the end of central directory record: the last "PK\5\6" whose comment
 * length matches the bytes after it. The comment is at most 64 KiB, so only
 * the tail of the file is searched. */
static int find_eocd(const loom_zip *z, size_t *pos) {
    if (z->len < EOCD_SIZE)
        return loom_error("%s: not a zip archive: %zu bytes is shorter than an end of central directory record",
                          z->label, z->len);
    size_t lowest = z->len - EOCD_SIZE > MAX_COMMENT ? z->len - EOCD_SIZE - MAX_COMMENT : 0;
    for (size_t p = z->len - EOCD_SIZE + 1; p-- > lowest;) {
        if (rd32(z->data + p) == SIG_EOCD && p + EOCD_SIZE + rd16(z->data + p + 20) == z->len) {
            *pos = p;
            return LOOM_OK;
        }
    }
    return loom_error("%s: not a zip archive (or truncated): no end of central directory record in the last %zu "
                      "bytes",
                      z->label, z->len - lowest);
}

static int read_eocd(const loom_zip *z, eocd_info *info) {
    size_t pos = 0;
    if (find_eocd(z, &pos) != 0)
        return LOOM_ERR;
    const uint8_t *e = z->data + pos;
    if (rd16(e + 4) != 0 || rd16(e + 6) != 0)
        return loom_error("%s: end of central directory at offset %zu: multi-disk archives are not supported",
                          z->label, pos);
    info->count = rd16(e + 10);
    info->cd_size = rd32(e + 12);
    info->cd_offset = rd32(e + 16);

    /* A zip64 locator sits right before the record when any field overflowed
     * (0xFFFF or 0xFFFFFFFF), and its zip64 record contains the real values. */
    if (pos >= EOCD64_LOCATOR_SIZE && rd32(z->data + pos - EOCD64_LOCATOR_SIZE) == SIG_EOCD64_LOCATOR) {
        size_t loc = pos - EOCD64_LOCATOR_SIZE;
        uint64_t off = rd64(z->data + loc + 8);
        if (!in_file(z, off, EOCD64_SIZE) || rd32(z->data + off) != SIG_EOCD64)
            return loom_error("%s: zip64 end of central directory locator at offset %zu points to offset %llu, "
                              "where no zip64 record is",
                              z->label, loc, (unsigned long long)off);
        const uint8_t *e64 = z->data + off;
        if (rd32(e64 + 16) != 0 || rd32(e64 + 20) != 0)
            return loom_error("%s: zip64 end of central directory at offset %llu: multi-disk archives are not "
                              "supported",
                              z->label, (unsigned long long)off);
        info->count = rd64(e64 + 32);
        info->cd_size = rd64(e64 + 40);
        info->cd_offset = rd64(e64 + 48);
    } else if (info->count == 0xFFFF || info->cd_size == 0xFFFFFFFFu || info->cd_offset == 0xFFFFFFFFu) {
        return loom_error("%s: end of central directory at offset %zu has zip64 markers but no zip64 locator "
                          "precedes it",
                          z->label, pos);
    }

    if (!in_file(z, info->cd_offset, info->cd_size))
        return loom_error("%s: central directory at offset %llu with %llu bytes extends past the end of the "
                          "file (%zu bytes): the file is truncated",
                          z->label, (unsigned long long)info->cd_offset, (unsigned long long)info->cd_size, z->len);
    if (info->count > info->cd_size / CENTRAL_HEADER_SIZE)
        return loom_error("%s: central directory at offset %llu claims %llu entries in %llu bytes",
                          z->label, (unsigned long long)info->cd_offset, (unsigned long long)info->count,
                          (unsigned long long)info->cd_size);
    return LOOM_OK;
}

/* Replace 0xFFFFFFFF sizes and offset with their values from the zip64
 * extended information extra field (header id 0x0001). */
static int apply_zip64_extra(const loom_zip *z, loom_zip_entry *e, const uint8_t *extra, size_t elen,
                             size_t at) {
    bool want_size = e->size == 0xFFFFFFFFu, want_csize = e->compressed_size == 0xFFFFFFFFu,
         want_offset = e->header_offset == 0xFFFFFFFFu;
    if (!want_size && !want_csize && !want_offset)
        return LOOM_OK;
    size_t p = 0;
    while (p + 4 <= elen) {
        uint16_t id = rd16(extra + p), n = rd16(extra + p + 2);
        if (n > elen - p - 4)
            break;
        if (id == 0x0001) {
            const uint8_t *f = extra + p + 4, *end = f + n;
            if (want_size) {
                if (end - f < 8)
                    break;
                e->size = rd64(f);
                f += 8;
            }
            if (want_csize) {
                if (end - f < 8)
                    break;
                e->compressed_size = rd64(f);
                f += 8;
            }
            if (want_offset) {
                if (end - f < 8)
                    break;
                e->header_offset = rd64(f);
            }
            return LOOM_OK;
        }
        p += 4 + (size_t)n;
    }
    return loom_error("%s: zip entry '%s' (central directory header at offset %zu): sizes need a zip64 extra "
                      "field, which is missing or too short",
                      z->label, e->name, at);
}

/* Read the local header of entry e and find where its data starts. */
static int locate_data(const loom_zip *z, loom_zip_entry *e) {
    unsigned long long h = (unsigned long long)e->header_offset;
    if (!in_file(z, e->header_offset, LOCAL_HEADER_SIZE))
        return loom_error("%s: zip entry '%s': local header at offset %llu is past the end of the file (%zu "
                          "bytes): the file is truncated",
                          z->label, e->name, h, z->len);
    const uint8_t *l = z->data + e->header_offset;
    if (rd32(l) != SIG_LOCAL)
        return loom_error("%s: zip entry '%s': no local header signature at offset %llu", z->label, e->name, h);
    uint64_t nlen = rd16(l + 26), elen = rd16(l + 28);
    uint64_t data = e->header_offset + LOCAL_HEADER_SIZE + nlen + elen;
    if (!in_file(z, e->header_offset + LOCAL_HEADER_SIZE, nlen + elen))
        return loom_error("%s: zip entry '%s': local header at offset %llu extends past the end of the file",
                          z->label, e->name, h);
    if (nlen != strlen(e->name) || memcmp(l + LOCAL_HEADER_SIZE, e->name, nlen) != 0)
        return loom_error("%s: zip entry '%s': the local header at offset %llu names a different entry",
                          z->label, e->name, h);
    if (!in_file(z, data, e->compressed_size))
        return loom_error("%s: zip entry '%s': %llu bytes of data at offset %llu extend past the end of the "
                          "file (%zu bytes): the file is truncated",
                          z->label, e->name, (unsigned long long)e->compressed_size, (unsigned long long)data,
                          z->len);
    e->data_offset = data;
    return LOOM_OK;
}

static int read_central_directory(loom_zip *z, const eocd_info *info) {
    z->entries = calloc(info->count ? info->count : 1, sizeof *z->entries);
    if (!z->entries)
        return loom_error("%s: out of memory for %llu zip entries", z->label, (unsigned long long)info->count);
    size_t p = (size_t)info->cd_offset, end = (size_t)(info->cd_offset + info->cd_size);
    for (uint64_t i = 0; i < info->count; i++) {
        if (end - p < CENTRAL_HEADER_SIZE || rd32(z->data + p) != SIG_CENTRAL)
            return loom_error("%s: central directory entry %llu: no header signature at offset %zu",
                              z->label, (unsigned long long)i, p);
        const uint8_t *c = z->data + p;
        size_t nlen = rd16(c + 28), elen = rd16(c + 30), clen = rd16(c + 32);
        if (end - p - CENTRAL_HEADER_SIZE < nlen + elen + clen)
            return loom_error("%s: central directory entry %llu at offset %zu extends past the directory",
                              z->label, (unsigned long long)i, p);
        loom_zip_entry *e = &z->entries[z->count];
        e->name = malloc(nlen + 1);
        if (!e->name)
            return loom_error("%s: out of memory", z->label);
        memcpy(e->name, c + CENTRAL_HEADER_SIZE, nlen);
        e->name[nlen] = '\0';
        z->count++;
        if (memchr(e->name, '\0', nlen))
            return loom_error("%s: central directory entry %llu at offset %zu: name contains a NUL byte",
                              z->label, (unsigned long long)i, p);
        e->flags = rd16(c + 8);
        e->method = rd16(c + 10);
        e->crc32 = rd32(c + 16);
        e->compressed_size = rd32(c + 20);
        e->size = rd32(c + 24);
        e->header_offset = rd32(c + 42);
        if (apply_zip64_extra(z, e, c + CENTRAL_HEADER_SIZE + nlen, elen, p) != 0)
            return LOOM_ERR;
        if (e->flags & 1u)
            return loom_error("%s: zip entry '%s' (central directory offset %zu) is encrypted", z->label, e->name,
                              p);
        if (e->method != 0 && e->method != 8)
            return loom_error("%s: zip entry '%s' (central directory offset %zu) uses compression method %u; "
                              "only 0 (stored) and 8 (deflate) are supported",
                              z->label, e->name, p, e->method);
        if (e->method == 0 && e->compressed_size != e->size)
            return loom_error("%s: zip entry '%s' (central directory offset %zu) is stored but its sizes "
                              "differ (%llu compressed, %llu uncompressed)",
                              z->label, e->name, p, (unsigned long long)e->compressed_size,
                              (unsigned long long)e->size);
        if (locate_data(z, e) != 0)
            return LOOM_ERR;
        p += CENTRAL_HEADER_SIZE + nlen + elen + clen;
    }
    return LOOM_OK;
}

typedef struct name_index {
    const char *name;
    size_t index;
} name_index;

static int compare_names(const void *a, const void *b) {
    const name_index *x = a, *y = b;
    int c = strcmp(x->name, y->name);
    return c ? c : (x->index > y->index) - (x->index < y->index);
}

static int index_names(loom_zip *z) {
    size_t n = z->count ? z->count : 1;
    name_index *tmp = malloc(n * sizeof *tmp);
    z->by_name = malloc(n * sizeof *z->by_name);
    if (!tmp || !z->by_name) {
        free(tmp);
        return loom_error("%s: out of memory", z->label);
    }
    for (size_t i = 0; i < z->count; i++)
        tmp[i] = (name_index){z->entries[i].name, i};
    qsort(tmp, z->count, sizeof *tmp, compare_names);
    for (size_t i = 0; i < z->count; i++)
        z->by_name[i] = tmp[i].index;
    free(tmp);
    return LOOM_OK;
}

long loom_zip_find(const loom_zip *z, const char *name) {
    size_t lo = 0, hi = z->count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (strcmp(z->entries[z->by_name[mid]].name, name) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo < z->count && strcmp(z->entries[z->by_name[lo]].name, name) == 0)
        return (long)z->by_name[lo];
    return -1;
}

/* -------------------------------------------------------------- open/close */

int loom_zip_open_storage(loom_zip *z, loom_storage *file, const char *label) {
    memset(z, 0, sizeof *z);
    z->label = strdup(label ? label : "<memory>");
    if (!z->label)
        return loom_error("out of memory");
    loom_storage_retain(file);
    z->file = file;
    z->data = file->data;
    z->len = file->nbytes;
    eocd_info info = {0};
    if (read_eocd(z, &info) != 0 || read_central_directory(z, &info) != 0 || index_names(z) != 0) {
        loom_zip_close(z);
        return LOOM_ERR;
    }
    return LOOM_OK;
}

int loom_zip_open(loom_zip *z, const char *path) {
    memset(z, 0, sizeof *z);
    loom_storage *file = loom_storage_map_file(path);
    if (!file)
        return LOOM_ERR;
    int rc = loom_zip_open_storage(z, file, path);
    loom_storage_release(file);
    return rc;
}

void loom_zip_close(loom_zip *z) {
    if (!z)
        return;
    for (size_t i = 0; i < z->count; i++)
        free(z->entries[i].name);
    free(z->entries);
    free(z->by_name);
    free(z->label);
    loom_storage_release(z->file);
    memset(z, 0, sizeof *z);
}

/* ------------------------------------------------------------ entry data */

static void release_archive(void *ctx) { loom_storage_release(ctx); }

#ifdef LOOM_HAVE_ZLIB
static int inflate_entry(const loom_zip *z, const loom_zip_entry *e, loom_storage **out) {
    /* Deflate expands at most about 1032:1, so a larger claimed size is a
     * corrupt or hostile header; rejecting it avoids a huge allocation. */
    uint64_t max_size = e->compressed_size * 1032 + 1024;
    if (e->compressed_size > UINT64_MAX / 2048 || e->size > max_size)
        return loom_error("%s: zip entry '%s' at offset %llu claims %llu bytes from %llu deflated bytes",
                          z->label, e->name, (unsigned long long)e->header_offset, (unsigned long long)e->size,
                          (unsigned long long)e->compressed_size);
    if (e->size > SIZE_MAX)
        return loom_error("%s: zip entry '%s' is too large for this platform", z->label, e->name);
    loom_storage *s = loom_storage_new((size_t)e->size);
    if (!s)
        return loom_error_prefix("%s: zip entry '%s'", z->label, e->name);

    z_stream zs;
    memset(&zs, 0, sizeof zs);
    if (inflateInit2(&zs, -15) != Z_OK) {
        loom_storage_release(s);
        return loom_error("%s: zip entry '%s': cannot start zlib inflate", z->label, e->name);
    }
    const uint8_t *in = z->data + e->data_offset;
    uint64_t in_left = e->compressed_size, out_left = e->size;
    uint8_t *outp = s->data;
    int zr = Z_OK;
    /* zlib counts in uInt, so feed and drain at most 1 GiB at a time. */
    while (zr == Z_OK) {
        if (zs.avail_in == 0 && in_left > 0) {
            zs.next_in = (Bytef *)in;
            zs.avail_in = in_left > 0x40000000u ? 0x40000000u : (uInt)in_left;
            in += zs.avail_in;
            in_left -= zs.avail_in;
        }
        if (zs.avail_out == 0 && out_left > 0) {
            zs.next_out = outp;
            zs.avail_out = out_left > 0x40000000u ? 0x40000000u : (uInt)out_left;
            outp += zs.avail_out;
            out_left -= zs.avail_out;
        }
        zr = inflate(&zs, Z_NO_FLUSH);
        if (zr == Z_BUF_ERROR && (zs.avail_in > 0 || in_left > 0) && (zs.avail_out > 0 || out_left > 0))
            zr = Z_OK;
    }
    uint64_t produced = e->size - out_left - zs.avail_out;
    const char *reason = "wrong size";
    if (zr != Z_STREAM_END)
        reason = zs.msg ? zs.msg : "truncated";
    char reason_copy[128];
    snprintf(reason_copy, sizeof reason_copy, "%s", reason); /* zs.msg dies with inflateEnd */
    inflateEnd(&zs);
    if (zr != Z_STREAM_END || produced != e->size) {
        loom_storage_release(s);
        return loom_error("%s: zip entry '%s' at offset %llu: deflate data is corrupt (%s, %llu of %llu bytes "
                          "inflated)",
                          z->label, e->name, (unsigned long long)e->data_offset, reason_copy,
                          (unsigned long long)produced, (unsigned long long)e->size);
    }
    uint32_t crc = loom_zip_crc32(0, s->data, s->nbytes);
    if (crc != e->crc32) {
        loom_storage_release(s);
        return loom_error("%s: zip entry '%s' at offset %llu: CRC-32 is %08x, expected %08x", z->label, e->name,
                          (unsigned long long)e->data_offset, crc, e->crc32);
    }
    *out = s;
    return LOOM_OK;
}
#endif

int loom_zip_entry_storage(const loom_zip *z, size_t i, bool verify_crc, loom_storage **out) {
    *out = NULL;
    if (i >= z->count)
        return loom_error("%s: zip entry index %zu out of range (%zu entries)", z->label, i, z->count);
    const loom_zip_entry *e = &z->entries[i];
    if (e->method == 8) {
#ifdef LOOM_HAVE_ZLIB
        return inflate_entry(z, e, out);
#else
        return loom_error("%s: zip entry '%s' is deflate-compressed, and this build of Loom has no zlib "
                          "support; re-save the checkpoint with torch.save, which stores entries uncompressed",
                          z->label, e->name);
#endif
    }
    if (verify_crc) {
        uint32_t crc = loom_zip_crc32(0, z->data + e->data_offset, (size_t)e->size);
        if (crc != e->crc32)
            return loom_error("%s: zip entry '%s' at offset %llu: CRC-32 is %08x, expected %08x", z->label,
                              e->name, (unsigned long long)e->data_offset, crc, e->crc32);
    }
    loom_storage *s = loom_storage_borrow((void *)(z->data + e->data_offset), (size_t)e->size, true,
                                          release_archive, z->file);
    if (!s)
        return loom_error_prefix("%s: zip entry '%s'", z->label, e->name);
    loom_storage_retain(z->file);
    *out = s;
    return LOOM_OK;
}
