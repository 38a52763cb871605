/* 4-bit weight kernels for decode (the `int4` path) on x86-64 CPUs with AVX-512 F/BW/VL.
 *
 *   hest_gemv_q4: y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n])    M = 1..16 activation rows
 *
 * W holds Q4_1 blocks (32 weights along k: fp16 scale d, fp16 minimum mn, 4-bit codes q,
 * w = d*q + mn), repacked by hest_core/q4.py; x, bias and y are bf16. A decode step reads each
 * weight once, so at few rows the work is bound by memory bandwidth and the format reads
 * 20 bytes per 32 weights (5 bits a weight, against 8 for int8 and 16 for bf16).
 *
 * Layout: tiles of 4 weight rows (N padded with zero rows), each 80 * K/32 bytes, one after the
 * other, so a thread's share of rows is one sequential stream. A row's K/32 blocks are cut into
 * superblocks of G blocks, 16 while 16 remain, then the binary digits of the rest (8, 4, 2, 1);
 * a tile stores superblock by superblock: the codes of its 4 rows chunk by chunk (32 bytes of
 * row 0, of row 1, 2, 3, then the next chunk), then per row G fp16 scales d and G fp16
 * minimums. The codes of a row's superblock are G vectors of 32 int16 words for `vpdpwssd`:
 * word j of vector v (lane L = j/2, e = j%2) holds weight 2(pG + v) + e of block L/(16/G),
 * p = L%(16/G). Every lane of every vector belongs to one block, so after the G instructions
 * lane L holds a partial dot product of a single block and the scales apply per lane: 16
 * blocks take 16 multiply-add instructions plus 3 for both scales, however many blocks a vector
 * spans. For G >= 2, a 32-byte chunk c carries vector 2c in its low and 2c+1 in its high
 * nibbles (one load, a zero-extension to 16 bits, a mask and a shift make two vectors); for
 * G = 1, byte i carries words i (low) and i+16 (high), llama.cpp's own order.
 *
 * Activations, once per call and row: sx = max|x| / 16383, xq = round(x / sx) as int16 (as
 * gemv.c's int8 path), gathered into the same word order, plus the sum of xq over every block.
 * Then per weight row, activation row and superblock (int32 lanes S from vpdpwssd):
 *     acc += float(S) * d[lane's block] + mn[g] * sum_xq[g]      (fp32, 16 lanes)
 *     y = bf16(sx * sum(acc) + bias)
 * Register tiles: 4 weight rows x 1-2 activation rows (the 4 rows share each activation load and
 * one 4-way horizontal sum), 2 x 3-4, 1 x 5-8; 9-16 rows take two passes over each tile (the
 * second from L1). The stream is prefetched Q4_PD bytes ahead (below).
 *
 * Numerics: S is exact (|S| <= 2G * 15 * 16383 < 2^23 per lane) and so is its conversion to
 * fp32; the weights enter exactly as Q4_1 defines them (d*q + mn, no rounding to bf16); the
 * scale products and the sums are fp32 (2^-24 relative each, summation order differs from a
 * reference); y is rounded to bf16 once. The one approximation is the activation: x is used as
 * sx * xq, a step of 1/16383 of the row's max |x| (bf16 itself rounds x to 2^-9 relative), so
 * the result is sum_k w_k x~_k + b with |x~_k - x_k| <= ~max|x| / 32766, in fp32, rounded to
 * bf16 once. Non-finite activations give non-finite or meaningless rows (as in gemv.c).
 *
 * Measured against this design (warm weights, one thread, 3072x576 and 576x1536): dequantising
 * to bf16 for vdpbf16ps (the exact fp16-path product) 3.8-4.4x slower at 1 row, 2.2-2.6x at 16;
 * int8 activations with u8 x s8 vpdpbusd 0.9x at 1 row and 0.7x at 4-16 rows, but a step of
 * 1/127 of max|x| (the per-token int8 that costs W8A8 its top-1 agreement); int16 activations
 * split into s8 high and u8 low bytes for vpdpbusd (one 64-byte load per 128 weights) 0.87-1.04x:
 * no gain. One weight row at a time instead of 4: 1.1-1.3x slower at 1-4 rows (warm; the same
 * cold). Rows stored one after the other (4 streams 360 bytes apart at K=576, 32-byte loads
 * split across lines) instead of tiles: 0.9-1.05x. With cold weights the kernel streams
 * 10-11 GB/s on one core where a plain read gets 13.5-14: the same without any vpdpwssd (so
 * not arithmetic), and a loop over one row in this layout reached 13.5, four rows at once 12:
 * the gap is in how the 4-row tile loop issues its loads (measured, not yet explained).
 */
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define Q4_MAX_ROWS 16 /* activation rows per call */
#define Q4_MR 8        /* activation rows per pass over a weight row */
#define Q4_QX 16383.0f
/* Software prefetch, Q4_PD bytes ahead of the stream, into L2 (Q4_HINT). Measured on the
 * 2-core Xeon (a 1 GiB stream through the same unpack + vpdpwssd loop, one thread): no prefetch
 * 8.5 GB/s; into L1 (T0) 11.2 at any distance >= 2 KB (the 16 L1 fill buffers cap the misses
 * in flight); into L2 (T1) 13.0 at 4 KB, 13.2 at 8 KB; a plain read 13.6. Other values:
 * bench_q4 --flag=-DQ4_PD=8192 --flag=-DQ4_HINT=_MM_HINT_T0. */
#ifndef Q4_PD
#define Q4_PD 4096
#endif
#ifndef Q4_HINT
#define Q4_HINT _MM_HINT_T1
#endif

/* Error codes (the same numbers as gemv.c's HEST_E*; q4.py turns them into messages). */
#define Q4_ENULL -1    /* a required pointer is NULL */
#define Q4_EROWS -2    /* M outside 1..Q4_MAX_ROWS */
#define Q4_ESHAPE -3   /* N < 1, K < 32, K not a multiple of 32 or too large */
#define Q4_ESCRATCH -6 /* scratch smaller than hest_q4_scratch_bytes(M, K) */
#define Q4_ETHREADS -7 /* threads < 1 */

static inline uint16_t q4_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float q4_bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Blocks in the superblock that starts with `left` blocks remaining. */
static inline int q4_group(int left) {
    if (left >= 16) return 16;
    int g = 8;
    while (g > left) g >>= 1;
    return g;
}

static inline int q4_superblocks(int nb) {
    int n = 0;
    for (int b0 = 0; b0 < nb; b0 += q4_group(nb - b0)) n++;
    return n;
}

/* Scratch per call: xq (M*K int16), block sums (M * superblocks * 16 fp32), sx (M fp32). */
size_t hest_q4_scratch_bytes(int M, int K) {
    if (M < 1 || K < 32) return 0;
    int nsb = q4_superblocks(K / 32);
    return (size_t)M * ((size_t)K * 2 + (size_t)nsb * 64) + (size_t)M * 4;
}

#if defined(__AVX512VNNI__)
#define Q4_DOT(acc, w, x) _mm512_dpwssd_epi32((acc), (w), (x))
#else
#define Q4_DOT(acc, w, x) _mm512_add_epi32((acc), _mm512_madd_epi16((w), (x)))
#endif

static const int32_t q4_iota[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

/* One activation row into the kernel's order: xq (K int16), xsum (16 floats per superblock:
 * lane g < G the sum of xq over block g, the rest 0), and its scale *sx. */
static void q4_prep_row(const uint16_t *x, int K, int16_t *xq, float *xsum, float *sx) {
    __m512 vmax = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 16) {
        __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + k)));
        vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16))));
    }
    float mx = _mm512_reduce_max_ps(vmax);
    float s = mx > 0.0f ? mx / Q4_QX : 1.0f;
    const __m512 inv = _mm512_set1_ps(1.0f / s);
    const __m512i iota = _mm512_loadu_si512(q4_iota), hi16 = _mm512_set1_epi32((int)0xffff0000u);
    const int nb = K / 32;
    int32_t *q32 = (int32_t *)xq; /* pairs of int16 words */
    for (int b0 = 0, sb = 0; b0 < nb; sb++) {
        /* lanes per block: w = 16/G = 2^sh; lane L of vector v reads the x pair
         * (b0 + L/w) * 16 + (L % w) * G + v */
        const int G = q4_group(nb - b0), sh = 4 - __builtin_ctz((unsigned)G), w = 1 << sh;
        __m512i blk = _mm512_add_epi32(_mm512_set1_epi32(b0), _mm512_srl_epi32(iota, _mm_cvtsi32_si128(sh)));
        __m512i base = _mm512_add_epi32(
            _mm512_slli_epi32(blk, 4),
            _mm512_mullo_epi32(_mm512_and_si512(iota, _mm512_set1_epi32(w - 1)), _mm512_set1_epi32(G)));
        __m512i tsum = _mm512_setzero_si512();
        for (int v = 0; v < G; v++) {
            __m512i pr = _mm512_i32gather_epi32(_mm512_add_epi32(base, _mm512_set1_epi32(v)), x, 4);
            __m512 lo = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(pr, 16)), inv);
            __m512 hi = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(pr, hi16)), inv);
            __m512i ql = _mm512_cvt_roundps_epi32(lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            __m512i qh = _mm512_cvt_roundps_epi32(hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            tsum = _mm512_add_epi32(tsum, _mm512_add_epi32(ql, qh));
            __m512i packed = _mm512_or_si512(_mm512_and_si512(ql, _mm512_set1_epi32(0xffff)),
                                             _mm512_slli_epi32(qh, 16));
            _mm512_storeu_si512(q32 + (size_t)b0 * 16 + (size_t)v * 16, packed);
        }
        float *xs = xsum + (size_t)sb * 16;
        if (G == 16) {
            _mm512_storeu_ps(xs, _mm512_cvtepi32_ps(tsum));
        } else { /* fold the 16/G lanes of each block */
            int32_t t[16];
            _mm512_storeu_si512(t, tsum);
            for (int g = 0; g < 16; g++) {
                int32_t acc = 0;
                for (int l = 0; g < G && l < w; l++) acc += t[g * w + l];
                xs[g] = (float)acc;
            }
        }
        b0 += G;
    }
    *sx = s;
}

#define Q4_INLINE static inline __attribute__((always_inline))

/* One superblock of G blocks (all three compile-time after inlining, as NR and MR) for NR
 * weight rows (w[r] + off) and MR activation rows (xb: their xq at this superblock, rows K
 * apart; xs: their block sums, rows sstride apart): acc[r][j] += the superblock's dot product,
 * lane by lane. 2 * NR * MR independent vpdpwssd chains: the low- and high-nibble vectors sum
 * apart (one chain per row was 1.1-1.4x slower with cold weights on one thread: the loads
 * behind it waited on vpdpwssd's latency). */
Q4_INLINE void q4_sb(const uint8_t *t, int r0, const int16_t *xb, const float *xs, size_t K,
                     size_t sstride, const int NR, const int MR, const int G, __m512 acc[4][Q4_MR]) {
    const __m512i lo4 = _mm512_set1_epi16(0x0f);
    /* the tile's superblock is 80*G contiguous bytes (L lines): prefetch them Q4_PD ahead,
     * spread over the chunks (a burst of prefetches stalls on the L1 fill buffers) */
    const int L = (80 * G + 63) / 64, nch = G > 1 ? G / 2 : 1;
#define Q4_PREFETCH(c)                                                                                if (Q4_PD > 0)                                                                                        for (int l = (c) * L / nch; l < ((c) + 1) * L / nch; l++)                                             _mm_prefetch((const char *)(t + Q4_PD + 64 * l), Q4_HINT);
    __m512i S[4][Q4_MR], S2[4][Q4_MR]; /* low- and high-nibble vectors: two int32 chains */
    _Pragma("GCC unroll 4") for (int r = 0; r < NR; r++)
        _Pragma("GCC unroll 8") for (int j = 0; j < MR; j++)
            S[r][j] = S2[r][j] = _mm512_setzero_si512();
    if (G > 1) {
        _Pragma("GCC unroll 8") for (int c = 0; c < G / 2; c++) {
            Q4_PREFETCH(c)
            /* activations in registers when several weight rows share them (NR > 1), else
             * as memory operands (at 5-8 activation rows they would not fit beside the sums) */
            __m512i xa[Q4_MR], xh[Q4_MR];
            if (NR > 1)
                _Pragma("GCC unroll 8") for (int j = 0; j < MR; j++) {
                    xa[j] = _mm512_loadu_si512(xb + j * K + 64 * c);
                    xh[j] = _mm512_loadu_si512(xb + j * K + 64 * c + 32);
                }
            _Pragma("GCC unroll 4") for (int r = 0; r < NR; r++) {
                const uint8_t *p = t + 128 * c + 32 * (r0 + r);
                __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p));
                __m512i a = _mm512_and_si512(v, lo4), b = _mm512_srli_epi16(v, 4);
                _Pragma("GCC unroll 8") for (int j = 0; j < MR; j++) {
                    const int16_t *xj = xb + j * K + 64 * c;
                    __m512i x0 = NR > 1 ? xa[j] : _mm512_loadu_si512(xj);
                    __m512i x1 = NR > 1 ? xh[j] : _mm512_loadu_si512(xj + 32);
                    S[r][j] = Q4_DOT(S[r][j], a, x0);
                    S2[r][j] = Q4_DOT(S2[r][j], b, x1);
                }
            }
        }
    } else { /* 16 bytes: words 0..15 from the low nibbles, 16..31 from the high */
        Q4_PREFETCH(0)
        _Pragma("GCC unroll 4") for (int r = 0; r < NR; r++) {
            __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(t + 16 * (r0 + r))));
            __m512i a = _mm512_inserti64x4(
                _mm512_castsi256_si512(_mm256_and_si256(v, _mm256_set1_epi16(0x0f))),
                _mm256_srli_epi16(v, 4), 1);
            _Pragma("GCC unroll 8") for (int j = 0; j < MR; j++)
                S[r][j] = Q4_DOT(S[r][j], a, _mm512_loadu_si512(xb + j * K));
        }
    }
#undef Q4_PREFETCH
    const __mmask16 gm = (__mmask16)((1u << G) - 1u);
    /* lane L takes the scale of block L / (16/G) */
    const __m512i bidx = _mm512_srli_epi32(_mm512_loadu_si512(q4_iota), 4 - __builtin_ctz(G));
    _Pragma("GCC unroll 4") for (int r = 0; r < NR; r++) {
        const uint16_t *dp = (const uint16_t *)(t + 64 * G + 4 * G * (r0 + r));
        __m512 dv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gm, dp));
        if (G < 16) dv = _mm512_permutexvar_ps(bidx, dv);
        __m512 mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gm, dp + G));
        _Pragma("GCC unroll 8") for (int j = 0; j < MR; j++) {
            __m512i sum = _mm512_add_epi32(S[r][j], S2[r][j]);
            acc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), dv, acc[r][j]);
            acc[r][j] = _mm512_fmadd_ps(mv, _mm512_loadu_ps(xs + j * sstride), acc[r][j]);
        }
    }
}

/* The sums of four vectors in lanes 0..3 (unpack/shuffle tree, ~13 operations for 4 sums). */
Q4_INLINE __m128 q4_hsum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    __m512 s0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
    __m512 s1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    __m512 t = _mm512_add_ps(_mm512_shuffle_ps(s0, s1, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(s0, s1, _MM_SHUFFLE(3, 2, 3, 2)));
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(t),  /* AVX512F only, no DQ */
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(t), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* Weight rows n0..n0+NR-1 (n0 % 4 + NR <= 4: inside one tile of 4 rows; rows past N are the
 * tile's zero padding, computed and not stored) against activation rows m0..m0+MR-1: the
 * superblocks in order (16-block ones, then the tail's 8, 4, 2, 1). */
Q4_INLINE void q4_rows(const uint8_t *W, int n0, int N, int K, const int16_t *xq,
                       const float *xsum, const float *sx, const uint16_t *bias, uint16_t *y,
                       int m0, const int NR, const int MR) {
    const int nb = K / 32, n16 = nb / 16, rest = nb % 16, r0 = n0 % 4;
    const size_t sstride = (size_t)16 * q4_superblocks(nb);
    const int16_t *xr = xq + (size_t)m0 * K;
    const float *xs = xsum + (size_t)m0 * sstride;
    const uint8_t *t = W + (size_t)(n0 / 4) * 80 * nb; /* this tile */
    __m512 acc[4][Q4_MR];
    _Pragma("GCC unroll 4") for (int r = 0; r < NR; r++)
        _Pragma("GCC unroll 8") for (int j = 0; j < MR; j++) acc[r][j] = _mm512_setzero_ps();
    int b0 = 0, sb = 0;
    for (int s = 0; s < n16; s++, sb++, b0 += 16, t += 80 * 16)
        q4_sb(t, r0, xr + b0 * 32, xs + sb * 16, K, sstride, NR, MR, 16, acc);
#define Q4_TAIL(G)                                                                                \
    if (rest & (G)) {                                                                             \
        q4_sb(t, r0, xr + b0 * 32, xs + sb * 16, K, sstride, NR, MR, (G), acc);                   \
        sb++, b0 += (G), t += 80 * (G);                                                           \
    }
    Q4_TAIL(8) Q4_TAIL(4) Q4_TAIL(2) Q4_TAIL(1)
#undef Q4_TAIL
    _Pragma("GCC unroll 8") for (int j = 0; j < MR; j++) {
        float res[4];
        if (NR == 4) {
            _mm_storeu_ps(res, q4_hsum4(acc[0][j], acc[1][j], acc[2][j], acc[3][j]));
        } else {
            _Pragma("GCC unroll 4") for (int r = 0; r < NR; r++) res[r] = _mm512_reduce_add_ps(acc[r][j]);
        }
        const float s = sx[m0 + j];
        for (int r = 0; r < NR && n0 + r < N; r++)
            y[(size_t)(m0 + j) * N + n0 + r] =
                q4_f32_to_bf16(res[r] * s + (bias ? q4_bf16_to_f32(bias[n0 + r]) : 0.0f));
    }
}

/* Register tiles (weight rows x activation rows): 4 weight rows share each activation load at
 * 1-2 activation rows, 2 at 3-4, 1 at 5-8 (so sums and accumulators stay in 32 registers). */
#define Q4_ROWS_FN(NR, MR)                                                                        \
    static void q4_rows_##NR##_##MR(const uint8_t *W, int n0, int N, int K, const int16_t *xq,   \
                                    const float *xsum, const float *sx, const uint16_t *bias,     \
                                    uint16_t *y, int m0) {                                        \
        q4_rows(W, n0, N, K, xq, xsum, sx, bias, y, m0, NR, MR);                                  \
    }
Q4_ROWS_FN(4, 1)
Q4_ROWS_FN(4, 2)
Q4_ROWS_FN(2, 3)
Q4_ROWS_FN(2, 4)
Q4_ROWS_FN(1, 5)
Q4_ROWS_FN(1, 6)
Q4_ROWS_FN(1, 7)
Q4_ROWS_FN(1, 8)

/* The products inside a parallel region: groups of 4 weight rows split over the threads
 * (orphaned `omp for`, barrier at its end), so a fused layer can call it between other steps. */
static void q4_gemv_for(const uint8_t *W, const int16_t *xq, const float *xsum, const float *sx,
                        const uint16_t *bias, uint16_t *y, int M, int N, int K) {
    const int passes = (M + Q4_MR - 1) / Q4_MR, groups = (N + 3) / 4;
#pragma omp for schedule(static)
    for (int gi = 0; gi < groups; gi++) {
        const int n0 = gi * 4;
        for (int p = 0, m0 = 0; p < passes; p++) { /* balanced passes: 13 rows = 7 + 6 */
            const int mr = M / passes + (p < M % passes);
#define Q4_CALL(NR, MR)                                                                           \
    for (int r = 0; r < 4; r += (NR))                                                             \
        if (n0 + r < N) q4_rows_##NR##_##MR(W, n0 + r, N, K, xq, xsum, sx, bias, y, m0);
            switch (mr) {
            case 1: q4_rows_4_1(W, n0, N, K, xq, xsum, sx, bias, y, m0); break;
            case 2: q4_rows_4_2(W, n0, N, K, xq, xsum, sx, bias, y, m0); break;
            case 3: Q4_CALL(2, 3) break;
            case 4: Q4_CALL(2, 4) break;
            case 5: Q4_CALL(1, 5) break;
            case 6: Q4_CALL(1, 6) break;
            case 7: Q4_CALL(1, 7) break;
            default: Q4_CALL(1, 8) break;
            }
#undef Q4_CALL
            m0 += mr;
        }
    }
}

/* y = x W^T (+ bias) inside a parallel region (every thread calls it; the fused decode layer
 * in layer.c does, between its other steps): the activation rows are prepared (split over the
 * threads), then the weight rows. scratch: hest_q4_scratch_bytes(M, K) bytes, shared. No checks:
 * the caller's. */
static void q4_gemv_region(const uint8_t *W, const uint16_t *x, const uint16_t *bias, uint16_t *y,
                           void *scratch, int M, int N, int K) {
    const int nsb = q4_superblocks(K / 32);
    int16_t *xq = (int16_t *)scratch;
    float *xsum = (float *)(xq + (size_t)M * K);
    float *sx = xsum + (size_t)M * nsb * 16;
#pragma omp for schedule(static)
    for (int m = 0; m < M; m++)
        q4_prep_row(x + (size_t)m * K, K, xq + (size_t)m * K, xsum + (size_t)m * nsb * 16, sx + m);
    q4_gemv_for(W, xq, xsum, sx, bias, y, M, N, K);
}

/* W: packed rows (q4.py), x: (M, K) bf16, bias: (N) bf16 or NULL, y: (M, N) bf16, scratch:
 * scratch_bytes >= hest_q4_scratch_bytes(M, K). Returns 0, or a Q4_E* code without reading or
 * writing anything. */
int hest_gemv_q4(const uint8_t *W, const uint16_t *x, const uint16_t *bias, uint16_t *y,
                 void *scratch, size_t scratch_bytes, int M, int N, int K, int threads) {
    if (!W || !x || !y || !scratch) return Q4_ENULL;
    if (M < 1 || M > Q4_MAX_ROWS) return Q4_EROWS;
    if (N < 1 || K < 32 || K % 32 != 0 || K > (1 << 24)) return Q4_ESHAPE;
    if (threads < 1) return Q4_ETHREADS;
    if (scratch_bytes < hest_q4_scratch_bytes(M, K)) return Q4_ESCRATCH;
#pragma omp parallel num_threads(threads)
    q4_gemv_region(W, x, bias, y, scratch, M, N, K);
    return 0;
}

/* A plain streaming read (the bandwidth floor bench_q4 divides by): bytes/64 64-byte loads split
 * over the threads, no software prefetch; returns an XOR of the data so nothing is elided. */
uint64_t hest_q4_stream_read(const void *buf, size_t bytes, int threads) {
    if (!buf || threads < 1) return 0;
    const __m512i *p = (const __m512i *)buf;
    size_t nv = bytes / 64;
    uint64_t out = 0;
#pragma omp parallel num_threads(threads) reduction(^ : out)
    {
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
#pragma omp for schedule(static)
        for (size_t i = 0; i < nv / 4; i++) {
            a0 = _mm512_xor_si512(a0, _mm512_loadu_si512(p + 4 * i));
            a1 = _mm512_xor_si512(a1, _mm512_loadu_si512(p + 4 * i + 1));
            a2 = _mm512_xor_si512(a2, _mm512_loadu_si512(p + 4 * i + 2));
            a3 = _mm512_xor_si512(a3, _mm512_loadu_si512(p + 4 * i + 3));
        }
        __m512i a = _mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3));
        uint64_t t[8];
        _mm512_storeu_si512(t, a);
        for (int i = 0; i < 8; i++) out ^= t[i];
    }
    return out;
}
