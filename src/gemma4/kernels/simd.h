/* What the kernels share: whether this build has AVX2 + FMA, the horizontal sum of a register, the
 * weight prefetch distance, bf16/fp16 -> fp32, per-group sums and the int8 rounding of one token's
 * activations. */
#ifndef GEMMA4_SIMD_H
#define GEMMA4_SIMD_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GEMMA4_AVX2 1

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Weight bytes ahead of the load to ask for: measured on this kind of machine, one sequential
 * stream per thread with a software prefetch reads ~20 % faster than the hardware prefetcher alone,
 * and 4 KB ahead 3-8 % faster again than 1 KB (all of full-size E2B's matrices, bf16 and int4). */
#define PREFETCH_BYTES 4096
#define PREFETCH(p) _mm_prefetch((const char *)(p) + PREFETCH_BYTES, _MM_HINT_T0)

/* e^x, to within 2 ulp (Cephes' expf: x = n ln 2 + r, a degree-6 polynomial in r, n into the exponent
 * bits); x is clamped to [-87.3, 88.7], where e^x is a normal float. */
static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.7f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

/* 8 bf16 values as fp32: a bf16 is the high half of the fp32 it rounds. */
static inline __m256 load_bf16(const uint16_t *w) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)w)), 16));
}
#endif

#define TILE_BYTES 128 /* int4 tiles (quant/int4.py): one 32-column block of 8 rows */

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 31, man = h & 1023, bits;
    if (exp == 31) bits = sign | 0x7F800000 | (man << 13);
    else if (exp) bits = sign | ((exp + 112) << 23) | (man << 13);
    else if (!man) bits = sign;
    else {  /* subnormal: normalise */
        exp = 113;
        while (!(man & 1024)) { man <<= 1; exp--; }
        bits = sign | (exp << 23) | ((man & 1023) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* The fp16 d of a GGUF Q6_K block (256 columns: 4 low bits ql[128], 2 high bits qh[64], 16 int8 scales, d). */
static inline float q6_k_d(const uint8_t *block) {
    uint16_t bits;
    memcpy(&bits, block + 208, 2);
    return half_to_float(bits);
}

/* One GGUF Q6_K block -> int8 codes (-32..31) [256] and fp32 scales d * scale [16], one per 16 columns
 * (ggml-quants.c's dequantize_row_q6_K: two halves of 128, four 32-runs each). */
static inline void q6_k_block(const uint8_t *block, int8_t *y, float *scales) {
    const uint8_t *ql = block, *qh = block + 128;
    const int8_t *sc = (const int8_t *)(block + 192);
    float d = q6_k_d(block);
    for (int h = 0; h < 2; h++, y += 128, ql += 64, qh += 32) {
        for (int l = 0; l < 32; l++) {
            y[l] = (int8_t)(((ql[l] & 15) | ((qh[l] & 3) << 4)) - 32);
            y[l + 32] = (int8_t)(((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32);
            y[l + 64] = (int8_t)(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
            y[l + 96] = (int8_t)(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
        }
    }
    for (int j = 0; j < 16; j++) scales[j] = d * sc[j];
}

/* An int4 tile's scales or offsets (fp16 or fp32, [G, 8]): the value at `at`, or (AVX2) 8 from `at` as fp32. */
static inline float group_value(const void *values, int64_t at, int f16) {
    return f16 ? half_to_float(((const uint16_t *)values)[at]) : ((const float *)values)[at];
}

#ifdef GEMMA4_AVX2
static inline __m256 load_group_values(const void *values, int64_t at, int f16) {
    return f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)values + at))) : _mm256_loadu_ps((const float *)values + at);
}
#endif

/* One row of an int4 tile block as fp32 out[32], scale * code + offset: `piece` is the row's 16 bytes
 * (byte j: column j in the low nibble, j + 16 in the high one). */
static inline void dequantize_piece(const uint8_t *piece, float s, float z, float *out) {
#ifdef GEMMA4_AVX2
    __m128i bytes = _mm_loadu_si128((const __m128i *)piece);
    __m256 scale = _mm256_set1_ps(s), offset = _mm256_set1_ps(z);
    __m256i nibble = _mm256_set1_epi32(15);
    for (int half = 0; half < 2; half++) {
        __m256i q = _mm256_cvtepu8_epi32(half ? _mm_srli_si128(bytes, 8) : bytes);
        _mm256_storeu_ps(out + 8 * half, _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(_mm256_and_si256(q, nibble)), offset));
        _mm256_storeu_ps(out + 16 + 8 * half, _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(_mm256_srli_epi32(q, 4)), offset));
    }
#else
    for (int j = 0; j < 16; j++) {
        out[j] = fmaf(s, (float)(piece[j] & 15), z);
        out[16 + j] = fmaf(s, (float)(piece[j] >> 4), z);
    }
#endif
}

/* Sum of x [M, K] over each group, so offsets cost one multiply per group:
 * sum_k (s q_k + o) x_k = s sum q_k x_k + o sum x_k. */
static inline void group_sums(const float *x, float *sums, int64_t M, int64_t K, int64_t group) {
    int64_t G = K / group;
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < G; g++) {
            float s = 0.f;
            for (int64_t k = 0; k < group; k++) s += x[m * K + g * group + k];
            sums[m * G + g] = s;
        }
}

/* Rounds one token's activations for the integer dot products, per 32-block, in two int8 halves:
 * high = round(x / step) with step = max|x| / 127 (llama.cpp's Q8_0 activations), and the rest
 * low = round((x - high step) / (step / LOW_STEPS)), so x = step (high + low / LOW_STEPS) to within
 * 1.5 / (127 * 256) of the block's largest value, finer than bf16 rounds: the answers stay the
 * model's (high alone moved Gemma 3 270M's next-token KL to 0.03, 25-40x its weights' own rounding).
 * |rest| <= step / 2 puts low in [-128, 128]: it is clamped to +-127 (an error of 1.5 low steps at
 * worst), so either half fits the sign trick of the int8 kernels, and 256, a power of two, brings
 * the high half's integer sums to the low half's step with one shift.
 * `low` NULL: the high half only (--fast-math). */
#define LOW_STEPS 256

#ifdef GEMMA4_AVX2
/* LOW_STEPS x per 32-bit lane: the high half's integer sums brought to the low half's step. */
static inline __m256i times_low_steps(__m256i x) { return _mm256_slli_epi32(x, 8); }

/* Per 32-bit lane (4 adjacent bytes), the integer dot products of unsigned bytes with both rounded
 * halves, LOW_STEPS (u . high) + (u . low), or u . high alone without the low half, over one byte
 * vector (u0) or two (u0 and u1, which must be int4 codes: |u| <= 15). With VNNI (AVX-VNNI, or the
 * 256-bit form of AVX-512 VNNI; a compile for this CPU finds out) a multiply-add instruction per
 * product; without, maddubs leaves 16-bit pair sums (at most 2 * 128 * 127, or for two int4 vectors
 * added 4 * 15 * 127: no saturation), and one madd per half widens them already weighted: 5
 * instructions per half-pair where widening each product first took 9 (on this kind of machine the
 * exact int4 decode was bound by instructions). */
#if defined(__AVXVNNI__)
#define DPBUSD _mm256_dpbusd_avx_epi32
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)  /* AVX-512 machines without AVX-VNNI (AMD Zen 4): the EVEX form */
#define DPBUSD _mm256_dpbusd_epi32
#endif
static inline __m256i rounded_dot(int pairs, int has_low, __m256i u0, __m256i high0, __m256i low0, __m256i u1, __m256i high1, __m256i low1) {
#ifdef DPBUSD
    __m256i dot = DPBUSD(_mm256_setzero_si256(), u0, high0);
    if (pairs == 2) dot = DPBUSD(dot, u1, high1);
    if (!has_low) return dot;
    dot = DPBUSD(times_low_steps(dot), u0, low0);
    return pairs == 2 ? DPBUSD(dot, u1, low1) : dot;
#else
    __m256i high = _mm256_maddubs_epi16(u0, high0);
    if (pairs == 2) high = _mm256_add_epi16(high, _mm256_maddubs_epi16(u1, high1));
    if (!has_low) return _mm256_madd_epi16(high, _mm256_set1_epi16(1));
    __m256i low = _mm256_maddubs_epi16(u0, low0);
    if (pairs == 2) low = _mm256_add_epi16(low, _mm256_maddubs_epi16(u1, low1));
    return _mm256_add_epi32(_mm256_madd_epi16(high, _mm256_set1_epi16(LOW_STEPS)), _mm256_madd_epi16(low, _mm256_set1_epi16(1)));
#endif
}

#if defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
/* rounded_dot of two int4 code vectors over 64-byte vectors, where the CPU has AVX-512 VNNI: half the
 * instructions a weight. On AMD Zen 4, whose 512-bit units are 256-bit ones used twice, a block of a
 * tile takes 4.9 ns where the 32-byte form takes 5.5 (one thread, from L2): the one-token kernels there
 * are bound by instructions more than by multiplies. */
#define GEMMA4_AVX512 1
static inline __m512i rounded_dot512(int has_low, __m512i u0, __m512i high0, __m512i low0, __m512i u1, __m512i high1, __m512i low1) {
    __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u0, high0), u1, high1);
    if (!has_low) return dot;
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_slli_epi32(dot, 8), u0, low0), u1, low1);
}

/* 16 bytes at p in each 128-bit lane. */
static inline __m512i broadcast16(const int8_t *p) { return _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)p)); }

/* Two tiles' 8 scales or offsets of a group (at `at` of each) as one vector of their 16 rows. */
static inline __m512 pair_values(const void *const values[2], int64_t at, int f16) {
    return _mm512_insertf32x8(_mm512_castps256_ps512(load_group_values(values[0], at, f16)), load_group_values(values[1], at, f16), 1);
}

/* One 32-column block of two int4 tiles (the second may repeat the first) as 16 rows in 8 vectors: in vector
 * j, each 32-bit lane holds one row's codes of columns 4j .. 4j + 3, one byte each (0..15). In this layout a
 * lane sums one row, so a token's 4 activation bytes broadcast into a multiply-add and no row sum needs a
 * horizontal reduction. A tile's 32-byte chunk c holds rows c and c + 4, 16 bytes each; a row's byte j
 * holds column j in its low nibble and j + 16 in its high one, so its 32-bit word i holds columns 4i .. 4i + 3
 * (low nibbles) and 16 + 4i .. (high). Two rounds of in-lane unpacks (cheap, where cross-lane permutes
 * are not) transpose the words, leaving lane l with row PAIR_ROW_OF_LANE[l]. */
static const int32_t PAIR_ROW_OF_LANE[16] = {0, 2, 8, 10, 4, 6, 12, 14, 1, 3, 9, 11, 5, 7, 13, 15};
static const int32_t PAIR_LANE_OF_ROW[16] = {0, 8, 1, 9, 4, 12, 5, 13, 2, 10, 3, 11, 6, 14, 7, 15};
typedef struct {
    __m512i w0, w1, w2, w3, w4, w5, w6, w7;
} PairCodes;

static inline __attribute__((always_inline)) PairCodes unpack_pair_block(const uint8_t *first, const uint8_t *second) {
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    __m512i a = _mm512_loadu_si512(first), b = _mm512_loadu_si512(first + 64);  /* 128-bit lanes: rows 0, 4, 1, 5 and 2, 6, 3, 7 */
    __m512i c = _mm512_loadu_si512(second), d = _mm512_loadu_si512(second + 64);
    __m512i ab_lo = _mm512_unpacklo_epi32(a, b), ab_hi = _mm512_unpackhi_epi32(a, b);
    __m512i cd_lo = _mm512_unpacklo_epi32(c, d), cd_hi = _mm512_unpackhi_epi32(c, d);
    __m512i q0 = _mm512_unpacklo_epi64(ab_lo, cd_lo), q1 = _mm512_unpackhi_epi64(ab_lo, cd_lo);  /* words 0 and 1 of the 16 rows */
    __m512i q2 = _mm512_unpacklo_epi64(ab_hi, cd_hi), q3 = _mm512_unpackhi_epi64(ab_hi, cd_hi);
    PairCodes codes = {_mm512_and_si512(q0, nibble), _mm512_and_si512(q1, nibble), _mm512_and_si512(q2, nibble), _mm512_and_si512(q3, nibble),
                       _mm512_and_si512(_mm512_srli_epi32(q0, 4), nibble), _mm512_and_si512(_mm512_srli_epi32(q1, 4), nibble),
                       _mm512_and_si512(_mm512_srli_epi32(q2, 4), nibble), _mm512_and_si512(_mm512_srli_epi32(q3, 4), nibble)};
    return codes;
}

/* A token's integer dot products with the 16 rows of c over one block: high and low its rounded halves' 8
 * words (low NULL: one half), bias -8 x the block's integer sum (codes count from 8). Four chains of four
 * multiply-adds (two a half), summed after: the same integers as one chain of 16, whose latency the
 * out-of-order window did not hide (a prompt's matmuls 13-15 % slower with two halves, 2 % with one). The
 * halves written out, interleaved: as one helper called per half, GCC ordered the chains half after half
 * and the prompt kernel ran 1.35x slower. */
static inline __attribute__((always_inline)) __m512i pair_block_dot(PairCodes c, const int32_t *high, const int32_t *low, int32_t bias) {
    __m512i a = _mm512_dpbusd_epi32(low ? _mm512_setzero_si512() : _mm512_set1_epi32(bias), c.w0, _mm512_set1_epi32(high[0]));
    __m512i b = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c.w4, _mm512_set1_epi32(high[4]));
    a = _mm512_dpbusd_epi32(a, c.w1, _mm512_set1_epi32(high[1]));
    b = _mm512_dpbusd_epi32(b, c.w5, _mm512_set1_epi32(high[5]));
    a = _mm512_dpbusd_epi32(a, c.w2, _mm512_set1_epi32(high[2]));
    b = _mm512_dpbusd_epi32(b, c.w6, _mm512_set1_epi32(high[6]));
    a = _mm512_dpbusd_epi32(a, c.w3, _mm512_set1_epi32(high[3]));
    b = _mm512_dpbusd_epi32(b, c.w7, _mm512_set1_epi32(high[7]));
    __m512i dot = _mm512_add_epi32(a, b);
    if (!low) return dot;
    __m512i e = _mm512_dpbusd_epi32(_mm512_set1_epi32(bias), c.w0, _mm512_set1_epi32(low[0]));
    __m512i f = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c.w4, _mm512_set1_epi32(low[4]));
    e = _mm512_dpbusd_epi32(e, c.w1, _mm512_set1_epi32(low[1]));
    f = _mm512_dpbusd_epi32(f, c.w5, _mm512_set1_epi32(low[5]));
    e = _mm512_dpbusd_epi32(e, c.w2, _mm512_set1_epi32(low[2]));
    f = _mm512_dpbusd_epi32(f, c.w6, _mm512_set1_epi32(low[6]));
    e = _mm512_dpbusd_epi32(e, c.w3, _mm512_set1_epi32(low[3]));
    f = _mm512_dpbusd_epi32(f, c.w7, _mm512_set1_epi32(low[7]));
    return _mm512_add_epi32(_mm512_slli_epi32(dot, 8), _mm512_add_epi32(e, f));
}
#endif
#endif

typedef struct {
    int8_t *high, *low;  /* [M, K]; low NULL when fast */
    float *step;         /* [M, K / 32]: the block's step (over LOW_STEPS with two halves: the low half's, which
                          * the integer sums count in; exact, a power of two, and one multiply fewer a block) */
    int32_t *bias;       /* [M, K / 32]: -8 x the block's integer sum, so int4 codes count from 8 (int4.c's reason) */
} RoundedActivations;

static inline void round_block(const float *xb, float inverse, int8_t *out) {
#ifdef GEMMA4_AVX2
    const __m256i top = _mm256_set1_epi32(127), bottom = _mm256_set1_epi32(-127);
    __m256 scale = _mm256_set1_ps(inverse);
    __m256i q[4];
    for (int j = 0; j < 4; j++)
        q[j] = _mm256_max_epi32(bottom, _mm256_min_epi32(top, _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + 8 * j), scale))));
    /* pack 32 int32 -> 32 int8, undoing the packs' lane interleave */
    __m256i words = _mm256_packs_epi32(q[0], q[1]), words2 = _mm256_packs_epi32(q[2], q[3]);
    __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(words, words2), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)out, bytes);
#else
    for (int j = 0; j < 32; j++) out[j] = (int8_t)fmaxf(-127.f, fminf(127.f, rintf(xb[j] * inverse)));
#endif
}

static inline float block_max(const float *xb) {
#ifdef GEMMA4_AVX2  /* the same value: max is exact */
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 top = _mm256_and_ps(_mm256_loadu_ps(xb), magnitude);
    for (int j = 8; j < 32; j += 8) top = _mm256_max_ps(top, _mm256_and_ps(_mm256_loadu_ps(xb + j), magnitude));
    __m128 half = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
    half = _mm_max_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_max_ss(half, _mm_movehdup_ps(half)));
#else
    float amax = 0.f;
    for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(xb[j]));
    return amax;
#endif
}

/* One block of 32 activations rounded as above into high[32] (and low[32], unless NULL: one half) ->
 * its step, max / 127, with *sum its integer sum (LOW_STEPS high + low, or high alone). */
static inline float round_32(const float *xb, int8_t *high, int8_t *low, int32_t *sum) {
    float amax = block_max(xb), inverse = amax > 0.f ? 127.f / amax : 0.f, step = amax / 127.f, rest[32];
    round_block(xb, inverse, high);
    if (low) {
        for (int j = 0; j < 32; j++) rest[j] = xb[j] - high[j] * step;
        round_block(rest, inverse * LOW_STEPS, low);
    }
    int32_t total = 0;
    for (int j = 0; j < 32; j++) total += low ? high[j] * LOW_STEPS + low[j] : high[j];
    *sum = total;
    return step;
}

/* x [M, K] rounded as above; free with release_activations. */
static inline RoundedActivations round_activations(const float *x, int64_t M, int64_t K, int fast) {
    int64_t B = M * K / 32;
    RoundedActivations a = {(int8_t *)malloc(M * K), fast ? NULL : (int8_t *)malloc(M * K), (float *)malloc(B * sizeof(float)),
                            (int32_t *)malloc(B * sizeof(int32_t))};
    for (int64_t b = 0; b < B; b++) {
        int32_t sum;
        a.step[b] = round_32(x + b * 32, a.high + b * 32, fast ? NULL : a.low + b * 32, &sum);
        if (!fast) a.step[b] /= LOW_STEPS;
        a.bias[b] = -8 * sum;
    }
    return a;
}

static inline void release_activations(RoundedActivations a) {
    free(a.high);
    free(a.low);
    free(a.step);
    free(a.bias);
}

#ifdef GEMMA4_AVX512
/* A panel's rounded activations, block-major so that a token's bytes are at offsets known at compile time. */
typedef struct {
    int8_t *high, *low; /* [K/32][count][32]; low NULL with one half */
    float *step;        /* [K/32][count]: the block's step (over LOW_STEPS with two halves) */
    int32_t *bias;      /* [K/32][count]: -8 x the block's integer sum, so codes count from 8 (int4.c's reason) */
    float *sums;        /* [G][count]: the exact fp32 group sums the offsets multiply; NULL without offsets */
} Panel;

/* Arrays for M tokens' rounded activations (with sums where the weight has offsets); free with release_panel. */
static inline Panel alloc_panel(int64_t M, int64_t K, int64_t group, int halves, int offsets) {
    int64_t B = K / 32;
    Panel p = {(int8_t *)malloc(M * K), halves == 2 ? (int8_t *)malloc(M * K) : NULL, (float *)malloc(M * B * sizeof(float)),
               (int32_t *)malloc(M * B * sizeof(int32_t)), offsets ? (float *)malloc(M * (K / group) * sizeof(float)) : NULL};
    return p;
}

static inline void release_panel(Panel p) {
    free(p.high);
    free(p.low);
    free(p.step);
    free(p.bias);
    free(p.sums);
}

/* Tile rows t and t + 1 of a weight's T (the last of an odd number paired with itself, its copy not stored):
 * their codes, scales and offsets (NULL without), and the rows a pair's 16 outputs store. */
typedef struct {
    const uint8_t *tiles[2];
    const void *scales[2], *offsets[2];
    __mmask16 rows;
} TilePair;

static inline TilePair tile_pair(const uint8_t *codes, const void *scales, const void *offsets, int f16, int64_t t, int64_t T, int64_t K,
                                 int64_t group) {
    int64_t tile_codes = (K / 32) * TILE_BYTES, tile_values = (K / group) * 8 * (f16 ? 2 : 4), odd = t + 1 == T;
    const uint8_t *tile = codes + t * tile_codes;
    const char *s = (const char *)scales + t * tile_values, *o = offsets ? (const char *)offsets + t * tile_values : NULL;
    TilePair pair = {{tile, odd ? tile : tile + tile_codes}, {s, odd ? s : s + tile_values}, {o, o && !odd ? o + tile_values : o},
                     (__mmask16)(odd ? 0x00FF : 0xFFFF)};
    return pair;
}

/* Rows x[0 .. count) (K apart) rounded into panel p (its arrays sized for `count` tokens) by round_32. */
static inline void round_panel(const float *x, int64_t count, int64_t K, int64_t group, int halves, Panel p) {
    int64_t B = K / 32, G = K / group;
    for (int64_t m = 0; m < count; m++)
        for (int64_t b = 0; b < B; b++) {
            int64_t at = b * count + m;
            int32_t sum;
            float step = round_32(x + m * K + b * 32, p.high + at * 32, halves == 2 ? p.low + at * 32 : NULL, &sum);
            p.step[at] = halves == 2 ? step / LOW_STEPS : step;
            p.bias[at] = -8 * sum;
        }
    if (p.sums) {
        float *sums = (float *)malloc(count * G * sizeof(float));
        group_sums(x, sums, count, K, group);
        for (int64_t m = 0; m < count; m++)
            for (int64_t g = 0; g < G; g++) p.sums[g * count + m] = sums[m * G + g];
        free(sums);
    }
}
#endif

#endif
