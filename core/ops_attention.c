/* Scaled dot-product attention (grouped-query heads, causal, masks, KV-cache
 * views), the KV cache (f32 or bf16), rotary position embeddings and MPT's
 * ALiBi bias. Scores follow PyTorch's eager attention in f32:
 * softmax(q @ k^T * scale + mask) @ v, with the row maximum subtracted. On
 * the bf16 linear path with AMX, queries in groups of 4 or more take bf16
 * operands with f32 sums instead (attend_amx). */
#include <immintrin.h>
#include <math.h>
#include <omp.h>

#include "ops_blas.h"
#include "ops_internal.h"
#include "ops_linear_internal.h"

/* Query rows per sgemm block: bounds the scores buffer at ATTN_QBLOCK x K. */
#define ATTN_QBLOCK 256
/* Queries per (batch, head) below which plain loops replace sgemm. */
#define ATTN_GEMM_MIN_Q 4

/* ---- exp for the softmax */

/* e^x for 16 floats: x = n ln2 + r with |r| <= ln2 / 2 (Cody-Waite split of
 * ln2), a degree-7 Taylor polynomial for e^r and a scaling by 2^n through
 * vscalefps, which also rounds subnormal results. Against exp in double it
 * was within 0.92 ulp on every 64th float of [-87, 88.5]. -inf gives 0. */
__attribute__((target("avx512f"))) static inline __m512 exp16(__m512 x) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2_hi = _mm512_set1_ps(0.693145751953125f);
    const __m512 ln2_lo = _mm512_set1_ps(1.42860682030941723212e-6f);
    __mmask16 neg_inf = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(89.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
    r = _mm512_fnmadd_ps(n, ln2_lo, r);
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps((__mmask16)~neg_inf, _mm512_scalef_ps(p, n));
}

/* s[j] = exp(s[j] - max) for j < n; returns their sum. */
__attribute__((target("avx512f"))) static float exp_sub_sum_avx512(float *s, int64_t n, float max) {
    __m512 vmax = _mm512_set1_ps(max), sum = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), vmax));
        _mm512_storeu_ps(s + j, e);
        sum = _mm512_add_ps(sum, e);
    }
    if (j < n) {
        __mmask16 m = (__mmask16)((1u << (n - j)) - 1);
        __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), vmax));
        _mm512_mask_storeu_ps(s + j, m, e);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
    }
    return _mm512_reduce_add_ps(sum);
}

/* max(s[0 .. n)), -inf when n is 0; four accumulators hide vmaxps latency. */
__attribute__((target("avx512f"))) static float max_avx512(const float *s, int64_t n) {
    __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
    int64_t j = 0;
    for (; j + 64 <= n; j += 64) {
        m0 = _mm512_max_ps(m0, _mm512_loadu_ps(s + j));
        m1 = _mm512_max_ps(m1, _mm512_loadu_ps(s + j + 16));
        m2 = _mm512_max_ps(m2, _mm512_loadu_ps(s + j + 32));
        m3 = _mm512_max_ps(m3, _mm512_loadu_ps(s + j + 48));
    }
    for (; j + 16 <= n; j += 16) m0 = _mm512_max_ps(m0, _mm512_loadu_ps(s + j));
    if (j < n) {
        __mmask16 m = (__mmask16)((1u << (n - j)) - 1);
        m1 = _mm512_mask_max_ps(m1, m, m1, _mm512_maskz_loadu_ps(m, s + j));
    }
    return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
}

static bool cpu_has_avx512f(void) {
    return __builtin_cpu_supports("avx512f");
}

static float exp_sub_sum(float *s, int64_t n, float max) {
    if (cpu_has_avx512f()) return exp_sub_sum_avx512(s, n, max);
    float sum = 0;
    for (int64_t j = 0; j < n; j++) {
        s[j] = expf(s[j] - max);
        sum += s[j];
    }
    return sum;
}

/* ---- masks */

/* The attention mask seen as (B, Hq, Q, K) with strides in elements (0 on
 * broadcast dimensions). */
typedef struct attn_mask {
    const char *base;
    loom_dtype dtype;
    int64_t esize;
    int64_t stride[4];
} attn_mask;

static int attn_mask_init(attn_mask *m, const loom_tensor *mask, const int64_t *full) {
    if (loom_check_input("attention", "mask", mask)) return LOOM_ERR;
    if (!loom_dtype_is_float(mask->dtype) && mask->dtype != LOOM_U8)
        return loom_error("attention: 'mask' must be an additive float tensor or a u8 keep-mask, "
                          "got %s",
                          loom_shape_str(mask).s);
    bool ok = mask->ndim <= 4;
    for (int d = 0; ok && d < mask->ndim; d++) {
        int64_t size = mask->shape[d], want = full[4 - mask->ndim + d];
        ok = size == 1 || size == want;
    }
    if (!ok)
        return loom_error("attention: 'mask' %s cannot be broadcast to (B, Hq, Q, K) = %s",
                          loom_shape_str(mask).s, loom_dims_str(4, full).s);
    m->base = loom_tensor_data(mask);
    m->dtype = mask->dtype;
    m->esize = (int64_t)loom_dtype_size(mask->dtype);
    for (int d = 0; d < 4; d++) {
        int md = d - (4 - mask->ndim);
        m->stride[d] = md >= 0 && mask->shape[md] != 1 ? mask->strides[md] : 0;
    }
    return LOOM_OK;
}

/* ---- one softmax row */

typedef struct attn_params {
    int64_t batch, hq, hkv, nq, nk, d, dv;
    float scale;
    bool causal;
    const attn_mask *mask; /* NULL for none */
} attn_params;

/* Turn s[0 .. K) (scaled scores of query qi of batch b, head h) into
 * probabilities in place: add the mask, exclude keys past the causal limit
 * and where a u8 mask is zero, subtract the maximum, exponentiate and
 * normalise. A row with every key excluded becomes zeros. */
static void softmax_row(float *s, const attn_params *ap, int64_t b, int64_t h, int64_t qi) {
    int64_t nk = ap->nk;
    int64_t limit = ap->causal ? qi + (nk - ap->nq) : nk - 1; /* last visible key */
    if (limit > nk - 1) limit = nk - 1;
    if (limit < -1) limit = -1;
    for (int64_t j = limit + 1; j < nk; j++) s[j] = -INFINITY;

    const attn_mask *m = ap->mask;
    if (m) {
        const char *row = m->base + (b * m->stride[0] + h * m->stride[1] + qi * m->stride[2]) * m->esize;
        int64_t step = m->stride[3] * m->esize;
        if (m->dtype == LOOM_U8) {
            for (int64_t j = 0; j <= limit; j++)
                if (((const uint8_t *)row)[j * m->stride[3]] == 0) s[j] = -INFINITY;
        } else if (m->dtype == LOOM_F32 && m->stride[3] == 1) {
            const float *mf = (const float *)row;
#pragma omp simd
            for (int64_t j = 0; j <= limit; j++) s[j] += mf[j];
        } else {
            for (int64_t j = 0; j <= limit; j++) s[j] += loom_load_f32(row + j * step, m->dtype);
        }
    }

    float max = -INFINITY;
    if (cpu_has_avx512f()) {
        max = max_avx512(s, limit + 1);
    } else {
        for (int64_t j = 0; j <= limit; j++) max = s[j] > max ? s[j] : max;
    }
    if (max == -INFINITY) {
        memset(s, 0, (size_t)nk * sizeof(float));
        return;
    }
    float sum = limit >= 0 ? exp_sub_sum(s, limit + 1, max) : 0.0f;
    float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t j = 0; j <= limit; j++) s[j] *= inv;
    for (int64_t j = limit + 1; j < nk; j++) s[j] = 0.0f;
}

/* ---- the two ways of computing one (batch, head) */

/* An operand (B, H, N, C) by element strides: f32, or bf16 for keys and
 * values on the loop route, which widens them in registers. */
typedef struct attn_operand {
    const void *p;
    loom_dtype dtype;
    int64_t s[4];
} attn_operand;

static const void *operand_at(const attn_operand *o, int64_t b, int64_t h) {
    int64_t esize = (int64_t)loom_dtype_size(o->dtype);
    return (const char *)o->p + (b * o->s[0] + h * o->s[1]) * esize;
}

/* With sgemm: scores for ATTN_QBLOCK queries at a time, then P @ V. */
static void attend_gemm(float *out, const attn_params *ap, const attn_operand *q,
                        const attn_operand *k, const attn_operand *v, int64_t b, int64_t h,
                        float *scores) {
    int64_t kvh = h / (ap->hq / ap->hkv);
    const float *qp = operand_at(q, b, h), *kp = operand_at(k, b, kvh), *vp = operand_at(v, b, kvh);
    for (int64_t i0 = 0; i0 < ap->nq; i0 += ATTN_QBLOCK) {
        int64_t nb = ap->nq - i0 < ATTN_QBLOCK ? ap->nq - i0 : ATTN_QBLOCK;
        loom_blas_mat qm, ktm, pm, vm;
        if (ap->d > 0) {
            loom_blas_view(&qm, qp + i0 * q->s[2], nb, ap->d, q->s[2], q->s[3]);
            loom_blas_view(&ktm, kp, ap->d, ap->nk, k->s[3], k->s[2]);
            loom_sgemm(&qm, &ktm, scores, ap->nk, ap->scale, 0.0f);
        } else {
            memset(scores, 0, (size_t)(nb * ap->nk) * sizeof(float));
        }
        for (int64_t i = 0; i < nb; i++) softmax_row(scores + i * ap->nk, ap, b, h, i0 + i);
        loom_blas_view(&pm, scores, nb, ap->nk, ap->nk, 1);
        loom_blas_view(&vm, vp, ap->nk, ap->dv, v->s[2], v->s[3]);
        loom_sgemm(&pm, &vm, out + i0 * ap->dv, ap->dv, 1.0f, 0.0f);
    }
}

/* Compute attend_gemm's head on AMX tiles, for the bf16 linear path. The
 * operands q, k, the probabilities and v are rounded to bf16 and the sums
 * stay f32, as the path's linear layers round their inputs. kb (nk x d) and
 * vtb (dv x nk) are scratch for this head's keys and transposed values.
 * Returns LOOM_ERR when memory runs out. */
static int attend_amx(float *out, const attn_params *ap, const attn_operand *q,
                      const attn_operand *k, const attn_operand *v, int64_t b, int64_t h,
                      float *scores, uint16_t *kb, uint16_t *vtb) {
    int64_t kvh = h / (ap->hq / ap->hkv);
    const float *qp = operand_at(q, b, h), *kp = operand_at(k, b, kvh), *vp = operand_at(v, b, kvh);
    int64_t nk = ap->nk, d = ap->d, dv = ap->dv;
    /* the keys carry the scale, so the scores come out scaled (exact when
     * the scale is a power of two, as 1/sqrt(64) is) */
    for (int64_t j = 0; j < nk; j++) {
        const float *kr = kp + j * k->s[2], *vr = vp + j * v->s[2];
        for (int64_t c = 0; c < d; c++) kb[j * d + c] = loom_f32_bits_to_bf16(kr[c * k->s[3]] * ap->scale);
        for (int64_t c = 0; c < dv; c++) vtb[c * nk + j] = loom_f32_bits_to_bf16(vr[c * v->s[3]]);
    }
    for (int64_t i0 = 0; i0 < ap->nq; i0 += ATTN_QBLOCK) {
        int64_t nb = ap->nq - i0 < ATTN_QBLOCK ? ap->nq - i0 : ATTN_QBLOCK;
        loom_blas_mat qm, pm;
        loom_blas_view(&qm, qp + i0 * q->s[2], nb, d, q->s[2], q->s[3]);
        if (loom_linear_amx(scores, &qm, kb, d, LOOM_BF16, nk, NULL)) return LOOM_ERR;
        for (int64_t i = 0; i < nb; i++) softmax_row(scores + i * nk, ap, b, h, i0 + i);
        loom_blas_view(&pm, scores, nb, nk, nk, 1);
        if (loom_linear_amx(out + i0 * dv, &pm, vtb, nk, LOOM_BF16, dv, NULL)) return LOOM_ERR;
    }
    return LOOM_OK;
}

/* ---- the loop kernels, for f32 keys and values and for bf16 ones (a bf16
 * KV cache)
 *
 * One template defines both. The bf16 kernels widen 16 bf16 values to f32
 * in registers, since a bf16 is the top half of an f32, and then run the
 * f32 kernels' operations in the same order. Their results therefore equal
 * the f32 kernels' over the widened values bit for bit. */

#define AVX512_BF16_LOADS "avx512f,avx512bw,avx512vl"

__attribute__((target("avx512f"))) static inline __m512 load16_f32(const float *p) {
    return _mm512_loadu_ps(p);
}

__attribute__((target("avx512f"))) static inline __m512 maskz_load16_f32(__mmask16 m, const float *p) {
    return _mm512_maskz_loadu_ps(m, p);
}

__attribute__((target(AVX512_BF16_LOADS))) static inline __m512 load16_bf16(const uint16_t *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

/* As load16_bf16 for the lanes set in m. The other lanes read nothing and are 0. */
__attribute__((target(AVX512_BF16_LOADS))) static inline __m512 maskz_load16_bf16(__mmask16 m,
                                                                                 const uint16_t *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

static inline float value_f32(float x) {
    return x;
}

/* The kernels for keys and values of type ELEM, read with TYPE's loads:
 *   scores_TYPE_avx512   s[j] = scale * dot(q, k_j) for nk key rows ldk
 *                        elements apart, unit inner stride, four keys at a time
 *   weighted_sum_TYPE_avx512  o[0 .. dv) = sum over j of p[j] * v_j, value rows
 *                        ldv elements apart, unit inner stride, 64 columns at a
 *                        time (rows with p[j] == 0 skipped)
 *   scores_TYPE_strided, weighted_sum_TYPE_strided  the same for any strides */
#define DEFINE_LOOP_KERNELS(TYPE, TARGET, ELEM)                                                  \
    __attribute__((target(TARGET))) static void scores_##TYPE##_avx512(                          \
        float *s, const float *q, const ELEM *k, int64_t ldk, int64_t nk, int64_t d, float scale) { \
        __mmask16 tail = (__mmask16)((1u << (d % 16)) - 1);                                       \
        int64_t dfull = d - d % 16;                                                               \
        int64_t j = 0;                                                                            \
        for (; j + 4 <= nk; j += 4) {                                                             \
            const ELEM *k0 = k + j * ldk;                                                         \
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                           \
            for (int64_t c = 0; c < dfull; c += 16) {                                             \
                __m512 qv = _mm512_loadu_ps(q + c);                                               \
                a0 = _mm512_fmadd_ps(qv, load16_##TYPE(k0 + c), a0);                              \
                a1 = _mm512_fmadd_ps(qv, load16_##TYPE(k0 + ldk + c), a1);                        \
                a2 = _mm512_fmadd_ps(qv, load16_##TYPE(k0 + 2 * ldk + c), a2);                    \
                a3 = _mm512_fmadd_ps(qv, load16_##TYPE(k0 + 3 * ldk + c), a3);                    \
            }                                                                                     \
            if (tail) {                                                                           \
                __m512 qv = _mm512_maskz_loadu_ps(tail, q + dfull);                               \
                a0 = _mm512_fmadd_ps(qv, maskz_load16_##TYPE(tail, k0 + dfull), a0);              \
                a1 = _mm512_fmadd_ps(qv, maskz_load16_##TYPE(tail, k0 + ldk + dfull), a1);        \
                a2 = _mm512_fmadd_ps(qv, maskz_load16_##TYPE(tail, k0 + 2 * ldk + dfull), a2);    \
                a3 = _mm512_fmadd_ps(qv, maskz_load16_##TYPE(tail, k0 + 3 * ldk + dfull), a3);    \
            }                                                                                     \
            s[j] = _mm512_reduce_add_ps(a0) * scale;                                              \
            s[j + 1] = _mm512_reduce_add_ps(a1) * scale;                                          \
            s[j + 2] = _mm512_reduce_add_ps(a2) * scale;                                          \
            s[j + 3] = _mm512_reduce_add_ps(a3) * scale;                                          \
        }                                                                                         \
        for (; j < nk; j++) {                                                                     \
            const ELEM *kj = k + j * ldk;                                                         \
            __m512 a = _mm512_setzero_ps();                                                       \
            for (int64_t c = 0; c < dfull; c += 16)                                               \
                a = _mm512_fmadd_ps(_mm512_loadu_ps(q + c), load16_##TYPE(kj + c), a);            \
            if (tail)                                                                             \
                a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, q + dfull),                       \
                                    maskz_load16_##TYPE(tail, kj + dfull), a);                    \
            s[j] = _mm512_reduce_add_ps(a) * scale;                                               \
        }                                                                                         \
    }                                                                                             \
                                                                                                  \
    __attribute__((target(TARGET))) static void weighted_sum_##TYPE##_avx512(                    \
        float *o, const float *p, const ELEM *v, int64_t ldv, int64_t nk, int64_t dv) {           \
        for (int64_t c0 = 0; c0 < dv; c0 += 64) {                                                 \
            __mmask16 m[4];                                                                       \
            for (int i = 0; i < 4; i++) {                                                         \
                int64_t left = dv - c0 - 16 * i;                                                  \
                m[i] = 0;                                                                         \
                if (left >= 16)                                                                   \
                    m[i] = 0xFFFF;                                                                \
                else if (left > 0)                                                                \
                    m[i] = (__mmask16)((1u << left) - 1);                                         \
            }                                                                                     \
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                           \
            for (int64_t j = 0; j < nk; j++) {                                                    \
                if (p[j] == 0.0f) continue;                                                       \
                __m512 pj = _mm512_set1_ps(p[j]);                                                 \
                const ELEM *vj = v + j * ldv + c0;                                                \
                a0 = _mm512_fmadd_ps(pj, maskz_load16_##TYPE(m[0], vj), a0);                      \
                a1 = _mm512_fmadd_ps(pj, maskz_load16_##TYPE(m[1], vj + 16), a1);                 \
                a2 = _mm512_fmadd_ps(pj, maskz_load16_##TYPE(m[2], vj + 32), a2);                 \
                a3 = _mm512_fmadd_ps(pj, maskz_load16_##TYPE(m[3], vj + 48), a3);                 \
            }                                                                                     \
            _mm512_mask_storeu_ps(o + c0, m[0], a0);                                              \
            _mm512_mask_storeu_ps(o + c0 + 16, m[1], a1);                                         \
            _mm512_mask_storeu_ps(o + c0 + 32, m[2], a2);                                         \
            _mm512_mask_storeu_ps(o + c0 + 48, m[3], a3);                                         \
        }                                                                                         \
    }                                                                                             \
                                                                                                  \
    static void scores_##TYPE##_strided(float *s, const float *q, int64_t qs, const ELEM *k,      \
                                        int64_t ldk, int64_t ks, int64_t nk, int64_t d,           \
                                        float scale) {                                            \
        for (int64_t j = 0; j < nk; j++) {                                                        \
            const ELEM *kj = k + j * ldk;                                                         \
            float dot = 0;                                                                        \
            for (int64_t c = 0; c < d; c++) dot += q[c * qs] * value_##TYPE(kj[c * ks]);          \
            s[j] = dot * scale;                                                                   \
        }                                                                                         \
    }                                                                                             \
                                                                                                  \
    static void weighted_sum_##TYPE##_strided(float *o, const float *p, const ELEM *v,            \
                                              int64_t ldv, int64_t vs, int64_t nk, int64_t dv) {  \
        memset(o, 0, (size_t)dv * sizeof(float));                                                 \
        for (int64_t j = 0; j < nk; j++) {                                                        \
            if (p[j] == 0.0f) continue;                                                           \
            const ELEM *vj = v + j * ldv;                                                         \
            for (int64_t c = 0; c < dv; c++) o[c] += p[j] * value_##TYPE(vj[c * vs]);             \
        }                                                                                         \
    }

#define value_bf16 loom_bf16_bits_to_f32
DEFINE_LOOP_KERNELS(f32, "avx512f", float)
DEFINE_LOOP_KERNELS(bf16, AVX512_BF16_LOADS, uint16_t)
#undef value_bf16

static bool cpu_has_avx512_bf16_loads(void) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
}

/* Scores of one query row against nk keys of k (f32 or bf16).
 * NOTE: on a CPU with AVX-512F but without BW or VL, bf16 keys take the
 * portable loop while f32 keys take the vector kernel, so the two sum in a
 * different order and agree only to f32 rounding. */
static void attend_scores(float *s, const float *qi, int64_t qs, const attn_operand *k,
                          const void *kp, const attn_params *ap) {
    if (k->dtype == LOOM_BF16) {
        if (qs == 1 && k->s[3] == 1 && cpu_has_avx512_bf16_loads())
            scores_bf16_avx512(s, qi, kp, k->s[2], ap->nk, ap->d, ap->scale);
        else
            scores_bf16_strided(s, qi, qs, kp, k->s[2], k->s[3], ap->nk, ap->d, ap->scale);
    } else if (qs == 1 && k->s[3] == 1 && cpu_has_avx512f()) {
        scores_f32_avx512(s, qi, kp, k->s[2], ap->nk, ap->d, ap->scale);
    } else {
        scores_f32_strided(s, qi, qs, kp, k->s[2], k->s[3], ap->nk, ap->d, ap->scale);
    }
}

/* o = p @ v for one row of probabilities over nk values of v (f32 or bf16). */
static void attend_values(float *o, const float *p, const attn_operand *v, const void *vp,
                          const attn_params *ap) {
    if (v->dtype == LOOM_BF16) {
        if (v->s[3] == 1 && cpu_has_avx512_bf16_loads())
            weighted_sum_bf16_avx512(o, p, vp, v->s[2], ap->nk, ap->dv);
        else
            weighted_sum_bf16_strided(o, p, vp, v->s[2], v->s[3], ap->nk, ap->dv);
    } else if (v->s[3] == 1 && cpu_has_avx512f()) {
        weighted_sum_f32_avx512(o, p, vp, v->s[2], ap->nk, ap->dv);
    } else {
        weighted_sum_f32_strided(o, p, vp, v->s[2], v->s[3], ap->nk, ap->dv);
    }
}

/* With loops, for few queries (decoding): dot products, softmax, then a
 * weighted sum of value rows. `scores` has room for K floats. */
static void attend_loops(float *out, const attn_params *ap, const attn_operand *q,
                         const attn_operand *k, const attn_operand *v, int64_t b, int64_t h,
                         float *scores) {
    int64_t kvh = h / (ap->hq / ap->hkv);
    const float *qp = operand_at(q, b, h);
    const void *kp = operand_at(k, b, kvh), *vp = operand_at(v, b, kvh);
    for (int64_t i = 0; i < ap->nq; i++) {
        attend_scores(scores, qp + i * q->s[2], q->s[3], k, kp, ap);
        softmax_row(scores, ap, b, h, i);
        attend_values(out + i * ap->dv, scores, v, vp, ap);
    }
}

/* ---- loom_attention */

static int check_attention(const loom_tensor *q, const loom_tensor *k, const loom_tensor *v) {
    if (loom_check_float_input("attention", "q", q) || loom_check_float_input("attention", "k", k) ||
        loom_check_float_input("attention", "v", v))
        return LOOM_ERR;
    if (q->ndim != 4 || k->ndim != 4 || v->ndim != 4)
        return loom_error("attention: q, k and v must be 4-D (B, H, T, D), got 'q' %s, 'k' %s, "
                          "'v' %s",
                          loom_shape_str(q).s, loom_shape_str(k).s, loom_shape_str(v).s);
    if (k->shape[0] != q->shape[0] || k->shape[3] != q->shape[3])
        return loom_error("attention: 'k' %s does not match 'q' %s (expected [%lld, *, *, %lld])",
                          loom_shape_str(k).s, loom_shape_str(q).s, (long long)q->shape[0],
                          (long long)q->shape[3]);
    if (v->shape[0] != k->shape[0] || v->shape[1] != k->shape[1] || v->shape[2] != k->shape[2])
        return loom_error("attention: 'v' %s does not match 'k' %s (expected [%lld, %lld, %lld, *])",
                          loom_shape_str(v).s, loom_shape_str(k).s, (long long)k->shape[0],
                          (long long)k->shape[1], (long long)k->shape[2]);
    if (k->shape[1] == 0 || q->shape[1] % k->shape[1] != 0)
        return loom_error("attention: 'q' has %lld heads, not a multiple of the %lld key/value heads "
                          "of 'k' %s",
                          (long long)q->shape[1], (long long)k->shape[1], loom_shape_str(k).s);
    if (q->shape[2] > INT_MAX || k->shape[2] > INT_MAX || q->shape[3] > INT_MAX ||
        v->shape[3] > INT_MAX)
        return loom_error("attention: 'q' %s or 'k' %s is too large for BLAS (dimensions above %d)",
                          loom_shape_str(q).s, loom_shape_str(k).s, INT_MAX);
    return LOOM_OK;
}

/* Set *o to t's data and strides. t is converted into an f32 *copy when it
 * is neither f32 nor a bf16 operand that the loop route may read in place
 * (keep_bf16). On the sgemm route it is also converted when its last two
 * strides do not suit BLAS. */
static int attn_operand_init(attn_operand *o, loom_tensor *copy, const loom_tensor *t, bool gemm,
                             bool transposed, bool keep_bf16) {
    bool ok = t->dtype == LOOM_F32 || (keep_bf16 && !gemm && t->dtype == LOOM_BF16);
    if (ok && gemm) {
        loom_blas_mat probe;
        int64_t rows = t->shape[2], cols = t->shape[3], rs = t->strides[2], cs = t->strides[3];
        ok = transposed ? loom_blas_view(&probe, NULL, cols, rows, cs, rs)
                        : loom_blas_view(&probe, NULL, rows, cols, rs, cs);
    }
    if (!ok) {
        if (loom_tensor_to(copy, t, LOOM_F32)) return LOOM_ERR;
        t = copy;
    }
    o->p = loom_tensor_data(t);
    o->dtype = t->dtype;
    for (int d = 0; d < 4; d++) o->s[d] = t->strides[d];
    return LOOM_OK;
}

static int attention_compute(float *out, const attn_params *ap, const loom_tensor *q,
                             const loom_tensor *k, const loom_tensor *v) {
    bool gemm = ap->nq >= ATTN_GEMM_MIN_Q;
    loom_tensor qc = LOOM_TENSOR_EMPTY, kc = LOOM_TENSOR_EMPTY, vc = LOOM_TENSOR_EMPTY;
    attn_operand qo, ko, vo;
    int rc = LOOM_OK;
    if (attn_operand_init(&qo, &qc, q, gemm, false, false) ||
        attn_operand_init(&ko, &kc, k, gemm, true, true) ||
        attn_operand_init(&vo, &vc, v, gemm, false, true))
        rc = LOOM_ERR;

    int64_t pairs = ap->batch * ap->hq;
    if (rc == LOOM_OK && ap->nk == 0) {
        /* No keys: every query row is fully masked. */
        memset(out, 0, (size_t)(pairs * ap->nq * ap->dv) * sizeof(float));
    } else if (rc == LOOM_OK && gemm) {
        /* Heads go to the threads, each running its own sgemm calls on one
         * thread (OpenBLAS's OpenMP build does so inside a parallel region)
         * and its own softmax. That beat one head at a time with threaded
         * sgemm and a serial softmax: 1.7 against 4.4 ms for 16 heads of 257
         * queries on 2 cores, and far more when another process had the
         * cores busy, since every threaded sgemm then waits for its slowest
         * thread. With too few heads to share out evenly, OpenBLAS threads
         * each sgemm as before. */
        int64_t qb = ap->nq < ATTN_QBLOCK ? ap->nq : ATTN_QBLOCK;
        int nt = omp_get_max_threads();
        if (pairs % nt != 0 && pairs < 4 * (int64_t)nt) nt = 1;
        /* On the bf16 path with AMX both products run on tiles (per thread:
         * the head's keys and transposed values in bf16). */
        bool amx = ap->d > 0 && loom_get_linear_path() == LOOM_PATH_BF16 &&
                   loom_linear_bf16_kernel() == LOOM_BF16_KERNEL_AMX;
        size_t head16 = amx ? (size_t)(ap->nk * (ap->d + ap->dv)) : 0;
        float *scores = loom_alloc((size_t)nt * (size_t)(qb * ap->nk) * sizeof(float));
        uint16_t *heads16 = amx ? loom_alloc((size_t)nt * head16 * sizeof(uint16_t)) : NULL;
        if (scores == NULL || (amx && heads16 == NULL)) {
            rc = loom_error_prefix("attention");
        } else {
            int failed = 0;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) reduction(| : failed)
            for (int64_t bh = 0; bh < pairs; bh++) {
                int t = omp_get_thread_num();
                float *s = scores + (size_t)t * (size_t)(qb * ap->nk);
                if (amx) {
                    uint16_t *kb = heads16 + (size_t)t * head16;
                    failed |= attend_amx(out + bh * ap->nq * ap->dv, ap, &qo, &ko, &vo, bh / ap->hq,
                                         bh % ap->hq, s, kb, kb + ap->nk * ap->d) != LOOM_OK;
                } else {
                    attend_gemm(out + bh * ap->nq * ap->dv, ap, &qo, &ko, &vo, bh / ap->hq, bh % ap->hq, s);
                }
            }
            if (failed) rc = loom_error_prefix("attention");
        }
        loom_free(scores);
        loom_free(heads16);
    } else if (rc == LOOM_OK) {
        int nt = pairs * ap->nq * ap->nk * (ap->d + ap->dv) >= LOOM_PARALLEL_MIN_ELEMS
                     ? omp_get_max_threads()
                     : 1;
        int64_t nk1 = ap->nk;
        float *scores = loom_alloc((size_t)(nt * nk1) * sizeof(float));
        if (scores == NULL) {
            rc = loom_error_prefix("attention");
        } else {
#pragma omp parallel for num_threads(nt) schedule(static)
            for (int64_t bh = 0; bh < pairs; bh++)
                attend_loops(out + bh * ap->nq * ap->dv, ap, &qo, &ko, &vo, bh / ap->hq,
                             bh % ap->hq, scores + (int64_t)omp_get_thread_num() * nk1);
        }
        loom_free(scores);
    }
    loom_tensor_free(&qc);
    loom_tensor_free(&kc);
    loom_tensor_free(&vc);
    return rc;
}

int loom_attention(loom_tensor *out, const loom_tensor *q, const loom_tensor *k,
                   const loom_tensor *v, const loom_attention_opts *opts) {
    if (check_attention(q, k, v)) return LOOM_ERR;
    attn_params ap = {
        .batch = q->shape[0], .hq = q->shape[1], .hkv = k->shape[1], .nq = q->shape[2],
        .nk = k->shape[2], .d = q->shape[3], .dv = v->shape[3],
        .causal = opts && opts->causal,
    };
    ap.scale = opts && opts->scale != 0.0f ? opts->scale
               : ap.d > 0                  ? (float)(1.0 / sqrt((double)ap.d))
                                           : 1.0f;
    attn_mask mask;
    if (opts && opts->mask) {
        int64_t full[4] = {ap.batch, ap.hq, ap.nq, ap.nk};
        if (attn_mask_init(&mask, opts->mask, full)) return LOOM_ERR;
        ap.mask = &mask;
    }

    int64_t shape[4] = {ap.batch, ap.hq, ap.nq, ap.dv};
    loom_tensor res;
    if (loom_out_begin(&res, out, "attention", LOOM_F32, 4, shape)) return LOOM_ERR;
    int rc = LOOM_OK;
    if (loom_tensor_numel(&res) > 0) rc = attention_compute(loom_tensor_data(&res), &ap, q, k, v);
    return loom_out_end(out, &res, rc);
}

/* ---- KV cache */

int loom_kv_cache_init(loom_kv_cache *c, int64_t batch, int64_t n_kv_heads, int64_t capacity,
                       int64_t head_dim, int64_t value_dim) {
    return loom_kv_cache_init_dtype(c, batch, n_kv_heads, capacity, head_dim, value_dim, LOOM_F32);
}

int loom_kv_cache_init_dtype(loom_kv_cache *c, int64_t batch, int64_t n_kv_heads, int64_t capacity,
                             int64_t head_dim, int64_t value_dim, loom_dtype dtype) {
    if (dtype != LOOM_F32 && dtype != LOOM_BF16)
        return loom_error("kv_cache_init: dtype must be f32 or bf16, got %s", loom_dtype_name(dtype));
    if (batch < 1 || n_kv_heads < 1 || capacity < 1 || head_dim < 1 || value_dim < 1)
        return loom_error("kv_cache_init: sizes must be positive, got batch %lld, heads %lld, "
                          "capacity %lld, head_dim %lld, value_dim %lld",
                          (long long)batch, (long long)n_kv_heads, (long long)capacity,
                          (long long)head_dim, (long long)value_dim);
    loom_kv_cache fresh = {.k = LOOM_TENSOR_EMPTY, .v = LOOM_TENSOR_EMPTY, .capacity = capacity};
    int64_t ks[4] = {batch, n_kv_heads, capacity, head_dim};
    int64_t vs[4] = {batch, n_kv_heads, capacity, value_dim};
    if (loom_tensor_zeros(&fresh.k, dtype, 4, ks) || loom_tensor_zeros(&fresh.v, dtype, 4, vs)) {
        loom_tensor_free(&fresh.k);
        return loom_error_prefix("kv_cache_init");
    }
    *c = fresh;
    return LOOM_OK;
}

/* Copy f32 src (B, H, T, C), any strides, into the bf16 cache view dst of
 * the same shape. loom_tensor_copy_into gives the same bits but converts
 * element by element through double, which made one-position appends to a
 * bf16 cache more than twice as slow as to an f32 one. */
static void copy_f32_to_bf16_rows(loom_tensor *dst, const loom_tensor *src) {
    const float *sp = loom_tensor_data(src);
    uint16_t *dp = loom_tensor_data(dst);
    int64_t n = src->shape[3], ss = src->strides[3], ds = dst->strides[3];
    for (int64_t b = 0; b < src->shape[0]; b++) {
        for (int64_t h = 0; h < src->shape[1]; h++) {
            for (int64_t t = 0; t < src->shape[2]; t++) {
                const float *srow = sp + b * src->strides[0] + h * src->strides[1] + t * src->strides[2];
                uint16_t *drow = dp + b * dst->strides[0] + h * dst->strides[1] + t * dst->strides[2];
                if (ss == 1 && ds == 1) {
                    for (int64_t i = 0; i < n; i++) drow[i] = loom_f32_bits_to_bf16(srow[i]);
                } else {
                    for (int64_t i = 0; i < n; i++) drow[i * ds] = loom_f32_bits_to_bf16(srow[i * ss]);
                }
            }
        }
    }
}

/* Copy src into the cache view dst, converting to the cache's dtype. */
static int copy_into_cache(loom_tensor *dst, const loom_tensor *src) {
    if (dst->dtype == LOOM_BF16 && src->dtype == LOOM_F32) {
        copy_f32_to_bf16_rows(dst, src);
        return LOOM_OK;
    }
    return loom_tensor_copy_into(dst, src);
}

int loom_kv_cache_append(loom_kv_cache *c, const loom_tensor *k_new, const loom_tensor *v_new,
                         loom_tensor *k_all, loom_tensor *v_all) {
    if (c->k.storage == NULL)
        return loom_error("kv_cache_append: the cache is not initialised (call loom_kv_cache_init)");
    if (loom_check_float_input("kv_cache_append", "k_new", k_new) ||
        loom_check_float_input("kv_cache_append", "v_new", v_new))
        return LOOM_ERR;
    if (k_all->storage != NULL || v_all->storage != NULL)
        return loom_error("kv_cache_append: 'k_all' and 'v_all' must be empty on entry "
                          "(free the previous views first)");
    const loom_tensor *ck = &c->k, *cv = &c->v;
    bool k_ok = k_new->ndim == 4 && k_new->shape[0] == ck->shape[0] &&
                k_new->shape[1] == ck->shape[1] && k_new->shape[3] == ck->shape[3];
    if (!k_ok)
        return loom_error("kv_cache_append: 'k_new' %s does not match the cache (expected "
                          "[%lld, %lld, T, %lld])",
                          loom_shape_str(k_new).s, (long long)ck->shape[0], (long long)ck->shape[1],
                          (long long)ck->shape[3]);
    int64_t t = k_new->shape[2];
    bool v_ok = v_new->ndim == 4 && v_new->shape[0] == cv->shape[0] &&
                v_new->shape[1] == cv->shape[1] && v_new->shape[2] == t &&
                v_new->shape[3] == cv->shape[3];
    if (!v_ok)
        return loom_error("kv_cache_append: 'v_new' %s does not match the cache (expected "
                          "[%lld, %lld, %lld, %lld])",
                          loom_shape_str(v_new).s, (long long)cv->shape[0], (long long)cv->shape[1],
                          (long long)t, (long long)cv->shape[3]);
    if (t > c->capacity - c->length)
        return loom_error("kv_cache_append: cache full (%lld filled + %lld new > capacity %lld)",
                          (long long)c->length, (long long)t, (long long)c->capacity);

    loom_tensor kdst = LOOM_TENSOR_EMPTY, vdst = LOOM_TENSOR_EMPTY;
    int rc = loom_tensor_narrow(&kdst, ck, 2, c->length, t);
    if (rc == LOOM_OK) rc = loom_tensor_narrow(&vdst, cv, 2, c->length, t);
    if (rc == LOOM_OK) rc = copy_into_cache(&kdst, k_new);
    if (rc == LOOM_OK) rc = copy_into_cache(&vdst, v_new);
    loom_tensor_free(&kdst);
    loom_tensor_free(&vdst);
    if (rc != LOOM_OK) return loom_error_prefix("kv_cache_append");

    c->length += t;
    if (loom_tensor_narrow(k_all, ck, 2, 0, c->length) ||
        loom_tensor_narrow(v_all, cv, 2, 0, c->length)) {
        loom_tensor_free(k_all);
        return loom_error_prefix("kv_cache_append");
    }
    return LOOM_OK;
}

void loom_kv_cache_free(loom_kv_cache *c) {
    if (c == NULL) return;
    loom_tensor_free(&c->k);
    loom_tensor_free(&c->v);
    c->length = 0;
    c->capacity = 0;
}

/* ---- rotary position embedding */

static int check_rope(const loom_tensor *x, const loom_tensor *positions, float theta,
                      float scaling, int rotary_dim) {
    if (loom_check_float_input("rope", "x", x) || loom_check_input("rope", "positions", positions))
        return LOOM_ERR;
    if (x->ndim != 4)
        return loom_error("rope: 'x' must be 4-D (B, H, T, D), got %s", loom_shape_str(x).s);
    if (positions->dtype != LOOM_I32 && positions->dtype != LOOM_I64)
        return loom_error("rope: 'positions' must be i32 or i64, got %s", loom_shape_str(positions).s);
    int64_t b = x->shape[0], t = x->shape[2];
    bool shape_ok = (positions->ndim == 1 && positions->shape[0] == t) ||
                    (positions->ndim == 2 && positions->shape[0] == b && positions->shape[1] == t);
    if (!shape_ok)
        return loom_error("rope: 'positions' %s does not match 'x' %s (expected [%lld] or "
                          "[%lld, %lld])",
                          loom_shape_str(positions).s, loom_shape_str(x).s, (long long)t,
                          (long long)b, (long long)t);
    if (rotary_dim <= 0 || rotary_dim % 2 != 0 || rotary_dim > x->shape[3])
        return loom_error("rope: rotary_dim %d must be even and in [2, %lld] for 'x' %s", rotary_dim,
                          (long long)x->shape[3], loom_shape_str(x).s);
    if (!(theta > 0.0f) || !isfinite(theta) || !(scaling > 0.0f) || !isfinite(scaling))
        return loom_error("rope: theta (%g) and scaling (%g) must be positive and finite",
                          (double)theta, (double)scaling);
    return LOOM_OK;
}

/* Rotate one row of D values (already f32 in `row`) into `o`. */
static void rope_row(float *o, const float *row, int64_t d, int rotary_dim, const float *cosv,
                     const float *sinv, loom_rope_style style) {
    int half = rotary_dim / 2;
    if (style == LOOM_ROPE_HALF) {
        for (int i = 0; i < half; i++) {
            float x1 = row[i], x2 = row[i + half];
            o[i] = x1 * cosv[i] - x2 * sinv[i];
            o[i + half] = x2 * cosv[i] + x1 * sinv[i];
        }
    } else {
        for (int i = 0; i < half; i++) {
            float x0 = row[2 * i], x1 = row[2 * i + 1];
            o[2 * i] = x0 * cosv[i] - x1 * sinv[i];
            o[2 * i + 1] = x1 * cosv[i] + x0 * sinv[i];
        }
    }
    for (int64_t c = rotary_dim; c < d; c++) o[c] = row[c];
}

int loom_rope(loom_tensor *out, const loom_tensor *x, const loom_tensor *positions, float theta,
              float scaling, int rotary_dim, loom_rope_style style) {
    if (check_rope(x, positions, theta, scaling, rotary_dim)) return LOOM_ERR;
    if (style != LOOM_ROPE_HALF && style != LOOM_ROPE_INTERLEAVED)
        return loom_error("rope: unknown style %d", (int)style);
    int64_t nb = x->shape[0], nh = x->shape[1], nt = x->shape[2], d = x->shape[3];
    int half = rotary_dim / 2;

    loom_tensor res;
    if (loom_out_begin(&res, out, "rope", LOOM_F32, 4, x->shape)) return LOOM_ERR;
    if (loom_tensor_numel(&res) == 0) return loom_out_end(out, &res, LOOM_OK);

    /* cos and sin per (position row, frequency), computed in f32 as Hugging
     * Face does: inv_freq = 1 / theta^(2i / rotary_dim), angle = (p / scaling) * inv_freq. */
    int64_t npos = positions->ndim == 1 ? nt : nb * nt;
    float *inv_freq = loom_alloc((size_t)half * sizeof(float));
    float *table = loom_alloc((size_t)(npos * half * 2) * sizeof(float));
    if (inv_freq == NULL || table == NULL) {
        loom_free(inv_freq);
        loom_free(table);
        return loom_out_end(out, &res, loom_error_prefix("rope"));
    }
    for (int i = 0; i < half; i++)
        inv_freq[i] = 1.0f / powf(theta, (float)(2 * i) / (float)rotary_dim);
    const char *pbase = loom_tensor_data(positions);
    int64_t psize = (int64_t)loom_dtype_size(positions->dtype);
    for (int64_t r = 0; r < npos; r++) {
        int64_t bi = positions->ndim == 1 ? 0 : r / nt, ti = positions->ndim == 1 ? r : r % nt;
        int64_t off = positions->ndim == 1 ? ti * positions->strides[0]
                                           : bi * positions->strides[0] + ti * positions->strides[1];
        float p = (float)loom_load_i64(pbase + off * psize, positions->dtype) / scaling;
        for (int i = 0; i < half; i++) {
            float angle = p * inv_freq[i];
            table[(r * 2) * half + i] = cosf(angle);
            table[(r * 2 + 1) * half + i] = sinf(angle);
        }
    }

    const char *xbase = loom_tensor_data(x);
    int64_t xsize = (int64_t)loom_dtype_size(x->dtype);
    float *o = loom_tensor_data(&res);
    int64_t rows = nb * nh * nt;
    int nthreads = rows * d >= LOOM_PARALLEL_MIN_ELEMS ? omp_get_max_threads() : 1;
    float *rowbuf = loom_alloc((size_t)(nthreads * d) * sizeof(float));
    if (rowbuf == NULL) {
        loom_free(inv_freq);
        loom_free(table);
        return loom_out_end(out, &res, loom_error_prefix("rope"));
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        int64_t bi = r / (nh * nt), hi = r / nt % nh, ti = r % nt;
        float *buf = rowbuf + (int64_t)omp_get_thread_num() * d;
        const char *src = xbase + (bi * x->strides[0] + hi * x->strides[1] + ti * x->strides[2]) * xsize;
        loom_row_load_f32(buf, src, d, x->strides[3], x->dtype);
        int64_t pr = positions->ndim == 1 ? ti : bi * nt + ti;
        rope_row(o + r * d, buf, d, rotary_dim, table + pr * 2 * half, table + (pr * 2 + 1) * half,
                 style);
    }
    loom_free(rowbuf);
    loom_free(inv_freq);
    loom_free(table);
    return loom_out_end(out, &res, LOOM_OK);
}

/* ---- ALiBi */

int loom_alibi(loom_tensor *out, int n_heads, int64_t k_len, float alibi_bias_max) {
    if (n_heads < 1 || k_len < 0)
        return loom_error("alibi: n_heads (%d) must be positive and k_len (%lld) not negative",
                          n_heads, (long long)k_len);
    if (!isfinite(alibi_bias_max))
        return loom_error("alibi: alibi_bias_max must be finite, got %g", (double)alibi_bias_max);
    int64_t shape[4] = {1, n_heads, 1, k_len};
    loom_tensor res;
    if (loom_out_begin(&res, out, "alibi", LOOM_F32, 4, shape)) return LOOM_ERR;

    /* MPT (llm-foundry gen_slopes): with H' the next power of two,
     * m_i = (i + 1) * (alibi_bias_max / H') in f32 and slope_i = 1 / 2^m_i
     * for i < H'; for other head counts the slopes are the odd-indexed ones
     * followed by the even-indexed ones, cut to n_heads. */
    int p2 = 1;
    while (p2 < n_heads) p2 *= 2;
    float step = (float)((double)alibi_bias_max / (double)p2);
    float *o = loom_tensor_data(&res);
    for (int h = 0; h < n_heads; h++) {
        int i = h;
        if (p2 != n_heads) i = h < p2 / 2 ? 2 * h + 1 : 2 * (h - p2 / 2);
        float m = (float)(i + 1) * step;
        float slope = 1.0f / powf(2.0f, m);
        for (int64_t j = 0; j < k_len; j++) o[h * k_len + j] = (float)(j - (k_len - 1)) * slope;
    }
    return loom_out_end(out, &res, LOOM_OK);
}
