"""Issue 13: every checkpoint that loads equals transformers; the rest are refused clearly.

Bias flags (Llama attention_bias / mlp_bias, Qwen2 with attention_bias: false), tensors the
model would not use (an error naming them, or a notice for those skipped on purpose), a Llama 3
GGUF carrying rope_freqs.weight, and the context limit at the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import hetinfer as hi  # noqa: E402
from hetinfer.config import ModelConfig  # noqa: E402
from hetinfer.engine import Generator, load  # noqa: E402
from hetinfer.loaders import load_checkpoint  # noqa: E402

from tiny_models import VOCAB, make_tiny  # noqa: E402


def our_logits(model, ids):
    from hetinfer.engine.kv_cache import PagedKVCache
    from hetinfer.engine.step import StepInput
    kv = PagedKVCache.for_tokens(model, 128)
    step = StepInput.single(ids, 0, kv.block_size, all_logits=True).to(model.device)
    return model.forward(step, kv).numpy().astype(np.float64)


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].double().numpy()


def rel_err(a, b):
    return (np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)).max()


IDS = np.random.default_rng(1).integers(3, VOCAB, size=24).tolist()


# --- 1. biases -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,flags", [
    ("llama-attn-bias", (True, True, False)),
    ("llama-mlp-bias", (False, False, True)),
    ("llama-both-biases", (True, True, True)),
    ("qwen2-attention-bias-false", (True, False, False)),
])
def test_bias_flags_follow_transformers(tmp_path, name, flags):
    d, hf = make_tiny(tmp_path, name)
    cfg = json.loads((d / "config.json").read_text())
    ckpt = load_checkpoint(d, progress=False)
    c = ckpt.config
    assert (c.attention_bias, c.attention_out_bias, c.mlp_bias) == flags
    hf_bias = {n.split(".", 3)[3] for n, _ in hf.named_parameters() if ".layers.0." in n and n.endswith("bias")}
    ours = {n.split(".", 3)[3] for n in ckpt.names() if ".layers.0." in n and n.endswith("bias")}
    assert ours == hf_bias
    if name.startswith("qwen2"):
        assert cfg["attention_bias"] is False          # the key is present, and transformers ignores it


def test_each_bias_matters(tmp_path):
    """Zeroing the o_proj or down_proj bias in transformers changes its logits: ours match the
    model with them, not without (so the equivalence test would catch ignoring them)."""
    d, hf = make_tiny(tmp_path, "llama-both-biases")
    model, _ = load(d, "cpu", "f32", max_context=128, progress=False)
    ours, ref = our_logits(model, IDS), hf_logits(hf, IDS)
    assert rel_err(ours, ref) < 1e-4
    for part in ("self_attn.o_proj", "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"):
        with torch.no_grad():
            b = hf.get_submodule(f"model.layers.0.{part}").bias
            keep = b.clone()
            b.zero_()
            assert rel_err(ours, hf_logits(hf, IDS)) > 1e-3, part
            b.copy_(keep)


# --- 3. tensors the model does not use -----------------------------------------------------------
def _drop_flag(d, key):
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] = False
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("name,key,which", [("llama-attn-bias", "attention_bias", "o_proj.bias"),
                                             ("llama-mlp-bias", "mlp_bias", "mlp.down_proj.bias")])
def test_unused_tensors_are_an_error_naming_them(tmp_path, name, key, which):
    d, _ = make_tiny(tmp_path, name)
    _drop_flag(d, key)                 # the config no longer says the biases are there
    with pytest.raises(hi.LoadError, match=r"does not use: .*" + which.replace(".", r"\.")):
        load_checkpoint(d, progress=False)


def test_extra_norm_tensor_is_an_error(tmp_path):
    from safetensors.numpy import load_file, save_file
    d, _ = make_tiny(tmp_path, "llama2-mha")
    t = load_file(str(d / "model.safetensors"))
    t["model.layers.0.self_attn.q_norm.weight"] = np.ones(16, np.float32)
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(hi.LoadError, match=r"q_norm\.weight"):
        load_checkpoint(d, progress=False)


def test_skipped_on_purpose_is_a_notice(tmp_path, capsys):
    from safetensors.numpy import load_file, save_file
    d, hf = make_tiny(tmp_path, "llama3-gqa-scaled-tied")
    t = load_file(str(d / "model.safetensors"))
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    t["model.layers.1.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    t["lm_head.weight"] = np.zeros_like(t["model.embed_tokens.weight"])    # tied: transformers ignores it
    save_file(t, str(d / "model.safetensors"))
    model, ckpt = load(d, "cpu", "f32", max_context=128, progress=False)
    err = capsys.readouterr().err
    assert "rotary_emb.inv_freq" in err and "lm_head.weight" in err and "notice" in err
    assert any("inv_freq" in n for n in ckpt.notices)
    assert rel_err(our_logits(model, IDS), hf_logits(hf, IDS)) < 1e-4


def test_unsupported_config_values_refused():
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 16, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    for over, msg in [({"hidden_act": "gelu"}, "hidden_act"), ({"partial_rotary_factor": 0.5}, "partial_rotary"),
                      ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config")]:
        with pytest.raises(hi.ConfigError, match=msg):
            ModelConfig.from_hf(dict(base, **over))
    q = dict(base, architectures=["Qwen2ForCausalLM"], use_sliding_window=True, sliding_window=4)
    with pytest.raises(hi.ConfigError, match="sliding"):
        ModelConfig.from_hf(q)
    c = ModelConfig.from_hf(dict(base, some_new_key=1, torch_dtype="float32"))
    assert c.extra["unknown_config_keys"] == ["some_new_key"]


# --- 4. GGUF rope_freqs.weight (Llama 3.x) -------------------------------------------------------
def llama3_rope_factors(head_dim, theta, s):
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors, verbatim in numpy."""
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old = s["original_max_position_embeddings"]
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    lw, hw = old / low, old / high
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < hw:
            out.append(1)
        elif wl > lw:
            out.append(factor)
        else:
            smooth = (old / wl - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_llama_gguf(path, hf, cfg, rope_freqs=None, arch="llama", meta=()):
    import gguf
    from _fixtures_loaders import gpt2_vocab_meta, hf_to_gguf_name, permute
    H, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in meta:
        (w.add_string if isinstance(v, str) else w.add_float32 if isinstance(v, float) else w.add_uint32)(k, v)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(H)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_rope_dimension_count(H // nh)
    w.add_vocab_size(VOCAB)
    tok = gpt2_vocab_meta(VOCAB)
    w.add_tokenizer_model(tok["model"])
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_bos_token_id(tok["bos"])
    w.add_eos_token_id(tok["eos"])
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and cfg["tie_word_embeddings"]:
            continue
        a = t.float().numpy().copy()
        if "q_proj" in name and arch == "llama":
            a = permute(a, nh)
        elif "k_proj" in name and arch == "llama":
            a = permute(a, nkv)
        w.add_tensor(hf_to_gguf_name(name), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_llama3_gguf_rope_freqs_matches_transformers(tmp_path):
    d, hf = make_tiny(tmp_path, "llama3-gqa-scaled-tied")
    cfg = json.loads((d / "config.json").read_text())
    rp = cfg["rope_parameters"]
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    factors = llama3_rope_factors(hd, rp["rope_theta"], rp)
    assert not np.allclose(factors, 1.0)
    path = write_llama_gguf(tmp_path / "l3.gguf", hf, cfg, factors)
    model, ckpt = load(path, "cpu", "f32", max_context=128, progress=False)
    assert ckpt.config.rope_scaling["rope_type"] == "freq_factors"
    ours, ref = our_logits(model, IDS), hf_logits(hf, IDS)
    assert rel_err(ours, ref) < 1e-4
    # the same file without rope_freqs is the unscaled model: different
    plain, _ = load(write_llama_gguf(tmp_path / "plain.gguf", hf, cfg), "cpu", "f32", max_context=128,
                    progress=False)
    assert rel_err(our_logits(plain, IDS), ref) > 1e-3
    # the table against a float64 computation of llama.cpp's division
    theta = rp["rope_theta"]
    inv = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)) / factors.astype(np.float64)
    np.testing.assert_allclose(model.cos.numpy(), np.cos(np.outer(np.arange(128), inv)), atol=1e-6)
    gen = Generator(model, ckpt.tokenizer, 128)
    ours_greedy = list(gen.generate(IDS, max_new_tokens=16, stop_ids=[]))
    out = hf.generate(torch.tensor([IDS]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    assert ours_greedy == out[0, len(IDS):].tolist()


def test_qwen2_yarn_gguf_matches_transformers(tmp_path):
    """A qwen2 GGUF with rope.scaling.type yarn (as convert_hf_to_gguf writes Qwen2.5's
    long-context setting) against transformers on the same weights with rope_scaling yarn."""
    d, hf = make_tiny(tmp_path, "qwen2-yarn")
    cfg = json.loads((d / "config.json").read_text())
    meta = [("qwen2.rope.scaling.type", "yarn"), ("qwen2.rope.scaling.factor", 4.0),
            ("qwen2.rope.scaling.original_context_length", 32)]
    path = write_llama_gguf(tmp_path / "q.gguf", hf, cfg, arch="qwen2", meta=meta)
    model, ckpt = load(path, "cpu", "f32", max_context=128, progress=False)
    s = ckpt.config.rope_scaling
    assert s["rope_type"] == "yarn" and s["factor"] == 4.0 and s["original_max_position_embeddings"] == 32
    assert rel_err(our_logits(model, IDS), hf_logits(hf, IDS)) < 1e-4


def test_gguf_unknown_tensor_is_an_error(tmp_path):
    import gguf
    d, hf = make_tiny(tmp_path, "llama2-mha")
    cfg = json.loads((d / "config.json").read_text())
    path = tmp_path / "x.gguf"
    write_llama_gguf(path, hf, cfg)
    r = gguf.GGUFReader(str(path))
    assert r is not None
    # rewrite with one extra tensor llama.cpp would use and hetinfer does not know
    w = gguf.GGUFWriter(str(tmp_path / "y.gguf"), "llama")
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        w.add_key_value(f.name, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data).reshape(tuple(reversed([int(x) for x in t.shape]))))
    w.add_tensor("blk.0.attn_q_norm.weight", np.ones(16, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(hi.LoadError, match=r"blk\.0\.attn_q_norm\.weight"):
        load_checkpoint(tmp_path / "y.gguf", progress=False)


# --- 5. the context limit at the CLI -------------------------------------------------------------
@pytest.fixture(scope="module")
def short_ctx(tmp_path_factory):
    """A tiny model whose max_position_embeddings (24) is far below the old 4096 default."""
    d, _ = make_tiny(tmp_path_factory.mktemp("ctx"), "llama2-mha")
    cfg = json.loads((d / "config.json").read_text())
    cfg["max_position_embeddings"] = 24
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _cli(*args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "hetinfer", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("extra", [(), ("--max-context", "24")])
def test_cli_generation_reaching_the_model_limit_finishes_with_context(short_ctx, extra):
    prompt = " ".join(f"w{i}" for i in range(5, 15))
    p = _cli("generate", "--model", short_ctx, "-n", "100", *extra, prompt)
    assert p.returncode == 0, p.stderr
    assert "finished: context" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    import re
    m = re.search(r"\[(\d+) prompt tokens.*?, (\d+) new tokens", p.stderr)
    assert m and int(m[1]) + int(m[2]) == 24, p.stderr


def test_cli_max_context_above_the_model_limit_is_refused(short_ctx):
    p = _cli("generate", "--model", short_ctx, "-n", "4", "--max-context", "4096", "w1 w2")
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "above the context limit" in p.stderr and "24" in p.stderr, p.stderr


def test_cli_prompt_longer_than_model_limit_is_refused_at_the_length_check(short_ctx):
    prompt = " ".join(f"w{i}" for i in range(5, 35))
    p = _cli("generate", "--model", short_ctx, "-n", "4", prompt)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "but the context holds 24" in p.stderr, p.stderr


def test_cli_help_names_the_default():
    p = _cli("generate", "--help")
    assert "model's own limit" in " ".join(p.stdout.split())


REAL_CONFIGS = {   # config.json of released models (weights not needed), as their hubs ship them
    "llama-3.1-8b": {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
                     "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
                     "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
                     "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
                     "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
                     "pretraining_tp": 1, "rms_norm_eps": 1e-05,
                     "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                     "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
                     "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256},
    "qwen2.5-7b-yarn": {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
                        "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
                        "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28,
                        "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28,
                        "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
                        "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
                        "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False,
                        "vocab_size": 152064,
                        "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}},
}


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_released_configs_load_without_unknown_keys(name):
    c = ModelConfig.from_hf(REAL_CONFIGS[name])
    assert "unknown_config_keys" not in c.extra
    if name.startswith("qwen2"):
        assert c.attention_bias and not c.attention_out_bias and not c.mlp_bias
        assert c.context_limit == 131072                # yarn: factor x original_max_position_embeddings
    else:
        assert c.context_limit == 131072 and not c.attention_bias
