"""Python side of the CUDA kernels: argument packing and launch configuration.

Each op's kernels are compiled for the dtype of its key argument (see hetinfer.ops.OPS;
int8 matmul runs in its activations' dtype). f32 beside the key dtype is read and
written in place where the model needs it (the f32 residual stream: embedding's out,
rms_norm's x and out, matmul's x, residual and out), so decode allocates nothing.
Another float dtype in a secondary input is first cast to the key dtype on the device,
and an `out` of another dtype is computed in the key dtype and cast.
Strided views are handled here, on the device: a non-contiguous argument is gathered
into a contiguous temporary by a strided-copy kernel, and a non-contiguous output is
scattered back the same way (registered with contiguous=False, so dispatch passes
views as they are and nothing goes through the host).
"""

from __future__ import annotations

import ctypes
import functools
import os

from hetinfer import dtypes as DT
from hetinfer.errors import ShapeError
from hetinfer.tensor import Tensor, empty

from . import cupy_bridge
from . import driver as D
from .driver import Arg

FLOATS = ("f32", "f16", "bf16")
GEMV_MAX_M = 8          # rows of x up to which matmul uses the GEMV kernel
ATT_MAXD = 256          # head dim limit of the attention kernels
ADEC_SPLITS = 128       # decode attention: splits along the sequence at most
PADEC_MIN, PADEC_SPLITS = 64, 64   # paged decode rows: keys per split at least, splits at most (ops.cu)
_GEMV_WARPS = 8
# int8 decode GEMV by dp4a against x in 16-bit fixed point (f16/bf16 runs); "0": the float kernel
DP4A = os.environ.get("HETINFER_CUDA_DP4A", "1") != "0"
# the dp4a GEMV, rope_kv_write and decode attention, captured into a graph, start while the
# kernel before them ends (programmatic dependent launch: the GEMV's blocks request their
# weights, then wait for x; the others wait at once, saving only the launch); "0": plain.
# (The float GEMV is not launched so: it reads x with its weights, and waiting blocks only
# took slots from the kernel before it -- f16 tinyllama step 1286 -> 1295 us, run 2 of 2026-11-22.)
PDL = os.environ.get("HETINFER_CUDA_PDL", "1") != "0"
_DP4A_MAX_SMEM = 47 * 1024


# ---------------------------------------------------------------- helpers
def _dev(t: Tensor) -> D.CudaDevice:
    return D.get_device(t.device.index)


def _p(t: Tensor | None) -> int:
    return 0 if t is None else int(t.buffer.handle) + t.byte_offset


def _aligned(*tensors) -> bool:
    return all(_p(t) % 16 == 0 for t in tensors if t is not None)


def _vec(t: Tensor) -> int:
    return 16 // t.dtype.itemsize


def _k(dev, dtype_name, fn):
    return D.kernel(dev, dtype_name, fn)


def _launch(dev, dtype_name, fn, grid, block, args, shared=0, pdl=False):
    D.launch(dev, _k(dev, dtype_name, fn), grid, block, args, shared, name=f"{fn}<{dtype_name}>", pdl=pdl)


def _row_threads(units: int, cap: int = 256) -> int:
    """Threads for a one-block-per-row kernel: a multiple of 32, at most cap."""
    return max(32, min(cap, (units + 31) // 32 * 32))


def _grid_1d(dev, units: int, threads: int = 256) -> int:
    return max(1, min((units + threads - 1) // threads, dev.sm_count * 16))


def _cast_into(x: Tensor, out: Tensor) -> None:
    dev = _dev(x)
    n = x.numel
    _launch(dev, x.dtype.name, f"cast_to_{out.dtype.name}", (_grid_1d(dev, n),), (256,),
            [Arg.ptr(_p(x)), Arg.ptr(_p(out)), Arg.i64(n)])


def _as(t: Tensor | None, dtype_name: str) -> Tensor | None:
    """t in dtype_name: t itself, or a cast copy on the device."""
    if t is None or t.dtype.name == dtype_name:
        return t
    tmp = empty(t.shape, dtype_name, t.device)
    _cast_into(t, tmp)
    return tmp


def _target(out: Tensor, key: str) -> Tensor:
    """Where the kernel writes: out, or a temporary of the key dtype cast into out later."""
    return out if out.dtype.name == key else empty(out.shape, key, out.device)


def _finish(tmp: Tensor, out: Tensor) -> None:
    if tmp is not out:
        _cast_into(tmp, out)


# ---------------------------------------------------------------- strided views
_COPY_MAXDIM = 8


class _Layout2(ctypes.Structure):
    _fields_ = [("ndim", ctypes.c_int32),
                ("shape", ctypes.c_int64 * _COPY_MAXDIM),
                ("sstride", ctypes.c_int64 * _COPY_MAXDIM),
                ("dstride", ctypes.c_int64 * _COPY_MAXDIM)]


def _contig_strides(shape):
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))


def _strided_copy(src: Tensor, sstrides, dst: Tensor, dstrides) -> None:
    shape = src.shape
    n = src.numel
    if n == 0:
        return
    # drop unit dims; the kernel takes at most 8
    dims = [(s, a, b) for s, a, b in zip(shape, sstrides, dstrides) if s != 1]
    size = src.dtype.itemsize
    if size not in (1, 2, 4, 8):       # packed blocks (18, 34, 144 ... bytes): copied as bytes
        dims = [(s, a * size, b * size) for s, a, b in dims] + [(size, 1, 1)]
        n, size = n * size, 1
    if len(dims) > _COPY_MAXDIM:
        raise ShapeError(f"strided copy on cuda: more than {_COPY_MAXDIM} non-unit dims in {shape}")
    lay = _Layout2()
    lay.ndim = len(dims)
    for i, (s, a, b) in enumerate(dims):
        lay.shape[i], lay.sstride[i], lay.dstride[i] = s, a, b
    dev = _dev(src)
    _launch(dev, "f32", f"strided_copy_{size}", (_grid_1d(dev, n),), (256,),
            [Arg.ptr(_p(src)), Arg.ptr(_p(dst)), Arg.i64(n), lay])


def _gather(t: Tensor) -> Tensor:
    """A contiguous copy of view t, made on the device."""
    c = empty(t.shape, t.dtype, t.device)
    _strided_copy(t, t.strides, c, _contig_strides(t.shape))
    return c


def _scatter(c: Tensor, t: Tensor) -> None:
    """Write contiguous c into view t."""
    _strided_copy(c, _contig_strides(c.shape), t, t.strides)


def _packed_rows(w: Tensor) -> Tensor:
    """A packed weight as the kernels read it: whole rows of blocks, contiguous, 16-byte aligned
    (a view that is strided or starts mid-row of an 18-, 34- ... byte block is copied)."""
    return w if w.is_contiguous and _p(w) % 16 == 0 else _gather(w)


def _strided(fn, outputs):
    """Wrap a kernel that wants contiguous tensors: gather strided arguments, scatter
    strided outputs back. One gather per distinct view (out may be x)."""
    @functools.wraps(fn)
    def wrapper(**kw):
        made: dict[int, Tensor] = {}
        back = []
        for name, v in kw.items():
            if isinstance(v, Tensor) and not v.is_contiguous:
                c = made.get(id(v))
                if c is None:
                    c = made[id(v)] = _gather(v)
                if name in outputs and all(c is not b for b, _ in back):
                    back.append((c, v))
                kw[name] = c
        fn(**kw)
        for c, v in back:
            _scatter(c, v)
    return wrapper


# ---------------------------------------------------------------- ops
def embedding(ids, table, out):
    if table.dtype.name not in FLOATS:                 # a packed (GGUF block) table, rows whole
        from .packed import packed_embedding
        return packed_embedding(ids, _packed_rows(table), out)
    key = table.dtype.name
    dev = _dev(table)
    o32 = out.dtype == DT.f32 and key != "f32"       # an f32 residual stream from T weights
    o = out if o32 else _target(out, key)
    V, Dm = table.shape
    vec = int(Dm % _vec(table) == 0 and _aligned(table, o))
    threads = _row_threads(Dm // _vec(table) if vec and not o32 else Dm)
    _launch(dev, key, "embedding", (ids.shape[0],), (threads,),
            [Arg.ptr(_p(ids)), Arg.i32(ids.dtype == DT.i64), Arg.ptr(_p(table)), Arg.ptr(_p(o)),
             Arg.i32(o32), Arg.i32(V), Arg.i32(Dm), Arg.i32(vec)])
    _finish(o, out)


def _rms_norm_into(key, x, w, o, eps):
    """rms_norm kernel of module `key`: x and o may be f32 or key (w is key)."""
    dev = _dev(x)
    Dm = x.shape[-1]
    rows = x.numel // Dm if Dm else 0
    x32 = int(x.dtype == DT.f32 and key != "f32")
    o32 = int(o.dtype == DT.f32 and key != "f32")
    vec = int(not x32 and not o32 and Dm % _vec(x) == 0 and _aligned(x, w, o))
    threads = _row_threads(Dm // _vec(x) if vec else Dm)
    _launch(dev, key, "rms_norm", (rows,), (threads,),
            [Arg.ptr(_p(x)), Arg.i32(x32), Arg.ptr(_p(w)), Arg.ptr(_p(o)), Arg.i32(o32),
             Arg.i32(Dm), Arg.f32(eps), Arg.i32(vec)])


def rms_norm(x, weight, eps, out):
    key = x.dtype.name
    w = _as(weight, key)
    o = out if out.dtype == DT.f32 else _target(out, key)
    _rms_norm_into(key, x, w, o, eps)
    _finish(o, out)


# ---------------------------------------------------------------- matmul
def _compute_dtype(x, weight, out) -> str:
    """The element type of the module that runs a matmul: the weight's, or for int8
    weights the activations' (the first of x, out that is not f32; else f32)."""
    if weight.dtype != DT.i8 and weight.dtype.packed is None:
        return weight.dtype.name
    for t in (x, out):
        if t.dtype != DT.f32:
            return t.dtype.name
    return "f32"


def _side(t, key):
    """(tensor, is_f32) for an argument that may stay f32 beside key, else cast to key."""
    if t is None:
        return None, 0
    if t.dtype == DT.f32:
        return t, int(key != "f32")
    return _as(t, key), 0


def _gemv_dp4a(dev, key, x, x32, weight, sc, G, b, nw, eps, pro, swi, r, r32, o, o32, N, K):
    """One row of x times int8 weights: the dp4a kernel (see ops.cu), R rows per warp, as
    many as keep ~16 warps per multiprocessor busy."""
    target = 16 * dev.sm_count
    if swi:
        R = 4 if (N // 2) // 2 >= target else 2
        units = -(-(N // 2) // (R // 2))
    else:
        R = 4 if N // 4 >= target else 2 if N // 2 >= target else 1
        units = -(-N // R)
    blocks = max(1, -(-units // _GEMV_WARPS))
    # one row per warp and a long row: all of a lane's chunks (K <= 8192) in flight at once
    fn = ("gemv_dp4a_s16_r" if sc.dtype == DT.f16 else "gemv_dp4a_s32_r") + str(R) + \
        ("u16" if R == 1 and K > 4096 else "")
    _launch(dev, key, fn, (blocks,), (_GEMV_WARPS * 32,),
            [Arg.ptr(_p(x)), Arg.i32(x32), Arg.ptr(_p(weight)), Arg.ptr(_p(sc)), Arg.i32(G),
             Arg.ptr(_p(b)), Arg.ptr(_p(nw)), Arg.f32(eps), Arg.i32(pro), Arg.i32(swi),
             Arg.ptr(_p(r)), Arg.i32(r32), Arg.ptr(_p(o)), Arg.i32(o32), Arg.i32(N), Arg.i32(K)],
            shared=K * 9 // 4, pdl=PDL and dev.capturing)


# Batch invariance: with HETINFER_CUDA_BATCH_INVARIANT=1 every f16/bf16-weight matmul (any M,
# decode and prefill) runs the gemm_bi tensor-core kernels (ops.cu), whose arithmetic for an
# output element depends on K alone, so a row's result is bit-identical whatever the batch
# size or its position in the batch (the GEMV and cuBLAS round differently, and cuBLAS picks
# split-K by M). Prologue (rms_norm into a temporary) and epilogue kernels are per row too.
BATCH_INVARIANT = os.environ.get("HETINFER_CUDA_BATCH_INVARIANT", "0") not in ("", "0")
_BI_LDS, _BI_SMEM = 72, 110592                    # as BI_LDS, BI_SMEM in ops.cu
_BI_BN = (128, 64, 32, 16)                        # instantiated tile widths (GEMM_BI_KERNEL)


def _gemm_bi_tile(dev, M: int, N: int) -> tuple[int, int]:
    """(BM, BN) of the gemm_bi kernel for an (M, N) product: BM the smallest of 16/32/64
    holding M (64 covers a decode batch, so each CTA reads its W tile once), BN the widest
    that still gives a CTA per multiprocessor. The choice changes no result bit."""
    bm = 16 if M <= 16 else 32 if M <= 32 else 64
    mt = -(-M // bm)
    for bn in _BI_BN:
        if -(-N // bn) * mt >= dev.sm_count:
            break
    return bm, bn


def _gemm_bi(dev, key, a, w, y, y32, M, N, K):
    """y (M, N) = a (M, K) @ w (N, K)^T by gemm_bi (a, w of dtype key; y key or f32: y32)."""
    bm, bn = _gemm_bi_tile(dev, M, N)
    vec = int(K % 8 == 0 and _aligned(a, w))
    stage = (bm + bn) * _BI_LDS * 2
    shared = min(8, _BI_SMEM // stage) * stage       # the kernel's STAGES tiles
    _launch(dev, key, f"gemm_bi_{bm}_{bn}", (-(-M // bm), -(-N // bn)), ((2 if bn == 16 else 4) * 32,),
            [Arg.ptr(_p(a)), Arg.ptr(_p(w)), Arg.ptr(_p(y)), Arg.i32(y32), Arg.i32(M), Arg.i32(N),
             Arg.i32(K), Arg.i32(vec)], shared=shared)


def matmul(x, weight, bias, scales, out, norm_weight=None, eps=1e-6, act=None, residual=None):
    """out = residual + act(pro(x) @ weight^T + bias) (see hetinfer.ops.matmul). A few rows
    of x: one fused GEMV kernel (norm on the fly, epilogue on the sums; with swiglu a warp
    computes a gate row and its up row). More rows: norm kernel, cuBLAS (int8 weights
    dequantized into a temporary first), epilogue kernel."""
    key = _compute_dtype(x, weight, out)
    dev = _dev(weight)
    N, K = weight.shape[0], weight.shape[1] * weight.dtype.block     # packed: (N, K // block) blocks
    No = N // 2 if act else N
    M = out.numel // No if No else 0
    if M == 0 or N == 0:
        return
    quant = weight.dtype == DT.i8
    xk, x32 = _side(x, key)
    rk, r32 = _side(residual, key)
    if out.dtype == DT.f32 or out.dtype.name == key:
        o, o32 = out, int(out.dtype == DT.f32 and key != "f32")
    else:
        o, o32 = empty(out.shape, key, out.device), 0
    b = _as(bias, key)
    nw = _as(norm_weight, key)
    pro = int(norm_weight is not None)
    swi = int(act == "swiglu")
    packed = weight.dtype.packed is not None
    if packed:
        weight = _packed_rows(weight)
    if packed and K and M <= GEMV_MAX_M:          # GGUF blocks: packed.py's fused GEMV
        from . import packed as PK
        PK.gemv_fused(dev, key, xk, x32, weight, weight.dtype.name, b, nw, eps, pro, swi, rk, r32, o, o32, M, N, K)
        _finish(o, out)
        return
    if BATCH_INVARIANT and key in ("f16", "bf16") and weight.dtype.name == key:
        # every M: norm kernel into a key-typed (M, K) operand, gemm_bi, epilogue kernel
        a = xk
        if pro:
            a = empty((M, K), key, x.device)
            _rms_norm_into(key, xk, nw, a, eps)
        elif x32:
            a = _as(xk, key)
        direct = b is None and rk is None and not swi
        y = o if direct else empty((M, N), key, out.device)
        _gemm_bi(dev, key, a, weight, y, o32 if direct else 0, M, N, K)
        if not direct:
            _launch(dev, key, "matmul_epilogue", (_grid_1d(dev, M * No),), (256,),
                    [Arg.ptr(_p(y)), Arg.ptr(_p(b)), Arg.i32(swi), Arg.ptr(_p(rk)), Arg.i32(r32), Arg.ptr(_p(o)),
                     Arg.i32(o32), Arg.i32(M), Arg.i32(N)])
        _finish(o, out)
        return
    sc = scales
    if quant and sc.dtype not in (DT.f16, DT.f32):
        sc = _as(sc, "f32")
    G = K // sc.shape[1] if quant else 0
    if K and M <= GEMV_MAX_M:
        m1 = "_m1" if M == 1 else ""
        if quant:
            vec = int(K % 16 == 0 and G % 16 == 0 and _aligned(weight, xk, nw))
            if DP4A and M == 1 and vec and key != "f32" and K * 9 // 4 <= _DP4A_MAX_SMEM:
                _gemv_dp4a(dev, key, xk, x32, weight, sc, G, b, nw, eps, pro, swi, rk, r32, o, o32, N, K)
                _finish(o, out)
                return
            fn = ("gemv_i8_s16" if sc.dtype == DT.f16 else "gemv_i8_s32") + m1
        else:
            fn = "gemv" + m1
            vec = int(K % _vec(weight) == 0 and _aligned(weight, xk, nw))
        if swi:
            rpw, blocks = 2, (No + _GEMV_WARPS - 1) // _GEMV_WARPS
        else:
            # two rows per warp share the loads of x (int8: its dequantization too); small
            # float products: one row per warp, more warps in flight
            rpw = 2 if quant or N >= 4 * dev.sm_count * _GEMV_WARPS else 1
            blocks = (N + _GEMV_WARPS * rpw - 1) // (_GEMV_WARPS * rpw)
        _launch(dev, key, fn, (blocks,), (_GEMV_WARPS * 32,),
                [Arg.ptr(_p(xk)), Arg.i32(x32), Arg.ptr(_p(weight)), Arg.ptr(_p(sc)), Arg.i32(G),
                 Arg.ptr(_p(b)), Arg.ptr(_p(nw)), Arg.f32(eps), Arg.i32(pro), Arg.i32(swi),
                 Arg.ptr(_p(rk)), Arg.i32(r32), Arg.ptr(_p(o)), Arg.i32(o32),
                 Arg.i32(M), Arg.i32(N), Arg.i32(K), Arg.i32(vec), Arg.i32(rpw)])
        _finish(o, out)
        return
    # more rows: x through the norm into a key-typed (M, K) operand, then cuBLAS
    a = xk
    if pro:
        a = empty((M, K), key, x.device)
        _rms_norm_into(key, xk, nw, a, eps)
    elif x32:
        a = _as(xk, key)
    w = weight
    if packed:                                    # dequantized into a temporary, as int8 is
        from . import packed as PK
        w = PK.packed_dequant(weight, weight.dtype, N, K, empty((N, K), key, weight.device))
    elif quant:
        w = empty((N, K), key, weight.device)
        _launch(dev, key, "dequant_i8", (_grid_1d(dev, N * K),), (256,),
                [Arg.ptr(_p(weight)), Arg.ptr(_p(sc)), Arg.i32(sc.dtype == DT.f32), Arg.ptr(_p(w)),
                 Arg.i32(N), Arg.i32(K), Arg.i32(G)])
    # cuBLAS writes out itself when nothing follows (f32 out straight from GemmEx: logits
    # are not rounded to f16/bf16 first), else a key-typed temporary for the epilogue
    direct = b is None and rk is None and not swi
    y = o if direct else empty((M, N), key, out.device)
    cublas = cupy_bridge.cupy() is not None
    if K == 0:
        y.fill_(0)
    elif not (cublas and cupy_bridge.gemm_or_disable(dev, key, _p(a), _p(w), _p(y), M, N, K,
                                                     y.dtype.name if o32 and direct else None)):
        if direct and o32:                    # the tiled kernel writes key-typed output
            y, direct = empty((M, N), key, out.device), False
        _launch(dev, key, "gemm_tiled", ((N + 15) // 16, (M + 15) // 16), (16, 16),
                [Arg.ptr(_p(a)), Arg.ptr(_p(w)), Arg.ptr(_p(y)), Arg.i32(M), Arg.i32(N), Arg.i32(K)])
    if not direct:
        _launch(dev, key, "matmul_epilogue", (_grid_1d(dev, M * No),), (256,),
                [Arg.ptr(_p(y)), Arg.ptr(_p(b)), Arg.i32(swi), Arg.ptr(_p(rk)), Arg.i32(r32), Arg.ptr(_p(o)),
                 Arg.i32(o32), Arg.i32(M), Arg.i32(N)])
    _finish(o, out)


def rope(x, positions, cos, sin, style, out):
    key = x.dtype.name
    dev = _dev(x)
    o = _target(out, key)
    ntok, H, Dh = x.shape
    total = ntok * H * (Dh // 2)
    _launch(dev, key, "rope", (_grid_1d(dev, total),), (256,),
            [Arg.ptr(_p(x)), Arg.ptr(_p(positions)), Arg.i32(positions.dtype == DT.i64),
             Arg.ptr(_p(cos)), Arg.ptr(_p(sin)), Arg.ptr(_p(o)),
             Arg.i32(ntok), Arg.i32(H), Arg.i32(Dh), Arg.i32(cos.shape[0]),
             Arg.i32(style == "interleaved")])
    _finish(o, out)


def _binary(fn, a, b, out, f32_out=False):
    """Elementwise fn(a, b) in a's dtype. f32_out: the kernel takes an o32 flag and writes an
    f32 out itself (its results keep f32 precision, no temporary); otherwise an out of another
    dtype gets a key-typed temporary cast into it."""
    key = a.dtype.name
    dev = _dev(a)
    b = _as(b, key)
    o32 = int(f32_out and out.dtype == DT.f32 and key != "f32")
    o = out if o32 else _target(out, key)
    n = a.numel
    vec = int(not o32 and n % _vec(a) == 0 and _aligned(a, b, o))
    units = n // _vec(a) if vec else n
    _launch(dev, key, fn, (_grid_1d(dev, units),), (256,),
            [Arg.ptr(_p(a)), Arg.ptr(_p(b)), Arg.ptr(_p(o)), Arg.i64(n), Arg.i32(vec)]
            + ([Arg.i32(o32)] if f32_out else []))
    _finish(o, out)


def add(a, b, out):
    _binary("add", a, b, out)


def swiglu(gate, up, out):
    _binary("swiglu", gate, up, out, f32_out=True)


def softmax(x, out):
    key = x.dtype.name
    dev = _dev(x)
    o = _target(out, key)
    Dm = x.shape[-1]
    rows = x.numel // Dm if Dm else 0
    _launch(dev, key, "softmax", (rows,), (_row_threads(Dm, 512),),
            [Arg.ptr(_p(x)), Arg.ptr(_p(o)), Arg.i32(Dm)])
    _finish(o, out)


def attention(q, k_cache, v_cache, positions, scale, out):
    """Decode (one token): split along the sequence (attention_decode); more tokens:
    tiled causal attention (attention_prefill). See csrc/ops.cu."""
    key = q.dtype.name
    dev = _dev(q)
    ntok, Hq, Dh = q.shape
    S, Hkv, _ = k_cache.shape
    if Dh > ATT_MAXD:
        raise ShapeError(f"attention on cuda: head dim {Dh} > {ATT_MAXD} is not supported yet")
    o = _target(out, key)
    if ntok == 1:
        # splits of 64 rows, longer for long caches: at most ADEC_SPLITS splits
        C = max(64, -(-S // ADEC_SPLITS))
        nsplit = max(1, -(-S // C))
        fn = "attention_decode_d64" if Dh <= 64 else ("attention_decode_d128" if Dh <= 128 else
                                                      "attention_decode_d256")
        part, count = _attention_scratch(q, Hq * nsplit * (Dh + 2), Hq)
        _launch(dev, key, fn, (Hq, nsplit), (256,),
                [Arg.ptr(_p(q)), Arg.ptr(_p(k_cache)), Arg.ptr(_p(v_cache)), Arg.ptr(_p(positions)),
                 Arg.i32(positions.dtype == DT.i64), Arg.ptr(_p(o)),
                 Arg.i32(Hq), Arg.i32(Hkv), Arg.i32(Dh), Arg.i32(S), Arg.f32(scale), Arg.i32(C),
                 Arg.ptr(part), Arg.ptr(count)], pdl=PDL and dev.capturing)
    else:
        smem = 4 * (3 * 32 * (Dh + 1) + 32 * 33)
        fn = "attention_prefill_d64" if Dh <= 64 else ("attention_prefill_d128" if Dh <= 128 else
                                                       "attention_prefill_d256")
        _launch(dev, key, fn, (Hq, (ntok + 31) // 32), (128,),
                [Arg.ptr(_p(q)), Arg.ptr(_p(k_cache)), Arg.ptr(_p(v_cache)), Arg.ptr(_p(positions)),
                 Arg.i32(positions.dtype == DT.i64), Arg.ptr(_p(o)),
                 Arg.i32(ntok), Arg.i32(Hq), Arg.i32(Hkv), Arg.i32(Dh), Arg.i32(S), Arg.f32(scale)],
                shared=smem)
    _finish(o, out)


def kv_cache_write(k, v, k_cache, v_cache, positions):
    key = k_cache.dtype.name
    dev = _dev(k_cache)
    kk, vv = _as(k, key), _as(v, key)
    ntok = k.shape[0]
    S = k_cache.shape[0]
    rowlen = k_cache.shape[1] * k_cache.shape[2]
    _launch(dev, key, "kv_cache_write", (_grid_1d(dev, ntok * rowlen),), (256,),
            [Arg.ptr(_p(kk)), Arg.ptr(_p(vv)), Arg.ptr(_p(k_cache)), Arg.ptr(_p(v_cache)),
             Arg.ptr(_p(positions)), Arg.i32(positions.dtype == DT.i64),
             Arg.i32(ntok), Arg.i32(rowlen), Arg.i32(S)])


def rope_kv_write(q, k, v, k_cache, v_cache, positions, cos, sin, style):
    key = k_cache.dtype.name
    dev = _dev(k_cache)
    qk = _as(q, key)                                # q of another dtype: rotated in a copy
    kk, vv = _as(k, key), _as(v, key)
    ntok, Hq, Dh = q.shape
    S, Hkv, _ = k_cache.shape
    total = ntok * (Hq + Hkv) * (Dh // 2) + ntok * Hkv * Dh
    _launch(dev, key, "rope_kv_write", (_grid_1d(dev, total),), (256,),
            [Arg.ptr(_p(qk)), Arg.ptr(_p(kk)), Arg.ptr(_p(vv)), Arg.ptr(_p(k_cache)), Arg.ptr(_p(v_cache)),
             Arg.ptr(_p(positions)), Arg.i32(positions.dtype == DT.i64), Arg.ptr(_p(cos)), Arg.ptr(_p(sin)),
             Arg.i32(ntok), Arg.i32(Hq), Arg.i32(Hkv), Arg.i32(Dh), Arg.i32(cos.shape[0]), Arg.i32(S),
             Arg.i32(style == "interleaved")], pdl=PDL and dev.capturing)
    if qk is not q:
        _cast_into(qk, q)


def _att_suffix(Dh: int) -> str:
    return "_d64" if Dh <= 64 else ("_d128" if Dh <= 128 else "_d256")


def paged_attention(q, k_pool, v_pool, query_start, context_lens, block_tables, scale, out):
    """Decode rows (a sequence of one query row): split along its keys (paged_decode);
    longer chunks: 32-row tiles (paged_prefill). Both over the whole batch, grids from
    shapes alone (the index tensors are read on the device only, so a captured graph
    replays with new ones); each row's result is batch invariant. See csrc/ops.cu."""
    key = q.dtype.name
    dev = _dev(q)
    ntok, Hq, Dh = q.shape
    NB, BS, Hkv, _ = k_pool.shape
    B, MB = block_tables.shape
    if Dh > ATT_MAXD:
        raise ShapeError(f"paged_attention on cuda: head dim {Dh} > {ATT_MAXD} is not supported yet")
    if ntok == 0:
        return
    o = _target(out, key)
    idx = [Arg.ptr(_p(query_start)), Arg.ptr(_p(context_lens)), Arg.ptr(_p(block_tables)), Arg.ptr(_p(o))]
    # splits of PADEC_MIN keys or more, as many as the longest possible sequence (MB x BS) needs
    nsplit = max(1, min(PADEC_SPLITS, -(-MB * BS // PADEC_MIN)))
    part, count = _attention_scratch(q, B * Hq * nsplit * (Dh + 2), B * Hq)
    _launch(dev, key, "paged_decode" + _att_suffix(Dh), (Hq, nsplit, B), (256,),
            [Arg.ptr(_p(q)), Arg.ptr(_p(k_pool)), Arg.ptr(_p(v_pool))] + idx +
            [Arg.i32(Hq), Arg.i32(Hkv), Arg.i32(Dh), Arg.i32(MB), Arg.i32(BS), Arg.f32(scale),
             Arg.ptr(part), Arg.ptr(count)], pdl=PDL and dev.capturing)
    if ntok >= 2:
        # a chunk of n >= 2 rows takes ceil(n / 32) <= n / 32 + 1 and <= n / 2 tiles
        tiles = min(ntok // 2, -(-ntok // 32) + B)
        smem = 4 * (3 * 32 * (Dh + 1) + 32 * 33)
        _launch(dev, key, "paged_prefill" + _att_suffix(Dh), (Hq, tiles), (128,),
                [Arg.ptr(_p(q)), Arg.ptr(_p(k_pool)), Arg.ptr(_p(v_pool))] + idx +
                [Arg.i32(B), Arg.i32(Hq), Arg.i32(Hkv), Arg.i32(Dh), Arg.i32(MB), Arg.i32(BS), Arg.f32(scale)],
                shared=smem)
    _finish(o, out)


def rope_paged_kv_write(q, k, v, k_pool, v_pool, positions, slot_mapping, cos, sin, style):
    """rope_kv_write into pools (NB, BS, Hkv, D) at slot_mapping[t] (< 0: not written)."""
    key = k_pool.dtype.name
    dev = _dev(k_pool)
    qk = _as(q, key)                                # q of another dtype: rotated in a copy
    kk, vv = _as(k, key), _as(v, key)
    ntok, Hq, Dh = q.shape
    NB, BS, Hkv, _ = k_pool.shape
    total = ntok * (Hq + Hkv) * (Dh // 2) + ntok * Hkv * Dh
    _launch(dev, key, "rope_paged_kv_write", (_grid_1d(dev, total),), (256,),
            [Arg.ptr(_p(qk)), Arg.ptr(_p(kk)), Arg.ptr(_p(vv)), Arg.ptr(_p(k_pool)), Arg.ptr(_p(v_pool)),
             Arg.ptr(_p(positions)), Arg.i32(positions.dtype == DT.i64), Arg.ptr(_p(slot_mapping)),
             Arg.ptr(_p(cos)), Arg.ptr(_p(sin)),
             Arg.i32(ntok), Arg.i32(Hq), Arg.i32(Hkv), Arg.i32(Dh), Arg.i32(cos.shape[0]), Arg.i32(NB * BS),
             Arg.i32(style == "interleaved")], pdl=PDL and dev.capturing)
    if qk is not q:
        _cast_into(qk, q)


# ---------------------------------------------------------------- scratch
# Zeroed device buffers per GPU for the split kernels: argmax over long rows (partial
# bests and self-resetting counters) and split decode attention (partials and
# counters). Made on first use, which is an eager step (a captured step allocates
# nothing); counted in the allocator's stats.
SPLIT_ROWS = 64                      # argmax_split: rows per call at most
_scratch: dict[int, tuple] = {}
_att_scratch: dict[int, tuple] = {}
_retired: list = []                  # outgrown scratch: a captured graph may still point into it


def _zeroed(t: Tensor, nbytes: int):
    buf = t.buffer.allocator.alloc(nbytes)
    dev = _dev(t)
    D.check(D._drv().cuMemsetD8Async(int(buf.handle), 0, nbytes, dev.stream), "cuMemsetD8Async")
    return buf


def _get_scratch(t: Tensor):
    sc = _scratch.get(t.device.index)
    if sc is None:
        buf = _zeroed(t, SPLIT_ROWS * 8 + SPLIT_ROWS * 4)
        best = int(buf.handle)
        sc = _scratch[t.device.index] = (buf, best, best + SPLIT_ROWS * 8)
    return sc


def _attention_scratch(t: Tensor, part_floats: int, heads: int):
    """(partials address, counters address) with room for part_floats and heads; grown
    (never shrunk) when a call needs more."""
    sc = _att_scratch.get(t.device.index)
    if sc is None or sc[1] < part_floats or sc[2] < heads:
        floats = max(part_floats, sc[1] if sc else 0)
        nheads = max(heads, sc[2] if sc else 0, 64)
        if sc is not None:
            _retired.append(sc[0])
        buf = _zeroed(t, nheads * 4 + floats * 4)
        sc = _att_scratch[t.device.index] = (buf, floats, nheads)
    base = int(sc[0].handle)
    return base + sc[2] * 4, base


def argmax(x, out):
    key = x.dtype.name
    dev = _dev(x)
    N = x.shape[-1]
    rows = x.numel // N if N else 0
    if 0 < rows <= SPLIT_ROWS and N >= 8192:
        _, best, count = _get_scratch(x)
        nb = min((N + 2047) // 2048, 2 * dev.sm_count)
        _launch(dev, key, "argmax_split", (nb, rows), (256,),
                [Arg.ptr(_p(x)), Arg.ptr(_p(out)), Arg.i32(N), Arg.ptr(best), Arg.ptr(count)])
        return
    _launch(dev, key, "argmax", (rows,), (_row_threads(N, 512),),
            [Arg.ptr(_p(x)), Arg.ptr(_p(out)), Arg.i32(N)])


def cast(x, out):
    _cast_into(x, out)


def penalties(logits, counts, seen, repetition, presence, frequency, out):
    """Grid (blocks, B): each row reads its own repetition, presence, frequency ((B,) f32)."""
    key = logits.dtype.name
    dev = _dev(logits)
    o = _target(out, key)
    B, V = logits.shape
    _launch(dev, key, "penalties", (_grid_1d(dev, V), B), (256,),
            [Arg.ptr(_p(logits)), Arg.ptr(_p(counts)), Arg.ptr(_p(seen)), Arg.ptr(_p(o)), Arg.i32(V),
             Arg.ptr(_p(repetition)), Arg.ptr(_p(presence)), Arg.ptr(_p(frequency))])
    _finish(o, out)


def sample(logits, uniform, temperature, top_k, top_p, min_p, out):
    """One block per row (see csrc/ops.cu `sample`), with its own parameters ((B,) device
    tensors, never read here); a row of temperature 0 is argmax in the same launch."""
    key = logits.dtype.name
    dev = _dev(logits)
    B, V = logits.shape
    threads = 1024 if V >= 16384 else 256
    _launch(dev, key, "sample", (B,), (threads,),
            [Arg.ptr(_p(logits)), Arg.ptr(_p(uniform)), Arg.ptr(_p(out)), Arg.i32(V),
             Arg.ptr(_p(temperature)), Arg.ptr(_p(top_k)), Arg.ptr(_p(top_p)), Arg.ptr(_p(min_p))])


def fill_uniform(t, lo: float, hi: float, seed: int = 0) -> None:
    """Fill a contiguous float tensor on the device with hashed uniform numbers in [lo, hi)
    (benchmark weights; nothing goes through the host)."""
    dev = _dev(t)
    n = t.numel
    _launch(dev, t.dtype.name, "fill_uniform", (_grid_1d(dev, n),), (256,),
            [Arg.ptr(_p(t)), Arg.i64(n), Arg.i64(seed), Arg.f32(lo), Arg.f32(hi - lo)])


_OUT = ("out",)
KERNELS = [
    ("embedding", _strided(embedding, _OUT)),
    ("rms_norm", _strided(rms_norm, _OUT)),
    ("matmul", _strided(matmul, _OUT)),
    ("rope", _strided(rope, _OUT)),
    ("add", _strided(add, _OUT)),
    ("swiglu", _strided(swiglu, _OUT)),
    ("softmax", _strided(softmax, _OUT)),
    ("attention", _strided(attention, _OUT)),
    ("kv_cache_write", _strided(kv_cache_write, ("k_cache", "v_cache"))),
    ("rope_kv_write", _strided(rope_kv_write, ("q", "k_cache", "v_cache"))),
    ("paged_attention", _strided(paged_attention, _OUT)),
    ("rope_paged_kv_write", _strided(rope_paged_kv_write, ("q", "k_pool", "v_pool"))),
    ("argmax", _strided(argmax, _OUT)),
    ("cast", _strided(cast, _OUT)),
    ("penalties", _strided(penalties, _OUT)),
    ("sample", _strided(sample, _OUT)),
]
