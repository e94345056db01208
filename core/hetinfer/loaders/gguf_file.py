"""GGUF files (llama.cpp): metadata -> ModelConfig, tensors dequantized on request.

The header is parsed here with ``struct`` over a memory map (GGUFReader builds one numpy array
per vocabulary string and takes seconds on a 150k vocabulary); tensor bytes are numpy views of
the same map and are dequantized with ``gguf.quants.dequantize``.

GGUF lists dims fastest first (ne[0] = in_features for a Linear weight), so the numpy shape of a
tensor is the reversed dims: (out_features, in_features), the HF orientation already.
llama-arch files store the rows of attn_q / attn_k permuted for interleaved RoPE
(convert_hf_to_gguf's ``permute``); ``unpermute_qk`` undoes that so q_proj / k_proj come back in
HF layout. qwen2-arch files are not permuted.

Nothing in a header is trusted: counts are checked against the bytes left before anything is
allocated, every tensor's type, dims, alignment and byte range before its bytes are viewed, and
the metadata's types and counts against the tensors the file holds (gguf_meta reads each key
with its type) before any per-layer work. Each failure is one LoadError naming file and field.
"""

from __future__ import annotations

import itertools
import math
import struct
from pathlib import Path

import numpy as np

from ..config import KNOWN_ARCHITECTURES, ModelConfig
from ..errors import ConfigError, LoadError
from .base import Checkpoint, bf16_np, file_size, memmap, progress_bar, release_pages
from .gguf_meta import describe, meta_float, meta_int, meta_list, meta_str, special_token_ids

GGUF_MAGIC = b"GGUF"
# Limits on what a header may claim, checked before anything is allocated or looped over:
MAX_ALIGNMENT = 1 << 20      # general.alignment: llama.cpp writes 32; a few writers use 64 or a page
MAX_ARRAY_DEPTH = 2          # metadata arrays of arrays, no deeper (llama.cpp reads no nested arrays)
MAX_CONTEXT = 1 << 24        # {arch}.context_length: above every released llama / qwen2 model (16M)
# array elements in all of a header's metadata, and strings among them: a vocabulary with its scores,
# types and merges is ~4 elements per token (Gemma 3's 262144 tokens: ~1M), so these allow a 4M-token
# vocabulary while a mostly-zero file (a sparse one, or one that compresses well) claiming 2^31 bytes
# or strings is refused before minutes of parsing and gigabytes of Python objects
MAX_METADATA_ELEMENTS = 1 << 24
MAX_METADATA_STRINGS = 1 << 22
MAX_METADATA_ARRAYS = 1 << 16   # arrays inside arrays, in all (llama.cpp reads none)
MAX_TENSORS = 1 << 16           # tensors of one file: a 405B dense model has ~1.1k, MoE files with
MAX_KV = 1 << 16                # unmerged experts ~15k; metadata keys: released files hold < 100
_MIN_KV_BYTES = 13           # a metadata entry: key length (8) + value type (4) + the smallest value (1)
_MIN_TENSOR_INFO_BYTES = 32  # a tensor entry: name length (8) + n_dims (4) + one dim (8) + type (4) + offset (8)

# GGUF metadata value types -> (struct code, size) for scalars
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
            6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
       10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_MIN_ELEMENT_BYTES = {_STRING: 8, _ARRAY: 12}  # the smallest string (its length) / array (type + count)

# general.architecture -> HF architecture
GGUF_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

FLOAT_TYPES = ("F32", "F16", "BF16")     # what norm weights and biases must be stored as
SUPPORTED_QUANTS = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")

_LAYER_MAP = {  # GGUF per-layer suffix -> HF per-layer suffix
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias", "ffn_up.bias": "mlp.up_proj.bias", "ffn_down.bias": "mlp.down_proj.bias",
}
# tensors read into the config rather than the model: Llama 3.x's per-frequency RoPE factors
ROPE_FREQS = "rope_freqs.weight"
_GLOBAL_MAP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}


def gguf_to_hf_name(name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None if unknown."""
    if name in _GLOBAL_MAP:
        return _GLOBAL_MAP[name]
    idx = layer_index(name)
    if idx is not None:
        rest = name.split(".", 2)[2]
        if rest in _LAYER_MAP:
            return f"model.layers.{idx}.{_LAYER_MAP[rest]}"
    return None


def layer_index(name: str) -> int | None:
    """'blk.3.attn_q.weight' -> 3; None for a name outside blk.N.* (or with a non-decimal N)."""
    parts = name.split(".", 2)
    idx = parts[1] if len(parts) == 3 and parts[0] == "blk" else ""
    if idx.isascii() and idx.isdigit() and idx == str(int(idx)):    # "3", not "03", "³" or ""
        return int(idx)
    return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's permute for interleaved RoPE.

    The converter did  w.reshape(n_head, 2, hd/2, *rest).swapaxes(1, 2).reshape(w.shape)
    (HF rows [h, half, i] -> GGUF rows [h, i, half]); the inverse views the GGUF rows as
    (n_head, hd/2, 2) and swaps back. Works for weights (rows, in) and biases (rows,).
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """What convert_hf_to_gguf does to q/k rows of llama-arch models (for tests and writers)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_U64 = struct.Struct("<Q")


class _Reader:
    """Sequential little-endian reader over a bytes-like header, raising LoadError on truncation."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path
        self.elements = self.strings = self.arrays = 0     # array elements read so far (MAX_METADATA_*)

    def need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise LoadError(f"{self.path}: GGUF header is truncated (needed {n} bytes at offset {self.pos}, "
                            f"file has {len(self.buf)}); the file is incomplete or corrupt")

    def left(self) -> int:
        return len(self.buf) - self.pos

    def scalar(self, fmt: str, size: int):
        self.need(size)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return v

    def string(self, what: str | None = None) -> str:
        """A length-prefixed string. With ``what`` (a key, a tensor name, a metadata string value)
        it must be valid UTF-8 (LoadError naming it otherwise); vocabulary strings inside arrays
        are decoded with U+FFFD replacements, as llama.cpp takes them byte for byte."""
        n = self.scalar("<Q", 8)
        if n > 1 << 24:
            raise LoadError(f"{self.path}: GGUF string length {n} at offset {self.pos - 8} is implausible; "
                            "the file is corrupt")
        self.need(n)
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        if what is None:
            return s.decode("utf-8", errors="replace")
        try:
            return s.decode("utf-8")
        except UnicodeDecodeError as e:
            raise LoadError(f"{self.path}: GGUF {what} at offset {self.pos - n - 8} is not valid UTF-8 (byte "
                            f"0x{s[e.start]:02x} at offset {self.pos - n + e.start}); expected UTF-8 text") from None

    def strings_array(self, count: int) -> list[str]:
        """count strings of an array, as string() reads each (decoded with U+FFFD replacements),
        in one loop: a vocabulary is 50k-150k of them, the header's hot loop."""
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        unpack, append = _U64.unpack_from, out.append
        view = memoryview(buf)                         # slices without copies, decoded in place
        for _ in range(count):
            if pos + 8 > end:
                self.pos = pos
                self.need(8)
            n = unpack(buf, pos)[0]
            if n > 1 << 24 or pos + 8 + n > end:
                self.pos = pos
                return out + [self.string() for _ in range(count - len(out))]   # its errors
            append(str(view[pos + 8:pos + 8 + n], "utf-8", "replace"))
            pos += 8 + n
        self.pos = pos
        return out

    def value(self, vtype: int, key: str, depth: int = 0):
        """One metadata value of type vtype (key names it in errors; depth counts enclosing arrays)."""
        if vtype == 6:  # float32: keep the shortest decimal that round-trips (1e-05, not 9.99999974e-06)
            return float(str(np.float32(self.scalar("<f", 4))))
        if vtype in _SCALARS:
            return self.scalar(*_SCALARS[vtype])
        if vtype == _STRING:
            return self.string(None if depth else f"metadata {key!r}")
        if vtype == _ARRAY:
            return self.array(key, depth + 1)
        raise LoadError(f"{self.path}: GGUF metadata {key!r} has unknown value type {vtype} at offset "
                        f"{self.pos - 4}; the file is corrupt or from a newer GGUF version")

    def array(self, key: str, depth: int):
        """An array value; its element count is checked against the bytes left before any allocation."""
        if depth > MAX_ARRAY_DEPTH:
            raise LoadError(f"{self.path}: GGUF metadata {key!r} nests arrays {depth} deep; expected at most "
                            f"{MAX_ARRAY_DEPTH}; the file is corrupt")
        etype, count = self.scalar("<I", 4), self.scalar("<Q", 8)
        if etype not in _NP and etype not in _MIN_ELEMENT_BYTES:
            raise LoadError(f"{self.path}: GGUF metadata {key!r} is an array of unknown element type {etype} "
                            f"(offset {self.pos - 12}); the file is corrupt")
        least = np.dtype(_NP[etype]).itemsize if etype in _NP else _MIN_ELEMENT_BYTES[etype]
        if count * least > self.left():
            raise LoadError(f"{self.path}: GGUF metadata {key!r} claims {count} array elements, which need at "
                            f"least {count * least} bytes, but {self.left()} bytes are left in the file; "
                            "the file is truncated or corrupt")
        self.elements += count
        self.strings += count if etype == _STRING else 0
        self.arrays += count if etype == _ARRAY else 0
        if (self.elements > MAX_METADATA_ELEMENTS or self.strings > MAX_METADATA_STRINGS
                or self.arrays > MAX_METADATA_ARRAYS):
            raise LoadError(f"{self.path}: GGUF metadata {key!r} (offset {self.pos - 12}) claims {count} array "
                            f"elements, which bring the header to {self.elements} array elements ({self.strings} "
                            f"strings, {self.arrays} nested arrays); expected at most {MAX_METADATA_ELEMENTS} "
                            f"({MAX_METADATA_STRINGS} strings, {MAX_METADATA_ARRAYS} nested arrays), more than any "
                            "released model needs; the file is corrupt")
        if etype == _STRING:
            return self.strings_array(count)
        if etype == _ARRAY:
            return [self.array(key, depth + 1) for _ in range(count)]
        arr = np.frombuffer(self.buf, dtype=np.dtype(_NP[etype]), count=count, offset=self.pos).copy()
        self.pos += count * least
        return arr.astype(bool).tolist() if etype == 7 else arr.tolist()


VOCAB_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores", "tokenizer.ggml.merges")


def read_gguf(path: Path):
    """Parse a GGUF file: (metadata dict, {name: (qtype, dims ne[], absolute offset, nbytes)}, memmap).

    Every count the header claims is checked against the bytes left before it is looped over or
    allocated; keys and tensor names are unique; every tensor's type, dims, alignment and byte
    range are checked (``_tensor_layout``) and no two tensors overlap. LoadError otherwise."""
    size = file_size(path)
    if size == 0:
        raise LoadError(f"{path}: the file is empty (0 bytes); expected a GGUF file")
    mm = memmap(path)
    r = _Reader(memoryview(mm), path)
    r.need(4)
    if bytes(mm[:4]) != GGUF_MAGIC:
        raise LoadError(f"{path}: not a GGUF file (magic {bytes(mm[:4])!r}, expected b'GGUF')")
    r.pos = 4
    version = r.scalar("<I", 4)
    if version not in (2, 3):
        raise LoadError(f"{path}: GGUF version {version} is not supported (expected 2 or 3, little-endian)")
    n_tensors, n_kv = r.scalar("<Q", 8), r.scalar("<Q", 8)
    least = n_tensors * _MIN_TENSOR_INFO_BYTES + n_kv * _MIN_KV_BYTES
    if least > r.left():
        raise LoadError(f"{path}: GGUF header claims {n_tensors} tensors and {n_kv} metadata keys, which need at "
                        f"least {least} bytes, but {r.left()} bytes follow; the file is truncated or corrupt")
    if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
        raise LoadError(f"{path}: GGUF header claims {n_tensors} tensors and {n_kv} metadata keys; expected at most "
                        f"{MAX_TENSORS} tensors and {MAX_KV} keys (released models have a few thousand tensors and "
                        "under a hundred keys); the file is corrupt")
    meta = {}
    for _ in range(n_kv):
        at = r.pos
        key = r.string(f"metadata key at offset {at}")
        if key in meta:
            raise LoadError(f"{path}: GGUF metadata key {key!r} appears twice (again at offset {at}); "
                            "expected unique keys")
        meta[key] = r.value(r.scalar("<I", 4), key)
    infos = {}
    for _ in range(n_tensors):
        name = r.string("tensor name")
        if name in infos:
            raise LoadError(f"{path}: GGUF tensor {name!r} is listed twice; expected unique tensor names")
        ndim = r.scalar("<I", 4)
        if not 1 <= ndim <= 4:
            raise LoadError(f"{path}: tensor {name!r} claims {ndim} dims; expected 1 to 4")
        dims = [r.scalar("<Q", 8) for _ in range(ndim)]
        qtype, offset = r.scalar("<I", 4), r.scalar("<Q", 8)
        infos[name] = (qtype, dims, offset)
    align = _alignment(meta, path)
    data_start = (r.pos + align - 1) // align * align
    tensors = {name: _tensor_layout(path, name, *info, data_start, align, size) for name, info in infos.items()}
    _check_no_overlap(path, tensors)
    _check_back_to_back(path, tensors, align, data_start, size)
    return meta, tensors, mm


def _alignment(meta: dict, path: Path) -> int:
    """general.alignment (default 32): a power of two from 1 to MAX_ALIGNMENT."""
    a = meta.get("general.alignment", 32)
    if isinstance(a, bool) or not isinstance(a, int) or not 1 <= a <= MAX_ALIGNMENT or a & (a - 1):
        raise LoadError(f"{path}: GGUF metadata 'general.alignment' holds {describe(a)}; expected a power of two "
                        f"from 1 to {MAX_ALIGNMENT}")
    return a


def _tensor_layout(path: Path, name: str, qtype: int, dims: list, offset: int, data_start: int, align: int,
                   size: int):
    """One tensor entry -> (GGMLQuantizationType, dims, absolute start, nbytes), checked: a known type, positive
    dims whose element count fits int64, rows a whole number of blocks, an aligned offset and bytes
    inside the file. The byte size is block count x block bytes (gguf's GGML_QUANT_SIZES)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    try:
        qt = GGMLQuantizationType(qtype)
        block, tsize = GGML_QUANT_SIZES[qt]
    except (ValueError, KeyError):
        raise LoadError(f"{path}: tensor {name!r} has unknown GGML type id {qtype}; supported: "
                        f"{', '.join(SUPPORTED_QUANTS)}") from None
    if min(dims) < 1:
        raise LoadError(f"{path}: tensor {name!r} has dims {dims}; expected every dim to be positive")
    n = math.prod(dims)
    if n >= 1 << 63:
        raise LoadError(f"{path}: tensor {name!r} has dims {dims}, {n} elements, which overflows int64; "
                        "the file is corrupt")
    if dims[0] % block:
        raise LoadError(f"{path}: tensor {name!r} ({qt.name}) has rows of {dims[0]} elements; expected a multiple "
                        f"of the {qt.name} block size {block}")
    if offset % align:
        raise LoadError(f"{path}: tensor {name!r} data offset {offset} is not a multiple of general.alignment "
                        f"{align}; the file is corrupt")
    nbytes = n // block * tsize
    start = data_start + offset
    if start + nbytes > size:
        raise LoadError(f"{path}: tensor {name!r} ({qt.name}, {nbytes} bytes at offset {start}) runs past "
                        f"the end of the file ({size} bytes); the file is truncated")
    return qt, dims, start, nbytes


def _check_no_overlap(path: Path, tensors: dict) -> None:
    """No two tensors' byte ranges [start, start + nbytes) intersect."""
    spans = sorted((start, start + nbytes, name) for name, (_, _, start, nbytes) in tensors.items())
    for (_, end, prev), (start, _, name) in itertools.pairwise(spans):
        if start < end:
            raise LoadError(f"{path}: tensors {prev!r} and {name!r} overlap in the file (bytes {start} .. "
                            f"{end}); expected disjoint tensor data")


def _check_back_to_back(path: Path, tensors: dict, align: int, data_start: int, size: int) -> None:
    """The tensors lie back to back in the order they are listed, each padded to the alignment,
    from the start of the data section (llama.cpp's gguf reader refuses any other layout), and
    the file ends at most one alignment after the last one. A header that lists fewer tensors
    than it holds, or a type or shape that shrinks a tensor, shifts or leaves holes in this
    layout: one LoadError, not weights read from the wrong bytes."""
    expected = 0
    for name, (qt, _, start, nbytes) in tensors.items():
        if start - data_start != expected:
            raise LoadError(f"{path}: tensor {name!r} ({qt.name}, {nbytes} bytes) has data offset "
                            f"{start - data_start}, but the tensors listed before it end at {expected} (padded to "
                            f"general.alignment {align}); expected the tensors back to back in the order they are "
                            "listed, as llama.cpp requires; the header does not describe the data")
        expected += -(-nbytes // align) * align
    extra = size - data_start - expected
    if extra >= align:
        raise LoadError(f"{path}: {extra} bytes follow the last tensor's data (the header lists {len(tensors)} "
                        f"tensors ending at byte {data_start + expected}, the file has {size}); the header lists "
                        "fewer tensors than the file holds, or the file is corrupt")


def _rope_scaling(meta: dict, arch: str, path: Path, freq_factors, head_dim: int) -> dict | None:
    """GGUF rope metadata -> an HF-style rope_scaling dict.

    rope_freqs.weight (convert_hf_to_gguf writes Llama 3.x's llama3 scaling this way) ->
    {"rope_type": "freq_factors", "factors": [...]}: the inverse frequencies are divided by them,
    as llama.cpp's ggml_rope_ext does. {arch}.rope.scaling.type linear / yarn (with
    rope.scaling.factor, rope.scaling.original_context_length) -> transformers' linear / yarn."""
    key = f"{arch}.rope.scaling."
    kind = meta_str(meta, key + "type", path, None)
    factor = meta_float(meta, key + "factor", path, None, positive=False)
    if freq_factors is not None:
        if kind not in (None, "none") and factor not in (None, 0, 1, 1.0):
            raise ConfigError(f"{path}: the file carries both rope_freqs.weight and rope.scaling.type {kind!r}; "
                              "combining them is not supported")
        f = np.asarray(freq_factors, dtype=np.float64).reshape(-1)
        if f.size != head_dim // 2:
            raise LoadError(f"{path}: rope_freqs.weight has {f.size} values; head dim {head_dim} needs {head_dim // 2}")
        return {"rope_type": "freq_factors", "factors": f.tolist()}
    if kind in (None, "none") or (factor in (None, 0, 1, 1.0) and kind != "yarn"):
        return None
    if factor is None:
        raise ConfigError(f"{path}: rope.scaling.type {kind!r} without rope.scaling.factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        orig = meta_int(meta, key + "original_context_length", path, None, lo=0, hi=MAX_CONTEXT)
        out = {"rope_type": "yarn", "factor": float(factor)}
        if orig:
            out["original_max_position_embeddings"] = orig
        for name, hf in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            beta = meta_float(meta, key + name, path, None, positive=False)
            if beta is not None:
                out[hf] = beta
        ext = meta_float(meta, key + "yarn_ext_factor", path, None, positive=False)
        if ext not in (None, -1, -1.0, 1, 1.0):
            raise ConfigError(f"{path}: rope.scaling.yarn_ext_factor {ext} is not supported (1.0 only)")
        attn = meta_float(meta, key + "attn_factor", path, None, positive=False)
        if attn not in (None, 1, 1.0):
            # llama.cpp multiplies its yarn mscale (0.1 ln(factor) + 1) by attn_factor
            f = float(factor)
            out["attention_factor"] = float(attn) * (1.0 if f <= 1 else 0.1 * math.log(f) + 1.0)
        return out
    raise ConfigError(f"{path}: GGUF rope.scaling.type {kind!r} is not supported; supported: linear, yarn "
                      "(and rope_freqs.weight factors)")


def _layer_count(meta: dict, tensors: dict, arch: str, path: Path) -> int:
    """{arch}.block_count, which must equal the number of blk.N layers the file holds (blk.0 ..
    blk.{n-1}); checked before anything loops over the layers."""
    key = f"{arch}.block_count"
    n = meta_int(meta, key, path)
    present = {i for i in map(layer_index, tensors) if i is not None}
    if n != len(present) or (present and max(present) != n - 1):
        held = f" (blk.{min(present)} .. blk.{max(present)})" if present else ""
        raise LoadError(f"{path}: GGUF metadata {key!r} is {n} but the file holds {len(present)} blk.N "
                        f"layers{held}; expected blk.0 .. blk.{n - 1}")
    return n


def _embedding_dims(meta: dict, tensors: dict, arch: str, path: Path) -> tuple[int, int]:
    """(hidden, vocab) from token_embd.weight, checked against {arch}.embedding_length,
    {arch}.vocab_size and the length of tokenizer.ggml.tokens (one embedding row per token)."""
    if "token_embd.weight" not in tensors:
        raise LoadError(f"{path}: tensor 'token_embd.weight' (model.embed_tokens.weight) is missing")
    dims = tensors["token_embd.weight"][1]
    if len(dims) != 2:
        raise LoadError(f"{path}: tensor 'token_embd.weight' has {len(dims)} dims {dims}; expected 2 "
                        "(embedding_length, vocabulary size)")
    cols, rows = dims
    hidden = meta_int(meta, f"{arch}.embedding_length", path)
    if hidden != cols:
        raise LoadError(f"{path}: GGUF metadata '{arch}.embedding_length' is {hidden} but token_embd.weight has "
                        f"rows of {cols}; expected them to agree")
    vocab = meta_int(meta, f"{arch}.vocab_size", path, None)
    if vocab is not None and vocab != rows:
        raise LoadError(f"{path}: GGUF metadata '{arch}.vocab_size' is {vocab} but token_embd.weight has "
                        f"{rows} rows; expected one row per token")
    tokens = meta_list(meta, "tokenizer.ggml.tokens", path, "string", None)
    if tokens is not None and len(tokens) != rows:
        raise LoadError(f"{path}: GGUF metadata 'tokenizer.ggml.tokens' has {len(tokens)} tokens but "
                        f"token_embd.weight has {rows} rows; expected one row per token")
    return hidden, rows


def _arch_config(meta: dict, tensors: dict, path: Path, freq_factors=None) -> ModelConfig:
    """GGUF metadata -> ModelConfig (rope_style 'half': q/k come back in HF layout).

    Every key is read with its type checked (gguf_meta); block_count, embedding_length, the
    vocabulary and the head counts are checked against the tensors the file holds before any
    per-layer work."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or arch not in GGUF_ARCHS:
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported; known: "
                          f"{', '.join(GGUF_ARCHS)} (-> {', '.join(KNOWN_ARCHITECTURES)})")
    p = f"{arch}."
    layers = _layer_count(meta, tensors, arch, path)
    hidden, vocab = _embedding_dims(meta, tensors, arch, path)
    heads = meta_int(meta, p + "attention.head_count", path, hi=hidden)
    kv_heads = meta_int(meta, p + "attention.head_count_kv", path, heads, hi=heads)
    if heads % kv_heads:
        raise LoadError(f"{path}: GGUF metadata '{p}attention.head_count_kv' is {kv_heads}, which does not divide "
                        f"'{p}attention.head_count' {heads}; expected a divisor")
    key_len = meta_int(meta, p + "attention.key_length", path, None)
    rot = meta_int(meta, p + "rope.dimension_count", path, None)
    if key_len is None and hidden % heads:
        raise LoadError(f"{path}: GGUF metadata '{p}attention.head_count' is {heads}, which does not divide "
                        f"'{p}embedding_length' {hidden}; expected a divisor (or an attention.key_length)")
    head_dim = key_len or rot or hidden // heads
    if rot is not None and rot != head_dim:
        raise ConfigError(f"{path}: rope.dimension_count {rot} differs from the head dim {head_dim}; partial "
                          "rotary embeddings are not supported")
    vdim = meta_int(meta, p + "attention.value_length", path, None)
    if vdim is not None and vdim != head_dim:
        raise ConfigError(f"{path}: attention.value_length {vdim} differs from attention.key_length {head_dim}; "
                          "not supported")
    ids = special_token_ids(meta, path, vocab)
    eos, eot = ids.get("tokenizer.ggml.eos_token_id"), ids.get("tokenizer.ggml.eot_token_id")
    extra = {"gguf_architecture": arch, "file_type": meta.get("general.file_type")}
    if eot is not None:
        extra["eot_token_id"] = eot
    fields = dict(
        architecture=GGUF_ARCHS[arch],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=meta_int(meta, p + "feed_forward_length", path),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=meta_float(meta, p + "attention.layer_norm_rms_epsilon", path, 1e-5),
        rope_theta=meta_float(meta, p + "rope.freq_base", path, 10000.0),
        rope_scaling=_rope_scaling(meta, arch, path, freq_factors, head_dim),
        rope_style="half",
        max_position_embeddings=meta_int(meta, p + "context_length", path, 2048, hi=MAX_CONTEXT),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias=arch == "qwen2" or "blk.0.attn_q.bias" in tensors,
        attention_out_bias="blk.0.attn_output.bias" in tensors,
        mlp_bias="blk.0.ffn_gate.bias" in tensors,
        bos_token_id=ids.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=[] if eos is None else [eos],
        extra=extra,
    )
    try:
        return ModelConfig(**fields)
    except ConfigError as e:          # ModelConfig's own checks (head_dim even, rope_scaling, ...)
        raise ConfigError(f"{path}: {e}") from None


class GGUFCheckpoint(Checkpoint):
    """A GGUF file; see the module docstring. .metadata: the header's key/values, less the
    vocabulary arrays (VOCAB_ARRAYS), which live on in .tokenizer."""

    format = "gguf"

    def __init__(self, path: Path, progress: bool = True):
        meta, tensors, mm = read_gguf(path)
        self.metadata = meta
        self._mm = mm
        self._by_hf = {}
        self._unmapped = set()
        for gname, info in progress_bar(tensors.items(), len(tensors), f"checking {path.name}", progress):
            hf = gguf_to_hf_name(gname)
            if hf is not None:
                self._by_hf[hf] = (gname, *info)
            elif gname != ROPE_FREQS:
                self._unmapped.add(gname)
        freq_factors = None
        if ROPE_FREQS in tensors:
            qt, dims, start, nbytes = tensors[ROPE_FREQS]
            if qt.name not in ("F32", "F16") or len(dims) != 1:
                raise LoadError(f"{path}: {ROPE_FREQS} is stored as {qt.name} with dims {dims}; expected a 1-D "
                                "F32 (or F16) tensor")
            freq_factors = mm[start:start + nbytes].view(np.float32 if qt.name == "F32" else np.float16)
        cfg = _arch_config(meta, tensors, path, freq_factors)
        self._permuted = meta.get("general.architecture") == "llama"
        from ..tokenizer import Tokenizer
        if "tokenizer.ggml.tokens" in meta:
            tok = Tokenizer.from_gguf_metadata(meta, path)
        else:                          # weights only: token ids work, text raises a LoadError saying why
            from ..tokenizer import MissingTokenizer
            tok = MissingTokenizer(path, cfg.eos_token_ids, reason=f"{path} holds no vocabulary (GGUF metadata "
                                   "'tokenizer.ggml.tokens' is absent)")
        template = meta_str(meta, "tokenizer.chat_template", path, None)
        for key in VOCAB_ARRAYS:       # built into the tokenizer: not kept twice (~100k strings)
            meta.pop(key, None)
        super().__init__(path, cfg, tok, template, file_size(path))
        self._check_storage()

    def _check_storage(self) -> None:
        """Every tensor the model reads has a supported type, and the 1-D ones (norm weights,
        biases) a float type: a quantized norm is an error, never reinterpreted. Shapes are
        Checkpoint.validate's."""
        for name, want in self._expected.items():
            if name not in self._by_hf:
                continue
            gname, qt = self._by_hf[name][:2]
            if qt.name not in SUPPORTED_QUANTS:
                raise LoadError(f"{self.path}: tensor {gname!r} ({name}) is stored as {qt.name}, which is not "
                                f"supported; supported types: {', '.join(SUPPORTED_QUANTS)}")
            if len(want) == 1 and qt.name not in FLOAT_TYPES:
                raise LoadError(f"{self.path}: tensor {gname!r} ({name}, a norm weight or bias) is stored as "
                                f"{qt.name}; expected a float type: {', '.join(FLOAT_TYPES)}")

    def _stored_names(self):
        return set(self._by_hf)

    def _other_stored_names(self):
        return set(self._unmapped)

    def _info(self, name):
        if name not in self._by_hf:
            raise LoadError(f"{self.path}: tensor {name!r} is missing from the GGUF file")
        return self._by_hf[name]

    def _shape(self, name):
        return tuple(reversed(self._info(name)[2]))

    def _stored_dtype(self, name):
        return self._info(name)[1].name

    def _bytes(self, name) -> np.ndarray:
        _, _, _, start, nbytes = self._info(name)
        return self._mm[start:start + nbytes]

    def _load(self, name):
        from gguf.quants import dequantize
        gname, qt, dims, _, _ = self._info(name)
        shape = tuple(reversed(dims))
        data = self._bytes(name)
        if qt.name == "F32":
            arr = data.view(np.float32).reshape(shape)
        elif qt.name == "F16":
            arr = data.view(np.float16).reshape(shape)
        elif qt.name == "BF16":
            arr = data.view(bf16_np()).reshape(shape)
        elif qt.name in SUPPORTED_QUANTS:
            rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            arr = dequantize(data.reshape(rows, -1), qt).reshape(shape)  # (rows, cols) float32
            release_pages(data)
        else:
            raise LoadError(f"{self.path}: tensor {gname!r} ({name}) is stored as {qt.name}, which is not "
                            f"supported; supported types: {', '.join(SUPPORTED_QUANTS)}")
        if self._permuted and (".q_proj." in name or ".k_proj." in name):
            n = self.config.num_attention_heads if ".q_proj." in name else self.config.num_key_value_heads
            arr = unpermute_qk(arr, n)
        return arr

    def _raw(self, name):
        gname, qt, dims, start, nbytes = self._info(name)
        if qt.name != "Q8_0" or len(dims) != 2:
            return super()._raw(name)
        n, k = dims[1], dims[0]
        blocks = self._bytes(name).reshape(n, k // 32, 34)   # per block: f16 scale, 32 x int8
        scales = blocks[:, :, :2].copy().view(np.float16).reshape(n, k // 32)
        q = blocks[:, :, 2:].copy().view(np.int8).reshape(n, k)
        release_pages(blocks)
        if self._permuted and (".q_proj." in name or ".k_proj." in name):
            nh = self.config.num_attention_heads if ".q_proj." in name else self.config.num_key_value_heads
            q, scales = unpermute_qk(q, nh), unpermute_qk(scales, nh)
        return q, scales

    # --- packed weights (hetinfer.packed): the file's blocks, not a float copy ----------------
    def packed_dtype(self, name):
        """The hetinfer packed DType a 2-D tensor is stored in (Q4_K -> q4_k ...), or None for
        float storage and 1-D tensors."""
        from ..dtypes import dtype
        from ..packed import BY_GGUF
        _, qt, dims, _, _ = self._info(name)
        f = BY_GGUF.get(qt.name)
        return dtype(f.name) if f is not None and len(dims) == 2 else None

    def packed(self, name) -> np.ndarray:
        """A packed tensor's blocks (N, K // block) as np.void, a view of the memory map (no
        copy, no conversion), rows in HF order: llama-arch q/k rows, which the file stores
        permuted for interleaved RoPE, are reordered as whole rows (each row is packed on its
        own along K), a packed copy of those two tensors only."""
        dt = self.packed_dtype(name)
        if dt is None:
            raise LoadError(f"{self.path}: tensor {name!r} is stored as {self._stored_dtype(name)}, not one of "
                            "the packed block formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)")
        _, _, dims, _, _ = self._info(name)
        blocks = self._bytes(name).reshape(dims[1], -1).view(dt.np)           # (N, K // block)
        if self._permuted and (".q_proj." in name or ".k_proj." in name):
            nh = self.config.num_attention_heads if ".q_proj." in name else self.config.num_key_value_heads
            blocks = np.ascontiguousarray(unpermute_qk(blocks, nh))
        return blocks

    def kept_as(self, name) -> str:
        """What a CPU run keeps the tensor as (hetinfer info): its packed format (the file's
        blocks, mapped; fused q/k/v or gate/up rows one packed copy), or float32 (mapped when
        the file stores F32, else converted at load)."""
        dt = self.packed_dtype(name)
        if dt is not None:
            return f"{dt} packed"
        return "f32 (mapped)" if self._stored_dtype(name) == "F32" else "f32 (converted)"
