/* The CPU int4 matmul of fleetserve's packed weights (kernels/cpu_int4.py loads it with ctypes).

y[m, n] = sum_k x[m, k] * w[n, k]  (float32),  w[n, k] = (q[n, k] - 8) * s[g, n] + z[g, n],  g = k / gs

on torch's CPU int4 layout (`_weight_int4pack_mm_for_cpu`'s: per block of 64 rows, byte k * 32 + j
holds row j's code at input k in its low nibble and row 32 + j's in its high one; scale_zeros
[K / gs, N_pad, 2] bf16), so the weights need no second copy.

The products run as AVX-512 VNNI integer dot products (vpdpbusd: 64 byte multiply-adds per
instruction, ~1.5x the multiply-adds per second of vdpbf16ps on the CPUs measured, and 4x fp32
FMAs). x is split per row and group into two int8 parts, x ~ c (256 h + l) with c = max|x| / 127 /
256: 16 bits of each group's range (error <= max|x| / 65,000 per element, below bf16's 2^-8 of the
larger elements). Per group the code sums D = sum q (256 h + l) are exact int32 arithmetic, so
their order is free: a row's result does not depend on the other rows of the call, on the tiling
or on the threads. Then y += s c (D - 8 sum(256 h + l)) + z sum(x), in float32, the same
operations for every row. The result stays float32 (torch's kernel rounds it to bf16, which every
consumer upcast again: four copies per layer).

Each group's codes are expanded once per call into an L1 buffer used by every tile of rows (one
row: in registers). Compiled with AVX-512 F/BW/VNNI code behind function attributes only:
fs_int4_supported() says whether this CPU runs it; the Python side falls back to torch's kernel
where it cannot. Threads: OpenMP, row blocks split between them. The library asks for libgomp.so.1,
which is the one torch has loaded already (torch bundles it under that name), so the kernel runs on
torch's own thread pool: a second pool (pthreads, tried first) spun beside torch's OpenMP threads on
2 cores and made a decode step 4x slower. */
#define _GNU_SOURCE
#include <stdint.h>

#if !defined(__x86_64__)
int fs_int4_supported(void) { return 0; }
void fs_int4_mm(const float *x, int64_t M, int64_t K, const uint8_t *packed, const uint16_t *scale_zeros,
                int64_t n_pad, int64_t gs, float *y, int64_t N, int64_t ldy, int threads) {
    (void)x, (void)M, (void)K, (void)packed, (void)scale_zeros, (void)n_pad, (void)gs, (void)y, (void)N;
    (void)ldy, (void)threads;
}
#else
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define BLOCK_N 64
#define MT 2 /* rows per register tile: 2 rows x 4 vectors x (h, l) int32 accumulators */

int fs_int4_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni");
}

typedef struct {
    const int8_t *xh, *xl; /* [M, K]: x's parts */
    const float *xc;       /* [M, G]: c of each row and group */
    const float *xsum;     /* [M, G]: sum of x over the group (float32, in order) */
    const int32_t *x8;     /* [M, G]: -8 sum(256 h + l) */
    int64_t M, K, gs, n_pad, N, ldy;
    const uint8_t *packed;
    const uint32_t *sz; /* [K / gs, n_pad] pairs (s | z << 16) of bf16 */
    float *y;           /* [M, ldy] */
} job_t;

/* 16 bf16 (s, z) pairs -> two float32 vectors */
AVX512 static inline void load_sz(const uint32_t *p, __m512 *s, __m512 *z) {
    __m512i v = _mm512_loadu_si512((const void *)p);
    *s = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    *z = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000u)));
}

/* inputs k .. k + 3 of a block -> the codes as 4 bytes per 32-bit lane (k in the lowest), the form
   vpdpbusd multiplies: rows 0-15, 16-31, 32-47, 48-63 */
AVX512 static inline void expand_quad(const uint8_t *b, __m512i *w) {
    const __m512i lo4 = _mm512_set1_epi8(0x0F);
    for (int h = 0; h < 2; h++) { /* bytes 0-15 of an input: rows 0-15 | 32-47; 16-31: 16-31 | 48-63 */
        __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(b + 16 * h)));
        for (int t = 1; t < 4; t++) {
            __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(b + 32 * t + 16 * h)));
            q = _mm512_or_si512(q, _mm512_slli_epi32(c, 8 * t));
        }
        w[h] = _mm512_and_si512(q, lo4);
        w[2 + h] = _mm512_and_si512(_mm512_srli_epi32(q, 4), lo4);
    }
}

/* the first `valid` lanes of v to dst */
AVX512 static inline void store_valid(float *dst, __m512 v, int64_t valid) {
    if (valid >= 16)
        _mm512_storeu_ps(dst, v);
    else if (valid > 0)
        _mm512_mask_storeu_ps(dst, (__mmask16)((1u << valid) - 1), v);
}

/* rows m0 .. m0 + mt of x against group g of one block: the exact integer sums, then the group's
   float32 update of y (waiting in `part` [M][64] between groups). The codes come from `buf`
   (expanded once for all tiles) or, with `codes` set, are expanded here in registers. mt is a
   constant at each call, so that the accumulators live in registers. */
AVX512 static inline __attribute__((always_inline)) void tile(const job_t *j, const __m512i *buf, float *part,
                                                              int64_t g, int64_t m0, const int mt,
                                                              const __m512 *s, const __m512 *z,
                                                              const uint8_t *codes) {
    const int64_t G = j->K / j->gs, quads = j->gs / 4;
    __m512i dh[MT][4], dl[MT][4];
    for (int i = 0; i < mt; i++)
        for (int v = 0; v < 4; v++) {
            dh[i][v] = _mm512_setzero_si512();
            dl[i][v] = _mm512_setzero_si512();
        }
    const int64_t off = m0 * j->K + g * j->gs;
    for (int64_t kq = 0; kq < quads; kq++) {
        __m512i w[4];
        if (codes)
            expand_quad(codes + kq * 128, w);
        else
            for (int v = 0; v < 4; v++) w[v] = _mm512_load_si512((const void *)(buf + 4 * kq + v));
        for (int i = 0; i < mt; i++) {
            int32_t h4, l4;
            memcpy(&h4, j->xh + off + i * j->K + 4 * kq, 4);
            memcpy(&l4, j->xl + off + i * j->K + 4 * kq, 4);
            __m512i hb = _mm512_set1_epi32(h4), lb = _mm512_set1_epi32(l4);
            for (int v = 0; v < 4; v++) {
                dh[i][v] = _mm512_dpbusd_epi32(dh[i][v], w[v], hb);
                dl[i][v] = _mm512_dpbusd_epi32(dl[i][v], w[v], lb);
            }
        }
    }
    for (int i = 0; i < mt; i++) {
        int64_t mg = (m0 + i) * G + g;
        float *row = part + (m0 + i) * 64;
        __m512i x8 = _mm512_set1_epi32(j->x8[mg]);
        __m512 c = _mm512_set1_ps(j->xc[mg]), xs = _mm512_set1_ps(j->xsum[mg]);
        for (int v = 0; v < 4; v++) {
            /* D - 8 sum(256 h + l): |.| < 2^24, exact in float32 */
            __m512i d = _mm512_add_epi32(_mm512_add_epi32(_mm512_slli_epi32(dh[i][v], 8), dl[i][v]), x8);
            __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(d), c);
            __m512 y = g ? _mm512_load_ps(row + 16 * v) : _mm512_setzero_ps();
            y = _mm512_fmadd_ps(s[v], t, y);
            _mm512_store_ps(row + 16 * v, _mm512_fmadd_ps(z[v], xs, y));
        }
    }
}

/* one group of x (gs floats, a multiple of 16) -> its two int8 parts h, l with x ~ step (h + l / 256),
   step = max|x| / 127; c = step / 256, the group's sum of x, -8 sum(256 h + l) */
AVX512 static void split_group(const float *xg, int64_t gs, int8_t *h, int8_t *l, float *c, float *sum,
                               int32_t *x8) {
    __m512 amax = _mm512_setzero_ps(), acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < gs; k += 16) {
        __m512 v = _mm512_loadu_ps(xg + k);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
        acc = _mm512_add_ps(acc, v);
    }
    float step = _mm512_reduce_max_ps(amax) / 127.0f;
    __m512 inv = _mm512_set1_ps(step > 0.0f ? 1.0f / step : 0.0f);
    __m512i hl = _mm512_setzero_si512();
    const int rne = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    for (int64_t k = 0; k < gs; k += 16) {
        __m512 u = _mm512_mul_ps(_mm512_loadu_ps(xg + k), inv);
        __m512 hv = _mm512_roundscale_ps(u, rne);
        __m512 lv = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(u, hv), _mm512_set1_ps(256.0f)), rne);
        lv = _mm512_min_ps(_mm512_max_ps(lv, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));
        __m512i hi = _mm512_cvtps_epi32(hv), li = _mm512_cvtps_epi32(lv);
        _mm_storeu_si128((__m128i *)(h + k), _mm512_cvtsepi32_epi8(hi));
        _mm_storeu_si128((__m128i *)(l + k), _mm512_cvtsepi32_epi8(li));
        hl = _mm512_add_epi32(hl, _mm512_add_epi32(_mm512_slli_epi32(hi, 8), li));
    }
    *c = step / 256.0f;
    *sum = _mm512_reduce_add_ps(acc);
    *x8 = -8 * _mm512_reduce_add_epi32(hl);
}

/* one block of 64 rows for all rows of x */
AVX512 static void block(const job_t *j, int64_t blk, __m512i *buf, float *part) {
    const uint8_t *b = j->packed + blk * BLOCK_N * (j->K / 2);
    const int64_t G = j->K / j->gs, quads = j->gs / 4;
    __m512 s[4], z[4];
    for (int64_t g = 0; g < G; g++) {
        const uint32_t *p = j->sz + g * j->n_pad + blk * BLOCK_N;
        for (int v = 0; v < 4; v++) load_sz(p + 16 * v, &s[v], &z[v]);
        const uint8_t *codes = b + g * j->gs * 32;
        if (j->M == 1) {
            tile(j, buf, part, g, 0, 1, s, z, codes);
            continue;
        }
        for (int64_t kq = 0; kq < quads; kq++) expand_quad(codes + kq * 128, buf + 4 * kq);
        int64_t m0 = 0;
        for (; m0 + MT <= j->M; m0 += MT) tile(j, buf, part, g, m0, MT, s, z, NULL);
        if (m0 < j->M) tile(j, buf, part, g, m0, 1, s, z, NULL);
    }
    for (int64_t m = 0; m < j->M; m++)
        for (int v = 0; v < 4; v++) {
            int64_t n = blk * BLOCK_N + 16 * v;
            store_valid(j->y + m * j->ldy + n, _mm512_load_ps(part + m * 64 + 16 * v), j->N - n);
        }
}

static void run_blocks(const job_t *j, int64_t first, int64_t last) {
    if (first >= last) return;
    size_t buf_bytes = (size_t)(j->gs / 4) * 4 * 64;
    char *mem = aligned_alloc(64, buf_bytes + (size_t)j->M * 64 * sizeof(float));
    if (!mem) abort();
    for (int64_t blk = first; blk < last; blk++) block(j, blk, (__m512i *)mem, (float *)(mem + buf_bytes));
    free(mem);
}

static void part_range(int64_t nblk, int parts, int i, int64_t *a, int64_t *b) {
    *a = nblk * i / parts;
    *b = nblk * (i + 1) / parts;
}

/* x [M, K] float32; packed [n_pad, K / 2]; scale_zeros [K / gs, n_pad, 2] bf16; y [M, ldy] float32,
   its first N columns written; gs a multiple of 16; threads: OpenMP threads to split the rows'
   blocks over. */
void fs_int4_mm(const float *x, int64_t M, int64_t K, const uint8_t *packed, const uint16_t *scale_zeros,
                int64_t n_pad, int64_t gs, float *y, int64_t N, int64_t ldy, int threads) {
    const int64_t G = K / gs;
    int8_t *xq = malloc((size_t)(2 * M * K));
    float *xf = malloc((size_t)(2 * M * G) * sizeof(float));
    int32_t *x8 = malloc((size_t)(M * G) * sizeof(int32_t));
    if (!xq || !xf || !x8) abort();
    int8_t *xh = xq, *xl = xq + M * K;
    float *xc = xf, *xsum = xf + M * G;
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < G; g++) {
            int64_t o = m * K + g * gs;
            split_group(x + o, gs, xh + o, xl + o, &xc[m * G + g], &xsum[m * G + g], &x8[m * G + g]);
        }
    job_t j = {xh, xl, xc, xsum, x8, M, K, gs, n_pad, N, ldy, packed, (const uint32_t *)scale_zeros, y};
    int64_t nblk = n_pad / BLOCK_N;
    int parts = threads < 1 ? 1 : threads;
    if (parts > nblk) parts = (int)nblk;
    if (parts <= 1) {
        run_blocks(&j, 0, nblk);
    } else {
#pragma omp parallel num_threads(parts)
        {
            int64_t a, b;
            part_range(nblk, omp_get_num_threads(), omp_get_thread_num(), &a, &b);
            run_blocks(&j, a, b);
        }
    }
    free(xq);
    free(xf);
    free(x8);
}
#endif /* __x86_64__ */
