/* Tests of core/ops_index.c: embedding lookup, cat, index_select and gather
 * against reference index loops over seeded random shapes, dtypes and
 * layouts, plus the out-variant and the error messages for bad indices and
 * shapes. */
#include "ops_testutil.h"

/* ---- embedding */

static void test_embedding_random(void) {
    rng_seed(51);
    for (int c = 0; c < 120; c++) {
        int64_t vocab = rng_int(1, 40), dim = rng_int(1, 70);
        int64_t wshape[2] = {vocab, dim};
        loom_dtype wd = random_float_dtype();
        layout wl = (layout)rng_int(0, 2); /* contiguous, transposed or narrowed */
        int64_t ishape[LOOM_MAX_DIMS];
        int in = c % 10 == 0 ? 0 : random_shape(ishape, 3, 5);
        loom_dtype id_dtype = c % 2 ? LOOM_I64 : LOOM_I32;
        loom_tensor w = LOOM_TENSOR_EMPTY, ids = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;
        make_input(&w, wd, 2, wshape, wl, -2, 2);
        make_input(&ids, id_dtype, in, ishape, random_layout(), 0, (double)vocab);
        bool preallocated = c % 3 == 0;
        int64_t oshape[LOOM_MAX_DIMS];
        memcpy(oshape, ishape, sizeof(int64_t) * (size_t)in);
        oshape[in] = dim;
        if (preallocated) loom_tensor_init(&out, LOOM_F32, in + 1, oshape);
        CHECK_OK(loom_embedding(&out, &w, &ids));
        char what[1024];
        snprintf(what, sizeof what, "embedding case %d weight %s (%s) ids %s out %s", c,
                 loom_shape_str(&w).s, layout_name(wl), loom_shape_str(&ids).s,
                 preallocated ? "preallocated" : "new");
        if (check_shape(&out, LOOM_F32, in + 1, oshape, what)) {
            bool ok = true;
            int64_t idx[LOOM_MAX_DIMS] = {0};
            do {
                int64_t id = (int64_t)tget(&ids, idx);
                double want = tget(&w, (int64_t[]){id, idx[in]});
                if (tget(&out, idx) != want) ok = false;
            } while (index_next(in + 1, oshape, idx));
            CHECK(ok, "%s: values differ", what);
        }
        loom_tensor_free(&w);
        loom_tensor_free(&ids);
        loom_tensor_free(&out);
    }
}

/* A bf16 table at LLaMA-7B width (4096): 600 ids take the parallel path. */
static void test_embedding_large(void) {
    rng_seed(52);
    int64_t wshape[2] = {3000, 4096}, ishape[2] = {2, 300};
    loom_tensor w = LOOM_TENSOR_EMPTY, ids = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;
    make_input(&w, LOOM_BF16, 2, wshape, LAYOUT_CONTIGUOUS, -1, 1);
    make_input(&ids, LOOM_I64, 2, ishape, LAYOUT_CONTIGUOUS, 0, 3000);
    CHECK_OK(loom_embedding(&out, &w, &ids));
    const float *po = loom_tensor_data(&out);
    const uint16_t *pw = loom_tensor_data(&w);
    const int64_t *pi = loom_tensor_data(&ids);
    bool ok = true;
    for (int64_t t = 0; t < 600; t++)
        for (int64_t j = 0; j < 4096; j++)
            if (po[t * 4096 + j] != loom_bf16_to_f32(pw[pi[t] * 4096 + j])) ok = false;
    CHECK(ok, "large bf16 embedding values differ");
    loom_tensor_free(&w);
    loom_tensor_free(&ids);
    loom_tensor_free(&out);
}

static void test_embedding_errors(void) {
    loom_tensor w = LOOM_TENSOR_EMPTY, ids = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;
    loom_tensor_zeros(&w, LOOM_F32, 2, (int64_t[]){10, 4});
    loom_tensor_zeros(&ids, LOOM_I64, 2, (int64_t[]){2, 3});
    loom_tensor_set(&ids, (int64_t[]){1, 2}, 10);
    CHECK_ERROR(loom_embedding(&out, &w, &ids),
                "embedding: id 10 at position [1, 2] of 'ids' i64[2, 3] is out of range [0, 10) "
                "for 'weight' f32[10, 4]");
    CHECK(out.storage == NULL, "out stays empty after a bad id");

    /* A preallocated out keeps its values when an id is bad. */
    loom_tensor pre = LOOM_TENSOR_EMPTY;
    loom_tensor_init(&pre, LOOM_F32, 3, (int64_t[]){2, 3, 4});
    loom_tensor_fill(&pre, 7);
    loom_tensor_set(&ids, (int64_t[]){1, 2}, 0);
    loom_tensor_set(&ids, (int64_t[]){0, 1}, -1);
    CHECK_ERROR(loom_embedding(&pre, &w, &ids), "id -1 at position [0, 1]");
    CHECK(loom_tensor_get_flat(&pre, 0) == 7, "out unchanged after a bad id: first %g",
          loom_tensor_get_flat(&pre, 0));
    CHECK(loom_tensor_get_flat(&pre, 23) == 7, "out unchanged after a bad id: last %g",
          loom_tensor_get_flat(&pre, 23));
    loom_tensor_free(&pre);

    loom_tensor_zeros(&pre, LOOM_F32, 2, (int64_t[]){6, 4});
    loom_tensor_set(&ids, (int64_t[]){0, 1}, 3);
    CHECK_ERROR(loom_embedding(&pre, &w, &ids), "embedding: 'out' is f32[6, 4], expected f32[2, 3, 4]");
    loom_tensor_free(&pre);

    loom_tensor fids = LOOM_TENSOR_EMPTY;
    loom_tensor_zeros(&fids, LOOM_F32, 1, (int64_t[]){3});
    CHECK_ERROR(loom_embedding(&out, &w, &fids), "embedding: 'ids' must be i32 or i64, got f32[3]");
    CHECK_ERROR(loom_embedding(&out, &fids, &ids), "embedding: 'weight' must be 2-D (V, D), got f32[3]");
    loom_tensor iw = LOOM_TENSOR_EMPTY;
    loom_tensor_zeros(&iw, LOOM_I32, 2, (int64_t[]){10, 4});
    CHECK_ERROR(loom_embedding(&out, &iw, &ids), "embedding: 'weight' must be f32, f16 or bf16");
    loom_tensor_free(&iw);
    loom_tensor_free(&fids);
    loom_tensor_free(&w);
    loom_tensor_free(&ids);
}

/* ---- cat */

static void test_cat_random(void) {
    rng_seed(53);
    for (int c = 0; c < 150; c++) {
        int64_t base[LOOM_MAX_DIMS];
        int n = random_shape(base, 4, 5);
        int dim_arg = (int)rng_int(-n, n - 1);
        int dim = dim_arg < 0 ? dim_arg + n : dim_arg;
        int count = (int)rng_int(1, 4);
        bool mixed = c % 5 == 0;
        loom_dtype common = c % 7 == 0 ? LOOM_I32 : random_float_dtype();
        loom_tensor parts[4];
        const loom_tensor *ptrs[4];
        int64_t total = 0, starts[4];
        for (int i = 0; i < count; i++) {
            int64_t shape[LOOM_MAX_DIMS];
            memcpy(shape, base, sizeof shape);
            shape[dim] = rng_int(0, 4);
            starts[i] = total;
            total += shape[dim];
            parts[i] = LOOM_TENSOR_EMPTY;
            loom_dtype dt = mixed ? random_float_dtype() : common;
            make_input(&parts[i], dt, n, shape, random_layout(), -5, 5);
            ptrs[i] = &parts[i];
        }
        bool same = true;
        for (int i = 1; i < count; i++) same = same && parts[i].dtype == parts[0].dtype;
        loom_dtype want_dtype = same ? parts[0].dtype : LOOM_F32;
        int64_t oshape[LOOM_MAX_DIMS];
        memcpy(oshape, base, sizeof oshape);
        oshape[dim] = total;
        loom_tensor out = LOOM_TENSOR_EMPTY;
        if (c % 4 == 0) loom_tensor_init(&out, want_dtype, n, oshape);
        CHECK_OK(loom_cat(&out, ptrs, count, dim_arg));
        char what[1024];
        snprintf(what, sizeof what, "cat case %d: %d inputs like %s along dim %d", c, count,
                 loom_shape_str(&parts[0]).s, dim_arg);
        if (check_shape(&out, want_dtype, n, oshape, what)) {
            bool ok = true;
            for (int i = 0; i < count; i++) {
                int64_t idx[LOOM_MAX_DIMS] = {0}, oidx[LOOM_MAX_DIMS];
                if (loom_tensor_numel(&parts[i]) == 0) continue;
                do {
                    memcpy(oidx, idx, sizeof oidx);
                    oidx[dim] += starts[i];
                    if (tget(&out, oidx) != tget(&parts[i], idx)) ok = false;
                } while (index_next(n, parts[i].shape, idx));
            }
            CHECK(ok, "%s: values differ", what);
        }
        for (int i = 0; i < count; i++) loom_tensor_free(&parts[i]);
        loom_tensor_free(&out);
    }
}

static void test_cat_errors(void) {
    loom_tensor a = LOOM_TENSOR_EMPTY, b = LOOM_TENSOR_EMPTY, e = LOOM_TENSOR_EMPTY,
                out = LOOM_TENSOR_EMPTY;
    loom_tensor_zeros(&a, LOOM_F32, 2, (int64_t[]){2, 3});
    loom_tensor_zeros(&b, LOOM_F32, 2, (int64_t[]){2, 4});
    const loom_tensor *ab[2] = {&a, &b};
    CHECK_ERROR(loom_cat(&out, ab, 2, 0), "cat: inputs[1] is f32[2, 4], expected f32[2, 3] except in dimension 0");
    CHECK_ERROR(loom_cat(&out, ab, 2, 2), "cat: dim 2 is out of range for a tensor with 2 dimensions");
    CHECK_ERROR(loom_cat(&out, ab, 0, 0), "cat: expected at least 1 input, got 0");
    CHECK_OK(loom_cat(&out, ab, 2, 1));
    check_shape(&out, LOOM_F32, 2, (int64_t[]){2, 7}, "cat along dim 1");
    loom_tensor_free(&out);

    /* A 1-D tensor of size 0 is skipped, as torch.cat does. */
    loom_tensor_zeros(&e, LOOM_F32, 1, (int64_t[]){0});
    const loom_tensor *ea[2] = {&e, &a};
    CHECK_OK(loom_cat(&out, ea, 2, 0));
    check_shape(&out, LOOM_F32, 2, (int64_t[]){2, 3}, "cat skips a legacy empty");
    loom_tensor_free(&out);

    loom_tensor wrong = LOOM_TENSOR_EMPTY;
    loom_tensor_zeros(&wrong, LOOM_F32, 2, (int64_t[]){4, 3});
    const loom_tensor *aa[2] = {&a, &a};
    CHECK_OK(loom_cat(&wrong, aa, 2, 0));
    CHECK_ERROR(loom_cat(&wrong, aa, 2, 1), "cat: 'out' is f32[4, 3], expected f32[2, 6]");
    loom_tensor_free(&wrong);
    loom_tensor_free(&a);
    loom_tensor_free(&b);
    loom_tensor_free(&e);
}

/* ---- index_select */

static void test_index_select_random(void) {
    rng_seed(54);
    for (int c = 0; c < 120; c++) {
        int64_t shape[LOOM_MAX_DIMS];
        int n = random_shape(shape, 4, 6);
        int dim_arg = (int)rng_int(-n, n - 1);
        int dim = dim_arg < 0 ? dim_arg + n : dim_arg;
        loom_dtype dt = c % 4 == 3 ? LOOM_I64 : random_float_dtype();
        layout l = random_layout();
        int64_t count = rng_int(0, 8);
        loom_tensor x = LOOM_TENSOR_EMPTY, index = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;
        make_input(&x, dt, n, shape, l, -5, 5);
        make_input(&index, c % 2 ? LOOM_I32 : LOOM_I64, 1, &count, (layout)rng_int(0, 2), 0,
                   (double)shape[dim]);
        CHECK_OK(loom_index_select(&out, &x, dim_arg, &index));
        int64_t oshape[LOOM_MAX_DIMS];
        memcpy(oshape, shape, sizeof oshape);
        oshape[dim] = count;
        char what[1024];
        snprintf(what, sizeof what, "index_select case %d x %s (%s) dim %d index %s", c,
                 loom_shape_str(&x).s, layout_name(l), dim_arg, loom_shape_str(&index).s);
        if (check_shape(&out, dt, n, oshape, what) && count > 0) {
            bool ok = true;
            int64_t idx[LOOM_MAX_DIMS] = {0}, xidx[LOOM_MAX_DIMS];
            do {
                memcpy(xidx, idx, sizeof xidx);
                xidx[dim] = (int64_t)tget(&index, (int64_t[]){idx[dim]});
                if (tget(&out, idx) != tget(&x, xidx)) ok = false;
            } while (index_next(n, oshape, idx));
            CHECK(ok, "%s: values differ", what);
        }
        loom_tensor_free(&x);
        loom_tensor_free(&index);
        loom_tensor_free(&out);
    }

    loom_tensor x = LOOM_TENSOR_EMPTY, index = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;
    loom_tensor_zeros(&x, LOOM_F32, 2, (int64_t[]){4, 3});
    loom_tensor_arange(&index, LOOM_I64, 2, 6, 1); /* 2, 3, 4, 5 */
    CHECK_ERROR(loom_index_select(&out, &x, 0, &index),
                "index_select: index 4 at position 2 is out of range [0, 4) for dimension 0 of 'x' f32[4, 3]");
    CHECK(out.storage == NULL, "out stays empty after a bad index");
    CHECK_ERROR(loom_index_select(&out, &x, 2, &index), "index_select: dim 2 is out of range");
    loom_tensor_free(&index);
    loom_tensor_zeros(&index, LOOM_I64, 2, (int64_t[]){2, 2});
    CHECK_ERROR(loom_index_select(&out, &x, 0, &index),
                "index_select: 'index' must be a 1-D i32 or i64 tensor, got i64[2, 2]");
    loom_tensor_free(&index);
    loom_tensor_free(&x);
}

/* ---- gather */

static void test_gather_random(void) {
    rng_seed(55);
    for (int c = 0; c < 120; c++) {
        int64_t shape[LOOM_MAX_DIMS], ishape[LOOM_MAX_DIMS];
        int n = random_shape(shape, 4, 6);
        int dim_arg = (int)rng_int(-n, n - 1);
        int dim = dim_arg < 0 ? dim_arg + n : dim_arg;
        for (int d = 0; d < n; d++) ishape[d] = d == dim ? rng_int(1, 8) : rng_int(1, shape[d]);
        loom_dtype dt = c % 4 == 3 ? LOOM_I32 : random_float_dtype();
        layout l = random_layout();
        loom_tensor x = LOOM_TENSOR_EMPTY, index = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;
        make_input(&x, dt, n, shape, l, -5, 5);
        make_input(&index, c % 2 ? LOOM_I32 : LOOM_I64, n, ishape, random_layout(), 0,
                   (double)shape[dim]);
        if (c % 3 == 0) loom_tensor_init(&out, dt, n, ishape);
        CHECK_OK(loom_gather(&out, &x, dim_arg, &index));
        char what[1024];
        snprintf(what, sizeof what, "gather case %d x %s (%s) dim %d index %s", c,
                 loom_shape_str(&x).s, layout_name(l), dim_arg, loom_shape_str(&index).s);
        if (check_shape(&out, dt, n, ishape, what)) {
            bool ok = true;
            int64_t idx[LOOM_MAX_DIMS] = {0}, xidx[LOOM_MAX_DIMS];
            do {
                memcpy(xidx, idx, sizeof xidx);
                xidx[dim] = (int64_t)tget(&index, idx);
                if (tget(&out, idx) != tget(&x, xidx)) ok = false;
            } while (index_next(n, ishape, idx));
            CHECK(ok, "%s: values differ", what);
        }
        loom_tensor_free(&x);
        loom_tensor_free(&index);
        loom_tensor_free(&out);
    }

    loom_tensor x = LOOM_TENSOR_EMPTY, index = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;
    loom_tensor_zeros(&x, LOOM_F32, 2, (int64_t[]){3, 4});
    loom_tensor_zeros(&index, LOOM_I64, 2, (int64_t[]){2, 2});
    loom_tensor_set(&index, (int64_t[]){1, 0}, 4);
    CHECK_ERROR(loom_gather(&out, &x, 1, &index),
                "gather: index 4 at position [1, 0] is out of range [0, 4) for dimension 1 of 'x' f32[3, 4]");
    loom_tensor_free(&index);
    loom_tensor_zeros(&index, LOOM_I64, 2, (int64_t[]){4, 2});
    CHECK_ERROR(loom_gather(&out, &x, 1, &index), "gather: 'index' i64[4, 2] must have the dimensions of 'x' f32[3, 4]");
    loom_tensor_free(&index);
    loom_tensor_zeros(&index, LOOM_F32, 2, (int64_t[]){2, 2});
    CHECK_ERROR(loom_gather(&out, &x, 1, &index), "gather: 'index' must be i32 or i64, got f32[2, 2]");
    CHECK(out.storage == NULL, "out stays empty after errors");
    loom_tensor_free(&index);
    loom_tensor_free(&x);
}

int main(void) {
    test_embedding_random();
    test_embedding_large();
    test_embedding_errors();
    test_cat_random();
    test_cat_errors();
    test_index_select_random();
    test_gather_random();
    return check_summary();
}
