/* Loom core: Pillow 9.4's resampling (libImaging/Resample.c) for u8 images
 * with the BILINEAR and BICUBIC filters, reproduced bit for bit. It keeps
 * Pillow's coefficient formulas in double, its fixed-point conversion, its
 * pass order and its rounding and clipping after each pass. */
#include "image_internal.h"

#include <math.h>
#include <string.h>

/* Fractional bits of the fixed-point coefficients: 32 bits minus 8 for the
 * u8 sample minus 2 for the overshoot of negative filter lobes. */
#define PRECISION_BITS (32 - 8 - 2)

static double bilinear_filter(double x) {
    if (x < 0.0)
        x = -x;
    return x < 1.0 ? 1.0 - x : 0.0;
}

/* Keys' cubic convolution with a = -0.5, as Pillow uses for BICUBIC. */
static double bicubic_filter(double x) {
    const double a = -0.5;
    if (x < 0.0)
        x = -x;
    if (x < 1.0)
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0)
        return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

/* Coefficients of one pass: output position i reads `count[i]` inputs from
 * `first[i]` on, weighted by coeffs[i * ksize + j] in fixed point. */
typedef struct resample_pass {
    int ksize;
    int *first;
    int *count;
    int32_t *coeffs;
} resample_pass;

static void pass_free(resample_pass *p) {
    loom_free(p->first);
    loom_free(p->count);
    loom_free(p->coeffs);
    memset(p, 0, sizeof *p);
}

/* Pillow's precompute_coeffs (box = the whole input) followed by
 * normalize_coeffs_8bpc. When downscaling, the filter support widens by the
 * scale factor, which is the antialiasing. */
static int pass_init(resample_pass *p, int in_size, int out_size, loom_resample filter) {
    double (*fn)(double) = filter == LOOM_RESAMPLE_BICUBIC ? bicubic_filter : bilinear_filter;
    double filter_support = filter == LOOM_RESAMPLE_BICUBIC ? 2.0 : 1.0;
    double scale = (double)in_size / out_size;
    double filterscale = scale < 1.0 ? 1.0 : scale;
    double support = filter_support * filterscale;
    int ksize = (int)ceil(support) * 2 + 1;
    size_t ncoeffs;
    double *kk;

    memset(p, 0, sizeof *p);
    if (loom_mul_size((size_t)out_size, (size_t)ksize, &ncoeffs) != 0)
        return loom_error("loom_image_resize: %d outputs x %d taps overflows", out_size, ksize);
    kk = loom_alloc(ncoeffs * sizeof *kk);
    p->first = loom_alloc((size_t)out_size * sizeof *p->first);
    p->count = loom_alloc((size_t)out_size * sizeof *p->count);
    p->coeffs = loom_alloc(ncoeffs * sizeof *p->coeffs);
    if (!kk || !p->first || !p->count || !p->coeffs) {
        loom_free(kk);
        pass_free(p);
        return LOOM_ERR;
    }
    p->ksize = ksize;

    for (int xx = 0; xx < out_size; xx++) {
        double center = (xx + 0.5) * scale;
        double ww = 0.0;
        double ss = 1.0 / filterscale;
        /* Both bounds are rounded by truncating value + 0.5, as Pillow does. */
        int xmin = (int)(center - support + 0.5);
        if (xmin < 0)
            xmin = 0;
        int xmax = (int)(center + support + 0.5);
        if (xmax > in_size)
            xmax = in_size;
        xmax -= xmin;
        double *k = kk + (size_t)xx * ksize;
        int x;
        for (x = 0; x < xmax; x++) {
            double w = fn((x + xmin - center + 0.5) * ss);
            k[x] = w;
            ww += w;
        }
        for (x = 0; x < xmax; x++)
            if (ww != 0.0)
                k[x] /= ww;
        for (; x < ksize; x++)
            k[x] = 0;
        p->first[xx] = xmin;
        p->count[xx] = xmax;
    }

    for (size_t i = 0; i < ncoeffs; i++) {
        if (kk[i] < 0)
            p->coeffs[i] = (int32_t)(-0.5 + kk[i] * (1 << PRECISION_BITS));
        else
            p->coeffs[i] = (int32_t)(0.5 + kk[i] * (1 << PRECISION_BITS));
    }
    loom_free(kk);
    return LOOM_OK;
}

/* Round the accumulator (which started at one half) to u8, clipping. */
static uint8_t clip_fixed(int32_t ss) {
    if (ss < 0)
        return 0;
    ss >>= PRECISION_BITS;
    return (uint8_t)(ss > 255 ? 255 : ss);
}

/* Horizontal pass over input rows [row0, row0 + rows) into `dst`
 * (rows, out_w, c). */
static void resample_horizontal(uint8_t *dst, const uint8_t *src, int in_w, int row0, int rows, int out_w,
                                int c, const resample_pass *p) {
    for (int y = 0; y < rows; y++) {
        const uint8_t *line = src + ((size_t)(row0 + y) * in_w) * c;
        uint8_t *o = dst + (size_t)y * out_w * c;
        for (int xx = 0; xx < out_w; xx++) {
            const int32_t *k = p->coeffs + (size_t)xx * p->ksize;
            const uint8_t *in = line + (size_t)p->first[xx] * c;
            for (int ch = 0; ch < c; ch++) {
                int32_t ss = 1 << (PRECISION_BITS - 1);
                for (int x = 0; x < p->count[xx]; x++)
                    ss += in[(size_t)x * c + ch] * k[x];
                o[(size_t)xx * c + ch] = clip_fixed(ss);
            }
        }
    }
}

/* Vertical pass: output row yy reads rows first[yy] - row_shift on. */
static void resample_vertical(uint8_t *dst, const uint8_t *src, int w, int out_h, int c, int row_shift,
                              const resample_pass *p) {
    size_t row = (size_t)w * c;
    for (int yy = 0; yy < out_h; yy++) {
        const int32_t *k = p->coeffs + (size_t)yy * p->ksize;
        const uint8_t *in = src + (size_t)(p->first[yy] - row_shift) * row;
        uint8_t *o = dst + (size_t)yy * row;
        for (size_t i = 0; i < row; i++) {
            int32_t ss = 1 << (PRECISION_BITS - 1);
            for (int y = 0; y < p->count[yy]; y++)
                ss += in[(size_t)y * row + i] * k[y];
            o[i] = clip_fixed(ss);
        }
    }
}

int loom_image_resize(loom_tensor *out, const loom_tensor *src, int64_t height, int64_t width,
                      loom_resample filter) {
    loom_tensor in = LOOM_TENSOR_EMPTY, tmp = LOOM_TENSOR_EMPTY, res = LOOM_TENSOR_EMPTY;
    resample_pass horiz = {0}, vert = {0};
    int rc = LOOM_ERR;

    if (!out)
        return loom_error("loom_image_resize: output is NULL");
    if (filter != LOOM_RESAMPLE_BILINEAR && filter != LOOM_RESAMPLE_BICUBIC)
        return loom_error("loom_image_resize: unsupported resample filter %d (expected %d = BILINEAR or "
                          "%d = BICUBIC)",
                          (int)filter, LOOM_RESAMPLE_BILINEAR, LOOM_RESAMPLE_BICUBIC);
    if (height < 1 || width < 1 || height > INT32_MAX || width > INT32_MAX)
        return loom_error("loom_image_resize: invalid output size %lldx%lld (height x width)", (long long)height,
                          (long long)width);
    if (loom_image_contiguous_hwc(&in, src, "loom_image_resize", "src") != 0)
        return LOOM_ERR;
    if (in.shape[0] > INT32_MAX || in.shape[1] > INT32_MAX) {
        loom_tensor_free(&in);
        return loom_error("loom_image_resize: input %s is too large", loom_shape_str(&in).s);
    }

    int in_h = (int)in.shape[0], in_w = (int)in.shape[1], c = (int)in.shape[2];
    int out_h = (int)height, out_w = (int)width;
    bool need_horizontal = out_w != in_w;
    bool need_vertical = out_h != in_h;
    const uint8_t *cur = loom_tensor_data(&in);
    int cur_w = in_w, row_shift = 0;

    if (pass_init(&vert, in_h, out_h, filter) != 0)
        goto done;

    /* Horizontal pass first, over only the rows the vertical pass reads. */
    if (need_horizontal) {
        int row_first = vert.first[0];
        int row_last = vert.first[out_h - 1] + vert.count[out_h - 1];
        int64_t tshape[3] = {row_last - row_first, out_w, c};
        if (pass_init(&horiz, in_w, out_w, filter) != 0 || loom_tensor_init(&tmp, LOOM_U8, 3, tshape) != 0)
            goto done;
        resample_horizontal(loom_tensor_data(&tmp), cur, in_w, row_first, (int)tshape[0], out_w, c, &horiz);
        cur = loom_tensor_data(&tmp);
        cur_w = out_w;
        row_shift = row_first;
    }

    int64_t shape[3] = {out_h, out_w, c};
    if (need_vertical) {
        if (loom_tensor_init(&res, LOOM_U8, 3, shape) != 0)
            goto done;
        resample_vertical(loom_tensor_data(&res), cur, cur_w, out_h, c, row_shift, &vert);
    } else if (need_horizontal) {
        /* The horizontal pass read every row, so its output is the result. */
        res = tmp;
        tmp = LOOM_TENSOR_EMPTY;
    } else if (loom_tensor_clone(&res, &in) != 0) {
        goto done;
    }
    loom_tensor_free(out);
    *out = res;
    rc = LOOM_OK;

done:
    pass_free(&horiz);
    pass_free(&vert);
    loom_tensor_free(&tmp);
    loom_tensor_free(&in);
    return rc;
}
