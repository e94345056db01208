"""A preallocated per-layer KV cache: k[layer], v[layer] of shape (S, Hkv, Dh)."""

from __future__ import annotations

from .tensor import empty


class KVCache:
    def __init__(self, num_layers: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype, device):
        self.max_len = max_len
        self.k = [empty((max_len, num_kv_heads, head_dim), dtype, device) for _ in range(num_layers)]
        self.v = [empty((max_len, num_kv_heads, head_dim), dtype, device) for _ in range(num_layers)]
        self.length = 0          # positions 0..length-1 hold valid keys and values

    @classmethod
    def for_model(cls, model, max_len: int | None = None) -> "KVCache":
        c = model.config
        return cls(c.num_hidden_layers, max_len or model.max_context, c.num_key_value_heads,
                   c.head_dim, model.dtype, model.device)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v)
