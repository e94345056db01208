"""CPU kernels for packed GGUF weights (hetinfer.packed: q8_0, q4_0, q4_1, q5_0, q5_1, q4_k,
q5_k, q6_k): matmul and embedding.

Two paths:
- NumPy (the reference path, and the fallback without a C compiler or with
  HETINFER_CPU_PACKED=numpy): `dequantize` below unpacks a tile of rows to float32 (written from
  the layouts in hetinfer.packed, not from the gguf package, which the tests use as the
  independent reference) and kernels.matmul multiplies tile by tile.
- C (packed.c beside this file), decode (M <= SMALL_M rows of x): the activations are rounded
  to 8 bits per block (32 values for the legacy formats, 256 for the k-quants, one float scale
  max|x| / 127 each, with the integer sums the offsets need), and each packed row meets them in
  integer dot products, as llama.cpp does. See packed.c for the instruction sets and threads.
  Prefill (more rows): tiles of weight rows dequantized in C into a buffer that stays in cache,
  multiplied by x with the f32 kernel (f32.py); x is not rounded there (measured 2-3x faster
  than the integer dots at M >= 16 here, whose tiles of 4 rows do not reuse registers enough).
- decode_layer (ops.decode_layer): a decoder layer of decode rows in one C call (packed.c), the
  same composed of ops without the library or for tensors it does not take.
"""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

import numpy as np

from .int8 import LazyLibrary, build_library

F32 = np.dtype(np.float32)
SMALL_M = 8            # rows of x up to which the integer dot products run; more: dequantized tiles
_TILE = 1 << 19        # f32 values of a dequantized tile of weight rows (2 MiB) ...
_TILE_ROWS = 512       # ... and at least this many rows: the f32 kernel ran Qwen2.5's down product
                       # (K = 4864: 107 rows a 2 MiB tile) at 52 GFLOP/s, 78 with 512 rows


# --- NumPy dequantizers: blocks (R, nbytes) uint8 -> (R, block) float32 ----------------------
def _half(b: np.ndarray, at: int) -> np.ndarray:
    return b[:, at:at + 2].view(np.float16).astype(F32)                    # (R, 1)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """qs (R, 16) -> (R, 32): low nibbles are values 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 15, qs >> 4], axis=1)


def _bit4(qh: np.ndarray) -> np.ndarray:
    """qh (R, 4) little-endian u32 -> (R, 32) bit j as 16 for value j."""
    bits = np.unpackbits(qh, axis=1, bitorder="little")                    # (R, 32)
    return bits << 4


def _q8_0(b):
    return _half(b, 0) * b[:, 2:34].view(np.int8)


def _q4_0(b):
    return _half(b, 0) * (_nibbles(b[:, 2:18]).astype(np.int8) - 8)


def _q4_1(b):
    return _half(b, 0) * _nibbles(b[:, 4:20]) + _half(b, 2)


def _q5_0(b):
    return _half(b, 0) * ((_nibbles(b[:, 6:22]) | _bit4(b[:, 2:6])).astype(np.int8) - 16)


def _q5_1(b):
    return _half(b, 0) * (_nibbles(b[:, 8:24]) | _bit4(b[:, 4:8])) + _half(b, 2)


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 scale bytes of q4_k / q5_k (R, 12) -> 6-bit scales and mins, (R, 8) each."""
    lo, hi, top = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo & 63, (top & 15) | ((lo >> 6) << 4)], axis=1)
    mn = np.concatenate([hi & 63, (top >> 4) | ((hi >> 6) << 4)], axis=1)
    return sc.astype(F32), mn.astype(F32)


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """qs (R, 128) -> (R, 8, 32): chunk c's low nibbles are sub-block 2c, high ones 2c + 1."""
    q = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([q & 15, q >> 4], axis=2).reshape(-1, 8, 32)


def _q4_k(b):
    sc, mn = _k_scales(b[:, 4:16])
    u = _k_nibbles(b[:, 16:144])                                               # (R, 8, 32)
    x = (_half(b, 0) * sc)[:, :, None] * u - (_half(b, 2) * mn)[:, :, None]
    return x.reshape(-1, 256)


def _q5_k(b):
    sc, mn = _k_scales(b[:, 4:16])
    high = np.unpackbits(b[:, 16:48, None], axis=2, bitorder="little")        # (R, 32 l, 8 j)
    u = _k_nibbles(b[:, 48:176]) | (high.transpose(0, 2, 1) << 4)               # (R, 8, 32)
    x = (_half(b, 0) * sc)[:, :, None] * u - (_half(b, 2) * mn)[:, :, None]
    return x.reshape(-1, 256)


def _q6_k(b):
    ql = b[:, 0:128].reshape(-1, 2, 2, 32)                 # (R, half, i & 1, l)
    qh = b[:, 128:192].reshape(-1, 2, 1, 32)               # (R, half, 1, l)
    low = np.stack([ql & 15, ql >> 4], axis=2).reshape(-1, 2, 4, 32)           # i = 2 (i >> 1) + (i & 1)
    high = (qh >> np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]) & 3   # (R, half, 4, l)
    q = ((low | (high << 4)).astype(np.int8) - 32).reshape(-1, 16, 16)        # (R, 16 sub-blocks, 16)
    sc = b[:, 192:208].view(np.int8).astype(F32)                               # (R, 16)
    return ((_half(b, 208) * sc)[:, :, None] * q).reshape(-1, 256)


_DEQUANT = {"q8_0": _q8_0, "q4_0": _q4_0, "q4_1": _q4_1, "q5_0": _q5_0, "q5_1": _q5_1,
            "q4_k": _q4_k, "q5_k": _q5_k, "q6_k": _q6_k}


def dequantize(blocks: np.ndarray, fmt) -> np.ndarray:
    """Rows of packed blocks (R, K // block) np.void -> (R, K) float32."""
    r, nb = blocks.shape
    raw = np.ascontiguousarray(blocks).view(np.uint8).reshape(r * nb, fmt.nbytes)   # (R nb, nbytes)
    return _DEQUANT[fmt.name](raw).astype(F32, copy=False).reshape(r, nb * fmt.block)


# --- the C kernels (packed.c) -------------------------------------------------------------------
_HERE = Path(__file__).parent
_ISA_LEVEL = {"": 0, "best": 0, "vnni256": 1, "avx2": 2, "c": 3}
# no -march=native: the SIMD variants carry their own target attributes and are picked at run time
_FLAGS = (["-O3", "-fopenmp"], ["-O3"])


def c_source() -> str:
    """packed.c with each local .inc file (packed_simd.inc, packed_attention.inc, packed_dequant.inc) pasted where it is
    included (the compiler gets one source; the cache key hashes all of it)."""
    return re.sub(r'#include "(\w+\.inc)"', lambda m: (_HERE / m[1]).read_text(), (_HERE / "packed.c").read_text())


def _declare(lib) -> None:
    i64, vp, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.hi_pk_select.argtypes, lib.hi_pk_select.restype = [i32], ctypes.c_char_p
    lib.hi_pk_set_threads.argtypes, lib.hi_pk_set_threads.restype = [i32], None
    lib.hi_pk_threads.argtypes, lib.hi_pk_threads.restype = [], i32
    lib.hi_pk_par_skip.argtypes, lib.hi_pk_par_skip.restype = [i32], i32
    lib.hi_pk_quantize.argtypes, lib.hi_pk_quantize.restype = [vp, i64, i64, i64, vp, vp, vp], None
    lib.hi_pk_matmul.argtypes = [i32, vp, i64, i64, vp, vp, vp, i64, vp, i64]
    lib.hi_pk_matmul.restype = None
    lib.hi_pk_dequant.argtypes, lib.hi_pk_dequant.restype = [i32, vp, i64, vp, i64, i64, vp], None
    lib.hi_pk_quantize_norm.argtypes = [vp, i64, i64, i64, vp, ctypes.c_float, vp, vp, vp, vp]
    lib.hi_pk_quantize_norm.restype = None
    lib.hi_pk_finish.argtypes, lib.hi_pk_finish.restype = [vp, i64, i64, vp, i32, vp, vp], None
    lib.hi_pk_decode_layer.argtypes = [ctypes.POINTER(_Layer), vp, i64, vp, vp, vp, vp, vp, vp, vp, vp, i64]
    lib.hi_pk_decode_layer.restype = None


class _Part(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int32), ("pad", ctypes.c_int32), ("w", ctypes.c_void_p), ("n", ctypes.c_int64)]


class _Layer(ctypes.Structure):
    """packed.c's hi_layer: a decoder layer's shapes, norms and packed products."""
    _fields_ = [(n, ctypes.c_int64) for n in ("D", "F", "Hq", "Hkv", "Dh", "BS", "MB")] + [
        ("eps", ctypes.c_float), ("scale", ctypes.c_float),
        ("interleaved", ctypes.c_int32), ("nqkv", ctypes.c_int32), ("ngu", ctypes.c_int32), ("pad", ctypes.c_int32),
        ("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p), ("bqkv", ctypes.c_void_p),
        ("qkv", _Part * 3), ("gu", _Part * 2), ("o", _Part), ("down", _Part)]


def _build():
    lib = build_library("packed", c_source(), _declare, _FLAGS)
    isa = os.environ.get("HETINFER_CPU_PACKED_ISA", "").lower()
    if isa not in _ISA_LEVEL:
        raise RuntimeError(f"HETINFER_CPU_PACKED_ISA={isa!r}; expected best, vnni256, avx2 or c")
    lib.variant = lib.hi_pk_select(_ISA_LEVEL[isa]).decode()
    return lib


_LIB = LazyLibrary(_build, "HETINFER_CPU_PACKED", "numpy", "numpy",
                   "packed (GGUF) matmul falls back to NumPy dequantized tiles (slower)")


def library():
    """The compiled library, or None (NumPy path; warned once unless chosen)."""
    return _LIB.get()


def select(isa: str) -> str:
    """Use the SIMD variant isa ("best", "vnni256", "avx2" or "c": the best this CPU has up to it); returns
    the variant now in use. For tests and comparisons."""
    lib = library()
    if lib is None:
        return "numpy"
    lib.variant = lib.hi_pk_select(_ISA_LEVEL[isa]).decode()
    return lib.variant


def set_threads(n: int) -> None:
    """Threads of the packed products (OpenMP; default OMP_NUM_THREADS or all cores)."""
    lib = library()
    if lib is not None:
        lib.hi_pk_set_threads(int(n))


def backend_name() -> str:
    lib = library()
    return "numpy" if lib is None else f"c {lib.variant}, {lib.hi_pk_threads()} threads"


def _reset_for_tests(state: str = "unloaded") -> None:
    _LIB.reset(state)


def quantize_activations(x2: np.ndarray, act_block: int):
    """x (M, K) float32 -> (q int8 (M, K), d float32 (M, K // act_block), s int16 (M, K // 16)) as
    the C kernels round them: dx = max|x| / 127 per block, q = round(x / dx), s the sums of q."""
    m, k = x2.shape
    q = np.empty((m, k), np.int8)
    d = np.empty((m, k // act_block), F32)
    s = np.empty((m, k // 16), np.int16)
    library().hi_pk_quantize(x2.ctypes.data, m, k, act_block, q.ctypes.data, d.ctypes.data, s.ctypes.data)
    return q, d, s


def _x2(x, k: int) -> np.ndarray:
    xn = x.numpy()
    return np.ascontiguousarray(xn.reshape(-1, k) if xn.dtype == F32 else xn.astype(F32).reshape(-1, k))


def matmul(x, weight, bias, scales, out):
    """The ("matmul", "cpu", packed) kernel: 8-bit activations against the packed rows (C), or
    the NumPy dequantized tiles (kernels.matmul) without the library."""
    lib = library()
    if lib is None:
        from .kernels import matmul as numpy_matmul
        return numpy_matmul(x, weight, bias, scales, out)
    f = weight.dtype.packed
    w = weight.numpy()                                                      # (N, K // block) blocks
    if not w.flags.c_contiguous:
        w = np.ascontiguousarray(w)
    n, k = w.shape[0], w.shape[1] * f.block
    x2 = _x2(x, k)                                                          # (M, K)
    m = x2.shape[0]
    o = out.numpy()
    direct = o.dtype == F32 and o.flags.c_contiguous
    o2 = o.reshape(m, n) if direct else np.empty((m, n), F32)               # (M, N)
    if m <= SMALL_M:
        q, d, s = quantize_activations(x2, f.act_block)
        lib.hi_pk_matmul(f.ggml_type, w.ctypes.data, n, k, q.ctypes.data, d.ctypes.data, s.ctypes.data, m,
                         o2.ctypes.data, n)
    else:
        _tiles(lib, f, w, x2, o2)
    if bias is not None:
        b = bias.numpy()
        o2 += b if b.dtype == F32 else b.astype(F32)
    if not direct:
        o[...] = o2.reshape(o.shape)


def _f32c(t) -> np.ndarray | None:
    """t's array when it is a C-contiguous float32 host tensor, else None."""
    a = t.numpy()
    return a if a.dtype == F32 and a.flags.c_contiguous else None


def fused_matmul(x, weight, bias, scales, out, norm_weight=None, eps=1e-6, act=None, residual=None):
    """The packed matmul kernel with matmul's whole signature. Decode (M <= SMALL_M, every tensor
    f32 and contiguous, the library built): rms_norm + 8-bit rounding of x, the products, and
    bias + swiglu + residual each one C call (a step's few Python calls per product). Anything
    else: kernels.fused around `matmul`."""
    lib = library()
    f = weight.dtype.packed
    k = weight.shape[1] * f.block
    xa, oa = (_f32c(x), _f32c(out)) if lib is not None else (None, None)
    if xa is None or oa is None or xa.size // k > SMALL_M:
        return _FUSED(x, weight, bias, scales, out, norm_weight=norm_weight, eps=eps, act=act, residual=residual)
    nw, b, r = (None if t is None else _f32c(t) for t in (norm_weight, bias, residual))
    if (nw is None) != (norm_weight is None) or (b is None) != (bias is None) or (r is None) != (residual is None):
        return _FUSED(x, weight, bias, scales, out, norm_weight=norm_weight, eps=eps, act=act, residual=residual)
    w = weight.numpy()
    if not w.flags.c_contiguous:
        w = np.ascontiguousarray(w)
    n, m = w.shape[0], xa.size // k
    q, d, s = (np.empty((m, k), np.int8), np.empty((m, k // f.act_block), F32), np.empty((m, k // 16), np.int16))
    tmp = np.empty(k, F32) if nw is not None else None
    lib.hi_pk_quantize_norm(xa.ctypes.data, m, k, f.act_block, None if nw is None else nw.ctypes.data, eps,
                            None if tmp is None else tmp.ctypes.data, q.ctypes.data, d.ctypes.data, s.ctypes.data)
    y = np.empty((m, n), F32)                                               # (M, N) products
    lib.hi_pk_matmul(f.ggml_type, w.ctypes.data, n, k, q.ctypes.data, d.ctypes.data, s.ctypes.data, m,
                     y.ctypes.data, n)
    lib.hi_pk_finish(y.ctypes.data, m, n, None if b is None else b.ctypes.data, act == "swiglu",
                     None if r is None else r.ctypes.data, oa.ctypes.data)


def _tiles(lib, f, w: np.ndarray, x2: np.ndarray, o2: np.ndarray) -> None:
    """Prefill: tiles of rows of w dequantized (C) into one reused float32 buffer that stays in
    cache, each multiplied by all of x with the f32 kernel (f32.py): x is not rounded."""
    from . import f32 as _f32k
    from .int8 import _tile
    n, k = w.shape[0], x2.shape[1]
    step = max(_TILE_ROWS, _TILE // k)
    part = np.empty(x2.shape[0] * min(step, n), F32)                        # (M, rows of a tile)
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        t = _tile((r1 - r0) * k).reshape(r1 - r0, k)                        # (rows, K) f32
        lib.hi_pk_dequant(f.ggml_type, w.ctypes.data, k, None, r0, r1 - r0, t.ctypes.data)
        dst = part[:x2.shape[0] * (r1 - r0)].reshape(x2.shape[0], r1 - r0)
        _f32k.product(x2, t, None, dst)
        o2[:, r0:r1] = dst


def embedding(ids, table, out):
    """The ("embedding", "cpu", packed) kernel: the rows ids of a packed table, dequantized."""
    lib = library()
    if lib is None:
        from .kernels import embedding as numpy_embedding
        return numpy_embedding(ids, table, out)
    f = table.dtype.packed
    tab = table.numpy()
    if not tab.flags.c_contiguous:
        tab = np.ascontiguousarray(tab)
    k = tab.shape[1] * f.block
    idx = np.ascontiguousarray(ids.numpy(), dtype=np.int64)                 # (T,)
    o = out.numpy()
    direct = o.dtype == F32 and o.flags.c_contiguous
    o2 = o if direct else np.empty((idx.shape[0], k), F32)                  # (T, D)
    lib.hi_pk_dequant(f.ggml_type, tab.ctypes.data, k, idx.ctypes.data, 0, idx.shape[0], o2.ctypes.data)
    if not direct:
        o[...] = o2


_fused = []


def _FUSED(*args, **kw):
    """kernels.fused(matmul): the NumPy prologue / epilogue around `matmul` (made on first use:
    kernels imports this module)."""
    if not _fused:
        from .kernels import fused
        _fused.append(fused(matmul))
    return _fused[0](*args, **kw)


# --- decode_layer: a whole decoder layer for decode rows in one C call ----------------------------
_LAYERS: dict = {}       # id(wo) -> (the tensors the struct points into, kept alive; the struct)
_STEP: list = []         # the step tensors last seen and their pointers (shared by a step's layers)


def _sweep() -> None:
    """Drop the structs of layers whose o weight only this cache still holds (a model freed):
    run when a struct is made, so the cache keeps no freed model's weights alive."""
    import sys
    for key in [k for k, v in _LAYERS.items() if sys.getrefcount(v[0][2]) <= 2]:
        del _LAYERS[key]


def _ptr(t) -> int:
    return t.numpy().ctypes.data


def _known_layer(attn_norm, qkv, wo, mlp_norm, gu, w_down, k_pool, bqkv, eps, style, scale, num_heads):
    """The struct made for these very tensors and settings before (the C path took them), or None."""
    got = _LAYERS.get(id(wo))
    if got is not None and all(a is b for a, b in zip(got[0][:-1], (attn_norm, qkv, wo, mlp_norm, gu, w_down, bqkv))) \
            and got[0][-1] == (eps, style, scale, num_heads, k_pool.shape):
        return got[1]
    return None


def _layer_struct(attn_norm, qkv, wo, mlp_norm, gu, w_down, k_pool, bqkv, eps, style, scale, num_heads):
    known = _known_layer(attn_norm, qkv, wo, mlp_norm, gu, w_down, k_pool, bqkv, eps, style, scale, num_heads)
    if known is not None:
        return known
    refs = (attn_norm, qkv, wo, mlp_norm, gu, w_down, bqkv)
    key = id(wo)
    nb, bs, hkv, dh = k_pool.shape
    f = w_down.shape[1] * w_down.dtype.block
    L = _Layer(D=wo.shape[0], F=f, Hq=num_heads, Hkv=hkv, Dh=dh, BS=bs, MB=0, eps=eps, scale=scale,
               interleaved=int(style == "interleaved"), nqkv=len(qkv), ngu=len(gu), pad=0,
               attn_norm=_ptr(attn_norm), mlp_norm=_ptr(mlp_norm), bqkv=None if bqkv is None else _ptr(bqkv))
    for arr, parts in ((L.qkv, qkv), (L.gu, gu)):
        for i, p in enumerate(parts):
            arr[i] = _Part(p.dtype.packed.ggml_type, 0, _ptr(p), p.shape[0])
    L.o = _Part(wo.dtype.packed.ggml_type, 0, _ptr(wo), wo.shape[0])
    L.down = _Part(w_down.dtype.packed.ggml_type, 0, _ptr(w_down), w_down.shape[0])
    _sweep()
    _LAYERS[key] = (refs + ((eps, style, scale, num_heads, k_pool.shape),), L, ctypes.byref(L))
    return L


def _c_ready(x, attn_norm, qkv, wo, mlp_norm, gu, w_down, k_pool, v_pool, bqkv) -> bool:
    """The C path's conditions: f32 contiguous x, norms, bias and pools; packed contiguous weights."""
    if _f32c(x) is None or any(_f32c(t) is None for t in (attn_norm, mlp_norm, k_pool, v_pool)):
        return False
    if bqkv is not None and _f32c(bqkv) is None:
        return False
    return all(w.dtype.packed is not None and w.numpy().flags.c_contiguous for w in qkv + gu + (wo, w_down))


def decode_layer(x, attn_norm, wqkv, wo, mlp_norm, w_gate_up, w_down, k_pool, v_pool, positions, slot_mapping,
                 context_lens, block_tables, cos, sin, num_heads, bqkv, eps, style, scale):
    """The ("decode_layer", "cpu", packed) kernel: packed.c's hi_pk_decode_layer (norms, 8-bit
    products, rope, the cache write, attention, swiglu and both residual adds in one call), or
    the same composed of ops without the library (or for tensors it does not take)."""
    lib = library()
    L = None if lib is None else _known_layer(attn_norm, wqkv, wo, mlp_norm, w_gate_up, w_down, k_pool, bqkv, eps,
                                              style, scale, num_heads)
    if L is not None:                   # a layer the C path took before: only x and the pools may differ
        ready = _f32c(x) is not None and _f32c(k_pool) is not None and _f32c(v_pool) is not None
    else:
        ready = lib is not None and num_heads // k_pool.shape[2] <= 16 and \
            _c_ready(x, attn_norm, wqkv, wo, mlp_norm, w_gate_up, w_down, k_pool, v_pool, bqkv)
    if not ready:
        return _composed(x, attn_norm, wqkv, wo, mlp_norm, w_gate_up, w_down, k_pool, v_pool, positions,
                         slot_mapping, context_lens, block_tables, cos, sin, num_heads, bqkv, eps, style, scale)
    if L is None:
        L = _layer_struct(attn_norm, wqkv, wo, mlp_norm, w_gate_up, w_down, k_pool, bqkv, eps, style, scale,
                          num_heads)
    st = (positions, slot_mapping, context_lens, block_tables, cos, sin)
    if not _STEP or any(a is not b for a, b in zip(_STEP[0], st)):
        arrs = [np.ascontiguousarray(t.numpy(), dtype=np.int32) for t in st[:4]] + [_f32c(cos), _f32c(sin)]
        if arrs[4] is None or arrs[5] is None:
            arrs[4], arrs[5] = (np.ascontiguousarray(t.numpy(), dtype=F32) for t in (cos, sin))
        cl = arrs[2]
        _STEP[:] = [st, arrs, [a.ctypes.data for a in arrs], int(cl.max()) if cl.size else 0,
                    arrs[3].shape[1]]
    _, _, (pp, sp, cp, bp, cosp, sinp), max_ctx, mb = _STEP
    L.MB = mb
    xa = x.numpy()
    lib.hi_pk_decode_layer(_LAYERS[id(wo)][2], xa.ctypes.data, xa.shape[0], _ptr(k_pool), _ptr(v_pool), pp, sp,
                           cp, bp, cosp, sinp, max_ctx)


def _composed(x, attn_norm, wqkv, wo, mlp_norm, w_gate_up, w_down, k_pool, v_pool, positions, slot_mapping,
              context_lens, block_tables, cos, sin, num_heads, bqkv, eps, style, scale):
    """decode_layer as the ops it fuses (any weight and pool dtype the CPU kernels take)."""
    import hetinfer as hi
    from hetinfer import ops
    b, dev = x.shape[0], x.device
    nb, bs, hkv, dh = k_pool.shape
    hq, dt = num_heads, k_pool.dtype
    qkv = hi.empty((b, (hq + 2 * hkv) * dh), dt, dev)
    at = 0
    for w in wqkv:
        n = w.shape[0]
        ops.matmul(x, w, None if bqkv is None else bqkv[at:at + n], norm_weight=attn_norm, eps=eps,
                   out=qkv[:, at:at + n])
        at += n
    q = qkv[:, :hq * dh].contiguous().view(b, hq, dh)
    k = qkv[:, hq * dh:(hq + hkv) * dh].contiguous().view(b, hkv, dh)
    v = qkv[:, (hq + hkv) * dh:].contiguous().view(b, hkv, dh)
    ops.rope_paged_kv_write(q, k, v, k_pool, v_pool, positions, slot_mapping, cos, sin, style)
    qs = hi.tensor(np.arange(b + 1, dtype=np.int32), hi.i32, dev)
    att = ops.paged_attention(q, k_pool, v_pool, qs, context_lens, block_tables, scale=scale)
    ops.matmul(att.view(b, hq * dh), wo, residual=x, out=x)
    f = w_down.shape[1] * w_down.dtype.block
    if len(w_gate_up) == 1:
        act = ops.matmul(x, w_gate_up[0], norm_weight=mlp_norm, eps=eps, act="swiglu")
    else:
        gate, up = (ops.matmul(x, w, norm_weight=mlp_norm, eps=eps) for w in w_gate_up)
        if gate.shape[1] != f:                       # parts split elsewhere than gate | up
            y = hi.tensor(np.concatenate([gate.numpy(), up.numpy()], axis=1), gate.dtype, dev)
            gate, up = y[:, :f].contiguous(), y[:, f:].contiguous()
        act = ops.swiglu(gate, up)
    ops.matmul(act, w_down, residual=x, out=x)
