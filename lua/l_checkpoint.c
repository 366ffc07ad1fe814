/* Lua binding of the checkpoint readers and the safetensors writer:
 * loom.load(path) returns a table of name -> tensor (views of the file
 * mapping) and a table of metadata; loom.save(path, tensors, metadata?)
 * writes a .safetensors file. Both raise on failure with the core message,
 * which names the file, the tensor and the byte offset. */
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "loom_lua.h"
#include "pytorch.h"
#include "safetensors.h"

#define CHECKPOINT_BOX_MT "loom.CheckpointBox"

/* An open reader owned by a userdata, so that an error while the Lua tables
 * are built still closes it (through __gc). */
typedef struct checkpoint_box {
    loom_checkpoint *safetensors;
    loom_pytorch *pytorch;
} checkpoint_box;

static int l_checkpointbox___gc(lua_State *L) {
    checkpoint_box *box = lua_touserdata(L, 1);
    if (box) {
        loom_checkpoint_close(box->safetensors);
        loom_pytorch_close(box->pytorch);
        box->safetensors = NULL;
        box->pytorch = NULL;
    }
    return 0;
}

static int is_directory(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

static int is_file(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* Open `path` into the box: a directory (model.safetensors, its index, or
 * else pytorch_model.bin), a safetensors file or index, or a PyTorch zip
 * checkpoint. Files are recognised by content. */
static void open_checkpoint(lua_State *L, checkpoint_box *box, const char *path) {
    int rc;
    if (is_directory(path)) {
        const char *bin = lua_pushfstring(L, "%s/pytorch_model.bin", path);
        const char *st = lua_pushfstring(L, "%s/model.safetensors", path);
        const char *index = lua_pushfstring(L, "%s/model.safetensors.index.json", path);
        if (!is_file(st) && !is_file(index) && is_file(bin))
            rc = loom_pytorch_open(&box->pytorch, bin);
        else
            rc = loom_checkpoint_open(&box->safetensors, path);
        lua_pop(L, 3);
    } else {
        size_t n = strlen(path);
        loom_ckpt_format format = n > 5 && strcmp(path + n - 5, ".json") == 0 ? LOOM_CKPT_SAFETENSORS
                                                                              : loom_checkpoint_format(path);
        switch (format) {
        case LOOM_CKPT_SAFETENSORS:
            rc = loom_checkpoint_open(&box->safetensors, path);
            break;
        case LOOM_CKPT_PYTORCH_ZIP:
        case LOOM_CKPT_PYTORCH_LEGACY: /* the reader rejects it with a conversion hint */
            rc = loom_pytorch_open(&box->pytorch, path);
            break;
        case LOOM_CKPT_ERROR:
            rc = LOOM_ERR;
            break;
        case LOOM_CKPT_GGUF:
            rc = loom_error("%s: GGUF files are not supported yet (expected safetensors or a PyTorch zip file)", path);
            break;
        default:
            rc = loom_error("%s: unrecognized checkpoint format (expected safetensors or a PyTorch zip file)", path);
            break;
        }
    }
    if (rc != LOOM_OK)
        loom_core_error(L, "load");
}

/* loom.load(path) -> tensors, metadata. */
static int l_checkpoint_load(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    lua_settop(L, 1);
    checkpoint_box *box = lua_newuserdatauv(L, sizeof *box, 0);
    memset(box, 0, sizeof *box);
    luaL_setmetatable(L, CHECKPOINT_BOX_MT);
    open_checkpoint(L, box, path);

    int n = box->safetensors ? loom_checkpoint_count(box->safetensors) : loom_pytorch_count(box->pytorch);
    lua_createtable(L, 0, n);
    for (int i = 0; i < n; i++) {
        const char *name = box->safetensors ? loom_checkpoint_name(box->safetensors, i)
                                            : loom_pytorch_name(box->pytorch, i);
        const loom_tensor *t = box->safetensors ? loom_checkpoint_tensor(box->safetensors, i)
                                                : loom_pytorch_tensor(box->pytorch, i);
        loom_pushtensor(L, t);
        lua_setfield(L, -2, name);
    }
    int m = box->safetensors ? loom_checkpoint_metadata_count(box->safetensors)
                             : loom_pytorch_metadata_count(box->pytorch);
    lua_createtable(L, 0, m);
    for (int i = 0; i < m; i++) {
        lua_pushstring(L, box->safetensors ? loom_checkpoint_metadata_value(box->safetensors, i)
                                           : loom_pytorch_metadata_value(box->pytorch, i));
        lua_setfield(L, -2, box->safetensors ? loom_checkpoint_metadata_key(box->safetensors, i)
                                             : loom_pytorch_metadata_key(box->pytorch, i));
    }
    /* The tensors hold their own storage references: close the reader now
     * instead of waiting for the collector. */
    lua_pushcfunction(L, l_checkpointbox___gc);
    lua_pushvalue(L, 2);
    lua_call(L, 1, 0);
    return 2;
}

/* Sort order for writing: wider elements first, so every tensor stays
 * aligned to its element size on reload, then by name. */
typedef struct save_entry {
    const char *name;
    const loom_tensor *tensor;
} save_entry;

static int compare_entries(const void *pa, const void *pb) {
    const save_entry *a = pa, *b = pb;
    size_t sa = loom_dtype_size(a->tensor->dtype), sb = loom_dtype_size(b->tensor->dtype);
    if (sa != sb)
        return sa > sb ? -1 : 1;
    return strcmp(a->name, b->name);
}

/* loom.save(path, tensors, metadata?): tensors is a table name -> tensor,
 * metadata a table of string -> string. Returns true. */
static int l_checkpoint_save(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    if (!lua_isnoneornil(L, 3))
        luaL_checktype(L, 3, LUA_TTABLE);
    lua_settop(L, 3);

    int n = 0;
    for (lua_pushnil(L); lua_next(L, 2); lua_pop(L, 1)) {
        if (lua_type(L, -2) != LUA_TSTRING)
            return luaL_argerror(L, 2, lua_pushfstring(L, "tensor names must be strings, got a %s key",
                                                       luaL_typename(L, -2)));
        if (!loom_testtensor(L, -1))
            return luaL_argerror(L, 2, lua_pushfstring(L, "value of '%s' must be a loom.Tensor, got %s",
                                                       lua_tostring(L, -2), luaL_typename(L, -1)));
        n++;
    }
    int m = 0;
    if (!lua_isnil(L, 3)) {
        for (lua_pushnil(L); lua_next(L, 3); lua_pop(L, 1)) {
            if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING)
                return luaL_argerror(L, 3, "metadata keys and values must be strings");
            m++;
        }
    }

    /* The arrays are userdata, which the collector frees after an error.
     * Every string and tensor stays referenced by the argument tables. */
    save_entry *entries = lua_newuserdatauv(L, (size_t)(n ? n : 1) * sizeof *entries, 0);
    const char **names = lua_newuserdatauv(L, (size_t)(n ? n : 1) * sizeof *names, 0);
    const loom_tensor **tensors = lua_newuserdatauv(L, (size_t)(n ? n : 1) * sizeof *tensors, 0);
    const char **keys = lua_newuserdatauv(L, (size_t)(m ? m : 1) * sizeof *keys, 0);
    const char **values = lua_newuserdatauv(L, (size_t)(m ? m : 1) * sizeof *values, 0);
    int i = 0;
    for (lua_pushnil(L); lua_next(L, 2); lua_pop(L, 1)) {
        entries[i].name = lua_tostring(L, -2);
        entries[i].tensor = loom_testtensor(L, -1);
        i++;
    }
    qsort(entries, (size_t)n, sizeof *entries, compare_entries);
    for (i = 0; i < n; i++) {
        names[i] = entries[i].name;
        tensors[i] = entries[i].tensor;
    }
    i = 0;
    if (m > 0) {
        for (lua_pushnil(L); lua_next(L, 3); lua_pop(L, 1)) {
            keys[i] = lua_tostring(L, -2);
            values[i] = lua_tostring(L, -1);
            i++;
        }
    }
    if (loom_safetensors_write(path, n, names, tensors, m, keys, values) != LOOM_OK)
        return loom_core_error(L, "save");
    lua_pushboolean(L, 1);
    return 1;
}

static const luaL_Reg checkpoint_funcs[] = {
    {"load", l_checkpoint_load},
    {"save", l_checkpoint_save},
    {NULL, NULL},
};

void loom_open_checkpoint(lua_State *L) {
    luaL_newmetatable(L, CHECKPOINT_BOX_MT);
    lua_pushcfunction(L, l_checkpointbox___gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);
    luaL_setfuncs(L, checkpoint_funcs, 0);
}
