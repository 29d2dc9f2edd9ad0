/* Prompt-shaped matmuls over int4 tiles (quant/int4.py), exact in fp32: y[M, N] = x[M, K] . W[N, K]^T for
 * an expert stack's runs of rows in a prefill chunk where the CPU lacks AVX-512 VNNI (with it, prompts
 * take int4_prompt_vnni.c). Each sum is fp32 FMAs in an order that depends on nothing but k, so a token's
 * answer is the same in any batch or run of rows.
 *
 * Dequantize + MKL's sgemm did the same math at ~70 GFLOP/s on the 26B-A4B's experts (about 32 rows
 * each): the dequantized block went to memory and back, and with few rows MKL spent as long packing the
 * weights as multiplying them. Here a tile's 8 rows are dequantized into a per-thread buffer that stays
 * in L2 and the tokens stream past it, 3 tokens x 4 rows of 8-wide sums in registers (with AVX2); a block
 * of tokens (BLOCK_BYTES of activations, in L2 too) is finished against every row before the next block,
 * so the weights are read from memory once per block. On 2 Zen 4 cores held to AVX2 it beat dequantize +
 * sgemm on expert runs (143 vs 89 GFLOP/s) but not on a dense weight's 512 rows (139-157 vs 159-180), so
 * dense prompts without VNNI keep dequantize + sgemm (quant/packed.py). (An AVX-512 form with 16 rows
 * column-major and panels of 24 tokens reached ~210 GFLOP/s; every CPU that could run it has VNNI.) */

#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"
#include "simd.h"

#define BLOCK_BYTES (768 << 10) /* activations per block of tokens: with the dequantized rows, within a 1 MB L2 */
#define PANEL 3 /* 3 x 4 sums + 3 activations + 1 weight of 16 AVX2 registers: a tile's 8 rows in two passes */

/* The rows of x in panels of up to `panel` rows of one expert (panel p: rows starts[p] .. starts[p + 1]),
 * and the panels in blocks of one expert's, per_block at most (block i: panels blocks[i] .. blocks[i + 1]).
 * Returns the number of blocks; starts and blocks have room for M + 1. */
int64_t split_rows(const int64_t *experts, int64_t M, int64_t panel, int64_t per_block, int64_t *starts, int64_t *blocks) {
    int64_t panels = 0, count = 0;
    for (int64_t m = 0; m < M; m++) {
        int new_expert = m == 0 || (experts && experts[m] != experts[m - 1]);
        if (new_expert || m - starts[panels - 1] == panel) {
            if (new_expert || panels - blocks[count - 1] == per_block) blocks[count++] = panels;
            starts[panels++] = m;
        }
    }
    starts[panels] = M;
    blocks[count] = panels;
    return count;
}

/* Tile `tile` (8 rows, scales and offsets [G, 8] at `scales`, `offsets`) -> fp32 out[8][K], each weight
 * scale * code + offset (-8 scale on the Q4_0 grid). */
static void dequantize_tile(const uint8_t *tile, const void *scales, const void *offsets, int f16, int64_t K, int64_t group, float *out) {
    for (int64_t b = 0; b < K / 32; b++, tile += TILE_BYTES) {
        int64_t g = b * 32 / group;
#ifdef GEMMA4_AVX2
        PREFETCH(tile);
#endif
        for (int row = 0; row < 8; row++) {
            const uint8_t *piece = tile + (row % 4) * 32 + (row / 4) * 16;  /* byte j: column j low, j + 16 high */
            float s = group_value(scales, g * 8 + row, f16), z = offsets ? group_value(offsets, g * 8 + row, f16) : -8.f * s;
            dequantize_piece(piece, s, z, out + row * K + b * 32);
        }
    }
}

#ifdef GEMMA4_AVX2
/* Tokens x[0 .. count) (rows K apart, count <= PANEL, a literal where inlined) against 4 rows w[4][K]
 * -> y[m * N + row]. */
static inline __attribute__((always_inline)) void four_row_dots(const float *w, const float *x, int count, int64_t K, float *y, int64_t N) {
    __m256 sums[PANEL][4];
    for (int m = 0; m < count; m++)
        for (int r = 0; r < 4; r++) sums[m][r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
        __m256 xs[PANEL];
        for (int m = 0; m < count; m++) xs[m] = _mm256_loadu_ps(x + m * K + k);
        for (int r = 0; r < 4; r++) {
            __m256 wv = _mm256_loadu_ps(w + r * K + k);
            for (int m = 0; m < count; m++) sums[m][r] = _mm256_fmadd_ps(wv, xs[m], sums[m][r]);
        }
    }
    for (int m = 0; m < count; m++)
        for (int r = 0; r < 4; r++) y[m * N + r] = hsum(sums[m][r]);
}
#endif

/* A panel of tokens x[0 .. count) against one dequantized tile w[8][K] -> y[m * N + row]. */
static void tile_dots(const float *w, const float *x, int count, int64_t K, float *y, int64_t N) {
#ifdef GEMMA4_AVX2
    for (int pass = 0; pass < 8; pass += 4)
        switch (count) {  /* literal counts: the sums stay in registers */
        case 1: four_row_dots(w + pass * K, x, 1, K, y + pass, N); break;
        case 2: four_row_dots(w + pass * K, x, 2, K, y + pass, N); break;
        default: four_row_dots(w + pass * K, x, 3, K, y + pass, N);
        }
#else
    for (int m = 0; m < count; m++)
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
 * expert's rows, tile) pairs, block by block, handed out as threads come free. */
void prompt_matmul_int4(const float *x, const uint8_t *codes, const void *scales, const void *offsets, int f16, const int64_t *experts,
                        float *y, int64_t M, int64_t N, int64_t K, int64_t group, int threads) {
    int64_t T = N / 8, G = K / group, width = f16 ? 2 : 4;
    int64_t per_block = BLOCK_BYTES / (K * 4 * PANEL);
    int64_t *starts = (int64_t *)malloc((M + 1) * sizeof(int64_t)), *blocks = (int64_t *)malloc((M + 1) * sizeof(int64_t));
    int64_t block_count = split_rows(experts, M, PANEL, per_block > 1 ? per_block : 1, starts, blocks);
    int64_t tile_codes = (K / 32) * TILE_BYTES, tile_values = G * 8 * width;
#pragma omp parallel num_threads(threads)
    {
        float *w = (float *)malloc(8 * K * sizeof(float));
#pragma omp for schedule(dynamic, 2)  /* runs of 2: a thread's next tiles are those it prefetches */
        for (int64_t i = 0; i < block_count * T; i++) {
            int64_t b = i / T, t = i % T, e = experts ? experts[starts[blocks[b]]] : 0;
            const uint8_t *tile = codes + (e * T + t) * tile_codes;
            const char *s = (const char *)scales + (e * T + t) * tile_values;
            const char *o = offsets ? (const char *)offsets + (e * T + t) * tile_values : NULL;
            dequantize_tile(tile, s, o, f16, K, group, w);
            for (int64_t p = blocks[b]; p < blocks[b + 1]; p++) {
                int count = (int)(starts[p + 1] - starts[p]);
                tile_dots(w, x + starts[p] * K, count, K, y + starts[p] * N + t * 8, N);
            }
        }
        free(w);
    }
    free(starts);
    free(blocks);
}
