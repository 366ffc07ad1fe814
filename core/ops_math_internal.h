/* erf and tanh in f32 as plain arithmetic, so that loops over them vectorise.
 * glibc's erff and tanhf are library calls, which keep loops scalar (about
 * 8 ns an element on a Sapphire Rapids core). Used by the tanh and GELU
 * activations of ops_elementwise.c, and not part of the public API. */
#ifndef LOOM_OPS_MATH_INTERNAL_H
#define LOOM_OPS_MATH_INTERNAL_H

#include <math.h>

#include "ops_internal.h" /* loom_expf */

/* erf(x) in three pieces, each a Chebyshev fit computed with mpmath at 40
 * digits: for |x| < 0.75, x + x q(x^2) with q of degree 5; for
 * 0.75 <= |x| < 1.25, erf(1) rounded to f32 plus a polynomial of degree 8 in
 * |x| - 1; for 1.25 <= |x| <= 3.92, 1 - exp(-x^2) h(|x|) with
 * h(a) = erfc(a) exp(a^2) of degree 10 in a - 2.5; beyond, +-1 (erf(3.92)
 * is within half an ulp of 1). Each piece adds its small part to a term that
 * is exact. Against erf in double the error was at most 0.81 ulp over every
 * positive float (glibc 2.36's erff: 0.90), and NaN gives NaN; the tests in
 * tests/c/test_ops_elementwise.c sweep the range and the switch points. */
static inline __attribute__((always_inline)) float loom_erff(float x) {
    float a = fabsf(x), t = x * x;

    float q = -0.000675647956868f;
    q = fmaf(q, t, 0.00511533211253f);
    q = fmaf(q, t, -0.0268351145686f);
    q = fmaf(q, t, 0.112833865384f);
    q = fmaf(q, t, -0.376126194694f);
    q = fmaf(q, t, 0.128379165579f); /* 2 / sqrt(pi) - 1, so that x itself is added exactly */
    float small = fmaf(x, q, x);

    float s = a - 1.0f;
    float r = -0.00460719694585f;
    r = fmaf(r, s, 0.0148907601434f);
    r = fmaf(r, s, 0.004604382959f);
    r = fmaf(r, s, -0.0691722269214f);
    r = fmaf(r, s, 0.0691847201624f);
    r = fmaf(r, s, 0.138368951421f);
    r = fmaf(r, s, -0.415107498064f);
    r = fmaf(r, s, 0.415107498425f);
    r = fmaf(r, s, 1.35116960705e-8f);
    float middle = copysignf(0.842700779f + r, x);

    float u = a - 2.5f;
    float h = 1.16191411281e-6f;
    h = fmaf(h, u, -5.63780978646e-6f);
    h = fmaf(h, u, 1.64302836642e-5f);
    h = fmaf(h, u, -5.64529485745e-5f);
    h = fmaf(h, u, 0.000210015021085f);
    h = fmaf(h, u, -0.000735352298187f);
    h = fmaf(h, u, 0.00246769467346f);
    h = fmaf(h, u, -0.00800104525734f);
    h = fmaf(h, u, 0.0249378594334f);
    h = fmaf(h, u, -0.074347390757f);
    h = fmaf(h, u, 0.210806368445f);
    /* exp(-a^2) with the rounding error of t = a^2 (found exactly by an fma)
     * taken out to first order. */
    float t_err = fmaf(a, a, -t);
    float e = loom_expf(-t);
    e = fmaf(-e, t_err, e);
    float large = 1.0f - e * h;
    large = a > 3.92f ? 1.0f : large;
    large = copysignf(large, x);

    float result = a < 1.25f ? middle : large;
    return a < 0.75f ? small : result;
}

/* tanh(x). For |x| < 1, x + x^3 p(x^2) with p of degree 7 (a Chebyshev fit
 * with mpmath); beyond, 1 - 2 / (exp(2|x|) + 1) with the sign of x, which
 * reaches 1 where exp overflows. Against tanh in double the error was at
 * most 1.13 ulp over every 4th positive float (glibc 2.36's tanhf: 2.2 on
 * every 7th), -0 gives -0 and NaN gives NaN. */
static inline __attribute__((always_inline)) float loom_tanhf(float x) {
    float a = fabsf(x), t = x * x;

    float p = 0.000142793187996f;
    p = fmaf(p, t, -0.000923500846348f);
    p = fmaf(p, t, 0.00320680338685f);
    p = fmaf(p, t, -0.00869784759281f);
    p = fmaf(p, t, 0.0218295488431f);
    p = fmaf(p, t, -0.0539634147544f);
    p = fmaf(p, t, 0.133333106555f);
    p = fmaf(p, t, -0.333333331567f);
    float small = copysignf(fmaf(x * t, p, x), x);

    float large = 1.0f - 2.0f / (loom_expf(2.0f * a) + 1.0f);
    large = copysignf(large, x);

    return a < 1.0f ? small : large;
}

#endif
