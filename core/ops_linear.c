/* Linear layers and batched matrix products. f32 work goes through
 * cblas_sgemm. With f16/bf16 weights and few rows of x (decoding), an AVX-512
 * kernel reads the weights in place. With many rows, the weight is either
 * widened to f32 block by block for sgemm (LOOM_PATH_F32), or multiplied with
 * bf16-rounded activations (LOOM_PATH_BF16) by the AMX-BF16 GEMM of
 * ops_linear_amx.c or, without AMX, the AVX512-BF16 GEMM here. */
#include <immintrin.h>
#include <limits.h>
#include <omp.h>
#include <stdatomic.h>

#include "ops_blas.h"
#include "ops_internal.h"
#include "ops_linear_internal.h"

/* Rows of x up to which 16-bit weights go through the few-row kernel. Beyond
 * this the kernel's x loads per weight element make it slower than a GEMM. */
#define GEMV_MAX_ROWS 8
/* Rows of x from which the bf16 path takes the few-row AMX kernel (below it,
 * the AVX-512 few-row kernel). A build option for comparing the two. */
#ifndef FEW_AMX_MIN_ROWS
#define FEW_AMX_MIN_ROWS 1
#endif
/* Weight rows per tile of that kernel, at most, and per unit of work handed
 * to a thread (a multiple of the tile). */
#define GEMV_MAX_TILE 8
#define GEMV_CHUNK 128
/* How far ahead (in weight elements, 512 bytes) the kernel prefetches each
 * weight row. On the 2-core Xeon this was tuned on (bench/bench_ops.c),
 * the prefetch and eight-row tiles for one x row together raised one-row
 * bf16 throughput from about 0.85 to 0.97 of a one-stream read-sum. */
#define GEMV_PREFETCH 256

/* Weight rows the LOOM_PATH_F32 route widens to f32 per sgemm call: about
 * 4 MiB of f32 per block, so the block stays in L2/L3 while sgemm reads it. */
#define WIDEN_BLOCK_BYTES (4u << 20)

/* Tiles of the bf16 GEMM. BF_MR rows of x by BF_NR output columns are
 * accumulated in 16 zmm registers. The weight is packed BF_NC columns by
 * BF_KC inputs at a time, with BF_KC even so that no k-pair straddles two
 * blocks. */
#define BF_MR 8
#define BF_NR 32
#define BF_NC 256
#define BF_KC 1024

static _Atomic int linear_path = LOOM_PATH_F32;

void loom_set_linear_path(loom_linear_path path) {
    atomic_store(&linear_path, path == LOOM_PATH_BF16 ? LOOM_PATH_BF16 : LOOM_PATH_F32);
}

loom_linear_path loom_get_linear_path(void) {
    return (loom_linear_path)atomic_load(&linear_path);
}

/* ---- CPU features (__builtin_cpu_supports reads flags set at startup) */

static bool cpu_has_avx512(void) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
}

static bool cpu_has_avx512bf16(void) {
    return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
}

/* ---- choice of the LOOM_PATH_BF16 kernel */

static _Atomic int pinned_bf16_kernel = LOOM_BF16_KERNEL_AUTO;

void loom_linear_pin_bf16_kernel(loom_bf16_kernel kernel) {
    atomic_store(&pinned_bf16_kernel, (int)kernel);
}

loom_bf16_kernel loom_linear_bf16_kernel(void) {
    int kernel = atomic_load(&pinned_bf16_kernel);
    if (kernel == LOOM_BF16_KERNEL_AUTO || kernel == LOOM_BF16_KERNEL_AMX) {
        if (loom_amx_bf16_usable()) return LOOM_BF16_KERNEL_AMX;
        kernel = LOOM_BF16_KERNEL_AVX512BF16;
    }
    if (kernel == LOOM_BF16_KERNEL_AVX512BF16 && cpu_has_avx512bf16())
        return LOOM_BF16_KERNEL_AVX512BF16;
    return LOOM_BF16_KERNEL_F32;
}

const char *loom_linear_bf16_kernel_name(void) {
    switch (loom_linear_bf16_kernel()) {
    case LOOM_BF16_KERNEL_AMX: return "amx";
    case LOOM_BF16_KERNEL_AVX512BF16: return "avx512bf16";
    default: return "f32";
    }
}

/* Threads for a job touching `work` elements: all of OpenMP's, unless the job
 * is too small to pay for waking them. */
static int threads_for(int64_t work) {
    if (work < LOOM_PARALLEL_MIN_ELEMS) return 1;
    return omp_get_max_threads();
}

/* ---- sgemm operands */

static bool fits_int(int64_t v) {
    return v >= 0 && v <= INT_MAX;
}

/* The element stride between rows of x seen as (M, K): the leading
 * dimensions must collapse into one (size-1 dimensions do not count).
 * Returns false when they do not. */
static bool collapse_rows(const loom_tensor *x, int64_t *row_stride) {
    int64_t stride = 0, expect = -1;
    bool any = false;
    for (int d = x->ndim - 2; d >= 0; d--) {
        if (x->shape[d] == 1) continue;
        if (any && x->strides[d] != expect) return false;
        if (!any) stride = x->strides[d];
        any = true;
        expect = x->strides[d] * x->shape[d];
    }
    *row_stride = any ? stride : (x->ndim >= 1 ? x->shape[x->ndim - 1] : 1);
    return true;
}

/* Set *m to x (..., K) seen as an (M, K) sgemm operand. When x is not f32
 * or its strides do not allow a direct view, *copy receives a contiguous
 * f32 copy that the caller frees. */
static int x_matrix(loom_blas_mat *m, loom_tensor *copy, const loom_tensor *x, int64_t rows,
                    int64_t k) {
    int64_t rs;
    int64_t cs = x->ndim >= 1 ? x->strides[x->ndim - 1] : 1;
    if (x->dtype == LOOM_F32 && collapse_rows(x, &rs) &&
        loom_blas_view(m, loom_tensor_data(x), rows, k, rs, cs))
        return LOOM_OK;
    if (loom_tensor_to(copy, x, LOOM_F32)) return LOOM_ERR;
    loom_blas_view(m, loom_tensor_data(copy), rows, k, k, 1);
    return LOOM_OK;
}

/* Fill each of the rows of c (ldc floats apart) with bias, or zeros. */
static void fill_rows(float *c, int64_t rows, int64_t n, int64_t ldc, const float *bias) {
    for (int64_t i = 0; i < rows; i++) {
        if (bias)
            memcpy(c + i * ldc, bias, (size_t)n * sizeof(float));
        else
            memset(c + i * ldc, 0, (size_t)n * sizeof(float));
    }
}

/* ---- widening 16-bit rows to f32 */

__attribute__((target("avx512f,avx512bw,avx512vl"))) static inline __m512
widen16(__m256i h, bool is_bf16) {
    if (is_bf16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) static void
widen_row_avx512(float *dst, const uint16_t *src, int64_t n, bool is_bf16) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, widen16(_mm256_loadu_si256((const __m256i *)(src + i)), is_bf16));
    if (i < n) {
        __mmask16 mask = (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(dst + i, mask, widen16(_mm256_maskz_loadu_epi16(mask, src + i), is_bf16));
    }
}

/* Convert n elements of a 16-bit float row (`stride` elements apart) to f32. */
static void widen_row(float *dst, const uint16_t *src, int64_t n, int64_t stride, loom_dtype dtype) {
    if (stride == 1 && cpu_has_avx512())
        widen_row_avx512(dst, src, n, dtype == LOOM_BF16);
    else
        loom_row_load_f32(dst, src, n, stride, dtype);
}

/* ---- few-row kernel for 16-bit weights
 *
 * y[m, n] = sum_k x[m, k] * w[n, k] for up to GEMV_MAX_ROWS rows of x (f32,
 * contiguous, K apart) and R weight rows at a time, widening the weight in
 * registers, so each weight byte is read once from memory per call. */

__attribute__((target("avx512f,avx512bw,avx512vl"))) static inline __attribute__((always_inline)) void
gemv_tile(float *c, int64_t ldc, const float *x, int64_t k_len, const uint16_t *w, int64_t ldw,
          const float *bias, bool is_bf16, int rows, int tile) {
    __m512 acc[GEMV_MAX_TILE][GEMV_MAX_ROWS];
#pragma GCC unroll 8
    for (int r = 0; r < tile; r++)
#pragma GCC unroll 8
        for (int m = 0; m < rows; m++) acc[r][m] = _mm512_setzero_ps();

    int64_t k = 0;
    for (; k + 16 <= k_len; k += 16) {
        __m512 xv[GEMV_MAX_ROWS];
#pragma GCC unroll 8
        for (int m = 0; m < rows; m++) xv[m] = _mm512_loadu_ps(x + m * k_len + k);
#pragma GCC unroll 8
        for (int r = 0; r < tile; r++) {
            _mm_prefetch((const char *)(w + r * ldw + k + GEMV_PREFETCH), _MM_HINT_T0);
            __m512 wv = widen16(_mm256_loadu_si256((const __m256i *)(w + r * ldw + k)), is_bf16);
#pragma GCC unroll 8
            for (int m = 0; m < rows; m++) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
        }
    }
    if (k < k_len) {
        __mmask16 mask = (__mmask16)((1u << (k_len - k)) - 1);
        __m512 xv[GEMV_MAX_ROWS];
#pragma GCC unroll 8
        for (int m = 0; m < rows; m++) xv[m] = _mm512_maskz_loadu_ps(mask, x + m * k_len + k);
#pragma GCC unroll 8
        for (int r = 0; r < tile; r++) {
            __m512 wv = widen16(_mm256_maskz_loadu_epi16(mask, w + r * ldw + k), is_bf16);
#pragma GCC unroll 8
            for (int m = 0; m < rows; m++) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
        }
    }

#pragma GCC unroll 8
    for (int r = 0; r < tile; r++)
#pragma GCC unroll 8
        for (int m = 0; m < rows; m++)
            c[m * ldc + r] = _mm512_reduce_add_ps(acc[r][m]) + (bias ? bias[r] : 0.0f);
}

typedef void (*gemv_fn)(float *c, int64_t ldc, const float *x, int64_t k_len, const uint16_t *w,
                        int64_t ldw, const float *bias, int64_t n0, int64_t n1);

/* One function per (rows of x, weight dtype), so that the tile loops above
 * unroll with constant bounds. Weight rows go eight at a time for one x row
 * (more streams in flight), four for up to four rows and two beyond, which
 * keeps the accumulators within 16 zmm. */
#define DEFINE_GEMV(ROWS, NAME, IS_BF16)                                                        \
    __attribute__((target("avx512f,avx512bw,avx512vl"))) static void gemv_##NAME##_##ROWS(     \
        float *c, int64_t ldc, const float *x, int64_t k_len, const uint16_t *w, int64_t ldw,  \
        const float *bias, int64_t n0, int64_t n1) {                                            \
        enum { TILE = (ROWS) == 1 ? 8 : (ROWS) <= 4 ? 4 : 2 };                                  \
        int64_t n = n0;                                                                         \
        for (; n + TILE <= n1; n += TILE)                                                       \
            gemv_tile(c + n, ldc, x, k_len, w + n * ldw, ldw, bias ? bias + n : NULL, IS_BF16, \
                      ROWS, TILE);                                                              \
        for (; n < n1; n++)                                                                     \
            gemv_tile(c + n, ldc, x, k_len, w + n * ldw, ldw, bias ? bias + n : NULL, IS_BF16, \
                      ROWS, 1);                                                                 \
    }
#define DEFINE_GEMV_BOTH(ROWS) DEFINE_GEMV(ROWS, bf16, true) DEFINE_GEMV(ROWS, f16, false)
DEFINE_GEMV_BOTH(1)
DEFINE_GEMV_BOTH(2)
DEFINE_GEMV_BOTH(3)
DEFINE_GEMV_BOTH(4)
DEFINE_GEMV_BOTH(5)
DEFINE_GEMV_BOTH(6)
DEFINE_GEMV_BOTH(7)
DEFINE_GEMV_BOTH(8)

static const gemv_fn gemv_bf16[GEMV_MAX_ROWS + 1] = {
    NULL, gemv_bf16_1, gemv_bf16_2, gemv_bf16_3, gemv_bf16_4,
    gemv_bf16_5, gemv_bf16_6, gemv_bf16_7, gemv_bf16_8};
static const gemv_fn gemv_f16[GEMV_MAX_ROWS + 1] = {
    NULL, gemv_f16_1, gemv_f16_2, gemv_f16_3, gemv_f16_4,
    gemv_f16_5, gemv_f16_6, gemv_f16_7, gemv_f16_8};

/* c (M, N) = x (M, K) @ w^T + bias for M <= GEMV_MAX_ROWS; w is (N, K) with
 * unit inner stride and ldw elements between rows. Output rows go to the
 * threads in chunks of GEMV_CHUNK, handed out dynamically so that a thread
 * whose core is busy with other work does not hold up the call. */
static int linear_gemv16(float *c, const loom_blas_mat *xm, const uint16_t *w, int64_t ldw,
                         loom_dtype wdtype, int64_t n_out, const float *bias) {
    int64_t rows = xm->rows, k_len = xm->cols;
    float *xbuf = loom_alloc((size_t)(rows * k_len) * sizeof(float));
    if (xbuf == NULL) return loom_error_prefix("linear");
    for (int64_t m = 0; m < rows; m++)
        for (int64_t k = 0; k < k_len; k++)
            xbuf[m * k_len + k] = xm->trans == CblasNoTrans ? xm->p[m * xm->ld + k]
                                                            : xm->p[k * xm->ld + m];

    gemv_fn fn = (wdtype == LOOM_BF16 ? gemv_bf16 : gemv_f16)[rows];
    int nt = threads_for(n_out * k_len);
    int64_t chunks = (n_out + GEMV_CHUNK - 1) / GEMV_CHUNK;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t i = 0; i < chunks; i++) {
        int64_t n0 = i * GEMV_CHUNK, n1 = n0 + GEMV_CHUNK < n_out ? n0 + GEMV_CHUNK : n_out;
        fn(c, n_out, xbuf, k_len, w, ldw, bias, n0, n1);
    }
    loom_free(xbuf);
    return LOOM_OK;
}

/* ---- LOOM_PATH_F32 for 16-bit weights: widen blocks of weight rows to f32
 * and multiply each block with sgemm. Exact up to sgemm's summation order. */
static int linear_widened(float *c, const loom_blas_mat *xm, const loom_tensor *w, int64_t n_out,
                          const float *bias) {
    int64_t k_len = xm->cols;
    int64_t block = (int64_t)(WIDEN_BLOCK_BYTES / sizeof(float)) / (k_len > 0 ? k_len : 1);
    if (block < 16) block = 16;
    if (block > n_out) block = n_out;
    float *buf = loom_alloc((size_t)(block * k_len) * sizeof(float));
    if (buf == NULL) return loom_error_prefix("linear");

    fill_rows(c, xm->rows, n_out, n_out, bias);
    const char *wdata = loom_tensor_data(w);
    int64_t esize = (int64_t)loom_dtype_size(w->dtype);
    for (int64_t n0 = 0; n0 < n_out; n0 += block) {
        int64_t nb = n_out - n0 < block ? n_out - n0 : block;
        /* Widening on every thread no longer slows the sgemm that follows,
         * because OpenBLAS and these loops share libgomp's threads. With two
         * thread pools on 2 cores, the spinning workers had slowed it 2.5 times. */
        int nt = threads_for(nb * k_len);
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t i = 0; i < nb; i++)
            widen_row(buf + i * k_len, (const uint16_t *)(wdata + (n0 + i) * w->strides[0] * esize),
                      k_len, w->strides[1], w->dtype);
        loom_blas_mat wm;
        loom_blas_view(&wm, buf, k_len, nb, 1, k_len); /* w_block^T, (K, nb) */
        loom_sgemm(xm, &wm, c + n0, n_out, 1.0f, 1.0f);
    }
    loom_free(buf);
    return LOOM_OK;
}

/* ---- LOOM_PATH_BF16: activations rounded to bf16, AVX512-BF16 products
 *
 * vdpbf16ps adds, in each f32 lane j, a[2j] * b[2j] + a[2j+1] * b[2j+1].
 * The weight is packed so that one 64-byte vector contains the k-pair (k, k+1)
 * of 16 consecutive output columns, and each x row is kept as bf16 so that a
 * 32-bit broadcast gives its k-pair in every lane. Products of two bf16 are
 * exact in f32 and the sums are f32; the only rounding beyond the f32 path is
 * that of x (and of f16 weights) to bf16, 2^-9 relative per element. */

typedef struct bf16_job {
    const uint16_t *xb;  /* x rounded to bf16: rows_pad rows of ldxb elements, zero padded */
    int64_t ldxb;
    int64_t rows, k_len, n_out;
    const uint16_t *w;   /* weight rows, unit inner stride */
    int64_t ldw;
    bool w_is_f16;
    float *c;            /* output (rows, n_out) */
    const float *bias;
} bf16_job;

/* Round n floats to bf16 (nearest even), then zero-fill dst up to n_pad. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static void
round_row_bf16(uint16_t *dst, const float *src, int64_t n, int64_t n_pad) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(dst + i),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
    if (i < n) {
        __mmask16 mask = (__mmask16)((1u << (n - i)) - 1);
        __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, src + i));
        _mm256_mask_storeu_epi16(dst + i, mask, h);
    }
    for (int64_t j = n; j < n_pad; j++) dst[j] = 0;
}


/* Pack weight rows n0 .. n0 + nr (nr <= BF_NR, missing columns zero) over
 * inputs k0 .. k0 + kc into (kc + 1) / 2 groups of BF_NR 32-bit k-pairs
 * (an odd last input pairs with zero). f16 weights are first rounded to
 * bf16 in `tmp` (BF_NR * BF_KC elements, with `ftmp` of BF_KC floats). */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static void
pack_weight_panel(uint32_t *dst, const bf16_job *job, int64_t n0, int nr, int64_t k0,
                  int64_t kc, uint16_t *tmp, float *ftmp) {
    const uint16_t *rows[BF_NR];
    int64_t pairs = (kc + 1) / 2;
    for (int j = 0; j < nr; j++) {
        rows[j] = job->w + (n0 + j) * job->ldw + k0;
        if (job->w_is_f16) {
            widen_row_avx512(ftmp, rows[j], kc, false);
            round_row_bf16(tmp + j * BF_KC, ftmp, kc, kc);
            rows[j] = tmp + j * BF_KC;
        }
    }
    for (int j0 = 0; j0 < BF_NR; j0 += 16) {
        for (int64_t p0 = 0; p0 < pairs; p0 += 16) {
            int64_t left = kc - 2 * p0; /* 16-bit elements left in each row */
            __mmask32 mask = left >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << left) - 1);
            __m512i row[16], col[16];
            for (int i = 0; i < 16; i++)
                row[i] = j0 + i < nr ? _mm512_maskz_loadu_epi16(mask, rows[j0 + i] + 2 * p0)
                                     : _mm512_setzero_si512();
            transpose16x16(row, col);
            int64_t np = pairs - p0 < 16 ? pairs - p0 : 16;
            for (int64_t p = 0; p < np; p++)
                _mm512_store_si512(dst + (p0 + p) * BF_NR + j0, col[p]);
        }
    }
}

/* c[r, 0:nr] (+)= sum over `pairs` k-pairs of x[r] . w for r < mr (<= BF_MR).
 * xa points at the k-pair of row 0 (rows ldx pairs apart, BF_MR rows
 * readable), wp at a packed panel. On the first k-block `accumulate` is false
 * and the bias (or zero) starts the sum; later blocks add to c. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static void
bf16_kernel(float *c, int64_t ldc, int mr, int nr, const uint32_t *xa, int64_t ldx,
            const uint32_t *wp, int64_t pairs, const float *bias, bool accumulate) {
    __m512 acc[BF_MR][2];
#pragma GCC unroll 8
    for (int r = 0; r < BF_MR; r++) {
        acc[r][0] = _mm512_setzero_ps();
        acc[r][1] = _mm512_setzero_ps();
    }
    for (int64_t p = 0; p < pairs; p++) {
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(wp + p * BF_NR);
        __m512bh w1 = (__m512bh)_mm512_loadu_si512(wp + p * BF_NR + 16);
#pragma GCC unroll 8
        for (int r = 0; r < BF_MR; r++) {
            __m512bh a = (__m512bh)_mm512_set1_epi32((int)xa[r * ldx + p]);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, w0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, w1);
        }
    }

    __mmask16 m0 = nr >= 16 ? 0xFFFF : (__mmask16)((1u << nr) - 1);
    __mmask16 m1 = 0;
    if (nr >= 32)
        m1 = 0xFFFF;
    else if (nr > 16)
        m1 = (__mmask16)((1u << (nr - 16)) - 1);
    __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
    if (!accumulate && bias) {
        b0 = _mm512_maskz_loadu_ps(m0, bias);
        b1 = _mm512_maskz_loadu_ps(m1, bias + 16);
    }
#pragma GCC unroll 8
    for (int r = 0; r < BF_MR; r++) {
        if (r >= mr) break;
        float *cr = c + r * ldc;
        if (accumulate) {
            b0 = _mm512_maskz_loadu_ps(m0, cr);
            b1 = _mm512_maskz_loadu_ps(m1, cr + 16);
        }
        _mm512_mask_storeu_ps(cr, m0, _mm512_add_ps(acc[r][0], b0));
        _mm512_mask_storeu_ps(cr + 16, m1, _mm512_add_ps(acc[r][1], b1));
    }
}

/* Compute rows m0 .. m1 and columns n0 .. n1 of the job with one thread's
 * packing buffer (BF_NC * BF_KC / 2 words) and conversion scratch. */
static void bf16_gemm_part(const bf16_job *job, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                           uint32_t *pack, uint16_t *tmp, float *ftmp) {
    int64_t ldx = job->ldxb / 2;
    const uint32_t *x32 = (const uint32_t *)job->xb;
    for (int64_t nc0 = n0; nc0 < n1; nc0 += BF_NC) {
        int64_t nc = n1 - nc0 < BF_NC ? n1 - nc0 : BF_NC;
        for (int64_t kc0 = 0; kc0 < job->k_len; kc0 += BF_KC) {
            int64_t kc = job->k_len - kc0 < BF_KC ? job->k_len - kc0 : BF_KC;
            int64_t pairs = (kc + 1) / 2;
            for (int64_t j = 0; j < nc; j += BF_NR) {
                int nr = (int)(nc - j < BF_NR ? nc - j : BF_NR);
                pack_weight_panel(pack + (j / BF_NR) * pairs * BF_NR, job, nc0 + j, nr, kc0, kc,
                                  tmp, ftmp);
            }
            for (int64_t m = m0; m < m1; m += BF_MR) {
                int mr = (int)(m1 - m < BF_MR ? m1 - m : BF_MR);
                for (int64_t j = 0; j < nc; j += BF_NR) {
                    int nr = (int)(nc - j < BF_NR ? nc - j : BF_NR);
                    bf16_kernel(job->c + m * job->n_out + nc0 + j, job->n_out, mr, nr,
                                x32 + m * ldx + kc0 / 2, ldx, pack + (j / BF_NR) * pairs * BF_NR,
                                pairs, job->bias ? job->bias + nc0 + j : NULL, kc0 > 0);
                }
            }
        }
    }
}

static int linear_bf16(float *c, const loom_blas_mat *xm, const uint16_t *w, int64_t ldw,
                       loom_dtype wdtype, int64_t n_out, const float *bias) {
    int64_t rows = xm->rows, k_len = xm->cols;
    int64_t rows_pad = (rows + BF_MR - 1) / BF_MR * BF_MR;
    int64_t ldxb = (k_len + 1) / 2 * 2;
    int nt = omp_get_max_threads();
    size_t pack_words = (size_t)BF_NC * BF_KC / 2;

    uint16_t *xb = loom_alloc((size_t)(rows_pad * ldxb) * sizeof(uint16_t));
    uint32_t *pack = loom_alloc((size_t)nt * pack_words * sizeof(uint32_t));
    uint16_t *tmp = loom_alloc((size_t)nt * BF_NR * BF_KC * sizeof(uint16_t));
    float *ftmp = loom_alloc((size_t)nt * BF_KC * sizeof(float) + (size_t)nt * k_len * sizeof(float));
    if (xb == NULL || pack == NULL || tmp == NULL || ftmp == NULL) {
        loom_free(xb);
        loom_free(pack);
        loom_free(tmp);
        loom_free(ftmp);
        return loom_error_prefix("linear");
    }
    float *xrow_all = ftmp + (size_t)nt * BF_KC;

    bf16_job job = {.xb = xb, .ldxb = ldxb, .rows = rows, .k_len = k_len, .n_out = n_out,
                    .w = w, .ldw = ldw, .w_is_f16 = wdtype == LOOM_F16, .c = c, .bias = bias};

    /* Split columns over the threads when there are enough for each to fill
     * whole panels, otherwise split rows (each thread then packs the whole,
     * small, weight). */
    bool split_cols = n_out >= (int64_t)nt * 2 * BF_NR;
#pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), nth = omp_get_num_threads();
        float *xrow = xrow_all + (size_t)t * k_len;
#pragma omp for schedule(static)
        for (int64_t m = 0; m < rows_pad; m++) {
            if (m >= rows) {
                memset(xb + m * ldxb, 0, (size_t)ldxb * sizeof(uint16_t));
                continue;
            }
            const float *src = xm->p + m * xm->ld;
            if (xm->trans == CblasTrans) {
                for (int64_t k = 0; k < k_len; k++) xrow[k] = xm->p[k * xm->ld + m];
                src = xrow;
            }
            round_row_bf16(xb + m * ldxb, src, k_len, ldxb);
        }

        int64_t m0 = 0, m1 = rows, n0 = 0, n1 = n_out;
        if (split_cols) {
            int64_t panels = (n_out + BF_NR - 1) / BF_NR;
            n0 = panels * t / nth * BF_NR;
            n1 = panels * (t + 1) / nth * BF_NR;
            if (n1 > n_out) n1 = n_out;
        } else {
            int64_t blocks = rows_pad / BF_MR;
            m0 = blocks * t / nth * BF_MR;
            m1 = blocks * (t + 1) / nth * BF_MR;
            if (m1 > rows) m1 = rows;
        }
        if (m0 < m1 && n0 < n1)
            bf16_gemm_part(&job, m0, m1, n0, n1, pack + (size_t)t * pack_words,
                           tmp + (size_t)t * BF_NR * BF_KC, ftmp + (size_t)t * BF_KC);
    }

    loom_free(xb);
    loom_free(pack);
    loom_free(tmp);
    loom_free(ftmp);
    return LOOM_OK;
}

/* ---- loom_linear */

static int check_linear(const loom_tensor *x, const loom_tensor *weight, const loom_tensor *bias) {
    if (loom_check_float_input("linear", "x", x) || loom_check_float_input("linear", "weight", weight))
        return LOOM_ERR;
    if (bias && loom_check_float_input("linear", "bias", bias)) return LOOM_ERR;
    if (x->ndim < 1)
        return loom_error("linear: 'x' must have at least 1 dimension (..., in_features), got %s",
                          loom_shape_str(x).s);
    if (weight->ndim != 2)
        return loom_error("linear: 'weight' must be 2-D (out_features, in_features), got %s",
                          loom_shape_str(weight).s);
    int64_t k_len = x->shape[x->ndim - 1];
    if (weight->shape[1] != k_len)
        return loom_error("linear: 'weight' %s does not match 'x' %s (expected in_features %lld, "
                          "got %lld)",
                          loom_shape_str(weight).s, loom_shape_str(x).s, (long long)k_len,
                          (long long)weight->shape[1]);
    if (bias && (bias->ndim != 1 || bias->shape[0] != weight->shape[0]))
        return loom_error("linear: 'bias' %s does not match 'weight' %s (expected [%lld])",
                          loom_shape_str(bias).s, loom_shape_str(weight).s,
                          (long long)weight->shape[0]);
    if (!fits_int(k_len) || !fits_int(weight->shape[0]))
        return loom_error("linear: 'weight' %s is too large for BLAS (dimensions above %d)",
                          loom_shape_str(weight).s, INT_MAX);
    return LOOM_OK;
}

/* c (rows, n_out) = x @ weight^T + bias, after the checks. */
static int linear_compute(float *c, const loom_tensor *x, int64_t rows, const loom_tensor *weight,
                          const float *bias) {
    int64_t k_len = weight->shape[1], n_out = weight->shape[0];
    if (k_len == 0) {
        fill_rows(c, rows, n_out, n_out, bias);
        return LOOM_OK;
    }

    loom_blas_mat xm;
    loom_tensor xcopy = LOOM_TENSOR_EMPTY, wcopy = LOOM_TENSOR_EMPTY;
    if (x_matrix(&xm, &xcopy, x, rows, k_len)) return LOOM_ERR;
    int rc = LOOM_OK;

    if (weight->dtype == LOOM_F32) {
        loom_blas_mat wm;
        const float *wp = loom_tensor_data(weight);
        if (!loom_blas_view(&wm, wp, k_len, n_out, weight->strides[1], weight->strides[0])) {
            rc = loom_tensor_to(&wcopy, weight, LOOM_F32);
            if (rc == LOOM_OK) loom_blas_view(&wm, loom_tensor_data(&wcopy), k_len, n_out, 1, k_len);
        }
        if (rc == LOOM_OK) {
            fill_rows(c, rows, n_out, n_out, bias);
            loom_sgemm(&xm, &wm, c, n_out, 1.0f, 1.0f);
        }
        loom_tensor_free(&xcopy);
        loom_tensor_free(&wcopy);
        return rc;
    }

    loom_bf16_kernel kernel = LOOM_BF16_KERNEL_F32;
    if (loom_get_linear_path() == LOOM_PATH_BF16) kernel = loom_linear_bf16_kernel();
    /* On the bf16 path with AMX, up to 16 rows and a bf16 weight take the AMX
     * kernel that reads the weight in place. There 16 rows cost about what
     * one does, while the AVX-512 few-row kernel's time grows with the rows.
     * One row streams the weight about as fast as that kernel (LLaVA-7B shapes,
     * measured on the 2-core Sapphire Rapids). The kernel sums exactly as the
     * many-row AMX kernel, so a row's result does not depend on the rows
     * beside it. That keeps batched decoding bitwise equal to single runs. */
    if (kernel == LOOM_BF16_KERNEL_AMX && rows >= FEW_AMX_MIN_ROWS && rows <= LOOM_AMX_FEW_MAX_ROWS &&
        weight->dtype == LOOM_BF16) {
        const loom_tensor *w = weight;
        if (weight->strides[1] != 1 && k_len > 1) {
            rc = loom_tensor_contiguous(&wcopy, weight);
            w = &wcopy;
        }
        if (rc == LOOM_OK)
            rc = loom_linear_amx_few(c, &xm, loom_tensor_data(w), n_out > 1 ? w->strides[0] : k_len, n_out,
                                     bias);
        loom_tensor_free(&xcopy);
        loom_tensor_free(&wcopy);
        return rc;
    }
    bool small = rows <= GEMV_MAX_ROWS && cpu_has_avx512();
    if (small) kernel = LOOM_BF16_KERNEL_F32;
    if (!small && kernel == LOOM_BF16_KERNEL_F32) {
        rc = linear_widened(c, &xm, weight, n_out, bias);
    } else {
        /* Both kernels read weight rows with unit stride. */
        const loom_tensor *w = weight;
        if (weight->strides[1] != 1 && k_len > 1) {
            rc = loom_tensor_contiguous(&wcopy, weight);
            w = &wcopy;
        }
        if (rc == LOOM_OK) {
            const uint16_t *wp = loom_tensor_data(w);
            int64_t ldw = n_out > 1 ? w->strides[0] : k_len;
            if (small)
                rc = linear_gemv16(c, &xm, wp, ldw, w->dtype, n_out, bias);
            else if (kernel == LOOM_BF16_KERNEL_AMX)
                rc = loom_linear_amx(c, &xm, wp, ldw, w->dtype, n_out, bias);
            else
                rc = linear_bf16(c, &xm, wp, ldw, w->dtype, n_out, bias);
        }
    }
    loom_tensor_free(&xcopy);
    loom_tensor_free(&wcopy);
    return rc;
}

int loom_linear(loom_tensor *out, const loom_tensor *x, const loom_tensor *weight,
                const loom_tensor *bias) {
    if (check_linear(x, weight, bias)) return LOOM_ERR;

    int64_t shape[LOOM_MAX_DIMS];
    int64_t rows = 1;
    for (int d = 0; d < x->ndim - 1; d++) {
        shape[d] = x->shape[d];
        rows *= x->shape[d];
    }
    shape[x->ndim - 1] = weight->shape[0];
    if (!fits_int(rows))
        return loom_error("linear: 'x' %s has too many rows for BLAS (above %d)",
                          loom_shape_str(x).s, INT_MAX);

    loom_tensor res;
    if (loom_out_begin(&res, out, "linear", LOOM_F32, x->ndim, shape)) return LOOM_ERR;
    if (rows == 0 || weight->shape[0] == 0) return loom_out_end(out, &res, LOOM_OK);

    float *bias_f = NULL;
    int rc = LOOM_OK;
    if (bias) {
        bias_f = loom_alloc((size_t)bias->shape[0] * sizeof(float));
        if (bias_f == NULL)
            rc = loom_error_prefix("linear");
        else
            loom_row_load_f32(bias_f, loom_tensor_data(bias), bias->shape[0], bias->strides[0],
                              bias->dtype);
    }
    if (rc == LOOM_OK) rc = linear_compute(loom_tensor_data(&res), x, rows, weight, bias_f);
    loom_free(bias_f);
    return loom_out_end(out, &res, rc);
}

/* ---- loom_matmul */

/* Shapes of a matmul operand after torch.matmul's 1-D promotion. */
typedef struct mm_operand {
    int nbatch;
    int64_t batch[LOOM_MAX_DIMS], bstride[LOOM_MAX_DIMS];
    int64_t rows, cols, rs, cs;
} mm_operand;

static void mm_describe(mm_operand *o, const loom_tensor *t, bool is_a) {
    if (t->ndim == 1) {
        o->nbatch = 0;
        if (is_a) { /* (k) -> (1, k) */
            o->rows = 1;
            o->cols = t->shape[0];
            o->rs = t->shape[0];
            o->cs = t->strides[0];
        } else { /* (k) -> (k, 1) */
            o->rows = t->shape[0];
            o->cols = 1;
            o->rs = t->strides[0];
            o->cs = 1;
        }
        return;
    }
    o->nbatch = t->ndim - 2;
    for (int d = 0; d < o->nbatch; d++) {
        o->batch[d] = t->shape[d];
        o->bstride[d] = t->strides[d];
    }
    o->rows = t->shape[t->ndim - 2];
    o->cols = t->shape[t->ndim - 1];
    o->rs = t->strides[t->ndim - 2];
    o->cs = t->strides[t->ndim - 1];
}

/* Element offset of batch `index` (in the broadcast batch shape) inside o. */
static int64_t mm_batch_offset(const mm_operand *o, int nbatch, const int64_t *shape,
                               int64_t index) {
    int64_t off = 0;
    for (int d = nbatch - 1; d >= 0; d--) {
        int64_t i = index % shape[d];
        index /= shape[d];
        int od = d - (nbatch - o->nbatch);
        if (od >= 0 && o->batch[od] != 1) off += i * o->bstride[od];
    }
    return off;
}

/* Describe *t in *o. When *t is not f32 or its last two strides do not suit
 * BLAS, *t is replaced by a contiguous f32 copy made in *copy. */
static int mm_prepare(loom_tensor *copy, const loom_tensor **t, mm_operand *o, bool is_a) {
    mm_describe(o, *t, is_a);
    loom_blas_mat probe;
    if ((*t)->dtype == LOOM_F32 && loom_blas_view(&probe, NULL, o->rows, o->cols, o->rs, o->cs))
        return LOOM_OK;
    if (loom_tensor_to(copy, *t, LOOM_F32)) return LOOM_ERR;
    *t = copy;
    mm_describe(o, *t, is_a);
    return LOOM_OK;
}

static int matmul_compute(float *c, const loom_tensor *a, const loom_tensor *b, int nbatch,
                          const int64_t *bshape, int64_t nbat) {
    loom_tensor acopy = LOOM_TENSOR_EMPTY, bcopy = LOOM_TENSOR_EMPTY;
    mm_operand oa, ob;
    if (mm_prepare(&acopy, &a, &oa, true) || mm_prepare(&bcopy, &b, &ob, false)) {
        loom_tensor_free(&acopy);
        return LOOM_ERR;
    }
    int64_t n = oa.rows, k_len = oa.cols, m = ob.cols;
    const float *pa = loom_tensor_data(a), *pb = loom_tensor_data(b);

    if (k_len == 0) {
        memset(c, 0, (size_t)(nbat * n * m) * sizeof(float));
    } else {
        /* When b has no batch dimensions and a's batch and row dimensions
         * collapse into one row stride, one sgemm covers every batch. */
        int64_t rs;
        loom_blas_mat am, bm;
        bool folded = ob.nbatch == 0 && oa.cs == 1 && a->ndim >= 2 && collapse_rows(a, &rs) &&
                      fits_int(nbat * n) && loom_blas_view(&am, pa, nbat * n, k_len, rs, 1);
        if (folded) {
            loom_blas_view(&bm, pb, k_len, m, ob.rs, ob.cs);
            loom_sgemm(&am, &bm, c, m, 1.0f, 0.0f);
        } else {
            for (int64_t i = 0; i < nbat; i++) {
                loom_blas_view(&am, pa + mm_batch_offset(&oa, nbatch, bshape, i), n, k_len, oa.rs, oa.cs);
                loom_blas_view(&bm, pb + mm_batch_offset(&ob, nbatch, bshape, i), k_len, m, ob.rs, ob.cs);
                loom_sgemm(&am, &bm, c + i * n * m, m, 1.0f, 0.0f);
            }
        }
    }
    loom_tensor_free(&acopy);
    loom_tensor_free(&bcopy);
    return LOOM_OK;
}

int loom_matmul(loom_tensor *out, const loom_tensor *a, const loom_tensor *b) {
    if (loom_check_float_input("matmul", "a", a) || loom_check_float_input("matmul", "b", b))
        return LOOM_ERR;
    if (a->ndim < 1 || b->ndim < 1)
        return loom_error("matmul: both arguments need at least 1 dimension, got 'a' %s and 'b' %s",
                          loom_shape_str(a).s, loom_shape_str(b).s);
    int64_t k_a = a->shape[a->ndim - 1];
    int64_t k_b = b->ndim == 1 ? b->shape[0] : b->shape[b->ndim - 2];
    if (k_a != k_b)
        return loom_error("matmul: 'a' %s and 'b' %s do not match (a has %lld columns, b has "
                          "%lld rows)",
                          loom_shape_str(a).s, loom_shape_str(b).s, (long long)k_a, (long long)k_b);

    int nba = a->ndim > 2 ? a->ndim - 2 : 0, nbb = b->ndim > 2 ? b->ndim - 2 : 0;
    int nbatch = 0;
    int64_t bshape[LOOM_MAX_DIMS];
    if (loom_broadcast_shape(nba, a->shape, nbb, b->shape, &nbatch, bshape))
        return loom_error_prefix("matmul: batch dimensions of 'a' %s and 'b' %s",
                                 loom_shape_str(a).s, loom_shape_str(b).s);

    int64_t n = a->ndim == 1 ? 1 : a->shape[a->ndim - 2];
    int64_t m = b->ndim == 1 ? 1 : b->shape[b->ndim - 1];
    int64_t shape[LOOM_MAX_DIMS];
    int ndim = 0;
    int64_t nbat = 1;
    for (int d = 0; d < nbatch; d++) {
        shape[ndim++] = bshape[d];
        nbat *= bshape[d];
    }
    if (a->ndim > 1) shape[ndim++] = n;
    if (b->ndim > 1) shape[ndim++] = m;
    if (ndim > LOOM_MAX_DIMS)
        return loom_error("matmul: result of 'a' %s and 'b' %s has more than %d dimensions",
                          loom_shape_str(a).s, loom_shape_str(b).s, LOOM_MAX_DIMS);
    if (!fits_int(n) || !fits_int(m) || !fits_int(k_a))
        return loom_error("matmul: 'a' %s and 'b' %s are too large for BLAS (dimensions above %d)",
                          loom_shape_str(a).s, loom_shape_str(b).s, INT_MAX);

    loom_tensor res;
    if (loom_out_begin(&res, out, "matmul", LOOM_F32, ndim, shape)) return LOOM_ERR;
    int rc = LOOM_OK;
    if (nbat * n * m > 0) rc = matmul_compute(loom_tensor_data(&res), a, b, nbatch, bshape, nbat);
    return loom_out_end(out, &res, rc);
}
