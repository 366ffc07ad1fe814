/* Loom core: per-thread error messages, the log sink, aligned allocation
 * and checked size arithmetic. The default log sink is the only place in
 * core/ that writes to a stream. */
#include "base.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- errors */

static _Thread_local char error_message[1024];

int loom_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(error_message, sizeof error_message, fmt, ap);
    va_end(ap);
    return LOOM_ERR;
}

int loom_error_prefix(const char *fmt, ...) {
    char prefix[512];
    char old[sizeof error_message];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, error_message, sizeof old);
    size_t plen = strlen(prefix), olen = strlen(old);
    if (plen > sizeof error_message - 3)
        plen = sizeof error_message - 3;
    if (olen > sizeof error_message - 3 - plen)
        olen = sizeof error_message - 3 - plen;
    memcpy(error_message, prefix, plen);
    memcpy(error_message + plen, ": ", 2);
    memcpy(error_message + plen + 2, old, olen);
    error_message[plen + 2 + olen] = '\0';
    return LOOM_ERR;
}

const char *loom_last_error(void) { return error_message; }

void loom_error_clear(void) { error_message[0] = '\0'; }

/* ---- logging */

static void default_log_sink(loom_log_level level, const char *message, void *user_data) {
    static const char *const names[] = {"debug", "info", "warning", "error"};
    (void)user_data;
    fprintf(stderr, "loom: %s: %s\n", names[level < 0 || level > 3 ? 3 : level], message);
}

static loom_log_fn log_fn = default_log_sink;
static void *log_user_data;
static loom_log_level log_min_level = LOOM_LOG_INFO;

void loom_log_set(loom_log_fn fn, void *user_data) {
    log_fn = fn ? fn : default_log_sink;
    log_user_data = fn ? user_data : NULL;
}

void loom_log_set_level(loom_log_level min_level) { log_min_level = min_level; }

void loom_log(loom_log_level level, const char *fmt, ...) {
    char message[1024];
    va_list ap;
    if (level < log_min_level)
        return;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    log_fn(level, message, log_user_data);
}

/* ---- allocation */

static atomic_size_t owned_bytes;

/* Every block carries a 64-byte header in front that records its size, so
 * loom_free can keep loom_owned_bytes exact. */
#define HEADER 64

void *loom_alloc(size_t nbytes) {
    size_t total;
    void *p;
    if (loom_add_size(nbytes, HEADER, &total) != 0 || loom_add_size(total, 63, &total) != 0) {
        loom_error("cannot allocate %zu bytes: size overflows", nbytes);
        return NULL;
    }
    total &= ~(size_t)63;
    p = aligned_alloc(64, total);
    if (!p) {
        loom_error("out of memory allocating %zu bytes", nbytes);
        return NULL;
    }
    *(size_t *)p = nbytes;
    atomic_fetch_add(&owned_bytes, nbytes);
    return (char *)p + HEADER;
}

void *loom_alloc_zeroed(size_t nbytes) {
    void *p = loom_alloc(nbytes);
    if (p)
        memset(p, 0, nbytes);
    return p;
}

void loom_free(void *ptr) {
    char *base;
    if (!ptr)
        return;
    base = (char *)ptr - HEADER;
    atomic_fetch_sub(&owned_bytes, *(size_t *)base);
    free(base);
}

size_t loom_owned_bytes(void) { return atomic_load(&owned_bytes); }

/* ---- checked arithmetic */

int loom_mul_size(size_t a, size_t b, size_t *out) {
    size_t r;
    if (__builtin_mul_overflow(a, b, &r))
        return -1;
    *out = r;
    return 0;
}

int loom_add_size(size_t a, size_t b, size_t *out) {
    size_t r;
    if (__builtin_add_overflow(a, b, &r))
        return -1;
    *out = r;
    return 0;
}

int loom_mul_i64(int64_t a, int64_t b, int64_t *out) {
    int64_t r;
    if (__builtin_mul_overflow(a, b, &r))
        return -1;
    *out = r;
    return 0;
}
