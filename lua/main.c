/* The `loom` executable: runs a Lua script with the Loom module preloaded
 * (command line and `arg` table as lua5.4 sets them), or an interactive
 * REPL with GNU readline (history, completion of globals and fields,
 * multi-line input, Ctrl-C that interrupts a running computation).
 * Without a terminal on stdin the REPL reads plain lines. */
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <unistd.h>

#include <lualib.h>
#include <readline/history.h>
#include <readline/readline.h>

#include "l_uv.h" /* the async runtime's loop, waited on beside stdin */
#include "loom_lua.h"

#define PROMPT "loom> "
#define PROMPT_CONTINUE "...> "
#define HISTORY_MAX 1000

static const char *progname = "loom";
static lua_State *globalL;
static char **main_argv; /* the command line, for pmain */
static int main_argc;

/* ---------------------------------------------------------------------------
 * messages */

static void print_usage(FILE *f) {
    fprintf(f,
            "usage: %s [options] [script [args]]\n"
            "Run a Lua script with the Loom tensor library, or start the interactive REPL.\n"
            "\n"
            "Options:\n"
            "  -e CODE        run the Lua statements CODE\n"
            "  -i             enter the REPL after running the script or -e code\n"
            "  -l MOD         require module MOD into the global MOD (dots included)\n"
            "  -l G=MOD       require module MOD into the global G\n"
            "  -v, --version  print the Loom and Lua versions\n"
            "  -h, --help     print this help\n"
            "  --             stop handling options\n"
            "  -              run standard input as a script\n"
            "\n"
            "The script receives its arguments in `arg` (arg[0] is the script) and as `...`.\n"
            "The global `loom` holds require \"loom\". Without a script or -e, the REPL starts;\n"
            "it reads plain lines when standard input is not a terminal.\n"
            "\n"
            "Environment:\n"
            "  LOOM_HISTORY   REPL history file (default ~/.loom_history)\n"
            "  LUA_PATH, LUA_CPATH  extra module search paths, as for lua5.4\n",
            progname);
}

static void print_version(void) {
    printf("Loom %s (%s)\n", LOOM_VERSION, LUA_RELEASE);
    fflush(stdout);
}

static void print_error(const char *msg) {
    fflush(stdout);
    fprintf(stderr, "%s: %s\n", progname, msg);
    fflush(stderr);
}

/* Print the error message at the stack top (if status is an error) and pop
 * it. */
static int report(lua_State *L, int status) {
    if (status != LUA_OK) {
        const char *msg = lua_tostring(L, -1);
        print_error(msg ? msg : "(error object is not a string)");
        lua_pop(L, 1);
    }
    return status;
}

/* ---------------------------------------------------------------------------
 * protected calls with a traceback and Ctrl-C interruption */

/* Message handler: add a traceback to the error message. */
static int msghandler(lua_State *L) {
    const char *msg = lua_tostring(L, 1);
    if (msg == NULL) {
        if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
            return 1;
        msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    }
    luaL_traceback(L, L, msg, 1);
    return 1;
}

/* The hook that a Ctrl-C sets: it raises at the next Lua instruction. */
static void interrupt_hook(lua_State *L, lua_Debug *ar) {
    (void)ar;
    lua_sethook(L, NULL, 0, 0);
    luaL_error(L, "interrupted!");
}

/* SIGINT while Lua runs: set the hook (lua_sethook may be called from a
 * signal handler) and restore the default action, so a second Ctrl-C ends a
 * process stuck in a long C operator. */
static void on_sigint_running(int sig) {
    signal(sig, SIG_DFL);
    lua_sethook(globalL, interrupt_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKLINE | LUA_MASKCOUNT, 1);
}

/* Call the function below `narg` arguments on the stack in protected mode
 * with a traceback; Ctrl-C interrupts it. */
static int docall(lua_State *L, int narg, int nres) {
    int base = lua_gettop(L) - narg;
    struct sigaction sa, old;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint_running;
    sigemptyset(&sa.sa_mask);
    lua_pushcfunction(L, msghandler);
    lua_insert(L, base);
    globalL = L;
    sigaction(SIGINT, &sa, &old);
    int status = lua_pcall(L, narg, nres, base);
    sigaction(SIGINT, &old, NULL);
    lua_sethook(L, NULL, 0, 0); /* in case the signal came after the last instruction */
    lua_remove(L, base);
    return status;
}

static int dochunk(lua_State *L, int status) {
    if (status == LUA_OK)
        status = docall(L, 0, 0);
    return report(L, status);
}

static int dostring(lua_State *L, const char *code, const char *name) {
    return dochunk(L, luaL_loadbuffer(L, code, strlen(code), name));
}

/* `-l mod`: global mod = require(mod), the global named by the whole module
 * name, dots included. `-l g=mod`: global g = require(mod). The same rules
 * as lua.c of Lua 5.4.4, which keeps a suffix such as "-v2" in the global
 * name too. */
static int dolibrary(lua_State *L, const char *arg) {
    const char *eq = strchr(arg, '=');
    const char *modname = eq ? eq + 1 : arg;
    lua_pushlstring(L, arg, eq ? (size_t)(eq - arg) : strlen(arg)); /* the global name */
    lua_getglobal(L, "require");
    lua_pushstring(L, modname);
    int status = docall(L, 1, 1);
    if (status == LUA_OK) {
        lua_setglobal(L, lua_tostring(L, -2));
        lua_pop(L, 1);
    } else {
        lua_remove(L, -2);
    }
    return report(L, status);
}

/* ---------------------------------------------------------------------------
 * state setup: module paths, preloaded C module, global `loom`, `arg` */

/* Directory holding the executable, from /proc/self/exe ("" if unknown). */
static void exe_dir(char *buf, size_t cap) {
    ssize_t n = readlink("/proc/self/exe", buf, cap - 1);
    if (n <= 0) {
        buf[0] = '\0';
        return;
    }
    buf[n] = '\0';
    char *slash = strrchr(buf, '/');
    if (slash)
        *slash = '\0';
}

/* Put the Lua part of Loom on package.path: <exe>/../lua (running from the
 * source tree) and <exe>/../share/lua/5.4 (after `make install`), ahead of
 * the defaults; and <exe>/../lib/lua/5.4 on package.cpath. */
static void set_paths(lua_State *L) {
    char dir[PATH_MAX];
    exe_dir(dir, sizeof dir);
    if (!dir[0])
        return;
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "path");
    lua_pushfstring(L, "%s/../lua/?.lua;%s/../lua/?/init.lua;%s/../share/lua/5.4/?.lua;%s/../share/lua/5.4/?/init.lua;%s",
                    dir, dir, dir, dir, lua_tostring(L, -1));
    lua_setfield(L, -3, "path");
    lua_pop(L, 1);
    lua_getfield(L, -1, "cpath");
    lua_pushfstring(L, "%s/../lib/lua/5.4/?.so;%s", dir, lua_tostring(L, -1));
    lua_setfield(L, -3, "cpath");
    lua_pop(L, 2);
}

/* require "loom.core" loads the C module linked into this executable. */
static void preload_core(lua_State *L) {
    luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
    lua_pushcfunction(L, luaopen_loom_core);
    lua_setfield(L, -2, "loom.core");
    lua_pop(L, 1);
}

/* global loom = require "loom"; a failure is reported and the run goes on,
 * so that plain Lua still works from a broken tree. */
static void load_loom(lua_State *L) {
    lua_getglobal(L, "require");
    lua_pushliteral(L, "loom");
    int status = docall(L, 1, 1);
    if (status == LUA_OK) {
        lua_setglobal(L, "loom");
        return;
    }
    const char *msg = lua_tostring(L, -1);
    fflush(stdout);
    fprintf(stderr, "%s: warning: cannot load module 'loom', the global 'loom' is not set:\n%s\n", progname,
            msg ? msg : "(no message)");
    lua_pop(L, 1);
}

/* arg[0] = script, arg[1..] = its arguments, negative indices for the
 * interpreter and its options, as lua.c builds it. `script` is the index of
 * the script in argv, or 0 without one. */
static void create_arg_table(lua_State *L, char **argv, int argc, int script) {
    if (script == argc)
        script = 0;
    lua_createtable(L, argc - script - 1 > 0 ? argc - script - 1 : 0, script + 1);
    for (int i = 0; i < argc; i++) {
        lua_pushstring(L, argv[i]);
        lua_rawseti(L, -2, i - script);
    }
    lua_setglobal(L, "arg");
}

static int run_script(lua_State *L, char **argv, int script) {
    const char *fname = argv[script];
    if (strcmp(fname, "-") == 0 && strcmp(argv[script - 1], "--") != 0)
        fname = NULL; /* stdin */
    int status = luaL_loadfile(L, fname);
    if (status == LUA_OK) {
        int n = 0;
        lua_getglobal(L, "arg");
        if (lua_type(L, -1) == LUA_TTABLE) {
            n = (int)luaL_len(L, -1);
            luaL_checkstack(L, n + 3, "too many arguments to script");
            for (int i = 1; i <= n; i++)
                lua_rawgeti(L, -i, i);
            lua_remove(L, -n - 1);
        } else {
            lua_pop(L, 1);
        }
        status = docall(L, n, 0);
    }
    return report(L, status);
}

/* ---------------------------------------------------------------------------
 * REPL: evaluation of one complete chunk at a time */

static char *pending;      /* lines of an incomplete chunk, NULL when none */
static size_t pending_len;
static const char *history_path;
static int use_readline;

/* Syntax error because the chunk ended early (lua.c's test). */
static int incomplete(lua_State *L, int status) {
    if (status == LUA_ERRSYNTAX) {
        size_t len;
        const char *msg = lua_tolstring(L, -1, &len);
        static const char eof[] = "<eof>";
        if (len >= sizeof eof - 1 && strcmp(msg + len - (sizeof eof - 1), eof) == 0) {
            lua_pop(L, 1);
            return 1;
        }
    }
    return 0;
}

static void remember(const char *chunk) {
    if (!use_readline || !chunk[0])
        return;
    /* One history line per chunk: lines are joined with spaces unless a
     * "--" comment would swallow what follows, then each line is its own. */
    if (strstr(chunk, "--") && strchr(chunk, '\n')) {
        char *copy = strdup(chunk);
        if (!copy)
            return;
        int added = 0;
        for (char *line = strtok(copy, "\n"); line; line = strtok(NULL, "\n")) {
            add_history(line);
            added++;
        }
        if (history_path && added > 0)
            append_history(added, history_path);
        free(copy);
    } else {
        char *copy = strdup(chunk);
        if (!copy)
            return;
        for (char *p = copy; *p; p++)
            if (*p == '\n')
                *p = ' ';
        HIST_ENTRY *last = history_length > 0 ? history_get(history_base + history_length - 1) : NULL;
        if (!last || strcmp(last->line, copy) != 0) {
            add_history(copy);
            if (history_path)
                append_history(1, history_path);
        }
        free(copy);
    }
}

/* Print every value the chunk returned, through the global print (which
 * uses __tostring, so tensors print as tensors). */
/* Replace each plain table among the n results with the text loom.repl's
 * format gives for it. Without that module the results stay as they are. */
static void format_tables(lua_State *L, int n) {
    int any = 0;
    for (int i = 1; i <= n && !any; i++)
        any = lua_type(L, i) == LUA_TTABLE && !lua_getmetatable(L, i);
    lua_settop(L, n); /* lua_getmetatable pushed nothing when it returned 0 */
    if (!any)
        return;
    lua_getglobal(L, "require");
    lua_pushliteral(L, "loom.repl");
    if (lua_pcall(L, 1, 1, 0) != LUA_OK || !lua_istable(L, -1)) {
        lua_settop(L, n);
        return;
    }
    lua_getfield(L, -1, "format");
    int format = lua_gettop(L);
    for (int i = 1; i <= n; i++) {
        if (lua_type(L, i) != LUA_TTABLE)
            continue;
        lua_pushvalue(L, format);
        lua_pushvalue(L, i);
        if (lua_pcall(L, 1, 1, 0) == LUA_OK)
            lua_replace(L, i);
        else
            lua_pop(L, 1);
    }
    lua_settop(L, n);
}

static void print_results(lua_State *L) {
    int n = lua_gettop(L);
    if (n == 0)
        return;
    luaL_checkstack(L, LUA_MINSTACK, "too many results to print");
    format_tables(L, n);
    lua_getglobal(L, "print");
    lua_insert(L, 1);
    if (lua_pcall(L, n, 0, 0) != LUA_OK) {
        print_error(lua_pushfstring(L, "error calling 'print' (%s)", lua_tostring(L, -1)));
        lua_settop(L, 0);
    }
}

static void discard_pending(void) {
    free(pending);
    pending = NULL;
    pending_len = 0;
}

static int append_pending(const char *line) {
    size_t n = strlen(line);
    char *p = realloc(pending, pending_len + n + 2);
    if (!p)
        return -1;
    if (pending_len > 0)
        p[pending_len++] = '\n';
    memcpy(p + pending_len, line, n + 1);
    pending = p;
    pending_len += n;
    return 0;
}

/* Feed one input line. Returns 1 when more lines are needed to complete the
 * chunk, 0 when the chunk ran (or failed). */
static int feed_line(lua_State *L, const char *line) {
    int status;
    lua_settop(L, 0);
    if (!pending) {
        /* A leading '=' means "return", as in Lua 5.1's REPL. */
        const char *expr = line[0] == '=' ? line + 1 : line;
        const char *ret = lua_pushfstring(L, "return %s;", expr);
        status = luaL_loadbuffer(L, ret, strlen(ret), "=stdin");
        if (status == LUA_OK) {
            lua_remove(L, -2);
            remember(line);
            if (report(L, docall(L, 0, LUA_MULTRET)) == LUA_OK)
                print_results(L);
            lua_settop(L, 0);
            return 0;
        }
        lua_pop(L, 2);
    }

    if (append_pending(line) != 0) {
        print_error("out of memory reading the input line");
        discard_pending();
        return 0;
    }
    status = luaL_loadbuffer(L, pending, pending_len, "=stdin");
    if (incomplete(L, status))
        return 1;
    remember(pending);
    discard_pending();
    if (status == LUA_OK)
        status = docall(L, 0, LUA_MULTRET);
    if (report(L, status) == LUA_OK)
        print_results(L);
    lua_settop(L, 0);
    return 0;
}

/* Feed every complete line of buf[0 .. *len) and keep the rest at its start. */
static void feed_lines(lua_State *L, char *buf, size_t *len) {
    size_t start = 0;
    char *nl;
    while ((nl = memchr(buf + start, '\n', *len - start)) != NULL) {
        *nl = '\0';
        feed_line(L, buf + start);
        fflush(stdout);
        start = (size_t)(nl - buf) + 1;
    }
    memmove(buf, buf + start, *len - start);
    *len -= start;
}

/* Plain-line REPL for a non-terminal stdin: no prompts, no readline. Input
 * is read as it comes, through the same wait as the readline REPL, so
 * background tasks of loom.async run while the next line is awaited. */
static void repl_plain(lua_State *L) {
    size_t len = 0, cap = 4096;
    char *buf = malloc(cap + 1);
    if (buf == NULL) {
        fputs("loom: out of memory for the input line\n", stderr);
        return;
    }
    for (;;) {
        fd_set fds;
        FD_ZERO(&fds);
        FD_SET(STDIN_FILENO, &fds);
        int nfds = STDIN_FILENO + 1;
        int wait_ms = loom_uv_repl_prepare(L, &fds, &nfds);
        struct timespec timeout = {wait_ms / 1000, (long)(wait_ms % 1000) * 1000000L};
        int r = pselect(nfds, &fds, NULL, NULL, wait_ms < 0 ? NULL : &timeout, NULL);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            break; /* treat as end of input */
        loom_uv_repl_run(L);
        if (!FD_ISSET(STDIN_FILENO, &fds))
            continue;
        if (len == cap) {
            char *grown = realloc(buf, 2 * cap + 1);
            if (grown == NULL) {
                fputs("loom: out of memory for the input line\n", stderr);
                break;
            }
            buf = grown;
            cap *= 2;
        }
        ssize_t n = read(STDIN_FILENO, buf + len, cap - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        len += (size_t)n;
        feed_lines(L, buf, &len);
    }
    if (len > 0) {
        /* a last line without a newline */
        buf[len] = '\0';
        feed_line(L, buf);
        fflush(stdout);
    }
    free(buf);
    if (pending) {
        /* Input ended inside a chunk: show why, as the chunk is incomplete. */
        if (luaL_loadbuffer(L, pending, pending_len, "=stdin") != LUA_OK)
            report(L, LUA_ERRSYNTAX);
        lua_settop(L, 0);
        discard_pending();
    }
}

/* ---------------------------------------------------------------------------
 * REPL with readline: callback interface, so Ctrl-C at the prompt only
 * clears the line */

static volatile sig_atomic_t prompt_interrupted;
static char *accepted_line;
static int line_ready;

static void on_sigint_prompt(int sig) {
    (void)sig;
    prompt_interrupted = 1;
}

static void on_line(char *line) {
    accepted_line = line;
    line_ready = 1;
    rl_callback_handler_remove();
}

/* Completion: candidates for the word before the cursor, such as "loo",
 * "loom.ze" or "t:nar". */
static char **candidates;
static size_t n_candidates, cap_candidates;

static void add_candidate(const char *prefix, size_t prefix_len, const char *name) {
    if (n_candidates == cap_candidates) {
        size_t cap = cap_candidates ? 2 * cap_candidates : 64;
        char **p = realloc(candidates, cap * sizeof *p);
        if (!p)
            return;
        candidates = p;
        cap_candidates = cap;
    }
    size_t n = strlen(name);
    char *s = malloc(prefix_len + n + 1);
    if (!s)
        return;
    memcpy(s, prefix, prefix_len);
    memcpy(s + prefix_len, name, n + 1);
    candidates[n_candidates++] = s;
}

static int is_identifier(const char *s) {
    if (!(*s == '_' || (*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z')))
        return 0;
    for (s++; *s; s++)
        if (!(*s == '_' || (*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9')))
            return 0;
    return 1;
}

/* Add the string keys of the table at the stack top that start with
 * `partial`; with `functions_only`, only keys holding functions. Keys that
 * start with "__" (metamethods) are left out. */
static void add_keys(lua_State *L, const char *prefix, size_t prefix_len, const char *partial, int functions_only) {
    size_t plen = strlen(partial);
    lua_pushnil(L);
    while (lua_next(L, -2)) {
        if (lua_type(L, -2) == LUA_TSTRING) {
            const char *key = lua_tostring(L, -2);
            if (strncmp(key, partial, plen) == 0 && is_identifier(key) && strncmp(key, "__", 2) != 0 &&
                (!functions_only || lua_type(L, -1) == LUA_TFUNCTION))
                add_candidate(prefix, prefix_len, key);
        }
        lua_pop(L, 1);
    }
}

/* Fields of the value at the stack top, found without running Lua code:
 * a table's own keys, then along the metatables' __index tables; for a
 * userdata whose __index is a function (loom.Tensor), the keys of its
 * metatable, where the methods live. The walk replaces the top value with
 * each table it visits. `visit` is called with that table at the top;
 * it returns 1 to stop the walk there (leaving what it pushed). */
typedef int (*field_visitor)(lua_State *L, void *ud);

static int walk_fields(lua_State *L, field_visitor visit, void *ud) {
    for (int depth = 0; depth < 16; depth++) {
        if (lua_type(L, -1) == LUA_TTABLE && visit(L, ud))
            return 1;
        if (!lua_getmetatable(L, -1))
            break;
        lua_pushliteral(L, "__index");
        if (lua_rawget(L, -2) == LUA_TTABLE) {
            lua_remove(L, -2); /* metatable */
            lua_remove(L, -2); /* previous value */
            continue;
        }
        lua_pop(L, 1);
        if (lua_type(L, -2) != LUA_TTABLE && visit(L, ud))
            return 1;
        lua_pop(L, 1);
        break;
    }
    return 0;
}

struct key_query {
    const char *prefix;
    size_t prefix_len;
    const char *partial;
    int functions_only;
};

static int visit_add_keys(lua_State *L, void *ud) {
    struct key_query *q = ud;
    add_keys(L, q->prefix, q->prefix_len, q->partial, q->functions_only);
    return 0;
}

/* Push the table's raw value for `key` and stop when there is one. */
static int visit_lookup(lua_State *L, void *ud) {
    const char *key = ud;
    if (strncmp(key, "__", 2) == 0)
        return 0;
    lua_pushstring(L, key);
    if (lua_rawget(L, -2) != LUA_TNIL)
        return 1;
    lua_pop(L, 1);
    return 0;
}

static void compute_candidates(lua_State *L, const char *text) {
    static const char *const keywords[] = {"and", "break", "do", "else", "elseif", "end", "false", "for",
                                           "function", "goto", "if", "in", "local", "nil", "not", "or",
                                           "repeat", "return", "then", "true", "until", "while", NULL};
    int top = lua_gettop(L);
    const char *sep = NULL;
    for (const char *p = text; *p; p++)
        if (*p == '.' || *p == ':')
            sep = p;
    lua_pushglobaltable(L);
    if (!sep) {
        struct key_query q = {"", 0, text, 0};
        walk_fields(L, visit_add_keys, &q);
        for (int i = 0; keywords[i]; i++)
            if (strncmp(keywords[i], text, strlen(text)) == 0)
                add_candidate("", 0, keywords[i]);
        lua_settop(L, top);
        return;
    }
    /* Look up each name of the path before the last separator. */
    for (const char *p = text; p < sep;) {
        const char *end = p;
        while (end < sep && *end != '.' && *end != ':')
            end++;
        char key[256];
        size_t n = (size_t)(end - p);
        if (n == 0 || n >= sizeof key) {
            lua_settop(L, top);
            return;
        }
        memcpy(key, p, n);
        key[n] = '\0';
        int base = lua_gettop(L);
        if (!walk_fields(L, visit_lookup, key)) {
            lua_settop(L, top);
            return;
        }
        lua_replace(L, base); /* the field value replaces the walked value */
        lua_settop(L, base);
        p = end + 1;
    }
    struct key_query q = {text, (size_t)(sep + 1 - text), sep + 1, *sep == ':'};
    walk_fields(L, visit_add_keys, &q);
    lua_settop(L, top);
}

static char *completion_generator(const char *text, int state) {
    static size_t next;
    if (state == 0) {
        for (size_t i = next; i < n_candidates; i++)
            free(candidates[i]);
        n_candidates = 0;
        next = 0;
        compute_candidates(globalL, text);
    }
    return next < n_candidates ? candidates[next++] : NULL; /* readline frees each match */
}

static char **complete(const char *text, int start, int end) {
    (void)start;
    (void)end;
    rl_attempted_completion_over = 1; /* no file-name completion */
    rl_completion_append_character = '\0';
    return rl_completion_matches(text, completion_generator);
}

static void init_history(void) {
    static char path[PATH_MAX];
    const char *env = getenv("LOOM_HISTORY");
    const char *home = getenv("HOME");
    if (env && env[0])
        snprintf(path, sizeof path, "%s", env);
    else if (home && home[0])
        snprintf(path, sizeof path, "%s/.loom_history", home);
    else
        return;
    history_path = path;
    using_history();
    stifle_history(HISTORY_MAX);
    if (read_history(path) != 0)
        write_history(path); /* create it, so append_history can add to it */
    history_truncate_file(path, HISTORY_MAX);
}

/* Read one line with readline while SIGINT is blocked except inside
 * pselect, so Ctrl-C is seen only here. Returns the line (malloc'd), NULL
 * at end of input, and sets *interrupted for a Ctrl-C. */
static char *read_line(const char *prompt, int *interrupted) {
    sigset_t block, orig;
    sigemptyset(&block);
    sigaddset(&block, SIGINT);
    sigprocmask(SIG_BLOCK, &block, &orig);
    struct sigaction sa, old;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint_prompt;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old); /* no SA_RESTART: pselect returns EINTR */

    *interrupted = 0;
    prompt_interrupted = 0;
    line_ready = 0;
    accepted_line = NULL;
    rl_callback_handler_install(prompt, on_line);
    while (!line_ready) {
        fd_set fds;
        FD_ZERO(&fds);
        FD_SET(STDIN_FILENO, &fds);
        /* Background tasks of loom.async run while the user types. */
        int nfds = STDIN_FILENO + 1;
        int wait_ms = loom_uv_repl_prepare(globalL, &fds, &nfds);
        struct timespec timeout = {wait_ms / 1000, (long)(wait_ms % 1000) * 1000000L};
        int r = pselect(nfds, &fds, NULL, NULL, wait_ms < 0 ? NULL : &timeout, &orig);
        if (r < 0 && errno == EINTR && prompt_interrupted) {
            /* Ctrl-C: show it after the text typed so far, drop the line.
             * "^C" goes out before the terminal is restored, because that
             * may move the cursor to column 0 (bracketed paste mode off). */
            rl_point = rl_end;
            rl_redisplay();
            rl_echo_signal_char(SIGINT);
            rl_free_line_state();
            rl_callback_sigcleanup();
            rl_callback_handler_remove();
            fputs("\n", stdout);
            fflush(stdout);
            *interrupted = 1;
            break;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            rl_callback_handler_remove();
            break; /* treat as end of input */
        }
        loom_uv_repl_run(globalL);
        if (FD_ISSET(STDIN_FILENO, &fds))
            rl_callback_read_char();
    }
    sigaction(SIGINT, &old, NULL);
    sigprocmask(SIG_SETMASK, &orig, NULL);
    return accepted_line;
}

static void repl_readline(lua_State *L) {
    rl_readline_name = "loom";
    rl_attempted_completion_function = complete;
    /* '.' and ':' stay inside a word, so "loom.ze" completes as a path. */
    rl_basic_word_break_characters = " \t\n\"\\'`@$><=;|&{(+-*/%^~#,[]}";
    rl_completer_word_break_characters = rl_basic_word_break_characters;
    init_history();
    globalL = L;
    for (;;) {
        int interrupted;
        char *line = read_line(pending ? PROMPT_CONTINUE : PROMPT, &interrupted);
        if (interrupted) {
            discard_pending();
            continue;
        }
        if (!line) {
            fputs("\n", stdout);
            break;
        }
        feed_line(L, line);
        free(line);
    }
    discard_pending();
    if (history_path)
        history_truncate_file(history_path, HISTORY_MAX);
}

static void repl(lua_State *L, int show_banner) {
    use_readline = isatty(STDIN_FILENO);
    if (use_readline) {
        if (show_banner)
            printf("Loom %s (%s)  Ctrl-D exits, Ctrl-C interrupts a computation\n", LOOM_VERSION, LUA_RELEASE);
        repl_readline(L);
    } else {
        repl_plain(L);
    }
}

/* ---------------------------------------------------------------------------
 * command line */

enum { HAS_E = 1, HAS_I = 2, HAS_V = 4, HAS_HELP = 8, BAD_OPTION = 16 };

/* Scan the options; returns flags and sets *script to the index of the
 * script in argv (argc when none), as lua.c's collectargs does. */
static int collect_args(char **argv, int argc, int *script) {
    int flags = 0;
    int i;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (a[0] != '-')
            break;
        if (strcmp(a, "--") == 0) {
            i++;
            break;
        }
        if (strcmp(a, "-") == 0)
            break;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            flags |= HAS_HELP;
        } else if (strcmp(a, "--version") == 0 || strcmp(a, "-v") == 0) {
            flags |= HAS_V;
        } else if (strcmp(a, "-i") == 0) {
            flags |= HAS_I;
        } else if (a[1] == 'e' || a[1] == 'l') {
            if (a[1] == 'e')
                flags |= HAS_E;
            if (a[2] == '\0' && (++i >= argc || argv[i][0] == '-')) {
                *script = i;
                return flags | BAD_OPTION;
            }
        } else {
            *script = i;
            return flags | BAD_OPTION;
        }
    }
    *script = i;
    return flags;
}

/* Run the -e and -l options in order. */
static int run_options(lua_State *L, char **argv, int script) {
    for (int i = 1; i < script; i++) {
        const char *a = argv[i];
        if (a[0] != '-' || (a[1] != 'e' && a[1] != 'l'))
            continue;
        const char *value = a[2] ? a + 2 : argv[++i];
        int status = a[1] == 'e' ? dostring(L, value, "=(command line)") : dolibrary(L, value);
        if (status != LUA_OK)
            return 0;
    }
    return 1;
}

/* Everything that can raise runs here, under lua_pcall from main. */
static int pmain(lua_State *L) {
    int argc = main_argc;
    char **argv = main_argv;
    int script;
    int flags = collect_args(argv, argc, &script);
    if (flags & BAD_OPTION) {
        if (script < argc)
            fprintf(stderr, "%s: unrecognized option '%s'\n", progname, argv[script]);
        else
            fprintf(stderr, "%s: '%s' needs an argument\n", progname, argv[script - 1]);
        print_usage(stderr);
        return 0;
    }
    if (flags & HAS_HELP) {
        print_usage(stdout);
        lua_pushboolean(L, 1);
        return 1;
    }
    if ((flags & HAS_V) && !(flags & HAS_I))
        print_version();

    luaL_checkversion(L);
    luaL_openlibs(L);
    set_paths(L);
    preload_core(L);
    create_arg_table(L, argv, argc, script);
    lua_gc(L, LUA_GCGEN, 0, 0);
    load_loom(L);

    if (!run_options(L, argv, script))
        return 0;
    if (script < argc && run_script(L, argv, script) != LUA_OK)
        return 0;
    if (flags & HAS_I)
        repl(L, 1);
    else if (script == argc && !(flags & (HAS_E | HAS_V)))
        repl(L, 1);
    lua_pushboolean(L, 1);
    return 1;
}

int main(int argc, char **argv) {
    if (argv[0] && argv[0][0]) {
        const char *slash = strrchr(argv[0], '/');
        progname = slash ? slash + 1 : argv[0];
    }
    lua_State *L = luaL_newstate();
    if (!L) {
        fprintf(stderr, "%s: cannot create a Lua state: not enough memory\n", progname);
        return EXIT_FAILURE;
    }
    main_argc = argc;
    main_argv = argv;
    lua_pushcfunction(L, pmain);
    int status = lua_pcall(L, 0, 1, 0);
    int ok = status == LUA_OK && lua_toboolean(L, -1);
    report(L, status);
    lua_close(L);
    free(candidates);
    return ok ? EXIT_SUCCESS : EXIT_FAILURE;
}
