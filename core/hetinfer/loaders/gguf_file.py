"""GGUF files (llama.cpp): metadata -> ModelConfig, tensors dequantized on request.

The header is parsed here with ``struct`` over a memory map (GGUFReader builds one numpy array
per vocabulary string and takes seconds on a 150k vocabulary); tensor bytes are numpy views of
the same map and are dequantized with ``gguf.quants.dequantize``.

GGUF lists dims fastest first (ne[0] = in_features for a Linear weight), so the numpy shape of a
tensor is the reversed dims: (out_features, in_features), the HF orientation already.
llama-arch files store the rows of attn_q / attn_k permuted for interleaved RoPE
(convert_hf_to_gguf's ``permute``); ``unpermute_qk`` undoes that so q_proj / k_proj come back in
HF layout. qwen2-arch files are not permuted.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np

from ..config import KNOWN_ARCHITECTURES, ModelConfig
from ..errors import ConfigError, LoadError
from .base import BF16, Checkpoint, file_size, memmap, progress_bar, release_pages

GGUF_MAGIC = b"GGUF"

# GGUF metadata value types -> (struct code, size) for scalars
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
            6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
       10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9

# general.architecture -> HF architecture
GGUF_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

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
    if name.startswith("blk."):
        _, idx, rest = name.split(".", 2)
        if idx.isdigit() and rest in _LAYER_MAP:
            return f"model.layers.{idx}.{_LAYER_MAP[rest]}"
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


class _Reader:
    """Sequential little-endian reader over a bytes-like header, raising LoadError on truncation."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise LoadError(f"{self.path}: GGUF header is truncated (needed {n} bytes at offset {self.pos}, "
                            f"file has {len(self.buf)}); the file is incomplete or corrupt")

    def scalar(self, fmt: str, size: int):
        self.need(size)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return v

    def string(self) -> str:
        n = self.scalar("<Q", 8)
        if n > 1 << 24:
            raise LoadError(f"{self.path}: GGUF string length {n} at offset {self.pos - 8} is implausible; "
                            "the file is corrupt")
        self.need(n)
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return s.decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype == 6:  # float32: keep the shortest decimal that round-trips (1e-05, not 9.99999974e-06)
            return float(str(np.float32(self.scalar("<f", 4))))
        if vtype in _SCALARS:
            return self.scalar(*_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar("<I", 4), self.scalar("<Q", 8)
            if etype == _STRING:
                return [self.string() for _ in range(count)]
            if etype in _NP:
                dt = np.dtype(_NP[etype])
                self.need(count * dt.itemsize)
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos).copy()
                self.pos += count * dt.itemsize
                return arr.astype(bool).tolist() if etype == 7 else arr.tolist()
            if etype == _ARRAY:
                return [self.value(_ARRAY) for _ in range(count)]
            raise LoadError(f"{self.path}: unknown GGUF array element type {etype} at offset {self.pos}")
        raise LoadError(f"{self.path}: unknown GGUF metadata value type {vtype} at offset {self.pos}; "
                        "the file is corrupt or from a newer GGUF version")


def read_gguf(path: Path):
    """Parse a GGUF file: (metadata dict, {name: (qtype, dims ne[], absolute offset, nbytes)}, memmap)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    size = file_size(path)
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
    if n_tensors > 1 << 20 or n_kv > 1 << 20:
        raise LoadError(f"{path}: GGUF header claims {n_tensors} tensors and {n_kv} metadata keys; corrupt file")
    meta = {}
    for _ in range(n_kv):
        key = r.string()
        meta[key] = r.value(r.scalar("<I", 4))
    infos = {}
    for _ in range(n_tensors):
        name = r.string()
        ndim = r.scalar("<I", 4)
        if ndim > 4:
            raise LoadError(f"{path}: tensor {name!r} claims {ndim} dims; corrupt file")
        dims = [r.scalar("<Q", 8) for _ in range(ndim)]
        qtype, offset = r.scalar("<I", 4), r.scalar("<Q", 8)
        infos[name] = (qtype, dims, offset)
    align = int(meta.get("general.alignment", 32))
    data_start = (r.pos + align - 1) // align * align
    tensors = {}
    for name, (qtype, dims, offset) in infos.items():
        try:
            qt = GGMLQuantizationType(qtype)
            block, tsize = GGML_QUANT_SIZES[qt]
        except (ValueError, KeyError):
            raise LoadError(f"{path}: tensor {name!r} has unknown GGML type id {qtype}; supported: "
                            f"{', '.join(SUPPORTED_QUANTS)}") from None
        n = int(np.prod(dims)) if dims else 1
        nbytes = n // block * tsize
        start = data_start + offset
        if start + nbytes > size:
            raise LoadError(f"{path}: tensor {name!r} ({qt.name}, {nbytes} bytes at offset {start}) runs past "
                            f"the end of the file ({size} bytes); the file is truncated")
        tensors[name] = (qt, dims, start, nbytes)
    return meta, tensors, mm


def _rope_scaling(meta: dict, arch: str, path: Path, freq_factors, head_dim: int) -> dict | None:
    """GGUF rope metadata -> an HF-style rope_scaling dict.

    rope_freqs.weight (convert_hf_to_gguf writes Llama 3.x's llama3 scaling this way) ->
    {"rope_type": "freq_factors", "factors": [...]}: the inverse frequencies are divided by them,
    as llama.cpp's ggml_rope_ext does. {arch}.rope.scaling.type linear / yarn (with
    rope.scaling.factor, rope.scaling.original_context_length) -> transformers' linear / yarn."""
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
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
        orig = meta.get(f"{arch}.rope.scaling.original_context_length")
        out = {"rope_type": "yarn", "factor": float(factor)}
        if orig:
            out["original_max_position_embeddings"] = int(orig)
        for key, hf in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if meta.get(f"{arch}.rope.scaling.{key}") is not None:
                out[hf] = float(meta[f"{arch}.rope.scaling.{key}"])
        ext = meta.get(f"{arch}.rope.scaling.yarn_ext_factor")
        if ext not in (None, -1, -1.0, 1, 1.0):
            raise ConfigError(f"{path}: rope.scaling.yarn_ext_factor {ext} is not supported (1.0 only)")
        attn = meta.get(f"{arch}.rope.scaling.attn_factor")
        if attn not in (None, 1, 1.0):
            # llama.cpp multiplies its yarn mscale (0.1 ln(factor) + 1) by attn_factor
            f = float(factor)
            out["attention_factor"] = float(attn) * (1.0 if f <= 1 else 0.1 * math.log(f) + 1.0)
        return out
    raise ConfigError(f"{path}: GGUF rope.scaling.type {kind!r} is not supported; supported: linear, yarn "
                      "(and rope_freqs.weight factors)")


def _arch_config(meta: dict, tensors: dict, path: Path, freq_factors=None) -> ModelConfig:
    """GGUF metadata -> ModelConfig (rope_style 'half': q/k come back in HF layout)."""
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported; known: "
                          f"{', '.join(GGUF_ARCHS)} (-> {', '.join(KNOWN_ARCHITECTURES)})")

    def get(key, default=None, required=True):
        full = f"{arch}.{key}"
        if full in meta:
            return meta[full]
        if required and default is None:
            raise LoadError(f"{path}: GGUF metadata lacks {full!r}, needed for the model config")
        return default

    tokens = meta.get("tokenizer.ggml.tokens")
    if "token_embd.weight" not in tensors:
        raise LoadError(f"{path}: tensor 'token_embd.weight' (model.embed_tokens.weight) is missing")
    vocab = len(tokens) if tokens else int(get("vocab_size", tensors["token_embd.weight"][1][1]))
    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", None, False) or get("rope.dimension_count", None, False)
                   or hidden // heads)
    rot = get("rope.dimension_count", None, False)
    if rot is not None and int(rot) != head_dim:
        raise ConfigError(f"{path}: rope.dimension_count {rot} differs from the head dim {head_dim}; partial "
                          "rotary embeddings are not supported")
    vdim = get("attention.value_length", None, False)
    if vdim is not None and int(vdim) != head_dim:
        raise ConfigError(f"{path}: attention.value_length {vdim} differs from attention.key_length {head_dim}; "
                          "not supported")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    extra = {"gguf_architecture": arch, "file_type": meta.get("general.file_type")}
    if meta.get("tokenizer.ggml.eot_token_id") is not None:
        extra["eot_token_id"] = int(meta["tokenizer.ggml.eot_token_id"])
    return ModelConfig(
        architecture=GGUF_ARCHS[arch],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(meta, arch, path, freq_factors, head_dim),
        rope_style="half",
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias=arch == "qwen2" or "blk.0.attn_q.bias" in tensors,
        attention_out_bias="blk.0.attn_output.bias" in tensors,
        mlp_bias="blk.0.ffn_gate.bias" in tensors,
        bos_token_id=None if meta.get("tokenizer.ggml.bos_token_id") is None
        else int(meta["tokenizer.ggml.bos_token_id"]),
        eos_token_ids=[] if eos is None else [int(eos)],
        extra=extra,
    )


class GGUFCheckpoint(Checkpoint):
    """A GGUF file; see the module docstring."""

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
            if qt.name not in ("F32", "F16"):
                raise LoadError(f"{path}: {ROPE_FREQS} is stored as {qt.name}; expected F32")
            freq_factors = mm[start:start + nbytes].view(np.float32 if qt.name == "F32" else np.float16)
        cfg = _arch_config(meta, tensors, path, freq_factors)
        self._permuted = meta.get("general.architecture") == "llama"
        from ..tokenizer import Tokenizer
        tok = Tokenizer.from_gguf_metadata(meta, path) if "tokenizer.ggml.tokens" in meta else None
        super().__init__(path, cfg, tok, meta.get("tokenizer.chat_template"), file_size(path))
        for name in self._expected:
            if name in self._by_hf and self._by_hf[name][1].name not in SUPPORTED_QUANTS:
                gname, qt = self._by_hf[name][:2]
                raise LoadError(f"{path}: tensor {gname!r} ({name}) is stored as {qt.name}, which is not "
                                f"supported; supported types: {', '.join(SUPPORTED_QUANTS)}")

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
        gname, qt, dims, start, nbytes = self._info(name)
        return self._mm[start:start + nbytes]

    def _load(self, name):
        from gguf.quants import dequantize
        gname, qt, dims, start, nbytes = self._info(name)
        shape = tuple(reversed(dims))
        data = self._bytes(name)
        if qt.name == "F32":
            arr = data.view(np.float32).reshape(shape)
        elif qt.name == "F16":
            arr = data.view(np.float16).reshape(shape)
        elif qt.name == "BF16":
            arr = data.view(BF16).reshape(shape)
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
