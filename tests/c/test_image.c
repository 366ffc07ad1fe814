/* Tests of core/image*.c. They run the Hugging Face preprocessing goldens in
 * tests/golden/clip_preprocess and the model cases, with the settings read
 * from each preprocessor_config.json, and Pillow's JPEG decode of rocket.jpg.
 * Synthetic PNG/BMP/GIF/JPEG files written here cover 16-bit, palette with
 * tRNS, gray+alpha, CMYK and EXIF orientation. Broken and unsupported files,
 * the pixel limit and resizing against a naive version of Pillow's algorithm
 * complete the set. */
#include <dirent.h>
#include <stdio.h>
#include <math.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <jpeglib.h>

#define STB_IMAGE_WRITE_IMPLEMENTATION
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#include <stb_image_write.h>
#pragma GCC diagnostic pop

#include "check.h"
#include "image.h"
#include "safetensors.h"

#define GOLDEN "tests/golden"

static char tmpdir[] = "/tmp/loom_test_image_XXXXXX";

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
    p[*n] = 0;
    fclose(f);
    return p;
}

/* ------------------------------------------------------------ byte buffers */

typedef struct buf {
    unsigned char *p;
    size_t n, cap;
} buf;

static void put(buf *b, const void *data, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
    }
    memcpy(b->p + b->n, data, n);
    b->n += n;
}

static void put_u8(buf *b, unsigned v) {
    unsigned char c = (unsigned char)v;
    put(b, &c, 1);
}

static void put_be32(buf *b, uint32_t v) {
    unsigned char c[4] = {(unsigned char)(v >> 24), (unsigned char)(v >> 16), (unsigned char)(v >> 8),
                          (unsigned char)v};
    put(b, c, 4);
}

static void put_le16(buf *b, unsigned v) {
    put_u8(b, v & 0xff);
    put_u8(b, (v >> 8) & 0xff);
}

/* ------------------------------------------------------ hand-made PNG files */

static uint32_t crc32_update(uint32_t crc, const unsigned char *p, size_t n) {
    crc = ~crc;
    for (size_t i = 0; i < n; i++) {
        crc ^= p[i];
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0xedb88320u & (0u - (crc & 1)));
    }
    return ~crc;
}

static void png_chunk(buf *b, const char *type, const void *data, size_t n) {
    put_be32(b, (uint32_t)n);
    size_t start = b->n;
    put(b, type, 4);
    if (n)
        put(b, data, n);
    put_be32(b, crc32_update(0, b->p + start, n + 4));
}

/* A zlib stream of stored (uncompressed) deflate blocks. */
static void zlib_stored(buf *out, const unsigned char *raw, size_t n) {
    uint32_t a = 1, s = 0;
    put_u8(out, 0x78);
    put_u8(out, 0x01);
    size_t pos = 0;
    do {
        size_t len = n - pos > 65535 ? 65535 : n - pos;
        put_u8(out, pos + len == n ? 1 : 0);
        put_le16(out, (unsigned)len);
        put_le16(out, (unsigned)(~len & 0xffff));
        put(out, raw + pos, len);
        pos += len;
    } while (pos < n);
    for (size_t i = 0; i < n; i++) {
        a = (a + raw[i]) % 65521;
        s = (s + a) % 65521;
    }
    put_be32(out, s << 16 | a);
}

typedef struct png_spec {
    uint32_t width, height;
    int bit_depth, color_type;
    const unsigned char *rows; /* unfiltered row bytes, height * row_bytes */
    size_t row_bytes;
    const unsigned char *palette; /* PLTE entries (RGB), or NULL */
    int palette_entries;
    const unsigned char *trns; /* tRNS bytes, or NULL */
    int trns_len;
    const unsigned char *exif; /* eXIf chunk body (a TIFF block), or NULL */
    size_t exif_len;
    bool exif_after_idat;
    bool omit_idat;
} png_spec;

static buf make_png(const png_spec *s) {
    buf b = {0}, z = {0}, raw = {0};
    unsigned char ihdr[13];

    put(&b, "\x89PNG\r\n\x1a\n", 8);
    for (int i = 0; i < 4; i++) {
        ihdr[i] = (unsigned char)(s->width >> (24 - 8 * i));
        ihdr[4 + i] = (unsigned char)(s->height >> (24 - 8 * i));
    }
    ihdr[8] = (unsigned char)s->bit_depth;
    ihdr[9] = (unsigned char)s->color_type;
    ihdr[10] = ihdr[11] = ihdr[12] = 0;
    png_chunk(&b, "IHDR", ihdr, 13);

    if (s->palette)
        png_chunk(&b, "PLTE", s->palette, (size_t)s->palette_entries * 3);
    if (s->trns)
        png_chunk(&b, "tRNS", s->trns, (size_t)s->trns_len);
    if (s->exif && !s->exif_after_idat)
        png_chunk(&b, "eXIf", s->exif, s->exif_len);

    if (!s->omit_idat) {
        for (uint32_t y = 0; y < s->height; y++) {
            put_u8(&raw, 0); /* filter type None */
            put(&raw, s->rows + y * s->row_bytes, s->row_bytes);
        }
        zlib_stored(&z, raw.p, raw.n);
        png_chunk(&b, "IDAT", z.p, z.n);
    }
    if (s->exif && s->exif_after_idat)
        png_chunk(&b, "eXIf", s->exif, s->exif_len);
    png_chunk(&b, "IEND", NULL, 0);
    free(z.p);
    free(raw.p);
    return b;
}

/* A TIFF block with IFD0 = {Make (ASCII, at an offset), Orientation}. */
static buf make_tiff_orientation(bool little_endian, unsigned orientation, unsigned type, unsigned count) {
    buf b = {0};
    unsigned char e[12];
    const char make[] = "Loom\0\0\0";
#define U16(v)                                                                                                 \
    do {                                                                                                       \
        unsigned v_ = (v);                                                                                     \
        if (little_endian) {                                                                                   \
            put_u8(&b, v_ & 0xff);                                                                             \
            put_u8(&b, v_ >> 8);                                                                               \
        } else {                                                                                               \
            put_u8(&b, v_ >> 8);                                                                               \
            put_u8(&b, v_ & 0xff);                                                                             \
        }                                                                                                      \
    } while (0)
#define U32(v)                                                                                                 \
    do {                                                                                                       \
        uint32_t w_ = (v);                                                                                     \
        if (little_endian) {                                                                                   \
            U16(w_ & 0xffff);                                                                                  \
            U16(w_ >> 16);                                                                                     \
        } else {                                                                                               \
            U16(w_ >> 16);                                                                                     \
            U16(w_ & 0xffff);                                                                                  \
        }                                                                                                      \
    } while (0)
    put(&b, little_endian ? "II" : "MM", 2);
    U16(42);
    U32(8);
    U16(2);
    /* Make: ASCII, 5 bytes, stored after the IFD at offset 8 + 2 + 24 + 4 = 38. */
    U16(0x010f);
    U16(2);
    U32(5);
    U32(38);
    U16(0x0112);
    U16(type);
    U32(count);
    if (type == 4) {
        U32(orientation);
    } else if (type == 1) {
        memset(e, 0, 4);
        e[0] = (unsigned char)orientation;
        put(&b, e, 4);
    } else {
        U16(orientation);
        U16(0);
    }
    U32(0); /* no next IFD */
    put(&b, make, 8);
#undef U16
#undef U32
    return b;
}

/* ------------------------------------------------------ hand-made GIF files */

/* LZW codes of 3 bits (minimum code size 2), with a clear code before every
 * two pixels so that the code size never grows. */
typedef struct bit_writer {
    buf *b;
    uint32_t acc;
    int nbits;
} bit_writer;

static void put_code(bit_writer *w, unsigned code) {
    w->acc |= (uint32_t)code << w->nbits;
    w->nbits += 3;
    while (w->nbits >= 8) {
        put_u8(w->b, w->acc & 0xff);
        w->acc >>= 8;
        w->nbits -= 8;
    }
}

static void gif_frame(buf *b, int w, int h, const unsigned char *indices, int transparent_index) {
    buf data = {0};
    bit_writer bw = {&data, 0, 0};
    if (transparent_index >= 0) {
        unsigned char gce[8] = {0x21, 0xf9, 4, 1, 0, 0, (unsigned char)transparent_index, 0};
        put(b, gce, 8);
    }
    put_u8(b, 0x2c);
    put_le16(b, 0);
    put_le16(b, 0);
    put_le16(b, (unsigned)w);
    put_le16(b, (unsigned)h);
    put_u8(b, 0);
    put_u8(b, 2); /* LZW minimum code size */
    for (int i = 0; i < w * h; i++) {
        if (i % 2 == 0)
            put_code(&bw, 4); /* clear */
        put_code(&bw, indices[i]);
    }
    put_code(&bw, 5); /* end of information */
    if (bw.nbits > 0)
        put_u8(&data, bw.acc & 0xff);
    for (size_t pos = 0; pos < data.n; pos += 255) {
        size_t len = data.n - pos > 255 ? 255 : data.n - pos;
        put_u8(b, (unsigned)len);
        put(b, data.p + pos, len);
    }
    put_u8(b, 0);
    free(data.p);
}

static buf make_gif(int w, int h, const unsigned char palette[12], const unsigned char *frame1, int transparent1,
                    const unsigned char *frame2) {
    buf b = {0};
    put(&b, "GIF89a", 6);
    put_le16(&b, (unsigned)w);
    put_le16(&b, (unsigned)h);
    put_u8(&b, 0x91); /* global colour table of 4 entries */
    put_u8(&b, 0);
    put_u8(&b, 0);
    put(&b, palette, 12);
    gif_frame(&b, w, h, frame1, transparent1);
    if (frame2)
        gif_frame(&b, w, h, frame2, -1);
    put_u8(&b, 0x3b);
    return b;
}

/* ------------------------------------------------------------- JPEG files */

/* Encode `pixels` (h, w, components) with libjpeg; `app1` (or NULL) is
 * written as an APP1 segment. */
static buf make_jpeg(const unsigned char *pixels, int w, int h, int components, J_COLOR_SPACE in_space,
                     J_COLOR_SPACE jpeg_space, int quality, const unsigned char *app1, size_t app1_len) {
    struct jpeg_compress_struct c;
    struct jpeg_error_mgr err;
    unsigned char *mem = NULL;
    unsigned long mem_len = 0;
    buf b = {0};

    c.err = jpeg_std_error(&err);
    jpeg_create_compress(&c);
    jpeg_mem_dest(&c, &mem, &mem_len);
    c.image_width = (JDIMENSION)w;
    c.image_height = (JDIMENSION)h;
    c.input_components = components;
    c.in_color_space = in_space;
    jpeg_set_defaults(&c);
    jpeg_set_colorspace(&c, jpeg_space);
    jpeg_set_quality(&c, quality, TRUE);
    jpeg_start_compress(&c, TRUE);
    if (app1)
        jpeg_write_marker(&c, JPEG_APP0 + 1, app1, (unsigned)app1_len);
    while (c.next_scanline < c.image_height) {
        JSAMPROW row = (JSAMPROW)(pixels + (size_t)c.next_scanline * w * components);
        jpeg_write_scanlines(&c, &row, 1);
    }
    jpeg_finish_compress(&c);
    jpeg_destroy_compress(&c);
    put(&b, mem, mem_len);
    free(mem);
    return b;
}

/* Decode with libjpeg's defaults into `out_space`, as an independent path. */
static unsigned char *plain_jpeg_decode(const buf *jpeg, J_COLOR_SPACE out_space, int *w, int *h, int *comps) {
    struct jpeg_decompress_struct d;
    struct jpeg_error_mgr err;
    d.err = jpeg_std_error(&err);
    jpeg_create_decompress(&d);
    jpeg_mem_src(&d, jpeg->p, (unsigned long)jpeg->n);
    jpeg_read_header(&d, TRUE);
    d.out_color_space = out_space;
    jpeg_start_decompress(&d);
    *w = (int)d.output_width;
    *h = (int)d.output_height;
    *comps = d.output_components;
    unsigned char *px = malloc((size_t)*w * *h * *comps);
    while (d.output_scanline < d.output_height) {
        JSAMPROW row = px + (size_t)d.output_scanline * *w * *comps;
        jpeg_read_scanlines(&d, &row, 1);
    }
    jpeg_finish_decompress(&d);
    jpeg_destroy_decompress(&d);
    return px;
}

/* ---------------------------------------------------------------- helpers */

static const uint8_t *u8_data(const loom_tensor *t) { return loom_tensor_data(t); }

/* Check the three dimensions of `t`, one CHECK each. */
static void check_shape3(const char *label, const loom_tensor *t, int64_t d0, int64_t d1, int64_t d2) {
    CHECK(t->ndim == 3, "%s: shape %s, expected 3 dimensions", label, loom_shape_str(t).s);
    CHECK(t->shape[0] == d0, "%s: shape %s, expected dimension 0 = %lld", label, loom_shape_str(t).s, (long long)d0);
    CHECK(t->shape[1] == d1, "%s: shape %s, expected dimension 1 = %lld", label, loom_shape_str(t).s, (long long)d1);
    CHECK(t->shape[2] == d2, "%s: shape %s, expected dimension 2 = %lld", label, loom_shape_str(t).s, (long long)d2);
}

/* Decode from memory, with `name` for messages. */
static int decode(loom_image *img, const buf *b, const char *name, const loom_image_decode_options *opt) {
    return loom_image_decode(img, b->p, b->n, name, opt);
}

/* Compare a u8 (H, W, 3) image with a u8 (3, H, W) reference. */
static void check_hwc_equals_chw(const char *label, const loom_tensor *hwc, const loom_tensor *chw_ref) {
    loom_tensor ref = LOOM_TENSOR_EMPTY;
    CHECK(chw_ref->ndim == 3, "%s: reference %s is not 3-dimensional", label, loom_shape_str(chw_ref).s);
    if (chw_ref->ndim == 3)
        check_shape3(label, hwc, chw_ref->shape[1], chw_ref->shape[2], chw_ref->shape[0]);
    if (hwc->ndim != 3 || chw_ref->ndim != 3 || hwc->shape[0] != chw_ref->shape[1] ||
        hwc->shape[1] != chw_ref->shape[2] || hwc->shape[2] != chw_ref->shape[0])
        return;
    CHECK_OK(loom_tensor_contiguous(&ref, chw_ref));
    int64_t h = hwc->shape[0], w = hwc->shape[1], c = hwc->shape[2], differ = 0, first = -1;
    int max_diff = 0;
    const uint8_t *a = u8_data(hwc), *r = u8_data(&ref);
    for (int64_t ch = 0; ch < c; ch++)
        for (int64_t i = 0; i < h * w; i++) {
            int d = abs((int)a[i * c + ch] - (int)r[ch * h * w + i]);
            if (d) {
                differ++;
                if (first < 0)
                    first = ch * h * w + i;
            }
            if (d > max_diff)
                max_diff = d;
        }
    CHECK(differ == 0, "%s: %lld of %lld u8 values differ (max |diff| %d, first at flat CHW index %lld)", label,
          (long long)differ, (long long)(h * w * c), max_diff, (long long)first);
    loom_tensor_free(&ref);
}

/* Compare two f32 tensors with the same number of elements. */
static void check_f32_close(const char *label, const loom_tensor *got, const loom_tensor *want, double tol) {
    loom_tensor a = LOOM_TENSOR_EMPTY, b = LOOM_TENSOR_EMPTY;
    int64_t n = loom_tensor_numel(got);
    CHECK(n == loom_tensor_numel(want), "%s: %s against reference %s", label, loom_shape_str(got).s,
          loom_shape_str(want).s);
    if (n != loom_tensor_numel(want))
        return;
    CHECK_OK(loom_tensor_contiguous(&a, got));
    CHECK_OK(loom_tensor_contiguous(&b, want));
    const float *x = loom_tensor_data(&a), *y = loom_tensor_data(&b);
    double max_diff = 0;
    int64_t at = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)x[i] - (double)y[i]);
        if (d > max_diff || isnan(d)) {
            max_diff = isnan(d) ? INFINITY : d;
            at = i;
        }
    }
    CHECK(max_diff <= tol, "%s: max |diff| %g at flat index %lld (got %.9g, want %.9g), tolerance %g", label,
          max_diff, (long long)at, x[at], y[at], tol);
    loom_tensor_free(&a);
    loom_tensor_free(&b);
}

static int read_config(loom_image_preprocess_config *cfg, const char *path) {
    size_t n;
    unsigned char *text = read_bytes(path, &n);
    CHECK(text != NULL, "cannot read %s", path);
    if (!text)
        return LOOM_ERR;
    int rc = loom_image_preprocess_config_from_json(cfg, (const char *)text, n, path);
    CHECK(rc == 0, "%s: %s", path, loom_last_error());
    free(text);
    return rc;
}

/* -------------------------------------------- golden: clip_preprocess cases */

/* One settings folder: every image listed under "sources" in values.json
 * whose <stem>.u8_chw is saved; pixel_values compared where saved. */
static void golden_setting(const char *setting, const cJSON *values) {
    char path[512];
    loom_image_preprocess_config cfg;
    loom_checkpoint *ck = NULL;

    snprintf(path, sizeof path, GOLDEN "/clip_preprocess/%s/preprocessor_config.json", setting);
    if (read_config(&cfg, path) != 0)
        return;
    snprintf(path, sizeof path, GOLDEN "/clip_preprocess/%s/pixel_values.safetensors", setting);
    CHECK_OK(loom_checkpoint_open(&ck, path));
    if (!ck)
        return;

    const cJSON *sources = cJSON_GetObjectItem(values, "sources");
    const cJSON *per_image = cJSON_GetObjectItem(cJSON_GetObjectItem(values, "settings"), setting);
    int compared = 0;
    for (const cJSON *src = sources ? sources->child : NULL; src; src = src->next) {
        char stem[128], key[192], label[512];
        snprintf(stem, sizeof stem, "%s", src->string);
        char *dot = strrchr(stem, '.');
        if (dot)
            *dot = 0;
        snprintf(key, sizeof key, "%s.u8_chw", stem);
        const loom_tensor *want_u8 = loom_checkpoint_get(ck, key);
        if (!want_u8)
            continue;
        snprintf(label, sizeof label, "%s/%s", setting, src->string);
        snprintf(path, sizeof path, GOLDEN "/clip_preprocess/images/%s", src->string);

        loom_image img = LOOM_IMAGE_EMPTY;
        loom_tensor pv = LOOM_TENSOR_EMPTY, u8 = LOOM_TENSOR_EMPTY;
        CHECK_OK(loom_image_load(&img, path, NULL));
        CHECK_OK(loom_image_preprocess(&pv, &u8, &img, &cfg));
        if (u8.storage)
            check_hwc_equals_chw(label, &u8, want_u8);

        snprintf(key, sizeof key, "%s.pixel_values", stem);
        const loom_tensor *want_pv = loom_checkpoint_get(ck, key);
        if (want_pv && pv.storage)
            check_f32_close(label, &pv, want_pv, 1e-6);

        /* values.json's resized size and crop offsets, where recorded. */
        const cJSON *info = cJSON_GetObjectItem(per_image, src->string);
        const cJSON *resized = cJSON_GetObjectItem(info, "resized_hw");
        const cJSON *size_wh = cJSON_GetObjectItem(src, "size_wh");
        if (resized && size_wh && cfg.resize_mode == LOOM_RESIZE_SHORTEST_EDGE) {
            int64_t h, w;
            CHECK_OK(loom_image_shortest_edge_size(cJSON_GetArrayItem(size_wh, 1)->valueint,
                                                   cJSON_GetArrayItem(size_wh, 0)->valueint, cfg.shortest_edge, &h,
                                                   &w));
            CHECK(h == cJSON_GetArrayItem(resized, 0)->valueint, "%s: resized height %lld, values.json has %d",
                  label, (long long)h, cJSON_GetArrayItem(resized, 0)->valueint);
            CHECK(w == cJSON_GetArrayItem(resized, 1)->valueint, "%s: resized width %lld, values.json has %d",
                  label, (long long)w, cJSON_GetArrayItem(resized, 1)->valueint);
        }
        compared++;
        loom_tensor_free(&pv);
        loom_tensor_free(&u8);
        loom_image_free(&img);
    }
    CHECK(compared == 5, "%s: compared %d images, expected the 5 of values.json", setting, compared);
    loom_checkpoint_close(ck);
}

static void test_golden_clip_preprocess(void) {
    size_t n;
    unsigned char *text = read_bytes(GOLDEN "/clip_preprocess/values.json", &n);
    CHECK(text != NULL, "cannot read values.json");
    if (!text)
        return;
    cJSON *values = cJSON_ParseWithLength((const char *)text, n);
    CHECK(values != NULL, "values.json is not valid JSON");

    /* Every subfolder that has a preprocessor_config.json is a setting. */
    DIR *dir = opendir(GOLDEN "/clip_preprocess");
    int settings = 0;
    for (struct dirent *e; dir && (e = readdir(dir));) {
        char path[512];
        struct stat st;
        snprintf(path, sizeof path, GOLDEN "/clip_preprocess/%s/preprocessor_config.json", e->d_name);
        if (e->d_name[0] == '.' || stat(path, &st) != 0)
            continue;
        golden_setting(e->d_name, values);
        settings++;
    }
    if (dir)
        closedir(dir);
    CHECK(settings >= 4, "found %d settings folders, expected at least 4", settings);
    cJSON_Delete(values);
    free(text);
}

/* ------------------------------------------------- golden: the model cases */

/* Preprocess `image` with the folder's preprocessor_config.json and compare
 * with inputs.safetensors: `u8_name`[u8_index] (if any) and the f32
 * pixel_values entry selected by `pv_index` along leading dimensions. */
static void golden_model_image(const char *folder, const char *image, const char *u8_name, int u8_index,
                               const char *pv_name, const int *pv_index, int pv_nindex) {
    char path[512], label[256];
    loom_image_preprocess_config cfg;
    loom_checkpoint *ck = NULL;
    loom_image img = LOOM_IMAGE_EMPTY;
    loom_tensor pv = LOOM_TENSOR_EMPTY, u8 = LOOM_TENSOR_EMPTY, view = LOOM_TENSOR_EMPTY;

    snprintf(label, sizeof label, "%s/%s", folder, image);
    snprintf(path, sizeof path, GOLDEN "/%s/preprocessor_config.json", folder);
    if (read_config(&cfg, path) != 0)
        return;
    snprintf(path, sizeof path, GOLDEN "/%s/inputs.safetensors", folder);
    CHECK_OK(loom_checkpoint_open(&ck, path));
    snprintf(path, sizeof path, GOLDEN "/%s/%s", folder, image);
    CHECK_OK(loom_image_load(&img, path, NULL));
    CHECK_OK(loom_image_preprocess(&pv, &u8, &img, &cfg));
    if (!ck || !pv.storage) {
        loom_checkpoint_close(ck);
        loom_image_free(&img);
        return;
    }

    const loom_tensor *want_u8 = u8_name ? loom_checkpoint_get(ck, u8_name) : NULL;
    CHECK(!u8_name || want_u8, "%s: no tensor '%s'", label, u8_name);
    if (want_u8) {
        if (u8_index >= 0)
            CHECK_OK(loom_tensor_select(&view, want_u8, 0, u8_index));
        else
            CHECK_OK(loom_tensor_view_of(&view, want_u8));
        check_hwc_equals_chw(label, &u8, &view);
        loom_tensor_free(&view);
    }
    const loom_tensor *want_pv = loom_checkpoint_get(ck, pv_name);
    CHECK(want_pv != NULL, "%s: no tensor '%s'", label, pv_name);
    if (want_pv) {
        CHECK_OK(loom_tensor_view_of(&view, want_pv));
        for (int i = 0; i < pv_nindex; i++)
            CHECK_OK(loom_tensor_select(&view, &view, 0, pv_index[i]));
        check_f32_close(label, &pv, &view, 1e-6);
        loom_tensor_free(&view);
    }
    loom_tensor_free(&pv);
    loom_tensor_free(&u8);
    loom_image_free(&img);
    loom_checkpoint_close(ck);
}

static void test_golden_models(void) {
    static const int first[] = {0}, idefics_first[] = {0, 0}, idefics_second[] = {0, 1},
                     flamingo_first[] = {0, 0, 0}, flamingo_second[] = {0, 1, 0};
    golden_model_image("llava", "chelsea.png", "resized_cropped_u8_chw", -1, "pixel_values", first, 1);
    golden_model_image("blip2", "astronaut.png", "resized_u8_chw", -1, "pixel_values", first, 1);
    golden_model_image("idefics", "chelsea.png", NULL, -1, "pixel_values", idefics_first, 2);
    golden_model_image("idefics", "coffee.png", NULL, -1, "pixel_values", idefics_second, 2);
    /* open_clip's transform: round-half-even crop, float32 division by 255. */
    golden_model_image("openflamingo", "chelsea.png", "resized_cropped_u8_chw", 0, "vision_x", flamingo_first, 3);
    golden_model_image("openflamingo", "rocket.jpg", "resized_cropped_u8_chw", 1, "vision_x", flamingo_second, 3);
}

/* ---------------------------------------------------- Pillow JPEG decoding */

static void test_rocket_matches_pillow(void) {
    loom_image jpg = LOOM_IMAGE_EMPTY, png = LOOM_IMAGE_EMPTY;
    CHECK_OK(loom_image_load(&jpg, GOLDEN "/clip_preprocess/images/rocket.jpg", NULL));
    CHECK_OK(loom_image_load(&png, GOLDEN "/clip_preprocess/images/rocket_decoded_by_pil.png", NULL));
    CHECK(jpg.format == LOOM_IMAGE_FORMAT_JPEG, "rocket.jpg: format %s", loom_image_format_name(jpg.format));
    CHECK(jpg.mode == LOOM_IMAGE_MODE_RGB, "rocket.jpg: mode %s", loom_image_mode_name(jpg.mode));
    check_shape3("rocket.jpg", &jpg.pixels, 427, 640, 3);
    if (jpg.pixels.storage && png.pixels.storage && jpg.pixels.shape[0] == png.pixels.shape[0] &&
        jpg.pixels.shape[1] == png.pixels.shape[1] && png.pixels.shape[2] == 3) {
        size_t n = (size_t)loom_tensor_numel(&jpg.pixels), differ = 0;
        const uint8_t *a = u8_data(&jpg.pixels), *b = u8_data(&png.pixels);
        for (size_t i = 0; i < n; i++)
            differ += a[i] != b[i];
        CHECK(differ == 0, "rocket.jpg: %zu of %zu values differ from Pillow's decode", differ, n);
    } else {
        CHECK(0, "rocket.jpg %s and Pillow's decode %s differ in shape", loom_shape_str(&jpg.pixels).s,
              loom_shape_str(&png.pixels).s);
    }
    loom_image_free(&jpg);
    loom_image_free(&png);

    /* Modes of the golden sources. */
    static const struct {
        const char *file;
        loom_image_mode mode;
    } modes[] = {{"camera_gray.png", LOOM_IMAGE_MODE_L},
                 {"coffee_rgba.png", LOOM_IMAGE_MODE_RGBA},
                 {"chelsea_portrait.png", LOOM_IMAGE_MODE_RGB}};
    for (size_t i = 0; i < sizeof modes / sizeof modes[0]; i++) {
        char path[256];
        loom_image img = LOOM_IMAGE_EMPTY;
        snprintf(path, sizeof path, GOLDEN "/clip_preprocess/images/%s", modes[i].file);
        CHECK_OK(loom_image_load(&img, path, NULL));
        CHECK(img.mode == modes[i].mode, "%s: mode %s, expected %s", modes[i].file, loom_image_mode_name(img.mode),
              loom_image_mode_name(modes[i].mode));
        loom_image_free(&img);
    }
}

/* ---------------------------------------------------------- PNG variants */

static void test_png_8bit_modes(void) {
    /* stb_image_write PNGs of 1-4 channels round-trip exactly. */
    for (int comp = 1; comp <= 4; comp++) {
        int w = 5, h = 3;
        unsigned char px[5 * 3 * 4];
        for (int i = 0; i < w * h * comp; i++)
            px[i] = (unsigned char)(i * 37 + comp * 11);
        char name[64];
        snprintf(name, sizeof name, "comp%d.png", comp);
        CHECK(stbi_write_png(tmp(name), w, h, comp, px, w * comp) != 0, "stbi_write_png %s", name);
        loom_image img = LOOM_IMAGE_EMPTY;
        CHECK_OK(loom_image_load(&img, tmp(name), NULL));
        static const loom_image_mode expected[] = {LOOM_IMAGE_MODE_L, LOOM_IMAGE_MODE_LA, LOOM_IMAGE_MODE_RGB,
                                                   LOOM_IMAGE_MODE_RGBA};
        CHECK(img.mode == expected[comp - 1], "%s: mode %s", name, loom_image_mode_name(img.mode));
        check_shape3(name, &img.pixels, h, w, comp);
        if (img.pixels.storage)
            CHECK(memcmp(u8_data(&img.pixels), px, (size_t)(w * h * comp)) == 0, "%s: pixels differ", name);

        /* convert("RGB"): L replicated, LA and RGBA lose alpha. */
        loom_tensor rgb = LOOM_TENSOR_EMPTY;
        CHECK_OK(loom_image_to_rgb(&rgb, &img, LOOM_ALPHA_DROP, NULL));
        int bad = 0;
        for (int i = 0; rgb.storage && i < w * h; i++)
            for (int c = 0; c < 3; c++) {
                int src_c = comp <= 2 ? 0 : c;
                bad += u8_data(&rgb)[i * 3 + c] != px[i * comp + src_c];
            }
        CHECK(bad == 0, "%s: %d RGB values differ from convert(\"RGB\")", name, bad);
        loom_tensor_free(&rgb);
        loom_image_free(&img);
    }
}

static void test_png_16bit(void) {
    /* 16-bit RGB and gray+alpha, rescaled with rounding. */
    static const uint16_t samples[] = {0, 1, 128, 129, 257, 32767, 32768, 32896, 65279, 65407, 65534, 65535};
    int w = 4, h = 1, nsamp = 12;
    unsigned char rows[24];
    for (int i = 0; i < nsamp; i++) {
        rows[2 * i] = (unsigned char)(samples[i] >> 8);
        rows[2 * i + 1] = (unsigned char)(samples[i] & 0xff);
    }
    for (int variant = 0; variant < 2; variant++) {
        png_spec s = {.width = (uint32_t)(variant ? 6 : w), .height = (uint32_t)h, .bit_depth = 16,
                      .color_type = variant ? 4 : 2, .rows = rows, .row_bytes = 24};
        buf png = make_png(&s);
        loom_image img = LOOM_IMAGE_EMPTY;
        CHECK_OK(decode(&img, &png, "sixteen.png", NULL));
        CHECK(img.bits_per_sample == 16, "16-bit PNG: bits_per_sample %d", img.bits_per_sample);
        CHECK(img.mode == (variant ? LOOM_IMAGE_MODE_LA : LOOM_IMAGE_MODE_RGB), "16-bit PNG: mode %s",
              loom_image_mode_name(img.mode));
        for (int i = 0; img.pixels.storage && i < nsamp; i++) {
            int want = (int)lround(samples[i] * 255.0 / 65535.0);
            CHECK(u8_data(&img.pixels)[i] == want, "16-bit sample %u -> %d, expected %d", samples[i],
                  u8_data(&img.pixels)[i], want);
        }
        loom_image_free(&img);
        free(png.p);
    }
}

static void test_png_palette_and_low_bit_depth(void) {
    /* Palette with tRNS: expanded to RGBA; convert("RGB") keeps the colours. */
    static const unsigned char plte[] = {255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30};
    static const unsigned char trns[] = {255, 128, 0};
    static const unsigned char idx[] = {0, 1, 2, 3, 3, 2};
    png_spec s = {.width = 3, .height = 2, .bit_depth = 8, .color_type = 3, .rows = idx, .row_bytes = 3,
                  .palette = plte, .palette_entries = 4, .trns = trns, .trns_len = 3};
    buf png = make_png(&s);
    loom_image img = LOOM_IMAGE_EMPTY;
    CHECK_OK(decode(&img, &png, "palette.png", NULL));
    CHECK(img.mode == LOOM_IMAGE_MODE_RGBA, "palette+tRNS: mode %s", loom_image_mode_name(img.mode));
    for (int i = 0; img.pixels.storage && i < 6; i++) {
        const uint8_t *p = u8_data(&img.pixels) + i * 4;
        int alpha = idx[i] < 3 ? trns[idx[i]] : 255;
        CHECK(memcmp(p, plte + idx[i] * 3, 3) == 0, "palette pixel %d = (%d,%d,%d)", i, p[0], p[1], p[2]);
        CHECK(p[3] == alpha, "palette pixel %d has alpha %d, expected %d", i, p[3], alpha);
    }
    loom_tensor rgb = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_image_to_rgb(&rgb, &img, LOOM_ALPHA_DROP, NULL));
    for (int i = 0; rgb.storage && i < 6; i++)
        CHECK(memcmp(u8_data(&rgb) + i * 3, plte + idx[i] * 3, 3) == 0, "palette RGB pixel %d", i);
    loom_tensor_free(&rgb);
    loom_image_free(&img);
    free(png.p);

    /* Palette without tRNS: RGB. */
    s.trns = NULL;
    png = make_png(&s);
    CHECK_OK(decode(&img, &png, "palette_opaque.png", NULL));
    CHECK(img.mode == LOOM_IMAGE_MODE_RGB, "palette: mode %s", loom_image_mode_name(img.mode));
    loom_image_free(&img);
    free(png.p);

    /* 2-bit grayscale: samples 0..3 scale to 0, 85, 170, 255 (as Pillow's L;2). */
    static const unsigned char two_bit[] = {0x1b}; /* 00 01 10 11 */
    png_spec g = {.width = 4, .height = 1, .bit_depth = 2, .color_type = 0, .rows = two_bit, .row_bytes = 1};
    png = make_png(&g);
    CHECK_OK(decode(&img, &png, "gray2.png", NULL));
    for (int i = 0; img.pixels.storage && i < 4; i++)
        CHECK(u8_data(&img.pixels)[i] == 85 * i, "2-bit gray sample %d -> %d", i, u8_data(&img.pixels)[i]);
    loom_image_free(&img);
    free(png.p);
}

/* ---------------------------------------------------------- BMP and GIF */

static size_t bmp_len;
static void bmp_sink(void *ctx, void *data, int size) {
    put(ctx, data, (size_t)size);
    bmp_len += (size_t)size;
}

static void test_bmp_and_gif(void) {
    unsigned char px[4 * 3 * 3];
    for (int i = 0; i < 36; i++)
        px[i] = (unsigned char)(i * 7);
    buf bmp = {0};
    CHECK(stbi_write_bmp_to_func(bmp_sink, &bmp, 4, 3, 3, px) != 0, "stbi_write_bmp_to_func failed");
    loom_image img = LOOM_IMAGE_EMPTY;
    CHECK_OK(decode(&img, &bmp, "image.bmp", NULL));
    CHECK(img.format == LOOM_IMAGE_FORMAT_BMP, "BMP: format %s", loom_image_format_name(img.format));
    CHECK(img.mode == LOOM_IMAGE_MODE_RGB, "BMP: mode %s", loom_image_mode_name(img.mode));
    if (img.pixels.storage)
        CHECK(memcmp(u8_data(&img.pixels), px, 36) == 0, "BMP pixels differ");
    loom_image_free(&img);
    free(bmp.p);

    /* GIF: the first of two frames; index 3 transparent. */
    static const unsigned char pal[12] = {200, 0, 0, 0, 150, 0, 0, 0, 100, 7, 8, 9};
    static const unsigned char f1[6] = {0, 1, 2, 3, 2, 1}, f2[6] = {2, 2, 2, 2, 2, 2};
    buf gif = make_gif(3, 2, pal, f1, 3, f2);
    CHECK_OK(decode(&img, &gif, "anim.gif", NULL));
    CHECK(img.format == LOOM_IMAGE_FORMAT_GIF, "GIF: format %s", loom_image_format_name(img.format));
    CHECK(img.mode == LOOM_IMAGE_MODE_RGBA, "GIF: mode %s", loom_image_mode_name(img.mode));
    check_shape3("GIF", &img.pixels, 2, 3, 4);
    for (int i = 0; img.pixels.storage && i < 6; i++) {
        const uint8_t *p = u8_data(&img.pixels) + i * 4;
        static const uint8_t clear[4] = {0, 0, 0, 0};
        if (f1[i] == 3) { /* the transparent index, left as stb_image leaves it */
            CHECK(memcmp(p, clear, 4) == 0, "GIF transparent pixel = (%d,%d,%d,%d)", p[0], p[1], p[2], p[3]);
        } else {
            CHECK(memcmp(p, pal + f1[i] * 3, 3) == 0, "GIF pixel %d = (%d,%d,%d)", i, p[0], p[1], p[2]);
            CHECK(p[3] == 255, "GIF pixel %d has alpha %d", i, p[3]);
        }
    }
    /* Composited on white, the transparent pixel becomes white. */
    loom_tensor rgb = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_image_to_rgb(&rgb, &img, LOOM_ALPHA_COMPOSITE, NULL));
    static const uint8_t white[3] = {255, 255, 255};
    if (rgb.storage)
        CHECK(memcmp(u8_data(&rgb) + 9, white, 3) == 0, "GIF transparent pixel on white = (%d,%d,%d)",
              u8_data(&rgb)[9], u8_data(&rgb)[10], u8_data(&rgb)[11]);
    loom_tensor_free(&rgb);
    loom_image_free(&img);
    free(gif.p);
}

/* ------------------------------------------------------------ JPEG files */

static void test_jpeg_rgb_and_gray(void) {
    int w = 37, h = 23;
    unsigned char *px = malloc((size_t)w * h * 3);
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++) {
            unsigned char *p = px + (y * w + x) * 3;
            p[0] = (unsigned char)(x * 7);
            p[1] = (unsigned char)(y * 11);
            p[2] = (unsigned char)((x * y) & 0xff);
        }
    for (int gray = 0; gray < 2; gray++) {
        buf jpg = gray ? make_jpeg(px, w, h, 1, JCS_GRAYSCALE, JCS_GRAYSCALE, 90, NULL, 0)
                       : make_jpeg(px, w, h, 3, JCS_RGB, JCS_YCbCr, 90, NULL, 0);
        int rw, rh, rc;
        unsigned char *ref = plain_jpeg_decode(&jpg, gray ? JCS_GRAYSCALE : JCS_RGB, &rw, &rh, &rc);
        loom_image img = LOOM_IMAGE_EMPTY;
        CHECK_OK(decode(&img, &jpg, gray ? "gray.jpg" : "rgb.jpg", NULL));
        CHECK(img.mode == (gray ? LOOM_IMAGE_MODE_L : LOOM_IMAGE_MODE_RGB), "JPEG mode %s",
              loom_image_mode_name(img.mode));
        check_shape3(gray ? "gray.jpg" : "rgb.jpg", &img.pixels, h, w, rc);
        if (img.pixels.storage)
            CHECK(memcmp(u8_data(&img.pixels), ref, (size_t)w * h * rc) == 0,
                  "%s JPEG differs from libjpeg's default decode", gray ? "gray" : "RGB");
        loom_image_free(&img);
        free(ref);
        free(jpg.p);
    }
    free(px);
}

/* Pillow's CMYK -> RGB on its inverted ("CMYK;I") samples, with exact
 * rounding of C * nk / 255 (which MULDIV255 equals for 8-bit operands). */
static void check_cmyk_jpeg(J_COLOR_SPACE jpeg_space, const char *name) {
    int w = 16, h = 16;
    unsigned char px[16 * 16 * 4];
    for (int i = 0; i < w * h; i++) {
        px[i * 4 + 0] = (unsigned char)(i * 3);
        px[i * 4 + 1] = (unsigned char)(255 - i);
        px[i * 4 + 2] = (unsigned char)((i * 29) & 0xff);
        px[i * 4 + 3] = (unsigned char)((i % 16) * 16);
    }

    buf jpg = make_jpeg(px, w, h, 4, JCS_CMYK, jpeg_space, 95, NULL, 0);
    int rw, rh, rc;
    unsigned char *raw = plain_jpeg_decode(&jpg, JCS_CMYK, &rw, &rh, &rc);
    loom_image img = LOOM_IMAGE_EMPTY;
    loom_tensor rgb = LOOM_TENSOR_EMPTY;
    CHECK_OK(decode(&img, &jpg, name, NULL));
    CHECK(img.mode == LOOM_IMAGE_MODE_CMYK, "%s: mode %s", name, loom_image_mode_name(img.mode));
    CHECK_OK(loom_image_to_rgb(&rgb, &img, LOOM_ALPHA_DROP, NULL));

    int bad_cmyk = 0, bad_rgb = 0;
    for (int i = 0; img.pixels.storage && rgb.storage && i < w * h; i++) {
        int inv[4];
        for (int c = 0; c < 4; c++) {
            inv[c] = 255 - raw[i * 4 + c];
            bad_cmyk += u8_data(&img.pixels)[i * 4 + c] != inv[c];
        }
        int nk = 255 - inv[3];
        for (int c = 0; c < 3; c++) {
            long v = nk - lround(inv[c] * nk / 255.0);
            if (v < 0)
                v = 0;
            if (v > 255)
                v = 255;
            bad_rgb += u8_data(&rgb)[i * 3 + c] != v;
        }
    }
    CHECK(bad_cmyk == 0, "%s: %d CMYK samples are not the inverted libjpeg output", name, bad_cmyk);
    CHECK(bad_rgb == 0, "%s: %d RGB values differ from Pillow's cmyk2rgb", name, bad_rgb);
    loom_tensor_free(&rgb);
    loom_image_free(&img);
    free(raw);
    free(jpg.p);
}

static void test_jpeg_cmyk(void) {
    check_cmyk_jpeg(JCS_CMYK, "adobe_cmyk.jpg");
    check_cmyk_jpeg(JCS_YCCK, "adobe_ycck.jpg");
}

/* ---------------------------------------------------------- orientation */

/* A 3x2 gray image a b c / d e f and where its pixels land for each EXIF
 * orientation, worked out by hand from the EXIF definitions. */
static const unsigned char orient_src[6] = {10, 20, 30, 40, 50, 60};
static const struct {
    int h, w;
    unsigned char px[6];
} orient_expected[9] = {
    [1] = {2, 3, {10, 20, 30, 40, 50, 60}}, [2] = {2, 3, {30, 20, 10, 60, 50, 40}},
    [3] = {2, 3, {60, 50, 40, 30, 20, 10}}, [4] = {2, 3, {40, 50, 60, 10, 20, 30}},
    [5] = {3, 2, {10, 40, 20, 50, 30, 60}}, [6] = {3, 2, {40, 10, 50, 20, 60, 30}},
    [7] = {3, 2, {60, 30, 50, 20, 40, 10}}, [8] = {3, 2, {30, 60, 20, 50, 10, 40}},
};

static void test_png_exif_orientation(void) {
    for (int o = 1; o <= 8; o++) {
        buf tiff = make_tiff_orientation(o % 2 == 0, (unsigned)o, 3, 1);
        png_spec s = {.width = 3, .height = 2, .bit_depth = 8, .color_type = 0, .rows = orient_src, .row_bytes = 3,
                      .exif = tiff.p, .exif_len = tiff.n, .exif_after_idat = o >= 5};
        buf png = make_png(&s);
        loom_image img = LOOM_IMAGE_EMPTY;
        CHECK_OK(decode(&img, &png, "oriented.png", NULL));
        CHECK(img.exif_orientation == o, "PNG eXIf orientation %d read as %d", o, img.exif_orientation);
        check_shape3("PNG orientation", &img.pixels, orient_expected[o].h, orient_expected[o].w, 1);
        if (img.pixels.storage && loom_tensor_numel(&img.pixels) == 6)
            CHECK(memcmp(u8_data(&img.pixels), orient_expected[o].px, 6) == 0,
                  "orientation %d: got %d %d %d %d %d %d", o, u8_data(&img.pixels)[0], u8_data(&img.pixels)[1],
                  u8_data(&img.pixels)[2], u8_data(&img.pixels)[3], u8_data(&img.pixels)[4],
                  u8_data(&img.pixels)[5]);
        loom_image_free(&img);

        /* ignore_exif_orientation keeps the stored layout. */
        loom_image_decode_options opt = {.ignore_exif_orientation = true};
        CHECK_OK(decode(&img, &png, "oriented.png", &opt));
        check_shape3("PNG orientation ignored", &img.pixels, 2, 3, 1);
        if (img.pixels.storage)
            CHECK(memcmp(u8_data(&img.pixels), orient_src, 6) == 0, "orientation %d ignored: layout changed", o);
        loom_image_free(&img);
        free(png.p);
        free(tiff.p);
    }
}

static void test_jpeg_exif_orientation(void) {
    /* 32x16: red | green over blue | white, in 8x8-aligned quadrants. */
    int w = 32, h = 16;
    unsigned char px[32 * 16 * 3];
    static const unsigned char quad[4][3] = {{255, 0, 0}, {0, 255, 0}, {0, 0, 255}, {255, 255, 255}};
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++)
            memcpy(px + (y * w + x) * 3, quad[(y >= 8) * 2 + (x >= 16)], 3);

    for (int o = 1; o <= 8; o++) {
        buf tiff = make_tiff_orientation(o % 2 == 1, (unsigned)o, o == 4 ? 4 : 3, 1);
        buf app1 = {0};
        put(&app1, "Exif\0\0", 6);
        put(&app1, tiff.p, tiff.n);
        buf jpg = make_jpeg(px, w, h, 3, JCS_RGB, JCS_YCbCr, 95, app1.p, app1.n);
        loom_image img = LOOM_IMAGE_EMPTY, stored = LOOM_IMAGE_EMPTY;
        loom_image_decode_options keep = {.ignore_exif_orientation = true};
        loom_tensor expect = LOOM_TENSOR_EMPTY;
        CHECK_OK(decode(&img, &jpg, "oriented.jpg", NULL));
        CHECK_OK(decode(&stored, &jpg, "oriented.jpg", &keep));
        CHECK(img.exif_orientation == o, "JPEG orientation %d read as %d", o, img.exif_orientation);
        CHECK(stored.exif_orientation == o, "JPEG orientation %d read as %d when ignored", o,
              stored.exif_orientation);
        bool swap = o >= 5;
        check_shape3("JPEG orientation", &img.pixels, swap ? w : h, swap ? h : w, 3);
        CHECK_OK(loom_image_orient(&expect, &stored.pixels, o));
        if (expect.storage && img.pixels.storage && loom_tensor_numel(&expect) == loom_tensor_numel(&img.pixels))
            CHECK(memcmp(u8_data(&expect), u8_data(&img.pixels), (size_t)loom_tensor_numel(&expect)) == 0,
                  "JPEG orientation %d: pixels differ from the oriented stored image", o);
        if (o == 6 && img.pixels.storage) {
            /* Rotated 90 degrees clockwise: the red top-left quadrant is now
             * the top-right one (output is 16 wide, 32 tall). */
            const uint8_t *p = u8_data(&img.pixels) + (4 * 16 + 12) * 3;
            CHECK(p[0] > 200, "orientation 6: top right red is %d, expected near 255", p[0]);
            CHECK(p[1] < 60, "orientation 6: top right green is %d, expected near 0", p[1]);
            CHECK(p[2] < 60, "orientation 6: top right blue is %d, expected near 0", p[2]);
        }
        loom_tensor_free(&expect);
        loom_image_free(&img);
        loom_image_free(&stored);
        free(jpg.p);
        free(app1.p);
        free(tiff.p);
    }
}

static void test_exif_parser(void) {
    buf t = make_tiff_orientation(true, 6, 3, 1);
    CHECK(loom_image_exif_orientation(t.p, t.n) == 6, "little-endian SHORT orientation");
    /* Every truncation either finds nothing or, once the entry is whole,
     * the tag; the IFD entry ends at byte 8 + 2 + 24 = 34. */
    for (size_t n = 0; n < t.n; n++) {
        int o = loom_image_exif_orientation(t.p, n);
        CHECK(o == (n >= 34 ? 6 : 0), "truncated to %zu bytes: orientation %d", n, o);
    }
    t.p[1] = 'X'; /* bad byte-order mark */
    CHECK(loom_image_exif_orientation(t.p, t.n) == 0, "bad byte order accepted");
    free(t.p);

    t = make_tiff_orientation(false, 8, 4, 1);
    CHECK(loom_image_exif_orientation(t.p, t.n) == 8, "big-endian LONG orientation");
    free(t.p);
    t = make_tiff_orientation(true, 3, 1, 1);
    CHECK(loom_image_exif_orientation(t.p, t.n) == 3, "BYTE orientation");
    free(t.p);
    t = make_tiff_orientation(true, 6, 3, 2);
    CHECK(loom_image_exif_orientation(t.p, t.n) == 0, "orientation with count 2 accepted");
    free(t.p);
    t = make_tiff_orientation(true, 6, 5, 1);
    CHECK(loom_image_exif_orientation(t.p, t.n) == 0, "RATIONAL orientation accepted");
    free(t.p);
    t = make_tiff_orientation(true, 9, 3, 1);
    CHECK(loom_image_exif_orientation(t.p, t.n) == 0, "orientation 9 accepted");
    free(t.p);

    /* IFD offset past the end, and an entry count larger than the data. */
    t = make_tiff_orientation(true, 6, 3, 1);
    t.p[4] = 0xf0;
    CHECK(loom_image_exif_orientation(t.p, t.n) == 0, "IFD offset past the end accepted");
    t.p[4] = 8;
    t.p[8] = 0xff;
    t.p[9] = 0xff;
    CHECK(loom_image_exif_orientation(t.p, t.n) == 0, "IFD count past the end accepted");
    free(t.p);
}

/* --------------------------------------------------- errors and limits */

static void test_unsupported_and_broken(void) {
    loom_image img = LOOM_IMAGE_EMPTY;
    static const struct {
        const char *name;
        const char *bytes;
        size_t n;
        const char *needle;
    } cases[] = {
        {"photo.png", "RIFF\x24\0\0\0WEBPVP8 \x18\0\0\0", 20, "WebP"},
        {"photo.heic", "\0\0\0\x18" "ftypheic\0\0\0\0mif1heic", 24, "HEIF"},
        {"photo.avif", "\0\0\0\x1c" "ftypavif\0\0\0\0avifmif1", 24, "AVIF"},
        {"scan.tif", "II*\0\x08\0\0\0", 8, "TIFF"},
        {"scan2.tif", "MM\0*\0\0\0\x08", 8, "TIFF"},
        {"picture.jxl", "\xff\x0a\x01\x02", 4, "JPEG XL"},
        {"doc.pdf", "%PDF-1.7\n", 9, "PDF"},
        {"mystery.bin", "\x01\x02\x03\x04\x05", 5, "unknown format (first bytes 01 02 03 04 05)"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        write_bytes(tmp(cases[i].name), cases[i].bytes, cases[i].n);
        CHECK_ERROR(loom_image_load(&img, tmp(cases[i].name), NULL), cases[i].needle);
        CHECK(strstr(loom_last_error(), cases[i].name) != NULL, "error does not name %s: %s", cases[i].name,
              loom_last_error());
    }
    CHECK_ERROR(loom_image_decode(&img, "", 0, "empty.png", NULL), "empty");
    CHECK_ERROR(loom_image_load(&img, tmp("missing.png"), NULL), "missing.png");

    /* Truncated PNG and JPEG. */
    int w = 64, h = 64;
    unsigned char *px = malloc((size_t)w * h * 3);
    uint32_t seed = 12345;
    for (int i = 0; i < w * h * 3; i++) {
        seed = seed * 1664525u + 1013904223u;
        px[i] = (unsigned char)(seed >> 24);
    }
    CHECK(stbi_write_png(tmp("full.png"), w, h, 3, px, w * 3) != 0, "stbi_write_png failed");
    size_t n;
    unsigned char *png = read_bytes(tmp("full.png"), &n);
    write_bytes(tmp("truncated.png"), png, n / 2);
    CHECK_ERROR(loom_image_load(&img, tmp("truncated.png"), NULL), "decoding PNG image");
    CHECK(strstr(loom_last_error(), "truncated.png") != NULL, "truncated PNG error: %s", loom_last_error());
    CHECK(strstr(loom_last_error(), "truncated or corrupt") != NULL, "truncated PNG error: %s",
          loom_last_error());

    /* Cuts inside the signature's tail, the IHDR chunk, the IDAT chunk and
     * just before IEND. Each cut follows a failed GIF decode, whose stale
     * stb_image reason must not show in the PNG message. */
    size_t cuts[] = {9, 12, 20, 33, 40, 60, n / 4, n / 2, n - 20};
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
        char cut_name[64];
        snprintf(cut_name, sizeof cut_name, "cut-%zu.png", cuts[i]);
        uint8_t gif[] = {'G', 'I', 'F', '8', '9', 'a'};
        loom_image_decode(&img, gif, sizeof gif, "stub.gif", NULL);
        CHECK_ERROR(loom_image_decode(&img, png, cuts[i], cut_name, NULL), "decoding PNG image");
        const char *msg = loom_last_error();
        CHECK(strstr(msg, cut_name) != NULL, "PNG cut at %zu bytes: error does not name it: %s", cuts[i], msg);
        CHECK(strstr(msg, "truncated or corrupt") != NULL, "PNG cut at %zu bytes: %s", cuts[i], msg);
        CHECK(strstr(msg, "''") == NULL, "PNG cut at %zu bytes: empty reason in %s", cuts[i], msg);
        CHECK(strstr(msg, "(null)") == NULL, "PNG cut at %zu bytes: null reason in %s", cuts[i], msg);
        CHECK(strstr(msg, "reports 'outofdata'") == NULL, "PNG cut at %zu bytes: bare reason in %s", cuts[i], msg);
        CHECK(strstr(msg, "reports 'unknown image type'") == NULL, "PNG cut at %zu bytes: bare reason in %s",
              cuts[i], msg);
    }
    free(png);

    buf jpg = make_jpeg(px, w, h, 3, JCS_RGB, JCS_YCbCr, 90, NULL, 0);
    write_bytes(tmp("truncated.jpg"), jpg.p, jpg.n / 2);
    CHECK_ERROR(loom_image_load(&img, tmp("truncated.jpg"), NULL), "Premature end of JPEG file");
    CHECK(strstr(loom_last_error(), "truncated.jpg") != NULL, "truncated JPEG error: %s", loom_last_error());
    /* A JPEG cut right after its header. */
    CHECK_ERROR(loom_image_decode(&img, jpg.p, 4, "stub.jpg", NULL), "stub.jpg");
    free(jpg.p);
    free(px);
    CHECK(img.pixels.storage == NULL, "a failed decode left pixels behind");
}

static void test_pixel_limit(void) {
    loom_image img = LOOM_IMAGE_EMPTY;
    size_t before = loom_owned_bytes();

    /* Header only: the limit must trigger before stb_image looks for IDAT. */
    png_spec s = {.width = 16384, .height = 16384, .bit_depth = 8, .color_type = 2, .omit_idat = true};
    buf png = make_png(&s);
    CHECK_ERROR(decode(&img, &png, "bomb.png", NULL), "16384x16384 = 268435456 pixels");
    CHECK(strstr(loom_last_error(), "limit of 178956970 pixels") != NULL, "bomb error: %s", loom_last_error());
    CHECK(strstr(loom_last_error(), "bomb.png") != NULL, "bomb error: %s", loom_last_error());
    CHECK(strstr(loom_last_error(), "(raise the max_pixels option to accept it)") != NULL, "bomb error: %s",
          loom_last_error());
    free(png.p);

    /* The same check through libjpeg's header, and the boundary. */
    unsigned char px[64 * 64];
    memset(px, 100, sizeof px);
    buf jpg = make_jpeg(px, 64, 64, 1, JCS_GRAYSCALE, JCS_GRAYSCALE, 80, NULL, 0);
    loom_image_decode_options tight = {.max_pixels = 4095};
    CHECK_ERROR(decode(&img, &jpg, "big.jpg", &tight), "64x64 = 4096 pixels, more than the limit of 4095");
    tight.max_pixels = 4096;
    CHECK_OK(decode(&img, &jpg, "big.jpg", &tight));
    loom_image_free(&img);
    free(jpg.p);

    tight.max_pixels = 259;
    CHECK_ERROR(loom_image_load(&img, GOLDEN "/clip_preprocess/images/tiny_20x13.png", &tight),
                "20x13 = 260 pixels, more than the limit of 259");
    CHECK(loom_owned_bytes() == before, "owned bytes %zu after rejected images, %zu before", loom_owned_bytes(),
          before);
}

/* stb_image allocates through loom_alloc, so its buffers are counted. */
static void test_stb_uses_core_allocator(void) {
    unsigned char px[40 * 30 * 3];
    memset(px, 7, sizeof px);
    CHECK(stbi_write_png(tmp("alloc.png"), 40, 30, 3, px, 40 * 3) != 0, "stbi_write_png failed");
    size_t before = loom_owned_bytes();
    loom_image img = LOOM_IMAGE_EMPTY;
    CHECK_OK(loom_image_load(&img, tmp("alloc.png"), NULL));
    size_t during = loom_owned_bytes();
    CHECK(during >= before + sizeof px, "owned bytes grew by %zu while holding a %zu-byte stb image",
          during - before, sizeof px);
    loom_image_free(&img);
    CHECK(loom_owned_bytes() == before, "owned bytes %zu after free, %zu before", loom_owned_bytes(), before);
}

/* ---------------------------------------------------------------- resize */

/* A naive implementation of Pillow 9.4's ImagingResample for one line. Each
 * output sample recomputes its filter weights in double and normalises them
 * to sum 1. It converts them to fixed point with 22 fractional bits (rounding
 * away from zero), accumulates from one half and clips to u8. */
static double ref_filter(loom_resample f, double x) {
    x = fabs(x);
    if (f == LOOM_RESAMPLE_BILINEAR)
        return x < 1.0 ? 1.0 - x : 0.0;
    if (x < 1.0)
        return (1.5 * x - 2.5) * x * x + 1;
    if (x < 2.0)
        return (((x - 5) * x + 8) * x - 4) * -0.5;
    return 0.0;
}

static void ref_resample_line(const uint8_t *in, size_t in_step, int n, uint8_t *out, size_t out_step, int m,
                              loom_resample f) {
    double scale = (double)n / m, fs = scale < 1.0 ? 1.0 : scale;
    double support = (f == LOOM_RESAMPLE_BICUBIC ? 2.0 : 1.0) * fs;
    double *w = malloc(sizeof(double) * (size_t)(n + 1));
    for (int o = 0; o < m; o++) {
        double center = (o + 0.5) * scale, total = 0;
        int lo = (int)(center - support + 0.5), hi = (int)(center + support + 0.5);
        lo = lo < 0 ? 0 : lo;
        hi = hi > n ? n : hi;
        for (int i = lo; i < hi; i++) {
            w[i - lo] = ref_filter(f, (i - center + 0.5) * (1.0 / fs));
            total += w[i - lo];
        }
        int32_t acc = 1 << 21;
        for (int i = lo; i < hi; i++) {
            double k = total != 0.0 ? w[i - lo] / total : w[i - lo];
            int32_t fixed = (int32_t)(k < 0 ? -0.5 + k * 4194304.0 : 0.5 + k * 4194304.0);
            acc += in[(size_t)i * in_step] * fixed;
        }
        int v = acc < 0 ? 0 : acc >> 22;
        out[(size_t)o * out_step] = (uint8_t)(v > 255 ? 255 : v);
    }
    free(w);
}

/* Horizontal pass over every row (when the width changes), then vertical. */
static uint8_t *ref_resize(const uint8_t *src, int h, int w, int c, int oh, int ow, loom_resample f) {
    uint8_t *mid = malloc((size_t)h * ow * c), *out = malloc((size_t)oh * ow * c);
    for (int y = 0; y < h; y++)
        for (int ch = 0; ch < c; ch++) {
            if (ow != w)
                ref_resample_line(src + (size_t)y * w * c + ch, (size_t)c, w, mid + (size_t)y * ow * c + ch,
                                  (size_t)c, ow, f);
            else
                for (int x = 0; x < w; x++)
                    mid[((size_t)y * w + x) * c + ch] = src[((size_t)y * w + x) * c + ch];
        }
    for (int x = 0; x < ow; x++)
        for (int ch = 0; ch < c; ch++) {
            if (oh != h)
                ref_resample_line(mid + (size_t)x * c + ch, (size_t)ow * c, h, out + (size_t)x * c + ch,
                                  (size_t)ow * c, oh, f);
            else
                for (int y = 0; y < h; y++)
                    out[((size_t)y * ow + x) * c + ch] = mid[((size_t)y * ow + x) * c + ch];
        }
    free(mid);
    return out;
}

static uint32_t rng_state = 0x9e3779b9u;
static uint32_t rng(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 17;
    rng_state ^= rng_state << 5;
    return rng_state;
}

static void check_resize_case(int h, int w, int c, int oh, int ow, loom_resample f, bool smooth) {
    int64_t shape[3] = {h, w, c};
    loom_tensor src = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_tensor_init(&src, LOOM_U8, 3, shape));
    uint8_t *s = loom_tensor_data(&src);
    for (int64_t i = 0; i < (int64_t)h * w * c; i++)
        s[i] = smooth ? (uint8_t)((i / c) % 251) : (uint8_t)(rng() >> 24);
    CHECK_OK(loom_image_resize(&out, &src, oh, ow, f));
    uint8_t *want = ref_resize(s, h, w, c, oh, ow, f);
    if (out.storage) {
        check_shape3("resize", &out, oh, ow, c);
        int64_t differ = 0;
        for (int64_t i = 0; i < (int64_t)oh * ow * c; i++)
            differ += u8_data(&out)[i] != want[i];
        CHECK(differ == 0, "resize %dx%dx%d -> %dx%d (%s): %lld values differ from the naive version", h, w, c, oh,
              ow, f == LOOM_RESAMPLE_BICUBIC ? "bicubic" : "bilinear", (long long)differ);
    }
    free(want);
    loom_tensor_free(&out);
    loom_tensor_free(&src);
}

static void test_resize_against_naive(void) {
    static const struct {
        int h, w, c, oh, ow;
    } fixed[] = {
        {13, 20, 3, 224, 344}, {451, 300, 3, 336, 224}, {7, 9, 1, 3, 4},      {1, 1000, 3, 1, 7},
        {1000, 1, 3, 5, 1},    {1, 1, 3, 5, 3},         {2, 3, 3, 2, 3},      {17, 5, 2, 17, 11},
        {5, 17, 4, 11, 17},    {64, 64, 4, 63, 65},     {1000, 3, 1, 1, 1},   {3, 2, 3, 1000, 1},
    };
    for (int f = LOOM_RESAMPLE_BILINEAR; f <= LOOM_RESAMPLE_BICUBIC; f++) {
        for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++)
            check_resize_case(fixed[i].h, fixed[i].w, fixed[i].c, fixed[i].oh, fixed[i].ow, (loom_resample)f,
                              i % 2 == 0);
        for (int i = 0; i < 40; i++)
            check_resize_case(1 + (int)(rng() % 60), 1 + (int)(rng() % 60), 1 + (int)(rng() % 4),
                              1 + (int)(rng() % 80), 1 + (int)(rng() % 80), (loom_resample)f, false);
    }

    /* A non-contiguous view (every other column) resizes like its copy. */
    int64_t shape[3] = {9, 12, 3};
    loom_tensor src = LOOM_TENSOR_EMPTY, view = LOOM_TENSOR_EMPTY, copy = LOOM_TENSOR_EMPTY;
    loom_tensor a = LOOM_TENSOR_EMPTY, b = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_tensor_init(&src, LOOM_U8, 3, shape));
    for (int i = 0; i < 9 * 12 * 3; i++)
        ((uint8_t *)loom_tensor_data(&src))[i] = (uint8_t)(rng() >> 24);
    CHECK_OK(loom_tensor_narrow(&view, &src, 1, 2, 7));
    CHECK_OK(loom_tensor_clone(&copy, &view));
    CHECK_OK(loom_image_resize(&a, &view, 4, 5, LOOM_RESAMPLE_BICUBIC));
    CHECK_OK(loom_image_resize(&b, &copy, 4, 5, LOOM_RESAMPLE_BICUBIC));
    if (a.storage && b.storage)
        CHECK(memcmp(u8_data(&a), u8_data(&b), 4 * 5 * 3) == 0, "resize of a view differs from its copy");

    CHECK_ERROR(loom_image_resize(&a, &src, 0, 5, LOOM_RESAMPLE_BICUBIC), "invalid output size 0x5");
    CHECK_ERROR(loom_image_resize(&a, &src, 4, 5, (loom_resample)1), "unsupported resample filter 1");
    loom_tensor f32 = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_tensor_init(&f32, LOOM_F32, 3, shape));
    CHECK_ERROR(loom_image_resize(&a, &f32, 4, 5, LOOM_RESAMPLE_BICUBIC), "must be a u8 (H, W, C) image");
    loom_tensor_free(&f32);
    loom_tensor_free(&a);
    loom_tensor_free(&b);
    loom_tensor_free(&copy);
    loom_tensor_free(&view);
    loom_tensor_free(&src);
}

/* ------------------------------------------------- compositing, crop, pad */

static loom_image rgba_image(int n, const uint8_t *rgba) {
    loom_image img = LOOM_IMAGE_EMPTY;
    int64_t shape[3] = {1, n, 4};
    loom_tensor_init(&img.pixels, LOOM_U8, 3, shape);
    memcpy(loom_tensor_data(&img.pixels), rgba, (size_t)n * 4);
    img.mode = LOOM_IMAGE_MODE_RGBA;
    return img;
}

static void test_alpha_composite(void) {
    /* Every colour value under every alpha, onto white and onto grey. */
    static const uint8_t backgrounds[2][3] = {{255, 255, 255}, {128, 64, 3}};
    uint8_t *rgba = malloc(256 * 256 * 4);
    for (int a = 0; a < 256; a++)
        for (int v = 0; v < 256; v++) {
            uint8_t *p = rgba + (a * 256 + v) * 4;
            p[0] = (uint8_t)v;
            p[1] = (uint8_t)(255 - v);
            p[2] = (uint8_t)(v / 2);
            p[3] = (uint8_t)a;
        }
    loom_image img = rgba_image(256 * 256, rgba);
    for (int bgi = 0; bgi < 2; bgi++) {
        const uint8_t *bg = backgrounds[bgi];
        loom_tensor rgb = LOOM_TENSOR_EMPTY;
        CHECK_OK(loom_image_to_rgb(&rgb, &img, LOOM_ALPHA_COMPOSITE, bg));
        /* Over an opaque background, Pillow's fixed-point formula equals
         * (s * a + bg * (255 - a)) / 255 rounded to nearest (checked for all
         * 2^24 combinations when this test was written). */
        int not_rounded = 0, opaque_changed = 0, clear_not_bg = 0;
        for (int i = 0; rgb.storage && i < 256 * 256; i++) {
            const uint8_t *s = rgba + i * 4, *o = u8_data(&rgb) + i * 3;
            for (int c = 0; c < 3; c++) {
                long rounded = lround((s[c] * s[3] + bg[c] * (255.0 - s[3])) / 255.0);
                not_rounded += o[c] != rounded;
                opaque_changed += s[3] == 255 && o[c] != s[c];
                clear_not_bg += s[3] == 0 && o[c] != bg[c];
            }
        }
        CHECK(not_rounded == 0, "background %d: %d composited values differ from the rounded blend", bgi,
              not_rounded);
        CHECK(opaque_changed == 0, "background %d: %d opaque values changed", bgi, opaque_changed);
        CHECK(clear_not_bg == 0, "background %d: %d transparent pixels are not the background", bgi, clear_not_bg);
        loom_tensor_free(&rgb);
    }
    loom_image_free(&img);
    free(rgba);

    /* Dropping alpha keeps the colour under transparent pixels. */
    static const uint8_t px[8] = {1, 2, 3, 0, 250, 251, 252, 17};
    img = rgba_image(2, px);
    loom_tensor rgb = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_image_to_rgb(&rgb, &img, LOOM_ALPHA_DROP, NULL));
    if (rgb.storage) {
        CHECK(u8_data(&rgb)[0] == 1, "alpha drop: red under alpha 0 is %d, expected 1", u8_data(&rgb)[0]);
        CHECK(u8_data(&rgb)[5] == 252, "alpha drop: blue under alpha 17 is %d, expected 252", u8_data(&rgb)[5]);
    }
    img.mode = LOOM_IMAGE_MODE_RGB;
    CHECK_ERROR(loom_image_to_rgb(&rgb, &img, LOOM_ALPHA_DROP, NULL), "mode RGB needs 3 channels");
    loom_tensor_free(&rgb);
    loom_image_free(&img);
}

static loom_tensor ramp_image(int h, int w, int c) {
    loom_tensor t = LOOM_TENSOR_EMPTY;
    int64_t shape[3] = {h, w, c};
    loom_tensor_init(&t, LOOM_U8, 3, shape);
    for (int i = 0; i < h * w * c; i++)
        ((uint8_t *)loom_tensor_data(&t))[i] = (uint8_t)(1 + i);
    return t;
}

static void test_center_crop(void) {
    /* (image width, crop width, Hugging Face left, torchvision left) */
    static const int cases[][4] = {{10, 5, 2, 2}, {11, 4, 3, 4}, {13, 4, 4, 4}, {15, 4, 5, 6}, {8, 8, 0, 0}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        loom_tensor img = ramp_image(1, cases[i][0], 1), out = LOOM_TENSOR_EMPTY;
        for (int r = 0; r < 2; r++) {
            CHECK_OK(loom_image_center_crop(&out, &img, 1, cases[i][1],
                                            r ? LOOM_CROP_ROUND_HALF_EVEN : LOOM_CROP_FLOOR));
            int left = u8_data(&out)[0] - 1;
            check_shape3("crop", &out, 1, cases[i][1], 1);
            CHECK(left == cases[i][2 + r], "crop %d of %d (%s): left %d, expected %d", cases[i][1], cases[i][0],
                  r ? "round" : "floor", left, cases[i][2 + r]);
        }
        loom_tensor_free(&out);
        loom_tensor_free(&img);
    }

    /* A crop larger than the image pads with zeros: 3 wide in 6 is placed at
     * ceil(3/2) = 2 (Hugging Face) or 3 // 2 = 1 (torchvision); rows too. */
    loom_tensor img = ramp_image(2, 3, 1), out = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_image_center_crop(&out, &img, 5, 6, LOOM_CROP_FLOOR));
    static const uint8_t hf[30] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 0,
                                   0, 0, 4, 5, 6, 0, 0, 0, 0, 0, 0, 0};
    check_shape3("padded crop", &out, 5, 6, 1);
    if (out.storage)
        CHECK(memcmp(u8_data(&out), hf, 30) == 0, "Hugging Face padded crop layout");
    CHECK_OK(loom_image_center_crop(&out, &img, 5, 6, LOOM_CROP_ROUND_HALF_EVEN));
    static const uint8_t tv[30] = {0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 0, 0, 0, 4, 5, 6, 0, 0,
                                   0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    if (out.storage)
        CHECK(memcmp(u8_data(&out), tv, 30) == 0, "torchvision padded crop layout");
    CHECK_ERROR(loom_image_center_crop(&out, &img, 0, 6, LOOM_CROP_FLOOR), "invalid crop size 0x6");
    loom_tensor_free(&out);
    loom_tensor_free(&img);
}

static void test_pad_to_square(void) {
    uint8_t fill[3];
    static const double clip_mean[3] = {0.48145466, 0.4578275, 0.40821073};
    loom_image_fill_from_mean(fill, clip_mean);
    static const uint8_t llava_fill[3] = {122, 116, 104};
    CHECK(memcmp(fill, llava_fill, 3) == 0, "LLaVA fill (%d,%d,%d), expected (122,116,104)", fill[0], fill[1],
          fill[2]);

    /* Wide: 2x4 -> 4x4 with the image on rows 1-2. Tall: 3x1 -> column 1. */
    loom_tensor wide = ramp_image(2, 4, 3), tall = ramp_image(3, 1, 3), out = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_image_pad_to_square(&out, &wide, fill));
    int bad = 0;
    for (int y = 0; out.storage && y < 4; y++)
        for (int x = 0; x < 4; x++)
            for (int c = 0; c < 3; c++) {
                int want = (y == 1 || y == 2) ? 1 + ((y - 1) * 4 + x) * 3 + c : fill[c];
                bad += u8_data(&out)[(y * 4 + x) * 3 + c] != want;
            }
    check_shape3("wide pad", &out, 4, 4, 3);
    CHECK(bad == 0, "wide pad: %d wrong values", bad);
    CHECK_OK(loom_image_pad_to_square(&out, &tall, fill));
    bad = 0;
    for (int y = 0; out.storage && y < 3; y++)
        for (int x = 0; x < 3; x++)
            for (int c = 0; c < 3; c++) {
                int want = x == 1 ? 1 + y * 3 + c : fill[c];
                bad += u8_data(&out)[(y * 3 + x) * 3 + c] != want;
            }
    check_shape3("tall pad", &out, 3, 3, 3);
    CHECK(bad == 0, "tall pad: %d wrong values", bad);
    loom_tensor_free(&out);
    loom_tensor_free(&wide);
    loom_tensor_free(&tall);
}

static void test_normalize(void) {
    /* All 256 values in channel 0, reversed in 1, constant in 2; (H, W) = (16, 16). */
    int64_t shape[3] = {16, 16, 3};
    loom_tensor img = LOOM_TENSOR_EMPTY, out = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_tensor_init(&img, LOOM_U8, 3, shape));
    uint8_t *p = loom_tensor_data(&img);
    for (int i = 0; i < 256; i++) {
        p[i * 3] = (uint8_t)i;
        p[i * 3 + 1] = (uint8_t)(255 - i);
        p[i * 3 + 2] = 77;
    }

    static const double mean[3] = {0.48145466, 0.4578275, 0.40821073}, std[3] = {0.26862954, 0.26130258, 0.27577711};
    for (int mode = LOOM_RESCALE_NONE; mode <= LOOM_RESCALE_DIVIDE_255; mode++) {
        CHECK_OK(loom_image_normalize(&out, &img, (loom_rescale_mode)mode, 1.0 / 255.0, mean, std));
        CHECK(out.dtype == LOOM_F32, "normalize dtype %s", loom_dtype_name(out.dtype));
        check_shape3("normalize", &out, 3, 16, 16);
        int bad = 0;
        const float *o = loom_tensor_data(&out);
        for (int c = 0; out.storage && c < 3; c++)
            for (int i = 0; i < 256; i++) {
                uint8_t v = p[i * 3 + c];
                float x = mode == LOOM_RESCALE_MULTIPLY    ? (float)((double)v * (1.0 / 255.0))
                          : mode == LOOM_RESCALE_DIVIDE_255 ? (float)v / 255.0f
                                                            : (float)v;
                volatile float y = (x - (float)mean[c]) / (float)std[c];
                bad += memcmp(&o[c * 256 + i], (const void *)&y, 4) != 0;
            }
        CHECK(bad == 0, "rescale mode %d: %d values differ from the float32 formula", mode, bad);
    }

    CHECK_OK(loom_image_normalize(&out, &img, LOOM_RESCALE_MULTIPLY, 0.5, NULL, NULL));
    if (out.storage)
        CHECK(((float *)loom_tensor_data(&out))[255] == 127.5f, "rescale by 0.5 without normalisation: %g",
              ((float *)loom_tensor_data(&out))[255]);
    static const double zero_std[3] = {1, 0, 1};
    CHECK_ERROR(loom_image_normalize(&out, &img, LOOM_RESCALE_MULTIPLY, 0.5, mean, zero_std), "channel 1");
    loom_tensor_free(&out);
    loom_tensor_free(&img);
}

static void test_shortest_edge_size(void) {
    static const int64_t cases[][5] = {
        /* H, W, S, expected H, expected W (README of clip_preprocess) */
        {451, 300, 224, 336, 224}, {427, 640, 224, 224, 335}, {512, 512, 336, 336, 336},
        {13, 20, 336, 336, 516},   {400, 600, 336, 336, 504}, {1, 1000, 224, 224, 224000},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int64_t h = 0, w = 0;
        CHECK_OK(loom_image_shortest_edge_size(cases[i][0], cases[i][1], cases[i][2], &h, &w));
        CHECK(h == cases[i][3], "%lldx%lld shortest edge %lld: height %lld", (long long)cases[i][0],
              (long long)cases[i][1], (long long)cases[i][2], (long long)h);
        CHECK(w == cases[i][4], "%lldx%lld shortest edge %lld: width %lld", (long long)cases[i][0],
              (long long)cases[i][1], (long long)cases[i][2], (long long)w);
    }
    int64_t h, w;
    CHECK_ERROR(loom_image_shortest_edge_size(0, 5, 224, &h, &w), "image 0x5");
}

/* ------------------------------------------------------- config and sizes */

static void test_config_json(void) {
    loom_image_preprocess_config cfg;
    const char *clip_int = "{\"image_processor_type\": \"CLIPImageProcessor\", \"size\": 336, \"crop_size\": 336}";
    CHECK_OK(loom_image_preprocess_config_from_json(&cfg, clip_int, strlen(clip_int), "clip.json"));
    CHECK(cfg.resize_mode == LOOM_RESIZE_SHORTEST_EDGE, "CLIP integer size: resize mode %d", cfg.resize_mode);
    CHECK(cfg.shortest_edge == 336, "CLIP integer size: shortest edge %lld", (long long)cfg.shortest_edge);
    CHECK(cfg.crop_height == 336, "CLIP integer crop: height %lld", (long long)cfg.crop_height);
    CHECK(cfg.crop_width == 336, "CLIP integer crop: width %lld", (long long)cfg.crop_width);
    CHECK(cfg.center_crop, "CLIP default do_center_crop");
    CHECK(cfg.resample == LOOM_RESAMPLE_BICUBIC, "CLIP default resample %d", cfg.resample);

    const char *blip = "{\"image_processor_type\": \"BlipImageProcessor\"}";
    CHECK_OK(loom_image_preprocess_config_from_json(&cfg, blip, strlen(blip), "blip.json"));
    CHECK(cfg.resize_mode == LOOM_RESIZE_EXACT, "BLIP default resize mode %d", cfg.resize_mode);
    CHECK(cfg.resize_height == 384, "BLIP default height %lld", (long long)cfg.resize_height);
    CHECK(!cfg.center_crop, "BLIP crops by default");

    const char *siglip = "{\"image_processor_type\": \"SiglipImageProcessor\", \"do_normalize\": false}";
    CHECK_OK(loom_image_preprocess_config_from_json(&cfg, siglip, strlen(siglip), "siglip.json"));
    CHECK(cfg.resample == LOOM_RESAMPLE_BILINEAR, "SigLIP default resample %d", cfg.resample);
    CHECK(cfg.mean[0] == 0.5, "SigLIP default mean %g", cfg.mean[0]);
    CHECK(!cfg.normalize, "SigLIP do_normalize false ignored");
    CHECK(cfg.resize_width == 224, "SigLIP default width %lld", (long long)cfg.resize_width);

    char path[256];
    snprintf(path, sizeof path, GOLDEN "/openflamingo/preprocessor_config.json");
    if (read_config(&cfg, path) == 0) {
        CHECK(cfg.crop_rounding == LOOM_CROP_ROUND_HALF_EVEN, "open_clip crop rounding %d", cfg.crop_rounding);
        CHECK(cfg.rescale_mode == LOOM_RESCALE_DIVIDE_255, "open_clip rescale mode %d", cfg.rescale_mode);
        CHECK(cfg.shortest_edge == 56, "open_clip shortest edge %lld", (long long)cfg.shortest_edge);
        CHECK(cfg.crop_width == 56, "open_clip crop width %lld", (long long)cfg.crop_width);
    }
    snprintf(path, sizeof path, GOLDEN "/clip_preprocess/idefics_224/preprocessor_config.json");
    if (read_config(&cfg, path) == 0) {
        CHECK(cfg.alpha_mode == LOOM_ALPHA_COMPOSITE, "IDEFICS alpha mode %d", cfg.alpha_mode);
        CHECK(cfg.resize_mode == LOOM_RESIZE_EXACT, "IDEFICS resize mode %d", cfg.resize_mode);
        CHECK(cfg.resize_height == 224, "IDEFICS height %lld", (long long)cfg.resize_height);
        CHECK(!cfg.center_crop, "IDEFICS crops");
    }

    static const struct {
        const char *json;
        const char *needle;
    } bad[] = {
        {"{\"image_processor_type\": ", "invalid JSON near byte"},
        {"[1, 2]", "expected a JSON object"},
        {"{\"image_processor_type\": \"LlavaNextImageProcessor\"}", "'LlavaNextImageProcessor' is not supported"},
        {"{\"image_processor_type\": \"CLIPImageProcessor\", \"resample\": 1}", "resample 1 is not supported"},
        {"{\"image_processor_type\": \"CLIPImageProcessor\", \"size\": {\"longest_edge\": 5}}", "'size' must be"},
        {"{\"image_processor_type\": \"CLIPImageProcessor\", \"image_mean\": [1, 2]}", "'image_mean' must be"},
        {"{\"image_processor_type\": \"CLIPImageProcessor\", \"crop_size\": -3}", "positive integer"},
        {"{\"image_processor_type\": \"IdeficsImageProcessor\", \"image_size\": 56}", "needs 'image_mean'"},
        {"{\"do_resize\": true}", "no 'image_processor_type'"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK_ERROR(loom_image_preprocess_config_from_json(&cfg, bad[i].json, strlen(bad[i].json), "bad.json"),
                    bad[i].needle);
        CHECK(strstr(loom_last_error(), "bad.json") != NULL, "config error does not name the file: %s",
              loom_last_error());
    }
}

/* 1x1, 2x3 and 1000x1 images decode exactly and go through the CLIP and
 * BLIP pipelines. */
static void test_small_and_thin_images(void) {
    static const int sizes[][2] = {{1, 1}, {2, 3}, {1000, 1}, {1, 1000}};
    loom_image_preprocess_config clip, blip;
    loom_image_preprocess_config_init(&clip);
    loom_image_preprocess_config_init(&blip);
    blip.resize_mode = LOOM_RESIZE_EXACT;
    blip.resize_height = blip.resize_width = 224;
    blip.center_crop = false;
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        int w = sizes[i][0], h = sizes[i][1];
        unsigned char *px = malloc((size_t)w * h * 3);
        for (int k = 0; k < w * h * 3; k++)
            px[k] = (unsigned char)(k * 13 + 5);
        char name[64];
        snprintf(name, sizeof name, "size_%dx%d.png", w, h);
        CHECK(stbi_write_png(tmp(name), w, h, 3, px, w * 3) != 0, "stbi_write_png %s", name);
        loom_image img = LOOM_IMAGE_EMPTY;
        CHECK_OK(loom_image_load(&img, tmp(name), NULL));
        check_shape3(name, &img.pixels, h, w, 3);
        if (img.pixels.storage)
            CHECK(memcmp(u8_data(&img.pixels), px, (size_t)w * h * 3) == 0, "%s: pixels differ", name);
        for (int b = 0; b < 2; b++) {
            loom_tensor pv = LOOM_TENSOR_EMPTY, u8 = LOOM_TENSOR_EMPTY;
            CHECK_OK(loom_image_preprocess(&pv, &u8, &img, b ? &blip : &clip));
            check_shape3(b ? "BLIP pixel_values" : "CLIP pixel_values", &pv, 3, 224, 224);
            if (w == 1 && h == 1 && u8.storage) {
                /* One source pixel: every output pixel is that pixel. */
                int bad = 0;
                for (int k = 0; k < 224 * 224 * 3; k++)
                    bad += u8_data(&u8)[k] != px[k % 3];
                CHECK(bad == 0, "1x1 image resized to 224x224: %d values differ", bad);
            }
            loom_tensor_free(&pv);
            loom_tensor_free(&u8);
        }
        loom_image_free(&img);
        free(px);
    }

    /* Pad to square in the pipeline (LLaVA): a 2x3 image becomes 3x3 first. */
    loom_image img = LOOM_IMAGE_EMPTY;
    CHECK_OK(loom_image_load(&img, tmp("size_2x3.png"), NULL));
    loom_image_preprocess_config llava = clip;
    llava.pad_to_square = true;
    llava.center_crop = false;
    llava.resize_mode = LOOM_RESIZE_NONE;
    loom_tensor pv = LOOM_TENSOR_EMPTY, u8 = LOOM_TENSOR_EMPTY;
    CHECK_OK(loom_image_preprocess(&pv, &u8, &img, &llava));
    /* 2 wide, 3 tall: pasted at column (3 - 2) // 2 = 0, fill in column 2. */
    check_shape3("pipeline pad to square", &u8, 3, 3, 3);
    static const uint8_t row0[9] = {5, 18, 31, 44, 57, 70, 122, 116, 104};
    if (u8.storage)
        CHECK(memcmp(u8_data(&u8), row0, 9) == 0, "pipeline pad to square: first row %d %d %d | %d %d %d | %d %d %d",
              u8_data(&u8)[0], u8_data(&u8)[1], u8_data(&u8)[2], u8_data(&u8)[3], u8_data(&u8)[4], u8_data(&u8)[5],
              u8_data(&u8)[6], u8_data(&u8)[7], u8_data(&u8)[8]);
    loom_tensor_free(&pv);
    loom_tensor_free(&u8);
    loom_image_free(&img);
}

int main(void) {
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    test_golden_clip_preprocess();
    test_golden_models();
    test_rocket_matches_pillow();
    test_png_8bit_modes();
    test_png_16bit();
    test_png_palette_and_low_bit_depth();
    test_bmp_and_gif();
    test_jpeg_rgb_and_gray();
    test_jpeg_cmyk();
    test_png_exif_orientation();
    test_jpeg_exif_orientation();
    test_exif_parser();
    test_unsupported_and_broken();
    test_pixel_limit();
    test_stb_uses_core_allocator();
    test_resize_against_naive();
    test_alpha_composite();
    test_center_crop();
    test_pad_to_square();
    test_normalize();
    test_shortest_edge_size();
    test_config_json();
    test_small_and_thin_images();

    DIR *d = opendir(tmpdir);
    for (struct dirent *e; d && (e = readdir(d));)
        if (e->d_name[0] != '.')
            unlink(tmp(e->d_name));
    if (d)
        closedir(d);
    rmdir(tmpdir);
    return check_summary();
}
