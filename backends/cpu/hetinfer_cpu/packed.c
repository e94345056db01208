/* hetinfer CPU kernels for packed GGUF weights (layouts: core/hetinfer/packed.py).

   out (M, N) = x (M, K) @ W^T for W packed (N rows of K // block blocks):
   1. hi_pk_quantize: x is rounded to 8 bits per block of 32 (legacy formats) or 256 values
      (k-quants): q = round(x / dx), dx = max|x| / 127, and the sums of q per 16 values (the
      offset terms of q4_1, q5_k ... need them). Once per product, reused by every row.
   2. hi_pk_matmul: each packed row meets the quantized activations in integer dot products
      (u8 x s8 -> int32), one float scale per block (sub-block for the k-quants). Variants chosen
      at run time by __builtin_cpu_supports (hi_pk_select): AVX-512 VNNI (vpdpbusd on 512-bit
      vectors for q8_0 and the k-quants, 256-bit for the 4/5-bit legacy formats), VNNI on 256-bit
      vectors only, AVX2 (vpmaddubsw + vpmaddwd), and plain C for any other CPU. No -march flag:
      each variant carries __attribute__((target)), so one build runs on any x86-64. Rows of W are split into chunks of RC rows
      handed out to OpenMP threads dynamically (schedule(dynamic)), so a thread slowed by
      another process takes fewer chunks instead of holding the others up; idle workers spin a
      while, then sleep (GOMP_SPINCOUNT, set by int8.build_library before the library loads), and
      a caller left waiting for a descheduled worker runs the next products alone (par.inc). Prefill:
      a chunk's rows stay in cache while tiles of MR activation rows pass over them, each
      unpacked block of W meeting MR rows, so W is read from memory once per product.
   3. hi_pk_dequant: rows of W (or rows picked by ids: embedding) to float32; prefill multiplies
      dequantized tiles with the f32 kernel (packed.py).
   4. hi_pk_quantize_norm / hi_pk_finish: a decode product's rms_norm prologue and its bias,
      swiglu and residual epilogue, so a product is three C calls.
   5. hi_pk_decode_layer (ops.decode_layer): a whole decoder layer for decode rows in one call --
      norms, 8-bit rounding, the products (row parts in different formats), bias, rope, the paged
      cache write, attention (vectorized per kv head, its query heads together), swiglu and both
      residual adds -- so a decode token costs a few calls from Python, not ~200.
   Decode of one row of a legacy format (the common case) runs dot1_*: two blocks per step into
   two accumulators, the offset term from dx * sum(q) per block made once per product; every
   kernel is instantiated with the format and its row count as constants (registers, not stack). */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "par.inc"

/* ggml type ids (hetinfer.packed.FORMATS) */
enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14 };
#define MR 4           /* activation rows per tile */
#define RC 16          /* weight rows per chunk handed to a thread */
#define PF 4           /* rows ahead a decode product prefetches (the streams are short: 0.2-3 KB a row) */
#define PAR_MIN ((int64_t)1 << 18)   /* values of W x rows below which one thread runs the product
                                        (with workers that spin, 2^18 rather than 2^19 split SmolLM2's
                                        o product too: decode at 2 threads 61-63 -> 65-68 tok/s, with
                                        the attention split from 2048 keys x heads on) */

static int block_of(int type) { return type >= T_Q4_K ? 256 : 32; }

static int bytes_of(int type) {
    switch (type) {
    case T_Q4_0: return 18; case T_Q4_1: return 20; case T_Q5_0: return 22; case T_Q5_1: return 24;
    case T_Q8_0: return 34; case T_Q4_K: return 144; case T_Q5_K: return 176; case T_Q6_K: return 210;
    }
    return 0;
}

static inline float h2f(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    uint32_t s = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, f;
    if (e == 0) {
        float v = ldexpf((float)m, -24);
        return s ? -v : v;
    }
    f = (e == 31) ? (s | 0x7f800000u | (m << 13)) : (s | ((e + 112u) << 23) | (m << 13));
    float r;
    memcpy(&r, &f, 4);
    return r;
}

/* a k-quant block's scales per 16 values: w = d sc[i] u - dmin mn[i] (u the unsigned quant) */
static void kscales(int type, const uint8_t *w, int sc[16], int mn[16], float *d, float *dmin) {
    if (type == T_Q6_K) {
        *d = *dmin = h2f(w + 208);
        for (int i = 0; i < 16; i++) {
            sc[i] = (int8_t)w[192 + i];
            mn[i] = 32 * sc[i];
        }
        return;
    }
    const uint8_t *s = w + 4;
    *d = h2f(w);
    *dmin = h2f(w + 2);
    for (int j = 0; j < 8; j++) {
        int a, m;
        if (j < 4) {
            a = s[j] & 63;
            m = s[j + 4] & 63;
        } else {
            a = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
            m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        }
        sc[2 * j] = sc[2 * j + 1] = a;
        mn[2 * j] = mn[2 * j + 1] = m;
    }
}

/* one legacy block -> 32 unsigned values u and w = d u - c */
static void unpack_legacy(int type, const uint8_t *w, uint8_t u[32], float *d, float *c) {
    const uint8_t *qs;
    uint32_t qh = 0;
    *d = h2f(w);
    switch (type) {
    case T_Q8_0:
        for (int j = 0; j < 32; j++) u[j] = (uint8_t)(w[2 + j] ^ 0x80);          /* q + 128 */
        *c = 128.0f * *d;
        return;
    case T_Q4_0: qs = w + 2; *c = 8.0f * *d; break;
    case T_Q4_1: qs = w + 4; *c = -h2f(w + 2); break;
    case T_Q5_0: qs = w + 6; memcpy(&qh, w + 2, 4); *c = 16.0f * *d; break;
    default:     qs = w + 8; memcpy(&qh, w + 4, 4); *c = -h2f(w + 2); break;
    }
    for (int j = 0; j < 16; j++) {
        u[j] = (uint8_t)((qs[j] & 15) | (((qh >> j) & 1) << 4));
        u[j + 16] = (uint8_t)((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4));
    }
}

/* one k-quant block -> 256 unsigned values in element order */
static void unpack_k(int type, const uint8_t *w, uint8_t u[256]) {
    if (type == T_Q6_K) {
        for (int h = 0; h < 2; h++)
            for (int i = 0; i < 4; i++)
                for (int l = 0; l < 32; l++) {
                    int lo = (w[64 * h + 32 * (i & 1) + l] >> (4 * (i >> 1))) & 15;
                    int hi = (w[128 + 32 * h + l] >> (2 * i)) & 3;
                    u[128 * h + 32 * i + l] = (uint8_t)(lo | (hi << 4));
                }
        return;
    }
    const uint8_t *qs = w + (type == T_Q4_K ? 16 : 48), *qh = w + 16;
    for (int j = 0; j < 8; j++)
        for (int l = 0; l < 32; l++) {
            int v = (qs[32 * (j >> 1) + l] >> (4 * (j & 1))) & 15;
            if (type == T_Q5_K) v |= ((qh[l] >> j) & 1) << 4;
            u[32 * j + l] = (uint8_t)v;
        }
}

/* plain C: nr activation rows against one packed row */
static void dot_c(int type, const uint8_t *w, int64_t nb, const int8_t *xq, const float *xd,
                  const int16_t *xs, int64_t K, int nr, float *out, int64_t os) {
    const int64_t bytes = bytes_of(type);
    float acc[MR] = {0};
    for (int64_t b = 0; b < nb; b++, w += bytes) {
        if (type < T_Q4_K) {
            uint8_t u[32];
            float d, c;
            unpack_legacy(type, w, u, &d, &c);
            for (int r = 0; r < nr; r++) {
                const int8_t *x = xq + r * K + b * 32;
                const int16_t *s = xs + r * (K / 16) + 2 * b;
                int32_t dot = 0;
                for (int j = 0; j < 32; j++) dot += (int32_t)u[j] * x[j];
                acc[r] += xd[r * (K / 32) + b] * (d * (float)dot - c * (float)(s[0] + s[1]));
            }
        } else {
            uint8_t u[256];
            int sc[16], mn[16];
            float d, dmin;
            unpack_k(type, w, u);
            kscales(type, w, sc, mn, &d, &dmin);
            for (int r = 0; r < nr; r++) {
                const int8_t *x = xq + r * K + b * 256;
                const int16_t *s = xs + r * (K / 16) + 16 * b;
                int32_t dot = 0, mo = 0;
                for (int i = 0; i < 16; i++) {
                    int32_t part = 0;
                    for (int l = 0; l < 16; l++) part += (int32_t)u[16 * i + l] * x[16 * i + l];
                    dot += sc[i] * part;
                    mo += mn[i] * s[i];
                }
                acc[r] += xd[r * (K / 256) + b] * (d * (float)dot - dmin * (float)mo);
            }
        }
    }
    for (int r = 0; r < nr; r++) out[r * os] = acc[r];
}

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HAVE_X86 1

#define SFX avx2
#define TARGET __attribute__((target("avx2,fma,f16c")))
#define DOT32(u, x) _mm256_madd_epi16(_mm256_maddubs_epi16((u), (x)), _mm256_set1_epi16(1))
#include "packed_simd.inc"
#undef SFX
#undef TARGET
#undef DOT32

#define SFX vnni
#define TARGET __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#define DOT32(u, x) _mm256_dpbusd_epi32(_mm256_setzero_si256(), (u), (x))
#include "packed_simd.inc"
#undef SFX
#undef TARGET
#undef DOT32

/* AVX-512 VNNI on 512-bit vectors: 64 values per vpdpbusd (two q8_0 blocks, or a 64-value chunk
   of a k-quant block), the format and the tile's row count constants after inlining. The 4-
   and 5-bit legacy formats use the 256-bit variant (dot_vnni): unpacking two blocks' nibbles
   into one 512-bit vector costs more than it saves (1.1 against 2.6 ns per block and row). */
#define T512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512dq")))

/* q8_0, two blocks per vector: |w| times x with w's sign (no offset term) */
T512 static inline __attribute__((always_inline)) void z_q8_0(
        int type, int nr, const uint8_t *w, int64_t nb, const int8_t *xq, const float *xd,
        const int16_t *xs, int64_t K, float *out, int64_t os) {
    (void)type;
    (void)xs;
    __m512 acc[MR];
    for (int r = 0; r < nr; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b += 2) {
        const uint8_t *wa = w + b * 34, *wb = b + 1 < nb ? wa + 34 : wa;     /* an odd tail: b's half zeroed */
        const __mmask64 live = b + 1 < nb ? ~(__mmask64)0 : (__mmask64)0xffffffffu;
        float da = _cvtsh_ss(*(const uint16_t *)wa), db = b + 1 < nb ? _cvtsh_ss(*(const uint16_t *)wb) : 0.0f;
        __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(wa + 2))),
                                       _mm256_loadu_si256((const __m256i *)(wb + 2)), 1);
        __m512i u = _mm512_abs_epi8(q);
        __mmask64 neg = _mm512_movepi8_mask(q);
        for (int r = 0; r < nr; r++) {
            __m512i x = _mm512_maskz_loadu_epi8(live, xq + r * K + b * 32);
            x = _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x);
            const float *dx = xd + r * (K / 32) + b;
            __m512 scale = _mm512_insertf32x8(_mm512_set1_ps(da * dx[0]), _mm256_set1_ps(b + 1 < nb ? db * dx[1] : 0.0f), 1);
            __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, x);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), scale, acc[r]);
        }
    }
    for (int r = 0; r < nr; r++) out[r * os] = _mm512_reduce_add_ps(acc[r]);
}

T512 static inline __attribute__((always_inline)) void z_kquant(
        int type, int nr, const uint8_t *w, int64_t nb, const int8_t *xq, const float *xd,
        const int16_t *xs, int64_t K, float *out, int64_t os) {
    const int64_t bytes = bytes_of(type);
    const __m256i m4 = _mm256_set1_epi8(15), m2 = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
    const __m512i lane4 = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    __m512 acc[MR];
    float off[MR];
    for (int r = 0; r < nr; r++) {
        acc[r] = _mm512_setzero_ps();
        off[r] = 0.0f;
    }
    for (int64_t b = 0; b < nb; b++, w += bytes) {
        int sc[16], mn[16];
        float d, dmin;
        kscales(type, w, sc, mn, &d, &dmin);
        const __m512 s16 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(sc)), _mm512_set1_ps(d));
        __m512 blk[MR];
        for (int r = 0; r < nr; r++) blk[r] = _mm512_setzero_ps();
        __m256i hb = type == T_Q5_K ? _mm256_loadu_si256((const __m256i *)(w + 16)) : _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {                  /* values 64c .. 64c + 64 */
            __m256i lo, hi;
            if (type == T_Q6_K) {                      /* half h = c / 2, i = 2 (c & 1), 2 (c & 1) + 1 */
                int h = c >> 1, sh = 4 * (c & 1);
                __m256i l0 = _mm256_loadu_si256((const __m256i *)(w + 64 * h));
                __m256i l1 = _mm256_loadu_si256((const __m256i *)(w + 64 * h + 32));
                __m256i qh = _mm256_loadu_si256((const __m256i *)(w + 128 + 32 * h));
                lo = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, sh), m4),
                                     _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, sh), m2), 4));
                hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, sh), m4),
                                     _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, sh + 2), m2), 4));
            } else {
                __m256i raw = _mm256_loadu_si256((const __m256i *)(w + (type == T_Q4_K ? 16 : 48) + 32 * c));
                lo = _mm256_and_si256(raw, m4);
                hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
                if (type == T_Q5_K) {
                    lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * c), one), 4));
                    hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * c + 1), one), 4));
                }
            }
            __m512i u = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
            __m512 ws = _mm512_permutexvar_ps(_mm512_add_epi32(lane4, _mm512_set1_epi32(4 * c)), s16);
            for (int r = 0; r < nr; r++) {
                __m512i x = _mm512_loadu_si512(xq + r * K + b * 256 + 64 * c);
                blk[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u, x)), ws, blk[r]);
            }
        }
        for (int r = 0; r < nr; r++) {
            const int16_t *sp = xs + r * (K / 16) + 16 * b;
            int mo = 0;
            for (int i = 0; i < 16; i++) mo += mn[i] * sp[i];
            float dx = xd[r * (K / 256) + b];
            acc[r] = _mm512_fmadd_ps(blk[r], _mm512_set1_ps(dx), acc[r]);
            off[r] += dmin * dx * (float)mo;
        }
    }
    for (int r = 0; r < nr; r++) out[r * os] = _mm512_reduce_add_ps(acc[r]) - off[r];
}

#define Z_ROWS(KERN, T) \
    switch (nr) { \
    case 1: KERN(T, 1, w, nb, xq, xd, xs, K, out, os); break; \
    case 2: KERN(T, 2, w, nb, xq, xd, xs, K, out, os); break; \
    case 3: KERN(T, 3, w, nb, xq, xd, xs, K, out, os); break; \
    default: KERN(T, 4, w, nb, xq, xd, xs, K, out, os); break; \
    }

T512 static void dot_z512(int type, const uint8_t *w, int64_t nb, const int8_t *xq, const float *xd,
                          const int16_t *xs, int64_t K, int nr, float *out, int64_t os) {
    switch (type) {        /* the 4- and 5-bit legacy formats: 256-bit vectors measured faster */
    case T_Q8_0: Z_ROWS(z_q8_0, T_Q8_0) break;
    case T_Q4_0: case T_Q4_1: case T_Q5_0: case T_Q5_1: dot_vnni(type, w, nb, xq, xd, xs, K, nr, out, os); break;
    case T_Q4_K: Z_ROWS(z_kquant, T_Q4_K) break;
    case T_Q5_K: Z_ROWS(z_kquant, T_Q5_K) break;
    default:     Z_ROWS(z_kquant, T_Q6_K) break;
    }
}
#endif

typedef void (*dot_fn)(int, const uint8_t *, int64_t, const int8_t *, const float *, const int16_t *,
                       int64_t, int, float *, int64_t);
static dot_fn DOT = 0;
static const char *VARIANT = "c";
typedef void (*dot1_fn)(int, const uint8_t *, int64_t, const int8_t *, const float *, const float *, float *);

static dot1_fn dot1_for(dot_fn d) {
#ifdef HAVE_X86
    if (d == dot_z512 || d == dot_vnni) return dot1_vnni;
    if (d == dot_avx2) return dot1_avx2;
#endif
    (void)d;
    return 0;
}

/* level: 0 = the best this CPU supports (AVX-512 VNNI on 512-bit vectors), 1 = VNNI on 256-bit vectors
   at most, 2 = AVX2 at most, 3 = plain C. Returns the variant's name. */
const char *hi_pk_select(int level) {
    DOT = dot_c;
    VARIANT = "c";
#ifdef HAVE_X86
    __builtin_cpu_init();
    if (level == 0 && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl")
            && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
        DOT = dot_z512;
        VARIANT = "avx512vnni";
    } else if (level <= 1 && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl")
            && __builtin_cpu_supports("avx512bw")) {
        DOT = dot_vnni;
        VARIANT = "avx512vnni-256";
    } else if (level <= 2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
            && __builtin_cpu_supports("f16c")) {
        DOT = dot_avx2;
        VARIANT = "avx2";
    }
#endif
    return VARIANT;
}

void hi_pk_set_threads(int n) {
#ifdef _OPENMP
    if (n > 0) omp_set_num_threads(n);
#else
    (void)n;
#endif
}

/* the regions left to run on one thread (par.inc); set >= 0 replaces it (tests) */
int hi_pk_par_skip(int set) {
    int s = __atomic_load_n(&par_skip, __ATOMIC_RELAXED);
    if (set >= 0) __atomic_store_n(&par_skip, set, __ATOMIC_RELAXED);
    return s;
}

int hi_pk_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* x (M, K) f32 -> q (M, K) int8, d (M, K / blk) f32, s (M, K / 16) int16; blk 32 or 256 */
void hi_pk_quantize(const float *x, int64_t M, int64_t K, int64_t blk, int8_t *q, float *d, int16_t *s) {
    int64_t nb = K / blk;
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < nb; b++) {
            const float *xp = x + m * K + b * blk;
            int8_t *qp = q + m * K + b * blk;
            float amax = 0.0f;
            for (int64_t j = 0; j < blk; j++) amax = fmaxf(amax, fabsf(xp[j]));
            float dx = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
            d[m * nb + b] = dx;
            for (int64_t j = 0; j < blk; j++) qp[j] = (int8_t)lrintf(xp[j] * id);
            for (int64_t g = 0; g < blk / 16; g++) {
                int sum = 0;
                for (int j = 0; j < 16; j++) sum += qp[16 * g + j];
                s[m * (K / 16) + b * (blk / 16) + g] = (int16_t)sum;
            }
        }
}

/* out (M, ldo) f32, columns 0 .. N: x's quantized rows against the N packed rows of w (K values each) */
void hi_pk_matmul(int type, const uint8_t *w, int64_t N, int64_t K, const int8_t *xq, const float *xd,
                  const int16_t *xs, int64_t M, float *out, int64_t ldo) {
    if (!DOT) hi_pk_select(0);
    const int64_t blk = block_of(type), nb = K / blk, rowb = nb * bytes_of(type);
    const int64_t chunks = (N + RC - 1) / RC;
    const dot_fn dot = DOT;
    /* one row of a legacy format on a SIMD variant: the 1-row kernel, with dx * sum(q) per block */
    dot1_fn dot1 = (M == 1 && blk == 32) ? dot1_for(DOT) : 0;
    float xo_stack[512], *xo = 0;
    if (dot1) {
        xo = nb <= 512 ? xo_stack : (float *)malloc((size_t)nb * sizeof(float));
        if (!xo) dot1 = 0;
        else for (int64_t b = 0; b < nb; b++) xo[b] = xd[b] * (float)(xs[2 * b] + xs[2 * b + 1]);
    }
    const int par = par_go(N * K * M >= PAR_MIN && hi_pk_threads() > 1);
    double t0 = par ? par_now() : 0.0, tmain = t0;
    #pragma omp parallel if (par)
    {
        #pragma omp for schedule(dynamic, 1) nowait
        for (int64_t c = 0; c < chunks; c++) {
            int64_t n0 = c * RC, n1 = n0 + RC < N ? n0 + RC : N;
            if (dot1) {
                for (int64_t n = n0; n < n1; n++) {
                    if (n + PF < N) {
                        const char *ahead = (const char *)(w + (n + PF) * rowb);
                        for (int64_t i = 0; i < rowb; i += 64) __builtin_prefetch(ahead + i, 0, 2);
                    }
                    dot1(type, w + n * rowb, nb, xq, xd, xo, out + n);
                }
                continue;
            }
            for (int64_t m0 = 0; m0 < M; m0 += MR) {
                int nr = M - m0 < MR ? (int)(M - m0) : MR;
                for (int64_t n = n0; n < n1; n++) {
                    if (m0 == 0 && n + PF < N) {            /* the row PF ahead, from memory into L2 */
                        const char *ahead = (const char *)(w + (n + PF) * rowb);
                        for (int64_t i = 0; i < rowb; i += 64) __builtin_prefetch(ahead + i, 0, 2);
                    }
                    dot(type, w + n * rowb, nb, xq + m0 * K, xd + m0 * (K / blk), xs + m0 * (K / 16), K, nr,
                        out + m0 * ldo + n, ldo);
                }
            }
        }
        if (par && par_tid() == 0) tmain = par_now();
    }
    if (par) par_done(t0, tmain, par_now());
    if (xo && xo != xo_stack) free(xo);
}

/* out (R, K) f32 = rows of w dequantized: rows ids[0 .. R) (ids not NULL) or r0 .. r0 + R */

/* decode's prologue in one pass: x (M, K) f32, rms-normalised by nw (K,) when nw is not NULL
   (x / sqrt(mean(x^2) + eps) * nw, in f32), then quantized as hi_pk_quantize. tmp (K,) scratch */
void hi_pk_quantize_norm(const float *x, int64_t M, int64_t K, int64_t blk, const float *nw, float eps,
                         float *tmp, int8_t *q, float *d, int16_t *s) {
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * K;
        if (nw) {
            float ss = 0.0f;
            for (int64_t k = 0; k < K; k++) ss += xr[k] * xr[k];
            float inv = 1.0f / sqrtf(ss / (float)K + eps);
            for (int64_t k = 0; k < K; k++) tmp[k] = xr[k] * inv * nw[k];
            xr = tmp;
        }
        hi_pk_quantize(xr, 1, K, blk, q + m * K, d + m * (K / blk), s + m * (K / 16));
    }
}

/* decode's epilogue: y (M, N) f32 products; out (M, N or N / 2) = act(y + bias) (+ res), act
   swiglu of [gate | up] halves when swiglu; bias, res may be NULL; res may be out */
void hi_pk_finish(const float *y, int64_t M, int64_t N, const float *bias, int swiglu, const float *res,
                  float *out) {
    int64_t no = swiglu ? N / 2 : N;
    for (int64_t m = 0; m < M; m++)
        for (int64_t j = 0; j < no; j++) {
            float a = y[m * N + j] + (bias ? bias[j] : 0.0f);
            if (swiglu) {
                float u = y[m * N + no + j] + (bias ? bias[no + j] : 0.0f);
                a = a / (1.0f + expf(-a)) * u;
            }
            out[m * no + j] = a + (res ? res[m * no + j] : 0.0f);
        }
}

/* ---- decode_layer: one decoder layer for B decode rows (one new token per sequence) in one call ----
   x (B, D) f32 residual stream, updated in place:
     h = rms_norm(x, attn_norm) -> 8-bit; qkv = h @ Wqkv^T (+ bqkv), Wqkv as 1..3 row parts;
     q, k rotated at pos[b] (cos / sin tables (P, Dh / 2), half or interleaved pairs);
     k, v into the pools (NB, BS, Hkv, Dh) at slot[b] (< 0: not written);
     a = attention of q over keys 0 .. ctx[b] - 1 of sequence b (blocks bt[b, :]), GQA;
     x += a @ Wo^T;  h = rms_norm(x, mlp_norm);  x += swiglu(h @ Wgu^T) @ Wdown^T.  */
typedef struct { int32_t type; int32_t pad; const uint8_t *w; int64_t n; } hi_part;
typedef struct {
    int64_t D, F, Hq, Hkv, Dh, BS, MB;
    float eps, scale;
    int32_t interleaved, nqkv, ngu, pad;
    const float *attn_norm, *mlp_norm, *bqkv;
    hi_part qkv[3], gu[2], o, down;
} hi_layer;

typedef struct { int8_t *q; float *d; int16_t *s; int blk; } act_q;

/* rows of x (M, K) (normalised by nw when not NULL) rounded for a product of format type */
static void quant_for(act_q *a, int type, const float *x, int64_t M, int64_t K, const float *nw, float eps,
                      float *tmp) {
    int blk = block_of(type);
    if (a->blk == blk) return;
    hi_pk_quantize_norm(x, M, K, blk, nw, eps, tmp, a->q, a->d, a->s);
    a->blk = blk;
}

/* y (M, ldo) columns of the parts one after another */
static void parts_product(const hi_part *p, int np, const float *x, int64_t M, int64_t K, const float *nw,
                          float eps, act_q *a32, act_q *a256, float *tmp, float *y, int64_t ldo) {
    int64_t at = 0;
    for (int i = 0; i < np; i++) {
        act_q *a = block_of(p[i].type) == 32 ? a32 : a256;
        quant_for(a, p[i].type, x, M, K, nw, eps, tmp);
        hi_pk_matmul(p[i].type, p[i].w, p[i].n, K, a->q, a->d, a->s, M, y + at, ldo);
        at += p[i].n;
    }
}

static void rope_row(float *v, int64_t H, int64_t Dh, const float *c, const float *s, int interleaved) {
    int64_t h2 = Dh / 2;
    for (int64_t h = 0; h < H; h++, v += Dh)
        for (int64_t i = 0; i < h2; i++) {
            int64_t a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + h2;
            float x1 = v[a], x2 = v[b];
            v[a] = x1 * c[i] - x2 * s[i];
            v[b] = interleaved ? x1 * s[i] + x2 * c[i] : x2 * c[i] + x1 * s[i];
        }
}

#define ATT_CAT2(a, b) a##_##b
#define ATT_CAT(a, b) ATT_CAT2(a, b)
#define ATT(name) ATT_CAT(name, ATT_SFX)
/* each variant: attention (its loops over Dh vectorize 16 or 8 wide) and the dequantize of a row
   (no FMA contraction there: bit-exact with the plain C one) */
#define ATT_SFX c
#define ATT_TARGET
#include "packed_attention.inc"
#include "packed_dequant.inc"
#undef ATT_SFX
#undef ATT_TARGET
#ifdef HAVE_X86
#define ATT_SFX z512
#define ATT_TARGET __attribute__((target("avx2,fma,avx512f,avx512vl,avx512dq,avx512bw"), optimize("tree-vectorize")))
#include "packed_attention.inc"
#undef ATT_TARGET
#define ATT_TARGET __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512dq,avx512bw"), optimize("tree-vectorize", "fp-contract=off")))
#include "packed_dequant.inc"
#undef ATT_SFX
#undef ATT_TARGET
#define ATT_SFX avx2
#define ATT_TARGET __attribute__((target("avx2,fma"), optimize("tree-vectorize")))
#include "packed_attention.inc"
#undef ATT_TARGET
#define ATT_TARGET __attribute__((target("avx2,fma,f16c"), optimize("tree-vectorize", "fp-contract=off")))
#include "packed_dequant.inc"
#undef ATT_SFX
#undef ATT_TARGET
#endif
typedef void (*dequant_fn)(int, const uint8_t *, int64_t, float *);

typedef void (*attend_fn)(const float *, int64_t, int64_t, const float *, const float *, const int32_t *,
                          int64_t, int64_t, int64_t, int64_t, float, float *, int64_t, float *);

static attend_fn pick_attend(void) {
#ifdef HAVE_X86
    __builtin_cpu_init();
    if (DOT == dot_z512) return attend_z512;
    if (DOT == dot_vnni || DOT == dot_avx2) return attend_avx2;
#endif
    return attend_c;
}

/* the dequantize variant of the instruction set the products use (hi_pk_select) */
static dequant_fn pick_dequant(void) {
#ifdef HAVE_X86
    if (DOT == dot_z512) return dequant_row_z512;
    if (DOT == dot_vnni || DOT == dot_avx2) return dequant_row_avx2;
#endif
    return dequant_row_c;
}

void hi_pk_dequant(int type, const uint8_t *w, int64_t K, const int64_t *ids, int64_t r0, int64_t R, float *out) {
    const int64_t blk = block_of(type), nb = K / blk, rowb = nb * bytes_of(type);
    if (!DOT) hi_pk_select(0);
    const dequant_fn row_fn = pick_dequant();
    /* from 2^17 values: a prefill tile (>= 2^19 values) was below the old 2^20 and dequantized on
       one thread (Qwen2.5 prefill at 2 threads 145 -> 156-166 tok/s) */
    const int par = par_go(R * K >= ((int64_t)1 << 17) && hi_pk_threads() > 1);
    double t0 = par ? par_now() : 0.0, tmain = t0;
    #pragma omp parallel if (par)
    {
        #pragma omp for schedule(dynamic, 16) nowait
        for (int64_t r = 0; r < R; r++)
            row_fn(type, w + (ids ? ids[r] : r0 + r) * rowb, nb, out + r * K);
        if (par && par_tid() == 0) tmain = par_now();
    }
    if (par) par_done(t0, tmain, par_now());
}

void hi_pk_decode_layer(const hi_layer *L, float *x, int64_t B, float *kp, float *vp, const int32_t *pos,
                        const int32_t *slot, const int32_t *ctx, const int32_t *bt, const float *cos,
                        const float *sin, int64_t max_ctx) {
    const int64_t D = L->D, F = L->F, Hq = L->Hq, Hkv = L->Hkv, Dh = L->Dh, BS = L->BS, MB = L->MB;
    const int64_t nqkv = (Hq + 2 * Hkv) * Dh, kvrow = Hkv * Dh;
    int64_t kmax = D > F ? D : F;                                /* the longest product input */
    if (Hq * Dh > kmax) kmax = Hq * Dh;
    const int64_t g = Hq / Hkv, h2 = Dh / 2;
    /* scratch: one block (the sizes are small: a few KB per row) */
    size_t bytes = (size_t)B * (2 * kmax) + 64                 /* q8 for 32 and 256 blocks */
                 + (size_t)B * (kmax / 32) * 4 * 2 + (size_t)B * (kmax / 16) * 2 * 2 + 256
                 + (size_t)4 * (kmax + B * nqkv + B * Hq * Dh + B * 2 * F + B * F + B * D)
                 + (size_t)4 * (max_ctx > 0 ? max_ctx : 1) * Hq * B + 256;
    char *mem = (char *)malloc(bytes), *at = mem;
    if (!mem) return;
#define TAKE(T, n) ((T *)(at = (char *)(((uintptr_t)at + 63) & ~(uintptr_t)63), at += (size_t)(n) * sizeof(T), at - (size_t)(n) * sizeof(T)))
    act_q a32 = {TAKE(int8_t, B * kmax), TAKE(float, B * (kmax / 32)), TAKE(int16_t, B * (kmax / 16)), 0};
    act_q a256 = {TAKE(int8_t, B * kmax), TAKE(float, B * (kmax / 32)), TAKE(int16_t, B * (kmax / 16)), 0};
    float *tmp = TAKE(float, kmax), *qkv = TAKE(float, B * nqkv), *att = TAKE(float, B * Hq * Dh);
    float *y = TAKE(float, B * 2 * F), *act = TAKE(float, B * F), *yo = TAKE(float, B * D);
    float *sc = TAKE(float, (max_ctx > 0 ? max_ctx : 1) * Hq * B);
#undef TAKE
    /* attention block: qkv product, rope, cache write */
    parts_product(L->qkv, L->nqkv, x, B, D, L->attn_norm, L->eps, &a32, &a256, tmp, qkv, nqkv);
    for (int64_t b = 0; b < B; b++) {
        float *r = qkv + b * nqkv;
        if (L->bqkv)
            for (int64_t j = 0; j < nqkv; j++) r[j] += L->bqkv[j];
        const float *c = cos + (int64_t)pos[b] * h2, *s = sin + (int64_t)pos[b] * h2;
        rope_row(r, Hq + Hkv, Dh, c, s, L->interleaved);            /* q heads then k heads */
        if (slot[b] >= 0) {
            int64_t blk = slot[b] / BS, row = slot[b] % BS;
            memcpy(kp + (blk * BS + row) * kvrow, r + Hq * Dh, kvrow * 4);
            memcpy(vp + (blk * BS + row) * kvrow, r + (Hq + Hkv) * Dh, kvrow * 4);
        }
    }
    /* attention: per sequence and kv head, its g query heads meet each key row once */
    if (!DOT) hi_pk_select(0);
    const attend_fn attend = pick_attend();
    const int par = par_go(B * Hq * max_ctx >= 2048 && hi_pk_threads() > 1);
    double t0 = par ? par_now() : 0.0, tmain = t0;
    #pragma omp parallel if (par)
    {
        #pragma omp for schedule(dynamic, 1) collapse(2) nowait
        for (int64_t b = 0; b < B; b++)
            for (int64_t kh = 0; kh < Hkv; kh++)
                attend(qkv + b * nqkv + kh * g * Dh, g, Dh, kp, vp, bt + b * MB, ctx[b], BS, kvrow, kh,
                       L->scale, sc + (b * Hkv + kh) * g * max_ctx, max_ctx, att + (b * Hq + kh * g) * Dh);
        if (par && par_tid() == 0) tmain = par_now();
    }
    if (par) par_done(t0, tmain, par_now());
    a32.blk = a256.blk = 0;
    parts_product(&L->o, 1, att, B, Hq * Dh, NULL, 0.0f, &a32, &a256, tmp, yo, D);
    for (int64_t j = 0; j < B * D; j++) x[j] += yo[j];
    /* MLP block */
    a32.blk = a256.blk = 0;
    parts_product(L->gu, L->ngu, x, B, D, L->mlp_norm, L->eps, &a32, &a256, tmp, y, 2 * F);
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < F; j++) {
            float a = y[b * 2 * F + j];
            act[b * F + j] = a / (1.0f + expf(-a)) * y[b * 2 * F + F + j];
        }
    a32.blk = a256.blk = 0;
    parts_product(&L->down, 1, act, B, F, NULL, 0.0f, &a32, &a256, tmp, yo, D);
    for (int64_t j = 0; j < B * D; j++) x[j] += yo[j];
    free(mem);
}
