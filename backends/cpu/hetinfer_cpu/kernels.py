"""CPU kernels on NumPy/BLAS. Arithmetic in float32; f16/bf16 inputs are widened,
and results are written into the caller's `out` (no allocation of the result)."""

from __future__ import annotations

import numpy as np
from hetinfer.packed import FORMATS

from . import int8 as _int8
from . import packed as _packed

F32 = np.dtype(np.float32)
FLOATS = ("f32", "f16", "bf16")
PACKED = tuple(f.name for f in FORMATS)
_CHUNK = 1 << 22   # elements of a weight widened at a time (16 MiB of f32)


def _f32(a: np.ndarray) -> np.ndarray:
    return a if a.dtype == F32 else a.astype(F32)


def _store(o: np.ndarray, value: np.ndarray) -> None:
    o[...] = value   # numpy (and ml_dtypes) cast to out's dtype with round-to-nearest


def embedding(ids, table, out):
    o, tab, idx = out.numpy(), table.numpy(), ids.numpy()
    if table.dtype.packed is not None:                                   # the rows, dequantized
        _store(o, _packed.dequantize(tab[idx], table.dtype.packed))
    elif o.dtype == tab.dtype and o.flags.c_contiguous:
        np.take(tab, idx, axis=0, out=o)
    else:
        _store(o, tab[idx])


def rms_norm(x, weight, eps, out):
    xf, o = _f32(x.numpy()), out.numpy()
    inv = 1.0 / np.sqrt(np.einsum("...d,...d->...", xf, xf) / xf.shape[-1] + eps)   # (...)
    if o.dtype == F32:
        np.multiply(xf, inv[..., None], out=o)
        o *= _f32(weight.numpy())
    else:
        _store(o, xf * inv[..., None] * _f32(weight.numpy()))


def _rows(weight: np.ndarray, scales: np.ndarray | None, r0: int, r1: int, fmt=None) -> np.ndarray:
    """Rows r0:r1 of the weight as float32 (dequantized for int8 groups and packed blocks)."""
    w = weight[r0:r1]
    if fmt is not None:
        return _packed.dequantize(w, fmt)
    if scales is None:
        return _f32(w)
    n, k = w.shape
    g = k // scales.shape[1]
    return (w.reshape(n, k // g, g).astype(F32) * _f32(scales[r0:r1])[:, :, None]).reshape(n, k)


def matmul(x, weight, bias, scales, out):
    """f32 weights: the batch-invariant C kernel of f32.py (a row's bits do not depend on the
    other rows of x; BLAS with HETINFER_CPU_F32=blas or without a compiler), bias included.
    f16/bf16 (and the int8 and packed fallbacks') weights: widened (dequantized) a block of
    rows at a time, BLAS."""
    from . import f32 as _f32k                                           # (cached in sys.modules)
    w, o = weight.numpy(), out.numpy()
    fmt = weight.dtype.packed
    k = w.shape[1] * weight.dtype.block                                  # logical K
    x2 = _f32(x.numpy()).reshape(-1, k)                                  # (M, K)
    direct = o.dtype == F32 and o.flags.c_contiguous
    o2 = o.reshape(-1, w.shape[0]) if direct else np.empty((x2.shape[0], w.shape[0]), F32)  # (M, N)
    if w.dtype == F32 and scales is None:
        _f32k.product(x2, w, None if bias is None else _f32(bias.numpy()), o2)
    else:   # widen a block of rows at a time: never a float copy of the whole weight
        step = max(1, _CHUNK // k)
        sc = scales.numpy() if scales is not None else None
        for r0 in range(0, w.shape[0], step):
            r1 = min(r0 + step, w.shape[0])
            np.matmul(x2, _rows(w, sc, r0, r1, fmt).T, out=o2[:, r0:r1])
        if bias is not None:
            o2 += _f32(bias.numpy())
    if not direct:
        _store(o, o2.reshape(o.shape))


class _Host:
    """An ndarray where a plain kernel expects a Tensor (it only calls .numpy()): cheaper
    than wrapping a temporary in a Tensor on every call of a decode step."""
    __slots__ = ("a",)

    def __init__(self, a: np.ndarray):
        self.a = a

    def numpy(self) -> np.ndarray:
        return self.a


def fused(plain):
    """A matmul kernel with matmul's rms_norm prologue and its swiglu / residual epilogue
    around a plain product kernel(x, weight, bias, scales, out), in f32, in place where
    NumPy allows (these run on whole prompts in prefill)."""
    def kernel(x, weight, bias, scales, out, norm_weight=None, eps=1e-6, act=None, residual=None):
        if norm_weight is not None:
            xf = _f32(x.numpy())
            a = np.empty(xf.shape, F32)
            inv = 1.0 / np.sqrt(np.einsum("...d,...d->...", xf, xf) / xf.shape[-1] + eps)
            np.multiply(xf, inv[..., None], out=a)
            a *= _f32(norm_weight.numpy())
            x = _Host(a)
        if act is None and residual is None:
            return plain(x, weight, bias, scales, out)
        r = np.empty(out.shape[:-1] + (weight.shape[0],), F32)
        plain(x, weight, bias, scales, _Host(r))
        if act == "swiglu":                                              # [gate | up] -> (..., N/2)
            n = r.shape[-1] // 2
            g, t = r[..., :n], np.negative(r[..., :n])
            with np.errstate(over="ignore"):                             # exp(-g) = inf: silu -> -0
                np.exp(t, out=t)
            t += 1.0
            np.divide(g, t, out=t)
            t *= r[..., n:]
            r = t
        o = out.numpy()
        if residual is not None:                                         # residual may be out
            res = residual.numpy()
            if o.dtype == F32 and res.dtype == F32:
                np.add(r, res, out=o)
                return
            r = r + _f32(res)
        _store(o, r)
    kernel.__name__ = kernel.__qualname__ = f"fused_{plain.__name__}"
    kernel.__module__ = plain.__module__
    return kernel


def rope(x, positions, cos, sin, style, out):
    xf, o, pos = _f32(x.numpy()), out.numpy(), positions.numpy()
    c = cos.numpy()[pos][:, None, :]        # (T, 1, D/2)
    s = sin.numpy()[pos][:, None, :]
    if style == "half":
        h = xf.shape[-1] // 2
        x1, x2 = xf[..., :h], xf[..., h:]
        r1, r2 = x1 * c - x2 * s, x2 * c + x1 * s   # both computed before out (may alias x) is written
        _store(o[..., :h], r1)
        _store(o[..., h:], r2)
    else:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        r1, r2 = x1 * c - x2 * s, x1 * s + x2 * c
        _store(o[..., 0::2], r1)
        _store(o[..., 1::2], r2)


def add(a, b, out):
    an, bn, o = a.numpy(), b.numpy(), out.numpy()
    if an.dtype == bn.dtype == o.dtype == F32:
        np.add(an, bn, out=o)
    else:
        _store(o, _f32(an) + _f32(bn))


def swiglu(gate, up, out):
    g = _f32(gate.numpy())
    with np.errstate(over="ignore"):          # exp(-g) overflows to inf for g << 0: silu -> 0
        _store(out.numpy(), g / (1.0 + np.exp(-g)) * _f32(up.numpy()))


def softmax(x, out):
    xf = _f32(x.numpy())
    e = np.exp(xf - xf.max(axis=-1, keepdims=True))
    _store(out.numpy(), e / e.sum(axis=-1, keepdims=True))


def attention(q, k_cache, v_cache, positions, scale, out):
    qn, pos = q.numpy(), positions.numpy()
    t, hq, d = qn.shape
    hkv = k_cache.shape[1]
    g = hq // hkv
    length = int(pos.max()) + 1 if t else 0
    k = _f32(k_cache.numpy()[:length]).transpose(1, 2, 0)[:, None]     # (Hkv, 1, D, L)
    v = _f32(v_cache.numpy()[:length]).transpose(1, 0, 2)[:, None]     # (Hkv, 1, L, D)
    qh = _f32(qn).reshape(t, hkv, g, d).transpose(1, 2, 0, 3)           # (Hkv, g, T, D)
    scores = np.matmul(qh, k) * np.float32(scale)                       # (Hkv, g, T, L)
    scores[..., np.arange(length)[None, :] > pos[:, None]] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    o = np.matmul(scores, v)                                            # (Hkv, g, T, D)
    _store(out.numpy(), o.transpose(2, 0, 1, 3).reshape(t, hq, d))


def kv_cache_write(k, v, k_cache, v_cache, positions):
    pos = positions.numpy()
    k_cache.numpy()[pos] = k.numpy()
    v_cache.numpy()[pos] = v.numpy()


def rope_kv_write(q, k, v, k_cache, v_cache, positions, cos, sin, style):
    rope(q, positions, cos, sin, style, q)
    kr = _Host(np.empty(k.shape, F32))                                    # rotated k, f32
    rope(k, positions, cos, sin, style, kr)
    kv_cache_write(kr, v, k_cache, v_cache, positions)


ATT_KEYS = 128       # paged_attention: keys per block product (a fixed shape; see below)


def _rows2(a: np.ndarray):
    """a (H, M, K) with M >= 2 (a single row is doubled): NumPy sends a one-row product to
    BLAS gemv, whose rounding differs from gemm's; gemm's rows are the same for any M."""
    return np.concatenate([a, a], axis=1) if a.shape[1] == 1 else a


def paged_attention(q, k_pool, v_pool, query_start, context_lens, block_tables, scale, out):
    """Per sequence: its keys gathered by its block table, then attention of its query rows.

    Batch invariance: a row's result depends only on its own sequence and position, not on
    how many rows its chunk has nor on the other sequences. Scores are gemm products
    (rows doubled when alone); the softmax weights p (zero past a row's position) meet V
    in fixed chunks of ATT_KEYS keys, zero-padded, each chunk one product of the same shape,
    summed chunk after chunk: keys a row cannot see add exact zeros. So chunked prefill and
    a prompt prefilled at once give the same bits."""
    qn, kp, vp = q.numpy(), k_pool.numpy(), v_pool.numpy()
    qs, cl, bt = query_start.numpy(), context_lens.numpy(), block_tables.numpy()
    o = out.numpy()
    t, hq, d = qn.shape
    bs, hkv = kp.shape[1], kp.shape[2]
    g = hq // hkv
    sc = np.float32(scale)
    for b in range(len(cl)):
        r0, r1, length = int(qs[b]), int(qs[b + 1]), int(cl[b])
        n = r1 - r0
        if n == 0:
            continue
        nch = -(-length // ATT_KEYS)
        lpad = nch * ATT_KEYS
        blocks = bt[b, :-(-length // bs)]
        k = np.zeros((lpad, hkv, d), F32)
        v = np.zeros((lpad, hkv, d), F32)
        k[:length] = kp[blocks].reshape(-1, hkv, d)[:length]
        v[:length] = vp[blocks].reshape(-1, hkv, d)[:length]
        qh = _f32(qn[r0:r1]).reshape(n, hkv, g, d).transpose(1, 2, 0, 3).reshape(hkv, g * n, d)
        s = np.matmul(_rows2(qh), k.transpose(1, 2, 0))[:, :g * n] * sc            # (Hkv, g n, Lpad)
        pos = np.tile(np.arange(length - n, length), g)                             # (g n,)
        s[:, np.arange(lpad)[None, :] > pos[:, None]] = -np.inf
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        pc = s.reshape(hkv, g * n, nch, ATT_KEYS)
        vc = v.transpose(1, 0, 2).reshape(hkv, nch, ATT_KEYS, d)
        acc = np.zeros((hkv, g * n, d), F32)
        tot = np.zeros((hkv, g * n), F32)
        for c in range(nch):                                                        # in key order
            acc += np.matmul(_rows2(pc[:, :, c]), vc[:, c])[:, :g * n]
            tot += pc[:, :, c].sum(axis=-1)
        acc /= tot[..., None]
        _store(o[r0:r1], acc.reshape(hkv, g, n, d).transpose(2, 0, 1, 3).reshape(n, hq, d))


def rope_paged_kv_write(q, k, v, k_pool, v_pool, positions, slot_mapping, cos, sin, style):
    rope(q, positions, cos, sin, style, q)
    kr = np.empty(k.shape, F32)
    rope(k, positions, cos, sin, style, _Host(kr))
    slots = slot_mapping.numpy()
    live = slots >= 0
    kp, vp = k_pool.numpy(), v_pool.numpy()
    bs = kp.shape[1]
    blk, row = slots[live] // bs, slots[live] % bs
    kp[blk, row] = kr[live]
    vp[blk, row] = v.numpy()[live]


def argmax(x, out):
    out.numpy()[...] = np.argmax(x.numpy(), axis=-1)


def cast(x, out):
    _store(out.numpy(), x.numpy())


def penalties(logits, counts, seen, repetition, presence, frequency, out):
    x, c = _f32(logits.numpy()), counts.numpy()
    rep = repetition.numpy()[:, None]
    y = np.where(seen.numpy() != 0, np.where(x > 0, x / rep, x * rep), x)
    y = y - presence.numpy()[:, None] * (c > 0) - frequency.numpy()[:, None] * c
    _store(out.numpy(), y)


def _sample_row(z: np.ndarray, u: float, temperature, top_k, top_p, min_p) -> int:
    """One row of reference.sample, over the kept tokens only (ids kept ascending)."""
    if temperature == 0:
        return int(np.argmax(z))
    v = z.shape[0]
    z = z.astype(np.float64) / temperature
    idx = np.arange(v)
    if 0 < top_k < v:
        kth = np.partition(z, v - top_k)[v - top_k]
        idx = np.flatnonzero(z >= kth)
    p = np.exp(z[idx] - z[idx].max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        sp = p[order]
        kept = np.sort(order[(np.cumsum(sp) - sp) < top_p])
        idx, p = idx[kept], p[kept] / p[kept].sum()
    if min_p > 0.0:
        kept = p >= min_p * p.max()
        idx, p = idx[kept], p[kept] / p[kept].sum()
    cdf = np.cumsum(p)
    return int(idx[np.argmax(cdf > u * cdf[-1])])


def sample(logits, uniform, temperature, top_k, top_p, min_p, out):
    """Each row with its own parameters; greedy rows (temperature 0) are one argmax."""
    x, u, o = logits.numpy(), uniform.numpy(), out.numpy()
    tt, tk, tp, mp = temperature.numpy(), top_k.numpy(), top_p.numpy(), min_p.numpy()
    greedy = tt == 0
    if greedy.any():
        o[greedy] = np.argmax(x[greedy], axis=-1)
    for b in np.flatnonzero(~greedy):
        o[b] = _sample_row(_f32(x[b]), float(u[b]), float(tt[b]), int(tk[b]), float(tp[b]), float(mp[b]))


KERNELS = [
    ("embedding", FLOATS, embedding),
    ("rms_norm", FLOATS, rms_norm),
    ("matmul", FLOATS, fused(matmul)),          # f32 weights: batch-invariant C kernel (f32.py)
    ("matmul", ("i8",), fused(_int8.matmul)),   # C GEMV / dequantized tiles + BLAS (int8.py)
    ("matmul", PACKED, _packed.fused_matmul),   # GGUF blocks: C integer dots / NumPy tiles (packed.py)
    ("embedding", PACKED, _packed.embedding),   # rows of a packed table, dequantized
    ("decode_layer", PACKED, _packed.decode_layer),   # a decoder layer's decode rows in one C call
    ("rope", FLOATS, rope),
    ("add", FLOATS, add),
    ("swiglu", FLOATS, swiglu),
    ("softmax", FLOATS, softmax),
    ("attention", FLOATS, attention),
    ("kv_cache_write", FLOATS, kv_cache_write),
    ("rope_kv_write", FLOATS, rope_kv_write),
    ("paged_attention", FLOATS, paged_attention),
    ("rope_paged_kv_write", FLOATS, rope_paged_kv_write),
    ("argmax", FLOATS, argmax),
    ("cast", FLOATS, cast),
    ("penalties", FLOATS, penalties),
    ("sample", FLOATS, sample),
]
