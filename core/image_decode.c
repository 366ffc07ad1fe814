/* Loom core: image decoding. PNG, BMP and GIF go through stb_image, JPEG
 * through libjpeg-turbo with Pillow 9.4's settings. This is the one file that
 * defines STB_IMAGE_IMPLEMENTATION; stb_image allocates through loom_alloc. */
#include "image.h"

#include <limits.h>
#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

/* ---------------------------------------------------------------- stb_image */

/* stb_image 2.27 (Debian's libstb) reallocates only through
 * STBI_REALLOC_SIZED, which receives the old size. So loom_alloc and
 * loom_free can serve it without a realloc of their own, and STBI_REALLOC
 * stays undefined, which stb_image allows. */
static void *stbi_realloc_sized(void *ptr, size_t old_size, size_t new_size) {
    void *p = loom_alloc(new_size);
    if (p && ptr)
        memcpy(p, ptr, old_size < new_size ? old_size : new_size);
    if (p)
        loom_free(ptr);
    return p;
}

#define STBI_MALLOC(size) loom_alloc(size)
#define STBI_FREE(ptr) loom_free(ptr)
#define STBI_REALLOC_SIZED(ptr, old_size, new_size) stbi_realloc_sized(ptr, old_size, new_size)
#define STBI_ASSERT(x) LOOM_ASSERT(x)
#define STBI_ONLY_PNG
#define STBI_ONLY_BMP
#define STBI_ONLY_GIF
#define STBI_NO_STDIO
#define STBI_NO_LINEAR
#define STBI_NO_HDR
#define STB_IMAGE_IMPLEMENTATION
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wimplicit-fallthrough"
#include <stb_image.h>
#pragma GCC diagnostic pop

/* ------------------------------------------------------------ format names */

static const char *const format_names[] = {
    [LOOM_IMAGE_FORMAT_UNKNOWN] = "unknown",
    [LOOM_IMAGE_FORMAT_PNG] = "PNG",
    [LOOM_IMAGE_FORMAT_JPEG] = "JPEG",
    [LOOM_IMAGE_FORMAT_BMP] = "BMP",
    [LOOM_IMAGE_FORMAT_GIF] = "GIF",
    [LOOM_IMAGE_FORMAT_WEBP] = "WebP",
    [LOOM_IMAGE_FORMAT_TIFF] = "TIFF",
    [LOOM_IMAGE_FORMAT_HEIF] = "HEIF (HEIC)",
    [LOOM_IMAGE_FORMAT_AVIF] = "AVIF",
    [LOOM_IMAGE_FORMAT_JPEG2000] = "JPEG 2000",
    [LOOM_IMAGE_FORMAT_JPEGXL] = "JPEG XL",
    [LOOM_IMAGE_FORMAT_ICO] = "ICO",
    [LOOM_IMAGE_FORMAT_PSD] = "PSD",
    [LOOM_IMAGE_FORMAT_QOI] = "QOI",
    [LOOM_IMAGE_FORMAT_PDF] = "PDF",
    [LOOM_IMAGE_FORMAT_SVG] = "SVG",
};

const char *loom_image_format_name(loom_image_format format) {
    if ((unsigned)format >= sizeof format_names / sizeof format_names[0] || !format_names[format])
        return "unknown";
    return format_names[format];
}

const char *loom_image_mode_name(loom_image_mode mode) {
    switch (mode) {
    case LOOM_IMAGE_MODE_L: return "L";
    case LOOM_IMAGE_MODE_LA: return "LA";
    case LOOM_IMAGE_MODE_RGB: return "RGB";
    case LOOM_IMAGE_MODE_RGBA: return "RGBA";
    case LOOM_IMAGE_MODE_CMYK: return "CMYK";
    }
    return "invalid";
}

int loom_image_mode_channels(loom_image_mode mode) {
    switch (mode) {
    case LOOM_IMAGE_MODE_L: return 1;
    case LOOM_IMAGE_MODE_LA: return 2;
    case LOOM_IMAGE_MODE_RGB: return 3;
    case LOOM_IMAGE_MODE_RGBA: return 4;
    case LOOM_IMAGE_MODE_CMYK: return 4;
    }
    return 0;
}

/* ---------------------------------------------------------- magic bytes */

static bool starts_with(const uint8_t *p, size_t size, const void *magic, size_t n) {
    return size >= n && memcmp(p, magic, n) == 0;
}

/* Brand of an ISO base media file ("....ftypXXXX"), used by HEIF and AVIF. */
static loom_image_format detect_ftyp_brand(const uint8_t *p, size_t size) {
    static const char *const heif_brands[] = {"heic", "heix", "hevc", "hevx", "heim",
                                              "heis", "mif1", "msf1", "mif2"};
    if (size < 12 || memcmp(p + 4, "ftyp", 4) != 0)
        return LOOM_IMAGE_FORMAT_UNKNOWN;
    if (memcmp(p + 8, "avif", 4) == 0 || memcmp(p + 8, "avis", 4) == 0)
        return LOOM_IMAGE_FORMAT_AVIF;
    for (size_t i = 0; i < sizeof heif_brands / sizeof heif_brands[0]; i++)
        if (memcmp(p + 8, heif_brands[i], 4) == 0)
            return LOOM_IMAGE_FORMAT_HEIF;
    return LOOM_IMAGE_FORMAT_UNKNOWN;
}

loom_image_format loom_image_detect_format(const void *data, size_t size) {
    const uint8_t *p = data;
    if (!p)
        return LOOM_IMAGE_FORMAT_UNKNOWN;

    /* Decodable formats. */
    if (starts_with(p, size, "\x89PNG\r\n\x1a\n", 8))
        return LOOM_IMAGE_FORMAT_PNG;
    if (starts_with(p, size, "\xff\xd8\xff", 3))
        return LOOM_IMAGE_FORMAT_JPEG;
    if (starts_with(p, size, "GIF87a", 6) || starts_with(p, size, "GIF89a", 6))
        return LOOM_IMAGE_FORMAT_GIF;
    if (starts_with(p, size, "BM", 2))
        return LOOM_IMAGE_FORMAT_BMP;

    /* Formats that are only named in the error. */
    if (size >= 12 && memcmp(p, "RIFF", 4) == 0 && memcmp(p + 8, "WEBP", 4) == 0)
        return LOOM_IMAGE_FORMAT_WEBP;
    if (starts_with(p, size, "II*\0", 4) || starts_with(p, size, "MM\0*", 4))
        return LOOM_IMAGE_FORMAT_TIFF;
    loom_image_format brand = detect_ftyp_brand(p, size);
    if (brand != LOOM_IMAGE_FORMAT_UNKNOWN)
        return brand;
    if (starts_with(p, size, "\0\0\0\x0cjP  \r\n\x87\n", 12) || starts_with(p, size, "\xff\x4f\xff\x51", 4))
        return LOOM_IMAGE_FORMAT_JPEG2000;
    if (starts_with(p, size, "\xff\x0a", 2) || starts_with(p, size, "\0\0\0\x0cJXL \r\n\x87\n", 12))
        return LOOM_IMAGE_FORMAT_JPEGXL;
    if (starts_with(p, size, "\0\0\1\0", 4))
        return LOOM_IMAGE_FORMAT_ICO;
    if (starts_with(p, size, "8BPS", 4))
        return LOOM_IMAGE_FORMAT_PSD;
    if (starts_with(p, size, "qoif", 4))
        return LOOM_IMAGE_FORMAT_QOI;
    if (starts_with(p, size, "%PDF", 4))
        return LOOM_IMAGE_FORMAT_PDF;
    if (starts_with(p, size, "<svg", 4) || starts_with(p, size, "<?xml", 5))
        return LOOM_IMAGE_FORMAT_SVG;
    return LOOM_IMAGE_FORMAT_UNKNOWN;
}

/* ------------------------------------------------------------- helpers */

static const char *display_name(const char *name) { return name ? name : "<memory>"; }

static int check_pixel_limit(const char *name, loom_image_format format, uint64_t width,
                             uint64_t height, uint64_t max_pixels) {
    uint64_t pixels = width * height; /* both below 2^32, so no overflow */
    if (pixels > max_pixels)
        return loom_error("%s image '%s' is %llux%llu = %llu pixels, more than the limit of %llu pixels "
                          "(raise the max_pixels option to accept it)",
                          loom_image_format_name(format), display_name(name), (unsigned long long)width,
                          (unsigned long long)height, (unsigned long long)pixels,
                          (unsigned long long)max_pixels);
    return LOOM_OK;
}

static void release_stbi_buffer(void *ctx) { stbi_image_free(ctx); }

/* 16-bit samples to 8 bits, rounding to nearest. */
static uint8_t sample16_to_8(uint16_t v) { return (uint8_t)(((uint32_t)v * 255u + 32767u) / 65535u); }

static loom_image_mode mode_from_channels(int channels) {
    switch (channels) {
    case 1: return LOOM_IMAGE_MODE_L;
    case 2: return LOOM_IMAGE_MODE_LA;
    case 3: return LOOM_IMAGE_MODE_RGB;
    default: return LOOM_IMAGE_MODE_RGBA;
    }
}

/* ---------------------------------------------------------------- EXIF */

static uint32_t read_be32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* The TIFF block of a PNG eXIf chunk, which may come before or after IDAT
 * (Pillow 9.4 reads it in both places). Every chunk length is checked
 * against the bytes left. */
static const uint8_t *find_png_exif(const uint8_t *data, size_t size, size_t *exif_size) {
    size_t pos = 8;
    while (size - pos >= 12) {
        uint32_t length = read_be32(data + pos);
        const uint8_t *type = data + pos + 4;
        if (length > size - pos - 12)
            return NULL;
        if (memcmp(type, "eXIf", 4) == 0) {
            *exif_size = length;
            return data + pos + 8;
        }
        if (memcmp(type, "IEND", 4) == 0)
            return NULL;
        pos += 12 + (size_t)length;
    }
    return NULL;
}

/* ---------------------------------------------------------- stb_image path */

/* stb_image's short failure reasons, grouped by what they mean to a user.
 * The list covers the reasons stb_image 2.27 gives for PNG, BMP and GIF. */
static const struct {
    const char *reason;
    const char *meaning;
} stb_reasons[] = {
    {"outofdata", "the file is truncated or corrupt"},
    {"read past buffer", "the file is truncated or corrupt"},
    {"not enough pixels", "the file is truncated or corrupt"},
    {"no IDAT", "the file is truncated or corrupt"},
    {"unknown image type", "the file is truncated or corrupt"},
    {"zlib corrupt", "the compressed pixel data is corrupt"},
    {"bad zlib header", "the compressed pixel data is corrupt"},
    {"bad huffman code", "the compressed pixel data is corrupt"},
    {"bad codelengths", "the compressed pixel data is corrupt"},
    {"bad dist", "the compressed pixel data is corrupt"},
    {"output buffer limit", "the compressed pixel data is corrupt"},
    {"bad png sig", "the PNG signature is invalid"},
    {"not GIF", "the GIF header is invalid"},
    {"too large", "the image dimensions are too large or corrupt"},
    {"0-pixel image", "the image has zero width or height"},
    {"outofmem", "out of memory"},
};

/* Report whether a PNG's chunk list ends before its IEND chunk, which is
 * how a cut-off download or copy looks. */
static bool png_is_truncated(const uint8_t *data, size_t size) {
    size_t pos = 8;
    while (pos < size) {
        if (size - pos < 12)
            return true;
        uint32_t length = read_be32(data + pos);
        if (length > size - pos - 12)
            return true;
        if (memcmp(data + pos + 4, "IEND", 4) == 0)
            return false;
        pos += 12 + (size_t)length;
    }
    return true;
}

/* Format why stb_image failed into buf as a plain phrase that keeps stb's own
 * reason in brackets. stb_image leaves the reason empty or unset on some
 * paths for cut-off data, and the caller clears it before each call, so an
 * empty reason is reported as truncated or corrupt data. A PNG whose chunks
 * run past the end of the data is reported as truncated whatever stb reports,
 * because stb then names a chunk type made of the missing bytes. */
static const char *describe_stb_failure(char *buf, size_t size, const uint8_t *data, size_t data_size,
                                        loom_image_format format) {
    const char *reason = stbi_failure_reason();
    if (!reason || !reason[0]) {
        snprintf(buf, size, "truncated or corrupt %s data", loom_image_format_name(format));
        return buf;
    }
    const char *meaning = NULL;
    for (size_t i = 0; i < sizeof stb_reasons / sizeof stb_reasons[0]; i++)
        if (strcmp(reason, stb_reasons[i].reason) == 0)
            meaning = stb_reasons[i].meaning;
    if (format == LOOM_IMAGE_FORMAT_PNG && png_is_truncated(data, data_size)) {
        if (meaning)
            snprintf(buf, size, "the file is truncated or corrupt (stb_image: %s)", reason);
        else
            snprintf(buf, size, "the file is truncated or corrupt: its chunks end before the IEND chunk");
        return buf;
    }
    snprintf(buf, size, "%s (stb_image: %s)", meaning ? meaning : "the file is invalid or corrupt", reason);
    return buf;
}

static int decode_with_stb(loom_image *out, const uint8_t *data, size_t size, const char *name,
                           loom_image_format format, uint64_t max_pixels) {
    int width, height, channels;
    const char *fname = loom_image_format_name(format);

    if (size > INT_MAX)
        return loom_error("%s image '%s' is %zu bytes, more than stb_image's limit of %d bytes", fname,
                          display_name(name), size, INT_MAX);
    char why[128];
    /* stb_image keeps the reason of an earlier failure unless a new one is set. */
    stbi__g_failure_reason = NULL;
    if (!stbi_info_from_memory(data, (int)size, &width, &height, &channels))
        return loom_error("decoding %s image '%s' failed: %s", fname, display_name(name),
                          describe_stb_failure(why, sizeof why, data, size, format));
    if (check_pixel_limit(name, format, (uint64_t)width, (uint64_t)height, max_pixels) != 0)
        return LOOM_ERR;

    bool is16 = format == LOOM_IMAGE_FORMAT_PNG && stbi_is_16_bit_from_memory(data, (int)size);
    stbi__g_failure_reason = NULL;
    void *pixels = is16 ? (void *)stbi_load_16_from_memory(data, (int)size, &width, &height, &channels, 0)
                        : (void *)stbi_load_from_memory(data, (int)size, &width, &height, &channels, 0);
    if (!pixels)
        return loom_error("decoding %s image '%s' failed: %s", fname, display_name(name),
                          describe_stb_failure(why, sizeof why, data, size, format));
    if (channels < 1 || channels > 4) {
        stbi_image_free(pixels);
        return loom_error("decoding %s image '%s' failed: stb_image returned %d channels", fname,
                          display_name(name), channels);
    }

    int64_t shape[3] = {height, width, channels};
    size_t count = (size_t)height * (size_t)width * (size_t)channels;
    loom_tensor t = LOOM_TENSOR_EMPTY;
    if (is16) {
        /* Rescale into a tensor of our own and drop stb's 16-bit buffer. */
        if (loom_tensor_init(&t, LOOM_U8, 3, shape) != 0) {
            stbi_image_free(pixels);
            return LOOM_ERR;
        }
        const uint16_t *src = pixels;
        uint8_t *dst = loom_tensor_data(&t);
        for (size_t i = 0; i < count; i++)
            dst[i] = sample16_to_8(src[i]);
        stbi_image_free(pixels);
    } else {
        /* Keep stb's buffer and free it with the last tensor reference. */
        loom_storage *s = loom_storage_borrow(pixels, count, false, release_stbi_buffer, pixels);
        if (!s) {
            stbi_image_free(pixels);
            return LOOM_ERR;
        }
        int rc = loom_tensor_from_storage(&t, s, 0, LOOM_U8, 3, shape);
        loom_storage_release(s);
        if (rc != 0)
            return LOOM_ERR;
    }

    out->pixels = t;
    out->mode = mode_from_channels(channels);
    out->format = format;
    out->bits_per_sample = is16 ? 16 : 8;
    /* NOTE: Pillow also takes the orientation from a PNG's XMP packet
     * (tiff:Orientation in an iTXt chunk) when EXIF has none; Loom reads
     * only the eXIf chunk. */
    out->exif_orientation = 0;
    if (format == LOOM_IMAGE_FORMAT_PNG) {
        size_t exif_size = 0;
        const uint8_t *exif = find_png_exif(data, size, &exif_size);
        if (exif)
            out->exif_orientation = loom_image_exif_orientation(exif, exif_size);
    }
    return LOOM_OK;
}

/* ---------------------------------------------------------- libjpeg path */

/* Decoder state on the heap, so that nothing longjmp can leave
 * indeterminate lives in the frame of the function that calls setjmp. */
typedef struct jpeg_state {
    struct jpeg_decompress_struct cinfo;
    struct jpeg_error_mgr err;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
    loom_tensor pixels;
    bool created;
} jpeg_state;

static void jpeg_fail(j_common_ptr cinfo) {
    jpeg_state *st = (jpeg_state *)cinfo->client_data;
    cinfo->err->format_message(cinfo, st->message);
    longjmp(st->jump, 1);
}

/* libjpeg reports a truncated stream only as a warning and then pads it with
 * gray; Pillow raises "image file is truncated" there, so Loom fails too.
 * Other warnings (corrupt data that libjpeg recovers from) are ignored, as
 * Pillow ignores them. Nothing is printed. */
static void jpeg_message(j_common_ptr cinfo, int level) {
    if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF)
        jpeg_fail(cinfo);
    if (level < 0)
        cinfo->err->num_warnings++;
}

/* The TIFF block of the first APP1 segment that starts with "Exif\0", as
 * Pillow 9.4 keeps the first one. */
static int jpeg_exif_orientation(struct jpeg_decompress_struct *cinfo) {
    for (jpeg_saved_marker_ptr m = cinfo->marker_list; m; m = m->next) {
        if (m->marker == JPEG_APP0 + 1 && m->data_length >= 6 && memcmp(m->data, "Exif\0", 5) == 0)
            return loom_image_exif_orientation(m->data + 6, m->data_length - 6);
    }
    return 0;
}

static int decode_jpeg_body(jpeg_state *st, loom_image *out, const uint8_t *data, size_t size,
                            const char *name, uint64_t max_pixels) {
    struct jpeg_decompress_struct *cinfo = &st->cinfo;
    loom_image_mode mode;

    jpeg_mem_src(cinfo, data, (unsigned long)size);
    jpeg_save_markers(cinfo, JPEG_APP0 + 1, 0xffff);
    jpeg_read_header(cinfo, TRUE);
    /* Saved markers live until jpeg_finish_decompress, so read EXIF now. */
    out->exif_orientation = jpeg_exif_orientation(cinfo);
    if (check_pixel_limit(name, LOOM_IMAGE_FORMAT_JPEG, cinfo->image_width, cinfo->image_height,
                          max_pixels) != 0)
        return LOOM_ERR;

    /* Pillow 9.4 requests L, RGB or CMYK output by component count and keeps
     * libjpeg's defaults otherwise: islow DCT and fancy upsampling. */
    switch (cinfo->num_components) {
    case 1:
        cinfo->out_color_space = JCS_GRAYSCALE;
        mode = LOOM_IMAGE_MODE_L;
        break;
    case 3:
        cinfo->out_color_space = JCS_RGB;
        mode = LOOM_IMAGE_MODE_RGB;
        break;
    case 4:
        cinfo->out_color_space = JCS_CMYK;
        mode = LOOM_IMAGE_MODE_CMYK;
        break;
    default:
        return loom_error("decoding JPEG image '%s' failed: %d color components are not supported "
                          "(expected 1, 3 or 4)",
                          display_name(name), cinfo->num_components);
    }
    cinfo->dct_method = JDCT_ISLOW;
    cinfo->do_fancy_upsampling = TRUE;
    jpeg_start_decompress(cinfo);

    int channels = loom_image_mode_channels(mode);
    if (cinfo->output_components != channels)
        return loom_error("decoding JPEG image '%s' failed: libjpeg produced %d components, expected %d",
                          display_name(name), cinfo->output_components, channels);
    int64_t shape[3] = {cinfo->output_height, cinfo->output_width, channels};
    if (loom_tensor_init(&st->pixels, LOOM_U8, 3, shape) != 0)
        return LOOM_ERR;
    uint8_t *base = loom_tensor_data(&st->pixels);
    size_t stride = (size_t)cinfo->output_width * (size_t)channels;
    while (cinfo->output_scanline < cinfo->output_height) {
        JSAMPROW row = base + (size_t)cinfo->output_scanline * stride;
        jpeg_read_scanlines(cinfo, &row, 1);
    }
    jpeg_finish_decompress(cinfo);

    /* Pillow reads 4-component JPEGs with rawmode "CMYK;I" (inverted), the
     * Adobe convention, whether or not an Adobe marker is present. */
    if (mode == LOOM_IMAGE_MODE_CMYK) {
        size_t n = stride * (size_t)cinfo->output_height;
        for (size_t i = 0; i < n; i++)
            base[i] = (uint8_t)(255 - base[i]);
    }

    out->mode = mode;
    out->format = LOOM_IMAGE_FORMAT_JPEG;
    out->bits_per_sample = 8;
    return LOOM_OK;
}

static int decode_with_libjpeg(loom_image *out, const uint8_t *data, size_t size, const char *name,
                               uint64_t max_pixels) {
    jpeg_state *st = loom_alloc_zeroed(sizeof *st);
    int rc = LOOM_ERR;
    if (!st)
        return LOOM_ERR;

    st->cinfo.err = jpeg_std_error(&st->err);
    st->err.error_exit = jpeg_fail;
    st->err.emit_message = jpeg_message;
    st->cinfo.client_data = st;
    if (setjmp(st->jump) == 0) {
        jpeg_create_decompress(&st->cinfo);
        st->created = true;
        rc = decode_jpeg_body(st, out, data, size, name, max_pixels);
    } else {
        rc = loom_error("decoding JPEG image '%s' failed: libjpeg reports '%s'", display_name(name),
                        st->message);
    }

    if (st->created)
        jpeg_destroy_decompress(&st->cinfo);
    if (rc == LOOM_OK)
        out->pixels = st->pixels;
    else
        loom_tensor_free(&st->pixels);
    loom_free(st);
    return rc;
}

/* ---------------------------------------------------------------- entry */

int loom_image_decode(loom_image *out, const void *data, size_t size, const char *name,
                      const loom_image_decode_options *options) {
    loom_image_decode_options defaults = {0};
    loom_image img = LOOM_IMAGE_EMPTY;
    int rc;

    if (!out)
        return loom_error("loom_image_decode: output image is NULL");
    *out = LOOM_IMAGE_EMPTY;
    if (!options)
        options = &defaults;
    uint64_t max_pixels = options->max_pixels ? options->max_pixels : LOOM_IMAGE_MAX_PIXELS_DEFAULT;
    if (!data || size == 0)
        return loom_error("cannot decode image '%s': the data is empty", display_name(name));

    loom_image_format format = loom_image_detect_format(data, size);
    switch (format) {
    case LOOM_IMAGE_FORMAT_PNG:
    case LOOM_IMAGE_FORMAT_BMP:
    case LOOM_IMAGE_FORMAT_GIF:
        rc = decode_with_stb(&img, data, size, name, format, max_pixels);
        break;
    case LOOM_IMAGE_FORMAT_JPEG:
        rc = decode_with_libjpeg(&img, data, size, name, max_pixels);
        break;
    case LOOM_IMAGE_FORMAT_UNKNOWN: {
        const uint8_t *p = data;
        char hex[3 * 8 + 1] = "";
        size_t len = 0;
        for (size_t i = 0; i < size && i < 8; i++)
            len += (size_t)snprintf(hex + len, sizeof hex - len, "%s%02x", i ? " " : "", p[i]);
        return loom_error("cannot decode image '%s': unknown format (first bytes %s); "
                          "supported formats are PNG, JPEG, BMP and GIF",
                          display_name(name), hex);
    }
    default:
        return loom_error("cannot decode image '%s': %s images are not supported; "
                          "supported formats are PNG, JPEG, BMP and GIF",
                          display_name(name), loom_image_format_name(format));
    }
    if (rc != 0)
        return LOOM_ERR;

    int orientation = img.exif_orientation;
    if (!options->ignore_exif_orientation && orientation >= 2 && orientation <= 8) {
        loom_tensor oriented = LOOM_TENSOR_EMPTY;
        if (loom_image_orient(&oriented, &img.pixels, orientation) != 0) {
            loom_image_free(&img);
            return loom_error_prefix("applying EXIF orientation %d to '%s'", orientation, display_name(name));
        }
        loom_tensor_free(&img.pixels);
        img.pixels = oriented;
    }
    *out = img;
    return LOOM_OK;
}

int loom_image_load(loom_image *out, const char *path, const loom_image_decode_options *options) {
    if (!out || !path)
        return loom_error("loom_image_load: %s is NULL", out ? "path" : "output image");
    *out = LOOM_IMAGE_EMPTY;
    loom_storage *file = loom_storage_map_file(path);
    if (!file)
        return loom_error_prefix("cannot load image");
    int rc = loom_image_decode(out, file->data, file->nbytes, path, options);
    loom_storage_release(file);
    return rc;
}

void loom_image_free(loom_image *image) {
    if (!image)
        return;
    loom_tensor_free(&image->pixels);
    *image = LOOM_IMAGE_EMPTY;
}
