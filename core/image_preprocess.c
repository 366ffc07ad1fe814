/* Loom core: the geometric and numeric steps of Hugging Face image
 * processors and of open_clip's eval transform (shortest-edge sizing, center
 * crop, pad to square, rescale and normalise), and the pipeline that chains
 * them after RGB conversion and resizing. */
#include "image_internal.h"

#include <math.h>
#include <string.h>

/* OpenAI CLIP statistics (transformers OPENAI_CLIP_MEAN / OPENAI_CLIP_STD). */
static const double openai_clip_mean[3] = {0.48145466, 0.4578275, 0.40821073};
static const double openai_clip_std[3] = {0.26862954, 0.26130258, 0.27577711};

int loom_image_shortest_edge_size(int64_t height, int64_t width, int64_t shortest_edge, int64_t *out_height,
                                  int64_t *out_width) {
    if (height < 1 || width < 1 || shortest_edge < 1)
        return loom_error("loom_image_shortest_edge_size: sizes must be positive, got image %lldx%lld "
                          "and shortest edge %lld",
                          (long long)height, (long long)width, (long long)shortest_edge);
    int64_t shorter = width <= height ? width : height;
    int64_t longer = width <= height ? height : width;
    int64_t product;
    if (loom_mul_i64(shortest_edge, longer, &product) != 0 || product > (INT64_C(1) << 53))
        return loom_error("loom_image_shortest_edge_size: %lld * %lld is too large", (long long)shortest_edge,
                          (long long)longer);
    /* Python's int(S * long / short): a correctly rounded double quotient,
     * truncated toward zero. */
    int64_t new_long = (int64_t)((double)product / (double)shorter);
    if (width <= height) {
        *out_width = shortest_edge;
        *out_height = new_long;
    } else {
        *out_height = shortest_edge;
        *out_width = new_long;
    }
    return LOOM_OK;
}

/* ---- center crop */

/* Python's int(round(v / 2.0)) for v >= 0: halves round to the even value. */
static int64_t round_half_even_div2(int64_t v) {
    int64_t q = v / 2;
    if (v % 2 != 0 && q % 2 != 0)
        q++;
    return q;
}

/* For one dimension: where the output window starts in the input (`src0`)
 * and where the input starts in the output (`dst0`). One of them is 0. */
static void crop_offsets(int64_t size, int64_t crop, loom_crop_rounding rounding, int64_t *src0, int64_t *dst0) {
    if (crop <= size) {
        *src0 = rounding == LOOM_CROP_FLOOR ? (size - crop) / 2 : round_half_even_div2(size - crop);
        *dst0 = 0;
    } else {
        /* The input is smaller: Hugging Face pads with ceil(d / 2) zeros
         * before it, torchvision with d // 2. */
        int64_t d = crop - size;
        *src0 = 0;
        *dst0 = rounding == LOOM_CROP_FLOOR ? (d + 1) / 2 : d / 2;
    }
}

int loom_image_center_crop(loom_tensor *out, const loom_tensor *src, int64_t height, int64_t width,
                           loom_crop_rounding rounding) {
    loom_tensor in = LOOM_TENSOR_EMPTY, res = LOOM_TENSOR_EMPTY;
    if (!out)
        return loom_error("loom_image_center_crop: output is NULL");
    if (rounding != LOOM_CROP_FLOOR && rounding != LOOM_CROP_ROUND_HALF_EVEN)
        return loom_error("loom_image_center_crop: invalid rounding %d", (int)rounding);
    if (height < 1 || width < 1)
        return loom_error("loom_image_center_crop: invalid crop size %lldx%lld (height x width)",
                          (long long)height, (long long)width);
    if (loom_image_contiguous_hwc(&in, src, "loom_image_center_crop", "src") != 0)
        return LOOM_ERR;

    int64_t h = in.shape[0], w = in.shape[1], c = in.shape[2];
    int64_t sy, dy, sx, dx;
    crop_offsets(h, height, rounding, &sy, &dy);
    crop_offsets(w, width, rounding, &sx, &dx);
    int64_t rows = (h < height ? h : height), cols = (w < width ? w : width);
    int64_t shape[3] = {height, width, c};
    bool padded = height > h || width > w;
    if ((padded ? loom_tensor_zeros(&res, LOOM_U8, 3, shape) : loom_tensor_init(&res, LOOM_U8, 3, shape)) != 0) {
        loom_tensor_free(&in);
        return LOOM_ERR;
    }
    const uint8_t *s = loom_tensor_data(&in);
    uint8_t *d = loom_tensor_data(&res);
    for (int64_t y = 0; y < rows; y++)
        memcpy(d + ((y + dy) * width + dx) * c, s + ((y + sy) * w + sx) * c, (size_t)(cols * c));
    loom_tensor_free(&in);
    loom_tensor_free(out);
    *out = res;
    return LOOM_OK;
}

/* ---- pad to square */

int loom_image_pad_to_square(loom_tensor *out, const loom_tensor *src, const uint8_t *fill) {
    loom_tensor in = LOOM_TENSOR_EMPTY, res = LOOM_TENSOR_EMPTY;
    if (!out || !fill)
        return loom_error("loom_image_pad_to_square: %s is NULL", out ? "fill" : "output");
    if (loom_image_contiguous_hwc(&in, src, "loom_image_pad_to_square", "src") != 0)
        return LOOM_ERR;

    int64_t h = in.shape[0], w = in.shape[1], c = in.shape[2];
    int64_t side = h > w ? h : w;
    int64_t top = (side - h) / 2, left = (side - w) / 2;
    int64_t shape[3] = {side, side, c};
    if (loom_tensor_init(&res, LOOM_U8, 3, shape) != 0) {
        loom_tensor_free(&in);
        return LOOM_ERR;
    }
    uint8_t *d = loom_tensor_data(&res);
    const uint8_t *s = loom_tensor_data(&in);
    for (int64_t i = 0; i < side * side; i++)
        memcpy(d + i * c, fill, (size_t)c);
    for (int64_t y = 0; y < h; y++)
        memcpy(d + ((y + top) * side + left) * c, s + y * w * c, (size_t)(w * c));
    loom_tensor_free(&in);
    loom_tensor_free(out);
    *out = res;
    return LOOM_OK;
}

void loom_image_fill_from_mean(uint8_t fill[3], const double mean[3]) {
    for (int i = 0; i < 3; i++) {
        double v = mean[i] * 255;
        if (v <= 0)
            fill[i] = 0;
        else if (v >= 255)
            fill[i] = 255;
        else
            fill[i] = (uint8_t)(int)v;
    }
}

/* ---- rescale and normalise */

int loom_image_normalize(loom_tensor *out, const loom_tensor *src, loom_rescale_mode mode, double rescale_factor,
                         const double *mean, const double *std) {
    loom_tensor in = LOOM_TENSOR_EMPTY, res = LOOM_TENSOR_EMPTY;
    if (!out)
        return loom_error("loom_image_normalize: output is NULL");
    if (mode != LOOM_RESCALE_NONE && mode != LOOM_RESCALE_MULTIPLY && mode != LOOM_RESCALE_DIVIDE_255)
        return loom_error("loom_image_normalize: invalid rescale mode %d", (int)mode);
    if ((mean == NULL) != (std == NULL))
        return loom_error("loom_image_normalize: mean and std must both be given or both be NULL");
    if (loom_image_contiguous_hwc(&in, src, "loom_image_normalize", "src") != 0)
        return LOOM_ERR;

    int64_t h = in.shape[0], w = in.shape[1], c = in.shape[2], n = h * w;
    for (int64_t ch = 0; std && ch < c; ch++) {
        if (std[ch] == 0.0 || !isfinite(std[ch]) || !isfinite(mean[ch])) {
            loom_tensor_free(&in);
            return loom_error("loom_image_normalize: channel %lld has mean %g and std %g (std must be "
                              "finite and non-zero)",
                              (long long)ch, mean[ch], std[ch]);
        }
    }
    int64_t shape[3] = {c, h, w};
    if (loom_tensor_init(&res, LOOM_F32, 3, shape) != 0) {
        loom_tensor_free(&in);
        return LOOM_ERR;
    }
    const uint8_t *s = loom_tensor_data(&in);
    float *d = loom_tensor_data(&res);
    for (int64_t ch = 0; ch < c; ch++) {
        float m = mean ? (float)mean[ch] : 0.0f, sd = std ? (float)std[ch] : 1.0f;
        float *plane = d + ch * n;
        for (int64_t i = 0; i < n; i++) {
            uint8_t v = s[i * c + ch];
            float x;
            if (mode == LOOM_RESCALE_MULTIPLY)
                x = (float)((double)v * rescale_factor);
            else if (mode == LOOM_RESCALE_DIVIDE_255)
                x = (float)v / 255.0f;
            else
                x = (float)v;
            plane[i] = mean ? (x - m) / sd : x;
        }
    }
    loom_tensor_free(&in);
    loom_tensor_free(out);
    *out = res;
    return LOOM_OK;
}

/* ---- pipeline */

void loom_image_preprocess_config_init(loom_image_preprocess_config *config) {
    memset(config, 0, sizeof *config);
    config->alpha_mode = LOOM_ALPHA_DROP;
    memset(config->background, 255, sizeof config->background);
    loom_image_fill_from_mean(config->pad_fill, openai_clip_mean);
    config->resize_mode = LOOM_RESIZE_SHORTEST_EDGE;
    config->shortest_edge = 224;
    config->resample = LOOM_RESAMPLE_BICUBIC;
    config->center_crop = true;
    config->crop_height = config->crop_width = 224;
    config->crop_rounding = LOOM_CROP_FLOOR;
    config->rescale_mode = LOOM_RESCALE_MULTIPLY;
    config->rescale_factor = 1.0 / 255.0;
    config->normalize = true;
    memcpy(config->mean, openai_clip_mean, sizeof config->mean);
    memcpy(config->std, openai_clip_std, sizeof config->std);
}

static int check_config(const loom_image_preprocess_config *cfg) {
    const char *op = "loom_image_preprocess";
    switch (cfg->resize_mode) {
    case LOOM_RESIZE_NONE:
        break;
    case LOOM_RESIZE_SHORTEST_EDGE:
        if (cfg->shortest_edge < 1)
            return loom_error("%s: shortest_edge must be positive, got %lld", op, (long long)cfg->shortest_edge);
        break;
    case LOOM_RESIZE_EXACT:
        if (cfg->resize_height < 1 || cfg->resize_width < 1)
            return loom_error("%s: resize size must be positive, got %lldx%lld", op, (long long)cfg->resize_height,
                              (long long)cfg->resize_width);
        break;
    default:
        return loom_error("%s: invalid resize mode %d", op, (int)cfg->resize_mode);
    }
    if (cfg->center_crop && (cfg->crop_height < 1 || cfg->crop_width < 1))
        return loom_error("%s: crop size must be positive, got %lldx%lld", op, (long long)cfg->crop_height,
                          (long long)cfg->crop_width);
    return LOOM_OK;
}

/* Replace *cur by the result of a step, which the step wrote to *next. */
static void advance(loom_tensor *cur, loom_tensor *next) {
    loom_tensor_free(cur);
    *cur = *next;
    *next = LOOM_TENSOR_EMPTY;
}

int loom_image_preprocess(loom_tensor *pixel_values, loom_tensor *pixels_u8, const loom_image *image,
                          const loom_image_preprocess_config *config) {
    loom_tensor cur = LOOM_TENSOR_EMPTY, next = LOOM_TENSOR_EMPTY;
    int rc = LOOM_ERR;

    if (!pixel_values)
        return loom_error("loom_image_preprocess: pixel_values is NULL");
    if (!image || !config)
        return loom_error("loom_image_preprocess: %s is NULL", image ? "config" : "image");
    if (check_config(config) != 0)
        return LOOM_ERR;

    if (loom_image_to_rgb(&cur, image, config->alpha_mode, config->background) != 0)
        goto done;

    if (config->pad_to_square) {
        if (loom_image_pad_to_square(&next, &cur, config->pad_fill) != 0)
            goto done;
        advance(&cur, &next);
    }

    int64_t h = cur.shape[0], w = cur.shape[1];
    if (config->resize_mode == LOOM_RESIZE_SHORTEST_EDGE) {
        if (loom_image_shortest_edge_size(cur.shape[0], cur.shape[1], config->shortest_edge, &h, &w) != 0)
            goto done;
    } else if (config->resize_mode == LOOM_RESIZE_EXACT) {
        h = config->resize_height;
        w = config->resize_width;
    }
    if (h != cur.shape[0] || w != cur.shape[1]) {
        if (loom_image_resize(&next, &cur, h, w, config->resample) != 0)
            goto done;
        advance(&cur, &next);
    }

    if (config->center_crop) {
        if (loom_image_center_crop(&next, &cur, config->crop_height, config->crop_width, config->crop_rounding) != 0)
            goto done;
        advance(&cur, &next);
    }

    if (loom_image_normalize(&next, &cur, config->rescale_mode, config->rescale_factor,
                             config->normalize ? config->mean : NULL, config->normalize ? config->std : NULL) != 0)
        goto done;
    loom_tensor_free(pixel_values);
    *pixel_values = next;
    next = LOOM_TENSOR_EMPTY;
    if (pixels_u8) {
        loom_tensor_free(pixels_u8);
        *pixels_u8 = cur;
        cur = LOOM_TENSOR_EMPTY;
    }
    rc = LOOM_OK;

done:
    loom_tensor_free(&cur);
    loom_tensor_free(&next);
    return rc;
}
