/* Decode attention over the KV cache for one layer: each sequence's one new query row attends over its own
 * keys 0..position, after its new key and value are written at `position`.
 *
 * Why: in torch this is two KV-cache index_puts, two batched matmuls, a scale, a mask add, a softmax and
 * casts per layer, ~10 ms of a 16-row SmolLM2 step on a 2-core AVX2 EPYC for ~2 MB of keys and values per
 * layer. Here a task is one (sequence, KV head): it reads that head's keys and values once for all the
 * query heads sharing them (grouped-query attention), in chunks of CHUNK keys with a running softmax
 * (max and sum rescaled per chunk, as in FlashAttention), so no score buffer grows with the context.
 *
 * Layouts: q [n][heads][d] with row stride q_row; k_new, v_new [n][kv_heads][d] with row strides k_row,
 * v_row; the cache K, V [slots][kv_heads][max_len][d] (slot stride, head stride; sequence i is slot i);
 * out [n][heads][d] contiguous. d must be a multiple of 8.
 */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#define CHUNK 64
#define MAX_GROUP 32

static inline float dot(const float *a, const float *b, long d) {
    __m256 acc = _mm256_setzero_ps();
    for (long c = 0; c < d; c += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + c), _mm256_loadu_ps(b + c), acc);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Returns 0, or -1 (nothing written) for a shape this kernel does not take. */
int decode_attention(const float *q, long q_row, const float *k_new, long k_row, const float *v_new, long v_row,
                     float *K, float *V, long slot_stride, long head_stride, const long *positions,
                     long n, long heads, long kv_heads, long d, float scale, float *out, int threads) {
    long group = heads / kv_heads;
    if (d % 8 || group > MAX_GROUP || group * kv_heads != heads) return -1;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long t = 0; t < n * kv_heads; t++) {
        long i = t / kv_heads, h = t % kv_heads, pos = positions[i];
        float *Kh = K + i * slot_stride + h * head_stride, *Vh = V + i * slot_stride + h * head_stride;
        memcpy(Kh + pos * d, k_new + i * k_row + h * d, d * sizeof(float));
        memcpy(Vh + pos * d, v_new + i * v_row + h * d, d * sizeof(float));
        const float *qg = q + i * q_row + h * group * d;
        float *og = out + (i * heads + h * group) * d;
        float m[MAX_GROUP], l[MAX_GROUP], p[MAX_GROUP][CHUNK];
        for (long g = 0; g < group; g++) { m[g] = -INFINITY; l[g] = 0.0f; memset(og + g * d, 0, d * sizeof(float)); }
        for (long j0 = 0; j0 <= pos; j0 += CHUNK) {
            long len = pos + 1 - j0 < CHUNK ? pos + 1 - j0 : CHUNK;
            for (long g = 0; g < group; g++) {
                float chunk_max = -INFINITY;
                for (long j = 0; j < len; j++) {
                    p[g][j] = dot(qg + g * d, Kh + (j0 + j) * d, d) * scale;
                    chunk_max = p[g][j] > chunk_max ? p[g][j] : chunk_max;
                }
                float new_m = chunk_max > m[g] ? chunk_max : m[g];
                float rescale = expf(m[g] - new_m);  /* 0 on the first chunk: m = -inf */
                l[g] *= rescale;
                for (long c = 0; c < d; c++) og[g * d + c] *= rescale;
                for (long j = 0; j < len; j++) { p[g][j] = expf(p[g][j] - new_m); l[g] += p[g][j]; }
                m[g] = new_m;
            }
            for (long j = 0; j < len; j++) {
                const float *vj = Vh + (j0 + j) * d;
                for (long g = 0; g < group; g++) {
                    float pj = p[g][j], *o = og + g * d;
                    for (long c = 0; c < d; c++) o[c] += pj * vj[c];
                }
            }
        }
        for (long g = 0; g < group; g++) {
            float inv = 1.0f / l[g];
            for (long c = 0; c < d; c++) og[g * d + c] *= inv;
        }
    }
    return 0;
}
