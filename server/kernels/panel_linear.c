/* y[M, N] = x[M, K] @ W^T for an fp32 W stored as panels: [N/16][K][16], i.e. 16 output rows at a time,
 * input-major, so one panel is a single sequential stream of K cache lines.
 *
 * Why: at decode batch sizes (1-64 rows) a step streams all weights from DRAM once and is bound by how fast
 * the kernel consumes them. On the 2-core AVX2 EPYC this was written on, oneDNN's fp32 GEMM read the
 * SmolLM2 weights at 4-6 GB/s at 16 rows while a plain sum read them at 18 GB/s. This kernel keeps each
 * 6x16 tile of y in 12 ymm registers for a block of K, reads each weight line once from DRAM, and reuses it
 * for the other row tiles from L1.
 *
 * Threads: OpenMP over panels, linked against the libgomp torch has already loaded (same soname), so it
 * shares torch's thread pool rather than adding a second spinning one.
 */
#include <immintrin.h>

#define PANEL 16
#define TILE_ROWS 6
#define K_BLOCK 128 /* 8 KB of panel and at most 6 KB of x per tile: both stay in L1 */

#define ACC(r) __m256 c##r##0 = _mm256_setzero_ps(), c##r##1 = _mm256_setzero_ps();
#define LOAD(r) if (ROWS > r && !first) { c##r##0 = _mm256_loadu_ps(y + r * ldy); c##r##1 = _mm256_loadu_ps(y + r * ldy + 8); }
#define FMA(r) if (ROWS > r) { __m256 xb = _mm256_broadcast_ss(x + r * ldx + k); \
    c##r##0 = _mm256_fmadd_ps(xb, w0, c##r##0); c##r##1 = _mm256_fmadd_ps(xb, w1, c##r##1); }
#define STORE(r) if (ROWS > r) { _mm256_storeu_ps(y + r * ldy, c##r##0); _mm256_storeu_ps(y + r * ldy + 8, c##r##1); }

/* Named accumulators, not an array: gcc spilled an array of __m256 to the stack on every iteration (3x slower). */
#define TILE(N_ROWS) \
static inline void tile_##N_ROWS(const float *x, long ldx, const float *panel, long k0, long k1, float *y, long ldy, int first) { \
    const int ROWS = N_ROWS; \
    ACC(0) ACC(1) ACC(2) ACC(3) ACC(4) ACC(5) \
    LOAD(0) LOAD(1) LOAD(2) LOAD(3) LOAD(4) LOAD(5) \
    for (long k = k0; k < k1; k++) { \
        __m256 w0 = _mm256_load_ps(panel + k * PANEL), w1 = _mm256_load_ps(panel + k * PANEL + 8); \
        FMA(0) FMA(1) FMA(2) FMA(3) FMA(4) FMA(5) \
    } \
    STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5) \
}
TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6)

static void tile(int rows, const float *x, long ldx, const float *panel, long k0, long k1, float *y, long ldy, int first) {
    switch (rows) {
    case 1: tile_1(x, ldx, panel, k0, k1, y, ldy, first); break;
    case 2: tile_2(x, ldx, panel, k0, k1, y, ldy, first); break;
    case 3: tile_3(x, ldx, panel, k0, k1, y, ldy, first); break;
    case 4: tile_4(x, ldx, panel, k0, k1, y, ldy, first); break;
    case 5: tile_5(x, ldx, panel, k0, k1, y, ldy, first); break;
    default: tile_6(x, ldx, panel, k0, k1, y, ldy, first); break;
    }
}

/* panels must be 32-byte aligned; y is [M][ldy] with ldy >= panels * 16. */
void panel_linear(const float *x, long M, long K, long ldx, const float *panels, long n_panels, float *y, long ldy,
                  int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long p = 0; p < n_panels; p++) {
        const float *panel = panels + p * K * PANEL;
        for (long k0 = 0; k0 < K; k0 += K_BLOCK) {
            long k1 = k0 + K_BLOCK < K ? k0 + K_BLOCK : K;
            for (long r0 = 0; r0 < M; r0 += TILE_ROWS) {
                int rows = (int)(M - r0 < TILE_ROWS ? M - r0 : TILE_ROWS);
                tile(rows, x + r0 * ldx, ldx, panel, k0, k1, y + r0 * ldy + p * PANEL, ldy, k0 == 0);
            }
        }
    }
}
