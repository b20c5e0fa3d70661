// y = x W^T with W held in blocks of 32 inputs, quantized: w = d * q + m per (output row, block).
//
// Layout, per panel of 16 output rows p and block of 32 inputs b (server/kernels/block_linear.py packs it):
//   d, m: float [panels][blocks][16]            scale and offset of each row's block (m = 0: symmetric)
//   q, 4 bits: uint8 [panels][blocks][32][8]    byte i of input k: row i in the low nibble, row i+8 high
//   q, 8 bits: int8  [panels][blocks][32][16]   row i of input k at byte i
// Per block a row accumulates sum_k q x in registers and adds d * that + m * sum_k x once, so the weights
// are read in their few bits and never widened in memory.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#define PANEL 16
#define BLOCK 32
#define ROWS 6  // activation rows per register tile: 6 x 2 accumulators + 2 weight vectors + 1 broadcast

static inline void unpack4(const uint8_t *src, __m256 *lo, __m256 *hi) {
    __m128i v = _mm_loadl_epi64((const __m128i *)src);
    __m128i mask = _mm_set1_epi8(0x0F);
    *lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(v, mask)));
    *hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), mask)));
}

static inline void unpack8(const int8_t *src, __m256 *lo, __m256 *hi) {
    __m128i v = _mm_loadu_si128((const __m128i *)src);
    *lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
    *hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
}

// unpacks one panel's block into 32 x 16 floats (L1-resident), shared by every row tile of the step
static void unpack_block(const uint8_t *qb, int bits, float *wbuf) {
    for (int k = 0; k < BLOCK; k++) {
        __m256 lo, hi;
        if (bits == 4) unpack4(qb + k * (PANEL / 2), &lo, &hi);
        else unpack8((const int8_t *)qb + k * PANEL, &lo, &hi);
        _mm256_store_ps(wbuf + k * PANEL, lo);
        _mm256_store_ps(wbuf + k * PANEL + 8, hi);
    }
}

// y[r0 .. r0 + nr) += d * (block . x) + m * sum(x) for one unpacked block; always inlined with a constant
// nr, so the accumulators live in registers
static inline __attribute__((always_inline)) void block_tile(
        const float *x, long x_stride, long col, const float *wbuf, __m256 d0, __m256 d1, __m256 m0, __m256 m1,
        const float *xs, long blocks, float *y, long y_stride, long r0, const int nr) {
    __m256 acc[ROWS][2];
    for (int r = 0; r < nr; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    if (nr == 1) {  // a lone row: even and odd inputs in separate accumulators, so its FMAs do not wait on each other
        __m256 odd0 = _mm256_setzero_ps(), odd1 = _mm256_setzero_ps();
        const float *xr = x + r0 * x_stride + col;
        for (int k = 0; k < BLOCK; k += 2) {
            __m256 xa = _mm256_broadcast_ss(xr + k), xb = _mm256_broadcast_ss(xr + k + 1);
            acc[0][0] = _mm256_fmadd_ps(xa, _mm256_load_ps(wbuf + k * PANEL), acc[0][0]);
            acc[0][1] = _mm256_fmadd_ps(xa, _mm256_load_ps(wbuf + k * PANEL + 8), acc[0][1]);
            odd0 = _mm256_fmadd_ps(xb, _mm256_load_ps(wbuf + (k + 1) * PANEL), odd0);
            odd1 = _mm256_fmadd_ps(xb, _mm256_load_ps(wbuf + (k + 1) * PANEL + 8), odd1);
        }
        acc[0][0] = _mm256_add_ps(acc[0][0], odd0);
        acc[0][1] = _mm256_add_ps(acc[0][1], odd1);
    } else {
        for (int k = 0; k < BLOCK; k++) {
            __m256 w0 = _mm256_load_ps(wbuf + k * PANEL), w1 = _mm256_load_ps(wbuf + k * PANEL + 8);
            for (int r = 0; r < nr; r++) {
                __m256 xv = _mm256_broadcast_ss(x + (r0 + r) * x_stride + col + k);
                acc[r][0] = _mm256_fmadd_ps(xv, w0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(xv, w1, acc[r][1]);
            }
        }
    }
    for (int r = 0; r < nr; r++) {
        float *yr = y + (r0 + r) * y_stride;
        __m256 s = _mm256_broadcast_ss(xs + (r0 + r) * blocks);
        _mm256_storeu_ps(yr, _mm256_fmadd_ps(d0, acc[r][0], _mm256_fmadd_ps(m0, s, _mm256_loadu_ps(yr))));
        _mm256_storeu_ps(yr + 8, _mm256_fmadd_ps(d1, acc[r][1], _mm256_fmadd_ps(m1, s, _mm256_loadu_ps(yr + 8))));
    }
}

// one panel for every row: y[r, panel] = sum_b d_b * (q_b . x_rb) + m_b * sum(x_rb)
static void panel_all_rows(const float *x, long rows, long x_stride, const float *xsum, long blocks,
                           const uint8_t *q, int bits, const float *d, const float *m, float *y, long y_stride) {
    float wbuf[BLOCK * PANEL] __attribute__((aligned(32)));
    long q_block = bits == 4 ? BLOCK * PANEL / 2 : BLOCK * PANEL;
    for (long r = 0; r < rows; r++)
        for (int j = 0; j < PANEL; j++) y[r * y_stride + j] = 0.0f;
    for (long b = 0; b < blocks; b++) {
        unpack_block(q + b * q_block, bits, wbuf);
        __m256 d0 = _mm256_loadu_ps(d + b * PANEL), d1 = _mm256_loadu_ps(d + b * PANEL + 8);
        __m256 m0 = _mm256_loadu_ps(m + b * PANEL), m1 = _mm256_loadu_ps(m + b * PANEL + 8);
        for (long r0 = 0; r0 < rows; r0 += ROWS) {
            long left = rows - r0;
#define TILE(n) block_tile(x, x_stride, b * BLOCK, wbuf, d0, d1, m0, m1, xsum + b, blocks, y, y_stride, r0, n)
            switch (left < ROWS ? left : ROWS) {
                case 1: TILE(1); break;
                case 2: TILE(2); break;
                case 3: TILE(3); break;
                case 4: TILE(4); break;
                case 5: TILE(5); break;
                default: TILE(6); break;
            }
#undef TILE
        }
    }
}

// The same with AVX-512 where the CPU has it: a panel's 16 outputs are one register, and a tile takes two
// panels side by side, so each broadcast input feeds two FMAs and 8 rows share each unpacked weight vector.
#define ROWS512 8
#define PAIR 2

__attribute__((target("avx512f"))) static inline __attribute__((always_inline)) void block_tile512(
        const float *x, long x_stride, long col, const float *wbuf, const __m512 *d, const __m512 *m,
        const float *xs, long blocks, float *y, long y_stride, long r0, const int nr, const int np) {
    __m512 acc[ROWS512][PAIR];
    for (int r = 0; r < nr; r++)
        for (int j = 0; j < np; j++) acc[r][j] = _mm512_setzero_ps();
    if (nr == 1) {  // a lone row: even and odd inputs in separate accumulators, so its FMAs do not wait on each other
        __m512 odd[PAIR];
        for (int j = 0; j < np; j++) odd[j] = _mm512_setzero_ps();
        const float *xr = x + r0 * x_stride + col;
        for (int k = 0; k < BLOCK; k += 2) {
            __m512 xa = _mm512_set1_ps(xr[k]), xb = _mm512_set1_ps(xr[k + 1]);
            for (int j = 0; j < np; j++) {
                const float *w = wbuf + j * BLOCK * PANEL;
                acc[0][j] = _mm512_fmadd_ps(xa, _mm512_load_ps(w + k * PANEL), acc[0][j]);
                odd[j] = _mm512_fmadd_ps(xb, _mm512_load_ps(w + (k + 1) * PANEL), odd[j]);
            }
        }
        for (int j = 0; j < np; j++) acc[0][j] = _mm512_add_ps(acc[0][j], odd[j]);
    } else {
        for (int k = 0; k < BLOCK; k++) {
            __m512 w[PAIR];
            for (int j = 0; j < np; j++) w[j] = _mm512_load_ps(wbuf + j * BLOCK * PANEL + k * PANEL);
            for (int r = 0; r < nr; r++) {
                __m512 xv = _mm512_set1_ps(x[(r0 + r) * x_stride + col + k]);
                for (int j = 0; j < np; j++) acc[r][j] = _mm512_fmadd_ps(xv, w[j], acc[r][j]);
            }
        }
    }
    for (int r = 0; r < nr; r++) {
        float *yr = y + (r0 + r) * y_stride;
        __m512 s = _mm512_set1_ps(xs[(r0 + r) * blocks]);
        for (int j = 0; j < np; j++)
            _mm512_storeu_ps(yr + j * PANEL,
                             _mm512_fmadd_ps(d[j], acc[r][j], _mm512_fmadd_ps(m[j], s, _mm512_loadu_ps(yr + j * PANEL))));
    }
}

// np (1 or 2) adjacent panels for every row; q, d, m point at the first, q_panel and dm_panel apart
__attribute__((target("avx512f")))
static void panels_all_rows512(const float *x, long rows, long x_stride, const float *xsum, long blocks,
                               const uint8_t *q, long q_panel, int bits, const float *d, const float *m,
                               long dm_panel, float *y, long y_stride, int np) {
    float wbuf[PAIR * BLOCK * PANEL] __attribute__((aligned(64)));
    long q_block = bits == 4 ? BLOCK * PANEL / 2 : BLOCK * PANEL;
    for (long r = 0; r < rows; r++)
        for (int j = 0; j < np; j++) _mm512_storeu_ps(y + r * y_stride + j * PANEL, _mm512_setzero_ps());
    for (long b = 0; b < blocks; b++) {
        __m512 db[PAIR], mb[PAIR];
        for (int j = 0; j < np; j++) {
            unpack_block(q + j * q_panel + b * q_block, bits, wbuf + j * BLOCK * PANEL);
            db[j] = _mm512_loadu_ps(d + j * dm_panel + b * PANEL);
            mb[j] = _mm512_loadu_ps(m + j * dm_panel + b * PANEL);
        }
        for (long r0 = 0; r0 < rows; r0 += ROWS512) {
            long left = rows - r0;
            int nr = left < ROWS512 ? (int)left : ROWS512;
#define TILE(n, p) block_tile512(x, x_stride, b * BLOCK, wbuf, db, mb, xsum + b, blocks, y, y_stride, r0, n, p)
#define TILES(p) switch (nr) { case 1: TILE(1, p); break; case 2: TILE(2, p); break; case 3: TILE(3, p); break; \
                               case 4: TILE(4, p); break; case 5: TILE(5, p); break; case 6: TILE(6, p); break; \
                               case 7: TILE(7, p); break; default: TILE(8, p); break; }
            if (np == PAIR) { TILES(2) } else { TILES(1) }
#undef TILES
#undef TILE
        }
    }
}

// x: [rows, in] (row stride x_stride), in a multiple of 32; y: [rows, panels * 16] (row stride y_stride)
// avx512 = 0 keeps to the AVX2 tile (for tests of both on one machine)
void block_linear(const float *x, long rows, long in, long x_stride, const uint8_t *q, int bits,
                  const float *d, const float *m, long panels, float *y, long y_stride, int threads, int avx512) {
    long blocks = in / BLOCK;
    float *xsum = malloc(sizeof(float) * rows * blocks);
    for (long r = 0; r < rows; r++)
        for (long b = 0; b < blocks; b++) {
            float s = 0.0f;
            for (int k = 0; k < BLOCK; k++) s += x[r * x_stride + b * BLOCK + k];
            xsum[r * blocks + b] = s;
        }
    long q_panel = blocks * (bits == 4 ? BLOCK * PANEL / 2 : BLOCK * PANEL);
    if (avx512 && __builtin_cpu_supports("avx512f")) {
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (long pair = 0; pair < (panels + 1) / PAIR; pair++) {
            long p = pair * PAIR;
            panels_all_rows512(x, rows, x_stride, xsum, blocks, q + p * q_panel, q_panel, bits, d + p * blocks * PANEL,
                               m + p * blocks * PANEL, blocks * PANEL, y + p * PANEL, y_stride,
                               panels - p >= PAIR ? PAIR : 1);
        }
    } else {
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (long p = 0; p < panels; p++)
            panel_all_rows(x, rows, x_stride, xsum, blocks, q + p * q_panel, bits, d + p * blocks * PANEL,
                           m + p * blocks * PANEL, y + p * PANEL, y_stride);
    }
    free(xsum);
}
