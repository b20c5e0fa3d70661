/* y[M, N] = x[M, K] @ W^T for an fp32 W stored as panels: [N/16][K][16], i.e. 16 output rows at a time,
 * input-major, so one panel is a single sequential stream of K cache lines.
 *
 * Why: at decode batch sizes (1-64 rows) a step streams all weights from DRAM once and is bound by how fast
 * the kernel consumes them, and oneDNN's fp32 GEMM consumed them at a fraction of the memory's rate there
 * (`python -m bench.micro_linear`; figures in docs/decisions.md). This kernel keeps each 6x16 tile of y in
 * 12 ymm registers for a block of K, reads each weight line once from DRAM, and reuses it for the other row
 * tiles from L1.
 *
 * Threads: OpenMP over panels, linked against the libgomp torch has already loaded (same soname), so it
 * shares torch's thread pool rather than adding a second spinning one.
 */
#include <immintrin.h>

#define PANEL 16
#define TILE_ROWS 6
#define K_BLOCK 128 /* AVX-512: 8 KB of panel and at most 6 KB of x per tile: both stay in L1 */
/* Weight lines are prefetched 8 KB ahead of the FMAs per thread (AVX2: one panel stream, 128 panel rows of 64
 * bytes; AVX-512: two streams, 64 rows each): the hardware prefetcher alone leaves the loads waiting on DRAM
 * (`python -m bench.micro_linear`; the distances tried in docs/decisions.md). A prefetch past the last panel
 * is harmless: prefetches do not fault. */
#define AHEAD_AVX2 128
#define AHEAD_512 64
/* AVX2: blocks of 96 panel rows (6 KB of panel, 6 KB of x, 6 KB prefetched), and where a block has several
 * row tiles the first one prefetches exactly the next block, which beats blocks of 64 or 128 at 16 rows. One
 * tile (up to 6 rows) streams at DRAM speed and keeps 128 ahead, which beats 96 at 1 row
 * (`python -m bench.micro_linear`; docs/decisions.md). The AVX-512 path keeps K_BLOCK: 96 was not tried
 * there. */
#define K_BLOCK_AVX2 96

#define ACC(r) __m256 c##r##0 = _mm256_setzero_ps(), c##r##1 = _mm256_setzero_ps();
#define LOAD(r) if (ROWS > r && !first) { c##r##0 = _mm256_loadu_ps(y + r * ldy); c##r##1 = _mm256_loadu_ps(y + r * ldy + 8); }
#define FMA(r) if (ROWS > r) { __m256 xb = _mm256_broadcast_ss(x + r * ldx + k); \
    c##r##0 = _mm256_fmadd_ps(xb, w0, c##r##0); c##r##1 = _mm256_fmadd_ps(xb, w1, c##r##1); }
#define STORE(r) if (ROWS > r) { _mm256_storeu_ps(y + r * ldy, c##r##0); _mm256_storeu_ps(y + r * ldy + 8, c##r##1); }

/* Named accumulators, not an array: gcc spills an array of __m256 to the stack on every iteration. */
#define TILE(N_ROWS) \
static inline void tile_##N_ROWS(const float *x, long ldx, const float *panel, long k0, long k1, float *y, long ldy, int first, \
                                 long ahead) { \
    const int ROWS = N_ROWS; \
    ACC(0) ACC(1) ACC(2) ACC(3) ACC(4) ACC(5) \
    LOAD(0) LOAD(1) LOAD(2) LOAD(3) LOAD(4) LOAD(5) \
    for (long k = k0; k < k1; k++) { \
        __m256 w0 = _mm256_load_ps(panel + k * PANEL), w1 = _mm256_load_ps(panel + k * PANEL + 8); \
        _mm_prefetch((const char *)(panel + (k + ahead) * PANEL), _MM_HINT_T0); \
        FMA(0) FMA(1) FMA(2) FMA(3) FMA(4) FMA(5) \
    } \
    STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5) \
}
TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6)

static void tile(int rows, const float *x, long ldx, const float *panel, long k0, long k1, float *y, long ldy, int first,
                 long ahead) {
    switch (rows) {
    case 1: tile_1(x, ldx, panel, k0, k1, y, ldy, first, ahead); break;
    case 2: tile_2(x, ldx, panel, k0, k1, y, ldy, first, ahead); break;
    case 3: tile_3(x, ldx, panel, k0, k1, y, ldy, first, ahead); break;
    case 4: tile_4(x, ldx, panel, k0, k1, y, ldy, first, ahead); break;
    case 5: tile_5(x, ldx, panel, k0, k1, y, ldy, first, ahead); break;
    default: tile_6(x, ldx, panel, k0, k1, y, ldy, first, ahead); break;
    }
}

/* AVX-512 (chosen at run time): a panel's row of 16 outputs is one zmm, and a tile is up to 8 rows x 2
 * panels in 16 zmm accumulators, each x value broadcast once into a register for two FMAs: faster than the
 * AVX2 tile above and than a 16 rows x 1 panel tile with its x operands broadcast from memory inside the FMAs
 * (`python -m bench.micro_linear`; docs/decisions.md). */
#define TILE_ROWS_512 8
#define ACC512(r) __m512 c##r##0 = _mm512_setzero_ps(), c##r##1 = _mm512_setzero_ps();
#define LOAD512(r) if (ROWS > r && !first) { c##r##0 = _mm512_loadu_ps(y + r * ldy); if (PANELS > 1) c##r##1 = _mm512_loadu_ps(y + r * ldy + 16); }
#define FMA512(r) if (ROWS > r) { __m512 xb = _mm512_set1_ps(x[r * ldx + k]); \
    c##r##0 = _mm512_fmadd_ps(xb, w0, c##r##0); if (PANELS > 1) c##r##1 = _mm512_fmadd_ps(xb, w1, c##r##1); }
#define STORE512(r) if (ROWS > r) { _mm512_storeu_ps(y + r * ldy, c##r##0); if (PANELS > 1) _mm512_storeu_ps(y + r * ldy + 16, c##r##1); }
#define EACH8(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7)

#define TILE512(N_ROWS, N_PANELS) \
__attribute__((target("avx512f"))) \
static void tile512_##N_ROWS##_##N_PANELS(const float *x, long ldx, const float *panel, long K, long k0, long k1, float *y, long ldy, int first) { \
    const int ROWS = N_ROWS, PANELS = N_PANELS; \
    EACH8(ACC512) \
    EACH8(LOAD512) \
    const float *next = panel + K * PANEL; \
    for (long k = k0; k < k1; k++) { \
        __m512 w0 = _mm512_loadu_ps(panel + k * PANEL), w1 = w0; \
        if (PANELS > 1) w1 = _mm512_loadu_ps(next + k * PANEL); \
        _mm_prefetch((const char *)(panel + (k + AHEAD_512) * PANEL), _MM_HINT_T0); \
        if (PANELS > 1) _mm_prefetch((const char *)(next + (k + AHEAD_512) * PANEL), _MM_HINT_T0); \
        EACH8(FMA512) \
    } \
    EACH8(STORE512) \
}
#define TILES_OF(P) TILE512(1, P) TILE512(2, P) TILE512(3, P) TILE512(4, P) TILE512(5, P) TILE512(6, P) TILE512(7, P) TILE512(8, P)
TILES_OF(1) TILES_OF(2)

typedef void (*tile512_fn)(const float *, long, const float *, long, long, long, float *, long, int);
static const tile512_fn TILES512[2][TILE_ROWS_512 + 1] = {
    {0, tile512_1_1, tile512_2_1, tile512_3_1, tile512_4_1, tile512_5_1, tile512_6_1, tile512_7_1, tile512_8_1},
    {0, tile512_1_2, tile512_2_2, tile512_3_2, tile512_4_2, tile512_5_2, tile512_6_2, tile512_7_2, tile512_8_2}};

__attribute__((target("avx512f")))
void panel_linear_avx512(const float *x, long M, long K, long ldx, const float *panels, long n_panels, float *y,
                         long ldy, int threads) {
    long pairs = (n_panels + 1) / 2;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long g = 0; g < pairs; g++) {
        long p = 2 * g;
        int n = p + 1 < n_panels ? 2 : 1;
        const float *panel = panels + p * K * PANEL;
        for (long k0 = 0; k0 < K; k0 += K_BLOCK) {
            long k1 = k0 + K_BLOCK < K ? k0 + K_BLOCK : K;
            for (long r0 = 0; r0 < M; r0 += TILE_ROWS_512) {
                int rows = (int)(M - r0 < TILE_ROWS_512 ? M - r0 : TILE_ROWS_512);
                TILES512[n - 1][rows](x + r0 * ldx, ldx, panel, K, k0, k1, y + r0 * ldy + p * PANEL, ldy, k0 == 0);
            }
        }
    }
}

void panel_linear_avx2(const float *x, long M, long K, long ldx, const float *panels, long n_panels, float *y,
                       long ldy, int threads) {
    const long ahead = M > TILE_ROWS ? K_BLOCK_AVX2 : AHEAD_AVX2;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long p = 0; p < n_panels; p++) {
        const float *panel = panels + p * K * PANEL;
        for (long k0 = 0; k0 < K; k0 += K_BLOCK_AVX2) {
            long k1 = k0 + K_BLOCK_AVX2 < K ? k0 + K_BLOCK_AVX2 : K;
            for (long r0 = 0; r0 < M; r0 += TILE_ROWS) {
                int rows = (int)(M - r0 < TILE_ROWS ? M - r0 : TILE_ROWS);
                tile(rows, x + r0 * ldx, ldx, panel, k0, k1, y + r0 * ldy + p * PANEL, ldy, k0 == 0, ahead);
            }
        }
    }
}

/* The entry point, with the AVX-512 tile where the CPU has it. panels must be 32-byte aligned; y is [M][ldy]
 * with ldy >= n_panels * 16. */
void panel_linear(const float *x, long M, long K, long ldx, const float *panels, long n_panels, float *y, long ldy,
                  int threads) {
    if (__builtin_cpu_supports("avx512f"))
        panel_linear_avx512(x, M, K, ldx, panels, n_panels, y, ldy, threads);
    else
        panel_linear_avx2(x, M, K, ldx, panels, n_panels, y, ldy, threads);
}

/* 1 where panel_linear_avx512 can run on this CPU. */
int panel_linear_has_avx512(void) { return __builtin_cpu_supports("avx512f"); }
