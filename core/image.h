/* Loom core: image decoding and preprocessing that reproduce the reference
 * pipelines pixel for pixel (Pillow 9.4 decoding, conversion and resampling;
 * Hugging Face image processors; open_clip's eval transform).
 * Images are u8 tensors of shape (H, W, C); model inputs are f32 (C, H, W). */
#ifndef LOOM_IMAGE_H
#define LOOM_IMAGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tensor.h"

/* ---- formats and decoding */

/* Container formats recognised from their magic bytes. Only PNG, JPEG, BMP
 * and GIF decode; the others are detected so that the error can name them. */
typedef enum loom_image_format {
    LOOM_IMAGE_FORMAT_UNKNOWN = 0,
    LOOM_IMAGE_FORMAT_PNG,
    LOOM_IMAGE_FORMAT_JPEG,
    LOOM_IMAGE_FORMAT_BMP,
    LOOM_IMAGE_FORMAT_GIF,
    LOOM_IMAGE_FORMAT_WEBP,
    LOOM_IMAGE_FORMAT_TIFF,
    LOOM_IMAGE_FORMAT_HEIF,
    LOOM_IMAGE_FORMAT_AVIF,
    LOOM_IMAGE_FORMAT_JPEG2000,
    LOOM_IMAGE_FORMAT_JPEGXL,
    LOOM_IMAGE_FORMAT_ICO,
    LOOM_IMAGE_FORMAT_PSD,
    LOOM_IMAGE_FORMAT_QOI,
    LOOM_IMAGE_FORMAT_PDF,
    LOOM_IMAGE_FORMAT_SVG,
} loom_image_format;

/* Format of `data` from its first bytes (never from a file name). */
loom_image_format loom_image_detect_format(const void *data, size_t size);
/* Display name such as "PNG", "WebP" or "HEIF (HEIC)". */
const char *loom_image_format_name(loom_image_format format);

/* Pixel layout of a decoded image before conversion to RGB, named as Pillow
 * names its modes. */
typedef enum loom_image_mode {
    LOOM_IMAGE_MODE_L = 0, /* grayscale, 1 channel */
    LOOM_IMAGE_MODE_LA,    /* grayscale and alpha, 2 channels */
    LOOM_IMAGE_MODE_RGB,   /* 3 channels */
    LOOM_IMAGE_MODE_RGBA,  /* 4 channels, straight (not premultiplied) alpha */
    LOOM_IMAGE_MODE_CMYK,  /* 4 channels of ink coverage, 0 = no ink, as Pillow stores CMYK */
} loom_image_mode;

const char *loom_image_mode_name(loom_image_mode mode);
int loom_image_mode_channels(loom_image_mode mode);

/* Pillow's decompression-bomb error threshold, 2 * Image.MAX_IMAGE_PIXELS
 * = 2 * (1024 * 1024 * 1024 / 4 / 3) pixels (Pillow 9.4). Pillow only warns
 * between MAX_IMAGE_PIXELS and this value; Loom has no warning step. */
#define LOOM_IMAGE_MAX_PIXELS_DEFAULT 178956970ULL

/* Decoding options; a zero-initialised struct (or NULL) gives the defaults. */
typedef struct loom_image_decode_options {
    /* Images with more than this many pixels (width * height) are rejected
     * after reading the header, before the pixel buffer is allocated.
     * 0 selects LOOM_IMAGE_MAX_PIXELS_DEFAULT. */
    uint64_t max_pixels;
    /* false (default): rotate and flip by the EXIF orientation tag of JPEG
     * (APP1) and PNG (eXIf) files as PIL.ImageOps.exif_transpose does, which
     * Hugging Face's load_image calls. true: keep the stored orientation. */
    bool ignore_exif_orientation;
} loom_image_decode_options;

/* A decoded image. */
typedef struct loom_image {
    loom_tensor pixels;       /* u8 (H, W, C) contiguous, C = loom_image_mode_channels(mode) */
    loom_image_mode mode;
    loom_image_format format; /* container the pixels came from */
    int bits_per_sample;      /* 8, or 16 for 16-bit PNGs (rescaled to 8 bits in `pixels`) */
    int exif_orientation;     /* EXIF orientation tag found (1-8), 0 when absent or invalid */
} loom_image;

#define LOOM_IMAGE_EMPTY ((loom_image){0})

/* Decode an image held in memory. `name` (a file name, or NULL) is used only
 * in error messages. stb_image decodes PNG (1-16 bits, gray, gray+alpha,
 * palette with or without tRNS, RGB, RGBA), BMP and the first frame of a
 * GIF. libjpeg-turbo decodes JPEG (gray, YCbCr/RGB, CMYK and YCCK) with the
 * settings Pillow 9.4 uses (islow DCT, fancy upsampling), so its pixels equal
 * Pillow's.
 * 16-bit samples are rescaled with rounding, (v * 255 + 32767) / 65535.
 * NOTE: Pillow 9.4 instead keeps the high byte of 16-bit RGB(A) samples and
 * clips 16-bit grayscale (mode I;16) to 0..255 on convert("RGB"), so such
 * PNGs intentionally differ from Pillow.
 * NOTE: a transparent GIF colour decodes as (0, 0, 0, 0), as stb_image
 * leaves it; Pillow's convert("RGB") shows the palette entry there instead.
 * Compositing onto a background gives the same result in both. */
int loom_image_decode(loom_image *out, const void *data, size_t size, const char *name,
                      const loom_image_decode_options *options);
/* Read and decode the file at `path`; errors name the path. */
int loom_image_load(loom_image *out, const char *path, const loom_image_decode_options *options);
/* Release the pixels and reset `image` to LOOM_IMAGE_EMPTY; accepts NULL. */
void loom_image_free(loom_image *image);

/* The orientation tag (0x0112) of an EXIF block: `data` starts at the TIFF
 * header ("II*\0" or "MM\0*"), that is after the "Exif\0\0" prefix of a JPEG
 * APP1 segment. Returns 1-8, or 0 when the tag is absent, has another value
 * or type, or the block is malformed (every offset is bounds-checked). */
int loom_image_exif_orientation(const void *data, size_t size);

/* Rotate and/or flip a u8 (H, W, C) image as PIL.ImageOps.exif_transpose
 * does for EXIF orientation 1-8 (2 = mirror left-right, 3 = rotate 180,
 * 4 = mirror top-bottom, 5 = transpose, 6 = rotate 90 clockwise,
 * 7 = transverse, 8 = rotate 90 counter-clockwise). Any other value copies. */
int loom_image_orient(loom_tensor *out, const loom_tensor *src, int exif_orientation);

/* ---- conversion to RGB */

typedef enum loom_alpha_mode {
    /* Pillow's convert("RGB"): alpha is dropped and the colour under
     * transparent pixels is kept (Hugging Face CLIP, BLIP, LLaVA). */
    LOOM_ALPHA_DROP = 0,
    /* Pillow's convert("RGBA"), then Image.alpha_composite onto an opaque
     * background colour, then convert("RGB") (IDEFICS, on white), with
     * Pillow's integer rounding. */
    LOOM_ALPHA_COMPOSITE,
} loom_alpha_mode;

/* Convert a decoded image to u8 (H, W, 3) as Pillow does: L is replicated,
 * LA and RGBA lose (or composite) their alpha, and CMYK becomes
 * R = 255 - K - C * (255 - K) / 255 with Pillow's integer rounding.
 * `background` (3 values) is read only for LOOM_ALPHA_COMPOSITE; NULL means
 * white. Images without alpha are converted the same way in both modes. */
int loom_image_to_rgb(loom_tensor *out, const loom_image *image, loom_alpha_mode alpha_mode,
                      const uint8_t *background);

/* ---- resampling, cropping, padding */

/* Resampling filters, numbered as PIL.Image.Resampling (and as the
 * "resample" field of preprocessor_config.json). */
typedef enum loom_resample {
    LOOM_RESAMPLE_BILINEAR = 2,
    LOOM_RESAMPLE_BICUBIC = 3,
} loom_resample;

/* Resize a u8 (H, W, C) image (any C >= 1, each channel on its own) to
 * (height, width, C) exactly as Pillow 9.4's Image.resize does for L and RGB
 * images: separable convolution with antialiasing (the filter support grows
 * by the downscale factor), horizontal pass first, a pass skipped when its
 * dimension is unchanged, fixed-point coefficients with 22 fractional bits
 * and rounding and clipping to u8 after each pass.
 * NOTE: Pillow resizes RGBA and LA images with premultiplied alpha, and P
 * (palette) images with NEAREST; this function does neither. */
int loom_image_resize(loom_tensor *out, const loom_tensor *src, int64_t height, int64_t width,
                      loom_resample filter);

/* Output size when the shortest side becomes `shortest_edge`, as Hugging
 * Face's get_resize_output_image_size (default_to_square=False) and
 * torchvision's Resize(int) compute it: the long side is
 * int(shortest_edge * long / short), truncated. Square inputs give a square. */
int loom_image_shortest_edge_size(int64_t height, int64_t width, int64_t shortest_edge,
                                  int64_t *out_height, int64_t *out_width);

typedef enum loom_crop_rounding {
    /* Hugging Face center_crop: top = (H - h) // 2, left = (W - w) // 2. An
     * image smaller than the crop is placed at ceil((h - H) / 2) on zeros. */
    LOOM_CROP_FLOOR = 0,
    /* torchvision CenterCrop (open_clip): top = int(round((H - h) / 2.0))
     * with round-half-to-even. An image smaller than the crop is placed at
     * (h - H) // 2 on zeros. */
    LOOM_CROP_ROUND_HALF_EVEN,
} loom_crop_rounding;

/* Cut the centred (height, width) window out of a u8 (H, W, C) image. */
int loom_image_center_crop(loom_tensor *out, const loom_tensor *src, int64_t height, int64_t width,
                           loom_crop_rounding rounding);

/* Pad a u8 (H, W, C) image to a square of side max(H, W) filled with `fill`
 * (C values), the image pasted at ((side - W) // 2, (side - H) // 2) as
 * LLaVA's expand2square does. A square image is copied unchanged. */
int loom_image_pad_to_square(loom_tensor *out, const loom_tensor *src, const uint8_t *fill);

/* LLaVA's padding colour from the processor mean: int(mean[i] * 255) for
 * each of the 3 channels. */
void loom_image_fill_from_mean(uint8_t fill[3], const double mean[3]);

/* ---- rescaling and normalisation */

typedef enum loom_rescale_mode {
    LOOM_RESCALE_NONE = 0, /* x = (float)u8 */
    /* Hugging Face rescale: x = (float)((double)u8 * rescale_factor). */
    LOOM_RESCALE_MULTIPLY,
    /* torchvision ToTensor (open_clip): x = (float)u8 / 255.0f in float32. */
    LOOM_RESCALE_DIVIDE_255,
} loom_rescale_mode;

/* Turn a u8 (H, W, C) image into f32 (C, H, W): rescale as `mode` selects, then,
 * when mean and std are both non-NULL (C values each), normalise with
 * y = (x - (float)mean[c]) / (float)std[c] in float32, as Hugging Face's
 * normalize and torchvision's Normalize compute it. */
int loom_image_normalize(loom_tensor *out, const loom_tensor *src, loom_rescale_mode mode,
                         double rescale_factor, const double *mean, const double *std);

/* ---- whole pipelines */

typedef enum loom_resize_mode {
    LOOM_RESIZE_NONE = 0,
    LOOM_RESIZE_SHORTEST_EDGE, /* shortest side -> shortest_edge, aspect ratio kept */
    LOOM_RESIZE_EXACT,         /* to (resize_height, resize_width), aspect ratio not kept */
} loom_resize_mode;

/* The steps of a Hugging Face-style image processor, run in this order:
 * RGB conversion, pad to square, resize, center crop, rescale, normalise. */
typedef struct loom_image_preprocess_config {
    loom_alpha_mode alpha_mode;
    uint8_t background[3]; /* for LOOM_ALPHA_COMPOSITE */

    bool pad_to_square; /* LLaVA's expand2square, before resizing */
    uint8_t pad_fill[3];

    loom_resize_mode resize_mode;
    int64_t shortest_edge;
    int64_t resize_height, resize_width;
    loom_resample resample;

    bool center_crop;
    int64_t crop_height, crop_width;
    loom_crop_rounding crop_rounding;

    loom_rescale_mode rescale_mode;
    double rescale_factor;

    bool normalize;
    double mean[3], std[3];
} loom_image_preprocess_config;

/* Defaults of transformers' CLIPImageProcessor (openai/clip-vit-base-patch32):
 * alpha dropped, shortest edge 224 with BICUBIC, 224x224 floor center crop,
 * rescale by 1/255, OpenAI CLIP mean and std, no padding. */
void loom_image_preprocess_config_init(loom_image_preprocess_config *config);

/* Fill `config` from the text of a preprocessor_config.json. Understood:
 * CLIPImageProcessor, BlipImageProcessor, SiglipImageProcessor and other
 * processors with the same keys (do_resize, size as {"shortest_edge"},
 * {"height", "width"} or a number, resample, do_center_crop, crop_size,
 * do_rescale, rescale_factor, do_normalize, image_mean, image_std),
 * IdeficsImageProcessor (image_size, image_mean, image_std: alpha composited
 * on white, exact resize, no crop), and the open_clip eval transform written
 * as {"source": "open_clip...", "image_size", "mean", "std"}. Missing keys
 * take the processor class's defaults. `name` appears in error messages.
 * The caller may set pad_to_square afterwards (LLaVA's image_aspect_ratio
 * "pad" lives in the model's config.json, not here). */
int loom_image_preprocess_config_from_json(loom_image_preprocess_config *config, const char *json,
                                           size_t size, const char *name);

/* Run the pipeline on a decoded image: `pixel_values` receives f32 (3, H, W).
 * When `pixels_u8` is not NULL it receives the u8 (H, W, 3) image right after
 * resizing and cropping (before rescaling), for checks against references.
 * NOTE: open_clip converts to RGB after resizing and cropping. The result
 * is the same for L and RGB images, but differs for images with alpha or a
 * palette (see loom_image_resize). */
int loom_image_preprocess(loom_tensor *pixel_values, loom_tensor *pixels_u8, const loom_image *image,
                          const loom_image_preprocess_config *config);

#endif
