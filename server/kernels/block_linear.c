// y = x W^T with W held in blocks of 32 inputs, quantized: w = d * q + m per (output row, block), and the
// activation row rounded per block of 32 to 15-bit integers as it comes in (x ~ dx * qx, |qx| <= 127 * 128),
// so a block's product is integer dot products: y += d * dx * (q . qx) + m * dx * sum(qx).
//
// Why integers: decoding 16 rows, fp32 FMAs over weights unpacked to floats cost more than streaming the
// weights (`python -m bench.micro_linear`); a VNNI dot product does 64 byte multiply-adds per instruction.
// Why 15 bits and not llama.cpp's 8: qx = 128 * hi + lo with both halves signed bytes takes two byte dot
// products, and agrees with fp32 activations on 99.9% of greedy tokens where 8 bits agreed on 97%
// (tests/integration/test_quantized_base.py).
//
// Layout, per panel of 16 output rows and block of 32 inputs (server/kernels/block_linear.py packs it);
// "group" g holds inputs 4g .. 4g+3, the 4 bytes one 32-bit lane of a dot product instruction takes:
//   d, m: float16 [panels][blocks][16]        scale and offset of each row's block (8 bits: m = 0), in GGUF's
//                                             own precision: a fifth fewer bytes than float per 4-bit block
//   q, 4 bits: uint8 [panels][blocks][4][16][4]   group j in the low nibble, group j + 4 in the high one
//   q, 8 bits: uint8 [panels][blocks][8][16][4]   q + 128 (q in -127..127)
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#define PANEL 16
#define BLOCK 32
#define GROUPS 8   // groups of 4 inputs per block
#define TILE 8     // activation rows per register tile

#define ACTIVATION_MAX (127 * 128)

// One activation row quantized per block: qx = round(x / dx) with dx = max|x| / ACTIVATION_MAX (round half
// to even, as torch.round: the reference in block_linear.py does the same float operations), held as its
// signed bytes hi and lo, qx = 128 * hi + lo with lo in -64..63 (never -128, whose sign AVX2 cannot flip).
// Block-major, so a tile finds each of its rows at a constant offset from one pointer per block.
struct activations {
    long rows;
    int8_t *hi, *lo;  // [blocks][rows][32]
    float *dx, *sx;   // [blocks][rows]: the scale, and dx * sum(qx) for the offset term
    int32_t *shift;   // [blocks][rows]: 128 * sum(qx), what q + 128 adds to an 8-bit dot product
};


static void quantize_row(const float *x, long blocks, const struct activations *a, long row) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7), half = _mm256_set1_epi32(64),
                  low7 = _mm256_set1_epi32(127);
    for (long b = 0; b < blocks; b++, x += BLOCK) {
        long at = b * a->rows + row;
        __m256 v[4], amax = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(x + 8 * i);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float d = _mm_cvtss_f32(m4) / (float)ACTIVATION_MAX;
        __m256 id = _mm256_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
        __m256i h[4], l[4], total = _mm256_setzero_si256();
        for (int k = 0; k < 4; k++) {
            __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], id));
            total = _mm256_add_epi32(total, q);
            l[k] = _mm256_sub_epi32(_mm256_and_si256(_mm256_add_epi32(q, half), low7), half);
            h[k] = _mm256_srai_epi32(_mm256_sub_epi32(q, l[k]), 7);
        }
        // packs interleaves 128-bit lanes; the permute puts the 32 bytes back in input order
        __m256i hb = _mm256_packs_epi16(_mm256_packs_epi32(h[0], h[1]), _mm256_packs_epi32(h[2], h[3]));
        __m256i lb = _mm256_packs_epi16(_mm256_packs_epi32(l[0], l[1]), _mm256_packs_epi32(l[2], l[3]));
        _mm256_storeu_si256((__m256i *)(a->hi + at * BLOCK), _mm256_permutevar8x32_epi32(hb, order));
        _mm256_storeu_si256((__m256i *)(a->lo + at * BLOCK), _mm256_permutevar8x32_epi32(lb, order));
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
        t = _mm_hadd_epi32(t, t);
        t = _mm_hadd_epi32(t, t);
        int32_t qsum = _mm_cvtsi128_si32(t);
        a->dx[at] = d;
        a->sx[at] = d * (float)qsum;
        a->shift[at] = 128 * qsum;
    }
}

__attribute__((target("avx512f"))) static inline __m512 half16(const uint16_t *h) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)h));
}

__attribute__((target("f16c"))) static inline __m256 half8(const uint16_t *h) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
}

// acc += w . x with x's 4 bytes broadcast from memory inside the instruction (GCC keeps a separate
// vpbroadcastd for _mm512_set1_epi32, one more instruction per dot product)
__attribute__((target("avx512f,avx512bw,avx512vnni"))) static inline __m512i dot_broadcast(
        __m512i acc, __m512i w, const int32_t *x) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*x));
    return acc;
}

// AVX-512 VNNI: a panel's 16 rows are one register of 32-bit lanes; vpdpbusd multiplies the weights'
// unsigned bytes by the activations' signed ones, 4 per lane, into int32.
__attribute__((target("avx512f,avx512bw,avx512vnni"))) static inline __attribute__((always_inline)) void tile_vnni(
        const struct activations *a, long blocks, long r0, const int nr, const uint8_t *q, int bits,
        const uint16_t *d, const uint16_t *m, float *y, long ldy) {
    __m512 acc[TILE];
    #pragma GCC unroll 8
    for (int r = 0; r < nr; r++) acc[r] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (long b = 0; b < blocks; b++) {
        __m512i w[GROUPS];
        if (bits == 4) {
            const uint8_t *qb = q + b * (PANEL * BLOCK / 2);
            #pragma GCC unroll 8
            for (int j = 0; j < 4; j++) {
                __m512i v = _mm512_loadu_si512(qb + 64 * j);
                w[j] = _mm512_and_si512(v, low);
                w[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            }
        } else {
            #pragma GCC unroll 8
            for (int g = 0; g < GROUPS; g++) w[g] = _mm512_loadu_si512(q + b * PANEL * BLOCK + 64 * g);
        }
        // 8 bits have no offsets: their zeros are not streamed
        __m512 db = half16(d + b * PANEL), mb = bits == 4 ? half16(m + b * PANEL) : db;
        long at = b * a->rows + r0;
        const int32_t *xh = (const int32_t *)(a->hi + at * BLOCK), *xl = (const int32_t *)(a->lo + at * BLOCK);
        const float *dx = a->dx + at, *sx = a->sx + at;
        const int32_t *shift = a->shift + at;
        #pragma GCC unroll 8
        for (int r = 0; r < nr; r++) {
            __m512i sh = _mm512_setzero_si512(), sl = _mm512_setzero_si512();
            #pragma GCC unroll 8
            for (int g = 0; g < GROUPS; g++) {
                sh = dot_broadcast(sh, w[g], xh + r * GROUPS + g);
                sl = dot_broadcast(sl, w[g], xl + r * GROUPS + g);
            }
            __m512i s = _mm512_add_epi32(_mm512_slli_epi32(sh, 7), sl);
            if (bits == 8) s = _mm512_sub_epi32(s, _mm512_set1_epi32(shift[r]));
            __m512 scale = _mm512_mul_ps(db, _mm512_set1_ps(dx[r]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[r]);
            if (bits == 4) acc[r] = _mm512_fmadd_ps(mb, _mm512_set1_ps(sx[r]), acc[r]);
        }
    }
    #pragma GCC unroll 8
    for (int r = 0; r < nr; r++) _mm512_storeu_ps(y + (r0 + r) * ldy, acc[r]);
}

__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void panel_vnni(const struct activations *a, long rows, long blocks, const uint8_t *q, int bits,
                       const uint16_t *d, const uint16_t *m, float *y, long ldy) {
    for (long r0 = 0; r0 < rows; r0 += TILE) {
        long left = rows - r0;
#define T(n) tile_vnni(a, blocks, r0, n, q, bits, d, m, y, ldy)
        switch (left < TILE ? left : TILE) {
            case 1: T(1); break; case 2: T(2); break; case 3: T(3); break; case 4: T(4); break;
            case 5: T(5); break; case 6: T(6); break; case 7: T(7); break; default: T(8); break;
        }
#undef T
    }
}

// AVX2: maddubs multiplies unsigned by signed bytes into pairs of int16, madd sums the pairs into int32. A
// pair of 8-bit products can pass int16 (2 * 255 * 127), so 8-bit weights go in as |q| with qx carrying
// q's sign (2 * 127 * 127 fits), as llama.cpp's AVX2 dot products do. A panel is two halves of 8 rows.
#define TILE2 4

__attribute__((target("f16c"))) static inline __attribute__((always_inline)) void tile_avx2(
        const struct activations *a, long blocks, long r0, const int nr, const uint8_t *q, int bits,
        const uint16_t *d, const uint16_t *m, float *y, long ldy) {
    __m256 acc[TILE2][2];
    #pragma GCC unroll 8
    for (int r = 0; r < nr; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi8(0x0F), flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    for (long b = 0; b < blocks; b++) {
        for (int h = 0; h < 2; h++) {
            __m256i w[GROUPS];  // 4 bits: the nibbles; 8 bits: q (signed)
            if (bits == 4) {
                const uint8_t *qb = q + b * (PANEL * BLOCK / 2) + 32 * h;
                #pragma GCC unroll 8
                for (int j = 0; j < 4; j++) {
                    __m256i v = _mm256_loadu_si256((const __m256i *)(qb + 64 * j));
                    w[j] = _mm256_and_si256(v, low);
                    w[j + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                }
            } else {
                #pragma GCC unroll 8
                for (int g = 0; g < GROUPS; g++)
                    w[g] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(q + b * PANEL * BLOCK + 64 * g + 32 * h)), flip);
            }
            __m256 db = half8(d + b * PANEL + 8 * h);
            __m256 mb = bits == 4 ? half8(m + b * PANEL + 8 * h) : db;
            long at = b * a->rows + r0;
            const int32_t *xh = (const int32_t *)(a->hi + at * BLOCK), *xl = (const int32_t *)(a->lo + at * BLOCK);
            const float *dx = a->dx + at, *sx = a->sx + at;
            #pragma GCC unroll 8
            for (int r = 0; r < nr; r++) {
                __m256i sh = _mm256_setzero_si256(), sl = _mm256_setzero_si256();
                #pragma GCC unroll 8
                for (int g = 0; g < GROUPS; g++) {
                    __m256i h = _mm256_set1_epi32(xh[r * GROUPS + g]), l = _mm256_set1_epi32(xl[r * GROUPS + g]), u = w[g];
                    if (bits == 8) {
                        h = _mm256_sign_epi8(h, w[g]);
                        l = _mm256_sign_epi8(l, w[g]);
                        u = _mm256_abs_epi8(w[g]);
                    }
                    sh = _mm256_add_epi32(sh, _mm256_madd_epi16(_mm256_maddubs_epi16(u, h), ones));
                    sl = _mm256_add_epi32(sl, _mm256_madd_epi16(_mm256_maddubs_epi16(u, l), ones));
                }
                __m256i s = _mm256_add_epi32(_mm256_slli_epi32(sh, 7), sl);
                __m256 scale = _mm256_mul_ps(db, _mm256_set1_ps(dx[r]));
                acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[r][h]);
                if (bits == 4) acc[r][h] = _mm256_fmadd_ps(mb, _mm256_set1_ps(sx[r]), acc[r][h]);
            }
        }
    }
    #pragma GCC unroll 8
    for (int r = 0; r < nr; r++) {
        _mm256_storeu_ps(y + (r0 + r) * ldy, acc[r][0]);
        _mm256_storeu_ps(y + (r0 + r) * ldy + 8, acc[r][1]);
    }
}

__attribute__((target("f16c"))) static void panel_avx2(const struct activations *a, long rows, long blocks, const uint8_t *q, int bits,
                       const uint16_t *d, const uint16_t *m, float *y, long ldy) {
    for (long r0 = 0; r0 < rows; r0 += TILE2) {
        long left = rows - r0;
#define T(n) tile_avx2(a, blocks, r0, n, q, bits, d, m, y, ldy)
        switch (left < TILE2 ? left : TILE2) {
            case 1: T(1); break; case 2: T(2); break; case 3: T(3); break; default: T(4); break;
        }
#undef T
    }
}

// whether block_linear takes the VNNI path on this CPU (for the log and for tests of each path)
int block_linear_has_vnni(void) {
    return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw");
}

// x: [rows, in] (row stride x_stride), in a multiple of 32; y: [rows, panels * 16] (row stride y_stride).
// vnni = 0 keeps to the AVX2 path (for tests of both on one machine).
void block_linear(const float *x, long rows, long in, long x_stride, const uint8_t *q, int bits,
                  const uint16_t *d, const uint16_t *m, long panels, float *y, long y_stride, int threads, int vnni) {
    long blocks = in / BLOCK;
    struct activations a = {
        rows, malloc(rows * in), malloc(rows * in), malloc(sizeof(float) * rows * blocks),
        malloc(sizeof(float) * rows * blocks), malloc(sizeof(int32_t) * rows * blocks),
    };
    #pragma omp parallel for num_threads(threads) schedule(static) if (rows > 16)
    for (long r = 0; r < rows; r++)
        quantize_row(x + r * x_stride, blocks, &a, r);
    long q_panel = blocks * (bits == 4 ? PANEL * BLOCK / 2 : PANEL * BLOCK), dm_panel = blocks * PANEL;
    int use_vnni = vnni && block_linear_has_vnni();
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long p = 0; p < panels; p++) {
        if (use_vnni)
            panel_vnni(&a, rows, blocks, q + p * q_panel, bits, d + p * dm_panel, m + p * dm_panel, y + p * PANEL, y_stride);
        else
            panel_avx2(&a, rows, blocks, q + p * q_panel, bits, d + p * dm_panel, m + p * dm_panel, y + p * PANEL, y_stride);
    }
    free(a.hi);
    free(a.lo);
    free(a.dx);
    free(a.sx);
    free(a.shift);
}
