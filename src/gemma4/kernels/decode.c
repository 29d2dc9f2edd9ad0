/* The small operations of one decode step, fused: at one token each is a few microseconds of work
 * that PyTorch spends as several operators (an RMSNorm is eight, a rotation eight more), and a step
 * has hundreds of them. fp32 in and out; cached keys and values are read as stored (fp32, bf16, fp16,
 * or int8 codes with an fp16 scale per 32 values).
 * Their sums run in another order than PyTorch's, which changes only round-off.
 * Called through ctypes (kernels/__init__.py). */

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"
#include "simd.h"

/* Element `at` of a K/V buffer of `kind` values, as fp32; int8 codes times `scale` (their block's). */
static inline float kv_at(const void *kv, int64_t at, int kind, float scale) {
    if (kind == KV_F32) return ((const float *)kv)[at];
    if (kind == KV_I8) return ((const int8_t *)kv)[at] * scale;
    uint16_t h = ((const uint16_t *)kv)[at];
    return kind == KV_BF16 ? bf16_to_float(h) : half_to_float(h);
}

#ifdef GEMMA4_AVX2
static inline __m256 kv_load8(const void *kv, int64_t at, int kind, float scale) {
    if (kind == KV_F32) return _mm256_loadu_ps((const float *)kv + at);
    if (kind == KV_I8)
        return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)kv + at)))),
                             _mm256_set1_ps(scale));
    const uint16_t *h = (const uint16_t *)kv + at;
    return kind == KV_BF16 ? load_bf16(h) : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
}
#endif

/* The scale of element d of a slot whose int8 scales, one per `block` values, start at `scales` (1 for float kinds). */
static inline float block_scale(const uint16_t *scales, int64_t d, int64_t block) { return scales ? half_to_float(scales[d / block]) : 1.f; }

#ifdef GEMMA4_AVX2
/* Queries g0 .. g0 + n of `dots`, each sum split over R running sums (columns d + 8 r, d + 8 (r + R), ...)
 * added at the end. Inlined with literal n and R (n R = 8), so the sums stay in registers: with n known
 * only at run time they went through the stack, and a call took several times its multiply-adds. R > 1
 * where few queries share a KV head (the 26B-A4B's sliding layers: 2): one sum per query was a chain
 * of D / 8 dependent multiply-adds, each waiting out the last's latency (4 cycles), where 8 chains keep
 * both FMA units busy. */
static inline __attribute__((always_inline)) void dot_queries(const float *q, const void *k, int64_t k0, int kind,
                                                              const uint16_t *scales, int64_t block, float *out, int64_t g0,
                                                              int64_t n, int R, int64_t D) {
    __m256 acc[8];
    for (int64_t i = 0; i < n * R; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8 * R)  /* D % (8 R) == 0 (the callers check) */
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            __m256 kv = kv_load8(k, k0 + d + 8 * r, kind, block_scale(scales, d + 8 * r, block));
#pragma GCC unroll 8
            for (int64_t g = 0; g < n; g++) acc[g * R + r] = _mm256_fmadd_ps(_mm256_loadu_ps(q + (g0 + g) * D + d + 8 * r), kv, acc[g * R + r]);
        }
    __m256 sums[8];
    for (int64_t g = 0; g < n; g++) {
        sums[g] = acc[g * R];
        for (int r = 1; r < R; r++) sums[g] = _mm256_add_ps(sums[g], acc[g * R + r]);
    }
    if (n == 8) {  /* the 8 sums as one vector: a transposing add tree (40 instructions as 8 horizontal sums) */
        __m256 low = _mm256_hadd_ps(_mm256_hadd_ps(sums[0], sums[1]), _mm256_hadd_ps(sums[2], sums[3]));
        __m256 high = _mm256_hadd_ps(_mm256_hadd_ps(sums[4], sums[5]), _mm256_hadd_ps(sums[6], sums[7]));
        _mm256_storeu_ps(out + g0, _mm256_add_ps(_mm256_permute2f128_ps(low, high, 0x20), _mm256_permute2f128_ps(low, high, 0x31)));
        return;
    }
    for (int64_t g = 0; g < n; g++) out[g0 + g] = hsum(sums[g]);
}

/* `dots` for one kind of K/V values, inlined with it literal (kv_load8's branches on it leave the loop). */
static inline __attribute__((always_inline)) void dots_of_kind(const float *q, const void *k, int64_t k0, int kind, const uint16_t *scales,
                                                               int64_t block, float *out, int64_t group, int64_t D) {
    for (int64_t g0 = 0; g0 < group; g0 += 8) {
        int64_t n = group - g0 < 8 ? group - g0 : 8;
        int chains = 8 / n > 1 && D % (8 * (8 / n)) == 0 ? 8 / n : 1;
        switch (n * 16 + chains) {  /* the GQA groups of Gemma 4's layers: 8 (E2B, E4B, global layers), 2 (the 26B-A4B's and 31B's sliding layers) */
        case 8 * 16 + 1: dot_queries(q, k, k0, kind, scales, block, out, g0, 8, 1, D); break;
        case 4 * 16 + 2: dot_queries(q, k, k0, kind, scales, block, out, g0, 4, 2, D); break;
        case 2 * 16 + 4: dot_queries(q, k, k0, kind, scales, block, out, g0, 2, 4, D); break;
        case 1 * 16 + 8: dot_queries(q, k, k0, kind, scales, block, out, g0, 1, 8, D); break;
        default: dot_queries(q, k, k0, kind, scales, block, out, g0, n, 1, D);
        }
    }
}
#endif

/* out[g] = q[g] . k for the `group` queries of one KV head: k (element k0 on, its int8 block scales at
 * `scales`) is loaded once for all of them. */
static void dots(const float *q, const void *k, int64_t k0, int kind, const uint16_t *scales, int64_t block, float *out, int64_t group,
                 int64_t D) {
#ifdef GEMMA4_AVX2
    switch (kind) {
    case KV_F32: dots_of_kind(q, k, k0, KV_F32, scales, block, out, group, D); break;
    case KV_BF16: dots_of_kind(q, k, k0, KV_BF16, scales, block, out, group, D); break;
    case KV_F16: dots_of_kind(q, k, k0, KV_F16, scales, block, out, group, D); break;
    default: dots_of_kind(q, k, k0, KV_I8, scales, block, out, group, D);
    }
#else
    for (int64_t g = 0; g < group; g++) {  /* one long serial sum: in double, to stay within fp32 round-off */
        double dot = 0.0;
        for (int64_t d = 0; d < D; d++) dot += q[g * D + d] * kv_at(k, k0 + d, kind, block_scale(scales, d, block));
        out[g] = (float)dot;
    }
#endif
}

#ifdef GEMMA4_AVX2
/* weighted_sum's columns d .. d + 8 C for queries g0 .. g0 + n (n C <= 8 sums in registers: n and C
 * literal where they can be, as in dot_queries). */
static inline __attribute__((always_inline)) void weighted_columns(const float *p, const void *v, int64_t v0, int kind, const uint16_t *scales, int64_t block,
                                    const uint8_t *mask, int64_t s0, int64_t s1, float *part, int64_t g0, int64_t n, int64_t group,
                                    int64_t d, int C, int64_t D, int64_t width) {
    int64_t blocks = D / block;
    __m256 acc[8];
    for (int i = 0; i < n * C; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t s = s0; s < s1; s++) {
        if (!mask[s]) continue;
        const float *ps = p + (s - s0) * group + g0;
#pragma GCC unroll 8
        for (int c = 0; c < C; c++) {
            __m256 vv = kv_load8(v, v0 + s * D + d + 8 * c, kind, block_scale(scales ? scales + s * blocks : NULL, d + 8 * c, block));
#pragma GCC unroll 8
            for (int64_t g = 0; g < n; g++) acc[g * C + c] = _mm256_fmadd_ps(_mm256_set1_ps(ps[g]), vv, acc[g * C + c]);
        }
    }
    for (int64_t g = 0; g < n; g++)
        for (int c = 0; c < C; c++) _mm256_storeu_ps(part + (g0 + g) * width + 2 + d + 8 * c, acc[g * C + c]);
}

/* `weighted_sum` for one kind of K/V values, inlined with it literal (as dots_of_kind). */
static inline __attribute__((always_inline)) void weighted_sum_of_kind(const float *p, const void *v, int64_t v0, int kind, const uint16_t *scales,
                                                                       int64_t block, const uint8_t *mask, int64_t s0, int64_t s1, float *part,
                                                                       int64_t group, int64_t D, int64_t width) {
    for (int64_t g0 = 0; g0 < group; g0 += 8) {
        int64_t n = group - g0 < 8 ? group - g0 : 8;
        int C = n <= 2 && D % 32 == 0 ? 4 : n <= 4 && D % 16 == 0 ? 2 : 1;
        for (int64_t d = 0; d < D; d += 8 * C) {  /* literal n and C: each case its own unrolled copy */
            if (C == 4 && n == 2) weighted_columns(p, v, v0, kind, scales, block, mask, s0, s1, part, g0, 2, group, d, 4, D, width);
            else if (C == 4 && n == 1) weighted_columns(p, v, v0, kind, scales, block, mask, s0, s1, part, g0, 1, group, d, 4, D, width);
            else if (C == 4) weighted_columns(p, v, v0, kind, scales, block, mask, s0, s1, part, g0, n, group, d, 4, D, width);
            else if (C == 2 && n == 4) weighted_columns(p, v, v0, kind, scales, block, mask, s0, s1, part, g0, 4, group, d, 2, D, width);
            else if (C == 2) weighted_columns(p, v, v0, kind, scales, block, mask, s0, s1, part, g0, n, group, d, 2, D, width);
            else if (n == 8) weighted_columns(p, v, v0, kind, scales, block, mask, s0, s1, part, g0, 8, group, d, 1, D, width);
            else weighted_columns(p, v, v0, kind, scales, block, mask, s0, s1, part, g0, n, group, d, 1, D, width);
        }
    }
}
#endif

/* part[g] outputs (at offset 2 of each `width`, zeroed by the caller) = sum over allowed slots s of
 * p[s, g] * v[s] (v's slot s at element v0 + s D, its int8 scales at scales + s D / block), each
 * output's sum over s in order. A pass over the slots takes 32 columns (a 16-bit row's cache line)
 * where few queries share the KV head, 8 where many do: the sums stay in registers. */
static void weighted_sum(const float *p, const void *v, int64_t v0, int kind, const uint16_t *scales, int64_t block,
                         const uint8_t *mask, int64_t s0, int64_t s1, float *part, int64_t group, int64_t D, int64_t width) {
#ifdef GEMMA4_AVX2
    switch (kind) {
    case KV_F32: weighted_sum_of_kind(p, v, v0, KV_F32, scales, block, mask, s0, s1, part, group, D, width); break;
    case KV_BF16: weighted_sum_of_kind(p, v, v0, KV_BF16, scales, block, mask, s0, s1, part, group, D, width); break;
    case KV_F16: weighted_sum_of_kind(p, v, v0, KV_F16, scales, block, mask, s0, s1, part, group, D, width); break;
    default: weighted_sum_of_kind(p, v, v0, KV_I8, scales, block, mask, s0, s1, part, group, D, width);
    }
#else
    int64_t blocks = D / block;
    for (int64_t s = s0; s < s1; s++) {
        if (!mask[s]) continue;
        for (int64_t g = 0; g < group; g++)
            for (int64_t d = 0; d < D; d++)
                part[g * width + 2 + d] += p[(s - s0) * group + g] * kv_at(v, v0 + s * D + d, kind, block_scale(scales ? scales + s * blocks : NULL, d, block));
    }
#endif
}

static void norm_row(const float *x, const float *weight, float *out, int64_t dim, float eps, float offset) {
    float squares = 0.f;
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < dim; i++) squares += x[i] * x[i];
    float inverse = 1.f / sqrtf(squares / dim + eps);
    if (weight)
        for (int64_t i = 0; i < dim; i++) out[i] = x[i] * inverse * (weight[i] + offset);
    else
        for (int64_t i = 0; i < dim; i++) out[i] = x[i] * inverse;
}

/* out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * (weight + offset), or without a weight. */
void rms_norm(const float *x, const float *weight, float *out, int64_t rows, int64_t dim, float eps, float offset) {
    for (int64_t r = 0; r < rows; r++) norm_row(x + r * dim, weight, out + r * dim, dim, eps, offset);
}

/* out = gelu(x) * times (times NULL: gelu(x)), GELU's tanh form, 0.5 x (1 + tanh(y)) with
 * y = sqrt(2 / pi) (x + 0.044715 x^3), computed as x / (1 + e^(-2y)) (the same function: a few ulp
 * from PyTorch's, where PyTorch spent ~11 us on E2B's 6,144 gate values and another operator on the
 * product). */
void gelu_tanh(const float *x, const float *times, float *out, int64_t n, int threads) {
    const float k = -2.f * 0.7978845608028654f;
#pragma omp parallel for schedule(static) num_threads(threads) if (n >= (1 << 16))  /* a decode step's few thousand values: one thread */
    for (int64_t i0 = 0; i0 < n; i0 += 1024) {
        int64_t i = i0, end = i0 + 1024 < n ? i0 + 1024 : n;
#ifdef GEMMA4_AVX2
        for (; i + 8 <= end; i += 8) {
            __m256 v = _mm256_loadu_ps(x + i);
            __m256 y = _mm256_mul_ps(_mm256_set1_ps(k), _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), v), _mm256_mul_ps(v, v), v));
            __m256 g = _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.f), exp256(y)));
            _mm256_storeu_ps(out + i, times ? _mm256_mul_ps(g, _mm256_loadu_ps(times + i)) : g);
        }
#endif
        for (; i < end; i++) {
            float v = x[i], y = k * fmaf(0.044715f * v, v * v, v), g = v / (1.f + expf(fminf(y, 88.7f)));
            out[i] = times ? g * times[i] : g;
        }
    }
}

/* x = cap tanh(x / cap) in place (the final logits' soft cap, one pass where PyTorch's div, tanh and mul
 * took three: ~1 ms of an E2B decode step over 262,144 logits). tanh(z) = e / (e + 2) for e = expm1(2|z|),
 * the sign put back; below |z| = 0.55 e is its series (no cancellation near 0), above, e^(2|z|) - 1 (at
 * least 2: none there either). Within 3 ulp, as PyTorch's within 2. */
static const float EXPM1_SERIES[11] = {1.f / 39916800, 1.f / 3628800, 1.f / 362880, 1.f / 40320, 1.f / 5040, 1.f / 720,
                                        1.f / 120, 1.f / 24, 1.f / 6, 1.f / 2, 1.f};  /* 1/11! .. 1/1! */

void softcap(float *x, int64_t n, float cap, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (n >= (1 << 18))
    for (int64_t i0 = 0; i0 < n; i0 += 4096) {
        int64_t i = i0, end = i0 + 4096 < n ? i0 + 4096 : n;
#ifdef GEMMA4_AVX2
        const __m256 sign_bit = _mm256_set1_ps(-0.f), one = _mm256_set1_ps(1.f), two = _mm256_set1_ps(2.f);
        for (; i + 8 <= end; i += 8) {
            __m256 v = _mm256_div_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(cap));
            __m256 sign = _mm256_and_ps(v, sign_bit), z2 = _mm256_min_ps(_mm256_mul_ps(two, _mm256_andnot_ps(sign_bit, v)), _mm256_set1_ps(40.f));  /* tanh(20) rounds to 1 */
            __m256 series = _mm256_set1_ps(EXPM1_SERIES[0]);
            for (int k = 1; k < 11; k++) series = _mm256_fmadd_ps(series, z2, _mm256_set1_ps(EXPM1_SERIES[k]));
            __m256 e = _mm256_blendv_ps(_mm256_sub_ps(exp256(z2), one), _mm256_mul_ps(series, z2), _mm256_cmp_ps(z2, _mm256_set1_ps(1.1f), _CMP_LT_OQ));
            __m256 t = _mm256_div_ps(e, _mm256_add_ps(e, two));
            t = _mm256_blendv_ps(_mm256_or_ps(t, sign), v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));  /* NaN stays NaN */
            _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_set1_ps(cap), t));
        }
#endif
        for (; i < end; i++) x[i] = cap * tanhf(x[i] / cap);
    }
}

/* RMSNorm then rotary embedding of every head of `tokens` tokens: x, out [tokens, heads, dim];
 * cos, sin [tokens, dim] (one table row per token for all its heads). Pairs are (i, i + dim/2):
 * out[i] = n[i] cos[i] - n[i + dim/2] sin[i], out[i + dim/2] = n[i + dim/2] cos[i + dim/2] + n[i] sin[i + dim/2]. */
/* Rounded as PyTorch rounds x * cos + rotate_half(x) * sin: each product, then the sum (no FMA). */
__attribute__((optimize("fp-contract=off"))) void rms_norm_rotary(const float *x, const float *weight, const float *cos,
                                                                  const float *sin, float *out, int64_t tokens, int64_t heads,
                                                                  int64_t dim, float eps, float offset) {
    float *normed = (float *)malloc(dim * sizeof(float));
    int64_t half = dim / 2;
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t h = 0; h < heads; h++) {
            const float *c = cos + t * dim, *s = sin + t * dim;
            float *o = out + (t * heads + h) * dim;
            norm_row(x + (t * heads + h) * dim, weight, normed, dim, eps, offset);
            for (int64_t i = 0; i < half; i++) {
                o[i] = normed[i] * c[i] - normed[i + half] * s[i];
                o[i + half] = normed[i + half] * c[i + half] + normed[i] * s[i + half];
            }
        }
    free(normed);
}

/* scores [s, g] -> e^(score - part[g]'s running max), summed into part[g]'s running sum, over the
 * allowed slots s0 .. s1 (disallowed slots' scores are -inf: 0). Vectors of 8 queries where they come
 * in eights; where fewer share a KV head (the 26B-A4B's and 31B's sliding layers: 2), vectors of
 * 8 / group slots. */
static void softmax_numerators(float *scores, const uint8_t *mask, int64_t s0, int64_t s1, float *part, int64_t group, int64_t width) {
    int64_t g0 = 0;
#ifdef GEMMA4_AVX2
    for (; g0 + 8 <= group; g0 += 8) {
        const __m256i rows = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        __m256i at = _mm256_mullo_epi32(_mm256_add_epi32(rows, _mm256_set1_epi32((int)g0)), _mm256_set1_epi32((int)width));
        __m256 top = _mm256_i32gather_ps(part, at, 4), total = _mm256_setzero_ps();
        for (int64_t s = s0; s < s1; s++) {
            if (!mask[s]) continue;
            float *row = scores + (s - s0) * group + g0;
            __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(row), top));
            _mm256_storeu_ps(row, e);
            total = _mm256_add_ps(total, e);
        }
        float sums[8];
        _mm256_storeu_ps(sums, total);
        for (int g = 0; g < 8; g++) part[(g0 + g) * width + 1] += sums[g];
    }
    if (g0 == 0 && 8 % group == 0) {  /* lane l of every vector holds query l % group */
        if (part[0] == -INFINITY) return;  /* every slot of this thread's share disallowed */
        float pattern[8], sums[8];
        for (int l = 0; l < 8; l++) pattern[l] = part[(l % group) * width];
        __m256 top = _mm256_loadu_ps(pattern), total = _mm256_setzero_ps(), none = _mm256_set1_ps(-INFINITY);
        int64_t n = (s1 - s0) * group, i = 0;
        for (; i + 8 <= n; i += 8) {
            __m256 x = _mm256_loadu_ps(scores + i);
            __m256 e = _mm256_blendv_ps(exp256(_mm256_sub_ps(x, top)), _mm256_setzero_ps(), _mm256_cmp_ps(x, none, _CMP_EQ_OQ));
            _mm256_storeu_ps(scores + i, e);
            total = _mm256_add_ps(total, e);
        }
        _mm256_storeu_ps(sums, total);
        for (; i < n; i++) {
            scores[i] = expf(scores[i] - pattern[i % group]);  /* (-inf: 0) */
            sums[i % 8] += scores[i];
        }
        for (int l = 0; l < 8; l++) part[(l % group) * width + 1] += sums[l];
        return;
    }
#endif
    for (; g0 < group; g0++)
        for (int64_t s = s0; s < s1; s++) {
            if (!mask[s]) continue;
            float *row = scores + (s - s0) * group + g0;
            *row = expf(*row - part[g0 * width]);
            part[g0 * width + 1] += *row;
        }
}

/* A K=V layer's key from its cached value (element v0 on, int8 block scales at `scales`): the value
 * times k_norm's weight, rotated at its position -> key [D], fp32. cos, sin: the position's `pairs`
 * rotated pairs (pair i turns elements i and D/2 + i); the pairs after them are identity (proportional
 * RoPE), where PyTorch's a 1 - b 0 is a. Rounded as PyTorch rounds (v w) cos + rotate_half(v w) sin:
 * each product, then the sum (no FMA). */
__attribute__((optimize("fp-contract=off"))) static void key_of_value(const void *v, int64_t v0, int kind, const uint16_t *scales,
                                                                      int64_t block, const float *weight, const float *cos,
                                                                      const float *sin, int64_t pairs, float *key, int64_t D) {
    int64_t half = D / 2, i = 0;
#ifdef GEMMA4_AVX2
    for (; i + 8 <= pairs; i += 8) {
        __m256 a = _mm256_mul_ps(kv_load8(v, v0 + i, kind, block_scale(scales, i, block)), _mm256_loadu_ps(weight + i));
        __m256 b = _mm256_mul_ps(kv_load8(v, v0 + half + i, kind, block_scale(scales, half + i, block)), _mm256_loadu_ps(weight + half + i));
        __m256 c = _mm256_loadu_ps(cos + i), s = _mm256_loadu_ps(sin + i);
        _mm256_storeu_ps(key + i, _mm256_sub_ps(_mm256_mul_ps(a, c), _mm256_mul_ps(b, s)));
        _mm256_storeu_ps(key + half + i, _mm256_add_ps(_mm256_mul_ps(b, c), _mm256_mul_ps(a, s)));
    }
#endif
    for (; i < pairs; i++) {
        float a = kv_at(v, v0 + i, kind, block_scale(scales, i, block)) * weight[i];
        float b = kv_at(v, v0 + half + i, kind, block_scale(scales, half + i, block)) * weight[half + i];
        key[i] = a * cos[i] - b * sin[i];
        key[half + i] = b * cos[i] + a * sin[i];
    }
    /* The identity pairs (3/4 of a 26B-A4B global head's): in vectors from the next multiple of 8 on, where
     * 8 values share an int8 block (one element at a time, a K=V layer's call took 4x a stored-keys one). */
    for (; i < half && i % 8; i++) {
        key[i] = kv_at(v, v0 + i, kind, block_scale(scales, i, block)) * weight[i];
        key[half + i] = kv_at(v, v0 + half + i, kind, block_scale(scales, half + i, block)) * weight[half + i];
    }
#ifdef GEMMA4_AVX2
    for (; i + 8 <= half; i += 8) {
        _mm256_storeu_ps(key + i, _mm256_mul_ps(kv_load8(v, v0 + i, kind, block_scale(scales, i, block)), _mm256_loadu_ps(weight + i)));
        _mm256_storeu_ps(key + half + i, _mm256_mul_ps(kv_load8(v, v0 + half + i, kind, block_scale(scales, half + i, block)),
                                                       _mm256_loadu_ps(weight + half + i)));
    }
#endif
    for (; i < half; i++) {
        key[i] = kv_at(v, v0 + i, kind, block_scale(scales, i, block)) * weight[i];
        key[half + i] = kv_at(v, v0 + half + i, kind, block_scale(scales, half + i, block)) * weight[half + i];
    }
}

/* Ask for a cached row of D values (element `at` on) ahead of its use. weighted_sum passes over the
 * slots a few columns at a time, touching one line of every row per pass: from memory that pattern
 * read at about half the rate of a sequential one. Fetched while the keys are read, the thread's
 * rows are in L2 (a sliding layer's share: ~150 KB a KV head) when the passes come. */
static inline void prefetch_row(const void *kv, int64_t at, int kind, int64_t D) {
    int64_t size = kind == KV_F32 ? 4 : kind == KV_I8 ? 1 : 2;
    const char *row = (const char *)kv + at * size;
    for (int64_t line = 0; line < D * size; line += 64) __builtin_prefetch(row + line, 0, 2);
}

/* Thread t of n's share of one row's slots [s0, s1): an n-th of the allowed ones (a ring buffer not yet
 * full, or a sliding window over a global cache, allows only some: split by slot, one thread did most). */
static void allowed_share(const uint8_t *mask, int64_t S, int t, int n, int64_t *s0, int64_t *s1) {
    int64_t total = 0, seen = 0;
    for (int64_t s = 0; s < S; s++) total += mask[s] != 0;
    int64_t first = total * t / n, last = total * (t + 1) / n;
    *s0 = *s1 = S;
    for (int64_t s = 0; s < S; s++) {
        if (seen == first && *s0 == S) *s0 = s;
        if (seen == last) {
            *s1 = s;
            break;
        }
        seen += mask[s] != 0;
    }
}

/* One query per head against its KV head's cached keys and values (GQA: `group` = H / KV queries
 * share one KV head). q, out: [B, H, D]; key, value: [B, KV, S, D] of `kv_kind` values with rows
 * of D contiguous, their batch and KV-head strides given (a cache's buffer may hold more slots than
 * S); int8 K/V come with fp16 scales [B, KV, S, D / block] (key_scales, value_scales; NULL
 * otherwise; positions and blocks contiguous, batch and head strides given); allowed: [B, S] (nonzero where the query may attend). The allowed slots are split between threads, each reading its
 * share of K and V once for all queries of the group (as flash decoding does); the partial softmaxes
 * are then merged. K=V layers (key_weight not NULL) store no keys: each slot's key is rebuilt from its
 * value once for the group's queries (key_of_value; key_cos, key_sin: [positions, rotated_pairs] tables, read at
 * the slots' key_positions [B, S]). */
void attend_one_query(const float *q, const void *key, const void *value, int kv_kind, const uint16_t *key_scales,
                      const uint16_t *value_scales, const uint8_t *allowed, float *out, int64_t B, int64_t H, int64_t KV, int64_t S,
                      int64_t D, const int64_t *key_strides, const int64_t *value_strides, const int64_t *scale_strides, int64_t block,
                      const float *key_weight, const float *key_cos, const float *key_sin, const int64_t *key_positions,
                      int64_t rotated_pairs, float scale, int threads) {
    int64_t group = H / KV, pairs = B * KV, width = D + 2;  /* a partial: running max, sum, D outputs */
    float *partials = (float *)malloc(pairs * threads * group * width * sizeof(float));
    int used = threads;  /* OpenMP may give fewer threads than asked: merge only the partials written */
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        if (t == 0) used = n;
        int64_t *shares = (int64_t *)malloc(2 * B * sizeof(int64_t)), longest = 0;
        for (int64_t b = 0; b < B; b++) {
            allowed_share(allowed + b * S, S, t, n, shares + 2 * b, shares + 2 * b + 1);
            if (shares[2 * b + 1] - shares[2 * b] > longest) longest = shares[2 * b + 1] - shares[2 * b];
        }
        float *scores = (float *)malloc((longest + 1) * group * sizeof(float)), *rebuilt = (float *)malloc(D * sizeof(float));
        for (int64_t pair = 0; pair < pairs; pair++) {
            int64_t b = pair / KV, kv = pair % KV, s0 = shares[2 * b], s1 = shares[2 * b + 1];
            int64_t k0 = b * key_strides[0] + kv * key_strides[1], v0 = b * value_strides[0] + kv * value_strides[1];
            const uint16_t *ks = key_scales ? key_scales + b * scale_strides[0] + kv * scale_strides[1] : NULL;
            const uint16_t *vs = value_scales ? value_scales + b * scale_strides[2] + kv * scale_strides[3] : NULL;
            const float *qg = q + (b * H + kv * group) * D;
            const uint8_t *mask = allowed + b * S;
            float *part = partials + (pair * threads + t) * group * width;
            for (int64_t g = 0; g < group; g++) {
                part[g * width] = -INFINITY;
                part[g * width + 1] = 0.f;
                for (int64_t d = 0; d < D; d++) part[g * width + 2 + d] = 0.f;
            }
            for (int64_t s = s0; s < s1; s++) {
                float *row = scores + (s - s0) * group;
                if (!mask[s]) {
                    for (int64_t g = 0; g < group; g++) row[g] = -INFINITY;
                    continue;
                }
                if (key_weight) {
                    int64_t at = key_positions[b * S + s] * rotated_pairs;
                    key_of_value(value, v0 + s * D, kv_kind, vs ? vs + s * (D / block) : NULL, block, key_weight, key_cos + at, key_sin + at,
                                 rotated_pairs, rebuilt, D);
                    dots(qg, rebuilt, 0, KV_F32, NULL, block, row, group, D);
                } else {
                    dots(qg, key, k0 + s * D, kv_kind, ks ? ks + s * (D / block) : NULL, block, row, group, D);
                    prefetch_row(value, v0 + s * D, kv_kind, D);
                }
                for (int64_t g = 0; g < group; g++) {
                    row[g] *= scale;
                    part[g * width] = fmaxf(part[g * width], row[g]);
                }
            }
            softmax_numerators(scores, mask, s0, s1, part, group, width);
            weighted_sum(scores, value, v0, kv_kind, vs, block, mask, s0, s1, part, group, D, width);
        }
        free(scores);
        free(rebuilt);
        free(shares);
    }
    for (int64_t pair = 0; pair < pairs; pair++)
        for (int64_t g = 0; g < group; g++) {
            int64_t b = pair / KV, h = (pair % KV) * group + g;
            float top = -INFINITY, total = 0.f, *o = out + (b * H + h) * D;
            for (int t = 0; t < used; t++) top = fmaxf(top, partials[((pair * threads + t) * group + g) * width]);
            for (int64_t d = 0; d < D; d++) o[d] = 0.f;
            for (int t = 0; t < used; t++) {
                const float *part = partials + ((pair * threads + t) * group + g) * width;
                if (part[1] == 0.f) continue;  /* a thread whose slots were all masked */
                float w = expf(part[0] - top);
                total += w * part[1];
                for (int64_t d = 0; d < D; d++) o[d] += w * part[2 + d];
            }
            for (int64_t d = 0; d < D; d++) o[d] /= total;
        }
    free(partials);
}

/* The MoE router of a few rows (a decode step's): x [N, H] -> its top_k experts' ids [N, top_k] and
 * weights [N, top_k], as model/layers.py's Router computes them in PyTorch: scores = proj . (x / rms(x)
 * * scale * root), softmax, the top_k (ties: the lower id), renormalized, times per_expert_scale.
 * One call in place of ten operators (~0.25 ms a layer of the 26B-A4B). proj: fp32 [E, H]. */
void route(const float *x, const float *scale, float root, const float *proj, const float *per_expert_scale, int64_t N, int64_t H,
           int64_t E, int64_t top_k, float eps, float *weights, int64_t *ids, int threads) {
    float *normed = (float *)malloc(H * sizeof(float)), *probs = (float *)malloc(E * sizeof(float));
    for (int64_t n = 0; n < N; n++) {
        norm_row(x + n * H, NULL, normed, H, eps, 0.f);
        for (int64_t h = 0; h < H; h++) normed[h] = normed[h] * scale[h] * root;
#pragma omp parallel for schedule(static) num_threads(threads) if (E * H >= (1 << 16))
        for (int64_t e = 0; e < E; e++) {
            const float *w = proj + e * H;
            int64_t h = 0;
            float dot = 0.f;
#ifdef GEMMA4_AVX2
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (; h + 32 <= H; h += 32)  /* four running sums: one was a chain of H / 8 dependent multiply-adds */
                for (int r = 0; r < 4; r++) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(normed + h + 8 * r), _mm256_loadu_ps(w + h + 8 * r), acc[r]);
            for (; h + 8 <= H; h += 8) acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(normed + h), _mm256_loadu_ps(w + h), acc[0]);
            dot = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
#endif
            for (; h < H; h++) dot += normed[h] * w[h];
            probs[e] = dot;
        }
        float top = -INFINITY, total = 0.f;
        for (int64_t e = 0; e < E; e++) top = fmaxf(top, probs[e]);
        for (int64_t e = 0; e < E; e++) total += probs[e] = expf(probs[e] - top);
        for (int64_t e = 0; e < E; e++) probs[e] /= total;
        float *w = weights + n * top_k, picked = 0.f;
        int64_t *id = ids + n * top_k;
        for (int64_t k = 0; k < top_k; k++) {  /* k passes: top_k is 8 of 128 */
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++)
                if (probs[e] >= 0.f && (best < 0 || probs[e] > probs[best])) best = e;
            id[k] = best;
            w[k] = probs[best];
            picked += w[k];
            probs[best] = -1.f;  /* taken */
        }
        for (int64_t k = 0; k < top_k; k++) w[k] = w[k] / picked * per_expert_scale[id[k]];
    }
    free(normed);
    free(probs);
}
