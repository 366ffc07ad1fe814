/* Loom core: error reporting, logging, aligned allocation and checked size
 * arithmetic. Every core function reports failure through its return value and
 * a per-thread message; nothing under core/ exits or aborts the process. */
#ifndef LOOM_BASE_H
#define LOOM_BASE_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#define LOOM_VERSION "0.1.0"

/* Status codes returned by core functions. */
enum { LOOM_OK = 0, LOOM_ERR = -1 };

/* Record a formatted message as this thread's last error and return LOOM_ERR,
 * so a failing function can write `return loom_error("...", ...);`. */
int loom_error(const char *fmt, ...)
    __attribute__((format(printf, 1, 2)));
/* Prefix this thread's last error with "context: " (used to add a file name
 * or an operator name as an error travels up). Returns LOOM_ERR. */
int loom_error_prefix(const char *fmt, ...)
    __attribute__((format(printf, 1, 2)));
/* This thread's last error message ("" when none was recorded). */
const char *loom_last_error(void);
void loom_error_clear(void);

/* Logging: the core never prints directly. Messages go to one callback whose
 * default writes "loom: <level>: message" lines to stderr. */
typedef enum loom_log_level {
    LOOM_LOG_DEBUG = 0,
    LOOM_LOG_INFO = 1,
    LOOM_LOG_WARN = 2,
    LOOM_LOG_ERROR = 3,
} loom_log_level;
typedef void (*loom_log_fn)(loom_log_level level, const char *message, void *user_data);
/* Replace the log sink (NULL restores the default) and the minimum level. */
void loom_log_set(loom_log_fn fn, void *user_data);
void loom_log_set_level(loom_log_level min_level);
void loom_log(loom_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* 64-byte aligned heap memory. loom_alloc returns NULL and sets the error on
 * failure; loom_free accepts NULL. */
void *loom_alloc(size_t nbytes);
void *loom_alloc_zeroed(size_t nbytes);
void loom_free(void *ptr);
/* Bytes currently held by owned tensor storages in this process; the Lua
 * binding uses it to pace the garbage collector. */
size_t loom_owned_bytes(void);

/* Checked arithmetic for sizes read from untrusted files: each returns 0 and
 * stores the result, or returns -1 on overflow without touching *out. */
int loom_mul_size(size_t a, size_t b, size_t *out);
int loom_add_size(size_t a, size_t b, size_t *out);
int loom_mul_i64(int64_t a, int64_t b, int64_t *out);

/* Debug-only assertion: the single place where the core may abort, compiled
 * out unless LOOM_DEBUG is defined. */
#ifdef LOOM_DEBUG
#include <assert.h>
#define LOOM_ASSERT(x) assert(x)
#else
#define LOOM_ASSERT(x) ((void)0)
#endif

#endif
