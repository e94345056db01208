"""Float64 NumPy references: the definition of every op. Short and readable on
purpose; every backend, the CPU one included, is tested against these."""

from __future__ import annotations

import numpy as np


def f64(a) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


def embedding(ids, table):
    """table: floats (V, D); a packed table goes through dequantize_packed first."""
    return f64(table)[np.asarray(ids)]                       # (T, D)


def rms_norm(x, weight, eps):
    x = f64(x)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * f64(weight)


def dequantize_int8(weight, scales):
    """Symmetric per-group int8: weight (N, K) int8, scales (N, K // G) -> (N, K)."""
    n, k = weight.shape
    g = k // scales.shape[1]
    return (f64(weight).reshape(n, k // g, g) * f64(scales)[:, :, None]).reshape(n, k)


def dequantize_packed(blocks, fmt):
    """A packed weight (N, K // block) of np.void blocks (or its uint8 bytes (N, bytes)) in
    format fmt (a packed DType, its name, or a hetinfer.packed.Format) -> (N, K) float64,
    by the gguf package's own dequantizers (independent of every hetinfer kernel)."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    from .. import dtypes
    f = fmt if hasattr(fmt, "ggml_type") else dtypes.dtype(fmt).packed
    raw = np.ascontiguousarray(blocks)
    raw = raw.view(np.uint8).reshape(raw.shape[0], -1)                    # (N, K // block * nbytes)
    return f64(dequantize(raw, GGMLQuantizationType(f.ggml_type)))        # (N, K)


def matmul(x, weight, bias=None, scales=None, norm_weight=None, eps=1e-6, act=None, residual=None):
    w = dequantize_int8(weight, scales) if scales is not None else f64(weight)
    a = f64(x) if norm_weight is None else rms_norm(x, norm_weight, eps)
    y = a @ w.T                                              # (..., K) @ (K, N) -> (..., N)
    if bias is not None:
        y = y + f64(bias)
    if act == "swiglu":                                      # [gate | up] -> (..., N / 2)
        n = y.shape[-1] // 2
        y = swiglu(y[..., :n], y[..., n:])
    return y + f64(residual) if residual is not None else y


def rope(x, positions, cos, sin, style):
    x = f64(x)                                               # (T, H, D)
    c = f64(cos)[np.asarray(positions)][:, None, :]          # (T, 1, D/2)
    s = f64(sin)[np.asarray(positions)][:, None, :]
    if style == "half":                                      # HF: rotate first half against second
        h = x.shape[-1] // 2
        x1, x2 = x[..., :h], x[..., h:]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]                      # interleaved pairs (llama2.c / Meta)
    out = np.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out


def add(a, b):
    return f64(a) + f64(b)


def swiglu(gate, up):
    g = f64(gate)
    return g / (1.0 + np.exp(-g)) * f64(up)


def softmax(x):
    x = f64(x)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def attention(q, k_cache, v_cache, positions, scale):
    """Causal attention by position: query t sees keys 0..positions[t]. GQA: query
    head h reads kv head h // (Hq // Hkv)."""
    q, k, v = f64(q), f64(k_cache), f64(v_cache)             # (T, Hq, D), (S, Hkv, D), (S, Hkv, D)
    pos = np.asarray(positions)
    t, hq, _ = q.shape
    group = hq // k.shape[1]
    out = np.empty_like(q)
    keys = np.arange(k.shape[0])
    for h in range(hq):
        kh = h // group
        scores = (q[:, h, :] @ k[:, kh, :].T) * scale        # (T, S)
        scores[keys[None, :] > pos[:, None]] = -np.inf
        out[:, h, :] = softmax(scores) @ v[:, kh, :]
    return out


def kv_cache_write(k, v, k_cache, v_cache, positions):
    kc, vc = f64(k_cache).copy(), f64(v_cache).copy()
    kc[np.asarray(positions)] = f64(k)
    vc[np.asarray(positions)] = f64(v)
    return kc, vc


def rope_kv_write(q, k, v, k_cache, v_cache, positions, cos, sin, style):
    kc, vc = kv_cache_write(rope(k, positions, cos, sin, style), v, k_cache, v_cache, positions)
    return rope(q, positions, cos, sin, style), kc, vc


def paged_gather(pool, block_table, length):
    """Rows 0..length-1 of one sequence's cache out of a pool (NB, BS, H, D) -> (length, H, D)."""
    bs = pool.shape[1]
    slots = np.arange(length)
    return f64(pool)[np.asarray(block_table)[slots // bs], slots % bs]


def paged_attention(q, k_pool, v_pool, query_start, context_lens, block_tables, scale):
    """Each sequence b: its query rows query_start[b]..query_start[b+1] are its last n
    positions of context_lens[b]; attention over its keys gathered by its block table."""
    q = f64(q)                                               # (T, Hq, D)
    qs, cl = np.asarray(query_start), np.asarray(context_lens)
    out = np.zeros_like(q)
    for b in range(len(cl)):
        r0, r1, length = int(qs[b]), int(qs[b + 1]), int(cl[b])
        if r1 == r0:
            continue
        k = paged_gather(k_pool, block_tables[b], length)   # (L, Hkv, D)
        v = paged_gather(v_pool, block_tables[b], length)
        pos = np.arange(length - (r1 - r0), length)
        out[r0:r1] = attention(q[r0:r1], k, v, pos, scale)
    return out


def rope_paged_kv_write(q, k, v, k_pool, v_pool, positions, slot_mapping, cos, sin, style):
    kp, vp = f64(k_pool).copy(), f64(v_pool).copy()          # (NB, BS, Hkv, D)
    bs = kp.shape[1]
    kr = rope(k, positions, cos, sin, style)
    for t, s in enumerate(np.asarray(slot_mapping)):
        if s >= 0:
            kp[s // bs, s % bs] = kr[t]
            vp[s // bs, s % bs] = f64(v)[t]
    return rope(q, positions, cos, sin, style), kp, vp


def argmax(x):
    return np.argmax(f64(x), axis=-1)


def cast(x, np_dtype):
    return f64(x).astype(np_dtype)


def _rows(value, b):
    return np.broadcast_to(np.asarray(value, np.float64), (b,))


def penalties(logits, counts, seen, repetition, presence, frequency):
    """Repetition penalty (HF/CTRL) on every seen token (prompt and output); presence and
    frequency penalties (OpenAI) from output counts. (B, V) -> (B, V); the three penalties
    are numbers or one value per row (B,)."""
    x, c, s = f64(logits), f64(counts), np.asarray(seen) != 0
    b = x.shape[0]
    rep, pres, freq = (_rows(a, b)[:, None] for a in (repetition, presence, frequency))
    x = np.where(s, np.where(x > 0, x / rep, x * rep), x)
    return x - pres * (c > 0) - freq * c


def _renorm(p):
    return p / p.sum(axis=-1, keepdims=True)


def sample_probs(logits, temperature, top_k, top_p, min_p):
    """The distribution `sample` draws from, (B, V): temperature, then top-k, then top-p
    (smallest set of most likely tokens whose mass reaches top_p), then min-p (tokens at
    least min_p x the most likely); each filter renormalises. Temperature 0: argmax.
    Each parameter is a number or one value per row."""
    x = f64(logits)
    b, v = x.shape
    if np.ndim(temperature) or np.ndim(top_k) or np.ndim(top_p) or np.ndim(min_p):
        rows = [_rows(a, b) for a in (temperature, top_k, top_p, min_p)]
        return np.concatenate([sample_probs(x[i:i + 1], rows[0][i], int(rows[1][i]), rows[2][i], rows[3][i])
                               for i in range(b)]) if b else np.zeros_like(x)
    if temperature == 0:
        p = np.zeros_like(x)
        p[np.arange(b), x.argmax(-1)] = 1.0
        return p
    p = softmax(x / temperature)
    if 0 < top_k < v:
        kth = -np.sort(-p, axis=-1)[:, top_k - 1:top_k]                 # (B, 1)
        p = _renorm(np.where(p >= kth, p, 0.0))
    if top_p < 1.0:
        order = np.argsort(-p, axis=-1, kind="stable")
        sp = np.take_along_axis(p, order, -1)
        keep_sorted = (np.cumsum(sp, -1) - sp) < top_p                  # mass before it < top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        p = _renorm(np.where(keep, p, 0.0))
    if min_p > 0.0:
        p = _renorm(np.where(p >= min_p * p.max(-1, keepdims=True), p, 0.0))
    return p


def sample(logits, uniform, temperature, top_k, top_p, min_p):
    """Inverse CDF in token-id order: the first token whose cumulative mass exceeds
    uniform[b] x total. Deterministic given the uniforms, so a seeded host RNG gives
    the same text on every run."""
    p = sample_probs(logits, temperature, top_k, top_p, min_p)
    cdf = np.cumsum(p, -1)
    target = f64(uniform)[:, None] * cdf[:, -1:]
    return np.argmax(cdf > target, axis=-1)


def all_reduce(xs):
    """Collectives are defined over the list of every rank's input (world size 1: [x]):
    the element-wise sum."""
    return np.sum([f64(x) for x in xs], axis=0)


def all_gather(xs, dim=0):
    """Every rank's input concatenated along dim, in rank order."""
    return np.concatenate([f64(x) for x in xs], axis=dim)


def decode_layer(x, attn_norm, wqkv, wo, mlp_norm, w_gate_up, w_down, k_pool, v_pool, positions,
                 slot_mapping, context_lens, block_tables, cos, sin, num_heads, bqkv=None, eps=1e-6,
                 style="half", scale=None):
    """ops.decode_layer with float weights (packed ones dequantized first; tuples of row parts
    concatenated) -> (x, k_pool, v_pool) after the layer."""
    cat = lambda w: np.concatenate([f64(p) for p in w]) if isinstance(w, (tuple, list)) else f64(w)  # noqa: E731
    b = np.asarray(x).shape[0]
    nb, bs, hkv, dh = np.asarray(k_pool).shape
    hq = num_heads
    qkv = matmul(x, cat(wqkv), bqkv, norm_weight=attn_norm, eps=eps)                   # (B, (Hq + 2 Hkv) Dh)
    q = qkv[:, :hq * dh].reshape(b, hq, dh)
    k = qkv[:, hq * dh:(hq + hkv) * dh].reshape(b, hkv, dh)
    v = qkv[:, (hq + hkv) * dh:].reshape(b, hkv, dh)
    q, kp, vp = rope_paged_kv_write(q, k, v, k_pool, v_pool, positions, slot_mapping, cos, sin, style)
    sc = scale if scale is not None else 1.0 / np.sqrt(dh)
    a = paged_attention(q, kp, vp, np.arange(b + 1), context_lens, block_tables, sc)   # (B, Hq, Dh)
    x = matmul(a.reshape(b, hq * dh), f64(wo), residual=x)
    h = matmul(x, cat(w_gate_up), norm_weight=mlp_norm, eps=eps, act="swiglu")
    return matmul(h, f64(w_down), residual=x), kp, vp
