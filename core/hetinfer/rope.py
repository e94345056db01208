"""RoPE cos/sin tables: plain, linear, llama3, yarn, dynamic (NTK) and per-frequency factors.

Every type computes as transformers' rope init functions (transformers.modeling_rope_utils),
in float64, then rounds the table to float32:

- ``linear``: inv_freq / factor.
- ``llama3``: Llama 3.1's smooth low/high-frequency blend (original_max_position_embeddings
  defaults to max_position_embeddings, as transformers' standardize_rope_params does).
- ``yarn``: the NTK-by-parts blend of interpolated and extrapolated frequencies between the
  correction dims of beta_fast / beta_slow (floored / ceiled unless ``truncate`` is false), and
  the attention factor (``attention_factor``, else 0.1 ln(factor) + 1, or the mscale /
  mscale_all_dim ratio) multiplying cos and sin, as transformers multiplies them
  (``attention_scaling``). ``factor`` defaults to max_position_embeddings / original.
- ``dynamic`` (NTK): transformers recomputes inv_freq in each forward from seq_len =
  max(position_ids) + 1, with base theta * (factor * seq_len / max_pos - (factor - 1)) ** (d / (d - 2))
  once seq_len exceeds max_position_embeddings. hetinfer precomputes one table row per position,
  so row p uses the frequencies of seq_len = p + 1: what transformers uses for the token at
  position p when it decodes one token at a time (its KV cache keeps each key as it was rotated
  then, and so does ours). This equals transformers' generate() exactly while the prompt fits in
  max_position_embeddings (the prefill then uses the unscaled frequencies in both); a prompt
  longer than that is rotated by transformers with the frequencies of its whole length, and here
  per position (as transformers would on a token-by-token pass).
- ``freq_factors`` (hetinfer's own, from GGUF ``rope_freqs.weight``): inv_freq / factors[i], as
  llama.cpp's ggml_rope_ext applies its freq_factors.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import ConfigError

SUPPORTED = ("linear", "llama3", "yarn", "dynamic", "freq_factors")


def _kind(scaling: dict | None) -> str | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    return None if kind in (None, "default") else kind


MAX_SCALED_CONTEXT = 1 << 26      # the context a scaling may extend to (config.SIZE_LIMITS' max_position_embeddings)


def _real(scaling: dict, key: str, kind: str, default=None, positive: bool = False, at_least=None):
    """scaling[key] (default when absent or null) as a float: a finite real number, not a bool or a
    string, > 0 when positive, >= at_least when given; else ConfigError naming it."""
    v = scaling.get(key)
    if v is None:
        return default
    try:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    except OverflowError:
        ok = False
    if ok and positive and not v > 0:
        ok = False
    if ok and at_least is not None and not v >= at_least:
        ok = False
    if not ok:
        want = ("a finite number" + (" > 0" if positive else "") + (f" >= {at_least}" if at_least is not None else ""))
        raise ConfigError(f"rope_scaling {kind!r}: {key} is {str(v)[:40]!r}; expected {want}")
    return float(v)


def check_scaling(scaling: dict, max_position_embeddings: int) -> dict | None:
    """A rope_scaling dict as hetinfer will use it, or ConfigError naming what is missing or unsupported:
    every number it reads a finite real number in its range (factor >= 1 for llama3 / dynamic / yarn,
    > 0 for linear; original_max_position_embeddings a positive integer; the context the scaling
    extends to at most MAX_SCALED_CONTEXT), so nothing fails later when the RoPE table is built."""
    if not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling must be a JSON object, got {scaling!r}")
    kind = _kind(scaling)
    if kind is None:
        return None
    if not isinstance(kind, str) or kind not in SUPPORTED:
        raise ConfigError(f"unsupported rope_scaling type {str(kind)[:40]!r}; supported: {', '.join(SUPPORTED)}")
    if kind == "freq_factors":
        f = scaling.get("factors")
        if not isinstance(f, (list, tuple)) or not f:
            raise ConfigError("rope_scaling type 'freq_factors' needs a 'factors' list")
        for i, x in enumerate(f):
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
                raise ConfigError(f"rope_scaling 'freq_factors': factors[{i}] is {x!r}; expected finite numbers > 0")
        return scaling
    # factor is required for every type, as transformers' validation says
    if scaling.get("factor") is None:
        raise ConfigError(f"rope_scaling type {kind!r} needs a numeric 'factor', got None")
    if kind in ("llama3", "dynamic", "yarn"):
        factor = _real(scaling, "factor", kind, at_least=1.0)
    else:
        factor = _real(scaling, "factor", kind, positive=True)
    if scaling.get("partial_rotary_factor", 1.0) not in (1, 1.0):
        raise ConfigError("rope_scaling: partial_rotary_factor other than 1.0 is not supported")
    orig = scaling.get("original_max_position_embeddings")
    if orig is not None and (isinstance(orig, bool) or not isinstance(orig, int) or not 0 < orig <= MAX_SCALED_CONTEXT):
        raise ConfigError(f"rope_scaling {kind!r}: original_max_position_embeddings is {str(orig)[:40]!r}; expected a "
                          f"positive integer (at most {MAX_SCALED_CONTEXT})")
    if kind == "llama3":
        low = _real(scaling, "low_freq_factor", kind, 1.0, positive=True)
        high = _real(scaling, "high_freq_factor", kind, 4.0, positive=True)
        if not high > low:
            raise ConfigError(f"rope_scaling llama3: high_freq_factor ({high}) must exceed low_freq_factor ({low})")
    if kind == "yarn":
        for key in ("beta_fast", "beta_slow"):
            _real(scaling, key, kind, positive=True)
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            _real(scaling, key, kind)
        if not isinstance(scaling.get("truncate", True), bool):
            raise ConfigError(f"rope_scaling 'yarn': truncate is {scaling['truncate']!r}; expected true or false")
    if kind in ("yarn", "dynamic"):
        base = (orig or max_position_embeddings) if kind == "yarn" else max_position_embeddings
        if factor * base > MAX_SCALED_CONTEXT:
            raise ConfigError(f"rope_scaling {kind!r}: factor {factor} extends the context to {factor * base:.0f} "
                              f"positions; expected at most {MAX_SCALED_CONTEXT}")
    return scaling


def scaled_context(scaling: dict | None, max_position_embeddings: int) -> int:
    """The context a scaling extends to (see ModelConfig.context_limit)."""
    kind = _kind(scaling)
    if kind == "yarn":
        orig = int(scaling.get("original_max_position_embeddings") or max_position_embeddings)
        factor = scaling.get("factor")
        factor = max_position_embeddings / orig if factor is None else float(factor)
        return int(factor * orig)
    if kind == "dynamic":
        return int(float(scaling["factor"]) * max_position_embeddings)
    return max_position_embeddings


def _base_freq(head_dim: int, theta: float) -> np.ndarray:
    return 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))


def yarn_params(head_dim: int, theta: float, scaling: dict, max_position_embeddings: int):
    """(inv_freq (head_dim/2,) float64, attention factor) as transformers' _compute_yarn_parameters."""
    dim = head_dim
    orig = int(scaling.get("original_max_position_embeddings") or max_position_embeddings)
    factor = scaling.get("factor")
    factor = max_position_embeddings / orig if factor is None else float(factor)
    attention_factor = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def corr_dim(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(theta))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extra_factor = 1 - ramp
    pos = theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    inv = (1.0 / (factor * pos)) * (1 - extra_factor) + (1.0 / pos) * extra_factor
    return inv, float(attention_factor)


def dynamic_inv_freq(head_dim: int, theta: float, factor: float, max_position_embeddings: int,
                     seq_len: int) -> np.ndarray:
    """transformers' _compute_dynamic_ntk_parameters for one sequence length (float64)."""
    seq_len = max(seq_len, max_position_embeddings)
    base = theta * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))
    return _base_freq(head_dim, base)


def inv_freq(head_dim: int, theta: float, scaling: dict | None = None,
             max_position_embeddings: int | None = None) -> np.ndarray:
    """The (head_dim/2,) inverse frequencies, scaled as rope_scaling says (dynamic: those of a
    sequence no longer than max_position_embeddings, i.e. unscaled)."""
    freq = _base_freq(head_dim, theta)
    kind = _kind(scaling)
    if kind is None or kind == "dynamic":
        return freq
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings") or max_position_embeddings or 8192)
        wavelen = 2 * math.pi / freq
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = np.where(wavelen > low_wavelen, freq / factor, freq)
        mid = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(mid, (1 - smooth) * freq / factor + smooth * freq, scaled)
    if kind == "linear":
        return freq / float(scaling["factor"])
    if kind == "yarn":
        return yarn_params(head_dim, theta, scaling, max_position_embeddings or 2048)[0]
    if kind == "freq_factors":
        f = np.asarray(scaling["factors"], dtype=np.float64)
        if f.shape != freq.shape:
            raise ConfigError(f"rope freq factors have {f.size} values; head_dim {head_dim} needs {freq.size}")
        return freq / f
    raise ConfigError(f"unsupported rope_scaling type {kind!r}; supported: {', '.join(SUPPORTED)}")


def rope_table64(head_dim: int, max_positions: int, theta: float = 10000.0, scaling: dict | None = None,
                 max_position_embeddings: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of shape (max_positions, head_dim/2), float64 (see the module docstring)."""
    pos = np.arange(max_positions, dtype=np.float64)
    kind = _kind(scaling)
    mpe = max_position_embeddings or max_positions
    if kind == "dynamic":
        factor = float(scaling["factor"])
        seq = np.maximum(pos + 1, mpe)          # row p: the frequencies of seq_len = p + 1
        base = theta * (factor * seq / mpe - (factor - 1)) ** (head_dim / (head_dim - 2))
        freqs = 1.0 / (base[:, None] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
        angles = pos[:, None] * freqs
        return np.cos(angles), np.sin(angles)
    angles = np.outer(pos, inv_freq(head_dim, theta, scaling, mpe))
    scale = yarn_params(head_dim, theta, scaling, mpe)[1] if kind == "yarn" else 1.0
    return np.cos(angles) * scale, np.sin(angles) * scale


def rope_table(head_dim: int, max_positions: int, theta: float = 10000.0,
               scaling: dict | None = None, max_position_embeddings: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of shape (max_positions, head_dim/2), float32."""
    cos, sin = rope_table64(head_dim, max_positions, theta, scaling, max_position_embeddings)
    return cos.astype(np.float32), sin.astype(np.float32)
