/* GGUF blocks into the packed layouts (weights/gguf_repack.py) in one pass at memory speed, for the
 * two types a full-size file is made of: numpy's strided copies and bit shuffles took most of a
 * minute over the 26B-A4B's 14 GB (Q4_0 experts, Q6_K embedding). Block layouts: ggml-quants.c. */

#include <stdint.h>
#include <string.h>

#include "simd.h"

/* GGUF Q4_0 blocks of an [N, K] weight (N a multiple of 8; each block an fp16 scale, then 16 bytes of
 * codes already in our nibble order) straight into tiles and their fp16 scales [N/8, K/32, 8];
 * the Q4_0 grid needs no offsets (w = d (code - 8)). */
void tile_q4_0(const uint8_t *blocks, uint8_t *codes, uint16_t *scales, int64_t N, int64_t K, int threads) {
    int64_t B = K / 32;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < N / 8; t++) {
        for (int row = 0; row < 8; row++) {
            const uint8_t *block = blocks + (t * 8 + row) * B * 18;
            for (int64_t b = 0; b < B; b++, block += 18) {
                memcpy(scales + (t * B + b) * 8 + row, block, 2);
                memcpy(codes + (t * B + b) * TILE_BYTES + (row % 4) * 32 + (row / 4) * 16, block + 2, 16);
            }
        }
    }
}

/* GGUF Q6_K blocks (256 columns: 4 low bits ql[128], 2 high bits qh[64], 16 int8 scales, fp16 d) ->
 * int8 codes (-32..31) [count, 256] and fp32 scales d * scale [count, 16], one per 16 columns. */
void unpack_q6_k(const uint8_t *blocks, int8_t *codes, float *scales, int64_t count, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < count; i++) {
        const uint8_t *block = blocks + i * 210, *ql = block, *qh = block + 128;
        const int8_t *sc = (const int8_t *)(block + 192);
        uint16_t d_bits;
        memcpy(&d_bits, block + 208, 2);
        float d = half_to_float(d_bits);
        int8_t *y = codes + i * 256;
        for (int h = 0; h < 2; h++, y += 128, ql += 64, qh += 32) {
            for (int l = 0; l < 32; l++) {
                y[l] = (int8_t)(((ql[l] & 15) | ((qh[l] & 3) << 4)) - 32);
                y[l + 32] = (int8_t)(((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32);
                y[l + 64] = (int8_t)(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
                y[l + 96] = (int8_t)(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
            }
        }
        for (int j = 0; j < 16; j++) scales[i * 16 + j] = d * sc[j];
    }
}
