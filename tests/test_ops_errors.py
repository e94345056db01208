"""Bad arguments to every op give one clear hetinfer error naming the op and what
was expected: wrong shapes, wrong dtypes, tensors on different devices, non-tensors."""

from __future__ import annotations

import numpy as np
import pytest

import hetinfer
from hetinfer import DeviceError, DTypeError, HetinferError, ShapeError, ops


def T(shape, dtype="f32", device="cpu", fill=None):
    """A tensor of the shape with small non-zero values (ids and positions: zeros)."""
    dt = hetinfer.dtype(dtype)
    if shape == ():                         # hetinfer.tensor() of a 0-d array makes shape (1,) (see test_tensor)
        t = hetinfer.empty((), dt, device)
        return t.fill_(1.0 if fill is None else fill)
    if fill is not None:
        a = np.full(shape, fill)
    elif dt.is_float:
        a = np.linspace(0.5, 1.5, int(np.prod(shape))).reshape(shape)
    else:
        a = np.zeros(shape)
    return hetinfer.tensor(a, dt, device)


def ids(n, device="cpu", dtype="i32"):
    return T((n,), dtype, device)


def rope_args(t=2, h=3, d=8, p=16, device="cpu"):
    return dict(x=T((t, h, d), device=device), positions=ids(t, device), cos=T((p, d // 2), device=device),
                sin=T((p, d // 2), device=device))


def attn_args(t=2, hq=4, hkv=2, d=8, s=6, device="cpu"):
    return dict(q=T((t, hq, d), device=device), k_cache=T((s, hkv, d), device=device),
                v_cache=T((s, hkv, d), device=device), positions=ids(t, device))


def kv_args(t=2, hkv=2, d=8, s=6, device="cpu"):
    return dict(k=T((t, hkv, d), device=device), v=T((t, hkv, d), device=device),
                k_cache=T((s, hkv, d), device=device), v_cache=T((s, hkv, d), device=device),
                positions=ids(t, device))


def with_(base, **changes):
    kw = dict(base)
    kw.update(changes)
    return kw


# (id, call, error class, regex the message must match)
SHAPE_AND_DTYPE_CASES = [
    # embedding
    ("embedding/ids-float", lambda: ops.embedding(T((3,)), T((10, 4))), DTypeError,
     r"^embedding: ids has dtype f32; expected one of i32, i64"),
    ("embedding/ids-2d", lambda: ops.embedding(T((2, 2), "i32"), T((10, 4))), ShapeError,
     r"^embedding: ids has shape \(2, 2\) \(2-D\); expected 1-D"),
    ("embedding/table-int", lambda: ops.embedding(ids(3), T((10, 4), "i32")), DTypeError,
     r"^embedding: table has dtype i32; expected one of f32, f16, bf16"),
    ("embedding/table-1d", lambda: ops.embedding(ids(3), T((10,))), ShapeError,
     r"^embedding: table has shape \(10,\) \(1-D\); expected 2-D"),
    ("embedding/out-shape", lambda: ops.embedding(ids(3), T((10, 4)), out=T((3, 5))), ShapeError,
     r"^embedding: out has shape \(3, 5\); expected \(3, 4\)"),
    ("embedding/out-dtype", lambda: ops.embedding(ids(3), T((10, 4)), out=T((3, 4), "i32")), DTypeError,
     r"^embedding: out has dtype i32; expected one of f32, f16, bf16"),
    ("embedding/id-range", lambda: ops.embedding(T((2,), "i64", fill=10), T((10, 4))), ShapeError,
     r"^embedding: token id out of range \[0, 10\)"),
    ("embedding/id-negative", lambda: ops.embedding(T((2,), "i32", fill=-1), T((10, 4))), ShapeError,
     r"^embedding: token id out of range \[0, 10\)"),
    # rms_norm
    ("rms_norm/weight-len", lambda: ops.rms_norm(T((2, 4)), T((5,))), ShapeError,
     r"^rms_norm: weight has shape \(5,\); expected \(4,\)"),
    ("rms_norm/weight-2d", lambda: ops.rms_norm(T((2, 4)), T((1, 4))), ShapeError,
     r"^rms_norm: weight has shape \(1, 4\) \(2-D\); expected 1-D"),
    ("rms_norm/x-int", lambda: ops.rms_norm(T((2, 4), "i32"), T((4,))), DTypeError,
     r"^rms_norm: x has dtype i32; expected one of f32, f16, bf16"),
    ("rms_norm/weight-int", lambda: ops.rms_norm(T((2, 4)), T((4,), "i8")), DTypeError,
     r"^rms_norm: weight has dtype i8; expected one of f32, f16, bf16"),
    ("rms_norm/x-0d", lambda: ops.rms_norm(T(()), T((1,))), ShapeError,
     r"^rms_norm: x must have at least one axis"),
    ("rms_norm/out-shape", lambda: ops.rms_norm(T((2, 4)), T((4,)), out=T((4, 2))), ShapeError,
     r"^rms_norm: out has shape \(4, 2\); expected \(2, 4\)"),
    # matmul
    ("matmul/k-mismatch", lambda: ops.matmul(T((2, 3)), T((4, 5))), ShapeError,
     r"^matmul: x has shape \(2, 3\) and weight \(4, 5\); expected x of shape \(\.\.\., 5\)"),
    ("matmul/weight-1d", lambda: ops.matmul(T((2, 3)), T((3,))), ShapeError,
     r"^matmul: weight has shape \(3,\) \(1-D\); expected 2-D"),
    ("matmul/weight-i32", lambda: ops.matmul(T((2, 3)), T((4, 3), "i32")), DTypeError,
     r"^matmul: weight has dtype i32; expected one of f32, f16, bf16, i8"),
    ("matmul/x-int", lambda: ops.matmul(T((2, 3), "i8"), T((4, 3))), DTypeError,
     r"^matmul: x has dtype i8; expected one of f32, f16, bf16"),
    ("matmul/bias-shape", lambda: ops.matmul(T((2, 3)), T((4, 3)), bias=T((3,))), ShapeError,
     r"^matmul: bias has shape \(3,\); expected \(4,\)"),
    ("matmul/bias-dtype", lambda: ops.matmul(T((2, 3)), T((4, 3)), bias=T((4,), "i32")), DTypeError,
     r"^matmul: bias has dtype i32; expected one of f32, f16, bf16"),
    ("matmul/i8-no-scales", lambda: ops.matmul(T((2, 64)), T((4, 64), "i8")), DTypeError,
     r"^matmul: an i8 weight needs scales of shape \(N, K // group\)"),
    ("matmul/scales-shape", lambda: ops.matmul(T((2, 64)), T((4, 64), "i8"), scales=T((4, 3))), ShapeError,
     r"^matmul: scales has shape \(4, 3\); expected \(4, K // group\) with a group size dividing K=64"),
    ("matmul/scales-rows", lambda: ops.matmul(T((2, 64)), T((4, 64), "i8"), scales=T((3, 2))), ShapeError,
     r"^matmul: scales has shape \(3, 2\); expected \(4, K // group\)"),
    ("matmul/scales-int", lambda: ops.matmul(T((2, 64)), T((4, 64), "i8"), scales=T((4, 2), "i32")), DTypeError,
     r"^matmul: scales has dtype i32; expected one of f32, f16, bf16"),
    ("matmul/scales-for-float", lambda: ops.matmul(T((2, 3)), T((4, 3)), scales=T((4, 1))), DTypeError,
     r"^matmul: scales given for a f32 weight; only i8 weights take scales"),
    ("matmul/act-unknown", lambda: ops.matmul(T((2, 3)), T((4, 3)), act="gelu"), ShapeError,
     r"^matmul: act must be None or 'swiglu', got 'gelu'"),
    ("matmul/swiglu-odd-rows", lambda: ops.matmul(T((2, 3)), T((5, 3)), act="swiglu"), ShapeError,
     r"^matmul: act='swiglu' needs an even number of weight rows \[gate \| up\], got 5"),
    ("matmul/norm-weight-shape", lambda: ops.matmul(T((2, 3)), T((4, 3)), norm_weight=T((4,))), ShapeError,
     r"^matmul: norm_weight has shape \(4,\); expected \(3,\)"),
    ("matmul/residual-shape", lambda: ops.matmul(T((2, 3)), T((4, 3)), act="swiglu", residual=T((2, 4))),
     ShapeError, r"^matmul: residual has shape \(2, 4\); expected \(2, 2\)"),
    ("rope_kv_write/q-dim", lambda: ops.rope_kv_write(T((2, 4, 6)), cos=T((8, 4)), sin=T((8, 4)), **kv_args()),
     ShapeError, r"^rope_kv_write: q has shape \(2, 4, 6\); expected \(2, 4, 8\)"),
    ("rope_kv_write/beyond-cache", lambda: ops.rope_kv_write(T((2, 4, 8)), cos=T((8, 4)), sin=T((8, 4)),
                                                             **with_(kv_args(), positions=[3, 6])),
     ShapeError, r"^rope_kv_write: position 6 is beyond the rope table \(8 positions\) or the cache \(6 rows\)"),
    ("rope_kv_write/style", lambda: ops.rope_kv_write(T((2, 4, 8)), cos=T((8, 4)), sin=T((8, 4)), style="x",
                                                      **kv_args()),
     ShapeError, r"^rope_kv_write: style must be 'half' or 'interleaved', got 'x'"),
    ("matmul/out-shape", lambda: ops.matmul(T((2, 3)), T((4, 3)), out=T((2, 3))), ShapeError,
     r"^matmul: out has shape \(2, 3\); expected \(2, 4\)"),
    # rope
    ("rope/style", lambda: ops.rope(**rope_args(), style="neox"), HetinferError,
     r"^rope: style must be 'half' or 'interleaved', got 'neox'"),
    ("rope/x-2d", lambda: ops.rope(**with_(rope_args(), x=T((2, 8)))), ShapeError,
     r"^rope: x has shape \(2, 8\) \(2-D\); expected 3-D"),
    ("rope/odd-dim", lambda: ops.rope(**with_(rope_args(), x=T((2, 3, 7)))), ShapeError,
     r"^rope: head dim 7 must be even"),
    ("rope/x-int", lambda: ops.rope(**with_(rope_args(), x=T((2, 3, 8), "i32"))), DTypeError,
     r"^rope: x has dtype i32; expected one of f32, f16, bf16"),
    ("rope/positions-len", lambda: ops.rope(**with_(rope_args(), positions=ids(3))), ShapeError,
     r"^rope: positions has shape \(3,\); expected \(2,\)"),
    ("rope/positions-float", lambda: ops.rope(**with_(rope_args(), positions=T((2,)))), DTypeError,
     r"^rope: positions has dtype f32; expected one of i32, i64"),
    ("rope/cos-width", lambda: ops.rope(**with_(rope_args(), cos=T((16, 3)))), ShapeError,
     r"^rope: cos has shape \(16, 3\); expected \(16, 4\)"),
    ("rope/sin-shape", lambda: ops.rope(**with_(rope_args(), sin=T((8, 4)))), ShapeError,
     r"^rope: sin has shape \(8, 4\); expected \(16, 4\)"),
    ("rope/cos-f16", lambda: ops.rope(**with_(rope_args(), cos=T((16, 4), "f16"))), DTypeError,
     r"^rope: cos has dtype f16; expected one of f32"),
    ("rope/position-beyond", lambda: ops.rope(**with_(rope_args(), positions=T((2,), "i32", fill=16))), ShapeError,
     r"^rope: position 16 is beyond the rope table \(16 positions\)"),
    ("rope/out-shape", lambda: ops.rope(**rope_args(), out=T((2, 3, 4))), ShapeError,
     r"^rope: out has shape \(2, 3, 4\); expected \(2, 3, 8\)"),
    # add, swiglu
    ("add/shape", lambda: ops.add(T((2, 4)), T((2, 3))), ShapeError,
     r"^add: b has shape \(2, 3\); expected \(2, 4\)"),
    ("add/a-int", lambda: ops.add(T((4,), "i32"), T((4,))), DTypeError,
     r"^add: a has dtype i32; expected one of f32, f16, bf16"),
    ("add/b-int", lambda: ops.add(T((4,)), T((4,), "i64")), DTypeError,
     r"^add: b has dtype i64; expected one of f32, f16, bf16"),
    ("add/out-shape", lambda: ops.add(T((4,)), T((4,)), out=T((5,))), ShapeError,
     r"^add: out has shape \(5,\); expected \(4,\)"),
    ("swiglu/shape", lambda: ops.swiglu(T((2, 4)), T((4, 2))), ShapeError,
     r"^swiglu: up has shape \(4, 2\); expected \(2, 4\)"),
    ("swiglu/gate-int", lambda: ops.swiglu(T((4,), "i8"), T((4,))), DTypeError,
     r"^swiglu: gate has dtype i8; expected one of f32, f16, bf16"),
    ("swiglu/out-dtype", lambda: ops.swiglu(T((4,)), T((4,)), out=T((4,), "i32")), DTypeError,
     r"^swiglu: out has dtype i32; expected one of f32, f16, bf16"),
    # softmax
    ("softmax/x-int", lambda: ops.softmax(T((4,), "i32")), DTypeError,
     r"^softmax: x has dtype i32; expected one of f32, f16, bf16"),
    ("softmax/x-0d", lambda: ops.softmax(T(())), ShapeError, r"^softmax: x must have at least one axis"),
    ("softmax/out-shape", lambda: ops.softmax(T((2, 4)), out=T((2, 5))), ShapeError,
     r"^softmax: out has shape \(2, 5\); expected \(2, 4\)"),
    # attention
    ("attention/q-2d", lambda: ops.attention(**with_(attn_args(), q=T((2, 8)))), ShapeError,
     r"^attention: q has shape \(2, 8\) \(2-D\); expected 3-D"),
    ("attention/head-dim", lambda: ops.attention(**with_(attn_args(), q=T((2, 4, 6)))), ShapeError,
     r"^attention: q has shape \(2, 4, 6\), caches \(6, 2, 8\); expected caches \(S, Hkv, 6\) "
     r"with Hkv dividing Hq=4"),
    ("attention/gqa", lambda: ops.attention(**with_(attn_args(), q=T((2, 3, 8)))), ShapeError,
     r"^attention: .*expected caches \(S, Hkv, 8\) with Hkv dividing Hq=3"),
    ("attention/v-shape", lambda: ops.attention(**with_(attn_args(), v_cache=T((5, 2, 8)))), ShapeError,
     r"^attention: v_cache has shape \(5, 2, 8\); expected \(6, 2, 8\)"),
    ("attention/cache-dtype", lambda: ops.attention(**with_(attn_args(), k_cache=T((6, 2, 8), "f16"),
                                                            v_cache=T((6, 2, 8), "f16"))), DTypeError,
     r"^attention: k_cache has dtype f16; expected one of f32"),
    ("attention/v-dtype", lambda: ops.attention(**with_(attn_args(), v_cache=T((6, 2, 8), "bf16"))), DTypeError,
     r"^attention: v_cache has dtype bf16; expected one of f32"),
    ("attention/positions-len", lambda: ops.attention(**with_(attn_args(), positions=ids(1))), ShapeError,
     r"^attention: positions has shape \(1,\); expected \(2,\)"),
    ("attention/position-beyond", lambda: ops.attention(**with_(attn_args(), positions=T((2,), "i32", fill=6))),
     ShapeError, r"^attention: position 6 is beyond the cache \(6 rows\)"),
    ("attention/out-shape", lambda: ops.attention(**attn_args(), out=T((2, 2, 8))), ShapeError,
     r"^attention: out has shape \(2, 2, 8\); expected \(2, 4, 8\)"),
    # kv_cache_write
    ("kv_cache_write/k-shape", lambda: ops.kv_cache_write(**with_(kv_args(), k=T((2, 3, 8)))), ShapeError,
     r"^kv_cache_write: k has shape \(2, 3, 8\); expected \(2, 2, 8\)"),
    ("kv_cache_write/v-shape", lambda: ops.kv_cache_write(**with_(kv_args(), v=T((1, 2, 8)))), ShapeError,
     r"^kv_cache_write: v has shape \(1, 2, 8\); expected \(2, 2, 8\)"),
    ("kv_cache_write/cache-2d", lambda: ops.kv_cache_write(**with_(kv_args(), k_cache=T((6, 16)))), ShapeError,
     r"^kv_cache_write: k_cache has shape \(6, 16\) \(2-D\); expected 3-D"),
    ("kv_cache_write/v-cache-dtype", lambda: ops.kv_cache_write(**with_(kv_args(), v_cache=T((6, 2, 8), "f16"))),
     DTypeError, r"^kv_cache_write: v_cache has dtype f16; expected one of f32"),
    ("kv_cache_write/cache-int", lambda: ops.kv_cache_write(**with_(kv_args(), k_cache=T((6, 2, 8), "i8"),
                                                                    v_cache=T((6, 2, 8), "i8"))), DTypeError,
     r"^kv_cache_write: k_cache has dtype i8; expected one of f32, f16, bf16"),
    ("kv_cache_write/k-int", lambda: ops.kv_cache_write(**with_(kv_args(), k=T((2, 2, 8), "i32"))), DTypeError,
     r"^kv_cache_write: k has dtype i32; expected one of f32, f16, bf16"),
    ("kv_cache_write/positions-len", lambda: ops.kv_cache_write(**with_(kv_args(), positions=ids(3))), ShapeError,
     r"^kv_cache_write: positions has shape \(3,\); expected \(2,\)"),
    ("kv_cache_write/position-beyond", lambda: ops.kv_cache_write(**with_(kv_args(), positions=[0, 6])),
     ShapeError, r"^kv_cache_write: position 6 is beyond the cache \(6 rows\)"),
    # argmax
    ("argmax/x-3d", lambda: ops.argmax(T((2, 2, 2))), ShapeError,
     r"^argmax: x has shape \(2, 2, 2\) \(3-D\); expected \(1, 2\)-D"),
    ("argmax/x-int", lambda: ops.argmax(T((4,), "i32")), DTypeError,
     r"^argmax: x has dtype i32; expected one of f32, f16, bf16"),
    ("argmax/out-dtype", lambda: ops.argmax(T((2, 4)), out=T((2,), "f32")), DTypeError,
     r"^argmax: out has dtype f32; expected one of i32"),
    ("argmax/out-shape", lambda: ops.argmax(T((2, 4)), out=T((4,), "i32")), ShapeError,
     r"^argmax: out has shape \(4,\); expected \(2,\)"),
    # cast
    ("cast/no-target", lambda: ops.cast(T((4,))), DTypeError, r"^cast: give dtype or out"),
    ("cast/x-int", lambda: ops.cast(T((4,), "i32"), "f32"), DTypeError,
     r"^cast: x has dtype i32; expected one of f32, f16, bf16"),
    ("cast/to-int", lambda: ops.cast(T((4,)), out=T((4,), "i8")), DTypeError,
     r"^cast: out has dtype i8; expected one of f32, f16, bf16"),
    ("cast/out-shape", lambda: ops.cast(T((4,)), out=T((5,), "f16")), ShapeError,
     r"^cast: out has shape \(5,\); expected \(4,\)"),
    ("cast/unknown-dtype", lambda: ops.cast(T((4,)), "f8"), DTypeError, r"unknown dtype 'f8'; expected one of"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in SHAPE_AND_DTYPE_CASES],
                         ids=[c[0] for c in SHAPE_AND_DTYPE_CASES])
def test_bad_shapes_and_dtypes(call, exc, match):
    assert issubclass(exc, HetinferError)
    with pytest.raises(exc, match=match):
        call()


def test_every_op_has_error_cases():
    covered = {c[0].split("/")[0] for c in SHAPE_AND_DTYPE_CASES} | set(NEW_OP_CASES)
    missing = sorted(set(ops.OPS) - covered)
    assert not missing, f"ops with no bad-argument test in tests/test_ops_errors.py: {missing}"


# --- ops added later (penalties, sample): only if this hetinfer has them -------------------------
def _penalties_cases():
    lg, c = T((2, 5)), T((2, 5), "i32")
    return [
        (lambda: ops.penalties(lg, T((2, 4), "i32"), c), ShapeError, r"^penalties: counts has shape \(2, 4\); expected \(2, 5\)"),
        (lambda: ops.penalties(lg, T((2, 5)), c), DTypeError, r"^penalties: counts has dtype f32; expected one of i32"),
        (lambda: ops.penalties(lg, c, T((2, 5), "i64")), DTypeError, r"^penalties: seen has dtype i64; expected one of i32"),
        (lambda: ops.penalties(T((5,)), c, c), ShapeError, r"^penalties: logits has shape \(5,\) \(1-D\); expected 2-D"),
        (lambda: ops.penalties(lg, c, c, out=T((2, 4))), ShapeError, r"^penalties: out has shape \(2, 4\); expected \(2, 5\)"),
        (lambda: ops.penalties(lg, c, c, repetition=0.0), HetinferError, r"^penalties: repetition penalty must be > 0"),
    ]


def _sample_cases():
    lg, u = T((2, 5)), T((2,), fill=0.5)
    return [
        (lambda: ops.sample(lg, T((3,))), ShapeError, r"^sample: uniform has shape \(3,\); expected \(2,\)"),
        (lambda: ops.sample(lg, T((2,), "f16")), DTypeError, r"^sample: uniform has dtype f16; expected one of f32"),
        (lambda: ops.sample(T((5,)), u), ShapeError, r"^sample: logits has shape \(5,\) \(1-D\); expected 2-D"),
        (lambda: ops.sample(T((2, 5), "i32"), u), DTypeError, r"^sample: logits has dtype i32; expected one of f32"),
        (lambda: ops.sample(lg, u, temperature=-1.0), HetinferError, r"^sample: need temperature >= 0"),
        (lambda: ops.sample(lg, u, top_p=0.0), HetinferError, r"^sample: need .*0 < top_p <= 1"),
        (lambda: ops.sample(lg, u, out=T((2,), "i64")), DTypeError, r"^sample: out has dtype i64; expected one of i32"),
        (lambda: ops.sample(lg, u, temperature=T((3,))), ShapeError, r"^sample: temperature has shape \(3,\); expected \(2,\)"),
        (lambda: ops.sample(lg, u, top_k=T((2,))), DTypeError, r"^sample: top_k has dtype f32; expected one of i32"),
        (lambda: ops.sample(lg, u, temperature=[0.5, -1.0]), HetinferError, r"^sample: need temperature >= 0.* in every row; got \[0.5, -1.0\]"),
        (lambda: ops.sample(lg, u, temperature=float("nan")), HetinferError, r"^sample: temperature must be finite"),
    ]


def _paged_args(**kw):
    a = dict(q=T((3, 4, 8)), k_pool=T((4, 2, 2, 8)), v_pool=T((4, 2, 2, 8)), query_start=[0, 1, 3],
             context_lens=[3, 2], block_tables=[[0, 1], [2, 3]])
    a.update(kw)
    return a


def _paged_attention_cases():
    pa = ops.paged_attention
    return [
        (lambda: pa(**_paged_args(k_pool=T((4, 2, 2, 6)), v_pool=T((4, 2, 2, 6)))), ShapeError,
         r"^paged_attention: q has shape \(3, 4, 8\), pools \(4, 2, 2, 6\); expected pools \(NB, BS, Hkv, 8\)"),
        (lambda: pa(**_paged_args(v_pool=T((4, 2, 2, 8), "f16"))), DTypeError,
         r"^paged_attention: v_pool has dtype f16; expected one of f32"),
        (lambda: pa(**_paged_args(k_pool=T((8, 2, 8)))), ShapeError, r"^paged_attention: k_pool has shape \(8, 2, 8\) \(3-D\)"),
        (lambda: pa(**_paged_args(query_start=[0, 1])), ShapeError,
         r"^paged_attention: query_start has shape \(2,\); expected \(3,\)"),
        (lambda: pa(**_paged_args(query_start=[0, 2, 1])), ShapeError, r"^paged_attention: query_start must rise from 0 to T=3"),
        (lambda: pa(**_paged_args(context_lens=[3, 1])), ShapeError,
         r"^paged_attention: context_lens must be >= each sequence's query rows and <= block_tables' capacity 2 x 2"),
        (lambda: pa(**_paged_args(context_lens=[5, 2])), ShapeError, r"capacity 2 x 2; got \[5, 2\]"),
        (lambda: pa(**_paged_args(block_tables=[[0, 9], [2, 3]])), ShapeError,
         r"^paged_attention: block ids in use must be in \[0, 4\); got 0..9"),
        (lambda: pa(**_paged_args(block_tables=T((2, 2)))), DTypeError,
         r"^paged_attention: block_tables has dtype f32; expected one of i32"),
        (lambda: pa(**_paged_args(out=T((3, 4, 4)))), ShapeError, r"^paged_attention: out has shape \(3, 4, 4\)"),
    ]


def _rope_paged_args(**kw):
    a = dict(q=T((2, 4, 8)), k=T((2, 2, 8)), v=T((2, 2, 8)), k_pool=T((3, 2, 2, 8)), v_pool=T((3, 2, 2, 8)),
             positions=[0, 1], slot_mapping=[4, -1], cos=T((8, 4)), sin=T((8, 4)))
    a.update(kw)
    return a


def _rope_paged_cases():
    w = ops.rope_paged_kv_write
    return [
        (lambda: w(**_rope_paged_args(slot_mapping=[6, 0])), ShapeError,
         r"^rope_paged_kv_write: slot 6 is beyond the pools \(6 slots\)"),
        (lambda: w(**_rope_paged_args(slot_mapping=[2, 2])), ShapeError, r"^rope_paged_kv_write: slot_mapping writes a slot twice"),
        (lambda: w(**_rope_paged_args(slot_mapping=[1, 2, 3])), ShapeError,
         r"^rope_paged_kv_write: slot_mapping has shape \(3,\); expected \(2,\)"),
        (lambda: w(**_rope_paged_args(positions=[0, 8])), ShapeError,
         r"^rope_paged_kv_write: position 8 is beyond the rope table \(8 positions\)"),
        (lambda: w(**_rope_paged_args(k=T((2, 3, 8)))), ShapeError, r"^rope_paged_kv_write: k has shape \(2, 3, 8\); expected \(2, 2, 8\)"),
        (lambda: w(**_rope_paged_args(style="x")), ShapeError, r"^rope_paged_kv_write: style must be 'half' or 'interleaved'"),
        (lambda: w(**_rope_paged_args(v_pool=T((3, 2, 2, 8), "bf16"))), DTypeError,
         r"^rope_paged_kv_write: v_pool has dtype bf16; expected one of f32"),
    ]


def _decode_layer_cases():
    """decode_layer: D = 32, one head of 8 (Hq = Hkv = 1, rows (1 + 2) 8 = 24), F = 32, B = 2."""
    def args(**kw):
        a = dict(x=T((2, 32)), attn_norm=T((32,)), wqkv=T((24, 32)), wo=T((32, 8)), mlp_norm=T((32,)),
                 w_gate_up=T((64, 32)), w_down=T((32, 32)), k_pool=T((3, 2, 1, 8)), v_pool=T((3, 2, 1, 8)),
                 positions=ids(2), slot_mapping=ids(2), context_lens=T((2,), "i32", fill=1),
                 block_tables=T((2, 1), "i32"), cos=T((8, 4)), sin=T((8, 4)), num_heads=1)
        a.update(kw)
        return a
    w = ops.decode_layer
    return [
        (lambda: w(**args(x=T((2, 32), "bf16"))), DTypeError, r"^decode_layer: x has dtype bf16; expected one of f32"),
        (lambda: w(**args(wqkv=T((16, 32)))), ShapeError, r"^decode_layer: wqkv has 16 rows; expected"),
        (lambda: w(**args(num_heads=3, k_pool=T((3, 2, 2, 8)), v_pool=T((3, 2, 2, 8)))), ShapeError, r"^decode_layer: num_heads=3 must be a positive multiple"),
        (lambda: w(**args(context_lens=T((2,), "i32", fill=5))), ShapeError,
         r"^decode_layer: context_lens must be in \[1, 2\]"),
    ]


def test_decode_layer_checks_what_changed_after_a_good_call():
    """decode_layer checks a layer's own tensors once and a step's tensors once per step (the
    same objects are not checked again): after a good call, a new x, a new step tensor or a new
    weight part is still checked in full. D = 32, one head of 32, F = 32, Q8_0 weights."""
    from hetinfer.testing.strategies import packed_blocks
    rng = np.random.default_rng(0)

    def q8(n, k):
        return hetinfer.packed.from_blocks(packed_blocks(rng, "q8_0", n, k, 0.1), "q8_0")
    layer = dict(attn_norm=T((32,)), wqkv=(q8(32, 32), q8(64, 32)), wo=q8(32, 32), mlp_norm=T((32,)),
                 w_gate_up=q8(64, 32), w_down=q8(32, 32), k_pool=T((3, 2, 1, 32)), v_pool=T((3, 2, 1, 32)),
                 cos=T((8, 16)), sin=T((8, 16)), num_heads=1)
    step = dict(positions=ids(2), slot_mapping=ids(2), context_lens=T((2,), "i32", fill=1),
                block_tables=T((2, 1), "i32"))
    ops.decode_layer(T((2, 32)), **layer, **step)
    ops.decode_layer(T((2, 32)), **layer, **step)                     # the same layer and step again
    with pytest.raises(ShapeError, match=r"^decode_layer: wqkv\[0\] has shape"):
        ops.decode_layer(T((2, 64)), **layer, **step)                 # x of another width
    with pytest.raises(ShapeError, match=r"^decode_layer: context_lens must be in \[1, 2\]"):
        ops.decode_layer(T((2, 32)), **layer, **dict(step, context_lens=T((2,), "i32", fill=5)))
    with pytest.raises(ShapeError, match=r"^decode_layer: wqkv has 128 rows"):
        ops.decode_layer(T((2, 32)), **dict(layer, wqkv=(q8(32, 32), q8(96, 32))), **step)
    with pytest.raises(DTypeError, match=r"^decode_layer: mlp_norm has dtype i32"):
        ops.decode_layer(T((2, 32)), **dict(layer, mlp_norm=T((32,), "i32")), **step)


def _all_reduce_cases():
    return [
        (lambda: ops.all_reduce(T((4,), "i32")), DTypeError, r"^all_reduce: x has dtype i32; expected one of f32"),
        (lambda: ops.all_reduce(T((4,)), out=T((5,))), ShapeError, r"^all_reduce: out has shape \(5,\); expected \(4,\)"),
        (lambda: ops.all_reduce(T((4,)), out=T((4,), "f16")), DTypeError, r"^all_reduce: out has dtype f16; expected one of f32"),
        (lambda: ops.all_reduce(np.ones(4)), DTypeError, r"^all_reduce: x must be a hetinfer Tensor, got ndarray"),
    ]


def _all_gather_cases():
    return [
        (lambda: ops.all_gather(T((2, 3)), dim=2), ShapeError, r"^all_gather: dim 2 is out of range for x of shape \(2, 3\)"),
        (lambda: ops.all_gather(T((2, 3)), dim=1, out=T((2, 4))), ShapeError,
         r"^all_gather: out has shape \(2, 4\); expected \(2, 3\)"),
        (lambda: ops.all_gather(T((2,), "i32")), DTypeError, r"^all_gather: x has dtype i32"),
    ]


NEW_OP_CASES = {"penalties": _penalties_cases, "sample": _sample_cases, "paged_attention": _paged_attention_cases,
                "rope_paged_kv_write": _rope_paged_cases, "decode_layer": _decode_layer_cases,
                "all_reduce": _all_reduce_cases, "all_gather": _all_gather_cases}


@pytest.mark.parametrize("op", sorted(NEW_OP_CASES))
def test_bad_arguments_of_later_ops(op):
    if op not in ops.OPS:
        pytest.skip(f"this hetinfer has no {op} op")
    for call, exc, match in NEW_OP_CASES[op]():
        with pytest.raises(exc, match=match):
            call()


# --- non-tensor arguments -------------------------------------------------------------------
NON_TENSOR_CASES = [
    ("embedding", lambda: ops.embedding([0, 1], T((4, 3))), r"^embedding: ids must be a hetinfer Tensor, got list"),
    ("embedding", lambda: ops.embedding(ids(2), np.ones((4, 3))), r"^embedding: table must be a hetinfer Tensor, got ndarray"),
    ("rms_norm", lambda: ops.rms_norm(np.ones((2, 3)), T((3,))), r"^rms_norm: x must be a hetinfer Tensor, got ndarray"),
    ("rms_norm", lambda: ops.rms_norm(T((2, 3)), [1.0, 1.0, 1.0]), r"^rms_norm: weight must be a hetinfer Tensor, got list"),
    ("matmul", lambda: ops.matmul(T((2, 3)), np.ones((4, 3))), r"^matmul: weight must be a hetinfer Tensor, got ndarray"),
    ("matmul", lambda: ops.matmul(T((2, 3)), T((4, 3)), bias=np.ones(4)), r"^matmul: bias must be a hetinfer Tensor"),
    ("matmul", lambda: ops.matmul(T((2, 64)), T((4, 64), "i8"), scales=1.0), r"^matmul: scales must be a hetinfer Tensor, got float"),
    ("rope", lambda: ops.rope(**with_(rope_args(), cos=np.ones((16, 4)))), r"^rope: cos must be a hetinfer Tensor"),
    ("rope", lambda: ops.rope(**with_(rope_args(), x=None)), r"^rope: x must be a hetinfer Tensor, got NoneType"),
    ("add", lambda: ops.add(T((3,)), 1.0), r"^add: b must be a hetinfer Tensor, got float"),
    ("swiglu", lambda: ops.swiglu((1, 2), T((2,))), r"^swiglu: gate must be a hetinfer Tensor, got tuple"),
    ("softmax", lambda: ops.softmax([1.0, 2.0]), r"^softmax: x must be a hetinfer Tensor, got list"),
    ("attention", lambda: ops.attention(**with_(attn_args(), k_cache="cache")), r"^attention: k_cache must be a hetinfer Tensor, got str"),
    ("kv_cache_write", lambda: ops.kv_cache_write(**with_(kv_args(), v=np.ones((2, 2, 8)))), r"^kv_cache_write: v must be a hetinfer Tensor"),
    ("argmax", lambda: ops.argmax(np.ones(4)), r"^argmax: x must be a hetinfer Tensor, got ndarray"),
    ("cast", lambda: ops.cast(3.0, "f16"), r"^cast: x must be a hetinfer Tensor, got float"),
    ("cast", lambda: ops.cast(T((3,)), out=[0.0, 0.0, 0.0]), r"^cast: out must be a hetinfer Tensor, got list"),
]


@pytest.mark.parametrize("call,match", [c[1:] for c in NON_TENSOR_CASES],
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(NON_TENSOR_CASES)])
def test_non_tensor_arguments(call, match):
    with pytest.raises(DTypeError, match=match):
        call()


OUT_NOT_TENSOR = [
    ("embedding", lambda o: ops.embedding(ids(2), T((4, 3)), out=o)),
    ("rms_norm", lambda o: ops.rms_norm(T((2, 3)), T((3,)), out=o)),
    ("matmul", lambda o: ops.matmul(T((2, 3)), T((4, 3)), out=o)),
    ("rope", lambda o: ops.rope(**rope_args(), out=o)),
    ("add", lambda o: ops.add(T((3,)), T((3,)), out=o)),
    ("swiglu", lambda o: ops.swiglu(T((3,)), T((3,)), out=o)),
    ("softmax", lambda o: ops.softmax(T((3,)), out=o)),
    ("attention", lambda o: ops.attention(**attn_args(), out=o)),
    ("argmax", lambda o: ops.argmax(T((3,)), out=o)),
]


@pytest.mark.parametrize("out", [[0.0, 0.0], np.zeros(3, np.float32)], ids=["list", "ndarray"])
@pytest.mark.parametrize("op,call", OUT_NOT_TENSOR, ids=[c[0] for c in OUT_NOT_TENSOR])
def test_out_that_is_not_a_tensor(op, call, out):
    with pytest.raises(DTypeError, match=rf"^{op}: out must be a hetinfer Tensor, got {type(out).__name__}"):
        call(out)


def test_positions_given_as_a_list_are_accepted():
    out = ops.rope(T((2, 3, 8)), [0, 5], T((16, 4)), T((16, 4)))
    assert out.shape == (2, 3, 8)
    with pytest.raises(ShapeError, match=r"^rope: positions has shape \(3,\); expected \(2,\)"):
        ops.rope(T((2, 3, 8)), [0, 1, 2], T((16, 4)), T((16, 4)))


# --- tensors on different devices -------------------------------------------------------------
def device_cases(d):
    """(op, call) pairs where exactly one tensor lives on device d; the rest on cpu."""
    return [
        ("embedding", lambda: ops.embedding(ids(2, d), T((4, 3)))),
        ("embedding", lambda: ops.embedding(ids(2), T((4, 3)), out=T((2, 3), device=d))),
        ("rms_norm", lambda: ops.rms_norm(T((2, 3)), T((3,), device=d))),
        ("matmul", lambda: ops.matmul(T((2, 3), device=d), T((4, 3)))),
        ("matmul", lambda: ops.matmul(T((2, 3)), T((4, 3)), bias=T((4,), device=d))),
        ("matmul", lambda: ops.matmul(T((2, 64)), T((4, 64), "i8"), scales=T((4, 2), device=d))),
        ("rope", lambda: ops.rope(**with_(rope_args(), cos=T((16, 4), device=d)))),
        ("rope", lambda: ops.rope(**with_(rope_args(), positions=ids(2, d)))),
        ("add", lambda: ops.add(T((3,)), T((3,), device=d))),
        ("add", lambda: ops.add(T((3,)), T((3,)), out=T((3,), device=d))),
        ("swiglu", lambda: ops.swiglu(T((3,), device=d), T((3,)))),
        ("softmax", lambda: ops.softmax(T((3,)), out=T((3,), device=d))),
        ("attention", lambda: ops.attention(**with_(attn_args(), v_cache=T((6, 2, 8), device=d)))),
        ("attention", lambda: ops.attention(**with_(attn_args(), positions=ids(2, d)))),
        ("kv_cache_write", lambda: ops.kv_cache_write(**with_(kv_args(), k_cache=T((6, 2, 8), device=d)))),
        ("kv_cache_write", lambda: ops.kv_cache_write(**with_(kv_args(), k=T((2, 2, 8), device=d)))),
        ("argmax", lambda: ops.argmax(T((2, 4)), out=T((2,), "i32", device=d))),
        ("cast", lambda: ops.cast(T((3,)), out=T((3,), "f16", device=d))),
    ]


@pytest.mark.parametrize("n", range(len(device_cases("dummy"))),
                         ids=[f"{op}-{i}" for i, (op, _) in enumerate(device_cases("dummy"))])
def test_tensors_on_different_devices(installed_plugins, n):
    op, call = device_cases("dummy")[n]
    with pytest.raises(DeviceError, match=rf"^{op}: (all tensors must be on one device; got .*"
                                          r"on dummy:0.*|out is on dummy:0; expected cpu)"):
        call()


def test_device_error_lists_where_each_tensor_is(installed_plugins):
    with pytest.raises(DeviceError, match=r"^add: all tensors must be on one device; got a on cpu, b on dummy:0"):
        ops.add(T((3,)), T((3,), device="dummy"))
    with pytest.raises(DeviceError, match=r"dummy:0.*dummy:1"):
        ops.add(T((3,), device="dummy:0"), T((3,), device="dummy:1"))


# --- known gaps in the checks (core bugs, see the reasons) ------------------------------------
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("call", [
    lambda: ops.rope(**with_(rope_args(), positions=[-1, 0])),
    lambda: ops.attention(**with_(attn_args(), positions=[-1, 0])),
    lambda: ops.kv_cache_write(**with_(kv_args(), positions=[-2, 0])),
], ids=["rope", "attention", "kv_cache_write"])
def test_negative_positions_are_rejected(call):
    with pytest.raises(ShapeError, match=r"position"):
        call()
