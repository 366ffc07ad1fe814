/* libFuzzer target for the restricted unpickler. Each input runs through
 * loom_pickle_load as a bare pickle. It then runs as the data.pkl of an
 * in-memory checkpoint with storages "0" to "3" (0, 8, 64 and 4096 bytes), so
 * the flattening and tensor bounds checks of core/pytorch.c run too. Every
 * tensor that loads is read at up to 4096 positions and at its last element,
 * so AddressSanitizer reports any view outside its storage.
 *
 * Build and run for a fixed time (from the repository root, needs clang):
 *   mkdir -p build-fuzz && clang -g -O1 -std=c11 -D_GNU_SOURCE \
 *       -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
 *       -Icore -Itests/c tests/fuzz/fuzz_pickle.c core/pickle.c core/pytorch.c \
 *       core/zip.c core/tensor.c core/base.c -lm -o build-fuzz/fuzz_pickle
 *   mkdir -p build-fuzz/corpus_pickle
 *   build-fuzz/fuzz_pickle -max_total_time=60 -dict=tests/fuzz/pickle.dict \
 *       -artifact_prefix=build-fuzz/ \
 *       build-fuzz/corpus_pickle tests/fuzz/seeds_pickle
 * The seeds are data.pkl entries of the checkpoints in tests/data/pytorch. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pickle.h"
#include "pytorch.h"
#include "zip_build.h"

static void quiet_log(loom_log_level level, const char *message, void *user_data) {
    (void)level;
    (void)message;
    (void)user_data;
}

static uint8_t storage_bytes[4096];

static void read_tensor(const loom_tensor *t) {
    volatile double sink = 0;
    int64_t numel = loom_tensor_numel(t);
    for (int64_t i = 0; i < numel && i < 4096; i++)
        sink += loom_tensor_get_flat(t, i);
    if (numel > 0)
        sink += loom_tensor_get_flat(t, numel - 1);
    (void)sink;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static int initialized;
    if (!initialized) {
        loom_log_set(quiet_log, NULL);
        for (size_t i = 0; i < sizeof storage_bytes; i++)
            storage_bytes[i] = (uint8_t)(i * 37);
        initialized = 1;
    }

    loom_pickle *p;
    if (loom_pickle_load(&p, data, size, "fuzz.pkl") == 0)
        loom_pickle_free(p);

    zip_build_entry entries[] = {
        {"archive/data.pkl", data, size},
        {"archive/byteorder", "little", 6},
        {"archive/data/0", storage_bytes, 0},
        {"archive/data/1", storage_bytes, 8},
        {"archive/data/2", storage_bytes, 64},
        {"archive/data/3", storage_bytes, 4096},
    };
    size_t len = 0;
    uint8_t *zip = zip_build(entries, 6, &len);
    if (!zip)
        return 0;
    loom_pytorch *ck;
    if (loom_pytorch_open_memory(&ck, zip, len, "fuzz.pt") == 0) {
        for (int i = 0; i < loom_pytorch_count(ck); i++) {
            read_tensor(loom_pytorch_tensor(ck, i));
            if (loom_pytorch_find(ck, loom_pytorch_name(ck, i)) < 0)
                abort(); /* every listed name must be found again */
        }
        for (int i = 0; i < loom_pytorch_metadata_count(ck); i++)
            if (!loom_pytorch_metadata_get(ck, loom_pytorch_metadata_key(ck, i)))
                abort();
        loom_pytorch_close(ck);
    }
    free(zip);
    return 0;
}
