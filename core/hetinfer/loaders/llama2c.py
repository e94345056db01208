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

import struct
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import LoadError
from .base import Checkpoint, file_size, memmap

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
        params = (dim, hidden, L, nh, nkv, vocab, seq)
        if min(params) <= 0 or max(params) > 1 << 24 or dim % nh or nh % nkv:
            raise LoadError(f"{path}: not a llama2.c checkpoint (header dim={dim}, hidden_dim={hidden}, "
                            f"n_layers={L}, n_heads={nh}, n_kv_heads={nkv}, vocab_size={vocab}, seq_len={seq} is "
                            "implausible); expected a GGUF file, an HF directory or a llama2.c .bin")
        if self.group_size is not None and self.group_size <= 0:
            raise LoadError(f"{path}: llama2.c v2 header has group_size {self.group_size}")
        cfg = ModelConfig(
            architecture="LlamaForCausalLM", vocab_size=vocab, hidden_size=dim, intermediate_size=hidden,
            num_hidden_layers=L, num_attention_heads=nh, num_key_value_heads=nkv, head_dim=dim // nh,
            rms_norm_eps=1e-5, rope_theta=10000.0, rope_style="interleaved", max_position_embeddings=seq,
            tie_word_embeddings=shared, attention_bias=False,
            extra={"llama2c_version": self.version, "group_size": self.group_size})
        self._layout = self._build_layout(cfg, offset, shared)
        end = max(e["end"] for e in self._layout.values())
        if size < end:
            raise LoadError(f"{path}: llama2.c file is truncated: the header (version {self.version}, dim={dim}, "
                            f"n_layers={L}, vocab={vocab}) implies at least {end} bytes, the file has {size}")
        self._mm = memmap(path)
        tok_path = Path(tokenizer_path) if tokenizer_path is not None else path.parent / "tokenizer.model"
        if not tok_path.exists():
            raise LoadError(f"{path}: llama2.c checkpoints need a SentencePiece tokenizer.model; none at "
                            f"{tok_path} (pass tokenizer_path=...)")
        from ..tokenizer import Tokenizer
        tok = Tokenizer.from_sentencepiece(tok_path, add_bos=True)
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
                if n % gs:
                    raise LoadError(f"{self.path}: llama2.c v2: {_hf(k, i)} has "
                                    f"{n} values, not a multiple of group_size {gs}")
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
