/* Small-M matrix-vector kernels for decode on x86-64 CPUs with AVX-512.
 *
 *   y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n])      M = 1..8 activation rows (decode steps)
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
 *   hest_decode_layer: one whole decoder layer of a decode step (below), built on the same loops.
 *   hest_ctl_logits:   the factorised controller's logits for one row.
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
#define HEST_EPATH -5    /* a path code the layer does not run: not 0 (fp16), 1 (int8) or 2 (skip) */
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

/* ---------------------------------------------------------------------------------------- */
/* One decoder layer of a decode step in one call (the `fused` decode loop, model.py).
 *
 * After the products, a PyTorch decode step spent ~5-8 ms of ~20 in the ~30 small operators
 * per layer around them (norms, rope, cache writes, attention, residuals), each a dispatch of
 * its own. Here a layer is one call and one OpenMP parallel region: the products split their
 * output rows over the threads, attention splits its (row, head) pairs, and the small steps run
 * on one thread between barriers. Each path of each row is chosen by the caller (the controller
 * and the budget guard stay in Python, between layers).
 *
 * Numerics follow the PyTorch loop op for op: every elementwise step computes in fp32 and rounds
 * to bf16 where PyTorch's bf16 operator would (norms, rope, residual adds, SiLU and its product).
 * Attention keeps its probabilities in fp32 (SDPA's CPU kernel rounds them to bf16 before the
 * product with V, so the two differ in the last bits). */
#include <math.h>
#include <omp.h>

#define CMAX 8 /* most position chunks per (row, KV head) in decode attention */

typedef struct {
    const uint16_t *ln1, *ln2;                 /* (d) */
    const uint16_t *wqkv, *bqkv;               /* (nqkv, d); bias (nqkv) or NULL */
    const uint16_t *wo;                        /* (d, qd) */
    const uint16_t *wgu;                       /* (2I, d): gate rows then up rows */
    const uint16_t *wdown;                     /* (d, I) */
    const uint16_t *q_norm, *k_norm;           /* (hd) or NULL */
    const int8_t *qkv8, *o8, *gu8, *down8;     /* int8 copies, same shapes */
    const float *qkv8_s, *o8_s, *gu8_s, *down8_s;
    const uint16_t *sc_a, *sc_b;               /* skip shortcut (R, d), (d, R), or NULL */
    int R;
} hest_layer_t;

typedef struct {
    int d, I, H, KVH, hd, max_len, M, threads;
    float eps;
    const int64_t *pos;                        /* (M) position of each row */
    const uint16_t *cos, *sin;                 /* rope tables (rope_len positions, hd) */
    void *scratch;                             /* hest_decode_scratch_bytes(...) bytes, 64-aligned */
    int cache_rows;                            /* rows the kc/vc caches hold (>= M) */
    int rope_len;                              /* positions in the rope tables */
    size_t scratch_bytes;                      /* bytes at scratch */
} hest_step_t;

static inline uint16_t mul_bf16(uint16_t a, uint16_t b) { return f32_to_bf16(bf16_to_f32(a) * bf16_to_f32(b)); }
static inline uint16_t add_bf16(uint16_t a, uint16_t b) { return f32_to_bf16(bf16_to_f32(a) + bf16_to_f32(b)); }

/* As the PyTorch rms_norm: statistics in fp32, the normalised value rounded, then scaled. */
static void rms_norm_row(const uint16_t *x, const uint16_t *w, uint16_t *y, int n, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) {
        float a = bf16_to_f32(x[i]);
        ss += a * a;
    }
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) y[i] = mul_bf16(w[i], f32_to_bf16(bf16_to_f32(x[i]) * r));
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

typedef struct {
    uint16_t *gx, *gy; /* gathered rows in and out (mixed paths) */
    int16_t *xq;       /* int16 activations */
    float *xs;         /* their scales */
} proj_scratch_t;

/* y[rows] = x[rows] @ W^T (+ bias) for the nr listed rows of x (M, K), in bf16 (W16) or int8
 * (W8, scales). Called by every thread of the region. */
static void proj_rows(const uint16_t *W16, const int8_t *W8, const float *s8, const uint16_t *bias,
                      const uint16_t *x, uint16_t *y, int M, int N, int K, const int *rows, int nr,
                      const proj_scratch_t *ps) {
    if (nr == 0) return;
    const uint16_t *src = x;
    uint16_t *dst = y;
    if (nr != M) {
#pragma omp single
        for (int r = 0; r < nr; r++)
            memcpy(ps->gx + (size_t)r * K, x + (size_t)rows[r] * K, (size_t)K * 2);
        src = ps->gx;
        dst = ps->gy;
    }
    if (W8) {
#pragma omp single
        quant_rows_i16(src, nr, K, ps->xq, ps->xs);
        gemv_i8_for(W8, s8, ps->xq, ps->xs, bias, dst, nr, N, K);
    } else {
        gemv_bf16_for(W16, src, bias, dst, nr, N, K);
    }
    if (nr != M) {
#pragma omp single
        for (int r = 0; r < nr; r++)
            memcpy(y + (size_t)rows[r] * N, ps->gy + (size_t)r * N, (size_t)N * 2);
    }
}

static void rope_head(uint16_t *v, const uint16_t *c, const uint16_t *s, int hd) {
    uint16_t tmp[512];
    int h2 = hd / 2;
    for (int i = 0; i < hd; i++) {
        uint16_t rot = i < h2 ? (uint16_t)(v[i + h2] ^ 0x8000u) : v[i - h2];
        tmp[i] = add_bf16(mul_bf16(v[i], c[i]), mul_bf16(rot, s[i]));
    }
    memcpy(v, tmp, (size_t)hd * 2);
}

/* exp for x <= 0 (softmax): x = n ln2 + r, |r| <= ln2/2, e^r by its degree-6 Taylor polynomial
 * (relative error < 2e-7), scaled by 2^n. Below -87 the result flushes to 0. */
static inline __m512 exp_neg(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* The 16 horizontal sums of v[0..15], as one vector (lane u = sum of v[u]): pairs of vectors
 * are interleaved and added, then 128-bit lanes are transposed and added (~3 operations a sum
 * instead of ~8 for a reduction each). */
static inline __m512 hsum16(const __m512 *v) {
    __m512 w[8], x[4];
    for (int i = 0; i < 8; i++)
        w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) /* lane L of x[i]: the lane-L sums of v[4i .. 4i+3] */
        x[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    __m512 z0 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], _MM_SHUFFLE(2, 0, 2, 0)),
                              _mm512_shuffle_f32x4(x[0], x[1], _MM_SHUFFLE(3, 1, 3, 1)));
    __m512 z1 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], _MM_SHUFFLE(2, 0, 2, 0)),
                              _mm512_shuffle_f32x4(x[2], x[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(z0, z1, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(z0, z1, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* One attention work item: positions t0..t1-1 of one KV head for its G query heads (q: G rows
 * of hd, rotated, bf16; K, V: (positions, hd) bf16). Writes per head (max score, sum of
 * exponentials, unnormalised output[hd]) to part[G][hd + 2]; sc: G * (t1 - t0 + 16) floats. */
static void attend_chunk(const uint16_t *q, const uint16_t *K, const uint16_t *V, int t0, int t1,
                         int G, int hd, float scale, float *sc, float *part) {
    int n = t1 - t0, nv = (hd + 31) / 32, stride = n + 16;
    if (n <= 0) {
        for (int j = 0; j < G; j++) {
            part[(size_t)j * (hd + 2)] = -INFINITY;
            part[(size_t)j * (hd + 2) + 1] = 0.0f;
        }
        return;
    }
    __m512i qv[16][8]; /* G <= 16 query heads per KV head, hd <= 256 */
    for (int j = 0; j < G; j++)
        for (int v = 0; v < nv; v++) {
            int left = hd - v * 32;
            __mmask32 km = tail32(left);
            qv[j][v] = _mm512_maskz_loadu_epi16(km, q + (size_t)j * hd + v * 32);
        }
    const __m512 vscale = _mm512_set1_ps(scale);
    int t = 0;
    for (; t + 16 <= n; t += 16) { /* 16 positions at a time: one transposing reduction */
        for (int j = 0; j < G; j++) {
            __m512 acc[16];
            for (int u = 0; u < 16; u++) {
                const uint16_t *kr = K + (size_t)(t0 + t + u) * hd;
                __m512 a = _mm512_setzero_ps();
                for (int v = 0; v < nv; v++) {
                    int left = hd - v * 32;
                    __mmask32 km = tail32(left);
                    a = DOT_BF16(a, _mm512_maskz_loadu_epi16(km, kr + v * 32), qv[j][v]);
                }
                acc[u] = a;
            }
            _mm512_storeu_ps(sc + (size_t)j * stride + t, _mm512_mul_ps(hsum16(acc), vscale));
        }
    }
    for (; t < n; t++) {
        const uint16_t *kr = K + (size_t)(t0 + t) * hd;
        __m512i kv[8];
        for (int v = 0; v < nv; v++) {
            int left = hd - v * 32;
            __mmask32 km = tail32(left);
            kv[v] = _mm512_maskz_loadu_epi16(km, kr + v * 32);
        }
        for (int j = 0; j < G; j++) {
            __m512 acc = _mm512_setzero_ps();
            for (int v = 0; v < nv; v++) acc = DOT_BF16(acc, kv[v], qv[j][v]);
            sc[(size_t)j * stride + t] = _mm512_reduce_add_ps(acc) * scale;
        }
    }
    float *ob = part; /* reuse as the accumulators */
    for (int j = 0; j < G; j++) {
        float *s = sc + (size_t)j * stride;
        float mx = -INFINITY;
        for (int t = 0; t < n; t++) mx = s[t] > mx ? s[t] : mx;
        __m512 vm = _mm512_set1_ps(mx), vsum = _mm512_setzero_ps();
        for (int t = 0; t < n; t += 16) {
            __mmask16 km = tail16(n - t);
            __m512 e = exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(km, s + t), vm));
            e = _mm512_maskz_mov_ps(km, e);
            _mm512_mask_storeu_ps(s + t, km, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        ob[(size_t)j * (hd + 2)] = mx;
        ob[(size_t)j * (hd + 2) + 1] = _mm512_reduce_add_ps(vsum);
    }
    int nf = (hd + 15) / 16;
    __m512 o[16][16];
    for (int j = 0; j < G; j++)
        for (int f = 0; f < nf; f++) o[j][f] = _mm512_setzero_ps();
    for (int t = 0; t < n; t++) {
        const uint16_t *vr = V + (size_t)(t0 + t) * hd;
        __m512 vf[16];
        for (int f = 0; f < nf; f++) {
            int left = hd - f * 16;
            __mmask16 km = tail16(left);
            vf[f] = widen_bf16(_mm256_maskz_loadu_epi16(km, vr + f * 16));
        }
        for (int j = 0; j < G; j++) {
            __m512 w = _mm512_set1_ps(sc[(size_t)j * stride + t]);
            for (int f = 0; f < nf; f++) o[j][f] = _mm512_fmadd_ps(w, vf[f], o[j][f]);
        }
    }
    for (int j = 0; j < G; j++)
        for (int f = 0; f < nf; f++) {
            int left = hd - f * 16;
            __mmask16 km = tail16(left);
            _mm512_mask_storeu_ps(ob + (size_t)j * (hd + 2) + 2 + f * 16, km, o[j][f]);
        }
}

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

/* The working buffers of one decode-layer call, carved from one scratch block. */
typedef struct {
    uint16_t *qkv, *att, *yo, *h2, *gu, *act, *rk; /* rk: the shortcut's rank-R rows (R <= d) */
    proj_scratch_t ps;
    float *scores, *part; /* attention scores per thread; per-chunk partials */
} layer_scratch_t;

/* Lays the buffers out from base (NULL: only measures) and returns the bytes they take. */
static size_t carve(char *base, int d, int I, int H, int KVH, int hd, int max_len, int M,
                    int threads, layer_scratch_t *sp) {
    int nqkv = (H + 2 * KVH) * hd, qd = H * hd;
    int widest = 2 * I > nqkv ? 2 * I : nqkv; /* the most outputs of one product */
    if (widest < d) widest = d;
    int deepest = I > d ? I : d;              /* the most inputs of one product */
    if (deepest < qd) deepest = qd;
    size_t off = 0;
#define TAKE(field, bytes)                                       \
    do {                                                         \
        if (base) sp->field = (void *)(base + off);              \
        off += align64(bytes);                                   \
    } while (0)
    TAKE(qkv, (size_t)M * nqkv * 2);
    TAKE(att, (size_t)M * qd * 2);
    TAKE(yo, (size_t)M * d * 2);
    TAKE(h2, (size_t)M * d * 2);
    TAKE(gu, (size_t)M * 2 * I * 2);
    TAKE(act, (size_t)M * I * 2);
    TAKE(rk, (size_t)M * d * 2);
    TAKE(ps.gx, (size_t)M * deepest * 2);
    TAKE(ps.gy, (size_t)M * widest * 2);
    TAKE(ps.xq, (size_t)M * deepest * 2 + 64);
    TAKE(ps.xs, (size_t)M * 4 + 64);
    TAKE(scores, (size_t)threads * H * (max_len + 16) * 4);
    TAKE(part, (size_t)M * H * CMAX * (hd + 2) * 4);
#undef TAKE
    return off;
}

/* 0 for shapes a decode-layer call cannot take (the arrays below are sized for them). */
static int shapes_ok(int d, int I, int H, int KVH, int hd, int max_len, int M, int threads) {
    if (M < 1 || M > HEST_MAX_ROWS || threads < 1) return 0;
    if (d < 1 || I < 1 || H < 1 || KVH < 1 || H % KVH || max_len < 1) return 0;
    return hd >= 2 && hd <= 512 && hd % 2 == 0 && H / KVH <= 16;
}

size_t hest_decode_scratch_bytes(int d, int I, int H, int KVH, int hd, int max_len, int M,
                                 int threads) {
    if (!shapes_ok(d, I, H, KVH, hd, max_len, M, threads)) return 0;
    return carve(NULL, d, I, H, KVH, hd, max_len, M, threads, NULL);
}

/* The checks of one decode-layer call, before any memory is touched. */
static int check_layer_call(const hest_layer_t *L, const hest_step_t *S, const int64_t *paths,
                            const uint16_t *x, const uint16_t *h, const uint16_t *ln_next,
                            const uint16_t *kc, const uint16_t *vc) {
    if (!L || !S || !paths || !x || !h || !ln_next || !kc || !vc) return HEST_ENULL;
    if (!S->pos || !S->cos || !S->sin || !S->scratch) return HEST_ENULL;
    if (!L->ln1 || !L->ln2 || !L->wqkv || !L->wo || !L->wgu || !L->wdown) return HEST_ENULL;
    if (!L->qkv8 || !L->o8 || !L->gu8 || !L->down8) return HEST_ENULL;
    if (!L->qkv8_s || !L->o8_s || !L->gu8_s || !L->down8_s) return HEST_ENULL;
    if ((L->q_norm == NULL) != (L->k_norm == NULL)) return HEST_ENULL;
    if (L->sc_a && (!L->sc_b || L->R < 1 || L->R > S->d)) return HEST_ESHAPE;
    if (S->threads < 1) return HEST_ETHREADS;
    if (S->M < 1 || S->M > HEST_MAX_ROWS || S->cache_rows < S->M) return HEST_EROWS;
    if (!shapes_ok(S->d, S->I, S->H, S->KVH, S->hd, S->max_len, S->M, S->threads))
        return HEST_ESHAPE;
    for (int m = 0; m < S->M; m++) {
        if (paths[m] < 0 || paths[m] > 2) return HEST_EPATH;
        if (S->pos[m] < 0 || S->pos[m] >= S->max_len || S->pos[m] >= S->rope_len) return HEST_EPOS;
    }
    size_t need = carve(NULL, S->d, S->I, S->H, S->KVH, S->hd, S->max_len, S->M, S->threads, NULL);
    if ((uintptr_t)S->scratch % 64 || S->scratch_bytes < need) return HEST_ESCRATCH;
    return HEST_OK;
}

/* x (M, d): residual stream in and out. h (M, d): in, the normalised input of this layer (the
 * controller saw it); out, the normalised input of the next layer (ln_next: the next layer's
 * ln1, or the final norm). kc/vc: this layer's cache (cache_rows >= M rows, KVH, max_len, hd);
 * row m writes position pos[m] of cache row m. paths (M): 0 fp16, 1 int8, 2 skip. Returns 0, or
 * an HEST_E* code without touching memory. */
int hest_decode_layer(const hest_layer_t *L, const hest_step_t *S, const int64_t *paths,
                      uint16_t *x, uint16_t *h, const uint16_t *ln_next, uint16_t *kc,
                      uint16_t *vc) {
    int rc = check_layer_call(L, S, paths, x, h, ln_next, kc, vc);
    if (rc != HEST_OK) return rc;
    const int d = S->d, I = S->I, H = S->H, KVH = S->KVH, hd = S->hd, M = S->M;
    const int qd = H * hd, kvd = KVH * hd, nqkv = qd + 2 * kvd, G = H / KVH;
    const int max_len = S->max_len;
    layer_scratch_t sb;
    carve((char *)S->scratch, d, I, H, KVH, hd, max_len, M, S->threads, &sb);
    uint16_t *qkv = sb.qkv, *att = sb.att, *yo = sb.yo, *h2 = sb.h2, *gu = sb.gu, *act = sb.act;
    uint16_t *rk = sb.rk;
    const proj_scratch_t ps = sb.ps;
    float *scores = sb.scores, *part = sb.part;
    /* position chunks per (row, KV head): enough items for every thread, chunks >= 32 long */
    int C = (2 * S->threads + M * KVH - 1) / (M * KVH);
    int shortest = max_len;
    for (int m = 0; m < M; m++) shortest = (int)S->pos[m] + 1 < shortest ? (int)S->pos[m] + 1 : shortest;
    while (C > 1 && shortest / C < 32) C--;
    C = C < 1 ? 1 : (C > CMAX ? CMAX : C);

    int r16[HEST_MAX_ROWS], rlo[HEST_MAX_ROWS], r8[HEST_MAX_ROWS], rsk[HEST_MAX_ROWS], n16 = 0, nlo = 0, n8 = 0, nsk = 0;
    for (int m = 0; m < M; m++) {
        if (paths[m] == 0) r16[n16++] = m;
        else rlo[nlo++] = m;
        if (paths[m] == 1) r8[n8++] = m;
        if (paths[m] == 2) rsk[nsk++] = m;
    }
    const float scale = 1.0f / sqrtf((float)hd);

#pragma omp parallel num_threads(S->threads)
    {
        /* attention projections: fp16 rows dense, int8 and skip rows int8 */
        proj_rows(L->wqkv, NULL, NULL, L->bqkv, h, qkv, M, nqkv, d, r16, n16, &ps);
        proj_rows(NULL, L->qkv8, L->qkv8_s, L->bqkv, h, qkv, M, nqkv, d, rlo, nlo, &ps);

        /* q/k norms (Qwen3), rope, cache write */
#pragma omp single
        for (int m = 0; m < M; m++) {
            uint16_t *row = qkv + (size_t)m * nqkv;
            const uint16_t *c = S->cos + (size_t)S->pos[m] * hd, *s = S->sin + (size_t)S->pos[m] * hd;
            for (int j = 0; j < H + KVH; j++) {
                uint16_t *v = row + (size_t)j * hd;
                if (L->q_norm) rms_norm_row(v, j < H ? L->q_norm : L->k_norm, v, hd, S->eps);
                rope_head(v, c, s, hd);
            }
            for (int g = 0; g < KVH; g++) {
                size_t at = (((size_t)m * KVH + g) * max_len + S->pos[m]) * hd;
                memcpy(kc + at, row + qd + (size_t)g * hd, (size_t)hd * 2);
                memcpy(vc + at, row + qd + kvd + (size_t)g * hd, (size_t)hd * 2);
            }
        }

        /* attention, split like flash-decoding: (row, KV head, chunk of positions) items, each
         * for the G query heads that share the KV head; then the chunks are merged */
#pragma omp for schedule(static)
        for (int it = 0; it < M * KVH * C; it++) {
            int m = it / (KVH * C), g = (it / C) % KVH, c = it % C;
            int span = (int)S->pos[m] + 1;
            int t0 = (int)((long)span * c / C), t1 = (int)((long)span * (c + 1) / C);
            attend_chunk(qkv + (size_t)m * nqkv + (size_t)g * G * hd,
                         kc + ((size_t)m * KVH + g) * max_len * hd,
                         vc + ((size_t)m * KVH + g) * max_len * hd, t0, t1, G, hd, scale,
                         scores + (size_t)omp_get_thread_num() * H * (max_len + 16),
                         part + (((size_t)m * KVH + g) * C + c) * G * (hd + 2));
        }
#pragma omp for schedule(static)
        for (int it = 0; it < M * H; it++) {
            int m = it / H, hh = it % H, g = hh / G, j = hh % G;
            const float *pp = part + ((size_t)m * KVH + g) * C * G * (hd + 2);
            float mx = -INFINITY, l = 0.0f, o[512];
            for (int cc = 0; cc < C; cc++) {
                float mc = pp[((size_t)cc * G + j) * (hd + 2)];
                mx = mc > mx ? mc : mx;
            }
            for (int i = 0; i < hd; i++) o[i] = 0.0f;
            for (int cc = 0; cc < C; cc++) {
                const float *q = pp + ((size_t)cc * G + j) * (hd + 2);
                if (q[1] == 0.0f) continue; /* an empty chunk */
                float w = expf(q[0] - mx);
                l += w * q[1];
                for (int i = 0; i < hd; i++) o[i] += w * q[2 + i];
            }
            float inv = 1.0f / l;
            uint16_t *out = att + (size_t)m * qd + (size_t)hh * hd;
            for (int i = 0; i < hd; i++) out[i] = f32_to_bf16(o[i] * inv);
        }

        /* output projection, residual, post-attention norm */
        proj_rows(L->wo, NULL, NULL, NULL, att, yo, M, d, qd, r16, n16, &ps);
        proj_rows(NULL, L->o8, L->o8_s, NULL, att, yo, M, d, qd, rlo, nlo, &ps);
#pragma omp single
        for (int m = 0; m < M; m++) {
            uint16_t *xr = x + (size_t)m * d, *yr = yo + (size_t)m * d;
            for (int i = 0; i < d; i++) xr[i] = add_bf16(xr[i], yr[i]);
            rms_norm_row(xr, L->ln2, h2 + (size_t)m * d, d, S->eps);
        }

        /* MLP on each row's path */
        proj_rows(L->wgu, NULL, NULL, NULL, h2, gu, M, 2 * I, d, r16, n16, &ps);
        proj_rows(NULL, L->gu8, L->gu8_s, NULL, h2, gu, M, 2 * I, d, r8, n8, &ps);
#pragma omp single
        for (int m = 0; m < M; m++) {
            if (paths[m] == 2) continue;
            const uint16_t *g = gu + (size_t)m * 2 * I, *u = g + I;
            uint16_t *a = act + (size_t)m * I;
            for (int i = 0; i < I; i++) {
                float gf = bf16_to_f32(g[i]);
                a[i] = mul_bf16(f32_to_bf16(gf / (1.0f + expf(-gf))), u[i]);
            }
        }
        proj_rows(L->wdown, NULL, NULL, NULL, act, yo, M, d, I, r16, n16, &ps);
        proj_rows(NULL, L->down8, L->down8_s, NULL, act, yo, M, d, I, r8, n8, &ps);
        if (L->sc_a && nsk) {
            proj_rows(L->sc_a, NULL, NULL, NULL, h2, rk, M, L->R, d, rsk, nsk, &ps);
            proj_rows(L->sc_b, NULL, NULL, NULL, rk, yo, M, d, L->R, rsk, nsk, &ps);
        }
#pragma omp single
        for (int m = 0; m < M; m++) {
            uint16_t *xr = x + (size_t)m * d, *yr = yo + (size_t)m * d;
            if (paths[m] != 2 || L->sc_a)
                for (int i = 0; i < d; i++) xr[i] = add_bf16(xr[i], yr[i]);
            rms_norm_row(xr, ln_next, h + (size_t)m * d, d, S->eps);
        }
    }
    return HEST_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* The factorised controller (controller.py) for one row at decode, in fp32:
 *   logits = A (sigmoid(W_tok h) * lay) + a0,   lay = sigmoid(w_layer + u beta) (given).
 * W_tok (k, d), A (P, k), a0 (P), lay (k) fp32; h (d) bf16; out (P): P paths (paths.py). */
int hest_ctl_logits(const float *wtok, const float *lay, const float *A, const float *a0, int k,
                    int d, int P, const uint16_t *h, float *out) {
    if (!wtok || !lay || !A || !a0 || !h || !out) return HEST_ENULL;
    if (k < 1 || k > 256 || d < 1 || d > 4096 || P < 1 || P > 16) return HEST_ESHAPE;
    float hf[4096], f[256];
    for (int j = 0; j < d; j++) hf[j] = bf16_to_f32(h[j]);
    for (int i = 0; i < k; i++) {
        const float *w = wtok + (size_t)i * d;
        float a = 0.0f;
#pragma omp simd reduction(+ : a)
        for (int j = 0; j < d; j++) a += w[j] * hf[j];
        f[i] = lay[i] / (1.0f + expf(-a));
    }
    for (int p = 0; p < P; p++) {
        float a = a0[p];
        for (int i = 0; i < k; i++) a += A[(size_t)p * k + i] * f[i];
        out[p] = a;
    }
    return HEST_OK;
}
