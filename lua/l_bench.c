/* luaopen_loom_bench: measurement helpers for benchmark scripts, outside
 * loom.core. Scripts load it with package.loadlib("", "luaopen_loom_bench")
 * from bin/loom, or from the loom.core shared module under a stock lua5.4.
 *   now()               monotonic wall-clock time in seconds
 *   read_sum(tensors)   streaming read of every byte of a list of contiguous
 *                       tensors on all OpenMP threads: checksum, bytes, seconds
 *   peak_gflops(kind)   the arithmetic peak of one instruction on all OpenMP
 *                       threads: "fma_f32" (vfmadd231ps zmm), "dpbf16"
 *                       (vdpbf16ps zmm) or "amx_bf16" (tdpbf16ps); nil and
 *                       a message when the CPU or the kernel lacks it */
#include <cpuid.h>
#include <stdbool.h>
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

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

/* ---- instruction peaks */

static double seconds_since(const struct timespec *t0) {
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (double)(t1.tv_sec - t0->tv_sec) + (double)(t1.tv_nsec - t0->tv_nsec) * 1e-9;
}

/* Twelve independent accumulators, so that the loops measure each
 * instruction's throughput rather than its latency. */
#define REPEAT12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

/* Run `iters` rounds of 12 vfmadd231ps (zmm: 16 lanes, 2 FLOPs each) on
 * this thread. Returns a value derived from the results, to keep them live. */
__attribute__((target("avx512f"))) static float fma_rounds(long iters) {
#define FMA_DECLARE(i) __m512 a##i = _mm512_set1_ps((float)(i));
    REPEAT12(FMA_DECLARE)
    __m512 x = _mm512_set1_ps(0.999f), y = _mm512_set1_ps(0.001f);
    for (long k = 0; k < iters; k++) {
#define FMA_STEP(i) a##i = _mm512_fmadd_ps(a##i, x, y);
        REPEAT12(FMA_STEP)
    }
    __m512 sum = _mm512_setzero_ps();
#define FMA_SUM(i) sum = _mm512_add_ps(sum, a##i);
    REPEAT12(FMA_SUM)
    return _mm512_reduce_add_ps(sum);
}

/* The same with vdpbf16ps (zmm: 16 lanes, 2 products and 2 adds each). */
__attribute__((target("avx512f,avx512bf16"))) static float dpbf16_rounds(long iters) {
#define DP_DECLARE(i) __m512 a##i = _mm512_set1_ps((float)(i));
    REPEAT12(DP_DECLARE)
    __m512bh x = (__m512bh)_mm512_set1_epi16(0x3f80); /* bf16 1.0 */
    __m512bh y = (__m512bh)_mm512_set1_epi16(0x3a83); /* bf16 0.001 */
    for (long k = 0; k < iters; k++) {
#define DP_STEP(i) a##i = _mm512_dpbf16_ps(a##i, x, y);
        REPEAT12(DP_STEP)
    }
    __m512 sum = _mm512_setzero_ps();
#define DP_SUM(i) sum = _mm512_add_ps(sum, a##i);
    REPEAT12(DP_SUM)
    return _mm512_reduce_add_ps(sum);
}

/* The tile configuration of palette 1: eight 16-row tiles of 64 bytes. */
typedef struct amx_config {
    uint8_t palette, start_row;
    uint8_t reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} __attribute__((packed)) amx_config;

/* Run `iters` rounds of four independent tdpbf16ps (16 x 16 outputs over 32
 * bf16 products each) on this thread. Returns 0, or -1 when the kernel does
 * not grant the tile state. */
__attribute__((target("amx-tile,amx-bf16"))) static int amx_rounds(long iters, float *out) {
    /* Linux enables the tile data state only on request: arch_prctl
     * ARCH_REQ_XCOMP_PERM (0x1023, <asm/prctl.h>) for XFEATURE_XTILEDATA (18) */
    if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) return -1;

    amx_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 8; i++) {
        cfg.rows[i] = 16;
        cfg.bytes_per_row[i] = 64;
    }
    _tile_loadconfig(&cfg);

    /* tiles 4..7 hold the operands, 0..3 the sums */
    uint16_t a[16 * 32] __attribute__((aligned(64)));
    float c[16 * 16] __attribute__((aligned(64)));
    for (int i = 0; i < 16 * 32; i++) a[i] = 0x3a83; /* bf16 0.001 */
    _tile_loadd(4, a, 64);
    _tile_loadd(5, a, 64);
    _tile_loadd(6, a, 64);
    _tile_loadd(7, a, 64);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);

    for (long k = 0; k < iters; k++) {
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }

    _tile_stored(0, c, 64);
    _tile_release();
    *out = c[0];
    return 0;
}

/* CPUID leaf 7: AVX512-BF16 (subleaf 1, EAX bit 5), AMX-BF16 and AMX-TILE
 * (subleaf 0, EDX bits 22 and 24). */
static bool cpu_has(const char *kind) {
    unsigned a, b, c, d;
    if (strcmp(kind, "fma_f32") == 0) return __builtin_cpu_supports("avx512f");
    if (strcmp(kind, "dpbf16") == 0)
        return __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a >> 5 & 1) && __builtin_cpu_supports("avx512f");
    return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 22 & 1) && (d >> 24 & 1);
}

/* peak_gflops(kind, seconds?) -> GFLOP/s of all OpenMP threads running
 * the instruction back to back for about `seconds` (default 0.5), or nil
 * and a message. */
static int l_bench_peak_gflops(lua_State *L) {
    static const char *const kinds[] = {"fma_f32", "dpbf16", "amx_bf16", NULL};
    int kind = luaL_checkoption(L, 1, NULL, kinds);
    double seconds = luaL_optnumber(L, 2, 0.5);
    luaL_argcheck(L, seconds > 0 && seconds <= 60, 2, "expected 0 < seconds <= 60");
    if (!cpu_has(kinds[kind])) {
        lua_pushnil(L);
        lua_pushfstring(L, "this CPU has no %s instruction", kinds[kind]);
        return 2;
    }
    /* FLOPs of one round on one thread */
    static const double round_flops[] = {12 * 16 * 2, 12 * 16 * 4, 4 * 16 * 16 * 32 * 2};
    long iters = kind == 2 ? 1000 : 100000;
    double rate = 0;
    int failed = 0;
    float sink = 0;
    for (;;) {
        struct timespec t0;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        int nth = 1;
#pragma omp parallel reduction(+ : sink, failed)
        {
#pragma omp single
            nth = omp_get_num_threads();
            float v = 0;
            if (kind == 0) v = fma_rounds(iters);
            else if (kind == 1) v = dpbf16_rounds(iters);
            else if (amx_rounds(iters, &v) != 0) failed++;
            sink += v;
        }
        double t = seconds_since(&t0);
        if (failed) {
            lua_pushnil(L);
            lua_pushliteral(L, "the kernel did not grant the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM failed)");
            return 2;
        }
        if (t >= seconds) {
            rate = round_flops[kind] * (double)iters * nth / t * 1e-9;
            break;
        }
        iters = t > 0.01 ? (long)((double)iters * seconds / t) + 1 : iters * 10;
    }
    lua_pushnumber(L, rate + (sink == 1234.5f ? 1e-9 : 0)); /* keeps the results live */
    return 1;
}

static const luaL_Reg bench_funcs[] = {
    {"now", l_bench_now},
    {"read_sum", l_bench_read_sum},
    {"peak_gflops", l_bench_peak_gflops},
    {NULL, NULL},
};

int luaopen_loom_bench(lua_State *L) {
    luaL_newlib(L, bench_funcs);
    return 1;
}
