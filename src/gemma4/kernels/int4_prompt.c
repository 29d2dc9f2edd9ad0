/* Prompt-shaped matmuls over int4 tiles (quant/int4.py): y[M, N] = x[M, K] . W[N, K]^T for the many
 * rows of a prefill chunk, or of an expert's share of one, in fp32 as exact as dequantizing W and
 * running a dense matmul: each sum is fp32 FMAs in an order that depends on nothing but k, so a token's
 * answer is the same in any batch or run of rows.
 *
 * Dequantize + MKL's sgemm did the same math at ~70 GFLOP/s on the 26B-A4B's experts (about 32 rows
 * each) and ~160 on dense weights: the dequantized block went to memory and back, and with few rows MKL
 * spent as long packing the weights as multiplying them. Here the weights are dequantized a few rows at
 * a time into a per-thread buffer that stays in L2, and the tokens stream past it; a block of tokens
 * (BLOCK_BYTES of activations, in L2 too) is finished against every row before the next block, so the
 * weights are read from memory once per block. Two forms:
 *   panels (AVX-512 with VBMI): 16 weight rows dequantized column-major, one register a column; a panel
 *     of up to 24 tokens keeps each token's 16 sums in a register, one FMA per token and k with the
 *     activation broadcast from memory (~210 GFLOP/s on 2 Zen 4 cores: 1.15-1.35x dequantize + MKL
 *     on dense weights, ~2.5x on the 26B-A4B's experts);
 *   rows (AVX2, or none): 8 weight rows dequantized row-major, 3 tokens x 4 rows of 8-wide sums in
 *     registers, added across at the end. */

#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"
#include "simd.h"

#define BLOCK_BYTES (768 << 10) /* activations per block of tokens: with the dequantized rows (180 KB at K = 2816), within a 1 MB L2 (384 KB: 5-10 % slower at K >= 4096) */

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__) && defined(GEMMA4_AVX2)
#define GEMMA4_PANELS 1
#define PANEL 24 /* tokens whose 16 sums each stay in a register (24 of 32) */
#define ROWS 16  /* weight rows dequantized at once: two tiles */
#else
#define PANEL 3 /* 3 x 4 sums + 3 activations + 1 weight of 16 AVX2 registers: a tile's 8 rows in two passes */
#define ROWS 8
#endif

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

#ifdef GEMMA4_PANELS
/* Byte jj * 8 + r of a gather from a block: row r's byte j0 + jj (j0 = 0, then 8), at (r % 4) * 32 + (r / 4) * 16 + j0 + jj. */
static void gather_order(int8_t order[2][64]) {
    for (int half = 0; half < 2; half++)
        for (int jj = 0; jj < 8; jj++)
            for (int r = 0; r < 8; r++) order[half][jj * 8 + r] = (int8_t)((r % 4) * 32 + (r / 4) * 16 + half * 8 + jj);
}

/* Two tile rows (8 rows each at `tiles[i]`, with their [G, 8] scales and offsets; the second may repeat the
 * first) -> fp32 out[K][16], the transpose of their dequantized rows, each weight scale * code + offset
 * (-8 scale on the Q4_0 grid). A block's bytes are gathered column by column with byte permutes (byte j
 * of a row holds column j in its low nibble and j + 16 in its high one), so 16 rows of a column become
 * one register without a float transpose. */
static void dequantize_pair(const uint8_t *const tiles[2], const void *const scales[2], const void *const offsets[2], int f16, int64_t K,
                            int64_t group, const int8_t order[2][64], float *out) {
    const __m512i low_order = _mm512_loadu_si512(order[0]), high_order = _mm512_loadu_si512(order[1]);
    const __m512i nibble = _mm512_set1_epi32(15);
    uint8_t columns[4][64] __attribute__((aligned(64)));
    for (int64_t b = 0; b < K / 32; b++) {
        int64_t g = b * 32 / group;
        const uint8_t *first = tiles[0] + b * TILE_BYTES, *second = tiles[1] + b * TILE_BYTES;
        PREFETCH(first);
        PREFETCH(second);
        __m512 scale = _mm512_insertf32x8(_mm512_castps256_ps512(load_group_values(scales[0], g * 8, f16)), load_group_values(scales[1], g * 8, f16), 1);
        __m512 offset = offsets[0] ? _mm512_insertf32x8(_mm512_castps256_ps512(load_group_values(offsets[0], g * 8, f16)), load_group_values(offsets[1], g * 8, f16), 1)
                                   : _mm512_mul_ps(scale, _mm512_set1_ps(-8.f));
        __m512i f0 = _mm512_loadu_si512(first), f1 = _mm512_loadu_si512(first + 64);
        __m512i s0 = _mm512_loadu_si512(second), s1 = _mm512_loadu_si512(second + 64);
        __m512i first_low = _mm512_permutex2var_epi8(f0, low_order, f1), first_high = _mm512_permutex2var_epi8(f0, high_order, f1);
        __m512i second_low = _mm512_permutex2var_epi8(s0, low_order, s1), second_high = _mm512_permutex2var_epi8(s0, high_order, s1);
        /* 16 bytes i of columns[q]: byte j's 16 rows, j = 8 (q / 2) + 2 i + q % 2 */
        _mm512_store_si512(columns[0], _mm512_unpacklo_epi64(first_low, second_low));
        _mm512_store_si512(columns[1], _mm512_unpackhi_epi64(first_low, second_low));
        _mm512_store_si512(columns[2], _mm512_unpacklo_epi64(first_high, second_high));
        _mm512_store_si512(columns[3], _mm512_unpackhi_epi64(first_high, second_high));
        float *o = out + b * 32 * 16;
        for (int q = 0; q < 4; q++)
            for (int i = 0; i < 4; i++) {
                int j = 8 * (q / 2) + 2 * i + q % 2;
                __m512i codes = _mm512_cvtepu8_epi32(_mm_load_si128((const __m128i *)(columns[q] + 16 * i)));
                _mm512_store_ps(o + j * 16, _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(_mm512_and_si512(codes, nibble)), offset));
                _mm512_store_ps(o + (j + 16) * 16, _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(_mm512_srli_epi32(codes, 4)), offset));
            }
    }
}

/* A panel of `count` tokens (count <= PANEL, a literal where inlined; their activations k-major,
 * panel[k * count + m]) against 16 dequantized rows w[K][16] -> y[m * N + row] for the rows in `rows`.
 * Each token's 16 sums are one register, built by one FMA per k in order, the activation broadcast from
 * memory: per k one load of weights and `count` FMAs. (The unroll pragmas keep the sums in registers:
 * without them GCC kept them in memory, 1.3x slower.) */
static inline __attribute__((always_inline)) void panel_dots(const float *w, const float *panel, int count, int64_t K, float *y, int64_t N,
                                                             __mmask16 rows) {
    __m512 sums[PANEL];
#pragma GCC unroll 24
    for (int m = 0; m < count; m++) sums[m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        __m512 wk = _mm512_load_ps(w + k * 16);
        const float *xk = panel + k * count;
#pragma GCC unroll 24
        for (int m = 0; m < count; m++) sums[m] = _mm512_fmadd_ps(_mm512_set1_ps(xk[m]), wk, sums[m]);
    }
#pragma GCC unroll 24
    for (int m = 0; m < count; m++) _mm512_mask_storeu_ps(y + m * N, rows, sums[m]);
}

#define PANEL_CASE(n) case n: panel_dots(w, panel, n, K, y, N, rows); break;

static void panel_dots_any(const float *w, const float *panel, int count, int64_t K, float *y, int64_t N, __mmask16 rows) {
    switch (count) {  /* literal counts: the sums stay in registers */
        PANEL_CASE(1) PANEL_CASE(2) PANEL_CASE(3) PANEL_CASE(4) PANEL_CASE(5) PANEL_CASE(6) PANEL_CASE(7) PANEL_CASE(8)
        PANEL_CASE(9) PANEL_CASE(10) PANEL_CASE(11) PANEL_CASE(12) PANEL_CASE(13) PANEL_CASE(14) PANEL_CASE(15) PANEL_CASE(16)
        PANEL_CASE(17) PANEL_CASE(18) PANEL_CASE(19) PANEL_CASE(20) PANEL_CASE(21) PANEL_CASE(22) PANEL_CASE(23) default: PANEL_CASE(24)
    }
}

/* The rows' activations k-major per panel (panel p at out + starts[p] * K, out[k * count + m]), so a
 * panel's k-th activations are adjacent and at offsets known at compile time. */
static void pack_panels(const float *x, const int64_t *starts, int64_t panels, int64_t K, float *out) {
#pragma omp for schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        int64_t m0 = starts[p], count = starts[p + 1] - m0;
        float *panel = out + m0 * K;
        for (int64_t m = 0; m < count; m++)
            for (int64_t k = 0; k < K; k++) panel[k * count + m] = x[(m0 + m) * K + k];
    }
}
#else
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
#endif

/* Whether this build has the panels form: the rows form beats dequantize + sgemm on an expert stack's
 * short runs (1.4-1.6x at the 26B-A4B's shapes) but not on a dense weight's 512 rows (0.85-0.95x, AVX2
 * both, measured on a Zen 4), so without panels a dense prompt keeps PyTorch's matmul (quant/packed.py). */
int prompt_matmul_int4_has_panels(void) {
#ifdef GEMMA4_PANELS
    return 1;
#else
    return 0;
#endif
}

/* x [M, K] -> y [M, N]. experts NULL: every token through the one weight. Otherwise the weight is a
 * stack ([E, N/8, K/32, 128], scales and offsets [E, N/8, G, 8]) and row m goes through expert
 * experts[m], the rows sorted by expert (matmul_int4's routed form). Work items are (block of one
 * expert's rows, ROWS weight rows) pairs, block by block, handed out as threads come free. */
void prompt_matmul_int4(const float *x, const uint8_t *codes, const void *scales, const void *offsets, int f16, const int64_t *experts,
                        float *y, int64_t M, int64_t N, int64_t K, int64_t group, int threads) {
    int64_t T = N / 8, G = K / group, width = f16 ? 2 : 4, parts = (N + ROWS - 1) / ROWS;
    int64_t per_block = BLOCK_BYTES / (K * 4 * PANEL);
    int64_t *starts = (int64_t *)malloc((M + 1) * sizeof(int64_t)), *blocks = (int64_t *)malloc((M + 1) * sizeof(int64_t));
    int64_t block_count = split_rows(experts, M, PANEL, per_block > 1 ? per_block : 1, starts, blocks);
    int64_t tile_codes = (K / 32) * TILE_BYTES, tile_values = G * 8 * width;
#ifdef GEMMA4_PANELS
    float *panels = (float *)malloc(M * K * sizeof(float));
    int8_t order[2][64];
    gather_order(order);
#else
    const float *panels = x;  /* row-major as they are */
#endif
#pragma omp parallel num_threads(threads)
    {
#ifdef GEMMA4_PANELS
        pack_panels(x, starts, blocks[block_count], K, panels);
#endif
        float *w = (float *)aligned_alloc(64, ROWS * K * sizeof(float));
#pragma omp for schedule(dynamic, 2)  /* runs of 2: a thread's next tiles are those it prefetches */
        for (int64_t i = 0; i < block_count * parts; i++) {
            int64_t b = i / parts, t = i % parts * ROWS / 8, e = experts ? experts[starts[blocks[b]]] : 0;
            const uint8_t *tile = codes + (e * T + t) * tile_codes;
            const char *s = (const char *)scales + (e * T + t) * tile_values;
            const char *o = offsets ? (const char *)offsets + (e * T + t) * tile_values : NULL;
#ifdef GEMMA4_PANELS
            int odd = t + 1 == T;  /* the last of an odd number of tiles: paired with itself, the copy not stored */
            const uint8_t *tiles[2] = {tile, odd ? tile : tile + tile_codes};
            const void *tile_scales[2] = {s, odd ? s : s + tile_values}, *tile_offsets[2] = {o, o && !odd ? o + tile_values : o};
            dequantize_pair(tiles, tile_scales, tile_offsets, f16, K, group, order, w);
#else
            dequantize_tile(tile, s, o, f16, K, group, w);
#endif
            for (int64_t p = blocks[b]; p < blocks[b + 1]; p++) {
                int count = (int)(starts[p + 1] - starts[p]);
                float *out = y + starts[p] * N + t * 8;
#ifdef GEMMA4_PANELS
                panel_dots_any(w, panels + starts[p] * K, count, K, out, N, odd ? 0x00FF : 0xFFFF);
#else
                tile_dots(w, panels + starts[p] * K, count, K, out, N);
#endif
            }
        }
        free(w);
    }
#ifdef GEMMA4_PANELS
    free(panels);
#endif
    free(starts);
    free(blocks);
}
