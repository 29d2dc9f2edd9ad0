/* Decode-shaped matmuls over 16-bit and int8 weights: y[M, N] = x[M, K] . W[N, K]^T for small M, with
 * fp32 activations and accumulation, the weights converted in registers as they stream from memory
 * (int4 tiles: int4.c).
 * Stock PyTorch kernels either compute in bf16 (slow without native bf16) or reach a fraction of
 * the memory bandwidth on int4/int8; a matvec should be bound by the weight bytes it reads.
 *
 * Weight formats (see quant/packed.py):
 *   bf16, f16: uint16 [N, K].
 *   int8: int8 codes [N, K]; w = scale[n, g] * code (+ offset[n, g]), groups of `group` along K.
 *   q6_k: GGUF Q6_K blocks [N, K / 256 * 210].
 * Called through ctypes; each entry point splits the N rows over `threads` OpenMP threads. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"
#include "simd.h"

#define MAX_M 8
/* One token's activations past this many bytes (half of a 32 KB L1) are shared by four rows at a time. */
#define SHARED_ACTIVATION_BYTES 16384

#ifdef GEMMA4_AVX2
static inline __m256 load_f16(const uint16_t *w) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w)); }

static inline __m256 load_i8(const int8_t *w) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)w)));
}
#endif

#define LOAD16(p) (is_f16 ? load_f16(p) : load_bf16(p))

/* 16-bit weights: bf16 (is_f16 = 0) or IEEE half (is_f16 = 1). */
#ifdef GEMMA4_AVX2
/* Rows n .. n + R of one token against bf16 weights with no shuffles: a 32-bit lane holding bf16 pair
 * (w[2i], w[2i+1]) gives w[2i] as a float by shifting left 16, and w[2i+1] by masking the low half; so
 * `split` holds x's even and odd elements per 16-block, and each 16 weights cost one load, a shift, an
 * and and two FMAs. R literal (1 or 4): the R rows share each load of x, each row's sums as alone. */
static inline __attribute__((always_inline)) void bf16_rows(const float *split, const uint16_t *w, float *y, int64_t n, int64_t K, int R) {
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000);
    __m256 acc[4][4];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 4; j++) acc[r][j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {  /* K % 32 == 0 (packed.py checks) */
        __m256 x0 = _mm256_loadu_ps(split + k), x1 = _mm256_loadu_ps(split + k + 8);
        __m256 x2 = _mm256_loadu_ps(split + k + 16), x3 = _mm256_loadu_ps(split + k + 24);
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const uint16_t *row = w + (n + r) * K;
            PREFETCH(row + k);
            __m256i p = _mm256_loadu_si256((const __m256i *)(row + k)), q = _mm256_loadu_si256((const __m256i *)(row + k + 16));
            acc[r][0] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(p, 16)), x0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(p, high)), x1, acc[r][1]);
            acc[r][2] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(q, 16)), x2, acc[r][2]);
            acc[r][3] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(q, high)), x3, acc[r][3]);
        }
    }
    for (int r = 0; r < R; r++) y[n + r] = hsum(_mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3])));
}

/* One token against bf16 weights [N, K]. Rows are read one after another (one memory stream per thread)
 * while x fits in half of L1; beyond that (the down projections: K 6,144-12,288 on E2B) every load of x
 * comes from L2 and fed one row's FMAs, and those matrices streamed at ~70 % of the others' rate (18-21
 * against 27 GB/s, 2 threads, from memory): four rows at a time share each load of x (24-27 GB/s), where
 * for short rows the four streams read slower than one. Either way each row's sum is the same. */
static void decode_bf16(const float *x, const uint16_t *w, float *y, int64_t N, int64_t K, int threads) {
    float *split = (float *)malloc(K * sizeof(float));
    for (int64_t k = 0; k < K; k += 16)
        for (int i = 0; i < 8; i++) {
            split[k + i] = x[k + 2 * i];
            split[k + 8 + i] = x[k + 2 * i + 1];
        }
    int64_t fours = K * (int64_t)sizeof(float) > SHARED_ACTIVATION_BYTES ? N / 4 : 0;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static) nowait
        for (int64_t i = 0; i < fours; i++) bf16_rows(split, w, y, 4 * i, K, 4);
#pragma omp for schedule(static)
        for (int64_t n = 4 * fours; n < N; n++) bf16_rows(split, w, y, n, K, 1);
    }
    free(split);
}
#endif

void matmul_16bit(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K, int is_f16, int threads) {
#ifdef GEMMA4_AVX2
    if (M == 1 && !is_f16) {
        decode_bf16(x, w, y, N, K, threads);
        return;
    }
#endif
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const uint16_t *row = w + n * K;
#ifdef GEMMA4_AVX2
        if (M == 1) {
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t k = 0; k < K; k += 32) {
                PREFETCH(row + k);
                a0 = _mm256_fmadd_ps(LOAD16(row + k), _mm256_loadu_ps(x + k), a0);
                a1 = _mm256_fmadd_ps(LOAD16(row + k + 8), _mm256_loadu_ps(x + k + 8), a1);
                a2 = _mm256_fmadd_ps(LOAD16(row + k + 16), _mm256_loadu_ps(x + k + 16), a2);
                a3 = _mm256_fmadd_ps(LOAD16(row + k + 24), _mm256_loadu_ps(x + k + 24), a3);
            }
            y[n] = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
            continue;
        }
        __m256 acc[MAX_M];
        for (int64_t m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k += 8) {
            __m256 wv = LOAD16(row + k);
            for (int64_t m = 0; m < M; m++) acc[m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), acc[m]);
        }
        for (int64_t m = 0; m < M; m++) y[m * N + n] = hsum(acc[m]);
#else
        for (int64_t m = 0; m < M; m++) {
            float s = 0.f;
            for (int64_t k = 0; k < K; k++) s += (is_f16 ? half_to_float(row[k]) : bf16_to_float(row[k])) * x[m * K + k];
            y[m * N + n] = s;
        }
#endif
    }
}

#undef LOAD16

static float offset_term(const float *offsets, const float *sums, int64_t n, int64_t m, int64_t G) {
    float s = 0.f;
    for (int64_t g = 0; g < G; g++) s += offsets[n * G + g] * sums[m * G + g];
    return s;
}

/* Each token's dot products with one row of int8 codes in groups of 16 or a multiple of 32 (q6_k_rows
 * computes the same sums over Q6_K's codes), on exact integer multiply-adds over the rounded activations (simd.h): 32 weights per maddubs
 * instead of converting each to fp32 (which bounds the speed by instructions, not bytes: Q6_K's LM
 * head of the 26B-A4B read at 7 GB/s that way). Every token is computed as it would be alone, so a
 * batch changes no one's answer. */
#ifdef GEMMA4_AVX2
/* One 32-block's integer dot products, 8 lanes of 4 columns each (lanes 0-3: columns 0-15). */
static inline __m256i block_dot(const int8_t *w, const int8_t *high, const int8_t *low) {
    PREFETCH(w);
    /* maddubs multiplies unsigned by signed: |w| (-128 reads as 128) times x with w's sign */
    __m256i wv = _mm256_loadu_si256((const __m256i *)w), magnitude = _mm256_sign_epi8(wv, wv);
    __m256i signed_high = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)high), wv);
    __m256i signed_low = low ? _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)low), wv) : signed_high;
    return rounded_dot(1, low != NULL, magnitude, signed_high, signed_low, magnitude, signed_high, signed_low);
}
#endif

#ifdef GEMMA4_AVX2
/* Rows n .. n + R's sums with token m's rounded activations into totals[R]; R literal (1 or 4): the rows
 * share each load of the activations, each row's sum as alone. */
static inline __attribute__((always_inline)) void int8_sums(const RoundedActivations *a, int64_t m, const int8_t *w, const float *scales,
                                                            int64_t n, int R, int64_t K, int64_t group, float *totals) {
    int64_t G = K / group, B = K / 32;
    const int8_t *high = a->high + m * K, *low = a->low ? a->low + m * K : NULL;
    const float *step = a->step + m * B;
    __m256 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    /* A block's scale found per group, not per block: a division per 32 bytes (b * 32 / group) held
     * this loop to ~25 GB/s on 2 cores, below the memory's ~40. */
    if (group == 16)  /* two scales a block */
        for (int64_t b = 0; b < B; b++)
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                const float *scale = scales + (n + r) * G;
                __m256i dot = block_dot(w + (n + r) * K + b * 32, high + b * 32, low ? low + b * 32 : NULL);
                __m256 s = _mm256_set_m128(_mm_set1_ps(scale[2 * b + 1]), _mm_set1_ps(scale[2 * b]));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(s, _mm256_set1_ps(step[b])), acc[r]);
            }
    else
        for (int64_t g = 0, per = group / 32; g < G; g++) {
            __m256 s[4];
            for (int r = 0; r < R; r++) s[r] = _mm256_set1_ps(scales[(n + r) * G + g]);
            for (int64_t b = g * per; b < (g + 1) * per; b++)
#pragma GCC unroll 4
                for (int r = 0; r < R; r++) {
                    __m256i dot = block_dot(w + (n + r) * K + b * 32, high + b * 32, low ? low + b * 32 : NULL);
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(s[r], _mm256_set1_ps(step[b])), acc[r]);
                }
        }
    for (int r = 0; r < R; r++) totals[r] = hsum(acc[r]);
}
#endif

/* One token's activations rounded to int8 take 2 bytes a column (two halves) and a step a block: past
 * half of L1 (K > 7,710: E2B's widest down projection), four rows at a time share each load of them,
 * as decode_bf16 does and for the same reason (~70 % of the memory's rate one row at a time). */
static void int8_rows(const RoundedActivations *a, const int8_t *w, const float *scales, const float *offsets, const float *sums,
                      float *y, int64_t M, int64_t N, int64_t K, int64_t group, int threads) {
    int64_t G = K / group;
#ifdef GEMMA4_AVX2
    int64_t fours = M == 1 && 2 * K + K / 8 > SHARED_ACTIVATION_BYTES ? N / 4 : 0;  /* (bytes: the halves, a step per 32 columns) */
#else
    int64_t fours = 0;
#endif
#pragma omp parallel num_threads(threads)
    {
#ifdef GEMMA4_AVX2
#pragma omp for schedule(static) nowait
        for (int64_t i = 0; i < fours; i++) {
            float totals[4];
            int8_sums(a, 0, w, scales, 4 * i, 4, K, group, totals);
            for (int r = 0; r < 4; r++) y[4 * i + r] = totals[r] + (offsets ? offset_term(offsets, sums, 4 * i + r, 0, G) : 0.f);
        }
#endif
#pragma omp for schedule(static)
        for (int64_t n = 4 * fours; n < N; n++)
            for (int64_t m = 0; m < M; m++) {
                float total = 0.f;
#ifdef GEMMA4_AVX2
                int8_sums(a, m, w, scales, n, 1, K, group, &total);
#else
                const int8_t *row = w + n * K, *high = a->high + m * K, *low = a->low ? a->low + m * K : NULL;
                const float *step = a->step + m * (K / 32), *scale = scales + n * G;
                for (int64_t b = 0; b < K / 32; b++) {
                    for (int64_t k0 = b * 32; k0 < b * 32 + 32; k0 += 16) {  /* each 16 columns under their group's scale */
                        int32_t dot = 0;
                        for (int64_t k = k0; k < k0 + 16; k++) dot += row[k] * (high[k] * (low ? LOW_STEPS : 1) + (low ? low[k] : 0));
                        total += dot * (scale[k0 / group] * step[b]);
                    }
                }
#endif
                y[m * N + n] = total + (offsets ? offset_term(offsets, sums, n, m, G) : 0.f);
            }
    }
}

/* GGUF Q6_K rows read as stored (quant/q6_k.py): each 256-column block's 6-bit codes rebuilt in
 * registers, 128 columns from 96 bytes (ql's low or high nibbles, qh's 2-bit fields; ggml-quants.c's
 * layout), and the same sums as int8_rows makes over the unpacked codes (d * scale per 16 columns),
 * lane for lane: from 0.82 bytes a weight instead of 1.25. The codes stay unsigned (0..63) for the
 * multiply-adds, and each lane's 32 x (its 4 columns' rounded activations), `centre`, is taken
 * back off: the sums of codes - 32 exactly, in fewer instructions than int8's sign tricks (this
 * kernel is bound by instructions, not bytes, on 2 cores). */
static void q6_k_rows(const RoundedActivations *a, const int32_t *centre, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K,
                      int threads) {
    int64_t S = K / 256, B = K / 32;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = w + n * S * 210;
        for (int64_t m = 0; m < M; m++) {
            const int8_t *high = a->high + m * K, *low = a->low ? a->low + m * K : NULL;
            const float *step = a->step + m * B;
#ifdef GEMMA4_AVX2
            const int32_t *lanes = centre + m * K / 4;
            __m256 acc = _mm256_setzero_ps();
            const __m256i nibble = _mm256_set1_epi8(15), bits = _mm256_set1_epi8(0x30);
            for (int64_t sb = 0; sb < S; sb++) {
                const uint8_t *block = row + sb * 210, *ql = block, *qh = block + 128;
                PREFETCH(ql);
                PREFETCH(ql + 64);
                PREFETCH(qh);
                /* d * scale as q6_k_block makes them: scales 0-7 and 8-15 */
                __m256 d = _mm256_set1_ps(q6_k_d(block));
                __m128i sc = _mm_loadu_si128((const __m128i *)(block + 192));
                __m256 halves[2] = {_mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc))),
                                    _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8))))};
                for (int h = 0; h < 2; h++) {
                    __m256i l0 = _mm256_loadu_si256((const __m256i *)(ql + h * 64)), l1 = _mm256_loadu_si256((const __m256i *)(ql + h * 64 + 32));
                    __m256i top = _mm256_loadu_si256((const __m256i *)(qh + h * 32));
                    __m256i codes[4] = {  /* low nibble | the 2 high bits << 4 */
                        _mm256_or_si256(_mm256_and_si256(l0, nibble), _mm256_and_si256(_mm256_slli_epi16(top, 4), bits)),
                        _mm256_or_si256(_mm256_and_si256(l1, nibble), _mm256_and_si256(_mm256_slli_epi16(top, 2), bits)),
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), nibble), _mm256_and_si256(top, bits)),
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), nibble), _mm256_and_si256(_mm256_srli_epi16(top, 2), bits)),
                    };
                    for (int q = 0; q < 4; q++) {
                        int64_t b = sb * 8 + h * 4 + q;
                        __m256i hv = _mm256_loadu_si256((const __m256i *)(high + b * 32));
                        __m256i lv = low ? _mm256_loadu_si256((const __m256i *)(low + b * 32)) : hv;
                        __m256i dot = _mm256_sub_epi32(rounded_dot(1, low != NULL, codes[q], hv, lv, codes[q], hv, lv),
                                                       _mm256_loadu_si256((const __m256i *)(lanes + b * 8)));
                        /* lanes 0-3 take scale 2q of this half, lanes 4-7 scale 2q + 1 */
                        __m256 s = _mm256_permutevar8x32_ps(halves[h], _mm256_setr_epi32(2 * q, 2 * q, 2 * q, 2 * q, 2 * q + 1, 2 * q + 1, 2 * q + 1, 2 * q + 1));
                        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(s, _mm256_set1_ps(step[b])), acc);
                    }
                }
            }
            y[m * N + n] = hsum(acc);
#else
            float total = 0.f;
            for (int64_t sb = 0; sb < S; sb++) {
                int8_t codes[256];
                float scale[16];
                q6_k_block(row + sb * 210, codes, scale);
                for (int64_t k0 = 0; k0 < 256; k0 += 16) {  /* as int8_rows over the unpacked codes */
                    int64_t b = sb * 8 + k0 / 32;
                    int32_t dot = 0;
                    for (int64_t k = k0; k < k0 + 16; k++) {
                        int64_t at = sb * 256 + k;
                        dot += codes[k] * (high[at] * (low ? LOW_STEPS : 1) + (low ? low[at] : 0));
                    }
                    total += dot * (scale[k0 / 16] * step[b]);
                }
            }
            y[m * N + n] = total;
#endif
        }
    }
}

void matmul_q6_k(const float *x, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K, int fast, int threads) {
    RoundedActivations a = round_activations(x, M, K, fast);
    int32_t *centre = (int32_t *)malloc(M * K / 4 * sizeof(int32_t));
    for (int64_t i = 0; i < M * K / 4; i++) {
        int32_t sum = 0;
        for (int64_t k = 4 * i; k < 4 * i + 4; k++) sum += a.low ? a.high[k] * LOW_STEPS + a.low[k] : a.high[k];
        centre[i] = 32 * sum;
    }
    q6_k_rows(&a, centre, w, y, M, N, K, threads);
    release_activations(a);
    free(centre);
}

void matmul_int8(const float *x, const int8_t *w, const float *scales, const float *offsets, float *y, int64_t M, int64_t N,
                 int64_t K, int64_t group, int fast, int threads) {
    int64_t G = K / group;
    float *sums = offsets ? (float *)malloc(M * G * sizeof(float)) : NULL;
    if (offsets) group_sums(x, sums, M, K, group);
    if (group % 32 == 0 || (group == 16 && K % 32 == 0)) {
        RoundedActivations a = round_activations(x, M, K, fast);
        int8_rows(&a, w, scales, offsets, sums, y, M, N, K, group, threads);
        release_activations(a);
        free(sums);
        return;
    }
    /* groups of 8 (tiny rows only): fp32 products, accumulators in registers */
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *row = w + n * K;
        const float *scale = scales + n * G;
#ifdef GEMMA4_AVX2
        __m256 acc[MAX_M];
        for (int64_t m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
        for (int64_t g = 0; g < G; g++) {
            __m256 s = _mm256_set1_ps(scale[g]);
            const int8_t *wg = row + g * group;
            for (int64_t m = 0; m < M; m++) {
                const float *xg = x + m * K + g * group;
                __m256 p0 = _mm256_setzero_ps(), p1 = p0;
                int64_t k = 0;
                for (; k + 16 <= group; k += 16) {
                    p0 = _mm256_fmadd_ps(load_i8(wg + k), _mm256_loadu_ps(xg + k), p0);
                    p1 = _mm256_fmadd_ps(load_i8(wg + k + 8), _mm256_loadu_ps(xg + k + 8), p1);
                }
                if (k < group) p0 = _mm256_fmadd_ps(load_i8(wg + k), _mm256_loadu_ps(xg + k), p0);
                acc[m] = _mm256_fmadd_ps(_mm256_add_ps(p0, p1), s, acc[m]);
            }
        }
        for (int64_t m = 0; m < M; m++) y[m * N + n] = hsum(acc[m]) + (offsets ? offset_term(offsets, sums, n, m, G) : 0.f);
#else
        for (int64_t m = 0; m < M; m++) {
            float total = 0.f;
            for (int64_t g = 0; g < G; g++) {
                float s = 0.f;
                for (int64_t k = g * group; k < (g + 1) * group; k++) s += row[k] * x[m * K + k];
                total += s * scale[g];
            }
            y[m * N + n] = total + (offsets ? offset_term(offsets, sums, n, m, G) : 0.f);
        }
#endif
    }
    free(sums);
}
