/* The libuv binding of the async runtime (lua/l_uv.c): the C module table
 * loom.core.uv and two REPL hooks. Through the hooks, lua/main.c waits for
 * standard input and for the event loop in one pselect, so that background
 * tasks run while the user types. */
#ifndef LOOM_L_UV_H
#define LOOM_L_UV_H

#include <sys/select.h>

#include <lua.h>

/* Push the table of loom.core.uv. */
int luaopen_loom_uv(lua_State *L);

/* Add the loop's descriptor to `fds` (raising *nfds when needed) and return
 * how long the REPL may block in pselect, in milliseconds: 0 when tasks are
 * ready to run, -1 (no limit) when the loop has nothing to wait for. Returns
 * -1 and adds nothing before lua/loom/async.lua or the uv table was
 * loaded. Never raises. */
int loom_uv_repl_prepare(lua_State *L, fd_set *fds, int *nfds);

/* Run one round of the loop without blocking: deliver finished I/O, timers
 * and thread-pool work, then resume the tasks that were ready. Errors are
 * reported through the runtime's error handler; never raises. */
void loom_uv_repl_run(lua_State *L);

#endif
