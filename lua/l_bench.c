/* luaopen_loom_bench: measurement helpers for benchmark scripts, outside
 * loom.core. Scripts load it with package.loadlib("", "luaopen_loom_bench")
 * from bin/loom, or from the loom.core shared module under a stock lua5.4.
 *   now()               monotonic wall-clock time in seconds
 *   read_sum(tensors)   streaming read of every byte of a list of contiguous
 *                       tensors on all OpenMP threads: checksum, bytes, seconds */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "loom_lua.h"

int luaopen_loom_bench(lua_State *L);

/* Largest number of tensors one read_sum call takes. */
#define READ_SUM_MAX_TENSORS 4096

static int l_bench_now(lua_State *L) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    lua_pushnumber(L, (lua_Number)t.tv_sec + (lua_Number)t.tv_nsec * 1e-9);
    return 1;
}

typedef struct read_span {
    const uint8_t *data;
    size_t nbytes;
} read_span;

/* Sum of the 64-bit words of [p, p + n) plus its tail bytes. Four
 * independent accumulators keep the adds off the critical path, so the loop
 * is limited by memory. */
__attribute__((target("avx512f"))) static uint64_t sum_bytes_avx512(const uint8_t *p, size_t n) {
    __m512i acc0 = _mm512_setzero_si512(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    size_t i = 0;
    for (; i + 256 <= n; i += 256) {
        acc0 = _mm512_add_epi64(acc0, _mm512_loadu_si512((const void *)(p + i)));
        acc1 = _mm512_add_epi64(acc1, _mm512_loadu_si512((const void *)(p + i + 64)));
        acc2 = _mm512_add_epi64(acc2, _mm512_loadu_si512((const void *)(p + i + 128)));
        acc3 = _mm512_add_epi64(acc3, _mm512_loadu_si512((const void *)(p + i + 192)));
    }
    acc0 = _mm512_add_epi64(_mm512_add_epi64(acc0, acc1), _mm512_add_epi64(acc2, acc3));
    uint64_t sum = (uint64_t)_mm512_reduce_add_epi64(acc0);
    for (; i < n; i++) sum += p[i];
    return sum;
}

static uint64_t sum_bytes_plain(const uint8_t *p, size_t n) {
    uint64_t sum = 0;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, sizeof w);
        sum += w;
    }
    for (; i < n; i++) sum += p[i];
    return sum;
}

static uint64_t sum_bytes(const uint8_t *p, size_t n) {
    return __builtin_cpu_supports("avx512f") ? sum_bytes_avx512(p, n) : sum_bytes_plain(p, n);
}

/* Sum the bytes from global offset `begin` to `end` of the concatenated spans. */
static uint64_t sum_range(const read_span *spans, int count, size_t begin, size_t end) {
    uint64_t sum = 0;
    size_t base = 0;
    for (int i = 0; i < count && base < end; i++) {
        size_t lo = begin > base ? begin - base : 0;
        size_t hi = end - base < spans[i].nbytes ? end - base : spans[i].nbytes;
        if (lo < hi) sum += sum_bytes(spans[i].data + lo, hi - lo);
        base += spans[i].nbytes;
    }
    return sum;
}

/* read_sum(tensors) -> checksum, bytes, seconds. Every thread reads an equal
 * share of the concatenated bytes, split at multiples of 64 bytes. */
static int l_bench_read_sum(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    int count = (int)luaL_len(L, 1);
    luaL_argcheck(L, count >= 1 && count <= READ_SUM_MAX_TENSORS, 1,
                  lua_pushfstring(L, "expected 1 to %d tensors, got %d", READ_SUM_MAX_TENSORS, count));
    read_span *spans = lua_newuserdatauv(L, sizeof(read_span) * (size_t)count, 0);
    size_t total = 0;
    for (int i = 0; i < count; i++) {
        lua_geti(L, 1, i + 1);
        loom_tensor *t = loom_checktensor(L, -1);
        if (!loom_tensor_is_contiguous(t))
            luaL_error(L, "bad argument #1 to 'read_sum' (tensor %d %s is not contiguous)", i + 1,
                       loom_shape_str(t).s);
        spans[i].data = loom_tensor_data(t);
        spans[i].nbytes = loom_tensor_nbytes(t);
        total += spans[i].nbytes;
        lua_pop(L, 1);
    }

    uint64_t checksum = 0;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
#pragma omp parallel reduction(+ : checksum)
    {
        int t = omp_get_thread_num(), nth = omp_get_num_threads();
        size_t pieces = (total + 63) / 64;
        size_t begin = pieces * (size_t)t / (size_t)nth * 64;
        size_t end = pieces * (size_t)(t + 1) / (size_t)nth * 64;
        if (end > total) end = total;
        if (begin < end) checksum += sum_range(spans, count, begin, end);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);

    lua_pushinteger(L, (lua_Integer)checksum);
    lua_pushinteger(L, (lua_Integer)total);
    lua_pushnumber(L, (lua_Number)(t1.tv_sec - t0.tv_sec) + (lua_Number)(t1.tv_nsec - t0.tv_nsec) * 1e-9);
    return 3;
}

static const luaL_Reg bench_funcs[] = {
    {"now", l_bench_now},
    {"read_sum", l_bench_read_sum},
    {NULL, NULL},
};

int luaopen_loom_bench(lua_State *L) {
    luaL_newlib(L, bench_funcs);
    return 1;
}
