/* Loom core operators.
 *
 * Argument order: output first, then inputs, then weights, then options.
 * Output convention: when `out->storage` is NULL the operator allocates a new
 * contiguous tensor; otherwise `out` must already have the result's shape and
 * dtype and be contiguous, and the result is written into it (the
 * out-variant for hot loops). `out` may not alias an input unless an
 * operator says so.
 * Inputs may be any strided view (non-contiguous, expanded, transposed).
 * Float inputs of dtype f16/bf16 are read as f32; results of float math are
 * f32. On failure an operator returns LOOM_ERR with a message naming the
 * operator and the shapes and dtypes involved, and leaves `out` as it was.
 *
 * Forward and backward: training is not built yet. Each operator that will
 * need a gradient gets `<op>_backward` beside it when training lands. */
#ifndef LOOM_OPS_H
#define LOOM_OPS_H

#include "tensor.h"

/* Compute the broadcast shape of two shapes (NumPy rules); returns LOOM_ERR
 * with both shapes in the message when they are incompatible. */
int loom_broadcast_shape(int na, const int64_t *a, int nb, const int64_t *b,
                         int *nout, int64_t *out);

/* ---- element-wise */
typedef enum loom_binary_op {
    LOOM_ADD, LOOM_SUB, LOOM_MUL, LOOM_DIV, LOOM_POW, LOOM_MAXIMUM, LOOM_MINIMUM,
    /* comparisons give u8 tensors of 0/1 */
    LOOM_EQ, LOOM_NE, LOOM_LT, LOOM_LE, LOOM_GT, LOOM_GE,
} loom_binary_op;
/* out = a (op) b with broadcasting. Float if either input is float (f32
 * result), otherwise integer math in i64 (DIV then truncates toward zero). */
int loom_binary(loom_tensor *out, const loom_tensor *a, const loom_tensor *b, loom_binary_op op);
/* out = a (op) scalar; scalar_first computes scalar (op) a. */
int loom_binary_scalar(loom_tensor *out, const loom_tensor *a, double scalar, loom_binary_op op,
                       bool scalar_first);

typedef enum loom_unary_op {
    LOOM_NEG, LOOM_ABS, LOOM_EXP, LOOM_LOG, LOOM_SQRT, LOOM_RSQRT, LOOM_SIN, LOOM_COS,
    LOOM_TANH, LOOM_SIGMOID, LOOM_RELU,
    LOOM_GELU,       /* x * 0.5 * (1 + erf(x / sqrt 2)), PyTorch's exact GELU */
    LOOM_GELU_TANH,  /* PyTorch's approximate="tanh" GELU */
    LOOM_QUICK_GELU, /* x * sigmoid(1.702 x), as in OpenAI CLIP */
    LOOM_SILU,       /* x * sigmoid(x) */
    LOOM_RECIPROCAL, LOOM_SQUARE, LOOM_FLOOR, LOOM_CEIL, LOOM_ROUND,
} loom_unary_op;
/* Float result (f32) for every op; NEG and ABS keep integer dtypes. */
int loom_unary(loom_tensor *out, const loom_tensor *x, loom_unary_op op);
/* out = cond ? a : b with broadcasting over all three; cond is u8 or integer. */
int loom_where(loom_tensor *out, const loom_tensor *cond, const loom_tensor *a, const loom_tensor *b);

/* ---- reductions over one dimension (negative counts from the end) */
typedef enum loom_reduce_op { LOOM_SUM, LOOM_MEAN, LOOM_MAX, LOOM_MIN } loom_reduce_op;
int loom_reduce(loom_tensor *out, const loom_tensor *x, int dim, bool keepdim, loom_reduce_op op);
/* 0-based index (i64) of the first largest value along dim. */
int loom_argmax(loom_tensor *out, const loom_tensor *x, int dim, bool keepdim);

/* ---- normalisation and softmax (over the last dimension unless said) */
/* Softmax over `dim`. mask may be NULL, an additive float tensor, or a u8
 * tensor where nonzero means "attend" and zero excludes the position; it is
 * broadcast to x's shape. A row with every position excluded gives zeros
 * (log_softmax: -inf). */
int loom_softmax(loom_tensor *out, const loom_tensor *x, const loom_tensor *mask, int dim, bool log);
/* y = (x - mean) / sqrt(var + eps) * weight + bias over the last dimension,
 * with the biased variance; weight and bias may be NULL. */
int loom_layer_norm(loom_tensor *out, const loom_tensor *x, const loom_tensor *weight,
                    const loom_tensor *bias, float eps);
/* y = x / sqrt(mean(x^2) + eps) * weight, as LLaMA's RMSNorm in float32;
 * weight may be NULL. */
int loom_rms_norm(loom_tensor *out, const loom_tensor *x, const loom_tensor *weight, float eps);

/* ---- products */
/* y = x @ weight^T + bias. x: (..., in) float; weight: (out_features, in) in
 * f32, f16 or bf16; bias: (out_features) or NULL. Result (..., out_features). */
int loom_linear(loom_tensor *out, const loom_tensor *x, const loom_tensor *weight,
                const loom_tensor *bias);
/* Batched matrix product with broadcast batch dimensions, through
 * cblas_sgemm: a (..., n, k), b (..., k, m) -> (..., n, m). 1-D inputs are
 * promoted as in torch.matmul. */
int loom_matmul(loom_tensor *out, const loom_tensor *a, const loom_tensor *b);

/* Which kernel the linear operator uses for 16-bit weights. */
typedef enum loom_linear_path {
    LOOM_PATH_F32 = 0, /* 16-bit weights widened to f32, f32 products: matches the reference */
    LOOM_PATH_BF16 = 1 /* fast path: activations (and f16 weights) rounded to bf16, f32 sums,
                        * on AMX-BF16 tiles, else AVX512-BF16, else as LOOM_PATH_F32. f32
                        * weights take sgemm on both paths */
} loom_linear_path;
void loom_set_linear_path(loom_linear_path path);
loom_linear_path loom_get_linear_path(void);
/* The kernel LOOM_PATH_BF16 runs on this machine: "amx", "avx512bf16" or
 * "f32". With "amx", every row of x gets the same bits whatever rows come
 * with it (bf16 weights), which batched decoding relies on. */
const char *loom_linear_bf16_kernel_name(void);

/* ---- gathering */
/* out = weight[ids]: ids i32/i64 of any shape, weight (V, D) f32/f16/bf16 ->
 * (ids..., D) f32. An id outside [0, V) is an error naming it. */
int loom_embedding(loom_tensor *out, const loom_tensor *weight, const loom_tensor *ids);
/* Concatenate `n` tensors along dim; all other dimensions must match. */
int loom_cat(loom_tensor *out, const loom_tensor *const *inputs, int n, int dim);
/* out = x.index_select(dim, index) with a 1-D i32/i64 index. */
int loom_index_select(loom_tensor *out, const loom_tensor *x, int dim, const loom_tensor *index);
/* out = x.gather(dim, index) (torch semantics; index has out's shape). */
int loom_gather(loom_tensor *out, const loom_tensor *x, int dim, const loom_tensor *index);

/* ---- position encodings */
typedef enum loom_rope_style {
    LOOM_ROPE_HALF = 0,       /* rotate_half: pairs (i, i + d/2), LLaMA in Hugging Face */
    LOOM_ROPE_INTERLEAVED = 1 /* pairs (2i, 2i + 1), original LLaMA and GPT-J */
} loom_rope_style;
/* Rotary embedding of x (B, H, T, D) at positions (T) or (B, T) (i32/i64).
 * The first rotary_dim channels rotate (rotary_dim = D for all); frequencies
 * are 1 / theta^(2i / rotary_dim) in float32 and a position p is used as
 * p / scaling (linear rope_scaling; 1 for none). */
int loom_rope(loom_tensor *out, const loom_tensor *x, const loom_tensor *positions,
              float theta, float scaling, int rotary_dim, loom_rope_style style);
/* ALiBi bias (1, H, 1, K) as MPT builds it: slope_h * (k - (K - 1)) for key k,
 * slopes 2^(-alibi_bias_max * (h + 1) / H') with H' the next power of two and
 * MPT's interleaving for head counts that are not powers of two. */
int loom_alibi(loom_tensor *out, int n_heads, int64_t k_len, float alibi_bias_max);

/* ---- attention */
typedef struct loom_attention_opts {
    float scale;          /* 0 means 1/sqrt(D) */
    bool causal;          /* query i sees key j only if j <= i + (K - Q) */
    const loom_tensor *mask; /* NULL, additive float or u8 (nonzero = attend), broadcast to (B, Hq, Q, K) */
} loom_attention_opts;
/* Scaled dot-product attention. q (B, Hq, Q, D), k (B, Hkv, K, D),
 * v (B, Hkv, K, Dv) with Hq a multiple of Hkv (grouped-query heads share a
 * key/value head in order). k and v may be narrowed views of a larger KV
 * cache. Result (B, Hq, Q, Dv). A query row whose keys are all masked gives
 * zeros. */
int loom_attention(loom_tensor *out, const loom_tensor *q, const loom_tensor *k,
                   const loom_tensor *v, const loom_attention_opts *opts);

/* KV cache: preallocated (B, Hkv, capacity, D) key and value tensors and the
 * number of positions filled. */
typedef struct loom_kv_cache {
    loom_tensor k, v;
    int64_t length;
    int64_t capacity;
} loom_kv_cache;
/* An f32 cache; the same as loom_kv_cache_init_dtype(..., LOOM_F32). */
int loom_kv_cache_init(loom_kv_cache *c, int64_t batch, int64_t n_kv_heads, int64_t capacity,
                       int64_t head_dim, int64_t value_dim);
/* A cache whose keys and values are stored as dtype, LOOM_F32 or LOOM_BF16.
 * A bf16 cache takes half the memory. loom_attention reads it without a copy
 * when a head has fewer than 4 queries (decoding). With more queries it
 * widens k and v into f32 copies first. */
int loom_kv_cache_init_dtype(loom_kv_cache *c, int64_t batch, int64_t n_kv_heads, int64_t capacity,
                             int64_t head_dim, int64_t value_dim, loom_dtype dtype);
/* Append k_new, v_new (B, Hkv, T, D), converted to the cache's dtype (to
 * bf16 by rounding to nearest even), and set *k_all, *v_all (empty on entry)
 * to views of the filled part (B, Hkv, length, D). Fails when full. */
int loom_kv_cache_append(loom_kv_cache *c, const loom_tensor *k_new, const loom_tensor *v_new,
                         loom_tensor *k_all, loom_tensor *v_all);
void loom_kv_cache_free(loom_kv_cache *c);

/* ---- vision */
/* Patch embedding: conv2d whose stride equals its kernel, as im2col + GEMM.
 * pixels (B, C, H, W) float, weight (O, C, P, P), bias (O) or NULL ->
 * (B, (H/P) * (W/P), O) in raster order of the patches. H and W must be
 * multiples of P. */
int loom_patch_embed(loom_tensor *out, const loom_tensor *pixels, const loom_tensor *weight,
                     const loom_tensor *bias);

#endif
