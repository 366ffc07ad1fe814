/* Tests of loom_patch_embed against the direct stride-P convolution sum in
 * double, with 16-bit weights on both linear paths, channels-last pixels,
 * odd patch sizes, and the error messages. */
#include <float.h>
#include <stdint.h>
#include <stdlib.h>

#include "check.h"
#include "ops.h"

#define U32 (FLT_EPSILON / 2)

static uint64_t seed = 12345;

static loom_tensor random_tensor(loom_dtype dtype, int ndim, const int64_t *shape) {
    loom_tensor f = LOOM_TENSOR_EMPTY, t = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_tensor_init(&f, LOOM_F32, ndim, shape));
    CHECK_OK(loom_tensor_randn(&f, seed++, 0.0, 1.0));
    if (dtype == LOOM_F32) return f;
    CHECK_OK(loom_tensor_to(&t, &f, dtype));
    loom_tensor_free(&f);
    return t;
}

/* out[b, py * gw + px, o] = bias[o] + sum over (c, ky, kx) of
 * weight[o, c, ky, kx] * pixels[b, c, py * P + ky, px * P + kx]. The f32
 * routes stay within (n + 2) u sum |terms| for n = C * P * P products; the
 * bf16 route also rounds each activation (and f16 weight) to bf16, at most
 * 2^-9 relative each, covered by 2^-7 sum |terms|. */
static void check_patch_embed(const loom_tensor *pix, const loom_tensor *w, const loom_tensor *bias,
                              bool bf16_route, const char *what) {
    loom_tensor out = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_patch_embed(&out, pix, w, bias));
    if (out.storage == NULL) return;
    int64_t nb = pix->shape[0], nc = pix->shape[1], p = w->shape[2], no = w->shape[0];
    int64_t gh = pix->shape[2] / p, gw = pix->shape[3] / p;
    CHECK(out.ndim == 3 && out.shape[0] == nb && out.shape[1] == gh * gw && out.shape[2] == no,
          "%s: result %s", what, loom_shape_str(&out).s);
    int bad = 0;
    for (int64_t b = 0; b < nb; b++)
        for (int64_t py = 0; py < gh; py++)
            for (int64_t px = 0; px < gw; px++)
                for (int64_t o = 0; o < no; o++) {
                    double sum = 0, mag = 0;
                    for (int64_t c = 0; c < nc; c++)
                        for (int64_t ky = 0; ky < p; ky++)
                            for (int64_t kx = 0; kx < p; kx++) {
                                int64_t iw[4] = {o, c, ky, kx};
                                int64_t ip[4] = {b, c, py * p + ky, px * p + kx};
                                double t = loom_tensor_get(w, iw) * loom_tensor_get(pix, ip);
                                sum += t;
                                mag += fabs(t);
                            }
                    int64_t ib[1] = {o};
                    double bo = bias ? loom_tensor_get(bias, ib) : 0.0;
                    double tol = (double)(nc * p * p + 2) * U32 * (mag + fabs(bo)) + 1e-30;
                    if (bf16_route) tol += mag / 128.0;
                    int64_t io[3] = {b, py * gw + px, o};
                    if (fabs(loom_tensor_get(&out, io) - (sum + bo)) > tol) bad++;
                }
    CHECK(bad == 0, "%s: pixels %s weight %s: %d values outside tolerance", what,
          loom_shape_str(pix).s, loom_shape_str(w).s, bad);
    loom_tensor_free(&out);
}

static void test_patch_embed_values(void) {
    /* 2 images of 3 x 12 x 8 in 4 x 4 patches -> 6 patches, 5 outputs */
    int64_t ps[4] = {2, 3, 12, 8}, ws[4] = {5, 3, 4, 4}, n5 = 5;
    loom_tensor pix = random_tensor(LOOM_F32, 4, ps);
    loom_tensor w = random_tensor(LOOM_F32, 4, ws), b = random_tensor(LOOM_F32, 1, &n5);
    check_patch_embed(&pix, &w, &b, false, "f32 weight with bias");
    check_patch_embed(&pix, &w, NULL, false, "f32 weight without bias");

    /* 16-bit weights: 12 patch rows take the many-row routes of linear */
    loom_tensor wb = random_tensor(LOOM_BF16, 4, ws), wh = random_tensor(LOOM_F16, 4, ws);
    check_patch_embed(&pix, &wb, &b, false, "bf16 weight, f32 path");
    check_patch_embed(&pix, &wh, NULL, false, "f16 weight, f32 path");
    loom_set_linear_path(LOOM_PATH_BF16);
    check_patch_embed(&pix, &wb, &b, true, "bf16 weight, bf16 path");
    check_patch_embed(&pix, &wh, &b, true, "f16 weight, bf16 path");
    loom_set_linear_path(LOOM_PATH_F32);

    /* channels-last pixels (B, H, W, C) permuted to (B, C, H, W), in f16 */
    int64_t cl[4] = {1, 14, 21, 3};
    loom_tensor pcl = random_tensor(LOOM_F16, 4, cl), pv = LOOM_TENSOR_EMPTY;
    int perm[4] = {0, 3, 1, 2};
    CHECK_OK(loom_tensor_permute(&pv, &pcl, perm));
    int64_t w7s[4] = {4, 3, 7, 7}, n4 = 4;
    loom_tensor w7 = random_tensor(LOOM_F32, 4, w7s), b4 = random_tensor(LOOM_BF16, 1, &n4);
    check_patch_embed(&pv, &w7, &b4, false, "channels-last pixels, 7 x 7 patches");

    /* a weight view that is not contiguous: (O, C, P, P) transposed in its last two dims */
    loom_tensor wt = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_tensor_transpose(&wt, &w, 2, 3));
    check_patch_embed(&pix, &wt, &b, false, "transposed weight view");

    /* 1 x 1 patches are a per-pixel linear map */
    int64_t w1s[4] = {2, 3, 1, 1}, p1s[4] = {1, 3, 2, 3};
    loom_tensor w1 = random_tensor(LOOM_F32, 4, w1s), p1 = random_tensor(LOOM_F32, 4, p1s);
    check_patch_embed(&p1, &w1, NULL, false, "1 x 1 patches");

    /* the out-variant writes into a preallocated tensor */
    loom_tensor out = LOOM_TENSOR_EMPTY, ref = LOOM_TENSOR_EMPTY;
    int64_t os[3] = {2, 6, 5};
    CHECK_OK(loom_tensor_zeros(&out, LOOM_F32, 3, os));
    CHECK_OK(loom_patch_embed(&out, &pix, &w, &b));
    CHECK_OK(loom_patch_embed(&ref, &pix, &w, &b));
    bool same = true;
    for (int64_t i = 0; i < 60; i++) same &= loom_tensor_get_flat(&out, i) == loom_tensor_get_flat(&ref, i);
    CHECK(same, "out-variant differs from the allocating call");

    loom_tensor_free(&pix);
    loom_tensor_free(&w);
    loom_tensor_free(&b);
    loom_tensor_free(&wb);
    loom_tensor_free(&wh);
    loom_tensor_free(&pcl);
    loom_tensor_free(&pv);
    loom_tensor_free(&w7);
    loom_tensor_free(&b4);
    loom_tensor_free(&wt);
    loom_tensor_free(&w1);
    loom_tensor_free(&p1);
    loom_tensor_free(&out);
    loom_tensor_free(&ref);
}

static void test_patch_embed_errors(void) {
    int64_t ps[4] = {1, 3, 10, 8}, ws[4] = {5, 3, 4, 4}, wc[4] = {5, 2, 4, 4}, wr[4] = {5, 3, 4, 2};
    int64_t n4 = 4, p3[3] = {3, 8, 8};
    loom_tensor pix = random_tensor(LOOM_F32, 4, ps), w = random_tensor(LOOM_F32, 4, ws);
    loom_tensor w2 = random_tensor(LOOM_F32, 4, wc), w3 = random_tensor(LOOM_F32, 4, wr);
    loom_tensor b4 = random_tensor(LOOM_F32, 1, &n4), pix3 = random_tensor(LOOM_F32, 3, p3);
    loom_tensor out = LOOM_TENSOR_EMPTY;
    CHECK_ERROR(loom_patch_embed(&out, &pix, &w, NULL),
                "patch_embed: 'pixels' f32[1, 3, 10, 8] height and width must be multiples of the patch size 4");
    CHECK_ERROR(loom_patch_embed(&out, &pix, &w2, NULL),
                "patch_embed: 'weight' f32[5, 2, 4, 4] does not match 'pixels' f32[1, 3, 10, 8] (expected 3 input channels, got 2)");
    CHECK_ERROR(loom_patch_embed(&out, &pix, &w3, NULL),
                "patch_embed: 'weight' must be (O, C, P, P) with P >= 1, got f32[5, 3, 4, 2]");
    CHECK_ERROR(loom_patch_embed(&out, &pix3, &w, NULL), "patch_embed: 'pixels' must be 4-D (B, C, H, W), got f32[3, 8, 8]");

    int64_t ok[4] = {1, 3, 8, 8}, bad_out[3] = {1, 4, 4};
    loom_tensor pok = random_tensor(LOOM_F32, 4, ok), ob = LOOM_TENSOR_EMPTY;
    CHECK_ERROR(loom_patch_embed(&out, &pok, &w, &b4),
                "patch_embed: 'bias' f32[4] does not match 'weight' f32[5, 3, 4, 4] (expected [5])");
    CHECK_OK(loom_tensor_zeros(&ob, LOOM_F32, 3, bad_out));
    CHECK_ERROR(loom_patch_embed(&ob, &pok, &w, NULL), "patch_embed: 'out' is f32[1, 4, 4], expected f32[1, 4, 5]");
    CHECK(out.storage == NULL, "a failed patch_embed must leave out empty");

    loom_tensor_free(&pix);
    loom_tensor_free(&w);
    loom_tensor_free(&w2);
    loom_tensor_free(&w3);
    loom_tensor_free(&b4);
    loom_tensor_free(&pix3);
    loom_tensor_free(&pok);
    loom_tensor_free(&ob);
}

int main(void) {
    test_patch_embed_values();
    test_patch_embed_errors();
    return check_summary();
}
