/* luaopen_loom_core: the C module "loom.core", which registers every area
 * of the binding into one table. lua/loom/init.lua builds the `loom`
 * package on top of it. Also the open-failure helpers that the functions
 * returning nil, message, code share. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "l_uv.h" /* loom.core.uv, the async runtime's libuv binding */
#include "loom_lua.h"

const char *loom_errno_name(int err) {
    switch (err) {
    case ENOENT: return "ENOENT";
    case EACCES: return "EACCES";
    case EISDIR: return "EISDIR";
    case ENOTDIR: return "ENOTDIR";
    case ENAMETOOLONG: return "ENAMETOOLONG";
    case ELOOP: return "ELOOP";
    case EMFILE: return "EMFILE";
    case ENOMEM: return "ENOMEM";
    default: return "EIO";
    }
}

int loom_open_errno(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f)
        return errno;

    /* fopen succeeds on a directory; reading it would fail with EISDIR */
    struct stat st;
    int err = fstat(fileno(f), &st) != 0 ? errno : S_ISDIR(st.st_mode) ? EISDIR : 0;
    fclose(f);
    return err;
}

int loom_push_open_failure(lua_State *L, const char *path, int err) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s", path, strerror(err));
    lua_pushstring(L, loom_errno_name(err));
    return 3;
}

/* loom.errno_name(errno) -> "ENOENT", ...: the code for the errno number
 * that io.open returns third, as the loaders return it. */
static int l_core_errno_name(lua_State *L) {
    lua_pushstring(L, loom_errno_name((int)luaL_checkinteger(L, 1)));
    return 1;
}

int luaopen_loom_core(lua_State *L) {
    lua_newtable(L);
    loom_open_tensor(L);
    loom_open_ops(L);
    loom_open_checkpoint(L);
    loom_open_image(L);
    luaopen_loom_tokenizer(L);
    lua_setfield(L, -2, "tokenizer");
    luaopen_loom_uv(L);
    lua_setfield(L, -2, "uv");
    lua_pushcfunction(L, l_core_errno_name);
    lua_setfield(L, -2, "errno_name");
    lua_pushliteral(L, LOOM_VERSION);
    lua_setfield(L, -2, "version");
    return 1;
}
