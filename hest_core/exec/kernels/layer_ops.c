/* The elementwise and attention steps of the fused decode layer (layer.c): norms, rope, the
 * softmax's exp, decode attention, SiLU, the controller's logits. Part of the unity build hest.c
 * (after gemv.c). */

#define CMAX 8 /* most position chunks per (row, KV head) in decode attention */

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
 * exponentials, unnormalised output[hd]) to part[G][hd + 2]; sc: G * (t1 - t0 + 16) floats.
 * Inlined with G and hd as constants for common shapes (attend_chunk below): the same
 * operations in the same order, so the same results bit for bit, with the query vectors and
 * the G x hd/16 output accumulators in registers instead of on the stack (at a runtime G and
 * hd they were not). Measured (session 10, the default model at 800 positions, 2 threads, the
 * profiling build, 30 steps interleaved): attention 1.01 -> 0.82 ms a step (its KV reads, 18.3
 * MB, are ~0.6 ms at a plain read's speed). Tried and dropped: prefetching this thread's share of
 * the o and gate|up Q4_1 tiles into L2 during attention (16 or 48 lines per 16 positions per
 * pass): attention slower by more than the products gained (0.96 vs 0.82 ms, products -0.05). */
static inline __attribute__((always_inline)) void
attend_chunk_impl(const uint16_t *q, const uint16_t *K, const uint16_t *V, int t0, int t1,
                  const int G, const int hd, float scale, float *sc, float *part) {
    int n = t1 - t0, nv = (hd + 31) / 32, stride = n + 16;
    if (n <= 0) {
        for (int j = 0; j < G; j++) {
            part[(size_t)j * (hd + 2)] = -INFINITY;
            part[(size_t)j * (hd + 2) + 1] = 0.0f;
        }
        return;
    }
    __m512i qv[16][8]; /* G <= 16 query heads per KV head, hd <= 256 */
    _Pragma("GCC unroll 16") for (int j = 0; j < G; j++)
        _Pragma("GCC unroll 8") for (int v = 0; v < nv; v++) {
            int left = hd - v * 32;
            __mmask32 km = tail32(left);
            qv[j][v] = _mm512_maskz_loadu_epi16(km, q + (size_t)j * hd + v * 32);
        }
    const __m512 vscale = _mm512_set1_ps(scale);
    int t = 0;
    for (; t + 16 <= n; t += 16) { /* 16 positions at a time: one transposing reduction */
        _Pragma("GCC unroll 16") for (int j = 0; j < G; j++) {
            __m512 acc[16];
            _Pragma("GCC unroll 16") for (int u = 0; u < 16; u++) {
                const uint16_t *kr = K + (size_t)(t0 + t + u) * hd;
                __m512 a = _mm512_setzero_ps();
                _Pragma("GCC unroll 8") for (int v = 0; v < nv; v++) {
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
    const int nf = (hd + 15) / 16;
    __m512 o[16][16];
    _Pragma("GCC unroll 16") for (int j = 0; j < G; j++)
        _Pragma("GCC unroll 16") for (int f = 0; f < nf; f++) o[j][f] = _mm512_setzero_ps();
    for (int t = 0; t < n; t++) {
        const uint16_t *vr = V + (size_t)(t0 + t) * hd;
        __m512 vf[16];
        _Pragma("GCC unroll 16") for (int f = 0; f < nf; f++) {
            int left = hd - f * 16;
            __mmask16 km = tail16(left);
            vf[f] = widen_bf16(_mm256_maskz_loadu_epi16(km, vr + f * 16));
        }
        _Pragma("GCC unroll 16") for (int j = 0; j < G; j++) {
            __m512 w = _mm512_set1_ps(sc[(size_t)j * stride + t]);
            _Pragma("GCC unroll 16") for (int f = 0; f < nf; f++)
                o[j][f] = _mm512_fmadd_ps(w, vf[f], o[j][f]);
        }
    }
    for (int j = 0; j < G; j++)
        for (int f = 0; f < nf; f++) {
            int left = hd - f * 16;
            __mmask16 km = tail16(left);
            _mm512_mask_storeu_ps(ob + (size_t)j * (hd + 2) + 2 + f * 16, km, o[j][f]);
        }
}

/* attend_chunk_impl with compile-time G and hd for the shapes of common small models (the
 * default model's 9 query heads over 3 KV heads of 64 is G = 3, hd = 64; the tests' tiny models
 * G = 2, hd = 16); any other shape runs the same code with runtime G and hd.
 * -DHEST_ATT_GENERIC builds only the latter (tests compare the two bit for bit). */
static void attend_chunk(const uint16_t *q, const uint16_t *K, const uint16_t *V, int t0, int t1,
                         int G, int hd, float scale, float *sc, float *part) {
#ifndef HEST_ATT_GENERIC
#define ATT_AT(g, d)                                                                              \
    if (G == (g) && hd == (d)) {                                                                  \
        attend_chunk_impl(q, K, V, t0, t1, (g), (d), scale, sc, part);                        \
        return;                                                                                   \
    }
    ATT_AT(3, 64) ATT_AT(1, 64) ATT_AT(4, 64) ATT_AT(2, 64) ATT_AT(2, 16)
#undef ATT_AT
#endif
    attend_chunk_impl(q, K, V, t0, t1, G, hd, scale, sc, part);
}

/* ---- the steps of hest_decode_layer (layer.c), each called by every thread of its region ---- */

/* q/k norms (Qwen3), rope and the cache write of each row (rows split over the threads). qkv:
 * (M, nqkv) rows of q heads, k heads, v heads; kc/vc: (cache rows, KVH, max_len, hd). */
static void rope_cache_rows(uint16_t *qkv, const int64_t *pos, const uint16_t *cos,
                            const uint16_t *sin, const uint16_t *q_norm, const uint16_t *k_norm,
                            uint16_t *kc, uint16_t *vc, int M, int H, int KVH, int hd, int max_len,
                            float eps) {
    const int qd = H * hd, kvd = KVH * hd, nqkv = qd + 2 * kvd;
#pragma omp for schedule(static)
    for (int m = 0; m < M; m++) {
        uint16_t *row = qkv + (size_t)m * nqkv;
        const uint16_t *c = cos + (size_t)pos[m] * hd, *s = sin + (size_t)pos[m] * hd;
        for (int j = 0; j < H + KVH; j++) {
            uint16_t *v = row + (size_t)j * hd;
            if (q_norm) rms_norm_row(v, j < H ? q_norm : k_norm, v, hd, eps);
            rope_head(v, c, s, hd);
        }
        for (int g = 0; g < KVH; g++) {
            size_t at = (((size_t)m * KVH + g) * max_len + pos[m]) * hd;
            memcpy(kc + at, row + qd + (size_t)g * hd, (size_t)hd * 2);
            memcpy(vc + at, row + qd + kvd + (size_t)g * hd, (size_t)hd * 2);
        }
    }
}

/* Position chunks per (row, KV head) for attend_rows: enough items for every thread, chunks of
 * at least 32 positions, at most CMAX. */
static int attention_chunks(const int64_t *pos, int M, int KVH, int max_len, int threads) {
    int C = (2 * threads + M * KVH - 1) / (M * KVH), shortest = max_len;
    for (int m = 0; m < M; m++) shortest = (int)pos[m] + 1 < shortest ? (int)pos[m] + 1 : shortest;
    while (C > 1 && shortest / C < 32) C--;
    return C < 1 ? 1 : (C > CMAX ? CMAX : C);
}

/* Decode attention, split like flash-decoding: (row, KV head, chunk of positions) items, each
 * for the G query heads that share the KV head; then the chunks are merged per head into att
 * (M, H * hd) bf16. scores: threads * H * (max_len + 16) floats; part: M*H*C*(hd+2) floats. */
static void attend_rows(const uint16_t *qkv, const uint16_t *kc, const uint16_t *vc,
                        const int64_t *pos, uint16_t *att, float *scores, float *part, int M,
                        int H, int KVH, int hd, int max_len, int C) {
    const int G = H / KVH, qd = H * hd, nqkv = qd + 2 * KVH * hd;
    const float scale = 1.0f / sqrtf((float)hd);
#pragma omp for schedule(static)
    for (int it = 0; it < M * KVH * C; it++) {
        int m = it / (KVH * C), g = (it / C) % KVH, c = it % C;
        int span = (int)pos[m] + 1;
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
}

/* fp32 -> bf16, round to nearest even, 16 lanes (as f32_to_bf16, without its NaN case). */
static inline __m256i round_bf16x16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
}

/* act[m] = bf16(bf16(silu(g)) * u) for the listed rows m, where gu row m is [g (I) | u (I)]:
 * as PyTorch's bf16 F.silu(g) * u (fp32 inside, two roundings). The exp is exp_neg's polynomial
 * (relative error < 2e-7; it is exact enough for x > 0 too, and overflows to inf as expf).
 * Items of (row, 256 columns) split over the threads. */
static void silu_mul_rows(const uint16_t *gu, uint16_t *act, int I, const int *rows, int nr) {
    const int chunks = (I + 255) / 256;
    const __m512 one = _mm512_set1_ps(1.0f);
#pragma omp for schedule(static)
    for (int it = 0; it < nr * chunks; it++) {
        const int m = rows[it / chunks], c0 = (it % chunks) * 256;
        const int c1 = c0 + 256 < I ? c0 + 256 : I;
        const uint16_t *g = gu + (size_t)m * 2 * I, *u = g + I;
        uint16_t *a = act + (size_t)m * I;
        for (int i = c0; i < c1; i += 16) {
            __mmask16 km = tail16(c1 - i);
            __m512 gf = widen_bf16(_mm256_maskz_loadu_epi16(km, g + i));
            __m512 uf = widen_bf16(_mm256_maskz_loadu_epi16(km, u + i));
            __m512 e = exp_neg(_mm512_sub_ps(_mm512_setzero_ps(), gf));
            __m512 s = widen_bf16(round_bf16x16(_mm512_div_ps(gf, _mm512_add_ps(one, e))));
            _mm256_mask_storeu_epi16(a + i, km, round_bf16x16(_mm512_mul_ps(s, uf)));
        }
    }
}

/* x[m] += y[m] (bf16 add) where add is nonzero for the row (NULL: every row), then
 * out[m] = rms_norm(x[m]) * w: the residual of a block and the next norm, rows over threads. */
static void residual_norm_rows(uint16_t *x, const uint16_t *y, const uint8_t *add,
                               const uint16_t *w, uint16_t *out, int M, int d, float eps) {
#pragma omp for schedule(static)
    for (int m = 0; m < M; m++) {
        uint16_t *xr = x + (size_t)m * d;
        const uint16_t *yr = y + (size_t)m * d;
        if (!add || add[m])
            for (int i = 0; i < d; i++) xr[i] = add_bf16(xr[i], yr[i]);
        rms_norm_row(xr, w, out + (size_t)m * d, d, eps);
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Rotary embedding of M rows in place (prefill rows; ops.apply_rope's arithmetic, bf16): the
 * first `heads` heads of hd values of row m (rows `ld` elements apart) become
 * bf16(bf16(v * c) + bf16(rot(v) * s)), rot(v) = [-v[hd/2:], v[:hd/2]], c and s the rows pos[m] of
 * the (rope_len, hd) bf16 tables: the products and the sum in fp32, each rounded to bf16 (nearest
 * even) as PyTorch's bf16 operators round them, so the result equals apply_rope's bit for bit.
 * One pass over the rows instead of PyTorch's five (two products, the negation, the concatenation,
 * the sum) and the gathers of the tables; rows split across `threads`. */
int hest_rope_rows(uint16_t *x, const int64_t *pos, const uint16_t *cos, const uint16_t *sin,
                   int M, int ld, int heads, int hd, int rope_len, int threads) {
    if (!x || !pos || !cos || !sin) return HEST_ENULL;
    if (M < 1 || heads < 1 || hd < 2 || hd % 2 || ld < heads * hd || rope_len < 1)
        return HEST_ESHAPE;
    if (threads < 1) return HEST_ETHREADS;
    for (int m = 0; m < M; m++)
        if (pos[m] < 0 || pos[m] >= rope_len) return HEST_EPOS;
    const int h2 = hd / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int m = 0; m < M; m++) {
        const uint16_t *c = cos + (size_t)pos[m] * hd, *s = sin + (size_t)pos[m] * hd;
        uint16_t *row = x + (size_t)m * ld;
        for (int j = 0; j < heads; j++) {
            uint16_t *v = row + (size_t)j * hd;
            for (int i = 0; i < h2; i += 16) {
                __mmask16 km = tail16(h2 - i);
                __m512 a = widen_bf16(_mm256_maskz_loadu_epi16(km, v + i));
                __m512 b = widen_bf16(_mm256_maskz_loadu_epi16(km, v + h2 + i));
                __m512 c1 = widen_bf16(_mm256_maskz_loadu_epi16(km, c + i));
                __m512 c2 = widen_bf16(_mm256_maskz_loadu_epi16(km, c + h2 + i));
                __m512 s1 = widen_bf16(_mm256_maskz_loadu_epi16(km, s + i));
                __m512 s2 = widen_bf16(_mm256_maskz_loadu_epi16(km, s + h2 + i));
                __m512 nb = _mm512_castsi512_ps( /* the sign bit flipped, as torch's neg */
                    _mm512_xor_si512(_mm512_castps_si512(b), _mm512_set1_epi32((int)0x80000000u)));
                __m512 lo = _mm512_add_ps(widen_bf16(round_bf16x16(_mm512_mul_ps(a, c1))),
                                          widen_bf16(round_bf16x16(_mm512_mul_ps(nb, s1))));
                __m512 hi = _mm512_add_ps(widen_bf16(round_bf16x16(_mm512_mul_ps(b, c2))),
                                          widen_bf16(round_bf16x16(_mm512_mul_ps(a, s2))));
                _mm256_mask_storeu_epi16(v + i, km, round_bf16x16(lo));
                _mm256_mask_storeu_epi16(v + h2 + i, km, round_bf16x16(hi));
            }
        }
    }
    return HEST_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* RMS norm of M rows of d, bf16 (HF LlamaRMSNorm, as the fused layer's rms_norm_row: the mean
 * square in fp32, the normalised value rounded to bf16, then the weight's bf16 product), rows
 * split across `threads`. The PyTorch form (ops.rms_norm) makes four fp32 copies of x: at 2,600
 * rows it took 3.9 ms on the 2-core Xeon, memory-bound. x and y may not overlap. */
int hest_rms_norm(const uint16_t *x, const uint16_t *w, uint16_t *y, int M, int d, float eps,
                  int threads) {
    if (!x || !w || !y) return HEST_ENULL;
    if (M < 1 || d < 1 || threads < 1) return HEST_ESHAPE;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int m = 0; m < M; m++) {
        const uint16_t *xr = x + (size_t)m * d;
        uint16_t *yr = y + (size_t)m * d;
        float ss = 0.0f;
        /* the mean square's sum in SIMD lanes (another order than rms_norm_row's: the last
         * bit of a normalised value can differ, as it does against PyTorch's reduction) */
#pragma omp simd reduction(+ : ss)
        for (int i = 0; i < d; i++) {
            float a = bf16_to_f32(xr[i]);
            ss += a * a;
        }
        float r = 1.0f / sqrtf(ss / (float)d + eps);
#pragma omp simd
        for (int i = 0; i < d; i++) yr[i] = mul_bf16(w[i], f32_to_bf16(bf16_to_f32(xr[i]) * r));
    }
    return HEST_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* The factorised controller (controller.py) for one row at decode, in fp32:
 *   logits = A (sigmoid(W_tok h) * lay) + a0,   lay = sigmoid(w_layer + u beta) (given).
 * W_tok (k, d), A (P, k), a0 (P), lay (k) fp32; h (d) bf16; out (P): P paths (paths.py).
 * hest_ctl_logits and hest_ctl_rows run this same code on a row. */
static inline void ctl_row(const float *wtok, const float *lay, const float *A, const float *a0,
                           int k, int d, int P, const uint16_t *h, float *out) {
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
}

static inline int ctl_shape_ok(int k, int d, int P) {
    return k >= 1 && k <= 256 && d >= 1 && d <= 4096 && P >= 1 && P <= 16;
}

int hest_ctl_logits(const float *wtok, const float *lay, const float *A, const float *a0, int k,
                    int d, int P, const uint16_t *h, float *out) {
    if (!wtok || !lay || !A || !a0 || !h || !out) return HEST_ENULL;
    if (!ctl_shape_ok(k, d, P)) return HEST_ESHAPE;
    ctl_row(wtok, lay, A, a0, k, d, P, h, out);
    return HEST_OK;
}

/* The same for the M rows of a decode step, one per request (each with its own beta): lay (M, k)
 * and a0 (M, P) row by row, h (M, d) bf16, out (M, P) the logits, and paths (M) each row's path:
 * the first largest logit, mapped through sub (P path codes, or NULL: unchanged), the table's
 * substitutions of this layer (EnergyModel.sub). One call per layer instead of ~6 PyTorch
 * operators and an argmax (~0.2 ms a layer at 16 rows on the 2-core Xeon, session 17's
 * profile); rows one after the other (M <= 16 rows of ~18k multiply-adds are microseconds). */
int hest_ctl_rows(const float *wtok, const float *lay, const float *A, const float *a0,
                  const int64_t *sub, int k, int d, int P, int M, const uint16_t *h, float *out,
                  int64_t *paths) {
    if (!wtok || !lay || !A || !a0 || !h || !out || !paths) return HEST_ENULL;
    if (!ctl_shape_ok(k, d, P)) return HEST_ESHAPE;
    if (M < 1 || M > HEST_MAX_ROWS) return HEST_EROWS;
    for (int m = 0; m < M; m++) {
        float *o = out + (size_t)m * P;
        ctl_row(wtok, lay + (size_t)m * k, A, a0 + (size_t)m * P, k, d, P, h + (size_t)m * d, o);
        int best = 0;
        for (int p = 1; p < P; p++)
            if (o[p] > o[best]) best = p;
        paths[m] = sub ? sub[best] : best;
    }
    return HEST_OK;
}
