/* Strided f32 matrices as cblas_sgemm operands, for the operator files that
 * call BLAS (ops_linear.c, ops_attention.c). Not part of the public API. */
#ifndef LOOM_OPS_BLAS_H
#define LOOM_OPS_BLAS_H

#include <cblas.h>
#include <limits.h>
#include <stdbool.h>
#include <stdint.h>

/* A matrix for cblas_sgemm in row-major order: element (i, j) of the
 * rows x cols operand is p[i * ld + j] when trans is CblasNoTrans, and
 * p[j * ld + i] when it is CblasTrans. */
typedef struct loom_blas_mat {
    const float *p;
    int64_t rows, cols, ld;
    CBLAS_TRANSPOSE trans;
} loom_blas_mat;

/* Describe the strided f32 matrix whose element (i, j) is p[i * rs + j * cs]
 * as an sgemm operand, without copying. Fails when neither stride is 1, when
 * the other stride is too small for BLAS (as with broadcast rows), or when
 * the leading dimension does not fit in an int. */
static inline bool loom_blas_view(loom_blas_mat *m, const float *p, int64_t rows, int64_t cols,
                                  int64_t rs, int64_t cs) {
    int64_t cols1 = cols > 1 ? cols : 1, rows1 = rows > 1 ? rows : 1;
    m->p = p;
    m->rows = rows;
    m->cols = cols;
    m->trans = CblasNoTrans;
    m->ld = cols1;
    if ((cs == 1 || cols <= 1) && (rows <= 1 || rs >= cols1)) {
        m->ld = rows <= 1 ? cols1 : rs;
    } else if ((rs == 1 || rows <= 1) && (cols <= 1 || cs >= rows1)) {
        m->trans = CblasTrans;
        m->ld = cols <= 1 ? rows1 : cs;
    } else {
        return false;
    }
    return m->ld <= INT_MAX;
}

/* c = alpha * a @ b + beta * c, with c row-major and ldc floats between rows.
 * Dimensions must fit in an int (callers check). */
static inline void loom_sgemm(const loom_blas_mat *a, const loom_blas_mat *b, float *c,
                              int64_t ldc, float alpha, float beta) {
    cblas_sgemm(CblasRowMajor, a->trans, b->trans, (int)a->rows, (int)b->cols, (int)a->cols,
                alpha, a->p, (int)a->ld, b->p, (int)b->ld, beta, c, (int)ldc);
}

#endif
