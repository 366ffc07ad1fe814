/* Benchmark of the linear operator against bounds measured in the same run:
 * the sgemm rate of OpenBLAS on a large square product, the peak of the
 * bf16 dot-product instructions, and the streaming-read bandwidth of this
 * machine. Then one CLIP ViT-L/14-336 encoder layer, step by step. Every
 * figure is the best of several short repetitions, so that other processes
 * on a shared machine disturb it less, and the load average read at the
 * time is printed beside it. Usage: bench_ops [seconds-per-measurement]
 * [sections] (default 1 and "1234"; see main). */
#include <cblas.h>
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ops.h"
#include "ops_linear_internal.h" /* pinning the LOOM_PATH_BF16 kernel, loom_amx_bf16_usable */

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
    printf("amx-bf16 usable: %s\n", loom_amx_bf16_usable() ? "yes" : "no");
}

/* The 1-minute load average, for printing beside a figure: above the core
 * count, other processes were competing for the cores. */
static double load_average(void) {
    double load = -1;
    FILE *f = fopen("/proc/loadavg", "r");
    if (f) {
        if (fscanf(f, "%lf", &load) != 1) load = -1;
        fclose(f);
    }
    return load;
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
    const long iters = 200000; /* about 5 ms, so that some repetitions miss other load */
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

/* GFLOPS of TDPBF16PS alone on two threads, from tiles (four independent
 * accumulators, 16 x 16 x 32 x 2 flops per instruction): the ceiling of the
 * AMX kernel. Returns 0 when AMX is not usable. */
typedef struct bench_tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} bench_tile_config;

__attribute__((target("amx-tile,amx-bf16"))) static double amx_peak(double seconds) {
    if (!loom_amx_bf16_usable()) return 0;
    const long iters = 100000; /* about 3 ms */
    double best = 0, start = now();
    do {
        double t = now();
#pragma omp parallel num_threads(2)
        {
            bench_tile_config cfg;
            memset(&cfg, 0, sizeof cfg);
            cfg.palette = 1;
            for (int i = 0; i < 8; i++) {
                cfg.colsb[i] = 64;
                cfg.rows[i] = 16;
            }
            _tile_loadconfig(&cfg);
            /* Zero tiles: their values do not matter to the timing. */
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            _tile_zero(4);
            _tile_zero(5);
            _tile_zero(6);
            _tile_zero(7);
            for (long it = 0; it < iters; it++) {
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
            float sink[256];
            _tile_stored(0, sink, 64);
            if (sink[0] == 1.5f) printf(" ");
            _tile_release();
        }
        t = now() - t;
        double rate = 2.0 * iters * 4 * 16 * 16 * 32 / t * 1e-9;
        if (rate > best) best = rate;
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

/* ---- (4) one CLIP ViT-L/14-336 encoder layer, as lua/loom/models/clip_vision.lua runs it */

enum { CLIP_TOKENS = 577, CLIP_WIDTH = 1024, CLIP_HEADS = 16, CLIP_MLP = 4096, CLIP_LAYERS = 24 };

typedef struct clip_layer {
    loom_tensor ln1_w, ln1_b, ln2_w, ln2_b;
    loom_tensor q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b, fc1_w, fc1_b, fc2_w, fc2_b;
} clip_layer;

/* Random weights: linear weights and biases in `dtype`, layer norms in f32. */
static void clip_layer_init(clip_layer *l, loom_dtype dtype) {
    int64_t d = CLIP_WIDTH, f = CLIP_MLP;
    int64_t dd[2] = {d, d}, fd[2] = {f, d}, df[2] = {d, f};
    l->ln1_w = random_tensor(LOOM_F32, 1, &d, 10);
    l->ln1_b = random_tensor(LOOM_F32, 1, &d, 11);
    l->ln2_w = random_tensor(LOOM_F32, 1, &d, 12);
    l->ln2_b = random_tensor(LOOM_F32, 1, &d, 13);
    l->q_w = random_tensor(dtype, 2, dd, 14);
    l->q_b = random_tensor(dtype, 1, &d, 15);
    l->k_w = random_tensor(dtype, 2, dd, 16);
    l->k_b = random_tensor(dtype, 1, &d, 17);
    l->v_w = random_tensor(dtype, 2, dd, 18);
    l->v_b = random_tensor(dtype, 1, &d, 19);
    l->o_w = random_tensor(dtype, 2, dd, 20);
    l->o_b = random_tensor(dtype, 1, &d, 21);
    l->fc1_w = random_tensor(dtype, 2, fd, 22);
    l->fc1_b = random_tensor(dtype, 1, &f, 23);
    l->fc2_w = random_tensor(dtype, 2, df, 24);
    l->fc2_b = random_tensor(dtype, 1, &d, 25);
}

static void clip_layer_free(clip_layer *l) {
    loom_tensor *all[] = {&l->ln1_w, &l->ln1_b, &l->ln2_w, &l->ln2_b, &l->q_w,  &l->q_b,
                          &l->k_w,   &l->k_b,   &l->v_w,   &l->v_b,   &l->o_w,  &l->o_b,
                          &l->fc1_w, &l->fc1_b, &l->fc2_w, &l->fc2_b};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) loom_tensor_free(all[i]);
}

enum { STEP_LN, STEP_QKV, STEP_ATTN, STEP_OUT, STEP_FC1, STEP_GELU, STEP_FC2, STEP_ADD, N_STEPS };
static const char *const step_names[N_STEPS] = {
    "layer norms (2)", "q, k, v projections", "attention + head merge", "out projection",
    "fc1 (1024 -> 4096)", "quick-GELU", "fc2 (4096 -> 1024)", "residual adds (2)"};

static void must(int rc) {
    if (rc != LOOM_OK) {
        fprintf(stderr, "bench: %s\n", loom_last_error());
        exit(1);
    }
}

/* Split (1, N, D) into heads: a (1, H, N, D/H) view. */
static void split_heads(loom_tensor *dst, const loom_tensor *src) {
    int64_t shape[4] = {1, CLIP_TOKENS, CLIP_HEADS, CLIP_WIDTH / CLIP_HEADS};
    loom_tensor v = LOOM_TENSOR_EMPTY;
    must(loom_tensor_reshape(&v, src, 4, shape));
    must(loom_tensor_transpose(dst, &v, 1, 2));
    loom_tensor_free(&v);
}

/* y = layer(x) for x (1, 577, 1024), with every intermediate newly
 * allocated as in the Lua model; each step's time is added to t[]. */
static void clip_layer_forward(loom_tensor *y, const loom_tensor *x, const clip_layer *l, double *t) {
    loom_tensor ln = LOOM_TENSOR_EMPTY, q = LOOM_TENSOR_EMPTY, k = LOOM_TENSOR_EMPTY;
    loom_tensor v = LOOM_TENSOR_EMPTY, qh = LOOM_TENSOR_EMPTY, kh = LOOM_TENSOR_EMPTY;
    loom_tensor vh = LOOM_TENSOR_EMPTY, o = LOOM_TENSOR_EMPTY, ot = LOOM_TENSOR_EMPTY;
    loom_tensor oc = LOOM_TENSOR_EMPTY, merged = LOOM_TENSOR_EMPTY, a = LOOM_TENSOR_EMPTY;
    loom_tensor h = LOOM_TENSOR_EMPTY, ln2 = LOOM_TENSOR_EMPTY, f1 = LOOM_TENSOR_EMPTY;
    loom_tensor g = LOOM_TENSOR_EMPTY, f2 = LOOM_TENSOR_EMPTY;
    int64_t flat[3] = {1, CLIP_TOKENS, CLIP_WIDTH};

    double t0 = now();
    must(loom_layer_norm(&ln, x, &l->ln1_w, &l->ln1_b, 1e-5f));
    double t1 = now();
    must(loom_linear(&q, &ln, &l->q_w, &l->q_b));
    must(loom_linear(&k, &ln, &l->k_w, &l->k_b));
    must(loom_linear(&v, &ln, &l->v_w, &l->v_b));
    double t2 = now();
    split_heads(&qh, &q);
    split_heads(&kh, &k);
    split_heads(&vh, &v);
    must(loom_attention(&o, &qh, &kh, &vh, NULL));
    must(loom_tensor_transpose(&ot, &o, 1, 2));
    must(loom_tensor_contiguous(&oc, &ot));
    must(loom_tensor_reshape(&merged, &oc, 3, flat));
    double t3 = now();
    must(loom_linear(&a, &merged, &l->o_w, &l->o_b));
    double t4 = now();
    must(loom_binary(&h, x, &a, LOOM_ADD));
    double t5 = now();
    must(loom_layer_norm(&ln2, &h, &l->ln2_w, &l->ln2_b, 1e-5f));
    double t6 = now();
    must(loom_linear(&f1, &ln2, &l->fc1_w, &l->fc1_b));
    double t7 = now();
    must(loom_unary(&g, &f1, LOOM_QUICK_GELU));
    double t8 = now();
    must(loom_linear(&f2, &g, &l->fc2_w, &l->fc2_b));
    double t9 = now();
    must(loom_binary(y, &h, &f2, LOOM_ADD));
    double t10 = now();

    t[STEP_LN] += (t1 - t0) + (t6 - t5);
    t[STEP_QKV] += t2 - t1;
    t[STEP_ATTN] += t3 - t2;
    t[STEP_OUT] += t4 - t3;
    t[STEP_FC1] += t7 - t6;
    t[STEP_GELU] += t8 - t7;
    t[STEP_FC2] += t9 - t8;
    t[STEP_ADD] += (t5 - t4) + (t10 - t9);

    loom_tensor *tmp[] = {&ln, &q, &k, &v, &qh, &kh, &vh, &o, &ot, &oc, &merged, &a, &h, &ln2,
                          &f1, &g, &f2};
    for (size_t i = 0; i < sizeof tmp / sizeof tmp[0]; i++) loom_tensor_free(tmp[i]);
}

/* Best time of the whole layer over `seconds`, and in step[] each step's
 * best time over the same runs. */
static double clip_layer_time(const loom_tensor *x, const clip_layer *l, loom_linear_path path,
                              double seconds, double *step) {
    loom_set_linear_path(path);
    for (int i = 0; i < N_STEPS; i++) step[i] = 1e30;
    double best = 1e30, start = now();
    int runs = 0;
    do {
        double t[N_STEPS] = {0};
        loom_tensor y = LOOM_TENSOR_EMPTY;
        double t0 = now();
        clip_layer_forward(&y, x, l, t);
        double total = now() - t0;
        loom_tensor_free(&y);
        if (total < best) best = total;
        for (int i = 0; i < N_STEPS; i++)
            if (t[i] < step[i]) step[i] = t[i];
        runs++;
    } while (now() - start < seconds || runs < 3);
    loom_set_linear_path(LOOM_PATH_F32);
    return best;
}

static void bench_clip_layer(double seconds) {
    int64_t xs[3] = {1, CLIP_TOKENS, CLIP_WIDTH};
    loom_tensor x = random_tensor(LOOM_F32, 3, xs, 9);
    clip_layer l32, l16;
    clip_layer_init(&l32, LOOM_F32);
    clip_layer_init(&l16, LOOM_BF16);

    const char *names[3] = {"f32 weights", "bf16, PATH_F32", "bf16, PATH_BF16"};
    double step[3][N_STEPS], total[3], load[3];
    total[0] = clip_layer_time(&x, &l32, LOOM_PATH_F32, seconds, step[0]);
    load[0] = load_average();
    total[1] = clip_layer_time(&x, &l16, LOOM_PATH_F32, seconds, step[1]);
    load[1] = load_average();
    total[2] = clip_layer_time(&x, &l16, LOOM_PATH_BF16, seconds, step[2]);
    load[2] = load_average();

    printf("\n(4) CLIP ViT-L/14-336 encoder layer: %d tokens, width %d, %d heads, MLP %d, "
           "quick-GELU (ms, best of the runs)\n",
           CLIP_TOKENS, CLIP_WIDTH, CLIP_HEADS, CLIP_MLP);
    printf("  %-24s %16s %16s %16s\n", "step", names[0], names[1], names[2]);
    for (int i = 0; i < N_STEPS; i++)
        printf("  %-24s %16.3f %16.3f %16.3f\n", step_names[i], step[0][i] * 1e3, step[1][i] * 1e3,
               step[2][i] * 1e3);
    double sum[3] = {0, 0, 0};
    for (int c = 0; c < 3; c++)
        for (int i = 0; i < N_STEPS; i++) sum[c] += step[c][i];
    printf("  %-24s %16.3f %16.3f %16.3f\n", "whole layer", total[0] * 1e3, total[1] * 1e3,
           total[2] * 1e3);
    printf("  %-24s %16.3f %16.3f %16.3f\n", "sum of the step bests", sum[0] * 1e3, sum[1] * 1e3,
           sum[2] * 1e3);
    printf("  %-24s %16.3f %16.3f %16.3f\n", "24 layers (s), estimate", total[0] * CLIP_LAYERS,
           total[1] * CLIP_LAYERS, total[2] * CLIP_LAYERS);
    printf("  %-24s %16.3f %16.3f %16.3f\n", "24 x sum of bests (s)", sum[0] * CLIP_LAYERS,
           sum[1] * CLIP_LAYERS, sum[2] * CLIP_LAYERS);
    printf("  %-24s %16.2f %16.2f %16.2f\n", "load average", load[0], load[1], load[2]);
    printf("  (the sum of the step bests is the layer as it runs when no other process "
           "competes, on a machine where every run was disturbed somewhere)\n");

    loom_tensor_free(&x);
    clip_layer_free(&l32);
    clip_layer_free(&l16);
}

/* (2) the many-row linear on CLIP ViT-L MLP sizes, every route, against the
 * sgemm rate `sg` and the peaks of the bf16 instructions. */
static void bench_linear_rows(double sg, double seconds) {
    bool has_bf16 = __builtin_cpu_supports("avx512bf16"), has_amx = loom_amx_bf16_usable();
    double dp_peak = has_bf16 ? dpbf16_peak(seconds * 0.5) : 0;
    double tile_peak = has_amx ? amx_peak(seconds * 0.5) : 0;
    printf("\n(2) linear x (577, K) @ w (N, K)^T; vdpbf16ps peak %.1f GFLOPS, tdpbf16ps peak %.1f "
           "GFLOPS (0: not on this CPU)\n",
           dp_peak, tile_peak);
    const int64_t mlp_shapes[2][2] = {{1024, 4096}, {4096, 1024}}; /* (K, N) */
    for (int si = 0; si < 2; si++) {
        int64_t k_len = mlp_shapes[si][0], n_out = mlp_shapes[si][1];
        int64_t xs[2] = {577, k_len}, ws[2] = {n_out, k_len};
        loom_tensor x = random_tensor(LOOM_F32, 2, xs, 1);
        loom_tensor w32 = random_tensor(LOOM_F32, 2, ws, 2);
        loom_tensor w16 = random_tensor(LOOM_BF16, 2, ws, 2);
        printf("  K %lld, N %lld:\n", (long long)k_len, (long long)n_out);
        double r = linear_rate(&x, &w32, LOOM_PATH_F32, seconds);
        printf("    f32 weight (sgemm)                    %7.1f GFLOPS  %.2f of sgemm  [load %.2f]\n",
               r, r / sg, load_average());
        r = linear_rate(&x, &w16, LOOM_PATH_F32, seconds);
        printf("    bf16 weight, LOOM_PATH_F32            %7.1f GFLOPS  %.2f of sgemm  [load %.2f]\n",
               r, r / sg, load_average());
        loom_linear_pin_bf16_kernel(LOOM_BF16_KERNEL_AVX512BF16);
        r = linear_rate(&x, &w16, LOOM_PATH_BF16, seconds);
        printf("    bf16 weight, LOOM_PATH_BF16, %-8s %7.1f GFLOPS  %.2f of sgemm, %.2f of its peak  "
               "[load %.2f]\n",
               has_bf16 ? "AVX512" : "(f32)", r, r / sg, has_bf16 ? r / dp_peak : 0.0, load_average());
        loom_linear_pin_bf16_kernel(LOOM_BF16_KERNEL_AUTO);
        r = linear_rate(&x, &w16, LOOM_PATH_BF16, seconds);
        printf("    bf16 weight, LOOM_PATH_BF16, %-8s %7.1f GFLOPS  %.2f of sgemm, %.2f of its peak  "
               "[load %.2f]\n",
               has_amx ? "AMX" : "(no AMX)", r, r / sg, has_amx ? r / tile_peak : 0.0, load_average());
        loom_tensor_free(&x);
        loom_tensor_free(&w32);
        loom_tensor_free(&w16);
    }

}

/* (3) one-row linear (decoding) against the streaming-read bandwidth. */
static void bench_decode(double seconds) {
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
        printf("  pair %d: stream read %5.1f GB/s, linear %5.1f GB/s, ratio %.2f  [load %.2f]\n",
               rep + 1, bw, lin, lin / bw, load_average());
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
}

/* Usage: bench_ops [seconds] [sections], where sections lists the parts to
 * run as digits (default "1234"); the linear section (2) needs the sgemm
 * figure of section 1 and runs it too. */
int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 1.0;
    if (seconds <= 0) seconds = 1.0;
    const char *sections = argc > 2 ? argv[2] : "1234";
    print_machine();

    if (strchr(sections, '1') || strchr(sections, '2')) {
        /* 2048 rather than a larger size: each product takes about 50 ms, so
         * the measurement has enough repetitions to find one that other
         * processes left alone. */
        double sg = sgemm_rate(2048, seconds * 2);
        printf("\n(1) cblas_sgemm 2048x2048x2048: %.1f GFLOPS  [load %.2f]\n", sg, load_average());
        if (strchr(sections, '2')) bench_linear_rows(sg, seconds);
    }
    if (strchr(sections, '3')) bench_decode(seconds);
    if (strchr(sections, '4')) bench_clip_layer(seconds * 4);
    return 0;
}
