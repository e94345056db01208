"""CPU matmul for f32 weights: out (M, N) = x (M, K) @ w (N, K)^T (+ bias), f32 accumulation,
batch invariant: each output element is computed by the same sequence of floating-point
operations whatever M is and whatever the other rows of x hold, so a request's greedy tokens do
not depend on the batch it runs in.

Why not BLAS: ``np.matmul`` sends a one-row product to OpenBLAS gemv and two or more rows to gemm,
whose roundings differ (~90% of the elements of a row, measured); gemm for a few rows is also
slow here (x (4..16, 576) @ W (49152, 576)^T 27-34 ms on one core against 8 ms for gemv at M = 1).

The kernel (C, below): an element is one chain of VL-lane partial sums over k (lane j takes the
k = j mod VL; AVX-512 VL = 16, AVX2/FMA VL = 8, each step one fused multiply-add), the K tail one
more step with the lanes past K zero, then a fixed tree over the lanes (lanes i and i + VL/2
added, then i and i + VL/4, ...), then + bias. Tiles of 1-4 rows of x against up to 16 rows of w
share the loads (a row of w is read once per tile of x), blocks of rows of w stay in L2 while
the tiles of x pass over them, and from 64 rows of x on, the tiles are first packed into aligned
k-major panels; none of this changes an element's operations. Blocks of rows of w are split over
OpenMP threads (OMP_NUM_THREADS, default all cores; workers spin a while between products, then
sleep, and a worker left behind on a busy core sends the next products to one thread: par.inc) for
products of >= PAR_MIN multiply-adds.

Bits are the same within one build. The AVX-512, AVX2 and plain-C paths (whichever the compiler
targets with -march=native) give different bits from each other; the plain-C path (8 lanes, built
with -ffp-contract=off so a*b+c is always two roundings) is deterministic but slower (x86-64
without AVX: ~5x the AVX-512 time at M = 256, 0.21 ms against 0.14 at M = 1 for 1536 x 576).

Compiled at first use and cached exactly as int8.py's kernel (int8.build_library: ``$CC`` or
``cc``, -O3 -march=native -fopenmp, each flag dropped if the compiler refuses it, here each set
with -ffp-contract=off; f32_<hash>.so under ``$XDG_CACHE_HOME/hetinfer/cpu``, the hash over the
source, compiler, flags and CPU flags; the cache is private to the user and every file is checked
against its recorded sha256 before it is loaded: hetinfer.kernel_cache).

Fallback: without a working C compiler the product runs on NumPy/BLAS (np.matmul), with one
warning, and batch invariance does NOT hold there (gemv vs gemm above). HETINFER_CPU_F32=blas
selects that same BLAS path on purpose (for comparisons), without the warning.

Threads and BLAS: OpenBLAS's worker threads spin for a long while after each threaded BLAS call
(the attention's products still use BLAS); a spinning worker shares a core with this kernel's
OpenMP worker and slows a parallel product a lot (a 3.8 ms product took 9-10 ms right after a
0.05 ms BLAS call). In SmolLM2's prefill that costs ~40% (256-token prefill 283 tok/s against
488 with BLAS for the products, on 2 cores); HETINFER_CPU_THREADS=1 (it caps BLAS, not this
kernel: 436 tok/s) or OPENBLAS_THREAD_TIMEOUT=4 set before NumPy is imported (BLAS workers then
sleep at once: 423 tok/s) avoid it. Decode is at parity either way (~21 tok/s), batched decode
is faster (products of 4-64 rows 1.2-3x faster than BLAS gemm).
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

from .int8 import _FLAG_SETS, LazyLibrary, build_library, cache_dir  # noqa: F401  (cache_dir: for callers)

F32 = np.dtype(np.float32)

C_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "par.inc"
#define INL static inline __attribute__((always_inline))

/* One output element = one chain of VL-lane partial sums over k (lane j takes k = j mod VL), the
   K tail one more step with the lanes past K zero, then a fixed tree over the lanes; + bias.
   Every tile shape below runs exactly these operations per element: tiles only decide which
   loads are shared, never the arithmetic. */
#if defined(__AVX512F__)
#include <immintrin.h>
#define VL 16
#define PATH "avx512"
typedef __m512 vec;
typedef __mmask16 vmask;
INL vec vzero(void) { return _mm512_setzero_ps(); }
INL vec vload(const float *p) { return _mm512_loadu_ps(p); }
INL vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
INL vmask vmask_n(int n) { return (__mmask16)((1u << n) - 1u); }
INL vec vloadm(const float *p, vmask m) { return _mm512_maskz_loadu_ps(m, p); }
INL float vsum(vec v) {            /* 16 -> 8 -> 4 -> 2 -> 1, halves added lane-wise */
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
    return _mm_cvtss_f32(s);
}
#define HAVE_ROWSUM 1
/* out[c] = vsum(a[c]) (+ bias[c]) for c < C <= 8: the same tree as vsum (lanes i and i+8 added,
   then i and i+4, i and i+2, i and i+1), on 8 accumulators at once */
INL void rowsum(const int C, const vec *a, const float *bias, float *out) {
    __m512 z = _mm512_setzero_ps();
    __m512 v[4];
    #pragma GCC unroll 4
    for (int p = 0; p < 4; p++) {
        if (2 * p >= C) { v[p] = z; continue; }
        __m512 x0 = a[2 * p], x1 = 2 * p + 1 < C ? a[2 * p + 1] : z;
        v[p] = _mm512_add_ps(_mm512_shuffle_f32x4(x0, x1, 0x44), _mm512_shuffle_f32x4(x0, x1, 0xEE));
    }
    __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(v[0], v[1], 0x88), _mm512_shuffle_f32x4(v[0], v[1], 0xDD));
    __m512 w1 = C > 4 ? _mm512_add_ps(_mm512_shuffle_f32x4(v[2], v[3], 0x88), _mm512_shuffle_f32x4(v[2], v[3], 0xDD)) : z;
    __m512 s = _mm512_add_ps(_mm512_shuffle_ps(w0, w1, 0x44), _mm512_shuffle_ps(w0, w1, 0xEE));
    __m512 r = _mm512_add_ps(_mm512_shuffle_ps(s, s, 0x88), _mm512_shuffle_ps(s, s, 0xDD));
    r = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), r);
    __mmask16 m = (__mmask16)((1u << C) - 1u);
    if (bias) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(m, bias));
    _mm512_mask_storeu_ps(out, m, r);
}
/* tiles: R rows of x by C(R) rows of w, R*C accumulators + R x vectors + 1 w vector <= 32 */
#define C1 16
#define C2 12
#define C3 8
#define C4 6
#define CLCM 48
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VL 8
#define PATH "avx2"
typedef __m256 vec;
typedef __m256i vmask;
INL vec vzero(void) { return _mm256_setzero_ps(); }
INL vec vload(const float *p) { return _mm256_loadu_ps(p); }
INL vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
INL vmask vmask_n(int n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
INL vec vloadm(const float *p, vmask m) { return _mm256_maskload_ps(p, m); }
INL float vsum(vec v) {            /* 8 -> 4 -> 2 -> 1 */
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
    return _mm_cvtss_f32(s);
}
/* R*C accumulators + R x vectors + 1 w vector <= 16 */
#define C1 12
#define C2 6
#define C3 4
#define C4 3
#define CLCM 12
#else
/* plain C, 8 lanes (GCC/clang vector extension where there is one, which the compiler maps to
   its SIMD registers: SSE2, NEON, ...; an array otherwise); built with -ffp-contract=off, so
   a*b+c rounds twice here, always */
#define VL 8
#define PATH "c"
typedef int vmask;
INL vmask vmask_n(int n) { return n; }
#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"        /* vec is only passed between inlined functions */
typedef float vec __attribute__((vector_size(32)));
INL vec vzero(void) { vec r = {0, 0, 0, 0, 0, 0, 0, 0}; return r; }
INL vec vload(const float *p) { vec r; memcpy(&r, p, sizeof r); return r; }
INL vec vfma(vec a, vec b, vec c) { return c + a * b; }
INL vec vloadm(const float *p, vmask n) { vec r = vzero(); memcpy(&r, p, (size_t)n * sizeof(float)); return r; }
#define LANE(a, i) ((a)[i])
#else
typedef struct { float v[8]; } vec;
INL vec vzero(void) { vec r; for (int i = 0; i < 8; i++) r.v[i] = 0.0f; return r; }
INL vec vload(const float *p) { vec r; memcpy(r.v, p, sizeof r.v); return r; }
INL vec vfma(vec a, vec b, vec c) { for (int i = 0; i < 8; i++) c.v[i] += a.v[i] * b.v[i]; return c; }
INL vec vloadm(const float *p, vmask n) { vec r = vzero(); memcpy(r.v, p, (size_t)n * sizeof(float)); return r; }
#define LANE(a, i) ((a).v[i])
#endif
INL float vsum(vec a) {
    float s0 = LANE(a, 0) + LANE(a, 4), s1 = LANE(a, 1) + LANE(a, 5);
    float s2 = LANE(a, 2) + LANE(a, 6), s3 = LANE(a, 3) + LANE(a, 7);
    float t0 = s0 + s2, t1 = s1 + s3;
    return t0 + t1;
}
#define C1 6      /* measured best on x86-64 without AVX (SSE2: a vec is two registers) */
#define C2 3
#define C3 2
#define C4 2
#define CLCM 6
#endif

/* out[c] = vsum(a[c]) (+ bias[c]), c < C */
INL void store_row(const int C, const vec *a, const float *bias, float *out) {
#ifdef HAVE_ROWSUM
    if (C > 1) {
        #pragma GCC unroll 2
        for (int c0 = 0; c0 < C; c0 += 8)
            rowsum(C - c0 < 8 ? C - c0 : 8, a + c0, bias ? bias + c0 : 0, out + c0);
        return;
    }
#endif
    #pragma GCC unroll 16
    for (int c = 0; c < C; c++) {
        float s = vsum(a[c]);
        if (bias) s += bias[c];
        out[c] = s;
    }
}

/* out[r][c] (r < R, c < C) = x[r] . w[c] (+ bias[c]): x rows and w rows K apart */
INL void tile(const int R, const int C, const float *x, int64_t K, const float *w,
              const float *bias, float *out, int64_t ldo) {
    vec acc[4][16];
    #pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        #pragma GCC unroll 16
        for (int c = 0; c < C; c++) acc[r][c] = vzero();
    }
    int64_t k = 0;
    for (; k + VL <= K; k += VL) {
        vec xv[4];
        #pragma GCC unroll 4
        for (int r = 0; r < R; r++) xv[r] = vload(x + r * K + k);
        #pragma GCC unroll 16
        for (int c = 0; c < C; c++) {
            vec wv = vload(w + c * K + k);
            #pragma GCC unroll 4
            for (int r = 0; r < R; r++) acc[r][c] = vfma(xv[r], wv, acc[r][c]);
        }
    }
    if (k < K) {
        vmask m = vmask_n((int)(K - k));
        vec xv[4];
        #pragma GCC unroll 4
        for (int r = 0; r < R; r++) xv[r] = vloadm(x + r * K + k, m);
        #pragma GCC unroll 16
        for (int c = 0; c < C; c++) {
            vec wv = vloadm(w + c * K + k, m);
            #pragma GCC unroll 4
            for (int r = 0; r < R; r++) acc[r][c] = vfma(xv[r], wv, acc[r][c]);
        }
    }
    #pragma GCC unroll 4
    for (int r = 0; r < R; r++) store_row(C, acc[r], bias, out + r * ldo);
}

/* The same product on packed tiles: xp = [ks][4][VL] (4 rows of x), wp = [ks][C][VL] (C rows of
   w), 64-byte aligned, zero past K: the zeros meet the same step as the masked tail above, so
   each element's operations are those of tile(). */
INL void ptile(const int C, const float *xp, const float *wp, int64_t ks, const float *bias,
               float *out, int64_t ldo) {
    vec acc[4][16];
    #pragma GCC unroll 4
    for (int r = 0; r < 4; r++) {
        #pragma GCC unroll 16
        for (int c = 0; c < C; c++) acc[r][c] = vzero();
    }
    for (int64_t s = 0; s < ks; s++) {
        const float *xs = xp + s * 4 * VL, *ws = wp + s * C * VL;
        vec xv[4];
        #pragma GCC unroll 4
        for (int r = 0; r < 4; r++) xv[r] = vload(xs + r * VL);
        #pragma GCC unroll 16
        for (int c = 0; c < C; c++) {
            vec wv = vload(ws + c * VL);
            #pragma GCC unroll 4
            for (int r = 0; r < 4; r++) acc[r][c] = vfma(xv[r], wv, acc[r][c]);
        }
    }
    #pragma GCC unroll 4
    for (int r = 0; r < 4; r++) store_row(C, acc[r], bias, out + r * ldo);
}

/* dst [ks][rows][VL] = rows of src (K apart), zero past K */
static void pack(const float *src, int64_t K, int rows, int64_t ks, float *dst) {
    for (int64_t s = 0; s < ks; s++) {
        int64_t k = s * VL, n = K - k < VL ? K - k : VL;
        for (int r = 0; r < rows; r++) {
            float *d = dst + (s * rows + r) * VL;
            memcpy(d, src + r * K + k, (size_t)n * sizeof(float));
            if (n < VL) memset(d + n, 0, (size_t)(VL - n) * sizeof(float));
        }
    }
}

/* rows 0 .. R of x against rows n0 .. n1 of w: tiles of C(R) rows of w, the rest one at a time */
#define SPAN(R, C) \
static void span##R(const float *x, int64_t K, const float *w, int64_t n0, int64_t n1, \
                    const float *bias, float *out, int64_t ldo) { \
    int64_t n = n0; \
    for (; n + C <= n1; n += C) tile(R, C, x, K, w + n * K, bias ? bias + n : 0, out + n, ldo); \
    for (; n < n1; n++) tile(R, 1, x, K, w + n * K, bias ? bias + n : 0, out + n, ldo); \
}
SPAN(1, C1)
SPAN(2, C2)
SPAN(3, C3)

/* rows 0 .. M (a multiple of 4) of x against rows n0 .. n1 of w, unpacked: each C4 rows of w
   (in L1) against every 4-row tile of x in turn */
static void span4(const float *x, int64_t M, int64_t K, const float *w, int64_t n0, int64_t n1,
                  const float *bias, float *out, int64_t ldo) {
    int64_t n = n0;
    for (; n + C4 <= n1; n += C4)
        for (int64_t m = 0; m < M; m += 4)
            tile(4, C4, x + m * K, K, w + n * K, bias ? bias + n : 0, out + m * ldo + n, ldo);
    for (; n < n1; n++)
        for (int64_t m = 0; m < M; m += 4)
            tile(4, 1, x + m * K, K, w + n * K, bias ? bias + n : 0, out + m * ldo + n, ldo);
}

const char *hi_f32_path(void) { return PATH; }

#ifndef XBLOCK_BYTES
#define XBLOCK_BYTES (512 * 1024)
#endif
#ifndef BLOCK_BYTES
#define BLOCK_BYTES (512 * 1024)
#endif
#ifndef PACK_M
#define PACK_M 64   /* below, packing w costs more than its aligned loads save (measured) */
#endif

static void *alloc64(size_t bytes) {
    void *p = NULL;
    return posix_memalign(&p, 64, bytes ? bytes : 64) == 0 ? p : NULL;
}

/* out (M, N) = x (M, K) @ w (N, K)^T (+ bias (N)); all f32, contiguous. Rows of w in blocks (of
   BLOCK_BYTES, kept in L2), split over threads; in a block, every 4-row tile of x (in blocks of
   XBLOCK_BYTES) meets C4 rows of w at a time. From PACK_M rows of x on, tiles of x and of the
   block's rows of w are first packed into aligned k-major panels (fewer cache lines split).
   The rows past a multiple of 4 run in one tile of 1-3 rows. */
void hi_f32_matmul(const float *x, int64_t M, int64_t K, const float *w, int64_t N,
                   const float *bias, float *out, int nthreads, int64_t par_min) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        for (int64_t i = 0; i < M * N; i++) out[i] = bias ? bias[i % N] : 0.0f;
        return;
    }
    int64_t nb = BLOCK_BYTES / (K * 4) / CLCM * CLCM;
    if (nb < CLCM) nb = CLCM;
    int par = M * N * K >= par_min;
    int nt = 1;
#ifdef _OPENMP
    nt = nthreads > 0 ? nthreads : omp_get_max_threads();
    par = par_go(par && nt > 1);
    if (par && nt > 1) {      /* >= 4 blocks a thread, for the dynamic schedule to balance */
        int64_t want = (N + 4 * nt - 1) / (4 * nt);
        want = (want + CLCM - 1) / CLCM * CLCM;
        if (want < nb) nb = want;
    }
#endif
    (void)nt; (void)par; (void)nthreads;
    int64_t nblk = (N + nb - 1) / nb, ks = (K + VL - 1) / VL, M4 = M / 4 * 4;
    int64_t mb = XBLOCK_BYTES / (K * 4) / 4 * 4;
    if (mb < 4) mb = 4;
    float *xp = M4 >= PACK_M ? alloc64((size_t)M4 * ks * VL * sizeof(float)) : NULL;
    if (xp) {
        #pragma omp parallel for schedule(static) if (par && nt > 1) num_threads(nt)
        for (int64_t m = 0; m < M4; m += 4) pack(x + m * K, K, 4, ks, xp + m * ks * VL);
    }
    double t0 = par ? par_now() : 0.0, tmain = t0;
    #pragma omp parallel if (par && nt > 1) num_threads(nt)
    {
        float *wp = xp ? alloc64((size_t)(nb / C4) * C4 * ks * VL * sizeof(float)) : NULL;
        #pragma omp for schedule(dynamic, 1) nowait
        for (int64_t b = 0; b < nblk; b++) {
            int64_t n0 = b * nb, n1 = n0 + nb < N ? n0 + nb : N;
            if (wp) {
                int64_t tiles = (n1 - n0) / C4, n2 = n0 + tiles * C4;
                for (int64_t t = 0; t < tiles; t++) pack(w + (n0 + t * C4) * K, K, C4, ks, wp + t * C4 * ks * VL);
                for (int64_t m0 = 0; m0 < M4; m0 += mb) {
                    int64_t m1 = m0 + mb < M4 ? m0 + mb : M4;
                    for (int64_t t = 0; t < tiles; t++) {
                        int64_t n = n0 + t * C4;
                        for (int64_t m = m0; m < m1; m += 4)
                            ptile(C4, xp + m * ks * VL, wp + t * C4 * ks * VL, ks, bias ? bias + n : 0,
                                  out + m * N + n, N);
                    }
                }
                if (n2 < n1) span4(x, M4, K, w, n2, n1, bias, out, N);
            } else {
                for (int64_t m0 = 0; m0 < M4; m0 += mb) {
                    int64_t m1 = m0 + mb < M4 ? m0 + mb : M4;
                    span4(x + m0 * K, m1 - m0, K, w, n0, n1, bias, out + m0 * N, N);
                }
            }
            switch (M - M4) {
                case 3: span3(x + M4 * K, K, w, n0, n1, bias, out + M4 * N, N); break;
                case 2: span2(x + M4 * K, K, w, n0, n1, bias, out + M4 * N, N); break;
                case 1: span1(x + M4 * K, K, w, n0, n1, bias, out + M4 * N, N); break;
            }
        }
        free(wp);
        if (par && par_tid() == 0) tmain = par_now();
    }
    if (par && nt > 1) par_done(t0, tmain, par_now());
    free(xp);
}
"""

FLAG_SETS = tuple([*flags, "-ffp-contract=off"] for flags in _FLAG_SETS)
# Threads (OpenMP's: OMP_NUM_THREADS, default all cores) only for products of >= PAR_MIN
# multiply-adds. int8.py's rule, with its threshold counted in weight bytes instead: int8.py's
# 4 M multiply-adds read 4 MB of int8 weights per row of x; an f32 decode product is memory-bound
# (one core reads ~14 GB/s here, two ~25), so here the floor is 1 MB of f32 weights at M = 1 (all
# of SmolLM2's products: decode measured 17 tok/s with 4 M, 21 with this); below it, waking the
# sleeping worker (~10-15 us) costs more than the second core saves.
PAR_MIN = 1 << 18


def _declare(lib: ctypes.CDLL) -> None:
    i64, vp = ctypes.c_int64, ctypes.c_void_p
    lib.hi_f32_matmul.argtypes = [vp, i64, i64, vp, i64, vp, vp, ctypes.c_int, i64]
    lib.hi_f32_matmul.restype = None
    lib.hi_f32_path.argtypes = []
    lib.hi_f32_path.restype = ctypes.c_char_p


def build(flag_sets=FLAG_SETS) -> ctypes.CDLL:
    """The kernel compiled with the first flag set that works (cached); tests build other paths."""
    return build_library("f32", C_SOURCE, _declare, flag_sets)


def library():
    """The compiled kernel library, or None (BLAS: chosen, or the fallback, warned once)."""
    return _LIB.get()


def _one_blas_thread() -> None:
    """With this kernel (and int8's) doing the large products on OpenMP threads, BLAS only
    runs attention's small products: one BLAS thread then, unless HETINFER_CPU_THREADS says
    otherwise (two BLAS threads beside this kernel's workers measured slower: SmolLM2 batch-1
    decode 12.3 vs 21.7 tok/s, batch 16 57.5 vs 104.1, tools/bench.py --batch 1,16)."""
    if os.environ.get("HETINFER_CPU_THREADS"):
        return
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=1, user_api="blas")
    except Exception:      # noqa: BLE001 - a missing threadpoolctl only costs speed
        pass


# states: unloaded | c | blas (HETINFER_CPU_F32=blas) | numpy (no compiler)
_LIB = LazyLibrary(lambda: build(), "HETINFER_CPU_F32", "blas", "blas",
                   "f32 matmul falls back to NumPy/BLAS (not batch invariant)", on_load=_one_blas_thread)


def _reset_for_tests(state: str = "unloaded") -> None:
    _LIB.reset(state)


def backend_name() -> str:
    lib = library()
    if lib is None:
        return _LIB.state
    return f"c {lib.hi_f32_path().decode()} " + " ".join(lib.flags)


def run(lib: ctypes.CDLL, x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, out: np.ndarray,
        threads: int = 0, par_min: int | None = None) -> None:
    """out (M, N) = x (M, K) @ w (N, K)^T (+ bias (N)) with `lib`'s kernel; all f32 and
    C-contiguous (out is written, never reallocated). Threads (0: OpenMP's default) only for
    products of >= par_min multiply-adds."""
    m, k = x.shape
    n = w.shape[0]
    lib.hi_f32_matmul(x.ctypes.data, m, k, w.ctypes.data, n, None if bias is None else bias.ctypes.data,
                      out.ctypes.data, threads, PAR_MIN if par_min is None else par_min)


def product(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, out: np.ndarray) -> None:
    """out (M, N) f32 C-contiguous = x (M, K) f32 @ w (N, K) f32 ^T (+ bias (N) f32)."""
    lib = library()
    if lib is None:
        np.matmul(x, w.T, out=out)
        if bias is not None:
            out += bias
        return
    run(lib, np.ascontiguousarray(x), np.ascontiguousarray(w),
        None if bias is None else np.ascontiguousarray(bias), out)
