/* Loom core: conversion of decoded images to RGB with Pillow 9.4's integer
 * arithmetic (Convert.c for L, LA, RGBA and CMYK; AlphaComposite.c for
 * compositing onto a background). */
#include "image_internal.h"

#include <string.h>

/* Pillow's MULDIV255 and SHIFTFORDIV255 (ImagingUtils.h): a * b / 255 and
 * a / 255, rounded, without a division. */
static uint32_t shift_div255(uint32_t a) { return ((a >> 8) + a) >> 8; }
static int muldiv255(int a, int b) { return (int)shift_div255((uint32_t)(a * b + 128)); }

static uint8_t clip8(int v) {
    if (v <= 0)
        return 0;
    if (v > 255)
        return 255;
    return (uint8_t)v;
}

/* One pixel of mode `mode` as straight RGBA, as Pillow's convert("RGBA")
 * gives it (CMYK through cmyk2rgb with nk = 255 - K). */
static void pixel_to_rgba(loom_image_mode mode, const uint8_t *p, uint8_t rgba[4]) {
    switch (mode) {
    case LOOM_IMAGE_MODE_L:
        rgba[0] = rgba[1] = rgba[2] = p[0];
        rgba[3] = 255;
        break;
    case LOOM_IMAGE_MODE_LA:
        rgba[0] = rgba[1] = rgba[2] = p[0];
        rgba[3] = p[1];
        break;
    case LOOM_IMAGE_MODE_RGB:
        memcpy(rgba, p, 3);
        rgba[3] = 255;
        break;
    case LOOM_IMAGE_MODE_RGBA:
        memcpy(rgba, p, 4);
        break;
    case LOOM_IMAGE_MODE_CMYK: {
        int nk = 255 - p[3];
        for (int i = 0; i < 3; i++)
            rgba[i] = clip8(nk - muldiv255(p[i], nk));
        rgba[3] = 255;
        break;
    }
    }
}

/* Image.alpha_composite(background, src) for an opaque background, with
 * Pillow's 7 extra bits of precision. The result is opaque, so only its
 * colour is returned. */
enum { COMPOSITE_PRECISION_BITS = 7 };

static void composite_over(const uint8_t src[4], const uint8_t background[3], uint8_t rgb[3]) {
    const uint32_t dst_alpha = 255;
    if (src[3] == 0) {
        memcpy(rgb, background, 3);
        return;
    }
    uint32_t blend = dst_alpha * (255u - src[3]);
    uint32_t outa255 = src[3] * 255u + blend;
    uint32_t coef1 = src[3] * 255u * 255u * (1u << COMPOSITE_PRECISION_BITS) / outa255;
    uint32_t coef2 = 255u * (1u << COMPOSITE_PRECISION_BITS) - coef1;
    for (int i = 0; i < 3; i++) {
        uint32_t tmp = src[i] * coef1 + background[i] * coef2;
        rgb[i] = (uint8_t)(shift_div255(tmp + (0x80u << COMPOSITE_PRECISION_BITS)) >> COMPOSITE_PRECISION_BITS);
    }
}

int loom_image_to_rgb(loom_tensor *out, const loom_image *image, loom_alpha_mode alpha_mode,
                      const uint8_t *background) {
    static const uint8_t white[3] = {255, 255, 255};
    loom_tensor in = LOOM_TENSOR_EMPTY;

    if (!out || !image)
        return loom_error("loom_image_to_rgb: %s is NULL", out ? "image" : "output");
    if (alpha_mode != LOOM_ALPHA_DROP && alpha_mode != LOOM_ALPHA_COMPOSITE)
        return loom_error("loom_image_to_rgb: invalid alpha mode %d (expected LOOM_ALPHA_DROP or "
                          "LOOM_ALPHA_COMPOSITE)",
                          (int)alpha_mode);
    if (loom_image_contiguous_hwc(&in, &image->pixels, "loom_image_to_rgb", "image") != 0)
        return LOOM_ERR;
    int channels = loom_image_mode_channels(image->mode);
    if (channels == 0 || in.shape[2] != channels) {
        loom_tensor_free(&in);
        return loom_error("loom_image_to_rgb: mode %s needs %d channels, the pixels have %lld",
                          loom_image_mode_name(image->mode), channels, (long long)in.shape[2]);
    }
    if (!background)
        background = white;

    int64_t shape[3] = {in.shape[0], in.shape[1], 3};
    loom_tensor res = LOOM_TENSOR_EMPTY;
    if (loom_tensor_init(&res, LOOM_U8, 3, shape) != 0) {
        loom_tensor_free(&in);
        return LOOM_ERR;
    }
    const uint8_t *s = loom_tensor_data(&in);
    uint8_t *d = loom_tensor_data(&res);
    int64_t n = shape[0] * shape[1];
    for (int64_t i = 0; i < n; i++) {
        uint8_t rgba[4];
        pixel_to_rgba(image->mode, s + i * channels, rgba);
        if (alpha_mode == LOOM_ALPHA_COMPOSITE)
            composite_over(rgba, background, d + i * 3);
        else
            memcpy(d + i * 3, rgba, 3);
    }
    loom_tensor_free(&in);
    loom_tensor_free(out);
    *out = res;
    return LOOM_OK;
}
