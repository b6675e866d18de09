/* RMSNorm of float32 rows on the CPU (kernels/norm.py `rms_norm_cpu` calls it through ctypes; its
reference is `rms_norm_ref`): y = x / sqrt(mean(x^2) + eps) * w.

torch's fused rms_norm is ~8 ATen ops inside, ~20 us per call on SmolLM2's 576-wide rows where the
arithmetic is ~0.2 us: 61 calls per decode step were ~1.2 ms of a 13 ms step. The sum of squares
runs in 16 float32 lanes in a fixed order, so a row's result depends only on the row. AVX-512F
behind a function attribute (fs_norm_supported); H a multiple of 16. */
#define _GNU_SOURCE
#include <stdint.h>

#if !defined(__x86_64__)
int fs_norm_supported(void) { return 0; }
void fs_rms_norm(const float *x, const float *w, float eps, float *y, int64_t T, int64_t H) {
    (void)x, (void)w, (void)eps, (void)y, (void)T, (void)H;
}
#else
#include <immintrin.h>
#include <math.h>

#define AVX512 __attribute__((target("avx512f")))

int fs_norm_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
}

/* x, y [T, H] contiguous (y may be x), w [H] */
AVX512 void fs_rms_norm(const float *x, const float *w, float eps, float *y, int64_t T, int64_t H) {
    for (int64_t t = 0; t < T; t++) {
        const float *r = x + t * H;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t k = 0; k < H; k += 16) {
            __m512 v = _mm512_loadu_ps(r + k);
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        float inv = 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)H + eps);
        __m512 s = _mm512_set1_ps(inv);
        for (int64_t k = 0; k < H; k += 16)
            _mm512_storeu_ps(y + t * H + k,
                             _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(r + k), s), _mm512_loadu_ps(w + k)));
    }
}
#endif /* __x86_64__ */
