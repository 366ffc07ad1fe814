/* Benchmark of the linear operator against bounds measured in the same run:
 * the sgemm rate of OpenBLAS on a large square product, and the streaming-read
 * bandwidth of this machine. Every figure is the best of several short
 * repetitions, so that other processes on a shared machine disturb it less.
 * Usage: bench_ops [seconds-per-measurement] (default 1). */
#include <cblas.h>
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ops.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void print_machine(void) {
    char line[512], model[256] = "unknown";
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (f) {
        while (fgets(line, sizeof line, f)) {
            char *colon = strchr(line, ':');
            if (strncmp(line, "model name", 10) == 0 && colon) {
                snprintf(model, sizeof model, "%s", colon + 2);
                model[strcspn(model, "\n")] = 0;
                break;
            }
        }
        fclose(f);
    }
    printf("cpu: %s\n", model);
    printf("cores (OpenMP threads): %d\n", omp_get_max_threads());
    printf("avx512bf16: %s\n", __builtin_cpu_supports("avx512bf16") ? "yes" : "no");
}

/* Best GFLOPS of a square n x n x n sgemm over `seconds`. */
static double sgemm_rate(int n, double seconds) {
    float *a = malloc(sizeof(float) * (size_t)n * n), *b = malloc(sizeof(float) * (size_t)n * n);
    float *c = malloc(sizeof(float) * (size_t)n * n);
    for (size_t i = 0; i < (size_t)n * n; i++) {
        a[i] = (float)(i % 13) * 0.01f;
        b[i] = (float)(i % 7) * 0.02f;
    }
    double best = 0, start = now();
    do {
        double t = now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
        t = now() - t;
        double rate = 2.0 * n * n * n / t * 1e-9;
        if (rate > best) best = rate;
    } while (now() - start < seconds);
    free(a);
    free(b);
    free(c);
    return best;
}

/* GFLOPS of vdpbf16ps alone on two threads, from registers (24 independent
 * accumulators, 64 flops per instruction): the ceiling of LOOM_PATH_BF16. */
__attribute__((target("avx512f,avx512bf16"))) static double dpbf16_peak(double seconds) {
    const long iters = 4000000;
    double best = 0, start = now();
    do {
        double t = now();
        float sink = 0;
#pragma omp parallel num_threads(2) reduction(+ : sink)
        {
            __m512 acc[24];
            for (int i = 0; i < 24; i++) acc[i] = _mm512_setzero_ps();
            __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80);
            __m512bh b = (__m512bh)_mm512_set1_epi32(0x3c003c00);
            for (long it = 0; it < iters; it++) {
#pragma GCC unroll 24
                for (int i = 0; i < 24; i++) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
                __asm__ volatile("" : "+v"(a)); /* keep the loop from being folded */
            }
            for (int i = 0; i < 24; i++) sink += _mm512_reduce_add_ps(acc[i]);
        }
        t = now() - t;
        double rate = 2.0 * iters * 24 * 64 / t * 1e-9;
        if (rate > best) best = rate;
        if (sink == 1.5f) printf(" ");
    } while (now() - start < seconds);
    return best;
}

static loom_tensor random_tensor(loom_dtype dtype, int ndim, const int64_t *shape, uint64_t seed) {
    loom_tensor f = LOOM_TENSOR_EMPTY, t = LOOM_TENSOR_EMPTY;
    if (loom_tensor_init(&f, LOOM_F32, ndim, shape) || loom_tensor_randn(&f, seed, 0.0, 0.05)) {
        fprintf(stderr, "bench: %s\n", loom_last_error());
        exit(1);
    }
    if (dtype == LOOM_F32) return f;
    if (loom_tensor_to(&t, &f, dtype)) {
        fprintf(stderr, "bench: %s\n", loom_last_error());
        exit(1);
    }
    loom_tensor_free(&f);
    return t;
}

/* Best GFLOPS of y = x @ w^T with the given path, into a preallocated y. */
static double linear_rate(const loom_tensor *x, const loom_tensor *w, loom_linear_path path,
                          double seconds) {
    loom_set_linear_path(path);
    loom_tensor y = LOOM_TENSOR_EMPTY;
    if (loom_linear(&y, x, w, NULL)) {
        fprintf(stderr, "bench: %s\n", loom_last_error());
        exit(1);
    }
    double flops = 2.0 * (double)x->shape[0] * (double)x->shape[1] * (double)w->shape[0];
    double best = 0, start = now();
    do {
        double t = now();
        loom_linear(&y, x, w, NULL);
        t = now() - t;
        if (flops / t * 1e-9 > best) best = flops / t * 1e-9;
    } while (now() - start < seconds);
    loom_tensor_free(&y);
    loom_set_linear_path(LOOM_PATH_F32);
    return best;
}

/* GB/s of a two-thread AVX-512 read-sum over `bytes` (a multiple of 1024).
 * Each thread reads its half as 8 interleaved sequential streams with a
 * software prefetch 1 KiB ahead. On the 2-core Xeon this was written on,
 * that read about 15% faster than one stream per thread, which makes it the
 * stronger bound to compare against. */
__attribute__((target("avx512f"))) static double stream_read(const float *buf, size_t bytes,
                                                             float *sink) {
    size_t n = bytes / sizeof(float);
    double t = now();
    float total = 0;
#pragma omp parallel num_threads(2) reduction(+ : total)
    {
        int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        size_t len = n / nth / 8 / 16 * 16; /* floats per stream */
        const float *base = buf + (size_t)tid * (n / nth);
        __m512 s[8];
        for (int j = 0; j < 8; j++) s[j] = _mm512_setzero_ps();
        for (size_t i = 0; i < len; i += 16) {
            for (int j = 0; j < 8; j++) {
                const float *p = base + j * len + i;
                _mm_prefetch((const char *)(p + 256), _MM_HINT_T0);
                s[j] = _mm512_add_ps(s[j], _mm512_load_ps(p));
            }
        }
        for (int j = 1; j < 8; j++) s[0] = _mm512_add_ps(s[0], s[j]);
        total += _mm512_reduce_add_ps(s[0]);
    }
    t = now() - t;
    *sink += total;
    return (double)bytes / t * 1e-9;
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 1.0;
    if (seconds <= 0) seconds = 1.0;
    print_machine();

    /* (1) the sgemm bound */
    double sg = sgemm_rate(4096, seconds * 2);
    printf("\n(1) cblas_sgemm 4096x4096x4096: %.1f GFLOPS\n", sg);

    /* (2) CLIP ViT-L sizes: 577 tokens, 1024 -> 4096 */
    int64_t xs[2] = {577, 1024}, ws[2] = {4096, 1024};
    loom_tensor x = random_tensor(LOOM_F32, 2, xs, 1);
    loom_tensor w32 = random_tensor(LOOM_F32, 2, ws, 2);
    loom_tensor w16 = random_tensor(LOOM_BF16, 2, ws, 2);
    double r32 = linear_rate(&x, &w32, LOOM_PATH_F32, seconds);
    double rf = linear_rate(&x, &w16, LOOM_PATH_F32, seconds);
    double rb = linear_rate(&x, &w16, LOOM_PATH_BF16, seconds);
    printf("\n(2) linear x (577, 1024) @ w (4096, 1024)^T\n");
    printf("  f32 weight (sgemm)            %7.1f GFLOPS  %.2f of sgemm\n", r32, r32 / sg);
    printf("  bf16 weight, LOOM_PATH_F32    %7.1f GFLOPS  %.2f of sgemm\n", rf, rf / sg);
    if (__builtin_cpu_supports("avx512bf16")) {
        double peak = dpbf16_peak(seconds * 0.5);
        printf("  bf16 weight, LOOM_PATH_BF16   %7.1f GFLOPS  %.2f of sgemm, %.2f of the "
               "vdpbf16ps peak (%.1f GFLOPS)\n",
               rb, rb / sg, rb / peak, peak);
    } else {
        printf("  bf16 weight, LOOM_PATH_BF16   %7.1f GFLOPS  %.2f of sgemm (no AVX512-BF16: f32 "
               "route)\n",
               rb, rb / sg);
    }
    loom_tensor_free(&x);
    loom_tensor_free(&w32);
    loom_tensor_free(&w16);

    /* (3) decoding: one row against 4096x4096 bf16 weights. A set of 16
     * weights (512 MiB) is cycled so that each call reads its weight from
     * memory rather than from a cache, as in a model with many layers. */
    enum { NW = 16 };
    int64_t ds[2] = {4096, 4096}, xs1[2] = {1, 4096};
    loom_tensor wd[NW];
    for (int i = 0; i < NW; i++) wd[i] = random_tensor(LOOM_BF16, 2, ds, 100 + (uint64_t)i);
    loom_tensor x1 = random_tensor(LOOM_F32, 2, xs1, 3), y1 = LOOM_TENSOR_EMPTY;
    loom_linear(&y1, &x1, &wd[0], NULL);

    size_t stream_bytes = (size_t)1 << 30;
    float *buf = aligned_alloc(64, stream_bytes);
    for (size_t i = 0; i < stream_bytes / sizeof(float); i++) buf[i] = 1.0f;
    float sink = 0;
    double wbytes = 4096.0 * 4096.0 * 2.0;

    printf("\n(3) linear x (1, 4096) @ w (4096, 4096 bf16)^T, weight traffic vs streaming read\n");
    for (int rep = 0; rep < 5; rep++) {
        /* best of three reads of 1 GiB, then best pass over the 16 weights
         * within half the measurement time */
        double bw = 0, lin = 0;
        for (int i = 0; i < 3; i++) {
            double r = stream_read(buf, stream_bytes, &sink);
            if (r > bw) bw = r;
        }
        double start = now();
        do {
            double t = now();
            for (int i = 0; i < NW; i++) loom_linear(&y1, &x1, &wd[i], NULL);
            t = now() - t;
            if (wbytes * NW / t * 1e-9 > lin) lin = wbytes * NW / t * 1e-9;
        } while (now() - start < seconds * 0.5);
        printf("  pair %d: stream read %5.1f GB/s, linear %5.1f GB/s, ratio %.2f\n", rep + 1, bw, lin,
               lin / bw);
    }
    /* The same weight every call, which may stay in the last-level cache. */
    double hot = 0, start = now();
    do {
        double t = now();
        for (int i = 0; i < NW; i++) loom_linear(&y1, &x1, &wd[0], NULL);
        t = now() - t;
        if (wbytes * NW / t * 1e-9 > hot) hot = wbytes * NW / t * 1e-9;
    } while (now() - start < seconds * 0.5);
    printf("  one weight repeated (cache-resident when it fits): %.1f GB/s\n", hot);

    if (sink == 1234.5f) printf(" ");
    free(buf);
    for (int i = 0; i < NW; i++) loom_tensor_free(&wd[i]);
    loom_tensor_free(&x1);
    loom_tensor_free(&y1);
    return 0;
}
