/* Prompt-shaped matmuls over int4 tiles with the activations rounded to int8, as the one-token kernels
 * round them (round_block, simd.h: per 32-block, one int8 half with --fast-math, two otherwise), and
 * the products summed in integers by AVX-512 VNNI: y[M, N] = x[M, K] . W[N, K]^T.
 *
 * The fp32 prompt kernel (int4_prompt.c) does one FMA per weight and token, 32 multiply-adds an
 * instruction; a VNNI multiply-add does 64 (16 rows x 4 adjacent columns), so a 32-column block of 16
 * rows costs a token 8 of them (16 with two halves) and 4 to bring the integer sum to fp32 under its
 * scales: ~2.5x (one half) or ~1.5x (two) the fp32 kernel's arithmetic rate. Tiling as there: 16
 * weight rows unpacked to bytes in L2 (column-quads in 32-bit lanes, one register per 4 columns),
 * panels of up to 16 tokens whose sums stay in registers, each token's 4 activation bytes broadcast from
 * memory into the multiply-add. Each token's answer depends on nothing but its own activations: the
 * same in any batch. */

#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"
#include "simd.h"

#ifdef GEMMA4_AVX512  /* (simd.h: AVX-512 BW, VL and VNNI) */
#define GEMMA4_VNNI_PANELS 1
#define PANEL 16 /* tokens per panel: 16 sums + 8 weight vectors + scales and temporaries in 32 registers */
#define BLOCK_BYTES (768 << 10) /* rounded activations per block of tokens (int4_prompt.c's BLOCK_BYTES) */

/* Two tile rows (the second may repeat the first) -> per 32-column block b, unpack_pair_block's 8 vectors at
 * codes + b * 512 (simd.h: a row per 32-bit lane, lane l holding row PAIR_ROW_OF_LANE[l]), the 16 rows'
 * scales at scale_out + b * 16, and their offsets plus 8 scales at offset_out + b * 16 (codes count from
 * 8; none on the Q4_0 grid, whose offset is -8 scale), in the same lane order. */
static void unpack_pair(const uint8_t *const tiles[2], const void *const scales[2], const void *const offsets[2], int f16, int64_t K,
                        int64_t group, int8_t *codes, float *scale_out, float *offset_out) {
    const __m512i row_of_lane = _mm512_loadu_si512(PAIR_ROW_OF_LANE);
    for (int64_t b = 0; b < K / 32; b++) {
        const uint8_t *first = tiles[0] + b * TILE_BYTES, *second = tiles[1] + b * TILE_BYTES;
        PREFETCH(first);
        PREFETCH(second);
        PairCodes c = unpack_pair_block(first, second);
        __m512i *out = (__m512i *)(codes + b * 512);
        _mm512_store_si512(out, c.w0);
        _mm512_store_si512(out + 1, c.w1);
        _mm512_store_si512(out + 2, c.w2);
        _mm512_store_si512(out + 3, c.w3);
        _mm512_store_si512(out + 4, c.w4);
        _mm512_store_si512(out + 5, c.w5);
        _mm512_store_si512(out + 6, c.w6);
        _mm512_store_si512(out + 7, c.w7);
        int64_t g = b * 32 / group;
        __m512 scale = _mm512_permutexvar_ps(row_of_lane, pair_values(scales, g * 8, f16));
        _mm512_store_ps(scale_out + b * 16, scale);
        if (offsets[0])
            _mm512_store_ps(offset_out + b * 16, _mm512_fmadd_ps(scale, _mm512_set1_ps(8.f), _mm512_permutexvar_ps(row_of_lane, pair_values(offsets, g * 8, f16))));
    }
}

/* A panel of `count` tokens (a literal where inlined) against 16 unpacked rows -> y[m * N + row] for the
 * rows in `rows`. Per block and token: the integer dot products of the 16 rows (pair_block_dot, simd.h),
 * then one FMA under scale x step; the offsets' share once per group. The one-token kernels (int4.c) sum
 * the same way, in the same order. (The weights as 8 named registers: as an array and a loop, even
 * unrolled, GCC kept them in memory and the kernel ran 2-3x slower.) */
static inline __attribute__((always_inline)) void panel_dots(const int8_t *codes, const float *scales, const float *offsets, Panel p, int count,
                                                             int64_t K, int64_t group, float *y, int64_t N, __mmask16 rows) {
    __m512 sums[PANEL];
#pragma GCC unroll 16
    for (int m = 0; m < count; m++) sums[m] = _mm512_setzero_ps();
    const int64_t blocks = group / 32;
    for (int64_t b = 0; b < K / 32; b++) {
        const __m512i *w = (const __m512i *)(codes + b * 512);
        PairCodes c = {w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]};
        __m512 scale = _mm512_load_ps(scales + b * 16);
        const int32_t *high = (const int32_t *)(p.high + b * count * 32), *low = p.low ? (const int32_t *)(p.low + b * count * 32) : NULL;
        const float *step = p.step + b * count;
        const int32_t *bias = p.bias + b * count;
#pragma GCC unroll 16
        for (int m = 0; m < count; m++) {
            __m512i dot = pair_block_dot(c, high + m * 8, low ? low + m * 8 : NULL, bias[m]);
            sums[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(scale, _mm512_set1_ps(step[m])), sums[m]);
        }
        if (offsets && (b + 1) % blocks == 0) {
            int64_t g = b / blocks;
            __m512 offset = _mm512_load_ps(offsets + b * 16);
#pragma GCC unroll 16
            for (int m = 0; m < count; m++) sums[m] = _mm512_fmadd_ps(offset, _mm512_set1_ps(p.sums[g * count + m]), sums[m]);
        }
    }
    const __m512i lane_of_row = _mm512_loadu_si512(PAIR_LANE_OF_ROW);
#pragma GCC unroll 16
    for (int m = 0; m < count; m++) _mm512_mask_storeu_ps(y + m * N, rows, _mm512_permutexvar_ps(lane_of_row, sums[m]));
}

#define PANEL_CASE(n) case n: panel_dots(codes, scales, offsets, p, n, K, group, y, N, rows); break;

static void panel_dots_any(const int8_t *codes, const float *scales, const float *offsets, Panel p, int count, int64_t K, int64_t group,
                           float *y, int64_t N, __mmask16 rows) {
    switch (count) {  /* literal counts: the sums stay in registers */
        PANEL_CASE(1) PANEL_CASE(2) PANEL_CASE(3) PANEL_CASE(4) PANEL_CASE(5) PANEL_CASE(6) PANEL_CASE(7) PANEL_CASE(8)
        PANEL_CASE(9) PANEL_CASE(10) PANEL_CASE(11) PANEL_CASE(12) PANEL_CASE(13) PANEL_CASE(14) PANEL_CASE(15) default: PANEL_CASE(16)
    }
}

/* Panel i of rows starts[i] .. starts[i + 1], its arrays carved from one allocation at token starts[i]. */
static Panel panel_at(Panel all, int64_t m0, int64_t K, int64_t group) {
    Panel p = {all.high + m0 * K, all.low ? all.low + m0 * K : NULL, all.step + m0 * (K / 32), all.bias + m0 * (K / 32),
               all.sums ? all.sums + m0 * (K / group) : NULL};
    return p;
}
#endif

/* Whether this build has the kernel (AVX-512 with VNNI). */
int prompt_matmul_int4_rounded_available(void) {
#ifdef GEMMA4_VNNI_PANELS
    return 1;
#else
    return 0;
#endif
}

/* x [M, K] -> y [M, N] as prompt_matmul_int4 (int4_prompt.c), the activations rounded to `halves` (1 or 2)
 * int8 halves. Does nothing without GEMMA4_VNNI_PANELS (prompt_matmul_int4_rounded_available). */
void prompt_matmul_int4_rounded(const float *x, const uint8_t *codes, const void *scales, const void *offsets, int f16, const int64_t *experts,
                                float *y, int64_t M, int64_t N, int64_t K, int64_t group, int halves, int threads) {
#ifdef GEMMA4_VNNI_PANELS
    int64_t T = N / 8, G = K / group, B = K / 32, width = f16 ? 2 : 4, parts = (N + 15) / 16;
    int64_t token_bytes = K * halves + B * 8 + (offsets ? G * 4 : 0), per_block = BLOCK_BYTES / (token_bytes * PANEL);
    int64_t *starts = (int64_t *)malloc((M + 1) * sizeof(int64_t)), *blocks = (int64_t *)malloc((M + 1) * sizeof(int64_t));
    int64_t block_count = split_rows(experts, M, PANEL, per_block > 1 ? per_block : 1, starts, blocks), panels = blocks[block_count];
    Panel all = alloc_panel(M, K, group, halves, offsets != NULL);
    int64_t tile_codes = B * TILE_BYTES, tile_values = G * 8 * width;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < panels; i++)
            round_panel(x + starts[i] * K, starts[i + 1] - starts[i], K, group, halves, panel_at(all, starts[i], K, group));
        int8_t *unpacked = (int8_t *)aligned_alloc(64, 16 * K);
        float *row_scales = (float *)aligned_alloc(64, B * 16 * sizeof(float)), *row_offsets = (float *)aligned_alloc(64, B * 16 * sizeof(float));
#pragma omp for schedule(dynamic, 2)  /* runs of 2: a thread's next tiles are those it prefetches */
        for (int64_t i = 0; i < block_count * parts; i++) {
            int64_t b = i / parts, t = i % parts * 2, e = experts ? experts[starts[blocks[b]]] : 0;
            TilePair pair = tile_pair(codes + e * T * tile_codes, (const char *)scales + e * T * tile_values,
                                      offsets ? (const char *)offsets + e * T * tile_values : NULL, f16, t, T, K, group);
            unpack_pair(pair.tiles, pair.scales, pair.offsets, f16, K, group, unpacked, row_scales, row_offsets);
            for (int64_t q = blocks[b]; q < blocks[b + 1]; q++)
                panel_dots_any(unpacked, row_scales, offsets ? row_offsets : NULL, panel_at(all, starts[q], K, group),
                               (int)(starts[q + 1] - starts[q]), K, group, y + starts[q] * N + t * 8, N, pair.rows);
        }
        free(unpacked);
        free(row_scales);
        free(row_offsets);
    }
    release_panel(all);
    free(starts);
    free(blocks);
#else
    (void)x, (void)codes, (void)scales, (void)offsets, (void)f16, (void)experts, (void)y, (void)M, (void)N, (void)K, (void)group, (void)halves, (void)threads;
#endif
}
