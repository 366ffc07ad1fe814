/* Lua binding of core/tokenizer.h: loom.tokenizer.load* return a
 * "loom.Tokenizer" userdata with encode/decode and vocabulary queries, and
 * tok:decode_stream() a "loom.DecodeStream" for streaming generation. Ids are
 * 0-based on both sides. Loaders open files, so they return nil, message,
 * code: an errno name when a file cannot be opened, "EFORMAT" when its
 * content is not a valid tokenizer. The methods raise. */
#include <stdlib.h>
#include <string.h>

#include "loom_lua.h"
#include "tokenizer.h"

#define TOKENIZER_MT "loom.Tokenizer"
#define DECODE_STREAM_MT "loom.DecodeStream"
#define MALLOC_BOX_MT "loom.MallocBox"

int luaopen_loom_tokenizer(lua_State *L);

typedef struct tokenizer_box {
    loom_tokenizer *tok;
} tokenizer_box;

typedef struct stream_box {
    loom_decode_stream *stream;
} stream_box;

/* ---------------------------------------------------------------------------
 * A userdata owning one malloc'd block, so memory that the core returns is
 * freed by the collector if building the Lua result raises. */

static int l_mallocbox___gc(lua_State *L) {
    void **slot = luaL_checkudata(L, 1, MALLOC_BOX_MT);
    free(*slot);
    *slot = NULL;
    return 0;
}

static void **push_malloc_box(lua_State *L) {
    void **slot = lua_newuserdatauv(L, sizeof *slot, 0);
    *slot = NULL;
    luaL_setmetatable(L, MALLOC_BOX_MT);
    return slot;
}

static void release_malloc_box(lua_State *L, int idx, void **slot) {
    free(*slot);
    *slot = NULL;
    lua_remove(L, idx);
}

/* ---------------------------------------------------------------------------
 * Loading */

static loom_tokenizer **push_tokenizer_box(lua_State *L) {
    tokenizer_box *box = lua_newuserdatauv(L, sizeof *box, 0);
    box->tok = NULL;
    luaL_setmetatable(L, TOKENIZER_MT);
    return &box->tok;
}

/* Push nil, the core's message and "EFORMAT": the file was read but its
 * content is not a tokenizer of the expected kind, or is malformed. */
static int push_load_failure(lua_State *L) {
    lua_pushnil(L);
    lua_pushstring(L, loom_last_error());
    lua_pushliteral(L, "EFORMAT");
    return 3;
}

/* loom.tokenizer.load(path): format recognised by content. */
static int l_tokenizer_load(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    int err = loom_open_errno(path);
    if (err)
        return loom_push_open_failure(L, path, err);
    loom_tokenizer **slot = push_tokenizer_box(L);
    if (loom_tokenizer_load(slot, path) != LOOM_OK)
        return push_load_failure(L);
    return 1;
}

/* loom.tokenizer.load_bpe_files(vocab_path, merges_path): GPT-2 BPE. */
static int l_tokenizer_load_bpe_files(lua_State *L) {
    const char *vocab = luaL_checkstring(L, 1);
    const char *merges = luaL_checkstring(L, 2);
    int err = loom_open_errno(vocab);
    if (err)
        return loom_push_open_failure(L, vocab, err);
    err = loom_open_errno(merges);
    if (err)
        return loom_push_open_failure(L, merges, err);
    loom_tokenizer **slot = push_tokenizer_box(L);
    if (loom_tokenizer_load_bpe_files(slot, vocab, merges) != LOOM_OK)
        return push_load_failure(L);
    return 1;
}

/* loom.tokenizer.load_wordpiece(vocab_path, lowercase). */
static int l_tokenizer_load_wordpiece(lua_State *L) {
    const char *vocab = luaL_checkstring(L, 1);
    int lowercase = lua_toboolean(L, 2);
    int err = loom_open_errno(vocab);
    if (err)
        return loom_push_open_failure(L, vocab, err);
    loom_tokenizer **slot = push_tokenizer_box(L);
    if (loom_tokenizer_load_wordpiece_vocab(slot, vocab, lowercase) != LOOM_OK)
        return push_load_failure(L);
    return 1;
}

/* loom.tokenizer.load_buffer(bytes, name?). */
static int l_tokenizer_load_buffer(lua_State *L) {
    size_t len;
    const char *data = luaL_checklstring(L, 1, &len);
    const char *name = luaL_optstring(L, 2, NULL);
    loom_tokenizer **slot = push_tokenizer_box(L);
    if (loom_tokenizer_load_buffer(slot, data, len, name) != LOOM_OK)
        return push_load_failure(L);
    return 1;
}

/* ---------------------------------------------------------------------------
 * Methods */

loom_tokenizer *loom_checktokenizer(lua_State *L, int idx) {
    tokenizer_box *box = luaL_checkudata(L, idx, TOKENIZER_MT);
    if (!box->tok)
        luaL_error(L, "attempt to use a released tokenizer");
    return box->tok;
}

static int l_tokenizer___gc(lua_State *L) {
    tokenizer_box *box = luaL_checkudata(L, 1, TOKENIZER_MT);
    loom_tokenizer_free(box->tok);
    box->tok = NULL;
    return 0;
}

static int l_tokenizer_free(lua_State *L) { return l_tokenizer___gc(L); }

/* An encode option from the table at `idx`: nil keeps the default. */
static int opt_flag(lua_State *L, int idx, const char *key) {
    if (lua_isnoneornil(L, idx))
        return LOOM_TOKENIZER_DEFAULT;
    int type = lua_getfield(L, idx, key);
    int value = type == LUA_TNIL ? LOOM_TOKENIZER_DEFAULT : lua_toboolean(L, -1);
    lua_pop(L, 1);
    return value;
}

static loom_encode_opts check_encode_opts(lua_State *L, int idx) {
    if (!lua_isnoneornil(L, idx))
        luaL_checktype(L, idx, LUA_TTABLE);
    loom_encode_opts opts = LOOM_ENCODE_OPTS_DEFAULT;
    opts.add_bos = opt_flag(L, idx, "add_bos");
    opts.add_eos = opt_flag(L, idx, "add_eos");
    opts.parse_special = opt_flag(L, idx, "parse_special");
    opts.legacy = opt_flag(L, idx, "legacy");
    return opts;
}

/* tok:encode(text, opts?) -> list of ids. opts: add_bos, add_eos,
 * parse_special, legacy (booleans; nil keeps the tokenizer's default). */
static int l_tokenizer_encode(lua_State *L) {
    loom_tokenizer *tok = loom_checktokenizer(L, 1);
    size_t len;
    const char *text = luaL_checklstring(L, 2, &len);
    loom_encode_opts opts = check_encode_opts(L, 3);
    void **slot = push_malloc_box(L);
    int box = lua_gettop(L);
    int32_t *ids = NULL;
    size_t n = 0;
    if (loom_tokenizer_encode(tok, text, len, &opts, &ids, &n) != LOOM_OK)
        return loom_core_error(L, "encode");
    *slot = ids;
    lua_createtable(L, (int)n, 0);
    for (size_t i = 0; i < n; i++) {
        lua_pushinteger(L, ids[i]);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    release_malloc_box(L, box, slot);
    return 1;
}

/* Read ids from a Lua list or a 1-D integer tensor at `idx` into a
 * collector-owned int32 array pushed on the stack. */
static int32_t *check_ids(lua_State *L, int idx, size_t *n) {
    loom_tensor *t = loom_testtensor(L, idx);
    if (t) {
        luaL_argcheck(L, t->ndim == 1 && !loom_dtype_is_float(t->dtype), idx,
                      "expected a 1-D integer tensor of ids");
        *n = (size_t)t->shape[0];
        int32_t *ids = lua_newuserdatauv(L, *n * sizeof *ids + 1, 0);
        for (size_t i = 0; i < *n; i++)
            ids[i] = (int32_t)loom_tensor_get_flat(t, (int64_t)i);
        return ids;
    }
    luaL_checktype(L, idx, LUA_TTABLE);
    *n = (size_t)lua_rawlen(L, idx);
    int32_t *ids = lua_newuserdatauv(L, *n * sizeof *ids + 1, 0);
    for (size_t i = 0; i < *n; i++) {
        lua_rawgeti(L, idx, (lua_Integer)i + 1);
        int isint;
        lua_Integer v = lua_tointegerx(L, -1, &isint);
        if (!isint || v < INT32_MIN || v > INT32_MAX)
            luaL_error(L, "bad argument #%d to 'decode' (id at position %d is not a 32-bit integer)", idx,
                       (int)i + 1);
        ids[i] = (int32_t)v;
        lua_pop(L, 1);
    }
    return ids;
}

/* tok:decode(ids, opts?) -> text. opts.skip_special (default true). */
static int l_tokenizer_decode(lua_State *L) {
    loom_tokenizer *tok = loom_checktokenizer(L, 1);
    loom_decode_opts opts = {.skip_special = true};
    if (!lua_isnoneornil(L, 3)) {
        luaL_checktype(L, 3, LUA_TTABLE);
        if (lua_getfield(L, 3, "skip_special") != LUA_TNIL)
            opts.skip_special = lua_toboolean(L, -1);
        lua_pop(L, 1);
    }
    lua_settop(L, 3);
    size_t n;
    int32_t *ids = check_ids(L, 2, &n);
    void **slot = push_malloc_box(L);
    int box = lua_gettop(L);
    char *text = NULL;
    size_t len = 0;
    if (loom_tokenizer_decode(tok, ids, n, &opts, &text, &len) != LOOM_OK)
        return loom_core_error(L, "decode");
    *slot = text;
    lua_pushlstring(L, text, len);
    release_malloc_box(L, box, slot);
    return 1;
}

static int l_tokenizer_vocab_size(lua_State *L) {
    lua_pushinteger(L, loom_tokenizer_vocab_size(loom_checktokenizer(L, 1)));
    return 1;
}

/* tok:token_to_id(text) -> id, or nil when not in the vocabulary. */
static int l_tokenizer_token_to_id(lua_State *L) {
    loom_tokenizer *tok = loom_checktokenizer(L, 1);
    size_t len;
    const char *text = luaL_checklstring(L, 2, &len);
    int32_t id = loom_tokenizer_token_to_id(tok, text, len);
    if (id < 0)
        lua_pushnil(L);
    else
        lua_pushinteger(L, id);
    return 1;
}

/* tok:id_to_token(id) -> piece text, or nil for an unknown id. */
static int l_tokenizer_id_to_token(lua_State *L) {
    loom_tokenizer *tok = loom_checktokenizer(L, 1);
    lua_Integer id = luaL_checkinteger(L, 2);
    size_t len = 0;
    const char *text = id < 0 || id > INT32_MAX ? NULL : loom_tokenizer_id_to_token(tok, (int32_t)id, &len);
    if (text)
        lua_pushlstring(L, text, len);
    else
        lua_pushnil(L);
    return 1;
}

static int l_tokenizer_is_special(lua_State *L) {
    loom_tokenizer *tok = loom_checktokenizer(L, 1);
    lua_Integer id = luaL_checkinteger(L, 2);
    lua_pushboolean(L, id >= 0 && id <= INT32_MAX && loom_tokenizer_is_special(tok, (int32_t)id));
    return 1;
}

static const char *const special_names[] = {"bos", "eos", "pad", "unk", NULL};
static const loom_special_token special_values[] = {LOOM_TOKEN_BOS, LOOM_TOKEN_EOS, LOOM_TOKEN_PAD,
                                                    LOOM_TOKEN_UNK};

/* tok:special_id("bos" | "eos" | "pad" | "unk") -> id or nil. */
static int l_tokenizer_special_id(lua_State *L) {
    loom_tokenizer *tok = loom_checktokenizer(L, 1);
    int which = luaL_checkoption(L, 2, NULL, special_names);
    int32_t id = loom_tokenizer_special_id(tok, special_values[which]);
    if (id < 0)
        lua_pushnil(L);
    else
        lua_pushinteger(L, id);
    return 1;
}

/* tok:set_special_id(name, id or nil). */
static int l_tokenizer_set_special_id(lua_State *L) {
    loom_tokenizer *tok = loom_checktokenizer(L, 1);
    int which = luaL_checkoption(L, 2, NULL, special_names);
    lua_Integer id = luaL_optinteger(L, 3, -1);
    luaL_argcheck(L, id >= -1 && id <= INT32_MAX, 3, "id out of range");
    if (loom_tokenizer_set_special_id(tok, special_values[which], (int32_t)id) != LOOM_OK)
        return loom_core_error(L, "set_special_id");
    return 0;
}

/* tok:set_defaults(opts): new defaults for encode's options. */
static int l_tokenizer_set_defaults(lua_State *L) {
    loom_tokenizer *tok = loom_checktokenizer(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    loom_encode_opts opts = check_encode_opts(L, 2);
    loom_tokenizer_set_defaults(tok, &opts);
    return 0;
}

/* tok:add_token(text, special?) -> id. */
static int l_tokenizer_add_token(lua_State *L) {
    loom_tokenizer *tok = loom_checktokenizer(L, 1);
    const char *text = luaL_checkstring(L, 2);
    int special = lua_toboolean(L, 3);
    int32_t id = -1;
    if (loom_tokenizer_add_token(tok, text, special, &id) != LOOM_OK)
        return loom_core_error(L, "add_token");
    lua_pushinteger(L, id);
    return 1;
}

static int l_tokenizer_kind(lua_State *L) {
    static const char *const names[] = {"sentencepiece_bpe", "byte_level_bpe", "wordpiece"};
    loom_tokenizer_kind kind = loom_tokenizer_get_kind(loom_checktokenizer(L, 1));
    lua_pushstring(L, (unsigned)kind < 3 ? names[kind] : "unknown");
    return 1;
}

static int l_tokenizer_source(lua_State *L) {
    static const char *const names[] = {"sentencepiece", "hf_json", "bpe_files", "vocab_txt"};
    loom_tokenizer_source source = loom_tokenizer_get_source(loom_checktokenizer(L, 1));
    lua_pushstring(L, (unsigned)source < 4 ? names[source] : "unknown");
    return 1;
}

static int l_tokenizer___tostring(lua_State *L) {
    tokenizer_box *box = luaL_checkudata(L, 1, TOKENIZER_MT);
    if (!box->tok) {
        lua_pushstring(L, "loom.Tokenizer (released)");
        return 1;
    }
    lua_pushcfunction(L, l_tokenizer_kind);
    lua_pushvalue(L, 1);
    lua_call(L, 1, 1);
    lua_pushfstring(L, "loom.Tokenizer (%s, %d ids)", lua_tostring(L, -1),
                    (int)loom_tokenizer_vocab_size(box->tok));
    return 1;
}

/* ---------------------------------------------------------------------------
 * Decode streams */

/* tok:decode_stream(opts?) -> stream; the stream keeps the tokenizer alive. */
static int l_tokenizer_decode_stream(lua_State *L) {
    loom_tokenizer *tok = loom_checktokenizer(L, 1);
    loom_decode_opts opts = {.skip_special = true};
    if (!lua_isnoneornil(L, 2)) {
        luaL_checktype(L, 2, LUA_TTABLE);
        if (lua_getfield(L, 2, "skip_special") != LUA_TNIL)
            opts.skip_special = lua_toboolean(L, -1);
        lua_pop(L, 1);
    }
    stream_box *box = lua_newuserdatauv(L, sizeof *box, 1);
    box->stream = NULL;
    luaL_setmetatable(L, DECODE_STREAM_MT);
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, -2, 1);
    if (loom_decode_stream_new(&box->stream, tok, &opts) != LOOM_OK)
        return loom_core_error(L, "decode_stream");
    return 1;
}

static loom_decode_stream *check_stream(lua_State *L, int idx) {
    stream_box *box = luaL_checkudata(L, idx, DECODE_STREAM_MT);
    if (!box->stream)
        luaL_error(L, "attempt to use a released decode stream");
    return box->stream;
}

/* stream:push(id) -> the text that id completes (possibly ""). */
static int l_decodestream_push(lua_State *L) {
    loom_decode_stream *s = check_stream(L, 1);
    lua_Integer id = luaL_checkinteger(L, 2);
    luaL_argcheck(L, id >= 0 && id <= INT32_MAX, 2, "id out of range");
    const char *text = NULL;
    size_t len = 0;
    if (loom_decode_stream_push(s, (int32_t)id, &text, &len) != LOOM_OK)
        return loom_core_error(L, "push");
    lua_pushlstring(L, text ? text : "", len);
    return 1;
}

/* stream:flush() -> held bytes (as U+FFFD); the stream starts over. */
static int l_decodestream_flush(lua_State *L) {
    loom_decode_stream *s = check_stream(L, 1);
    const char *text = NULL;
    size_t len = 0;
    if (loom_decode_stream_flush(s, &text, &len) != LOOM_OK)
        return loom_core_error(L, "flush");
    lua_pushlstring(L, text ? text : "", len);
    return 1;
}

static int l_decodestream_reset(lua_State *L) {
    loom_decode_stream_reset(check_stream(L, 1));
    return 0;
}

static int l_decodestream___gc(lua_State *L) {
    stream_box *box = luaL_checkudata(L, 1, DECODE_STREAM_MT);
    loom_decode_stream_free(box->stream);
    box->stream = NULL;
    return 0;
}

static int l_decodestream_free(lua_State *L) { return l_decodestream___gc(L); }

/* ---------------------------------------------------------------------------
 * Registration */

static const luaL_Reg tokenizer_funcs[] = {
    {"load", l_tokenizer_load},
    {"load_bpe_files", l_tokenizer_load_bpe_files},
    {"load_wordpiece", l_tokenizer_load_wordpiece},
    {"load_buffer", l_tokenizer_load_buffer},
    {NULL, NULL},
};

static const luaL_Reg tokenizer_methods[] = {
    {"encode", l_tokenizer_encode},
    {"decode", l_tokenizer_decode},
    {"vocab_size", l_tokenizer_vocab_size},
    {"token_to_id", l_tokenizer_token_to_id},
    {"id_to_token", l_tokenizer_id_to_token},
    {"is_special", l_tokenizer_is_special},
    {"special_id", l_tokenizer_special_id},
    {"set_special_id", l_tokenizer_set_special_id},
    {"set_defaults", l_tokenizer_set_defaults},
    {"add_token", l_tokenizer_add_token},
    {"kind", l_tokenizer_kind},
    {"source", l_tokenizer_source},
    {"decode_stream", l_tokenizer_decode_stream},
    {"free", l_tokenizer_free},
    {NULL, NULL},
};

static const luaL_Reg stream_methods[] = {
    {"push", l_decodestream_push},
    {"flush", l_decodestream_flush},
    {"reset", l_decodestream_reset},
    {"free", l_decodestream_free},
    {NULL, NULL},
};

static void new_metatable(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction gc) {
    luaL_newmetatable(L, name);
    if (methods) {
        lua_newtable(L);
        luaL_setfuncs(L, methods, 0);
        lua_setfield(L, -2, "__index");
    }
    lua_pushcfunction(L, gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, gc);
    lua_setfield(L, -2, "__close");
    lua_pop(L, 1);
}

/* The tokenizer library table (loom.tokenizer): creates the metatables and
 * returns the table of loaders. lua/l_core.c stores it as `tokenizer` in the
 * loom.core module; it also works as a standalone C module. */
int luaopen_loom_tokenizer(lua_State *L) {
    new_metatable(L, TOKENIZER_MT, tokenizer_methods, l_tokenizer___gc);
    luaL_getmetatable(L, TOKENIZER_MT);
    lua_pushcfunction(L, l_tokenizer___tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pop(L, 1);
    new_metatable(L, DECODE_STREAM_MT, stream_methods, l_decodestream___gc);
    new_metatable(L, MALLOC_BOX_MT, NULL, l_mallocbox___gc);
    luaL_newlib(L, tokenizer_funcs);
    return 1;
}
