/* A decode step's decoder layer (one new token per row) in two calls: what comes before attention
 * (the normed, rotated queries, keys and values) and what comes after it (the output projection, the
 * MLP, the routed experts, the per-layer input, the residual sums). The K/V cache and the attention
 * itself stay with the caller (model/one_token.py), between the two; so does the MoE router, whose
 * picks are brittle: it runs as the modules run it, between the attention's output and the rest.
 *
 * The same kernels in the same order as the layer's modules, so the same result bit for bit; as ~25
 * Python and PyTorch calls a layer they cost ~0.25 ms of a ~1.3 ms E2B int4 layer, time in which
 * the memory streams no weights. Called through ctypes (kernels/__init__.py). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

enum { MATRIX_BF16 = 0, MATRIX_F16 = 1, MATRIX_INT8 = 2, MATRIX_INT4 = 3, MATRIX_Q6_K = 4 };

/* One packed weight [N, K] (quant/packed.py's formats; int4 in tiles, Q6_K as GGUF blocks). */
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
    case MATRIX_Q6_K:
        matmul_q6_k(x, (const uint8_t *)w->codes, y, M, w->N, w->K, (int)w->fast, threads);
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
    Matrix experts_gate_up, experts_down;  /* int4 stacks: [E, 2I, hidden] and [E, hidden, I] (MoE layers) */
    Norm input, q_norm, k_norm, v_norm, post_attention, pre_feedforward, post_feedforward, post_per_layer_input;
    Norm post_feedforward_1, pre_feedforward_2, post_feedforward_2;  /* MoE layers */
    int64_t hidden, heads, kv_heads, head_dim, width, ple_dim;
    int64_t owns_kv, v_normed;  /* v_normed: whether the values are normed (Gemma 4's v_norm) */
    int64_t k_eq_v;             /* the values are v_norm(k_proj(x)): no keys are made (they are rebuilt from the values) */
    int64_t top_k, expert_width;  /* MoE layers (top_k 0: none) */
    const float *layer_scalar;  /* NULL: none */
} DecodeLayer;

static void norm(const Norm *n, const float *x, float *out, int64_t rows, int64_t dim) { rms_norm(x, n->weight, out, rows, dim, n->eps, n->offset); }

/* x [B, hidden] -> q [B, heads, D], normed and rotated; where the layer owns K/V, also k [B, kv_heads, D]
 * (normed, rotated; not on K=V layers) and v [B, kv_heads, D] (normed where the layer norms values). cos, sin [B, D]. */
void decode_layer_attention_inputs(const DecodeLayer *l, const float *x, const float *cos, const float *sin, float *q, float *k, float *v,
                                   int64_t B, int threads) {
    int64_t D = l->head_dim, widest = l->heads > l->kv_heads ? l->heads : l->kv_heads;
    float *h = (float *)malloc(B * l->hidden * sizeof(float)), *raw = (float *)malloc(B * widest * D * sizeof(float));
    norm(&l->input, x, h, B, l->hidden);
    matmul_packed(&l->q, h, raw, B, threads);
    rms_norm_rotary(raw, l->q_norm.weight, cos, sin, q, B, l->heads, D, l->q_norm.eps, l->q_norm.offset);
    if (l->owns_kv) {
        matmul_packed(&l->k, h, l->k_eq_v ? v : raw, B, threads);
        if (!l->k_eq_v) {
            rms_norm_rotary(raw, l->k_norm.weight, cos, sin, k, B, l->kv_heads, D, l->k_norm.eps, l->k_norm.offset);
            matmul_packed(&l->v, h, v, B, threads);
        }
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

/* out [B, hidden] = x + the normed output projection of the attention's output [B, heads D]. */
void decode_layer_attention_output(const DecodeLayer *l, const float *x, const float *attended, float *out, int64_t B, int threads) {
    float *y = (float *)malloc(B * l->hidden * sizeof(float));
    matmul_packed(&l->o, attended, y, B, threads);
    add_normed(&l->post_attention, x, y, out, B, l->hidden);
    free(y);
}

/* out [B, hidden] += the routed experts of x [B, hidden]: row b through experts ids[b, :top_k] weighted
 * by weights[b, :top_k] (the router's). As quant/modules.py's PackedExperts computes it: the
 * token-expert pairs in expert order (stable), one routed int4 call per projection, each pair's output
 * times its weight added to its token's row in that order (rounded as PyTorch rounds it: no FMA). */
__attribute__((optimize("fp-contract=off"))) static void routed_experts(const DecodeLayer *l, const float *x, const float *weights,
                                                                        const int64_t *ids, float *out, int64_t B, int threads) {
    int64_t P = B * l->top_k, H = l->hidden, I = l->expert_width;
    int64_t *order = (int64_t *)malloc(P * sizeof(int64_t)), *experts = (int64_t *)malloc(P * sizeof(int64_t));
    for (int64_t p = 0; p < P; p++) {  /* insertion sort: stable, and P is a few dozen at most */
        int64_t q = p;
        for (; q > 0 && ids[order[q - 1]] > ids[p]; q--) order[q] = order[q - 1];
        order[q] = p;
    }
    float *rows = (float *)malloc(P * H * sizeof(float)), *gate_up = (float *)malloc(P * 2 * I * sizeof(float));
    float *gates = (float *)malloc(P * I * sizeof(float)), *ups = (float *)malloc(P * I * sizeof(float));
    float *y = (float *)malloc(P * H * sizeof(float));
    for (int64_t p = 0; p < P; p++) {
        experts[p] = ids[order[p]];
        memcpy(rows + p * H, x + order[p] / l->top_k * H, H * sizeof(float));
    }
    const Matrix *gu = &l->experts_gate_up, *down = &l->experts_down;
    matmul_int4(rows, (const uint8_t *)gu->codes, gu->scales, gu->offsets, (int)gu->f16_values, experts, gate_up, P, gu->N, gu->K,
                gu->group, (int)gu->fast, threads);
    for (int64_t p = 0; p < P; p++) {  /* the gate and up halves, each contiguous, as the modules' chunk() + GELU have them */
        memcpy(gates + p * I, gate_up + p * 2 * I, I * sizeof(float));
        memcpy(ups + p * I, gate_up + p * 2 * I + I, I * sizeof(float));
    }
    gelu_tanh(gates, ups, gates, P * I, threads);
    matmul_int4(gates, (const uint8_t *)down->codes, down->scales, down->offsets, (int)down->f16_values, experts, y, P, down->N, down->K,
                down->group, (int)down->fast, threads);
    for (int64_t p = 0; p < P; p++) {
        float share = weights[order[p]], *row = out + order[p] / l->top_k * H;
        for (int64_t i = 0; i < H; i++) row[i] += y[p * H + i] * share;
    }
    free(order);
    free(experts);
    free(rows);
    free(gate_up);
    free(gates);
    free(ups);
    free(y);
}

/* The layer after attention from x = decode_layer_attention_output's out [B, hidden]: the MLP (beside
 * the routed experts on MoE layers: routing weights, ids [B, top_k], else NULL), the per-layer input
 * (row b at per_layer_input + b * per_layer_stride; NULL without PLE), the layer scalar. */
void decode_layer_feedforward(const DecodeLayer *l, const float *x, const float *routing_weights, const int64_t *routing_ids,
                              const float *per_layer_input, int64_t per_layer_stride, float *out, int64_t B, int threads) {
    int64_t H = l->hidden, wide = l->width > l->ple_dim ? l->width : l->ple_dim;
    float *y = (float *)malloc(B * H * sizeof(float)), *h = (float *)malloc(B * H * sizeof(float));
    float *gate = (float *)malloc(B * wide * sizeof(float)), *up = (float *)malloc(B * wide * sizeof(float));
    norm(&l->pre_feedforward, x, h, B, H);
    matmul_packed(&l->gate, h, gate, B, threads);
    matmul_packed(&l->up, h, up, B, threads);
    gelu_tanh(gate, up, gate, B * l->width, threads);
    matmul_packed(&l->down, gate, y, B, threads);
    if (l->top_k) {  /* y = post_feedforward_1(y) + post_feedforward_2(experts(pre_feedforward_2(x))) */
        float *routed = (float *)calloc(B * H, sizeof(float));
        norm(&l->post_feedforward_1, y, y, B, H);
        norm(&l->pre_feedforward_2, x, h, B, H);
        routed_experts(l, h, routing_weights, routing_ids, routed, B, threads);
        norm(&l->post_feedforward_2, routed, routed, B, H);
        for (int64_t i = 0; i < B * H; i++) y[i] += routed[i];
        free(routed);
    }
    add_normed(&l->post_feedforward, x, y, out, B, H);

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

/* Both of the above, for a layer without experts: out [B, hidden] from x and the attention's output. */
void decode_layer_rest(const DecodeLayer *l, const float *x, const float *attended, const float *per_layer_input, int64_t per_layer_stride,
                       float *out, int64_t B, int threads) {
    decode_layer_attention_output(l, x, attended, out, B, threads);
    decode_layer_feedforward(l, out, NULL, NULL, per_layer_input, per_layer_stride, out, B, threads);
}

/* Where one layer's attention writes and reads one cache in a decode step (model/one_token.py fills it
 * from the cache's views, runtime/kv_cache.py), for the `rows` rows of the batch that cache holds (all of
 * them, or one where each sequence has its own): this step's keys and values go to one slot per row and
 * KV head, and the attention reads S slots per row, in the cache's kind (decode.c's: fp32, bf16, fp16). */
typedef struct {
    int64_t rows;                 /* B below: this cache's rows, the batch's next ones after the previous cache's */
    void *key_slot, *value_slot;  /* [B, kv_heads, D] at their (row, head) strides; NULL where the layer stores none */
    int64_t key_slot_strides[2], value_slot_strides[2];
    const void *key, *value;      /* [B, kv_heads, S, D] at their (row, head) strides; key NULL: K=V, rebuilt from value */
    int64_t key_strides[2], value_strides[2];
    int64_t slots, kv_kind;
    const uint8_t *allowed;       /* [B, S] */
    const float *cos, *sin;       /* the whole batch's [B, D]: this step's rotation (the layer's attention type; its first cache's read) */
    const float *key_weight, *key_cos, *key_sin;  /* K=V: decode.c's key_of_value tables */
    const int64_t *key_positions;
    int64_t rotated_pairs;
    float scale;
    const float *per_layer_input;  /* the whole batch's, rows per_layer_stride apart (its first cache's read); NULL without PLE */
    int64_t per_layer_stride;
} StepAttention;

/* fp32 -> bf16 or fp16 as runtime/kv_cache.py writes a slot: rounded to nearest even as PyTorch's copy
 * rounds (a NaN stays a NaN), fp16 saturated at its largest finite value first. */
static uint16_t narrowed(float f, int64_t kind) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    uint32_t sign = (bits >> 16) & 0x8000, magnitude = bits & 0x7FFFFFFF;
    if (kind == KV_BF16) return magnitude > 0x7F800000 ? 0x7FC0 : (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
    if (magnitude > 0x7F800000) return (uint16_t)(sign | 0x7E00);
    if (magnitude >= 0x477FE000) return (uint16_t)(sign | 0x7BFF);  /* 65504 and beyond */
    if (magnitude < 0x38800000) {  /* below fp16's smallest normal: a multiple of 2^-24, rounded to nearest even */
        float a;
        memcpy(&a, &magnitude, 4);
        return (uint16_t)(sign | (uint32_t)nearbyintf(a * 16777216.f));
    }
    uint32_t h = magnitude - (112u << 23);  /* the exponent rebiased (127 -> 15), then the mantissa rounded to 10 bits */
    return (uint16_t)(sign | ((h + 0xFFF + ((h >> 13) & 1)) >> 13));
}

/* x [B, KV, D] into a cache slot of `kind` at its (row, head) strides. */
static void store_slot(const float *x, void *slot, const int64_t strides[2], int64_t kind, int64_t B, int64_t KV, int64_t D) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < KV; h++) {
            const float *from = x + (b * KV + h) * D;
            int64_t at = b * strides[0] + h * strides[1];
            if (kind == KV_F32) memcpy((float *)slot + at, from, D * sizeof(float));
            else
                for (int64_t d = 0; d < D; d++) ((uint16_t *)slot)[at + d] = narrowed(from[d], kind);
        }
}

/* A decode step's layers one after another, x [B, hidden] -> out [B, hidden]: each layer's attention
 * inputs, its new keys and values stored, attention over the cache and the rest, as model/one_token.py's
 * `step` runs them (the same kernels in the same order: the same bits) but without returning to Python
 * between layers, where ~0.1 ms a layer went on module lookups, cache writes and call marshalling, each
 * slowed by caches the weight streams had just emptied. steps[i * caches + j]: layer i's attention in
 * cache j. */
void decode_layers(const DecodeLayer *const *layers, const StepAttention *steps, int64_t count, int64_t caches, const float *x, float *out,
                   int64_t B, int threads) {
    int64_t hidden = layers[0]->hidden;
    float *current = (float *)malloc(B * hidden * sizeof(float)), *next = (float *)malloc(B * hidden * sizeof(float));
    memcpy(current, x, B * hidden * sizeof(float));
    const int64_t no_scales[4] = {0, 0, 0, 0};
    for (int64_t i = 0; i < count; i++) {
        const DecodeLayer *l = layers[i];
        const StepAttention *first = steps + i * caches;
        int64_t H = l->heads, KV = l->kv_heads, D = l->head_dim;
        float *q = (float *)malloc(B * H * D * sizeof(float)), *attended = (float *)malloc(B * H * D * sizeof(float));
        float *k = (float *)malloc(B * KV * D * sizeof(float)), *v = (float *)malloc(B * KV * D * sizeof(float));
        decode_layer_attention_inputs(l, current, first->cos, first->sin, q, k, v, B, threads);
        for (int64_t j = 0, b = 0; j < caches; b += first[j].rows, j++) {
            const StepAttention *s = first + j;
            if (s->key_slot) store_slot(k + b * KV * D, s->key_slot, s->key_slot_strides, s->kv_kind, s->rows, KV, D);
            if (s->value_slot) store_slot(v + b * KV * D, s->value_slot, s->value_slot_strides, s->kv_kind, s->rows, KV, D);
            attend_one_query(q + b * H * D, s->key ? s->key : s->value, s->value, (int)s->kv_kind, NULL, NULL, s->allowed, attended + b * H * D,
                             s->rows, H, KV, s->slots, D, s->key ? s->key_strides : s->value_strides, s->value_strides, no_scales, D,
                             s->key_weight, s->key_cos, s->key_sin, s->key_positions, s->rotated_pairs, s->scale, threads);
        }
        decode_layer_rest(l, current, attended, first->per_layer_input, first->per_layer_stride, next, B, threads);
        float *done = current;
        current = next;
        next = done;
        free(q);
        free(attended);
        free(k);
        free(v);
    }
    memcpy(out, current, B * hidden * sizeof(float));
    free(current);
    free(next);
}
