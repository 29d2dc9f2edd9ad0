/* Weights onto the int4 grids (quant/packed.py), a group of values at a time, in one pass over each
 * group held in L1: the PyTorch version of the same fits makes ~40 passes over the whole tensor and
 * quantized full-size E2B at ~10 M parameters a second, 4x llama.cpp's converter and quantizer.
 * Codes come out packed in the row layout (quant/int4.py): byte j of a 32-block holds value j in
 * its low nibble and j + 16 in its high one. */

#include <math.h>
#include <stdint.h>

static const float SHRINKS[] = {1.0f, 0.94f, 0.88f, 0.82f};

/* (comparisons, not fminf/fmaxf, whose NaN rules keep the loops from vectorizing; NaN gives 0) */
static inline float clamp_code(float q) { return q > 15.f ? 15.f : (q > 0.f ? q : 0.f); }

/* _fit_int4 for one group: the (scale, offset) with the least squared error among ranges clipped
 * towards the group's mean, each refitted by least squares given its codes. */
static void fit_group(const float *w, int64_t n, float *scale_out, float *low_out) {
    float lo = w[0], hi = w[0], sw = 0.f;
#pragma omp simd reduction(min : lo) reduction(max : hi) reduction(+ : sw)
    for (int64_t k = 0; k < n; k++) {
        lo = w[k] < lo ? w[k] : lo;
        hi = w[k] > hi ? w[k] : hi;
        sw += w[k];
    }
    float center = sw / n, best_error = INFINITY, best_scale = 0.f, best_low = 0.f;
    for (int s = 0; s < 4; s++) {
        float low = center + (lo - center) * SHRINKS[s], high = center + (hi - center) * SHRINKS[s];
        float scale = (high - low) / 15.f > 1e-30f ? (high - low) / 15.f : 1e-30f;
        float sq = 0.f, sqq = 0.f, sqw = 0.f;
#pragma omp simd reduction(+ : sq, sqq, sqw)
        for (int64_t k = 0; k < n; k++) {
            float q = clamp_code(rintf((w[k] - low) / scale));
            sq += q;
            sqq += q * q;
            sqw += q * w[k];
        }
        float det = n * sqq - sq * sq;  /* least squares: |codes scale + offset - w|^2, kept where degenerate */
        if (det > 0.f) {
            float fit = (n * sqw - sq * sw) / det;
            if (fit > 0.f) {
                low = (sw - fit * sq) / n;
                scale = fit;
            }
        }
        float error = 0.f;
#pragma omp simd reduction(+ : error)
        for (int64_t k = 0; k < n; k++) {
            float e = clamp_code(rintf((w[k] - low) / scale)) * scale + low - w[k];
            error += e * e;
        }
        if (s == 0 || error < best_error) {
            best_error = error;
            best_scale = scale;
            best_low = low;
        }
    }
    *scale_out = best_scale;
    *low_out = best_low;
}

/* w [groups, size] (size a multiple of 32) -> the fitted scales and offsets [groups], fp32. */
void fit_int4(const float *w, int64_t groups, int64_t size, float *scales, float *offsets, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t g = 0; g < groups; g++) fit_group(w + g * size, size, scales + g, offsets + g);
}

/* The codes of w [groups, size] under the given (stored) scales and offsets, packed [groups, size / 2]:
 * round((w - offset) / scale) in 0..15, 0 where the scale is 0. */
void code_int4(const float *w, int64_t groups, int64_t size, const float *scales, const float *offsets, uint8_t *codes, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t g = 0; g < groups; g++) {
        float scale = scales[g], low = offsets[g];
        for (int64_t b = 0; b < size; b += 32) {
            const float *x = w + g * size + b;
            uint8_t *out = codes + (g * size + b) / 2;
            for (int j = 0; j < 16; j++) {
                uint8_t q0 = scale > 0.f ? (uint8_t)clamp_code(rintf((x[j] - low) / scale)) : 0;
                uint8_t q1 = scale > 0.f ? (uint8_t)clamp_code(rintf((x[j + 16] - low) / scale)) : 0;
                out[j] = q0 | (uint8_t)(q1 << 4);
            }
        }
    }
}

/* llama.cpp's Q4_0 over w [blocks, 32], as `gguf`'s quantizer takes it step for step (so the codes
 * equal its bit for bit; no fused multiply-add, which rounds once where it rounds twice): d = the
 * value of largest magnitude (the first, on ties) / -8, codes trunc(w / d + 8.5) in 0..15.
 * Scales out fp32 (d), stored fp16 by the caller. */
__attribute__((optimize("fp-contract=off"))) void fit_q4_0(const float *w, int64_t blocks, float *scales, uint8_t *codes, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        const float *x = w + b * 32;
        float top = x[0], magnitude = fabsf(x[0]);
        for (int j = 1; j < 32; j++)
            if (fabsf(x[j]) > magnitude) {
                magnitude = fabsf(x[j]);
                top = x[j];
            }
        float d = top / -8.f, inverse = d == 0.f ? 0.f : 1.f / d;
        scales[b] = d;
        for (int j = 0; j < 16; j++) {
            float product0 = x[j] * inverse, product1 = x[j + 16] * inverse;
            uint8_t q0 = (uint8_t)clamp_code(truncf(product0 + 8.5f)), q1 = (uint8_t)clamp_code(truncf(product1 + 8.5f));
            codes[b * 16 + j] = q0 | (uint8_t)(q1 << 4);
        }
    }
}
