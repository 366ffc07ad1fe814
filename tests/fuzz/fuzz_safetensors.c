/* libFuzzer target for the safetensors reader. Each input is parsed as a
 * safetensors image from memory. Every tensor that loads is read byte by byte,
 * so AddressSanitizer detects any view outside the image. The checkpoint is
 * then written back with loom_safetensors_write and reread, and the two must
 * agree.
 *
 * Build and run for a fixed time (from the repository root, needs clang):
 *   make -f tests/fuzz/fuzz.mk run FUZZ_SECONDS=60
 * which compiles this file with core/safetensors.c, core/tensor.c and
 * core/base.c under -fsanitize=fuzzer,address,undefined into
 * build-fuzz/fuzz_safetensors, then runs it on tests/fuzz/seeds_safetensors
 * with the dictionary tests/fuzz/safetensors.dict. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "safetensors.h"

static char rewrite_path[256];

static void quiet_log(loom_log_level level, const char *message, void *user_data) {
    (void)level;
    (void)message;
    (void)user_data;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    /* tmpfs keeps the writer's fsync cheap. */
    const char *dir = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    snprintf(rewrite_path, sizeof rewrite_path, "%s/loom_fuzz_safetensors_%ld.safetensors", dir, (long)getpid());
    loom_log_set(quiet_log, NULL);
    return 0;
}

/* Sum every byte of the tensor's extent, touching each one. */
static unsigned touch(const loom_tensor *t) {
    const volatile unsigned char *p = loom_tensor_data(t);
    size_t n = loom_tensor_nbytes(t);
    unsigned sum = 0;
    for (size_t i = 0; i < n; i++)
        sum += p[i];
    return sum;
}

/* Write the checkpoint's tensors to a file, reopen it and require the same
 * names, dtypes, shapes and bytes. */
static void check_rewrite(const loom_checkpoint *ck) {
    int n = loom_checkpoint_count(ck);
    const char **names = malloc(sizeof *names * (size_t)(n ? n : 1));
    const loom_tensor **tensors = malloc(sizeof *tensors * (size_t)(n ? n : 1));
    int m = loom_checkpoint_metadata_count(ck);
    const char **keys = malloc(sizeof *keys * (size_t)(m ? m : 1));
    const char **values = malloc(sizeof *values * (size_t)(m ? m : 1));
    loom_checkpoint *again = NULL;

    for (int i = 0; i < n; i++) {
        names[i] = loom_checkpoint_name(ck, i);
        tensors[i] = loom_checkpoint_tensor(ck, i);
    }
    for (int i = 0; i < m; i++) {
        keys[i] = loom_checkpoint_metadata_key(ck, i);
        values[i] = loom_checkpoint_metadata_value(ck, i);
    }
    /* Whatever the reader accepts, the writer must accept too: names and
     * metadata are valid UTF-8 (cJSON decodes escapes to valid UTF-8) and
     * unique. A full /dev/shm would also stop here. */
    if (loom_safetensors_write(rewrite_path, n, names, tensors, m, keys, values) != LOOM_OK)
        __builtin_trap();
    if (loom_checkpoint_open(&again, rewrite_path) != LOOM_OK)
        __builtin_trap();
    if (loom_checkpoint_count(again) != n || loom_checkpoint_metadata_count(again) != m)
        __builtin_trap();
    for (int i = 0; i < n; i++) {
        const loom_tensor *a = tensors[i], *b = loom_checkpoint_tensor(again, i);
        if (strcmp(names[i], loom_checkpoint_name(again, i)) != 0 || a->dtype != b->dtype ||
            a->ndim != b->ndim || memcmp(a->shape, b->shape, sizeof a->shape[0] * (size_t)a->ndim) != 0 ||
            loom_tensor_nbytes(a) != loom_tensor_nbytes(b) ||
            memcmp(loom_tensor_data(a), loom_tensor_data(b), loom_tensor_nbytes(a)) != 0)
            __builtin_trap();
    }
    for (int i = 0; i < m; i++)
        if (strcmp(values[i], loom_checkpoint_metadata_get(again, keys[i])) != 0)
            __builtin_trap();
    loom_checkpoint_close(again);
    unlink(rewrite_path);
    free(names);
    free(tensors);
    free(keys);
    free(values);
}

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size) {
    loom_checkpoint *ck = NULL;
    loom_tensor kept = LOOM_TENSOR_EMPTY;
    unsigned sum = 0;

    if (loom_checkpoint_open_memory(&ck, data, size, "fuzz") != LOOM_OK) {
        if (ck != NULL || loom_last_error()[0] == '\0')
            __builtin_trap();
        return 0;
    }
    for (int i = 0; i < loom_checkpoint_count(ck); i++) {
        const loom_tensor *t = loom_checkpoint_tensor(ck, i);
        if (loom_checkpoint_find(ck, loom_checkpoint_name(ck, i)) != i)
            __builtin_trap();
        if (!loom_tensor_in_bounds(t) && loom_tensor_numel(t) > 0)
            __builtin_trap();
        sum += touch(t);
    }
    for (int i = 0; i < loom_checkpoint_metadata_count(ck); i++)
        sum += (unsigned)strlen(loom_checkpoint_metadata_value(ck, i));
    check_rewrite(ck);

    /* A view taken before close must stay readable after it. */
    if (loom_checkpoint_count(ck) > 0 && loom_tensor_view_of(&kept, loom_checkpoint_tensor(ck, 0)) != LOOM_OK)
        __builtin_trap();
    loom_checkpoint_close(ck);
    if (kept.storage)
        sum += touch(&kept);
    loom_tensor_free(&kept);
    return (int)(sum & 0);
}
