"""Hostile GGUF files: every header field validated before use, each failure ONE LoadError (or
ConfigError) naming the file, the field or tensor, and what was expected.

A valid tiny file is written with gguf's GGUFWriter (tests/_fixtures_loaders.write_gguf), split
into editable parts with gguf's GGUFReader (``Gguf.parse``; rebuilding the unedited parts gives
the writer's bytes back exactly, which ``test_parts_round_trip_the_writer`` checks) and then
corrupted one field at a time.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
from _fixtures_loaders import random_kquant_bytes, tiny_weights, write_gguf
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType as T
from gguf.quants import quantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hetinfer.errors import ConfigError, LoadError
from hetinfer.loaders import load_checkpoint
from hetinfer.loaders.gguf_file import MAX_ALIGNMENT, SUPPORTED_QUANTS, read_gguf
from hetinfer.tokenizer import Tokenizer

SMALL = dict(hidden=64, inter=64, layers=2, heads=4, kv=2, vocab=260, ctx=64)


# ---- a GGUF file as editable parts ----------------------------------------------------------
def enc_value(vtype: T, value, etype: T | None = None) -> bytes:
    """GGUF encoding of one metadata value: u32 type, then the payload (arrays: u32 element type,
    u64 count, elements; strings: u64 length, utf-8)."""
    return struct.pack("<I", vtype) + _payload(vtype, value, etype)


_FMT = {T.UINT8: "<B", T.INT8: "<b", T.UINT16: "<H", T.INT16: "<h", T.UINT32: "<I", T.INT32: "<i",
        T.FLOAT32: "<f", T.BOOL: "<?", T.UINT64: "<Q", T.INT64: "<q", T.FLOAT64: "<d"}


def _payload(vtype: T, value, etype=None) -> bytes:
    if vtype == T.STRING:
        b = value.encode()
        return struct.pack("<Q", len(b)) + b
    if vtype == T.ARRAY:
        if etype == T.ARRAY:     # value: list of (element type, list) pairs
            return struct.pack("<IQ", T.ARRAY, len(value)) + b"".join(_payload(T.ARRAY, v, e) for e, v in value)
        return struct.pack("<IQ", etype, len(value)) + b"".join(_payload(etype, v) for v in value)
    return struct.pack(_FMT[vtype], value)


@dataclass
class Info:
    name: str
    dims: list
    qtype: int
    offset: int      # relative to the data section
    nbytes: int      # from gguf's reader (not written)


@dataclass
class Gguf:
    kvs: list = field(default_factory=list)    # [key, encoded value (type + payload)]
    infos: list = field(default_factory=list)
    data: bytes = b""
    align: int = 32
    version: int = 3
    counts: tuple | None = None                 # (n_tensors, n_kv) to claim instead of the real ones

    @classmethod
    def parse(cls, path: Path) -> Gguf:
        r = GGUFReader(str(path))
        g = cls(align=int(r.alignment))
        for f in r.fields.values():
            if not f.name.startswith("GGUF."):
                g.kvs.append([f.name, b"".join(p.tobytes() for p in f.parts[2:])])
        for t in r.tensors:
            g.infos.append(Info(t.name, [int(x) for x in t.shape], int(t.tensor_type),
                                int(t.data_offset) - r.data_offset, int(t.n_bytes)))
        g.data = path.read_bytes()[r.data_offset:]
        return g

    def set(self, key: str, vtype: T, value, etype: T | None = None) -> Gguf:
        return self.set_raw(key, enc_value(vtype, value, etype))

    def set_raw(self, key: str, encoded: bytes) -> Gguf:
        for kv in self.kvs:
            if kv[0] == key:
                kv[1] = encoded
                return self
        self.kvs.append([key, encoded])
        return self

    def drop(self, key: str) -> Gguf:
        self.kvs = [kv for kv in self.kvs if kv[0] != key]
        return self

    def info(self, name: str) -> Info:
        return next(i for i in self.infos if i.name == name)

    def build(self) -> bytes:
        n_t, n_kv = self.counts or (len(self.infos), len(self.kvs))
        out = bytearray(b"GGUF" + struct.pack("<IQQ", self.version, n_t, n_kv))
        for key, val in self.kvs:
            out += _payload(T.STRING, key) + val
        for i in self.infos:
            out += _payload(T.STRING, i.name) + struct.pack("<I", len(i.dims))
            out += struct.pack(f"<{len(i.dims)}Q", *i.dims) + struct.pack("<IQ", i.qtype, i.offset)
        out += b"\0" * (-len(out) % self.align)
        return bytes(out) + self.data

    def write(self, path: Path) -> Path:
        path.write_bytes(self.build())
        return path


def relayout(g: Gguf, align: int) -> Gguf:
    """The same tensors packed at another alignment (offsets and padding recomputed)."""
    data, infos = bytearray(), []
    for i in g.infos:
        data += b"\0" * (-len(data) % align)
        infos.append(Info(i.name, i.dims, i.qtype, len(data), i.nbytes))
        data += g.data[i.offset:i.offset + i.nbytes]
    out = Gguf(list(g.kvs), infos, bytes(data), align)
    return out.set("general.alignment", T.UINT32, align)


@pytest.fixture
def small(tmp_path) -> Path:
    return write_gguf(tmp_path / "small.gguf", tiny_weights(SMALL), "llama", d=SMALL)


@pytest.fixture
def parts(small) -> Gguf:
    return Gguf.parse(small)


def load_err(path: Path, *words: str, exc=LoadError) -> str:
    """load_checkpoint(path) raises exc whose message names the file and every word."""
    with pytest.raises(exc) as e:
        load_checkpoint(path, progress=False)
    msg = str(e.value)
    assert path.name in msg, msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


# ---- the parts encoder against gguf's own writer --------------------------------------------
def test_parts_round_trip_the_writer(small, parts, tmp_path):
    assert parts.build() == small.read_bytes()
    ck = load_checkpoint(parts.write(tmp_path / "again.gguf"), progress=False)
    assert ck.config.num_hidden_layers == 2 and ck.config.hidden_size == 64


# ---- general.alignment, offsets, byte ranges, overlaps ---------------------------------------
@pytest.mark.parametrize("vtype,value", [(T.UINT32, 0), (T.UINT32, 48), (T.UINT64, MAX_ALIGNMENT * 2),
                                         (T.STRING, "32"), (T.FLOAT32, 32.0), (T.BOOL, True)])
def test_bad_alignment(parts, tmp_path, vtype, value):
    f = parts.set("general.alignment", vtype, value).write(tmp_path / "a.gguf")
    load_err(f, "'general.alignment'", "power of two")


def test_other_alignment_is_honoured(small, parts, tmp_path):
    """A file packed at alignment 64 loads the same tensors as the 32-aligned one (a loader that
    ignored general.alignment would read shifted bytes)."""
    ref = load_checkpoint(small, progress=False)
    for n in range(64):        # a general.name that makes 64-padding differ from 32-padding
        g = relayout(parts, 64).set("general.name", T.STRING, "x" * n)
        head = len(replace(g, align=1, data=b"").build())     # header bytes before padding
        if -head % 64 != -head % 32:
            break
    assert -head % 64 != -head % 32                          # the data section starts elsewhere at 32
    ck = load_checkpoint(g.write(tmp_path / "a64.gguf"), progress=False)
    for name in ref.names():
        np.testing.assert_array_equal(ck.tensor(name), ref.tensor(name))


def test_misaligned_offset(parts, tmp_path):
    parts.info("blk.0.attn_q.weight").offset += 16
    load_err(parts.write(tmp_path / "m.gguf"), "'blk.0.attn_q.weight'", "not a multiple of general.alignment 32")


def test_tensor_past_end_of_file(parts, tmp_path):
    parts.info("output.weight").offset = len(parts.data) // 32 * 32
    load_err(parts.write(tmp_path / "p.gguf"), "'output.weight'", "runs past the end")


def test_overlapping_tensors(parts, tmp_path):
    parts.info("blk.1.attn_v.weight").offset = parts.info("blk.1.attn_k.weight").offset + 32
    load_err(parts.write(tmp_path / "o.gguf"), "'blk.1.attn_k.weight'", "'blk.1.attn_v.weight'", "overlap")


# ---- unique names, known types, dims, byte sizes --------------------------------------------
def test_duplicate_metadata_key(parts, tmp_path):
    parts.kvs.append(["llama.block_count", enc_value(T.UINT32, 7)])
    load_err(parts.write(tmp_path / "k.gguf"), "'llama.block_count'", "appears twice")


def test_duplicate_tensor_name(parts, tmp_path):
    parts.info("blk.0.ffn_up.weight").name = "blk.0.ffn_gate.weight"
    load_err(parts.write(tmp_path / "t.gguf"), "'blk.0.ffn_gate.weight'", "listed twice")


@pytest.mark.parametrize("dims,words", [([], ["0 dims", "1 to 4"]), ([64, 1, 1, 1, 1], ["5 dims", "1 to 4"]),
                                        ([0, 260], ["[0, 260]", "positive"]),
                                        ([1 << 32, 1 << 32, 1 << 32], ["overflows int64"])])
def test_bad_dims(parts, tmp_path, dims, words):
    parts.info("token_embd.weight").dims = dims
    load_err(parts.write(tmp_path / "d.gguf"), "'token_embd.weight'", *words)


def test_unknown_type_id(parts, tmp_path):
    parts.info("blk.1.ffn_down.weight").qtype = 99
    load_err(parts.write(tmp_path / "u.gguf"), "'blk.1.ffn_down.weight'", "unknown GGML type id 99", "Q4_K")


def test_row_not_a_whole_number_of_blocks(tmp_path):
    f = write_gguf(tmp_path / "q8.gguf", tiny_weights(SMALL), "llama", d=SMALL, qtypes={"*": Q.Q8_0})
    g = Gguf.parse(f)
    g.info("blk.0.attn_v.weight").dims[0] = 48
    load_err(g.write(tmp_path / "b.gguf"), "'blk.0.attn_v.weight'", "48", "multiple of the Q8_0 block size 32")


def test_byte_sizes_and_offsets_match_gguf_reader(tmp_path):
    """Every type's byte size (block count x block bytes) and absolute offset as gguf's reader
    computes them, on a file mixing float, legacy and K-quant types."""
    w = tiny_weights()
    types = {"model.embed_tokens.weight": Q.Q4_0,
             "model.layers.0.self_attn.q_proj.weight": Q.Q8_0, "model.layers.0.self_attn.k_proj.weight": Q.Q4_1,
             "model.layers.0.self_attn.v_proj.weight": Q.Q5_0, "model.layers.0.self_attn.o_proj.weight": Q.Q5_1,
             "model.layers.1.self_attn.q_proj.weight": Q.BF16, "*": Q.F16}
    raw = {"model.layers.0.mlp.up_proj.weight": (random_kquant_bytes((256, 256), Q.Q4_K), Q.Q4_K),
           "model.layers.1.mlp.up_proj.weight": (random_kquant_bytes((256, 256), Q.Q5_K, 1), Q.Q5_K),
           "lm_head.weight": (random_kquant_bytes((260, 256), Q.Q6_K, 2), Q.Q6_K)}
    f = write_gguf(tmp_path / "mix.gguf", w, "llama", qtypes=types, raw_bytes=raw)
    _, tensors, _ = read_gguf(f)
    ref = GGUFReader(str(f)).tensors
    assert {t.tensor_type.name for t in ref} == set(SUPPORTED_QUANTS)
    assert {t.name: (t.tensor_type, int(t.data_offset), int(t.n_bytes)) for t in ref} == \
        {n: (qt, start, nbytes) for n, (qt, _, start, nbytes) in tensors.items()}
    load_checkpoint(f, progress=False)


# ---- what the architecture needs: float norms and biases, shapes from the config -------------
def test_norm_stored_quantized_is_an_error(tmp_path):
    w = tiny_weights(SMALL)
    norm = "model.layers.1.post_attention_layernorm.weight"
    f = write_gguf(tmp_path / "n.gguf", w, "llama", d=SMALL, raw_bytes={norm: (quantize(w[norm], Q.Q4_1), Q.Q4_1)})
    load_err(f, "'blk.1.ffn_norm.weight'", "Q4_1", "expected a float type")


def test_bias_stored_quantized_is_an_error(tmp_path):
    w = tiny_weights(SMALL, bias=True)
    b = "model.layers.0.self_attn.k_proj.bias"
    f = write_gguf(tmp_path / "b.gguf", w, "qwen2", d=SMALL, raw_bytes={b: (quantize(w[b], Q.Q8_0), Q.Q8_0)})
    load_err(f, "'blk.0.attn_k.bias'", "Q8_0", "expected a float type")


def test_norm_stored_f16_is_fine(tmp_path):
    w = tiny_weights(SMALL)
    n = "model.norm.weight"
    half = w[n].astype(np.float16)
    f = write_gguf(tmp_path / "h.gguf", w, "llama", d=SMALL, raw_bytes={n: (half.view(np.uint8), Q.F16)})
    ck = load_checkpoint(f, progress=False)
    assert ck.stored_dtype(n) == "F16"
    np.testing.assert_array_equal(ck.tensor(n), half.astype(np.float32))


def test_embedding_length_disagrees_with_token_embd(parts, tmp_path):
    f = parts.set("llama.embedding_length", T.UINT32, 128).write(tmp_path / "e.gguf")
    load_err(f, "'llama.embedding_length'", "128", "token_embd.weight", "64")


def test_feed_forward_length_disagrees_with_tensors(parts, tmp_path):
    f = parts.set("llama.feed_forward_length", T.UINT32, 128).write(tmp_path / "f.gguf")
    load_err(f, "model.layers.0.mlp.gate_proj.weight", "(64, 64)", "(128, 64)")


def test_rope_freqs_must_be_a_float_vector(small, parts, tmp_path):
    data = np.ones(8, np.float32).tobytes()
    parts.infos.append(Info("rope_freqs.weight", [2, 4], int(Q.F32), len(parts.data), len(data)))
    parts.data += data
    load_err(parts.write(tmp_path / "r.gguf"), "rope_freqs.weight", "[2, 4]", "1-D")


# ---- metadata arrays bounded ---------------------------------------------------------------
@pytest.mark.parametrize("etype", [T.FLOAT32, T.STRING, T.ARRAY, T.UINT64])
def test_array_claiming_2_40_elements_is_refused_at_once(parts, tmp_path, etype):
    f = parts.set_raw("tokenizer.ggml.scores", struct.pack("<IIQ", T.ARRAY, etype, 1 << 40)).write(tmp_path / "x.gguf")
    t0 = time.perf_counter()
    load_err(f, "'tokenizer.ggml.scores'", "1099511627776 array elements", "truncated or corrupt")
    assert time.perf_counter() - t0 < 1.0


def test_token_list_count_lies(parts, tmp_path):
    tokens = next(v for k, v in parts.kvs if k == "tokenizer.ggml.tokens")
    lied = tokens[:8] + struct.pack("<Q", 1 << 40) + tokens[16:]
    load_err(parts.set_raw("tokenizer.ggml.tokens", lied).write(tmp_path / "l.gguf"), "'tokenizer.ggml.tokens'",
             "1099511627776")


def test_nested_arrays(parts, tmp_path):
    two = [(T.INT32, [1, 2]), (T.INT32, [3])]
    ck = load_checkpoint(parts.set("test.nested", T.ARRAY, two, T.ARRAY).write(tmp_path / "ok.gguf"), progress=False)
    assert ck.metadata["test.nested"] == [[1, 2], [3]]
    three = struct.pack("<IIQ", T.ARRAY, T.ARRAY, 1) + _payload(T.ARRAY, two, T.ARRAY)
    load_err(parts.set_raw("test.nested", three).write(tmp_path / "deep.gguf"), "'test.nested'", "3 deep",
             "at most 2")


def test_unknown_value_and_element_types(parts, tmp_path):
    load_err(parts.set_raw("test.x", struct.pack("<IB", 13, 0)).write(tmp_path / "v.gguf"), "'test.x'",
             "unknown value type 13")
    load_err(parts.set_raw("test.x", struct.pack("<IIQ", T.ARRAY, 13, 1)).write(tmp_path / "e.gguf"),
             "'test.x'", "unknown element type 13")


def test_string_longer_than_the_file(parts, tmp_path):
    f = parts.set_raw("general.name", struct.pack("<IQ", T.STRING, 1 << 20) + b"tiny").write(tmp_path / "s.gguf")
    load_err(f, "truncated")


# ---- counts checked against the tensors, typed metadata ---------------------------------------
def test_block_count_2_31_is_refused_at_once(parts, tmp_path):
    f = parts.set("llama.block_count", T.UINT32, 1 << 31).write(tmp_path / "bc.gguf")
    t0 = time.perf_counter()
    load_err(f, "'llama.block_count'", "2147483648", "2 blk.N layers", "blk.0 .. blk.1")
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("n", [1, 3])
def test_block_count_disagrees_with_layers(parts, tmp_path, n):
    load_err(parts.set("llama.block_count", T.UINT32, n).write(tmp_path / "bc.gguf"), f"is {n}", "2 blk.N layers")


def test_layer_gap(tmp_path):
    d = dict(SMALL, layers=3)
    w = tiny_weights(d)
    g = Gguf.parse(write_gguf(tmp_path / "l3.gguf", w, "llama", d=d))
    for i in g.infos:                       # rename blk.2 -> blk.5: three layers, but not 0 .. 2
        i.name = i.name.replace("blk.2.", "blk.5.")
    load_err(g.write(tmp_path / "gap.gguf"), "'llama.block_count' is 3", "blk.0 .. blk.5", "expected blk.0 .. blk.2")


@pytest.mark.parametrize("key,vtype,value,want", [
    ("llama.attention.head_count", T.UINT32, 6, "does not divide 'llama.embedding_length' 64"),
    ("llama.attention.head_count_kv", T.UINT32, 3, "does not divide 'llama.attention.head_count' 4"),
    ("llama.attention.head_count_kv", T.UINT32, 8, "from 1 to 4"),
    ("llama.attention.head_count", T.UINT32, 0, "from 1 to 64"),
    ("llama.block_count", T.STRING, "2", "expected an integer"),
    ("llama.block_count", T.INT32, -1, "expected an integer"),
    ("llama.block_count", T.FLOAT32, 2.0, "expected an integer"),
    ("llama.block_count", T.BOOL, True, "expected an integer"),
    ("llama.feed_forward_length", T.ARRAY, [64, 64], "expected an integer"),
    ("llama.context_length", T.UINT32, 0, "from 1 to 16777216"),
    ("llama.context_length", T.UINT64, 1 << 40, "from 1 to 16777216"),
    ("llama.vocab_size", T.UINT32, 300, "one row per token"),
    ("llama.attention.layer_norm_rms_epsilon", T.STRING, "1e-6", "finite number > 0"),
    ("llama.attention.layer_norm_rms_epsilon", T.FLOAT32, -1e-6, "finite number > 0"),
    ("llama.rope.freq_base", T.FLOAT32, float("nan"), "finite number > 0"),
    ("llama.rope.scaling.factor", T.STRING, "4", "finite number"),
])
def test_bad_config_metadata(parts, tmp_path, key, vtype, value, want):
    etype = T.UINT32 if vtype == T.ARRAY else None
    load_err(parts.set(key, vtype, value, etype).write(tmp_path / "c.gguf"), f"'{key}'", want)


def test_missing_required_key(parts, tmp_path):
    load_err(parts.drop("llama.feed_forward_length").write(tmp_path / "m.gguf"), "lacks 'llama.feed_forward_length'")


# ---- the embedded tokenizer ------------------------------------------------------------------
def _tok_err(path: Path, *words: str) -> None:
    """Both load_checkpoint and Tokenizer.from_gguf give the LoadError."""
    load_err(path, *words)
    with pytest.raises(LoadError) as e:
        Tokenizer.from_gguf(path)
    assert all(w in str(e.value) for w in words) and path.name in str(e.value)


def _tokens() -> list[str]:
    from _fixtures_loaders import gpt2_vocab_meta
    return gpt2_vocab_meta(SMALL["vocab"])["tokens"]


def test_tokens_wrong_type(parts, tmp_path):
    f = parts.set("tokenizer.ggml.tokens", T.ARRAY, list(range(260)), T.INT32).write(tmp_path / "t.gguf")
    load_err(f, "'tokenizer.ggml.tokens'[0] is the integer 0", "array of strings")


def test_token_type_length_disagrees(parts, tmp_path):
    f = parts.set("tokenizer.ggml.token_type", T.ARRAY, [1] * 259, T.INT32).write(tmp_path / "t.gguf")
    _tok_err(f, "'tokenizer.ggml.token_type' has 259 entries", "'tokenizer.ggml.tokens' has 260")


def test_scores_length_disagrees(parts, tmp_path):
    f = parts.set("tokenizer.ggml.scores", T.ARRAY, [0.0] * 5, T.FLOAT32).write(tmp_path / "s.gguf")
    _tok_err(f, "'tokenizer.ggml.scores' has 5 entries")


@pytest.mark.parametrize("key,value", [("tokenizer.ggml.bos_token_id", 260), ("tokenizer.ggml.eos_token_id", 2**32 - 1),
                                       ("tokenizer.ggml.padding_token_id", 1000)])
def test_special_token_outside_vocabulary(parts, tmp_path, key, value):
    f = parts.set(key, T.UINT32, value).write(tmp_path / "s.gguf")
    _tok_err(f, f"'{key}'", f"the integer {value}", "from 0 to 259")


def test_vocabulary_shorter_than_embedding(parts, tmp_path):
    parts.set("tokenizer.ggml.tokens", T.ARRAY, _tokens()[:259], T.STRING)
    parts.set("tokenizer.ggml.token_type", T.ARRAY, [1] * 259, T.INT32)
    load_err(parts.write(tmp_path / "v.gguf"), "'tokenizer.ggml.tokens' has 259 tokens",
             "token_embd.weight has 260 rows")


def test_tokenizers_library_errors_are_wrapped(parts, tmp_path):
    f = parts.set("tokenizer.ggml.merges", T.ARRAY, ["zz yy"], T.STRING).write(tmp_path / "m.gguf")
    msg = load_err(f, "tokenizer.ggml", "could not be built into a gpt2 tokenizer")
    assert "zz" in msg                           # the library's own reason is kept
    f = parts.set("tokenizer.ggml.merges", T.ARRAY, ["nospace"], T.STRING).write(tmp_path / "n.gguf")
    _tok_err(f, "'tokenizer.ggml.merges'[0]", "two tokens separated by a space")


@pytest.mark.parametrize("key,vtype,value,want", [("tokenizer.ggml.model", T.UINT32, 2, "expected a string"),
                                                  ("tokenizer.ggml.add_bos_token", T.UINT8, 1, "expected a bool"),
                                                  ("tokenizer.chat_template", T.INT32, 0, "expected a string")])
def test_tokenizer_fields_wrong_type(parts, tmp_path, key, vtype, value, want):
    load_err(parts.set(key, vtype, value).write(tmp_path / "w.gguf"), f"'{key}'", want)


def test_unknown_tokenizer_model(parts, tmp_path):
    _tok_err(parts.set("tokenizer.ggml.model", T.STRING, "rwkv").write(tmp_path / "w.gguf"), "'rwkv'", "gpt2")


# ---- truncated, random, lying, empty --------------------------------------------------------
def test_empty_file(tmp_path):
    f = tmp_path / "empty.gguf"
    f.write_bytes(b"")
    load_err(f, "magic")
    with pytest.raises(LoadError, match="empty"):
        read_gguf(f)


def test_random_bytes_after_the_magic(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(20):
        f = tmp_path / f"r{i}.gguf"
        f.write_bytes(b"GGUF" + rng.integers(0, 256, int(rng.integers(0, 4000)), dtype=np.uint8).tobytes())
        load_err(f)


def test_truncated_anywhere(small, tmp_path):
    """Cut in the fixed header, all through the metadata and tensor table (every 23rd byte) and at
    every tensor's first and last byte: always a LoadError that says truncated."""
    data = small.read_bytes()
    g = Gguf.parse(small)
    start = len(data) - len(g.data)
    cuts = set(range(64)) | set(range(64, start + 1, 23))
    cuts |= {start + i.offset + d for i in g.infos for d in (0, 1, i.nbytes - 1)}
    f = tmp_path / "cut.gguf"
    for n in sorted(cuts):
        f.write_bytes(data[:n])
        with pytest.raises(LoadError) as e:
            load_checkpoint(f, progress=False)
        assert "cut.gguf" in str(e.value) and ("truncated" in str(e.value) or n < 4), (n, str(e.value))


@pytest.mark.parametrize("extra_tensors,extra_kv,words", [(0, 20000, ["20018 metadata keys", "at least"]),
                                                         ((1 << 19) - 21, 0, ["524288 tensors", "at least"]),
                                                         (0, 1 << 40, ["1099511627794 metadata keys"]),
                                                         (1, 0, []), (0, 1, [])])
def test_header_counts_lie(parts, tmp_path, extra_tensors, extra_kv, words):
    """Counts larger than the file: refused from the counts alone, or when the entries they claim
    run into the tensor data."""
    assert (len(parts.infos), len(parts.kvs)) == (21, 18)
    parts.counts = (21 + extra_tensors, 18 + extra_kv)
    t0 = time.perf_counter()
    load_err(parts.write(tmp_path / "lie.gguf"), *words)
    assert time.perf_counter() - t0 < 1.0


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_truncated_or_flipped_header_never_escapes(small, data):
    """Truncate at a random length and/or flip random header bytes: the load succeeds (and every
    tensor then materialises) or raises LoadError / ConfigError, never anything else."""
    raw = bytearray(small.read_bytes())
    header = len(raw) - len(Gguf.parse(small).data)
    for pos in data.draw(st.lists(st.integers(4, header - 1), max_size=4), label="flips"):
        raw[pos] ^= data.draw(st.integers(1, 255), label="xor")
    cut = data.draw(st.one_of(st.just(len(raw)), st.integers(0, len(raw))), label="cut")
    f = small.with_name("hyp.gguf")
    f.write_bytes(bytes(raw[:cut]))
    try:
        ck = load_checkpoint(f, progress=False)
    except (LoadError, ConfigError) as e:
        assert "hyp.gguf" in str(e), str(e)
        return
    for name in ck.names():
        assert ck.tensor(name).shape == ck.shape(name)


# ---- regressions found by tools/fuzz_inputs.py (each one root cause) ----------------------------------
def test_architecture_of_the_wrong_type_is_a_clear_error(parts, tmp_path):
    """general.architecture an array: was a TypeError (unhashable list) in _arch_config."""
    f = parts.set("general.architecture", T.ARRAY, [1, 2, 3], T.UINT32).write(tmp_path / "a.gguf")
    load_err(f, "architecture", exc=ConfigError)


def test_a_file_without_a_vocabulary_loads_and_says_so_when_text_is_needed(parts, tmp_path):
    """No tokenizer.ggml.tokens: the tokenizer was None and generate died of an AttributeError;
    now a MissingTokenizer whose encode is one LoadError naming the key."""
    for key in [k for k, _ in parts.kvs if k.startswith("tokenizer.ggml.")]:
        parts.drop(key)
    ck = load_checkpoint(parts.write(tmp_path / "novocab.gguf"), progress=False)
    assert not ck.tokenizer and "tokenizer.ggml.tokens" in ck.summary()
    with pytest.raises(LoadError, match=r"novocab\.gguf holds no vocabulary .*'tokenizer\.ggml\.tokens'"):
        ck.tokenizer.encode("hello")


@pytest.mark.parametrize("where", ["key", "tensor", "value"])
def test_invalid_utf8_in_keys_names_and_strings(parts, tmp_path, where):
    """Keys, tensor names and string values must be UTF-8 (they were decoded with U+FFFD
    replacements, silently); vocabulary strings inside arrays keep the replacement."""
    if where in ("key", "tensor"):
        name = parts.kvs[0][0] if where == "key" else parts.infos[0].name
        if where == "key":
            parts.kvs[0][0] = "\x01" + name
        else:
            parts.infos[0].name = "\x01" + name
        raw = parts.build().replace(b"\x01" + name.encode(), b"\xff" + name.encode())   # same length, not UTF-8
    else:
        parts.set_raw("tokenizer.chat_template", struct.pack("<IQ", T.STRING, 3) + b"a\xffb")
        raw = parts.build()
    f = tmp_path / "u.gguf"
    f.write_bytes(raw)
    load_err(f, "not valid UTF-8", {"key": "metadata key", "tensor": "tensor name",
                                    "value": "'tokenizer.chat_template'"}[where])


def test_header_listing_fewer_tensors_than_it_holds(parts, tmp_path):
    """n_tensors one short: the data section then started early and every tensor was read shifted
    (silent garbage); now the bytes after the last listed tensor are refused."""
    parts.counts = (len(parts.infos) - 1, len(parts.kvs))
    load_err(parts.write(tmp_path / "short.gguf"), "bytes follow the last tensor", "fewer tensors")


def test_a_type_that_shrinks_a_tensor_leaves_a_hole(parts, tmp_path):
    """F16 relabelled Q8_0: smaller, inside the file, no overlap, so it was accepted (garbage);
    llama.cpp requires the tensors back to back, and so does hetinfer now."""
    parts.info("blk.0.attn_q.weight").qtype = int(Q.Q8_0)
    load_err(parts.write(tmp_path / "hole.gguf"), "'blk.0.attn_k.weight'", "back to back")


@pytest.mark.parametrize("etype,n", [(T.STRING, 16_000_000), (T.UINT8, 400_000_000), (T.ARRAY, 3_000_000)])
def test_sparse_file_claiming_millions_of_elements_is_refused_at_once(tmp_path, etype, n):
    """A mostly-zero (sparse) file whose header claims 16M empty strings, 400M bytes or 3M empty
    arrays: the counts fit the bytes, and parsing took 13 s, 4 GB, or hung; now refused from the
    header's element budget."""
    head = (b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + _payload(T.STRING, "general.architecture")
            + enc_value(T.STRING, "llama") + _payload(T.STRING, "x.big") + struct.pack("<IIQ", T.ARRAY, etype, n))
    f = tmp_path / "sparse.gguf"
    with open(f, "wb") as fh:
        fh.write(head)
        fh.truncate(len(head) + n * {T.STRING: 8, T.UINT8: 1, T.ARRAY: 12}[etype])
    t0 = time.perf_counter()
    load_err(f, "'x.big'", "array elements", "expected at most")
    assert time.perf_counter() - t0 < 1.0


def test_more_tensors_than_any_model_has_is_refused_at_once(tmp_path):
    """A million tensor entries took ~10 s and 0.7 GB to check one by one."""
    head = b"GGUF" + struct.pack("<IQQ", 3, 1 << 20, 1)
    f = tmp_path / "many.gguf"
    with open(f, "wb") as fh:
        fh.write(head)
        fh.truncate(len(head) + 33 * (1 << 20))
    t0 = time.perf_counter()
    load_err(f, "1048576 tensors", "at most 65536")
    assert time.perf_counter() - t0 < 1.0
