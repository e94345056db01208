"""RoPE cos/sin tables, with Llama 3's frequency scaling."""

from __future__ import annotations

import math

import numpy as np

from .errors import ConfigError


def inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """The (head_dim/2,) inverse frequencies, scaled as rope_scaling says."""
    freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if not scaling:
        return freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / freq
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = np.where(wavelen > low_wavelen, freq / factor, freq)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        return np.where(mid, (1 - smooth) * freq / factor + smooth * freq, scaled)
    if kind == "linear":
        return freq / float(scaling["factor"])
    raise ConfigError(f"unsupported rope_scaling type {kind!r}; supported: llama3, linear")


def rope_table(head_dim: int, max_positions: int, theta: float = 10000.0,
               scaling: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of shape (max_positions, head_dim/2), float32."""
    angles = np.outer(np.arange(max_positions, dtype=np.float64), inv_freq(head_dim, theta, scaling))
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
