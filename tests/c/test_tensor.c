/* Tests of core/tensor.c: dtype conversions against IEEE bit patterns,
 * views against index arithmetic done by hand, copies over strided views,
 * storages of every kind and the errors of each view function. */
#include <stdlib.h>
#include <unistd.h>

#include "check.h"
#include "tensor.h"

static void test_half_conversions(void) {
    /* Bit patterns from the IEEE 754 binary16 and bfloat16 definitions. */
    static const struct { uint16_t bits; float value; } f16[] = {
        {0x3c00, 1.0f}, {0xc000, -2.0f}, {0x7bff, 65504.0f}, {0x0001, 5.9604644775390625e-08f},
        {0x0400, 6.103515625e-05f}, {0x3555, 0.333251953125f}, {0x0000, 0.0f}, {0x7c00, INFINITY},
    };
    for (size_t i = 0; i < sizeof f16 / sizeof *f16; i++) {
        CHECK(loom_f16_to_f32(f16[i].bits) == f16[i].value, "f16 0x%04x -> %g", f16[i].bits,
              loom_f16_to_f32(f16[i].bits));
        CHECK(loom_f32_to_f16(f16[i].value) == f16[i].bits, "f32 %g -> f16 0x%04x", f16[i].value,
              loom_f32_to_f16(f16[i].value));
    }
    /* 1 + 2^-11 is halfway between 1 and the next f16: ties go to even (1.0). */
    CHECK(loom_f32_to_f16(1.0f + 0x1.0p-11f) == 0x3c00, "tie rounds to even");
    CHECK(loom_f32_to_f16(1.0f + 0x1.8p-11f) == 0x3c01, "above tie rounds up");
    CHECK(loom_f32_to_f16(70000.0f) == 0x7c00, "overflow gives infinity");
    uint16_t nan16 = loom_f32_to_f16(NAN);
    CHECK((nan16 & 0x7c00) == 0x7c00 && (nan16 & 0x3ff) != 0, "NaN stays NaN: 0x%04x", nan16);

    CHECK(loom_f32_to_bf16(1.0f) == 0x3f80, "bf16 1.0");
    CHECK(loom_bf16_to_f32(0xc040) == -3.0f, "bf16 -3.0");
    /* 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7. */
    CHECK(loom_f32_to_bf16(1.0f + 0x1.0p-8f) == 0x3f80, "bf16 tie to even");
    CHECK(loom_f32_to_bf16(1.0f + 0x1.8p-8f) == 0x3f81, "bf16 above tie");
    uint16_t nanb = loom_f32_to_bf16(NAN);
    CHECK((nanb & 0x7f80) == 0x7f80 && (nanb & 0x7f) != 0, "bf16 NaN stays NaN: 0x%04x", nanb);
}

/* Fill a contiguous f32 tensor with 0, 1, 2, ... */
static void iota(loom_tensor *t) {
    float *p = loom_tensor_data(t);
    for (int64_t i = 0; i < loom_tensor_numel(t); i++)
        p[i] = (float)i;
}

static void test_views(void) {
    loom_tensor t = {0}, v = {0}, w = {0};
    int64_t shape[3] = {2, 3, 4};
    CHECK_OK(loom_tensor_init(&t, LOOM_F32, 3, shape));
    iota(&t);
    CHECK(loom_tensor_is_contiguous(&t), "new tensor contiguous");

    /* narrow(1, 1, 2): element [i][j][k] = i*12 + (j+1)*4 + k */
    CHECK_OK(loom_tensor_narrow(&v, &t, 1, 1, 2));
    int ok = 1;
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++)
            for (int k = 0; k < 4; k++)
                ok &= loom_tensor_get(&v, (int64_t[]){i, j, k}) == i * 12 + (j + 1) * 4 + k;
    CHECK(ok, "narrow values");
    CHECK(!loom_tensor_is_contiguous(&v), "narrowed middle dim not contiguous");

    /* transpose(0, 2) then get [k][j][i] */
    CHECK_OK(loom_tensor_transpose(&w, &t, 0, 2));
    ok = w.shape[0] == 4 && w.shape[2] == 2;
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 3; j++)
            for (int k = 0; k < 4; k++)
                ok &= loom_tensor_get(&w, (int64_t[]){k, j, i}) == i * 12 + j * 4 + k;
    CHECK(ok, "transpose values");

    /* permute (2, 0, 1) */
    loom_tensor p = {0};
    CHECK_OK(loom_tensor_permute(&p, &t, (int[]){2, 0, 1}));
    ok = p.shape[0] == 4 && p.shape[1] == 2 && p.shape[2] == 3;
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 3; j++)
            for (int k = 0; k < 4; k++)
                ok &= loom_tensor_get(&p, (int64_t[]){k, i, j}) == i * 12 + j * 4 + k;
    CHECK(ok, "permute values");
    CHECK_ERROR(loom_tensor_permute(&p, &t, (int[]){0, 0, 1}), "repeated");

    /* select(-1, 3) -> [i][j] = i*12 + j*4 + 3 */
    loom_tensor s = {0};
    CHECK_OK(loom_tensor_select(&s, &t, -1, 3));
    CHECK(s.ndim == 2 && loom_tensor_get(&s, (int64_t[]){1, 2}) == 12 + 8 + 3, "select values");
    CHECK_ERROR(loom_tensor_select(&s, &t, 0, 2), "index 2 out of range");

    /* view of a contiguous tensor, with -1 */
    loom_tensor r = {0};
    CHECK_OK(loom_tensor_view(&r, &t, 2, (int64_t[]){-1, 4}));
    CHECK(r.shape[0] == 6 && loom_tensor_get(&r, (int64_t[]){5, 3}) == 23, "view values");
    CHECK_ERROR(loom_tensor_view(&r, &t, 2, (int64_t[]){5, 5}), "invalid for f32[2, 3, 4]");

    /* a transposed tensor cannot be flattened as a view; reshape copies */
    loom_tensor flat = {0};
    CHECK_ERROR(loom_tensor_view(&flat, &w, 1, (int64_t[]){24}), "reshape");
    CHECK_OK(loom_tensor_reshape(&flat, &w, 1, (int64_t[]){24}));
    ok = 1;
    for (int k = 0; k < 4; k++)
        for (int j = 0; j < 3; j++)
            for (int i = 0; i < 2; i++)
                ok &= loom_tensor_get(&flat, (int64_t[]){k * 6 + j * 2 + i}) == i * 12 + j * 4 + k;
    CHECK(ok, "reshape of transposed copies in the right order");
    CHECK(flat.storage != t.storage, "reshape of a transposed tensor owns new storage");

    /* a narrowed last dim still views as [2, 3, 2] -> [6, 2] without copying */
    loom_tensor nl = {0}, nv = {0};
    CHECK_OK(loom_tensor_narrow(&nl, &t, 2, 1, 2));
    CHECK_OK(loom_tensor_view(&nv, &nl, 2, (int64_t[]){6, 2}));
    CHECK(nv.storage == t.storage && loom_tensor_get(&nv, (int64_t[]){4, 1}) == 4 * 4 + 2,
          "view of narrowed last dim");

    /* expand and unsqueeze */
    loom_tensor col = {0}, e = {0};
    CHECK_OK(loom_tensor_select(&col, &t, 0, 1));   /* [3, 4] */
    CHECK_OK(loom_tensor_unsqueeze(&col, &col, 0)); /* [1, 3, 4] */
    CHECK_OK(loom_tensor_expand(&e, &col, 4, (int64_t[]){2, 5, -1, 4}));
    CHECK(e.ndim == 4 && e.strides[0] == 0 && e.strides[1] == 0 &&
              loom_tensor_get(&e, (int64_t[]){1, 4, 2, 3}) == 12 + 8 + 3,
          "expand values");
    CHECK_ERROR(loom_tensor_expand(&e, &t, 3, (int64_t[]){2, 5, 4}), "cannot expand");

    loom_tensor sq = {0};
    CHECK_OK(loom_tensor_squeeze(&sq, &col, INT32_MIN));
    CHECK(sq.ndim == 2 && sq.shape[0] == 3, "squeeze all");
    CHECK_ERROR(loom_tensor_narrow(&v, &t, 1, 2, 2), "out of bounds");
    CHECK_ERROR(loom_tensor_transpose(&v, &t, 0, 3), "out of range");

    /* views keep the storage alive after the base is freed */
    loom_tensor_free(&t);
    CHECK(loom_tensor_get(&v, (int64_t[]){1, 1, 3}) == 12 + 8 + 3, "view outlives base");

    loom_tensor_free(&v);
    loom_tensor_free(&w);
    loom_tensor_free(&p);
    loom_tensor_free(&s);
    loom_tensor_free(&r);
    loom_tensor_free(&flat);
    loom_tensor_free(&nl);
    loom_tensor_free(&nv);
    loom_tensor_free(&col);
    loom_tensor_free(&e);
    loom_tensor_free(&sq);
}

static void test_copies(void) {
    loom_tensor a = {0}, b = {0}, c = {0}, h = {0};
    CHECK_OK(loom_tensor_init(&a, LOOM_F32, 2, (int64_t[]){3, 5}));
    iota(&a);
    /* transposed copy into bf16, then back */
    CHECK_OK(loom_tensor_transpose(&b, &a, 0, 1));
    CHECK_OK(loom_tensor_to(&h, &b, LOOM_BF16));
    CHECK(h.shape[0] == 5 && loom_tensor_is_contiguous(&h), "to gives contiguous");
    int ok = 1;
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 5; j++)
            ok &= loom_tensor_get(&h, (int64_t[]){j, i}) == i * 5 + j; /* small ints are exact */
    CHECK(ok, "transposed to bf16 values");

    /* broadcast copy of a row into a strided destination */
    loom_tensor row = {0}, dst = {0};
    CHECK_OK(loom_tensor_arange(&row, LOOM_I64, 10, 13, 1)); /* [10, 11, 12] */
    CHECK_OK(loom_tensor_zeros(&c, LOOM_F32, 2, (int64_t[]){4, 3}));
    CHECK_OK(loom_tensor_narrow(&dst, &c, 0, 1, 2));
    CHECK_OK(loom_tensor_copy_into(&dst, &row));
    ok = 1;
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 3; j++)
            ok &= loom_tensor_get(&c, (int64_t[]){i, j}) == ((i == 1 || i == 2) ? 10 + j : 0);
    CHECK(ok, "broadcast copy into narrowed rows");
    CHECK_ERROR(loom_tensor_copy_into(&c, &a), "cannot broadcast");

    /* float to integer truncates toward zero */
    loom_tensor f = {0}, n = {0};
    CHECK_OK(loom_tensor_init(&f, LOOM_F32, 1, (int64_t[]){4}));
    float *fp = loom_tensor_data(&f);
    fp[0] = 2.7f; fp[1] = -2.7f; fp[2] = 0.5f; fp[3] = 255.0f;
    CHECK_OK(loom_tensor_to(&n, &f, LOOM_I32));
    int32_t *np = loom_tensor_data(&n);
    CHECK(np[0] == 2 && np[1] == -2 && np[2] == 0 && np[3] == 255, "f32 -> i32 truncation");

    CHECK_OK(loom_tensor_fill(&dst, 7));
    CHECK(loom_tensor_get(&c, (int64_t[]){2, 2}) == 7 && loom_tensor_get(&c, (int64_t[]){3, 0}) == 0,
          "fill only the view");

    loom_tensor_free(&a); loom_tensor_free(&b); loom_tensor_free(&c); loom_tensor_free(&h);
    loom_tensor_free(&row); loom_tensor_free(&dst); loom_tensor_free(&f); loom_tensor_free(&n);
}

static void count_release(void *ctx) { (*(int *)ctx)++; }

static void test_storage_kinds(void) {
    char path[] = "/tmp/loom_test_tensor_XXXXXX";
    int fd = mkstemp(path);
    float values[4] = {1.5f, -2.0f, 3.25f, 8.0f};
    CHECK(fd >= 0 && write(fd, values, sizeof values) == (ssize_t)sizeof values, "temp file");
    close(fd);
    loom_storage *s = loom_storage_map_file(path);
    CHECK(s != NULL && s->kind == LOOM_STORAGE_MMAP && s->readonly && s->nbytes == 16, "mapped");
    loom_tensor t = {0};
    CHECK_OK(loom_tensor_from_storage(&t, s, 4, LOOM_F32, 1, (int64_t[]){3}));
    loom_storage_release(s); /* the tensor keeps the mapping alive */
    CHECK(loom_tensor_get(&t, (int64_t[]){2}) == 8.0f, "mapped values");
    CHECK_ERROR(loom_tensor_fill(&t, 0), "read-only");
    CHECK_ERROR(loom_tensor_from_storage(&t, t.storage, 8, LOOM_F32, 1, (int64_t[]){3}), "does not fit");
    loom_tensor_free(&t);
    unlink(path);
    CHECK(loom_storage_map_file("/nonexistent/loom") == NULL &&
              strstr(loom_last_error(), "/nonexistent/loom") != NULL,
          "missing file names the path: %s", loom_last_error());

    int released = 0;
    float local[2] = {4, 5};
    loom_storage *b = loom_storage_borrow(local, sizeof local, false, count_release, &released);
    loom_tensor bt = {0};
    CHECK_OK(loom_tensor_from_storage(&bt, b, 0, LOOM_F32, 1, (int64_t[]){2}));
    loom_storage_release(b);
    CHECK(released == 0 && loom_tensor_get(&bt, (int64_t[]){1}) == 5, "borrowed kept by the tensor");
    loom_tensor_free(&bt);
    CHECK(released == 1, "borrowed release callback ran once");

    size_t before = loom_owned_bytes();
    loom_tensor big = {0};
    CHECK_OK(loom_tensor_init(&big, LOOM_F32, 1, (int64_t[]){1000}));
    CHECK(loom_owned_bytes() == before + 4000, "owned bytes counted");
    loom_tensor_free(&big);
    CHECK(loom_owned_bytes() == before, "owned bytes released");
    CHECK_ERROR(loom_tensor_init(&big, LOOM_F32, 2, (int64_t[]){INT64_MAX / 2, 4}), "too many elements");
}

static void test_shape_text(void) {
    loom_tensor t = {0};
    CHECK_OK(loom_tensor_init(&t, LOOM_BF16, 4, (int64_t[]){2, 3, 224, 224}));
    CHECK(strcmp(loom_shape_str(&t).s, "bf16[2, 3, 224, 224]") == 0, "shape text %s", loom_shape_str(&t).s);
    int64_t many[LOOM_MAX_DIMS];
    for (int i = 0; i < LOOM_MAX_DIMS; i++)
        many[i] = INT64_MAX - i;
    loom_shape_text s = loom_dims_str(LOOM_MAX_DIMS, many);
    size_t n = strlen(s.s);
    CHECK(n < sizeof s.s && strcmp(s.s + n - 4, "...]") == 0, "long shape truncated visibly: %s", s.s);
    loom_tensor_free(&t);
}

int main(void) {
    test_half_conversions();
    test_views();
    test_copies();
    test_storage_kinds();
    test_shape_text();
    return check_summary();
}
