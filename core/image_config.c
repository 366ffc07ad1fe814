/* Loom core: reading a preprocessor_config.json (Hugging Face image
 * processors, transformers 4.44 key names and class defaults) into a
 * loom_image_preprocess_config. */
#include "image_internal.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <string.h>

/* transformers' IMAGENET_STANDARD_MEAN / _STD, SigLIP's defaults. */
static const double imagenet_standard[3] = {0.5, 0.5, 0.5};

typedef struct json_reader {
    const char *name; /* file name for messages */
    const cJSON *root;
} json_reader;

static const cJSON *field(const json_reader *r, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(r->root, key);
    return cJSON_IsNull(v) ? NULL : v;
}

static int read_bool(const json_reader *r, const char *key, bool *out) {
    const cJSON *v = field(r, key);
    if (!v)
        return LOOM_OK;
    if (!cJSON_IsBool(v))
        return loom_error("preprocessor config '%s': '%s' must be true or false", r->name, key);
    *out = cJSON_IsTrue(v);
    return LOOM_OK;
}

static int positive_int(const json_reader *r, const char *key, const cJSON *v, int64_t *out) {
    if (!cJSON_IsNumber(v) || v->valuedouble < 1 || v->valuedouble > (double)INT32_MAX ||
        v->valuedouble != floor(v->valuedouble))
        return loom_error("preprocessor config '%s': '%s' must be a positive integer", r->name, key);
    *out = (int64_t)v->valuedouble;
    return LOOM_OK;
}

/* A size given as a number (square, or the shortest edge when
 * `number_is_shortest_edge`) or as {"shortest_edge"} / {"height", "width"}. */
static int read_size(const json_reader *r, const char *key, bool number_is_shortest_edge, loom_resize_mode *mode,
                     int64_t *shortest_edge, int64_t *height, int64_t *width) {
    const cJSON *v = field(r, key);
    if (!v)
        return LOOM_OK;
    if (cJSON_IsNumber(v)) {
        int64_t n;
        if (positive_int(r, key, v, &n) != 0)
            return LOOM_ERR;
        if (number_is_shortest_edge) {
            *mode = LOOM_RESIZE_SHORTEST_EDGE;
            *shortest_edge = n;
        } else {
            *mode = LOOM_RESIZE_EXACT;
            *height = *width = n;
        }
        return LOOM_OK;
    }
    const cJSON *se = cJSON_GetObjectItemCaseSensitive(v, "shortest_edge");
    const cJSON *h = cJSON_GetObjectItemCaseSensitive(v, "height");
    const cJSON *w = cJSON_GetObjectItemCaseSensitive(v, "width");
    if (cJSON_IsObject(v) && se && !cJSON_GetObjectItemCaseSensitive(v, "longest_edge")) {
        *mode = LOOM_RESIZE_SHORTEST_EDGE;
        return positive_int(r, "size.shortest_edge", se, shortest_edge);
    }
    if (cJSON_IsObject(v) && h && w) {
        *mode = LOOM_RESIZE_EXACT;
        if (positive_int(r, "height", h, height) != 0 || positive_int(r, "width", w, width) != 0)
            return LOOM_ERR;
        return LOOM_OK;
    }
    return loom_error("preprocessor config '%s': '%s' must be a number, {\"shortest_edge\": n} or "
                      "{\"height\": h, \"width\": w}",
                      r->name, key);
}

static int read_crop(const json_reader *r, int64_t *height, int64_t *width) {
    loom_resize_mode mode = LOOM_RESIZE_NONE;
    int64_t unused = 0;
    if (read_size(r, "crop_size", false, &mode, &unused, height, width) != 0)
        return LOOM_ERR;
    if (mode == LOOM_RESIZE_SHORTEST_EDGE)
        return loom_error("preprocessor config '%s': 'crop_size' must give height and width", r->name);
    return LOOM_OK;
}

/* Three per-channel values, or one number for all channels. */
static int read_triple(const json_reader *r, const char *key, double out[3]) {
    const cJSON *v = field(r, key);
    if (!v)
        return LOOM_OK;
    if (cJSON_IsNumber(v)) {
        out[0] = out[1] = out[2] = v->valuedouble;
        return LOOM_OK;
    }
    if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) != 3)
        return loom_error("preprocessor config '%s': '%s' must be a number or a list of 3 numbers", r->name, key);
    for (int i = 0; i < 3; i++) {
        const cJSON *e = cJSON_GetArrayItem(v, i);
        if (!cJSON_IsNumber(e))
            return loom_error("preprocessor config '%s': '%s'[%d] is not a number", r->name, key, i);
        out[i] = e->valuedouble;
    }
    return LOOM_OK;
}

/* "resample": PIL's number (2 = BILINEAR, 3 = BICUBIC) or a name such as
 * "BICUBIC (PIL)". */
static int read_resample(const json_reader *r, loom_resample *out) {
    const cJSON *v = field(r, "resample");
    if (!v)
        return LOOM_OK;
    if (cJSON_IsNumber(v) && (v->valuedouble == LOOM_RESAMPLE_BILINEAR || v->valuedouble == LOOM_RESAMPLE_BICUBIC)) {
        *out = (loom_resample)(int)v->valuedouble;
        return LOOM_OK;
    }
    if (cJSON_IsString(v) && strncmp(v->valuestring, "BICUBIC", 7) == 0) {
        *out = LOOM_RESAMPLE_BICUBIC;
        return LOOM_OK;
    }
    if (cJSON_IsString(v) && strncmp(v->valuestring, "BILINEAR", 8) == 0) {
        *out = LOOM_RESAMPLE_BILINEAR;
        return LOOM_OK;
    }
    if (cJSON_IsNumber(v))
        return loom_error("preprocessor config '%s': resample %g is not supported (expected 2 = BILINEAR or "
                          "3 = BICUBIC)",
                          r->name, v->valuedouble);
    return loom_error("preprocessor config '%s': 'resample' must be 2 (BILINEAR) or 3 (BICUBIC)", r->name);
}

/* Processors sharing CLIPImageProcessor's keys. */
static int read_hf_processor(const json_reader *r, const char *type, loom_image_preprocess_config *cfg) {
    bool is_clip = strcmp(type, "CLIPImageProcessor") == 0 || strcmp(type, "CLIPFeatureExtractor") == 0;
    bool is_siglip = strcmp(type, "SiglipImageProcessor") == 0;
    bool do_resize = true, do_rescale = true, do_normalize = true;

    /* Class defaults of transformers 4.44. */
    if (!is_clip) {
        cfg->center_crop = false;
        cfg->resize_mode = LOOM_RESIZE_EXACT;
        cfg->resize_height = cfg->resize_width = is_siglip ? 224 : 384;
    }
    if (is_siglip) {
        cfg->resample = LOOM_RESAMPLE_BILINEAR;
        memcpy(cfg->mean, imagenet_standard, sizeof cfg->mean);
        memcpy(cfg->std, imagenet_standard, sizeof cfg->std);
    }

    if (read_bool(r, "do_resize", &do_resize) != 0 ||
        read_size(r, "size", is_clip, &cfg->resize_mode, &cfg->shortest_edge, &cfg->resize_height,
                  &cfg->resize_width) != 0 ||
        read_resample(r, &cfg->resample) != 0 || read_bool(r, "do_center_crop", &cfg->center_crop) != 0 ||
        read_crop(r, &cfg->crop_height, &cfg->crop_width) != 0 || read_bool(r, "do_rescale", &do_rescale) != 0 ||
        read_bool(r, "do_normalize", &do_normalize) != 0 || read_triple(r, "image_mean", cfg->mean) != 0 ||
        read_triple(r, "image_std", cfg->std) != 0)
        return LOOM_ERR;
    const cJSON *factor = field(r, "rescale_factor");
    if (factor && !cJSON_IsNumber(factor))
        return loom_error("preprocessor config '%s': 'rescale_factor' must be a number", r->name);
    if (factor)
        cfg->rescale_factor = factor->valuedouble;

    if (!do_resize)
        cfg->resize_mode = LOOM_RESIZE_NONE;
    cfg->rescale_mode = do_rescale ? LOOM_RESCALE_MULTIPLY : LOOM_RESCALE_NONE;
    cfg->normalize = do_normalize;
    return LOOM_OK;
}

/* IdeficsImageProcessor: convert_to_rgb composites on white, then a resize to
 * image_size x image_size, rescale by 1/255 (fixed in its code) and normalise. */
static int read_idefics(const json_reader *r, loom_image_preprocess_config *cfg) {
    int64_t size = 224;
    const cJSON *v = field(r, "image_size");
    if (v && positive_int(r, "image_size", v, &size) != 0)
        return LOOM_ERR;
    if (!field(r, "image_mean") || !field(r, "image_std"))
        return loom_error("preprocessor config '%s': IdeficsImageProcessor needs 'image_mean' and 'image_std' "
                          "(transformers 4.44 produces NaN without them)",
                          r->name);
    cfg->alpha_mode = LOOM_ALPHA_COMPOSITE;
    memset(cfg->background, 255, sizeof cfg->background);
    cfg->resize_mode = LOOM_RESIZE_EXACT;
    cfg->resize_height = cfg->resize_width = size;
    cfg->resample = LOOM_RESAMPLE_BICUBIC;
    cfg->center_crop = false;
    cfg->rescale_mode = LOOM_RESCALE_MULTIPLY;
    cfg->rescale_factor = 1.0 / 255.0;
    cfg->normalize = true;
    return read_triple(r, "image_mean", cfg->mean) != 0 || read_triple(r, "image_std", cfg->std) != 0 ? LOOM_ERR
                                                                                                       : LOOM_OK;
}

/* open_clip's image_transform(image_size, is_train=False): Resize (shortest
 * edge, or exact for a non-square [h, w]), CenterCrop with round-half-even
 * offsets, ToTensor (division by 255 in float32), Normalize. */
static int read_open_clip(const json_reader *r, loom_image_preprocess_config *cfg) {
    const cJSON *v = field(r, "image_size");
    int64_t h = 224, w = 224;

    if (cJSON_IsArray(v) && cJSON_GetArraySize(v) == 2) {
        if (positive_int(r, "image_size[0]", cJSON_GetArrayItem(v, 0), &h) != 0 ||
            positive_int(r, "image_size[1]", cJSON_GetArrayItem(v, 1), &w) != 0)
            return LOOM_ERR;
    } else if (v) {
        if (positive_int(r, "image_size", v, &h) != 0)
            return LOOM_ERR;
        w = h;
    }

    if (h == w) {
        cfg->resize_mode = LOOM_RESIZE_SHORTEST_EDGE;
        cfg->shortest_edge = h;
    } else {
        cfg->resize_mode = LOOM_RESIZE_EXACT;
        cfg->resize_height = h;
        cfg->resize_width = w;
    }

    cfg->resample = LOOM_RESAMPLE_BICUBIC;
    cfg->center_crop = true;
    cfg->crop_height = h;
    cfg->crop_width = w;
    cfg->crop_rounding = LOOM_CROP_ROUND_HALF_EVEN;
    cfg->rescale_mode = LOOM_RESCALE_DIVIDE_255;
    cfg->normalize = true;
    if (read_resample(r, &cfg->resample) != 0 || read_triple(r, "mean", cfg->mean) != 0 ||
        read_triple(r, "std", cfg->std) != 0)
        return LOOM_ERR;
    return LOOM_OK;
}

int loom_image_preprocess_config_from_json(loom_image_preprocess_config *config, const char *json, size_t size,
                                           const char *name) {
    json_reader r = {name ? name : "<memory>", NULL};
    if (!config || !json)
        return loom_error("loom_image_preprocess_config_from_json: %s is NULL", config ? "json" : "config");

    cJSON *root = cJSON_ParseWithLength(json, size);
    if (!root) {
        const char *at = cJSON_GetErrorPtr();
        size_t offset = at && at >= json && at <= json + size ? (size_t)(at - json) : 0;
        return loom_error("preprocessor config '%s': invalid JSON near byte %zu", r.name, offset);
    }
    r.root = root;
    int rc;
    if (!cJSON_IsObject(root)) {
        rc = loom_error("preprocessor config '%s': expected a JSON object", r.name);
        goto done;
    }

    loom_image_preprocess_config_init(config);
    const cJSON *type = field(&r, "image_processor_type");
    if (!type)
        type = field(&r, "feature_extractor_type");
    const cJSON *source = field(&r, "source");
    const char *type_name = cJSON_IsString(type) ? type->valuestring : NULL;

    if (type_name && strcmp(type_name, "IdeficsImageProcessor") == 0)
        rc = read_idefics(&r, config);
    else if (type_name && (strcmp(type_name, "CLIPImageProcessor") == 0 ||
                           strcmp(type_name, "CLIPFeatureExtractor") == 0 ||
                           strcmp(type_name, "BlipImageProcessor") == 0 ||
                           strcmp(type_name, "SiglipImageProcessor") == 0))
        rc = read_hf_processor(&r, type_name, config);
    else if (!type_name && cJSON_IsString(source) && strncmp(source->valuestring, "open_clip", 9) == 0)
        rc = read_open_clip(&r, config);
    else if (type_name)
        rc = loom_error("preprocessor config '%s': image_processor_type '%s' is not supported (supported: "
                        "CLIPImageProcessor, BlipImageProcessor, SiglipImageProcessor, IdeficsImageProcessor)",
                        r.name, type_name);
    else
        rc = loom_error("preprocessor config '%s': no 'image_processor_type' and no open_clip 'source'", r.name);

done:
    cJSON_Delete(root);
    return rc;
}
