/* Attention over the KV cache for one layer, a row at a time: each row's key and value are written at its
 * position in its sequence's slot, then each row attends over that sequence's keys 0..position. A decode
 * row is one sequence's one new token; a prompt chunk is several rows of one sequence, each seeing the
 * chunk's earlier rows (causal), and rides in the same call.
 *
 * Why: in torch this is two KV-cache index_puts, two batched matmuls, a scale, a mask add, a softmax and
 * casts per layer, several times what reading the layer's keys and values costs (docs/decisions.md). Here
 * a task is one (sequence, KV head): it reads that head's keys and values from memory once for all the
 * query heads sharing them (grouped-query attention; the later heads find them in cache), in chunks of
 * CHUNK keys with a running softmax (max and sum rescaled per chunk, as in FlashAttention), so no score
 * buffer grows with the context. Dot products run four keys at a time and the weighted sum of values 64
 * columns at a time in registers: one FMA chain per dot product leaves the kernel latency-bound.
 *
 * Layouts: q [n][heads][d] with row stride q_row; k_new, v_new [n][kv_heads][d] with row strides k_row,
 * v_row; the cache K, V [slots][kv_heads][max_len][d] (slot stride, head stride); row i's sequence is in
 * slot slots[i] (slots NULL: slot i); out [n][heads][d] contiguous. d must be a multiple of 8.
 */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "simd_math.h"

#define CHUNK 64

static inline float dot(const float *a, const float *b, long d) {
    __m256 acc = _mm256_setzero_ps();
    for (long c = 0; c < d; c += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + c), _mm256_loadu_ps(b + c), acc);
    return hsum8(acc);
}

/* s[j] = scale * q . K[j] for j < len: four keys at a time, so four independent FMA chains hide latency */
static void scores(float *s, const float *q, const float *K, long len, long d, float scale) {
    long j = 0;
    for (; j + 4 <= len; j += 4) {
        const float *k0 = K + j * d;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (long c = 0; c < d; c += 8) {
            __m256 qc = _mm256_loadu_ps(q + c);
            a0 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k0 + c), a0);
            a1 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k0 + d + c), a1);
            a2 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k0 + 2 * d + c), a2);
            a3 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k0 + 3 * d + c), a3);
        }
        __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
        __m128 sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        _mm_storeu_ps(s + j, _mm_mul_ps(sums, _mm_set1_ps(scale)));
    }
    for (; j < len; j++) s[j] = dot(q, K + j * d, d) * scale;
}

/* o[0 .. d) += sum_j p[j] V[j] for j < len; 64 columns at a time in eight registers */
static void weighted_values(float *o, const float *p, const float *V, long len, long d) {
    long c0 = 0;
    for (; c0 + 64 <= d; c0 += 64) {
        __m256 a[8];
        for (int r = 0; r < 8; r++) a[r] = _mm256_loadu_ps(o + c0 + 8 * r);
        for (long j = 0; j < len; j++) {
            __m256 pj = _mm256_broadcast_ss(p + j);
            const float *v = V + j * d + c0;
            a[0] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v), a[0]);
            a[1] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + 8), a[1]);
            a[2] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + 16), a[2]);
            a[3] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + 24), a[3]);
            a[4] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + 32), a[4]);
            a[5] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + 40), a[5]);
            a[6] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + 48), a[6]);
            a[7] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + 56), a[7]);
        }
        for (int r = 0; r < 8; r++) _mm256_storeu_ps(o + c0 + 8 * r, a[r]);
    }
    for (; c0 < d; c0 += 8) {
        __m256 a = _mm256_loadu_ps(o + c0);
        for (long j = 0; j < len; j++) a = _mm256_fmadd_ps(_mm256_broadcast_ss(p + j), _mm256_loadu_ps(V + j * d + c0), a);
        _mm256_storeu_ps(o + c0, a);
    }
}

/* Returns 0, or -1 (nothing written) for a shape this kernel does not take. */
int decode_attention(const float *q, long q_row, const float *k_new, long k_row, const float *v_new, long v_row,
                     float *K, float *V, long slot_stride, long head_stride, const long *slots, const long *positions,
                     long n, long heads, long kv_heads, long d, float scale, float *out, int threads) {
    long group = heads / kv_heads;
    if (d % 8 || group * kv_heads != heads) return -1;
    /* every row's key and value are stored before any row attends: a prompt chunk's rows read each other's */
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (long t = 0; t < n * kv_heads; t++) {
            long i = t / kv_heads, h = t % kv_heads, at = (slots ? slots[i] : i) * slot_stride + h * head_stride;
            memcpy(K + at + positions[i] * d, k_new + i * k_row + h * d, d * sizeof(float));
            memcpy(V + at + positions[i] * d, v_new + i * v_row + h * d, d * sizeof(float));
        }
        #pragma omp for schedule(static)
        for (long t = 0; t < n * kv_heads; t++) {
            long i = t / kv_heads, h = t % kv_heads, pos = positions[i];
            long at = (slots ? slots[i] : i) * slot_stride + h * head_stride;
            const float *Kh = K + at, *Vh = V + at;
            for (long g = 0; g < group; g++) {  /* query heads sharing this KV head: its keys stay in L1/L2 */
                const float *qg = q + i * q_row + (h * group + g) * d;
                float *o = out + (i * heads + h * group + g) * d;
                float m = -INFINITY, l = 0.0f, p[CHUNK];
                memset(o, 0, d * sizeof(float));
                for (long j0 = 0; j0 <= pos; j0 += CHUNK) {
                    long len = pos + 1 - j0 < CHUNK ? pos + 1 - j0 : CHUNK;
                    scores(p, qg, Kh + j0 * d, len, d, scale);
                    float new_m = m;
                    for (long j = 0; j < len; j++) new_m = p[j] > new_m ? p[j] : new_m;
                    float rescale = expf(m - new_m);  /* 0 on the first chunk: m = -inf */
                    l *= rescale;
                    for (long c = 0; c < d; c++) o[c] *= rescale;
                    long j = 0;
                    __m256 sum = _mm256_setzero_ps(), shift = _mm256_set1_ps(new_m);
                    for (; j + 8 <= len; j += 8) {
                        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), shift));
                        _mm256_storeu_ps(p + j, e);
                        sum = _mm256_add_ps(sum, e);
                    }
                    float lanes[8];
                    _mm256_storeu_ps(lanes, sum);
                    for (int lane = 0; lane < 8; lane++) l += lanes[lane];
                    for (; j < len; j++) { p[j] = expf(p[j] - new_m); l += p[j]; }
                    m = new_m;
                    weighted_values(o, p, Vh + j0 * d, len, d);
                }
                float inv = 1.0f / l;
                for (long c = 0; c < d; c++) o[c] *= inv;
            }
        }
    }
    return 0;
}
