/* Matmuls over int4 tiles (quant/int4.py): 8 rows x 32 columns in 128 bytes, chunk c of 32 bytes
 * holding row c's 16 bytes then row c + 4's, each in the Q4 nibble order (byte j: column j in the
 * low nibble, j + 16 in the high one); w = scale * code + offset per group of `group` columns, the
 * scales and offsets [N/8, G, 8] in fp16 or fp32.
 *
 * The activations are rounded to two int8 halves per 32 (round_activations, simd.h), so a block of 8
 * rows costs 4 loads, 16 unsigned x signed byte multiply-adds (8 with --fast-math, which keeps only
 * the high half) and a horizontal add tree whose result is the 8 rows' exact integer dot products in
 * order (with AVX-512: 2 loads, 8 multiply-adds and two permutes); the 8 scales then apply as one
 * vector. Row-major weights spend about twice the instructions per weight on the per-row scalar work,
 * and run out of instructions before they run out of memory bandwidth. Up to 8 tokens (a batch, a
 * short prefill chunk) share each tile while it sits in L1, its codes unpacked once for every 4 of
 * them, each token's sums computed exactly as they would be alone; more run the prompt kernels.
 * With AVX-512, 4 or more rows of one weight take pairs of tile rows instead, unpacked in registers to
 * a row per 32-bit lane (pair_dots): ~20 instructions a token for 16 rows where a tile costs ~27 for 8,
 * but fewer rows stream faster as tiles. Both sum in the prompt kernel's order (int4_prompt_vnni.c), so
 * a row's outputs are the same bits in any batch, from either form, and in a prompt. Without offsets the
 * grid is llama.cpp's Q4_0, w = scale * (code - 8): the offset -8 scale is applied from the scales rather
 * than stored (the 26B-A4B's experts: 1.4 GB less). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"
#include "simd.h"

#define MAX_TOKENS 4  /* tokens a tile row takes at once */
#define PAIR_MIN_TOKENS 4  /* rows of one weight from which pairs of tile rows (AVX-512) take them: fewer stream faster as tiles */

#ifdef GEMMA4_AVX2
/* A block's codes (32 columns of a tile's 8 rows), unpacked once for every token that reads it. */
#ifdef GEMMA4_AVX512
typedef struct { __m512i lo[2], hi[2]; } Nibbles;  /* chunks 0-1 and 2-3 */
#else
typedef struct { __m256i lo[4], hi[4]; } Nibbles;  /* chunk c */
#endif

static inline Nibbles unpack_block(const uint8_t *tile) {
    Nibbles w;
#ifdef GEMMA4_AVX512
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    for (int c = 0; c < 2; c++) {
        __m512i v = _mm512_loadu_si512(tile + 64 * c);
        w.lo[c] = _mm512_and_si512(v, nibble);
        w.hi[c] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
    }
#else
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    for (int c = 0; c < 4; c++) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(tile + 32 * c));
        w.lo[c] = _mm256_and_si256(v, nibble);
        w.hi[c] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
    }
#endif
    return w;
}

/* A block's 8 rows against a token's rounded block (high, low): the 8 rows' integer sums in row order. */
static inline __m256i block_rows(const Nibbles *w, const int8_t *high, const int8_t *low) {
#ifdef GEMMA4_AVX512
    /* lanes of chunks 0-1: rows 0, 4, 1, 5, four partial sums each; of 2-3: rows 2, 6, 3, 7. Two permutes
     * add their partial sums in pairs into lanes r (the first two of row r) and 8 + r (the last two), and
     * the two 256-bit halves add up the rows in order (a 64-bit lane's halves added and narrowed took two
     * instructions more: the kernel is bound by instructions on 2 busy cores). */
    const __m512i first = _mm512_setr_epi32(0, 8, 16, 24, 4, 12, 20, 28, 2, 10, 18, 26, 6, 14, 22, 30);
    const __m512i second = _mm512_setr_epi32(1, 9, 17, 25, 5, 13, 21, 29, 3, 11, 19, 27, 7, 15, 23, 31);
    __m512i x0 = broadcast16(high), x1 = broadcast16(high + 16);
    __m512i r0 = low ? broadcast16(low) : x0, r1 = low ? broadcast16(low + 16) : x1;
    __m512i dots0 = rounded_dot512(low != NULL, w->lo[0], x0, r0, w->hi[0], x1, r1);
    __m512i dots1 = rounded_dot512(low != NULL, w->lo[1], x0, r0, w->hi[1], x1, r1);
    __m512i pairs = _mm512_add_epi32(_mm512_permutex2var_epi32(dots0, first, dots1), _mm512_permutex2var_epi32(dots0, second, dots1));
    return _mm256_add_epi32(_mm512_castsi512_si256(pairs), _mm512_extracti64x4_epi64(pairs, 1));
#else
    __m256i x0 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)high));
    __m256i x1 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(high + 16)));
    __m256i r0 = x0, r1 = x1;
    if (low) {
        r0 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)low));
        r1 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(low + 16)));
    }
    __m256i rows[4];  /* chunk c: lane 0 row c's 4 partial sums, lane 1 row c + 4's */
    for (int c = 0; c < 4; c++) rows[c] = rounded_dot(2, low != NULL, w->lo[c], x0, r0, w->hi[c], x1, r1);
    return _mm256_hadd_epi32(_mm256_hadd_epi32(rows[0], rows[1]), _mm256_hadd_epi32(rows[2], rows[3]));
#endif
}

/* One tile row (8 weight rows, all K columns) against tokens m0 .. m0 + count of the rounded
 * activations (count <= MAX_TOKENS, a literal where inlined): each block unpacked once for all of them,
 * each token's sums computed as they would be alone. -> y[m, 8 rows] at y + m * N.
 * A group's weights are taken as w = s q + o = s (q - 8) + (o + 8 s): the integer sums run over the
 * codes centred on 8 (q's sums less 8 times the block's activation sum), so the share left to the exact
 * sums of x, (o + 8 s) sum x, is small (none on the Q4_0 grid, o = -8 s) rather than two large terms
 * that cancel in fp32. Integer sums per block: |32 * 8 * 127 * LOW_STEPS + low half| < 2^24, exact in fp32. */
static inline __attribute__((always_inline)) void tile_dots(const uint8_t *tile, const RoundedActivations *a, int64_t m0, int count,
                                                            int64_t K, const float *x_sums, const void *scales, const void *offsets,
                                                            int f16, int64_t G, int64_t blocks, float *y, int64_t N) {
    const int64_t B = K / 32;
    __m256 acc[MAX_TOKENS];
    for (int j = 0; j < count; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m256 scale = load_group_values(scales, g * 8, f16);
        for (int64_t b = g * blocks; b < (g + 1) * blocks; b++, tile += TILE_BYTES) {
            PREFETCH(tile);
            PREFETCH(tile + 64);
            Nibbles w = unpack_block(tile);
            for (int j = 0; j < count; j++) {
                int64_t m = m0 + j;
                __m256i rows = block_rows(&w, a->high + m * K + b * 32, a->low ? a->low + m * K + b * 32 : NULL);
                __m256i dots = _mm256_add_epi32(rows, _mm256_set1_epi32(a->bias[m * B + b]));
                acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), _mm256_mul_ps(scale, _mm256_set1_ps(a->step[m * B + b])), acc[j]);
            }
        }
        if (offsets) {
            __m256 offset = _mm256_fmadd_ps(scale, _mm256_set1_ps(8.f), load_group_values(offsets, g * 8, f16));
            for (int j = 0; j < count; j++) acc[j] = _mm256_fmadd_ps(offset, _mm256_set1_ps(x_sums[(m0 + j) * G + g]), acc[j]);
        }
    }
    for (int j = 0; j < count; j++) _mm256_storeu_ps(y + (m0 + j) * N, acc[j]);
}
#else
/* The same sums without SIMD. */
static void tile_dot(const uint8_t *tile, const RoundedActivations *a, int64_t m, int64_t K, const float *x_sums,
                     const void *scales, const void *offsets, int f16, int64_t G, int64_t blocks, float *out) {
    const int32_t high_weight = a->low ? LOW_STEPS : 1;
    const int8_t *high = a->high + m * K, *low = a->low ? a->low + m * K : NULL;
    const float *step = a->step + m * (K / 32);
    for (int row = 0; row < 8; row++) {
        const uint8_t *piece = tile + (row % 4) * 32 + (row / 4) * 16;
        float total = 0.f;
        for (int64_t g = 0; g < G; g++) {
            float s = 0.f;
            for (int64_t b = g * blocks; b < (g + 1) * blocks; b++) {
                int32_t dot = 0;
                for (int j = 0; j < 16; j++) {
                    uint8_t byte = piece[b * TILE_BYTES + j];
                    int k = b * 32 + j;
                    dot += ((byte & 15) - 8) * (high[k] * high_weight + (low ? low[k] : 0)) +
                           ((byte >> 4) - 8) * (high[k + 16] * high_weight + (low ? low[k + 16] : 0));
                }
                s += dot * step[b];
            }
            float scale = group_value(scales, g * 8 + row, f16);
            total += s * scale;
            if (offsets) total += (group_value(offsets, g * 8 + row, f16) + 8.f * scale) * x_sums[g];
        }
        out[row] = total;
    }
}
#endif

#ifdef GEMMA4_AVX512
/* Tile rows t and t + 1 (16 weight rows) against tokens m0 .. m0 + count (a literal where inlined), in the
 * prompt kernel's arithmetic (int4_prompt_vnni.c: the same sums in the same order). */
static inline __attribute__((always_inline)) void pair_dots(const uint8_t *first, const uint8_t *second, const void *const scales[2],
                                                            const void *const offsets[2], int f16, const Panel *p, int64_t M,
                                                            int64_t m0, int count, int two_halves, int64_t K, int64_t G, int64_t blocks,
                                                            float *y, int64_t N, __mmask16 rows) {
    __m512 sums[MAX_TOKENS];
    for (int j = 0; j < count; j++) sums[j] = _mm512_setzero_ps();
    const int8_t *high = p->high + m0 * 32, *low = two_halves ? p->low + m0 * 32 : NULL;
    const float *step = p->step + m0;
    const int32_t *bias = p->bias + m0;
    const __m512i row_of_lane = _mm512_loadu_si512(PAIR_ROW_OF_LANE);
    for (int64_t g = 0; g < G; g++) {
        __m512 scale = _mm512_permutexvar_ps(row_of_lane, pair_values(scales, g * 8, f16));
        for (int64_t b = g * blocks; b < (g + 1) * blocks; b++, high += M * 32, low = two_halves ? low + M * 32 : NULL, step += M, bias += M) {
            const uint8_t *one = first + b * TILE_BYTES, *two = second + b * TILE_BYTES;
            PREFETCH(one);
            PREFETCH(one + 64);
            PREFETCH(two);
            PREFETCH(two + 64);
            PairCodes c = unpack_pair_block(one, two);
            for (int j = 0; j < count; j++) {
                __m512i dot = pair_block_dot(c, (const int32_t *)(high + j * 32), two_halves ? (const int32_t *)(low + j * 32) : NULL, bias[j]);
                sums[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(scale, _mm512_set1_ps(step[j])), sums[j]);
            }
        }
        if (offsets[0]) {
            __m512 offset = _mm512_fmadd_ps(scale, _mm512_set1_ps(8.f), _mm512_permutexvar_ps(row_of_lane, pair_values(offsets, g * 8, f16)));
            for (int j = 0; j < count; j++) sums[j] = _mm512_fmadd_ps(offset, _mm512_set1_ps(p->sums[g * M + m0 + j]), sums[j]);
        }
    }
    const __m512i lane_of_row = _mm512_loadu_si512(PAIR_LANE_OF_ROW);
    for (int j = 0; j < count; j++) _mm512_mask_storeu_ps(y + (m0 + j) * N, rows, _mm512_permutexvar_ps(lane_of_row, sums[j]));
}

#define PAIR_CASE(n, halves) \
    pair_dots(pair.tiles[0], pair.tiles[1], pair.scales, pair.offsets, f16, p, M, m, n, halves, K, G, blocks, y + t * 8, N, pair.rows); break;

/* Tile rows t and t + 1 of a weight (T of them; the last of an odd number pairs with itself) against tokens
 * m0 .. m1, into y[m, 8t .. 8t + 16). */
static inline void pair_row(const uint8_t *tiles, const void *scales, const void *offsets, int f16, const Panel *p, int64_t M, float *y,
                            int64_t t, int64_t T, int64_t m0, int64_t m1, int64_t N, int64_t K, int64_t group) {
    int64_t G = K / group, blocks = group / 32;
    TilePair pair = tile_pair(tiles, scales, offsets, f16, t, T, K, group);
    for (int64_t m = m0; m < m1; m += MAX_TOKENS) {
        int64_t count = m1 - m < MAX_TOKENS ? m1 - m : MAX_TOKENS;
        if (p->low) {
            switch (count) { case 1: PAIR_CASE(1, 1) case 2: PAIR_CASE(2, 1) case 3: PAIR_CASE(3, 1) default: PAIR_CASE(4, 1) }
        } else {
            switch (count) { case 1: PAIR_CASE(1, 0) case 2: PAIR_CASE(2, 0) case 3: PAIR_CASE(3, 0) default: PAIR_CASE(4, 0) }
        }
    }
}
#undef PAIR_CASE
#endif

/* Tile row t of a weight against tokens m0 .. m1 of the rounded activations, into y[m, 8t .. 8t + 8). */
static inline void tile_row(const uint8_t *tiles, const void *scales, const void *offsets, int f16, const RoundedActivations *a,
                            const float *x_sums, float *y, int64_t t, int64_t m0, int64_t m1, int64_t N, int64_t K, int64_t group) {
    int64_t G = K / group, width = f16 ? 2 : 4, blocks = group / 32;
    const uint8_t *tile = tiles + t * (K / 32) * TILE_BYTES;
    const void *s = (const char *)scales + t * G * 8 * width, *o = offsets ? (const char *)offsets + t * G * 8 * width : NULL;
    for (int64_t m = m0; m < m1; m += MAX_TOKENS) {
#ifdef GEMMA4_AVX2
        switch (m1 - m < MAX_TOKENS ? m1 - m : MAX_TOKENS) {  /* literal counts: each its own unrolled copy, sums in registers */
        case 1: tile_dots(tile, a, m, 1, K, x_sums, s, o, f16, G, blocks, y + t * 8, N); break;
        case 2: tile_dots(tile, a, m, 2, K, x_sums, s, o, f16, G, blocks, y + t * 8, N); break;
        case 3: tile_dots(tile, a, m, 3, K, x_sums, s, o, f16, G, blocks, y + t * 8, N); break;
        default: tile_dots(tile, a, m, 4, K, x_sums, s, o, f16, G, blocks, y + t * 8, N);
        }
#else
        for (int64_t i = m; i < m1 && i < m + MAX_TOKENS; i++) tile_dot(tile, a, i, K, x_sums + i * G, s, o, f16, G, blocks, y + i * N + t * 8);
#endif
    }
}

/* x [M, K] -> y [M, N]. experts NULL: every token through the one weight. Otherwise the weight is a
 * stack of them ([E, N/8, K/32, 128], scales and offsets [E, N/8, G, 8]) and row m goes through
 * expert experts[m]: a decode step's top-k experts, or a prompt chunk's token-expert pairs sorted by
 * expert, in one parallel pass rather than one pass each (each pass's fork and join cost about what a
 * 26B-A4B expert's one-token matmul does). Rows of one expert (a run) share each tile's trip through
 * L1, as a single weight's rows do; (run, tile) pairs are handed out 16 at a time as threads come
 * free (static halves left one thread waiting: 10-20 % slower). */
void matmul_int4(const float *x, const uint8_t *codes, const void *scales, const void *offsets, int f16, const int64_t *experts,
                 float *y, int64_t M, int64_t N, int64_t K, int64_t group, int fast, int threads) {
    int64_t G = K / group, T = N / 8, width = f16 ? 2 : 4;
    int64_t *starts = (int64_t *)malloc((M + 1) * sizeof(int64_t)), runs = 0, longest = 0;  /* run r: rows starts[r] .. starts[r + 1] */
    for (int64_t m = 0; m < M; m++)
        if (m == 0 || (experts && experts[m] != experts[m - 1])) starts[runs++] = m;
    starts[runs] = M;
    for (int64_t r = 0; r < runs; r++) longest = starts[r + 1] - starts[r] > longest ? starts[r + 1] - starts[r] : longest;
    int64_t codes_per_expert = T * (K / 32) * TILE_BYTES, values_per_expert = T * G * 8 * width;
#define EXPERT(e) codes + (e) * codes_per_expert, (const char *)scales + (e) * values_per_expert, offsets ? (const char *)offsets + (e) * values_per_expert : NULL
#ifdef GEMMA4_AVX512
    if (longest >= PAIR_MIN_TOKENS) {  /* the same sums as tile_row's, fewer instructions a token */
        Panel p = alloc_panel(M, K, group, fast ? 1 : 2, offsets != NULL);
        round_panel(x, M, K, group, fast ? 1 : 2, p);
        int64_t pairs = (T + 1) / 2;
#pragma omp parallel for schedule(dynamic, 8) num_threads(threads)
        for (int64_t i = 0; i < runs * pairs; i++) {
            int64_t r = i / pairs, e = experts ? experts[starts[r]] : 0;
            pair_row(EXPERT(e), f16, &p, M, y, i % pairs * 2, T, starts[r], starts[r + 1], N, K, group);
        }
        release_panel(p);
        free(starts);
        return;
    }
#endif
    RoundedActivations a = round_activations(x, M, K, fast);
    float *sums = NULL;  /* what the offsets' share multiplies (see tile_dots) */
    if (offsets) {
        sums = (float *)malloc(M * G * sizeof(float));
        group_sums(x, sums, M, K, group);
    }
    if (experts == NULL) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t t = 0; t < T; t++) tile_row(codes, scales, offsets, f16, &a, sums, y, t, 0, M, N, K, group);
    } else {
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads)
        for (int64_t i = 0; i < runs * T; i++) {
            int64_t r = i / T, e = experts[starts[r]];
            tile_row(EXPERT(e), f16, &a, sums, y, i % T, starts[r], starts[r + 1], N, K, group);
        }
    }
#undef EXPERT
    free(starts);
    release_activations(a);
    free(sums);
}

/* Rows [n0, n1) of an int4 tiled weight to fp32, for prefill (which then runs a dense fp32 matmul). */
void dequantize_int4(const uint8_t *codes, const void *scales, const void *offsets, int f16, float *out, int64_t n0, int64_t n1,
                     int64_t K, int64_t group, int threads) {
    int64_t G = K / group, tile_stride = (K / 32) * TILE_BYTES;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = n0; n < n1; n++) {
        int64_t t = n / 8, row = n % 8;
        const uint8_t *piece = codes + t * tile_stride + (row % 4) * 32 + (row / 4) * 16;
        float *o = out + (n - n0) * K;
        for (int64_t b = 0; b < K / 32; b++) {
            int64_t at = (t * G + b * 32 / group) * 8 + row;
            float s = group_value(scales, at, f16), z = offsets ? group_value(offsets, at, f16) : -8.f * s;
            dequantize_piece(piece + b * TILE_BYTES, s, z, o + b * 32);
        }
    }
}
