/* A step's decoder layers in one call, decode rows and prompt chunks alike: for each layer, RMS norm, qkv,
 * rotary embedding, attention over the KV cache, o, the residual add, RMS norm, gate_up, SiLU(gate) * up,
 * down and the residual add, with each site's LoRA side branch added where the step has adapters, exactly
 * as server.model.llama's DecoderLayer does them, through the same kernels (their addresses come in `fns`,
 * so each stays built and tested on its own).
 *
 * Why: from Python each of those is a call through ctypes with its checks, a torch.empty for its output
 * and an interpreter whose code and data the step's weight stream has evicted from cache: a step's ~300 such
 * calls cost a large share of a one-row step (docs/decisions.md). Here they are plain C calls between the
 * same kernels.
 *
 * Layouts: h [n][hidden], updated in place; weights, per layer, W_FIELDS longs (see the enum): norm
 * weights, and per projection its operand: P_BITS 0 for fp32 panels at P_DATA ([n_panels][in][16], see
 * panel_linear.c), 4 or 8 for quantized blocks (q at P_DATA, scales and offsets at P_SCALES, P_OFFSETS, see
 * block_linear.c); cos, sin [n][d] (row stride ldcs); K, V the
 * cache [layers][slots][kv_heads][max_len][d] by strides, row i's sequence in slot slots[i] (NULL: slot i),
 * as decode_attention.c takes it; LoRA as lora_grouped.c takes it per site, from the table
 * [layers][4 sites][groups][2 + 3 * n_proj] and out0, out_n [4 sites][n_proj] (n_groups 0: no adapters);
 * work at least decoder_layers_work(...) floats.
 */
#include <string.h>

enum { P_DATA, P_PANELS, P_BITS, P_SCALES, P_OFFSETS, P_FIELDS };  /* one projection's operand */
enum { W_INPUT_NORM, W_QKV, W_O = W_QKV + P_FIELDS, W_POST_NORM = W_O + P_FIELDS, W_GATE_UP,
       W_DOWN = W_GATE_UP + P_FIELDS, W_FIELDS = W_DOWN + P_FIELDS };
enum { F_PANEL, F_RMS_NORM, F_ROPE, F_SILU_MUL, F_ATTENTION, F_LORA, F_BLOCK, F_FIELDS };
enum { D_HIDDEN, D_HEADS, D_KV_HEADS, D_HEAD_DIM, D_INTERMEDIATE, D_FIELDS };
enum { SITE_QKV, SITE_O, SITE_GATE_UP, SITE_DOWN, SITES };

typedef void (*panel_fn)(const float *, long, long, long, const float *, long, float *, long, int);
typedef void (*block_fn)(const float *, long, long, long, const unsigned char *, int, const unsigned short *,
                         const unsigned short *, long, float *, long, int, int);
typedef int (*rms_norm_fn)(const float *, long, const float *, long, long, float, float *, long, int);
typedef int (*rope_fn)(float *, long, long, long, long, const float *, const float *, long, int);
typedef int (*silu_mul_fn)(const float *, long, long, long, float *, long, int);
typedef int (*attention_fn)(const float *, long, const float *, long, const float *, long, float *, float *, long,
                            long, const long *, const long *, long, long, long, long, float, float *, int);
typedef int (*lora_fn)(const float *, long, float *, long, long, long, const long *, const long *, const long *,
                       long, const long *, const long *, int);

struct lora_step {
    lora_fn fn;
    long n_groups, n_proj, entry;
    const long *offsets, *rows, *table, *out0, *out_n;
};

/* y[n][width] of the site's rows += B(A x) of each row's adapter; nothing when the step has none. */
static int add_lora(const struct lora_step *lora, long layer, int site, const float *x, long ldx, long in, float *y,
                    long ldy, int threads) {
    if (lora->n_groups == 0) return 0;
    const long *table = lora->table + (layer * SITES + site) * lora->n_groups * lora->entry;
    return lora->fn(x, ldx, y, ldy, in, lora->n_groups, lora->offsets, lora->rows, table, lora->n_proj,
                    lora->out0 + site * lora->n_proj, lora->out_n + site * lora->n_proj, threads);
}

/* y[n][whole panels] = x W^T through the kernel of the projection's format */
static void project(const long *fns, const long *p, const float *x, long n, long in, float *y, long ldy, int threads) {
    if (p[P_BITS] == 0)
        ((panel_fn)fns[F_PANEL])(x, n, in, in, (const float *)p[P_DATA], p[P_PANELS], y, ldy, threads);
    else
        ((block_fn)fns[F_BLOCK])(x, n, in, in, (const unsigned char *)p[P_DATA], (int)p[P_BITS],
                                 (const unsigned short *)p[P_SCALES], (const unsigned short *)p[P_OFFSETS], p[P_PANELS], y, ldy,
                                 threads, 1);
}

static void add_rows(float *h, const float *y, long n, long cols, long ldy) {
    for (long r = 0; r < n; r++)
        for (long c = 0; c < cols; c++) h[r * cols + c] += y[r * ldy + c];
}

static long max_l(long a, long b) { return a > b ? a : b; }

/* Row strides of the scratch products: each panel product writes whole panels. */
static void scratch_strides(long n_layers, const long *weights, long *ld_qkv, long *ld_out, long *ld_gate_up) {
    *ld_qkv = *ld_out = *ld_gate_up = 0;
    for (long l = 0; l < n_layers; l++) {
        const long *w = weights + l * W_FIELDS;
        *ld_qkv = max_l(*ld_qkv, w[W_QKV + P_PANELS] * 16);
        *ld_out = max_l(*ld_out, max_l(w[W_O + P_PANELS], w[W_DOWN + P_PANELS]) * 16);
        *ld_gate_up = max_l(*ld_gate_up, w[W_GATE_UP + P_PANELS] * 16);
    }
}

/* Floats of scratch a call for n rows needs. */
long decoder_layers_work(long n, long n_layers, const long *weights, const long *dims) {
    long ld_qkv, ld_out, ld_gate_up;
    scratch_strides(n_layers, weights, &ld_qkv, &ld_out, &ld_gate_up);
    return n * (dims[D_HIDDEN] + ld_qkv + dims[D_HEADS] * dims[D_HEAD_DIM] + ld_out + ld_gate_up + dims[D_INTERMEDIATE]);
}

/* Returns 0, or the negative code of the first kernel that refused its shapes (h and the cache then hold a
 * partial step). */
int decoder_layers(const long *fns, float *h, long n, long n_layers, const long *weights, const long *dims, float eps,
                   float scale, const float *cos_t, const float *sin_t, long ldcs, float *K, float *V,
                   long layer_stride, long slot_stride, long head_stride, const long *slots,
                   const long *positions, long n_groups,
                   const long *offsets, const long *rows, const long *table, long n_proj, const long *out0,
                   const long *out_n, float *work, long work_floats, int threads) {
    rms_norm_fn rms_norm = (rms_norm_fn)fns[F_RMS_NORM];
    rope_fn rope = (rope_fn)fns[F_ROPE];
    silu_mul_fn silu_mul = (silu_mul_fn)fns[F_SILU_MUL];
    attention_fn attention = (attention_fn)fns[F_ATTENTION];
    struct lora_step lora = {(lora_fn)fns[F_LORA], n_groups, n_proj, 2 + 3 * n_proj, offsets, rows, table, out0, out_n};
    const long hidden = dims[D_HIDDEN], heads = dims[D_HEADS], kv_heads = dims[D_KV_HEADS], d = dims[D_HEAD_DIM];
    const long inter = dims[D_INTERMEDIATE], q_size = heads * d, kv_size = kv_heads * d;
    if (work_floats < decoder_layers_work(n, n_layers, weights, dims)) return -1;
    long ld_qkv, ld_out, ld_gate_up;
    scratch_strides(n_layers, weights, &ld_qkv, &ld_out, &ld_gate_up);
    float *x = work, *qkv = x + n * hidden, *attn = qkv + n * ld_qkv, *y = attn + n * q_size;
    float *gate_up = y + n * ld_out, *act = gate_up + n * ld_gate_up;
    for (long l = 0; l < n_layers; l++) {
        const long *w = weights + l * W_FIELDS;
        if (rms_norm(h, hidden, (const float *)w[W_INPUT_NORM], n, hidden, eps, x, hidden, threads)) return -2;
        project(fns, w + W_QKV, x, n, hidden, qkv, ld_qkv, threads);
        if (add_lora(&lora, l, SITE_QKV, x, hidden, hidden, qkv, ld_qkv, threads)) return -3;
        /* q and k sit side by side: rotated in one pass as heads + kv_heads heads */
        if (rope(qkv, ld_qkv, n, heads + kv_heads, d, cos_t, sin_t, ldcs, threads)) return -4;
        if (attention(qkv, ld_qkv, qkv + q_size, ld_qkv, qkv + q_size + kv_size, ld_qkv, K + l * layer_stride,
                      V + l * layer_stride, slot_stride, head_stride, slots, positions, n, heads, kv_heads, d, scale, attn,
                      threads))
            return -5;
        project(fns, w + W_O, attn, n, q_size, y, ld_out, threads);
        if (add_lora(&lora, l, SITE_O, attn, q_size, q_size, y, ld_out, threads)) return -3;
        add_rows(h, y, n, hidden, ld_out);
        if (rms_norm(h, hidden, (const float *)w[W_POST_NORM], n, hidden, eps, x, hidden, threads)) return -2;
        project(fns, w + W_GATE_UP, x, n, hidden, gate_up, ld_gate_up, threads);
        if (add_lora(&lora, l, SITE_GATE_UP, x, hidden, hidden, gate_up, ld_gate_up, threads)) return -3;
        if (silu_mul(gate_up, ld_gate_up, n, inter, act, inter, threads)) return -6;
        project(fns, w + W_DOWN, act, n, inter, y, ld_out, threads);
        if (add_lora(&lora, l, SITE_DOWN, act, inter, inter, y, ld_out, threads)) return -3;
        add_rows(h, y, n, hidden, ld_out);
    }
    return 0;
}
