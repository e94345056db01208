"""Operator signatures. Each op checks its arguments, allocates `out` when none is
given, and dispatches to the kernel registered for (op, device type, dtype).

Kernels are called with keyword arguments named as in the op's signature, every
tensor on one device, `out` already allocated. Each op names the argument whose
dtype picks the kernel (the "key" below). Float64 references: ops/reference.py."""

from __future__ import annotations

import numpy as np

from .. import dtypes as D
from .. import profiler, registry
from ..errors import DeviceError, DTypeError, ShapeError
from ..tensor import Tensor, empty, tensor
from . import reference

from ..op_names import OPS  # noqa: E402  (op name -> (key argument, description))


# --- argument checks -------------------------------------------------------------
def _t(op, name, t, dtypes=None, ndim=None) -> Tensor:
    if not isinstance(t, Tensor):
        raise DTypeError(f"{op}: {name} must be a hetinfer Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise DTypeError(f"{op}: {name} has dtype {t.dtype}; expected one of "
                         + ", ".join(d.name for d in dtypes))
    if ndim is not None and t.ndim not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ShapeError(f"{op}: {name} has shape {t.shape} ({t.ndim}-D); expected {ndim}-D")
    return t


def _same_device(op, **tensors):
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise DTypeError(f"{op}: {name} must be a hetinfer Tensor, got {type(t).__name__}")
        d = t.device
        if first is None:
            first = d
        elif d is not first and d != first:      # tensors of one allocator share one Device
            where = ", ".join(f"{n} on {t.device}" for n, t in tensors.items() if t is not None)
            raise DeviceError(f"{op}: all tensors must be on one device; got {where}")


def _shape(op, name, t, expected):
    if t.shape != tuple(expected):
        raise ShapeError(f"{op}: {name} has shape {t.shape}; expected {tuple(expected)}")


def _out(op, out, shape, dtype, device, dtypes=None):
    if out is None:
        return empty(shape, dtype, device)
    _t(op, "out", out, dtypes)
    _shape(op, "out", out, shape)
    if out.device != device:
        raise DeviceError(f"{op}: out is on {out.device}; expected {device}")
    return out


def _positions(op, positions, device, n):
    if not isinstance(positions, Tensor):
        positions = tensor(np.asarray(positions, np.int32).reshape(-1), D.i32, device)
    _t(op, "positions", positions, (D.i32, D.i64), 1)
    _shape(op, "positions", positions, (n,))
    if positions._host and n and int(positions.numpy().min()) < 0:
        raise ShapeError(f"{op}: positions must be >= 0, got {int(positions.numpy().min())}")
    return positions


def _dispatch(op, key_dtype, device, outputs, **kwargs):
    """Find the kernel and call it. Kernels that want contiguous tensors get copies of
    strided views, and write into a temporary that is copied back into a strided out."""
    entry = registry.lookup(op, device.type, key_dtype)
    run = profiler.active.run if profiler.active is not None else None
    if not entry.contiguous:
        run(op, entry.fn, kwargs) if run else entry.fn(**kwargs)
        return
    copy_back = []
    for name, v in kwargs.items():
        if isinstance(v, Tensor) and not v.is_contiguous:
            if name in outputs:
                tmp = v.contiguous()
                copy_back.append((v, tmp))
                kwargs[name] = tmp
            else:
                kwargs[name] = v.contiguous()
    run(op, entry.fn, kwargs) if run else entry.fn(**kwargs)
    for dst, tmp in copy_back:
        dst.copy_(tmp)


# --- the ops -----------------------------------------------------------------------
def embedding(ids: Tensor, table: Tensor, out: Tensor | None = None) -> Tensor:
    """out[t] = table[ids[t]]; a packed table (V, D // block) gives its rows dequantized,
    (T, D) in out's dtype (f32 by default)."""
    op = "embedding"
    _t(op, "ids", ids, (D.i32, D.i64), 1)
    _t(op, "table", table, D.FLOATS + D.PACKED, 2)
    _same_device(op, ids=ids, table=table, out=out)
    out_dt = D.f32 if table.dtype.packed else table.dtype
    out = _out(op, out, (ids.shape[0], table.shape[1] * table.dtype.block), out_dt, table.device, D.FLOATS)
    if ids._host:
        bad = ids.numpy()
        if bad.size and (bad.min() < 0 or bad.max() >= table.shape[0]):
            raise ShapeError(f"{op}: token id out of range [0, {table.shape[0]}): "
                             f"min {bad.min()}, max {bad.max()}")
    _dispatch(op, table.dtype, table.device, ("out",), ids=ids, table=table, out=out)
    return out


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, out: Tensor | None = None) -> Tensor:
    op = "rms_norm"
    _t(op, "x", x, D.FLOATS)
    _t(op, "weight", weight, D.FLOATS, 1)
    if x.ndim == 0:
        raise ShapeError(f"{op}: x must have at least one axis")
    _shape(op, "weight", weight, (x.shape[-1],))
    _same_device(op, x=x, weight=weight, out=out)
    out = _out(op, out, x.shape, x.dtype, x.device, D.FLOATS)
    _dispatch(op, x.dtype, x.device, ("out",), x=x, weight=weight, eps=float(eps), out=out)
    return out


def matmul(x: Tensor, weight: Tensor, bias: Tensor | None = None, scales: Tensor | None = None,
           out: Tensor | None = None, *, norm_weight: Tensor | None = None, eps: float = 1e-6,
           act: str | None = None, residual: Tensor | None = None) -> Tensor:
    """out = residual + act(pro(x) @ weight^T + bias), with weight (N, K).

    An i8 weight needs scales (N, K // G), one per group of G consecutive input columns.
    A packed weight (hetinfer.packed: q8_0, q4_0 ... q6_k) is a Tensor (N, K // block) of
    blocks; its kernels may round pro(x) to 8 bits per block of the format's act_block.
    The prologue pro(x) is x itself, or with norm_weight (K,) rms_norm(x, norm_weight, eps).
    act=None gives y (..., N); act="swiglu" treats y as [gate | up] halves and gives
    silu(gate) * up (..., N // 2). residual (the output's shape) is added last and may be
    out itself (in place). These let a backend fuse a layer's norms, activation and
    residual adds into its products; kernels receive every keyword."""
    op = "matmul"
    _t(op, "x", x, D.FLOATS)
    _t(op, "weight", weight, D.FLOATS + (D.i8,) + D.PACKED, 2)
    n, k = weight.shape[0], weight.shape[1] * weight.dtype.block                # logical (N, K)
    if act not in (None, "swiglu"):
        raise ShapeError(f"{op}: act must be None or 'swiglu', got {act!r}")
    if act == "swiglu" and n % 2:
        raise ShapeError(f"{op}: act='swiglu' needs an even number of weight rows [gate | up], got {n}")
    if x.ndim == 0 or x.shape[-1] != k:
        packed = (f" ({weight.dtype} blocks of {weight.dtype.block}: logical shape ({n}, {k}))"
                  if weight.dtype.packed else "")
        if weight.dtype.packed and x.ndim and x.shape[-1] % weight.dtype.block:
            packed += f"; K={x.shape[-1]} is not a multiple of the {weight.dtype} block of {weight.dtype.block}"
        raise ShapeError(f"{op}: x has shape {x.shape} and weight {weight.shape}{packed}; "
                         f"expected x of shape (..., {k}) to match weight (N, K={k})")
    if bias is not None:
        _t(op, "bias", bias, D.FLOATS, 1)
        _shape(op, "bias", bias, (n,))
    if norm_weight is not None:
        _t(op, "norm_weight", norm_weight, D.FLOATS, 1)
        _shape(op, "norm_weight", norm_weight, (k,))
    if weight.dtype == D.i8:
        if scales is None:
            raise DTypeError(f"{op}: an i8 weight needs scales of shape (N, K // group)")
        _t(op, "scales", scales, D.FLOATS, 2)
        if scales.shape[0] != n or scales.shape[1] == 0 or k % scales.shape[1]:
            raise ShapeError(f"{op}: scales has shape {scales.shape}; expected ({n}, K // group) "
                             f"with a group size dividing K={k}")
    elif scales is not None:
        raise DTypeError(f"{op}: scales given for a {weight.dtype} weight; only i8 weights take scales"
                         + (" (a packed weight carries its own)" if weight.dtype.packed else ""))
    shape = x.shape[:-1] + (n // 2 if act else n,)
    if residual is not None:
        _t(op, "residual", residual, D.FLOATS)
        _shape(op, "residual", residual, shape)
    _same_device(op, x=x, weight=weight, bias=bias, scales=scales, norm_weight=norm_weight,
                 residual=residual, out=out)
    out = _out(op, out, shape, (residual if residual is not None else x).dtype, x.device, D.FLOATS)
    _dispatch(op, weight.dtype, x.device, ("out",), x=x, weight=weight, bias=bias, scales=scales, out=out,
              norm_weight=norm_weight, eps=float(eps), act=act, residual=residual)
    return out


def _check_style(op, style):
    if style not in ("half", "interleaved"):
        raise ShapeError(f"{op}: style must be 'half' or 'interleaved', got {style!r}")


def _rope_inputs(op, positions, cos, sin, device, t, d) -> Tensor:
    """Checks shared by the rope ops: an even head dim d, positions (t,), f32 cos/sin
    tables (P, d/2). Returns positions as a tensor."""
    if d % 2:
        raise ShapeError(f"{op}: head dim {d} must be even")
    positions = _positions(op, positions, device, t)
    _t(op, "cos", cos, (D.f32,), 2)
    _t(op, "sin", sin, (D.f32,), 2)
    _shape(op, "cos", cos, (cos.shape[0], d // 2))
    _shape(op, "sin", sin, cos.shape)
    return positions


def _rope_qkv(op, q, k, v, head_shape) -> tuple[int, int]:
    """Checks shared by the cache-writing rope ops: k and v (T, Hkv, D) with (Hkv, D) =
    head_shape of the cache or pool, q (T, Hq, D). Returns (T, D)."""
    _t(op, "q", q, D.FLOATS, 3)
    _t(op, "k", k, D.FLOATS, 3)
    _t(op, "v", v, D.FLOATS, 3)
    t, d = k.shape[0], head_shape[-1]
    _shape(op, "k", k, (t,) + tuple(head_shape))
    _shape(op, "v", v, k.shape)
    _shape(op, "q", q, (t, q.shape[1], d))
    return t, d


def rope(x: Tensor, positions, cos: Tensor, sin: Tensor, style: str = "half",
         out: Tensor | None = None) -> Tensor:
    """x (T, H, D) rotated at positions (T,); cos/sin tables (P, D/2); out may be x."""
    op = "rope"
    _check_style(op, style)
    _t(op, "x", x, D.FLOATS, 3)
    t, _, d = x.shape
    positions = _rope_inputs(op, positions, cos, sin, x.device, t, d)
    if positions._host and t and int(positions.numpy().max()) >= cos.shape[0]:
        raise ShapeError(f"{op}: position {int(positions.numpy().max())} is beyond the rope table "
                         f"({cos.shape[0]} positions)")
    _same_device(op, x=x, positions=positions, cos=cos, sin=sin, out=out)
    out = _out(op, out, x.shape, x.dtype, x.device, D.FLOATS)
    _dispatch(op, x.dtype, x.device, ("out",), x=x, positions=positions, cos=cos, sin=sin,
              style=style, out=out)
    return out


def _elementwise(op, a_name, a, b_name, b, out):
    _t(op, a_name, a, D.FLOATS)
    _t(op, b_name, b, D.FLOATS)
    _shape(op, b_name, b, a.shape)
    _same_device(op, **{a_name: a, b_name: b, "out": out})
    out = _out(op, out, a.shape, a.dtype, a.device, D.FLOATS)
    _dispatch(op, a.dtype, a.device, ("out",), **{a_name: a, b_name: b, "out": out})
    return out


def add(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    return _elementwise("add", "a", a, "b", b, out)


def swiglu(gate: Tensor, up: Tensor, out: Tensor | None = None) -> Tensor:
    return _elementwise("swiglu", "gate", gate, "up", up, out)


def softmax(x: Tensor, out: Tensor | None = None) -> Tensor:
    op = "softmax"
    _t(op, "x", x, D.FLOATS)
    if x.ndim == 0:
        raise ShapeError(f"{op}: x must have at least one axis")
    _same_device(op, x=x, out=out)
    out = _out(op, out, x.shape, x.dtype, x.device, D.FLOATS)
    _dispatch(op, x.dtype, x.device, ("out",), x=x, out=out)
    return out


def _check_cache(op, k_cache, v_cache, dtypes):
    _t(op, "k_cache", k_cache, dtypes, 3)
    _t(op, "v_cache", v_cache, (k_cache.dtype,), 3)
    _shape(op, "v_cache", v_cache, k_cache.shape)


def attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, positions, scale: float | None = None,
              out: Tensor | None = None) -> Tensor:
    """q (T, Hq, D); caches (S, Hkv, D); query t attends to cache rows 0..positions[t]."""
    op = "attention"
    _t(op, "q", q, D.FLOATS, 3)
    _check_cache(op, k_cache, v_cache, (q.dtype,))
    t, hq, d = q.shape
    s, hkv, dk = k_cache.shape
    if dk != d or hq % hkv:
        raise ShapeError(f"{op}: q has shape {q.shape}, caches {k_cache.shape}; expected caches "
                         f"(S, Hkv, {d}) with Hkv dividing Hq={hq}")
    positions = _positions(op, positions, q.device, t)
    if positions._host and t and int(positions.numpy().max()) >= s:
        raise ShapeError(f"{op}: position {int(positions.numpy().max())} is beyond the cache ({s} rows)")
    _same_device(op, q=q, k_cache=k_cache, v_cache=v_cache, positions=positions, out=out)
    out = _out(op, out, q.shape, q.dtype, q.device, D.FLOATS)
    scale = float(scale) if scale is not None else 1.0 / float(np.sqrt(d))
    _dispatch(op, q.dtype, q.device, ("out",), q=q, k_cache=k_cache, v_cache=v_cache,
              positions=positions, scale=scale, out=out)
    return out


def kv_cache_write(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, positions) -> None:
    """Write k, v (T, Hkv, D) into rows positions[t] of the caches (S, Hkv, D)."""
    op = "kv_cache_write"
    _check_cache(op, k_cache, v_cache, D.FLOATS)
    _t(op, "k", k, D.FLOATS, 3)
    _t(op, "v", v, D.FLOATS, 3)
    _shape(op, "k", k, (k.shape[0],) + k_cache.shape[1:])
    _shape(op, "v", v, k.shape)
    positions = _positions(op, positions, k.device, k.shape[0])
    if positions._host and k.shape[0] and int(positions.numpy().max()) >= k_cache.shape[0]:
        raise ShapeError(f"{op}: position {int(positions.numpy().max())} is beyond the cache "
                         f"({k_cache.shape[0]} rows)")
    _same_device(op, k=k, v=v, k_cache=k_cache, v_cache=v_cache, positions=positions)
    _dispatch(op, k_cache.dtype, k.device, ("k_cache", "v_cache"), k=k, v=v, k_cache=k_cache,
              v_cache=v_cache, positions=positions)


def rope_kv_write(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, positions,
                  cos: Tensor, sin: Tensor, style: str = "half") -> None:
    """rope and kv_cache_write in one: q (T, Hq, D) rotated in place at positions (T,); k
    (T, Hkv, D) rotated and written, with v, into rows positions[t] of the caches (S, Hkv, D)
    (k itself is left as it was). A decode step's rope and cache write as one kernel."""
    op = "rope_kv_write"
    _check_style(op, style)
    _check_cache(op, k_cache, v_cache, D.FLOATS)
    t, d = _rope_qkv(op, q, k, v, k_cache.shape[1:])
    positions = _rope_inputs(op, positions, cos, sin, k.device, t, d)
    if positions._host and t:
        top = int(positions.numpy().max())
        if top >= min(cos.shape[0], k_cache.shape[0]):
            raise ShapeError(f"{op}: position {top} is beyond the rope table ({cos.shape[0]} positions) "
                             f"or the cache ({k_cache.shape[0]} rows)")
    _same_device(op, q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache, positions=positions, cos=cos, sin=sin)
    _dispatch(op, k_cache.dtype, k.device, ("q", "k_cache", "v_cache"), q=q, k=k, v=v, k_cache=k_cache,
              v_cache=v_cache, positions=positions, cos=cos, sin=sin, style=style)


def _index(op, name, t, device, shape=None, ndim=1) -> Tensor:
    """An i32 index tensor (a host list or array is put on device)."""
    if not isinstance(t, Tensor):
        a = np.asarray(t, np.int32)
        t = tensor(a.reshape(shape) if shape is not None and a.size == int(np.prod(shape)) else a, D.i32, device)
    _t(op, name, t, (D.i32,), ndim)
    if shape is not None:
        _shape(op, name, t, shape)
    return t


def _check_pool(op, k_pool, v_pool, dtypes):
    _t(op, "k_pool", k_pool, dtypes, 4)
    _t(op, "v_pool", v_pool, (k_pool.dtype,), 4)
    _shape(op, "v_pool", v_pool, k_pool.shape)


def paged_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, query_start, context_lens, block_tables,
                    scale: float | None = None, out: Tensor | None = None) -> Tensor:
    """Attention of a flattened batch over paged caches, prefill chunks and decode rows mixed.

    q (T, Hq, D): rows query_start[b] .. query_start[b + 1] belong to sequence b (B + 1
    offsets, query_start[0] = 0, query_start[B] = T). Pools (NB, BS, Hkv, D): key position p
    of sequence b is at block block_tables[b, p // BS], row p % BS; block_tables (B, MB) i32.
    context_lens (B,): keys of sequence b, this step's included; its n query rows are its
    last n positions, so row j sees keys 0 .. context_lens[b] - n + j (causal). GQA: query
    head h reads kv head h // (Hq // Hkv)."""
    op = "paged_attention"
    _t(op, "q", q, D.FLOATS, 3)
    _check_pool(op, k_pool, v_pool, (q.dtype,))
    t, hq, d = q.shape
    nb, bs, hkv, dk = k_pool.shape
    if dk != d or hq % hkv:
        raise ShapeError(f"{op}: q has shape {q.shape}, pools {k_pool.shape}; expected pools "
                         f"(NB, BS, Hkv, {d}) with Hkv dividing Hq={hq}")
    block_tables = _index(op, "block_tables", block_tables, q.device, ndim=2)
    b, mb = block_tables.shape
    query_start = _index(op, "query_start", query_start, q.device, (b + 1,))
    context_lens = _index(op, "context_lens", context_lens, q.device, (b,))
    if query_start._host and context_lens._host and block_tables._host:
        qs, cl, bt = query_start.numpy(), context_lens.numpy(), block_tables.numpy()
        n = np.diff(qs.astype(np.int64))
        if qs[0] != 0 or qs[-1] != t or (n < 0).any():
            raise ShapeError(f"{op}: query_start must rise from 0 to T={t}; got {qs.tolist()[:8]}")
        if (cl < n).any() or (cl > mb * bs).any():
            raise ShapeError(f"{op}: context_lens must be >= each sequence's query rows and <= "
                             f"block_tables' capacity {mb} x {bs}; got {cl.tolist()[:8]}")
        used = np.arange(mb)[None, :] < -(-cl[:, None] // bs)                 # (B, MB) blocks in use
        if used.any() and (bt[used].min() < 0 or bt[used].max() >= nb):
            raise ShapeError(f"{op}: block ids in use must be in [0, {nb}); got {bt[used].min()}..{bt[used].max()}")
    _same_device(op, q=q, k_pool=k_pool, v_pool=v_pool, query_start=query_start, context_lens=context_lens,
                 block_tables=block_tables, out=out)
    out = _out(op, out, q.shape, q.dtype, q.device, D.FLOATS)
    scale = float(scale) if scale is not None else 1.0 / float(np.sqrt(d))
    _dispatch(op, q.dtype, q.device, ("out",), q=q, k_pool=k_pool, v_pool=v_pool, query_start=query_start,
              context_lens=context_lens, block_tables=block_tables, scale=scale, out=out)
    return out


def rope_paged_kv_write(q: Tensor, k: Tensor, v: Tensor, k_pool: Tensor, v_pool: Tensor, positions,
                        slot_mapping, cos: Tensor, sin: Tensor, style: str = "half") -> None:
    """rope_kv_write into paged pools: q (T, Hq, D) rotated in place at positions (T,); k
    (T, Hkv, D) rotated and written, with v, at slot_mapping[t] of the pools (NB, BS, Hkv, D):
    block slot // BS, row slot % BS. A slot < 0 (a padding row) writes nothing."""
    op = "rope_paged_kv_write"
    _check_style(op, style)
    _check_pool(op, k_pool, v_pool, D.FLOATS)
    t, d = _rope_qkv(op, q, k, v, k_pool.shape[2:])
    positions = _rope_inputs(op, positions, cos, sin, k.device, t, d)
    slot_mapping = _index(op, "slot_mapping", slot_mapping, k.device, (t,))
    if positions._host and t and int(positions.numpy().max()) >= cos.shape[0]:
        raise ShapeError(f"{op}: position {int(positions.numpy().max())} is beyond the rope table "
                         f"({cos.shape[0]} positions)")
    if slot_mapping._host and t:
        slots = slot_mapping.numpy()
        cap = k_pool.shape[0] * k_pool.shape[1]
        if int(slots.max()) >= cap:
            raise ShapeError(f"{op}: slot {int(slots.max())} is beyond the pools ({cap} slots)")
        live = slots[slots >= 0]
        if len(np.unique(live)) != len(live):
            raise ShapeError(f"{op}: slot_mapping writes a slot twice")
    _same_device(op, q=q, k=k, v=v, k_pool=k_pool, v_pool=v_pool, positions=positions,
                 slot_mapping=slot_mapping, cos=cos, sin=sin)
    _dispatch(op, k_pool.dtype, k.device, ("q", "k_pool", "v_pool"), q=q, k=k, v=v, k_pool=k_pool,
              v_pool=v_pool, positions=positions, slot_mapping=slot_mapping, cos=cos, sin=sin, style=style)


def _parts(op, name, w, k, dtypes) -> tuple:
    """A weight given as one Tensor (N, K // block) or a tuple of row parts -> the tuple."""
    parts = tuple(w) if isinstance(w, (tuple, list)) else (w,)
    if not parts:
        raise ShapeError(f"{op}: {name} has no parts")
    for i, p in enumerate(parts):
        _t(op, f"{name}[{i}]", p, dtypes, 2)
        if p.shape[1] * p.dtype.block != k:
            raise ShapeError(f"{op}: {name}[{i}] has shape {p.shape} ({p.dtype}); expected {k} input columns")
    return parts


_checked_steps: list = []     # decode_layer: the step tensors last validated (kept alive: ids stay theirs)
_checked_layers: dict = {}    # decode_layer: id(wo) -> the layer's tensors last validated (kept alive)


def _same_objects(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(u is v or (not isinstance(u, Tensor) and not isinstance(v, Tensor) and u == v)
                                    for u, v in zip(a, b))


def _check_layer(op, d, attn_norm, wqkv, wo, mlp_norm, w_gate_up, w_down, k_pool, v_pool, bqkv, num_heads, style):
    """decode_layer's checks of the layer's own tensors (x has d columns): (qkv parts, gate-up
    parts, Hq, NB, BS, Hkv, Dh)."""
    _check_pool(op, k_pool, v_pool, D.FLOATS)
    nb, bs, hkv, dh = k_pool.shape
    hq = int(num_heads)
    if hq <= 0 or hq % hkv:
        raise ShapeError(f"{op}: num_heads={hq} must be a positive multiple of the pools' {hkv} kv heads")
    wdt = D.FLOATS + D.PACKED
    qkv = _parts(op, "wqkv", wqkv, d, wdt)
    if sum(p.shape[0] for p in qkv) != (hq + 2 * hkv) * dh:
        raise ShapeError(f"{op}: wqkv has {sum(p.shape[0] for p in qkv)} rows; expected (Hq + 2 Hkv) Dh = "
                         f"{(hq + 2 * hkv) * dh}")
    _t(op, "wo", wo, wdt, 2)
    if wo.shape[0] != d or wo.shape[1] * wo.dtype.block != hq * dh:
        raise ShapeError(f"{op}: wo has shape {wo.shape} ({wo.dtype}); expected ({d}, {hq * dh} columns)")
    _t(op, "w_down", w_down, wdt, 2)
    f = w_down.shape[1] * w_down.dtype.block
    gu = _parts(op, "w_gate_up", w_gate_up, d, wdt)
    if w_down.shape[0] != d or sum(p.shape[0] for p in gu) != 2 * f:
        raise ShapeError(f"{op}: w_gate_up has {sum(p.shape[0] for p in gu)} rows and w_down shape {w_down.shape}; "
                         f"expected 2 F rows and ({d}, F columns)")
    for name, t in (("attn_norm", attn_norm), ("mlp_norm", mlp_norm)):
        _t(op, name, t, D.FLOATS, 1)
        _shape(op, name, t, (d,))
    if bqkv is not None:
        _t(op, "bqkv", bqkv, D.FLOATS, 1)
        _shape(op, "bqkv", bqkv, ((hq + 2 * hkv) * dh,))
    _check_style(op, style)
    return qkv, gu, hq, nb, bs, hkv, dh


def decode_layer(x: Tensor, attn_norm: Tensor, wqkv, wo: Tensor, mlp_norm: Tensor, w_gate_up, w_down: Tensor,
                 k_pool: Tensor, v_pool: Tensor, positions: Tensor, slot_mapping: Tensor, context_lens: Tensor,
                 block_tables: Tensor, cos: Tensor, sin: Tensor, *, num_heads: int, bqkv: Tensor | None = None,
                 eps: float = 1e-6, style: str = "half", scale: float | None = None) -> Tensor:
    """One pre-norm decoder layer (Llama / Qwen2) for B decode rows, row b the one new token of
    sequence b, fused: x (B, D) f32 is updated in place and returned.

        qkv = matmul(x, wqkv, bqkv, norm_weight=attn_norm, eps)          (B, (Hq + 2 Hkv) Dh)
        rope_paged_kv_write(q, k, v, k_pool, v_pool, positions, slot_mapping, cos, sin, style)
        x += paged_attention(q, pools, query_start = 0..B, context_lens, block_tables, scale) @ wo^T
        x += matmul(matmul(x, w_gate_up, norm_weight=mlp_norm, eps, act="swiglu"), w_down)

    wqkv and w_gate_up are one weight or a tuple of row parts ([q | k | v], [gate | up]) that
    may differ in format. Hq = num_heads; pools (NB, BS, Hkv, Dh). Packed weights may round the
    products' inputs to 8 bits per block as matmul does."""
    op = "decode_layer"
    _t(op, "x", x, (D.f32,), 2)
    b, d = x.shape
    # the layer's own tensors are checked once: a call with the same objects (a model's every
    # step) skips to the step's checks
    static = (attn_norm, wo, mlp_norm, w_down, k_pool, v_pool, bqkv, cos, sin, int(num_heads), style, d)
    wq = tuple(wqkv) if isinstance(wqkv, (tuple, list)) else (wqkv,)
    wg = tuple(w_gate_up) if isinstance(w_gate_up, (tuple, list)) else (w_gate_up,)
    seen_layer = _checked_layers.get(id(wo))
    if seen_layer is not None and _same_objects(seen_layer[0], static) and _same_objects(seen_layer[1], wq) \
            and _same_objects(seen_layer[2], wg):
        qkv, gu, hq, nb, bs, hkv, dh = wq, wg, *seen_layer[3]
    else:
        qkv, gu, hq, nb, bs, hkv, dh = _check_layer(op, d, attn_norm, wqkv, wo, mlp_norm, w_gate_up, w_down,
                                                    k_pool, v_pool, bqkv, num_heads, style)
        if len(_checked_layers) > 4096:
            _checked_layers.clear()
        _checked_layers[id(wo)] = (static, wq, wg, (hq, nb, bs, hkv, dh))
    step = (positions, slot_mapping, context_lens, block_tables, cos, sin, k_pool.shape, b)
    seen = _checked_steps[0] if _checked_steps else None
    if seen is not None and all(a is c for a, c in zip(seen[:6], step[:6])) and seen[6:] == step[6:]:
        mb = block_tables.shape[1]              # the step's tensors, as last checked (in range too)
    else:
        positions = _rope_inputs(op, positions, cos, sin, x.device, b, dh)
        slot_mapping = _index(op, "slot_mapping", slot_mapping, x.device, (b,))
        context_lens = _index(op, "context_lens", context_lens, x.device, (b,))
        block_tables = _index(op, "block_tables", block_tables, x.device, ndim=2)
        mb = block_tables.shape[1]
        _shape(op, "block_tables", block_tables, (b, mb))
        if positions._host:
            ps, sl, cl, bt = (t.numpy() for t in (positions, slot_mapping, context_lens, block_tables))
            if b and (int(ps.min()) < 0 or int(ps.max()) >= cos.shape[0]):
                raise ShapeError(f"{op}: positions must be in [0, {cos.shape[0]}) (the rope table)")
            if b and (int(cl.min()) < 1 or int(cl.max()) > mb * bs):
                raise ShapeError(f"{op}: context_lens must be in [1, {mb * bs}] (block_tables' capacity)")
            if b and int(sl.max()) >= nb * bs:
                raise ShapeError(f"{op}: slot {int(sl.max())} is beyond the pools ({nb * bs} slots)")
            used = np.arange(mb)[None, :] < -(-cl[:, None].astype(np.int64) // bs)
            if used.any() and (bt[used].min() < 0 or bt[used].max() >= nb):
                raise ShapeError(f"{op}: block ids in use must be in [0, {nb})")
        _checked_steps[:] = [(positions, slot_mapping, context_lens, block_tables, cos, sin, k_pool.shape, b)]
    _same_device(op, x=x, attn_norm=attn_norm, wo=wo, mlp_norm=mlp_norm, w_down=w_down, k_pool=k_pool,
                 v_pool=v_pool, positions=positions, block_tables=block_tables, bqkv=bqkv, cos=cos)
    scale = float(scale) if scale is not None else 1.0 / float(np.sqrt(dh))
    _dispatch(op, wo.dtype, x.device, ("x", "k_pool", "v_pool"), x=x, attn_norm=attn_norm, wqkv=qkv, wo=wo,
              mlp_norm=mlp_norm, w_gate_up=gu, w_down=w_down, k_pool=k_pool, v_pool=v_pool,
              positions=positions, slot_mapping=slot_mapping, context_lens=context_lens,
              block_tables=block_tables, cos=cos, sin=sin, num_heads=hq, bqkv=bqkv, eps=float(eps),
              style=style, scale=scale)
    return x


def argmax(x: Tensor, out: Tensor | None = None) -> Tensor:
    """x (N,) or (B, N) -> i32 () or (B,)."""
    op = "argmax"
    _t(op, "x", x, D.FLOATS, (1, 2))
    _same_device(op, x=x, out=out)
    out = _out(op, out, x.shape[:-1], D.i32, x.device, (D.i32,))
    _dispatch(op, x.dtype, x.device, ("out",), x=x, out=out)
    return out


def cast(x: Tensor, dtype=None, out: Tensor | None = None) -> Tensor:
    op = "cast"
    _t(op, "x", x, D.FLOATS)
    if out is None:
        if dtype is None:
            raise DTypeError(f"{op}: give dtype or out")
        out = empty(x.shape, D.dtype(dtype), x.device)
    _t(op, "out", out, D.FLOATS)
    _shape(op, "out", out, x.shape)
    _same_device(op, x=x, out=out)
    _dispatch(op, x.dtype, x.device, ("out",), x=x, out=out)
    return out


def _per_row(op, name, value, b, dtype, device) -> Tensor:
    """A per-row parameter as a (B,) tensor: a Tensor as given (checked), or a number or
    sequence of B numbers put on the device."""
    if isinstance(value, Tensor):
        _t(op, name, value, (dtype,), 1)
        _shape(op, name, value, (b,))
        return value
    arr = np.broadcast_to(np.asarray(value, dtype.np), (b,))
    if not np.isfinite(arr.astype(np.float64)).all():
        raise ShapeError(f"{op}: {name} must be finite, got {value!r}")
    return tensor(np.ascontiguousarray(arr), dtype, device)


def _host_rows(t: Tensor):
    return t.numpy() if t._host else None


def penalties(logits: Tensor, counts: Tensor, seen: Tensor, repetition=1.0, presence=0.0, frequency=0.0,
              out: Tensor | None = None) -> Tensor:
    """logits (B, V); counts (B, V) i32 of output tokens; seen (B, V) i32, nonzero for
    tokens of the prompt or output. repetition, presence, frequency: a number for every row
    or (B,) f32 tensors (one value per row). out may be logits."""
    op = "penalties"
    _t(op, "logits", logits, D.FLOATS, 2)
    _t(op, "counts", counts, (D.i32,), 2)
    _t(op, "seen", seen, (D.i32,), 2)
    _shape(op, "counts", counts, logits.shape)
    _shape(op, "seen", seen, logits.shape)
    b, dev = logits.shape[0], logits.device
    repetition = _per_row(op, "repetition", repetition, b, D.f32, dev)
    presence = _per_row(op, "presence", presence, b, D.f32, dev)
    frequency = _per_row(op, "frequency", frequency, b, D.f32, dev)
    rep = _host_rows(repetition)
    if rep is not None and not (rep > 0).all():
        raise ShapeError(f"{op}: repetition penalty must be > 0, got {rep.min()}")
    _same_device(op, logits=logits, counts=counts, seen=seen, repetition=repetition, presence=presence,
                 frequency=frequency, out=out)
    out = _out(op, out, logits.shape, logits.dtype, dev, D.FLOATS)
    _dispatch(op, logits.dtype, dev, ("out",), logits=logits, counts=counts, seen=seen,
              repetition=repetition, presence=presence, frequency=frequency, out=out)
    return out


def sample(logits: Tensor, uniform: Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
           out: Tensor | None = None) -> Tensor:
    """logits (B, V), uniform (B,) f32 in [0, 1) -> token ids (B,) i32 (see reference.sample).
    temperature (0 = argmax), top_k (0 = off), top_p, min_p: a number for every row, or (B,)
    tensors (f32; top_k i32), so rows of one call sample with their own settings."""
    op = "sample"
    _t(op, "logits", logits, D.FLOATS, 2)
    _t(op, "uniform", uniform, (D.f32,), 1)
    _shape(op, "uniform", uniform, logits.shape[:1])
    b, dev = logits.shape[0], logits.device
    temperature = _per_row(op, "temperature", temperature, b, D.f32, dev)
    top_k = _per_row(op, "top_k", top_k, b, D.i32, dev)
    top_p = _per_row(op, "top_p", top_p, b, D.f32, dev)
    min_p = _per_row(op, "min_p", min_p, b, D.f32, dev)
    rows = [_host_rows(x) for x in (temperature, top_k, top_p, min_p)]
    if all(r is not None for r in rows):
        tt, tk, tp, mp = rows
        if (tt < 0).any() or not ((tp > 0) & (tp <= 1)).all() or not ((mp >= 0) & (mp <= 1)).all() \
                or (tk < 0).any():
            raise ShapeError(f"{op}: need temperature >= 0, 0 < top_p <= 1, 0 <= min_p <= 1, top_k >= 0 "
                             f"in every row; got {tt.tolist()[:4]}, {tp.tolist()[:4]}, {mp.tolist()[:4]}, "
                             f"{tk.tolist()[:4]}")
    _same_device(op, logits=logits, uniform=uniform, temperature=temperature, top_k=top_k, top_p=top_p,
                 min_p=min_p, out=out)
    out = _out(op, out, logits.shape[:1], D.i32, dev, (D.i32,))
    _dispatch(op, logits.dtype, dev, ("out",), logits=logits, uniform=uniform, temperature=temperature,
              top_k=top_k, top_p=top_p, min_p=min_p, out=out)
    return out


# --- collectives (tensor parallelism): over the ranks of a hetinfer.distributed group ---------
def _group(group):
    if group is None:
        from .. import distributed
        group = distributed.group()
    return group


def all_reduce(x: Tensor, out: Tensor | None = None, group=None) -> Tensor:
    """out = the sum of x over every rank of group (default: hetinfer.distributed.group());
    out None or x: in place. World size 1: a copy (nothing when in place). Every rank calls
    it with the same shape and dtype; the kernel uses group.communicator(device type)."""
    op = "all_reduce"
    _t(op, "x", x, D.FLOATS)
    _same_device(op, x=x, out=out)
    out = x if out is None else _out(op, out, x.shape, x.dtype, x.device, (x.dtype,))
    _dispatch(op, x.dtype, x.device, ("out",), x=x, out=out, group=_group(group))
    return out


def all_gather(x: Tensor, dim: int = 0, out: Tensor | None = None, group=None) -> Tensor:
    """The ranks' x (same shape on every rank) concatenated along dim in rank order: out has
    x.shape with dim multiplied by the world size. World size 1: a copy."""
    op = "all_gather"
    _t(op, "x", x, D.FLOATS)
    if x.ndim == 0:
        raise ShapeError(f"{op}: x must have at least one axis")
    if not -x.ndim <= dim < x.ndim:
        raise ShapeError(f"{op}: dim {dim} is out of range for x of shape {x.shape}")
    dim %= x.ndim
    group = _group(group)
    shape = x.shape[:dim] + (x.shape[dim] * group.world_size,) + x.shape[dim + 1:]
    _same_device(op, x=x, out=out)
    out = _out(op, out, shape, x.dtype, x.device, (x.dtype,))
    _dispatch(op, x.dtype, x.device, ("out",), x=x, dim=dim, out=out, group=group)
    return out


__all__ = ["OPS", "reference"] + list(OPS)
