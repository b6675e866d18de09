/* Paged decode attention on the CPU, reading K/V in place in the block cache (kernels/cpu_attention.py
loads it with ctypes; its reference is the SDPA path of kernels/attention.py).

For every sequence b (one query token, at position seq_lens[b] - 1) and query head h of KV head
kvh = h / G:  out[b, h] = sum_t p_t V[t],  p = softmax(scale * q[b, h] . K[t]) over the keys t in
[seq_lens[b] - window, seq_lens[b]) (window 0: all), K and V of token t at block
block_tables[b, t / bs], row t % bs of the float32 cache [2, blocks, bs, Hkv, D].

The gather of the SDPA path copies every sequence's K/V (~5 MB per layer at 16 streams of 200
tokens) before reading it again; this reads each key and value once. Per (sequence, KV head) the
G query heads share each K and V load. Scores, then the row's max, exp (a Cephes-style polynomial,
~2 ulp) and sum, then the weighted sum of V, all float32: a (sequence, head)'s result does not
depend on the other sequences of the step nor on the threads (OpenMP, the sequence x KV-head
pairs split between them; libgomp is torch's, see kernels/cpu_int4.c). AVX-512F only behind
function attributes; D a multiple of 16. */
#define _GNU_SOURCE
#include <stdint.h>

#if !defined(__x86_64__)
int fs_attention_supported(void) { return 0; }
void fs_paged_decode(const float *q, int64_t B, int64_t Hq, int64_t Hkv, int64_t D, const float *kv, int64_t s_kv,
                     int64_t s_blk, int64_t s_tok, int64_t s_head, const int32_t *block_tables, int64_t bt_stride,
                     const int64_t *seq_lens, int64_t bs, int64_t window, float scale, float *out, int threads) {
    (void)q, (void)B, (void)Hq, (void)Hkv, (void)D, (void)kv, (void)s_kv, (void)s_blk, (void)s_tok, (void)s_head;
    (void)block_tables, (void)bt_stride, (void)seq_lens, (void)bs, (void)window, (void)scale, (void)out;
    (void)threads;
}
#else
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#define AVX512 __attribute__((target("avx512f")))
#define MAX_G 16   /* query heads per KV head */
#define MAX_DV 16  /* D / 16: head size up to 256 */

int fs_attention_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
}

/* e^x for x <= 0 (scores minus their max): x = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-7 polynomial */
AVX512 static inline __m512 exp_nonpos(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

typedef struct {
    const float *q, *kv;
    int64_t Hq, Hkv, D, s_kv, s_blk, s_tok, s_head, bt_stride, bs, window;
    const int32_t *bt;
    const int64_t *seq_lens;
    float scale;
    float *out;
} att_t;

/* sequence b, KV head kvh: its G query heads; `sc` room for G x L scores */
AVX512 static void one(const att_t *a, int64_t b, int64_t kvh, float *sc) {
    const int64_t G = a->Hq / a->Hkv, nv = a->D / 16, L = a->seq_lens[b];
    const int64_t t0 = a->window > 0 && L > a->window ? L - a->window : 0, n = L - t0;
    const int32_t *bt = a->bt + b * a->bt_stride;
    const float *qb = a->q + (b * a->Hq + kvh * G) * a->D;
    __m512 qv[MAX_G][MAX_DV];
    for (int64_t g = 0; g < G; g++)
        for (int64_t v = 0; v < nv; v++)
            qv[g][v] = _mm512_mul_ps(_mm512_loadu_ps(qb + g * a->D + 16 * v), _mm512_set1_ps(a->scale));
    for (int64_t i = 0; i < n; i++) {
        int64_t t = t0 + i;
        const float *k = a->kv + bt[t / a->bs] * a->s_blk + (t % a->bs) * a->s_tok + kvh * a->s_head;
        for (int64_t g = 0; g < G; g++) {
            __m512 acc = _mm512_mul_ps(qv[g][0], _mm512_loadu_ps(k));
            for (int64_t v = 1; v < nv; v++) acc = _mm512_fmadd_ps(qv[g][v], _mm512_loadu_ps(k + 16 * v), acc);
            sc[g * n + i] = _mm512_reduce_add_ps(acc);
        }
    }
    float inv[MAX_G];
    for (int64_t g = 0; g < G; g++) {
        float *s = sc + g * n;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        int64_t i = 0;
        for (; i + 16 <= n; i += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + i));
        if (i < n) mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, (__mmask16)((1u << (n - i)) - 1), s + i));
        __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx)), sum = _mm512_setzero_ps();
        for (i = 0; i + 16 <= n; i += 16) {
            __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_loadu_ps(s + i), m));
            _mm512_storeu_ps(s + i, e);
            sum = _mm512_add_ps(sum, e);
        }
        if (i < n) {
            __mmask16 k = (__mmask16)((1u << (n - i)) - 1);
            __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + i), m));
            _mm512_mask_storeu_ps(s + i, k, e);
            sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(k, e));
        }
        inv[g] = 1.0f / _mm512_reduce_add_ps(sum);
    }
    __m512 o[MAX_G][MAX_DV];
    for (int64_t g = 0; g < G; g++)
        for (int64_t v = 0; v < nv; v++) o[g][v] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i++) {
        int64_t t = t0 + i;
        const float *vr = a->kv + a->s_kv + bt[t / a->bs] * a->s_blk + (t % a->bs) * a->s_tok + kvh * a->s_head;
        for (int64_t v = 0; v < nv; v++) {
            __m512 x = _mm512_loadu_ps(vr + 16 * v);
            for (int64_t g = 0; g < G; g++) o[g][v] = _mm512_fmadd_ps(_mm512_set1_ps(sc[g * n + i]), x, o[g][v]);
        }
    }
    float *ob = a->out + (b * a->Hq + kvh * G) * a->D;
    for (int64_t g = 0; g < G; g++)
        for (int64_t v = 0; v < nv; v++)
            _mm512_storeu_ps(ob + g * a->D + 16 * v, _mm512_mul_ps(o[g][v], _mm512_set1_ps(inv[g])));
}

/* q [B, Hq, D] and out [B, Hq, D] float32, contiguous; kv the cache's base with its strides
   (elements); block_tables int32 rows of bt_stride; seq_lens [B]. Hq / Hkv <= 16, D <= 256 and a
   multiple of 16 (the caller checks). */
void fs_paged_decode(const float *q, int64_t B, int64_t Hq, int64_t Hkv, int64_t D, const float *kv, int64_t s_kv,
                     int64_t s_blk, int64_t s_tok, int64_t s_head, const int32_t *block_tables, int64_t bt_stride,
                     const int64_t *seq_lens, int64_t bs, int64_t window, float scale, float *out, int threads) {
    att_t a = {q, kv, Hq, Hkv, D, s_kv, s_blk, s_tok, s_head, bt_stride, bs, window, block_tables, seq_lens,
               scale, out};
    int64_t L = 1;
    for (int64_t b = 0; b < B; b++) L = seq_lens[b] > L ? seq_lens[b] : L;
    const int64_t tasks = B * Hkv, G = Hq / Hkv;
    int parts = threads < 1 ? 1 : threads;
    if (parts > tasks) parts = (int)tasks;
#pragma omp parallel num_threads(parts)
    {
        float *sc = malloc((size_t)(G * L) * sizeof(float));
        if (!sc) abort();
        int np = omp_get_num_threads(), id = omp_get_thread_num();
        for (int64_t i = tasks * id / np; i < tasks * (id + 1) / np; i++) one(&a, i / Hkv, i % Hkv, sc);
        free(sc);
    }
}
#endif /* __x86_64__ */
