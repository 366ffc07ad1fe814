/* Minimal test harness for Loom's C tests: each CHECK counts one pass or one
 * failure, failures print their file, line and message, and the program ends
 * with the "N passed, N failed" line that tests/run_all.sh adds up. */
#ifndef LOOM_CHECK_H
#define LOOM_CHECK_H

#include <math.h>
#include <stdio.h>
#include <string.h>

static int check_passed_count, check_failed_count;

#define CHECK(cond, ...)                                                      \
    do {                                                                      \
        if (cond) {                                                           \
            check_passed_count++;                                             \
        } else {                                                              \
            check_failed_count++;                                             \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);   \
            fprintf(stderr, __VA_ARGS__);                                     \
            fputc('\n', stderr);                                              \
        }                                                                     \
    } while (0)

/* Check that `call` failed and that the error message contains `needle`. */
#define CHECK_ERROR(call, needle)                                             \
    do {                                                                      \
        int check_rc_ = (call);                                               \
        const char *check_msg_ = loom_last_error();                           \
        CHECK(check_rc_ != 0 && strstr(check_msg_, (needle)) != NULL,         \
              "expected an error containing \"%s\", got rc=%d \"%s\"",        \
              (needle), check_rc_, check_msg_);                               \
    } while (0)

/* Check that `call` returned LOOM_OK, printing the error otherwise. */
#define CHECK_OK(call)                                                        \
    do {                                                                      \
        int check_rc_ = (call);                                               \
        CHECK(check_rc_ == 0, "%s failed: %s", #call, loom_last_error());     \
    } while (0)

/* Print the summary line and return the process exit status. */
static inline int check_summary(void) {
    printf("%d passed, %d failed\n", check_passed_count, check_failed_count);
    return check_failed_count == 0 ? 0 : 1;
}

#endif
