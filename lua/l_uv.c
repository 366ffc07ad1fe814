/* Lua binding of libuv for the async runtime (lua/loom/async.lua): the
 * process's one event loop (libuv's default loop), timers, signals, file
 * system requests, and C-only work on libuv's thread pool (whole-file reads,
 * image decoding and preprocessing, tokenization), as the table
 * loom.core.uv. Rules kept here:
 * - every entry from libuv into Lua runs under lua_pcall with a traceback,
 *   and an error goes to the handler set by uv.set_error_handler (default:
 *   the log) instead of ending the process;
 * - a registry reference pins a handle userdata from its creation until
 *   libuv's close callback. Requests live in malloc'd memory and hold
 *   registry references to their callback (and to a tokenizer a worker
 *   reads), which are released on completion;
 * - worker threads never touch the Lua state: they get copies of their
 *   inputs and leave results in the request for the loop thread. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <uv.h>

#include "image.h"
#include "l_uv.h"
#include "loom_lua.h"
#include "tokenizer.h"

#define TIMER_MT "loom.uv.Timer"
#define SIGNAL_MT "loom.uv.Signal"
#define ERROR_HANDLER_KEY "loom.uv.error_handler"
#define DRIVER_TICK_KEY "loom.uv.driver_tick"
#define DRIVER_READY_KEY "loom.uv.driver_ready"

/* The Lua thread that callbacks run on while uv_run runs, NULL outside
 * uv_run. It is a thread of its own, created when the module opens and kept
 * in the registry, rather than the caller of uv.run. So a debug hook set on
 * the caller, such as the REPL's Ctrl-C hook, fires when the caller's Lua
 * code runs again instead of inside a callback that would swallow it. */
static lua_State *callback_L;
static lua_State *callback_thread;
/* Set when a pinned handle is finalized, which happens only while the Lua
 * state closes: from then on callbacks release C memory and skip Lua. */
static int shutting_down;
/* The module was opened, so the REPL hooks may use the loop. */
static int module_open;

static uv_loop_t *the_loop(void) { return uv_default_loop(); }

/* ---------------------------------------------------------------------------
 * protected calls from libuv into Lua */

/* Message handler: a string error gets the traceback of the place that
 * raised it; other error values (the runtime's error objects) pass as they
 * are. */
static int traceback_handler(lua_State *L) {
    if (lua_type(L, 1) == LUA_TSTRING)
        luaL_traceback(L, L, lua_tostring(L, 1), 1);
    else if (lua_isnoneornil(L, 1))
        luaL_traceback(L, L, "(error object is nil)", 1);
    else
        lua_settop(L, 1);
    return 1;
}

/* Calls the handler of uv.set_error_handler with (error, what). Arguments:
 * the error value and a light userdata holding `what`. Returns false when no
 * handler is set. */
static int call_error_handler(lua_State *L) {
    const char *what = lua_touserdata(L, 2);
    lua_getfield(L, LUA_REGISTRYINDEX, ERROR_HANDLER_KEY);
    if (!lua_isfunction(L, -1)) {
        lua_pushboolean(L, 0);
        return 1;
    }
    lua_pushvalue(L, 1);
    lua_pushstring(L, what);
    lua_call(L, 2, 0);
    lua_pushboolean(L, 1);
    return 1;
}

static const char *error_text(lua_State *L, int idx) {
    const char *s = lua_tostring(L, idx);
    return s ? s : "(error object is not a string)";
}

/* Report the error value at the stack top (and pop it): to the Lua error
 * handler, or to the log when there is none or it fails itself. */
static void report_error(lua_State *L, const char *what) {
    int err = lua_gettop(L);
    lua_pushcfunction(L, call_error_handler);
    lua_pushvalue(L, err);
    lua_pushlightuserdata(L, (void *)what);
    int status = lua_pcall(L, 2, 1, 0);
    if (status == LUA_OK && lua_toboolean(L, -1)) {
        lua_settop(L, err - 1);
        return;
    }
    if (status != LUA_OK)
        loom_log(LOOM_LOG_ERROR, "the async error handler failed: %s", error_text(L, -1));
    if (lua_type(L, err) == LUA_TSTRING)
        loom_log(LOOM_LOG_ERROR, "error in %s callback: %s", what, lua_tostring(L, err));
    else
        loom_log(LOOM_LOG_ERROR, "error in %s callback (error object is a %s value)", what,
                 luaL_typename(L, err));
    lua_settop(L, err - 1);
}

/* Run fn(L) with `ud` as its only argument (a light userdata) under
 * lua_pcall with the traceback handler. fn pushes the Lua callback and its
 * arguments and calls it, so that everything that may raise, memory errors
 * included, is protected. Never raises. */
static void dispatch(lua_State *L, const char *what, lua_CFunction fn, void *ud) {
    if (!lua_checkstack(L, 8)) {
        loom_log(LOOM_LOG_ERROR, "%s callback skipped: the Lua stack cannot grow", what);
        return;
    }
    int top = lua_gettop(L);
    lua_pushcfunction(L, traceback_handler);
    lua_pushcfunction(L, fn);
    lua_pushlightuserdata(L, ud);
    if (lua_pcall(L, 1, 0, top + 1) != LUA_OK)
        report_error(L, what);
    lua_settop(L, top);
}

static void unref(lua_State *L, int *ref) {
    if (*ref != LUA_NOREF && *ref != LUA_REFNIL && L)
        luaL_unref(L, LUA_REGISTRYINDEX, *ref);
    *ref = LUA_NOREF;
}

/* A registry reference to the function at `idx`. */
static int ref_function(lua_State *L, int idx) {
    luaL_checktype(L, idx, LUA_TFUNCTION);
    lua_pushvalue(L, idx);
    return luaL_ref(L, LUA_REGISTRYINDEX);
}

/* The error triple of a libuv failure: nil, "<subject>: <message>", "ENAME". */
static int push_uv_failure(lua_State *L, int rc, const char *subject) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s", subject, uv_strerror(rc));
    lua_pushstring(L, uv_err_name(rc));
    return 3;
}

/* ---------------------------------------------------------------------------
 * the loop */

/* uv.run(mode?) -> alive. mode: "default" (until nothing is active), "once"
 * (block for one round of events) or "nowait" (poll without blocking). */
static int l_uv_run(lua_State *L) {
    static const char *const modes[] = {"default", "once", "nowait", NULL};
    static const uv_run_mode run_modes[] = {UV_RUN_DEFAULT, UV_RUN_ONCE, UV_RUN_NOWAIT};
    int mode = luaL_checkoption(L, 1, "default", modes);
    if (callback_L)
        return luaL_error(L, "run: the loop is already running (uv.run was called from a callback)");
    callback_L = callback_thread;
    int alive = uv_run(the_loop(), run_modes[mode]);
    callback_L = NULL;
    lua_pushboolean(L, alive);
    return 1;
}

/* uv.alive() -> whether active handles or requests remain. */
static int l_uv_alive(lua_State *L) {
    lua_pushboolean(L, uv_loop_alive(the_loop()));
    return 1;
}

/* uv.stop(): make the running uv.run return after this round. */
static int l_uv_stop(lua_State *L) {
    (void)L;
    uv_stop(the_loop());
    return 0;
}

/* uv.now() -> the loop's cached time in milliseconds. */
static int l_uv_now(lua_State *L) {
    lua_pushinteger(L, (lua_Integer)uv_now(the_loop()));
    return 1;
}

static int l_uv_update_time(lua_State *L) {
    (void)L;
    uv_update_time(the_loop());
    return 0;
}

/* uv.hrtime() -> monotonic time in seconds (float, nanosecond source). */
static int l_uv_hrtime(lua_State *L) {
    lua_pushnumber(L, (lua_Number)uv_hrtime() * 1e-9);
    return 1;
}

/* uv.set_error_handler(fn): fn(error, what) receives errors raised inside
 * callbacks; nil restores the default (the log). */
static int l_uv_set_error_handler(lua_State *L) {
    if (!lua_isnoneornil(L, 1))
        luaL_checktype(L, 1, LUA_TFUNCTION);
    lua_settop(L, 1);
    lua_setfield(L, LUA_REGISTRYINDEX, ERROR_HANDLER_KEY);
    return 0;
}

/* uv.set_driver(tick, has_ready): the task scheduler of async.lua, which
 * the REPL hooks call. tick() resumes the ready tasks, and has_ready()
 * returns whether any are ready to run. */
static int l_uv_set_driver(lua_State *L) {
    luaL_checktype(L, 1, LUA_TFUNCTION);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    lua_pushvalue(L, 1);
    lua_setfield(L, LUA_REGISTRYINDEX, DRIVER_TICK_KEY);
    lua_pushvalue(L, 2);
    lua_setfield(L, LUA_REGISTRYINDEX, DRIVER_READY_KEY);
    return 0;
}

/* ---------------------------------------------------------------------------
 * handles: timers and signals. The userdata is the handle memory. */

enum { HANDLE_UNINIT = 0, HANDLE_OPEN, HANDLE_CLOSING, HANDLE_CLOSED };

typedef struct handle_box {
    union {
        uv_handle_t handle;
        uv_timer_t timer;
        uv_signal_t signal;
    } u;
    int state;
    int self_ref;     /* pins the userdata from init until the close callback */
    int cb_ref;       /* callback of start(), LUA_NOREF when stopped */
    int close_cb_ref; /* optional callback of close() */
} handle_box;

static handle_box *push_handle_box(lua_State *L, const char *mt) {
    handle_box *box = lua_newuserdatauv(L, sizeof *box, 0);
    memset(box, 0, sizeof *box);
    box->state = HANDLE_UNINIT;
    box->self_ref = box->cb_ref = box->close_cb_ref = LUA_NOREF;
    luaL_setmetatable(L, mt);
    return box;
}

/* Pin the box at the stack top, then run init; unpin when init fails. */
static void init_handle(lua_State *L, handle_box *box, int rc_of_init(handle_box *), const char *fname) {
    lua_pushvalue(L, -1);
    box->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    int rc = rc_of_init(box);
    if (rc < 0) {
        unref(L, &box->self_ref);
        luaL_error(L, "%s: %s", fname, uv_strerror(rc));
    }
    box->u.handle.data = box;
    box->state = HANDLE_OPEN;
}

static int init_timer(handle_box *box) { return uv_timer_init(the_loop(), &box->u.timer); }
static int init_signal(handle_box *box) { return uv_signal_init(the_loop(), &box->u.signal); }

static handle_box *check_handle(lua_State *L, int idx, const char *mt) {
    handle_box *box = luaL_checkudata(L, idx, mt);
    if (box->state != HANDLE_OPEN)
        luaL_error(L, "attempt to use a closed %s", mt);
    return box;
}

static int push_close_call(lua_State *L) {
    handle_box *box = lua_touserdata(L, 1);
    lua_rawgeti(L, LUA_REGISTRYINDEX, box->close_cb_ref);
    if (lua_isfunction(L, -1))
        lua_call(L, 0, 0);
    return 0;
}

static void on_close(uv_handle_t *h) {
    handle_box *box = h->data;
    box->state = HANDLE_CLOSED;
    if (shutting_down || !callback_L)
        return;
    if (box->close_cb_ref != LUA_NOREF)
        dispatch(callback_L, "close", push_close_call, box);
    unref(callback_L, &box->cb_ref);
    unref(callback_L, &box->close_cb_ref);
    unref(callback_L, &box->self_ref); /* the collector may take the box now */
}

/* h:close(fn?) -> true, or false when already closed or closing. fn runs
 * once libuv has released the handle. */
static int handle_close(lua_State *L, const char *mt) {
    handle_box *box = luaL_checkudata(L, 1, mt);
    if (box->state != HANDLE_OPEN) {
        lua_pushboolean(L, 0);
        return 1;
    }
    if (!lua_isnoneornil(L, 2))
        box->close_cb_ref = ref_function(L, 2);
    box->state = HANDLE_CLOSING;
    uv_close(&box->u.handle, on_close);
    lua_pushboolean(L, 1);
    return 1;
}

static int handle_gc(lua_State *L) {
    handle_box *box = lua_touserdata(L, 1);
    if (box && (box->state == HANDLE_OPEN || box->state == HANDLE_CLOSING)) {
        /* An open handle is pinned, so this runs only while the Lua state
         * closes. Finish the close now, so libuv keeps no pointer into
         * memory the collector is about to free. */
        shutting_down = 1;
        if (box->state == HANDLE_OPEN)
            uv_close(&box->u.handle, on_close);
        box->state = HANDLE_CLOSING;
        uv_run(the_loop(), UV_RUN_NOWAIT);
    }
    return 0;
}

static int handle_is_active(lua_State *L, const char *mt) {
    handle_box *box = luaL_checkudata(L, 1, mt);
    lua_pushboolean(L, box->state == HANDLE_OPEN && uv_is_active(&box->u.handle));
    return 1;
}

static int handle_tostring(lua_State *L, const char *mt) {
    handle_box *box = luaL_checkudata(L, 1, mt);
    static const char *const states[] = {"uninitialised", "open", "closing", "closed"};
    lua_pushfstring(L, "%s (%s)", mt, states[box->state]);
    return 1;
}

/* ---- timers */

static int push_timer_call(lua_State *L) {
    handle_box *box = lua_touserdata(L, 1);
    lua_rawgeti(L, LUA_REGISTRYINDEX, box->cb_ref);
    if (!lua_isfunction(L, -1))
        return 0;
    lua_rawgeti(L, LUA_REGISTRYINDEX, box->self_ref);
    lua_call(L, 1, 0);
    return 0;
}

static void on_timer(uv_timer_t *t) {
    handle_box *box = t->data;
    if (shutting_down || !callback_L)
        return;
    dispatch(callback_L, "timer", push_timer_call, box);
}

/* uv.new_timer() -> timer. */
static int l_uv_new_timer(lua_State *L) {
    handle_box *box = push_handle_box(L, TIMER_MT);
    init_handle(L, box, init_timer, "new_timer");
    return 1;
}

static uint64_t check_ms(lua_State *L, int idx) {
    lua_Integer ms = luaL_checkinteger(L, idx);
    luaL_argcheck(L, ms >= 0, idx, "milliseconds must not be negative");
    return (uint64_t)ms;
}

/* timer:start(timeout_ms, repeat_ms, fn): fn(timer) runs after timeout_ms,
 * then every repeat_ms when repeat_ms > 0. */
static int l_timer_start(lua_State *L) {
    handle_box *box = check_handle(L, 1, TIMER_MT);
    uint64_t timeout = check_ms(L, 2), repeat = check_ms(L, 3);
    int ref = ref_function(L, 4);
    unref(L, &box->cb_ref);
    box->cb_ref = ref;
    int rc = uv_timer_start(&box->u.timer, on_timer, timeout, repeat);
    if (rc < 0)
        return luaL_error(L, "timer:start: %s", uv_strerror(rc));
    return 0;
}

static int l_timer_stop(lua_State *L) {
    handle_box *box = check_handle(L, 1, TIMER_MT);
    uv_timer_stop(&box->u.timer);
    unref(L, &box->cb_ref);
    return 0;
}

static int l_timer_close(lua_State *L) { return handle_close(L, TIMER_MT); }
static int l_timer_is_active(lua_State *L) { return handle_is_active(L, TIMER_MT); }
static int l_timer___tostring(lua_State *L) { return handle_tostring(L, TIMER_MT); }

/* ---- signals */

static const struct {
    const char *name;
    int signum;
} signal_names[] = {
    {"SIGINT", SIGINT},   {"SIGTERM", SIGTERM}, {"SIGHUP", SIGHUP},   {"SIGQUIT", SIGQUIT},
    {"SIGUSR1", SIGUSR1}, {"SIGUSR2", SIGUSR2}, {"SIGWINCH", SIGWINCH}, {"SIGCHLD", SIGCHLD},
    {"SIGPIPE", SIGPIPE}, {"SIGKILL", SIGKILL}, {"SIGALRM", SIGALRM}, {"SIGCONT", SIGCONT},
    {"SIGSTOP", SIGSTOP}, {NULL, 0},
};

static const char *signal_name(int signum) {
    for (int i = 0; signal_names[i].name; i++)
        if (signal_names[i].signum == signum)
            return signal_names[i].name;
    return NULL;
}

/* A signal given as a name ("SIGINT") or a number. */
static int check_signal(lua_State *L, int idx) {
    if (lua_type(L, idx) == LUA_TNUMBER) {
        lua_Integer n = luaL_checkinteger(L, idx);
        luaL_argcheck(L, n > 0 && n < 65, idx, "invalid signal number");
        return (int)n;
    }
    const char *name = luaL_checkstring(L, idx);
    for (int i = 0; signal_names[i].name; i++)
        if (strcmp(signal_names[i].name, name) == 0)
            return signal_names[i].signum;
    return luaL_argerror(L, idx, lua_pushfstring(L, "unknown signal name '%s'", name));
}

static int push_signal_call(lua_State *L) {
    handle_box *box = lua_touserdata(L, 1);
    lua_rawgeti(L, LUA_REGISTRYINDEX, box->cb_ref);
    if (!lua_isfunction(L, -1))
        return 0;
    const char *name = signal_name(box->u.signal.signum);
    if (name)
        lua_pushstring(L, name);
    else
        lua_pushinteger(L, box->u.signal.signum);
    lua_call(L, 1, 0);
    return 0;
}

static void on_signal(uv_signal_t *s, int signum) {
    (void)signum;
    handle_box *box = s->data;
    if (shutting_down || !callback_L)
        return;
    dispatch(callback_L, "signal", push_signal_call, box);
}

/* uv.new_signal() -> signal watcher. */
static int l_uv_new_signal(lua_State *L) {
    handle_box *box = push_handle_box(L, SIGNAL_MT);
    init_handle(L, box, init_signal, "new_signal");
    return 1;
}

/* sig:start(signal, fn): fn(name) runs on the loop thread after each
 * delivery. While started, the signal no longer has its previous action;
 * when the last watcher of a signal stops, libuv (1.44) restores the
 * default action. */
static int l_signal_start(lua_State *L) {
    handle_box *box = check_handle(L, 1, SIGNAL_MT);
    int signum = check_signal(L, 2);
    int ref = ref_function(L, 3);
    unref(L, &box->cb_ref);
    box->cb_ref = ref;
    int rc = uv_signal_start(&box->u.signal, on_signal, signum);
    if (rc < 0)
        return luaL_error(L, "signal:start: %s", uv_strerror(rc));
    return 0;
}

static int l_signal_stop(lua_State *L) {
    handle_box *box = check_handle(L, 1, SIGNAL_MT);
    uv_signal_stop(&box->u.signal);
    unref(L, &box->cb_ref);
    return 0;
}

static int l_signal_close(lua_State *L) { return handle_close(L, SIGNAL_MT); }
static int l_signal_is_active(lua_State *L) { return handle_is_active(L, SIGNAL_MT); }
static int l_signal___tostring(lua_State *L) { return handle_tostring(L, SIGNAL_MT); }

/* ---------------------------------------------------------------------------
 * file system requests. Without a function as last argument, each function
 * runs synchronously and returns its result (or nil, message, code). With a
 * function fn it starts the request on libuv's thread pool, returns true,
 * and later calls fn(result) or fn(nil, message, code). */

typedef struct fs_request {
    uv_fs_t req;
    int cb_ref;
    char *buf;           /* read buffer, or a copy of the bytes to write */
    char subject[256];   /* path or operation name, for messages */
} fs_request;

/* Push the results of a finished request: 1 value, or 3 on failure. */
static int push_fs_results(lua_State *L, uv_fs_t *req, const char *buf, const char *subject) {
    if (req->result < 0)
        return push_uv_failure(L, (int)req->result, subject);
    switch (req->fs_type) {
    case UV_FS_OPEN:
    case UV_FS_WRITE:
        lua_pushinteger(L, (lua_Integer)req->result);
        return 1;
    case UV_FS_READ:
        lua_pushlstring(L, buf, (size_t)req->result);
        return 1;
    case UV_FS_STAT:
    case UV_FS_FSTAT: {
        const uv_stat_t *s = &req->statbuf;
        lua_createtable(L, 0, 4);
        lua_pushinteger(L, (lua_Integer)s->st_size);
        lua_setfield(L, -2, "size");
        lua_pushinteger(L, (lua_Integer)s->st_mode);
        lua_setfield(L, -2, "mode");
        lua_pushstring(L, S_ISREG(s->st_mode) ? "file" : S_ISDIR(s->st_mode) ? "directory" : "other");
        lua_setfield(L, -2, "type");
        lua_pushnumber(L, (lua_Number)s->st_mtim.tv_sec + 1e-9 * (lua_Number)s->st_mtim.tv_nsec);
        lua_setfield(L, -2, "mtime");
        return 1;
    }
    default:
        lua_pushboolean(L, 1);
        return 1;
    }
}

static int push_fs_call(lua_State *L) {
    fs_request *fr = lua_touserdata(L, 1);
    lua_rawgeti(L, LUA_REGISTRYINDEX, fr->cb_ref);
    int n = push_fs_results(L, &fr->req, fr->buf, fr->subject);
    lua_call(L, n, 0);
    return 0;
}

static void free_fs_request(fs_request *fr) {
    uv_fs_req_cleanup(&fr->req);
    free(fr->buf);
    free(fr);
}

static void on_fs(uv_fs_t *req) {
    fs_request *fr = req->data;
    if (!shutting_down && callback_L) {
        dispatch(callback_L, "file system", push_fs_call, fr);
        unref(callback_L, &fr->cb_ref);
    }
    free_fs_request(fr);
}

/* The callback argument at `idx`, or 0 for a synchronous call. */
static int has_callback(lua_State *L, int idx) {
    if (lua_isnoneornil(L, idx))
        return 0;
    luaL_checktype(L, idx, LUA_TFUNCTION);
    return 1;
}

/* A request for an asynchronous call (callback at `cb_idx`), or NULL for a
 * synchronous one, which uses `sync` instead. */
static fs_request *new_fs_request(lua_State *L, int cb_idx, fs_request *sync, const char *subject) {
    fs_request *fr = sync;
    if (has_callback(L, cb_idx)) {
        int ref = ref_function(L, cb_idx);
        fr = calloc(1, sizeof *fr);
        if (!fr) {
            unref(L, &ref);
            luaL_error(L, "out of memory starting a file system request");
        }
        fr->cb_ref = ref;
    } else {
        memset(fr, 0, sizeof *fr);
        fr->cb_ref = LUA_NOREF;
    }
    snprintf(fr->subject, sizeof fr->subject, "%s", subject);
    fr->req.data = fr;
    return fr;
}

/* Finish a call: for a synchronous request push its results; for an
 * asynchronous one push true, or the failure when it did not start. */
static int finish_fs_call(lua_State *L, fs_request *fr, fs_request *sync, int rc) {
    if (fr == sync) {
        /* A read buffer moves into a Lua string before the cleanup. */
        int n = push_fs_results(L, &fr->req, fr->buf, fr->subject);
        uv_fs_req_cleanup(&fr->req);
        free(fr->buf);
        return n;
    }
    if (rc < 0) {
        int n = push_uv_failure(L, rc, fr->subject);
        unref(L, &fr->cb_ref);
        free_fs_request(fr);
        return n;
    }
    lua_pushboolean(L, 1);
    return 1;
}

static uv_fs_cb fs_cb(fs_request *fr, fs_request *sync) { return fr == sync ? NULL : on_fs; }

static int check_open_flags(lua_State *L, int idx) {
    if (lua_type(L, idx) == LUA_TNUMBER)
        return (int)luaL_checkinteger(L, idx);
    static const char *const names[] = {"r", "r+", "w", "w+", "a", "a+", NULL};
    static const int flags[] = {O_RDONLY,
                                O_RDWR,
                                O_WRONLY | O_CREAT | O_TRUNC,
                                O_RDWR | O_CREAT | O_TRUNC,
                                O_WRONLY | O_CREAT | O_APPEND,
                                O_RDWR | O_CREAT | O_APPEND};
    return flags[luaL_checkoption(L, idx, NULL, names)];
}

/* uv.fs_open(path, flags, mode?, fn?) -> fd. flags: "r", "r+", "w", "w+",
 * "a" (O_APPEND, created when missing), "a+" or a number; mode default
 * 0644. */
static int l_uv_fs_open(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    int flags = check_open_flags(L, 2);
    int mode = (int)luaL_optinteger(L, 3, 0644);
    fs_request sync, *fr = new_fs_request(L, 4, &sync, path);
    int rc = uv_fs_open(the_loop(), &fr->req, path, flags | O_CLOEXEC, mode, fs_cb(fr, &sync));
    return finish_fs_call(L, fr, &sync, rc);
}

static uv_file check_fd(lua_State *L, int idx) {
    lua_Integer fd = luaL_checkinteger(L, idx);
    luaL_argcheck(L, fd >= 0 && fd <= INT32_MAX, idx, "invalid file descriptor");
    return (uv_file)fd;
}

/* uv.fs_close(fd, fn?) -> true. */
static int l_uv_fs_close(lua_State *L) {
    uv_file fd = check_fd(L, 1);
    fs_request sync, *fr = new_fs_request(L, 2, &sync, "close");
    int rc = uv_fs_close(the_loop(), &fr->req, fd, fs_cb(fr, &sync));
    return finish_fs_call(L, fr, &sync, rc);
}

/* uv.fs_read(fd, size, offset?, fn?) -> bytes ("" at end of file). offset
 * -1 or nil reads at the current position. */
static int l_uv_fs_read(lua_State *L) {
    uv_file fd = check_fd(L, 1);
    lua_Integer size = luaL_checkinteger(L, 2);
    luaL_argcheck(L, size >= 0 && size <= INT32_MAX, 2, "size must be in 0..2^31-1");
    int64_t offset = (int64_t)luaL_optinteger(L, 3, -1);
    fs_request sync, *fr = new_fs_request(L, 4, &sync, "read");
    fr->buf = malloc((size_t)size + 1);
    if (!fr->buf) {
        if (fr != &sync) {
            unref(L, &fr->cb_ref);
            free(fr);
        }
        return luaL_error(L, "fs_read: out of memory for %I bytes", size);
    }
    uv_buf_t buf = uv_buf_init(fr->buf, (unsigned int)size);
    int rc = uv_fs_read(the_loop(), &fr->req, fd, &buf, 1, offset, fs_cb(fr, &sync));
    return finish_fs_call(L, fr, &sync, rc);
}

/* uv.fs_write(fd, data, offset?, fn?) -> bytes written. The bytes go out in
 * one write() call, which libuv repeats only after a short write. Offset -1
 * or nil writes at the current position, which with O_APPEND is the end. */
static int l_uv_fs_write(lua_State *L) {
    uv_file fd = check_fd(L, 1);
    size_t len;
    const char *data = luaL_checklstring(L, 2, &len);
    luaL_argcheck(L, len <= INT32_MAX, 2, "at most 2^31-1 bytes per write");
    int64_t offset = (int64_t)luaL_optinteger(L, 3, -1);
    fs_request sync, *fr = new_fs_request(L, 4, &sync, "write");
    uv_buf_t buf;
    if (fr == &sync) {
        buf = uv_buf_init((char *)data, (unsigned int)len);
    } else {
        /* a copy, so the worker never reads a Lua string */
        fr->buf = malloc(len + 1);
        if (!fr->buf) {
            unref(L, &fr->cb_ref);
            free(fr);
            return luaL_error(L, "fs_write: out of memory for %d bytes", (int)len);
        }
        memcpy(fr->buf, data, len);
        buf = uv_buf_init(fr->buf, (unsigned int)len);
    }
    int rc = uv_fs_write(the_loop(), &fr->req, fd, &buf, 1, offset, fs_cb(fr, &sync));
    return finish_fs_call(L, fr, &sync, rc);
}

/* uv.fs_fsync(fd, fn?) -> true. */
static int l_uv_fs_fsync(lua_State *L) {
    uv_file fd = check_fd(L, 1);
    fs_request sync, *fr = new_fs_request(L, 2, &sync, "fsync");
    int rc = uv_fs_fsync(the_loop(), &fr->req, fd, fs_cb(fr, &sync));
    return finish_fs_call(L, fr, &sync, rc);
}

/* uv.fs_ftruncate(fd, length, fn?) -> true. */
static int l_uv_fs_ftruncate(lua_State *L) {
    uv_file fd = check_fd(L, 1);
    lua_Integer length = luaL_checkinteger(L, 2);
    luaL_argcheck(L, length >= 0, 2, "length must not be negative");
    fs_request sync, *fr = new_fs_request(L, 3, &sync, "ftruncate");
    int rc = uv_fs_ftruncate(the_loop(), &fr->req, fd, (int64_t)length, fs_cb(fr, &sync));
    return finish_fs_call(L, fr, &sync, rc);
}

/* uv.fs_fstat(fd, fn?) -> {size, mode, type, mtime}. */
static int l_uv_fs_fstat(lua_State *L) {
    uv_file fd = check_fd(L, 1);
    fs_request sync, *fr = new_fs_request(L, 2, &sync, "fstat");
    int rc = uv_fs_fstat(the_loop(), &fr->req, fd, fs_cb(fr, &sync));
    return finish_fs_call(L, fr, &sync, rc);
}

/* uv.fs_stat(path, fn?) -> {size, mode, type, mtime}. */
static int l_uv_fs_stat(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    fs_request sync, *fr = new_fs_request(L, 2, &sync, path);
    int rc = uv_fs_stat(the_loop(), &fr->req, path, fs_cb(fr, &sync));
    return finish_fs_call(L, fr, &sync, rc);
}

/* uv.fs_unlink(path, fn?) -> true. */
static int l_uv_fs_unlink(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    fs_request sync, *fr = new_fs_request(L, 2, &sync, path);
    int rc = uv_fs_unlink(the_loop(), &fr->req, path, fs_cb(fr, &sync));
    return finish_fs_call(L, fr, &sync, rc);
}

/* ---------------------------------------------------------------------------
 * work on libuv's thread pool */

typedef enum work_kind { WORK_READ_FILE, WORK_IMAGE, WORK_ENCODE, WORK_SLEEP } work_kind;

typedef struct work_request {
    uv_work_t req;
    work_kind kind;
    int cb_ref;
    int pin_ref; /* the tokenizer userdata, alive while a worker reads it */

    /* inputs, copied out of Lua */
    char *input; /* path, encoded image or text */
    size_t input_len;
    int input_is_path;
    char name[256]; /* for messages */
    int preprocess; /* WORK_IMAGE: run `config`, else return the RGB image */
    loom_image_preprocess_config config;
    const loom_tokenizer *tok;
    loom_encode_opts encode_opts;
    double ms;

    /* results, read on the loop thread */
    char *error; /* malloc'd message, NULL on success */
    const char *code;
    char *data;
    size_t data_len;
    loom_tensor tensor;
    int width, height;
    loom_image_format format;
    loom_image_mode mode;
    int32_t *ids;
    size_t n_ids;
} work_request;

static const char *errno_name(int err) {
    switch (err) {
    case ENOENT: return "ENOENT";
    case EACCES: return "EACCES";
    case EISDIR: return "EISDIR";
    case ENOTDIR: return "ENOTDIR";
    case ENAMETOOLONG: return "ENAMETOOLONG";
    case ELOOP: return "ELOOP";
    case EMFILE: return "EMFILE";
    case ENOMEM: return "ENOMEM";
    case EFBIG: return "EFBIG";
    default: return "EIO";
    }
}

/* Record a failure in the request (worker side). */
static void work_fail(work_request *w, const char *code, const char *fmt, const char *a, const char *b) {
    size_t n = strlen(fmt) + strlen(a) + (b ? strlen(b) : 0) + 1;
    w->error = malloc(n);
    if (w->error)
        snprintf(w->error, n, fmt, a, b ? b : "");
    w->code = code;
}

static void work_read_file(work_request *w) {
    int fd = open(w->input, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int err = errno;
        work_fail(w, errno_name(err), "%s: %s", w->input, strerror(err));
        return;
    }
    struct stat st;
    int err = fstat(fd, &st) != 0 ? errno : S_ISDIR(st.st_mode) ? EISDIR : 0;
    if (err) {
        work_fail(w, errno_name(err), "%s: %s", w->input, strerror(err));
        close(fd);
        return;
    }

    /* read to the end, growing the buffer if the file grew since fstat */
    size_t cap = (size_t)st.st_size + 1, len = 0;
    char *buf = malloc(cap);
    while (buf) {
        if (len == cap) {
            char *grown = realloc(buf, cap * 2);
            if (!grown) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = grown;
            cap *= 2;
        }
        ssize_t n = read(fd, buf + len, cap - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            int err = errno;
            work_fail(w, errno_name(err), "%s: %s", w->input, strerror(err));
            free(buf);
            close(fd);
            return;
        }
        if (n == 0)
            break;
        len += (size_t)n;
    }
    close(fd);

    if (!buf) {
        work_fail(w, "ENOMEM", "%s: %s", w->input, strerror(ENOMEM));
        return;
    }
    w->data = buf;
    w->data_len = len;
}

static void work_image(work_request *w) {
    loom_image image = LOOM_IMAGE_EMPTY;
    int rc;
    if (w->input_is_path) {
        int fd = open(w->input, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            int err = errno;
            work_fail(w, errno_name(err), "%s: %s", w->input, strerror(err));
            return;
        }
        close(fd);
        rc = loom_image_load(&image, w->input, NULL);
    } else {
        rc = loom_image_decode(&image, w->input, w->input_len, w->name[0] ? w->name : NULL, NULL);
    }
    if (rc != LOOM_OK) {
        work_fail(w, "EDECODE", "%s%s", loom_last_error(), NULL);
        return;
    }
    w->width = (int)image.pixels.shape[1];
    w->height = (int)image.pixels.shape[0];
    w->format = image.format;
    w->mode = image.mode;
    if (w->preprocess)
        rc = loom_image_preprocess(&w->tensor, NULL, &image, &w->config);
    else
        rc = loom_image_to_rgb(&w->tensor, &image, LOOM_ALPHA_DROP, NULL);
    if (rc != LOOM_OK)
        work_fail(w, "EPREPROCESS", "%s%s", loom_last_error(), NULL);
    loom_image_free(&image);
}

static void work_encode(work_request *w) {
    if (loom_tokenizer_encode(w->tok, w->input, w->input_len, &w->encode_opts, &w->ids, &w->n_ids) != LOOM_OK)
        work_fail(w, "EENCODE", "encode: %s%s", loom_last_error(), NULL);
}

static void work_sleep(work_request *w) {
    struct timespec ts = {(time_t)(w->ms / 1000), (long)((w->ms - 1000.0 * (double)(time_t)(w->ms / 1000)) * 1e6)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* Runs on a pool thread: nothing here may touch Lua. */
static void on_work(uv_work_t *req) {
    work_request *w = req->data;
    switch (w->kind) {
    case WORK_READ_FILE: work_read_file(w); break;
    case WORK_IMAGE: work_image(w); break;
    case WORK_ENCODE: work_encode(w); break;
    case WORK_SLEEP: work_sleep(w); break;
    }
}

static void free_work_request(work_request *w) {
    free(w->input);
    free(w->error);
    free(w->data);
    free(w->ids);
    loom_tensor_free(&w->tensor);
    free(w);
}

static int push_work_call(lua_State *L) {
    work_request *w = lua_touserdata(L, 1);
    lua_rawgeti(L, LUA_REGISTRYINDEX, w->cb_ref);
    if (w->error || w->code) {
        lua_pushnil(L);
        lua_pushstring(L, w->error ? w->error : "out of memory recording an error");
        lua_pushstring(L, w->code ? w->code : "ENOMEM");
        lua_call(L, 3, 0);
        return 0;
    }
    int n = 1;
    switch (w->kind) {
    case WORK_READ_FILE:
        lua_pushlstring(L, w->data, w->data_len);
        break;
    case WORK_IMAGE: {
        loom_tensor *t = loom_newtensor(L);
        *t = w->tensor; /* the userdata now owns the storage */
        w->tensor = LOOM_TENSOR_EMPTY;
        loom_gc_pace(L);
        lua_createtable(L, 0, 4);
        lua_pushinteger(L, w->width);
        lua_setfield(L, -2, "width");
        lua_pushinteger(L, w->height);
        lua_setfield(L, -2, "height");
        lua_pushstring(L, loom_image_format_name(w->format));
        lua_setfield(L, -2, "format");
        lua_pushstring(L, loom_image_mode_name(w->mode));
        lua_setfield(L, -2, "mode");
        n = 2;
        break;
    }
    case WORK_ENCODE:
        lua_createtable(L, (int)w->n_ids, 0);
        for (size_t i = 0; i < w->n_ids; i++) {
            lua_pushinteger(L, w->ids[i]);
            lua_rawseti(L, -2, (lua_Integer)i + 1);
        }
        break;
    case WORK_SLEEP:
        lua_pushboolean(L, 1);
        break;
    }
    lua_call(L, n, 0);
    return 0;
}

static void on_after_work(uv_work_t *req, int status) {
    work_request *w = req->data;
    if (status == UV_ECANCELED && !w->error) {
        free(w->error);
        w->error = strdup("work request canceled before it started");
        w->code = "ECANCELED";
    }
    if (!shutting_down && callback_L) {
        dispatch(callback_L, "work", push_work_call, w);
        unref(callback_L, &w->cb_ref);
        unref(callback_L, &w->pin_ref);
    }
    free_work_request(w);
}

/* A request with the callback at `cb_idx`, pinned by a registry ref. */
static work_request *new_work_request(lua_State *L, work_kind kind, int cb_idx) {
    luaL_checktype(L, cb_idx, LUA_TFUNCTION);
    work_request *w = calloc(1, sizeof *w);
    if (!w)
        luaL_error(L, "out of memory starting thread-pool work");
    w->kind = kind;
    w->cb_ref = w->pin_ref = LUA_NOREF;
    w->req.data = w;
    return w;
}

/* Copy the string at `idx` into w->input; frees w and raises on failure. */
static void copy_input(lua_State *L, work_request *w, const char *s, size_t len) {
    w->input = malloc(len + 1);
    if (!w->input) {
        free(w);
        luaL_error(L, "out of memory copying %d bytes for thread-pool work", (int)len);
        return;
    }
    memcpy(w->input, s, len);
    w->input[len] = '\0';
    w->input_len = len;
}

/* Reference the callback and the pinned value of a work request (run
 * under lua_pcall: arguments w, callback, pinned value or nil). */
static int pin_work_values(lua_State *L) {
    work_request *w = lua_touserdata(L, 1);
    lua_settop(L, 3);
    w->pin_ref = luaL_ref(L, LUA_REGISTRYINDEX); /* LUA_REFNIL for nil */
    w->cb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 0;
}

/* Queue w. The callback at `cb_idx` and the value to pin at `pin_idx` (0:
 * none) are referenced only here; w is freed when that raises. */
static int queue_work(lua_State *L, work_request *w, int cb_idx, int pin_idx) {
    cb_idx = lua_absindex(L, cb_idx);
    pin_idx = pin_idx ? lua_absindex(L, pin_idx) : 0;
    lua_pushcfunction(L, pin_work_values);
    lua_pushlightuserdata(L, w);
    lua_pushvalue(L, cb_idx);
    if (pin_idx)
        lua_pushvalue(L, pin_idx);
    else
        lua_pushnil(L);
    if (lua_pcall(L, 3, 0, 0) != LUA_OK) {
        unref(L, &w->cb_ref);
        unref(L, &w->pin_ref);
        free_work_request(w);
        return lua_error(L);
    }
    int rc = uv_queue_work(the_loop(), &w->req, on_work, on_after_work);
    if (rc < 0) {
        unref(L, &w->cb_ref);
        unref(L, &w->pin_ref);
        free_work_request(w);
        return luaL_error(L, "cannot queue thread-pool work: %s", uv_strerror(rc));
    }
    return 0;
}

/* uv.work_read_file(path, fn): read a whole file on the pool;
 * fn(bytes) or fn(nil, message, code) with an errno name as code. */
static int l_uv_work_read_file(lua_State *L) {
    size_t len;
    const char *path = luaL_checklstring(L, 1, &len);
    work_request *w = new_work_request(L, WORK_READ_FILE, 2);
    copy_input(L, w, path, len);
    return queue_work(L, w, 2, 0);
}

/* uv.work_image(source, opts, fn): decode an image on the pool, and
 * preprocess it when opts.config (preprocessor_config.json text) is given.
 * source is a path, or the encoded bytes when opts.bytes is true, and then
 * opts.name names it in messages. opts.pad_to_square pads with the mean
 * colour first (LLaVA's image_aspect_ratio "pad"). fn(tensor, info) receives f32
 * pixel values (3, H, W) after preprocessing, or the u8 (H, W, 3) image with
 * alpha dropped; info = {width, height, format, mode} of the file. Failures:
 * fn(nil, message, code), code an errno name when the file cannot be opened,
 * "EDECODE" when it does not decode, "EPREPROCESS" when preprocessing fails.
 * An invalid config raises here. */
static int l_uv_work_image(lua_State *L) {
    size_t len;
    const char *source = luaL_checklstring(L, 1, &len);
    luaL_checktype(L, 2, LUA_TTABLE);
    luaL_checktype(L, 3, LUA_TFUNCTION);
    lua_getfield(L, 2, "bytes");
    int is_bytes = lua_toboolean(L, -1);
    lua_getfield(L, 2, "name");
    const char *name = luaL_optstring(L, -1, "");
    lua_getfield(L, 2, "pad_to_square");
    int pad = lua_toboolean(L, -1);
    lua_getfield(L, 2, "config");
    size_t config_len = 0;
    const char *config = lua_isnil(L, -1) ? NULL : luaL_checklstring(L, -1, &config_len);

    loom_image_preprocess_config cfg;
    loom_image_preprocess_config_init(&cfg);
    if (config) {
        if (loom_image_preprocess_config_from_json(&cfg, config, config_len, "preprocessor config") != LOOM_OK)
            return loom_core_error(L, "work_image");
        if (pad) {
            cfg.pad_to_square = true;
            loom_image_fill_from_mean(cfg.pad_fill, cfg.mean);
        }
    }
    work_request *w = new_work_request(L, WORK_IMAGE, 3);
    w->input_is_path = !is_bytes;
    w->preprocess = config != NULL;
    w->config = cfg;
    snprintf(w->name, sizeof w->name, "%s", name);
    copy_input(L, w, source, len);
    return queue_work(L, w, 3, 0);
}

static int opt_flag(lua_State *L, int idx, const char *key) {
    if (lua_isnoneornil(L, idx))
        return LOOM_TOKENIZER_DEFAULT;
    int type = lua_getfield(L, idx, key);
    int value = type == LUA_TNIL ? LOOM_TOKENIZER_DEFAULT : lua_toboolean(L, -1);
    lua_pop(L, 1);
    return value;
}

/* uv.work_encode(tokenizer, text, opts, fn): tok:encode(text, opts) on the
 * pool; fn(ids) with 0-based ids, or fn(nil, message, "EENCODE"). The
 * tokenizer is pinned until fn runs; it must not be changed (add_token,
 * set_special_id) meanwhile. */
static int l_uv_work_encode(lua_State *L) {
    const loom_tokenizer *tok = loom_checktokenizer(L, 1);
    size_t len;
    const char *text = luaL_checklstring(L, 2, &len);
    if (!lua_isnoneornil(L, 3))
        luaL_checktype(L, 3, LUA_TTABLE);
    loom_encode_opts opts = LOOM_ENCODE_OPTS_DEFAULT;
    opts.add_bos = opt_flag(L, 3, "add_bos");
    opts.add_eos = opt_flag(L, 3, "add_eos");
    opts.parse_special = opt_flag(L, 3, "parse_special");
    opts.legacy = opt_flag(L, 3, "legacy");
    work_request *w = new_work_request(L, WORK_ENCODE, 4);
    w->tok = tok;
    w->encode_opts = opts;
    copy_input(L, w, text, len);
    return queue_work(L, w, 4, 1);
}

/* uv.work_sleep(ms, fn): occupy one pool thread for ms milliseconds, then
 * fn(true). For tests and measurements of the pool. */
static int l_uv_work_sleep(lua_State *L) {
    lua_Number ms = luaL_checknumber(L, 1);
    luaL_argcheck(L, ms >= 0 && ms <= 1e9, 1, "milliseconds must be in 0..1e9");
    work_request *w = new_work_request(L, WORK_SLEEP, 2);
    w->ms = ms;
    return queue_work(L, w, 2, 0);
}

/* ---------------------------------------------------------------------------
 * process queries */

/* uv.guess_handle(fd) -> "tty", "pipe", "file", "tcp", "udp" or "unknown". */
static int l_uv_guess_handle(lua_State *L) {
    uv_file fd = check_fd(L, 1);
    switch (uv_guess_handle(fd)) {
    case UV_TTY: lua_pushliteral(L, "tty"); break;
    case UV_NAMED_PIPE: lua_pushliteral(L, "pipe"); break;
    case UV_FILE: lua_pushliteral(L, "file"); break;
    case UV_TCP: lua_pushliteral(L, "tcp"); break;
    case UV_UDP: lua_pushliteral(L, "udp"); break;
    default: lua_pushliteral(L, "unknown"); break;
    }
    return 1;
}

/* uv.getrusage() -> {maxrss (bytes), utime, stime (seconds)} of this process. */
static int l_uv_getrusage(lua_State *L) {
    uv_rusage_t ru;
    int rc = uv_getrusage(&ru);
    if (rc < 0)
        return push_uv_failure(L, rc, "getrusage");
    lua_createtable(L, 0, 3);
    lua_pushinteger(L, (lua_Integer)ru.ru_maxrss * 1024); /* kilobytes on Linux */
    lua_setfield(L, -2, "maxrss");
    lua_pushnumber(L, (lua_Number)ru.ru_utime.tv_sec + 1e-6 * (lua_Number)ru.ru_utime.tv_usec);
    lua_setfield(L, -2, "utime");
    lua_pushnumber(L, (lua_Number)ru.ru_stime.tv_sec + 1e-6 * (lua_Number)ru.ru_stime.tv_usec);
    lua_setfield(L, -2, "stime");
    return 1;
}

static int l_uv_getpid(lua_State *L) {
    lua_pushinteger(L, (lua_Integer)uv_os_getpid());
    return 1;
}

/* uv.kill(pid, signal) -> true | nil, message, code. */
static int l_uv_kill(lua_State *L) {
    lua_Integer pid = luaL_checkinteger(L, 1);
    int signum = check_signal(L, 2);
    int rc = uv_kill((int)pid, signum);
    if (rc < 0)
        return push_uv_failure(L, rc, "kill");
    lua_pushboolean(L, 1);
    return 1;
}

/* uv.threadpool_size() -> the number of pool threads libuv 1.44 starts:
 * UV_THREADPOOL_SIZE clamped to 1..1024, default 4. */
static int l_uv_threadpool_size(lua_State *L) {
    const char *env = getenv("UV_THREADPOOL_SIZE");
    long n = env ? strtol(env, NULL, 10) : 4;
    if (n <= 0)
        n = 1;
    if (n > 1024)
        n = 1024;
    lua_pushinteger(L, n);
    return 1;
}

/* uv.available_parallelism() -> CPUs this process may run on. */
static int l_uv_available_parallelism(lua_State *L) {
    lua_pushinteger(L, (lua_Integer)uv_available_parallelism());
    return 1;
}

/* ---------------------------------------------------------------------------
 * REPL hooks (declared in l_uv.h) */

/* Calls the driver function stored at `key` and pushes its first result. */
static int push_driver_call(lua_State *L) {
    const char *key = lua_touserdata(L, 1);
    lua_getfield(L, LUA_REGISTRYINDEX, key);
    if (!lua_isfunction(L, -1))
        return 0;
    lua_call(L, 0, 0);
    return 0;
}

static int call_driver_ready(lua_State *L) {
    lua_getfield(L, LUA_REGISTRYINDEX, DRIVER_READY_KEY);
    if (!lua_isfunction(L, -1)) {
        lua_pushboolean(L, 0);
        return 1;
    }
    lua_call(L, 0, 1);
    return 1;
}

int loom_uv_repl_prepare(lua_State *L, fd_set *fds, int *nfds) {
    if (!module_open || shutting_down)
        return -1;
    int top = lua_gettop(L);
    int ready = 0;
    if (lua_checkstack(L, 4)) {
        lua_pushcfunction(L, call_driver_ready);
        if (lua_pcall(L, 0, 1, 0) == LUA_OK)
            ready = lua_toboolean(L, -1);
        lua_settop(L, top);
    }
    uv_loop_t *loop = the_loop();
    if (!uv_loop_alive(loop))
        return ready ? 0 : -1;
    int fd = uv_backend_fd(loop);
    if (fd >= 0 && fd < FD_SETSIZE) {
        FD_SET(fd, fds);
        if (fd + 1 > *nfds)
            *nfds = fd + 1;
    }
    return ready ? 0 : uv_backend_timeout(loop);
}

void loom_uv_repl_run(lua_State *L) {
    if (!module_open || shutting_down || callback_L)
        return;
    /* The tick runs the loop once without blocking, then the ready tasks. */
    dispatch(L, "task", push_driver_call, (void *)DRIVER_TICK_KEY);
    /* Run the loop again: this delivers events when async.lua is not
     * loaded, and hands the watchers the tasks just started to the backend
     * descriptor that the REPL's pselect waits on. */
    callback_L = callback_thread;
    uv_run(the_loop(), UV_RUN_NOWAIT);
    callback_L = NULL;
}

/* ---------------------------------------------------------------------------
 * registration */

static const luaL_Reg uv_funcs[] = {
    {"run", l_uv_run},
    {"alive", l_uv_alive},
    {"stop", l_uv_stop},
    {"now", l_uv_now},
    {"update_time", l_uv_update_time},
    {"hrtime", l_uv_hrtime},
    {"set_error_handler", l_uv_set_error_handler},
    {"set_driver", l_uv_set_driver},
    {"new_timer", l_uv_new_timer},
    {"new_signal", l_uv_new_signal},
    {"fs_open", l_uv_fs_open},
    {"fs_close", l_uv_fs_close},
    {"fs_read", l_uv_fs_read},
    {"fs_write", l_uv_fs_write},
    {"fs_fsync", l_uv_fs_fsync},
    {"fs_ftruncate", l_uv_fs_ftruncate},
    {"fs_fstat", l_uv_fs_fstat},
    {"fs_stat", l_uv_fs_stat},
    {"fs_unlink", l_uv_fs_unlink},
    {"work_read_file", l_uv_work_read_file},
    {"work_image", l_uv_work_image},
    {"work_encode", l_uv_work_encode},
    {"work_sleep", l_uv_work_sleep},
    {"guess_handle", l_uv_guess_handle},
    {"getrusage", l_uv_getrusage},
    {"getpid", l_uv_getpid},
    {"kill", l_uv_kill},
    {"threadpool_size", l_uv_threadpool_size},
    {"available_parallelism", l_uv_available_parallelism},
    {NULL, NULL},
};

static const luaL_Reg timer_methods[] = {
    {"start", l_timer_start},
    {"stop", l_timer_stop},
    {"close", l_timer_close},
    {"is_active", l_timer_is_active},
    {NULL, NULL},
};

static const luaL_Reg signal_methods[] = {
    {"start", l_signal_start},
    {"stop", l_signal_stop},
    {"close", l_signal_close},
    {"is_active", l_signal_is_active},
    {NULL, NULL},
};

static void new_handle_metatable(lua_State *L, const char *mt, const luaL_Reg *methods, lua_CFunction tostring) {
    luaL_newmetatable(L, mt);
    lua_newtable(L);
    luaL_setfuncs(L, methods, 0);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, handle_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pop(L, 1);
}

int luaopen_loom_uv(lua_State *L) {
    new_handle_metatable(L, TIMER_MT, timer_methods, l_timer___tostring);
    new_handle_metatable(L, SIGNAL_MT, signal_methods, l_signal___tostring);
    callback_thread = lua_newthread(L);
    lua_setfield(L, LUA_REGISTRYINDEX, "loom.uv.callback_thread");
    luaL_newlib(L, uv_funcs);
    lua_pushstring(L, uv_version_string());
    lua_setfield(L, -2, "libuv_version");
    module_open = 1;
    return 1;
}
