/* moekit's CPU matvec over GGML q8_0 / q4_0 blocks, or float32 weights (moekit/cpu_matvec.py
   builds and loads it).

   y[r, n] = sum_b d[w(r), n, b] * sum_j v(w(r), n, b, j) * x[r, 32 b + j]
   with v = q (q8_0, int8 codes) or q - 8 (q4_0: byte j of a block holds element j in its low nibble
   and element j + 16 in its high one) or the float itself (f32, d = 1: no scales), d the float32 block
   scale, w(r) the weight of row r: one weight
   (N, K) shared by all rows (a Linear), or weight index[r] of a stack (E, N, K) (gathered experts).

   x stays float32 by default: the result equals x @ dequantize(W)^T up to the order of the float
   additions, which is fixed per row (the same for any number of rows: batch invariant).
   With 8-bit activations (fmt | X8, llama.cpp's scheme for these formats) each 32-block of a row of x
   is first quantized like a q8_0 weight, d_x = max|x| / 127, q_x = round-half-even(x * (1 / d_x))
   (float32 d_x, where GGML stores it in fp16), and
   y[r, n] = sum_b d[w(r), n, b] * d_x[r, b] * sum_j v(w(r), n, b, j) * q_x[r, 32 b + j],
   the inner sum in exact integers (AVX-512 VNNI: 64 products per instruction).
   Rows that share a weight are taken up to 8 at a time, so each block is decoded once for all of them.
   Output rows n are split across OpenMP threads (the process's OpenMP runtime: torch's).

   Legend: R rows of x, N output rows of a weight, B blocks of 32 per row (K = 32 B). */

#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define QK 32
#define MAX_TILE 8

enum { Q8_0 = 0, Q4_0 = 1, F32 = 2, X8 = 8 }; /* the `fmt` argument: a weight format, | X8 for 8-bit x */

static inline int64_t block_bytes(int fmt) { return (fmt & 7) == Q4_0 ? 16 : (fmt & 7) == Q8_0 ? 32 : 128; }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define X8_VNNI 1
#else
#define X8_VNNI 0
#endif

/* one row of x (K = 32 B floats) quantized per 32-block (d = max|x| / 127, q = round(x / d)), laid out
   for tile_x8: q + 128 as bytes (Bp, 32) and d repeated 8 times (Bp, 8), Bp = B rounded up to even
   (a last odd block is followed by one of x = 0, d = 0) */
static void prepare_x8(const float *x, int64_t B, uint8_t *q, float *d) {
    for (int64_t b = 0; b < B + (B & 1); b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        if (b < B)
            for (int j = 0; j < QK; j++) /* NaN sticks (and then reaches y through d) */
                amax = fabsf(xb[j]) > amax || xb[j] != xb[j] ? fabsf(xb[j]) : amax;
        const float db = amax / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
        for (int j = 0; j < QK; j++) q[b * QK + j] = (uint8_t)(128 + (b < B ? (int)nearbyintf(xb[j] * id) : 0));
        for (int j = 0; j < 8; j++) d[b * 8 + j] = db;
    }
}

/* the 32 weight values of block b of row n, unscaled, as floats */
static inline void decode_block(int fmt, const uint8_t *blk, float *v) {
    if (fmt == F32) {
        memcpy(v, blk, sizeof(float) * QK);
    } else if (fmt == Q4_0) {
        for (int j = 0; j < 16; j++) {
            v[j] = (float)(blk[j] & 15) - 8.0f;
            v[j + 16] = (float)(blk[j] >> 4) - 8.0f;
        }
    } else {
        const int8_t *q = (const int8_t *)blk;
        for (int j = 0; j < QK; j++) v[j] = (float)q[j];
    }
}

/* rows x_T[t] (t < T) against weight rows [n0, n1) of one weight */
static void tile(int fmt, const float *const *x_T, int T, const uint8_t *q, const float *d, int64_t n0,
                 int64_t n1, int64_t B, float *const *y_T) {
    const int64_t row_bytes = B * block_bytes(fmt);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *qn = q + n * row_bytes;
        const float *dn = fmt == F32 ? NULL : d + n * B;
#ifdef __AVX512F__
        __m512 acc_lo[MAX_TILE], acc_hi[MAX_TILE]; /* two chains per row: half the FMA latency per block */
        for (int t = 0; t < T; t++) acc_lo[t] = acc_hi[t] = _mm512_setzero_ps();
        const __m512 lut = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
        for (int64_t b = 0; b < B; b++) {
            __m512 lo, hi;
            if (fmt == F32) {
                lo = _mm512_loadu_ps((const float *)(qn + b * 128));
                hi = _mm512_loadu_ps((const float *)(qn + b * 128) + 16);
            } else if (fmt == Q4_0) {
                __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qn + b * 16)));
                lo = _mm512_permutexvar_ps(c, lut); /* uses the low 4 bits of each lane */
                hi = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), lut);
            } else {
                __m256i c = _mm256_loadu_si256((const __m256i *)(qn + b * 32));
                lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(c)));
                hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(c, 1)));
            }
            if (dn) {
                const __m512 s = _mm512_set1_ps(dn[b]);
                lo = _mm512_mul_ps(lo, s); /* the dequantized weights, as Format.dequantize computes them */
                hi = _mm512_mul_ps(hi, s);
            }
            for (int t = 0; t < T; t++) {
                const float *xb = x_T[t] + b * QK;
                acc_lo[t] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xb), acc_lo[t]);
                acc_hi[t] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + 16), acc_hi[t]);
            }
        }
        for (int t = 0; t < T; t++) y_T[t][n] = _mm512_reduce_add_ps(_mm512_add_ps(acc_lo[t], acc_hi[t]));
#else
        float acc[MAX_TILE][QK];
        memset(acc, 0, sizeof(acc));
        float v[QK];
        for (int64_t b = 0; b < B; b++) {
            decode_block(fmt, qn + b * block_bytes(fmt), v);
            if (dn)
                for (int j = 0; j < QK; j++) v[j] *= dn[b];
            for (int t = 0; t < T; t++) {
                const float *xb = x_T[t] + b * QK;
                for (int j = 0; j < QK; j++) acc[t][j] += v[j] * xb[j];
            }
        }
        for (int t = 0; t < T; t++) {
            float sum = 0.0f;
            for (int j = 0; j < QK; j++) sum += acc[t][j];
            y_T[t][n] = sum;
        }
#endif
    }
}

/* 8-bit x (prepare_x8): rows q_T[t] (B, 32) of q + 128 with scales dx_T[t] (B, 8) against weight rows [n0, n1) */
static void tile_x8(int fmt, const uint8_t *const *q_T, const float *const *dx_T, int T, const uint8_t *q,
                    const float *d, int64_t n0, int64_t n1, int64_t B, float *const *y_T) {
    const int64_t row_bytes = B * block_bytes(fmt);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *qn = q + n * row_bytes;
        const float *dn = d + n * B;
#if X8_VNNI
        /* two blocks (64 codes) per step. VNNI multiplies unsigned by signed bytes: x comes as x + 128
           (unsigned, prepared by prepare_x8) and 128 * sum(w) is subtracted, computed once per weight
           block for all rows. Two float chains per row (even and odd steps), summed at the end: a fixed
           order per row. */
        __m512 acc_a[MAX_TILE], acc_b[MAX_TILE];
        for (int t = 0; t < T; t++) acc_a[t] = acc_b[t] = _mm512_setzero_ps();
        const __m512i ones = _mm512_set1_epi8(1);
        for (int64_t b = 0; b < B; b += 2) {
            const int two = b + 1 < B;
            const __mmask64 keep = two ? ~(__mmask64)0 : 0xffffffffULL;
            __m512i w;
            if ((fmt & 7) == Q4_0) {
                const __m256i c = two ? _mm256_loadu_si256((const __m256i *)(qn + b * 16))
                                      : _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(qn + b * 16)));
                const __m256i m4 = _mm256_set1_epi8(15);
                const __m256i lo = _mm256_and_si256(c, m4), hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), m4);
                /* 128-bit lanes (lo0 lo1 hi0 hi1) -> (lo0 hi0 lo1 hi1): block b, then block b + 1 */
                const __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
                w = _mm512_maskz_sub_epi8(keep, _mm512_shuffle_i64x2(z, z, _MM_SHUFFLE(3, 1, 2, 0)),
                                          _mm512_set1_epi8(8));
            } else {
                w = _mm512_maskz_loadu_epi8(keep, qn + b * 32);
            }
            const __m512i start = _mm512_sub_epi32(
                _mm512_setzero_si512(), _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, w), 7));
            const __m512 dw = _mm512_insertf32x8(_mm512_set1_ps(dn[b]), _mm256_set1_ps(two ? dn[b + 1] : 0.0f), 1);
            if ((b >> 1) & 1)
                for (int t = 0; t < T; t++) {
                    const __m512i dot = _mm512_dpbusd_epi32(start, _mm512_loadu_si512(q_T[t] + b * QK), w);
                    const __m512 s = _mm512_mul_ps(dw, _mm512_loadu_ps(dx_T[t] + b * 8));
                    acc_b[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc_b[t]);
                }
            else
                for (int t = 0; t < T; t++) {
                    const __m512i dot = _mm512_dpbusd_epi32(start, _mm512_loadu_si512(q_T[t] + b * QK), w);
                    const __m512 s = _mm512_mul_ps(dw, _mm512_loadu_ps(dx_T[t] + b * 8));
                    acc_a[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc_a[t]);
                }
        }
        for (int t = 0; t < T; t++) y_T[t][n] = _mm512_reduce_add_ps(_mm512_add_ps(acc_a[t], acc_b[t]));
#else
        float acc[MAX_TILE];
        for (int t = 0; t < T; t++) acc[t] = 0.0f;
        float v[QK];
        for (int64_t b = 0; b < B; b++) {
            decode_block(fmt & 7, qn + b * block_bytes(fmt & 7), v); /* small integers, exact as floats */
            for (int t = 0; t < T; t++) {
                int32_t dot = 0;
                for (int j = 0; j < QK; j++) dot += (int32_t)v[j] * ((int32_t)q_T[t][b * QK + j] - 128);
                acc[t] += (float)dot * (dn[b] * dx_T[t][b * 8]);
            }
        }
        for (int t = 0; t < T; t++) y_T[t][n] = acc[t];
#endif
    }
}

/* y (R, N) = rows of x (R, K) against weight `index[r]` of q (E, N, B*bytes) / d (E, N, B) (d unused for
   F32); index NULL: every row against weight 0. fmt: Q8_0, Q4_0 or F32, or Q8_0 | X8, Q4_0 | X8 (x
   quantized to 8 bits first). Rows with the same weight are grouped (up to MAX_TILE per group), so a
   weight is read once per group rather than once per row. Returns 0, or -1 when out of memory. */
int moekit_qmatvec(int fmt, const float *x, int64_t R, const uint8_t *q, const float *d, int64_t N, int64_t B,
                   const int64_t *index, float *y) {
    const int64_t K = B * QK, chunk = 16;
    const int64_t n_chunks = (N + chunk - 1) / chunk;
    const int64_t weight_bytes = N * B * block_bytes(fmt);
    const int x8 = (fmt & X8) != 0;
    /* rows in weight order (a stable sort by index: R is small, the experts of a few tokens) */
    int64_t *order = malloc(sizeof(int64_t) * (R > 0 ? R : 1));
    int64_t *group_start = malloc(sizeof(int64_t) * (R + 1));
    const int64_t Bp = B + (B & 1); /* blocks per row of the prepared x */
    uint8_t *xq = x8 ? malloc((size_t)(R > 0 ? R : 1) * Bp * QK) : NULL;
    float *xd = x8 ? malloc(sizeof(float) * (R > 0 ? R : 1) * Bp * 8) : NULL;
    if (!order || !group_start || (x8 && (!xq || !xd))) {
        free(order);
        free(group_start);
        free(xq);
        free(xd);
        return -1;
    }
    if (x8) {
#pragma omp parallel for schedule(static)
        for (int64_t r = 0; r < R; r++) prepare_x8(x + r * K, B, xq + r * Bp * QK, xd + r * Bp * 8);
    }
    for (int64_t r = 0; r < R; r++) order[r] = r;
    if (index)
        for (int64_t i = 1; i < R; i++) { /* insertion sort, stable */
            const int64_t r = order[i];
            int64_t j = i;
            while (j > 0 && index[order[j - 1]] > index[r]) {
                order[j] = order[j - 1];
                j--;
            }
            order[j] = r;
        }
    int64_t groups = 0;
    for (int64_t i = 0; i < R; i++) {
        const int same = i > 0 && (!index || index[order[i]] == index[order[i - 1]]);
        if (!same || i - group_start[groups - 1] == MAX_TILE) group_start[groups++] = i;
    }
    group_start[groups] = R;
#pragma omp parallel for schedule(static)
    for (int64_t task = 0; task < groups * n_chunks; task++) {
        const int64_t g = task / n_chunks, c = task % n_chunks;
        const int64_t i0 = group_start[g];
        const int T = (int)(group_start[g + 1] - i0);
        const int64_t e = index ? index[order[i0]] : 0;
        const float *x_T[MAX_TILE], *xd_T[MAX_TILE];
        const uint8_t *xq_T[MAX_TILE];
        float *y_T[MAX_TILE];
        for (int t = 0; t < T; t++) {
            const int64_t r = order[i0 + t];
            x_T[t] = x + r * K;
            y_T[t] = y + r * N;
            if (x8) {
                xq_T[t] = xq + r * Bp * QK;
                xd_T[t] = xd + r * Bp * 8;
            }
        }
        const int64_t n0 = c * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
        if (x8)
            tile_x8(fmt, xq_T, xd_T, T, q + e * weight_bytes, d + e * N * B, n0, n1, B, y_T);
        else
            tile(fmt, x_T, T, q + e * weight_bytes, fmt == F32 ? NULL : d + e * N * B, n0, n1, B, y_T);
    }
    free(order);
    free(group_start);
    free(xq);
    free(xd);
    return 0;
}
