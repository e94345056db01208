"""CPU kernels on NumPy/BLAS. Arithmetic in float32; f16/bf16 inputs are widened,
and results are written into the caller's `out` (no allocation of the result)."""

from __future__ import annotations

import numpy as np

from . import int8 as _int8

F32 = np.dtype(np.float32)
FLOATS = ("f32", "f16", "bf16")
_CHUNK = 1 << 22   # elements of a weight widened at a time (16 MiB of f32)


def _f32(a: np.ndarray) -> np.ndarray:
    return a if a.dtype == F32 else a.astype(F32)


def _store(o: np.ndarray, value: np.ndarray) -> None:
    o[...] = value   # numpy (and ml_dtypes) cast to out's dtype with round-to-nearest


def embedding(ids, table, out):
    o, tab, idx = out.numpy(), table.numpy(), ids.numpy()
    if o.dtype == tab.dtype and o.flags.c_contiguous:
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


def _rows(weight: np.ndarray, scales: np.ndarray | None, r0: int, r1: int) -> np.ndarray:
    """Rows r0:r1 of the weight as float32 (dequantized for int8 groups)."""
    w = weight[r0:r1]
    if scales is None:
        return _f32(w)
    n, k = w.shape
    g = k // scales.shape[1]
    return (w.reshape(n, k // g, g).astype(F32) * _f32(scales[r0:r1])[:, :, None]).reshape(n, k)


def matmul(x, weight, bias, scales, out):
    w, o = weight.numpy(), out.numpy()
    k = w.shape[1]
    x2 = _f32(x.numpy()).reshape(-1, k)                                  # (M, K)
    direct = o.dtype == F32 and o.flags.c_contiguous
    o2 = o.reshape(-1, w.shape[0]) if direct else np.empty((x2.shape[0], w.shape[0]), F32)  # (M, N)
    if w.dtype == F32:
        np.matmul(x2, w.T, out=o2)
    else:   # widen a block of rows at a time: never a float copy of the whole weight
        step = max(1, _CHUNK // k)
        sc = scales.numpy() if scales is not None else None
        for r0 in range(0, w.shape[0], step):
            r1 = min(r0 + step, w.shape[0])
            np.matmul(x2, _rows(w, sc, r0, r1).T, out=o2[:, r0:r1])
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


def argmax(x, out):
    out.numpy()[...] = np.argmax(x.numpy(), axis=-1)


def cast(x, out):
    _store(out.numpy(), x.numpy())


def penalties(logits, counts, seen, repetition, presence, frequency, out):
    x, c = _f32(logits.numpy()), counts.numpy()
    y = np.where(seen.numpy() != 0, np.where(x > 0, x / repetition, x * repetition), x)
    if presence:
        y = y - np.float32(presence) * (c > 0)
    if frequency:
        y = y - np.float32(frequency) * c
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
    x, u, o = logits.numpy(), uniform.numpy(), out.numpy()
    for b in range(x.shape[0]):
        o[b] = _sample_row(_f32(x[b]), float(u[b]), temperature, top_k, top_p, min_p)


KERNELS = [
    ("embedding", FLOATS, embedding),
    ("rms_norm", FLOATS, rms_norm),
    ("matmul", FLOATS, fused(matmul)),
    ("matmul", ("i8",), fused(_int8.matmul)),   # C GEMV / dequantized tiles + BLAS (int8.py)
    ("rope", FLOATS, rope),
    ("add", FLOATS, add),
    ("swiglu", FLOATS, swiglu),
    ("softmax", FLOATS, softmax),
    ("attention", FLOATS, attention),
    ("kv_cache_write", FLOATS, kv_cache_write),
    ("rope_kv_write", FLOATS, rope_kv_write),
    ("argmax", FLOATS, argmax),
    ("cast", FLOATS, cast),
    ("penalties", FLOATS, penalties),
    ("sample", FLOATS, sample),
]
