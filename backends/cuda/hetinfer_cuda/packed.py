"""Launchers for the packed GGUF weight kernels (csrc/packed.cu, its own NVRTC module per
activation dtype: driver.packed_kernel).

A packed weight (hetinfer.packed) is a device Tensor whose bytes are N rows of K / block blocks,
each row packed on its own as the GGUF file stores it. Two kernels per format:

- gemv_<fmt>_m{1,2,4,8}: decode, M <= 8 rows of x, weights dequantized in registers (integer dot
  products against x in 16-bit fixed point), rms_norm prologue, bias, swiglu and residual fused
  (nothing is allocated: a decode step with packed weights can be captured in a CUDA graph).
  Each warp owns two weight rows at a time; their bytes reach shared memory by cp.async, one
  or more chunks (up to 64 x 32 values; 128 x 32 for the k-quants) ahead of the one being
  decoded. `plan` picks the chunk, the chunks in flight and, for products with fewer row pairs
  than resident warps, a split of each pair's chunks over 2-8 warps of a block.
- dequant_<fmt>: packed -> (N, K) f32/f16/bf16 for the cuBLAS product of a prefill (kernels.matmul
  treats it as it treats int8: dequantize into a temporary, cuBLAS, epilogue kernel).

The weight's address must be 16-byte aligned (device allocations are; a view that starts mid-row
of a format whose row is not a multiple of 16 bytes is refused with a clear error).
"""

from __future__ import annotations

import os
from typing import NamedTuple

from hetinfer import dtypes as DT
from hetinfer.errors import DeviceError, DTypeError, ShapeError
from hetinfer.tensor import Tensor

from . import driver as D
from . import kernels as KN
from .driver import Arg

try:                                   # the core table (hetinfer.packed): block sizes and bytes
    from hetinfer.packed import FORMATS as _CORE_FORMATS
    _TABLE = {f.name: (f.block, f.nbytes) for f in _CORE_FORMATS}
except ImportError:                    # an older core: the ggml layouts, by name
    _TABLE = {"q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24),
              "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210)}

# kernel template codes (csrc/packed.cu PkFmt)
_CODE = {"q8_0": 0, "q4_0": 1, "q4_1": 2, "q5_0": 3, "q5_1": 4, "q4_k": 5, "q5_k": 6, "q6_k": 7}
FORMATS = tuple(n for n in _CODE if n in _TABLE)
PACKED_OPS = ("matmul", "embedding")      # the ops with kernels for packed weights
_WARPS = 8                             # warps per block of the GEMV
_MM = (1, 2, 4, 8)                     # instantiated row counts of x
# blocks per multiprocessor the GEMV grid is capped at (its warps loop over the rows beyond)
BLOCKS_PER_SM = int(os.environ.get("HETINFER_CUDA_PACKED_BPS", "0") or 0)
# "ck,sk,la": every GEMV launch walks its weight so (a sweep's knob; packed.plan checks it)
_FORCED = tuple(os.environ.get("HETINFER_CUDA_PACKED_PLAN", "").split(",")) if os.environ.get(
    "HETINFER_CUDA_PACKED_PLAN") else None


def fmt_name(qtype) -> str:
    """'q4_k' for a packed DType, a hetinfer.packed.Format, 'q4_k' or the ggml name 'Q4_K'."""
    name = getattr(qtype, "name", qtype)
    if not isinstance(name, str) or name.lower() not in _TABLE:
        raise DTypeError(f"packed weights on cuda: unknown format {qtype!r}; expected one of {', '.join(_TABLE)}")
    return name.lower()


def row_bytes(qtype, K: int) -> int:
    block, nbytes = _TABLE[fmt_name(qtype)]
    if K <= 0 or K % block:
        raise ShapeError(f"a {fmt_name(qtype)} row holds whole blocks of {block} values; K={K} is not a multiple")
    return K // block * nbytes


def _chunk(name: str) -> int:
    """Most items (32 values) of a row per warp step: PkGeo<QT>::CHUNK."""
    return 128 if _TABLE[name][0] == 256 else 64


def _win(name: str, ck: int) -> int:
    """Staging bytes of a row's window for chunks of ck items: pk_win<QT> in packed.cu."""
    block, nbytes = _TABLE[name]
    return (ck // (block // 32) * nbytes + 45) // 16 * 16 + 16


def _static(m: int) -> int:
    """Static shared bytes of gemv_<fmt>_m<m>: red[m] and part[2][8][m][2] floats."""
    mm = next(v for v in _MM if v >= m)
    return 4 * mm + 128 * mm


def _smem(name: str, m: int, K: int, ck: int | None = None, la: int = 1) -> int:
    """Dynamic shared bytes: x of m rows in fixed point (40 bytes per 16 values) and each warp's
    ring of la + 1 staging buffers of 2 rows' windows."""
    return m * (K // 16) * 40 + _WARPS * (la + 1) * 2 * _win(name, ck or _chunk(name))


def _fit(sk: int, ipr: int, ck: int) -> int:
    """sk halved until each of a slot's warps has a chunk of the row (ipr items, ck a chunk)."""
    while sk > 1 and sk > -(-ipr // ck):
        sk //= 2
    return sk


class Plan(NamedTuple):
    """How a GEMV launch walks the weight: chunks of ck items, la chunks in flight per warp,
    sk warps splitting each row pair's chunks, a grid of `grid` blocks."""
    ck: int
    sk: int
    la: int
    grid: int
    shared: int


def plan(dev, name: str, N: int, K: int, m: int, swiglu: bool, force=None, blocks: int | None = None) -> Plan:
    """The launch of gemv_<name> for m rows of x and an (N, K) weight.

    Default, from a sweep of every plan on the H200 (packed_check.py, llama2-7b and tinyllama
    products): whole chunks of CHUNK items, one in flight per warp, no split, except where
    the row pairs fill at most half of the resident warps and a row holds two chunks or more
    (tinyllama's down product: 5.5 us against 6.6): there two warps split each pair's
    chunks. Smaller chunks, more in flight or wider splits measured slower or within 3 %.
    force: (ck, sk, la) from the caller or HETINFER_CUDA_PACKED_PLAN="ck,sk,la" (a sweep's
    knob), checked."""
    ipb = _TABLE[name][0] // 32
    ipr = K // 32
    pairs = N // 2 if swiglu else -(-N // 2)
    cmax = _chunk(name)
    force = force or _FORCED
    if force:
        ck, sk, la = (int(v) for v in force)
        if ck % 32 or ck % ipb or not 32 <= ck <= cmax or sk not in (1, 2, 4, 8) or not 1 <= la <= 3:
            raise ValueError(f"packed GEMV plan {force}: ck a multiple of 32 (and of {ipb}) up to {cmax}, "
                             f"sk 1, 2, 4 or 8, la 1..3")
        sk = _fit(sk, ipr, ck)
    else:
        warps = dev.sm_count * resident_blocks(dev, _smem(name, m, K) + _static(m)) * _WARPS
        ck, sk, la = cmax, 1, 1
        if 2 * pairs <= warps:                     # half the warps or more would idle
            sk = _fit(2, ipr, ck)
    while la > 1 and _smem(name, m, K, ck, la) + _static(m) > dev.smem_optin:
        la -= 1
    shared = _smem(name, m, K, ck, la)
    slots = _WARPS // sk
    units = -(-pairs // slots)
    if blocks:
        grid = max(1, min(units, int(blocks)))
    else:
        bps = BLOCKS_PER_SM or resident_blocks(dev, shared + _static(m))
        grid = max(1, min(units, dev.sm_count * bps))
    return Plan(ck, sk, la, grid, shared)


def _check_weight(w: Tensor, name: str, N: int, K: int) -> int:
    need = N * row_bytes(name, K)
    have = w.numel * w.dtype.itemsize
    if have < need:
        raise ShapeError(f"packed {name} weight ({N}, {K}) needs {need} bytes; the tensor holds {have}")
    p = KN._p(w)
    if p % 16:
        raise DeviceError(f"packed {name} weight at an address that is not 16-byte aligned (byte offset "
                          f"{w.byte_offset}); pass a contiguous copy of the rows")
    return p


_smem_per_sm: dict[int, int] = {}


def resident_blocks(dev, shared: int) -> int:
    """GEMV blocks a multiprocessor holds at once with `shared` dynamic bytes each (at most 4)."""
    per_sm = _smem_per_sm.get(dev.index)
    if per_sm is None:
        attr = D._drv().CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
        per_sm = _smem_per_sm[dev.index] = dev.attribute(attr)
    return max(1, min(4, per_sm // (shared + 1024)))


def gemv_fused(dev, key: str, xk, x32: int, w: Tensor, name: str, b, nw, eps: float, pro: int, swi: int,
               rk, r32: int, o, o32: int, M: int, N: int, K: int, blocks: int | None = None, force=None) -> None:
    """out (M, No) = residual + act(pro(x) @ W^T + bias) for M <= 8 (more in passes of at most 8),
    arguments as kernels.matmul prepares them: xk key-typed or f32 (x32), b and nw key-typed,
    rk / o key-typed or f32 (r32 / o32)."""
    wp = _check_weight(w, name, N, K)
    No = N // 2 if swi else N
    xvec = int(KN._aligned(xk, nw))
    xb, ob = xk.dtype.itemsize, o.dtype.itemsize
    rb = rk.dtype.itemsize if rk is not None else 0
    m0 = 0
    while m0 < M:
        mp = min(M - m0, 8)
        while mp > 1 and _smem(name, mp, K) + _static(mp) > dev.smem_optin:
            mp //= 2
        pl = plan(dev, name, N, K, mp, bool(swi), force, blocks)
        if pl.shared + _static(mp) > dev.smem_optin:
            raise ShapeError(f"packed {name} GEMV: K={K} needs {pl.shared + _static(mp)} bytes of shared memory; "
                             f"this GPU allows {dev.smem_optin}")
        mm = next(v for v in _MM if v >= mp)
        fn = f"gemv_{name}_m{mm}"
        D.launch(dev, D.packed_kernel(dev, key, fn), (pl.grid,), (_WARPS * 32,),
                 [Arg.ptr(KN._p(xk) + m0 * K * xb), Arg.i32(x32), Arg.i32(xvec), Arg.ptr(KN._p(nw)),
                  Arg.f32(eps), Arg.i32(pro), Arg.ptr(wp), Arg.ptr(KN._p(b)), Arg.i32(swi),
                  Arg.ptr(KN._p(rk) + m0 * No * rb if rk is not None else 0), Arg.i32(r32),
                  Arg.ptr(KN._p(o) + m0 * No * ob), Arg.i32(o32), Arg.i32(mp), Arg.i32(N), Arg.i32(K),
                  Arg.i32(pl.ck), Arg.i32(pl.sk), Arg.i32(pl.la)],
                 shared=pl.shared, name=f"{fn}<{key}>", pdl=KN.PDL and bool(dev.capturing))
        m0 += mp


def _key(x: Tensor, out: Tensor) -> str:
    for t in (x, out):
        if t.dtype != DT.f32:
            return t.dtype.name
    return "f32"


def packed_gemv(x: Tensor, w_bytes: Tensor, qtype, N: int, K: int, out: Tensor, *, bias=None, residual=None,
                norm_weight=None, eps: float = 1e-6, act: str | None = None, blocks: int | None = None,
                plan=None) -> Tensor:
    """out (M, N or N // 2) = residual + act(pro(x) @ W^T + bias) for x (M, K), M <= 8 rows per
    pass, W the packed (N, K) weight in w_bytes (any Tensor holding its bytes). x and out are
    f16/bf16/f32; the kernel runs in the first of x, out that is not f32 (f32 accumulation).
    blocks: the GEMV's grid (default: one wave, resident_blocks per multiprocessor); plan:
    (ck, sk, la) in place of packed.plan's choice."""
    name = fmt_name(qtype)
    key = _key(x, out)
    if out.dtype.name not in (key, "f32") or x.dtype.name not in (key, "f32"):
        raise DTypeError(f"packed_gemv: x {x.dtype} and out {out.dtype}: each must be {key} or f32")
    M = x.numel // K if K else 0
    No = N // 2 if act else N
    if x.shape[-1] != K or out.numel != M * No:
        raise ShapeError(f"packed_gemv: x {x.shape}, out {out.shape} for a ({N}, {K}) weight")
    if M == 0 or N == 0:
        return out
    xk, x32 = KN._side(x, key)
    rk, r32 = KN._side(residual, key)
    o32 = int(out.dtype == DT.f32 and key != "f32")
    gemv_fused(KN._dev(w_bytes), key, xk, x32, w_bytes, name, KN._as(bias, key), KN._as(norm_weight, key),
               float(eps), int(norm_weight is not None), int(act == "swiglu"), rk, r32, out, o32, M, N, K,
               blocks=blocks, force=plan)
    return out


def packed_dequant(w_bytes: Tensor, qtype, N: int, K: int, out: Tensor) -> Tensor:
    """out (N, K) f32/f16/bf16 = the packed weight dequantized (exactly the gguf reference's
    float32 values, rounded to out's dtype)."""
    name = fmt_name(qtype)
    if out.dtype.name not in KN.FLOATS or out.numel != N * K:
        raise ShapeError(f"packed_dequant: out {out.shape} {out.dtype}; expected ({N}, {K}) f32/f16/bf16")
    wp = _check_weight(w_bytes, name, N, K)
    dev = KN._dev(w_bytes)
    items = N * (K // 32)
    D.launch(dev, D.packed_kernel(dev, out.dtype.name, f"dequant_{name}"), (KN._grid_1d(dev, items),), (256,),
             [Arg.ptr(wp), Arg.ptr(KN._p(out)), Arg.i32(N), Arg.i32(K), Arg.i32(int(KN._p(out) % 16 == 0))],
             name=f"dequant_{name}<{out.dtype.name}>")
    return out


def packed_embedding(ids: Tensor, table: Tensor, out: Tensor) -> Tensor:
    """out (T, K) = rows ids (T,) of the packed table (V, K // block), dequantized into out's
    dtype (f32/f16/bf16); an id outside [0, V) gives a row of NaN, as the float kernel does."""
    name = fmt_name(table.dtype)
    V, K = table.shape[0], table.shape[1] * _TABLE[name][0]
    T = ids.shape[0]
    if out.dtype.name not in KN.FLOATS or out.shape != (T, K) or not out.is_contiguous:
        raise ShapeError(f"embedding of a packed {name} table: out {out.shape} {out.dtype}; expected a "
                         f"contiguous ({T}, {K}) f32/f16/bf16 tensor")
    wp = _check_weight(table, name, V, K)
    dev = KN._dev(table)
    D.launch(dev, D.packed_kernel(dev, out.dtype.name, f"embed_{name}"), (T,), (KN._row_threads(K // 32),),
             [Arg.ptr(wp), Arg.ptr(KN._p(ids)), Arg.i32(ids.dtype == DT.i64), Arg.ptr(KN._p(out)),
              Arg.i32(V), Arg.i32(K), Arg.i32(int(KN._p(out) % 16 == 0))],
             name=f"embed_{name}<{out.dtype.name}>")
    return out


def ensure_registered() -> list[str]:
    """Register the cuda matmul kernel for the packed dtypes where the backend's plugin hook
    did not (an older hetinfer_cuda/__init__.py); returns the dtypes registered here."""
    from hetinfer import registry
    done = []
    for op in PACKED_OPS:
        fn = dict(KN.KERNELS)[op]
        for name in FORMATS:
            if name in DT.BY_NAME and not registry.has_kernel(op, "cuda", name):
                registry.register_kernel(op, "cuda", name, fn)
                done.append(f"{op}:{name}")
    return done
