/* Tests of core/safetensors.c. They cover writer round trips of every dtype
 * and of strided views, the byte layout of the safetensors library, and
 * hand-built files (unaligned data, F64, BOOL, gaps). They also cover sharded
 * checkpoints with an index, a table of corrupted files with the text each
 * error must contain, and facts from the README.txt of each case in
 * tests/golden checked against its reference files. */
#include <dirent.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "safetensors.h"

static char tmpdir[] = "/tmp/loom_test_safetensors_XXXXXX";

/* Path of `name` inside the test's temporary directory. */
static const char *tmp(const char *name) {
    static char paths[8][512];
    static int next;
    char *p = paths[next++ % 8];
    snprintf(p, sizeof paths[0], "%s/%s", tmpdir, name);
    return p;
}

static void write_bytes(const char *path, const void *bytes, size_t n) {
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL, "cannot create %s", path);
    if (!f)
        return;
    CHECK(fwrite(bytes, 1, n, f) == n, "short write to %s", path);
    fclose(f);
}

static unsigned char *read_bytes(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    unsigned char *p;
    long len;
    *n = 0;
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    len = ftell(f);
    fseek(f, 0, SEEK_SET);
    p = malloc((size_t)len + 1);
    *n = fread(p, 1, (size_t)len, f);
    fclose(f);
    return p;
}

/* Build a safetensors image by hand: the little-endian length, `header`
 * padded with spaces to a multiple of 8, then `data` (zeros when NULL).
 * Returns the padded header length, so data starts at file offset 8 + it. */
static size_t build_image(unsigned char **out, size_t *out_len, const char *header, const void *data,
                          size_t data_len) {
    size_t hlen = strlen(header), padded = (hlen + 7) / 8 * 8;
    unsigned char *p = calloc(1, 8 + padded + data_len + 1);
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    memcpy(p + 8, header, hlen);
    memset(p + 8 + hlen, ' ', padded - hlen);
    if (data)
        memcpy(p + 8 + padded, data, data_len);
    *out = p;
    *out_len = 8 + padded + data_len;
    return padded;
}

static size_t write_image(const char *path, const char *header, const void *data, size_t data_len) {
    unsigned char *p;
    size_t n, padded = build_image(&p, &n, header, data, data_len);
    write_bytes(path, p, n);
    free(p);
    return padded;
}

/* Check that opening `path` fails and that the message contains every
 * non-NULL needle. */
static void expect_open_error(const char *label, const char *path, const char *n1, const char *n2,
                              const char *n3, const char *n4) {
    loom_checkpoint *ck = (loom_checkpoint *)1;
    int rc = loom_checkpoint_open(&ck, path);
    const char *msg = loom_last_error();
    const char *needles[4] = {n1, n2, n3, n4};
    CHECK(rc == LOOM_ERR, "%s: open should fail (rc %d)", label, rc);
    CHECK(ck == NULL, "%s: *out is NULL after a failure", label);
    for (int i = 0; i < 4; i++)
        if (needles[i])
            CHECK(strstr(msg, needles[i]) != NULL, "%s: expected \"%s\" in \"%s\"", label, needles[i], msg);
    if (rc == LOOM_OK)
        loom_checkpoint_close(ck);
}

static bool bytes_equal(const loom_tensor *a, const loom_tensor *b) {
    return loom_tensor_nbytes(a) == loom_tensor_nbytes(b) &&
           memcmp(loom_tensor_data(a), loom_tensor_data(b), loom_tensor_nbytes(a)) == 0;
}

static bool same_shape(const loom_tensor *t, int ndim, const int64_t *shape) {
    if (!t || t->ndim != ndim)
        return false;
    for (int i = 0; i < ndim; i++)
        if (t->shape[i] != shape[i])
            return false;
    return true;
}

/* ------------------------------------------------------------------------ */

static void test_round_trip_dtypes(void) {
    /* Written widest first, so every tensor stays aligned and loads as a view. */
    static const loom_dtype dtypes[] = {LOOM_I64, LOOM_F32, LOOM_I32, LOOM_F16, LOOM_BF16, LOOM_U8};
    static const char *const stored[] = {"I64", "F32", "I32", "F16", "BF16", "U8"};
    static const char *const names[] = {"t.i64", "t.f32", "t.i32", "t.f16", "t.bf16", "t.u8"};
    loom_tensor t[6];
    const loom_tensor *ptrs[6];
    int64_t shape[2] = {3, 5};
    loom_checkpoint *ck = NULL;
    const char *path = tmp("dtypes.safetensors");

    for (int i = 0; i < 6; i++) {
        t[i] = LOOM_TENSOR_EMPTY;
        CHECK_OK(loom_tensor_init(&t[i], dtypes[i], 2, shape));
        unsigned char *p = loom_tensor_data(&t[i]);
        for (size_t k = 0; k < loom_tensor_nbytes(&t[i]); k++)
            p[k] = (unsigned char)(k * 37 + (size_t)i * 11 + 1);
        ptrs[i] = &t[i];
    }
    CHECK_OK(loom_safetensors_write(path, 6, names, ptrs, 0, NULL, NULL));
    CHECK_OK(loom_checkpoint_open(&ck, path));
    CHECK(loom_checkpoint_count(ck) == 6, "count %d", loom_checkpoint_count(ck));
    CHECK(loom_checkpoint_metadata_count(ck) == 0, "no metadata");
    for (int i = 0; i < 6; i++) {
        const loom_tensor *r = loom_checkpoint_get(ck, names[i]);
        CHECK(r != NULL, "tensor %s present", names[i]);
        if (!r)
            continue;
        CHECK(strcmp(loom_checkpoint_name(ck, i), names[i]) == 0, "order %d: %s", i, loom_checkpoint_name(ck, i));
        CHECK(loom_checkpoint_find(ck, names[i]) == i, "find %s", names[i]);
        CHECK(r->dtype == dtypes[i], "%s dtype %s", names[i], loom_dtype_name(r->dtype));
        CHECK(strcmp(loom_checkpoint_stored_dtype(ck, i), stored[i]) == 0, "%s stored as %s", names[i],
              loom_checkpoint_stored_dtype(ck, i));
        CHECK(same_shape(r, 2, shape), "%s shape %s", names[i], loom_shape_str(r).s);
        CHECK(bytes_equal(r, &t[i]), "%s bytes survive the round trip", names[i]);
        CHECK(r->storage->kind == LOOM_STORAGE_MMAP, "%s is a view of the mapping", names[i]);
        CHECK(strcmp(loom_checkpoint_file(ck, i), path) == 0, "%s file %s", names[i], loom_checkpoint_file(ck, i));
    }
    CHECK(loom_checkpoint_get(ck, "absent") == NULL, "absent name gives NULL");
    CHECK(loom_checkpoint_find(ck, "absent") == -1, "absent name gives -1");
    CHECK(loom_checkpoint_name(ck, 6) == NULL, "name index past the end");
    CHECK(loom_checkpoint_tensor(ck, -1) == NULL, "negative tensor index");

    /* A view taken before close keeps the mapping alive. */
    loom_tensor kept = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_tensor_view_of(&kept, loom_checkpoint_get(ck, "t.f32")));
    loom_checkpoint_close(ck);
    CHECK(bytes_equal(&kept, &t[1]), "view outlives the checkpoint");
    loom_tensor_free(&kept);
    for (int i = 0; i < 6; i++)
        loom_tensor_free(&t[i]);
}

/* The layout the safetensors library writes for one f32 tensor "attn0" of
 * shape [1, 1, 2, 3] with values 0..5, the case of its
 * test_serialization_forced_alignement. The file is the 8-byte length 72,
 * compact JSON with keys dtype, shape, data_offsets, seven spaces of padding,
 * then the floats. */
static void test_reference_layout(void) {
    static const char json[] = "{\"attn0\":{\"dtype\":\"F32\",\"shape\":[1,1,2,3],\"data_offsets\":[0,24]}}";
    const char *path = tmp("layout.safetensors");
    loom_tensor t = LOOM_TENSOR_EMPTY;
    const loom_tensor *ptr = &t;
    const char *name = "attn0";
    unsigned char expected[8 + 72 + 24];
    size_t n;

    CHECK(sizeof json - 1 == 65, "test JSON is 65 bytes");
    memset(expected, 0, sizeof expected);
    expected[0] = 72;
    memcpy(expected + 8, json, 65);
    memset(expected + 8 + 65, ' ', 7);
    for (int i = 0; i < 6; i++) {
        float v = (float)i;
        memcpy(expected + 80 + 4 * i, &v, 4);
    }

    CHECK_OK(loom_tensor_init(&t, LOOM_F32, 4, (int64_t[]){1, 1, 2, 3}));
    for (int i = 0; i < 6; i++)
        ((float *)loom_tensor_data(&t))[i] = (float)i;
    CHECK_OK(loom_safetensors_write(path, 1, &name, &ptr, 0, NULL, NULL));
    unsigned char *bytes = read_bytes(path, &n);
    CHECK(n == sizeof expected, "file is %zu bytes, expected %zu", n, sizeof expected);
    CHECK(bytes && n == sizeof expected && memcmp(bytes, expected, n) == 0, "bytes match the reference layout");
    free(bytes);

    /* The empty file of the same library: "{}" padded to 8 bytes. */
    static const unsigned char empty[] = {8, 0, 0, 0, 0, 0, 0, 0, '{', '}', ' ', ' ', ' ', ' ', ' ', ' '};
    CHECK_OK(loom_safetensors_write(tmp("empty.safetensors"), 0, NULL, NULL, 0, NULL, NULL));
    bytes = read_bytes(tmp("empty.safetensors"), &n);
    CHECK(bytes && n == sizeof empty && memcmp(bytes, empty, n) == 0, "empty file layout");
    free(bytes);
    loom_tensor_free(&t);
}

static void test_strided_writer_input(void) {
    const char *path = tmp("strided.safetensors");
    loom_tensor base = LOOM_TENSOR_EMPTY, tr = LOOM_TENSOR_EMPTY, nar = LOOM_TENSOR_EMPTY;
    loom_tensor row = LOOM_TENSOR_EMPTY, ex = LOOM_TENSOR_EMPTY, h = LOOM_TENSOR_EMPTY, ht = LOOM_TENSOR_EMPTY;
    loom_checkpoint *ck = NULL;
    float *b;

    /* base[i][j] = 10 i + j, shape [3, 4] */
    CHECK_OK(loom_tensor_init(&base, LOOM_F32, 2, (int64_t[]){3, 4}));
    b = loom_tensor_data(&base);
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 4; j++)
            b[i * 4 + j] = (float)(10 * i + j);
    CHECK_OK(loom_tensor_transpose(&tr, &base, 0, 1));   /* [4, 3] */
    CHECK_OK(loom_tensor_narrow(&nar, &base, 1, 1, 2));   /* [3, 2], columns 1..2 */
    CHECK_OK(loom_tensor_narrow(&row, &base, 0, 2, 1));   /* [1, 4], last row */
    CHECK_OK(loom_tensor_expand(&ex, &row, 2, (int64_t[]){3, 4})); /* stride 0 rows */
    /* h[i][j] = i - 2 j as f16, shape [2, 5], then transposed to [5, 2] */
    CHECK_OK(loom_tensor_init(&h, LOOM_F16, 2, (int64_t[]){2, 5}));
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 5; j++)
            ((uint16_t *)loom_tensor_data(&h))[i * 5 + j] = loom_f32_to_f16((float)(i - 2 * j));
    CHECK_OK(loom_tensor_transpose(&ht, &h, 0, 1));
    CHECK(!loom_tensor_is_contiguous(&tr), "transposed input is strided");
    CHECK(!loom_tensor_is_contiguous(&nar), "narrowed input is strided");
    CHECK(!loom_tensor_is_contiguous(&ex), "expanded input is strided");
    CHECK(!loom_tensor_is_contiguous(&ht), "f16 input is strided");

    const char *names[] = {"transposed", "narrowed", "expanded", "f16_transposed"};
    const loom_tensor *ptrs[] = {&tr, &nar, &ex, &ht};
    CHECK_OK(loom_safetensors_write(path, 4, names, ptrs, 0, NULL, NULL));
    CHECK_OK(loom_checkpoint_open(&ck, path));
    if (!ck)
        goto out;

    const loom_tensor *r = loom_checkpoint_get(ck, "transposed");
    CHECK(same_shape(r, 2, (int64_t[]){4, 3}), "transposed shape");
    int ok = 1;
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 3; j++)
            ok &= ((const float *)loom_tensor_data(r))[i * 3 + j] == (float)(10 * j + i);
    CHECK(ok, "transposed values");

    r = loom_checkpoint_get(ck, "narrowed");
    CHECK(same_shape(r, 2, (int64_t[]){3, 2}), "narrowed shape");
    ok = 1;
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 2; j++)
            ok &= ((const float *)loom_tensor_data(r))[i * 2 + j] == (float)(10 * i + j + 1);
    CHECK(ok, "narrowed values");

    r = loom_checkpoint_get(ck, "expanded");
    CHECK(same_shape(r, 2, (int64_t[]){3, 4}), "expanded shape");
    ok = 1;
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 4; j++)
            ok &= ((const float *)loom_tensor_data(r))[i * 4 + j] == (float)(20 + j);
    CHECK(ok, "expanded values");

    r = loom_checkpoint_get(ck, "f16_transposed");
    CHECK(same_shape(r, 2, (int64_t[]){5, 2}), "f16 shape");
    CHECK(r && r->dtype == LOOM_F16, "f16 dtype");
    ok = 1;
    for (int i = 0; i < 5; i++)
        for (int j = 0; j < 2; j++)
            ok &= loom_f16_to_f32(((const uint16_t *)loom_tensor_data(r))[i * 2 + j]) == (float)(j - 2 * i);
    CHECK(ok, "f16 transposed values");
    loom_checkpoint_close(ck);
out:
    loom_tensor_free(&base); loom_tensor_free(&tr); loom_tensor_free(&nar); loom_tensor_free(&row);
    loom_tensor_free(&ex); loom_tensor_free(&h); loom_tensor_free(&ht);
}

static void test_metadata_and_names(void) {
    const char *path = tmp("meta.safetensors");
    const char *keys[] = {"format", "note \"quoted\""};
    const char *values[] = {"pt", "back\\slash, newline\n, tab\t, \x01, caf\xc3\xa9 \xe2\x9c\x93"};
    const char *names[] = {"layer.0/weight", "quote\"and\\slash", "na\xc3\xafve \xe2\x9c\x93", "ctrl\x01\n"};
    loom_tensor t[4];
    const loom_tensor *ptrs[4];
    loom_checkpoint *ck = NULL;

    for (int i = 0; i < 4; i++) {
        t[i] = LOOM_TENSOR_EMPTY;
        CHECK_OK(loom_tensor_init(&t[i], LOOM_I32, 1, (int64_t[]){2}));
        ((int32_t *)loom_tensor_data(&t[i]))[0] = i;
        ((int32_t *)loom_tensor_data(&t[i]))[1] = -i;
        ptrs[i] = &t[i];
    }
    CHECK_OK(loom_safetensors_write(path, 4, names, ptrs, 2, keys, values));
    CHECK_OK(loom_checkpoint_open(&ck, path));
    CHECK(loom_checkpoint_metadata_count(ck) == 2, "metadata count %d", loom_checkpoint_metadata_count(ck));
    for (int i = 0; i < 2; i++) {
        const char *v = loom_checkpoint_metadata_get(ck, keys[i]);
        CHECK(v && strcmp(v, values[i]) == 0, "metadata '%s' = '%s'", keys[i], v ? v : "(null)");
        CHECK(loom_checkpoint_metadata_key(ck, i) && strcmp(loom_checkpoint_metadata_key(ck, i), keys[i]) == 0,
              "metadata key %d in order", i);
    }
    CHECK(loom_checkpoint_metadata_get(ck, "absent") == NULL, "absent metadata key");
    for (int i = 0; i < 4; i++) {
        const loom_tensor *r = loom_checkpoint_get(ck, names[i]);
        CHECK(r && bytes_equal(r, &t[i]), "name %d survives escaping", i);
    }
    loom_checkpoint_close(ck);
    for (int i = 0; i < 4; i++)
        loom_tensor_free(&t[i]);
}

static void test_scalars_and_empty(void) {
    const char *path = tmp("scalars.safetensors");
    loom_tensor s = LOOM_TENSOR_EMPTY, k = LOOM_TENSOR_EMPTY, z1 = LOOM_TENSOR_EMPTY, z2 = LOOM_TENSOR_EMPTY;
    loom_tensor z3 = LOOM_TENSOR_EMPTY;
    loom_checkpoint *ck = NULL;

    int64_t no_dims[1] = {0}; /* a scalar has no dimensions to pass */
    CHECK_OK(loom_tensor_init(&s, LOOM_F32, 0, no_dims));
    *(float *)loom_tensor_data(&s) = 3.25f;
    CHECK_OK(loom_tensor_init(&k, LOOM_I64, 0, no_dims));
    *(int64_t *)loom_tensor_data(&k) = -7;
    CHECK_OK(loom_tensor_init(&z1, LOOM_F32, 2, (int64_t[]){0, 4}));
    CHECK_OK(loom_tensor_init(&z2, LOOM_U8, 2, (int64_t[]){3, 0}));
    CHECK_OK(loom_tensor_init(&z3, LOOM_I64, 1, (int64_t[]){0}));
    const char *names[] = {"zero_rows", "scalar_f32", "zero_cols", "scalar_i64", "zero_last"};
    const loom_tensor *ptrs[] = {&z1, &s, &z2, &k, &z3};
    CHECK_OK(loom_safetensors_write(path, 5, names, ptrs, 0, NULL, NULL));
    CHECK_OK(loom_checkpoint_open(&ck, path));
    if (!ck)
        goto out;

    const loom_tensor *r = loom_checkpoint_get(ck, "scalar_f32");
    CHECK(r && r->ndim == 0, "f32 scalar has shape []");
    CHECK(r && loom_tensor_numel(r) == 1, "f32 scalar has one element");
    CHECK(r && *(const float *)loom_tensor_data(r) == 3.25f, "f32 scalar value");
    r = loom_checkpoint_get(ck, "scalar_i64");
    CHECK(r && r->ndim == 0, "i64 scalar has shape []");
    CHECK(r && *(const int64_t *)loom_tensor_data(r) == -7, "i64 scalar value");
    r = loom_checkpoint_get(ck, "zero_rows");
    CHECK(same_shape(r, 2, (int64_t[]){0, 4}), "[0, 4] tensor");
    r = loom_checkpoint_get(ck, "zero_cols");
    CHECK(same_shape(r, 2, (int64_t[]){3, 0}), "[3, 0] tensor");
    CHECK(r && r->dtype == LOOM_U8, "[3, 0] tensor dtype");
    /* Last in the file, so its offsets equal the end of the data section. */
    r = loom_checkpoint_get(ck, "zero_last");
    CHECK(same_shape(r, 1, (int64_t[]){0}), "[0] tensor at the end of the data");
    loom_checkpoint_close(ck);
out:
    loom_tensor_free(&s); loom_tensor_free(&k);
    loom_tensor_free(&z1); loom_tensor_free(&z2); loom_tensor_free(&z3);
}

static char log_text[4096];
static void capture_log(loom_log_level level, const char *message, void *user_data) {
    (void)level;
    (void)user_data;
    strncat(log_text, message, sizeof log_text - strlen(log_text) - 2);
    strcat(log_text, "\n");
}

/* A U8 tensor of 3 bytes pushes the F32 and I64 tensors after it off their
 * alignment, so they must load as owned copies with the right values. */
static void test_unaligned_data(void) {
    static const char header[] = "{\"a\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[0,3]},"
                                 "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[3,11]},"
                                 "\"c\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[11,19]}}";
    unsigned char data[19] = {7, 8, 9};
    float fv[2] = {1.5f, -2.0f};
    int64_t iv = -5;
    loom_checkpoint *ck = NULL;
    const char *path = tmp("unaligned.safetensors");

    memcpy(data + 3, fv, 8);
    memcpy(data + 11, &iv, 8);
    write_image(path, header, data, sizeof data);

    log_text[0] = '\0';
    loom_log_set(capture_log, NULL);
    loom_log_set_level(LOOM_LOG_DEBUG);
    CHECK_OK(loom_checkpoint_open(&ck, path));
    loom_log_set(NULL, NULL);
    loom_log_set_level(LOOM_LOG_INFO);
    if (!ck)
        return;

    const loom_tensor *a = loom_checkpoint_get(ck, "a"), *b = loom_checkpoint_get(ck, "b");
    const loom_tensor *c = loom_checkpoint_get(ck, "c");
    CHECK(a && a->storage->kind == LOOM_STORAGE_MMAP, "u8 tensor is a view");
    CHECK(a && ((const unsigned char *)loom_tensor_data(a))[2] == 9, "u8 values");
    CHECK(b && b->storage->kind == LOOM_STORAGE_OWNED, "unaligned f32 tensor is copied");
    CHECK(b && ((uintptr_t)loom_tensor_data(b)) % 4 == 0, "copy is aligned");
    CHECK(b && loom_tensor_get_flat(b, 0) == 1.5, "f32 value 0");
    CHECK(b && loom_tensor_get_flat(b, 1) == -2.0, "f32 value 1");
    CHECK(c && c->storage->kind == LOOM_STORAGE_OWNED, "unaligned i64 tensor is copied");
    CHECK(c && loom_tensor_get_flat(c, 0) == -5.0, "i64 value");
    CHECK(strstr(log_text, "tensor 'b'") && strstr(log_text, "not aligned"), "debug line for 'b': %s", log_text);
    loom_checkpoint_close(ck);

    /* The same image parsed from memory at an odd address: every tensor wider
     * than a byte is copied, and the values are the same. */
    unsigned char *image, *shifted;
    size_t n;
    build_image(&image, &n, header, data, sizeof data);
    shifted = malloc(n + 1);
    memcpy(shifted + 1, image, n);
    CHECK_OK(loom_checkpoint_open_memory(&ck, shifted + 1, n, "shifted"));
    if (ck) {
        b = loom_checkpoint_get(ck, "b");
        CHECK(b && loom_tensor_get_flat(b, 1) == -2.0, "f32 value from an odd address");
        CHECK(strcmp(loom_checkpoint_file(ck, 0), "shifted") == 0, "memory image keeps its name");
        loom_checkpoint_close(ck);
    }
    CHECK_ERROR(loom_checkpoint_open_memory(&ck, shifted + 1, 7, "shifted"), "'shifted'");
    free(shifted);
    free(image);
}

static void test_converted_dtypes(void) {
    static const char header[] = "{\"d\":{\"dtype\":\"F64\",\"shape\":[3],\"data_offsets\":[0,24]},"
                                 "\"m\":{\"dtype\":\"BOOL\",\"shape\":[2,2],\"data_offsets\":[24,28]},"
                                 "\"gap\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[32,34]}}";
    double dv[3] = {0.1, -2.5, 1e300};
    unsigned char data[40] = {0};
    loom_checkpoint *ck = NULL;
    const char *path = tmp("converted.safetensors");

    memcpy(data, dv, 24);
    data[24] = 1, data[25] = 0, data[26] = 1, data[27] = 1;
    data[32] = 42;
    write_image(path, header, data, sizeof data);
    CHECK_OK(loom_checkpoint_open(&ck, path));
    if (!ck)
        return;
    const loom_tensor *d = loom_checkpoint_get(ck, "d"), *m = loom_checkpoint_get(ck, "m");
    CHECK(d && d->dtype == LOOM_F32, "F64 loads as f32");
    CHECK(strcmp(loom_checkpoint_stored_dtype(ck, 0), "F64") == 0, "stored dtype F64");
    if (d) {
        const float *dv32 = loom_tensor_data(d);
        CHECK(dv32[0] == (float)0.1, "F64 0.1 rounded to f32: %.9g", dv32[0]);
        CHECK(dv32[1] == -2.5f, "F64 -2.5 to f32: %g", dv32[1]);
        CHECK(isinf(dv32[2]), "F64 1e300 overflows f32 to infinity: %g", dv32[2]);
    }
    CHECK(m && m->dtype == LOOM_U8, "BOOL loads as u8");
    CHECK(same_shape(m, 2, (int64_t[]){2, 2}), "BOOL shape [2, 2]");
    CHECK(strcmp(loom_checkpoint_stored_dtype(ck, 1), "BOOL") == 0, "stored dtype BOOL");
    CHECK(m && loom_tensor_get_flat(m, 0) == 1, "BOOL value 0");
    CHECK(m && loom_tensor_get_flat(m, 1) == 0, "BOOL value 1");
    /* Gaps between tensors and after the last are accepted. */
    const loom_tensor *g = loom_checkpoint_get(ck, "gap");
    CHECK(g && loom_tensor_get_flat(g, 0) == 42, "tensor after a gap");
    loom_checkpoint_close(ck);
}

/* ------------------------------------------------------------------------
 * corrupted files */

typedef struct corrupt_case {
    const char *file;   /* file name, which the message must contain */
    const char *header; /* JSON header as written */
    size_t data_len;    /* zero bytes after the header */
    const char *needle; /* the message's text about the problem */
    const char *tensor; /* tensor the message must name, or NULL */
    long data_offset;   /* >= 0: the message must give the data's file offset, data start + this */
} corrupt_case;

#define F32_4(begin, end) "{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[" #begin "," #end "]}"

static const corrupt_case corrupt_cases[] = {
    {"bad_json.safetensors", "{\"a\": {\"dtype\": \"F32\", ", 0, "is not valid JSON", NULL, -1},
    {"empty_header.safetensors", "", 0, "is not valid JSON", NULL, -1},
    {"array_header.safetensors", "[1, 2, 3]", 0, "header must be a JSON object, got [1,2,3]", NULL, -1},
    {"trailing.safetensors", "{} x", 0, "unexpected byte 0x78 after the header JSON at file offset 11", NULL, -1},
    {"offsets_past_end.safetensors", "{\"a\":" F32_4(0, 16) ",\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[16,32]}}",
     24, "data_offsets [16, 32] end past the data section (expected end <= 24", "b", -1},
    {"begin_after_end.safetensors", "{\"w\":" F32_4(16, 0) "}", 16, "data_offsets [16, 0] have begin > end", "w", -1},
    {"offsets_fraction.safetensors", "{\"w\":" F32_4(0, 15.5) "}", 16,
     "'data_offsets' must be two non-negative integers [begin, end], got [0,15.5]", "w", -1},
    {"offsets_negative.safetensors", "{\"w\":" F32_4(-16, 0) "}", 16, "two non-negative integers", "w", -1},
    {"offsets_three.safetensors", "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,8,16]}}", 16,
     "two non-negative integers", "w", -1},
    {"offsets_strings.safetensors", "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[\"0\",\"16\"]}}", 16,
     "two non-negative integers", "w", -1},
    {"overlap.safetensors", "{\"a\":" F32_4(0, 16) ",\"b\":" F32_4(8, 24) "}", 24,
     "data_offsets [8, 24] overlap tensor 'a' at [0, 16]", "b", 8},
    {"overlap_inside.safetensors", "{\"big\":{\"dtype\":\"U8\",\"shape\":[32],\"data_offsets\":[0,32]},\"c\":" F32_4(20, 36)
     ",\"d\":" F32_4(4, 20) "}", 40, "overlap tensor 'big' at [0, 32]", "d", 4},
    {"huge_shape.safetensors", "{\"w\":{\"dtype\":\"U8\",\"shape\":[4294967296,4294967296,4294967296],\"data_offsets\":[0,0]}}",
     0, "has more elements than a size_t can count", "w", 0},
    {"huge_bytes.safetensors", "{\"w\":{\"dtype\":\"F32\",\"shape\":[4503599627370496,2048],\"data_offsets\":[0,0]}}",
     0, "of 4-byte elements is larger than a size_t can count", "w", 0},
    {"too_many_dims.safetensors", "{\"w\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}", 8,
     "has 9 dimensions, more than the 8 Loom supports", "w", 0},
    {"negative_dim.safetensors", "{\"w\":{\"dtype\":\"U8\",\"shape\":[2,-1],\"data_offsets\":[0,0]}}", 8,
     "'shape' must be an array of non-negative integers, got [2,-1]", "w", 0},
    {"fraction_dim.safetensors", "{\"w\":{\"dtype\":\"U8\",\"shape\":[2.5],\"data_offsets\":[0,0]}}", 8,
     "non-negative integers, got [2.5]", "w", 0},
    {"shape_number.safetensors", "{\"w\":{\"dtype\":\"U8\",\"shape\":4,\"data_offsets\":[0,4]}}", 8,
     "'shape' must be an array", "w", 0},
    {"unknown_dtype.safetensors", "{\"q\":{\"dtype\":\"Q4_K\",\"shape\":[4],\"data_offsets\":[0,4]}}", 8,
     "unknown dtype 'Q4_K' (supported: F32, F16, BF16", "q", 0},
    {"i16_dtype.safetensors", "{\"q\":{\"dtype\":\"I16\",\"shape\":[4],\"data_offsets\":[0,8]}}", 8,
     "dtype 'I16' is not supported by Loom", "q", 0},
    {"dtype_number.safetensors", "{\"q\":{\"dtype\":4,\"shape\":[4],\"data_offsets\":[0,4]}}", 8,
     "'dtype' must be a string, got 4", "q", 0},
    {"byte_count.safetensors", "{\"x\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[4,24]}}", 24,
     "dtype F32 with shape [2, 3] needs 24 bytes, but data_offsets [4, 24] span 20", "x", 4},
    {"duplicate.safetensors", "{\"a\":" F32_4(0, 16) ",\"a\":" F32_4(16, 32) "}", 32,
     "duplicate tensor name (also defined at file offset", "a", 16},
    {"missing_dtype.safetensors", "{\"w\":{\"shape\":[4],\"data_offsets\":[0,16]}}", 16, "missing 'dtype'", "w", 0},
    {"missing_shape.safetensors", "{\"w\":{\"dtype\":\"F32\",\"data_offsets\":[0,16]}}", 16, "missing 'shape'", "w", 0},
    {"missing_offsets.safetensors", "{\"w\":{\"dtype\":\"F32\",\"shape\":[4]}}", 16, "missing 'data_offsets'", "w", -1},
    {"entry_number.safetensors", "{\"w\":5}", 0, "expected an object with dtype, shape and data_offsets, got 5", "w", -1},
    {"metadata_array.safetensors", "{\"__metadata__\":[1]}", 0, "'__metadata__' must be an object of strings", NULL, -1},
    {"metadata_number.safetensors", "{\"__metadata__\":{\"k\":1}}", 0, "'__metadata__' entry 'k' must be a string, got 1",
     NULL, -1},
    {"metadata_twice.safetensors", "{\"__metadata__\":{},\"__metadata__\":{}}", 0, "more than one '__metadata__'", NULL, -1},
};

static void test_corrupted_headers(void) {
    for (size_t i = 0; i < sizeof corrupt_cases / sizeof corrupt_cases[0]; i++) {
        const corrupt_case *c = &corrupt_cases[i];
        char file_needle[600], tensor_needle[64], offset_needle[64];
        const char *path = tmp(c->file);
        size_t padded = write_image(path, c->header, NULL, c->data_len);
        snprintf(file_needle, sizeof file_needle, "'%s'", path);
        snprintf(tensor_needle, sizeof tensor_needle, "tensor '%s'", c->tensor ? c->tensor : "");
        if (c->data_offset >= 0) {
            snprintf(offset_needle, sizeof offset_needle, "data at file offset %zu",
                     8 + padded + (size_t)c->data_offset);
        } else if (c->tensor) {
            /* Errors found before the offsets are known point at the key. */
            char key[64];
            snprintf(key, sizeof key, "\"%s\"", c->tensor);
            const char *at = strstr(c->header, key);
            if (at)
                snprintf(offset_needle, sizeof offset_needle, "header entry at file offset %zu",
                         (size_t)(8 + (at - c->header)));
            else
                offset_needle[0] = '\0';
        } else {
            offset_needle[0] = '\0';
        }
        expect_open_error(c->file, path, file_needle, c->needle, c->tensor ? tensor_needle : NULL,
                          offset_needle[0] ? offset_needle : NULL);
    }
}

static void test_corrupted_bytes(void) {
    char file_needle[600];
    const char *path;

    static const unsigned char five[5] = {1, 2, 3, 4, 5};
    path = tmp("five_bytes.safetensors");
    write_bytes(path, five, 5);
    snprintf(file_needle, sizeof file_needle, "'%s'", path);
    expect_open_error("5-byte file", path, file_needle, "file is 5 bytes, too short for the 8-byte header length", NULL,
                      NULL);

    path = tmp("zero_bytes.safetensors");
    write_bytes(path, five, 0);
    expect_open_error("empty file", path, "file is 0 bytes", NULL, NULL, NULL);

    /* Header length 1000 in a 24-byte file. */
    unsigned char small[24] = {0xe8, 0x03, 0, 0, 0, 0, 0, 0, '{', '}'};
    path = tmp("length_past_end.safetensors");
    write_bytes(path, small, sizeof small);
    expect_open_error("header length past the end", path, "header length 1000 at file offset 0 runs past the end",
                      "expected at most 16 for a 24-byte file", NULL, NULL);

    unsigned char absurd[16] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    path = tmp("length_absurd.safetensors");
    write_bytes(path, absurd, sizeof absurd);
    expect_open_error("absurd header length", path, "header length 18446744073709551615 at file offset 0",
                      "exceeds the limit of 100000000 bytes", NULL, NULL);
    /* One past the limit, in a file that is not that large. */
    unsigned char over[16] = {0x01, 0xe1, 0xf5, 0x05}; /* 100000001 */
    path = tmp("length_over_limit.safetensors");
    write_bytes(path, over, sizeof over);
    expect_open_error("header length over the limit", path, "header length 100000001", "exceeds the limit", NULL,
                      NULL);

    /* Invalid UTF-8 inside a tensor name: a lone 0xff, an overlong '/', an
     * encoded UTF-16 surrogate. */
    static const char *const bad_names[] = {"w\xff", "w\xc0\xaf", "w\xed\xa0\x80"};
    static const unsigned bad_bytes[] = {0xff, 0xc0, 0xed};
    for (int i = 0; i < 3; i++) {
        char header[128], needle[96];
        snprintf(header, sizeof header, "{\"%s\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", bad_names[i]);
        path = tmp("bad_utf8.safetensors");
        write_image(path, header, NULL, 8);
        snprintf(needle, sizeof needle, "header is not valid UTF-8 (byte 0x%02x at file offset 11)", bad_bytes[i]);
        expect_open_error("invalid UTF-8", path, needle, NULL, NULL, NULL);
    }
}

/* Truncate a valid file at several points. Each cut must give the error of
 * the first field that no longer fits. */
static void test_truncated_files(void) {
    const char *path = tmp("whole.safetensors"), *cut = tmp("cut.safetensors");
    loom_tensor a = LOOM_TENSOR_EMPTY, b = LOOM_TENSOR_EMPTY, c = LOOM_TENSOR_EMPTY;
    size_t n, header_len = 0;
    unsigned char *bytes;

    CHECK_OK(loom_tensor_zeros(&a, LOOM_F32, 1, (int64_t[]){4}));
    CHECK_OK(loom_tensor_zeros(&b, LOOM_I64, 1, (int64_t[]){3}));
    CHECK_OK(loom_tensor_zeros(&c, LOOM_U8, 1, (int64_t[]){5}));
    const char *names[] = {"a", "b", "c"};
    const loom_tensor *ptrs[] = {&a, &b, &c};
    CHECK_OK(loom_safetensors_write(path, 3, names, ptrs, 0, NULL, NULL));
    bytes = read_bytes(path, &n);
    if (!bytes)
        goto out;
    for (int i = 7; i >= 0; i--)
        header_len = header_len << 8 | bytes[i];
    size_t data_start = 8 + header_len;
    CHECK(n == data_start + 16 + 24 + 5, "file size %zu", n);

    struct {
        size_t length;
        const char *needle, *tensor;
    } cuts[] = {
        {0, "file is 0 bytes", NULL},
        {4, "file is 4 bytes", NULL},
        {7, "file is 7 bytes", NULL},
        {8, "runs past the end of the file (expected at most 0", NULL},
        {8 + header_len / 2, "runs past the end of the file", NULL},
        {data_start, "data_offsets [0, 16] end past the data section (expected end <= 0", "a"},
        {data_start + 20, "data_offsets [16, 40] end past the data section (expected end <= 20", "b"},
        {n - 1, "data_offsets [40, 45] end past the data section (expected end <= 44", "c"},
    };
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
        char label[64], tensor[32], sizes[128];
        write_bytes(cut, bytes, cuts[i].length);
        snprintf(label, sizeof label, "cut at %zu", cuts[i].length);
        snprintf(tensor, sizeof tensor, "tensor '%s'", cuts[i].tensor ? cuts[i].tensor : "");
        expect_open_error(label, cut, "cut.safetensors", cuts[i].needle, cuts[i].tensor ? tensor : NULL, NULL);
        if (!cuts[i].tensor)
            continue;
        /* Once the header is whole, the message leads with the sizes: the
         * three tensors describe 16 + 24 + 5 = 45 bytes of data. */
        snprintf(sizes, sizeof sizes, "cut.safetensors': file is %zu bytes but its header describes 45 bytes of data "
                 "(a %zu-byte file): the file is truncated at tensor", cuts[i].length, data_start + 45);
        expect_open_error(label, cut, sizes, NULL, NULL, NULL);
    }
    free(bytes);
out:
    loom_tensor_free(&a); loom_tensor_free(&b); loom_tensor_free(&c);
}

/* ------------------------------------------------------------------------
 * sharded checkpoints and directories */

static void write_text(const char *path, const char *text) { write_bytes(path, text, strlen(text)); }

static void test_sharded(void) {
    char dir[512], s1[600], s2[600], index[600];
    loom_tensor a = LOOM_TENSOR_EMPTY, b = LOOM_TENSOR_EMPTY, c = LOOM_TENSOR_EMPTY;
    loom_checkpoint *ck = NULL;

    snprintf(dir, sizeof dir, "%s/sharded", tmpdir);
    mkdir(dir, 0777);
    snprintf(s1, sizeof s1, "%s/model-00001-of-00002.safetensors", dir);
    snprintf(s2, sizeof s2, "%s/model-00002-of-00002.safetensors", dir);
    snprintf(index, sizeof index, "%s/model.safetensors.index.json", dir);

    CHECK_OK(loom_tensor_arange(&a, LOOM_F32, 0, 6, 1));
    CHECK_OK(loom_tensor_arange(&b, LOOM_I64, 10, 13, 1));
    CHECK_OK(loom_tensor_arange(&c, LOOM_BF16, -2, 2, 1));
    {
        const char *n1[] = {"model.a", "model.b"}, *n2[] = {"lm_head.c"};
        const loom_tensor *p1[] = {&a, &b}, *p2[] = {&c};
        const char *k1[] = {"format", "shard"}, *v1[] = {"pt", "1"};
        const char *k2[] = {"shard", "extra"}, *v2[] = {"2", "x"};
        CHECK_OK(loom_safetensors_write(s1, 2, n1, p1, 2, k1, v1));
        CHECK_OK(loom_safetensors_write(s2, 1, n2, p2, 2, k2, v2));
    }
    write_text(index, "{\"metadata\": {\"total_size\": 44},\n \"weight_map\": {\n"
                      "  \"lm_head.c\": \"model-00002-of-00002.safetensors\",\n"
                      "  \"model.a\": \"model-00001-of-00002.safetensors\",\n"
                      "  \"model.b\": \"model-00001-of-00002.safetensors\"}}\n");

    for (int way = 0; way < 3; way++) {
        /* by the index path, by the directory, by the directory with a slash */
        char path[600];
        if (way == 0)
            snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
        else if (way == 1)
            snprintf(path, sizeof path, "%s", dir);
        else
            snprintf(path, sizeof path, "%s/", dir);
        ck = NULL;
        CHECK_OK(loom_checkpoint_open(&ck, path));
        if (!ck)
            continue;
        CHECK(loom_checkpoint_count(ck) == 3, "three tensors from two shards");
        /* The index names shard 2 first, so its tensor comes first. */
        CHECK(strcmp(loom_checkpoint_name(ck, 0), "lm_head.c") == 0, "shard order: %s", loom_checkpoint_name(ck, 0));
        CHECK(strcmp(loom_checkpoint_file(ck, loom_checkpoint_find(ck, "model.b")), s1) == 0, "model.b from shard 1");
        CHECK(strcmp(loom_checkpoint_file(ck, loom_checkpoint_find(ck, "lm_head.c")), s2) == 0,
              "lm_head.c from shard 2");
        CHECK(bytes_equal(loom_checkpoint_get(ck, "model.a"), &a), "model.a values");
        CHECK(bytes_equal(loom_checkpoint_get(ck, "model.b"), &b), "model.b values");
        CHECK(bytes_equal(loom_checkpoint_get(ck, "lm_head.c"), &c), "lm_head.c values");
        CHECK(loom_checkpoint_metadata_count(ck) == 3, "merged metadata has 3 keys");
        CHECK(strcmp(loom_checkpoint_metadata_get(ck, "shard"), "2") == 0, "first shard opened sets 'shard'");
        CHECK(strcmp(loom_checkpoint_metadata_get(ck, "format"), "pt") == 0, "metadata of shard 1");
        loom_checkpoint_close(ck);
    }

    /* A directory holding model.safetensors opens that file. */
    char single_dir[512], single[600];
    snprintf(single_dir, sizeof single_dir, "%s/single", tmpdir);
    mkdir(single_dir, 0777);
    snprintf(single, sizeof single, "%s/model.safetensors", single_dir);
    {
        const char *n[] = {"only"};
        const loom_tensor *p[] = {&b};
        CHECK_OK(loom_safetensors_write(single, 1, n, p, 0, NULL, NULL));
    }
    CHECK_OK(loom_checkpoint_open(&ck, single_dir));
    CHECK(ck && loom_checkpoint_count(ck) == 1, "directory with model.safetensors has one tensor");
    CHECK(ck && strcmp(loom_checkpoint_file(ck, 0), single) == 0, "directory opens model.safetensors");
    loom_checkpoint_close(ck);

    /* Broken indexes. */
    struct {
        const char *name, *text, *needle1, *needle2;
    } bad[] = {
        {"missing_shard.index.json", "{\"weight_map\": {\"model.a\": \"nowhere.safetensors\"}}",
         "cannot open shard 'nowhere.safetensors'", "nowhere.safetensors: cannot open: No such file"},
        {"absent_tensor.index.json",
         "{\"weight_map\": {\"model.a\": \"model-00001-of-00002.safetensors\", \"model.z\": "
         "\"model-00001-of-00002.safetensors\"}}",
         "tensor 'model.z' listed in weight_map is missing from shard", "model-00001-of-00002.safetensors'"},
        {"wrong_shard.index.json",
         "{\"weight_map\": {\"model.a\": \"model-00002-of-00002.safetensors\", \"model.b\": "
         "\"model-00001-of-00002.safetensors\"}}",
         "tensor 'model.a' is listed in weight_map under shard", "but is in shard"},
        {"escape.index.json", "{\"weight_map\": {\"model.a\": \"../model.safetensors\"}}",
         "weight_map names shard '../model.safetensors' for tensor 'model.a'", "relative path inside"},
        {"absolute.index.json", "{\"weight_map\": {\"model.a\": \"/etc/passwd\"}}", "names shard '/etc/passwd'", NULL},
        {"no_map.index.json", "{\"metadata\": {}}", "index has no 'weight_map' object", NULL},
        {"not_json.index.json", "{\"weight_map\": {", "index is not valid JSON", NULL},
        {"number_shard.index.json", "{\"weight_map\": {\"model.a\": 3}}",
         "weight_map entry for tensor 'model.a' must be a shard file name, got 3", NULL},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char path[600], file_needle[640];
        snprintf(path, sizeof path, "%s/%s", dir, bad[i].name);
        write_text(path, bad[i].text);
        snprintf(file_needle, sizeof file_needle, "'%s'", path);
        expect_open_error(bad[i].name, path, file_needle, bad[i].needle1, bad[i].needle2, NULL);
    }

    /* The same tensor in two shards, and a corrupted shard. */
    char dup_path[600], dup_index[600], broken[600], broken_index[600];
    snprintf(dup_path, sizeof dup_path, "%s/dup.safetensors", dir);
    {
        const char *n[] = {"model.a"};
        const loom_tensor *p[] = {&a};
        CHECK_OK(loom_safetensors_write(dup_path, 1, n, p, 0, NULL, NULL));
    }
    snprintf(dup_index, sizeof dup_index, "%s/dup.index.json", dir);
    write_text(dup_index, "{\"weight_map\": {\"model.a\": \"model-00001-of-00002.safetensors\", "
                          "\"model.b\": \"dup.safetensors\"}}");
    expect_open_error("tensor in two shards", dup_index, "tensor 'model.a'", "also present in shard", s1, NULL);

    snprintf(broken, sizeof broken, "%s/broken.safetensors", dir);
    write_image(broken, "{\"model.q\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", NULL, 8);
    snprintf(broken_index, sizeof broken_index, "%s/broken.index.json", dir);
    write_text(broken_index, "{\"weight_map\": {\"model.q\": \"broken.safetensors\"}}");
    expect_open_error("corrupted shard", broken_index, broken, "tensor 'model.q'", "end past the data section", NULL);

    /* Directories without a checkpoint, and paths that do not exist. */
    char empty_dir[512];
    snprintf(empty_dir, sizeof empty_dir, "%s/empty", tmpdir);
    mkdir(empty_dir, 0777);
    expect_open_error("empty directory", empty_dir, empty_dir,
                      "directory has neither model.safetensors nor model.safetensors.index.json", NULL, NULL);
    expect_open_error("missing file", tmp("nope.safetensors"), "nope.safetensors'",
                      "cannot open checkpoint: No such file or directory", NULL, NULL);

    loom_tensor_free(&a); loom_tensor_free(&b); loom_tensor_free(&c);
}

/* ------------------------------------------------------------------------
 * writer errors */

static int count_directory_entries(const char *dir) {
    DIR *d = opendir(dir);
    struct dirent *e;
    int n = 0;
    if (!d)
        return -1;
    while ((e = readdir(d)) != NULL)
        n += e->d_name[0] != '.';
    closedir(d);
    return n;
}

static void test_writer_errors(void) {
    char dir[512], path[600];
    loom_tensor t = LOOM_TENSOR_EMPTY, bad = LOOM_TENSOR_EMPTY;
    size_t before_len, after_len;

    snprintf(dir, sizeof dir, "%s/writer", tmpdir);
    mkdir(dir, 0777);
    snprintf(path, sizeof path, "%s/out.safetensors", dir);
    CHECK_OK(loom_tensor_arange(&t, LOOM_F32, 0, 4, 1));
    {
        const char *n[] = {"keep"};
        const loom_tensor *p[] = {&t};
        CHECK_OK(loom_safetensors_write(path, 1, n, p, 0, NULL, NULL));
    }
    unsigned char *before = read_bytes(path, &before_len);

    const char *dup_names[] = {"w", "v", "w"};
    const loom_tensor *three[] = {&t, &t, &t};
    CHECK_ERROR(loom_safetensors_write(path, 3, dup_names, three, 0, NULL, NULL), "duplicate tensor name 'w'");
    CHECK(strstr(loom_last_error(), path) != NULL, "error names the path: %s", loom_last_error());

    const char *reserved[] = {"__metadata__"};
    CHECK_ERROR(loom_safetensors_write(path, 1, reserved, three, 0, NULL, NULL),
                "'__metadata__' cannot be a tensor name");
    const char *bad_utf8[] = {"w\xff"};
    CHECK_ERROR(loom_safetensors_write(path, 1, bad_utf8, three, 0, NULL, NULL), "name of tensor 0 is not valid UTF-8");
    const char *mk[] = {"k"}, *mv[] = {"\xc3"};
    const char *one[] = {"w"};
    CHECK_ERROR(loom_safetensors_write(path, 1, one, three, 1, mk, mv), "metadata entry 'k' is not valid UTF-8");

    /* A tensor of 4 elements with no storage, after a valid one: nothing is
     * written and the old file stays. */
    bad.dtype = LOOM_F32;
    bad.ndim = 1;
    bad.shape[0] = 4;
    bad.strides[0] = 1;
    const char *two_names[] = {"good", "bad"};
    const loom_tensor *two[] = {&t, &bad};
    CHECK_ERROR(loom_safetensors_write(path, 2, two_names, two, 0, NULL, NULL), "tensor 'bad' f32[4] has no storage");
    unsigned char *after = read_bytes(path, &after_len);
    CHECK(before && after && before_len == after_len && memcmp(before, after, after_len) == 0,
          "failed write leaves the old file");
    CHECK(count_directory_entries(dir) == 1, "no temporary file left behind (%d entries)",
          count_directory_entries(dir));
    free(before);
    free(after);

    char missing[600];
    snprintf(missing, sizeof missing, "%s/no/such/dir/x.safetensors", tmpdir);
    CHECK_ERROR(loom_safetensors_write(missing, 1, one, three, 0, NULL, NULL), "cannot create temporary file");
    CHECK(strstr(loom_last_error(), missing) != NULL, "error names the path: %s", loom_last_error());
    loom_tensor_free(&t);
}

/* ------------------------------------------------------------------------
 * reference files */

static int64_t flat_i64(const loom_tensor *t, int64_t i) { return (int64_t)loom_tensor_get_flat(t, i); }

/* Check values of an integer tensor against a list from a README. */
static void check_ids(const char *label, const loom_tensor *t, const int64_t *ids, int n) {
    int ok;
    CHECK(t != NULL, "%s present", label);
    if (!t)
        return;
    CHECK(loom_tensor_numel(t) == n, "%s has %d values, got %lld", label, n, (long long)loom_tensor_numel(t));
    ok = loom_tensor_numel(t) == n;
    for (int i = 0; ok && i < n; i++)
        ok = flat_i64(t, i) == ids[i];
    CHECK(ok, "%s values match the README", label);
}

static void check_shape(loom_checkpoint *ck, const char *name, loom_dtype dtype, int ndim, const int64_t *shape) {
    const loom_tensor *t = loom_checkpoint_get(ck, name);
    CHECK(t && t->dtype == dtype, "'%s' expected dtype %s, got %s", name, loom_dtype_name(dtype),
          t ? loom_dtype_name(t->dtype) : "nothing");
    CHECK(same_shape(t, ndim, shape), "'%s' expected shape %s, got %s", name, loom_dims_str(ndim, shape).s,
          t ? loom_shape_str(t).s : "nothing");
}

/* The safetensors library packs tensors back to back from offset 0, so the
 * tensors of a file it wrote cover its data section exactly. Each tensor is
 * a view of the mapping with aligned data, or an owned copy. */
static void check_reference_file(const char *path, loom_checkpoint **out) {
    loom_checkpoint *ck = NULL;
    unsigned char length[8];
    uint64_t header_len = 0;
    size_t total = 0;
    struct stat st;
    FILE *f;

    *out = NULL;
    CHECK_OK(loom_checkpoint_open(&ck, path));
    if (!ck || loom_checkpoint_count(ck) == 0)
        return;
    /* For a directory, the file that was opened inside it. */
    path = loom_checkpoint_file(ck, 0);
    f = fopen(path, "rb");
    CHECK(f && fread(length, 1, 8, f) == 8, "read the header length of %s", path);
    CHECK(stat(path, &st) == 0, "stat %s", path);
    if (f)
        fclose(f);
    for (int i = 7; i >= 0; i--)
        header_len = header_len << 8 | length[i];
    int placed = 0;
    for (int i = 0; i < loom_checkpoint_count(ck); i++) {
        const loom_tensor *t = loom_checkpoint_tensor(ck, i);
        total += loom_tensor_nbytes(t);
        if (t->storage->kind == LOOM_STORAGE_MMAP)
            placed += (uintptr_t)loom_tensor_data(t) % loom_dtype_size(t->dtype) == 0;
        else
            placed += t->storage->kind == LOOM_STORAGE_OWNED;
    }
    CHECK(8 + header_len + total == (uint64_t)st.st_size, "%s: tensors cover the data section", path);
    CHECK(placed == loom_checkpoint_count(ck), "%s: %d of %d tensors are aligned views or copies", path, placed,
          loom_checkpoint_count(ck));
    *out = ck;
}

static void test_reference_files(void) {
    loom_checkpoint *ck;
    const char *golden = "tests/golden";
    char path[512];

    /* llava/README.txt */
    snprintf(path, sizeof path, "%s/llava/inputs.safetensors", golden);
    check_reference_file(path, &ck);
    if (ck) {
        check_shape(ck, "pixel_values", LOOM_F32, 4, (int64_t[]){1, 3, 56, 56});
        check_ids("llava input_ids", loom_checkpoint_get(ck, "input_ids"),
                  (int64_t[]){1, 45, 78, 9, 256, 120, 33, 200, 17, 99}, 10);
        check_ids("llava attention_mask", loom_checkpoint_get(ck, "attention_mask"),
                  (int64_t[]){1, 1, 1, 1, 1, 1, 1, 1, 1, 1}, 10);
        check_shape(ck, "resized_cropped_u8_chw", LOOM_U8, 3, (int64_t[]){3, 56, 56});
        loom_checkpoint_close(ck);
    }
    snprintf(path, sizeof path, "%s/llava/outputs.safetensors", golden);
    check_reference_file(path, &ck);
    if (ck) {
        check_shape(ck, "vision.selected_features", LOOM_F32, 3, (int64_t[]){1, 16, 48});
        check_shape(ck, "projector.output", LOOM_F32, 3, (int64_t[]){1, 16, 64});
        check_shape(ck, "lm.inputs_embeds_merged", LOOM_F32, 3, (int64_t[]){1, 25, 64});
        check_shape(ck, "logits", LOOM_F32, 3, (int64_t[]){1, 25, 260});
        check_shape(ck, "generate.step_logits", LOOM_F32, 2, (int64_t[]){12, 260});
        /* The 10 prompt ids, then the 12 new tokens. */
        check_ids("llava generate.sequences", loom_checkpoint_get(ck, "generate.sequences"),
                  (int64_t[]){1, 45, 78, 9, 256, 120, 33, 200, 17, 99, 88, 104, 29, 33, 152, 194, 180, 236, 236, 104,
                              180, 247},
                  22);
        int64_t positions[25];
        for (int i = 0; i < 25; i++)
            positions[i] = i;
        check_ids("llava lm.position_ids", loom_checkpoint_get(ck, "lm.position_ids"), positions, 25);
        loom_checkpoint_close(ck);
    }
    snprintf(path, sizeof path, "%s/llava", golden); /* the directory: model.safetensors */
    check_reference_file(path, &ck);
    if (ck) {
        /* Shapes that follow from the config: vision width 48, text width 64,
         * vocabulary 260, 14x14 patches of a 56x56 image (16 + 1 positions). */
        check_shape(ck, "multi_modal_projector.linear_1.weight", LOOM_F32, 2, (int64_t[]){64, 48});
        check_shape(ck, "multi_modal_projector.linear_2.weight", LOOM_F32, 2, (int64_t[]){64, 64});
        check_shape(ck, "language_model.lm_head.weight", LOOM_F32, 2, (int64_t[]){260, 64});
        check_shape(ck, "language_model.model.embed_tokens.weight", LOOM_F32, 2, (int64_t[]){260, 64});
        check_shape(ck, "vision_tower.vision_model.embeddings.patch_embedding.weight", LOOM_F32, 4,
                    (int64_t[]){48, 3, 14, 14});
        check_shape(ck, "vision_tower.vision_model.embeddings.position_embedding.weight", LOOM_F32, 2,
                    (int64_t[]){17, 48});
        int all_f32 = 1;
        for (int i = 0; i < loom_checkpoint_count(ck); i++)
            all_f32 &= strcmp(loom_checkpoint_stored_dtype(ck, i), "F32") == 0;
        CHECK(all_f32, "llava model.safetensors is all F32");
        loom_checkpoint_close(ck);
    }

    /* blip2/README.txt */
    snprintf(path, sizeof path, "%s/blip2/inputs.safetensors", golden);
    check_reference_file(path, &ck);
    if (ck) {
        check_shape(ck, "pixel_values", LOOM_F32, 4, (int64_t[]){1, 3, 56, 56});
        check_ids("blip2 input_ids", loom_checkpoint_get(ck, "input_ids"), (int64_t[]){2, 31, 7, 150, 88, 19, 240}, 7);
        loom_checkpoint_close(ck);
    }
    snprintf(path, sizeof path, "%s/blip2/outputs.safetensors", golden);
    check_reference_file(path, &ck);
    if (ck) {
        check_shape(ck, "qformer.last_hidden_state", LOOM_F32, 3, (int64_t[]){1, 8, 48});
        check_shape(ck, "language_projection.output", LOOM_F32, 3, (int64_t[]){1, 8, 56});
        check_shape(ck, "logits", LOOM_F32, 3, (int64_t[]){1, 15, 260});
        check_ids("blip2 generate.sequences", loom_checkpoint_get(ck, "generate.sequences"),
                  (int64_t[]){2, 74, 31, 31, 31, 31, 31, 174, 174, 174, 174, 174, 174}, 13);
        /* This file was written with tensors in name order, which puts the I64
         * beam3_lm.sequences at data offset 108, not a multiple of 8: the copy
         * path for unaligned data, on a real file. */
        check_ids("blip2 beam3_lm.sequences", loom_checkpoint_get(ck, "beam3_lm.sequences"),
                  (int64_t[]){74, 173, 31, 31, 31, 31, 174, 174, 174, 174, 174, 174,
                              74, 31, 93, 31, 31, 31, 174, 174, 174, 174, 174, 174,
                              74, 173, 31, 31, 31, 31, 174, 174, 174, 174, 174, 166},
                  36);
        const loom_tensor *scores = loom_checkpoint_get(ck, "beam3_lm.sequences_scores");
        CHECK(scores && loom_tensor_numel(scores) == 3, "blip2 beam3_lm.sequences_scores has 3 values");
        CHECK(scores && loom_tensor_get_flat(scores, 0) == (float)-3.5091240406036377,
              "blip2 beam 0 score matches the README");
        CHECK(scores && loom_tensor_get_flat(scores, 2) == (float)-3.5628774166107178,
              "blip2 beam 2 score matches the README");
        loom_checkpoint_close(ck);
    }

    /* idefics/README.txt */
    snprintf(path, sizeof path, "%s/idefics/inputs.safetensors", golden);
    check_reference_file(path, &ck);
    if (ck) {
        check_shape(ck, "pixel_values", LOOM_F32, 5, (int64_t[]){1, 2, 3, 56, 56});
        check_shape(ck, "image_attention_mask", LOOM_I64, 3, (int64_t[]){1, 14, 2});
        check_ids("idefics input_ids", loom_checkpoint_get(ck, "input_ids"),
                  (int64_t[]){1, 200, 201, 200, 23, 57, 88, 140, 200, 201, 200, 64, 99, 130}, 14);
        loom_checkpoint_close(ck);
    }
    snprintf(path, sizeof path, "%s/idefics/outputs.safetensors", golden);
    check_reference_file(path, &ck);
    if (ck) {
        check_shape(ck, "perceiver.output", LOOM_F32, 3, (int64_t[]){2, 8, 48});
        check_shape(ck, "image_hidden_states", LOOM_F32, 4, (int64_t[]){1, 2, 8, 48});
        check_shape(ck, "logits", LOOM_F32, 3, (int64_t[]){1, 14, 202});
        const loom_tensor *gate = loom_checkpoint_get(ck, "cross_attention_gate");
        CHECK(gate && loom_tensor_numel(gate) == 14, "idefics cross_attention_gate has 14 values");
        int ok = gate && loom_tensor_numel(gate) == 14;
        for (int i = 0; ok && i < 14; i++)
            ok = loom_tensor_get_flat(gate, i) == (i < 2 ? 0.0 : 1.0);
        CHECK(ok, "idefics cross_attention_gate is [0, 0, 1, ...]");
        loom_checkpoint_close(ck);
    }
    snprintf(path, sizeof path, "%s/idefics/model.safetensors", golden);
    check_reference_file(path, &ck);
    loom_checkpoint_close(ck);
    snprintf(path, sizeof path, "%s/idefics_qknorm/model.safetensors", golden);
    check_reference_file(path, &ck);
    loom_checkpoint_close(ck);

    /* openflamingo/README.txt */
    snprintf(path, sizeof path, "%s/openflamingo/inputs.safetensors", golden);
    check_reference_file(path, &ck);
    if (ck) {
        check_shape(ck, "vision_x", LOOM_F32, 6, (int64_t[]){1, 2, 1, 3, 56, 56});
        check_shape(ck, "resized_cropped_u8_chw", LOOM_U8, 4, (int64_t[]){2, 3, 56, 56});
        check_ids("openflamingo lang_x", loom_checkpoint_get(ck, "lang_x"),
                  (int64_t[]){298, 45, 67, 89, 12, 297, 298, 33, 150, 7, 210}, 11);
        loom_checkpoint_close(ck);
    }
    snprintf(path, sizeof path, "%s/openflamingo/outputs.safetensors", golden);
    check_reference_file(path, &ck);
    if (ck) {
        check_shape(ck, "vision.tokens", LOOM_F32, 3, (int64_t[]){2, 16, 48});
        check_shape(ck, "perceiver.output", LOOM_F32, 4, (int64_t[]){1, 2, 64, 48});
        check_shape(ck, "logits", LOOM_F32, 3, (int64_t[]){1, 11, 300});
        check_ids("openflamingo text_time", loom_checkpoint_get(ck, "text_time"),
                  (int64_t[]){1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2}, 11);
        loom_checkpoint_close(ck);
    }
    snprintf(path, sizeof path, "%s/openflamingo/model.safetensors", golden);
    check_reference_file(path, &ck);
    loom_checkpoint_close(ck);

    /* clip_preprocess/README.txt: u8 and f32 [3, S, S] per image; clip_336
     * keeps f32 values only for chelsea_portrait and tiny_20x13. */
    static const char *const stems[] = {"chelsea_portrait", "rocket", "camera_gray", "coffee_rgba", "tiny_20x13"};
    snprintf(path, sizeof path, "%s/clip_preprocess/clip_224/pixel_values.safetensors", golden);
    check_reference_file(path, &ck);
    if (ck) {
        CHECK(loom_checkpoint_count(ck) == 10, "clip_224 holds 10 tensors");
        for (int i = 0; i < 5; i++) {
            char name[64];
            snprintf(name, sizeof name, "%s.u8_chw", stems[i]);
            check_shape(ck, name, LOOM_U8, 3, (int64_t[]){3, 224, 224});
            snprintf(name, sizeof name, "%s.pixel_values", stems[i]);
            check_shape(ck, name, LOOM_F32, 3, (int64_t[]){3, 224, 224});
        }
        loom_checkpoint_close(ck);
    }
    snprintf(path, sizeof path, "%s/clip_preprocess/clip_336/pixel_values.safetensors", golden);
    check_reference_file(path, &ck);
    if (ck) {
        CHECK(loom_checkpoint_count(ck) == 7, "clip_336 holds 7 tensors");
        check_shape(ck, "tiny_20x13.pixel_values", LOOM_F32, 3, (int64_t[]){3, 336, 336});
        check_shape(ck, "rocket.u8_chw", LOOM_U8, 3, (int64_t[]){3, 336, 336});
        CHECK(loom_checkpoint_get(ck, "rocket.pixel_values") == NULL, "clip_336 has no rocket.pixel_values");
        loom_checkpoint_close(ck);
    }
}

/* ------------------------------------------------------------------------ */

static void remove_tree(const char *dir) {
    DIR *d = opendir(dir);
    struct dirent *e;
    char path[1024];
    struct stat st;
    if (!d)
        return;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        if (lstat(path, &st) == 0 && S_ISDIR(st.st_mode))
            remove_tree(path);
        else
            unlink(path);
    }
    closedir(d);
    rmdir(dir);
}

int main(void) {
    if (!mkdtemp(tmpdir)) {
        fprintf(stderr, "cannot create a temporary directory\n");
        return 1;
    }
    test_round_trip_dtypes();
    test_reference_layout();
    test_strided_writer_input();
    test_metadata_and_names();
    test_scalars_and_empty();
    test_unaligned_data();
    test_converted_dtypes();
    test_corrupted_headers();
    test_corrupted_bytes();
    test_truncated_files();
    test_sharded();
    test_writer_errors();
    test_reference_files();
    remove_tree(tmpdir);
    return check_summary();
}
