/* Loom core: the EXIF orientation tag and the eight rotations and flips that
 * PIL.ImageOps.exif_transpose (Pillow 9.4) applies for it. */
#include "image_internal.h"

#include <string.h>

int loom_image_contiguous_hwc(loom_tensor *out, const loom_tensor *t, const char *op, const char *arg) {
    if (!t || !t->storage)
        return loom_error("%s: '%s' is empty", op, arg);
    if (t->dtype != LOOM_U8 || t->ndim != 3)
        return loom_error("%s: '%s' must be a u8 (H, W, C) image, got %s", op, arg, loom_shape_str(t).s);
    if (t->shape[0] < 1 || t->shape[1] < 1 || t->shape[2] < 1)
        return loom_error("%s: '%s' must have at least one row, column and channel, got %s", op, arg,
                          loom_shape_str(t).s);
    return loom_tensor_contiguous(out, t);
}

/* ---- EXIF (a TIFF structure): only IFD0 is read, as Pillow's getexif()
 * does for tag 0x0112. */

typedef struct tiff_reader {
    const uint8_t *data;
    size_t size;
    bool little_endian;
} tiff_reader;

static uint32_t tiff_u16(const tiff_reader *r, size_t at) {
    const uint8_t *p = r->data + at;
    return r->little_endian ? (uint32_t)p[0] | (uint32_t)p[1] << 8 : (uint32_t)p[0] << 8 | p[1];
}

static uint32_t tiff_u32(const tiff_reader *r, size_t at) {
    const uint8_t *p = r->data + at;
    if (r->little_endian)
        return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

enum { TIFF_TAG_ORIENTATION = 0x0112, TIFF_BYTE = 1, TIFF_SHORT = 3, TIFF_LONG = 4 };

int loom_image_exif_orientation(const void *data, size_t size) {
    tiff_reader r = {data, size, false};
    if (!data || size < 8)
        return 0;
    if (memcmp(data, "II", 2) == 0)
        r.little_endian = true;
    else if (memcmp(data, "MM", 2) != 0)
        return 0;
    if (tiff_u16(&r, 2) != 42)
        return 0;

    size_t ifd = tiff_u32(&r, 4);
    if (ifd > size - 2)
        return 0;
    size_t count = tiff_u16(&r, ifd);
    if (count > (size - ifd - 2) / 12)
        return 0;
    for (size_t i = 0; i < count; i++) {
        size_t entry = ifd + 2 + 12 * i;
        if (tiff_u16(&r, entry) != TIFF_TAG_ORIENTATION)
            continue;
        uint32_t type = tiff_u16(&r, entry + 2);
        uint32_t n = tiff_u32(&r, entry + 4);
        uint32_t value;
        /* A count other than 1 makes Pillow's value a tuple, which
         * exif_transpose ignores. */
        if (n != 1)
            return 0;
        if (type == TIFF_SHORT)
            value = tiff_u16(&r, entry + 8);
        else if (type == TIFF_LONG)
            value = tiff_u32(&r, entry + 8);
        else if (type == TIFF_BYTE)
            value = r.data[entry + 8];
        else
            return 0;
        return value >= 1 && value <= 8 ? (int)value : 0;
    }
    return 0;
}

/* ---- rotations and flips */

/* Source column and row of output pixel (x, y) for an input of w x h. */
static void source_of(int orientation, int64_t x, int64_t y, int64_t w, int64_t h, int64_t *sx, int64_t *sy) {
    switch (orientation) {
    case 2: *sx = w - 1 - x; *sy = y; break;             /* FLIP_LEFT_RIGHT */
    case 3: *sx = w - 1 - x; *sy = h - 1 - y; break;     /* ROTATE_180 */
    case 4: *sx = x; *sy = h - 1 - y; break;             /* FLIP_TOP_BOTTOM */
    case 5: *sx = y; *sy = x; break;                     /* TRANSPOSE */
    case 6: *sx = y; *sy = h - 1 - x; break;             /* ROTATE_270 (90 degrees clockwise) */
    case 7: *sx = w - 1 - y; *sy = h - 1 - x; break;     /* TRANSVERSE */
    case 8: *sx = w - 1 - y; *sy = x; break;             /* ROTATE_90 (90 degrees counter-clockwise) */
    default: *sx = x; *sy = y; break;
    }
}

int loom_image_orient(loom_tensor *out, const loom_tensor *src, int exif_orientation) {
    loom_tensor in = LOOM_TENSOR_EMPTY;
    if (!out)
        return loom_error("loom_image_orient: output is NULL");
    if (loom_image_contiguous_hwc(&in, src, "loom_image_orient", "src") != 0)
        return LOOM_ERR;

    int64_t h = in.shape[0], w = in.shape[1], c = in.shape[2];
    bool swap = exif_orientation >= 5 && exif_orientation <= 8;
    int64_t oh = swap ? w : h, ow = swap ? h : w;
    int64_t shape[3] = {oh, ow, c};
    loom_tensor res = LOOM_TENSOR_EMPTY;
    if (loom_tensor_init(&res, LOOM_U8, 3, shape) != 0) {
        loom_tensor_free(&in);
        return LOOM_ERR;
    }

    const uint8_t *s = loom_tensor_data(&in);
    uint8_t *d = loom_tensor_data(&res);
    for (int64_t y = 0; y < oh; y++) {
        for (int64_t x = 0; x < ow; x++) {
            int64_t sx, sy;
            source_of(exif_orientation, x, y, w, h, &sx, &sy);
            memcpy(d + (y * ow + x) * c, s + (sy * w + sx) * c, (size_t)c);
        }
    }
    loom_tensor_free(&in);
    loom_tensor_free(out);
    *out = res;
    return LOOM_OK;
}
