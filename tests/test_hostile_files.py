"""Malformed and hostile model files: each class gets one clear LoadError / ConfigError naming the
file and the field (never a TypeError, KeyError, hang or unbounded allocation).

Every case starts from a valid tiny checkpoint written by the fixtures and corrupts it."""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import threading
import time
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _fixtures_loaders import (CORPUS_TEXT, hf_config, tiny_weights, train_bpe_tokenizer_json, train_sentencepiece,
                               write_hf_dir, write_llama2c)
from hetinfer.config import SIZE_LIMITS, ModelConfig
from hetinfer.errors import ConfigError, LoadError
from hetinfer.loaders import load_checkpoint
from hetinfer.loaders.llama2c import _implied_size
from tiny_models import write_tokenizer

SMALL = dict(hidden=64, inter=64, layers=1, heads=4, kv=2, vocab=32, ctx=16)


def hf_dir(path, tokenizer=True, shards=1, **over):
    """A valid tiny HF directory (with a word-level tokenizer.json of SMALL's vocab)."""
    d = write_hf_dir(path, tiny_weights(d=SMALL), hf_config(d=SMALL, **over), shards=shards)
    if tokenizer:
        write_tokenizer(d, SMALL["vocab"])
    return d


def st_parts(f):
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def st_write(f, header=None, body=b"", raw: bytes | None = None, hlen: int | None = None):
    hb = raw if raw is not None else json.dumps(header).encode()
    f.write_bytes((len(hb) if hlen is None else hlen).to_bytes(8, "little") + hb + body)


def load_error(path, cls=LoadError, **kw):
    """The error load_checkpoint(path) raises, in a thread that must finish (a FIFO opened for
    reading would block it forever)."""
    box = {}

    def run():
        try:
            load_checkpoint(path, progress=False, **kw)
        except BaseException as e:     # noqa: BLE001  (checked below)
            box["e"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), f"load_checkpoint({path}) blocked"
    e = box.get("e")
    assert isinstance(e, cls), f"expected {cls.__name__}, got {e!r}"
    return str(e)


# ---- safetensors ----------------------------------------------------------------------------
EMB = "model.embed_tokens.weight"
NORM = "model.norm.weight"


def _set(name, key, value):
    def f(h):
        h[name][key] = value
    return f


HEADER_CASES = {
    "entry-not-object": (lambda h: h.__setitem__(NORM, [1, 2]), "expected an object with dtype"),
    "no-dtype": (lambda h: h[NORM].pop("dtype"), "has no 'dtype'"),
    "unknown-dtype": (_set(NORM, "dtype", "F12"), "dtype 'F12' is unknown"),
    "dtype-not-string": (_set(NORM, "dtype", 7), "is unknown"),
    "dtype-list": (_set(NORM, "dtype", ["F32"]), "is unknown"),
    "negative-dim": (_set(NORM, "shape", [-64]), "non-negative integers"),
    "bool-dim": (_set(NORM, "shape", [True]), "non-negative integers"),
    "float-dim": (_set(NORM, "shape", [64.0]), "non-negative integers"),
    "shape-not-list": (_set(NORM, "shape", "64"), "non-negative integers"),
    "offsets-three": (_set(NORM, "data_offsets", [0, 4, 8]), "two non-negative integers"),
    "offsets-negative": (_set(NORM, "data_offsets", [-256, 0]), "two non-negative integers"),
    "offsets-float": (_set(NORM, "data_offsets", [0.0, 256.0]), "two non-negative integers"),
    "offsets-reversed": (lambda h: h[NORM].__setitem__("data_offsets", h[NORM]["data_offsets"][::-1]),
                         "end before they begin"),
    "offsets-past-end": (lambda h: h[NORM].__setitem__("data_offsets", [10 ** 12, 10 ** 12 + 256]),
                         "runs past the end"),
    "length-mismatch": (_set(NORM, "shape", [65]), "needs 260"),
    "overlap": (lambda h: h[NORM].__setitem__("data_offsets", [h[EMB]["data_offsets"][0],
                                                                h[EMB]["data_offsets"][0] + 256]), "overlap"),
    "metadata-not-object": (lambda h: h.__setitem__("__metadata__", ["pt"]), "__metadata__"),
    "metadata-not-strings": (lambda h: h.__setitem__("__metadata__", {"format": 1}), "__metadata__"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_safetensors_header_entries(tmp_path, case, capsys):
    d = hf_dir(tmp_path / "m", tokenizer=False)
    f = d / "model.safetensors"
    header, body = st_parts(f)
    mutate, words = HEADER_CASES[case]
    mutate(header)
    st_write(f, header, body)
    msg = load_error(d)
    assert str(f) in msg and words in msg, msg
    if case not in ("metadata-not-object", "metadata-not-strings", "overlap"):
        assert NORM in msg or "model.norm" in msg, msg
    from hetinfer.cli import main                       # `hetinfer info` uses the same loader
    assert main(["info", str(d)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hetinfer: error:") and words in err and "\n" not in err


@pytest.mark.parametrize("raw, hlen, words", [
    (None, 1 << 40, "claims 1099511627776 bytes"),
    (b"{not json", None, "line 1 column 2"),
    (b'{"a": \xff\xfe}', None, "not valid UTF-8"),
    (b"[1, 2]", None, "holds a JSON array; expected an object"),
    (b"[" * 200000 + b"]" * 200000, None, "nested too deeply"),
    (b'{"x": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, "x": {}}', None, "more than once"),
])
def test_safetensors_header_framing(tmp_path, raw, hlen, words):
    d = hf_dir(tmp_path / "m", tokenizer=False)
    f = d / "model.safetensors"
    _, body = st_parts(f)
    st_write(f, raw=raw or b"{}", body=body, hlen=hlen)
    msg = load_error(d)
    assert str(f) in msg and words in msg, msg


def test_safetensors_header_larger_than_the_format_allows(tmp_path):
    d = hf_dir(tmp_path / "m", tokenizer=False)
    f = d / "model.safetensors"
    st_write(f, raw=b"{}", hlen=150_000_000)
    os.truncate(f, 200_000_000)            # sparse: the length fits in the file, yet is refused unread
    tracemalloc.start()
    msg = load_error(d)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "at most 100000000" in msg and peak < 20 << 20, (msg, peak)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    base = hf_dir(tmp_path_factory.mktemp("fuzz") / "m", tokenizer=False)
    return base, (base / "model.safetensors").read_bytes()


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_fuzz_safetensors_truncate_and_flip(fuzz_dir, data):
    """Truncations of a valid file and byte flips in its header: the load succeeds (and then every
    tensor reads) or raises LoadError / ConfigError; nothing else."""
    base, good = fuzz_dir
    hlen = int.from_bytes(good[:8], "little")
    buf = bytearray(good)
    for _ in range(data.draw(st.integers(0, 4), label="flips")):
        pos = data.draw(st.integers(0, 8 + hlen - 1), label="pos")
        buf[pos] = data.draw(st.integers(0, 255), label="byte")
    cut = data.draw(st.one_of(st.just(len(buf)), st.integers(0, len(buf))), label="cut")
    f = base / "model.safetensors"
    f.unlink()                       # a new inode: mappings of earlier examples stay valid
    f.write_bytes(bytes(buf[:cut]))
    try:
        ck = load_checkpoint(base, progress=False)
    except (LoadError, ConfigError) as e:
        assert str(f) in str(e) or str(base) in str(e), e
        return
    for name in ck.names():
        try:
            ck.tensor(name)
        except LoadError:            # e.g. a flipped dtype the loader cannot convert
            pass


# ---- the shard index ------------------------------------------------------------------------
def _index(d):
    return json.loads((d / "model.safetensors.index.json").read_text())


def _write_index(d, idx):
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))


@pytest.mark.parametrize("case, words", [
    ("no-weight-map", "no 'weight_map' object"),
    ("weight-map-list", "no 'weight_map' object"),
    ("shard-not-string", "expected a shard file name"),
    ("traversal", "points outside the model directory"),
    ("absolute", "points outside the model directory"),
    ("missing-shard", "named in the index is missing"),
    ("tensor-not-in-shard", "does not hold it"),
    ("index-array", "holds a JSON array; expected an object"),
    ("stored-twice", "is stored twice"),
])
def test_shard_index(tmp_path, case, words):
    d = hf_dir(tmp_path / "m", tokenizer=False, shards=2)
    idx = _index(d)
    wm = idx["weight_map"]
    first, second = sorted(set(wm.values()))
    if case == "no-weight-map":
        del idx["weight_map"]
    elif case == "weight-map-list":
        idx["weight_map"] = list(wm.items())
    elif case == "shard-not-string":
        wm[NORM] = 3
    elif case == "traversal":
        (tmp_path / "outside.safetensors").write_bytes((d / first).read_bytes())
        wm[NORM] = "../outside.safetensors"
    elif case == "absolute":
        wm[NORM] = str(d / first)
    elif case == "missing-shard":
        wm[NORM] = "model-00009-of-00009.safetensors"
    elif case == "tensor-not-in-shard":
        wm[NORM] = first if wm[NORM] == second else second
    elif case == "index-array":
        idx = [wm]
    elif case == "stored-twice":                   # a second shard holding a tensor of the first
        from safetensors.numpy import load_file, save_file
        t = load_file(str(d / second))
        t.update({k: v for k, v in load_file(str(d / first)).items() if k == EMB})
        save_file(t, str(d / second))
        wm[EMB] = first
    _write_index(d, idx)
    msg = load_error(d)
    assert str(d) in msg and words in msg, msg


# ---- config.json and the other JSON files ----------------------------------------------------
JSON_FILES = ["config.json", "tokenizer_config.json", "generation_config.json", "tokenizer.json"]


@pytest.mark.parametrize("name", JSON_FILES)
@pytest.mark.parametrize("content, words", [
    (b'{"a": "caf\xe9"}', ["not valid UTF-8", "offset 10", "line 1"]),
    (b'{\n  "a": 1,\n  "b": }', ["valid", "line ", " column "]),
    (b'["a list"]', ["array|sequence", "expected an object|expected struct"]),   # ours | the tokenizers library's
])
def test_json_files(tmp_path, name, content, words):
    d = hf_dir(tmp_path / "m")
    (d / name).write_bytes(content)
    msg = load_error(d)
    assert str(d / name) in msg, msg
    assert all(any(alt in msg for alt in w.split("|")) for w in words), msg


BAD_CONFIG = [
    ({"hidden_size": "64"}, "hidden_size is '64'"),
    ({"num_hidden_layers": True}, "num_hidden_layers is True"),
    ({"num_hidden_layers": 2 ** 31}, (f"num_hidden_layers is 2147483648; expected a positive integer (at most "
                                      f"{SIZE_LIMITS['num_hidden_layers']})")),
    ({"vocab_size": 10 ** 12}, "vocab_size is 1000000000000"),
    ({"intermediate_size": 64.0}, "intermediate_size is 64.0"),
    ({"num_attention_heads": 0}, "num_attention_heads is 0"),
    ({"num_key_value_heads": -2}, "num_key_value_heads is -2"),
    ({"max_position_embeddings": None, "head_dim": "x"}, "head_dim is 'x'"),
    ({"hidden_size": 66}, "hidden_size 66 is not divisible by num_attention_heads 4"),
    ({"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps is nan; expected a positive finite number"),
    ({"rms_norm_eps": -1e-5}, "rms_norm_eps is -1e-05"),
    ({"rope_theta": float("inf")}, "rope_theta is inf"),
    ({"rope_theta": "10000"}, "rope_theta is '10000'"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings is 'false'; expected true or false"),
    ({"eos_token_id": 10 ** 6}, "eos_token_id 1000000 is outside the vocabulary (vocab_size 32)"),
    ({"bos_token_id": "1"}, "bos_token_id is '1'"),
    ({"eos_token_id": [2, None]}, "eos_token_id is [2, None]"),
    ({"rope_scaling": "yes"}, "rope_scaling is 'yes'"),
    ({"rope_parameters": [1]}, "rope_parameters is [1]"),
    ({"architectures": "LlamaForCausalLM"}, "architectures is 'LlamaForCausalLM'"),
    ({"layer_types": 3}, "layer_types is 3"),
    ({"hidden_act": ["silu"]}, "hidden_act ['silu']"),
    ({"num_hidden_layers": None}, "num_hidden_layers is None"),
]


@pytest.mark.parametrize("over, words", BAD_CONFIG, ids=[next(iter(o)) + str(i) for i, (o, _) in enumerate(BAD_CONFIG)])
def test_config_values(tmp_path, over, words):
    d = hf_dir(tmp_path / "m", tokenizer=False)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(over)
    (d / "config.json").write_text(json.dumps(cfg))      # NaN / Infinity as Python's json writes them
    tracemalloc.start()
    msg = load_error(d, ConfigError)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert msg.startswith(str(d / "config.json")) and words in msg, msg
    assert peak < 20 << 20, peak                         # refused before anything is sized from it


def test_missing_required_config_key(tmp_path):
    d = hf_dir(tmp_path / "m", tokenizer=False)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["intermediate_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    assert "lacks required field 'intermediate_size'" in load_error(d, ConfigError)


@settings(max_examples=150, deadline=None)
@given(key=st.sampled_from(sorted(set(hf_config(d=SMALL)) | {"rope_scaling", "head_dim", "layer_types",
                                                               "quantization_config", "rope_parameters"})),
       value=st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=8),
                          lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids,
                                                                                     max_size=3), max_leaves=6))
def test_fuzz_config_values(key, value):
    """Any JSON value for any config key: a ModelConfig or one ConfigError naming the source."""
    cfg = dict(hf_config(d=SMALL), **{key: value})
    try:
        c = ModelConfig.from_hf(cfg, source="cfg.json")
    except ConfigError as e:
        assert str(e).startswith("cfg.json"), e
        return
    assert 0 < c.num_hidden_layers <= SIZE_LIMITS["num_hidden_layers"] and math.isfinite(c.rms_norm_eps)


# ---- tokenizers -----------------------------------------------------------------------------
def test_missing_tokenizer_is_a_clear_error_where_text_is_needed(tmp_path, capsys):
    from hetinfer import LLM, SamplingParams
    from hetinfer.chat_template import ChatTemplate
    d = hf_dir(tmp_path / "m", tokenizer=False)
    ck = load_checkpoint(d, progress=False)              # token-id use keeps working
    want = f"no tokenizer.json or tokenizer.model in {d}"
    for call in (lambda: ck.tokenizer.encode("w3"), lambda: ck.tokenizer.decode([3]),
                 lambda: ChatTemplate.from_checkpoint(ck)):
        with pytest.raises(LoadError, match="no tokenizer.json or tokenizer.model") as e:
            call()
        assert want in str(e.value)
    llm = LLM(str(d))
    ids = list(llm.generator.generate([3, 4, 5], SamplingParams(max_tokens=3, temperature=0.0)))
    assert 1 <= len(ids) <= 3 and all(0 <= i < SMALL["vocab"] for i in ids)
    short = SamplingParams(max_tokens=3)
    for call in (lambda: llm.generate("w3 w4", short), lambda: llm.generate([3, 4], short),
                 lambda: llm.chat([{"role": "user", "content": "hi"}], short)):
        with pytest.raises(LoadError, match="no tokenizer.json or tokenizer.model"):
            call()
    from hetinfer.cli import main
    assert main(["info", str(d)]) == 0
    assert "tokenizer: none (no tokenizer.json or tokenizer.model" in capsys.readouterr().out
    from hetinfer import quant                          # an int8 directory behaves the same
    q = quant.save_quantized(ck, tmp_path / "q", group=32, progress=False)
    with pytest.raises(LoadError, match="no tokenizer.json or tokenizer.model in"):
        load_checkpoint(q, progress=False).tokenizer.encode("w3")


def _bpe_dir(tmp_path):
    """A model of 400 rows with a trained byte-level BPE tokenizer.json of 400 ids + tokenizer_config.json."""
    d = write_hf_dir(tmp_path / "m", tiny_weights(d=SMALL, vocab=400), hf_config(d=SMALL, vocab=400))
    train_bpe_tokenizer_json(d)
    assert load_checkpoint(d, progress=False).tokenizer.vocab_size == 400      # the valid start
    return d


def test_tokenizer_json_the_library_rejects(tmp_path):
    d = _bpe_dir(tmp_path)
    tj = json.loads((d / "tokenizer.json").read_text())
    merges = tj["model"]["merges"]
    merges.append(["zzqq", "xxyy"] if isinstance(merges[0], list) else "zzqq xxyy")
    (d / "tokenizer.json").write_text(json.dumps(tj))
    msg = load_error(d)
    assert str(d / "tokenizer.json") in msg and "not a valid tokenizer.json" in msg and "zzqq" in msg, msg


@pytest.mark.parametrize("case, where, words", [
    ("bos-unknown", "tokenizer_config.json", "bos_token '<nope>' is not in the vocabulary"),
    ("bos-type", "tokenizer_config.json", "bos_token is '5'"),
    ("add-bos-type", "tokenizer_config.json", "add_bos_token is 'yes'"),
    ("added-tokens", "tokenizer_config.json", "added_tokens_decoder entry 'x'"),
    ("gen-eos-type", "generation_config.json", "eos_token_id is x"),
    ("gen-eos-range", "generation_config.json", "eos_token_id 400 is outside the vocabulary of"),
    ("vocab-larger", "tokenizer.json", "ids up to 399 but the model's embedding has 300 rows"),
])
def test_special_ids_and_vocab_size(tmp_path, case, where, words):
    d = _bpe_dir(tmp_path)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    if case == "bos-unknown":
        tc["bos_token"] = "<nope>"
    elif case == "bos-type":
        tc["bos_token"] = 5
    elif case == "add-bos-type":
        tc["add_bos_token"] = "yes"
    elif case == "added-tokens":
        tc["added_tokens_decoder"] = {"x": {"content": "<|im_end|>"}}
    elif case == "gen-eos-type":
        (d / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    elif case == "gen-eos-range":
        (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 400]}))
    elif case == "vocab-larger":
        write_hf_dir(d, tiny_weights(d=SMALL, vocab=300), hf_config(d=SMALL, vocab=300))
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    msg = load_error(d)
    assert str(d / where) in msg and words in msg, msg


@pytest.mark.parametrize("content", [b"", b"garbage" * 20, b"\n\x05hello"])
def test_tokenizer_model_that_does_not_parse(tmp_path, content):
    d = hf_dir(tmp_path / "m", tokenizer=False)
    (d / "tokenizer.model").write_bytes(content)
    msg = load_error(d)
    assert str(d / "tokenizer.model") in msg and "not a valid SentencePiece tokenizer.model" in msg, msg


# ---- llama2.c -------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [0, 1, 2])
@pytest.mark.parametrize("tied", [False, True])
def test_llama2c_implied_size_is_the_written_size(tmp_path, version, tied):
    """The size computed from the header alone equals what the llama2.c writer wrote, so one byte
    less is refused before any layout is built."""
    f = tmp_path / "model.bin"
    write_llama2c(f, tiny_weights(d=SMALL, tied=tied), version, d=SMALL, tied=tied, group_size=32)
    H, I, L, nh, nkv, V, seq = (SMALL[k] for k in ("hidden", "inter", "layers", "heads", "kv", "vocab", "ctx"))
    assert _implied_size(version, H, I, L, nh, nkv, V, seq, tied, 32) == f.stat().st_size
    f.write_bytes(f.read_bytes()[:-1])
    assert "truncated" in load_error(f)


def _llama2c_header(f, **values):
    """Rewrite the 7 header ints of a version-1 file (dim, hidden_dim, n_layers, n_heads,
    n_kv_heads, vocab_size, seq_len) and the v2 group size."""
    data = bytearray(f.read_bytes())
    names = ["dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"]
    vals = list(struct.unpack_from("<7i", data, 8))
    for k, v in values.items():
        if k == "group_size":
            struct.pack_into("<i", data, 37, v)
        else:
            vals[names.index(k)] = v
    struct.pack_into("<7i", data, 8, *vals)
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("version, values, words", [
    (1, {"n_layers": 2 ** 31 - 1}, "n_layers is 2147483647; expected a positive integer (at most 4096)"),
    (1, {"n_layers": 4000}, "truncated"),
    (1, {"vocab_size": 1 << 24, "dim": 1 << 12, "hidden_dim": 1 << 18}, "truncated"),
    (1, {"dim": 1 << 16}, "head size dim / n_heads is 16384"),
    (1, {"n_heads": 0}, "n_heads is 0"),
    (1, {"dim": -64}, "dim is -64"),
    (1, {"n_heads": 3}, "dim 64 is not n_heads 3 times an even head size"),
    (1, {"n_heads": 64}, "dim 64 is not n_heads 64 times an even head size"),
    (1, {"n_kv_heads": 3}, "n_heads 4 is not a multiple of n_kv_heads 3"),
    (2, {"group_size": 0}, "group_size 0 is not positive"),
    (2, {"group_size": 48}, "not a multiple of group_size 48"),
])
def test_llama2c_header(tmp_path, version, values, words):
    f = tmp_path / "model.bin"
    write_llama2c(f, tiny_weights(d=SMALL), version, d=SMALL, group_size=32)
    _llama2c_header(f, **values)
    tracemalloc.start()
    msg = load_error(f)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert str(f) in msg and words in msg, msg
    assert peak < 5 << 20, peak             # refused from the header, before any layout is built


def export_tokenizer_bin(sp_path, out):
    """tokenizer.bin as karpathy/llama2.c's tokenizer.py export() writes it."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    toks, scores = [], []
    for i in range(sp.get_piece_size()):
        t = sp.id_to_piece(i)
        t = "\n<s>\n" if i == sp.bos_id() else "\n</s>\n" if i == sp.eos_id() else t
        toks.append(t.replace("\u2581", " ").encode("utf-8"))
        scores.append(sp.get_score(i))
    with open(out, "wb") as f:
        f.write(struct.pack("<I", max(len(t) for t in toks)))
        for b, s in zip(toks, scores):
            f.write(struct.pack("<fI", s, len(b)))
            f.write(b)
    return out


@pytest.fixture(scope="module")
def llama2c_bin_dir(tmp_path_factory):
    """model.bin (vocab 400) + tokenizer.bin exported from a trained tokenizer.model kept elsewhere."""
    d = tmp_path_factory.mktemp("l2c")
    sp = train_sentencepiece(tmp_path_factory.mktemp("sp") / "tokenizer.model")
    write_llama2c(d / "model.bin", tiny_weights(d=SMALL, vocab=400), 1, d=SMALL, vocab=400)
    export_tokenizer_bin(sp, d / "tokenizer.bin")
    return d, sp


def test_llama2c_tokenizer_bin_matches_sentencepiece(llama2c_bin_dir):
    import sentencepiece as spm
    d, sp_path = llama2c_bin_dir
    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    ck = load_checkpoint(d / "model.bin", progress=False)        # no tokenizer.model beside it
    tok = ck.tokenizer
    assert tok.source == d / "tokenizer.bin" and tok.bos_id == 1 and tok.eos_ids == [2] and tok.vocab_size == 400
    for line in CORPUS_TEXT.splitlines():
        assert tok.encode(line) == [1] + sp.encode(line), line
        assert tok.decode(sp.encode(line)) == sp.decode(sp.encode(line)), line


@pytest.mark.parametrize("case, words", [
    ("length-past-end", "expected 0.."),
    ("truncated", "tokenizer.bin has"),
    ("trailing", "bytes after its 400 tokens"),
    ("max-len", "max_token_length is -1"),
])
def test_llama2c_tokenizer_bin_lengths(llama2c_bin_dir, tmp_path, case, words):
    d, _ = llama2c_bin_dir
    data = bytearray((d / "tokenizer.bin").read_bytes())
    (tmp_path / "model.bin").symlink_to(d / "model.bin")
    if case == "length-past-end":
        struct.pack_into("<i", data, 4 + 4, 1 << 30)             # token 0's length
    elif case == "truncated":
        data = data[:len(data) // 2]
    elif case == "trailing":
        data += b"\0" * 9
    elif case == "max-len":
        struct.pack_into("<i", data, 0, -1)
    (tmp_path / "tokenizer.bin").write_bytes(bytes(data))
    msg = load_error(tmp_path / "model.bin")
    assert str(tmp_path / "tokenizer.bin") in msg and words in msg, msg


# ---- the model path -------------------------------------------------------------------------
def test_fifo_device_socket_refused_without_blocking(tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    assert "is a FIFO (named pipe)" in load_error(fifo)
    assert "is a character device" in load_error("/dev/zero")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tmp_path / "s"))
        assert "is a socket" in load_error(tmp_path / "s")
    finally:
        sock.close()


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                                  "chat_template.jinja"])
def test_fifo_inside_a_model_directory(tmp_path, name):
    d = hf_dir(tmp_path / "m")
    if (d / name).exists():
        (d / name).unlink()
    os.mkfifo(d / name)
    msg = load_error(d)
    assert str(d / name) in msg and "FIFO" in msg, msg


def test_llama2c_tokenizer_fifo(tmp_path):
    write_llama2c(tmp_path / "model.bin", tiny_weights(d=SMALL), 1, d=SMALL)
    os.mkfifo(tmp_path / "tokenizer.model")
    assert "FIFO" in load_error(tmp_path / "model.bin")


def test_symlinks_and_directories(tmp_path):
    d = hf_dir(tmp_path / "m")
    (tmp_path / "link").symlink_to(d)
    assert load_checkpoint(tmp_path / "link", progress=False).config.hidden_size == 64
    f = tmp_path / "model.bin"
    train_sentencepiece(tmp_path / "tokenizer.model")
    write_llama2c(f, tiny_weights(d=SMALL, vocab=400), 1, d=SMALL, vocab=400)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "tokenizer.model").symlink_to(tmp_path / "tokenizer.model")
    (tmp_path / "sub" / "m.bin").symlink_to(f)                 # symlinks to regular files are fine
    assert load_checkpoint(tmp_path / "sub" / "m.bin", progress=False).config.vocab_size == 400
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert "does not exist" in load_error(tmp_path / "dangling")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.gguf").write_bytes(b"")
    msg = load_error(tmp_path / "empty")
    assert "without config.json" in msg and "x.gguf" in msg, msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_directory_and_file(tmp_path):
    d = hf_dir(tmp_path / "m")
    os.chmod(d / "config.json", 0)
    try:
        assert "cannot read" in load_error(d) or "Permission" in load_error(d)
    finally:
        os.chmod(d / "config.json", 0o644)
    os.chmod(d, 0)
    try:
        assert "permission denied" in load_error(d)
    finally:
        os.chmod(d, 0o755)



# ---- regressions found by tools/fuzz_inputs.py (each one root cause) ----------------------------------
@pytest.mark.parametrize("key", ["rms_norm_eps", "rope_theta"])
def test_config_number_too_large_for_a_float(tmp_path, key):
    """A JSON integer of 400 digits: math.isfinite raised OverflowError (config.is_positive_number)."""
    d = hf_dir(tmp_path / "m")
    (d / "config.json").write_text(json.dumps(hf_config(d=SMALL, **{key: 10 ** 400})))
    assert key in load_error(d, ConfigError)


@pytest.mark.parametrize("scaling, words", [
    ({"rope_type": "yarn", "factor": 2.0, "beta_fast": math.nan}, "beta_fast"),
    ({"rope_type": "yarn", "factor": 2.0, "attention_factor": "x"}, "attention_factor"),
    ({"rope_type": "yarn", "factor": 2.0, "truncate": "no"}, "truncate"),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 2 ** 63}, "original_max_position"),
    ({"rope_type": "yarn", "factor": 1e300, "original_max_position_embeddings": 32}, "extends the context"),
    ({"rope_type": "dynamic", "factor": 2.0 ** 40}, "extends the context"),
    ({"rope_type": "linear", "factor": "2"}, "factor"),
    ({"rope_type": "linear", "factor": math.inf}, "factor"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": math.nan}, "low_freq_factor"),
    ({"rope_type": "freq_factors", "factors": [1.0, 0.0]}, "factors[1]"),
])
def test_rope_scaling_values_are_checked_when_the_config_loads(tmp_path, scaling, words):
    """Each of these loaded, then failed while the RoPE table was built at generate time (NaN to
    int, float('x')) or asked for a 512 TiB table (a dynamic factor of 2^40)."""
    d = hf_dir(tmp_path / "m")
    (d / "config.json").write_text(json.dumps(hf_config(d=SMALL, rope_scaling=scaling), allow_nan=True))
    assert words in load_error(d, ConfigError)


def test_added_tokens_decoder_id_that_is_a_unicode_digit(tmp_path):
    """'²'.isdigit() is true and int('²') a ValueError (tokenizer.from_tokenizer_json)."""
    d = hf_dir(tmp_path / "m")
    (d / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"\u00b2": {"content": "x"}}}))
    assert "added_tokens_decoder" in load_error(d)


def test_int8_scale_dtype_of_the_wrong_type(tmp_path):
    """quantization_config.scale_dtype an object: unhashable in `sd not in SCALE_DTYPES` (int8_dir)."""
    from hetinfer.quant import save_quantized
    q = save_quantized(load_checkpoint(hf_dir(tmp_path / "m"), progress=False), tmp_path / "q", group=32,
                       progress=False, method="rtn")
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"]["scale_dtype"] = {"a": 1}
    (q / "config.json").write_text(json.dumps(cfg))
    assert "scale_dtype" in load_error(q)


@pytest.mark.parametrize("case", ["hlen-short-by-a-space", "gap", "slack-at-end"])
def test_safetensors_tensors_must_fill_the_data_section(tmp_path, case):
    """The safetensors library requires the tensors back to back over the whole data section; a
    header length one byte short (dropping a padding space) read every tensor shifted by a byte."""
    d = hf_dir(tmp_path / "m")
    f = d / "model.safetensors"
    header, body = st_parts(f)
    raw = json.dumps(header).encode() + b"  "
    if case == "hlen-short-by-a-space":
        st_write(f, raw=raw[:-1], body=b" " + body)      # the header's last space counted as data
    elif case == "gap":
        for e in header.values():
            if isinstance(e, dict) and e["data_offsets"][0] > 0:
                e["data_offsets"] = [o + 4 for o in e["data_offsets"]]
        st_write(f, header, body + b"\0" * 4)
    else:
        st_write(f, header, body + b"\0" * 64)
    msg = load_error(d)
    assert "model.safetensors" in msg and ("back to back" in msg or "fill it" in msg), msg


@pytest.mark.parametrize("field", ["hidden_dim", "n_kv_heads"])
def test_llama2c_header_smaller_than_the_file(tmp_path, field):
    """A header claiming smaller sizes implied fewer bytes than the file holds: accepted, every
    tensor read from the wrong place. export.py writes exactly the layout."""
    f = tmp_path / "model.bin"
    write_llama2c(f, tiny_weights(d=SMALL), 1, d=SMALL)
    _llama2c_header(f, **{field: 1 if field == "n_kv_heads" else 32})
    assert "does not describe this file" in load_error(f)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"])
@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_broken_symlink_named_like_a_model_file_is_an_error(tmp_path, name, kind):
    """A dangling symlink (or a loop) named tokenizer.json was taken for an absent file: the model
    loaded without its tokenizer (or without its chat template), silently."""
    d = hf_dir(tmp_path / "m")
    p = d / name
    if p.exists():
        p.unlink()
    if kind == "dangling":
        p.symlink_to(d / "nowhere")
    else:
        p.symlink_to(d / (name + ".b"))
        (d / (name + ".b")).symlink_to(p)
    msg = load_error(d)
    assert name in msg and ("symlink to a missing file" in msg or "symbolic links" in msg), msg


@pytest.mark.parametrize("path", [5, b"/nowhere", ""])
def test_checkpoint_path_of_the_wrong_type_or_empty(path):
    """load_checkpoint(5) / (b'...') raised TypeError from os.fspath / pathlib; "" meant '.'."""
    assert "checkpoint path" in load_error(path)


def _tok_dir(tmp_path, **edit):
    d = hf_dir(tmp_path / "m")
    tj = json.loads((d / "tokenizer.json").read_text())
    (d / "tokenizer.json").write_text(json.dumps(dict(tj, **edit)))
    return d


@pytest.mark.parametrize("normalizer", [
    {"type": "Replace", "pattern": {"String": "w"}, "content": "w" * 100_000},
    {"type": "Sequence", "normalizers": [{"type": "Replace", "pattern": {"String": "w"}, "content": "w" * 100}] * 6},
    {"type": "Sequence", "normalizers": [{"type": "Replace", "pattern": {"Regex": ""}, "content": "x" * 40}] * 4},
])
def test_tokenizer_that_grows_text_is_refused_when_it_loads(tmp_path, normalizer):
    """A Replace normalizer that makes 10^12 characters of each one: the tokenizers library ran out
    of memory on the first prompt and Rust aborted the process (no exception to catch)."""
    msg = load_error(_tok_dir(tmp_path, normalizer=normalizer))
    assert "tokenizer.json" in msg and "normalizer" in msg, msg


def test_tokenizer_regex_past_its_retry_limit_is_one_input_error(tmp_path):
    """A catastrophic Split regex: Oniguruma gives up, the tokenizers library panics, and pyo3
    raises PanicException, a BaseException that escaped every `except Exception`."""
    from hetinfer.errors import InputError
    split = {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False}
    tok = load_checkpoint(_tok_dir(tmp_path, pre_tokenizer=split), progress=False).tokenizer
    with pytest.raises(InputError, match="failed to encode the text"):
        tok.encode("a" * 40 + "b")


def test_prompt_far_longer_than_the_context_is_refused_before_tokenizing(tmp_path):
    """A 60 MB prompt took the tokenizers library 80 s and 10 GB (then an abort under a memory
    cap); with a context to fit, it is refused from its length (or a prefix's tokens) at once."""
    from hetinfer.errors import InputError
    tok = load_checkpoint(hf_dir(tmp_path / "m"), progress=False).tokenizer
    for text in ("w3 " * 20_000_000, "w3 " * 100_000):
        t0 = time.perf_counter()
        with pytest.raises(InputError, match="more tokens than the context"):
            tok.encode(text, max_tokens=64)
        assert time.perf_counter() - t0 < 2.0
    assert len(tok.encode("w3 " * 100_000)) >= 100_000           # without a context: tokenized whole
    assert tok.encode("w3 w4", max_tokens=64) == tok.encode("w3 w4")
