"""One case builder per op: draws sizes, dtypes, layouts and data through a Case,
sets `case.call` to the op call, and states what the outputs must equal (the
float64 reference in hetinfer.ops.reference on the same, already rounded, inputs).

Sizes are bounded by a work budget so one example stays in the milliseconds on a
CPU. A new op in hetinfer.ops.OPS needs a builder here: a kernel for an op with
no builder fails the conformance suite."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

import hetinfer
from hetinfer import dtypes as D
from hetinfer.ops import reference as R

from .strategies import (MAX_HIDDEN, MAX_SEQ, Case, head_dim, hidden, lead_shape, packed_blocks,
                         packed_rounding_bound)

CASES: dict = {}


def builder(op):
    def deco(fn):
        CASES[op] = fn
        return fn
    return deco


def _positions(case: Case, name: str, pos: np.ndarray):
    """Positions as an i32 or i64 tensor (drawn), sometimes a Python list (ops accept both)."""
    kind = case.draw(st.sampled_from(["i32", "i64", "list"]), f"{name}.kind")
    if kind == "list":
        return [int(p) for p in pos]
    return case.input(name, pos.astype(D.dtype(kind).np), kind)


# --- embedding -----------------------------------------------------------------------
@builder("embedding")
def embedding(case: Case):
    packed = case.dtype.packed is not None
    vocab = case.draw(hidden(), "vocab")
    if packed:                       # whole blocks per row
        d = case.dtype.block * case.draw(st.integers(1, 4 if case.dtype.block == 32 else 2), "blocks")
    else:
        d = case.draw(hidden(), "dim")
    t = case.draw(st.integers(1, 64), "tokens")
    ids_dt = case.draw(st.sampled_from(["i32", "i64"]), "ids.dtype")
    ids = case.rng.integers(0, vocab, size=t)
    ids[0] = case.draw(st.sampled_from([0, vocab - 1, int(ids[0])]), "ids[0]")   # edges of the table
    table = packed_blocks(case.rng, case.dtype, vocab, d) if packed else case.normal((vocab, d), case.dtype)
    out_dt = case.other_float("out.dtype")
    ids_t = case.input("ids", ids.astype(D.dtype(ids_dt).np), ids_dt)
    table_t = case.input("table", table, case.dtype)
    out = case.output("out", (t, d), out_dt)
    case.call = lambda: hetinfer.ops.embedding(ids_t, table_t, out=out)
    if packed:                       # rows dequantized in f32 (or the out dtype): rounding only
        case.expect_close("out", out, R.embedding(ids, R.dequantize_packed(table, case.dtype)))
    else:
        case.expect_exact("out", out, R.embedding(ids, table))


# --- rms_norm ------------------------------------------------------------------------
@builder("rms_norm")
def rms_norm(case: Case):
    d = case.draw(hidden(), "dim")
    lead = case.draw(lead_shape(64), "lead")
    scale = case.draw(st.sampled_from([1.0, 0.01, 30.0]), "x.scale")
    eps = case.draw(st.sampled_from([1e-6, 1e-5]), "eps")
    w_dt = case.other_float("weight.dtype")
    out_dt = case.other_float("out.dtype")
    x = case.normal(lead + (d,), case.dtype, scale)
    w = case.normal((d,), w_dt)
    x_t, w_t = case.input("x", x), case.input("weight", w)
    out = case.output("out", x.shape, out_dt)
    case.call = lambda: hetinfer.ops.rms_norm(x_t, w_t, eps=eps, out=out)
    case.expect_close("out", out, R.rms_norm(x, w, eps))


# --- matmul --------------------------------------------------------------------------
@builder("matmul")
def matmul(case: Case):
    quant = case.dtype == D.i8
    packed = case.dtype.packed is not None
    if quant:
        group = case.draw(st.sampled_from([32, 64, 128]), "group")
        k = group * case.draw(st.integers(1, 4), "groups")
    elif packed:
        k = case.dtype.block * case.draw(st.integers(1, 4 if case.dtype.block == 32 else 2), "blocks")
    else:
        k = case.draw(hidden(), "K")
    act = case.draw(st.sampled_from([None, "swiglu"]), "act")
    n = case.draw(hidden(), "N") * (2 if act else 1)
    lead = case.draw(lead_shape(max(1, min(48, 4_000_000 // (k * n)))), "lead")
    norm = case.draw(st.booleans(), "rms_norm prologue?")
    x_dt = case.other_float("x.dtype")
    out_dt = case.other_float("out.dtype")
    x = case.normal(lead + (k,), x_dt)
    if quant:
        w = case.rng.integers(-127, 128, size=(n, k)).astype(np.int8)
        w[w == 0] = 1
        s_dt = case.other_float("scales.dtype")
        scales = (case.rng.uniform(0.002, 0.05, size=(n, k // group))).astype(s_dt.np)
        wf = R.dequantize_int8(w, scales)
    elif packed:                     # the gguf package's dequantizers are the reference
        w = packed_blocks(case.rng, case.dtype, n, k, 1.0 / np.sqrt(k))
        scales, wf = None, R.dequantize_packed(w, case.dtype)
    else:
        w = case.normal((n, k), case.dtype, 1.0 / np.sqrt(k))
        scales, wf = None, w.astype(np.float64)
    bias = None
    if case.draw(st.booleans(), "bias?"):
        bias = case.normal((n,), case.other_float("bias.dtype"))
    norm_w = None
    if norm:
        nw_dt = case.other_float("norm_weight.dtype")
        norm_w = (case.normal((k,), nw_dt, 0.5).astype(np.float64) + 1.0).astype(nw_dt.np)
    out_shape = lead + (n // 2 if act else n,)
    residual, in_place = None, False
    if case.draw(st.booleans(), "residual?"):
        in_place = case.draw(st.booleans(), "out is residual?")
        residual = case.normal(out_shape, out_dt if in_place else case.other_float("residual.dtype"))
    x_t = case.input("x", x)
    w_t = case.input("weight", w, case.dtype)
    s_t = case.input("scales", scales) if quant else None
    b_t = case.input("bias", bias) if bias is not None else None
    nw_t = case.input("norm_weight", norm_w) if norm_w is not None else None
    w_ref = wf if packed else w
    expected = R.matmul(x, w_ref, bias, scales, norm_weight=norm_w, eps=1e-5, act=act, residual=residual)
    # error scale: |pro(x)| @ |W|^T (+ |bias|), through the activation's slope (<= 1.1 for
    # silu, times |up|, plus |silu(gate)| for the up half), plus |residual|
    a = np.abs(R.rms_norm(x, norm_w, 1e-5)) if norm else np.abs(x.astype(np.float64))
    y = R.matmul(x, w_ref, bias, scales, norm_weight=norm_w, eps=1e-5) if act else None

    def through_act(m, cross=False):   # y's error bound (..., N) -> the output's (+ dgate dup)
        if not act:
            return m
        h = n // 2
        out = 1.1 * m[..., :h] * np.abs(y[..., h:]) + np.abs(R.swiglu(y[..., :h], np.ones_like(y[..., h:]))) * m[..., h:]
        return out + 1.1 * m[..., :h] * m[..., h:] if cross else out
    mag = a @ np.abs(wf).T
    if bias is not None:
        mag = mag + np.abs(bias.astype(np.float64))
    mag = through_act(mag)
    if residual is not None:
        mag = mag + np.abs(residual.astype(np.float64))
    mag = np.maximum(mag, mag.max(initial=0) * 1e-3)
    # packed weights: the kernel may round pro(x) to 8 bits per act_block values (ops.matmul)
    bound = through_act(1.01 * packed_rounding_bound(a, wf, case.dtype.packed.act_block), True) if packed else None
    kw = dict(bias=b_t, scales=s_t, norm_weight=nw_t, eps=1e-5, act=act)
    if in_place:
        r_t = case.inout("residual", residual)
        case.call = lambda: hetinfer.ops.matmul(x_t, w_t, residual=r_t, out=r_t, **kw)
        case.expect_close("residual (out=residual)", r_t, expected, mag=mag, bound=bound)
        return
    r_t = case.input("residual", residual) if residual is not None else None
    out = case.output("out", out_shape, out_dt)
    case.call = lambda: hetinfer.ops.matmul(x_t, w_t, residual=r_t, out=out, **kw)
    case.expect_close("out", out, expected, mag=mag, bound=bound)


# --- rope ----------------------------------------------------------------------------
def rope_tables(n_pos: int, d: int, theta: float):
    inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    ang = np.arange(n_pos, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


@builder("rope")
def rope(case: Case):
    d = case.draw(head_dim(), "head_dim")
    h = case.draw(st.integers(1, 8), "heads")
    t = case.draw(st.integers(1, max(1, min(MAX_SEQ, 65536 // (h * d)))), "tokens")
    style = case.draw(st.sampled_from(["half", "interleaved"]), "style")
    theta = case.draw(st.sampled_from([10000.0, 500000.0, 1e6]), "theta")
    if case.draw(st.booleans(), "contiguous positions?"):
        start = case.draw(st.integers(0, MAX_SEQ), "start")
        pos = np.arange(start, start + t)
    else:
        pos = case.rng.integers(0, MAX_SEQ, size=t)
    n_pos = int(pos.max()) + 1 + case.draw(st.integers(0, 7), "table.extra")
    cos, sin = rope_tables(n_pos, d, theta)
    x = case.normal((t, h, d), case.dtype)
    alias = case.draw(st.booleans(), "out is x?")
    pos_t = _positions(case, "positions", pos)
    cos_t, sin_t = case.input("cos", cos), case.input("sin", sin)
    expected = R.rope(x, pos, cos, sin, style)
    if alias:
        x_t = case.inout("x", x)
        case.call = lambda: hetinfer.ops.rope(x_t, pos_t, cos_t, sin_t, style=style, out=x_t)
        case.expect_close("x (out=x)", x_t, expected)
    else:
        x_t = case.input("x", x)
        out = case.output("out", x.shape, case.other_float("out.dtype"))
        case.call = lambda: hetinfer.ops.rope(x_t, pos_t, cos_t, sin_t, style=style, out=out)
        case.expect_close("out", out, expected)


# --- add, swiglu ---------------------------------------------------------------------
def _elementwise(case: Case, op: str, names, scales=(1.0, 1.0)):
    d = case.draw(hidden(), "dim")
    lead = case.draw(lead_shape(48), "lead")
    a_dt, b_dt = case.dtype, case.other_float(f"{names[1]}.dtype")
    a = case.normal(lead + (d,), a_dt, scales[0])
    b = case.normal(lead + (d,), b_dt, scales[1])
    a_t, b_t = case.input(names[0], a), case.input(names[1], b)
    out = case.output("out", a.shape, case.other_float("out.dtype"))
    fn = getattr(hetinfer.ops, op)
    case.call = lambda: fn(a_t, b_t, out=out)
    return a, b, out


@builder("add")
def add(case: Case):
    a, b, out = _elementwise(case, "add", ("a", "b"))
    mag = np.abs(a.astype(np.float64)) + np.abs(b.astype(np.float64))   # cancellation: bound by |a| + |b|
    case.expect_close("out", out, R.add(a, b), mag=mag)


@builder("swiglu")
def swiglu(case: Case):
    g_scale = case.draw(st.sampled_from([1.0, 4.0, 30.0]), "gate.scale")
    g, u, out = _elementwise(case, "swiglu", ("gate", "up"), (g_scale, 1.0))
    case.expect_close("out", out, R.swiglu(g, u))


# --- softmax -------------------------------------------------------------------------
@builder("softmax")
def softmax(case: Case):
    n = case.draw(hidden(1, 1024), "dim")
    lead = case.draw(lead_shape(max(1, 8192 // n)), "lead")
    scale = case.draw(st.sampled_from([1.0, 10.0, 40.0]), "x.scale")
    x = case.normal(lead + (n,), case.dtype, scale)
    x_t = case.input("x", x)
    out = case.output("out", x.shape, case.other_float("out.dtype"))
    case.call = lambda: hetinfer.ops.softmax(x_t, out=out)
    case.expect_close("out", out, R.softmax(x))


# --- attention -----------------------------------------------------------------------
ATTN_BUDGET = 1 << 21     # bound on T * S * Hq * D per example


@builder("attention")
def attention(case: Case):
    hkv = case.draw(st.integers(1, 4), "kv_heads")
    group = case.draw(st.integers(1, 8), "gqa_ratio")
    hq = hkv * group
    d = case.draw(head_dim(), "head_dim")
    per_tok = hq * d
    if case.draw(st.sampled_from(["prefill", "decode"]), "mode") == "decode":
        t = 1
        s_max = max(1, min(2 * MAX_SEQ, ATTN_BUDGET // per_tok))
        pos_hi = case.draw(st.integers(0, s_max - 1), "position")
        pos = np.array([pos_hi])
    else:
        t = case.draw(st.integers(1, max(1, min(MAX_SEQ, int(np.sqrt(ATTN_BUDGET // per_tok))))), "tokens")
        start = case.draw(st.integers(0, max(0, min(MAX_SEQ, ATTN_BUDGET // (per_tok * t) - t))), "start")
        pos = np.arange(start, start + t)
    s = int(pos.max()) + 1 + case.draw(st.integers(0, 8), "cache.extra_rows")
    scale = case.draw(st.one_of(st.none(), st.floats(0.01, 1.0)), "scale")
    q = case.normal((t, hq, d), case.dtype)
    k = case.normal((s, hkv, d), case.dtype)
    v = case.normal((s, hkv, d), case.dtype)
    pos_t = _positions(case, "positions", pos)
    q_t, k_t, v_t = case.input("q", q), case.input("k_cache", k), case.input("v_cache", v)
    out = case.output("out", q.shape, case.other_float("out.dtype"))
    case.call = lambda: hetinfer.ops.attention(q_t, k_t, v_t, pos_t, scale=scale, out=out)
    sc = scale if scale is not None else 1.0 / np.sqrt(d)
    case.expect_close("out", out, R.attention(q, k, v, pos, sc))


# --- kv_cache_write ------------------------------------------------------------------
def _cache_write_shape(case: Case):
    """(kv heads, head dim, cache rows, tokens, positions): distinct cache rows to write."""
    hkv = case.draw(st.integers(1, 8), "kv_heads")
    d = case.draw(head_dim(), "head_dim")
    s = case.draw(st.integers(1, max(1, min(MAX_SEQ, 65536 // (hkv * d)))), "cache_rows")
    t = case.draw(st.integers(1, min(s, 64)), "tokens")
    if case.draw(st.booleans(), "contiguous positions?"):
        start = case.draw(st.integers(0, s - t), "start")
        pos = np.arange(start, start + t)
    else:
        pos = case.rng.permutation(s)[:t]                     # distinct rows, any order
    return hkv, d, s, t, pos


@builder("kv_cache_write")
def kv_cache_write(case: Case):
    hkv, d, s, t, pos = _cache_write_shape(case)
    k = case.normal((t, hkv, d), case.other_float("k.dtype"))
    v = case.normal((t, hkv, d), case.other_float("v.dtype"))
    kc = case.normal((s, hkv, d), case.dtype)
    vc = case.normal((s, hkv, d), case.dtype)
    pos_t = _positions(case, "positions", pos)
    k_t, v_t = case.input("k", k), case.input("v", v)
    kc_t, vc_t = case.inout("k_cache", kc), case.inout("v_cache", vc)
    case.call = lambda: hetinfer.ops.kv_cache_write(k_t, v_t, kc_t, vc_t, pos_t)
    ek, ev = R.kv_cache_write(k, v, kc, vc, pos)
    case.expect_exact("k_cache", kc_t, ek)
    case.expect_exact("v_cache", vc_t, ev)


# --- rope_kv_write -------------------------------------------------------------------
@builder("rope_kv_write")
def rope_kv_write(case: Case):
    hkv, d, s, t, pos = _cache_write_shape(case)
    hq = hkv * case.draw(st.integers(1, 4), "gqa_ratio")
    style = case.draw(st.sampled_from(["half", "interleaved"]), "style")
    cos, sin = rope_tables(s + case.draw(st.integers(0, 7), "table.extra"), d, 10000.0)
    q = case.normal((t, hq, d), case.dtype)
    k = case.normal((t, hkv, d), case.other_float("k.dtype"))
    v = case.normal((t, hkv, d), case.other_float("v.dtype"))
    kc = case.normal((s, hkv, d), case.dtype)
    vc = case.normal((s, hkv, d), case.dtype)
    pos_t = _positions(case, "positions", pos)
    q_t = case.inout("q", q)
    k_t, v_t = case.input("k", k), case.input("v", v)
    cos_t, sin_t = case.input("cos", cos), case.input("sin", sin)
    kc_t, vc_t = case.inout("k_cache", kc), case.inout("v_cache", vc)
    case.call = lambda: hetinfer.ops.rope_kv_write(q_t, k_t, v_t, kc_t, vc_t, pos_t, cos_t, sin_t, style)
    eq, ek, ev = R.rope_kv_write(q, k, v, kc, vc, pos, cos, sin, style)
    case.expect_close("q (rotated in place)", q_t, eq)
    case.expect_close("k_cache", kc_t, ek)
    case.expect_exact("v_cache", vc_t, ev)


# --- paged_attention -----------------------------------------------------------------
PAGED_MAX_LEN = 2048


def _block_tables(case: Case, lengths, bs: int, share: bool):
    """Random non-contiguous block tables for sequences of these lengths: distinct blocks in
    a shuffled pool, sequence i > 0 sometimes starting with sequence 0's blocks (a shared
    prefix); every unused entry and one spare block point at a block no sequence owns."""
    need = [-(-n // bs) for n in lengths]
    shared = [0] * len(lengths)
    if share:
        for i in range(1, len(lengths)):
            shared[i] = case.draw(st.integers(0, min(need[0], need[i])), f"shared_blocks[{i}]")
    nb = need[0] + sum(n - s for n, s in zip(need[1:], shared[1:])) + 1 + case.draw(st.integers(0, 3), "spare")
    ids = case.rng.permutation(nb)
    spare, ids = int(ids[0]), iter(ids[1:].tolist())
    mb = max(need) + case.draw(st.integers(0, 2), "table.extra")
    table = np.full((len(lengths), mb), spare, np.int32)
    for i, n in enumerate(need):
        for j in range(n):
            table[i, j] = table[0, j] if j < shared[i] else next(ids)
    return nb, table


def _pool(case: Case, nb, bs, hkv, d, table, lengths, dtype=None):
    """A pool with random values in every slot some sequence uses, NaN (poison) elsewhere:
    a kernel reading past a sequence's length gets NaN into its output."""
    dtype = dtype or case.dtype
    pool = np.full((nb, bs, hkv, d), np.nan, np.float64)
    for row, n in zip(table, lengths):
        slots = np.arange(n)
        pool[row[slots // bs], slots % bs] = case.normal((n, hkv, d), dtype)
    return pool.astype(dtype.np)


@builder("paged_attention")
def paged_attention(case: Case):
    hkv = case.draw(st.integers(1, 4), "kv_heads")
    hq = hkv * case.draw(st.integers(1, 8), "gqa_ratio")
    d = case.draw(head_dim(), "head_dim")
    bs = case.draw(st.sampled_from([1, 2, 8, 16, 32]), "block_size")
    b = case.draw(st.integers(1, 6), "sequences")
    per_seq = max(1, ATTN_BUDGET // (hq * d * b))
    lengths, rows = [], []
    for i in range(b):
        decode = case.draw(st.booleans(), f"seq[{i}].decode?")
        n = 1 if decode else case.draw(st.integers(1, 48), f"seq[{i}].query_rows")
        top = max(n, min(PAGED_MAX_LEN, per_seq // n))
        lengths.append(case.draw(st.integers(n, top), f"seq[{i}].context_len"))
        rows.append(n)
    nb, table = _block_tables(case, lengths, bs, case.draw(st.booleans(), "shared prefix?"))
    qs = np.concatenate([[0], np.cumsum(rows)]).astype(np.int32)
    t = int(qs[-1])
    scale = case.draw(st.one_of(st.none(), st.floats(0.01, 1.0)), "scale")
    q = case.normal((t, hq, d), case.dtype)
    kp = _pool(case, nb, bs, hkv, d, table, lengths)
    vp = _pool(case, nb, bs, hkv, d, table, lengths)
    cl = np.asarray(lengths, np.int32)
    q_t, kp_t, vp_t = case.input("q", q), case.input("k_pool", kp), case.input("v_pool", vp)
    qs_t = case.input("query_start", qs, "i32", layout=False)
    cl_t = case.input("context_lens", cl, "i32", layout=False)
    bt_t = case.input("block_tables", table, "i32", layout=False)
    out = case.output("out", q.shape, case.other_float("out.dtype"))
    case.call = lambda: hetinfer.ops.paged_attention(q_t, kp_t, vp_t, qs_t, cl_t, bt_t, scale=scale, out=out)
    sc = scale if scale is not None else 1.0 / np.sqrt(d)
    case.expect_close("out", out, R.paged_attention(q, kp, vp, qs, cl, table, sc))


# --- rope_paged_kv_write -------------------------------------------------------------
@builder("rope_paged_kv_write")
def rope_paged_kv_write(case: Case):
    hkv = case.draw(st.integers(1, 8), "kv_heads")
    d = case.draw(head_dim(), "head_dim")
    hq = hkv * case.draw(st.integers(1, 4), "gqa_ratio")
    bs = case.draw(st.sampled_from([1, 4, 16]), "block_size")
    nb = case.draw(st.integers(1, max(1, min(64, 65536 // (hkv * d * bs)))), "blocks")
    t = case.draw(st.integers(1, min(nb * bs, 64)), "tokens")
    slots = case.rng.permutation(nb * bs)[:t].astype(np.int32)       # distinct slots, any order
    slots[case.rng.random(t) < case.draw(st.sampled_from([0.0, 0.3]), "padding share")] = -1
    style = case.draw(st.sampled_from(["half", "interleaved"]), "style")
    n_pos = case.draw(st.integers(1, MAX_SEQ), "table.positions")
    cos, sin = rope_tables(n_pos, d, 10000.0)
    pos = case.rng.integers(0, n_pos, size=t)
    q = case.normal((t, hq, d), case.dtype)
    k = case.normal((t, hkv, d), case.other_float("k.dtype"))
    v = case.normal((t, hkv, d), case.other_float("v.dtype"))
    kp = case.normal((nb, bs, hkv, d), case.dtype)
    vp = case.normal((nb, bs, hkv, d), case.dtype)
    pos_t = _positions(case, "positions", pos)
    slot_t = case.input("slot_mapping", slots, "i32", layout=False)
    q_t = case.inout("q", q)
    k_t, v_t = case.input("k", k), case.input("v", v)
    cos_t, sin_t = case.input("cos", cos), case.input("sin", sin)
    kp_t, vp_t = case.inout("k_pool", kp), case.inout("v_pool", vp)
    case.call = lambda: hetinfer.ops.rope_paged_kv_write(q_t, k_t, v_t, kp_t, vp_t, pos_t, slot_t,
                                                         cos_t, sin_t, style)
    eq, ek, ev = R.rope_paged_kv_write(q, k, v, kp, vp, pos, slots, cos, sin, style)
    case.expect_close("q (rotated in place)", q_t, eq)
    case.expect_close("k_pool", kp_t, ek)
    case.expect_exact("v_pool", vp_t, ev)


# --- decode_layer --------------------------------------------------------------------
@builder("decode_layer")
def decode_layer(case: Case):
    """A small decoder layer (its weights of the key dtype; v sometimes q8_0, q/k/v and
    gate/up sometimes separate parts) over B decode rows of random paged caches."""
    blk = case.dtype.block if case.dtype.packed is not None else 32
    if blk == 32:
        dh = case.draw(st.sampled_from([16, 32, 64]), "head_dim")
        hkv, g = case.draw(st.integers(1, 3), "kv_heads"), case.draw(st.integers(1, 3), "gqa_ratio")
        if (hkv * g * dh) % 32:
            g *= 2
    else:
        dh, hkv = 64, case.draw(st.sampled_from([1, 2, 4]), "kv_heads")
        g = case.draw(st.sampled_from([1, 2]), "gqa_ratio") * (4 // hkv)
    hq = hkv * g
    d = blk * case.draw(st.integers(1, 3 if blk == 32 else 2), "D blocks")
    f = blk * case.draw(st.integers(1, 3 if blk == 32 else 2), "F blocks")
    b = case.draw(st.integers(1, 4), "rows")
    bs = case.draw(st.sampled_from([1, 4, 16]), "block_size")
    lengths = [case.draw(st.integers(1, 40), f"seq[{i}].context_len") for i in range(b)]
    nb, table = _block_tables(case, lengths, bs, False)
    slots = np.array([table[i, (n - 1) // bs] * bs + (n - 1) % bs for i, n in enumerate(lengths)], np.int32)
    style = case.draw(st.sampled_from(["half", "interleaved"]), "style")
    scale = case.draw(st.sampled_from([None, 0.5]), "scale")       # 0.5: peaked attention weights
    n_pos = max(lengths) + case.draw(st.integers(0, 8), "table.extra")
    cos, sin = rope_tables(n_pos, dh, 10000.0)
    split_qkv = case.draw(st.booleans(), "q, k, v as parts?")
    v_q8 = split_qkv and case.draw(st.booleans(), "v in q8_0?")
    split_gu = case.draw(st.booleans(), "gate, up as parts?")

    def weight(name, n, k, dt=case.dtype):
        if dt.packed is not None:
            w = packed_blocks(case.rng, dt, n, k, 1.0 / np.sqrt(k))
            return case.input(name, w, dt), R.dequantize_packed(w, dt)
        w = case.normal((n, k), dt, 1.0 / np.sqrt(k))
        return case.input(name, w, dt), w.astype(np.float64)
    rows = (hq * dh, hkv * dh, hkv * dh)
    if split_qkv:
        parts = [weight(f"w{n}", r, d, D.q8_0 if (n == "v" and v_q8) else case.dtype) for n, r in zip("qkv", rows)]
    else:
        parts = [weight("wqkv", sum(rows), d)]
    wqkv_t, wqkv = tuple(p[0] for p in parts), tuple(p[1] for p in parts)
    gparts = [weight(n, f, d) for n in ("w_gate", "w_up")] if split_gu else [weight("w_gate_up", 2 * f, d)]
    wgu_t, wgu = tuple(p[0] for p in gparts), tuple(p[1] for p in gparts)
    wo_t, wo = weight("wo", d, hq * dh)
    wd_t, wd = weight("w_down", d, f)
    norms = [(case.normal((d,), D.f32, 0.3).astype(np.float64) + 1.0).astype(np.float32) for _ in range(2)]
    bqkv = case.normal((sum(rows),), D.f32, 0.3) if case.draw(st.booleans(), "bqkv?") else None
    x = case.normal((b, d), D.f32)
    kp = _pool(case, nb, bs, hkv, dh, table, lengths, D.f32)
    vp = _pool(case, nb, bs, hkv, dh, table, lengths, D.f32)
    pos = np.array([n - 1 for n in lengths], np.int32)
    x_t, kp_t, vp_t = case.inout("x", x), case.inout("k_pool", kp), case.inout("v_pool", vp)
    an_t, mn_t = case.input("attn_norm", norms[0]), case.input("mlp_norm", norms[1])
    b_t = case.input("bqkv", bqkv) if bqkv is not None else None
    pos_t = case.input("positions", pos, "i32", layout=False)
    sl_t = case.input("slot_mapping", slots, "i32", layout=False)
    cl_t = case.input("context_lens", np.asarray(lengths, np.int32), "i32", layout=False)
    bt_t = case.input("block_tables", table, "i32", layout=False)
    cos_t, sin_t = case.input("cos", cos), case.input("sin", sin)
    case.call = lambda: hetinfer.ops.decode_layer(
        x_t, an_t, wqkv_t if split_qkv else wqkv_t[0], wo_t, mn_t, wgu_t if split_gu else wgu_t[0], wd_t, kp_t, vp_t,
        pos_t, sl_t, cl_t, bt_t, cos_t, sin_t, num_heads=hq, bqkv=b_t, eps=1e-5, style=style, scale=scale)
    ex, ek, ev = R.decode_layer(x, norms[0], wqkv, wo, norms[1], wgu, wd, kp, vp, pos, slots, lengths, table,
                                cos, sin, hq, bqkv=bqkv, eps=1e-5, style=style, scale=scale)
    # packed weights round each product's input to 8 bits per block (matmul's contract): a few
    # 1/254 relative errors compounded through the layer, allowed as a bound proportional to
    # the magnitudes |input| @ |W|^T of the layer's products (cancellation makes outputs small)
    loose = 0.0 if case.dtype.packed is None and not v_q8 else 0.03
    xf = x.astype(np.float64)
    att = np.abs(R.paged_attention(np.zeros((b, hq, dh)), ek, ev, np.arange(b + 1), lengths, table, 1.0)
                 ) + np.nanmax(np.abs(ev))                                       # >= |attention rows|
    x1 = xf + (ex - xf)                                                          # the stream after the layer
    rowmax = lambda a: np.broadcast_to(np.abs(a).max(-1, keepdims=True), a.shape)  # noqa: E731
    # the 8-bit rounding moves each value by up to its row's max / 254 (packed_rounding_bound)
    hmag = rowmax(R.rms_norm(x1, norms[1], 1e-5)) @ np.abs(np.concatenate(wgu)).T  # |gate|, |up| scale
    act = (1.1 * hmag[:, :f] + np.abs(hmag[:, :f])) * hmag[:, f:]
    mag_x = np.abs(xf) + rowmax(att.reshape(b, -1)) @ np.abs(wo).T + rowmax(act) @ np.abs(wd).T
    mag_x = np.maximum(mag_x, mag_x.max() * 1e-3)
    case.expect_close("x (in place)", x_t, ex, mag=mag_x, bound=loose * mag_x)
    live = np.zeros(kp.shape[:2], bool)
    live[slots // bs, slots % bs] = True
    for name, t, want, pool in (("k_pool", kp_t, ek, kp), ("v_pool", vp_t, ev, vp)):
        m = np.where(np.isnan(want), 0.0, np.abs(want))
        m = np.maximum(m, np.nanmax(m[live]) if live.any() else 1.0)
        case.expect_close(name, t, want, mag=m, bound=loose * m)


# --- argmax --------------------------------------------------------------------------
@builder("argmax")
def argmax(case: Case):
    n = case.draw(hidden(1, 2048), "dim")
    lead = case.draw(st.sampled_from([(), (1,), (2,), (5,), (8,)]), "lead")
    x = case.normal(lead + (n,), case.dtype, case.draw(st.sampled_from([1.0, 100.0]), "x.scale"))
    rows = x.reshape(-1, n)
    for r in range(rows.shape[0]):                            # plant ties with the row maximum
        ties = case.draw(st.integers(0, 3), f"ties[{r}]")
        at = case.rng.integers(0, n, size=ties)
        rows[r, at] = rows[r].max()
    x_t = case.input("x", x)
    out = case.output("out", lead, "i32")
    case.call = lambda: hetinfer.ops.argmax(x_t, out=out)
    case.expect_exact("out", out, R.argmax(x).astype(np.int32))


# --- cast ----------------------------------------------------------------------------
@builder("cast")
def cast(case: Case):
    d = case.draw(hidden(), "dim")
    lead = case.draw(lead_shape(48), "lead")
    scale = case.draw(st.sampled_from([1.0, 1e-3, 100.0]), "x.scale")
    x = case.normal(lead + (d,), case.dtype, scale)
    x_t = case.input("x", x)
    outs = []
    for dt in D.FLOATS:                                     # to every float dtype
        o = case.output(f"out[{dt}]", x.shape, dt)
        outs.append(o)
        case.expect_exact(f"out[{dt}]", o, R.cast(x, dt.np))

    def call():
        for o in outs:
            hetinfer.ops.cast(x_t, out=o)
    case.call = call


# --- penalties -----------------------------------------------------------------------
def _row_params(case: Case, name: str, choices, b: int, dtype: str):
    """One value for every row (a number), or one per row (a (B,) tensor), drawn."""
    if case.draw(st.booleans(), f"{name} per row?"):
        vals = np.asarray([case.draw(st.sampled_from(choices), f"{name}[{r}]") for r in range(b)])
        return case.input(name, vals.astype(D.dtype(dtype).np), dtype, layout=False), vals
    v = case.draw(st.sampled_from(choices), name)
    return v, np.full(b, v)


@builder("penalties")
def penalties(case: Case):
    v = case.draw(hidden(1, 2048), "vocab")
    b = case.draw(st.integers(1, 4), "batch")
    rep_arg, rep = _row_params(case, "repetition", [1.0, 1.1, 1.3, 0.8], b, "f32")
    pres_arg, pres = _row_params(case, "presence", [0.0, 0.5, -0.25], b, "f32")
    freq_arg, freq = _row_params(case, "frequency", [0.0, 0.2], b, "f32")
    logits = case.normal((b, v), case.dtype, case.draw(st.sampled_from([1.0, 5.0]), "logits.scale"))
    counts = case.rng.integers(0, 4, size=(b, v)).astype(np.int32) * (case.rng.random((b, v)) < 0.2)
    seen = ((counts > 0) | (case.rng.random((b, v)) < 0.1)).astype(np.int32) * \
        case.rng.choice(np.array([1, 2, -1], np.int32), size=(b, v))          # "nonzero" means seen
    counts_t = case.input("counts", counts.astype(np.int32), "i32")
    seen_t = case.input("seen", seen, "i32")
    f32 = np.float32
    expected = R.penalties(logits, counts, seen, rep.astype(f32), pres.astype(f32), freq.astype(f32))
    kw = dict(repetition=rep_arg, presence=pres_arg, frequency=freq_arg)
    if case.draw(st.booleans(), "out is logits?"):
        l_t = case.inout("logits", logits)
        case.call = lambda: hetinfer.ops.penalties(l_t, counts_t, seen_t, out=l_t, **kw)
        case.expect_close("logits (out=logits)", l_t, expected)
    else:
        l_t = case.input("logits", logits)
        out = case.output("out", (b, v), case.other_float("out.dtype"))
        case.call = lambda: hetinfer.ops.penalties(l_t, counts_t, seen_t, out=out, **kw)
        case.expect_close("out", out, expected)


# --- sample --------------------------------------------------------------------------
SAMPLE_SLACK = 1e-4   # a kernel may round its softmax / cumulative sums: thresholds and the
                      # uniform number are accepted within this much of the reference's


def sample_candidates(logits, uniform, temperature, top_k, top_p, min_p, slack=SAMPLE_SLACK):
    """For each row, the tokens reference.sample gives with uniform, top_p and min_p moved
    by up to `slack` (so tokens at a rounding boundary are accepted either way). The
    parameters are numbers or one value per row."""
    b = logits.shape[0]
    rows = [np.broadcast_to(np.asarray(a, np.float64), (b,)) for a in (temperature, top_k, top_p, min_p)]
    ok = [set() for _ in range(b)]
    for r in range(b):
        t, k, tp, mp = float(rows[0][r]), int(rows[1][r]), float(rows[2][r]), float(rows[3][r])
        u = float(uniform[r])
        us = [u, max(u - slack, 0.0), min(u + slack, 1 - 1e-12)]
        tps = [tp] + ([tp - slack, min(1.0, tp + slack)] if tp < 1.0 else [])
        mps = [mp] + ([mp * (1 - slack * 10), mp * (1 + slack * 10)] if mp > 0 else [])
        for uu in us:
            for tpp in tps:
                for mpp in mps:
                    ok[r].add(int(R.sample(logits[r:r + 1], np.array([uu]), t, k, tpp, mpp)[0]))
    return ok


@builder("sample")
def sample(case: Case):
    v = case.draw(hidden(1, 2048), "vocab")
    b = case.draw(st.integers(1, 4), "batch")
    t_arg, temperature = _row_params(case, "temperature", [0.0, 0.7, 1.0, 1.5], b, "f32")
    k_arg, top_k = _row_params(case, "top_k", [0, 1, 5, 40, v], b, "i32")
    p_arg, top_p = _row_params(case, "top_p", [1.0, 0.95, 0.5], b, "f32")
    m_arg, min_p = _row_params(case, "min_p", [0.0, 0.05, 0.3], b, "f32")
    logits = case.normal((b, v), case.dtype, case.draw(st.sampled_from([1.0, 3.0]), "logits.scale"))
    row_max = logits.max(axis=-1)
    for r in range(b):
        if temperature[r] == 0:                                # greedy: plant ties, first one wins
            logits[r, case.rng.integers(0, v, size=2)] = row_max[r]
    uniform = case.rng.random(b).astype(np.float32)
    l_t = case.input("logits", logits)
    u_t = case.input("uniform", uniform, "f32")
    out = case.output("out", (b,), "i32")
    case.call = lambda: hetinfer.ops.sample(l_t, u_t, temperature=t_arg, top_k=k_arg, top_p=p_arg,
                                            min_p=m_arg, out=out)
    f32 = np.float32
    case.expect_member("out", out, sample_candidates(logits, uniform.astype(np.float64),
                                                     temperature.astype(f32), top_k, top_p.astype(f32),
                                                     min_p.astype(f32)))


__all__ = ["CASES", "builder", "MAX_HIDDEN"]


# --- collectives (at the current world size: 1 in the conformance suite) ----------------
def _world():
    from hetinfer import distributed
    return distributed.group()


@builder("all_reduce")
def all_reduce(case: Case):
    d = case.draw(hidden(), "dim")
    lead = case.draw(lead_shape(16), "lead")
    x = case.normal(lead + (d,), case.dtype)
    x_t = case.input("x", x)
    out = case.output("out", x.shape, case.dtype)
    g = _world()
    if g.world_size != 1:       # the multi-process test (tests/test_tensor_parallel.py) checks N ranks
        raise AssertionError("the all_reduce conformance case runs at world size 1")
    case.call = lambda: hetinfer.ops.all_reduce(x_t, out=out)
    case.expect_exact("out", out, R.all_reduce([x]))


@builder("all_gather")
def all_gather(case: Case):
    d = case.draw(hidden(), "dim")
    lead = case.draw(lead_shape(16), "lead")
    x = case.normal(lead + (d,), case.dtype)
    dim = case.draw(st.integers(-x.ndim, x.ndim - 1), "gather dim")
    x_t = case.input("x", x)
    out = case.output("out", x.shape, case.dtype)
    if _world().world_size != 1:
        raise AssertionError("the all_gather conformance case runs at world size 1")
    case.call = lambda: hetinfer.ops.all_gather(x_t, dim=dim, out=out)
    case.expect_exact("out", out, R.all_gather([x], dim))
