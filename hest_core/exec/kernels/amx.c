/* AMX tiles for the fused layer's bf16 and int8 products at many rows (hest.c, after gemv.c).
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
    for (int i = first; i < 16; i++) {
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
