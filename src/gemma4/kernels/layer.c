/* A decode step's decoder layer (one new token per row) in two calls: what comes before attention
 * (the normed, rotated queries, keys and values) and what comes after it (the output projection, the
 * MLP, the per-layer input, the residual sums). The K/V cache and the attention itself stay with the
 * caller (model/one_token.py), between the two.
 *
 * The same kernels in the same order as the layer's modules, so the same result bit for bit; as ~25
 * Python and PyTorch calls a layer they cost ~0.25 ms of a ~1.3 ms E2B int4 layer, time in which
 * the memory streams no weights. Called through ctypes (kernels/__init__.py). */

#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"

enum { MATRIX_BF16 = 0, MATRIX_F16 = 1, MATRIX_INT8 = 2, MATRIX_INT4 = 3 };

/* One packed weight [N, K] (quant/packed.py's formats; int4 in tiles). */
typedef struct {
    int64_t kind, N, K, group;
    const void *codes, *scales, *offsets;
    int64_t f16_values;  /* int4: scales and offsets in fp16 (else fp32) */
    int64_t fast;        /* --fast-math: activations rounded to int8 only */
} Matrix;

/* y [M, N] = x [M, K] . W^T */
void matmul_packed(const Matrix *w, const float *x, float *y, int64_t M, int threads) {
    switch (w->kind) {
    case MATRIX_BF16:
    case MATRIX_F16:
        matmul_16bit(x, (const uint16_t *)w->codes, y, M, w->N, w->K, w->kind == MATRIX_F16, threads);
        break;
    case MATRIX_INT8:
        matmul_int8(x, (const int8_t *)w->codes, (const float *)w->scales, (const float *)w->offsets, y, M, w->N, w->K, w->group, (int)w->fast, threads);
        break;
    default:
        matmul_int4(x, (const uint8_t *)w->codes, w->scales, w->offsets, (int)w->f16_values, NULL, y, M, w->N, w->K, w->group, (int)w->fast, threads);
    }
}

typedef struct {
    const float *weight;  /* NULL: no scale */
    float eps, offset;
} Norm;

typedef struct {
    Matrix q, k, v, o, gate, up, down, ple_gate, ple_projection;
    Norm input, q_norm, k_norm, v_norm, post_attention, pre_feedforward, post_feedforward, post_per_layer_input;
    int64_t hidden, heads, kv_heads, head_dim, width, ple_dim;
    int64_t owns_kv, v_normed;  /* v_normed: whether the values are normed (Gemma 4's v_norm) */
    const float *layer_scalar;  /* NULL: none */
} DecodeLayer;

static void norm(const Norm *n, const float *x, float *out, int64_t rows, int64_t dim) { rms_norm(x, n->weight, out, rows, dim, n->eps, n->offset); }

/* x [B, hidden] -> q [B, heads, D], normed and rotated; where the layer owns K/V, also k [B, kv_heads, D]
 * (normed, rotated) and v [B, kv_heads, D] (normed where the layer norms values). cos, sin [B, D]. */
void decode_layer_attention_inputs(const DecodeLayer *l, const float *x, const float *cos, const float *sin, float *q, float *k, float *v,
                                   int64_t B, int threads) {
    int64_t D = l->head_dim, widest = l->heads > l->kv_heads ? l->heads : l->kv_heads;
    float *h = (float *)malloc(B * l->hidden * sizeof(float)), *raw = (float *)malloc(B * widest * D * sizeof(float));
    norm(&l->input, x, h, B, l->hidden);
    matmul_packed(&l->q, h, raw, B, threads);
    rms_norm_rotary(raw, l->q_norm.weight, cos, sin, q, B, l->heads, D, l->q_norm.eps, l->q_norm.offset);
    if (l->owns_kv) {
        matmul_packed(&l->k, h, raw, B, threads);
        rms_norm_rotary(raw, l->k_norm.weight, cos, sin, k, B, l->kv_heads, D, l->k_norm.eps, l->k_norm.offset);
        matmul_packed(&l->v, h, v, B, threads);
        if (l->v_normed) norm(&l->v_norm, v, v, B * l->kv_heads, D);
    }
    free(h);
    free(raw);
}

/* x + norm(y), row by row, into out (which may be x). */
static void add_normed(const Norm *n, const float *x, float *y, float *out, int64_t B, int64_t dim) {
    norm(n, y, y, B, dim);
    for (int64_t i = 0; i < B * dim; i++) out[i] = x[i] + y[i];
}

/* The rest of the layer from the attention's output [B, heads D]: out [B, hidden] from x [B, hidden]
 * and the per-layer inputs (row b at per_layer_input + b * per_layer_stride; NULL without PLE). */
void decode_layer_rest(const DecodeLayer *l, const float *x, const float *attended, const float *per_layer_input, int64_t per_layer_stride,
                       float *out, int64_t B, int threads) {
    int64_t H = l->hidden, wide = l->width > l->ple_dim ? l->width : l->ple_dim;
    float *y = (float *)malloc(B * H * sizeof(float)), *h = (float *)malloc(B * H * sizeof(float));
    float *gate = (float *)malloc(B * wide * sizeof(float)), *up = (float *)malloc(B * wide * sizeof(float));
    matmul_packed(&l->o, attended, y, B, threads);
    add_normed(&l->post_attention, x, y, out, B, H);

    norm(&l->pre_feedforward, out, h, B, H);
    matmul_packed(&l->gate, h, gate, B, threads);
    matmul_packed(&l->up, h, up, B, threads);
    gelu_tanh(gate, up, gate, B * l->width, threads);
    matmul_packed(&l->down, gate, y, B, threads);
    add_normed(&l->post_feedforward, out, y, out, B, H);

    if (per_layer_input) {
        matmul_packed(&l->ple_gate, out, gate, B, threads);
        for (int64_t b = 0; b < B; b++)
            gelu_tanh(gate + b * l->ple_dim, per_layer_input + b * per_layer_stride, gate + b * l->ple_dim, l->ple_dim, threads);
        matmul_packed(&l->ple_projection, gate, y, B, threads);
        add_normed(&l->post_per_layer_input, out, y, out, B, H);
    }
    if (l->layer_scalar)
        for (int64_t i = 0; i < B * H; i++) out[i] *= *l->layer_scalar;
    free(y);
    free(h);
    free(gate);
    free(up);
}
