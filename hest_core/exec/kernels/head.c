/* The lm_head at one decode row from the model's own 8-bit blocks (Q8_0), bit for bit what
 * hest_gemv_bf16 computes on the 16-bit copy of the same weights.
 *
 *   hest_head_q8: y[m, n] = sum_k x[m, k] * W[n, k]    M = 1..HEST_MAX_ROWS rows, bf16 x and y
 *
 * W is Q8_0 (GGUF): per 32 weights along k an fp16 scale d and 32 int8 codes q, w = d * q. Here
 * the codes are one (N, K) int8 array and the scales one (N, K/32) fp16 array (q8head.py splits
 * the GGUF blocks), 34 bytes per 32 weights against 64 for bf16: the default model's tied
 * 49152 x 576 head is 30.1 MB instead of 56.6, about a third of what an int4 decode step reads.
 *
 * Numerics: d * q is exact in fp32 (11 and 8 significant bits), and vcvtne2ps2bf16 rounds it to
 * nearest even, as torch's .bfloat16() does: where the 16-bit head is those blocks dequantized
 * and rounded (the default model's is: q8head.py checks it at load), every weight vector here
 * equals the one blk_bf16_1 (gemv.c) loads. The products then run the same instruction
 * (vdpbf16ps) in the same order into one fp32 accumulator per output, the same horizontal
 * reduction and the same rounding of the sum: the logits equal hest_gemv_bf16's bit for bit,
 * at any thread count (each output is one thread's). Without AVX512-BF16 the fallback widens
 * both to fp32 and FMAs, as gemv.c's own fallback does: again the same result as it.
 *
 * The loop is blk_bf16_1's: 4 weight rows a block, one 32-weight chunk (one Q8_0 block) of
 * each row in turn, software prefetch Q8_PD blocks of rows ahead. Rows past N are not read.
 * Measured (whole int4 steps, 2 threads, medians of 25 interleaved): Q8_PD 2, 4, 8 (T0) and
 * 8, 16 (T1) within noise of each other (5.44-5.57 ms a step); no prefetch 6.22. The head runs
 * at ~22 GB/s where the layers' products reach ~30-38 (about half its time is the conversion of
 * 32 codes to bf16: 8 512-bit operations a block per row). */

#ifndef Q8_PD
#define Q8_PD 4 /* prefetch distance in blocks of NB rows (0: none) */
#endif
#ifndef Q8_HINT
#define Q8_HINT _MM_HINT_T0
#endif

/* 32 weights d * q as bf16 (round to nearest even; exact products in fp32). */
static inline __m512i q8_to_bf16(const int8_t *q, float d) {
    const __m512 dv = _mm512_set1_ps(d);
    __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q))), dv);
    __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16)))), dv);
#if defined(__AVX512BF16__)
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
#else
    return _mm512_inserti64x4(_mm512_castsi256_si512(round_bf16x16(lo)), round_bf16x16(hi), 1);
#endif
}

/* Output rows n0..n0+nr-1 (nr <= NB) for activation row x (K bf16). */
static void blk_q8_1(const int8_t *codes, const uint16_t *scales, const uint16_t *x, uint16_t *y,
                     int nr, int K, int n0) {
    const int nb = K / 32;
    const int8_t *wr[NB];
    const uint16_t *sr[NB];
    for (int i = 0; i < NB; i++) {
        const int n = n0 + (i < nr ? i : nr - 1);
        wr[i] = codes + (size_t)n * K;
        sr[i] = scales + (size_t)n * nb;
    }
    __m512 acc[NB];
    _Pragma("GCC unroll 4") for (int i = 0; i < NB; i++) acc[i] = _mm512_setzero_ps();
    for (int b0 = 0; b0 < nb; b0 += 16) {
        /* the scales of up to 16 blocks of each row to fp32 at once (one vcvtph2ps), so each
         * block's is a broadcast from memory (a load, no arithmetic) */
        const int bn = nb - b0 < 16 ? nb - b0 : 16;
        float ds[NB][16];
        _Pragma("GCC unroll 4") for (int i = 0; i < NB; i++) _mm512_storeu_ps(
            ds[i], _mm512_cvtph_ps(_mm256_maskz_loadu_epi16((__mmask16)((1u << bn) - 1u), sr[i] + b0)));
        for (int b = b0; b < b0 + bn; b++) {
            const __m512i xv = _mm512_loadu_si512(x + (size_t)b * 32);
            _Pragma("GCC unroll 4") for (int i = 0; i < NB; i++) {
                if (Q8_PD > 0 && (b & 1) == 0)
                    _mm_prefetch((const char *)(wr[i] + (size_t)Q8_PD * NB * K + (size_t)b * 32), Q8_HINT);
                const __m512i wv = q8_to_bf16(wr[i] + (size_t)b * 32, ds[i][b - b0]);
                acc[i] = DOT_BF16(acc[i], wv, xv);
            }
        }
    }
    for (int i = 0; i < nr; i++) {
        const float b = 0.0f; /* blk_bf16_1 without a bias adds 0.0f: kept, for -0.0 */
        y[n0 + i] = f32_to_bf16(_mm512_reduce_add_ps(acc[i]) + b);
    }
}

/* codes (N, K) int8, scales (N, K/32) fp16, x (M, K) bf16 -> y (M, N) bf16. Returns 0 or an
 * HEST_E* code without touching memory. K: a multiple of 32. */
int hest_head_q8(const int8_t *codes, const uint16_t *scales, const uint16_t *x, uint16_t *y,
                 int M, int N, int K, int threads) {
    if (!codes || !scales || !x || !y) return HEST_ENULL;
    if (M < 1 || M > HEST_MAX_ROWS) return HEST_EROWS;
    if (N < 1 || K < 32 || K % 32 || K > (1 << 24)) return HEST_ESHAPE;
    if (threads < 1) return HEST_ETHREADS;
    const int blocks = (N + NB - 1) / NB;
#pragma omp parallel num_threads(threads)
    for (int m = 0; m < M; m++) {
#pragma omp for schedule(static)
        for (int b = 0; b < blocks; b++) {
            const int n0 = b * NB, nr = N - n0 < NB ? N - n0 : NB;
            blk_q8_1(codes, scales, x + (size_t)m * K, y + (size_t)m * N, nr, K, n0);
        }
    }
    return HEST_OK;
}
