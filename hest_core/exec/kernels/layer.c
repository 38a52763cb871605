/* One decoder layer of a decode step in one call (the `fused` decode loop, fused.py).
 *
 * After the products, a PyTorch decode step spent ~5-8 ms of ~20 in the ~30 small operators
 * per layer around them (norms, rope, cache writes, attention, residuals), each a dispatch of
 * its own. Here a layer is one call and one OpenMP parallel region: the products split their
 * output rows over the threads, attention its (row, KV head, chunk) items, the row-wise steps
 * their rows. Each path of each row is chosen by the caller (the controller and the budget guard
 * stay in Python, between layers); rows on different paths in one step read their own weight
 * copies, as gathered sub-batches.
 *
 * Path codes (paths.py `native_code`; fused.py passes the registry's): 0 fp16, 1 int8, 2 skip,
 * 3 int4 (only where the layer was given Q4_1 copies). Each runs the attention projections on one
 * weight kind and the MLP on one, or none:
 *
 *   code   q,k,v,o   gate,up,down
 *   0      bf16      bf16
 *   1      int8      int8
 *   2      int8      none (the residual passes; or the rank-R shortcut sc_b (sc_a h))
 *   3      Q4_1      Q4_1, each Q4_1 product plus its low-rank term (x a^T) b^T where given
 *                     (the layer takes b transposed, lr_b = b^T (R, N))
 *
 * Numerics follow the PyTorch loop op for op: every elementwise step computes in fp32 and rounds
 * to bf16 where PyTorch's bf16 operator would (norms, rope, residual adds, SiLU and its product,
 * the low-rank term's two products and its add). Attention keeps its probabilities in fp32
 * (SDPA's CPU kernel rounds them to bf16 before the product with V: the last bits differ). */

enum { PATH_FP16, PATH_INT8, PATH_SKIP, PATH_INT4, N_PATH_CODES };
enum { KIND_BF16, KIND_I8, KIND_Q4, KIND_NONE }; /* weight kinds; NONE: no MLP */
static const int PROJ_KIND[N_PATH_CODES] = {KIND_BF16, KIND_I8, KIND_I8, KIND_Q4};
static const int MLP_KIND[N_PATH_CODES] = {KIND_BF16, KIND_I8, KIND_NONE, KIND_Q4};
enum { P_QKV, P_O, P_GU, P_DOWN }; /* the four (fused) products of a layer */
/* Rows from which the bf16, int8 and Q4_1 products take the AMX tiles (amx.c), where the CPU has them
 * (measured: docs/runtime.md, "The fused decode layer"). */
#ifndef AMX_MIN_ROWS_BF16
#define AMX_MIN_ROWS_BF16 5
#endif
#ifndef AMX_MIN_ROWS_I8
#define AMX_MIN_ROWS_I8 9
#endif
/* int4 (Q4_1) from 9 rows: weights cold, one layer's four products, tiles against q4.c's loop
 * (`python -m hest_core.bench.q4 --rows 1,4,8,9,16`, session 18): 1.20x at 8 rows, 0.94x at 9,
 * 0.67x at 16 (docs/runtime.md, "int4 on the AMX tiles"). */
#ifndef AMX_MIN_ROWS_Q4
#define AMX_MIN_ROWS_Q4 9
#endif

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
    const uint8_t *q4[4];                      /* Q4_1 copies (q4.c layout) of qkv, o, gu, down;
                                                * all NULL where the int4 path is not built */
    const uint16_t *lr_a[4], *lr_b[4];         /* low-rank term of each: a (lr_R, K), b^T (lr_R, N) */
    int lr_R[4];                               /* bf16, or NULL and 0 where that copy has none */
    const int32_t *lr_span[4];                 /* per row r of b^T, its nonzero columns [lo, hi)
                                                * ((R, 2) int32; NULL: all N): a fused product's
                                                * targets own separate rows and columns of b */
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

typedef struct {
    uint16_t *gx, *gy; /* gathered rows in and out (mixed paths) */
    int16_t *xq;       /* int16 activations (int8 products) */
    float *xs;         /* their scales */
    void *q4;          /* q4 activations (hest_q4_scratch_bytes) */
    uint16_t *lt;      /* a low-rank term's x a^T (rows, R) */
    uint32_t *xb;      /* activations packed for the AMX tiles (amx.c) */
} proj_scratch_t;

/* One weight copy of one product: bf16 w; int8 w + scales s; Q4_1 w (+ low-rank a, b, R). */
typedef struct {
    const void *w;
    const float *s;
    const uint16_t *a, *b;
    int R;
    const int32_t *span;
} wref_t;

static wref_t weight_of(const hest_layer_t *L, int p, int kind) {
    wref_t r = {0};
    if (kind == KIND_BF16) {
        const uint16_t *w16[4] = {L->wqkv, L->wo, L->wgu, L->wdown};
        r.w = w16[p];
    } else if (kind == KIND_I8) {
        const int8_t *w8[4] = {L->qkv8, L->o8, L->gu8, L->down8};
        const float *s8[4] = {L->qkv8_s, L->o8_s, L->gu8_s, L->down8_s};
        r.w = w8[p], r.s = s8[p];
    } else if (kind == KIND_Q4) {
        r.w = L->q4[p], r.a = L->lr_a[p], r.b = L->lr_b[p], r.R = L->lr_R[p];
        r.span = L->lr_span[p];
    }
    return r;
}

/* y (nr, N) += (x a^T) b^T, each product rounded to bf16, then the add (as the PyTorch loop).
 * b comes transposed (bt: R x N), so the second product runs along N with t broadcast (R fused
 * multiply-adds per 16 outputs, no horizontal sums: R is 16-48 here), fused with the add,
 * skipping the rows of b^T that are zero over the 16 outputs (span); items of (row, 256
 * outputs) over the threads. */
static void low_rank_add(const wref_t *w, const uint16_t *x, uint16_t *y, int nr, int N, int K,
                         const proj_scratch_t *ps) {
    const int R = w->R, chunks = (N + 255) / 256;
    gemv_bf16_for(w->a, x, NULL, ps->lt, nr, R, K); /* t (nr, R) */
#pragma omp for schedule(static)
    for (int it = 0; it < nr * chunks; it++) {
        const int m = it / chunks, n0 = (it % chunks) * 256, n1 = n0 + 256 < N ? n0 + 256 : N;
        const uint16_t *t = ps->lt + (size_t)m * R;
        uint16_t *yr = y + (size_t)m * N;
        for (int n = n0; n < n1; n += 16) {
            const __mmask16 km = tail16(n1 - n);
            __m512 acc = _mm512_setzero_ps();
            for (int r = 0; r < R; r++) {
                if (w->span && (n + 16 <= w->span[2 * r] || n >= w->span[2 * r + 1])) continue;
                acc = _mm512_fmadd_ps(_mm512_set1_ps(bf16_to_f32(t[r])),
                                      widen_bf16(_mm256_maskz_loadu_epi16(km, w->b + (size_t)r * N + n)),
                                      acc);
            }
            __m512 u = widen_bf16(round_bf16x16(acc)); /* the term, rounded as F.linear's output */
            __m512 s = _mm512_add_ps(widen_bf16(_mm256_maskz_loadu_epi16(km, yr + n)), u);
            _mm256_mask_storeu_epi16(yr + n, km, round_bf16x16(s));
        }
    }
}

/* y[rows] = x[rows] W^T (+ bias) for the nr listed rows of x (M, K) on weight copy w of `kind`.
 * Called by every thread of the region. */
static void proj_rows(int kind, const wref_t *w, const uint16_t *bias, const uint16_t *x,
                      uint16_t *y, int M, int N, int K, const int *rows, int nr,
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
    if (kind == KIND_I8 && amx_fits(nr, N, K, AMX_MIN_ROWS_I8)) {
        amx_product(NULL, (const int8_t *)w->w, w->s, src, ps->xb, bias, dst, nr, N, K);
    } else if (kind == KIND_I8) {
#pragma omp single
        quant_rows_i16(src, nr, K, ps->xq, ps->xs);
        gemv_i8_for((const int8_t *)w->w, w->s, ps->xq, ps->xs, bias, dst, nr, N, K);
    } else if (kind == KIND_Q4 && amx_fits(nr, N, K, AMX_MIN_ROWS_Q4)) {
        amx_q4_product((const uint8_t *)w->w, src, ps->xb, bias, dst, nr, N, K);
        if (w->a) low_rank_add(w, src, dst, nr, N, K, ps);
    } else if (kind == KIND_Q4) {
        q4_gemv_region((const uint8_t *)w->w, src, bias, dst, ps->q4, nr, N, K);
        if (w->a) low_rank_add(w, src, dst, nr, N, K, ps);
    } else if (amx_fits(nr, N, K, AMX_MIN_ROWS_BF16)) {
        amx_product((const uint16_t *)w->w, NULL, NULL, src, ps->xb, bias, dst, nr, N, K);
    } else {
        gemv_bf16_for((const uint16_t *)w->w, src, bias, dst, nr, N, K);
    }
    if (nr != M) {
#pragma omp single
        for (int r = 0; r < nr; r++)
            memcpy(y + (size_t)rows[r] * N, ps->gy + (size_t)r * N, (size_t)N * 2);
    }
}

/* The rows of a step by the weight kind their path runs a stage on (PROJ_KIND or MLP_KIND). */
typedef struct {
    int r[KIND_NONE + 1][HEST_MAX_ROWS];
    int n[KIND_NONE + 1];
} rowsets_t;

static void split_rows(const int64_t *paths, int M, const int *kind_of, rowsets_t *rs) {
    memset(rs->n, 0, sizeof rs->n);
    for (int m = 0; m < M; m++) {
        int k = kind_of[paths[m]];
        rs->r[k][rs->n[k]++] = m;
    }
}

/* Product p of the layer for every row, each on its path's copy. */
static void project(const hest_layer_t *L, int p, const uint16_t *bias, const uint16_t *x,
                    uint16_t *y, int M, int N, int K, const rowsets_t *rs,
                    const proj_scratch_t *ps) {
    for (int kind = KIND_BF16; kind < KIND_NONE; kind++) {
        wref_t w = weight_of(L, p, kind);
        proj_rows(kind, &w, bias, x, y, M, N, K, rs->r[kind], rs->n[kind], ps);
    }
}

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

/* The working buffers of one decode-layer call, carved from one scratch block. */
typedef struct {
    uint16_t *qkv, *att, *yo, *h2, *gu, *act, *rk; /* rk: the shortcut's rank-R rows (R <= d) */
    proj_scratch_t ps;
    float *scores, *part; /* attention scores per thread; per-chunk partials */
} layer_scratch_t;

static int imax(int a, int b) { return a > b ? a : b; }

/* Scratch of the Q4_1 products' activations: the most any of them needs (K = d, qd or I, each
 * rounded up to 32; the need is not monotonic in K). */
static size_t q4_scratch_max(int M, int d, int qd, int I) {
    size_t n = 0;
    int ks[3] = {d, qd, I};
    for (int i = 0; i < 3; i++) {
        size_t b = hest_q4_scratch_bytes(M, (ks[i] + 31) / 32 * 32);
        n = b > n ? b : n;
    }
    return n;
}

/* Lays the buffers out from base (NULL: only measures) and returns the bytes they take. */
static size_t carve(char *base, int d, int I, int H, int KVH, int hd, int max_len, int M,
                    int threads, layer_scratch_t *sp) {
    int nqkv = (H + 2 * KVH) * hd, qd = H * hd;
    int widest = imax(imax(2 * I, nqkv), d); /* the most outputs of one product */
    int deepest = imax(imax(I, d), qd);      /* the most inputs of one product */
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
    TAKE(ps.q4, q4_scratch_max(M, d, qd, I) + 64);
    TAKE(ps.lt, (size_t)M * deepest * 2); /* R <= K <= deepest */
    TAKE(ps.xb, (size_t)deepest * 32 + 64);
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

/* The int4 copies: all four or none; each K a multiple of 32 (Q4_1 blocks); a low-rank term
 * with both factors and 1 <= R <= K. */
static int check_q4(const hest_layer_t *L, const hest_step_t *S) {
    const int K[4] = {S->d, S->H * S->hd, S->d, S->I};
    int have = 0;
    for (int p = 0; p < 4; p++) have += L->q4[p] != NULL;
    if (have == 0) {
        for (int p = 0; p < 4; p++)
            if (L->lr_a[p] || L->lr_b[p] || L->lr_span[p]) return HEST_ENULL; /* beside no copy */
        return HEST_OK;
    }
    if (have != 4) return HEST_ENULL;
    for (int p = 0; p < 4; p++) {
        if (K[p] % 32) return HEST_ESHAPE;
        if ((L->lr_a[p] == NULL) != (L->lr_b[p] == NULL)) return HEST_ENULL;
        if (L->lr_a[p] && (L->lr_R[p] < 1 || L->lr_R[p] > K[p])) return HEST_ESHAPE;
        if (L->lr_span[p] && !L->lr_a[p]) return HEST_ENULL;
        const int N[4] = {S->H * S->hd + 2 * S->KVH * S->hd, S->d, 2 * S->I, S->d};
        for (int r = 0; L->lr_span[p] && r < L->lr_R[p]; r++) {
            int lo = L->lr_span[p][2 * r], hi = L->lr_span[p][2 * r + 1];
            if (lo < 0 || hi < lo || hi > N[p]) return HEST_ESHAPE;
        }
    }
    return HEST_OK;
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
    int rc = check_q4(L, S);
    if (rc != HEST_OK) return rc;
    for (int m = 0; m < S->M; m++) {
        if (paths[m] < 0 || paths[m] >= N_PATH_CODES) return HEST_EPATH;
        if (paths[m] == PATH_INT4 && !L->q4[0]) return HEST_EPATH; /* no int4 copies here */
        if (S->pos[m] < 0 || S->pos[m] >= S->max_len || S->pos[m] >= S->rope_len) return HEST_EPOS;
    }
    size_t need = carve(NULL, S->d, S->I, S->H, S->KVH, S->hd, S->max_len, S->M, S->threads, NULL);
    if ((uintptr_t)S->scratch % 64 || S->scratch_bytes < need) return HEST_ESCRATCH;
    return HEST_OK;
}

/* Profiling build only (-DHEST_PROFILE, hest_core.bench.floor --profile): thread 0 adds the
 * wall time of each step of a layer call to hest_prof[] after a barrier (so a step's time is
 * its slowest thread's). The normal build has none of it: PROF() is empty. */
#ifdef HEST_PROFILE
enum { PROF_ENTRY, PROF_QKV, PROF_ROPE, PROF_ATTN, PROF_O, PROF_NORM2, PROF_GU, PROF_SILU,
       PROF_DOWN, PROF_NORM3, PROF_EXIT, PROF_N };
double hest_prof[PROF_N];
static double prof_t;
#define PROF(i)                                                                                   \
    do {                                                                                          \
        _Pragma("omp barrier");                                                                   \
        if (omp_get_thread_num() == 0) {                                                          \
            double t_ = omp_get_wtime();                                                          \
            hest_prof[i] += t_ - prof_t;                                                          \
            prof_t = t_;                                                                          \
        }                                                                                         \
    } while (0)
#define PROF_SERIAL(i)                                                                            \
    do {                                                                                          \
        double t_ = omp_get_wtime();                                                              \
        hest_prof[i] += t_ - prof_t;                                                              \
        prof_t = t_;                                                                              \
    } while (0)
#define PROF_START() (prof_t = omp_get_wtime())
#else
#define PROF(i)
#define PROF_SERIAL(i)
#define PROF_START()
#endif

/* The MLP of every row on its path (inside the region): h2 (M, d) in, yo (M, d) out (the rows
 * of skip without a shortcut are left as they are: nothing adds them). */
static void mlp_rows(const hest_layer_t *L, const hest_step_t *S, const rowsets_t *mr,
                     const layer_scratch_t *sb) {
    const int M = S->M, d = S->d, I = S->I;
    const proj_scratch_t *ps = &sb->ps;
    project(L, P_GU, NULL, sb->h2, sb->gu, M, 2 * I, d, mr, ps);
    PROF(PROF_GU);
    for (int kind = KIND_BF16; kind < KIND_NONE; kind++)
        silu_mul_rows(sb->gu, sb->act, I, mr->r[kind], mr->n[kind]);
    PROF(PROF_SILU);
    project(L, P_DOWN, NULL, sb->act, sb->yo, M, d, I, mr, ps);
    const int *rsk = mr->r[KIND_NONE], nsk = mr->n[KIND_NONE];
    if (L->sc_a && nsk) { /* the skip rows' shortcut */
        wref_t a = {.w = L->sc_a}, b = {.w = L->sc_b};
        proj_rows(KIND_BF16, &a, NULL, sb->h2, sb->rk, M, L->R, d, rsk, nsk, ps);
        proj_rows(KIND_BF16, &b, NULL, sb->rk, sb->yo, M, d, L->R, rsk, nsk, ps);
    }
}

/* x (M, d): residual stream in and out. h (M, d): in, the normalised input of this layer (the
 * controller saw it); out, the normalised input of the next layer (ln_next: the next layer's
 * ln1, or the final norm). kc/vc: this layer's cache (cache_rows >= M rows, KVH, max_len, hd);
 * row m writes position pos[m] of cache row m. paths (M): path codes (top of this file).
 * Returns 0, or an HEST_E* code without touching memory. */
int hest_decode_layer(const hest_layer_t *L, const hest_step_t *S, const int64_t *paths,
                      uint16_t *x, uint16_t *h, const uint16_t *ln_next, uint16_t *kc,
                      uint16_t *vc) {
    PROF_START();
    int rc = check_layer_call(L, S, paths, x, h, ln_next, kc, vc);
    if (rc != HEST_OK) return rc;
    const int d = S->d, H = S->H, KVH = S->KVH, hd = S->hd, M = S->M, qd = H * hd;
    const int nqkv = qd + 2 * KVH * hd;
    layer_scratch_t sb;
    carve((char *)S->scratch, d, S->I, H, KVH, hd, S->max_len, M, S->threads, &sb);
    const int C = attention_chunks(S->pos, M, KVH, S->max_len, S->threads);
    rowsets_t pr, mr;
    split_rows(paths, M, PROJ_KIND, &pr);
    split_rows(paths, M, MLP_KIND, &mr);
    uint8_t add[HEST_MAX_ROWS];
    for (int m = 0; m < M; m++) add[m] = MLP_KIND[paths[m]] != KIND_NONE || L->sc_a;

    PROF_SERIAL(PROF_ENTRY);
#pragma omp parallel num_threads(S->threads)
    {
        PROF(PROF_ENTRY); /* the checks above, and the region's fork */
        project(L, P_QKV, L->bqkv, h, sb.qkv, M, nqkv, d, &pr, &sb.ps);
        PROF(PROF_QKV);
        rope_cache_rows(sb.qkv, S->pos, S->cos, S->sin, L->q_norm, L->k_norm, kc, vc, M, H, KVH,
                        hd, S->max_len, S->eps);
        PROF(PROF_ROPE);
        attend_rows(sb.qkv, kc, vc, S->pos, sb.att, sb.scores, sb.part, M, H, KVH, hd,
                    S->max_len, C);
        PROF(PROF_ATTN);
        project(L, P_O, NULL, sb.att, sb.yo, M, d, qd, &pr, &sb.ps);
        PROF(PROF_O);
        residual_norm_rows(x, sb.yo, NULL, L->ln2, sb.h2, M, d, S->eps);
        PROF(PROF_NORM2);
        mlp_rows(L, S, &mr, &sb);
        PROF(PROF_DOWN);
        residual_norm_rows(x, sb.yo, add, ln_next, h, M, d, S->eps);
        PROF(PROF_NORM3);
    }
    PROF_SERIAL(PROF_EXIT); /* the region's join */
    return HEST_OK;
}
