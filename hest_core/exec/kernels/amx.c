/* AMX tiles for the fused layer's bf16, int8 and Q4_1 products at many rows (hest.c, after
 * gemv.c and q4.c).
 *
 * At 8-16 activation rows a product is no longer bound by memory alone: gemv.c's vdpbf16ps tiles
 * do 16 multiply-adds per 32 weights and row, and at 16 rows were 2x slower than oneDNN (which
 * uses AMX here) on the same weights. An AMX tile multiply (TDPBF16PS) does 16 x 16 x 32 of them
 * in one instruction, so these products are bound by the weight stream again at any row count.
 *
 * The product is computed transposed, C (16 weight rows x 16 activation rows, fp32) += A B:
 *   A: 16 weight rows x 32 inputs, bf16, loaded straight from W (row stride 2K bytes); for int8
 *      weights, the 16 x 32 int8 values widened to bf16 first (exact: |q| <= 127 fits 8 bits),
 *      the per-row scale applied to C;
 *   B: the activations transposed into pairs (16 input pairs x 16 rows x 2 bf16), made once per
 *      product (`amx_pack_x`), rows past M zero.
 * Products (bf16 x bf16) are exact in fp32, sums fp32: the same numerics as vdpbf16ps in another
 * order. The int8 path's activations enter as bf16 here (gemv.c quantises them to int16 there;
 * both are finer than the weights' own step). y is rounded to bf16 once (+ bias).
 *
 * Used where the CPU has AMX-BF16 and the kernel allowed the process to use tiles
 * (`hest_amx_init`: arch_prctl(ARCH_REQ_XCOMP_PERM)), for K a multiple of 32 and N >= 16;
 * everything else stays on gemv.c's loops. The tile configuration is loaded at every product
 * (another library, oneDNN, may have loaded its own on the same thread in between). */

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define HEST_HAVE_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define AMX_PD 2 /* weight blocks of 16 rows prefetched ahead */

static int amx_on = 0;   /* tiles usable and wanted */
static int amx_able = 0; /* tiles usable (hest_amx_init succeeded) */

/* Asks the kernel for the AMX tile state (once per process); returns 1 where AMX is usable.
 * `hest_amx_enable(0)` turns it off again (benchmarks, tests). */
int hest_amx_init(void) {
#ifdef HEST_HAVE_AMX
    unsigned a, b, c, d;
    if (!amx_able && __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((d >> 22) & 1) && ((d >> 24) & 1))
        amx_able = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    amx_on = amx_able;
#endif
    return amx_on;
}

int hest_amx_enable(int on) {
    amx_on = on && amx_able;
    return amx_on;
}

/* Whether a product of M rows, N outputs, K inputs goes to the tiles. */
static inline int amx_fits(int M, int N, int K, int min_rows) {
    return amx_on && M >= min_rows && N >= 16 && K % 32 == 0;
}

#ifdef HEST_HAVE_AMX
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) amx_cfg_t;

static void amx_config(void) {
    amx_cfg_t c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 3; t++) c.rows[t] = 16, c.colsb[t] = 64; /* 0: C, 1: A, 2: B */
    _tile_loadconfig(&c);
}

/* B of every 32-input step: xb[kb][r][m] = the pair x[m][32 kb + 2r .. +1] (rows m >= M zero).
 * Steps split over the threads (orphaned omp for). xb: K/32 * 256 uint32. */
static void amx_pack_x(const uint16_t *x, uint32_t *xb, int M, int K) {
#pragma omp for schedule(static)
    for (int kb = 0; kb < K / 32; kb++) {
        uint32_t *o = xb + (size_t)kb * 256;
        for (int r = 0; r < 16; r++)
            for (int m = 0; m < 16; m++) {
                uint32_t v = 0;
                if (m < M) memcpy(&v, x + (size_t)m * K + (size_t)kb * 32 + 2 * r, 4);
                o[r * 16 + m] = v;
            }
    }
}

/* Stores C's rows from `first` (the last block of N overlaps the one before it) for M rows. */
static void amx_store(const float c[16][16], const float *scale, const uint16_t *bias,
                      uint16_t *y, int M, int N, int nb, int first) {
    for (int i = first; i < 16 && nb + i < N; i++) { /* rows past N: Q4_1's zero padding */
        float s = scale ? scale[nb + i] : 1.0f, b = bias ? bf16_to_f32(bias[nb + i]) : 0.0f;
        for (int m = 0; m < M; m++) y[(size_t)m * N + nb + i] = f32_to_bf16(c[i][m] * s + b);
    }
}

/* 16 int8 weight rows x 32 inputs -> bf16, into the tile buffer a (16 x 32). */
static inline void amx_widen_i8(const int8_t *w, int K, uint16_t *a) {
    for (int i = 0; i < 16; i++) {
        __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + (size_t)i * K)));
        __m512i u = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + (size_t)i * K + 16)));
        __m512bh p = _mm512_cvtne2ps_pbh(_mm512_cvtepi32_ps(u), _mm512_cvtepi32_ps(v));
        _mm512_store_si512((__m512i *)(a + i * 32), (__m512i)p);
    }
}

/* y (M, N) = x W^T (+ bias) on the tiles, W bf16 (W16) or int8 (W8, per-row scales s8); xb made
 * by amx_pack_x. Blocks of 16 weight rows split over the threads. */
static void amx_gemm_for(const uint16_t *W16, const int8_t *W8, const float *s8,
                         const uint32_t *xb, const uint16_t *bias, uint16_t *y, int M, int N,
                         int K) {
    amx_config();
    const int blocks = (N + 15) / 16, nk = K / 32;
    uint16_t abuf[16 * 32] __attribute__((aligned(64)));
#pragma omp for schedule(static)
    for (int bi = 0; bi < blocks; bi++) {
        const int nb = bi * 16 + 16 <= N ? bi * 16 : N - 16;
        const int ahead = bi + AMX_PD < blocks; /* prefetch the block AMX_PD ahead */
        _tile_zero(0);
        for (int kb = 0; kb < nk; kb++) {
            if (W8) {
                const int8_t *w = W8 + (size_t)nb * K + (size_t)kb * 32;
                if (ahead && (kb & 1) == 0)
                    for (int i = 0; i < 16; i++)
                        _mm_prefetch((const char *)(w + (size_t)(16 * AMX_PD + i) * K), _MM_HINT_T0);
                amx_widen_i8(w, K, abuf);
                _tile_loadd(1, abuf, 64);
            } else {
                const uint16_t *w = W16 + (size_t)nb * K + (size_t)kb * 32;
                if (ahead)
                    for (int i = 0; i < 16; i++)
                        _mm_prefetch((const char *)(w + (size_t)(16 * AMX_PD + i) * K), _MM_HINT_T0);
                _tile_loadd(1, w, (long)K * 2);
            }
            _tile_loadd(2, xb + (size_t)kb * 256, 64);
            _tile_dpbf16ps(0, 1, 2);
        }
        float c[16][16] __attribute__((aligned(64)));
        _tile_stored(0, c, 64);
        amx_store((const float(*)[16])c, W8 ? s8 : NULL, bias, y, M, N, nb, bi * 16 - nb);
    }
}

/* ---- Q4_1 weights (q4.c's layout) on the tiles ------------------------------------------------
 *
 * At 9-16 activation rows q4.c's vpdpwssd loop is bound by its multiply-adds (one per weight
 * pair and activation row: 16 rows cost 4-5x one row). Here each weight is dequantised once per
 * call, w = bf16(d q + mn) (fp32 multiply-add, one rounding to bf16: 2^-9 relative, far inside
 * Q4_1's own step of (max - min) / 15), and the products run as TDPBF16PS for all rows at once.
 *
 * Measured (session 18, the 2-core Xeon, weights cold, one layer's four products, `python -m
 * hest_core.bench.q4 --rows 1,4,8,9,16`): 313 us at 1 row against q4.c's 115, 329 at 9 against
 * 350, 350 at 16 against 522 (0.67x); the time hardly moves with the rows. Where it goes (the
 * same products warm, builds without parts of the loop): dequantising ~40%, the tile steps
 * ~15%, the stores feeding each tile load ~15%, the rest packing B, the lane scales and the
 * call. Two A buffers per chunk in turn (so the next chunk's stores need not wait for this
 * chunk's tile loads) measured the same as one; kept, as it costs nothing.
 *
 * q4.c's layout is read as it is. Within a superblock of G blocks at blocks b0.., a row's vector
 * v (0..G-1) holds 16 lanes L of two weights each, at the input pair P(L, v) = (b0 + L/w) 16 +
 * (L % w) G + v (w = 16/G), and lane L's block is b0 + L/w (q4.c header). Every vector of every
 * superblock is one tile step: A (16 weight rows x 32 bf16) is the vector dequantised with its
 * lanes' scales, in the order cvtne2ps gives, word j < 16: lane j's even weight, j >= 16: lane
 * j - 16's odd weight; B row p (pairs of words 2p, 2p + 1) holds for each activation row the two
 * inputs those words multiply (`amx_q4_pack_x`). The global vector index g = b0 + v runs over
 * 0..K/32 - 1, so B takes the same K/32 KB of scratch as amx_pack_x. A 16-row block of W is four
 * q4.c tiles, one contiguous stretch of 320 K/32 bytes. */

/* The input index of word j of vector v in the superblock (b0, G). */
static inline int amx_q4_input(int b0, int G, int v, int j) {
    const int L = j & 15, e = j >> 4, w = 16 / G;
    return 2 * ((b0 + L / w) * 16 + (L % w) * G + v) + e;
}

/* B of every vector: xb[g][p][m] = (x[m][word 2p's input], x[m][word 2p + 1's input]) (rows m
 * >= M zero). Vectors split over the threads (orphaned omp for). xb: K/32 * 256 uint32. */
static void amx_q4_pack_x(const uint16_t *x, uint32_t *xb, int M, int K) {
    const int nb = K / 32;
#pragma omp for schedule(static)
    for (int g = 0; g < nb; g++) {
        int b0 = 0, G = q4_group(nb);
        while (g >= b0 + G) b0 += G, G = q4_group(nb - b0);
        const int v = g - b0;
        uint32_t *o = xb + (size_t)g * 256;
        for (int p = 0; p < 16; p++) {
            const int i0 = amx_q4_input(b0, G, v, 2 * p), i1 = amx_q4_input(b0, G, v, 2 * p + 1);
            for (int m = 0; m < 16; m++)
                o[p * 16 + m] = m < M ? (uint32_t)x[(size_t)m * K + i0] |
                                            ((uint32_t)x[(size_t)m * K + i1] << 16)
                                      : 0u;
        }
    }
}

/* 32 code words (0..15, lane L = words 2L, 2L + 1) -> bf16 d q + mn in cvtne2ps order, stored. */
static inline void amx_q4_dequant(__m512i q, __m512 d, __m512 mn, uint16_t *a) {
    const __m512 e = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(0xffff))), d, mn);
    const __m512 o = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 16)), d, mn);
    _mm512_store_si512((__m512i *)a, (__m512i)_mm512_cvtne2ps_pbh(o, e));
}

/* y (M, N) = x W^T (+ bias), W Q4_1 in q4.c's layout (N a multiple of 4, >= 16); xb made by
 * amx_q4_pack_x. Blocks of 16 weight rows split over the threads. */
static void amx_q4_gemm_for(const uint8_t *W, const uint32_t *xb, const uint16_t *bias,
                            uint16_t *y, int M, int N, int K) {
    amx_config();
    const int nb = K / 32, blocks = (N + 15) / 16, n4 = (N + 3) / 4 * 4;
    const size_t tile = (size_t)80 * nb; /* bytes of one q4.c tile (4 weight rows) */
    const __m512i iota = _mm512_loadu_si512(q4_iota);
    uint16_t abuf[4][16 * 32] __attribute__((aligned(64))); /* two chunks' A tiles in turn */
    int ab = 0;
    float dl[16][16] __attribute__((aligned(64))), ml[16][16] __attribute__((aligned(64)));
#pragma omp for schedule(static)
    for (int bi = 0; bi < blocks; bi++) {
        const int nb0 = bi * 16 + 16 <= n4 ? bi * 16 : n4 - 16; /* the last block may overlap */
        const uint8_t *blk = W + (size_t)(nb0 / 4) * tile;
        const uint8_t *ahead = bi + AMX_PD < blocks ? blk + (size_t)AMX_PD * 4 * tile : NULL;
        size_t pf = 0; /* bytes of the block AMX_PD ahead prefetched so far */
        _tile_zero(0);
        for (int b0 = 0; b0 < nb;) {
            const int G = q4_group(nb - b0), sh = 4 - __builtin_ctz((unsigned)G);
            const size_t off = (size_t)80 * b0; /* this superblock inside each tile */
            const __mmask16 gm = (__mmask16)((1u << G) - 1u);
            const __m512i bidx = _mm512_srli_epi32(iota, (unsigned)sh);
            for (int i = 0; i < 16; i++) { /* lane scales of each weight row */
                const uint16_t *dp = (const uint16_t *)(blk + (i / 4) * tile + off + 64 * G + 4 * G * (i % 4));
                __m512 dv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gm, dp));
                __m512 mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gm, dp + G));
                if (G < 16) dv = _mm512_permutexvar_ps(bidx, dv), mv = _mm512_permutexvar_ps(bidx, mv);
                _mm512_store_ps(dl[i], dv);
                _mm512_store_ps(ml[i], mv);
            }
            if (ahead) { /* this superblock's share of the block ahead */
                const size_t want = (size_t)320 * (b0 + G);
                for (; pf < want; pf += 64) _mm_prefetch((const char *)(ahead + pf), _MM_HINT_T0);
            }
            if (G > 1) {
                for (int c = 0; c < G / 2; c++) { /* vectors 2c (low nibbles) and 2c + 1 (high) */
                    for (int i = 0; i < 16; i++) {
                        const uint8_t *p = blk + (i / 4) * tile + off + 128 * c + 32 * (i % 4);
                        __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p));
                        const __m512 d = _mm512_load_ps(dl[i]), mn = _mm512_load_ps(ml[i]);
                        amx_q4_dequant(_mm512_and_si512(v, _mm512_set1_epi16(0x0f)), d, mn, abuf[ab] + 32 * i);
                        amx_q4_dequant(_mm512_srli_epi16(v, 4), d, mn, abuf[ab + 1] + 32 * i);
                    }
                    _tile_loadd(1, abuf[ab], 64);
                    _tile_loadd(2, xb + (size_t)(b0 + 2 * c) * 256, 64);
                    _tile_dpbf16ps(0, 1, 2);
                    _tile_loadd(1, abuf[ab + 1], 64);
                    _tile_loadd(2, xb + (size_t)(b0 + 2 * c + 1) * 256, 64);
                    _tile_dpbf16ps(0, 1, 2);
                    ab ^= 2;
                }
            } else { /* 16 bytes: words 0..15 the low nibbles, 16..31 the high */
                for (int i = 0; i < 16; i++) {
                    const uint8_t *p = blk + (i / 4) * tile + off + 16 * (i % 4);
                    __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
                    __m512i q = _mm512_inserti64x4(
                        _mm512_castsi256_si512(_mm256_and_si256(v, _mm256_set1_epi16(0x0f))),
                        _mm256_srli_epi16(v, 4), 1);
                    amx_q4_dequant(q, _mm512_load_ps(dl[i]), _mm512_load_ps(ml[i]), abuf[0] + 32 * i);
                }
                _tile_loadd(1, abuf[0], 64);
                _tile_loadd(2, xb + (size_t)b0 * 256, 64);
                _tile_dpbf16ps(0, 1, 2);
            }
            b0 += G;
        }
        float c[16][16] __attribute__((aligned(64)));
        _tile_stored(0, c, 64);
        amx_store((const float(*)[16])c, NULL, bias, y, M, N, nb0, bi * 16 - nb0);
    }
}
#endif

/* y = x W^T (+ bias) on the tiles where amx_fits(M, N, K, ...) said so (callers check it);
 * inside a parallel region; xb: scratch of K/32 * 1 KB. */
static void amx_product(const uint16_t *W16, const int8_t *W8, const float *s8, const uint16_t *x,
                        uint32_t *xb, const uint16_t *bias, uint16_t *y, int M, int N, int K) {
#ifdef HEST_HAVE_AMX
    amx_pack_x(x, xb, M, K);
    amx_gemm_for(W16, W8, s8, xb, bias, y, M, N, K);
#endif
}

/* y = x W^T (+ bias) for Q4_1 weights on the tiles (callers check amx_fits); inside a parallel
 * region; xb: scratch of K/32 * 1 KB. */
static void amx_q4_product(const uint8_t *W, const uint16_t *x, uint32_t *xb, const uint16_t *bias,
                           uint16_t *y, int M, int N, int K) {
#ifdef HEST_HAVE_AMX
    amx_q4_pack_x(x, xb, M, K);
    amx_q4_gemm_for(W, xb, bias, y, M, N, K);
#endif
}

/* The tile product alone (tests, benchmarks): W16 bf16 (N, K) or W8 int8 (N, K) with fp32 scales
 * s8 (exactly one of the two); x (M, K), bias (N) or NULL, y (M, N) bf16; scratch >= K * 32
 * bytes, 64-byte aligned. Returns 0, HEST_ESHAPE where the tiles do not take it (AMX off, N < 16,
 * K % 32) or another HEST_E* code, without touching memory. */
int hest_gemv_amx(const uint16_t *W16, const int8_t *W8, const float *s8, const uint16_t *x,
                  const uint16_t *bias, uint16_t *y, void *scratch, size_t scratch_bytes, int M,
                  int N, int K, int threads) {
    if ((!W16 == !W8) || (W8 && !s8) || !x || !y || !scratch) return HEST_ENULL;
    if (M < 1 || M > HEST_MAX_ROWS) return HEST_EROWS;
    if (threads < 1) return HEST_ETHREADS;
    if (N < 1 || K < 1 || !amx_fits(M, N, K, 1)) return HEST_ESHAPE;
    if ((uintptr_t)scratch % 64 || scratch_bytes < (size_t)K * 32) return HEST_ESCRATCH;
#pragma omp parallel num_threads(threads)
    amx_product(W16, W8, s8, x, (uint32_t *)scratch, bias, y, M, N, K);
    return HEST_OK;
}

/* The Q4_1 tile product alone (tests, benchmarks): W packed by q4.py (N rows, N >= 16), x (M, K),
 * bias (N) or NULL, y (M, N) bf16; scratch >= K * 32 bytes, 64-byte aligned. Returns 0,
 * HEST_ESHAPE where the tiles do not take it (AMX off, N < 16, K % 32) or another HEST_E* code,
 * without touching memory. */
int hest_gemv_q4_amx(const uint8_t *W, const uint16_t *x, const uint16_t *bias, uint16_t *y,
                     void *scratch, size_t scratch_bytes, int M, int N, int K, int threads) {
    if (!W || !x || !y || !scratch) return HEST_ENULL;
    if (M < 1 || M > HEST_MAX_ROWS) return HEST_EROWS;
    if (threads < 1) return HEST_ETHREADS;
    if (N < 1 || K < 32 || K > (1 << 24) || !amx_fits(M, N, K, 1)) return HEST_ESHAPE;
    if ((uintptr_t)scratch % 64 || scratch_bytes < (size_t)K * 32) return HEST_ESCRATCH;
#pragma omp parallel num_threads(threads)
    amx_q4_product(W, x, (uint32_t *)scratch, bias, y, M, N, K);
    return HEST_OK;
}
