/* luaopen_loom_core: the C module "loom.core", which registers every area
 * of the binding into one table. lua/loom/init.lua builds the `loom`
 * package on top of it. */
#include "l_uv.h" /* loom.core.uv, the async runtime's libuv binding */
#include "loom_lua.h"

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
    lua_pushliteral(L, LOOM_VERSION);
    lua_setfield(L, -2, "version");
    return 1;
}
