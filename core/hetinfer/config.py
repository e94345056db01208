"""ModelConfig: the architecture-neutral description of a decoder-only
transformer, filled from an HF config.json, GGUF metadata or a llama2.c header.

What the loaders read, and what happens to anything else:

HF config.json (ModelConfig.from_hf; also hetinfer_int8 directories):
  read: architectures (else model_type llama / qwen2), vocab_size, hidden_size, intermediate_size,
    num_hidden_layers, num_attention_heads, num_key_value_heads (default: heads), head_dim
    (default hidden / heads), rms_norm_eps (1e-6), rope_theta or rope_parameters.rope_theta
    (10000), rope_scaling or rope_parameters (types linear, llama3, yarn, dynamic; "default" or
    absent = none; any other type, e.g. longrope, is a ConfigError), original_max_position_embeddings
    (top level: overrides the scaling's, as transformers does), max_position_embeddings (2048),
    tie_word_embeddings (false), attention_bias (Llama: q/k/v/o biases; Qwen2: ignored, q/k/v
    biases always, o never, as transformers' Qwen2Attention), mlp_bias (Llama: gate/up/down
    biases; Qwen2: ignored, never), bos_token_id, eos_token_id (int or list). int8 directories
    also read quantization_config (quant_method hetinfer_int8, group_size, scale_dtype) and rope_style.
  typed (ConfigError naming the file and the key otherwise): sizes positive integers (not
    booleans) within SIZE_LIMITS, hidden_size divisible by num_attention_heads (unless head_dim
    is given), heads by KV heads; rms_norm_eps / rope_theta positive finite numbers; flags
    booleans; token ids non-negative integers below vocab_size; rope_scaling / rope_parameters /
    quantization_config objects; architectures a list of strings.
  checked (ConfigError unless the value is one hetinfer implements): hidden_act (silu),
    partial_rotary_factor (1.0), use_sliding_window (false for Qwen2, or layer_types all full),
    layer_types (all full_attention), quantization_config (hetinfer_int8 only); sliding_window
    and max_window_layers only matter with use_sliding_window.
  ignored on purpose (do not change the forward pass): HF_KEYS_IGNORED below (dtype,
    transformers_version, initializer_range, use_cache, attention_dropout, pad_token_id,
    generation defaults, pretraining_tp, ...).
  any other key: ignored, and load_checkpoint prints a notice naming it
    (extra["unknown_config_keys"]).

GGUF metadata (loaders/gguf_file.py): general.architecture (llama, qwen2), general.alignment,
  general.file_type, {arch}.vocab_size, .embedding_length, .feed_forward_length, .block_count,
  .context_length, .attention.head_count, .attention.head_count_kv, .attention.key_length
  (.attention.value_length and .rope.dimension_count must equal it), .attention.layer_norm_rms_epsilon,
  .rope.freq_base, .rope.scaling.type (none, linear, yarn; others a ConfigError), .rope.scaling.factor,
  .rope.scaling.original_context_length, .rope.scaling.yarn_beta_fast / yarn_beta_slow,
  .rope.scaling.yarn_ext_factor (1 only), .rope.scaling.attn_factor; the tensor rope_freqs.weight
  (per-frequency factors: rope_scaling {"rope_type": "freq_factors"}); bias tensors attn_q/k/v.bias,
  attn_output.bias, ffn_gate/up/down.bias set the bias flags; tokenizer.ggml.* (hetinfer.tokenizer)
  and tokenizer.chat_template. Other metadata keys are ignored.

llama2.c headers: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len (and the
  version-2 group size); everything else about the model is fixed by the format.

Tensors: a stored tensor the model does not read is a LoadError naming it, except those skipped
on purpose (rotary inv_freq buffers; lm_head.weight when tie_word_embeddings), listed in a notice
(Checkpoint.check_unused).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

KNOWN_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
# The largest sizes accepted: far above any released model (Llama 3.1 405B: hidden 16384, 126
# layers, intermediate 53248; Gemma 3: vocab 262144; Llama 4 Scout: context 10M), low enough that
# a corrupt or hostile file is refused before anything is sized from it.
SIZE_LIMITS = {"vocab_size": 1 << 24, "hidden_size": 1 << 16, "intermediate_size": 1 << 18,
               "num_hidden_layers": 1 << 12, "num_attention_heads": 1 << 12, "num_key_value_heads": 1 << 12,
               "head_dim": 1 << 12, "max_position_embeddings": 1 << 26}


@dataclass
class ModelConfig:
    architecture: str                 # "LlamaForCausalLM" | "Qwen2ForCausalLM" | a plugin's
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF dict, e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    rope_style: str = "half"          # "half" (HF layout) | "interleaved" (llama2.c / Meta layout)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False      # q/k/v projections carry a bias (Qwen2; Llama attention_bias)
    attention_out_bias: bool = False  # o_proj carries a bias (Llama attention_bias; never Qwen2)
    mlp_bias: bool = False            # gate/up/down carry biases (Llama mlp_bias; never Qwen2)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in SIZE_LIMITS:
            problem = size_problem(name, getattr(self, name))
            if problem:
                raise ConfigError(f"config field {problem}")
        for name in ("rms_norm_eps", "rope_theta"):
            if not is_positive_number(getattr(self, name)):
                raise ConfigError(f"config field {name} is {show(getattr(self, name))}; expected a positive finite "
                                  "number")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_style not in ("half", "interleaved"):
            raise ConfigError(f"rope_style must be 'half' or 'interleaved', got {self.rope_style!r}")
        if self.rope_scaling is not None:
            from .rope import check_scaling
            self.rope_scaling = check_scaling(self.rope_scaling, self.max_position_embeddings)

    @property
    def context_limit(self) -> int:
        """The longest sequence the model is meant for: max_position_embeddings, or for yarn
        max(max_position_embeddings, factor * original_max_position_embeddings) and for dynamic
        (NTK) factor * max_position_embeddings, the context those scalings extend to
        (transformers itself enforces no limit for them)."""
        from .rope import scaled_context
        return max(self.max_position_embeddings,
                   scaled_context(self.rope_scaling, self.max_position_embeddings))

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Build from a Hugging Face config.json dict (Llama 2/3.x, Qwen2); ``source`` names the
        file in errors.

        The keys read are HF_KEYS_READ, each of the JSON type it must have (sizes positive
        integers within SIZE_LIMITS, hidden_size divisible by the heads unless head_dim is given,
        the heads by the KV heads, eps and theta positive finite numbers, flags booleans, token
        ids inside the vocabulary); HF_KEYS_CHECKED must hold a value hetinfer implements; any
        violation is a ConfigError naming the key. HF_KEYS_IGNORED do not change the forward pass;
        any other key is returned in extra["unknown_config_keys"] (the loader prints a notice)."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source} holds a JSON {type(d).__name__}; expected an object")
        arch = _hf_architecture(d, source)
        check_hf_values(d, arch, source)
        sizes = _hf_sizes(d, source)
        rp = d.get("rope_parameters") or {}
        theta = d.get("rope_theta")
        theta = rp.get("rope_theta", 10000.0) if theta is None else theta
        scaling = d.get("rope_scaling")
        if scaling is None and rp and rp.get("rope_type", rp.get("type", "default")) != "default":
            scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
            scaling = None
        if scaling is not None and d.get("original_max_position_embeddings") is not None:
            # as transformers' standardize_rope_params: a top-level value wins (Phi3-style configs)
            scaling = dict(scaling, original_max_position_embeddings=d["original_max_position_embeddings"])
        eos = d.get("eos_token_id")
        if arch == "Qwen2ForCausalLM":
            # transformers' Qwen2Attention: q/k/v always bias=True, o_proj and the MLP never,
            # whatever attention_bias / mlp_bias say
            qkv_bias, o_bias, mlp_bias = True, False, False
        else:
            # LlamaAttention: q/k/v/o all bias=config.attention_bias; LlamaMLP: config.mlp_bias
            qkv_bias = o_bias = _hf_bool(d, "attention_bias", source)
            mlp_bias = _hf_bool(d, "mlp_bias", source)
        unknown = sorted(k for k in d if k not in HF_KEYS_READ | HF_KEYS_CHECKED | HF_KEYS_IGNORED)
        try:
            return cls(
                architecture=arch,
                **sizes,
                rms_norm_eps=_hf_number(d, "rms_norm_eps", source, 1e-6),
                rope_theta=_hf_number({"rope_theta": theta}, "rope_theta", source, 10000.0),
                rope_scaling=scaling,
                tie_word_embeddings=_hf_bool(d, "tie_word_embeddings", source),
                attention_bias=qkv_bias,
                attention_out_bias=o_bias,
                mlp_bias=mlp_bias,
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=[] if eos is None else (list(eos) if isinstance(eos, list) else [eos]),
                extra={"unknown_config_keys": unknown} if unknown else {},
            )
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except (TypeError, ValueError) as e:       # a malformed rope_scaling value
            raise ConfigError(f"{source}: rope_scaling / rope_parameters has a value of the wrong type: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def gqa_ratio(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


# --- the config.json keys ModelConfig.from_hf knows ---------------------------------------------
HF_KEYS_READ = frozenset({
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
    "rope_parameters", "original_max_position_embeddings", "max_position_embeddings", "tie_word_embeddings",
    "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id",
})
# keys whose value must be one hetinfer implements (check_hf_values)
HF_KEYS_CHECKED = frozenset({
    "hidden_act", "partial_rotary_factor", "use_sliding_window", "sliding_window",
    "max_window_layers", "layer_types", "quantization_config",
})
# keys that do not change the inference forward pass
HF_KEYS_IGNORED = frozenset({
    "torch_dtype", "dtype", "transformers_version", "initializer_range", "use_cache", "attention_dropout",
    "pad_token_id", "name_or_path", "_name_or_path", "output_attentions", "output_hidden_states",
    "return_dict", "is_decoder", "is_encoder_decoder", "add_cross_attention", "tie_encoder_decoder",
    "chunk_size_feed_forward", "problem_type", "id2label", "label2id", "task_specific_params",
    "finetuning_task", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "use_return_dict", "torchscript", "bad_words_ids", "pruned_heads", "cross_attention_hidden_size",
    "auto_map", "rope_rotary_pos_emb", "pretrained_config_archive_map", "rope_interleaved",
    "use_bfloat16", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "tf_legacy_loss", "architectures_kwargs",
    "embedding_multiplier", "rope_type", "classifier_dropout", "hidden_dropout", "mlp_dropout",
    "attn_implementation", "_attn_implementation_autoset", "hetinfer", "rope_style", "pretraining_tp",
})


def check_hf_values(d: dict, arch: str, source: str = "config.json") -> None:
    """ConfigError for a config.json value of the wrong JSON type, or one transformers honours and
    hetinfer does not implement."""
    for key in ("rope_scaling", "rope_parameters", "quantization_config"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise ConfigError(f"{source}: {key} is {show(d[key])}; expected a JSON object or null")
    for key in ("use_sliding_window", "tie_word_embeddings", "attention_bias", "mlp_bias"):
        _hf_bool(d, key, source)
    _hf_token_ids(d, source)
    omp = d.get("original_max_position_embeddings")
    if omp is not None and not (is_int(omp) and omp > 0):
        raise ConfigError(f"{source}: original_max_position_embeddings is {show(omp)}; expected a positive integer")
    act = d.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"{source}: hidden_act {show(act)} is not supported (the MLP is swiglu: silu only)")
    prf = d.get("partial_rotary_factor", (d.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0))
    if prf not in (None, 1, 1.0) or isinstance(prf, bool):
        raise ConfigError(f"{source}: partial_rotary_factor {show(prf)} is not supported (RoPE covers the "
                          "whole head: 1.0 only)")
    lt = d.get("layer_types")
    if lt is not None and not (isinstance(lt, list) and all(isinstance(t, str) for t in lt)):
        raise ConfigError(f"{source}: layer_types is {show(lt)}; expected a list of strings such as "
                          "'full_attention'")
    if arch == "Qwen2ForCausalLM" and d.get("use_sliding_window"):
        # transformers' Qwen2 applies sliding_window only to the layers max_window_layers.. when
        # use_sliding_window is set; hetinfer has no sliding-window attention
        if lt is None or any(t == "sliding_attention" for t in lt):
            raise ConfigError(f"{source}: use_sliding_window is true; sliding-window attention is not "
                              "supported (set use_sliding_window to false for full attention)")
    if lt is not None and any(t != "full_attention" for t in lt):
        raise ConfigError(f"{source}: layer_types holds {sorted(set(lt) - {'full_attention'})}; only "
                          "full_attention layers are supported")
    qc = d.get("quantization_config")
    if qc is not None and qc.get("quant_method") != "hetinfer_int8":
        raise ConfigError(f"{source}: quantization_config quant_method {show(qc.get('quant_method'))} is not "
                          "supported (only hetinfer_int8 directories; GGUF files for llama.cpp quantizations)")


# --- typed reading of config.json values --------------------------------------------------------
def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_finite_number(v) -> bool:
    """A real number (not a bool) that is a finite float: an integer too large for a float (a
    JSON 1e400 written out in digits) is not."""
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def is_positive_number(v) -> bool:
    return is_finite_number(v) and v > 0


def show(v) -> str:
    """repr of a value read from a file, cut short (a hostile file can hold a huge string)."""
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def size_problem(name: str, v, label: str | None = None) -> str | None:
    """'name is v; expected ...' when v is not a valid value of the size field name (called label
    in the message when given), else None."""
    limit = SIZE_LIMITS[name]
    if is_int(v) and 0 < v <= limit:
        return None
    return f"{label or name} is {show(v)}; expected a positive integer (at most {limit})"


def _hf_architecture(d: dict, source: str) -> str:
    archs, mt = d.get("architectures"), d.get("model_type")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise ConfigError(f"{source}: architectures is {show(archs)}; expected a list of class names such as "
                          "['LlamaForCausalLM']")
    if mt is not None and not isinstance(mt, str):
        raise ConfigError(f"{source}: model_type is {show(mt)}; expected a string such as 'llama'")
    archs = archs or {"llama": ["LlamaForCausalLM"], "qwen2": ["Qwen2ForCausalLM"]}.get(mt, [])
    if not archs:
        raise ConfigError(f"{source} names no architecture (no 'architectures' and no known "
                          f"'model_type'); expected one of {', '.join(KNOWN_ARCHITECTURES)}")
    return archs[0]


_HF_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _hf_sizes(d: dict, source: str) -> dict[str, int]:
    """The SIZE_LIMITS fields of a config.json, checked and with their defaults filled in."""
    out: dict[str, int] = {}
    for key in SIZE_LIMITS:
        v = d.get(key)
        if v is None and key not in _HF_REQUIRED:
            continue
        if key not in d:
            raise ConfigError(f"{source} lacks required field {key!r} (a positive integer)")
        problem = size_problem(key, v)
        if problem:
            raise ConfigError(f"{source}: {problem}")
        out[key] = v
    hidden, heads = out["hidden_size"], out["num_attention_heads"]
    kv = out.setdefault("num_key_value_heads", heads)
    if "head_dim" not in out:
        if hidden % heads:
            raise ConfigError(f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}; "
                              "expected a multiple (or an explicit head_dim)")
        out["head_dim"] = hidden // heads
    if heads % kv:
        raise ConfigError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    out.setdefault("max_position_embeddings", 2048)
    return out


def _hf_number(d: dict, key: str, source: str, default: float) -> float:
    v = d.get(key)
    v = default if v is None else v
    if not is_positive_number(v):
        raise ConfigError(f"{source}: {key} is {show(v)}; expected a positive finite number")
    return float(v)


def _hf_bool(d: dict, key: str, source: str) -> bool:
    v = d.get(key)
    if v is not None and not isinstance(v, bool):
        raise ConfigError(f"{source}: {key} is {show(v)}; expected true or false")
    return bool(v)


def _hf_token_ids(d: dict, source: str) -> None:
    """bos_token_id: null or an id; eos_token_id: null, an id or a list of ids; each inside the vocabulary."""
    vocab = d.get("vocab_size")
    for key in ("bos_token_id", "eos_token_id"):
        v = d.get(key)
        ids = v if isinstance(v, list) and key == "eos_token_id" else [] if v is None else [v]
        for i in ids:
            if not is_int(i) or i < 0:
                raise ConfigError(f"{source}: {key} is {show(v)}; expected a non-negative integer token id"
                                  + (" or a list of them" if key == "eos_token_id" else ""))
            if is_int(vocab) and i >= vocab:
                raise ConfigError(f"{source}: {key} {i} is outside the vocabulary (vocab_size {vocab}); expected "
                                  f"an id in 0..{vocab - 1}")
