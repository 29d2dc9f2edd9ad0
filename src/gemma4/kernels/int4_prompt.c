/* Prompt-shaped matmuls over int4 tiles (quant/int4.py): y[M, N] = x[M, K] . W[N, K]^T for the many
 * rows of a prefill chunk, or of an expert's share of one, in fp32 as exact as dequantizing W and
 * running a dense matmul (each sum over k is fp32 FMAs, in an order that depends on nothing but k: a
 * token's answer is the same in any batch or run of rows).
 *
 * Dequantize + MKL's sgemm did the same math at ~70 GFLOP/s on the 26B-A4B's experts (about 32 rows
 * each): the dequantized block went to memory and back, and with so few rows MKL spent as long packing
 * the weights as multiplying them. Here a tile row (8 weight rows, all of K) is dequantized once into
 * a per-thread buffer that stays in L2, and the tokens stream past it TOKENS at a time: each 16-column
 * step loads TOKENS activation vectors and 8 weight vectors for 8 x TOKENS FMAs (24 of the 32 AVX-512
 * registers hold sums). A block of BLOCK_BYTES of activations (tokens) is finished against every tile
 * row before the next, so they too stay in L2; the weights are read from memory once per block. */

#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"
#include "simd.h"

#define BLOCK_BYTES (768 << 10) /* activations per block of tokens: with a tile row's fp32 (90 KB at K = 2816), within a 1 MB L2 (384 KB: 5-10 % slower at K >= 4096) */

#if defined(__AVX512F__) && defined(GEMMA4_AVX2)
#define TOKENS 3 /* 3 x 8 sums + 3 activations + 1 weight of 32 registers */
#define PASS_ROWS 8
#define WIDTH 16
typedef __m512 Vector;
#define load_vector _mm512_loadu_ps
#define fma_vector _mm512_fmadd_ps
#define zero_vector _mm512_setzero_ps
#elif defined(GEMMA4_AVX2)
#define TOKENS 3 /* 3 x 4 sums + 3 activations + 1 weight of 16 registers: the 8 rows in two passes */
#define PASS_ROWS 4
#define WIDTH 8
typedef __m256 Vector;
#define load_vector _mm256_loadu_ps
#define fma_vector _mm256_fmadd_ps
#define zero_vector _mm256_setzero_ps
#else
#define TOKENS 1
#endif

static inline float group_value(const void *values, int64_t at, int f16) {
#ifdef GEMMA4_AVX2
    if (f16) return _cvtsh_ss(((const uint16_t *)values)[at]);
#endif
    return f16 ? half_to_float(((const uint16_t *)values)[at]) : ((const float *)values)[at];
}

/* Tile row `tile` (8 rows, scales and offsets [G, 8] at `scales`, `offsets`) -> fp32 out[8][K], each
 * weight scale * code + offset (offset -8 scale on the Q4_0 grid), as dequantize_int4 makes it. */
static void dequantize_tile_row(const uint8_t *tile, const void *scales, const void *offsets, int f16, int64_t K, int64_t group,
                                float *out) {
    for (int64_t b = 0; b < K / 32; b++, tile += TILE_BYTES) {
        int64_t g = b * 32 / group;
#ifdef GEMMA4_AVX2
        PREFETCH(tile);  /* (into the thread's next tile row: the 26B-A4B's K = 704 experts 10-15 % faster) */
#endif
#if WIDTH == 16
        /* the block's 8 scales and offsets in one register each, a row's taken out by a permute */
        __m512 row_scales = _mm512_castps256_ps512(f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)scales + g * 8)))
                                                       : _mm256_loadu_ps((const float *)scales + g * 8));
        __m512 row_offsets = _mm512_mul_ps(row_scales, _mm512_set1_ps(-8.f));
        if (offsets)
            row_offsets = _mm512_castps256_ps512(f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)offsets + g * 8)))
                                                     : _mm256_loadu_ps((const float *)offsets + g * 8));
#endif
        for (int row = 0; row < 8; row++) {
            const uint8_t *piece = tile + (row % 4) * 32 + (row / 4) * 16;  /* byte j: column j low, j + 16 high */
            float *o = out + row * K + b * 32;
#if WIDTH == 16
            __m512i lane = _mm512_set1_epi32(row);
            __m512 scale = _mm512_permutexvar_ps(lane, row_scales), offset = _mm512_permutexvar_ps(lane, row_offsets);
            __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)piece));
            _mm512_storeu_ps(o, _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(15))), offset));
            _mm512_storeu_ps(o + 16, _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), offset));
#else
            float s = group_value(scales, g * 8 + row, f16), z = offsets ? group_value(offsets, g * 8 + row, f16) : -8.f * s;
#ifdef GEMMA4_AVX2
            __m128i bytes = _mm_loadu_si128((const __m128i *)piece);
            __m256 scale = _mm256_set1_ps(s), offset = _mm256_set1_ps(z);
            __m256i nibble = _mm256_set1_epi32(15);
            for (int half = 0; half < 2; half++) {
                __m256i q = _mm256_cvtepu8_epi32(half ? _mm_srli_si128(bytes, 8) : bytes);
                _mm256_storeu_ps(o + 8 * half, _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(_mm256_and_si256(q, nibble)), offset));
                _mm256_storeu_ps(o + 16 + 8 * half, _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(_mm256_srli_epi32(q, 4)), offset));
            }
#else
            for (int j = 0; j < 16; j++) {
                o[j] = fmaf(s, (float)(piece[j] & 15), z);
                o[16 + j] = fmaf(s, (float)(piece[j] >> 4), z);
            }
#endif
#endif
        }
    }
}

#if WIDTH == 16
/* The sums of v[0 .. 8) in order, added in a tree across registers (24 instructions; 8 separate
 * horizontal sums took 64, ~15 % of a K = 704 product). */
static inline __m256 sum_each(const __m512 *v) {
    __m512 pairs[4], quads[2];
    for (int i = 0; i < 4; i++)  /* 128-bit lane: v[2i] 0+2, v[2i+1] 0+2, v[2i] 1+3, v[2i+1] 1+3 */
        pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 2; i++)  /* 128-bit lane: one partial sum of each of v[4i .. 4i + 4) */
        quads[i] = _mm512_add_ps(_mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    __m512 halves = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(3, 1, 3, 1)));
    __m512 sums = _mm512_add_ps(_mm512_shuffle_f32x4(halves, halves, _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm512_shuffle_f32x4(halves, halves, _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_castps512_ps256(sums);
}
#endif

/* Tokens x[0 .. count) (rows K apart, count <= TOKENS, a literal where inlined) against w[PASS_ROWS][K]
 * -> y[m * N + row]. */
#ifdef GEMMA4_AVX2
static inline __attribute__((always_inline)) void pass_dots(const float *w, const float *x, int count, int64_t K, float *y, int64_t N) {
    Vector sums[TOKENS][PASS_ROWS];
    for (int m = 0; m < count; m++)
        for (int r = 0; r < PASS_ROWS; r++) sums[m][r] = zero_vector();
    for (int64_t k = 0; k < K; k += WIDTH) {
        Vector xs[TOKENS];
        for (int m = 0; m < count; m++) xs[m] = load_vector(x + m * K + k);
        for (int r = 0; r < PASS_ROWS; r++) {
            Vector wv = load_vector(w + r * K + k);
            for (int m = 0; m < count; m++) sums[m][r] = fma_vector(wv, xs[m], sums[m][r]);
        }
    }
    for (int m = 0; m < count; m++) {
#if WIDTH == 16
        _mm256_storeu_ps(y + m * N, sum_each(sums[m]));
#else
        for (int r = 0; r < PASS_ROWS; r++) y[m * N + r] = hsum(sums[m][r]);
#endif
    }
}
#endif

/* Tokens x[m0 .. m1) against one dequantized tile row w[8][K] -> y[m, 8 columns] at y + m * N. */
static void tile_row_dots(const float *w, const float *x, int64_t m0, int64_t m1, int64_t K, float *y, int64_t N) {
#ifdef GEMMA4_AVX2
    for (int64_t m = m0; m < m1; m += TOKENS)
        for (int pass = 0; pass < 8; pass += PASS_ROWS) {
            const float *wp = w + pass * K, *xm = x + m * K;
            float *ym = y + m * N + pass;
            switch (m1 - m < TOKENS ? m1 - m : TOKENS) {  /* literal counts: the sums stay in registers */
            case 1: pass_dots(wp, xm, 1, K, ym, N); break;
            case 2: pass_dots(wp, xm, 2, K, ym, N); break;
            default: pass_dots(wp, xm, 3, K, ym, N);
            }
        }
#else
    for (int64_t m = m0; m < m1; m++)
        for (int r = 0; r < 8; r++) {
            float s = 0.f;
            for (int64_t k = 0; k < K; k++) s = fmaf(w[r * K + k], x[m * K + k], s);
            y[m * N + r] = s;
        }
#endif
}

/* x [M, K] -> y [M, N]. experts NULL: every token through the one weight. Otherwise the weight is a
 * stack ([E, N/8, K/32, 128], scales and offsets [E, N/8, G, 8]) and row m goes through expert
 * experts[m], the rows sorted by expert (matmul_int4's routed form). Work items are (block of one
 * expert's rows, tile row) pairs, block by block, handed out as threads come free. */
void prompt_matmul_int4(const float *x, const uint8_t *codes, const void *scales, const void *offsets, int f16, const int64_t *experts,
                        float *y, int64_t M, int64_t N, int64_t K, int64_t group, int threads) {
    int64_t G = K / group, T = N / 8, width = f16 ? 2 : 4;
    int64_t block = BLOCK_BYTES / (K * 4);
    block = block < TOKENS ? TOKENS : block / TOKENS * TOKENS;
    int64_t *starts = (int64_t *)malloc((M + 1) * sizeof(int64_t)), blocks = 0;  /* block i: rows starts[i] .. starts[i + 1] */
    for (int64_t m = 0; m < M; m++)
        if (m == 0 || m - starts[blocks - 1] == block || (experts && experts[m] != experts[m - 1])) starts[blocks++] = m;
    starts[blocks] = M;
    int64_t codes_per_expert = T * (K / 32) * TILE_BYTES, values_per_expert = T * G * 8 * width;
#pragma omp parallel num_threads(threads)
    {
        float *w = (float *)malloc(8 * K * sizeof(float));
#pragma omp for schedule(dynamic, 4)  /* runs of 4 tile rows: one thread's next tile row is the one it prefetches */
        for (int64_t i = 0; i < blocks * T; i++) {
            int64_t b = i / T, t = i % T, e = experts ? experts[starts[b]] : 0;
            const char *s = (const char *)scales + e * values_per_expert + t * G * 8 * width;
            const char *o = offsets ? (const char *)offsets + e * values_per_expert + t * G * 8 * width : NULL;
            dequantize_tile_row(codes + e * codes_per_expert + t * (K / 32) * TILE_BYTES, s, o, f16, K, group, w);
            tile_row_dots(w, x, starts[b], starts[b + 1], K, y + t * 8, N);
        }
        free(w);
    }
    free(starts);
}
