"""ModelConfig: the architecture-neutral description of a decoder-only
transformer, filled from an HF config.json, GGUF metadata or a llama2.c header."""

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
    attention_bias: bool = False      # q/k/v projections carry a bias (Qwen2)
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

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        """Build from a Hugging Face config.json dict (Llama 2/3.x, Qwen2)."""
        archs = d.get("architectures") or []
        if not archs:
            mt = d.get("model_type")
            archs = {"llama": ["LlamaForCausalLM"], "qwen2": ["Qwen2ForCausalLM"]}.get(mt, [])
        if not archs:
            raise ConfigError("config.json names no architecture (no 'architectures' and no known "
                              f"'model_type'); expected one of {', '.join(KNOWN_ARCHITECTURES)}")
        arch = archs[0]
        try:
            hidden = int(d["hidden_size"])
            heads = int(d["num_attention_heads"])
            # rope: accept both the classic keys and transformers 5's rope_parameters
            rp = d.get("rope_parameters") or {}
            theta = d.get("rope_theta", rp.get("rope_theta", 10000.0))
            scaling = d.get("rope_scaling")
            if scaling is None and rp and rp.get("rope_type", "default") != "default":
                scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
            if scaling is not None and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
                scaling = None
            eos = d.get("eos_token_id")
            eos_ids = [] if eos is None else ([int(e) for e in eos] if isinstance(eos, list) else [int(eos)])
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
                attention_bias=bool(d.get("attention_bias", arch == "Qwen2ForCausalLM")),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=eos_ids,
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
