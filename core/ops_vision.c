/* Vision operators: patch embedding (a conv2d whose stride equals its
 * kernel) as im2col followed by the linear operator, so that 16-bit weights
 * take the same kernels and paths as loom_linear. */
#include "ops_internal.h"

static int check_patch_embed(const loom_tensor *pixels, const loom_tensor *weight,
                             const loom_tensor *bias) {
    if (loom_check_float_input("patch_embed", "pixels", pixels) ||
        loom_check_float_input("patch_embed", "weight", weight))
        return LOOM_ERR;
    if (bias && loom_check_float_input("patch_embed", "bias", bias)) return LOOM_ERR;
    if (pixels->ndim != 4)
        return loom_error("patch_embed: 'pixels' must be 4-D (B, C, H, W), got %s",
                          loom_shape_str(pixels).s);
    if (weight->ndim != 4 || weight->shape[2] != weight->shape[3] || weight->shape[2] < 1)
        return loom_error("patch_embed: 'weight' must be (O, C, P, P) with P >= 1, got %s",
                          loom_shape_str(weight).s);
    if (weight->shape[1] != pixels->shape[1])
        return loom_error("patch_embed: 'weight' %s does not match 'pixels' %s (expected %lld "
                          "input channels, got %lld)",
                          loom_shape_str(weight).s, loom_shape_str(pixels).s,
                          (long long)pixels->shape[1], (long long)weight->shape[1]);
    int64_t p = weight->shape[2];
    if (pixels->shape[2] % p != 0 || pixels->shape[3] % p != 0)
        return loom_error("patch_embed: 'pixels' %s height and width must be multiples of the "
                          "patch size %lld",
                          loom_shape_str(pixels).s, (long long)p);
    if (bias && (bias->ndim != 1 || bias->shape[0] != weight->shape[0]))
        return loom_error("patch_embed: 'bias' %s does not match 'weight' %s (expected [%lld])",
                          loom_shape_str(bias).s, loom_shape_str(weight).s,
                          (long long)weight->shape[0]);
    return LOOM_OK;
}

/* Fill cols (B, gh * gw, C * P * P) with the patches of `pixels` in raster
 * order, each flattened as (channel, row, column) like the conv weight. */
static void im2col(float *cols, const loom_tensor *pixels, int64_t p) {
    int64_t nb = pixels->shape[0], nc = pixels->shape[1];
    int64_t gh = pixels->shape[2] / p, gw = pixels->shape[3] / p;
    int64_t patch = nc * p * p;
    const char *base = loom_tensor_data(pixels);
    int64_t esize = (int64_t)loom_dtype_size(pixels->dtype);
    const int64_t *st = pixels->strides;
    for (int64_t b = 0; b < nb; b++) {
        for (int64_t py = 0; py < gh; py++) {
            for (int64_t px = 0; px < gw; px++) {
                float *dst = cols + ((b * gh + py) * gw + px) * patch;
                for (int64_t c = 0; c < nc; c++) {
                    for (int64_t ky = 0; ky < p; ky++) {
                        const char *src = base + (b * st[0] + c * st[1] + (py * p + ky) * st[2] +
                                                  px * p * st[3]) * esize;
                        loom_row_load_f32(dst + (c * p + ky) * p, src, p, st[3], pixels->dtype);
                    }
                }
            }
        }
    }
}

int loom_patch_embed(loom_tensor *out, const loom_tensor *pixels, const loom_tensor *weight,
                     const loom_tensor *bias) {
    if (check_patch_embed(pixels, weight, bias)) return LOOM_ERR;
    int64_t nb = pixels->shape[0], p = weight->shape[2], n_out = weight->shape[0];
    int64_t n_patches = (pixels->shape[2] / p) * (pixels->shape[3] / p);
    int64_t patch = pixels->shape[1] * p * p;

    int64_t shape[3] = {nb, n_patches, n_out};
    loom_tensor res;
    if (loom_out_begin(&res, out, "patch_embed", LOOM_F32, 3, shape)) return LOOM_ERR;
    if (loom_tensor_numel(&res) == 0) return loom_out_end(out, &res, LOOM_OK);

    loom_tensor cols = LOOM_TENSOR_EMPTY, w2 = LOOM_TENSOR_EMPTY;
    int64_t cshape[3] = {nb, n_patches, patch}, wshape[2] = {n_out, patch};
    int rc = loom_tensor_init(&cols, LOOM_F32, 3, cshape);
    if (rc == LOOM_OK) {
        im2col(loom_tensor_data(&cols), pixels, p);
        /* The weight (O, C, P, P) as (O, C * P * P): a view when contiguous. */
        rc = loom_tensor_reshape(&w2, weight, 2, wshape);
    }
    if (rc == LOOM_OK) rc = loom_linear(&res, &cols, &w2, bias);
    if (rc != LOOM_OK) loom_error_prefix("patch_embed");
    loom_tensor_free(&cols);
    loom_tensor_free(&w2);
    return loom_out_end(out, &res, rc);
}
