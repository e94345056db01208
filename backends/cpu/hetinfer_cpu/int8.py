"""CPU matmul for int8 group-quantized weights: out = x @ (q * scales)^T (+ bias).

Decode (M <= SMALL_M rows of x) runs a small C kernel: each weight row is read once as int8,
widened to float in registers (AVX2 when the compiler targets it, plain C otherwise), multiplied
by x with f32 accumulation per group, scaled once per group; rows are split over cores with
OpenMP when a product is large (>= 4 M multiply-adds; smaller ones run on one core, which
measured faster than two on a 2-core machine). Prefill (more rows) dequantizes tiles of weight rows into one reused f32 buffer (C,
parallel) and multiplies them with BLAS. Never a float copy of a whole weight, let alone the model.

The C source below is compiled at first use with the system C compiler (``$CC`` or ``cc``,
-O3 -march=native -fopenmp, each flag dropped if the compiler refuses it) and loaded through
ctypes; the shared object is cached under ``$XDG_CACHE_HOME/hetinfer/cpu`` (default
~/.cache/hetinfer/cpu; private to the user, see hetinfer.kernel_cache), named by a hash of the
source, the compiler's version, the flags and the CPU's feature flags (build_library below,
which f32.py shares). Without a compiler (or with HETINFER_CPU_INT8=numpy) a NumPy path that
widens blocks of rows is used instead, with one warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

import numpy as np

F32 = np.dtype(np.float32)
SMALL_M = 8            # rows of x up to which the GEMV kernel beats dequantized tiles + BLAS
_TILE = 1 << 20        # f32 elements of a dequantized tile for prefill (4 MiB, stays in L2/L3)
_SCALE_KIND = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}   # bf16: 2 (by name, ml_dtypes)

C_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#define PAR_MIN ((int64_t)1 << 22)

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

static inline float h2f(uint16_t h) {
    uint32_t s = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, f;
    if (e == 0) {
        float v = ldexpf((float)m, -24);
        return s ? -v : v;
    }
    f = (e == 31) ? (s | 0x7f800000u | (m << 13)) : (s | ((e + 112u) << 23) | (m << 13));
    float r; memcpy(&r, &f, 4); return r;
}

static inline float scale_at(const void *sc, int kind, int64_t i) {
    if (kind == 0) return ((const float *)sc)[i];
#ifdef __F16C__
    if (kind == 1) return _cvtsh_ss(((const uint16_t *)sc)[i]);
#else
    if (kind == 1) return h2f(((const uint16_t *)sc)[i]);
#endif
    uint32_t f = (uint32_t)((const uint16_t *)sc)[i] << 16;           /* bf16 */
    float r; memcpy(&r, &f, 4); return r;
}

/* dot(x, q * s) of one weight row: K values in groups of G, scales sc[0 .. K/G) */
static float dot_row(const float *x, const int8_t *w, int64_t K, int64_t G, const void *sc, int kind,
                     int64_t s0) {
    int64_t ng = K / G;
#ifdef __AVX2__
    if (G % 32 == 0) {
        __m256 tot = _mm256_setzero_ps();
        for (int64_t g = 0; g < ng; g++) {
            const int8_t *wp = w + g * G;
            const float *xp = x + g * G;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
            for (int64_t j = 0; j < G; j += 32) {     /* vpmovsxbd from memory: one shuffle per 8 */
                __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(wp + j))));
                __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(wp + j + 8))));
                __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(wp + j + 16))));
                __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(wp + j + 24))));
                a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp + j), a0);
                a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp + j + 8), a1);
                a2 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xp + j + 16), a2);
                a3 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xp + j + 24), a3);
            }
            __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
            tot = _mm256_fmadd_ps(a, _mm256_set1_ps(scale_at(sc, kind, s0 + g)), tot);
        }
        __m128 r = _mm_add_ps(_mm256_castps256_ps128(tot), _mm256_extractf128_ps(tot, 1));
        r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        r = _mm_add_ss(r, _mm_shuffle_ps(r, r, 0x55));
        return _mm_cvtss_f32(r);
    }
#endif
    float tot = 0.0f;
    for (int64_t g = 0; g < ng; g++) {
        const int8_t *wp = w + g * G;
        const float *xp = x + g * G;
        float a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t j = 0;
        for (; j + 8 <= G; j += 8)
            for (int t = 0; t < 8; t++) a[t] += (float)wp[j + t] * xp[j + t];
        float acc = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
        for (; j < G; j++) acc += (float)wp[j] * xp[j];
        tot += acc * scale_at(sc, kind, s0 + g);
    }
    return tot;
}

/* out (M, N) = x (M, K) @ (q (N, K) * scales (N, K/G))^T; all contiguous, out f32 */
void hi_i8_gemv(const float *x, int64_t M, int64_t K, const int8_t *w, int64_t N,
                const void *sc, int kind, int64_t G, float *out) {
    int64_t ng = K / G;
    /* threads only for products large enough to amortise waking them: a SmolLM2-size product
       (<= 2 M weights, ~0.1 ms on one core) ran slower on two cores than on one, as the OpenMP
       worker's wake-up and the BLAS threads of the other ops compete for the cores */
    #pragma omp parallel for schedule(dynamic, 32) if (M * N * K >= PAR_MIN)
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++)
            out[m * N + n] = dot_row(x + m * K, w + n * K, K, G, sc, kind, n * ng);
}

/* out (R, K) f32 = rows r0 .. r0+R of q * scales */
void hi_i8_dequant(const int8_t *w, int64_t r0, int64_t R, int64_t K, const void *sc, int kind,
                   int64_t G, float *out) {
    int64_t ng = K / G;
    #pragma omp parallel for schedule(static) if (R * K >= 65536)
    for (int64_t r = 0; r < R; r++) {
        const int8_t *wp = w + (r0 + r) * K;
        float *op = out + r * K;
        for (int64_t g = 0; g < ng; g++) {
            float s = scale_at(sc, kind, (r0 + r) * ng + g);
            for (int64_t j = 0; j < G; j++) op[g * G + j] = (float)wp[g * G + j] * s;
        }
    }
}
"""

# spin-wait iterations of an idle OpenMP worker before it sleeps (libgomp's GOMP_SPINCOUNT; its
# default is 300000, or 1000 with more threads than cores): 3000 decoded SmolLM2 Q8_0 at 59 tok/s
# on 2 threads here, 30000 at 78 (par.inc)
GOMP_SPINCOUNT = 30000
_FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3", "-fopenmp"], ["-O3"])
_local = threading.local()


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hetinfer" / "cpu"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.strip()
    except OSError:
        pass
    return platform.processor()


def _compiler() -> tuple[str, str] | None:
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return cc, version.splitlines()[0] if version else "?"


def library_key(source: str, cc: str, version: str, flags) -> str:
    """The cache key of one build: source, compiler path and version, flags, machine, CPU flags."""
    return hashlib.sha256("\0".join([source, cc, version, " ".join(flags), platform.machine(),
                                     _cpu_flags()]).encode()).hexdigest()[:20]


def paste_includes(source: str) -> str:
    """source with each `#include "name.inc"` replaced by that file beside this module (par.inc:
    the threads' back-off), so that the compiler gets one file and the cache key hashes all of it."""
    return re.sub(r'#include "(\w+\.inc)"', lambda m: (Path(__file__).parent / m[1]).read_text(), source)


def build_library(name: str, source: str, declare, flag_sets=_FLAG_SETS) -> ctypes.CDLL:
    """Compile C `source` (or reuse the cached shared object) and load it through ctypes;
    `declare(lib)` sets its functions' argtypes. Shared by the CPU kernels in C (this module,
    f32.py). The flag sets are tried in order, the first that compiles wins. The shared object
    is {name}_{key}.so in the private kernel cache at cache_dir() (hetinfer.kernel_cache: 0700,
    files 0600 with a sha256 recorded at build; one not owned by this user, writable by others,
    a symlink or not matching its digest is rebuilt, with a warning), key = library_key(...):
    a change of any part rebuilds. Raises RuntimeError when no compiler is found or none of
    the flag sets compiles."""
    from hetinfer.kernel_cache import KernelCache
    source = paste_includes(source)
    found = _compiler()
    if found is None:
        raise RuntimeError(f"no C compiler ({os.environ.get('CC', 'cc')}) on PATH")
    cc, version = found
    cache = KernelCache(cache_dir())
    errors = []
    for flags in flag_sets:
        fname = f"{name}_{library_key(source, cc, version, flags)}.so"
        so = cache.path(fname)
        if so is None:
            with cache.workdir() as tmp:
                src, out = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
                src.write_text(source)
                r = subprocess.run([cc, *flags, "-fPIC", "-shared", str(src), "-o", str(out), "-lm"],
                                   capture_output=True, text=True, timeout=300)
                if r.returncode != 0:
                    errors.append(f"{cc} {' '.join(flags)}: {r.stderr.strip()[-400:]}")
                    continue
                so = cache.store(fname, out.read_bytes())    # atomic, 0600, digest beside it
        # OpenMP workers spin a while (about 1-2 ms here) between products, then sleep: the ~120
        # regions of a decode step then start without a wake-up each (SmolLM2 Q8_0 on 2 threads: 78
        # tok/s, against 51 with workers that sleep at once); a worker left behind on a core another
        # process holds sends the next regions to one thread (par.inc). OMP_WAIT_POLICY, when set,
        # is the user's choice and wins.
        if "OMP_WAIT_POLICY" not in os.environ:
            os.environ.setdefault("GOMP_SPINCOUNT", str(GOMP_SPINCOUNT))
        lib = ctypes.CDLL(str(so))
        declare(lib)
        lib.flags = flags
        return lib
    raise RuntimeError("the C compiler failed: " + " | ".join(errors))


def _declare(lib: ctypes.CDLL) -> None:
    i64, vp = ctypes.c_int64, ctypes.c_void_p
    lib.hi_i8_gemv.argtypes = [vp, i64, i64, vp, i64, vp, ctypes.c_int, i64, vp]
    lib.hi_i8_gemv.restype = None
    lib.hi_i8_dequant.argtypes = [vp, i64, i64, i64, vp, ctypes.c_int, i64, vp]
    lib.hi_i8_dequant.restype = None


class LazyLibrary:
    """A compiled kernel library loaded on first use, once: state "c" (loaded), off_state
    (chosen off by env var `env` = off_value), or "numpy" (no compiler: warned once, the
    caller falls back). on_load runs once after a successful build."""

    def __init__(self, build, env: str, off_value: str, off_state: str, fallback: str, on_load=None):
        self.build, self.env, self.off_value, self.off_state = build, env, off_value, off_state
        self.fallback, self.on_load = fallback, on_load
        self.lib, self.state = None, "unloaded"
        self._lock = threading.Lock()

    def get(self):
        if self.state != "unloaded":
            return self.lib
        with self._lock:
            if self.state == "unloaded":
                if os.environ.get(self.env, "").lower() == self.off_value:
                    self.state = self.off_state
                else:
                    try:
                        self.lib, self.state = self.build(), "c"
                        if self.on_load is not None:
                            self.on_load()
                    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                        self.state = "numpy"
                        warnings.warn(f"hetinfer-cpu: {self.fallback}: {e}", RuntimeWarning, stacklevel=3)
        return self.lib

    def reset(self, state: str = "unloaded") -> None:
        self.lib, self.state = None, state


def _build() -> ctypes.CDLL:
    """Compile (or reuse the cached) shared object; raises RuntimeError when no compiler works."""
    return build_library("int8", C_SOURCE, _declare)


_LIB = LazyLibrary(lambda: _build(), "HETINFER_CPU_INT8", "numpy", "numpy",
                   "int8 matmul falls back to NumPy (slower decode)")     # states: unloaded | c | numpy


def library():
    """The compiled kernel library, or None (NumPy fallback; warned once)."""
    return _LIB.get()


def _reset_for_tests(state: str = "unloaded") -> None:
    _LIB.reset(state)


def backend_name() -> str:
    lib = library()
    return "numpy" if lib is None else "c " + " ".join(lib.flags)


def _scale_kind(s: np.ndarray) -> int:
    if s.dtype in _SCALE_KIND:
        return _SCALE_KIND[s.dtype]
    if s.dtype.itemsize == 2 and "bfloat16" in s.dtype.name:
        return 2
    raise TypeError(f"int8 matmul: unsupported scales dtype {s.dtype}")


def _tile(n: int) -> np.ndarray:
    buf = getattr(_local, "tile", None)
    if buf is None or buf.size < n:
        buf = _local.tile = np.empty(max(n, _TILE), F32)
    return buf[:n]


def matmul(x, weight, bias, scales, out):
    """The ("matmul", "cpu", "i8") kernel."""
    lib = library()
    if lib is None:
        from .kernels import matmul as numpy_matmul
        return numpy_matmul(x, weight, bias, scales, out)
    w, o = np.ascontiguousarray(weight.numpy()), out.numpy()
    sc = np.ascontiguousarray(scales.numpy())
    n, k = w.shape
    g = k // sc.shape[1]
    kind = _scale_kind(sc)
    xn = x.numpy()
    x2 = np.ascontiguousarray(xn.reshape(-1, k) if xn.dtype == F32 else xn.astype(F32).reshape(-1, k))
    m = x2.shape[0]
    direct = o.dtype == F32 and o.flags.c_contiguous
    o2 = o.reshape(m, n) if direct else np.empty((m, n), F32)                    # (M, N)
    if m <= SMALL_M:
        lib.hi_i8_gemv(x2.ctypes.data, m, k, w.ctypes.data, n, sc.ctypes.data, kind, g, o2.ctypes.data)
    else:
        from . import f32 as _f32k           # the f32 kernel on OpenMP threads (BLAS runs one thread)
        step = max(1, _TILE // k)
        part = np.empty(m * min(step, n), F32)                               # (M, rows of a tile)
        for r0 in range(0, n, step):
            r1 = min(r0 + step, n)
            t = _tile((r1 - r0) * k).reshape(r1 - r0, k)
            lib.hi_i8_dequant(w.ctypes.data, r0, r1 - r0, k, sc.ctypes.data, kind, g, t.ctypes.data)
            dst = part[:m * (r1 - r0)].reshape(m, r1 - r0)                     # contiguous
            _f32k.product(x2, t, None, dst)
            o2[:, r0:r1] = dst
    if bias is not None:
        b = bias.numpy()
        o2 += b if b.dtype == F32 else b.astype(F32)
    if not direct:
        o[...] = o2.reshape(o.shape)
