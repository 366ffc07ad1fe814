/* Benchmark of the linear operator against bounds measured in the same run:
 * the sgemm rate of OpenBLAS on a large square product, and the streaming-read
 * bandwidth of this machine. Rates are the best of several repetitions.
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

/* GB/s of a two-thread AVX-512 read-sum over `bytes` (a multiple of 256). */
__attribute__((target("avx512f"))) static double stream_read(const float *buf, size_t bytes,
                                                             float *sink) {
    size_t n = bytes / sizeof(float);
    double t = now();
    float total = 0;
#pragma omp parallel num_threads(2) reduction(+ : total)
    {
        int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        size_t lo = n / 64 * tid / nth * 64, hi = n / 64 * (tid + 1) / nth * 64;
        __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        for (size_t i = lo; i < hi; i += 64) {
            s0 = _mm512_add_ps(s0, _mm512_load_ps(buf + i));
            s1 = _mm512_add_ps(s1, _mm512_load_ps(buf + i + 16));
            s2 = _mm512_add_ps(s2, _mm512_load_ps(buf + i + 32));
            s3 = _mm512_add_ps(s3, _mm512_load_ps(buf + i + 48));
        }
        total += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
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
    printf("  bf16 weight, LOOM_PATH_BF16   %7.1f GFLOPS  %.2f of sgemm\n", rb, rb / sg);
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
        double bw = stream_read(buf, stream_bytes, &sink);
        int calls = 0;
        double t = now();
        do {
            loom_linear(&y1, &x1, &wd[calls % NW], NULL);
            calls++;
        } while (now() - t < seconds * 0.5 || calls < NW);
        t = now() - t;
        double lin = wbytes * calls / t * 1e-9;
        printf("  pair %d: stream read %5.1f GB/s, linear %5.1f GB/s, ratio %.2f\n", rep + 1, bw, lin,
               lin / bw);
    }
    /* The same weight every call, which may stay in the last-level cache. */
    double t = now();
    int calls = 0;
    do {
        loom_linear(&y1, &x1, &wd[0], NULL);
        calls++;
    } while (now() - t < seconds * 0.5);
    t = now() - t;
    printf("  one weight repeated (cache-resident when it fits): %.1f GB/s\n", wbytes * calls / t * 1e-9);

    if (sink == 1234.5f) printf(" ");
    free(buf);
    for (int i = 0; i < NW; i++) loom_tensor_free(&wd[i]);
    loom_tensor_free(&x1);
    loom_tensor_free(&y1);
    return 0;
}
