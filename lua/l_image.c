/* Lua binding of core/image.h as the table loom.image: decoding (load and
 * decode return nil, message, code on failure, like io.open), the
 * preprocessing steps on u8 (H, W, C) tensors, and preprocess(), driven by
 * a preprocessor_config.json given as a table or as JSON text. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "image.h"
#include "loom_lua.h"

#define IMAGE_BOX_MT "loom.ImageBox"

/* A decoded image inside a userdata, whose __gc frees it after a Lua error. */
typedef struct image_box {
    loom_image image;
} image_box;

static int l_imagebox___gc(lua_State *L) {
    image_box *box = lua_touserdata(L, 1);
    if (box)
        loom_image_free(&box->image);
    return 0;
}

static image_box *new_image_box(lua_State *L) {
    image_box *box = lua_newuserdatauv(L, sizeof *box, 0);
    box->image = LOOM_IMAGE_EMPTY;
    luaL_setmetatable(L, IMAGE_BOX_MT);
    return box;
}

/* ---------------------------------------------------------------------------
 * argument helpers */

/* A u8 image tensor (H, W, C) with 1 <= C <= max_channels. */
static loom_tensor *check_image(lua_State *L, int idx, int max_channels) {
    loom_tensor *t = loom_checktensor(L, idx);
    if (t->dtype != LOOM_U8 || t->ndim != 3 || t->shape[2] < 1 || t->shape[2] > max_channels)
        luaL_argerror(L, idx, lua_pushfstring(L, "expected a u8 image (H, W, C) with 1..%d channels, got %s",
                                              max_channels, loom_shape_str(t).s));
    return t;
}

static int64_t check_side(lua_State *L, int idx) {
    lua_Integer v = luaL_checkinteger(L, idx);
    luaL_argcheck(L, v > 0 && v <= INT32_MAX, idx, lua_pushfstring(L, "size must be positive, got %I", v));
    return v;
}

/* Read `n` numbers from the value at idx: a table of n numbers or one
 * number for all. Errors go to argument `arg` and name `what`. */
static void check_numbers(lua_State *L, int idx, int n, double *out, int arg, const char *what) {
    idx = lua_absindex(L, idx);
    if (lua_type(L, idx) == LUA_TNUMBER) {
        for (int i = 0; i < n; i++)
            out[i] = lua_tonumber(L, idx);
        return;
    }
    int ok = lua_istable(L, idx) && (int)lua_rawlen(L, idx) == n;
    for (int i = 0; ok && i < n; i++) {
        lua_rawgeti(L, idx, i + 1);
        ok = lua_type(L, -1) == LUA_TNUMBER;
        out[i] = lua_tonumber(L, -1);
        lua_pop(L, 1);
    }
    if (!ok)
        luaL_argerror(L, arg, lua_pushfstring(L, "%s must be a number or a table of %d numbers", what, n));
}

/* The string option in field `key` of the table at `tbl` (default `def`),
 * as an index into `names`; errors go to argument `arg`. */
static int field_option(lua_State *L, int tbl, const char *key, const char *def, const char *const *names, int arg) {
    lua_getfield(L, tbl, key);
    const char *value = lua_isnil(L, -1) ? def : lua_tostring(L, -1);
    for (int i = 0; value && names[i]; i++) {
        if (strcmp(names[i], value) == 0) {
            lua_pop(L, 1);
            return i;
        }
    }
    return luaL_argerror(L, arg, lua_pushfstring(L, "invalid value for field '%s'", key));
}

/* Wrap a u8 (H, W, C) tensor as a loom_image without taking a reference:
 * C = 1, 2, 3, 4 are L, LA, RGB and RGBA. The tensor must be contiguous;
 * a strided view is copied into a new userdata pushed on the stack. */
static loom_image image_from_tensor(lua_State *L, int idx) {
    static const loom_image_mode modes[] = {LOOM_IMAGE_MODE_L, LOOM_IMAGE_MODE_LA, LOOM_IMAGE_MODE_RGB,
                                            LOOM_IMAGE_MODE_RGBA};
    loom_tensor *t = check_image(L, idx, 4);
    if (!loom_tensor_is_contiguous(t)) {
        loom_tensor *c = loom_newtensor(L);
        if (loom_tensor_contiguous(c, t) != LOOM_OK)
            loom_core_error(L, "image");
        t = c;
    }
    loom_image image = LOOM_IMAGE_EMPTY;
    image.pixels = *t;
    image.mode = modes[t->shape[2] - 1];
    image.bits_per_sample = 8;
    return image;
}

/* ---------------------------------------------------------------------------
 * decoding */

/* Read the options table of load/decode at idx into `o` and `keep_alpha`.
 * opts.rgb (drop alpha) is the default, so it is accepted and ignored,
 * except that it raises together with opts.keep_alpha. */
static void read_decode_options(lua_State *L, int idx, loom_image_decode_options *o, int *keep_alpha) {
    memset(o, 0, sizeof *o);
    *keep_alpha = 0;
    if (lua_isnoneornil(L, idx))
        return;
    luaL_checktype(L, idx, LUA_TTABLE);
    lua_getfield(L, idx, "orient");
    o->ignore_exif_orientation = !lua_isnil(L, -1) && !lua_toboolean(L, -1);
    lua_getfield(L, idx, "keep_alpha");
    *keep_alpha = lua_toboolean(L, -1);
    lua_getfield(L, idx, "rgb");
    luaL_argcheck(L, !(*keep_alpha && lua_toboolean(L, -1)), idx,
                  "fields 'keep_alpha' and 'rgb' contradict each other: 'rgb' drops alpha");
    lua_getfield(L, idx, "max_pixels");
    if (!lua_isnil(L, -1)) {
        int isnum;
        lua_Integer v = lua_tointegerx(L, -1, &isnum);
        luaL_argcheck(L, isnum && v > 0, idx, "field 'max_pixels' must be a positive integer");
        o->max_pixels = (uint64_t)v;
    }
    lua_pop(L, 4);
}

/* Push the tensor returned by load/decode: RGB (H, W, 3) as Pillow's
 * convert("RGB") gives it (alpha dropped), or with `keep_alpha` RGBA
 * (H, W, 4) for images with alpha. Then push the info table. */
static int push_decoded(lua_State *L, image_box *box, int keep_alpha) {
    loom_image *img = &box->image;
    int has_alpha = img->mode == LOOM_IMAGE_MODE_LA || img->mode == LOOM_IMAGE_MODE_RGBA;
    loom_tensor *r = loom_newtensor(L);
    int rc;
    if (img->mode == LOOM_IMAGE_MODE_RGB || (img->mode == LOOM_IMAGE_MODE_RGBA && keep_alpha)) {
        rc = loom_tensor_view_of(r, &img->pixels);
    } else if (img->mode == LOOM_IMAGE_MODE_LA && keep_alpha) {
        /* gray + alpha -> RGBA, as Pillow's convert("RGBA") does */
        int64_t h = img->pixels.shape[0], w = img->pixels.shape[1];
        int64_t shape[3] = {h, w, 4};
        rc = loom_tensor_init(r, LOOM_U8, 3, shape);
        if (rc == LOOM_OK) {
            const uint8_t *src = loom_tensor_data(&img->pixels);
            uint8_t *dst = loom_tensor_data(r);
            for (int64_t i = 0; i < h * w; i++) {
                dst[4 * i] = dst[4 * i + 1] = dst[4 * i + 2] = src[2 * i];
                dst[4 * i + 3] = src[2 * i + 1];
            }
        }
    } else {
        rc = loom_image_to_rgb(r, img, LOOM_ALPHA_DROP, NULL);
    }
    if (rc != LOOM_OK)
        return loom_core_error(L, "load");
    loom_gc_pace(L);

    lua_createtable(L, 0, 6);
    lua_pushstring(L, loom_image_format_name(img->format));
    lua_setfield(L, -2, "format");
    lua_pushstring(L, loom_image_mode_name(img->mode));
    lua_setfield(L, -2, "mode");
    lua_pushinteger(L, img->pixels.shape[1]);
    lua_setfield(L, -2, "width");
    lua_pushinteger(L, img->pixels.shape[0]);
    lua_setfield(L, -2, "height");
    lua_pushinteger(L, img->bits_per_sample);
    lua_setfield(L, -2, "bits_per_sample");
    lua_pushinteger(L, img->exif_orientation);
    lua_setfield(L, -2, "exif_orientation");
    lua_pushboolean(L, has_alpha);
    lua_setfield(L, -2, "has_alpha");
    return 2;
}

/* loom.image.load(path, opts?) -> image, info | nil, message, code.
 * opts.orient (default true) applies the EXIF orientation,
 * opts.keep_alpha keeps the alpha channel, opts.max_pixels caps the pixel
 * count. Codes: an errno name such as "ENOENT" or "EISDIR" when the file
 * cannot be opened, "EDECODE" when it cannot be decoded. */
static int l_image_load(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    loom_image_decode_options opts;
    int keep_alpha;
    read_decode_options(L, 2, &opts, &keep_alpha);
    lua_settop(L, 2);
    int err = loom_open_errno(path);
    if (err)
        return loom_push_open_failure(L, path, err);
    image_box *box = new_image_box(L);
    if (loom_image_load(&box->image, path, &opts) != LOOM_OK) {
        lua_pushnil(L);
        lua_pushstring(L, loom_last_error());
        lua_pushliteral(L, "EDECODE");
        return 3;
    }
    return push_decoded(L, box, keep_alpha);
}

/* loom.image.decode(bytes, name?, opts?): load() from a string in memory. */
static int l_image_decode(lua_State *L) {
    size_t size;
    const char *data = luaL_checklstring(L, 1, &size);
    const char *name = luaL_optstring(L, 2, NULL);
    loom_image_decode_options opts;
    int keep_alpha;
    read_decode_options(L, 3, &opts, &keep_alpha);
    lua_settop(L, 3);
    image_box *box = new_image_box(L);
    if (loom_image_decode(&box->image, data, size, name, &opts) != LOOM_OK) {
        lua_pushnil(L);
        lua_pushstring(L, loom_last_error());
        lua_pushliteral(L, "EDECODE");
        return 3;
    }
    return push_decoded(L, box, keep_alpha);
}

/* ---------------------------------------------------------------------------
 * single steps */

static int l_image_resize(lua_State *L) {
    static const char *const filters[] = {"bicubic", "bilinear", NULL};
    loom_tensor *img = check_image(L, 1, 4);
    int64_t h = check_side(L, 2), w = check_side(L, 3);
    int f = luaL_checkoption(L, 4, "bicubic", filters);
    lua_settop(L, 4);
    loom_tensor *r = loom_newtensor(L);
    if (loom_image_resize(r, img, h, w, f == 0 ? LOOM_RESAMPLE_BICUBIC : LOOM_RESAMPLE_BILINEAR) != LOOM_OK)
        loom_core_error(L, "resize");
    loom_gc_pace(L);
    return 1;
}

static int l_image_center_crop(lua_State *L) {
    static const char *const roundings[] = {"floor", "round_half_even", NULL};
    loom_tensor *img = check_image(L, 1, 4);
    int64_t h = check_side(L, 2), w = check_side(L, 3);
    int rounding = luaL_checkoption(L, 4, "floor", roundings);
    lua_settop(L, 4);
    loom_tensor *r = loom_newtensor(L);
    if (loom_image_center_crop(r, img, h, w, rounding == 0 ? LOOM_CROP_FLOOR : LOOM_CROP_ROUND_HALF_EVEN) != LOOM_OK)
        loom_core_error(L, "center_crop");
    loom_gc_pace(L);
    return 1;
}

/* pad_to_square(img, fill?): fill is one value or C values (default 0). */
static int l_image_pad_to_square(lua_State *L) {
    loom_tensor *img = check_image(L, 1, 4);
    int c = (int)img->shape[2];
    double fill[4] = {0, 0, 0, 0};
    if (!lua_isnoneornil(L, 2))
        check_numbers(L, 2, c, fill, 2, "fill");
    uint8_t bytes[4];
    for (int i = 0; i < c; i++) {
        luaL_argcheck(L, fill[i] >= 0 && fill[i] <= 255, 2, "fill values must be in 0..255");
        bytes[i] = (uint8_t)fill[i];
    }
    lua_settop(L, 2);
    loom_tensor *r = loom_newtensor(L);
    if (loom_image_pad_to_square(r, img, bytes) != LOOM_OK)
        loom_core_error(L, "pad_to_square");
    loom_gc_pace(L);
    return 1;
}

/* normalize(img, opts?) -> f32 (C, H, W). opts.rescale is "multiply"
 * (default, by opts.rescale_factor = 1/255), "divide_255" or "none";
 * opts.mean and opts.std (C values each) normalise when both are given. */
static int l_image_normalize(lua_State *L) {
    static const char *const modes[] = {"none", "multiply", "divide_255", NULL};
    loom_tensor *img = check_image(L, 1, 4);
    int c = (int)img->shape[2];
    int opts = lua_isnoneornil(L, 2) ? 0 : 2;
    if (opts)
        luaL_checktype(L, 2, LUA_TTABLE);
    lua_settop(L, 2);
    int mode = 1;
    double factor = 1.0 / 255.0, mean[4], std[4];
    int has_mean = 0, has_std = 0;
    if (opts) {
        mode = field_option(L, 2, "rescale", "multiply", modes, 2);
        lua_getfield(L, 2, "rescale_factor");
        if (!lua_isnil(L, -1)) {
            luaL_argcheck(L, lua_type(L, -1) == LUA_TNUMBER, 2, "field 'rescale_factor' must be a number");
            factor = lua_tonumber(L, -1);
        }
        lua_getfield(L, 2, "mean");
        if ((has_mean = !lua_isnil(L, -1)))
            check_numbers(L, -1, c, mean, 2, "field 'mean'");
        lua_getfield(L, 2, "std");
        if ((has_std = !lua_isnil(L, -1)))
            check_numbers(L, -1, c, std, 2, "field 'std'");
        lua_settop(L, 2);
        luaL_argcheck(L, has_mean == has_std, 2, "give both 'mean' and 'std' or neither");
    }
    static const loom_rescale_mode rescale_modes[] = {LOOM_RESCALE_NONE, LOOM_RESCALE_MULTIPLY,
                                                      LOOM_RESCALE_DIVIDE_255};

    loom_tensor *r = loom_newtensor(L);
    if (loom_image_normalize(r, img, rescale_modes[mode], factor, has_mean ? mean : NULL, has_std ? std : NULL) != LOOM_OK)
        loom_core_error(L, "normalize");
    loom_gc_pace(L);
    return 1;
}

/* to_rgb(img, opts?) -> u8 (H, W, 3): opts.alpha is "drop" (default) or
 * "composite" onto opts.background (3 values, default white). */
static int l_image_to_rgb(lua_State *L) {
    static const char *const modes[] = {"drop", "composite", NULL};
    int mode = 0;
    uint8_t background[3] = {255, 255, 255};
    if (!lua_isnoneornil(L, 2)) {
        luaL_checktype(L, 2, LUA_TTABLE);
        mode = field_option(L, 2, "alpha", "drop", modes, 2);
        lua_getfield(L, 2, "background");
        if (!lua_isnil(L, -1)) {
            double bg[3];
            check_numbers(L, -1, 3, bg, 2, "field 'background'");
            for (int i = 0; i < 3; i++) {
                luaL_argcheck(L, bg[i] >= 0 && bg[i] <= 255, 2, "field 'background' values must be in 0..255");
                background[i] = (uint8_t)bg[i];
            }
        }
    }
    lua_settop(L, 2);
    loom_image image = image_from_tensor(L, 1);
    loom_tensor *r = loom_newtensor(L);
    if (loom_image_to_rgb(r, &image, mode ? LOOM_ALPHA_COMPOSITE : LOOM_ALPHA_DROP, background) != LOOM_OK)
        loom_core_error(L, "to_rgb");
    loom_gc_pace(L);
    return 1;
}

/* orient(img, exif_orientation) as PIL.ImageOps.exif_transpose. */
static int l_image_orient(lua_State *L) {
    loom_tensor *img = check_image(L, 1, 4);
    lua_Integer o = luaL_checkinteger(L, 2);
    luaL_argcheck(L, o >= 0 && o <= 8, 2, "EXIF orientation must be in 0..8");
    lua_settop(L, 2);
    loom_tensor *r = loom_newtensor(L);
    if (loom_image_orient(r, img, (int)o) != LOOM_OK)
        loom_core_error(L, "orient");
    loom_gc_pace(L);
    return 1;
}

static int l_image_shortest_edge_size(lua_State *L) {
    int64_t h = check_side(L, 1), w = check_side(L, 2), edge = check_side(L, 3);
    int64_t oh, ow;
    if (loom_image_shortest_edge_size(h, w, edge, &oh, &ow) != LOOM_OK)
        return loom_core_error(L, "shortest_edge_size");
    lua_pushinteger(L, oh);
    lua_pushinteger(L, ow);
    return 2;
}

/* ---------------------------------------------------------------------------
 * preprocess: the configuration table goes back to JSON text so that the
 * core alone interprets preprocessor_config.json */

/* Append the JSON form of the value at `idx` to the string at `acc` (a
 * stack slot). Configurations are small, so repeated concatenation is
 * cheap enough. */
static void append(lua_State *L, int acc, const char *s, size_t n) {
    lua_pushvalue(L, acc);
    lua_pushlstring(L, s, n);
    lua_concat(L, 2);
    lua_replace(L, acc);
}

static void append_cstr(lua_State *L, int acc, const char *s) { append(L, acc, s, strlen(s)); }

static void append_json_string(lua_State *L, int acc, const char *s, size_t n) {
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    luaL_addchar(&b, '"');
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') {
            luaL_addchar(&b, '\\');
            luaL_addchar(&b, (char)c);
        } else if (c < 0x20) {
            char esc[8];
            snprintf(esc, sizeof esc, "\\u%04x", c);
            luaL_addstring(&b, esc);
        } else {
            luaL_addchar(&b, (char)c);
        }
    }
    luaL_addchar(&b, '"');
    luaL_pushresult(&b);
    size_t len;
    const char *text = lua_tolstring(L, -1, &len);
    append(L, acc, text, len);
    lua_pop(L, 1);
}

static void append_json(lua_State *L, int acc, int idx, int depth) {
    char num[64];
    idx = lua_absindex(L, idx);
    switch (lua_type(L, idx)) {
    case LUA_TBOOLEAN:
        append_cstr(L, acc, lua_toboolean(L, idx) ? "true" : "false");
        return;
    case LUA_TNUMBER:
        if (lua_isinteger(L, idx))
            snprintf(num, sizeof num, "%lld", (long long)lua_tointeger(L, idx));
        else if (isfinite(lua_tonumber(L, idx)))
            snprintf(num, sizeof num, "%.17g", (double)lua_tonumber(L, idx));
        else
            snprintf(num, sizeof num, "null");
        append_cstr(L, acc, num);
        return;
    case LUA_TSTRING: {
        size_t n;
        const char *s = lua_tolstring(L, idx, &n);
        append_json_string(L, acc, s, n);
        return;
    }
    case LUA_TTABLE:
        if (lua_rawlen(L, idx) == 0 && luaL_callmeta(L, idx, "__tostring")) {
            /* json.null of lua/loom/json.lua prints as "null" */
            int is_null = lua_type(L, -1) == LUA_TSTRING && strcmp(lua_tostring(L, -1), "null") == 0;
            lua_pop(L, 1);
            if (is_null) {
                append_cstr(L, acc, "null");
                return;
            }
        }
        break;
    default:
        append_cstr(L, acc, "null");
        return;
    }

    if (depth > 32)
        luaL_error(L, "preprocess: the configuration table is nested too deeply");
    luaL_checkstack(L, 6, "configuration too deep");
    lua_Unsigned n = lua_rawlen(L, idx);
    if (n > 0) {
        append_cstr(L, acc, "[");
        for (lua_Unsigned i = 1; i <= n; i++) {
            if (i > 1)
                append_cstr(L, acc, ",");
            lua_rawgeti(L, idx, (lua_Integer)i);
            append_json(L, acc, -1, depth + 1);
            lua_pop(L, 1);
        }
        append_cstr(L, acc, "]");
        return;
    }

    append_cstr(L, acc, "{");
    int first = 1;
    for (lua_pushnil(L); lua_next(L, idx); lua_pop(L, 1)) {
        if (lua_type(L, -2) != LUA_TSTRING)
            continue;
        if (!first)
            append_cstr(L, acc, ",");
        first = 0;
        size_t klen;
        const char *key = lua_tolstring(L, -2, &klen);
        append_json_string(L, acc, key, klen);
        append_cstr(L, acc, ":");
        append_json(L, acc, -1, depth + 1);
    }
    append_cstr(L, acc, "}");
}

/* Fill `config` from the table or JSON text at idx. A table may also set
 * pad_to_square = true (LLaVA's image_aspect_ratio "pad"), which pads with
 * the processor mean colour. */
static void read_preprocess_config(lua_State *L, int idx, loom_image_preprocess_config *config) {
    int pad = 0;
    if (lua_istable(L, idx)) {
        lua_pushliteral(L, "");
        int acc = lua_gettop(L);
        append_json(L, acc, idx, 0);
        lua_getfield(L, idx, "pad_to_square");
        pad = lua_toboolean(L, -1);
        lua_pop(L, 1);
    } else if (lua_type(L, idx) == LUA_TSTRING) {
        lua_pushvalue(L, idx);
    } else {
        luaL_typeerror(L, idx, "table or JSON text");
    }
    size_t n;
    const char *json = lua_tolstring(L, -1, &n);
    loom_image_preprocess_config_init(config);
    if (loom_image_preprocess_config_from_json(config, json, n, "preprocessor config") != LOOM_OK)
        loom_core_error(L, "preprocess");
    lua_pop(L, 1);
    if (pad) {
        config->pad_to_square = true;
        loom_image_fill_from_mean(config->pad_fill, config->mean);
    }
}

/* preprocess(image_or_path, config) -> pixel_values f32 (3, H, W) and the
 * u8 (H, W, 3) image after resizing and cropping. A path is decoded first
 * (raising when that fails); a tensor is u8 (H, W, C) with C = 1..4. */
static int l_image_preprocess(lua_State *L) {
    loom_image_preprocess_config config;
    lua_settop(L, 2);
    read_preprocess_config(L, 2, &config);
    loom_image image;
    if (lua_type(L, 1) == LUA_TSTRING) {
        image_box *box = new_image_box(L);
        if (loom_image_load(&box->image, lua_tostring(L, 1), NULL) != LOOM_OK)
            loom_core_error(L, "preprocess");
        image = box->image;
    } else {
        image = image_from_tensor(L, 1);
    }
    loom_tensor *pixels = loom_newtensor(L);
    loom_tensor *u8 = loom_newtensor(L);
    if (loom_image_preprocess(pixels, u8, &image, &config) != LOOM_OK)
        loom_core_error(L, "preprocess");
    loom_gc_pace(L);
    return 2;
}

static const luaL_Reg image_funcs[] = {
    {"load", l_image_load},
    {"decode", l_image_decode},
    {"resize", l_image_resize},
    {"center_crop", l_image_center_crop},
    {"pad_to_square", l_image_pad_to_square},
    {"normalize", l_image_normalize},
    {"to_rgb", l_image_to_rgb},
    {"orient", l_image_orient},
    {"shortest_edge_size", l_image_shortest_edge_size},
    {"preprocess", l_image_preprocess},
    {NULL, NULL},
};

void loom_open_image(lua_State *L) {
    luaL_newmetatable(L, IMAGE_BOX_MT);
    lua_pushcfunction(L, l_imagebox___gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);
    luaL_newlib(L, image_funcs);
    lua_setfield(L, -2, "image");
}
