/* Tests of core/pytorch.c, core/pickle.c and core/zip.c. The checkpoints
 * come from tests/data/pytorch/make_checkpoints.py, and their values are
 * recomputed here from the generator's formulas. Also covered: zip64 and
 * deflated archives, every rejection with the text its error must contain,
 * hand-written hostile pickles (bad opcodes, memo indexes, nesting and
 * expansion bombs, huge lengths), truncated and corrupted archives, and
 * format sniffing. */
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

#include "check.h"
#include "pickle.h"
#include "pytorch.h"
#include "zip.h"
#include "zip_build.h"

#define DATA "tests/data/pytorch/"

static unsigned char *read_file(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    *n = 0;
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *p = malloc(len > 0 ? (size_t)len : 1);
    if (p && fread(p, 1, (size_t)len, f) != (size_t)len) {
        free(p);
        p = NULL;
    }
    fclose(f);
    if (p)
        *n = (size_t)len;
    return p;
}

static bool shape_is(const loom_tensor *t, int ndim, const int64_t *shape) {
    if (t->ndim != ndim)
        return false;
    for (int i = 0; i < ndim; i++)
        if (t->shape[i] != shape[i])
            return false;
    return true;
}

static bool aligned(const loom_tensor *t) {
    return (uintptr_t)loom_tensor_data(t) % loom_dtype_size(t->dtype) == 0;
}

/* The tensor called `name`, after checking its dtype and shape; NULL when
 * it is absent. */
static const loom_tensor *expect_tensor(const loom_pytorch *ck, const char *name, loom_dtype dtype, int ndim,
                                        const int64_t *shape, const char *label) {
    const loom_tensor *t = loom_pytorch_get(ck, name);
    CHECK(t != NULL, "%s: no tensor '%s'", label, name);
    if (!t)
        return NULL;
    CHECK(t->dtype == dtype, "%s: '%s' has dtype %s, expected %s", label, name, loom_dtype_name(t->dtype),
          loom_dtype_name(dtype));
    CHECK(shape_is(t, ndim, shape), "%s: '%s' has shape %s, expected %s", label, name, loom_shape_str(t).s,
          loom_dims_str(ndim, shape).s);
    return t;
}

/* Compare the first n elements of t, in row-major order, with expected[]. */
static void expect_values(const loom_tensor *t, const double *expected, int n, const char *name, const char *label) {
    if (!t)
        return;
    for (int i = 0; i < n; i++)
        CHECK(loom_tensor_get_flat(t, i) == expected[i], "%s: %s[%d] = %.9g, expected %.9g", label, name, i,
              loom_tensor_get_flat(t, i), expected[i]);
}

/* ------------------------------------------------------ basic.pt values */

/* Compare every tensor of basic_state_dict() in make_checkpoints.py with the
 * generator's formulas. */
static void check_basic(const loom_pytorch *ck, const char *label) {
    static const char *const names[] = {"w_f32", "w_f16", "w_bf16", "ids_i64", "w_i32", "w_u8",  "mask",
                                        "w_f64", "w_t",   "shared_a", "shared_b", "param", "scalar"};
    int n = (int)(sizeof names / sizeof names[0]);
    CHECK(loom_pytorch_count(ck) == n, "%s: count %d, expected %d", label, loom_pytorch_count(ck), n);
    if (loom_pytorch_count(ck) != n)
        return;
    for (int i = 0; i < n; i++) {
        CHECK(strcmp(loom_pytorch_name(ck, i), names[i]) == 0, "%s: name %d is '%s', expected '%s'", label, i,
              loom_pytorch_name(ck, i), names[i]);
        CHECK(loom_pytorch_find(ck, names[i]) == i, "%s: find('%s') = %d", label, names[i],
              loom_pytorch_find(ck, names[i]));
        CHECK(aligned(loom_pytorch_tensor(ck, i)), "%s: '%s' is not aligned to its element size", label, names[i]);
    }
    CHECK(loom_pytorch_find(ck, "missing") == -1, "%s: find of an absent name", label);
    CHECK(loom_pytorch_get(ck, "missing") == NULL, "%s: get of an absent name", label);

    double want[8];
    const loom_tensor *t = expect_tensor(ck, "w_f32", LOOM_F32, 2, (int64_t[]){2, 3}, label);
    for (int i = 0; i < 6; i++)
        want[i] = i * 0.5 - 1;
    expect_values(t, want, 6, "w_f32", label);
    CHECK(strcmp(loom_pytorch_stored_dtype(ck, 0), "F32") == 0, "%s: w_f32 stored dtype %s", label,
          loom_pytorch_stored_dtype(ck, 0));

    t = expect_tensor(ck, "w_f16", LOOM_F16, 1, (int64_t[]){4}, label);
    for (int i = 0; i < 4; i++)
        want[i] = (i - 1.5) * 0.25;
    expect_values(t, want, 4, "w_f16", label);

    t = expect_tensor(ck, "w_bf16", LOOM_BF16, 1, (int64_t[]){3}, label);
    for (int i = 0; i < 3; i++)
        want[i] = (i + 1) * 0.75 * (i % 2 ? -1 : 1);
    expect_values(t, want, 3, "w_bf16", label);

    /* i64 values beyond 2^53 are compared as integers, not as doubles. */
    t = expect_tensor(ck, "ids_i64", LOOM_I64, 1, (int64_t[]){3}, label);
    if (t) {
        const int64_t *ids = loom_tensor_data(t);
        CHECK(ids[0] == -1, "%s: ids_i64[0] = %lld", label, (long long)ids[0]);
        CHECK(ids[1] == (int64_t)1 << 40, "%s: ids_i64[1] = %lld", label, (long long)ids[1]);
        CHECK(ids[2] == 7, "%s: ids_i64[2] = %lld", label, (long long)ids[2]);
    }

    t = expect_tensor(ck, "w_i32", LOOM_I32, 1, (int64_t[]){2}, label);
    expect_values(t, (double[]){-5, 123456}, 2, "w_i32", label);
    t = expect_tensor(ck, "w_u8", LOOM_U8, 1, (int64_t[]){3}, label);
    expect_values(t, (double[]){0, 200, 255}, 3, "w_u8", label);
    t = expect_tensor(ck, "mask", LOOM_U8, 1, (int64_t[]){3}, label);
    expect_values(t, (double[]){1, 0, 1}, 3, "mask", label);
    CHECK(strcmp(loom_pytorch_stored_dtype(ck, 6), "BOOL") == 0, "%s: mask stored dtype %s", label,
          loom_pytorch_stored_dtype(ck, 6));

    /* Double storages are converted to f32 in owned memory. */
    t = expect_tensor(ck, "w_f64", LOOM_F32, 1, (int64_t[]){2}, label);
    if (t)
        CHECK(t->storage->kind == LOOM_STORAGE_OWNED, "%s: w_f64 storage kind %d", label, (int)t->storage->kind);
    expect_values(t, (double[]){(float)0.1, -3.25}, 2, "w_f64", label);
    CHECK(strcmp(loom_pytorch_stored_dtype(ck, 7), "F64") == 0, "%s: w_f64 stored dtype %s", label,
          loom_pytorch_stored_dtype(ck, 7));

    /* The transpose of a contiguous (2, 3) tensor: t[i][j] = 10 + i + 3j. */
    t = expect_tensor(ck, "w_t", LOOM_F32, 2, (int64_t[]){3, 2}, label);
    if (t) {
        CHECK(t->strides[0] == 1, "%s: w_t stride 0 is %lld", label, (long long)t->strides[0]);
        CHECK(t->strides[1] == 3, "%s: w_t stride 1 is %lld", label, (long long)t->strides[1]);
        CHECK(!loom_tensor_is_contiguous(t), "%s: w_t is contiguous", label);
        for (int64_t i = 0; i < 3; i++)
            for (int64_t j = 0; j < 2; j++)
                CHECK(loom_tensor_get(t, (int64_t[]){i, j}) == 10 + i + 3 * j, "%s: w_t[%lld][%lld] = %g", label,
                      (long long)i, (long long)j, loom_tensor_get(t, (int64_t[]){i, j}));
    }

    /* Two views of one storage s[k] = k * k, at element offsets 0 and 4. */
    const loom_tensor *a = expect_tensor(ck, "shared_a", LOOM_F32, 1, (int64_t[]){4}, label);
    const loom_tensor *b = expect_tensor(ck, "shared_b", LOOM_F32, 2, (int64_t[]){2, 2}, label);
    if (a && b) {
        CHECK(a->storage == b->storage, "%s: shared_a and shared_b do not share a storage", label);
        CHECK(a->offset == 0, "%s: shared_a at byte offset %zu, expected 0", label, a->offset);
        CHECK(b->offset == 16, "%s: shared_b at byte offset %zu, expected 16", label, b->offset);
    }
    expect_values(a, (double[]){0, 1, 4, 9}, 4, "shared_a", label);
    expect_values(b, (double[]){16, 25, 36, 49}, 4, "shared_b", label);

    t = expect_tensor(ck, "param", LOOM_F32, 1, (int64_t[]){2}, label);
    expect_values(t, (double[]){3, 4}, 2, "param", label);
    t = expect_tensor(ck, "scalar", LOOM_F32, 0, NULL, label);
    expect_values(t, (double[]){9}, 1, "scalar", label);

    CHECK(loom_pytorch_metadata_count(ck) == 0, "%s: %d metadata values, expected none", label,
          loom_pytorch_metadata_count(ck));
}

static void test_basic_file(void) {
    loom_pytorch *ck;
    CHECK_OK(loom_pytorch_open(&ck, DATA "basic.pt"));
    if (!ck)
        return;
    check_basic(ck, "basic.pt");

    /* Stored entries are used in place: the storage borrows the file map. */
    const loom_tensor *t = loom_pytorch_get(ck, "w_f32");
    CHECK(t->storage->kind == LOOM_STORAGE_BORROWED, "w_f32 storage kind %d", (int)t->storage->kind);
    const loom_storage *file = t->storage->release_ctx;
    CHECK(file != NULL, "w_f32 storage does not reference the file");
    if (file) {
        const char *data = t->storage->data, *map = file->map_base;
        CHECK(file->kind == LOOM_STORAGE_MMAP, "file storage kind %d", (int)file->kind);
        CHECK(data >= map, "w_f32 data before the file mapping");
        CHECK(data < map + file->map_len, "w_f32 data after the file mapping");
    }
    CHECK(strcmp(loom_pytorch_file(ck, 0), DATA "basic.pt") == 0, "file is '%s'", loom_pytorch_file(ck, 0));

    /* A view outlives the checkpoint. */
    loom_tensor view = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_tensor_view_of(&view, loom_pytorch_get(ck, "w_t")));
    loom_pytorch_close(ck);
    CHECK(loom_tensor_get(&view, (int64_t[]){2, 1}) == 15, "view after close = %g",
          loom_tensor_get(&view, (int64_t[]){2, 1}));
    loom_tensor_free(&view);
}

static void test_basic_variants(void) {
    static const char *const files[] = {"unaligned.pt", "zip64.pt", "prefix.bin"};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        char path[256];
        snprintf(path, sizeof path, DATA "%s", files[i]);
        loom_pytorch *ck;
        CHECK_OK(loom_pytorch_open(&ck, path));
        if (ck)
            check_basic(ck, files[i]);
        loom_pytorch_close(ck);
    }

    /* The zipfile module does not pad, so some entries of unaligned.pt are
     * misaligned and copied. */
    loom_pytorch *ck;
    CHECK_OK(loom_pytorch_open(&ck, DATA "unaligned.pt"));
    int owned = 0;
    for (int i = 0; ck && i < loom_pytorch_count(ck); i++)
        owned += loom_pytorch_tensor(ck, i)->storage->kind == LOOM_STORAGE_OWNED;
    CHECK(owned > 1, "unaligned.pt: %d owned storages, expected copies beside the f64 one", owned);
    loom_pytorch_close(ck);
}

static unsigned char *find_central(unsigned char *zip, size_t n, const char *name);
static uint32_t rd32(const unsigned char *p);

static void test_deflate(void) {
    loom_pytorch *ck;
#ifdef LOOM_HAVE_ZLIB
    CHECK_OK(loom_pytorch_open(&ck, DATA "deflate.pt"));
    if (ck)
        check_basic(ck, "deflate.pt");
    loom_pytorch_close(ck);

    size_t n;
    unsigned char *bytes = read_file(DATA "deflate.pt", &n);
    unsigned char *c = bytes ? find_central(bytes, n, "archive/data.pkl") : NULL;
    CHECK(c != NULL, "no central header for archive/data.pkl in deflate.pt");
    if (!c) {
        free(bytes);
        return;
    }
    /* Damaged deflate data, then a size no deflate stream can reach. */
    const unsigned char *local = bytes + rd32(c + 42);
    size_t data = rd32(c + 42) + 30 + (size_t)(local[26] | local[27] << 8) + (size_t)(local[28] | local[29] << 8);
    bytes[data + 20] ^= 0x55;
    CHECK_ERROR(loom_pytorch_open_memory(&ck, bytes, n, "bad.pt"), "bad.pt: zip entry 'archive/data.pkl' at offset");
    bytes[data + 20] ^= 0x55;
    unsigned char saved[4];
    memcpy(saved, c + 24, 4);
    memset(c + 24, 0x7F, 4);
    CHECK_ERROR(loom_pytorch_open_memory(&ck, bytes, n, "bad.pt"), "claims 2139062143 bytes from");
    memcpy(c + 24, saved, 4);
    CHECK_OK(loom_pytorch_open_memory(&ck, bytes, n, "restored.pt"));
    loom_pytorch_close(ck);
    free(bytes);
#else
    CHECK_ERROR(loom_pytorch_open(&ck, DATA "deflate.pt"),
                "deflate.pt: zip entry 'archive/byteorder' is deflate-compressed");
    CHECK(ck == NULL, "a failed open leaves NULL");
#endif
}

static void test_memory(void) {
    size_t n;
    unsigned char *bytes = read_file(DATA "basic.pt", &n);
    CHECK(bytes != NULL, "cannot read basic.pt");
    if (!bytes)
        return;
    loom_pytorch *ck;
    CHECK_OK(loom_pytorch_open_memory(&ck, bytes, n, "mem.pt"));
    if (ck) {
        check_basic(ck, "memory");
        const unsigned char *data = loom_pytorch_get(ck, "w_f32")->storage->data;
        CHECK(data > bytes, "open_memory copied the data");
        CHECK(data < bytes + n, "open_memory copied the data");
    }
    loom_pytorch_close(ck);

    /* Every truncation fails cleanly: the end of central directory record
     * is at the very end of the file. */
    int failures = 0;
    for (size_t len = 0; len < n; len++) {
        if (loom_pytorch_open_memory(&ck, bytes, len, "cut.pt") == 0) {
            loom_pytorch_close(ck);
        } else {
            failures++;
        }
    }
    CHECK(failures == (int)n, "%d of %zu truncations were rejected", failures, n);
    CHECK_ERROR(loom_pytorch_open_memory(&ck, bytes, n / 2, "cut.pt"),
                "cut.pt: not a zip archive (or truncated): no end of central directory record");
    CHECK_ERROR(loom_pytorch_open_memory(&ck, bytes, 10, "cut.pt"), "shorter than an end of central directory");
    free(bytes);
}

/* Find the central directory header of `name` in a zip image. */
static unsigned char *find_central(unsigned char *zip, size_t n, const char *name) {
    size_t nlen = strlen(name);
    for (size_t p = 0; p + 46 + nlen <= n; p++)
        if (memcmp(zip + p, "PK\x01\x02", 4) == 0 && zip[p + 28] == nlen && memcmp(zip + p + 46, name, nlen) == 0)
            return zip + p;
    return NULL;
}

static uint32_t rd32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void test_corrupt_zip(void) {
    size_t n;
    unsigned char *bytes = read_file(DATA "basic.pt", &n);
    if (!bytes)
        return;
    loom_pytorch *ck;
    unsigned char *c = find_central(bytes, n, "archive/data/3");
    CHECK(c != NULL, "no central header for archive/data/3");
    if (!c) {
        free(bytes);
        return;
    }
    uint32_t header = rd32(c + 42);
    char needle[128];

    /* A broken local header signature. */
    bytes[header] ^= 0xFF;
    snprintf(needle, sizeof needle, "bad.pt: zip entry 'archive/data/3': no local header signature at offset %u",
             header);
    CHECK_ERROR(loom_pytorch_open_memory(&ck, bytes, n, "bad.pt"), needle);
    bytes[header] ^= 0xFF;

    /* Sizes that run past the end of the file. */
    unsigned char saved[8];
    memcpy(saved, c + 20, 8);
    memset(c + 20, 0x7F, 8);
    CHECK_ERROR(loom_pytorch_open_memory(&ck, bytes, n, "bad.pt"),
                "bad.pt: zip entry 'archive/data/3': 2139062143 bytes of data at offset");
    CHECK_ERROR(loom_pytorch_open_memory(&ck, bytes, n, "bad.pt"), "extend past the end of the file");
    memcpy(c + 20, saved, 8);

    /* A local header offset past the end. */
    memcpy(saved, c + 42, 4);
    memset(c + 42, 0x7F, 4);
    CHECK_ERROR(loom_pytorch_open_memory(&ck, bytes, n, "bad.pt"),
                "zip entry 'archive/data/3': local header at offset 2139062143 is past the end of the file");
    memcpy(c + 42, saved, 4);

    /* Stored sizes that disagree, and an unknown compression method. */
    c[20] ^= 1;
    CHECK_ERROR(loom_pytorch_open_memory(&ck, bytes, n, "bad.pt"), "is stored but its sizes differ");
    c[20] ^= 1;
    c[10] = 12;
    CHECK_ERROR(loom_pytorch_open_memory(&ck, bytes, n, "bad.pt"), "uses compression method 12");
    c[10] = 0;

    /* The central directory offset in the end record past the end. */
    unsigned char *eocd = bytes + n - 22;
    memcpy(saved, eocd + 16, 4);
    memset(eocd + 16, 0x7F, 4);
    CHECK_ERROR(loom_pytorch_open_memory(&ck, bytes, n, "bad.pt"), "bad.pt: central directory at offset 2139062143");
    memcpy(eocd + 16, saved, 4);

    /* A flipped data.pkl byte fails its CRC-32. */
    c = find_central(bytes, n, "archive/data.pkl");
    bytes[rd32(c + 42) + 100] ^= 0x01;
    CHECK_ERROR(loom_pytorch_open_memory(&ck, bytes, n, "bad.pt"), "zip entry 'archive/data.pkl' at offset 64: CRC-32");
    bytes[rd32(c + 42) + 100] ^= 0x01;

    CHECK_OK(loom_pytorch_open_memory(&ck, bytes, n, "restored.pt"));
    loom_pytorch_close(ck);
    free(bytes);
}

/* ------------------------------------------------- nested and metadata */

static void check_nested(const char *file) {
    char path[256];
    snprintf(path, sizeof path, DATA "%s", file);
    loom_pytorch *ck;
    CHECK_OK(loom_pytorch_open(&ck, path));
    if (!ck)
        return;
    static const char *const names[] = {"model.fc.weight", "model.fc.bias", "layers.0", "layers.1"};
    CHECK(loom_pytorch_count(ck) == 4, "%s: count %d", file, loom_pytorch_count(ck));
    for (int i = 0; i < 4 && i < loom_pytorch_count(ck); i++)
        CHECK(strcmp(loom_pytorch_name(ck, i), names[i]) == 0, "%s: name %d is '%s'", file, i, loom_pytorch_name(ck, i));

    const loom_tensor *w = expect_tensor(ck, "model.fc.weight", LOOM_F32, 2, (int64_t[]){2, 2}, file);
    expect_values(w, (double[]){1, 2, 3, 4}, 4, "model.fc.weight", file);
    const loom_tensor *l0 = expect_tensor(ck, "layers.0", LOOM_F16, 1, (int64_t[]){1}, file);
    const loom_tensor *l1 = expect_tensor(ck, "layers.1", LOOM_F16, 1, (int64_t[]){2}, file);
    expect_values(l0, (double[]){0.5}, 1, "layers.0", file);
    expect_values(l1, (double[]){1.5, 2.5}, 2, "layers.1", file);
    if (l0 && l1)
        CHECK(l0->storage == l1->storage, "%s: layers do not share storage", file);

    static const char *const meta[][2] = {
        {"epoch", "3"}, {"lr", "0.001"}, {"name", "blip2"}, {"flag", "True"}, {"optimizer.state.0.step", "10"}};
    CHECK(loom_pytorch_metadata_count(ck) == 5, "%s: %d metadata values", file, loom_pytorch_metadata_count(ck));
    for (int i = 0; i < 5; i++) {
        const char *v = loom_pytorch_metadata_get(ck, meta[i][0]);
        CHECK(v != NULL, "%s: no metadata '%s'", file, meta[i][0]);
        if (v)
            CHECK(strcmp(v, meta[i][1]) == 0, "%s: metadata '%s' = '%s', expected '%s'", file, meta[i][0], v,
                  meta[i][1]);
    }
    CHECK(loom_pytorch_metadata_get(ck, "none") == NULL, "%s: None became metadata", file);
    CHECK(strcmp(loom_pytorch_metadata_key(ck, 0), "epoch") == 0, "%s: first metadata key '%s'", file,
          loom_pytorch_metadata_key(ck, 0));
    loom_pytorch_close(ck);
}

/* ------------------------------------------------------ rejected files */

static void test_rejected_files(void) {
    static const struct {
        const char *file, *needle;
    } cases[] = {
        {"forbidden.pt", "forbidden.pt: archive/data.pkl offset 11: global 'os.system' is not allowed"},
        {"missing_storage.pt", "missing_storage.pt: tensor 'w': storage '0' has no entry 'archive/data/0'"},
        {"small_storage.pt", "offset 161: _rebuild_tensor_v2: tensor [4, 4] with stride [4, 1] at storage offset 0 "
                             "reaches element 15, but storage '0' has 10 elements"},
        {"short_entry.pt", "short_entry.pt: tensor 'w': entry 'archive/data/0' has 40 bytes, but the persistent id "
                           "declares 16 Float elements"},
        {"char_storage.pt", "global"},
        {"char_storage.pt", "storage type 'torch.CharStorage' is not supported"},
        {"duplicate.pt", "duplicate.pt: duplicate tensor name 'a.b'"},
        {"big_endian.pt", "saved on a big-endian machine"},
        {"torchscript.pt", "TorchScript archive"},
        {"legacy.pt", "legacy PyTorch checkpoint format"},
        {"legacy.pt", "torch.save(torch.load(path, weights_only=True), new_path)"},
        {"no_such_file.pt", "no_such_file.pt: cannot open"},
    };
    unlink("/tmp/loom_pwned_test");
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char path[256];
        snprintf(path, sizeof path, DATA "%s", cases[i].file);
        loom_pytorch *ck = (loom_pytorch *)1;
        if (strcmp(cases[i].needle, "global") == 0) {
            /* The global is rejected when the pickle names it, so the
             * offset given is that of the GLOBAL opcode. */
            CHECK_ERROR(loom_pytorch_open(&ck, path), "archive/data.pkl offset 64: storage type");
        } else {
            CHECK_ERROR(loom_pytorch_open(&ck, path), cases[i].needle);
        }
        CHECK(ck == NULL, "%s: a failed open must leave NULL", cases[i].file);
    }
    CHECK(access("/tmp/loom_pwned_test", F_OK) != 0, "os.system ran");
}

/* ------------------------------------------------------------- sniffing */

static void test_format(void) {
    CHECK(loom_checkpoint_format(DATA "basic.pt") == LOOM_CKPT_PYTORCH_ZIP, "basic.pt format");
    CHECK(loom_checkpoint_format(DATA "legacy.pt") == LOOM_CKPT_PYTORCH_LEGACY, "legacy.pt format");
    CHECK(loom_checkpoint_format(DATA "make_checkpoints.py") == LOOM_CKPT_UNKNOWN, "script format");
    CHECK(loom_checkpoint_format(DATA "absent.pt") == LOOM_CKPT_ERROR, "absent file format");
    CHECK(strstr(loom_last_error(), "absent.pt: cannot open") != NULL, "error '%s'", loom_last_error());

    /* safetensors: an 8-byte little-endian header length, then '{'. */
    unsigned char st[32] = {14, 0, 0, 0, 0, 0, 0, 0, '{', '"', 'a', '"', ':', '1', '}'};
    CHECK(loom_checkpoint_format_bytes(st, 15, 22) == LOOM_CKPT_SAFETENSORS, "safetensors bytes");
    CHECK(loom_checkpoint_format_bytes(st, 15, 15) == LOOM_CKPT_UNKNOWN, "header longer than the file");
    CHECK(loom_checkpoint_format_bytes("GGUF\3\0\0\0", 8, 8) == LOOM_CKPT_GGUF, "gguf bytes");
    CHECK(loom_checkpoint_format_bytes("\x80\x02\x8a\x0a", 4, 100) == LOOM_CKPT_PYTORCH_LEGACY, "pickle bytes");
    unsigned char tar[512] = {0};
    memcpy(tar + 257, "ustar", 5);
    CHECK(loom_checkpoint_format_bytes(tar, sizeof tar, 10240) == LOOM_CKPT_PYTORCH_LEGACY, "tar bytes");
    CHECK(loom_checkpoint_format_bytes("", 0, 0) == LOOM_CKPT_UNKNOWN, "empty file");
    CHECK(strcmp(loom_ckpt_format_name(LOOM_CKPT_PYTORCH_ZIP), "pytorch-zip") == 0, "format name");

    loom_pytorch *ck;
    CHECK_ERROR(loom_pytorch_open_memory(&ck, st, 22, "st.bin"), "st.bin: this is a safetensors file");
}

/* ---------------------------------------------------- pickle VM directly */

static int load_bytes(loom_pickle **p, const char *bytes, size_t n) {
    return loom_pickle_load(p, bytes, n, "t.pkl");
}

#define LOAD(p, lit) load_bytes(p, lit, sizeof lit - 1)

static void test_pickle_values(void) {
    /* [-2, 65535, -129 (LONG1), 2**40 (LONG4), 1.5, True, None, 'hé', b'ab',
     *  {1: ()}, (7,), 300 (INT text), -3 (LONG text), frozen set [5]] */
    static const char pk[] = "\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00" /* PROTO 4, FRAME 0 */
                             "](J\xfe\xff\xff\xffM\xff\xff\x8a\x02\x7f\xff"
                             "\x8b\x06\x00\x00\x00\x00\x00\x00\x00\x00\x01"
                             "G\x3f\xf8\x00\x00\x00\x00\x00\x00\x88N"
                             "\x8c\x03h\xc3\xa9" "C\x02" "ab"
                             "}K\x01)sK\x07\x85"
                             "I300\nL-3L\n"
                             "(K\x05\x91"
                             "e.";
    loom_pickle *p;
    CHECK_OK(LOAD(&p, pk));
    if (!p)
        return;
    const loom_pickle_value *r = loom_pickle_root(p);
    CHECK(r->kind == LOOM_PICKLE_LIST, "root kind %d", (int)r->kind);
    CHECK(r->as.seq.count == 14, "root has %zu items", r->as.seq.count);
    if (r->kind == LOOM_PICKLE_LIST && r->as.seq.count == 14) {
        loom_pickle_value *const *it = r->as.seq.items;
        static const struct {
            loom_pickle_kind kind;
            int64_t integer;
        } ints[] = {{LOOM_PICKLE_INT, -2}, {LOOM_PICKLE_INT, 65535}, {LOOM_PICKLE_INT, -129},
                    {LOOM_PICKLE_INT, (int64_t)1 << 40}};
        for (int i = 0; i < 4; i++) {
            CHECK(it[i]->kind == ints[i].kind, "item %d kind %d", i, (int)it[i]->kind);
            CHECK(it[i]->as.integer == ints[i].integer, "item %d = %lld, expected %lld", i,
                  (long long)it[i]->as.integer, (long long)ints[i].integer);
        }
        CHECK(it[4]->kind == LOOM_PICKLE_FLOAT, "BINFLOAT kind %d", (int)it[4]->kind);
        CHECK(it[4]->as.number == 1.5, "BINFLOAT = %g", it[4]->as.number);
        CHECK(it[5]->kind == LOOM_PICKLE_BOOL, "NEWTRUE kind %d", (int)it[5]->kind);
        CHECK(it[5]->as.boolean, "NEWTRUE is false");
        CHECK(it[6]->kind == LOOM_PICKLE_NONE, "NONE kind %d", (int)it[6]->kind);
        CHECK(it[7]->kind == LOOM_PICKLE_STRING, "SHORT_BINUNICODE kind %d", (int)it[7]->kind);
        CHECK(it[7]->as.str.len == 3, "SHORT_BINUNICODE length %zu", it[7]->as.str.len);
        CHECK(memcmp(it[7]->as.str.data, "h\xc3\xa9", 3) == 0, "SHORT_BINUNICODE text");
        CHECK(it[8]->kind == LOOM_PICKLE_BYTES, "SHORT_BINBYTES kind %d", (int)it[8]->kind);
        CHECK(it[8]->as.str.len == 2, "SHORT_BINBYTES length %zu", it[8]->as.str.len);
        CHECK(it[9]->kind == LOOM_PICKLE_DICT, "dict kind %d", (int)it[9]->kind);
        CHECK(it[9]->as.dict.count == 1, "dict has %zu pairs", it[9]->as.dict.count);
        CHECK(it[9]->as.dict.keys[0]->as.integer == 1, "dict key");
        CHECK(it[9]->as.dict.values[0]->kind == LOOM_PICKLE_TUPLE, "dict value kind");
        CHECK(it[10]->kind == LOOM_PICKLE_TUPLE, "TUPLE1 kind %d", (int)it[10]->kind);
        CHECK(it[10]->as.seq.count == 1, "TUPLE1 has %zu items", it[10]->as.seq.count);
        CHECK(it[10]->as.seq.items[0]->as.integer == 7, "TUPLE1 item");
        CHECK(it[11]->as.integer == 300, "INT text = %lld", (long long)it[11]->as.integer);
        CHECK(it[12]->as.integer == -3, "LONG text = %lld", (long long)it[12]->as.integer);
        CHECK(it[13]->kind == LOOM_PICKLE_LIST, "FROZENSET kind %d", (int)it[13]->kind);
        CHECK(it[13]->as.seq.count == 1, "FROZENSET has %zu items", it[13]->as.seq.count);
    }
    loom_pickle_free(p);

    /* A MARK on an empty stack, closed at once (found by fuzzing). */
    CHECK_OK(LOAD(&p, "(\x91."));
    if (p) {
        CHECK(loom_pickle_root(p)->kind == LOOM_PICKLE_LIST, "empty FROZENSET kind");
        CHECK(loom_pickle_root(p)->as.seq.count == 0, "empty FROZENSET count");
    }
    loom_pickle_free(p);

    /* LONG1 with a redundant sign byte: 9 bytes of 0xFF is -1. */
    CHECK_OK(LOAD(&p, "\x8a\x09\xff\xff\xff\xff\xff\xff\xff\xff\xff."));
    if (p)
        CHECK(loom_pickle_root(p)->as.integer == -1, "LONG1 -1 in 9 bytes");
    loom_pickle_free(p);

    /* The memo: MEMOIZE numbers entries in order and BINGET shares them.
     * The stack has list 0, list 1, BINGET 0, BINGET 1, so TUPLE3 makes
     * (list 1, list 0, list 1). */
    CHECK_OK(LOAD(&p, "]\x94]\x94h\x00h\x01\x87."));
    if (p) {
        const loom_pickle_value *t = loom_pickle_root(p);
        CHECK(t->kind == LOOM_PICKLE_TUPLE, "TUPLE3 kind %d", (int)t->kind);
        CHECK(t->as.seq.count == 3, "TUPLE3 has %zu items", t->as.seq.count);
        CHECK(t->as.seq.items[0] != t->as.seq.items[1], "two lists");
        CHECK(t->as.seq.items[2] == t->as.seq.items[0], "BINGET 1 returns the second list");
    }
    loom_pickle_free(p);

    /* list(x) shares items with x, and appending to the copy leaves x alone:
     * the result is (copy + [3], x). */
    CHECK_OK(LOAD(&p, "(c__builtin__\nlist\n](K\x01K\x02" "eq\x00\x85RK\x03" "ah\x00t."));
    if (p) {
        const loom_pickle_value *t = loom_pickle_root(p);
        CHECK(t->as.seq.count == 2, "tuple has %zu items", t->as.seq.count);
        CHECK(t->as.seq.items[0]->as.seq.count == 3, "copy has %zu items", t->as.seq.items[0]->as.seq.count);
        CHECK(t->as.seq.items[1]->as.seq.count == 2, "original has %zu items", t->as.seq.items[1]->as.seq.count);
    }
    loom_pickle_free(p);

    /* _codecs.encode('\u00e9', 'latin1') is protocol 2's bytes b'\xe9'. */
    CHECK_OK(LOAD(&p, "c_codecs\nencode\nX\x02\x00\x00\x00\xc3\xa9X\x06\x00\x00\x00latin1\x86R."));
    if (p) {
        const loom_pickle_value *b = loom_pickle_root(p);
        CHECK(b->kind == LOOM_PICKLE_BYTES, "_codecs.encode kind %d", (int)b->kind);
        CHECK(b->as.str.len == 1, "_codecs.encode length %zu", b->as.str.len);
        CHECK((unsigned char)b->as.str.data[0] == 0xE9, "_codecs.encode byte 0x%02x", (unsigned char)b->as.str.data[0]);
    }
    loom_pickle_free(p);
}

static void test_pickle_errors(void) {
    static const struct {
        const char *bytes;
        size_t len;
        const char *needle;
    } cases[] = {
#define C(lit, needle) {lit, sizeof lit - 1, needle}
        C("\x80\x02\xff", "t.pkl offset 2: invalid opcode 0xff"),
        C("\x80\x06N.", "t.pkl offset 0: unsupported pickle protocol 6"),
        C("\x80\x02h\x05.", "offset 2: memo index 5 is not set"),
        C("\x80\x02Nj\x00\x01\x00\x00.", "memo index 256 is not set"),
        C("Nr\xff\xff\xff\xff.", "offset 1: memo index 4294967295 out of range"),
        C("Ng99\n.", "memo index 99 is not set"),
        C("N", "offset 1: truncated pickle: no STOP opcode"),
        C("", "offset 0: truncated pickle"),
        C(".", "STOP: stack underflow"),
        C("R", "REDUCE: stack underflow"),
        C("N(a", "APPEND: stack underflow"),
        C("N\x85\x85\x86", "TUPLE2: stack underflow"),
        C("Ne", "APPENDS: no MARK"),
        C("K\x01K\x02" "a", "APPEND to a int"),
        C("}(K\x01u", "SETITEMS: odd number of items"),
        C("N)R.", "cannot call a None"),
        C("X\x04\x00\x00\x00" "abcd)R.", "cannot call a str"),
        C("ctorch\nFloatStorage\n)R.", "global 'torch.FloatStorage' cannot be called"),
        C("ctorch.storage\n_load_from_bytes\n", "global 'torch.storage._load_from_bytes' is not allowed"),
        C("cbuiltins\neval\n", "offset 0: global 'builtins.eval' is not allowed"),
        C("\x8c\x08" "builtins\x8c\x04" "exec\x93", "offset 16: global 'builtins.exec' is not allowed"),
        C("K\x01K\x02\x93", "STACK_GLOBAL: module and name must be str"),
        C("c\x01\x02\nx\n", "global '??.x' is not allowed"),
        C("cos\nsystem", "truncated GLOBAL: no newline"),
        C("X\xff\xff\xff\xff", "offset 0: truncated string: length 4294967295 exceeds the 0 bytes that remain"),
        C("\x8d\x00\x00\x00\x00\x00\x00\x00\x40", "truncated string: length 4611686018427387904 exceeds"),
        C("\x8e\xff\xff\xff\xff\xff\xff\xff\xff", "truncated string: length 18446744073709551615 exceeds"),
        C("\x8c\x05" "ab", "truncated string: length 5 exceeds the 2 bytes"),
        C("T\xff\xff\xff\xff", "BINSTRING: negative length"),
        C("\x8b\xff\xff\xff\x7f", "truncated LONG: 2147483647 bytes needed"),
        C("\x8b\xff\xff\xff\xff", "LONG4: negative byte count"),
        C("\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x80\x00.", "integer of 9 bytes does not fit 64 bits"),
        C("I99999999999999999999\n.", "INT: integer does not fit 64 bits"),
        C("Ix\n.", "INT: invalid integer"),
        C("\x95\xff\xff\xff\xff\xff\xff\xff\x7f", "FRAME length 9223372036854775807 exceeds"),
        C("J\x01\x00", "truncated BININT: needs 4 bytes, 2 remain"),
        C("S'a\\nb'\n.", "STRING: escaped strings are not supported"),
        C("\x82\x01", "the extension registry is not supported"),
        C("Pfoo\n.", "PERSID: text persistent ids are not supported"),
        C("X\x01\x00\x00\x00xQ.", "persistent id must be ('storage', storage_type, key, location, numel), got a str"),
        C("(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x00/X\x03\x00\x00\x00" "cpuK\x04tQ.",
          "invalid storage key '/'"),
        C("(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x00" "0X\x03\x00\x00\x00" "cpuJ\xff\xff\xff\xfftQ.",
          "storage numel is negative (-1)"),
    };
#undef C
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        loom_pickle *p = (loom_pickle *)1;
        CHECK_ERROR(loom_pickle_load(&p, cases[i].bytes, cases[i].len, "t.pkl"), cases[i].needle);
        CHECK(p == NULL, "case %zu: a failed load must leave NULL", i);
    }

    /* Limits: nested MARKs and the stack. */
    size_t big = LOOM_PICKLE_MAX_STACK + 2;
    char *bomb = malloc(big);
    memset(bomb, '(', 5000);
    loom_pickle *p;
    CHECK_ERROR(loom_pickle_load(&p, bomb, 5000, "t.pkl"), "offset 1000: more than 1000 nested MARKs");
    memset(bomb, 'N', big);
    CHECK_ERROR(loom_pickle_load(&p, bomb, big, "t.pkl"), "stack holds more than 1000000 values");
    free(bomb);
}

/* A pickle calling _rebuild_tensor_v2 on a storage '0' of 16 floats with
 * the given storage offset, size and stride (pickle opcodes). */
typedef struct bytes_arg {
    const char *p;
    size_t n;
} bytes_arg;
#define B(lit) ((bytes_arg){lit, sizeof lit - 1})

static void check_rebuild_error(bytes_arg size, bytes_arg stride, bytes_arg offset, const char *needle) {
    static const char head[] = "ctorch._utils\n_rebuild_tensor_v2\n(("
                               "X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x00"
                               "0X\x03\x00\x00\x00" "cpuK\x10tQ";
    static const char tail[] = "\x89}tR.";
    char pk[1024];
    size_t n = 0;
    memcpy(pk + n, head, sizeof head - 1), n += sizeof head - 1;
    memcpy(pk + n, offset.p, offset.n), n += offset.n;
    memcpy(pk + n, size.p, size.n), n += size.n;
    memcpy(pk + n, stride.p, stride.n), n += stride.n;
    memcpy(pk + n, tail, sizeof tail - 1), n += sizeof tail - 1;
    loom_pickle *p;
    CHECK_ERROR(loom_pickle_load(&p, pk, n, "t.pkl"), needle);
}

static void test_rebuild_errors(void) {
    check_rebuild_error(B("(K\x01K\x01K\x01K\x01K\x01K\x01K\x01K\x01K\x01t"),
                        B("(K\x01K\x01K\x01K\x01K\x01K\x01K\x01K\x01K\x01t"), B("K\x00"),
                        "size has 9 dimensions, at most 8 are supported");
    check_rebuild_error(B("J\xff\xff\xff\xff\x85"), B("K\x01\x85"), B("K\x00"), "size[0] is negative (-1)");
    check_rebuild_error(B("K\x02\x85"), B("K\x01K\x01\x86"), B("K\x00"), "size has 1 dimensions but stride has 2");
    check_rebuild_error(B("K\x04K\x04\x86"), B("K\x04K\x01\x86"), B("K\x01"),
                        "tensor [4, 4] with stride [4, 1] at storage offset 1 reaches element 16, but storage '0' has "
                        "16 elements");
    check_rebuild_error(B("K\x03\x85"), B("\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x40\x85"), B("K\x00"),
                        "size and stride overflow 64 bits");
    check_rebuild_error(B("\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x20K\x04\x86"), B("K\x00K\x00\x86"), B("K\x00"),
                        "size [2305843009213693952, 4] has more than 2^63 bytes");
    check_rebuild_error(B("K\x00\x85"), B("K\x01\x85"), B("K\x11"), "storage offset 17 is past the end of storage '0'");
    check_rebuild_error(B("X\x01\x00\x00\x00" "a"), B("K\x01\x85"), B("K\x00"), "size must be a tuple, got str");
    check_rebuild_error(B("K\x02\x85"), B("K\x01\x85"), B("N"), "storage_offset must be an int, got None");
    /* A tensor that fits loads: the last element of [4, 4] at offset 0 is 15. */
    static const char ok[] = "ctorch._utils\n_rebuild_tensor_v2\n(("
                             "X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x00"
                             "0X\x03\x00\x00\x00" "cpuK\x10tQK\x00K\x04K\x04\x86K\x04K\x01\x86\x89}tR.";
    loom_pickle *p;
    CHECK_OK(loom_pickle_load(&p, ok, sizeof ok - 1, "t.pkl"));
    if (p) {
        const loom_pickle_value *t = loom_pickle_root(p);
        CHECK(t->kind == LOOM_PICKLE_TENSOR, "kind %d", (int)t->kind);
        CHECK(t->as.tensor.ndim == 2, "ndim %d", t->as.tensor.ndim);
        CHECK(t->as.tensor.shape[1] == 4, "shape[1] %lld", (long long)t->as.tensor.shape[1]);
        CHECK(t->as.tensor.strides[0] == 4, "strides[0] %lld", (long long)t->as.tensor.strides[0]);
        CHECK(t->as.tensor.storage->as.storage.numel == 16, "numel %lld",
              (long long)t->as.tensor.storage->as.storage.numel);
        CHECK(strcmp(t->as.tensor.storage->as.storage.key, "0") == 0, "key '%s'", t->as.tensor.storage->as.storage.key);
        CHECK(t->as.tensor.storage->as.storage.type == LOOM_TORCH_FLOAT, "storage type %d",
              (int)t->as.tensor.storage->as.storage.type);
    }
    loom_pickle_free(p);
}

/* ------------------------------------------ hostile pickles in archives */

/* Wrap a pickle into a checkpoint with one storage "0" of 64 bytes and load
 * it; returns the open status. */
static int open_pickle(loom_pytorch **ck, const char *pkl, size_t n) {
    static const float zeros[16];
    zip_build_entry entries[] = {
        {"archive/data.pkl", pkl, n},
        {"archive/byteorder", "little", 6},
        {"archive/data/0", zeros, sizeof zeros},
    };
    size_t len = 0;
    uint8_t *zip = zip_build(entries, 3, &len);
    int rc = loom_pytorch_open_memory(ck, zip, len, "h.pt");
    loom_pytorch_close(*ck);
    *ck = NULL;
    free(zip);
    return rc;
}

#define PUT(lit) (memcpy(pk + n, lit, sizeof lit - 1), n += sizeof lit - 1)

static void test_hostile_archives(void) {
    loom_pytorch *ck;
    char *pk = malloc(1 << 20);
    size_t n = 0;

    /* 100 nested lists built on the stack. */
    for (int i = 0; i < 100; i++)
        pk[n++] = ']';
    for (int i = 0; i < 99; i++)
        pk[n++] = 'a';
    pk[n++] = '.';
    CHECK_ERROR(open_pickle(&ck, pk, n), "h.pt: '0.0.0.0.0.0.0");
    CHECK_ERROR(open_pickle(&ck, pk, n), "is nested more than 64 levels deep");

    /* 1000 nested lists through the memo, with at most two stack slots:
     * x = []; repeat: x = [x]. */
    n = 0;
    PUT("]q\x00");
    for (int i = 0; i < 1000; i++)
        PUT("0]h\x00" "aq\x00");
    PUT(".");
    CHECK_ERROR(open_pickle(&ck, pk, n), "is nested more than 64 levels deep");

    /* A list that contains itself. */
    n = 0;
    PUT("]q\x00h\x00" "a.");
    CHECK_ERROR(open_pickle(&ck, pk, n), "h.pt: '0' contains itself (pickle offset 0)");

    /* Exponential expansion: d[k] = {'a': d[k-1], 'b': d[k-1]}, 40 levels,
     * 2**40 leaves from a few hundred bytes. With None leaves the visit cap
     * stops it, and with int leaves the cap on name and metadata bytes. */
    for (int leaf = 0; leaf < 2; leaf++) {
        n = 0;
        if (leaf == 0)
            PUT("}q\x00X\x01\x00\x00\x00xNs");
        else
            PUT("}q\x00X\x01\x00\x00\x00xK\x01s");
        for (int k = 1; k <= 40; k++) {
            PUT("0}(X\x01\x00\x00\x00" "ah");
            pk[n++] = (char)(k - 1);
            PUT("X\x01\x00\x00\x00" "bh");
            pk[n++] = (char)(k - 1);
            PUT("uq");
            pk[n++] = (char)k;
        }
        PUT(".");
        CHECK_ERROR(open_pickle(&ck, pk, n), leaf == 0 ? "h.pt: the pickled object expands to more than 4194304 values"
                                                       : "h.pt: names and metadata exceed 64 MiB");
    }

    /* A 5000-byte key. */
    n = 0;
    PUT("}X\x88\x13\x00\x00");
    memset(pk + n, 'k', 5000), n += 5000;
    PUT("K\x01s.");
    CHECK_ERROR(open_pickle(&ck, pk, n), "h.pt: a name starting with 'kkkk");
    CHECK_ERROR(open_pickle(&ck, pk, n), "is longer than 4096 bytes");

    /* Duplicate metadata keys after flattening. */
    n = 0;
    PUT("}(X\x03\x00\x00\x00" "a.bK\x01X\x01\x00\x00\x00" "a}X\x01\x00\x00\x00" "bK\x02su.");
    CHECK_ERROR(open_pickle(&ck, pk, n), "h.pt: duplicate metadata key 'a.b'");

    /* Pickle errors carry the archive's name and the entry. */
    n = 0;
    PUT("\x80\x02\xfe");
    CHECK_ERROR(open_pickle(&ck, pk, n), "h.pt: archive/data.pkl offset 2: invalid opcode 0xfe");

    /* A valid tensor through the same path loads. */
    n = 0;
    PUT("}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n(("
        "X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x00" "0X\x03\x00\x00\x00"
        "cpuK\x10tQK\x04K\x02K\x03\x86K\x03K\x01\x86\x89}tRs.");
    CHECK_OK(open_pickle(&ck, pk, n));
    free(pk);
}

int main(void) {
    loom_log_set_level(LOOM_LOG_WARN);
    test_basic_file();
    test_basic_variants();
    test_deflate();
    test_memory();
    test_corrupt_zip();
    check_nested("nested.pt");
    check_nested("protocol4.pt");
    test_rejected_files();
    test_format();
    test_pickle_values();
    test_pickle_errors();
    test_rebuild_errors();
    test_hostile_archives();
    return check_summary();
}
