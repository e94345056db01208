"""Packed GGUF weights (hetinfer.packed): the format table, the CPU kernels of every format and
SIMD variant against float64 references built from the gguf package's dequantizers, bad input,
and SmolLM2's Q4_1 file run packed against the same file dequantized (the conformance suite,
tests/test_conformance.py, covers the ops' contract on every packed dtype as well)."""

from __future__ import annotations

import sys

import hetinfer as hi
import hetinfer_cpu.packed as P
import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from hetinfer import dtypes as D
from hetinfer import packed
from hetinfer.ops import reference as R
from hetinfer.testing.strategies import packed_blocks, packed_rounding_bound
from _fixtures_loaders import smollm2_path

PACKED = [d.name for d in D.PACKED]


def test_format_table_matches_gguf():
    for f in packed.FORMATS:
        qt = GGMLQuantizationType(f.ggml_type)
        assert qt.name == f.gguf and GGML_QUANT_SIZES[qt] == (f.block, f.nbytes)
        d = D.dtype(f.name)
        assert d.packed is f and d.itemsize == f.nbytes and d.block == f.block and not d.is_float
        assert D.dtype(f.gguf) is d                                # "Q4_K" names it too


@pytest.mark.parametrize("name", PACKED)
def test_dequantizers_match_gguf(name):
    """The CPU backend's own NumPy and C dequantizers against gguf's, on every format."""
    rng = np.random.default_rng(1)
    fmt = D.dtype(name).packed
    blocks = packed_blocks(rng, name, 7, 2 * fmt.block if fmt.block == 256 else 4 * fmt.block)
    ref = R.dequantize_packed(blocks, name)                                          # (7, K) f64
    np.testing.assert_array_equal(P.dequantize(blocks, fmt), ref.astype(np.float32))
    if P.library() is not None:
        out = np.full(ref.shape, np.nan, np.float32)
        rows = np.array([3, 0, 6, 3, 1, 2, 5], np.int64)
        P.library().hi_pk_dequant(fmt.ggml_type, blocks.ctypes.data, ref.shape[1], rows.ctypes.data, 0, 7,
                                  out.ctypes.data)
        np.testing.assert_allclose(out, ref[rows], rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def _variants():
    if P.library() is None:
        return ["numpy"]
    have = []
    for isa in ("best", "vnni256", "avx2", "c"):
        v = P.select(isa)
        if v not in have:
            have.append(v)
    P.select("best")
    return have


@pytest.fixture
def variant(request):
    if request.param == "numpy":
        P._reset_for_tests("numpy")
        yield "numpy"
        P._reset_for_tests()
        return
    lib = P.library()
    isa = {"avx512vnni": "best", "avx512vnni-256": "vnni256", "avx2": "avx2", "c": "c"}[request.param]
    assert P.select(isa) == request.param
    yield request.param
    assert lib is P.library()
    P.select("best")


@pytest.mark.parametrize("variant", _variants(), indirect=True)
@pytest.mark.parametrize("name", PACKED)
@pytest.mark.parametrize("m", [1, 3, 9])
def test_matmul_every_format_and_variant(variant, name, m):
    """Each SIMD variant (and plain C) of each format, decode (M = 1) and prefill tiles (M > 4, a
    ragged last tile). Two references, both from gguf's dequantized weights in float64:
    - exact: the activations as the kernel rounds them (quantize_activations, itself checked
      in test_activation_rounding), so only float32 accumulation differs: 1e-5 relative.
    - the unrounded activations, within packed_rounding_bound (the contract's allowance)."""
    rng = np.random.default_rng(m)
    fmt = D.dtype(name).packed
    n, k = 45, 3 * fmt.block if fmt.block == 32 else 2 * fmt.block
    blocks = packed_blocks(rng, name, n, k, 1 / np.sqrt(k))
    w = R.dequantize_packed(blocks, name)                                            # (N, K) f64
    x = rng.standard_normal((m, k)).astype(np.float32)
    y = hi.ops.matmul(hi.tensor(x), hi.packed.from_blocks(blocks, name)).numpy()    # (M, N)
    exact = x.astype(np.float64) @ w.T
    mag = np.abs(x).astype(np.float64) @ np.abs(w).T
    if variant == "numpy":
        assert np.abs(y - exact).max() <= 1e-5 * mag.max()
        return
    if m > P.SMALL_M:                   # prefill: dequantized tiles, x not rounded
        assert np.abs(y - exact).max() <= 1e-5 * mag.max()
        return
    q, d, _ = P.quantize_activations(x, fmt.act_block)
    xr = q.astype(np.float64) * np.repeat(d.astype(np.float64), fmt.act_block, axis=1)   # (M, K) as rounded
    assert np.abs(y - xr @ w.T).max() <= 1e-5 * mag.max()
    assert (np.abs(y - exact) <= packed_rounding_bound(x, w, fmt.act_block) * 1.01 + 1e-6 * mag.max()).all()


def test_threads_back_off_with_the_same_bits():
    """After a threaded product whose caller waited for a late worker (another process on the
    core), the next products run on the calling thread alone (par.inc): the same bits as threaded,
    the count of such products going down by one per product, and threads again after it."""
    lib = P.library()
    if lib is None or lib.hi_pk_threads() < 2:
        pytest.skip("needs the C library and two OpenMP threads")
    rng = np.random.default_rng(5)
    n, k = 3072, 576                                     # above PAR_MIN: a threaded product
    w = hi.packed.from_blocks(packed_blocks(rng, "q8_0", n, k, 1 / np.sqrt(k)), "q8_0")
    x = hi.tensor(rng.standard_normal((1, k)).astype(np.float32))
    lib.hi_pk_par_skip(0)
    threaded = hi.ops.matmul(x, w).numpy()
    assert lib.hi_pk_par_skip(-1) in (0, 1000)           # 1000: this machine's cores were busy
    lib.hi_pk_par_skip(3)
    alone = [hi.ops.matmul(x, w).numpy() for _ in range(2)]
    assert lib.hi_pk_par_skip(0) == 1
    for y in alone:
        np.testing.assert_array_equal(y, threaded)


def test_activation_rounding():
    """quantize_activations against float64: dx = max|x| / 127 per block, |x - dx q| <= dx / 2,
    |q| <= 127, the sums per 16 values exact; an all-zero block gives dx = 0, q = 0."""
    if P.library() is None:
        pytest.skip("no C compiler: the NumPy path does not round activations")
    rng = np.random.default_rng(5)
    for blk in (32, 256):
        x = (rng.standard_normal((3, 512)) * rng.uniform(0.01, 100, (3, 1))).astype(np.float32)
        x[1, :blk] = 0
        q, d, s = P.quantize_activations(x, blk)
        amax = np.abs(x.astype(np.float64)).reshape(3, -1, blk).max(-1)
        np.testing.assert_allclose(d, amax / 127, rtol=1e-6)
        dd = np.repeat(d.astype(np.float64), blk, axis=1)
        assert (np.abs(x - dd * q) <= dd / 2 * (1 + 1e-6)).all() and np.abs(q.astype(int)).max() <= 127
        assert d[1, 0] == 0 and not q[1, :blk].any()
        np.testing.assert_array_equal(s, q.astype(np.int64).reshape(3, -1, 16).sum(-1))


def test_embedding_rows_from_a_packed_table():
    rng = np.random.default_rng(2)
    blocks = packed_blocks(rng, "q5_1", 50, 64)
    ids = np.array([49, 0, 7, 7], np.int32)
    got = hi.ops.embedding(hi.tensor(ids), hi.packed.from_blocks(blocks, "q5_1"))
    assert got.dtype == hi.f32 and got.shape == (4, 64)
    np.testing.assert_allclose(got.numpy(), R.dequantize_packed(blocks, "q5_1")[ids], rtol=1e-6, atol=1e-7)


def test_bad_packed_input_is_one_clear_error():
    with pytest.raises(hi.ShapeError, match=r"a q4_k row holds whole blocks of 256 values; K=100 is not a "
                                            r"multiple of 256"):
        packed.from_bytes(np.zeros(144, np.uint8), "q4_k", (1, 100))
    with pytest.raises(hi.ShapeError, match=r"q8_0 data of shape \(2, 64\) needs 136 bytes"):
        packed.from_bytes(np.zeros(100, np.uint8), "q8_0", (2, 64))
    w = packed.from_bytes(np.zeros(2 * 4 * 34, np.uint8), "q8_0", (2, 128))
    with pytest.raises(hi.ShapeError, match=r"logical shape \(2, 128\).*K=100 is not a multiple of the q8_0 "
                                            r"block of 32.*expected x of shape \(\.\.\., 128\)"):
        hi.ops.matmul(hi.tensor(np.ones((1, 100), np.float32)), w)
    with pytest.raises(hi.DTypeError, match="a packed weight carries its own"):
        hi.ops.matmul(hi.tensor(np.ones((1, 128), np.float32)), w, scales=hi.tensor(np.ones((2, 4), np.float16)))
    with pytest.raises(hi.ShapeError, match="is not a packed format"):
        packed.fmt("f32")


# --- SmolLM2-135M-Instruct's Q4_1 GGUF, packed against dequantized -----------------------------
@pytest.fixture(scope="module")
def smollm2():
    from hetinfer.engine import load
    packed_model, ckpt = load(smollm2_path(), "cpu", None, max_context=300, progress=False)     # dtype None: packed
    from hetinfer_models.llama import LlamaForCausalLM
    deq = LlamaForCausalLM.from_checkpoint(ckpt, "cpu", "f32", max_context=300, progress=False)
    return packed_model, deq, ckpt


def test_smollm2_loads_packed_with_no_conversion(smollm2):
    import time

    from hetinfer_models.llama import LlamaForCausalLM
    _, deq, ckpt = smollm2
    t = time.perf_counter()
    again = LlamaForCausalLM.from_checkpoint(ckpt, "cpu", None, max_context=300, progress=False)
    took = time.perf_counter() - t
    print(f"SmolLM2 Q4_1: model built from the mapped file in {took * 1000:.0f} ms")
    layer = again.layers[3]
    assert (layer.wqkv.dtype, layer.w_gate_up.dtype, layer.w_down.dtype) == (D.q4_1,) * 3
    assert again.embed.dtype == D.q8_0 and again.lm_head is again.embed and again.norm.dtype == hi.f32
    mm = ckpt._mm          # o_proj, down, the embedding and the norms are views of the memory map
    for t in (layer.wo, layer.w_down, again.embed, layer.attn_norm):
        assert np.shares_memory(t.numpy(), mm)
    assert deq.layers[3].wqkv.dtype == hi.f32                                        # dtype="f32": widened
    assert again.weight_bytes < 0.4 * deq.weight_bytes
    lines = ckpt.summary().splitlines()
    assert any("self_attn.q_proj.weight" in ln and "Q4_1" in ln and "kept as q4_1 packed" in ln for ln in lines)
    assert any("input_layernorm" in ln and "kept as f32 (mapped)" in ln for ln in lines)


def _teacher_forced(ref, model, tokenizer, n=256):
    """Both models teacher-forced over n tokens of tests/data's text: (top-1 agreement per
    position, perplexity of ref, of model, ref's top-2 logits (n, 2))."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_quant import TEXT, logits_all, nll
    ids = tokenizer.encode(TEXT)[:n + 1]
    a, b = logits_all(ref, ids)[:n], logits_all(model, ids)[:n]
    tg = np.array(ids[1:])
    return (a.argmax(-1) == b.argmax(-1), np.exp(nll(a, tg).mean()), np.exp(nll(b, tg).mean()),
            np.sort(a, -1)[:, -2:])


def test_smollm2_packed_text_and_perplexity_match_dequantized(smollm2):
    """Teacher-forced over 256 tokens of tests/data's text: perplexity within 2% of the
    dequantized f32 run, top-1 agreement >= 93% with every flip a near-tie (f32 top-2 margin
    < 0.25 nats: the 8-bit activations move logits by ~0.15 on average); greedy text of 32
    tokens equal until the first such near-tie."""
    from hetinfer.engine import Generator
    from test_quant import logits_all
    model, deq, ckpt = smollm2
    agree, ppl_a, ppl_b, top2 = _teacher_forced(deq, model, ckpt.tokenizer)
    print(f"SmolLM2 Q4_1 packed vs dequantized, 256 tokens: top-1 agreement {agree.mean():.2%}, perplexity "
          f"{ppl_a:.3f} -> {ppl_b:.3f} ({ppl_b / ppl_a - 1:+.2%})")
    assert abs(ppl_b / ppl_a - 1) < 0.02
    assert agree.mean() >= 0.93 and (top2[~agree, 1] - top2[~agree, 0] < 0.25).all()
    prompt = ckpt.tokenizer.encode("The history of the lighthouse begins in the ancient world, where")
    ref = list(Generator(deq, ckpt.tokenizer, 300).generate(prompt, max_new_tokens=32, stop_ids=[]))
    got = list(Generator(model, ckpt.tokenizer, 300).generate(prompt, max_new_tokens=32, stop_ids=[]))
    # the dequantized run's greedy text, teacher-forced through both: the packed model picks the
    # same token at every step but near-ties of the reference, and runs free until the first one
    ra = logits_all(deq, prompt + ref)[len(prompt) - 1:-1]                  # (32, V) predicting ref
    rb = logits_all(model, prompt + ref)[len(prompt) - 1:-1]
    m2 = np.sort(ra, -1)[:, -2:]
    tie = m2[:, 1] - m2[:, 0] < 0.25
    assert ((rb.argmax(-1) == np.array(ref)) | tie).all() and tie.mean() < 0.25
    upto = int(np.flatnonzero(tie)[0]) if tie.any() else 32
    assert got[:upto] == ref[:upto], (ckpt.tokenizer.decode(got), ckpt.tokenizer.decode(ref))


@pytest.mark.slow
def test_qwen25_q4_k_m_packed_matches_dequantized():
    """The real Qwen2.5-Coder-0.5B Q4_K_M file (Q4_K, Q5_0, Q6_K, Q8_0 parts) run packed against
    the same file dequantized to f32, teacher-forced over 256 tokens of tests/data's text, on
    $HETINFER_PACKED_DEVICE (cpu; cuda on the GPU machine, packed with f16 activations there):
    perplexity within 2%, top-1 agreement >= 90% with every flip a near-tie (f32 top-2 margin
    < 0.5 nats), and greedy code from a chat prompt that reads as code."""
    import os
    from _fixtures_loaders import qwen_path
    from hetinfer.engine import Generator, load
    from hetinfer_models.llama import LlamaForCausalLM
    path = qwen_path()
    if path is None:
        pytest.skip("the Qwen2.5 GGUF is not there (../shared/models/fetch-qwen2.5-0.5b.sh, or HETINFER_QWEN_GGUF)")
    dev = os.environ.get("HETINFER_PACKED_DEVICE", "cpu")
    model, ckpt = load(path, dev, None if dev == "cpu" else "f16", max_context=512, progress=False, weights="packed")
    assert {l.wo.dtype.name for l in model.layers} <= {"q4_k", "q5_0", "q5_k", "q6_k", "q8_0"}
    deq = LlamaForCausalLM.from_checkpoint(ckpt, dev, "f32", max_context=512, progress=False)
    agree, ppl_a, ppl_b, top2 = _teacher_forced(deq, model, ckpt.tokenizer)
    print(f"Qwen2.5 Q4_K_M on {dev}, packed vs dequantized f32, 256 tokens: top-1 agreement {agree.mean():.2%}, "
          f"perplexity {ppl_a:.3f} -> {ppl_b:.3f} ({ppl_b / ppl_a - 1:+.2%}), largest flipped margin "
          f"{(top2[~agree, 1] - top2[~agree, 0]).max(initial=0):.3f}")
    assert abs(ppl_b / ppl_a - 1) < 0.02
    assert agree.mean() >= 0.90 and (top2[~agree, 1] - top2[~agree, 0] < 0.5).all()
    from hetinfer.chat_template import ChatTemplate
    prompt = ckpt.tokenizer.encode(ChatTemplate.from_checkpoint(ckpt).render(
        [{"role": "user", "content": "Write a Python function that checks whether a number is prime."}],
        add_generation_prompt=True), add_bos=False)
    got = ckpt.tokenizer.decode(list(Generator(model, ckpt.tokenizer, 512).generate(prompt, max_new_tokens=80)))
    print(f"Qwen2.5 packed on {dev}: {got!r}")
    assert "def " in got and "return" in got


def test_mixed_formats_model_matches_dequantized(tmp_path):
    """A tiny llama-arch GGUF (q/k rows permuted in the file) whose parts are packed differently,
    as in Q4_K_M files: q, k Q4_0 with v Q8_0 (three products), gate Q5_1 with up Q4_1 (two, then
    swiglu), o Q5_0, down Q6_K, output Q4_K, embedding Q8_0. Packed logits against the same file
    dequantized: each position within 3% (relative L2; the 8-bit activations), same top-1 where
    the dequantized top-2 margin is clear."""
    from _fixtures_loaders import TINY, random_kquant_bytes, tiny_weights, write_gguf
    from gguf import GGMLQuantizationType as Q
    from hetinfer.engine.kv_cache import PagedKVCache
    from hetinfer.engine.step import StepInput
    from hetinfer.loaders import load_checkpoint
    from hetinfer_models.llama import LlamaForCausalLM
    w = tiny_weights()
    L0 = "model.layers.0."
    qtypes = {"*": Q.Q4_0, "model.embed_tokens.weight": Q.Q8_0}
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        qtypes.update({p + "self_attn.v_proj.weight": Q.Q8_0, p + "mlp.gate_proj.weight": Q.Q5_1,
                       p + "mlp.up_proj.weight": Q.Q4_1, p + "self_attn.o_proj.weight": Q.Q5_0})
    raw = {f"model.layers.{i}.mlp.down_proj.weight": (random_kquant_bytes(w[L0 + "mlp.down_proj.weight"].shape,
                                                                           Q.Q6_K, seed=i), Q.Q6_K)
           for i in range(TINY["layers"])}
    raw["lm_head.weight"] = (random_kquant_bytes(w["lm_head.weight"].shape, Q.Q4_K, seed=9), Q.Q4_K)
    ckpt = load_checkpoint(write_gguf(tmp_path / "mixed.gguf", w, qtypes=qtypes, raw_bytes=raw), progress=False)
    pk = LlamaForCausalLM.from_checkpoint(ckpt, "cpu", None, max_context=64, progress=False)
    deq = LlamaForCausalLM.from_checkpoint(ckpt, "cpu", "f32", max_context=64, progress=False)
    layer = pk.layers[1]
    assert layer.wqkv is None and [p[0].dtype for p in layer.qkv_parts] == [D.q4_0, D.q4_0, D.q8_0]
    assert layer.w_gate_up is None and [p[0].dtype for p in layer.gate_up_parts] == [D.q5_1, D.q4_1]
    assert (layer.wo.dtype, layer.w_down.dtype, pk.lm_head.dtype, pk.embed.dtype) == (D.q5_0, D.q6_k, D.q4_k, D.q8_0)
    ids = list(np.random.default_rng(0).integers(0, TINY["vocab"], 40))
    out = []
    for model in (deq, pk):
        kv = PagedKVCache.for_tokens(model, len(ids) + 1)
        full = model.forward(StepInput.single(ids, 0, kv.block_size, all_logits=True).to("cpu"), kv).numpy()
        kv = PagedKVCache.for_tokens(model, len(ids) + 1)                   # and token by token (decode)
        steps = [model.forward(StepInput.single([t], p, kv.block_size).to("cpu"), kv).numpy()[0]
                 for p, t in enumerate(ids)]
        out.append((full, np.stack(steps)))
    (a_full, a_dec), (b_full, b_dec) = out
    for a, b in ((a_full, b_full), (a_dec, b_dec)):
        rel = np.linalg.norm(a - b, axis=-1) / np.linalg.norm(a, axis=-1)
        assert rel.max() < 0.03, rel.max()
        top2 = np.sort(a, -1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 0.05 * np.abs(a).max()
        assert (a.argmax(-1) == b.argmax(-1))[clear].all()
