/* moekit's CPU matvec over GGML q8_0 / q4_0 blocks, or float32 weights (moekit/cpu_matvec.py
   builds and loads it).

   y[r, n] = sum_b d[w(r), n, b] * sum_j v(w(r), n, b, j) * x[r, 32 b + j]
   with v = q (q8_0, int8 codes) or q - 8 (q4_0: byte j of a block holds element j in its low nibble
   and element j + 16 in its high one) or the float itself (f32, d = 1: no scales), d the float32 block
   scale, w(r) the weight of row r: one weight
   (N, K) shared by all rows (a Linear), or weight index[r] of a stack (E, N, K) (gathered experts).

   x stays float32 (no activation quantization): the result equals x @ dequantize(W)^T up to the order
   of the float additions, which is fixed per row (the same for any number of rows: batch invariant).
   Rows that share a weight are taken up to 8 at a time, so each block is decoded once for all of them.
   Output rows n are split across OpenMP threads (the process's OpenMP runtime: torch's).

   Legend: R rows of x, N output rows of a weight, B blocks of 32 per row (K = 32 B). */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define QK 32
#define MAX_TILE 8

enum { Q8_0 = 0, Q4_0 = 1, F32 = 2 }; /* the `fmt` argument */

static inline int64_t block_bytes(int fmt) { return fmt == Q4_0 ? 16 : fmt == Q8_0 ? 32 : 128; }

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

/* y (R, N) = rows of x (R, K) against weight `index[r]` of q (E, N, B*bytes) / d (E, N, B) (d unused for
   F32); index NULL: every row against weight 0. fmt: Q8_0, Q4_0 or F32. Rows with the same weight are grouped (up to
   MAX_TILE per group), so a weight is read once per group rather than once per row. */
void moekit_qmatvec(int fmt, const float *x, int64_t R, const uint8_t *q, const float *d, int64_t N, int64_t B,
                    const int64_t *index, float *y) {
    const int64_t K = B * QK, chunk = 16;
    const int64_t n_chunks = (N + chunk - 1) / chunk;
    const int64_t weight_bytes = N * B * block_bytes(fmt);
    /* rows in weight order (a stable sort by index: R is small, the experts of a few tokens) */
    int64_t *order = malloc(sizeof(int64_t) * (R > 0 ? R : 1));
    int64_t *group_start = malloc(sizeof(int64_t) * (R + 1));
    if (!order || !group_start) {
        free(order);
        free(group_start);
        return;
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
        const float *x_T[MAX_TILE];
        float *y_T[MAX_TILE];
        for (int t = 0; t < T; t++) {
            x_T[t] = x + order[i0 + t] * K;
            y_T[t] = y + order[i0 + t] * N;
        }
        const int64_t n0 = c * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
        tile(fmt, x_T, T, q + e * weight_bytes, fmt == F32 ? NULL : d + e * N * B, n0, n1, B, y_T);
    }
    free(order);
    free(group_start);
}
