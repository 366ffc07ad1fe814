/* The AMX-BF16 GEMM of LOOM_PATH_BF16: y = x @ w^T + bias with x rounded to
 * bf16 and f32 sums, on the tile unit of Intel CPUs since Sapphire Rapids.
 * Only the functions here are compiled for AMX (function-level target
 * attributes), so the rest of the library runs on CPUs without it. */
#include <immintrin.h>
#include <omp.h>
#include <pthread.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* GCC 12 knows the AMX names in __builtin_cpu_supports; other compilers
 * read CPUID. */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define HAVE_CPU_SUPPORTS_AMX 1
#else
#include <cpuid.h>
#endif

#include "ops_internal.h"
#include "ops_linear_internal.h"

/* Linux's arch_prctl requests for extended CPU state (asm/prctl.h) and the
 * state component of the tile data (XFEATURE_XTILEDATA). */
#define ARCH_GET_XCOMP_PERM 0x1022
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Every tile is 16 rows of 64 bytes: C tiles hold 16 x 16 f32, x tiles 16
 * rows of 32 bf16 inputs, and weight tiles 16 k-pairs of 16 output columns,
 * each column's pair (k, k + 1) as one 32-bit word. One TDPBF16PS step
 * covers TILE_K = 32 inputs. */
#define TILE_ROWS 16
#define TILE_K 32
#define TILE_ELEMS (TILE_ROWS * TILE_K) /* bf16 elements per x or weight tile */

/* Output columns per unit of work (four weight tiles), and input steps per
 * block of K. A thread packs AMX_NB weight rows by up to AMX_KB steps (512
 * KiB at most) at a time and runs every row tile of x against them before
 * the next block, so the block stays in its L2 while the x tiles are read
 * from the shared cache. On the 2-core Sapphire Rapids this was tuned on
 * (bench/bench_ops.c), the best runs reached about 2.05 TFLOPS for 577 x
 * 1024 x 4096 and 1.6 to 1.8 for 577 x 4096 x 1024, against a TDPBF16PS
 * peak of 3.7. Blocks of 32 or 64 steps were no faster. */
#define AMX_NB 64
#define AMX_KB 128

#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))

/* ---- the run-time check */

static pthread_once_t amx_once = PTHREAD_ONCE_INIT;
static bool amx_usable;

static bool cpu_has_amx_bf16(void) {
#ifdef HAVE_CPU_SUPPORTS_AMX
    return __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
           __builtin_cpu_supports("avx512bf16");
#else
    /* CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE. */
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    return (d >> 22 & 1) && (d >> 24 & 1) && __builtin_cpu_supports("avx512bf16");
#endif
}

/* Ask Linux for the tile data state: without it the first tile instruction
 * raises SIGILL. The grant is per process and covers every thread. */
static void amx_request(void) {
    if (!cpu_has_amx_bf16()) return;
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) {
        loom_log(LOOM_LOG_DEBUG, "linear: the kernel refused AMX tile data, using AVX512-BF16");
        return;
    }
    unsigned long granted = 0;
    if (syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &granted) != 0) return;
    amx_usable = (granted >> XFEATURE_XTILEDATA) & 1;
}

bool loom_amx_bf16_usable(void) {
    pthread_once(&amx_once, amx_request);
    return amx_usable;
}

/* ---- tile configuration (the 64-byte operand of LDTILECFG) */

typedef struct tile_config {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Tiles 0-3 accumulate C, 4-5 hold x tiles, 6-7 weight tiles. */
AMX_TARGET static void tile_setup(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 8; i++) {
        cfg.colsb[i] = 64;
        cfg.rows[i] = TILE_ROWS;
    }
    _tile_loadconfig(&cfg);
}

/* ---- packing */


/* Mask of the first `left` of 16 lanes (all for left >= 16, none for <= 0). */
static inline __mmask16 lanes(int64_t left) {
    if (left >= 16) return 0xFFFF;
    if (left <= 0) return 0;
    return (__mmask16)((1u << left) - 1);
}

/* Round 32 floats (src[0 .. n), zeros after) to bf16, nearest even. */
AMX_TARGET static inline __m512i bf16x32(const float *src, int64_t n) {
    __m512 lo = _mm512_maskz_loadu_ps(lanes(n), src);
    __m512 hi = _mm512_maskz_loadu_ps(lanes(n - 16), src + 16);
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

/* Write x row tile `mt` (rows mt*16 .. +16 of the M rows) as ksteps tiles of
 * 16 rows by 32 bf16, zero beyond M and K, consecutive in dst. `row` is
 * scratch for one row of K floats, used when x is a transposed view. */
AMX_TARGET static void pack_x_tile(uint16_t *dst, const loom_blas_mat *xm, int64_t mt,
                                   int64_t ksteps, float *row) {
    int64_t k_len = xm->cols;
    for (int r = 0; r < TILE_ROWS; r++) {
        int64_t m = mt * TILE_ROWS + r;
        const float *src = NULL;
        if (m < xm->rows) {
            src = xm->p + m * xm->ld;
            if (xm->trans == CblasTrans) {
                for (int64_t k = 0; k < k_len; k++) row[k] = xm->p[k * xm->ld + m];
                src = row;
            }
        }
        for (int64_t ks = 0; ks < ksteps; ks++) {
            __m512i v = src ? bf16x32(src + ks * TILE_K, k_len - ks * TILE_K) : _mm512_setzero_si512();
            _mm512_store_si512(dst + ks * TILE_ELEMS + r * TILE_K, v);
        }
    }
}

/* 32 weights of row n from input k0 (zeros past K) as bf16. */
AMX_TARGET static inline __m512i weight_row32(const uint16_t *w, int64_t k0, int64_t k_len,
                                              bool is_f16) {
    int64_t left = k_len - k0;
    __mmask32 mask = left >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << left) - 1);
    __m512i v = _mm512_maskz_loadu_epi16(mask, w + k0);
    if (!is_f16) return v;
    __m512 lo = _mm512_cvtph_ps(_mm512_castsi512_si256(v));
    __m512 hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(v, 1));
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

/* Pack weight rows n0 .. n0 + ntiles * 16 (zeros past N) over steps
 * ks0 .. ks0 + ksteps into tiles: tile (j, s) at dst + (j * ksteps + s) *
 * TILE_ELEMS has row p = k-pair (k0 + 2p, k0 + 2p + 1) of 16 columns. */
AMX_TARGET static void pack_w_block(uint16_t *dst, const uint16_t *w, int64_t ldw, bool is_f16,
                                    int64_t n_out, int64_t k_len, int64_t n0, int ntiles,
                                    int64_t ks0, int64_t ksteps) {
    for (int j = 0; j < ntiles; j++) {
        for (int64_t s = 0; s < ksteps; s++) {
            int64_t k0 = (ks0 + s) * TILE_K;
            __m512i row[16], col[16];
            for (int i = 0; i < 16; i++) {
                int64_t n = n0 + j * 16 + i;
                row[i] = n < n_out ? weight_row32(w + n * ldw, k0, k_len, is_f16)
                                   : _mm512_setzero_si512();
            }
            transpose16x16(row, col);
            __m512i *t = (__m512i *)(dst + (j * ksteps + s) * TILE_ELEMS);
            for (int p = 0; p < 16; p++) _mm512_store_si512(t + p, col[p]);
        }
    }
}

/* ---- the tile kernel */

/* One C tile: where its 16 x 16 floats live during the kernel (`p`, `ld`
 * bytes between rows) and, for a tile cut by the edge of C, where they go. */
typedef struct c_tile {
    float *p;
    int64_t ld;
    float *dst;      /* NULL when p points into C itself */
    int64_t ldc;     /* floats between rows of C */
    int rows, cols;  /* the part inside C */
} c_tile;

/* Point t at C's tile (m0, n0) when it lies wholly inside the (M, N) matrix,
 * else at the scratch tile, copying the existing part of C in when the sum
 * continues from an earlier K block. */
AMX_TARGET static void c_tile_open(c_tile *t, float *c, int64_t ldc, int64_t m_len,
                                   int64_t n_len, int64_t m0, int64_t n0, float *scratch,
                                   bool continuing) {
    int64_t rows = m_len - m0, cols = n_len - n0;
    if (rows >= TILE_ROWS && cols >= 16) {
        *t = (c_tile){.p = c + m0 * ldc + n0, .ld = ldc * (int64_t)sizeof(float)};
        return;
    }
    *t = (c_tile){.p = scratch, .ld = 64, .dst = c + m0 * ldc + n0, .ldc = ldc,
                  .rows = rows < TILE_ROWS ? (int)rows : TILE_ROWS, .cols = cols < 16 ? (int)cols : 16};
    if (continuing) {
        __mmask16 mask = lanes(t->cols);
        for (int r = 0; r < t->rows; r++)
            _mm512_store_ps(scratch + r * 16, _mm512_maskz_loadu_ps(mask, t->dst + r * ldc));
    }
}

AMX_TARGET static void c_tile_close(const c_tile *t) {
    if (t->dst == NULL) return;
    __mmask16 mask = lanes(t->cols);
    for (int r = 0; r < t->rows; r++)
        _mm512_mask_storeu_ps(t->dst + r * t->ldc, mask, _mm512_load_ps(t->p + r * 16));
}

/* C tiles (i, j) for i < MTN row tiles and j < NTN column tiles (each 1 or
 * 2) += the x tiles a[i] times the weight tiles b[j] over `steps` consecutive
 * tiles of each. On the first K block (`first`) the sum starts from the bias
 * (16 floats per column tile, loaded with row stride 0) instead of C. */
#define TILE_KERNEL(NAME, MTN, NTN)                                                             \
    AMX_TARGET static void NAME(const uint16_t *a0, const uint16_t *a1, const uint16_t *b0,    \
                                const uint16_t *b1, int64_t steps, const c_tile *c,           \
                                const float *bias0, const float *bias1, bool first) {          \
        if (first) {                                                                           \
            _tile_loadd(0, bias0, 0);                                                          \
            if (NTN == 2) _tile_loadd(1, bias1, 0);                                            \
            if (MTN == 2) _tile_loadd(2, bias0, 0);                                            \
            if (MTN == 2 && NTN == 2) _tile_loadd(3, bias1, 0);                                \
        } else {                                                                               \
            _tile_loadd(0, c[0].p, c[0].ld);                                                   \
            if (NTN == 2) _tile_loadd(1, c[1].p, c[1].ld);                                     \
            if (MTN == 2) _tile_loadd(2, c[2].p, c[2].ld);                                     \
            if (MTN == 2 && NTN == 2) _tile_loadd(3, c[3].p, c[3].ld);                         \
        }                                                                                      \
        for (int64_t s = 0; s < steps; s++) {                                                  \
            _tile_loadd(4, a0 + s * TILE_ELEMS, 64);                                           \
            if (MTN == 2) _tile_loadd(5, a1 + s * TILE_ELEMS, 64);                             \
            _tile_loadd(6, b0 + s * TILE_ELEMS, 64);                                           \
            if (NTN == 2) _tile_loadd(7, b1 + s * TILE_ELEMS, 64);                             \
            _tile_dpbf16ps(0, 4, 6);                                                           \
            if (NTN == 2) _tile_dpbf16ps(1, 4, 7);                                             \
            if (MTN == 2) _tile_dpbf16ps(2, 5, 6);                                             \
            if (MTN == 2 && NTN == 2) _tile_dpbf16ps(3, 5, 7);                                 \
        }                                                                                      \
        _tile_stored(0, c[0].p, c[0].ld);                                                      \
        if (NTN == 2) _tile_stored(1, c[1].p, c[1].ld);                                        \
        if (MTN == 2) _tile_stored(2, c[2].p, c[2].ld);                                        \
        if (MTN == 2 && NTN == 2) _tile_stored(3, c[3].p, c[3].ld);                            \
    }
TILE_KERNEL(tile_kernel_2x2, 2, 2)
TILE_KERNEL(tile_kernel_2x1, 2, 1)
TILE_KERNEL(tile_kernel_1x2, 1, 2)
TILE_KERNEL(tile_kernel_1x1, 1, 1)

/* ---- the GEMM */

typedef struct amx_job {
    const uint16_t *xp;   /* packed x: row tile mt, step s at (mt * ksteps + s) * TILE_ELEMS */
    int64_t m_len, n_len, k_len, ksteps;
    const uint16_t *w;
    int64_t ldw;
    bool w_is_f16;
    float *c;
    const float *bias;    /* n_blocks * AMX_NB floats, zero padded (zeros when there is no bias) */
    int64_t m_parts;      /* row ranges per column block */
    int64_t mtiles;
} amx_job;

/* Run row tiles mt0 .. mt1 against the packed weight block (column tiles
 * from n0, `ntiles` of them) over steps ks0 .. ks0 + ksteps. */
AMX_TARGET static void amx_block(const amx_job *job, const uint16_t *wp, int64_t n0, int ntiles,
                                 int64_t mt0, int64_t mt1, int64_t ks0, int64_t ksteps,
                                 float *scratch) {
    bool first = ks0 == 0;
    int64_t ldc = job->n_len;
    for (int64_t mt = mt0; mt < mt1; mt += 2) {
        int mtn = mt + 1 < mt1 ? 2 : 1;
        const uint16_t *a0 = job->xp + (mt * job->ksteps + ks0) * TILE_ELEMS;
        const uint16_t *a1 = mtn == 2 ? a0 + job->ksteps * TILE_ELEMS : a0;
        for (int j = 0; j < ntiles; j += 2) {
            int ntn = j + 1 < ntiles ? 2 : 1;
            const uint16_t *b0 = wp + j * ksteps * TILE_ELEMS;
            const uint16_t *b1 = ntn == 2 ? b0 + ksteps * TILE_ELEMS : b0;
            int64_t nj = n0 + j * 16;
            c_tile c[4];
            for (int i = 0; i < mtn; i++)
                for (int jj = 0; jj < ntn; jj++)
                    c_tile_open(&c[i * 2 + jj], job->c, ldc, job->m_len, job->n_len,
                                (mt + i) * TILE_ROWS, nj + jj * 16, scratch + (i * 2 + jj) * 256,
                                !first);
            /* The kernels name C tiles 0, 1 (first row tile) and 2, 3. */
            const float *bias0 = job->bias + nj, *bias1 = bias0 + 16;
            if (mtn == 2 && ntn == 2)
                tile_kernel_2x2(a0, a1, b0, b1, ksteps, c, bias0, bias1, first);
            else if (mtn == 2)
                tile_kernel_2x1(a0, a1, b0, b1, ksteps, c, bias0, bias1, first);
            else if (ntn == 2)
                tile_kernel_1x2(a0, a1, b0, b1, ksteps, c, bias0, bias1, first);
            else
                tile_kernel_1x1(a0, a1, b0, b1, ksteps, c, bias0, bias1, first);
            for (int i = 0; i < mtn; i++)
                for (int jj = 0; jj < ntn; jj++) c_tile_close(&c[i * 2 + jj]);
        }
    }
}

AMX_TARGET static void amx_thread(const amx_job *job, const loom_blas_mat *xm, uint16_t *xp,
                                  uint16_t *wp, float *scratch, float *row) {
    tile_setup();

    /* Pack x, row tiles split over the threads. */
#pragma omp for schedule(static)
    for (int64_t mt = 0; mt < job->mtiles; mt++)
        pack_x_tile(xp + mt * job->ksteps * TILE_ELEMS, xm, mt, job->ksteps, row);

    /* A unit is one column block and one of m_parts row ranges. The units of
     * one block are consecutive, so a thread often keeps its packing. The
     * implied barrier after each K block orders the sums of every C tile. */
    int64_t n_blocks = (job->n_len + AMX_NB - 1) / AMX_NB;
    int64_t units = n_blocks * job->m_parts;
    for (int64_t ks0 = 0; ks0 < job->ksteps; ks0 += AMX_KB) {
        int64_t ksteps = job->ksteps - ks0 < AMX_KB ? job->ksteps - ks0 : AMX_KB;
        int64_t packed = -1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < units; u++) {
            int64_t nb = u / job->m_parts, part = u % job->m_parts;
            int64_t n0 = nb * AMX_NB;
            int64_t cols = job->n_len - n0 < AMX_NB ? job->n_len - n0 : AMX_NB;
            int ntiles = (int)((cols + 15) / 16);
            if (packed != nb) {
                pack_w_block(wp, job->w, job->ldw, job->w_is_f16, job->n_len, job->k_len, n0,
                             ntiles, ks0, ksteps);
                packed = nb;
            }
            /* Row ranges in pairs of tiles, so only the last range can end in a single tile. */
            int64_t pairs = (job->mtiles + 1) / 2;
            int64_t mt0 = pairs * part / job->m_parts * 2, mt1 = pairs * (part + 1) / job->m_parts * 2;
            if (mt1 > job->mtiles) mt1 = job->mtiles;
            if (mt0 < mt1) amx_block(job, wp, n0, ntiles, mt0, mt1, ks0, ksteps, scratch);
        }
    }
    _tile_release();
}

int loom_linear_amx(float *c, const loom_blas_mat *xm, const uint16_t *w, int64_t ldw,
                    loom_dtype wdtype, int64_t n_out, const float *bias) {
    int64_t m_len = xm->rows, k_len = xm->cols;
    int64_t mtiles = (m_len + TILE_ROWS - 1) / TILE_ROWS;
    int64_t ksteps = (k_len + TILE_K - 1) / TILE_K;
    int64_t n_blocks = (n_out + AMX_NB - 1) / AMX_NB;
    int64_t flops = 2 * m_len * n_out * k_len;

    /* Threads only when the product is worth waking them for (2^24 flops
     * take about 10 us of one core's tiles). With fewer column blocks than
     * twice the threads, rows are split too. */
    int nt = flops >= ((int64_t)1 << 24) ? omp_get_max_threads() : 1;
    int64_t m_parts = 1;
    if (n_blocks < 2 * nt) {
        m_parts = (2 * nt + n_blocks - 1) / n_blocks;
        int64_t pairs = (mtiles + 1) / 2;
        if (m_parts > pairs) m_parts = pairs;
    }

    size_t wp_elems = (size_t)(AMX_NB / 16) * (size_t)(ksteps < AMX_KB ? ksteps : AMX_KB) * TILE_ELEMS;
    uint16_t *xp = loom_alloc((size_t)(mtiles * ksteps) * TILE_ELEMS * sizeof(uint16_t));
    uint16_t *wp = loom_alloc((size_t)nt * wp_elems * sizeof(uint16_t));
    float *scratch = loom_alloc((size_t)nt * 4 * 256 * sizeof(float));
    float *rows = loom_alloc((size_t)nt * (size_t)k_len * sizeof(float));
    float *bias_pad = loom_alloc_zeroed((size_t)(n_blocks * AMX_NB) * sizeof(float));
    int rc = LOOM_OK;
    if (xp == NULL || wp == NULL || scratch == NULL || rows == NULL || bias_pad == NULL) {
        rc = loom_error_prefix("linear");
    } else {
        if (bias) memcpy(bias_pad, bias, (size_t)n_out * sizeof(float));
        amx_job job = {.xp = xp, .m_len = m_len, .n_len = n_out, .k_len = k_len, .ksteps = ksteps,
                       .w = w, .ldw = ldw, .w_is_f16 = wdtype == LOOM_F16, .c = c,
                       .bias = bias_pad, .m_parts = m_parts, .mtiles = mtiles};
#pragma omp parallel num_threads(nt)
        {
            int t = omp_get_thread_num();
            amx_thread(&job, xm, xp, wp + (size_t)t * wp_elems, scratch + (size_t)t * 4 * 256,
                       rows + (size_t)t * (size_t)k_len);
        }
    }
    loom_free(xp);
    loom_free(wp);
    loom_free(scratch);
    loom_free(rows);
    loom_free(bias_pad);
    return rc;
}

/* ---- few rows of x: the weight in place as the tile rows
 *
 * For decoding, packing the weight (pack_w_block) would cost as much memory
 * traffic as the product itself. Here the roles turn around. The tile rows
 * are 16 weight rows loaded straight from the weight, 64 bytes of each row
 * per step. The second operand contains the k-pairs of up to 16 rows of x.
 * So the C tile is (weight rows, x rows), transposed on the way out. */

/* A unit is one tile's 16 weight rows, streamed from start to end. The
 * hardware prefetchers follow that better than four tiles that share each
 * loaded x tile: about 10% more bandwidth for 4096 x 4096 on the 2-core
 * Sapphire Rapids, and no slower with 16 rows of x. Units go to the threads
 * FEW_CHUNK at a time, dynamically, like the few-row AVX-512 kernel's, so
 * that a busy core does not hold the call up. Software prefetches fetch
 * each row's line FEW_PREFETCH steps ahead. With them one row of x streams
 * the weight as fast as the AVX-512 kernel does. */
#define FEW_CHUNK 8
#define FEW_PREFETCH 4
/* Weights up to this size take four-tile units (few_unit4), in runs of
 * FEW_KRUN steps, handed out two at a time. */
#define FEW_CACHED_BYTES (4 << 20)
#define FEW_KRUN 16

/* x rows as the second operand: step s is 16 k-pairs (rows) of 16 x rows,
 * each x row's pair (k, k + 1) one 32-bit word, zeros past M and K. */
AMX_TARGET static void pack_x_few(uint16_t *dst, const loom_blas_mat *xm, int64_t ksteps,
                                  float *row) {
    int64_t k_len = xm->cols;
    for (int64_t s = 0; s < ksteps; s++) {
        __m512i rows[16], cols[16];
        for (int m = 0; m < 16; m++) {
            if (m >= xm->rows) {
                rows[m] = _mm512_setzero_si512();
                continue;
            }
            const float *src = xm->p + m * xm->ld + s * TILE_K;
            if (xm->trans == CblasTrans) {
                int64_t n = k_len - s * TILE_K < TILE_K ? k_len - s * TILE_K : TILE_K;
                for (int64_t k = 0; k < n; k++) row[k] = xm->p[(s * TILE_K + k) * xm->ld + m];
                src = row;
            }
            rows[m] = bf16x32(src, k_len - s * TILE_K);
        }
        transpose16x16(rows, cols);
        __m512i *t = (__m512i *)(dst + s * TILE_ELEMS);
        for (int p = 0; p < 16; p++) _mm512_store_si512(t + p, cols[p]);
    }
}

/* Where a unit reads its 16 weight rows at step s: in place, or from `pad`
 * (16 rows of TILE_K, zero filled) when the tile runs past N or the step
 * past K. Returns the pointer and sets *stride (bytes). */
AMX_TARGET static const uint16_t *few_weight_tile(const uint16_t *w, int64_t ldw, int64_t n_out,
                                                  int64_t k_len, int64_t n0, int64_t s,
                                                  uint16_t *pad, int64_t *stride) {
    int64_t k0 = s * TILE_K;
    if (n0 + 16 <= n_out && k0 + TILE_K <= k_len) {
        *stride = ldw * (int64_t)sizeof(uint16_t);
        return w + n0 * ldw + k0;
    }
    for (int i = 0; i < 16; i++) {
        int64_t n = n0 + i;
        __m512i v = n < n_out ? weight_row32(w + n * ldw, k0, k_len, false) : _mm512_setzero_si512();
        _mm512_store_si512(pad + i * TILE_K, v);
    }
    *stride = 64;
    return pad;
}

/* One unit: weight rows n0 .. n0 + 16 (fewer at the end of N) against every
 * step of x. The C tile starts from the bias, as in loom_linear_amx; `out`
 * is 16 x 16 floats of scratch. */
AMX_TARGET static void few_unit(float *c, int64_t m_len, const uint16_t *xp, int64_t ksteps,
                                const uint16_t *w, int64_t ldw, int64_t n_out, int64_t k_len,
                                const float *bias, int64_t n0, uint16_t *pad, float *out) {
    int64_t rows = n_out - n0 < 16 ? n_out - n0 : 16;
    /* the starting tile: row i contains 16 copies of the bias of output n0 + i */
    for (int i = 0; i < 16; i++)
        _mm512_store_ps(out + i * 16, _mm512_set1_ps(bias && i < rows ? bias[n0 + i] : 0.0f));
    _tile_loadd(0, out, 64);
    bool whole = rows == 16;
    for (int64_t s = 0; s < ksteps; s++) {
        /* FEW_PREFETCH steps ahead: this unit's rows, and near the end of
         * the rows the start of the next unit's, which the thread usually
         * takes next (short rows would otherwise start every unit on a miss) */
        int64_t ahead = (s + FEW_PREFETCH) * TILE_K;
        if (whole && ahead < k_len) {
            for (int i = 0; i < 16; i++)
                _mm_prefetch((const char *)(w + (n0 + i) * ldw + ahead), _MM_HINT_T0);
        } else if (whole && n0 + 32 <= n_out && ahead - k_len < TILE_K * FEW_PREFETCH) {
            for (int i = 0; i < 16; i++)
                _mm_prefetch((const char *)(w + (n0 + 16 + i) * ldw + (ahead - k_len)), _MM_HINT_T0);
        }
        int64_t stride;
        const uint16_t *a = few_weight_tile(w, ldw, n_out, k_len, n0, s, pad, &stride);
        _tile_loadd(4, xp + s * TILE_ELEMS, 64);
        _tile_loadd(5, a, stride);
        _tile_dpbf16ps(0, 5, 4);
    }
    _tile_stored(0, out, 64);
    /* out row i is weight row n0 + i across the x rows: write it as a column of C */
    for (int64_t m = 0; m < m_len; m++)
        for (int64_t i = 0; i < rows; i++) c[m * n_out + n0 + i] = out[i * 16 + m];
}

/* Four units at once (64 weight rows), for weights small enough to stay in
 * the caches, where tile loads rather than memory bound the kernel: the four
 * C tiles share each x tile, in runs of FEW_KRUN steps per tile. Each C tile
 * still sums its steps in order, so the bits are those of few_unit. */
AMX_TARGET static void few_unit4(float *c, int64_t m_len, const uint16_t *xp, int64_t ksteps,
                                 const uint16_t *w, int64_t ldw, int64_t n_out, int64_t k_len,
                                 const float *bias, int64_t n0, uint16_t *pad, float *out) {
    int ntiles = (int)((n_out - n0 + 15) / 16);
    if (ntiles > 4) ntiles = 4;
    int64_t n_len = n_out - n0 < 64 ? n_out - n0 : 64;
    for (int i = 0; i < ntiles * 16; i++)
        _mm512_store_ps(out + i * 16, _mm512_set1_ps(bias && i < n_len ? bias[n0 + i] : 0.0f));
    _tile_loadd(0, out, 64);
    if (ntiles > 1) _tile_loadd(1, out + 256, 64);
    if (ntiles > 2) _tile_loadd(2, out + 512, 64);
    if (ntiles > 3) _tile_loadd(3, out + 768, 64);
    for (int64_t s0 = 0; s0 < ksteps; s0 += FEW_KRUN) {
        int64_t s1 = s0 + FEW_KRUN < ksteps ? s0 + FEW_KRUN : ksteps, st;
        /* C tile CT += the weight tile (loaded into AT) of rows n0 + 16 J over
         * steps s0 .. s1; tile numbers are immediates, hence the macro */
#define FEW_RUN(CT, AT, J)                                                                        \
    for (int64_t s = s0; s < s1; s++) {                                                           \
        _tile_loadd(4, xp + s * TILE_ELEMS, 64);                                                  \
        _tile_loadd(AT, few_weight_tile(w, ldw, n_out, k_len, n0 + 16 * (J), s,                   \
                                        pad + (J) * TILE_ELEMS, &st),                             \
                    st);                                                                          \
        _tile_dpbf16ps(CT, AT, 4);                                                                \
    }
        FEW_RUN(0, 5, 0)
        if (ntiles > 1) FEW_RUN(1, 6, 1)
        if (ntiles > 2) FEW_RUN(2, 7, 2)
        if (ntiles > 3) FEW_RUN(3, 5, 3)
#undef FEW_RUN
    }
    _tile_stored(0, out, 64);
    if (ntiles > 1) _tile_stored(1, out + 256, 64);
    if (ntiles > 2) _tile_stored(2, out + 512, 64);
    if (ntiles > 3) _tile_stored(3, out + 768, 64);
    for (int64_t m = 0; m < m_len; m++)
        for (int64_t i = 0; i < n_len; i++) c[m * n_out + n0 + i] = out[i * 16 + m];
}

int loom_linear_amx_few(float *c, const loom_blas_mat *xm, const uint16_t *w, int64_t ldw,
                        int64_t n_out, const float *bias) {
    int64_t m_len = xm->rows, k_len = xm->cols;
    if (m_len > LOOM_AMX_FEW_MAX_ROWS)
        return loom_error("linear: the few-row AMX kernel takes at most %d rows, got %lld",
                          LOOM_AMX_FEW_MAX_ROWS, (long long)m_len);
    int64_t ksteps = (k_len + TILE_K - 1) / TILE_K;
    bool cached = n_out * k_len * (int64_t)sizeof(uint16_t) <= FEW_CACHED_BYTES;
    int64_t unit_rows = cached ? 64 : 16;
    int64_t units = (n_out + unit_rows - 1) / unit_rows;
    int chunk = cached ? 2 : FEW_CHUNK;
    int nt = n_out * k_len >= LOOM_PARALLEL_MIN_ELEMS ? omp_get_max_threads() : 1;

    uint16_t *xp = loom_alloc((size_t)ksteps * TILE_ELEMS * sizeof(uint16_t));
    uint16_t *pad = loom_alloc((size_t)nt * 4 * TILE_ELEMS * sizeof(uint16_t));
    float *out = loom_alloc((size_t)nt * 4 * 256 * sizeof(float));
    float *row = loom_alloc(TILE_K * sizeof(float));
    int rc = LOOM_OK;
    if (xp == NULL || pad == NULL || out == NULL || row == NULL) {
        rc = loom_error_prefix("linear");
    } else {
        pack_x_few(xp, xm, ksteps, row);
#pragma omp parallel num_threads(nt)
        {
            int t = omp_get_thread_num();
            tile_setup();
#pragma omp for schedule(dynamic, chunk)
            for (int64_t u = 0; u < units; u++)
                (cached ? few_unit4 : few_unit)(c, m_len, xp, ksteps, w, ldw, n_out, k_len, bias,
                                                u * unit_rows, pad + (size_t)t * 4 * TILE_ELEMS,
                                                out + (size_t)t * 4 * 256);
            /* The tiles stay configured: releasing them at the end of every call cost
             * about 20 us on the next call (2048 x 2048, one row, a fifth of the call). */
        }
    }
    loom_free(xp);
    loom_free(pad);
    loom_free(out);
    loom_free(row);
    return rc;
}
