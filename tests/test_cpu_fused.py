"""The CPU decode path fused in C (issue 16): ops.decode_layer's packed kernel
(hetinfer_cpu.packed.decode_layer, packed.c's hi_pk_decode_layer: a whole decoder layer for
decode rows in one call) against the same layer composed of the ops it fuses, and the model's
decode steps through it against the unfused path. The op's contract against its float64
reference is in the conformance suite (tests/test_conformance.py, decode_layer/*)."""

from __future__ import annotations

import hetinfer as hi
import hetinfer_cpu.packed as P
import numpy as np
import pytest
from hetinfer import dtypes as D
from hetinfer import ops
from hetinfer.rope import rope_table
from hetinfer.testing.strategies import packed_blocks
from _fixtures_loaders import smollm2_path

needs_c = pytest.mark.skipif(P.library() is None, reason="no C compiler: the packed kernels run on NumPy")


def _layer(rng, dt, d=256, f=512, hq=4, hkv=2, dh=64, split=False, v_q8=False, bias=False):
    """A random packed layer as ops.decode_layer's keyword arguments (pools of 8 blocks of 4)."""
    mk = lambda n, k, t=dt: hi.tensor(packed_blocks(rng, t, n, k, 1 / np.sqrt(k)), t, "cpu")  # noqa: E731
    rows = (hq * dh, hkv * dh, hkv * dh)
    if split:
        wqkv = (mk(rows[0], d), mk(rows[1], d), mk(rows[2], d, D.q8_0 if v_q8 else dt))
        wgu = (mk(f, d), mk(f, d))
    else:
        wqkv, wgu = mk(sum(rows), d), mk(2 * f, d)
    cos, sin = rope_table(dh, 64, 10000.0, None, 64)
    f32 = lambda a: hi.from_numpy(np.ascontiguousarray(a, np.float32))  # noqa: E731
    return dict(attn_norm=f32(1 + 0.1 * rng.standard_normal(d)), wqkv=wqkv, wo=mk(d, hq * dh),
                mlp_norm=f32(1 + 0.1 * rng.standard_normal(d)), w_gate_up=wgu, w_down=mk(d, f),
                cos=f32(cos), sin=f32(sin), num_heads=hq,
                bqkv=f32(0.1 * rng.standard_normal(sum(rows))) if bias else None), (8, 4, hkv, dh)


def _step(rng, lengths, bs=4):
    """Decode rows: sequence b's new token at position lengths[b] - 1, blocks 2b, 2b + 1, ..."""
    b = len(lengths)
    table = np.array([[(2 * i + j) % 8 for j in range(2)] for i in range(b)], np.int32)
    slots = np.array([table[i, (n - 1) // bs] * bs + (n - 1) % bs for i, n in enumerate(lengths)], np.int32)
    t = lambda a: hi.tensor(np.asarray(a, np.int32), hi.i32, "cpu")  # noqa: E731
    return dict(positions=t([n - 1 for n in lengths]), slot_mapping=t(slots), context_lens=t(lengths),
                block_tables=t(table))


@needs_c
@pytest.mark.parametrize("name,split,v_q8,bias", [("q4_1", False, False, False), ("q8_0", False, False, True),
                                                   ("q5_0", True, True, True), ("q4_k", True, True, False),
                                                   ("q6_k", False, False, True)])
def test_decode_layer_c_matches_the_composed_ops(name, split, v_q8, bias):
    """One C call against ops.matmul / rope_paged_kv_write / paged_attention / swiglu in turn,
    on the same packed weights and 8-bit activations: the same function up to f32 rounding
    (attention sums in another order), x and both pools."""
    rng = np.random.default_rng(7)
    w, pool_shape = _layer(rng, D.dtype(name), split=split, v_q8=v_q8, bias=bias)
    step = _step(rng, [3, 8, 1])
    x0 = rng.standard_normal((3, 256)).astype(np.float32)
    k0, v0 = (rng.standard_normal(pool_shape).astype(np.float32) for _ in range(2))
    got = []
    for fused in (True, False):
        x, kp, vp = hi.from_numpy(x0.copy()), hi.from_numpy(k0.copy()), hi.from_numpy(v0.copy())
        if fused:
            ops.decode_layer(x, k_pool=kp, v_pool=vp, **w, **step)
        else:
            parts = lambda v: v if isinstance(v, tuple) else (v,)  # noqa: E731
            P._composed(x, w["attn_norm"], parts(w["wqkv"]), w["wo"], w["mlp_norm"], parts(w["w_gate_up"]),
                        w["w_down"], kp, vp, step["positions"], step["slot_mapping"], step["context_lens"],
                        step["block_tables"], w["cos"], w["sin"], w["num_heads"], w["bqkv"], 1e-6, "half",
                        1 / 8.0)
        got.append([t.numpy().copy() for t in (x, kp, vp)])
    for a, b, what in zip(got[0], got[1], ("x", "k_pool", "v_pool")):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4 * np.abs(b).max(), err_msg=what)
    assert not np.array_equal(got[0][0], x0)


def test_decode_layer_without_the_library_is_the_composed_ops():
    """HETINFER_CPU_PACKED=numpy (or no compiler): the kernel composes the ops (NumPy tiles)."""
    rng = np.random.default_rng(3)
    w, pool_shape = _layer(rng, D.q4_0, d=64, f=64, hq=2, hkv=1, dh=32)
    step = _step(rng, [2, 5])
    x0 = rng.standard_normal((2, 64)).astype(np.float32)
    out = []
    for state in ("numpy", None):
        if state:
            P._reset_for_tests("numpy")
        try:
            x = hi.from_numpy(x0.copy())
            kp, vp = hi.from_numpy(np.zeros(pool_shape, np.float32)), hi.from_numpy(np.zeros(pool_shape, np.float32))
            ops.decode_layer(x, k_pool=kp, v_pool=vp, **w, **step)
            out.append(x.numpy().copy())
        finally:
            if state:
                P._reset_for_tests()
    assert np.isfinite(out[0]).all()
    np.testing.assert_allclose(out[0], out[1], rtol=0.05, atol=0.05 * np.abs(out[1]).max())


@pytest.fixture(scope="module")
def smollm2():
    from hetinfer.engine import load
    return load(smollm2_path(), "cpu", None, max_context=200, progress=False)


@needs_c
def test_smollm2_decode_runs_one_call_per_layer_and_matches_unfused(smollm2, monkeypatch):
    """Decode steps of the packed SmolLM2 go through ops.decode_layer (one call per layer), and
    token by token their logits match the unfused path's (four products, rope + cache write,
    attention): f32 rounding differences move some activations across an 8-bit rounding step
    (the packed products' contract), so logits agree within a few percent (relative L2) and
    the greedy text of the fused run is the unfused argmax wherever its top-2 margin is clear
    (> 0.25 nats, as in test_packed's packed-against-dequantized check)."""
    from hetinfer.engine import Generator
    from hetinfer.engine.kv_cache import PagedKVCache
    from hetinfer.engine.step import StepInput
    from hetinfer_models.llama import LlamaForCausalLM
    model, ckpt = smollm2
    calls = []
    real = ops.decode_layer
    monkeypatch.setattr(ops, "decode_layer", lambda *a, **k: calls.append(1) or real(*a, **k))
    prompt = ckpt.tokenizer.encode("The history of the lighthouse begins in the ancient world, where")
    fused = list(Generator(model, ckpt.tokenizer, 200).generate(prompt, max_new_tokens=24, stop_ids=[]))
    assert len(calls) == 23 * len(model.layers)                  # every decode step, no prefill
    ids = prompt + fused
    got = []
    for rows in (8, 0):
        monkeypatch.setattr(LlamaForCausalLM, "DECODE_LAYER_ROWS", rows)
        kv = PagedKVCache.for_tokens(model, len(ids) + 1)
        got.append(np.stack([model.forward(StepInput.single([t], p, kv.block_size).to("cpu"), kv).numpy()[0].copy()
                             for p, t in enumerate(ids)]))
    assert len(calls) == (23 + len(ids)) * len(model.layers)
    a, b = got
    rel = np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)
    # position 0 (attention over one token) runs the same operations both ways; from position 1
    # on, the fused attention's f32 rounding differs (by SIMD path: AVX-512 here) and can move an
    # activation across an 8-bit step, as the docstring says
    assert rel[0] < 1e-5 and np.median(rel) < 0.05 and rel.max() < 0.2, rel   # as far as from f32
    top2 = np.sort(b, -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.25
    at = slice(len(prompt) - 1, len(ids) - 1)                    # the steps that chose the fused tokens
    assert (np.array(fused) == b[at].argmax(-1))[clear[at]].all()
    assert (a.argmax(-1) == b.argmax(-1))[clear].all()


@needs_c
def test_bad_step_values_are_caught_before_c_reads_them():
    """decode_layer checks the step's indices (positions, context lengths, slots, block ids)
    before the C kernel indexes memory by them."""
    rng = np.random.default_rng(1)
    w, pool_shape = _layer(rng, D.q8_0, d=64, f=64, hq=2, hkv=1, dh=32)
    x = hi.from_numpy(rng.standard_normal((1, 64)).astype(np.float32))
    kp, vp = hi.from_numpy(np.zeros(pool_shape, np.float32)), hi.from_numpy(np.zeros(pool_shape, np.float32))
    t = lambda a: hi.tensor(np.asarray(a, np.int32), hi.i32, "cpu")  # noqa: E731
    good = dict(positions=t([0]), slot_mapping=t([0]), context_lens=t([1]), block_tables=t([[0, 1]]))
    for bad, match in ((dict(positions=t([64])), "positions must be in"), (dict(context_lens=t([9])), "context_lens"),
                       (dict(slot_mapping=t([32])), "beyond the pools"), (dict(block_tables=t([[9, 1]])), "block ids")):
        with pytest.raises(hi.HetinferError, match=match):
            ops.decode_layer(x, k_pool=kp, v_pool=vp, **w, **dict(good, **bad))
