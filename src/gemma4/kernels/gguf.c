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

/* GGUF Q6_K blocks -> int8 codes (-32..31) [count, 256] and fp32 scales d * scale [count, 16] (q6_k_block). */
void unpack_q6_k(const uint8_t *blocks, int8_t *codes, float *scales, int64_t count, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < count; i++) q6_k_block(blocks + i * 210, codes + i * 256, scales + i * 16);
}
