"""llama2.c checkpoints (karpathy/llama2.c export.py), with tokenizer.model beside them.

Three layouts, all little-endian:
- legacy (v0): 7 x int32 header (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
  seq_len; vocab_size < 0 means an unshared classifier follows), then fp32 in run.c order:
  tok_embeddings, attention_norm[L], wq[L], wk[L], wv[L], wo[L], ffn_norm[L], w1[L], w2[L],
  w3[L], norm, freq_cis_real (seq_len, hd/2), freq_cis_imag (seq_len, hd/2), [output].
- version 1: uint32 magic 0x616b3432 ("ak42"), int32 version, the 7 params, uint8
  shared_classifier, zero padding to 256 bytes; fp32: attention_norm[L], ffn_norm[L], norm,
  tok_embeddings, wq[L], wk[L], wv[L], wo[L], w1[L], w2[L], w3[L], [output].
- version 2: the v1 header plus int32 group_size; fp32 norms (attention_norm[L], ffn_norm[L],
  norm), then int8 weights (tok_embeddings, wq[L] ... w3[L], [output]), then the fp32 scales of
  each of those weights in the same order (one per group of group_size consecutive values).

Weights are in Meta layout (interleaved RoPE pairs): rope_style="interleaved", no permutation.
w1 = gate_proj, w3 = up_proj, w2 = down_proj.
"""

from __future__ import annotations

import math
import os
import re
import struct
from pathlib import Path

import numpy as np

from ..config import ModelConfig, size_problem
from ..errors import LoadError
from .base import Checkpoint, file_size, memmap
from .files import MAX_TOKENIZER_BYTES, read_bytes

MAGIC = 0x616B3432
_HF = {"attention_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight",
       "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight", "wo": "self_attn.o_proj.weight",
       "ffn_norm": "post_attention_layernorm.weight", "w1": "mlp.gate_proj.weight",
       "w2": "mlp.down_proj.weight", "w3": "mlp.up_proj.weight"}


def _hf(kind: str, layer: int | None = None) -> str:
    if kind == "tok_embeddings":
        return "model.embed_tokens.weight"
    if kind == "norm":
        return "model.norm.weight"
    if kind == "output":
        return "lm_head.weight"
    return f"model.layers.{layer}.{_HF[kind]}"


def _shapes(dim, hidden, n_heads, n_kv, vocab):
    hd = dim // n_heads
    return {"tok_embeddings": (vocab, dim), "attention_norm": (dim,), "ffn_norm": (dim,), "norm": (dim,),
            "wq": (n_heads * hd, dim), "wk": (n_kv * hd, dim), "wv": (n_kv * hd, dim), "wo": (dim, n_heads * hd),
            "w1": (hidden, dim), "w2": (dim, hidden), "w3": (hidden, dim), "output": (vocab, dim)}


def _order(kinds, n_layers):
    """Expand ['tok_embeddings', 'wq', ...] to [(kind, layer|None)] (per-layer kinds repeat L times)."""
    out = []
    for k in kinds:
        if k in _HF:
            out += [(k, i) for i in range(n_layers)]
        else:
            out.append((k, None))
    return out


def _check_header(path, dim, hidden, L, nh, nkv, vocab, seq, group_size) -> None:
    """LoadError unless the header's sizes are positive, within SIZE_LIMITS and divisible as the
    architecture needs (dim by n_heads into an even head size, n_heads by n_kv_heads, every
    int8 weight by the v2 group size)."""
    values = {"dim": ("hidden_size", dim), "hidden_dim": ("intermediate_size", hidden),
              "n_layers": ("num_hidden_layers", L), "n_heads": ("num_attention_heads", nh),
              "n_kv_heads": ("num_key_value_heads", nkv), "vocab_size": ("vocab_size", vocab),
              "seq_len": ("max_position_embeddings", seq)}
    problems = [p for label, (k, v) in values.items() if (p := size_problem(k, v, label))]
    if not problems:
        if dim % nh or (dim // nh) % 2:
            problems.append(f"dim {dim} is not n_heads {nh} times an even head size")
        elif nh % nkv:
            problems.append(f"n_heads {nh} is not a multiple of n_kv_heads {nkv}")
        elif p := size_problem("head_dim", dim // nh, "the head size dim / n_heads"):
            problems.append(p)
    if not problems and group_size is not None:
        sizes = {"tok_embeddings": vocab * dim, "wq/wo": dim * dim, "wk/wv": nkv * (dim // nh) * dim,
                 "w1/w2/w3": hidden * dim}
        if group_size <= 0:
            problems.append(f"group_size {group_size} is not positive")
        problems += [f"{k} has {n} values, not a multiple of group_size {group_size}"
                     for k, n in sizes.items() if group_size > 0 and n % group_size]
    if problems:
        raise LoadError(f"{path}: not a valid llama2.c checkpoint: header dim={dim}, hidden_dim={hidden}, "
                        f"n_layers={L}, n_heads={nh}, n_kv_heads={nkv}, vocab_size={vocab}, seq_len={seq}"
                        + ("" if group_size is None else f", group_size={group_size}")
                        + f" is implausible ({'; '.join(problems)}); expected a GGUF file, an HF directory or a "
                        "llama2.c .bin")


def _implied_size(version, dim, hidden, L, nh, nkv, vocab, seq, shared, group_size) -> int:
    """The file size the header implies (the layout _build_layout lays out), computed without
    enumerating layers, so a header claiming huge sizes is refused before anything is built."""
    kv = nkv * (dim // nh)
    weights = vocab * dim * (1 if shared else 2) + L * (2 * dim * dim + 2 * kv * dim + 3 * hidden * dim)
    norms = 2 * dim * L + dim
    if version == 0:
        return 28 + 4 * (weights + norms + seq * (dim // nh))     # + freq_cis_real/imag (seq, hd/2) each
    if version == 1:
        return 256 + 4 * (weights + norms)
    return 256 + 4 * norms + weights + 4 * (weights // group_size)   # int8 values, then f32 group scales


def read_tokenizer_bin(path: Path, vocab_size: int) -> tuple[list[bytes], list[float]]:
    """(pieces, scores) of a llama2.c tokenizer.bin: int32 max_token_length, then per token a
    float32 score, an int32 length and that many bytes. Every length is checked against the
    bytes left; the file must hold exactly vocab_size tokens."""
    data = read_bytes(path, "llama2.c tokenizer.bin", MAX_TOKENIZER_BYTES)
    if len(data) < 4 + 8 * vocab_size:
        raise LoadError(f"{path}: llama2.c tokenizer.bin has {len(data)} bytes; {vocab_size} tokens need at "
                        f"least {4 + 8 * vocab_size}")
    (max_len,) = struct.unpack_from("<i", data, 0)
    if max_len <= 0:
        raise LoadError(f"{path}: llama2.c tokenizer.bin max_token_length is {max_len}; expected a positive integer")
    pieces, scores, pos = [], [], 4
    for i in range(vocab_size):
        if pos + 8 > len(data):
            raise LoadError(f"{path}: llama2.c tokenizer.bin is truncated at token {i} of {vocab_size}")
        score, n = struct.unpack_from("<fi", data, pos)
        pos += 8
        if not 0 <= n <= min(max_len, len(data) - pos):
            raise LoadError(f"{path}: llama2.c tokenizer.bin token {i} has length {n}; expected 0..{max_len} "
                            f"(max_token_length) within the {len(data) - pos} bytes left")
        if not math.isfinite(score):
            raise LoadError(f"{path}: llama2.c tokenizer.bin token {i} has score {score}; expected a finite number")
        pieces.append(data[pos:pos + n])
        scores.append(score)
        pos += n
    if pos != len(data):
        raise LoadError(f"{path}: llama2.c tokenizer.bin has {len(data) - pos} bytes after its {vocab_size} tokens; "
                        "it belongs to a model with a larger vocabulary")
    return pieces, scores


def tokenizer_bin_meta(pieces: list[bytes], scores: list[float], path: Path) -> dict:
    """GGUF-style 'llama' tokenizer metadata from tokenizer.bin pieces, undoing llama2.c's export
    (tokenizer.py: '▁' written as ' ', <s> and </s> as '\\n<s>\\n' and '\\n</s>\\n'; ids 0, 1, 2
    are <unk>, <s>, </s>)."""
    tokens, types = [], []
    for i, b in enumerate(pieces):
        try:
            t = b.decode("utf-8")
        except UnicodeDecodeError:
            raise LoadError(f"{path}: llama2.c tokenizer.bin token {i} is not valid UTF-8") from None
        t = t.strip("\n") if i in (1, 2) else t.replace(" ", "\u2581")
        tokens.append(t)
        types.append(2 if i == 0 else 3 if i in (1, 2) else 6 if re.fullmatch(r"<0x[0-9A-F]{2}>", t) else 1)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": True}


def _tokenizer(path: Path, tokenizer_path, vocab_size: int):
    """tokenizer_path (a SentencePiece .model or a llama2.c tokenizer.bin), else tokenizer.model or
    tokenizer.bin beside the checkpoint."""
    from ..tokenizer import Tokenizer
    if tokenizer_path is not None:
        candidates = [Path(tokenizer_path)]
    else:
        candidates = [path.parent / "tokenizer.model", path.parent / "tokenizer.bin"]
    tok_path = next((c for c in candidates if os.path.lexists(c)), None)
    if tok_path is None:
        raise LoadError(f"{path}: llama2.c checkpoints need a SentencePiece tokenizer.model (or llama2.c's "
                        f"tokenizer.bin); none at {' or '.join(map(str, candidates))} (pass tokenizer_path=...)")
    if tok_path.suffix == ".bin":
        tok = Tokenizer.from_gguf_metadata(tokenizer_bin_meta(*read_tokenizer_bin(tok_path, vocab_size), tok_path),
                                           tok_path)
        tok.source = tok_path
        return tok
    return Tokenizer.from_sentencepiece(tok_path, add_bos=True)


class Llama2cCheckpoint(Checkpoint):
    """A llama2.c .bin file (legacy, version 1 or version 2)."""

    format = "llama2c"

    def __init__(self, path: Path, tokenizer_path: Path | None = None, progress: bool = True):
        self.path = Path(path)
        size = file_size(path)
        if size < 28:
            raise LoadError(f"{path}: too small for a llama2.c checkpoint ({size} bytes; the header alone is 28)")
        with open(path, "rb") as f:
            head = f.read(256)
        magic = struct.unpack_from("<I", head, 0)[0]
        self.group_size = None
        if magic == MAGIC:
            if size < 256:
                raise LoadError(f"{path}: llama2.c header is truncated ({size} bytes, expected 256)")
            self.version = struct.unpack_from("<i", head, 4)[0]
            dim, hidden, L, nh, nkv, vocab, seq = struct.unpack_from("<7i", head, 8)
            shared = bool(head[36])
            if self.version == 2:
                self.group_size = struct.unpack_from("<i", head, 37)[0]
            elif self.version != 1:
                raise LoadError(f"{path}: llama2.c version {self.version} is not supported (expected 1 or 2, "
                                "or a legacy header-less file)")
            offset = 256
        else:
            self.version = 0
            dim, hidden, L, nh, nkv, vocab, seq = struct.unpack_from("<7i", head, 0)
            shared = vocab > 0
            vocab = abs(vocab)
            offset = 28
        _check_header(path, dim, hidden, L, nh, nkv, vocab, seq, self.group_size)
        end = _implied_size(self.version, dim, hidden, L, nh, nkv, vocab, seq, shared, self.group_size)
        if size < end:
            raise LoadError(f"{path}: llama2.c file is truncated: the header (version {self.version}, dim={dim}, "
                            f"n_layers={L}, vocab={vocab}) implies at least {end} bytes, the file has {size}")
        if size > end:       # export.py writes exactly the layout: a header that lies about a size reads garbage
            raise LoadError(f"{path}: llama2.c header (version {self.version}, dim={dim}, hidden_dim={hidden}, "
                            f"n_layers={L}, n_heads={nh}, n_kv_heads={nkv}, vocab={vocab}, seq_len={seq}"
                            + ("" if self.group_size is None else f", group_size={self.group_size}")
                            + f") implies {end} bytes but the file has {size} ({size - end} more); the header does "
                            "not describe this file")
        cfg = ModelConfig(
            architecture="LlamaForCausalLM", vocab_size=vocab, hidden_size=dim, intermediate_size=hidden,
            num_hidden_layers=L, num_attention_heads=nh, num_key_value_heads=nkv, head_dim=dim // nh,
            rms_norm_eps=1e-5, rope_theta=10000.0, rope_style="interleaved", max_position_embeddings=seq,
            tie_word_embeddings=shared, attention_bias=False,
            extra={"llama2c_version": self.version, "group_size": self.group_size})
        self._layout = self._build_layout(cfg, offset, shared)
        self._mm = memmap(path)
        tok = _tokenizer(path, tokenizer_path, vocab)
        cfg.bos_token_id = tok.bos_id
        cfg.eos_token_ids = list(tok.eos_ids)
        super().__init__(path, cfg, tok, None, size)

    def _build_layout(self, cfg: ModelConfig, offset: int, shared: bool) -> dict:
        """{hf name: {'kind', 'shape', 'start', 'end', 'qstart', 'sstart'}} byte layout of the file."""
        L = cfg.num_hidden_layers
        shapes = _shapes(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                         cfg.num_key_value_heads, cfg.vocab_size)
        mats = ["tok_embeddings", "wq", "wk", "wv", "wo", "w1", "w2", "w3"] + ([] if shared else ["output"])
        layout = {}

        def add_f32(kind, layer, pos):
            n = int(np.prod(shapes[kind]))
            layout[_hf(kind, layer)] = {"kind": "f32", "shape": shapes[kind], "start": pos, "end": pos + 4 * n}
            return pos + 4 * n

        pos = offset
        if self.version == 0:
            kinds = ["tok_embeddings", "attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3", "norm"]
            for k, i in _order(kinds, L):
                pos = add_f32(k, i, pos)
            pos += 2 * 4 * cfg.max_position_embeddings * (cfg.head_dim // 2)  # freq_cis_real/imag: skipped
            if not shared:
                pos = add_f32("output", None, pos)
        elif self.version == 1:
            kinds = ["attention_norm", "ffn_norm", "norm", "tok_embeddings", "wq", "wk", "wv", "wo",
                     "w1", "w2", "w3"] + ([] if shared else ["output"])
            for k, i in _order(kinds, L):
                pos = add_f32(k, i, pos)
        else:
            gs = self.group_size
            for k, i in _order(["attention_norm", "ffn_norm", "norm"], L):
                pos = add_f32(k, i, pos)
            qlist = _order(mats, L)
            for k, i in qlist:
                n = int(np.prod(shapes[k]))
                layout[_hf(k, i)] = {"kind": "q8", "shape": shapes[k], "qstart": pos}
                pos += n
            for k, i in qlist:
                e = layout[_hf(k, i)]
                n = int(np.prod(shapes[k])) // gs
                e["sstart"], e["start"], e["end"] = pos, e["qstart"], pos + 4 * n
                pos += 4 * n
        return layout

    def _stored_names(self):
        return set(self._layout)

    def _shape(self, name):
        return self._layout[name]["shape"]

    def _stored_dtype(self, name):
        return "F32" if self._layout[name]["kind"] == "f32" else f"Q8(group {self.group_size})"

    def _load(self, name):
        e = self._layout[name]
        if e["kind"] == "f32":
            return self._mm[e["start"]:e["end"]].view("<f4").reshape(e["shape"])
        q, s = self._raw(name)
        n = q.size
        gs = self.group_size
        return (q.reshape(n // gs, gs).astype(np.float32) * s.reshape(-1, 1)).reshape(e["shape"])

    def _raw(self, name):
        e = self._layout[name]
        if e["kind"] != "q8":
            return super()._raw(name)
        shape, gs = e["shape"], self.group_size
        n = int(np.prod(shape))
        q = self._mm[e["qstart"]:e["qstart"] + n].view(np.int8).reshape(shape)      # (N, K) int8
        s = self._mm[e["sstart"]:e["sstart"] + 4 * (n // gs)].view("<f4")           # (N*K/gs,) f32
        if shape[-1] % gs == 0:
            s = s.reshape(shape[0], shape[-1] // gs)                                  # (N, K/gs)
        return q, s
