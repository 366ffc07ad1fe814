/* Tests of loom_attention, the KV cache, loom_rope and loom_alibi against
 * double-precision loops written here: grouped-query heads, causal
 * attention with an offset (one query against a cache), additive and u8
 * masks, fully masked rows, strided views, a bf16 KV cache (rounding on
 * append, attention equal to attention over the widened values), and the
 * error messages. */
#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "check.h"
#include "ops.h"
#include "ops_linear_internal.h"

static uint64_t rng_state = 0x2545f4914f6cdd1dull;

static uint64_t rng_next(void) {
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static int64_t rng_int(int64_t lo, int64_t hi) {
    return lo + (int64_t)(rng_next() % (uint64_t)(hi - lo + 1));
}

static loom_tensor random_tensor(loom_dtype dtype, int ndim, const int64_t *shape) {
    loom_tensor f = LOOM_TENSOR_EMPTY, t = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_tensor_init(&f, LOOM_F32, ndim, shape));
    CHECK_OK(loom_tensor_randn(&f, rng_next(), 0.0, 1.0));
    if (dtype == LOOM_F32) return f;
    CHECK_OK(loom_tensor_to(&t, &f, dtype));
    loom_tensor_free(&f);
    return t;
}

/* A (B, H, T, D) tensor laid out as (B, T, H, D) and transposed, as the
 * heads of a projection output are. */
static loom_tensor random_bthd(loom_dtype dtype, int64_t b, int64_t h, int64_t t, int64_t d) {
    int64_t shape[4] = {b, t, h, d};
    loom_tensor x = random_tensor(dtype, 4, shape);
    CHECK_OK(loom_tensor_transpose(&x, &x, 1, 2));
    return x;
}

/* ---- attention reference */

/* Element (b, h, i, j) of the mask broadcast to (B, Hq, Q, K). */
static double mask_at(const loom_tensor *m, int64_t b, int64_t h, int64_t i, int64_t j) {
    int64_t full[4] = {b, h, i, j}, idx[4];
    for (int d = 0; d < m->ndim; d++) {
        int fd = d + 4 - m->ndim;
        idx[d] = m->shape[d] == 1 ? 0 : full[fd];
    }
    return loom_tensor_get(m, idx);
}

/* Compare loom_attention's result with softmax(q k^T * scale + mask) v in
 * double, excluded keys (causal, u8 zero, -inf) dropped, all-excluded rows 0. */
static void check_attention(const loom_tensor *q, const loom_tensor *k, const loom_tensor *v,
                            const loom_attention_opts *opts, const char *what) {
    loom_tensor out = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_attention(&out, q, k, v, opts));
    if (out.storage == NULL) return;
    int64_t nb = q->shape[0], hq = q->shape[1], nq = q->shape[2], d = q->shape[3];
    int64_t hkv = k->shape[1], nk = k->shape[2], dv = v->shape[3];
    CHECK(out.ndim == 4 && out.shape[0] == nb && out.shape[1] == hq && out.shape[2] == nq &&
              out.shape[3] == dv,
          "%s: result %s", what, loom_shape_str(&out).s);
    double scale = opts && opts->scale != 0 ? opts->scale : 1.0 / sqrt((double)d);
    const loom_tensor *mask = opts ? opts->mask : NULL;
    double *s = malloc(sizeof(double) * (size_t)(nk > 0 ? nk : 1));
    int bad = 0;
    double worst = 0;
    for (int64_t b = 0; b < nb; b++) {
        for (int64_t h = 0; h < hq; h++) {
            int64_t kh = h / (hq / hkv);
            for (int64_t i = 0; i < nq; i++) {
                double max = -INFINITY;
                for (int64_t j = 0; j < nk; j++) {
                    double dot = 0;
                    for (int64_t c = 0; c < d; c++) {
                        int64_t iq[4] = {b, h, i, c}, ik[4] = {b, kh, j, c};
                        dot += loom_tensor_get(q, iq) * loom_tensor_get(k, ik);
                    }
                    s[j] = dot * scale;
                    if (opts && opts->causal && j > i + (nk - nq)) s[j] = -INFINITY;
                    if (mask && mask->dtype == LOOM_U8) {
                        if (mask_at(mask, b, h, i, j) == 0) s[j] = -INFINITY;
                    } else if (mask) {
                        s[j] += mask_at(mask, b, h, i, j);
                    }
                    if (s[j] > max) max = s[j];
                }
                double sum = 0;
                for (int64_t j = 0; j < nk; j++) {
                    s[j] = max == -INFINITY ? 0.0 : exp(s[j] - max);
                    sum += s[j];
                }
                for (int64_t c = 0; c < dv; c++) {
                    double o = 0, vmax = 0;
                    for (int64_t j = 0; j < nk; j++) {
                        int64_t iv[4] = {b, kh, j, c};
                        double vj = loom_tensor_get(v, iv);
                        if (sum > 0) o += s[j] / sum * vj;
                        if (fabs(vj) > vmax) vmax = fabs(vj);
                    }
                    int64_t io[4] = {b, h, i, c};
                    double got = loom_tensor_get(&out, io);
                    /* f32 scores and probabilities carry relative errors near
                     * 1e-6, so the output is within 1e-5 of max |v| of the
                     * double result; a fully masked row must be exactly 0. */
                    double tol = sum > 0 ? 1e-5 * vmax + 1e-7 : 0.0;
                    double err = fabs(got - o);
                    if (!(err <= tol)) bad++;
                    if (err > worst) worst = err;
                }
            }
        }
    }
    CHECK(bad == 0, "%s: q %s k %s v %s: %d values outside tolerance (worst %.3g)", what,
          loom_shape_str(q).s, loom_shape_str(k).s, loom_shape_str(v).s, bad, worst);
    free(s);
    loom_tensor_free(&out);
}

static void test_attention_basic_and_gqa(void) {
    int64_t qs[4] = {2, 4, 7, 16}, ks[4] = {2, 4, 7, 16};
    loom_tensor q = random_tensor(LOOM_F32, 4, qs), k = random_tensor(LOOM_F32, 4, ks);
    loom_tensor v = random_tensor(LOOM_F32, 4, ks);
    check_attention(&q, &k, &v, NULL, "plain, opts NULL");
    loom_attention_opts scaled = {.scale = 0.3f};
    check_attention(&q, &k, &v, &scaled, "explicit scale");
    loom_tensor_free(&q);
    loom_tensor_free(&k);
    loom_tensor_free(&v);

    /* grouped-query heads (6 query heads on 2 key/value heads), value dim != key dim */
    int64_t q2[4] = {1, 6, 5, 8}, k2[4] = {1, 2, 9, 8}, v2[4] = {1, 2, 9, 12};
    q = random_tensor(LOOM_F32, 4, q2);
    k = random_tensor(LOOM_F32, 4, k2);
    v = random_tensor(LOOM_F32, 4, v2);
    check_attention(&q, &k, &v, NULL, "grouped-query");
    loom_attention_opts causal = {.causal = true};
    check_attention(&q, &k, &v, &causal, "grouped-query causal with offset");
    loom_tensor_free(&q);
    loom_tensor_free(&k);
    loom_tensor_free(&v);

    /* 16-bit inputs and heads transposed out of (B, T, H, D) */
    q = random_bthd(LOOM_F16, 2, 4, 6, 10);
    k = random_bthd(LOOM_BF16, 2, 2, 6, 10);
    v = random_bthd(LOOM_F32, 2, 2, 6, 10);
    check_attention(&q, &k, &v, &causal, "16-bit, transposed heads");
    /* k with its last two dimensions transposed (D, K strides swapped) */
    int64_t kt_shape[4] = {2, 2, 10, 6};
    loom_tensor kt = random_tensor(LOOM_F32, 4, kt_shape);
    CHECK_OK(loom_tensor_transpose(&kt, &kt, 2, 3));
    check_attention(&q, &kt, &v, NULL, "k transposed in its last two dims");
    loom_tensor q1 = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_tensor_narrow(&q1, &q, 2, 5, 1));
    check_attention(&q1, &kt, &v, &causal, "one query, k transposed");
    loom_tensor_free(&q);
    loom_tensor_free(&k);
    loom_tensor_free(&v);
    loom_tensor_free(&kt);
    loom_tensor_free(&q1);

    /* one query with head sizes past one 64-wide block and not multiples of
     * 16, and a key count not a multiple of 4 */
    int64_t qw[4] = {1, 4, 1, 70}, kw[4] = {1, 2, 37, 70}, vw[4] = {1, 2, 37, 80};
    q = random_tensor(LOOM_F32, 4, qw);
    k = random_tensor(LOOM_F32, 4, kw);
    v = random_tensor(LOOM_F32, 4, vw);
    check_attention(&q, &k, &v, NULL, "one query, wide heads");
    check_attention(&q, &k, &v, &causal, "one query, wide heads, causal");
    loom_tensor_free(&q);
    loom_tensor_free(&k);
    loom_tensor_free(&v);

    /* more queries than one 256-row block, causal */
    int64_t q3[4] = {1, 2, 300, 8}, k3[4] = {1, 1, 300, 8};
    q = random_tensor(LOOM_F32, 4, q3);
    k = random_tensor(LOOM_F32, 4, k3);
    v = random_tensor(LOOM_F32, 4, k3);
    check_attention(&q, &k, &v, &causal, "300 queries, causal");
    loom_tensor_free(&q);
    loom_tensor_free(&k);
    loom_tensor_free(&v);
}

/* The sgemm route on one thread and on two. With 16 pairs of batch and head
 * (a float mask, more queries than one 256-row block) the heads are shared
 * out over the threads. With 3 pairs, which do not divide evenly, one head
 * runs at a time with threaded sgemm. */
static void test_attention_threads(void) {
    int64_t qs[4] = {2, 8, 270, 8}, ms[4] = {2, 1, 270, 270};
    loom_tensor q = random_tensor(LOOM_F32, 4, qs), k = random_tensor(LOOM_F32, 4, qs);
    loom_tensor v = random_tensor(LOOM_F32, 4, qs), mask = random_tensor(LOOM_F32, 4, ms);
    int64_t q3[4] = {1, 3, 40, 16};
    loom_tensor q_odd = random_tensor(LOOM_F32, 4, q3), k_odd = random_tensor(LOOM_F32, 4, q3);
    loom_tensor v_odd = random_tensor(LOOM_F32, 4, q3);
    loom_attention_opts masked = {.mask = &mask, .causal = true};

    int saved = omp_get_max_threads();
    for (int threads = 1; threads <= 2; threads++) {
        omp_set_num_threads(threads);
        check_attention(&q, &k, &v, &masked, threads == 1 ? "16 heads, 1 thread" : "16 heads, 2 threads");
        check_attention(&q_odd, &k_odd, &v_odd, NULL, threads == 1 ? "3 heads, 1 thread" : "3 heads, 2 threads");
    }
    omp_set_num_threads(saved);

    loom_tensor_free(&q);
    loom_tensor_free(&k);
    loom_tensor_free(&v);
    loom_tensor_free(&mask);
    loom_tensor_free(&q_odd);
    loom_tensor_free(&k_odd);
    loom_tensor_free(&v_odd);
}

static void test_attention_masks(void) {
    int64_t qs[4] = {2, 4, 5, 8}, ks[4] = {2, 2, 7, 8};
    loom_tensor q = random_tensor(LOOM_F32, 4, qs), k = random_tensor(LOOM_F32, 4, ks);
    loom_tensor v = random_tensor(LOOM_F32, 4, ks);

    /* additive padding mask (B, 1, 1, K): last two keys of batch 1 are -inf,
     * plus finite biases */
    int64_t ms[4] = {2, 1, 1, 7};
    loom_tensor pad = random_tensor(LOOM_F32, 4, ms);
    int64_t i5[4] = {1, 0, 0, 5}, i6[4] = {1, 0, 0, 6};
    loom_tensor_set(&pad, i5, -INFINITY);
    loom_tensor_set(&pad, i6, -INFINITY);
    loom_attention_opts o1 = {.mask = &pad};
    check_attention(&q, &k, &v, &o1, "additive (B, 1, 1, K) mask");
    o1.causal = true;
    check_attention(&q, &k, &v, &o1, "additive mask with causal");

    /* additive 2-D (Q, K) mask in bf16 */
    int64_t m2s[2] = {5, 7};
    loom_tensor m2 = random_tensor(LOOM_BF16, 2, m2s);
    loom_attention_opts o2 = {.mask = &m2};
    check_attention(&q, &k, &v, &o2, "additive bf16 (Q, K) mask");

    /* u8 keep-mask (B, 1, Q, K) with one fully masked row (batch 0, query 2) */
    int64_t m3s[4] = {2, 1, 5, 7};
    loom_tensor keep = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_tensor_zeros(&keep, LOOM_U8, 4, m3s));
    for (int64_t i = 0; i < 70; i++) {
        int64_t idx[4] = {i / 35, 0, i / 7 % 5, i % 7};
        bool row_masked = idx[0] == 0 && idx[2] == 2;
        loom_tensor_set(&keep, idx, !row_masked && rng_int(0, 3) != 0 ? 1 : 0);
    }
    loom_attention_opts o3 = {.mask = &keep};
    check_attention(&q, &k, &v, &o3, "u8 keep-mask with a fully masked row");
    loom_tensor one = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_attention(&out, &q, &k, &v, &o3));
    bool zeros = true;
    for (int64_t h = 0; h < 4; h++)
        for (int64_t c = 0; c < 8; c++) {
            int64_t idx[4] = {0, h, 2, c};
            zeros &= loom_tensor_get(&out, idx) == 0.0;
        }
    CHECK(zeros, "a fully masked row must give zeros");
    o3.causal = true;
    check_attention(&q, &k, &v, &o3, "u8 keep-mask with causal");

    /* the same kind of mask as a transposed view, so keys are Q elements apart */
    int64_t mts[4] = {2, 1, 7, 5};
    loom_tensor keep_t = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_tensor_zeros(&keep_t, LOOM_U8, 4, mts));
    for (int64_t i = 0; i < 70; i++) {
        int64_t idx[4] = {i / 35, 0, i / 5 % 7, i % 5};
        loom_tensor_set(&keep_t, idx, rng_int(0, 2) != 0);
    }
    CHECK_OK(loom_tensor_transpose(&keep_t, &keep_t, 2, 3));
    loom_attention_opts ot = {.mask = &keep_t};
    check_attention(&q, &k, &v, &ot, "transposed u8 keep-mask");
    loom_tensor_free(&keep_t);

    /* a full 4-D additive mask where one row is all -inf */
    int64_t m4s[4] = {2, 4, 5, 7};
    loom_tensor m4 = random_tensor(LOOM_F32, 4, m4s);
    for (int64_t j = 0; j < 7; j++) {
        int64_t idx[4] = {1, 3, 4, j};
        loom_tensor_set(&m4, idx, -INFINITY);
    }
    loom_attention_opts o4 = {.mask = &m4};
    check_attention(&q, &k, &v, &o4, "full additive mask with an all -inf row");

    /* causal with more queries than keys: the first queries see nothing */
    int64_t qbig[4] = {1, 2, 9, 8}, ksmall[4] = {1, 2, 4, 8};
    loom_tensor qb = random_tensor(LOOM_F32, 4, qbig), kb = random_tensor(LOOM_F32, 4, ksmall);
    loom_tensor vb = random_tensor(LOOM_F32, 4, ksmall);
    loom_attention_opts oc = {.causal = true};
    check_attention(&qb, &kb, &vb, &oc, "causal with Q > K");

    loom_tensor_free(&q);
    loom_tensor_free(&k);
    loom_tensor_free(&v);
    loom_tensor_free(&pad);
    loom_tensor_free(&m2);
    loom_tensor_free(&keep);
    loom_tensor_free(&one);
    loom_tensor_free(&out);
    loom_tensor_free(&m4);
    loom_tensor_free(&qb);
    loom_tensor_free(&kb);
    loom_tensor_free(&vb);
}

static void test_attention_random(void) {
    for (int it = 0; it < 40; it++) {
        int64_t nb = rng_int(1, 2), hkv = rng_int(1, 3), group = rng_int(1, 3);
        int64_t nq = rng_int(0, 3) == 0 ? 1 : rng_int(1, 40), nk = rng_int(1, 45);
        int64_t d = rng_int(1, 33), dv = rng_int(1, 20);
        int64_t qs[4] = {nb, hkv * group, nq, d}, ks[4] = {nb, hkv, nk, d}, vs[4] = {nb, hkv, nk, dv};
        loom_tensor q = random_tensor(LOOM_F32, 4, qs), k = random_tensor(LOOM_F32, 4, ks);
        loom_tensor v = random_tensor(LOOM_F32, 4, vs);
        loom_attention_opts opts = {.causal = rng_int(0, 1)};
        loom_tensor m = LOOM_TENSOR_EMPTY;
        int kind = (int)rng_int(0, 2);
        if (kind == 1) {
            int64_t ms[4] = {nb, 1, nq, nk};
            m = random_tensor(LOOM_F32, 4, ms);
            opts.mask = &m;
        } else if (kind == 2) {
            int64_t ms[2] = {1, nk};
            CHECK_OK(loom_tensor_zeros(&m, LOOM_U8, 2, ms));
            for (int64_t j = 0; j < nk; j++) {
                int64_t idx[2] = {0, j};
                loom_tensor_set(&m, idx, rng_int(0, 2) != 0);
            }
            opts.mask = &m;
        }
        check_attention(&q, &k, &v, &opts, "random");
        loom_tensor_free(&q);
        loom_tensor_free(&k);
        loom_tensor_free(&v);
        loom_tensor_free(&m);
    }
}

static void test_attention_errors(void) {
    int64_t qs[4] = {2, 6, 3, 8}, ks[4] = {2, 4, 7, 8}, k2s[4] = {2, 2, 7, 5}, q3s[3] = {6, 3, 8};
    int64_t vs[4] = {2, 2, 6, 8};
    loom_tensor q = random_tensor(LOOM_F32, 4, qs), k = random_tensor(LOOM_F32, 4, ks);
    loom_tensor k2 = random_tensor(LOOM_F32, 4, k2s), q3 = random_tensor(LOOM_F32, 3, q3s);
    loom_tensor v6 = random_tensor(LOOM_F32, 4, vs);
    loom_tensor out = LOOM_TENSOR_EMPTY;
    CHECK_ERROR(loom_attention(&out, &q, &k, &k, NULL),
                "attention: 'q' has 6 heads, not a multiple of the 4 key/value heads of 'k' f32[2, 4, 7, 8]");
    CHECK_ERROR(loom_attention(&out, &q, &k2, &k2, NULL),
                "attention: 'k' f32[2, 2, 7, 5] does not match 'q' f32[2, 6, 3, 8] (expected [2, *, *, 8])");
    CHECK_ERROR(loom_attention(&out, &q3, &k, &k, NULL), "attention: q, k and v must be 4-D (B, H, T, D), got 'q' f32[6, 3, 8]");

    int64_t k3s[4] = {2, 2, 7, 8};
    loom_tensor k3 = random_tensor(LOOM_F32, 4, k3s);
    CHECK_ERROR(loom_attention(&out, &q, &k3, &v6, NULL),
                "attention: 'v' f32[2, 2, 6, 8] does not match 'k' f32[2, 2, 7, 8] (expected [2, 2, 7, *])");
    int64_t ms[2] = {3, 5};
    loom_tensor m = random_tensor(LOOM_F32, 2, ms);
    loom_attention_opts o = {.mask = &m};
    CHECK_ERROR(loom_attention(&out, &q, &k3, &k3, &o),
                "attention: 'mask' f32[3, 5] cannot be broadcast to (B, Hq, Q, K) = [2, 6, 3, 7]");
    loom_tensor mi = LOOM_TENSOR_EMPTY;
    int64_t mis[1] = {7};
    CHECK_OK(loom_tensor_zeros(&mi, LOOM_I32, 1, mis));
    o.mask = &mi;
    CHECK_ERROR(loom_attention(&out, &q, &k3, &k3, &o),
                "attention: 'mask' must be an additive float tensor or a u8 keep-mask, got i32[7]");
    CHECK(out.storage == NULL, "a failed attention must leave out empty");
    loom_tensor_free(&q);
    loom_tensor_free(&k);
    loom_tensor_free(&k2);
    loom_tensor_free(&q3);
    loom_tensor_free(&k3);
    loom_tensor_free(&v6);
    loom_tensor_free(&m);
    loom_tensor_free(&mi);
}

/* ---- KV cache */

static void test_kv_cache_decode(void) {
    loom_kv_cache cache;
    CHECK_OK(loom_kv_cache_init(&cache, 1, 2, 12, 8, 6));
    CHECK(cache.length == 0 && cache.capacity == 12, "fresh cache length %lld", (long long)cache.length);

    /* prefill 10 positions, then decode one query against all 11 keys */
    int64_t kp[4] = {1, 2, 10, 8}, vp[4] = {1, 2, 10, 6}, k1s[4] = {1, 2, 1, 8}, v1s[4] = {1, 2, 1, 6};
    loom_tensor kpre = random_tensor(LOOM_BF16, 4, kp), vpre = random_tensor(LOOM_F32, 4, vp);
    loom_tensor kall = LOOM_TENSOR_EMPTY, vall = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_kv_cache_append(&cache, &kpre, &vpre, &kall, &vall));
    CHECK(cache.length == 10 && kall.shape[2] == 10 && vall.shape[3] == 6, "after prefill: %s",
          loom_shape_str(&kall).s);
    bool same = true;
    for (int64_t i = 0; i < 160; i++) same &= loom_tensor_get_flat(&kall, i) == loom_tensor_get_flat(&kpre, i);
    CHECK(same, "cache keys differ from the appended keys");
    loom_tensor_free(&kall);
    loom_tensor_free(&vall);

    loom_tensor k1 = random_tensor(LOOM_F32, 4, k1s), v1 = random_tensor(LOOM_F32, 4, v1s);
    CHECK_OK(loom_kv_cache_append(&cache, &k1, &v1, &kall, &vall));
    CHECK(cache.length == 11 && kall.shape[2] == 11, "after one step: %s", loom_shape_str(&kall).s);
    CHECK(!loom_tensor_is_contiguous(&kall), "the filled part of the cache should be a strided view");

    /* GQA decode: 4 query heads on the 2 cached heads, causal offset K - Q = 10 */
    int64_t qs[4] = {1, 4, 1, 8};
    loom_tensor q = random_tensor(LOOM_F32, 4, qs);
    loom_attention_opts causal = {.causal = true};
    check_attention(&q, &kall, &vall, &causal, "decode against the cache");
    int64_t q3s[4] = {1, 4, 3, 8};
    loom_tensor q3 = random_tensor(LOOM_F32, 4, q3s);
    check_attention(&q3, &kall, &vall, &causal, "three queries against the cache");
    int64_t q5s[4] = {1, 4, 5, 8};
    loom_tensor q5 = random_tensor(LOOM_F32, 4, q5s);
    check_attention(&q5, &kall, &vall, &causal, "five queries against the cache (sgemm route)");

    /* errors: full cache, wrong shapes, non-empty outputs */
    loom_tensor k2 = LOOM_TENSOR_EMPTY, v2 = LOOM_TENSOR_EMPTY;
    CHECK_ERROR(loom_kv_cache_append(&cache, &kpre, &vpre, &k2, &v2),
                "kv_cache_append: cache full (11 filled + 10 new > capacity 12)");
    CHECK_ERROR(loom_kv_cache_append(&cache, &k1, &v1, &kall, &vall),
                "kv_cache_append: 'k_all' and 'v_all' must be empty on entry");
    CHECK_ERROR(loom_kv_cache_append(&cache, &v1, &v1, &k2, &v2),
                "kv_cache_append: 'k_new' f32[1, 2, 1, 6] does not match the cache (expected [1, 2, T, 8])");
    CHECK_ERROR(loom_kv_cache_append(&cache, &k1, &vpre, &k2, &v2),
                "kv_cache_append: 'v_new' f32[1, 2, 10, 6] does not match the cache (expected [1, 2, 1, 6])");
    CHECK(cache.length == 11, "failed appends must not change the length");
    loom_kv_cache bad;
    CHECK_ERROR(loom_kv_cache_init(&bad, 1, 0, 4, 8, 8), "kv_cache_init: sizes must be positive");

    loom_tensor_free(&kpre);
    loom_tensor_free(&vpre);
    loom_tensor_free(&kall);
    loom_tensor_free(&vall);
    loom_tensor_free(&k1);
    loom_tensor_free(&v1);
    loom_tensor_free(&q);
    loom_tensor_free(&q3);
    loom_tensor_free(&q5);
    loom_kv_cache_free(&cache);
    CHECK(cache.k.storage == NULL && cache.length == 0, "free should reset the cache");
}

/* The bf16 nearest to f (ties to the even significand), found by comparing
 * the two candidates around f in double rather than by adding a rounding
 * bias to the bits. f must be finite and round to a finite bf16. */
static float nearest_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t low = u & 0xffff0000u, high = low + 0x10000u; /* high is one bf16 step further from 0 */
    float fl, fh;
    memcpy(&fl, &low, 4);
    memcpy(&fh, &high, 4);
    double dl = fabs((double)f - fl), dh = fabs((double)fh - f);
    if (dl < dh) return fl;
    if (dh < dl) return fh;
    return (low >> 16) % 2 == 0 ? fl : fh;
}

static void test_kv_cache_bf16_append(void) {
    loom_kv_cache cache;
    CHECK_OK(loom_kv_cache_init_dtype(&cache, 1, 2, 8, 3, 2, LOOM_BF16));
    CHECK(cache.k.dtype == LOOM_BF16, "cache keys %s", loom_shape_str(&cache.k).s);
    CHECK(cache.v.dtype == LOOM_BF16, "cache values %s", loom_shape_str(&cache.v).s);

    /* Halfway cases of both parities, either side of them, negatives, zero
     * and random values. 1 + 2^-8 lies halfway between 1 and 1 + 2^-7, so it
     * rounds to 1 (even significand). 1 + 3 * 2^-8 rounds up to 1 + 2^-6. */
    float keys[12] = {1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f, 1.0f + 0x1p-8f + 0x1p-20f,
                      1.0f + 0x1p-8f - 0x1p-20f, -(1.0f + 3 * 0x1p-8f), 0.0f, -0.0f,
                      3.14159265f, 1e-30f, -65504.0f, 0.1f, 1e30f};
    int64_t ks[4] = {1, 2, 2, 3}, vs[4] = {1, 2, 2, 2};
    loom_tensor k = LOOM_TENSOR_EMPTY, v = random_tensor(LOOM_F32, 4, vs);
    CHECK_OK(loom_tensor_init(&k, LOOM_F32, 4, ks));
    memcpy(loom_tensor_data(&k), keys, sizeof keys);
    loom_tensor kall = LOOM_TENSOR_EMPTY, vall = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_kv_cache_append(&cache, &k, &v, &kall, &vall));
    CHECK(kall.dtype == LOOM_BF16, "keys view %s", loom_shape_str(&kall).s);
    CHECK(vall.dtype == LOOM_BF16, "values view %s", loom_shape_str(&vall).s);
    int bad = 0;
    for (int64_t i = 0; i < 12; i++) {
        double got = loom_tensor_get_flat(&kall, i), want = nearest_bf16(keys[i]);
        if (got != want || signbit(got) != signbit(want)) {
            bad++;
            fprintf(stderr, "  key %lld: %.9g stored as %.9g, expected %.9g\n", (long long)i,
                    (double)keys[i], got, want);
        }
    }
    CHECK(bad == 0, "%d keys not rounded to the nearest bf16", bad);
    CHECK(loom_tensor_get_flat(&kall, 0) == 1.0, "1 + 2^-8 stored as %.9g", loom_tensor_get_flat(&kall, 0));
    CHECK(loom_tensor_get_flat(&kall, 1) == 1.0 + 0x1p-6, "1 + 3 * 2^-8 stored as %.9g",
          loom_tensor_get_flat(&kall, 1));
    bad = 0;
    for (int64_t i = 0; i < 8; i++) {
        float x = (float)loom_tensor_get_flat(&v, i);
        if (loom_tensor_get_flat(&vall, i) != nearest_bf16(x)) bad++;
    }
    CHECK(bad == 0, "%d values not rounded to the nearest bf16", bad);
    loom_tensor_free(&kall);
    loom_tensor_free(&vall);

    /* f16 and bf16 inputs are accepted as well */
    int64_t k1s[4] = {1, 2, 1, 3}, v1s[4] = {1, 2, 1, 2};
    loom_tensor k16 = random_tensor(LOOM_F16, 4, k1s), v16 = random_tensor(LOOM_BF16, 4, v1s);
    CHECK_OK(loom_kv_cache_append(&cache, &k16, &v16, &kall, &vall));
    CHECK(cache.length == 3, "length after two appends %lld", (long long)cache.length);
    bad = 0;
    for (int64_t h = 0; h < 2; h++) {
        for (int64_t c = 0; c < 3; c++) {
            int64_t src[4] = {0, h, 0, c}, dst[4] = {0, h, 2, c};
            float x = (float)loom_tensor_get(&k16, src);
            if (loom_tensor_get(&kall, dst) != nearest_bf16(x)) bad++;
        }
        for (int64_t c = 0; c < 2; c++) {
            int64_t src[4] = {0, h, 0, c}, dst[4] = {0, h, 2, c};
            if (loom_tensor_get(&vall, dst) != loom_tensor_get(&v16, src)) bad++;
        }
    }
    CHECK(bad == 0, "%d f16/bf16 inputs stored wrongly", bad);
    loom_tensor_free(&kall);
    loom_tensor_free(&vall);

    /* transposed f32 inputs (inner stride 2), infinities and NaN */
    int64_t kts[4] = {1, 2, 3, 2}, vts[4] = {1, 2, 2, 2};
    loom_tensor kt = random_tensor(LOOM_F32, 4, kts), vt = random_tensor(LOOM_F32, 4, vts);
    loom_tensor kst = LOOM_TENSOR_EMPTY, vst = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_tensor_transpose(&kst, &kt, 2, 3)); /* (1, 2, 3, 2) -> (1, 2, 2, 3) */
    CHECK_OK(loom_tensor_transpose(&vst, &vt, 2, 3)); /* (1, 2, 2, 2) -> (1, 2, 2, 2) */
    float *kd = loom_tensor_data(&kt);
    kd[0] = INFINITY;
    kd[1] = -INFINITY;
    kd[2] = NAN;
    kd[3] = FLT_MAX; /* rounds up to infinity */
    CHECK_OK(loom_kv_cache_append(&cache, &kst, &vst, &kall, &vall));
    bad = 0;
    for (int64_t h = 0; h < 2; h++) {
        for (int64_t t = 0; t < 2; t++) {
            for (int64_t c = 0; c < 3; c++) {
                int64_t src[4] = {0, h, t, c}, dst[4] = {0, h, 3 + t, c};
                float x = (float)loom_tensor_get(&kst, src);
                double got = loom_tensor_get(&kall, dst);
                bool ok = isnan(x) ? isnan(got) : isinf(x) || x == FLT_MAX ? got == copysign(INFINITY, x)
                                                                             : got == nearest_bf16(x);
                if (!ok) bad++;
            }
            for (int64_t c = 0; c < 2; c++) {
                int64_t src[4] = {0, h, t, c}, dst[4] = {0, h, 3 + t, c};
                if (loom_tensor_get(&vall, dst) != nearest_bf16((float)loom_tensor_get(&vst, src))) bad++;
            }
        }
    }
    CHECK(bad == 0, "%d strided, infinite or NaN inputs stored wrongly", bad);
    /* element (t, c) of the transposed view is kd[c * 2 + t] */
    int64_t inf_at[4] = {0, 0, 3, 0}, ninf_at[4] = {0, 0, 4, 0}, nan_at[4] = {0, 0, 3, 1};
    int64_t max_at[4] = {0, 0, 4, 1};
    CHECK(loom_tensor_get(&kall, inf_at) == INFINITY, "infinity stored as %g", loom_tensor_get(&kall, inf_at));
    CHECK(loom_tensor_get(&kall, ninf_at) == -INFINITY, "-infinity stored as %g",
          loom_tensor_get(&kall, ninf_at));
    CHECK(isnan(loom_tensor_get(&kall, nan_at)), "NaN stored as %g", loom_tensor_get(&kall, nan_at));
    CHECK(loom_tensor_get(&kall, max_at) == INFINITY, "FLT_MAX stored as %g", loom_tensor_get(&kall, max_at));
    loom_tensor_free(&kt);
    loom_tensor_free(&vt);
    loom_tensor_free(&kst);
    loom_tensor_free(&vst);

    /* errors: dtypes other than f32 and bf16 */
    loom_kv_cache other;
    CHECK_ERROR(loom_kv_cache_init_dtype(&other, 1, 2, 4, 3, 3, LOOM_F16),
                "kv_cache_init: dtype must be f32 or bf16, got f16");
    CHECK_ERROR(loom_kv_cache_init_dtype(&other, 1, 2, 4, 3, 3, LOOM_I32),
                "kv_cache_init: dtype must be f32 or bf16, got i32");
    CHECK_OK(loom_kv_cache_init_dtype(&other, 1, 2, 4, 3, 3, LOOM_F32));
    CHECK(other.k.dtype == LOOM_F32, "an f32 cache has dtype %s", loom_shape_str(&other.k).s);
    loom_kv_cache_free(&other);

    loom_tensor_free(&k);
    loom_tensor_free(&v);
    loom_tensor_free(&k16);
    loom_tensor_free(&v16);
    loom_tensor_free(&kall);
    loom_tensor_free(&vall);
    loom_kv_cache_free(&cache);
}

/* Attention over bf16 k and v against attention over the same values
 * widened to f32, laid out with the same strides. When both run the same
 * kernel order (both vector kernels, or both portable loops) the results
 * must be equal bit for bit, otherwise within f32 rounding. */
static void check_attention_widened(const loom_tensor *q, const loom_tensor *k, const loom_tensor *v,
                                    const loom_tensor *kf, const loom_tensor *vf,
                                    const loom_attention_opts *opts, bool bitwise, const char *what) {
    loom_tensor got = LOOM_TENSOR_EMPTY, want = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_attention(&got, q, k, v, opts));
    CHECK_OK(loom_attention(&want, q, kf, vf, opts));
    if (got.storage == NULL || want.storage == NULL) return;
    int64_t n = loom_tensor_numel(&got);
    const float *g = loom_tensor_data(&got), *w = loom_tensor_data(&want);
    int differ = 0, bad = 0;
    double worst = 0;
    for (int64_t i = 0; i < n; i++) {
        if (memcmp(&g[i], &w[i], sizeof(float)) != 0) differ++;
        double err = fabs((double)g[i] - w[i]);
        if (!(err <= 1e-5 * (fabs(w[i]) + 1))) bad++;
        if (err > worst) worst = err;
    }
    if (bitwise)
        CHECK(differ == 0, "%s: %d of %lld values differ from the widened f32 attention (worst %.3g)",
              what, differ, (long long)n, worst);
    CHECK(bad == 0, "%s: %d of %lld values outside tolerance (worst %.3g)", what, bad, (long long)n,
          worst);
    loom_tensor_free(&got);
    loom_tensor_free(&want);
}

/* Whether the bf16 kernels take the same (vector or portable) route as the
 * f32 ones on this CPU, so that their sums come out in the same order. */
static bool bf16_kernels_match_f32(void) {
    bool f = __builtin_cpu_supports("avx512f");
    bool bw = f && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
    return f == bw;
}

/* Decoding against a bf16 cache with 8 query heads on 2 cached heads (GQA).
 * head_dim 20 and value_dim 70 exercise the vector tails and a second
 * 64-column block. One and three queries take the loop route, five the
 * sgemm route. Cases are causal, with additive and u8 masks, on one and two
 * threads. */
static void test_attention_bf16_cache(void) {
    int64_t nb = 2, hq = 8, hkv = 2, d = 20, dv = 70, prefill = 100;
    loom_kv_cache cache;
    CHECK_OK(loom_kv_cache_init_dtype(&cache, nb, hkv, 120, d, dv, LOOM_BF16));
    loom_tensor kp = random_bthd(LOOM_F32, nb, hkv, prefill, d), vp = random_bthd(LOOM_F32, nb, hkv, prefill, dv);
    loom_tensor kall = LOOM_TENSOR_EMPTY, vall = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_kv_cache_append(&cache, &kp, &vp, &kall, &vall));
    loom_tensor_free(&kall);
    loom_tensor_free(&vall);
    loom_tensor k1 = random_bthd(LOOM_F32, nb, hkv, 1, d), v1 = random_bthd(LOOM_F32, nb, hkv, 1, dv);
    CHECK_OK(loom_kv_cache_append(&cache, &k1, &v1, &kall, &vall));
    int64_t nk = prefill + 1;
    CHECK(kall.dtype == LOOM_BF16, "filled part %s", loom_shape_str(&kall).s);
    CHECK(kall.shape[2] == nk, "filled part %s", loom_shape_str(&kall).s);
    CHECK(!loom_tensor_is_contiguous(&kall), "the filled part %s should be a strided view", loom_shape_str(&kall).s);

    loom_tensor kf = LOOM_TENSOR_EMPTY, vf = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_tensor_to(&kf, &kall, LOOM_F32));
    CHECK_OK(loom_tensor_to(&vf, &vall, LOOM_F32));
    int64_t fms[4] = {nb, 1, 3, nk}, ums[4] = {nb, 1, 1, nk};
    loom_tensor fmask = random_tensor(LOOM_F32, 4, fms), umask = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_tensor_init(&umask, LOOM_U8, 4, ums));
    uint8_t *u = loom_tensor_data(&umask);
    for (int64_t i = 0; i < nb * nk; i++) u[i] = rng_int(0, 3) != 0;
    u[nk - 1] = 1;

    bool bitwise = bf16_kernels_match_f32();
    int saved = omp_get_max_threads();
    for (int threads = 1; threads <= 2; threads++) {
        omp_set_num_threads(threads);
        for (int64_t nq = 1; nq <= 3; nq += 2) {
            loom_tensor q = random_bthd(LOOM_F32, nb, hq, nq, d);
            loom_tensor fm = LOOM_TENSOR_EMPTY;
            CHECK_OK(loom_tensor_narrow(&fm, &fmask, 2, 0, nq));
            loom_attention_opts none = {0}, causal = {.causal = true};
            loom_attention_opts added = {.causal = true, .mask = &fm}, kept = {.mask = &umask};
            const loom_attention_opts *cases[4] = {&none, &causal, &added, &kept};
            const char *names[4] = {"plain", "causal", "causal, float mask", "u8 mask"};
            for (int c = 0; c < 4; c++) {
                char what[96];
                snprintf(what, sizeof what, "bf16 cache, %lld queries, %s, %d thread%s", (long long)nq,
                         names[c], threads, threads == 1 ? "" : "s");
                check_attention_widened(&q, &kall, &vall, &kf, &vf, cases[c], bitwise, what);
            }
            check_attention(&q, &kall, &vall, &added, "bf16 cache against the double reference");
            loom_tensor_free(&q);
            loom_tensor_free(&fm);
        }
        /* five queries take the sgemm route, which widens k and v into copies */
        loom_tensor q5 = random_bthd(LOOM_F32, nb, hq, 5, d);
        loom_attention_opts causal = {.causal = true};
        check_attention(&q5, &kall, &vall, &causal, "bf16 cache, five queries (sgemm route)");
        check_attention_widened(&q5, &kall, &vall, &kf, &vf, &causal, false,
                                "bf16 cache, five queries against widened");
        loom_tensor_free(&q5);
    }
    omp_set_num_threads(saved);

    loom_tensor_free(&kp);
    loom_tensor_free(&vp);
    loom_tensor_free(&k1);
    loom_tensor_free(&v1);
    loom_tensor_free(&kall);
    loom_tensor_free(&vall);
    loom_tensor_free(&kf);
    loom_tensor_free(&vf);
    loom_tensor_free(&fmask);
    loom_tensor_free(&umask);
    loom_kv_cache_free(&cache);
}

/* bf16 k and v whose last dimension is not contiguous (transposed views),
 * and a query with a non-unit inner stride, take the portable loops. The
 * f32 operands they are compared with have the same strides, so the f32
 * side runs the portable loops too and the results match bit for bit. */
static void test_attention_bf16_strided(void) {
    int64_t nb = 1, hq = 4, hkv = 2, nk = 9, d = 6, dv = 5;
    int64_t kts[4] = {nb, hkv, d, nk}, vts[4] = {nb, hkv, dv, nk}, qts[4] = {nb, hq, d, 2};
    loom_tensor kt = random_tensor(LOOM_BF16, 4, kts), vt = random_tensor(LOOM_BF16, 4, vts);
    loom_tensor ktf = LOOM_TENSOR_EMPTY, vtf = LOOM_TENSOR_EMPTY, qt = random_tensor(LOOM_F32, 4, qts);
    CHECK_OK(loom_tensor_to(&ktf, &kt, LOOM_F32));
    CHECK_OK(loom_tensor_to(&vtf, &vt, LOOM_F32));
    loom_tensor k = LOOM_TENSOR_EMPTY, v = LOOM_TENSOR_EMPTY, kf = LOOM_TENSOR_EMPTY, vf = LOOM_TENSOR_EMPTY;
    loom_tensor q = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_tensor_transpose(&k, &kt, 2, 3)); /* (B, Hkv, D, K) -> (B, Hkv, K, D) */
    CHECK_OK(loom_tensor_transpose(&v, &vt, 2, 3)); /* (B, Hkv, Dv, K) -> (B, Hkv, K, Dv) */
    CHECK_OK(loom_tensor_transpose(&kf, &ktf, 2, 3));
    CHECK_OK(loom_tensor_transpose(&vf, &vtf, 2, 3));
    CHECK_OK(loom_tensor_transpose(&q, &qt, 2, 3)); /* (B, Hq, D, Q) -> (B, Hq, Q, D) */
    CHECK(k.strides[3] != 1, "k should have a strided last dimension");
    CHECK(v.strides[3] != 1, "v should have a strided last dimension");
    CHECK(q.strides[3] != 1, "q should have a strided last dimension");

    loom_attention_opts causal = {.causal = true};
    check_attention_widened(&q, &k, &v, &kf, &vf, &causal, true, "strided bf16 k and v, strided q");
    check_attention(&q, &k, &v, &causal, "strided bf16 k and v against the double reference");

    /* contiguous rows but a strided query: only the scores take the loops */
    loom_tensor kc = LOOM_TENSOR_EMPTY, kcf = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_tensor_contiguous(&kc, &k));
    CHECK_OK(loom_tensor_to(&kcf, &kc, LOOM_F32));
    check_attention_widened(&q, &kc, &v, &kcf, &vf, NULL, bf16_kernels_match_f32(),
                            "contiguous bf16 k, strided q and v");

    loom_tensor *all[] = {&kt, &vt, &ktf, &vtf, &qt, &k, &v, &kf, &vf, &q, &kc, &kcf};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) loom_tensor_free(all[i]);
}

/* ---- rotary embedding */

/* Reference rotation. inv_freq = 1 / theta^(2i / rotary_dim) and the angle
 * (p / scaling) * inv_freq are formed in f32, as Hugging Face does, and cos,
 * sin and the rotation itself are in double. */
static void check_rope(const loom_tensor *x, const loom_tensor *pos, float theta, float scaling,
                       int rotary_dim, loom_rope_style style, const char *what) {
    loom_tensor out = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_rope(&out, x, pos, theta, scaling, rotary_dim, style));
    if (out.storage == NULL) return;
    int64_t nb = x->shape[0], nh = x->shape[1], nt = x->shape[2], d = x->shape[3];
    int half = rotary_dim / 2, bad = 0;
    for (int64_t b = 0; b < nb; b++)
        for (int64_t h = 0; h < nh; h++)
            for (int64_t t = 0; t < nt; t++) {
                int64_t pidx[2] = {pos->ndim == 1 ? t : b, t};
                double p = loom_tensor_get(pos, pos->ndim == 1 ? &pidx[0] : pidx);
                for (int64_t c = 0; c < d; c++) {
                    int64_t ix[4] = {b, h, t, c};
                    double xc = loom_tensor_get(x, ix), want;
                    if (c >= rotary_dim) {
                        want = xc;
                    } else {
                        int i = style == LOOM_ROPE_HALF ? (int)(c % half) : (int)(c / 2);
                        float inv = 1.0f / powf(theta, (float)(2 * i) / (float)rotary_dim);
                        float angle = ((float)p / scaling) * inv;
                        double cs = cos((double)angle), sn = sin((double)angle);
                        int64_t partner;
                        double sign;
                        if (style == LOOM_ROPE_HALF) {
                            partner = c < half ? c + half : c - half;
                            sign = c < half ? -1.0 : 1.0;
                        } else {
                            partner = c % 2 == 0 ? c + 1 : c - 1;
                            sign = c % 2 == 0 ? -1.0 : 1.0;
                        }
                        int64_t ip[4] = {b, h, t, partner};
                        want = xc * cs + sign * loom_tensor_get(x, ip) * sn;
                    }
                    double got = loom_tensor_get(&out, ix);
                    if (fabs(got - want) > 4e-6 * (1 + fabs(want))) bad++;
                }
            }
    CHECK(bad == 0, "%s: %d values differ from the rotation formula", what, bad);
    loom_tensor_free(&out);
}

/* On the bf16 linear path with AMX, many-query attention runs both products
 * on tiles with bf16 operands: its result stays within bf16 rounding of the
 * f32 path's (the f32 path is checked against a double reference above).
 * Shapes cross the 256-query block and the 32-input tile step, with GQA
 * heads, transposed (B, T, H, D) layouts, causal and float masks. */
static void test_attention_bf16_path(void) {
    if (!loom_amx_bf16_usable()) {
        printf("note: no AMX-BF16 here, so the bf16-path attention test is skipped\n");
        return;
    }
    struct { int64_t b, hq, hkv, nq, nk, d, dv; bool causal, mask; } cases[] = {
        {1, 4, 4, 300, 300, 64, 64, true, false},
        {2, 4, 2, 40, 70, 20, 36, false, true},
        {1, 3, 1, 5, 9, 33, 16, true, true},
    };
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        loom_tensor q = random_bthd(LOOM_F32, cases[ci].b, cases[ci].hq, cases[ci].nq, cases[ci].d);
        loom_tensor k = random_bthd(LOOM_F32, cases[ci].b, cases[ci].hkv, cases[ci].nk, cases[ci].d);
        loom_tensor v = random_bthd(LOOM_F32, cases[ci].b, cases[ci].hkv, cases[ci].nk, cases[ci].dv);
        int64_t mshape[4] = {cases[ci].b, 1, cases[ci].nq, cases[ci].nk};
        loom_tensor m = cases[ci].mask ? random_tensor(LOOM_F32, 4, mshape) : (loom_tensor)LOOM_TENSOR_EMPTY;
        loom_attention_opts opts = {.causal = cases[ci].causal, .mask = cases[ci].mask ? &m : NULL};
        loom_tensor ref = LOOM_TENSOR_EMPTY, fast = LOOM_TENSOR_EMPTY;
        CHECK_OK(loom_attention(&ref, &q, &k, &v, &opts));
        loom_set_linear_path(LOOM_PATH_BF16);
        CHECK_OK(loom_attention(&fast, &q, &k, &v, &opts));
        loom_set_linear_path(LOOM_PATH_F32);
        if (ref.storage && fast.storage) {
            double worst = 0, vmax = 0;
            for (int64_t i = 0; i < loom_tensor_numel(&ref); i++) {
                double e = fabs(loom_tensor_get_flat(&ref, i) - loom_tensor_get_flat(&fast, i));
                if (e > worst) worst = e;
            }
            for (int64_t i = 0; i < loom_tensor_numel(&v); i++) {
                double a = fabs(loom_tensor_get_flat(&v, i));
                if (a > vmax) vmax = a;
            }
            CHECK(worst < 0.05 * vmax, "case %zu: bf16-path attention differs from the f32 path by %.3g "
                  "(limit %.3g)", ci, worst, 0.05 * vmax);
            CHECK(worst > 0, "case %zu: bf16-path attention equals the f32 path, so its operands were not "
                  "rounded to bf16", ci);
        }
        loom_tensor_free(&q);
        loom_tensor_free(&k);
        loom_tensor_free(&v);
        loom_tensor_free(&m);
        loom_tensor_free(&ref);
        loom_tensor_free(&fast);
    }
}

static void test_rope(void) {
    int64_t xs[4] = {2, 3, 5, 16};
    loom_tensor x = random_tensor(LOOM_F32, 4, xs);
    loom_tensor pos = LOOM_TENSOR_EMPTY, pos2 = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_tensor_arange(&pos, LOOM_I64, 0, 5, 1));
    int64_t p2s[2] = {2, 5};
    CHECK_OK(loom_tensor_zeros(&pos2, LOOM_I32, 2, p2s));
    for (int64_t i = 0; i < 10; i++) {
        int64_t idx[2] = {i / 5, i % 5};
        loom_tensor_set(&pos2, idx, (double)(i / 5 == 0 ? 100 + i : 4000 + 3 * i));
    }
    check_rope(&x, &pos, 10000.0f, 1.0f, 16, LOOM_ROPE_HALF, "half, full rotary");
    check_rope(&x, &pos, 10000.0f, 1.0f, 16, LOOM_ROPE_INTERLEAVED, "interleaved, full rotary");
    check_rope(&x, &pos2, 500000.0f, 1.0f, 16, LOOM_ROPE_HALF, "half, (B, T) positions");
    check_rope(&x, &pos2, 10000.0f, 4.0f, 16, LOOM_ROPE_INTERLEAVED, "interleaved, linear scaling");

    /* partial rotary: 8 of 20 channels (GPT-NeoX / Phi style), 16-bit and strided x */
    loom_tensor xp = random_bthd(LOOM_BF16, 2, 3, 5, 20);
    check_rope(&xp, &pos, 10000.0f, 1.0f, 8, LOOM_ROPE_HALF, "half, partial rotary");
    check_rope(&xp, &pos2, 10000.0f, 2.0f, 8, LOOM_ROPE_INTERLEAVED, "interleaved, partial rotary");

    /* The f32 angle rule agrees with the textbook formula in double for small positions. */
    loom_tensor out = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_rope(&out, &x, &pos, 10000.0f, 1.0f, 16, LOOM_ROPE_HALF));
    int64_t ix[4] = {1, 2, 3, 1}, ip[4] = {1, 2, 3, 9};
    double ang = 3.0 / pow(10000.0, 2.0 / 16.0);
    double want = loom_tensor_get(&x, ix) * cos(ang) - loom_tensor_get(&x, ip) * sin(ang);
    CHECK(fabs(loom_tensor_get(&out, ix) - want) < 1e-5, "rope channel 1 at position 3: got %g, want %g",
          loom_tensor_get(&out, ix), want);

    /* errors */
    loom_tensor y = LOOM_TENSOR_EMPTY, pbad = LOOM_TENSOR_EMPTY;
    CHECK_ERROR(loom_rope(&y, &x, &pos, 10000.0f, 1.0f, 7, LOOM_ROPE_HALF),
                "rope: rotary_dim 7 must be even and in [2, 16] for 'x' f32[2, 3, 5, 16]");
    CHECK_ERROR(loom_rope(&y, &x, &pos, 10000.0f, 1.0f, 18, LOOM_ROPE_HALF),
                "rope: rotary_dim 18 must be even");
    CHECK_OK(loom_tensor_arange(&pbad, LOOM_I64, 0, 4, 1));
    CHECK_ERROR(loom_rope(&y, &x, &pbad, 10000.0f, 1.0f, 16, LOOM_ROPE_HALF),
                "rope: 'positions' i64[4] does not match 'x' f32[2, 3, 5, 16] (expected [5] or [2, 5])");
    loom_tensor pf = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_tensor_arange(&pf, LOOM_F32, 0, 5, 1));
    CHECK_ERROR(loom_rope(&y, &x, &pf, 10000.0f, 1.0f, 16, LOOM_ROPE_HALF),
                "rope: 'positions' must be i32 or i64, got f32[5]");
    CHECK_ERROR(loom_rope(&y, &x, &pos, 10000.0f, 0.0f, 16, LOOM_ROPE_HALF),
                "rope: theta (10000) and scaling (0) must be positive and finite");
    CHECK(y.storage == NULL, "a failed rope must leave out empty");

    loom_tensor_free(&x);
    loom_tensor_free(&pos);
    loom_tensor_free(&pos2);
    loom_tensor_free(&xp);
    loom_tensor_free(&out);
    loom_tensor_free(&pbad);
    loom_tensor_free(&pf);
}

/* ---- ALiBi */

/* MPT's slopes rebuilt independently in double: next power of two from
 * ceil(log2(n)), base slopes 1 / 2^((i + 1) * max / n2), and for other
 * head counts the list slopes[1::2] + slopes[::2] cut to n. */
static void mpt_slopes(double *out, int n, double bias_max) {
    int n2 = (int)pow(2.0, ceil(log2((double)n)));
    double base[64], joined[64];
    for (int i = 0; i < n2; i++) base[i] = 1.0 / pow(2.0, (i + 1) * (bias_max / n2));
    if (n2 == n) {
        memcpy(out, base, sizeof(double) * (size_t)n);
        return;
    }
    int len = 0;
    for (int i = 1; i < n2; i += 2) joined[len++] = base[i];
    for (int i = 0; i < n2; i += 2) joined[len++] = base[i];
    memcpy(out, joined, sizeof(double) * (size_t)n);
}

static void test_alibi(void) {
    const int heads[] = {1, 2, 5, 8, 12, 16, 24, 32};
    const int64_t lens[] = {1, 9};
    const float maxes[] = {8.0f, 16.0f};
    for (size_t hi = 0; hi < sizeof heads / sizeof heads[0]; hi++) {
        for (size_t li = 0; li < 2; li++) {
            for (size_t mi = 0; mi < 2; mi++) {
                int n = heads[hi];
                int64_t k = lens[li];
                loom_tensor a = LOOM_TENSOR_EMPTY;
                CHECK_OK(loom_alibi(&a, n, k, maxes[mi]));
                if (a.storage == NULL) continue;
                CHECK(a.ndim == 4 && a.shape[0] == 1 && a.shape[1] == n && a.shape[2] == 1 &&
                          a.shape[3] == k,
                      "alibi shape %s", loom_shape_str(&a).s);
                double slopes[64];
                mpt_slopes(slopes, n, maxes[mi]);
                int bad = 0;
                for (int h = 0; h < n; h++)
                    for (int64_t j = 0; j < k; j++) {
                        int64_t idx[4] = {0, h, 0, j};
                        double want = (double)(j - (k - 1)) * slopes[h];
                        if (fabs(loom_tensor_get(&a, idx) - want) > 1e-6 * fabs(want) + 1e-12) bad++;
                    }
                CHECK(bad == 0, "alibi n_heads=%d k=%lld max=%g: %d values differ from MPT's formula", n,
                      (long long)k, (double)maxes[mi], bad);
                loom_tensor_free(&a);
            }
        }
    }
    /* 12 heads (next power 16, m_i = (i + 1) / 2): head 0 takes base slope 1
     * (2^-1), head 8 takes base slope 0 (2^-0.5); key 0 of 2 is at distance -1. */
    loom_tensor a = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_alibi(&a, 12, 2, 8.0f));
    int64_t i0[4] = {0, 0, 0, 0}, i8[4] = {0, 8, 0, 0};
    CHECK(fabs(loom_tensor_get(&a, i0) + 0.5) < 1e-7 && fabs(loom_tensor_get(&a, i8) + pow(2, -0.5)) < 1e-7,
          "alibi 12 heads: head 0 %g (want -0.5), head 8 %g (want -0.7071)", loom_tensor_get(&a, i0),
          loom_tensor_get(&a, i8));
    loom_tensor_free(&a);
    CHECK_ERROR(loom_alibi(&a, 0, 4, 8.0f), "alibi: n_heads (0) must be positive");
}

int main(void) {
    test_attention_basic_and_gqa();
    test_attention_threads();
    test_attention_masks();
    test_attention_random();
    test_attention_errors();
    test_kv_cache_decode();
    test_kv_cache_bf16_append();
    test_attention_bf16_cache();
    test_attention_bf16_strided();
    test_attention_bf16_path();
    test_rope();
    test_alibi();
    return check_summary();
}
