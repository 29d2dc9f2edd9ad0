/* The small operations of one decode step, fused: at one token each is a few microseconds of work
 * that PyTorch spends as several operators (an RMSNorm is eight), and a step has hundreds of them.
 * fp32 in and out. Their sums run in another order than PyTorch's, which changes only round-off.
 * Called through ctypes (kernels/__init__.py). */

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

/* out[g] = q[g] . k for the `group` queries of one KV head: k is loaded once for all of them. */
static void dots(const float *q, const float *k, float *out, int64_t group, int64_t D) {
#ifdef GEMMA4_AVX2
    for (int64_t g0 = 0; g0 < group; g0 += 8) {
        int64_t n = group - g0 < 8 ? group - g0 : 8;
        __m256 acc[8];
        for (int64_t g = 0; g < n; g++) acc[g] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) {  /* D % 8 == 0 (the caller checks) */
            __m256 kv = _mm256_loadu_ps(k + d);
            for (int64_t g = 0; g < n; g++) acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + (g0 + g) * D + d), kv, acc[g]);
        }
        for (int64_t g = 0; g < n; g++) out[g0 + g] = hsum(acc[g]);
    }
#else
    for (int64_t g = 0; g < group; g++) {  /* one long serial sum: in double, to stay within fp32 round-off */
        double dot = 0.0;
        for (int64_t d = 0; d < D; d++) dot += q[g * D + d] * k[d];
        out[g] = (float)dot;
    }
#endif
}

/* part[g] outputs (at offset 2 of each `width`, zeroed by the caller) = sum over allowed slots s of
 * p[s, g] * v[s]: eight columns of v at a time against every query, the sums held in registers. */
static void weighted_sum(const float *p, const float *v, const uint8_t *mask, int64_t s0, int64_t s1, float *part,
                         int64_t group, int64_t D, int64_t width) {
#ifdef GEMMA4_AVX2
    for (int64_t g0 = 0; g0 < group; g0 += 8) {
        int64_t n = group - g0 < 8 ? group - g0 : 8;
        for (int64_t d = 0; d < D; d += 8) {
            __m256 acc[8];
            for (int64_t g = 0; g < n; g++) acc[g] = _mm256_setzero_ps();
            for (int64_t s = s0; s < s1; s++) {
                if (!mask[s]) continue;
                __m256 vv = _mm256_loadu_ps(v + s * D + d);
                const float *ps = p + (s - s0) * group + g0;
                for (int64_t g = 0; g < n; g++) acc[g] = _mm256_fmadd_ps(_mm256_set1_ps(ps[g]), vv, acc[g]);
            }
            for (int64_t g = 0; g < n; g++) _mm256_storeu_ps(part + (g0 + g) * width + 2 + d, acc[g]);
        }
    }
#else
    for (int64_t s = s0; s < s1; s++) {
        if (!mask[s]) continue;
        for (int64_t g = 0; g < group; g++)
            for (int64_t d = 0; d < D; d++) part[g * width + 2 + d] += p[(s - s0) * group + g] * v[s * D + d];
    }
#endif
}

/* out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * (weight + offset), or without a weight. */
void rms_norm(const float *x, const float *weight, float *out, int64_t rows, int64_t dim, float eps, float offset) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *o = out + r * dim;
        float squares = 0.f;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < dim; i++) squares += xr[i] * xr[i];
        float inverse = 1.f / sqrtf(squares / dim + eps);
        if (weight)
            for (int64_t i = 0; i < dim; i++) o[i] = xr[i] * inverse * (weight[i] + offset);
        else
            for (int64_t i = 0; i < dim; i++) o[i] = xr[i] * inverse;
    }
}

/* One query per head against its KV head's cached keys and values (GQA: `group` = H / KV queries
 * share one KV head). q, out: [B, H, D]; key, value: [B, KV, S, D] with rows of D contiguous, their
 * batch and KV-head strides given (a cache's buffer may hold more slots than S); allowed: [B, S]
 * (nonzero where the query may attend). The slots are split between threads, each reading its
 * share of K and V once for all queries of the group (as flash decoding does); the partial softmaxes
 * are then merged. */
void attend_one_query(const float *q, const float *key, const float *value, const uint8_t *allowed, float *out,
                      int64_t B, int64_t H, int64_t KV, int64_t S, int64_t D, const int64_t *key_strides,
                      const int64_t *value_strides, float scale, int threads) {
    int64_t group = H / KV, pairs = B * KV, width = D + 2;  /* a partial: running max, sum, D outputs */
    float *partials = (float *)malloc(pairs * threads * group * width * sizeof(float));
    int used = threads;  /* OpenMP may give fewer threads than asked: merge only the partials written */
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        if (t == 0) used = n;
        int64_t s0 = S * t / n, s1 = S * (t + 1) / n;
        float *scores = (float *)malloc((s1 - s0 + 1) * group * sizeof(float));
        for (int64_t pair = 0; pair < pairs; pair++) {
            int64_t b = pair / KV, kv = pair % KV;
            const float *k = key + b * key_strides[0] + kv * key_strides[1];
            const float *v = value + b * value_strides[0] + kv * value_strides[1];
            const float *qg = q + (b * H + kv * group) * D;
            const uint8_t *mask = allowed + b * S;
            float *part = partials + (pair * threads + t) * group * width;
            for (int64_t g = 0; g < group; g++) {
                part[g * width] = -INFINITY;
                part[g * width + 1] = 0.f;
                for (int64_t d = 0; d < D; d++) part[g * width + 2 + d] = 0.f;
            }
            for (int64_t s = s0; s < s1; s++) {
                if (!mask[s]) continue;
                float *row = scores + (s - s0) * group;
                dots(qg, k + s * D, row, group, D);
                for (int64_t g = 0; g < group; g++) {
                    row[g] *= scale;
                    part[g * width] = fmaxf(part[g * width], row[g]);
                }
            }
            for (int64_t s = s0; s < s1; s++) {
                if (!mask[s]) continue;
                float *row = scores + (s - s0) * group;
                for (int64_t g = 0; g < group; g++) {
                    row[g] = expf(row[g] - part[g * width]);
                    part[g * width + 1] += row[g];
                }
            }
            weighted_sum(scores, v, mask, s0, s1, part, group, D, width);
        }
        free(scores);
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
