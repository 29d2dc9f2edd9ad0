/* The entry points one kernel file calls in another (all of them are also called through ctypes:
 * kernels/__init__.py). */
#ifndef GEMMA4_KERNELS_H
#define GEMMA4_KERNELS_H

#include <stdint.h>

enum { KV_F32 = 0, KV_BF16 = 1, KV_F16 = 2, KV_I8 = 3 };  /* how a K/V cache stores its values (kernels.KV_KINDS) */

void matmul_16bit(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K, int is_f16, int threads);
void matmul_int8(const float *x, const int8_t *w, const float *scales, const float *offsets, float *y, int64_t M, int64_t N,
                 int64_t K, int64_t group, int fast, int threads);
void matmul_q6_k(const float *x, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K, int fast, int threads);
void matmul_int4(const float *x, const uint8_t *codes, const void *scales, const void *offsets, int f16, const int64_t *experts,
                 float *y, int64_t M, int64_t N, int64_t K, int64_t group, int fast, int threads);
int64_t split_rows(const int64_t *experts, int64_t M, int64_t panel, int64_t per_block, int64_t *starts, int64_t *blocks);
void rms_norm(const float *x, const float *weight, float *out, int64_t rows, int64_t dim, float eps, float offset);
void rms_norm_rotary(const float *x, const float *weight, const float *cos, const float *sin, float *out, int64_t tokens,
                     int64_t heads, int64_t dim, float eps, float offset);
void gelu_tanh(const float *x, const float *times, float *out, int64_t n, int threads);
void softcap(float *x, int64_t n, float cap, int threads);
void attend_one_query(const float *q, const void *key, const void *value, int kv_kind, const uint16_t *key_scales,
                      const uint16_t *value_scales, const uint8_t *allowed, float *out, int64_t B, int64_t H, int64_t KV, int64_t S,
                      int64_t D, const int64_t *key_strides, const int64_t *value_strides, const int64_t *scale_strides, int64_t block,
                      const float *key_weight, const float *key_cos, const float *key_sin, const int64_t *key_positions,
                      int64_t rotated_pairs, float scale, int threads);

#endif
