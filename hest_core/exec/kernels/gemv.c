/* Small-M matrix-vector kernels for decode on x86-64 CPUs with AVX-512.
 *
 *   y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n])      M = 1..16 activation rows (decode steps)
 *
 * A decode step streams every weight once and does little arithmetic per byte, so it is bound by
 * memory bandwidth. These loops read each weight row once for all M activation rows, keep a
 * 4 (output rows) x up to 4 (activation rows) tile of accumulators in registers, prefetch the
 * weights a few blocks ahead (without it the hardware prefetchers see 4 interleaved short
 * streams and a core reads ~6 GB/s instead of ~12), and split the output rows over OpenMP
 * threads (the libgomp that PyTorch has loaded, so no second pool of threads).
 *
 *   hest_gemv_bf16: W bf16 [N, K]; x bf16 [M, K]; y bf16 [M, N] (round to nearest even).
 *                   AVX512-BF16 `vdpbf16ps` where the CPU has it: bf16 x bf16 products are exact
 *                   in fp32, so only the order of the fp32 sums differs from oneDNN's.
 *   hest_gemv_i8:   W int8 [N, K] with per-row fp32 scales; x bf16; y bf16. The activations
 *                   go to int16 per row (finer than bf16 itself, see below) and `vpdpwssd`
 *                   does 32 multiply-adds per instruction; both scales are applied to the sum.
 * The fused decode layer (layer.c, hest_decode_layer) is built on the same loops: hest.c
 * includes this file, q4.c, layer_ops.c and layer.c into one library.
 *
 * Every exported function checks its arguments before it touches memory (row counts, shapes,
 * positions against the cache it was given, path codes, scratch size) and returns 0, or one of
 * the HEST_E* codes below without reading or writing anything; native.py turns a code into a
 * Python error. What C cannot see (whether a pointer really holds that many bytes) the Python
 * caller checks against the tensors it passes.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define NB 4 /* output rows per block */
#define HEST_MAX_ROWS 16 /* activation rows one call takes (decode steps of up to 16 requests) */

/* Error codes of the exported functions (native.py: ERRORS). */
#define HEST_OK 0
#define HEST_ENULL -1    /* a required pointer is NULL */
#define HEST_EROWS -2    /* row count M outside 1..HEST_MAX_ROWS (or the cache holds fewer rows) */
#define HEST_ESHAPE -3   /* a dimension is out of the supported range */
#define HEST_EPOS -4     /* a position outside 0..max_len-1 or past the rope table */
#define HEST_EPATH -5    /* a path code the layer does not run (layer.c: 0..3, 3 only with int4 copies) */
#define HEST_ESCRATCH -6 /* the scratch block is smaller than the call needs */
#define HEST_ETHREADS -7 /* threads < 1 */
#ifndef PD16
#define PD16 2 /* prefetch distance in blocks, bf16 weights (measured: 1-4 equal, 8 worse) */
#endif
#ifndef PD8
#define PD8 4 /* prefetch distance in blocks, int8 weights */
#endif

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Lane masks for the last, partial vector of a row: `left` elements remain. */
static inline __mmask32 tail32(int left) { return left >= 32 ? 0xffffffffu : ((1u << left) - 1u); }
static inline __mmask16 tail16(int left) {
    return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
}

static inline __m512 widen_bf16(__m256i v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

/* One block: output rows n0..n0+NB-1 (rows past N read row N-1 and are not stored) for
 * activation rows m0..m0+MR-1. MR is a compile-time constant, so the tile stays in registers. */
#define BF16_BLOCK(MR)                                                                            \
    static void blk_bf16_##MR(const uint16_t *W, const uint16_t *x, const uint16_t *bias,        \
                              uint16_t *y, int N, int K, int n0, int m0) {                       \
        const uint16_t *wr[NB];                                                                   \
        for (int i = 0; i < NB; i++) wr[i] = W + (size_t)(n0 + i < N ? n0 + i : N - 1) * K;      \
        __m512 acc[NB][MR];                                                                       \
        _Pragma("GCC unroll 16") for (int i = 0; i < NB; i++)                                     \
            _Pragma("GCC unroll 4") for (int j = 0; j < MR; j++) acc[i][j] = _mm512_setzero_ps(); \
        for (int k = 0; k < K; k += 32) {                                                         \
            int left = K - k;                                                                     \
            __mmask32 km = tail32(left);                                                          \
            __m512i xv[MR];                                                                       \
            _Pragma("GCC unroll 4") for (int j = 0; j < MR; j++) xv[j] =                          \
                _mm512_maskz_loadu_epi16(km, x + (size_t)(m0 + j) * K + k);                       \
            _Pragma("GCC unroll 16") for (int i = 0; i < NB; i++) {                               \
                _mm_prefetch((const char *)(wr[i] + (size_t)PD16 * NB * K + k), _MM_HINT_T0);    \
                __m512i wv = _mm512_maskz_loadu_epi16(km, wr[i] + k);                             \
                _Pragma("GCC unroll 4") for (int j = 0; j < MR; j++)                              \
                    acc[i][j] = DOT_BF16(acc[i][j], wv, xv[j]);                                   \
            }                                                                                     \
        }                                                                                         \
        for (int i = 0; i < NB && n0 + i < N; i++) {                                              \
            float b = bias ? bf16_to_f32(bias[n0 + i]) : 0.0f;                                    \
            for (int j = 0; j < MR; j++)                                                          \
                y[(size_t)(m0 + j) * N + n0 + i] = f32_to_bf16(_mm512_reduce_add_ps(acc[i][j]) + b); \
        }                                                                                         \
    }

#if defined(__AVX512BF16__)
#define DOT_BF16(acc, w, x) _mm512_dpbf16_ps((acc), (__m512bh)(w), (__m512bh)(x))
#else
/* no vdpbf16ps: widen both halves to fp32 (same products, exact) and FMA */
static inline __m512 dot_bf16_fma(__m512 acc, __m512i w, __m512i x) {
    acc = _mm512_fmadd_ps(widen_bf16(_mm512_castsi512_si256(w)),
                          widen_bf16(_mm512_castsi512_si256(x)), acc);
    return _mm512_fmadd_ps(widen_bf16(_mm512_extracti64x4_epi64(w, 1)),
                           widen_bf16(_mm512_extracti64x4_epi64(x, 1)), acc);
}
#define DOT_BF16(acc, w, x) dot_bf16_fma((acc), (w), (x))
#endif

BF16_BLOCK(1)
BF16_BLOCK(2)
BF16_BLOCK(3)
BF16_BLOCK(4)

static void gemv_bf16_for(const uint16_t *W, const uint16_t *x, const uint16_t *bias, uint16_t *y,
                          int M, int N, int K);

int hest_gemv_bf16(const uint16_t *W, const uint16_t *x, const uint16_t *bias, uint16_t *y,
                   int M, int N, int K, int threads) {
    if (!W || !x || !y) return HEST_ENULL;
    if (M < 1 || M > HEST_MAX_ROWS) return HEST_EROWS;
    if (N < 1 || K < 1) return HEST_ESHAPE;
    if (threads < 1) return HEST_ETHREADS;
#pragma omp parallel num_threads(threads)
    gemv_bf16_for(W, x, bias, y, M, N, K);
    return HEST_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* int8 weights: the activations are quantised per row to int16 (max |x| -> 16383: a relative
 * step of 6e-5, finer than bf16's own 4e-3, so this is weight-only int8 in accuracy), then
 * `vpdpwssd` multiplies 32 int8 weights (sign-extended to int16) by 32 int16 activations and
 * adds the pairs into int32 lanes. Bounds: |w x| <= 127 * 16383, two per lane per step, K/32
 * steps: no int32 overflow for K < 32768. */
#define QX 16383.0f

#if defined(__AVX512VNNI__)
#define DOT_I16(acc, w, x) _mm512_dpwssd_epi32((acc), (w), (x))
#else
#define DOT_I16(acc, w, x) _mm512_add_epi32((acc), _mm512_madd_epi16((w), (x)))
#endif

#define I8_BLOCK(MR)                                                                              \
    static void blk_i8_##MR(const int8_t *W, const float *scale, const int16_t *xq,             \
                            const float *xs, const uint16_t *bias, uint16_t *y, int N, int K,    \
                            int n0, int m0) {                                                    \
        const int8_t *wr[NB];                                                                     \
        for (int i = 0; i < NB; i++) wr[i] = W + (size_t)(n0 + i < N ? n0 + i : N - 1) * K;      \
        __m512i acc[NB][MR];                                                                      \
        _Pragma("GCC unroll 16") for (int i = 0; i < NB; i++)                                     \
            _Pragma("GCC unroll 4") for (int j = 0; j < MR; j++) acc[i][j] = _mm512_setzero_si512(); \
        for (int k = 0; k < K; k += 32) {                                                         \
            int left = K - k;                                                                     \
            __mmask32 km = tail32(left);                                                          \
            __m512i xv[MR];                                                                       \
            _Pragma("GCC unroll 4") for (int j = 0; j < MR; j++) xv[j] =                          \
                _mm512_maskz_loadu_epi16(km, xq + (size_t)(m0 + j) * K + k);                      \
            _Pragma("GCC unroll 16") for (int i = 0; i < NB; i++) {                               \
                if ((k & 63) == 0)                                                                \
                    _mm_prefetch((const char *)(wr[i] + (size_t)PD8 * NB * K + k), _MM_HINT_T0); \
                __m512i wv = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(km, wr[i] + k));       \
                _Pragma("GCC unroll 4") for (int j = 0; j < MR; j++)                              \
                    acc[i][j] = DOT_I16(acc[i][j], wv, xv[j]);                                    \
            }                                                                                     \
        }                                                                                         \
        for (int i = 0; i < NB && n0 + i < N; i++) {                                              \
            float s = scale[n0 + i];                                                              \
            float b = bias ? bf16_to_f32(bias[n0 + i]) : 0.0f;                                    \
            for (int j = 0; j < MR; j++)                                                          \
                y[(size_t)(m0 + j) * N + n0 + i] = f32_to_bf16(                                   \
                    (float)_mm512_reduce_add_epi32(acc[i][j]) * (s * xs[m0 + j]) + b);            \
        }                                                                                         \
    }

I8_BLOCK(1)
I8_BLOCK(2)
I8_BLOCK(3)
I8_BLOCK(4)

static void quant_rows_i16(const uint16_t *x, int M, int K, int16_t *xq, float *xs);
static void gemv_i8_for(const int8_t *W, const float *scale, const int16_t *xq, const float *xs,
                        const uint16_t *bias, uint16_t *y, int M, int N, int K);

/* scratch: at least M*K int16 + M floats, 4-byte aligned (the quantised activations, made once
 * per call, not once per weight row). */
int hest_gemv_i8(const int8_t *W, const float *scale, const uint16_t *x, const uint16_t *bias,
                 uint16_t *y, void *scratch, int M, int N, int K, int threads) {
    if (!W || !scale || !x || !y || !scratch) return HEST_ENULL;
    if (M < 1 || M > HEST_MAX_ROWS) return HEST_EROWS;
    if (N < 1 || K < 1 || K >= 32768) return HEST_ESHAPE; /* int32 sums: see above */
    if (threads < 1) return HEST_ETHREADS;
    float *xs = (float *)scratch;
    int16_t *xq = (int16_t *)(xs + M);
    quant_rows_i16(x, M, K, xq, xs);
#pragma omp parallel num_threads(threads)
    gemv_i8_for(W, scale, xq, xs, bias, y, M, N, K);
    return HEST_OK;
}



/* The products inside a parallel region: output rows split over the threads (orphaned `omp
 * for`, with its barrier at the end). */
static void gemv_bf16_for(const uint16_t *W, const uint16_t *x, const uint16_t *bias, uint16_t *y,
                          int M, int N, int K) {
    int blocks = (N + NB - 1) / NB;
#pragma omp for schedule(static)
    for (int b = 0; b < blocks; b++) {
        for (int m0 = 0; m0 < M; m0 += 4) {
            switch (M - m0 < 4 ? M - m0 : 4) {
            case 1: blk_bf16_1(W, x, bias, y, N, K, b * NB, m0); break;
            case 2: blk_bf16_2(W, x, bias, y, N, K, b * NB, m0); break;
            case 3: blk_bf16_3(W, x, bias, y, N, K, b * NB, m0); break;
            default: blk_bf16_4(W, x, bias, y, N, K, b * NB, m0); break;
            }
        }
    }
}

static void quant_rows_i16(const uint16_t *x, int M, int K, int16_t *xq, float *xs) {
    for (int m = 0; m < M; m++) {
        const uint16_t *xr = x + (size_t)m * K;
        int16_t *qr = xq + (size_t)m * K;
        __m512 vmax = _mm512_setzero_ps();
        for (int k = 0; k < K; k += 16) {
            __mmask16 km = tail16(K - k);
            vmax = _mm512_max_ps(vmax, _mm512_abs_ps(widen_bf16(_mm256_maskz_loadu_epi16(km, xr + k))));
        }
        float mx = _mm512_reduce_max_ps(vmax);
        float s = mx > 0.0f ? mx / QX : 1.0f;
        __m512 inv = _mm512_set1_ps(1.0f / s);
        for (int k = 0; k < K; k += 16) { /* round to nearest even, as lrintf */
            __mmask16 km = tail16(K - k);
            __m512 v = _mm512_mul_ps(widen_bf16(_mm256_maskz_loadu_epi16(km, xr + k)), inv);
            __m512i q = _mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            _mm256_mask_storeu_epi16(qr + k, km, _mm512_cvtsepi32_epi16(q));
        }
        xs[m] = s;
    }
}

static void gemv_i8_for(const int8_t *W, const float *scale, const int16_t *xq, const float *xs,
                        const uint16_t *bias, uint16_t *y, int M, int N, int K) {
    int blocks = (N + NB - 1) / NB;
#pragma omp for schedule(static)
    for (int b = 0; b < blocks; b++) {
        for (int m0 = 0; m0 < M; m0 += 4) {
            switch (M - m0 < 4 ? M - m0 : 4) {
            case 1: blk_i8_1(W, scale, xq, xs, bias, y, N, K, b * NB, m0); break;
            case 2: blk_i8_2(W, scale, xq, xs, bias, y, N, K, b * NB, m0); break;
            case 3: blk_i8_3(W, scale, xq, xs, bias, y, N, K, b * NB, m0); break;
            default: blk_i8_4(W, scale, xq, xs, bias, y, N, K, b * NB, m0); break;
            }
        }
    }
}

