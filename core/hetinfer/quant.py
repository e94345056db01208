"""int8 weight-only quantization: symmetric per-group int8 weights with f16 (or f32) scales.

Scheme. A Linear weight W (N, K) is cut into groups of G consecutive input columns (G = 64 by
default; 32 and 128 allowed). Each group gets one scale s = max|w| / 127 (rounded to the scale
dtype first) and int8 q in [-127, 127], so W ~= q * s. This is what GGUF Q8_0 (G = 32, f16
scales) and llama2.c version 2 (its own G, f32 scales) store; both load into it without a float
round trip when G matches (their raw int8 blocks are copied bit for bit).

Choosing the int8 values (``method``). "rtn": round to nearest, q = clip(round(w / s)); what
``Int8View`` (``--quantize int8``, at load time) does. "awq", the default of ``save_quantized``
(``hetinfer quantize``; hetinfer/awq.py): per-input-channel scales s, chosen per layer on the
layer's real inputs, are multiplied into W before round to nearest and their inverse is folded
into the op before (the rms_norm weights, the rows of v_proj and up_proj). "gptq" (hetinfer/gptq.py):
GPTQ rounding (Frantar et al. 2022, act-order, static groups): the columns of W are rounded one
at a time, each error pushed onto the columns not yet rounded through the Cholesky factor of
H^-1, H = E[x x^T] of the layer's inputs. awq and gptq calibrate on the float model's layer
inputs over CALIBRATION_TEXT (hetinfer/calibrate.py: prose written for this purpose, no
evaluation text). All three keep the format and the amax / 127 scales of what they quantize,
so kernels and files do not change.

Measured on SmolLM2-135M (the Q4_1 GGUF as the float reference), 512 teacher-forced tokens of
tests/data/pride_and_prejudice_ch1.txt, group 64: awq top-1 agreement 98.63% (7 flips), mean
KL to f32 5.3e-4, ppl +0.13%; gptq 97.46%, KL 6.4e-4, ppl -0.13%; rtn 96.88%, KL 1.48e-3,
ppl -0.49%. Every flip is a near-tie (f32 top-2 logit gap < 0.2). Where rtn loses: mostly in v_proj and
down_proj (quantizing either alone: 9 flips); awq's scales cut the layers' output error on the
calibration inputs by 29% on average (alpha 0.1-0.5). On Qwen2.5-Coder-0.5B: awq 99.22%, rtn 99.61%, ppl -0.01% both.
Calibration costs ~40 s for SmolLM2 on one core (rtn ~1.5 s), so load time stays rtn.

On disk: an HF-style directory (see ``save_quantized``)::

    config.json            the HF config plus "quantization_config": {"quant_method": "hetinfer_int8",
                           "group_size": 64, "scale_dtype": "f16", "method": "awq",
                           "modules_not_converted": [...]}
    model.safetensors      <name> int8 (N, K) and <name>.scales f16/f32 (N, K // G) for every
                           quantized Linear weight; every other tensor (embeddings, lm_head, norms,
                           biases) in f16 (norms and biases in f32)
    tokenizer.json ...     copied from an HF source; built from GGUF metadata; tokenizer.model (llama2.c)

Quantized: the q/k/v/o projections and gate/up/down of every layer. Kept in higher precision
(f16 on disk, the run dtype in memory): model.embed_tokens and lm_head, as most weight-only int8
schemes (bitsandbytes LLM.int8, AWQ/GPTQ exports, TensorRT-LLM int8 weight-only) do; llama.cpp's
Q8_0 quantizes them too.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from .errors import ConfigError, LoadError, ShapeError

QUANT_METHOD = "hetinfer_int8"
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP = 64
SCALE_DTYPES = {"f16": np.dtype(np.float16), "f32": np.dtype(np.float32)}
LINEAR_SUFFIXES = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                   "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                   "mlp.down_proj.weight")
NOT_CONVERTED = ["model.embed_tokens", "lm_head"]
METHODS = ("awq", "gptq", "rtn")
DEFAULT_METHOD = "rtn"            # quantizing while loading: no calibration
SAVE_METHOD = "awq"               # hetinfer quantize / save_quantized


class QuantError(ShapeError):
    """Bad quantization input (group size, scales shape, already-quantized model)."""


def is_quantizable(name: str) -> bool:
    """True for the per-layer Linear weights int8 covers (q/k/v/o, gate/up/down)."""
    return name.startswith("model.layers.") and name.endswith(LINEAR_SUFFIXES)


def scale_dtype(name) -> np.dtype:
    if isinstance(name, str) and name in SCALE_DTYPES:
        return SCALE_DTYPES[name]
    dt = np.dtype(name)
    if dt not in SCALE_DTYPES.values():
        raise QuantError(f"scale dtype {name!r} is not supported; expected f16 or f32")
    return dt


def scale_dtype_name(dt) -> str:
    return "f16" if np.dtype(dt) == np.float16 else "f32"


def check_group(group: int, k: int | None = None, name: str = "weight", allowed=GROUP_SIZES) -> int:
    """A valid group size for an input width k; QuantError otherwise."""
    if not isinstance(group, (int, np.integer)) or isinstance(group, bool) or group <= 0 \
            or (allowed is not None and group not in allowed):
        raise QuantError(f"int8 group size {group!r} is not supported; expected one of "
                         f"{', '.join(map(str, allowed or GROUP_SIZES))}")
    if k is not None and k % group:
        raise QuantError(f"{name}: group size {group} does not divide its input width {k} "
                         f"(shape (N, K={k})); choose a group size that divides K")
    return int(group)


def check_int8(q: np.ndarray, scales: np.ndarray, name: str = "weight") -> int:
    """Validate an (int8 (N, K), scales (N, K // G)) pair; returns G. QuantError otherwise."""
    if q.dtype != np.int8 or q.ndim != 2:
        raise QuantError(f"{name}: expected an int8 (N, K) weight, got {q.dtype} {q.shape}")
    n, k = q.shape
    if scales.ndim != 2 or scales.shape[0] != n or scales.shape[1] == 0 or k % scales.shape[1]:
        raise QuantError(f"{name}.scales has shape {tuple(scales.shape)}; expected ({n}, K // group) for the "
                         f"int8 weight of shape {q.shape}, with a group size dividing K={k}")
    if scales.dtype.kind != "f":
        raise QuantError(f"{name}.scales has dtype {scales.dtype}; expected float16 or float32")
    return k // scales.shape[1]


def quantize_int8(w: np.ndarray, group: int = DEFAULT_GROUP, scale_dt="f16", name: str = "weight",
                  allowed=GROUP_SIZES, hessian: np.ndarray | None = None,
                  damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-group int8 of a float (N, K) weight -> (int8 (N, K), scales (N, K // group)).
    The scale is rounded to its dtype before the weights are divided by it, so q * s is exactly
    what a kernel computes. Without hessian: round to nearest, a block of rows at a time (no full
    float64 copy). With hessian = E[x x^T] (K, K) of the layer's inputs: GPTQ rounding (same
    scales, see the module docstring)."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise QuantError(f"{name}: only 2-D (N, K) weights are quantized, got shape {w.shape}")
    n, k = w.shape
    g = check_group(group, k, name, allowed)
    sdt = scale_dtype(scale_dt)
    if hessian is not None:
        if np.shape(hessian) != (k, k):
            raise QuantError(f"{name}: hessian has shape {np.shape(hessian)}; expected ({k}, {k})")
        from .gptq import gptq_rounding
        return gptq_rounding(w, hessian, g, sdt, damp)
    q = np.empty((n, k), np.int8)
    scales = np.empty((n, k // g), sdt)
    step = max(1, (1 << 20) // k)
    for r0 in range(0, n, step):
        blk = np.asarray(w[r0:r0 + step], np.float32).reshape(-1, k // g, g)     # (rows, K/G, G)
        amax = np.abs(blk).max(axis=-1)                                           # (rows, K/G)
        s = (amax / np.float32(127.0)).astype(sdt)
        sf = s.astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = np.where(sf > 0, np.float32(1.0) / sf, np.float32(0.0))
        qb = np.rint(blk * inv[..., None])
        np.clip(qb, -127, 127, out=qb)
        q[r0:r0 + step] = qb.reshape(-1, k).astype(np.int8)
        scales[r0:r0 + step] = s
    return q, scales


def _gptq():
    from . import gptq          # imported when asked for: it imports this module
    return gptq


def _calibrate():
    from . import calibrate
    return calibrate


def dequantize_int8(q: np.ndarray, scales: np.ndarray, dtype=np.float32) -> np.ndarray:
    """(int8 (N, K), scales (N, K // G)) -> float (N, K) in dtype."""
    check_int8(q, scales)
    n, k = q.shape
    g = k // scales.shape[1]
    w = q.reshape(n, k // g, g).astype(np.float32) * scales.astype(np.float32)[:, :, None]
    return w.reshape(n, k).astype(dtype, copy=False)


# --- which checkpoints are quantized -----------------------------------------------------
def quantized_names(ckpt) -> frozenset:
    """Names whose ``ckpt.raw(name)`` gives (int8, scales) the model should keep as int8:
    a hetinfer_int8 directory or an Int8View; empty for any other checkpoint."""
    return frozenset(getattr(ckpt, "quantized", ()) or ())


def native_int8(ckpt):
    """(group, scale dtype) when every quantizable tensor of ckpt is already stored as int8
    groups of one size (GGUF all-Q8_0: 32, f16; llama2.c version 2: its group, f32), else None.
    Decided from the stored types, without reading the tensors."""
    kinds = set()
    for name in ckpt.names():
        if not is_quantizable(name):
            continue
        st = str(ckpt.stored_dtype(name))
        if st == "Q8_0":
            kinds.add((32, np.dtype(np.float16)))
        elif st.startswith("Q8(group ") and st.endswith(")") and st[9:-1].isdigit():
            kinds.add((int(st[9:-1]), np.dtype(np.float32)))
        else:
            return None
    return kinds.pop() if len(kinds) == 1 else None


def _source_int8(ckpt, name, group, sdt):
    """ckpt.raw(name) when it is int8 with this group size (scales cast to sdt), else None."""
    try:
        q, s = ckpt.raw(name)
    except LoadError:
        return None
    if s.ndim != 2 or s.shape[1] == 0 or q.shape[1] % s.shape[1] or q.shape[1] // s.shape[1] != group:
        return None
    return np.ascontiguousarray(q), np.ascontiguousarray(s.astype(sdt, copy=False))


def _is_int8_checkpoint(ckpt) -> bool:
    return bool(quantized_names(ckpt)) or getattr(ckpt, "quant_method", None) == QUANT_METHOD


class Int8View:
    """Any Checkpoint seen as an int8 one: ``raw(name)`` quantizes a Linear weight on request
    (or passes through a source's own int8 groups of the same size: GGUF Q8_0, llama2.c v2),
    everything else is delegated. Used by ``engine.load(..., quantize="int8")`` and
    ``save_quantized``; nothing is quantized before it is asked for. method: "rtn" (default) or
    "gptq" (all weights are quantized together on the first request, see ``gptq_quantize_all``;
    falls back to "rtn" without a tokenizer or for an architecture other than Llama/Qwen2)."""

    def __init__(self, ckpt, group: int | None = None, scale_dt=None, method: str | None = None):
        if method is None:
            method = DEFAULT_METHOD
        if method not in METHODS:
            raise QuantError(f"int8 rounding method {method!r} is not supported; expected one of "
                             f"{', '.join(METHODS)}")
        if _is_int8_checkpoint(ckpt):
            raise QuantError(f"{ckpt.path}: the model is already quantized ({QUANT_METHOD}); "
                             "load it as it is, without quantizing it again")
        native = native_int8(ckpt)
        if group is None:
            group = native[0] if native else DEFAULT_GROUP
            allowed = None if native else GROUP_SIZES      # a llama2.c file's own group is kept as is
        else:
            allowed = GROUP_SIZES
        if scale_dt is None:
            scale_dt = native[1] if native and native[0] == group else np.float16
        self.source, self.group, self.scale_dtype = ckpt, int(group), scale_dtype(scale_dt)
        self.passthrough = bool(native and native[0] == group)
        names = ckpt.names()
        for name in names:
            if is_quantizable(name):
                check_group(self.group, ckpt.shape(name)[-1], name, allowed)
        self.quantized = frozenset(n for n in names if is_quantizable(n))
        self.quant_method = QUANT_METHOD
        self.method = "rtn" if self.passthrough else method
        if self.method != "rtn" and (ckpt.config.architecture not in ("LlamaForCausalLM", "Qwen2ForCausalLM")
                                     or _calibrate().calibration_ids(ckpt) is None):
            self.method = "rtn"          # no model forward or no tokenizer to calibrate with
        self._calibrated = None          # gptq / awq: {name: (int8, scales)}, on the first request
        self._floats = None              # awq: {name: float32} norms and v biases that carry 1 / s

    def __getattr__(self, attr):        # config, tokenizer, chat_template, path, format, names, shape ...
        return getattr(self.source, attr)

    def raw(self, name):
        if name not in self.quantized:
            if self._scaled(name):
                return self._floats[name]
            return self.source.raw(name)
        got = _source_int8(self.source, name, self.group, self.scale_dtype)
        if got is not None:
            return got
        if self.method != "rtn":
            return self._calibrated_result(name)
        return quantize_int8(self.source.tensor(name, np.float32), self.group, self.scale_dtype, name,
                             allowed=None)

    def _calibrate_all(self):
        if self.method == "gptq":
            self._calibrated = _gptq().gptq_quantize_all(self.source, self.group, self.scale_dtype)
            self._floats = {}
        else:
            from .awq import awq_quantize_all
            self._calibrated, self._floats = awq_quantize_all(self.source, self.group, self.scale_dtype)

    def _calibrated_result(self, name):
        if self._calibrated is None or name not in self._calibrated:     # a second request recomputes
            self._calibrate_all()
        return self._calibrated.pop(name)

    def _scaled(self, name) -> bool:
        """awq: name is a norm weight or v bias that carries 1 / s (computed on first need)."""
        if self.method != "awq" or not name.endswith(("layernorm.weight", "v_proj.bias")):
            return False
        if self._floats is None:
            self._calibrate_all()
        return name in self._floats

    def tensor(self, name, dtype=np.float32):
        if name in self.quantized:
            return dequantize_int8(*self.raw(name), dtype=dtype)
        if self._scaled(name):
            return self._floats[name].astype(dtype)
        return self.source.tensor(name, dtype)

    def stored_dtype(self, name):
        if name in self.quantized:
            return f"I8(group {self.group}, {scale_dtype_name(self.scale_dtype)} scales)"
        return self.source.stored_dtype(name)

    def __repr__(self):
        return f"<Int8View group={self.group} {self.method} of {self.source!r}>"


# --- writing a quantized directory -------------------------------------------------------
def hf_config_dict(ckpt) -> dict:
    """An HF config.json dict for a checkpoint: the source's own when it is an HF directory,
    else built from its ModelConfig."""
    src = Path(ckpt.path)
    if src.is_dir() and (src / "config.json").exists():
        d = json.loads((src / "config.json").read_text(encoding="utf-8"))
        d.pop("quantization_config", None)
        d["torch_dtype"] = "float16"
        return d
    c = ckpt.config
    model_type = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}.get(c.architecture)
    if model_type is None:
        raise ConfigError(f"cannot write a config.json for architecture {c.architecture!r}")
    d = {"architectures": [c.architecture], "model_type": model_type, "vocab_size": c.vocab_size,
         "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
         "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
         "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
         "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling,
         "max_position_embeddings": c.max_position_embeddings,
         "tie_word_embeddings": c.tie_word_embeddings, "attention_bias": c.attention_bias,
         "bos_token_id": c.bos_token_id,
         "eos_token_id": (c.eos_token_ids[0] if len(c.eos_token_ids) == 1 else list(c.eos_token_ids)) or None,
         "torch_dtype": "float16"}
    if c.rope_style != "half":
        d["rope_style"] = c.rope_style       # llama2.c: interleaved RoPE pairs (read back by int8_dir)
    return d


def _write_tokenizer(ckpt, out: Path) -> list[str]:
    """Tokenizer files beside the weights, in a form the HF-directory loader reads back."""
    src = Path(ckpt.path)
    written = []
    if src.is_dir():
        for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "generation_config.json",
                  "special_tokens_map.json", "chat_template.jinja"):
            if (src / f).exists():
                shutil.copy2(src / f, out / f)
                written.append(f)
        return written
    tok = ckpt.tokenizer
    if not tok:                                                  # None, or a MissingTokenizer: nothing to save
        return written
    if getattr(tok, "kind", "") == "sentencepiece":              # llama2.c: tokenizer.model beside it
        sp = src.parent / "tokenizer.model"
        if sp.exists():
            shutil.copy2(sp, out / "tokenizer.model")
            written.append("tokenizer.model")
        tc = {"add_bos_token": bool(tok.add_bos)}
    else:                                                        # GGUF: the tokenizers object
        hf_tok = getattr(getattr(tok, "_b", None), "tok", None)
        if hf_tok is None:
            raise LoadError(f"{src}: cannot save its tokenizer (no tokenizers object)")
        hf_tok.save(str(out / "tokenizer.json"))
        written.append("tokenizer.json")

        def piece(i):
            return None if i is None else tok.id_to_piece(int(i))
        tc = {"add_bos_token": bool(tok.add_bos), "bos_token": piece(tok.bos_id),
              "eos_token": piece(tok.eos_ids[0]) if tok.eos_ids else None}
    if ckpt.chat_template:
        tc["chat_template"] = ckpt.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, ensure_ascii=False), encoding="utf-8")
    written.append("tokenizer_config.json")
    return written


def save_quantized(ckpt, out_dir, group: int | None = None, scale_dt=None, progress: bool = True,
                   method: str | None = None) -> Path:
    """Write ckpt (any loadable format) as a hetinfer_int8 directory; returns its path.

    group None: the source's own int8 group when it is all int8 groups already (GGUF Q8_0 -> 32,
    llama2.c v2 -> its group, copied bit for bit), else 64. Peak memory: the int8 output plus
    one float tensor at a time. method None: "awq" (SAVE_METHOD; rtn where there is nothing to
    calibrate with)."""
    from safetensors.numpy import save_file

    from .loaders.base import progress_bar
    view = Int8View(ckpt, group, scale_dt, SAVE_METHOD if method is None else method)
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        raise LoadError(f"{out} exists and is not empty; choose a new --out directory")
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    names = ckpt.names()
    for name in progress_bar(names, len(names), "quantizing", progress):
        if name in view.quantized:
            q, s = view.raw(name)
            tensors[name], tensors[name + ".scales"] = np.ascontiguousarray(q), np.ascontiguousarray(s)
        else:
            keep = np.float32 if len(ckpt.shape(name)) == 1 else np.float16     # norms, biases: f32
            tensors[name] = np.ascontiguousarray(view.tensor(name, keep))
    cfg = hf_config_dict(ckpt)
    if not Path(ckpt.path).is_dir() and ckpt.tokenizer is not None and ckpt.tokenizer.eos_ids:
        eos = ckpt.tokenizer.eos_ids                      # GGUF: eos and eot; llama2.c: the model's </s>
        cfg["eos_token_id"] = eos[0] if len(eos) == 1 else list(eos)
    cfg["quantization_config"] = {"quant_method": QUANT_METHOD, "group_size": view.group,
                                  "scale_dtype": scale_dtype_name(view.scale_dtype), "method": view.method,
                                  "modules_not_converted": list(NOT_CONVERTED)}
    save_file(tensors, str(out / "model.safetensors"),
              metadata={"format": "pt", "quant_method": QUANT_METHOD, "group_size": str(view.group)})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out / "model.safetensors", 0o666 & ~umask)      # save_file creates it 0600
    (out / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    _write_tokenizer(ckpt, out)
    if progress:
        how = ("copied bit for bit from the source's int8 groups" if view.passthrough
               else f"quantized ({view.method})")
        print(f"wrote {out} ({len(view.quantized)} int8 tensors {how}, group {view.group}, "
              f"{scale_dtype_name(view.scale_dtype)} scales)", file=sys.stderr)
    return out
