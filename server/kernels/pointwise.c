/* The decoder layer's small steps between matmuls: RMS norm, rotary embedding of q and k, SiLU(gate) * up.
 *
 * Why: in torch each is a handful of ops (RMS norm alone is pow, mean, add, rsqrt, two muls and a copy),
 * each dispatched and, for a 16-row decode step, over a few KB. Here each is one pass over its rows (a
 * step's time against the torch forms: docs/decisions.md). Rows are independent, so a long prompt's chunk
 * splits them over threads; a decode step's few rows run on the calling thread (waking the team costs more
 * than the work).
 */
#include <immintrin.h>
#include <math.h>

#include "simd_math.h"

#define PARALLEL_MIN_ELEMENTS (1L << 16)

/* out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight; cols a multiple of 8 */
int rms_norm(const float *x, long ldx, const float *weight, long rows, long cols, float eps, float *out, long ldo,
             int threads) {
    if (cols % 8) return -1;
    #pragma omp parallel for schedule(static) num_threads(threads) if (rows * cols >= PARALLEL_MIN_ELEMENTS)
    for (long r = 0; r < rows; r++) {
        const float *xr = x + r * ldx;
        float *o = out + r * ldo;
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        long c = 0;
        for (; c + 16 <= cols; c += 16) {
            __m256 a = _mm256_loadu_ps(xr + c), b = _mm256_loadu_ps(xr + c + 8);
            acc0 = _mm256_fmadd_ps(a, a, acc0);
            acc1 = _mm256_fmadd_ps(b, b, acc1);
        }
        for (; c < cols; c += 8) {
            __m256 a = _mm256_loadu_ps(xr + c);
            acc0 = _mm256_fmadd_ps(a, a, acc0);
        }
        __m256 inv = _mm256_set1_ps(1.0f / sqrtf(hsum8(_mm256_add_ps(acc0, acc1)) / (float)cols + eps));
        for (c = 0; c < cols; c += 8)
            _mm256_storeu_ps(o + c, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + c), inv),
                                                  _mm256_loadu_ps(weight + c)));
    }
    return 0;
}

/* In place, heads [r][h][0 .. d) of x (row stride ldx, head stride d) rotated by position r's angles:
 * (a, b) -> (a cos - b sin, b cos + a sin) for the halves a = [0, d/2), b = [d/2, d), as Llama's
 * rotate_half form; cos and sin are [rows][d] (row stride ldcs). d/2 a multiple of 8. */
int rope(float *x, long ldx, long rows, long heads, long d, const float *cos_t, const float *sin_t, long ldcs,
         int threads) {
    long half = d / 2;
    if (d % 16) return -1;
    #pragma omp parallel for schedule(static) num_threads(threads) if (rows * heads * d >= PARALLEL_MIN_ELEMENTS)
    for (long r = 0; r < rows; r++) {
        const float *cr = cos_t + r * ldcs, *sr = sin_t + r * ldcs;
        for (long h = 0; h < heads; h++) {
            float *a = x + r * ldx + h * d, *b = a + half;
            for (long i = 0; i < half; i += 8) {
                __m256 va = _mm256_loadu_ps(a + i), vb = _mm256_loadu_ps(b + i);
                _mm256_storeu_ps(a + i, _mm256_fnmadd_ps(vb, _mm256_loadu_ps(sr + i), _mm256_mul_ps(va, _mm256_loadu_ps(cr + i))));
                _mm256_storeu_ps(b + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(sr + half + i),
                                                        _mm256_mul_ps(vb, _mm256_loadu_ps(cr + half + i))));
            }
        }
    }
    return 0;
}

/* out[r][c] = silu(gate_up[r][c]) * gate_up[r][n + c] for c < n (gate and up side by side, row stride ldg);
 * silu(g) = g / (1 + e^-g). n a multiple of 8. */
int silu_mul(const float *gate_up, long ldg, long rows, long n, float *out, long ldo, int threads) {
    if (n % 8) return -1;
    #pragma omp parallel for schedule(static) num_threads(threads) if (rows * n >= PARALLEL_MIN_ELEMENTS)
    for (long r = 0; r < rows; r++) {
        const float *g = gate_up + r * ldg, *u = g + n;
        float *o = out + r * ldo;
        for (long c = 0; c < n; c += 8) {
            __m256 gv = _mm256_loadu_ps(g + c);
            __m256 sig = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f),
                                       exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
            _mm256_storeu_ps(o + c, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u + c)));
        }
    }
    return 0;
}
