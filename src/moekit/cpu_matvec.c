/* moekit's CPU matvec over GGML q8_0 / q4_0 blocks, OCP MXFP4 blocks, or float32 weights
   (moekit/cpu_matvec.py builds and loads it).

   y[r, n] = sum_b d[w(r), n, b] * sum_j v(w(r), n, b, j) * x[r, 32 b + j]
   with v = q (q8_0, int8 codes) or q - 8 (q4_0: byte j of a block holds element j in its low nibble
   and element j + 16 in its high one) or e2m1(q) (mxfp4: byte j holds element 2j in its low nibble and
   2j + 1 in its high one, gpt-oss's order) or the float itself (f32, d = 1: no scales), d the block
   scale: float32 (q8_0, q4_0: the mirror of their fp16 scales), or mxfp4's E8M0 exponent byte s, read as
   2**(s - 127) (`block_scale`), w(r) the weight of row r: one weight
   (N, K) shared by all rows (a Linear), or weight index[r] of a stack (E, N, K) (gathered experts).

   x stays float32 (no activation quantization): the result equals x @ dequantize(W)^T up to the order
   of the float additions, which is fixed per row (the same for any number of rows: batch invariant).
   Rows that share a weight are taken up to 8 at a time, so each block is decoded once for all of them.
   Output rows n are split across OpenMP threads (the process's OpenMP runtime: torch's).

   Paths by the build's instruction set (-march=native): AVX-512 (every format), AVX2 with FMA (float32:
   `tile_f32`'s 8-lane version; the block formats: 32 lane-wise chains as in the portable loop, the blocks
   decoded 8 lanes at a time, the lanes summed by a tree), portable C. Each fixes its own order of additions, so
   a row's bits are the same for any number of rows within one build (not across builds).

   8-bit activations (moekit_x8_pack / moekit_x8_matvec below): llama.cpp's scheme for these formats.

   Legend: R rows of x, N output rows of a weight, B blocks of 32 per row (K = 32 B), G groups of 16
   output rows, E weights of a stack. */

#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define MATVEC_AVX2 1 /* machines without AVX-512: the float32 tile and the block decoding in 8-lane AVX2 */
#endif

#define QK 32
#define MAX_TILE 8

enum { Q8_0 = 0, Q4_0 = 1, F32 = 2, MXFP4 = 3 }; /* the `fmt` argument */

/* the E2M1 value of each 4-bit code (sign bit 8, then exponent and mantissa: OCP MX v1.0) */
static const float E2M1_VALUES[16] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6, -0.0f, -0.5f, -1, -1.5f, -2, -3, -4, -6};

/* scale idx of d: a float32 array, or for mxfp4 E8M0 bytes, 2**(s - 127) built from its bits (exact: the
   exponent field; s = 0 gives the subnormal 2**-127, s = 255 NaN, as moekit.lowp.mx.mx_dequantize) */
static inline float block_scale(int fmt, const void *d, int64_t idx) {
    if (fmt != MXFP4) return ((const float *)d)[idx];
    const uint32_t s = ((const uint8_t *)d)[idx];
    const union { uint32_t u; float f; } v = {s == 255 ? 0x7FC00000u : s ? s << 23 : 1u << 22};
    return v.f;
}

static inline int64_t block_bytes(int fmt) { return fmt == Q4_0 || fmt == MXFP4 ? 16 : fmt == Q8_0 ? 32 : 128; }

/* the 32 weight values of block b of row n, unscaled, as floats */
static inline void decode_block(int fmt, const uint8_t *blk, float *v) {
    if (fmt == F32) {
        memcpy(v, blk, sizeof(float) * QK);
    } else if (fmt == Q4_0) {
        for (int j = 0; j < 16; j++) {
            v[j] = (float)(blk[j] & 15) - 8.0f;
            v[j + 16] = (float)(blk[j] >> 4) - 8.0f;
        }
    } else if (fmt == MXFP4) {
        for (int j = 0; j < 16; j++) {
            v[2 * j] = E2M1_VALUES[blk[j] & 15];
            v[2 * j + 1] = E2M1_VALUES[blk[j] >> 4];
        }
    } else {
        const int8_t *q = (const int8_t *)blk;
        for (int j = 0; j < QK; j++) v[j] = (float)q[j];
    }
}

#ifdef __AVX512F__
/* lane i of the result: the sum of the 16 lanes of a[i] (i < 16), by a fixed tree for each position i (pairs
   within 128-bit lanes, then across them), in ~30 instructions where 16 separate reductions take ~130 */
static inline __m512 sum_lanes16(const __m512 *a) {
    __m512 b[8], c[4];
    for (int i = 0; i < 8; i++) /* per 128-bit lane: a[2i] 0+2, a[2i+1] 0+2, a[2i] 1+3, a[2i+1] 1+3 */
        b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) /* per 128-bit lane: the lane's sums of a[4i .. 4i+3] */
        c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 e0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x44), _mm512_shuffle_f32x4(c[0], c[1], 0xEE));
    const __m512 e1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x44), _mm512_shuffle_f32x4(c[2], c[3], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(e0, e1, 0x88), _mm512_shuffle_f32x4(e0, e1, 0xDD));
}

/* acc[i] += the weight row w_i[0..kn) times x[0..kn), lane-wise (i < nn <= 16; lane j takes k = j mod 16) */
static inline __attribute__((always_inline)) void chains16(__m512 *acc, const float *x, const float *w, int64_t stride,
                                                           int nn, int64_t kn) {
    __m512 a[16]; /* (a local copy, and a constant trip count below: the accumulators stay in registers) */
    for (int i = 0; i < 16; i++) a[i] = acc[i];
    if (nn == 16) {
        for (int64_t k = 0; k < kn; k += 16) {
            const __m512 xv = _mm512_loadu_ps(x + k);
            for (int i = 0; i < 16; i++) a[i] = _mm512_fmadd_ps(_mm512_loadu_ps(w + i * stride + k), xv, a[i]);
        }
    } else {
        for (int64_t k = 0; k < kn; k += 16) {
            const __m512 xv = _mm512_loadu_ps(x + k);
            for (int i = 0; i < nn; i++) a[i] = _mm512_fmadd_ps(_mm512_loadu_ps(w + i * stride + k), xv, a[i]);
        }
    }
    for (int i = 0; i < 16; i++) acc[i] = a[i];
}

/* acc[t][i0 + i] += weight row w_{i0+i}[0..kn) times x[t][0..kn) (i < 8, t < R <= 3), lane-wise: the chains of
   `chains16` (the same bits), with each weight vector loaded once for the R rows (one load per R multiply-adds
   where `chains16` row by row loads one per multiply-add: the loads, not the arithmetic, bound it). */
static inline __attribute__((always_inline)) void chains8_rows(const int R, __m512 (*acc)[16], const float *const *x,
                                                               int i0, const float *w, int64_t stride, int64_t kn) {
    __m512 a[3][8]; /* (constant trip counts: registers) */
    for (int t = 0; t < R; t++)
        for (int i = 0; i < 8; i++) a[t][i] = acc[t][i0 + i];
    for (int64_t k = 0; k < kn; k += 16) {
        __m512 xv[3];
        for (int t = 0; t < R; t++) xv[t] = _mm512_loadu_ps(x[t] + k);
        for (int i = 0; i < 8; i++) {
            const __m512 wv = _mm512_loadu_ps(w + (i0 + i) * stride + k);
            for (int t = 0; t < R; t++) a[t][i] = _mm512_fmadd_ps(wv, xv[t], a[t][i]);
        }
    }
    for (int t = 0; t < R; t++)
        for (int i = 0; i < 8; i++) acc[t][i0 + i] = a[t][i];
}

/* how many rows of a tile `chains_rows` takes at once, `left` rows to go: three (two, one at the end) where the
   tile has its 16 weight rows, else one */
static inline int rows_at_once(int nn, int left) { return nn < 16 ? 1 : left < 3 ? left : 3; }

/* rows x[0..T) (T = rows_at_once(nn, ...)) against weight rows i < nn, as `chains16` on each row */
static inline void chains_rows(int T, __m512 (*acc)[16], const float *const *x, const float *w, int64_t stride,
                               int nn, int64_t kn) {
    if (T == 1) {
        chains16(acc[0], x[0], w, stride, nn, kn);
        return;
    }
    for (int i0 = 0; i0 < 16; i0 += 8) {
        if (T == 3)
            chains8_rows(3, acc, x, i0, w, stride, kn);
        else
            chains8_rows(2, acc, x, i0, w, stride, kn);
    }
}

/* float32 weights: rows x_T[t] against weight rows [n0, n1) (at most 16), 16 outputs at a time: 16 lane-wise
   chains over K per row (x loaded once per 16 of K for all 16 outputs), then one `sum_lanes16`. Where the
   rows lie a multiple of 2 KiB apart (K a multiple of 512) 16 of them map to the same L1 sets and thrash its
   8 ways: there, for more than one row, K runs in blocks of KF_BLOCK whose 16 rows are first copied side by
   side, every row of the tile passing over the copy (its chains kept in acc_T between blocks). The same lane-wise chains either way: a
   row's result depends on its x and the weight only (the same for any T). */
#define KF_BLOCK 256
static void tile_f32(const float *const *x_T, int T, const float *w, int64_t n0, int64_t n1, int64_t K,
                     float *const *y_T) {
    const int nn = (int)(n1 - n0);
    const __mmask16 out = (__mmask16)((1u << nn) - 1);
    const float *w0 = w + n0 * K;
    if (K % 512 != 0 || T == 1) { /* in place, in one pass (one row reads each weight line once: no reuse to lose) */
        for (int t = 0; t < T;) {
            const int r = rows_at_once(nn, T - t);
            __m512 acc[3][16];
            for (int u = 0; u < r; u++)
                for (int i = 0; i < 16; i++) acc[u][i] = _mm512_setzero_ps();
            chains_rows(r, acc, x_T + t, w0, K, nn, K);
            for (int u = 0; u < r; u++) _mm512_mask_storeu_ps(y_T[t + u] + n0, out, sum_lanes16(acc[u]));
            t += r;
        }
    } else {
        __m512 acc_T[MAX_TILE][16];
        for (int t = 0; t < T; t++)
            for (int i = 0; i < 16; i++) acc_T[t][i] = _mm512_setzero_ps();
        float wb[16 * KF_BLOCK] __attribute__((aligned(64)));
        for (int64_t k0 = 0; k0 < K; k0 += KF_BLOCK) {
            for (int i = 0; i < nn; i++)
                for (int64_t k = 0; k < KF_BLOCK; k += 16)
                    _mm512_store_ps(wb + i * KF_BLOCK + k, _mm512_loadu_ps(w0 + i * K + k0 + k));
            for (int t = 0; t < T;) {
                const int r = rows_at_once(nn, T - t);
                const float *x_r[3];
                for (int u = 0; u < r; u++) x_r[u] = x_T[t + u] + k0;
                chains_rows(r, acc_T + t, x_r, wb, KF_BLOCK, nn, KF_BLOCK);
                t += r;
            }
        }
        for (int t = 0; t < T; t++) _mm512_mask_storeu_ps(y_T[t] + n0, out, sum_lanes16(acc_T[t]));
    }
}
#endif

#ifdef MATVEC_AVX2
/* the 32 weight values of a block of codes (q8_0, q4_0, mxfp4), unscaled, as 4 vectors of 8 (`decode_block`) */
static inline void decode_block8(int fmt, const uint8_t *blk, __m256 *v) {
    if (fmt == Q8_0) {
        for (int i = 0; i < 4; i++)
            v[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 8 * i))));
    } else if (fmt == Q4_0) { /* bytes 8i..8i+7: elements 8i.. (low nibbles) and 16 + 8i.. (high nibbles) */
        const __m256i low4 = _mm256_set1_epi32(15), eight = _mm256_set1_epi32(8);
        for (int i = 0; i < 2; i++) {
            const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 8 * i)));
            v[i] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(c, low4), eight));
            v[i + 2] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(c, 4), eight));
        }
    } else { /* mxfp4: byte j holds elements 2j (low nibble) and 2j + 1; E2M1 = magnitude (bits 0-2), sign (bit 3) */
        const __m256 magnitude = _mm256_loadu_ps(E2M1_VALUES);
        const __m256i shifts = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
        for (int i = 0; i < 4; i++) {
            const __m128i b4 = _mm_cvtsi32_si128(*(const int32_t *)(blk + 4 * i)); /* bytes 4i..4i+3 */
            const __m256i c = _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(_mm_unpacklo_epi8(b4, b4)),
                                                                 shifts), _mm256_set1_epi32(15));
            const __m256 m = _mm256_permutevar8x32_ps(magnitude, c); /* (uses the low 3 bits) */
            const __m256i sign = _mm256_slli_epi32(_mm256_srli_epi32(c, 3), 31);
            v[i] = _mm256_xor_ps(m, _mm256_castsi256_ps(sign));
        }
    }
}

/* lane i of the result: the sum of the 8 lanes of a[i] (i < 4), by the tree ((0+1)+(2+3)) + ((4+5)+(6+7)) */
static inline __m128 sum_lanes4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3)); /* a[i]'s (0..3, 4..7) sums */
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* Short weight rows (at most PREFETCH_MAX_K floats, 2 KiB) end before the hardware's stream prefetcher has ramped
   up, so the tiles below read them from memory at a fraction of its bandwidth: they ask for the line of the next
   tile's rows (`ahead` floats on) that they will read there, one tile early. Longer rows stream by themselves
   (prefetching them too measured slower: benchmarks/results/serve_cpu.md). */
#define PREFETCH_MAX_K 512
static inline void prefetch_rows(int n, const float *const *wi, int64_t ahead) {
    for (int i = 0; i < n; i++) _mm_prefetch((const char *)(wi[i] + ahead), _MM_HINT_T0);
}

/* y_t[i] (t < 2, i < nn <= 4) = weight row w_i[0..K) times x_t[0..K): per output 8 lane-wise chains (lane j takes
   k = j mod 8, in k order), then `sum_lanes4`: the same bits for a row whatever the tile. Two rows at once load each
   weight vector once for both (8 accumulators, 2 x and 1 weight register: 11 of the 16). */
static inline void chains4_rows2(const float *const *x_T, const float *w, int64_t stride, int nn, int64_t K,
                                 float *const *y_T, int64_t n0) {
    __m256 a[2][4];
    for (int t = 0; t < 2; t++)
        for (int i = 0; i < 4; i++) a[t][i] = _mm256_setzero_ps();
    const float *wi[4]; /* rows past nn repeat the last one (computed, not stored) */
    for (int i = 0; i < 4; i++) wi[i] = w + (i < nn ? i : nn - 1) * stride;
    for (int64_t k = 0; k < K; k += 8) {
        if (k % 16 == 0 && K <= PREFETCH_MAX_K) prefetch_rows(4, wi, 4 * stride + k);
        const __m256 x0 = _mm256_loadu_ps(x_T[0] + k), x1 = _mm256_loadu_ps(x_T[1] + k);
        for (int i = 0; i < 4; i++) {
            const __m256 wv = _mm256_loadu_ps(wi[i] + k);
            a[0][i] = _mm256_fmadd_ps(wv, x0, a[0][i]);
            a[1][i] = _mm256_fmadd_ps(wv, x1, a[1][i]);
        }
    }
    for (int t = 0; t < 2; t++) {
        float out[4];
        _mm_storeu_ps(out, sum_lanes4(a[t][0], a[t][1], a[t][2], a[t][3]));
        for (int i = 0; i < nn; i++) y_T[t][n0 + i] = out[i];
    }
}

/* one row against 8 weight rows (nn <= 8) at a time: x loaded once per 8 of K for the 8 outputs */
static inline void chains8_row(const float *x, const float *w, int64_t stride, int nn, int64_t K, float *y,
                               int64_t n0) {
    __m256 a[8];
    const float *wi[8];
    for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps(), wi[i] = w + (i < nn ? i : nn - 1) * stride;
    for (int64_t k = 0; k < K; k += 8) {
        if (k % 16 == 0 && K <= PREFETCH_MAX_K) prefetch_rows(8, wi, 8 * stride + k);
        const __m256 xv = _mm256_loadu_ps(x + k);
        for (int i = 0; i < 8; i++) a[i] = _mm256_fmadd_ps(_mm256_loadu_ps(wi[i] + k), xv, a[i]);
    }
    float out[8];
    _mm_storeu_ps(out, sum_lanes4(a[0], a[1], a[2], a[3]));
    _mm_storeu_ps(out + 4, sum_lanes4(a[4], a[5], a[6], a[7]));
    for (int i = 0; i < nn; i++) y[n0 + i] = out[i];
}

/* float32 weights without AVX-512: rows x_T[t] against weight rows [n0, n1) (at most 16); a lone row 8 outputs
   at a time, more rows two at a time 4 outputs at a time (each output: the chains and tree above, so a row's
   result depends on its x and the weight only) */
static void tile_f32(const float *const *x_T, int T, const float *w, int64_t n0, int64_t n1, int64_t K,
                     float *const *y_T) {
    for (int t = 0; t < T;) {
        const int r = T - t >= 2 ? 2 : 1;
        for (int64_t n = n0; n < n1;) {
            const int nn = (int)(n1 - n < (r == 1 ? 8 : 4) ? n1 - n : (r == 1 ? 8 : 4));
            if (r == 1)
                chains8_row(x_T[t], w + n * K, K, nn, K, y_T[t], n);
            else
                chains4_rows2(x_T + t, w + n * K, K, nn, K, y_T + t, n);
            n += nn;
        }
        t += r;
    }
}
#endif

/* rows x_T[t] (t < T) against weight rows [n0, n1) of one weight */
static void tile(int fmt, const float *const *x_T, int T, const uint8_t *q, const void *d, int64_t n0,
                 int64_t n1, int64_t B, float *const *y_T) {
#if defined(__AVX512F__) || defined(MATVEC_AVX2)
    if (fmt == F32) {
        tile_f32(x_T, T, (const float *)q, n0, n1, B * QK, y_T);
        return;
    }
#endif
    const int64_t row_bytes = B * block_bytes(fmt);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *qn = q + n * row_bytes;
        const int scaled = fmt != F32; /* scale of block b: block_scale(fmt, d, n * B + b) */
#ifdef __AVX512F__
        __m512 acc_lo[MAX_TILE], acc_hi[MAX_TILE]; /* two chains per row: half the FMA latency per block */
        for (int t = 0; t < T; t++) acc_lo[t] = acc_hi[t] = _mm512_setzero_ps();
        const __m512 lut = fmt == MXFP4 ? _mm512_loadu_ps(E2M1_VALUES)
                                        : _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
        /* mxfp4: the even elements (low nibbles) and the odd ones (high) back in order, 0..15 and 16..31 */
        const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        for (int64_t b = 0; b < B; b++) {
            __m512 lo, hi;
            if (fmt == F32) {
                lo = _mm512_loadu_ps((const float *)(qn + b * 128));
                hi = _mm512_loadu_ps((const float *)(qn + b * 128) + 16);
            } else if (fmt == Q4_0 || fmt == MXFP4) {
                __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qn + b * 16)));
                lo = _mm512_permutexvar_ps(c, lut); /* uses the low 4 bits of each lane */
                hi = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), lut);
                if (fmt == MXFP4) {
                    const __m512 even = lo;
                    lo = _mm512_permutex2var_ps(even, first, hi);
                    hi = _mm512_permutex2var_ps(even, second, hi);
                }
            } else {
                __m256i c = _mm256_loadu_si256((const __m256i *)(qn + b * 32));
                lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(c)));
                hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(c, 1)));
            }
            if (scaled) {
                const __m512 s = _mm512_set1_ps(block_scale(fmt, d, n * B + b));
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
#elif defined(MATVEC_AVX2)
        (void)scaled; /* (a block format here: float32 took tile_f32) */
        __m256 acc[MAX_TILE][4]; /* lane j of vector i: the portable loop's acc[t][8 i + j] */
        for (int t = 0; t < T; t++)
            for (int i = 0; i < 4; i++) acc[t][i] = _mm256_setzero_ps();
        for (int64_t b = 0; b < B; b++) {
            __m256 v[4];
            decode_block8(fmt, qn + b * block_bytes(fmt), v);
            const __m256 sv = _mm256_set1_ps(block_scale(fmt, d, n * B + b));
            for (int i = 0; i < 4; i++) v[i] = _mm256_mul_ps(v[i], sv);
            for (int t = 0; t < T; t++) {
                const float *xb = x_T[t] + b * QK;
                for (int i = 0; i < 4; i++) acc[t][i] = _mm256_fmadd_ps(v[i], _mm256_loadu_ps(xb + 8 * i), acc[t][i]);
            }
        }
        for (int t = 0; t < T; t++) { /* the 32 lanes by a fixed tree (the portable loop sums them in order) */
            const __m256 a = _mm256_add_ps(_mm256_add_ps(acc[t][0], acc[t][1]), _mm256_add_ps(acc[t][2], acc[t][3]));
            const __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
            const __m128 h2 = _mm_hadd_ps(h, h);
            y_T[t][n] = _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)));
        }
#else
        float acc[MAX_TILE][QK];
        memset(acc, 0, sizeof(acc));
        float v[QK];
        for (int64_t b = 0; b < B; b++) {
            decode_block(fmt, qn + b * block_bytes(fmt), v);
            if (scaled) {
                const float s = block_scale(fmt, d, n * B + b);
                for (int j = 0; j < QK; j++) v[j] *= s;
            }
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

/* Whether row x (K floats) is all zeros (+0 or -0): such a row's product is zero for any finite weight. */
static int zero_row(const float *x, int64_t K) {
    const uint32_t *bits = (const uint32_t *)x;
    for (int64_t k = 0; k < K; k++)
        if (bits[k] & 0x7fffffffu) return 0;
    return 1;
}

/* The rows of x (R, K) that are not all zeros, in weight order (a stable sort by index), cut into groups
   of rows with the same weight, at most MAX_TILE each: group g is order[group_start[g] .. group_start[g+1]).
   A row of zeros gets a row of zeros in y (N outputs) and reads no weight: the engine's decode step zeroes
   the rows of its bucket that do not decode, so they cost nothing here (for finite weights the same bits as
   the product; an inf or NaN weight would give NaN there). Every other row is computed as if alone.
   Returns the number of groups, -1 when out of memory, -2 when an index is outside [0, E). */
static int64_t group_rows(int64_t R, const int64_t *index, int64_t E, const float *x, int64_t K, float *y, int64_t N,
                          int64_t *order, int64_t *group_start) {
    if (index)
        for (int64_t r = 0; r < R; r++)
            if (index[r] < 0 || index[r] >= E) return -2;
    int64_t L = 0; /* the live rows, in row order, kept in group_start until the sort below has read them */
    for (int64_t r = 0; r < R; r++) {
        if (zero_row(x + r * K, K))
            for (int64_t n = 0; n < N; n++) y[r * N + n] = 0.0f;
        else
            group_start[L++] = r;
    }
    if (!index) {
        for (int64_t i = 0; i < L; i++) order[i] = group_start[i];
    } else { /* counting sort by weight index, stable */
        int64_t *start = calloc((size_t)E + 1, sizeof(int64_t));
        if (!start) return -1;
        for (int64_t i = 0; i < L; i++) start[index[group_start[i]] + 1]++;
        for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];
        for (int64_t i = 0; i < L; i++) order[start[index[group_start[i]]]++] = group_start[i];
        free(start);
    }
    int64_t groups = 0;
    for (int64_t i = 0; i < L; i++) {
        const int same = i > 0 && (!index || index[order[i]] == index[order[i - 1]]);
        if (!same || i - group_start[groups - 1] == MAX_TILE) group_start[groups++] = i;
    }
    group_start[groups] = L;
    return groups;
}

/* y (R, N) = rows of x (R, K) against weight `index[r]` of q (E, N, B*bytes) / d (E, N, B) (float32; E8M0
   bytes for MXFP4; unused for F32); index NULL: every row against weight 0. fmt: Q8_0, Q4_0, MXFP4 or F32.
   Rows with the same weight are grouped (up to MAX_TILE per group), so a weight is read once per group
   rather than once per row; rows of zeros are skipped (`group_rows`). Returns 0, -1 when out of memory, -2
   when an index is outside [0, E). */
int moekit_qmatvec(int fmt, const float *x, int64_t R, const uint8_t *q, const void *d, int64_t E, int64_t N,
                   int64_t B, const int64_t *index, float *y) {
    const int64_t K = B * QK, chunk = 16;
    const int64_t n_chunks = (N + chunk - 1) / chunk;
    const int64_t weight_bytes = N * B * block_bytes(fmt);
    /* rows in weight order (a stable sort by index: R is small, the experts of a few tokens) */
    int64_t *order = malloc(sizeof(int64_t) * (R > 0 ? R : 1));
    int64_t *group_start = malloc(sizeof(int64_t) * (R + 1));
    if (!order || !group_start) {
        free(order);
        free(group_start);
        return -1;
    }
    const int64_t groups = group_rows(R, index, E, x, K, y, N, order, group_start);
    if (groups < 0) {
        free(order);
        free(group_start);
        return (int)groups;
    }
#pragma omp parallel for schedule(static) if (groups * n_chunks > 1) /* (one tile: no other thread to wake) */
    for (int64_t task = 0; task < groups * n_chunks; task++) {
        /* chunk-major: a chunk of the weight is read from memory once and stays in cache for every group of rows
           (group-major read a wide weight once per group: about twice as slow for a wide head at 64 rows) */
        const int64_t g = task % groups, c = task / groups;
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
        const void *de = fmt == F32 ? NULL : fmt == MXFP4 ? (const void *)((const uint8_t *)d + e * N * B)
                                                          : (const void *)((const float *)d + e * N * B);
        tile(fmt, x_T, T, q + e * weight_bytes, de, n0, n1, B, y_T);
    }
    free(order);
    free(group_start);
    return 0;
}

/* y = the products of x (R, K) with W float32 weights w[i] (N_i, K), one after another, each (R, N_i) row-major
   (y_i starts at R (N_0 + ... + N_{i-1})): the projections that share an input (attention's q, k and v) in one
   call and one parallel region, each a contiguous block. Every output is computed as `moekit_qmatvec` computes
   it (the same tile, the same bits); rows of zeros get zeros. Returns 0, or -1 when out of memory. */
int moekit_f32matvec_cat(const float *x, int64_t R, const float *const *w, const int64_t *N, int64_t W, int64_t K,
                         float *y) {
    const int64_t chunk = 16, B = K / QK;
    int64_t N_all = 0;
    int64_t *first = malloc(sizeof(int64_t) * (W + 1));          /* weight i: chunks first[i] .. first[i + 1] */
    int64_t *offset = malloc(sizeof(int64_t) * (W > 0 ? W : 1)); /* weight i: y_i = y + R offset[i] */
    int64_t *order = malloc(sizeof(int64_t) * (R > 0 ? R : 1));
    int64_t *group_start = malloc(sizeof(int64_t) * (R + 1));
    if (!first || !offset || !order || !group_start) {
        free(first);
        free(offset);
        free(order);
        free(group_start);
        return -1;
    }
    first[0] = 0;
    for (int64_t i = 0; i < W; i++) {
        offset[i] = N_all;
        N_all += N[i];
        first[i + 1] = first[i] + (N[i] + chunk - 1) / chunk;
    }
    /* (no index: never fails) rows of zeros get zeros in y_0 there, and in the other products here */
    const int64_t groups = group_rows(R, NULL, 1, x, K, y, N[0], order, group_start);
    for (int64_t r = 0; r < R && group_start[groups] < R; r++)
        if (zero_row(x + r * K, K))
            for (int64_t i = 1; i < W; i++)
                for (int64_t n = 0; n < N[i]; n++) y[R * offset[i] + r * N[i] + n] = 0.0f;
#pragma omp parallel for schedule(static) if (groups * first[W] > 1)
    for (int64_t task = 0; task < groups * first[W]; task++) {
        const int64_t g = task % groups, c = task / groups;
        int64_t i = 0;
        while (c >= first[i + 1]) i++;
        const int64_t i0 = group_start[g];
        const int T = (int)(group_start[g + 1] - i0);
        const float *x_T[MAX_TILE];
        float *y_T[MAX_TILE];
        for (int t = 0; t < T; t++) {
            x_T[t] = x + order[i0 + t] * K;
            y_T[t] = y + R * offset[i] + order[i0 + t] * N[i];
        }
        const int64_t n0 = (c - first[i]) * chunk, n1 = n0 + chunk < N[i] ? n0 + chunk : N[i];
        tile(F32, x_T, T, (const uint8_t *)w[i], NULL, n0, n1, B, y_T);
    }
    free(first);
    free(offset);
    free(order);
    free(group_start);
    return 0;
}

/* ---- 8-bit activations ---------------------------------------------------------------------------------

   Each 32-block of a row of x is quantized like a q8_0 weight: d_x = max|x| / 127 (float32, where GGML
   stores fp16), q_x = round-half-even(x * (1 / d_x)), and
       y[r, n] = sum_b d[n, b] * d_x[r, b] * sum_j v(n, b, j) * q_x[r, 32 b + j]
   with the inner sum in exact integers. The weight is first repacked (moekit_x8_pack) into panels of
   16 output rows: for block b of group g, 8 vectors of 64 bytes, vector s holding for each of the 16
   rows the 4 unsigned codes of positions 4s..4s+3 (q4_0: the code itself, 0..15, two vectors per 64
   bytes in low and high nibbles; q8_0: the int8 value + 128), and the 16 rows' float32 block scales.
   One AVX-512 VNNI instruction then multiplies the 4 codes of 16 rows by 4 broadcast bytes of x, so a
   block of 16 rows costs 8 integer instructions and one float multiply-add; the codes' offset (8 or
   128) times the block's sum of q_x is subtracted once per block. Each output's float sum runs over
   blocks in order, the same for any number of rows (batch invariant). */

#define PANEL 16              /* output rows per panel */
#define SERIAL_BELOW (1 << 18) /* multiply-adds below which one thread does the whole product */

static inline int64_t panel_bytes(int fmt) { return fmt == Q4_0 ? 256 : 512; } /* one block of a panel */
static inline int32_t code_offset(int fmt) { return fmt == Q4_0 ? 8 : 128; }

/* the unsigned code of weight row n (< N), position k, of q (N, B*bytes) */
static inline uint8_t unsigned_code(int fmt, const uint8_t *q, int64_t n, int64_t B, int64_t k) {
    const uint8_t *blk = q + (n * B + k / QK) * block_bytes(fmt);
    const int j = (int)(k % QK);
    if (fmt == Q4_0) return j < 16 ? blk[j] & 15 : blk[j - 16] >> 4;
    return (uint8_t)((int)(int8_t)blk[j] + 128);
}

/* panels (E, G, B, panel_bytes) and pscale (E, G, B, 16) from q (E, N, B*bytes) and d (E, N, B);
   rows past N (the last panel's padding) get code offset (value 0) and scale 0 */
void moekit_x8_pack(int fmt, const uint8_t *q, const float *d, int64_t E, int64_t N, int64_t B, uint8_t *panels,
                    float *pscale) {
    const int64_t G = (N + PANEL - 1) / PANEL, pb = panel_bytes(fmt);
#pragma omp parallel for schedule(static)
    for (int64_t eg = 0; eg < E * G; eg++) {
        const int64_t e = eg / G, g = eg % G;
        const uint8_t *qe = q + e * N * B * block_bytes(fmt);
        for (int64_t b = 0; b < B; b++) {
            uint8_t *out = panels + (eg * B + b) * pb;
            float *sc = pscale + (eg * B + b) * PANEL;
            for (int j = 0; j < PANEL; j++) {
                const int64_t n = g * PANEL + j;
                sc[j] = n < N ? d[(e * N + n) * B + b] : 0.0f;
                for (int s = 0; s < 8; s++)
                    for (int i = 0; i < 4; i++) {
                        const int64_t k = b * QK + 4 * s + i;
                        const uint8_t c = n < N ? unsigned_code(fmt, qe, n, B, k) : (uint8_t)code_offset(fmt);
                        if (fmt == Q4_0) /* vectors s and s + 4 share 64 bytes: low and high nibbles */
                            out[(s % 4) * 64 + j * 4 + i] |= (uint8_t)(s < 4 ? c : c << 4);
                        else
                            out[s * 64 + j * 4 + i] = c;
                    }
            }
        }
    }
}

/* one row of x quantized: q (B, 32) int8, d (B) float32, sums (B) int32 of each block's q */
static void quantize_row_x8(const float *x, int64_t B, int8_t *q, float *d, int32_t *sums) {
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) /* NaN sticks (and then reaches y through d) */
            amax = fabsf(xb[j]) > amax || xb[j] != xb[j] ? fabsf(xb[j]) : amax;
        const float db = amax / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
        int32_t sum = 0;
        for (int j = 0; j < QK; j++) {
            q[b * QK + j] = (int8_t)nearbyintf(xb[j] * id);
            sum += q[b * QK + j];
        }
        d[b] = db;
        sums[b] = sum;
    }
}

typedef struct {
    const int8_t *q;
    const float *d;
    const int32_t *sums;
} XRow;

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
/* panel (B blocks of one group) against T rows; T is a constant where this is inlined (a switch below) */
static inline __attribute__((always_inline)) void panel_x8(int fmt, const int T, const XRow *x_T, const uint8_t *pan,
                                                          const float *ps, int64_t B, float *const *y_T, int64_t n0,
                                                          int64_t N) {
    const int S = T <= 2 ? 4 : 2; /* independent integer chains per row (integer sums: any split is exact) */
    const __m512i m4 = _mm512_set1_epi8(15);
    const int32_t off = code_offset(fmt);
    __m512 acc[MAX_TILE];
    for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < B; b++) {
        __m512i w[8];
        if (fmt == Q4_0) {
            for (int s = 0; s < 4; s++) {
                const __m512i p = _mm512_loadu_si512(pan + b * 256 + s * 64);
                w[s] = _mm512_and_si512(p, m4);
                w[s + 4] = _mm512_and_si512(_mm512_srli_epi16(p, 4), m4);
            }
        } else {
            for (int s = 0; s < 8; s++) w[s] = _mm512_loadu_si512(pan + b * 512 + s * 64);
        }
        const __m512 dw = _mm512_loadu_ps(ps + b * PANEL);
        for (int t = 0; t < T; t++) {
            const int32_t *x4 = (const int32_t *)(x_T[t].q + b * QK);
            __m512i dot[4];
            dot[0] = _mm512_set1_epi32(-off * x_T[t].sums[b]);
            for (int c = 1; c < S; c++) dot[c] = _mm512_setzero_si512();
            for (int s = 0; s < 8; s++) dot[s % S] = _mm512_dpbusd_epi32(dot[s % S], w[s], _mm512_set1_epi32(x4[s]));
            for (int c = 1; c < S; c++) dot[0] = _mm512_add_epi32(dot[0], dot[c]);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[0]), _mm512_mul_ps(dw, _mm512_set1_ps(x_T[t].d[b])), acc[t]);
        }
    }
    const __mmask16 keep = N - n0 >= PANEL ? (__mmask16)0xffff : (__mmask16)((1u << (N - n0)) - 1);
    for (int t = 0; t < T; t++) _mm512_mask_storeu_ps(y_T[t] + n0, keep, acc[t]);
}

static void panel_rows(int fmt, int T, const XRow *x_T, const uint8_t *pan, const float *ps, int64_t B,
                       float *const *y_T, int64_t n0, int64_t N) {
    switch (T) { /* a constant T per case: the accumulators stay in registers */
    case 1: panel_x8(fmt, 1, x_T, pan, ps, B, y_T, n0, N); break;
    case 2: panel_x8(fmt, 2, x_T, pan, ps, B, y_T, n0, N); break;
    case 3: panel_x8(fmt, 3, x_T, pan, ps, B, y_T, n0, N); break;
    case 4: panel_x8(fmt, 4, x_T, pan, ps, B, y_T, n0, N); break;
    case 5: panel_x8(fmt, 5, x_T, pan, ps, B, y_T, n0, N); break;
    case 6: panel_x8(fmt, 6, x_T, pan, ps, B, y_T, n0, N); break;
    case 7: panel_x8(fmt, 7, x_T, pan, ps, B, y_T, n0, N); break;
    default: panel_x8(fmt, 8, x_T, pan, ps, B, y_T, n0, N); break;
    }
}
#else
static void panel_rows(int fmt, int T, const XRow *x_T, const uint8_t *pan, const float *ps, int64_t B,
                       float *const *y_T, int64_t n0, int64_t N) {
    const int32_t off = code_offset(fmt);
    for (int j = 0; j < PANEL && n0 + j < N; j++)
        for (int t = 0; t < T; t++) {
            float acc = 0.0f;
            for (int64_t b = 0; b < B; b++) {
                int32_t dot = -off * x_T[t].sums[b];
                for (int s = 0; s < 8; s++)
                    for (int i = 0; i < 4; i++) {
                        const uint8_t byte = pan[b * panel_bytes(fmt) + (fmt == Q4_0 ? s % 4 : s) * 64 + j * 4 + i];
                        const int32_t code = fmt == Q4_0 ? (s < 4 ? byte & 15 : byte >> 4) : byte;
                        dot += code * x_T[t].q[b * QK + 4 * s + i];
                    }
                acc += (float)dot * (ps[b * PANEL + j] * x_T[t].d[b]);
            }
            y_T[t][n0 + j] = acc;
        }
}
#endif

/* y (R, N) = rows of x (R, K) with 8-bit activations against weight `index[r]` of the panels (E, G, B, ...)
   of moekit_x8_pack (index NULL: every row against weight 0). fmt: Q8_0 or Q4_0. Returns 0, -1 when out
   of memory, -2 when an index is outside [0, E). */
int moekit_x8_matvec(int fmt, const float *x, int64_t R, const uint8_t *panels, const float *pscale, int64_t E,
                     int64_t N, int64_t B, const int64_t *index, float *y) {
    const int64_t K = B * QK, G = (N + PANEL - 1) / PANEL, chunk = 4; /* panels per task */
    const int64_t n_chunks = (G + chunk - 1) / chunk;
    const int64_t n1 = R > 0 ? R : 1;
    int64_t *order = malloc(sizeof(int64_t) * n1), *group_start = malloc(sizeof(int64_t) * (R + 1));
    int8_t *xq = malloc((size_t)n1 * K);
    float *xd = malloc(sizeof(float) * n1 * B);
    int32_t *xs = malloc(sizeof(int32_t) * n1 * B);
    const int64_t groups = order && group_start ? group_rows(R, index, E, x, K, y, N, order, group_start) : -1;
    if (groups < 0 || !xq || !xd || !xs) {
        free(order), free(group_start), free(xq), free(xd), free(xs);
        return groups < 0 ? (int)groups : -1;
    }
    /* one parallel region (quantize, then the panels); small products run on one thread: waking the
       others costs more than they save */
#pragma omp parallel if (R * N * K >= SERIAL_BELOW)
    {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; r++) quantize_row_x8(x + r * K, B, xq + r * K, xd + r * B, xs + r * B);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < groups * n_chunks; task++) {
        const int64_t grp = task % groups, c = task / groups; /* chunk-major, as in moekit_qmatvec */
        const int64_t i0 = group_start[grp];
        const int T = (int)(group_start[grp + 1] - i0);
        const int64_t e = index ? index[order[i0]] : 0;
        XRow x_T[MAX_TILE];
        float *y_T[MAX_TILE];
        for (int t = 0; t < T; t++) {
            const int64_t r = order[i0 + t];
            x_T[t] = (XRow){xq + r * K, xd + r * B, xs + r * B};
            y_T[t] = y + r * N;
        }
        for (int64_t g = c * chunk; g < G && g < (c + 1) * chunk; g++)
            panel_rows(fmt, T, x_T, panels + (e * G + g) * B * panel_bytes(fmt), pscale + (e * G + g) * B * PANEL, B,
                       y_T, g * PANEL, N);
    }
    }
    free(order), free(group_start), free(xq), free(xd), free(xs);
    return 0;
}
