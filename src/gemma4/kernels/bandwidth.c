/* The machine's memory read bandwidth, measured the way the weight kernels read: each thread one
 * contiguous share, 256-bit loads, a software prefetch ahead. A reduction in PyTorch (torch.sum)
 * reads slower than our matvecs do, so a decode "bound" derived from it can be exceeded; this one
 * reads at least as fast as any of them. Called through ctypes (kernels/__init__.py). */

#include <omp.h>
#include <stdint.h>

#include "simd.h"

/* Reads bytes [0, bytes) of `data` (bytes % 128 == 0) once; returns a checksum so no load is elided. */
int64_t read_memory(const uint8_t *data, int64_t bytes, int threads) {
    int64_t checksum = 0;
#pragma omp parallel num_threads(threads) reduction(^ : checksum)
    {
        int64_t t = omp_get_thread_num(), n = omp_get_num_threads(), lines = bytes / 128;
        int64_t start = lines * t / n * 128, end = lines * (t + 1) / n * 128;
#ifdef GEMMA4_AVX2
        __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
        for (int64_t at = start; at < end; at += 128) {
            PREFETCH(data + at);
            PREFETCH(data + at + 64);
            a = _mm256_xor_si256(a, _mm256_loadu_si256((const __m256i *)(data + at)));
            b = _mm256_xor_si256(b, _mm256_loadu_si256((const __m256i *)(data + at + 32)));
            c = _mm256_xor_si256(c, _mm256_loadu_si256((const __m256i *)(data + at + 64)));
            d = _mm256_xor_si256(d, _mm256_loadu_si256((const __m256i *)(data + at + 96)));
        }
        __m256i all = _mm256_xor_si256(_mm256_xor_si256(a, b), _mm256_xor_si256(c, d));
        int64_t words[4];
        _mm256_storeu_si256((__m256i *)words, all);
        checksum ^= words[0] ^ words[1] ^ words[2] ^ words[3];
#else
        for (int64_t at = start; at < end; at += 8) checksum ^= *(const int64_t *)(data + at);
#endif
    }
    return checksum;
}
