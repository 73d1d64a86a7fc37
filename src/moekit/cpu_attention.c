/* moekit's CPU decode attention over a paged KV pool (moekit/attention/paged_cpu.py calls it; built into
   the same library as cpu_matvec.c by moekit/cpu_matvec.py).

   One new token per row b: for each query head h (KV head g = h / R),
       s_j = (q[b, h] . k[g, table[b, j]]) * scale             for the slots j < S with valid[b, j]
       out[b, h] = sum_j softmax(s)_j v[g, table[b, j]]
   reading the keys and values in place in the pool (G, N, Dh) through the row's slot table, where the
   torch path first gathers every row's S slots into a (B, G, S, Dh) copy. gpt-oss's sinks: a learned
   logit per head joins the softmax as one more term of the denominator.

   Every (row, head) is computed alone, in a fixed order (slots ascending; the exponentials by one
   branch-free formula, `exp_nonpositive`), so a row's result never depends on the other rows: the
   engine's batch-invariant numerics.

   Legend: B rows, H query heads, G KV heads, R = H / G, S slots, N pool slots, Dh head dim. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define ATTN_AVX2 1 /* the dot and the exponentials in 8-lane AVX2 (machines without AVX-512): the portable bits */
#endif

#define PREFETCH 8 /* slots ahead */
#define PARALLEL_WORK (1 << 13) /* multiply-adds (scores) below which one thread computes the call */

static float dot(const float *a, const float *b, int64_t n) {
#ifdef __AVX512F__
    if (n % 16 == 0) { /* one 16-lane chain, then the lanes' sum: a fixed order for every row */
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
        return _mm512_reduce_add_ps(acc);
    }
#endif
#ifdef ATTN_AVX2
    if (n % 8 == 0) { /* the eight chains below in one vector, summed by the same tree: the same bits */
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = 0; i < n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
        const __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1)); /* j + (j + 4) */
        const __m128 h = _mm_hadd_ps(s, s);
        return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
    }
#endif
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}; /* eight chains, summed in a fixed order */
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] = fmaf(a[i + j], b[i + j], acc[j]);
    float sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < n; i++) sum = fmaf(a[i], b[i], sum);
    return sum;
}

/* the vector type of the value sums: 16 lanes (AVX-512) or 8 (AVX2); none in the portable build */
#if defined(__AVX512F__)
#define PV_W 16
typedef __m512 pv_vec;
#define pv_load _mm512_loadu_ps
#define pv_store _mm512_storeu_ps
#define pv_set1 _mm512_set1_ps
#define pv_fmadd _mm512_fmadd_ps
#elif defined(ATTN_AVX2)
#define PV_W 8
typedef __m256 pv_vec;
#define pv_load _mm256_loadu_ps
#define pv_store _mm256_storeu_ps
#define pv_set1 _mm256_set1_ps
#define pv_fmadd _mm256_fmadd_ps
#endif

#ifdef PV_W
/* o (NV vectors of PV_W) += w[j] * v(slot j) for the valid slots j in [j0, j1), in slot order, o held in registers
   across the slots (each element: the fmaf chain of the scalar loop below, so the same bits) */
static inline __attribute__((always_inline)) void pv_vectors(const int NV, float *o, const float *w,
                                                             const float *pool_v, const int64_t *slots,
                                                             const uint8_t *ok, int64_t j0, int64_t j1, int64_t Dh) {
    pv_vec acc[8];
    for (int i = 0; i < NV; i++) acc[i] = pv_load(o + PV_W * i);
    for (int64_t j = j0; j < j1; j++) {
        if (!ok[j]) continue;
        const pv_vec wj = pv_set1(w[j]);
        const float *vv = pool_v + slots[j] * Dh;
        for (int i = 0; i < NV; i++) acc[i] = pv_fmadd(wj, pv_load(vv + PV_W * i), acc[i]);
    }
    for (int i = 0; i < NV; i++) pv_store(o + PV_W * i, acc[i]);
}
#endif

/* o (Dh) += sum over the valid slots j in [j0, j1), in order, of w[j] * v(slot j) (pool_v: the KV head's
   (N, Dh) values) */
static void pv_accumulate(float *o, const float *w, const float *pool_v, const int64_t *slots, const uint8_t *ok,
                          int64_t j0, int64_t j1, int64_t Dh) {
#ifdef PV_W
    if (Dh % PV_W == 0) { /* 8 vectors at a time, in registers */
        int64_t c = 0;
        for (; c + 8 * PV_W <= Dh; c += 8 * PV_W) pv_vectors(8, o + c, w, pool_v + c, slots, ok, j0, j1, Dh);
        switch ((Dh - c) / PV_W) {
        case 1: pv_vectors(1, o + c, w, pool_v + c, slots, ok, j0, j1, Dh); break;
        case 2: pv_vectors(2, o + c, w, pool_v + c, slots, ok, j0, j1, Dh); break;
        case 3: pv_vectors(3, o + c, w, pool_v + c, slots, ok, j0, j1, Dh); break;
        case 4: pv_vectors(4, o + c, w, pool_v + c, slots, ok, j0, j1, Dh); break;
        case 5: pv_vectors(5, o + c, w, pool_v + c, slots, ok, j0, j1, Dh); break;
        case 6: pv_vectors(6, o + c, w, pool_v + c, slots, ok, j0, j1, Dh); break;
        case 7: pv_vectors(7, o + c, w, pool_v + c, slots, ok, j0, j1, Dh); break;
        default: break;
        }
        return;
    }
#endif
    for (int64_t j = j0; j < j1; j++) {
        if (!ok[j]) continue;
        const float *vv = pool_v + slots[j] * Dh;
        for (int64_t d = 0; d < Dh; d++) o[d] = fmaf(w[j], vv[d], o[d]);
    }
}

/* e^x for the softmax's x <= 0: Cephes' expf (range reduction by ln 2, a degree-5 polynomial; relative
   error ~1e-7), 0 below -87 (and for -inf: masked slots), NaN kept. Written with explicit fmaf and no
   branches, so the vectorized loop and its scalar tail give the same bits (whatever S is). */
static inline float exp_nonpositive(float x) {
    const float xc = x < -87.0f ? -87.0f : x;
    const float n = nearbyintf(xc * 1.44269504088896341f);
    float r = fmaf(-n, 0.693359375f, xc);
    r = fmaf(-n, -2.12194440e-4f, r);
    float p = fmaf(1.9875691500e-4f, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    const float y = fmaf(p, r * r, r) + 1.0f;
    union { int32_t i; float f; } two_n = {.i = ((int32_t)n + 127) << 23};
    const float e = y * two_n.f;
    return x != x ? x : (x < -87.0f ? 0.0f : e);
}

#ifdef ATTN_AVX2
/* `exp_nonpositive` of 8 lanes, step by step the same operations (fused where it fuses): the same bits */
static inline __m256 exp_nonpositive8(const __m256 x) {
    const __m256 low = _mm256_set1_ps(-87.0f);
    const __m256 xc = _mm256_max_ps(x, low); /* (NaN lanes: replaced by x below) */
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 neg_n = _mm256_xor_ps(n, _mm256_set1_ps(-0.0f));
    __m256 r = _mm256_fmadd_ps(neg_n, _mm256_set1_ps(0.693359375f), xc);
    r = _mm256_fmadd_ps(neg_n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(1.9875691500e-4f), r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 e = _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
    const __m256 out = _mm256_blendv_ps(e, _mm256_setzero_ps(), _mm256_cmp_ps(x, low, _CMP_LT_OQ)); /* < -87: 0 */
    return _mm256_blendv_ps(out, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q)); /* NaN kept */
}
#endif

/* pr[j] = exp_nonpositive(pr[j] - m) for j in [j0, j1) */
static void exp_shifted(float *pr, float m, int64_t j0, int64_t j1) {
    int64_t j = j0;
#ifdef ATTN_AVX2
    const __m256 mv = _mm256_set1_ps(m);
    for (; j + 8 <= j1; j += 8)
        _mm256_storeu_ps(pr + j, exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(pr + j), mv)));
#endif
    for (; j < j1; j++) pr[j] = exp_nonpositive(pr[j] - m);
}

/* q (B, H, Dh), pool_k / pool_v (G, N, Dh), table (B, S) int64 pool slots, valid (B, S) bytes (0/1),
   sinks (H) or NULL, out (B, H, Dh). Returns 0, -1 when out of memory, -2 when a valid slot's pool index
   is outside [0, N). A row with no valid slot gets zeros. */
int moekit_paged_decode_attention(const float *q, const float *pool_k, const float *pool_v, const int64_t *table,
                                  const uint8_t *valid, const float *sinks, int64_t B, int64_t H, int64_t G,
                                  int64_t S, int64_t N, int64_t Dh, float scale, float *out) {
    for (int64_t i = 0; i < B * S; i++)
        if (valid[i] && (table[i] < 0 || table[i] >= N)) return -2;
    const int64_t R = H / G;
    /* row b reads the slots [span[2b], span[2b + 1]), from its first valid slot to its last: the rest add exact
       zeros to every sum below (so leaving them out keeps the bits), and a decode row sees a prefix of S, the
       engine's padding rows one slot. The region runs on one thread below PARALLEL_WORK multiply-adds. */
    int64_t *span = malloc(sizeof(int64_t) * 2 * (B > 0 ? B : 1));
    if (!span) return -1;
    int64_t work = 0;
    for (int64_t b = 0; b < B; b++) {
        const uint8_t *ok = valid + b * S;
        int64_t j0 = 0, j1 = S;
        while (j0 < S && !ok[j0]) j0++;
        while (j1 > j0 && !ok[j1 - 1]) j1--;
        span[2 * b] = j0, span[2 * b + 1] = j1;
        work += (j1 - j0) * H * Dh;
    }
    int failed = 0;
#pragma omp parallel if (work >= PARALLEL_WORK)
    {
        /* per (row, KV head): the scores of its R query heads, each key and value read once for all R */
        float *p = malloc(sizeof(float) * (R * S > 0 ? R * S : 1));
        if (!p) {
#pragma omp atomic write
            failed = 1;
        }
        /* one (row, KV head) at a time to whichever thread is free: the rows' spans differ (a lone decoding
           row among padding rows has all the work), and each result is the same on any thread */
#pragma omp for schedule(dynamic, 1)
        for (int64_t bg = 0; bg < B * G; bg++) {
            const int64_t b = bg / G, g = bg % G;
            const int64_t *slots = table + b * S;
            const uint8_t *ok = valid + b * S;
            for (int64_t d = 0; d < R * Dh; d++) out[bg * R * Dh + d] = 0.0f;
            if (!p) continue;
            const int64_t j0 = span[2 * b], j1 = span[2 * b + 1];
            float m[64];
            for (int64_t r0 = 0; r0 < R; r0 += 64) { /* heads in groups of 64 (the stack arrays) */
                const int64_t nr = R - r0 < 64 ? R - r0 : 64;
                for (int64_t r = 0; r < nr; r++) m[r] = sinks ? sinks[g * R + r0 + r] : -INFINITY;
                for (int64_t j = j0; j < j1; j++) {
#if defined(__AVX512F__) || defined(ATTN_AVX2)
                    if (j + PREFETCH < j1) /* a later slot's key and value (read by pv_accumulate below): the slots
                                              jump from block to block */
                        for (int64_t c = 0; c < Dh; c += 16) {
                            const int64_t at = (g * N + slots[j + PREFETCH]) * Dh + c;
                            _mm_prefetch((const char *)(pool_k + at), _MM_HINT_T0);
                        }
#endif
                    const float *k = ok[j] ? pool_k + (g * N + slots[j]) * Dh : NULL;
                    for (int64_t r = 0; r < nr; r++) {
                        const float sc = k ? dot(q + (bg * R + r0 + r) * Dh, k, Dh) * scale : -INFINITY;
                        p[r * S + j] = sc;
                        m[r] = sc > m[r] ? sc : m[r];
                    }
                }
                for (int64_t r = 0; r < nr; r++) {
                    if (m[r] == -INFINITY) continue; /* nothing to attend to: zeros */
                    float *pr = p + r * S;
                    exp_shifted(pr, m[r], j0, j1); /* masked: exactly 0 */
                    float denom = sinks ? exp_nonpositive(sinks[g * R + r0 + r] - m[r]) : 0.0f;
                    for (int64_t j = j0; j < j1; j++) denom += pr[j]; /* in slot order */
                    const float inv = 1.0f / denom;
                    for (int64_t j = j0; j < j1; j++) pr[j] *= inv; /* the slot's weight */
                    /* each head's output over the slots in order (a value row is read once per head: from cache) */
                    pv_accumulate(out + (bg * R + r0 + r) * Dh, pr, pool_v + g * N * Dh, slots, ok, j0, j1, Dh);
                }
            }
        }
        free(p);
    }
    free(span);
    return failed ? -1 : 0;
}
