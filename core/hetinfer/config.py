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
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

KNOWN_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")


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
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"config field {name} must be a positive integer, got {v!r}")
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
    def from_hf(cls, d: dict) -> "ModelConfig":
        """Build from a Hugging Face config.json dict (Llama 2/3.x, Qwen2).

        The keys read are HF_KEYS_READ; HF_KEYS_CHECKED must hold a value hetinfer implements
        (else ConfigError); HF_KEYS_IGNORED do not change the forward pass; any other key is
        returned in extra["unknown_config_keys"] (the loader prints a notice listing them)."""
        archs = d.get("architectures") or []
        if not archs:
            mt = d.get("model_type")
            archs = {"llama": ["LlamaForCausalLM"], "qwen2": ["Qwen2ForCausalLM"]}.get(mt, [])
        if not archs:
            raise ConfigError("config.json names no architecture (no 'architectures' and no known "
                              f"'model_type'); expected one of {', '.join(KNOWN_ARCHITECTURES)}")
        arch = archs[0]
        check_hf_values(d, arch)
        try:
            hidden = int(d["hidden_size"])
            heads = int(d["num_attention_heads"])
            # rope: accept both the classic keys and transformers 5's rope_parameters
            rp = d.get("rope_parameters") or {}
            theta = d.get("rope_theta", rp.get("rope_theta", 10000.0))
            scaling = d.get("rope_scaling")
            if scaling is None and rp and rp.get("rope_type", rp.get("type", "default")) != "default":
                scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
            if scaling is not None and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
                scaling = None
            if scaling is not None and d.get("original_max_position_embeddings") is not None:
                # as transformers' standardize_rope_params: a top-level value wins (Phi3-style configs)
                scaling = dict(scaling, original_max_position_embeddings=d["original_max_position_embeddings"])
            eos = d.get("eos_token_id")
            eos_ids = [] if eos is None else ([int(e) for e in eos] if isinstance(eos, list) else [int(eos)])
            if arch == "Qwen2ForCausalLM":
                # transformers' Qwen2Attention: q/k/v always bias=True, o_proj and the MLP never,
                # whatever attention_bias / mlp_bias say
                qkv_bias, o_bias, mlp_bias = True, False, False
            else:
                # LlamaAttention: q/k/v/o all bias=config.attention_bias; LlamaMLP: config.mlp_bias
                qkv_bias = o_bias = bool(d.get("attention_bias", False))
                mlp_bias = bool(d.get("mlp_bias", False))
            unknown = sorted(k for k in d if k not in HF_KEYS_READ | HF_KEYS_CHECKED | HF_KEYS_IGNORED)
            return cls(
                architecture=arch,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                rope_scaling=scaling,
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=qkv_bias,
                attention_out_bias=o_bias,
                mlp_bias=mlp_bias,
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=eos_ids,
                extra={"unknown_config_keys": unknown} if unknown else {},
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.json has a field of the wrong type: {e}") from None

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


def check_hf_values(d: dict, arch: str) -> None:
    """ConfigError for a config.json value transformers honours and hetinfer does not implement."""
    act = d.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"config.json: hidden_act {act!r} is not supported (the MLP is swiglu: silu only)")
    prf = d.get("partial_rotary_factor", (d.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0))
    if prf not in (None, 1, 1.0):
        raise ConfigError(f"config.json: partial_rotary_factor {prf!r} is not supported (RoPE covers the "
                          "whole head: 1.0 only)")
    if arch == "Qwen2ForCausalLM" and d.get("use_sliding_window"):
        # transformers' Qwen2 applies sliding_window only to the layers max_window_layers.. when
        # use_sliding_window is set; hetinfer has no sliding-window attention
        layers = d.get("layer_types")
        if layers is None or any(t == "sliding_attention" for t in layers):
            raise ConfigError("config.json: use_sliding_window is true; sliding-window attention is not "
                              "supported (set use_sliding_window to false for full attention)")
    lt = d.get("layer_types")
    if lt is not None and any(t != "full_attention" for t in lt):
        raise ConfigError(f"config.json: layer_types holds {sorted(set(lt) - {'full_attention'})}; only "
                          "full_attention layers are supported")
    qc = d.get("quantization_config")
    if qc is not None and (not isinstance(qc, dict) or qc.get("quant_method") != "hetinfer_int8"):
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise ConfigError(f"config.json: quantization_config quant_method {method!r} is not supported "
                          "(only hetinfer_int8 directories; GGUF files for llama.cpp quantizations)")
