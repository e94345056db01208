"""Tensor parallelism for the Llama-family decoder (Megatron-style), over the ranks of the
current hetinfer.distributed group.

Per layer: q/k/v and gate/up are column-parallel (each rank holds a run of whole heads: Hq/N
query heads and Hkv/N kv heads, so N must divide num_key_value_heads; F/N rows of gate and
of up), o and down are row-parallel (the matching input columns) and their partial sums
meet in one all_reduce of the f32 residual stream (rank 0 adds the residual and the biases).
The token embedding is vocabulary-parallel (V/N rows a rank plus one zero row that ids of
the other ranks map to, then an all_reduce) and so is the head (each rank's V/N logits, then
an all_gather for sampling). Each rank's KV cache holds only its kv heads.

Each rank reads only its slices of the memory map (ShardedCheckpoint): int8 weights with
their group scales, GGUF packed weights by whole rows (column-parallel) or by whole blocks
along K (row-parallel; a split that is not block-aligned is dequantized, with a notice)."""

from __future__ import annotations

import dataclasses
import sys

import hetinfer as hi
import numpy as np
from hetinfer import distributed, ops
from hetinfer.config import ModelConfig
from hetinfer.errors import ConfigError, LoadError
from hetinfer.loaders.base import Checkpoint

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
COLUMN = ("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.", "mlp.gate_proj.", "mlp.up_proj.")
ROW = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


def shard_config(cfg: ModelConfig, n: int) -> ModelConfig:
    """One rank's config: its heads and its FFN width (vocab_size stays the full V: the
    logits come back whole). Refuses sizes N does not divide."""
    problems = [f"{what} ({v})" for what, v in (
        ("num_key_value_heads", cfg.num_key_value_heads), ("num_attention_heads", cfg.num_attention_heads),
        ("intermediate_size", cfg.intermediate_size), ("vocab_size", cfg.vocab_size)) if v % n]
    if problems:
        raise ConfigError(f"tensor_parallel={n} must divide {', '.join(problems)} of this {cfg.architecture} "
                          f"model (GQA kv heads are kept whole per rank); choose a world size dividing "
                          f"{cfg.num_key_value_heads}")
    return dataclasses.replace(cfg, num_attention_heads=cfg.num_attention_heads // n,
                               num_key_value_heads=cfg.num_key_value_heads // n,
                               intermediate_size=cfg.intermediate_size // n)


def axis_of(name: str):
    """0: split rows (column-parallel, vocab-parallel), 1: split input columns (row-parallel),
    None: every rank holds it whole (norms, row-parallel biases)."""
    if name in (EMBED, HEAD) or any(p in name for p in COLUMN):
        return 0
    if any(name.endswith(p) for p in ROW):
        return 1
    return None


class ShardedCheckpoint:
    """The checkpoint as one rank sees it: same names, each tensor its rank's slice; config
    is the rank's config. The embedding gets one zero row appended (the masked lookup's
    target). Everything else is the wrapped checkpoint's."""

    def __init__(self, ckpt, rank: int, world_size: int):
        self._ckpt, self.rank, self.n = ckpt, rank, world_size
        self.full_config = ckpt.config
        self.config = shard_config(ckpt.config, world_size)
        self.dequantized: list[str] = []

    def __getattr__(self, name):
        return getattr(self._ckpt, name)

    def _slice(self, arr, name, axis, unit: int = 1):
        size = arr.shape[axis]
        if size % (self.n * unit):
            raise LoadError(f"{self._ckpt.path}: {name} has {size} along axis {axis}, which does not split "
                            f"into {self.n} equal parts of whole {unit}s")
        part = size // self.n
        index = [slice(None)] * arr.ndim
        index[axis] = slice(self.rank * part, (self.rank + 1) * part)
        return arr[tuple(index)]

    def _with_zero_row(self, name, arr):
        if name != EMBED:
            return arr
        return np.concatenate([arr, np.zeros((1,) + arr.shape[1:], arr.dtype)])

    def tensor(self, name, dtype=np.float32):
        axis = axis_of(name)
        if axis is None:
            return self._ckpt.tensor(name, dtype)
        base = self._ckpt
        if isinstance(base, Checkpoint) and type(base)._load is not Checkpoint._load:
            base._check_name(name)
            arr = self._slice(base._load(name), name, axis)          # a view of the map: only the shard is read
            dt = np.dtype(dtype) if not isinstance(dtype, np.dtype) else dtype
            arr = np.ascontiguousarray(arr).astype(dt, copy=False)
        else:
            arr = np.ascontiguousarray(self._slice(base.tensor(name, dtype), name, axis))
        return self._with_zero_row(name, arr)

    def raw(self, name):
        q, s = self._ckpt.raw(name)
        axis = axis_of(name)
        if axis is None:
            return q, s
        if axis == 0:
            return self._slice(q, name, 0), self._slice(s, name, 0)
        group = q.shape[1] // s.shape[1]
        if (q.shape[1] // self.n) % group:
            raise LoadError(f"{self._ckpt.path}: {name}: K={q.shape[1]} split {self.n} ways is not a whole "
                            f"number of int8 groups of {group}; choose another tensor_parallel")
        return (np.ascontiguousarray(self._slice(q, name, 1)),
                np.ascontiguousarray(self._slice(s, name, 1)))

    def packed_dtype(self, name):
        f = getattr(self._ckpt, "packed_dtype", None)
        dt = f(name) if f is not None else None
        if dt is not None and axis_of(name) == 1:
            k = self._ckpt.shape(name)[1]
            if (k // self.n) % dt.block or k % self.n:
                if name not in self.dequantized:
                    self.dequantized.append(name)
                    print(f"notice: {name} ({dt}, K={k}) splits {self.n} ways off its {dt.block}-wide blocks; "
                          "its shard is dequantized", file=sys.stderr)
                return None
        return dt

    def packed(self, name):
        blocks = self._ckpt.packed(name)                         # (N, K // block)
        axis = axis_of(name)
        if axis is None:
            return blocks
        blocks = self._slice(blocks, name, axis)
        blocks = np.ascontiguousarray(blocks) if axis == 1 else blocks
        return self._with_zero_row(name, blocks)


class TensorParallel:
    """What a sharded model's forward calls at the collective points."""

    def __init__(self, group, full_config: ModelConfig):
        self.group, self.rank, self.n = group, group.rank, group.world_size
        self.full_config = full_config
        self.vocab_part = full_config.vocab_size // self.n
        self._logits: dict[int, hi.Tensor] = {}

    def finish(self, model):
        """Rank 0 alone adds the row-parallel biases; a tied head reads the embedding shard
        without its zero row."""
        model.tp, model.tp_root, model.full_config = self, self.rank == 0, self.full_config
        if model.lm_head is model.embed:
            model.lm_head = model.embed[:self.vocab_part]
        # the fused single-call decode layer (ops.decode_layer) has no collectives: off
        model._decode_parts, model.DECODE_LAYER_ROWS = None, 0
        if self.rank != 0:
            for layer in model.layers:
                layer.bo = layer.b_down = None
        return model

    def embed(self, model, ids: hi.Tensor, x: hi.Tensor) -> None:
        """Vocabulary-parallel lookup: this rank's rows, zeros for other ranks' ids, summed."""
        host = ids.numpy().astype(np.int64) - self.rank * self.vocab_part
        local = np.where((host >= 0) & (host < self.vocab_part), host, self.vocab_part).astype(np.int32)
        ops.embedding(hi.tensor(local, hi.i32, model.device), model.embed, out=x)
        ops.all_reduce(x, group=self.group)

    def head(self, model, rows: hi.Tensor, logits: hi.Tensor) -> hi.Tensor:
        """This rank's V/N logits of each row, gathered into logits (R, V)."""
        r = rows.shape[0]
        part = self._logits.get(r)
        if part is None:
            part = self._logits[r] = hi.empty((r, self.vocab_part), hi.f32, model.device)
        ops.matmul(rows, model.lm_head, norm_weight=model.norm, eps=model.config.rms_norm_eps, out=part)
        return ops.all_gather(part, dim=1, out=logits, group=self.group)


def shard_for_group(ckpt):
    """(checkpoint, TensorParallel or None) for the current process group: world size 1
    gives the checkpoint as it is."""
    g = distributed.group()
    if g.world_size == 1:
        return ckpt, None
    return ShardedCheckpoint(ckpt, g.rank, g.world_size), TensorParallel(g, ckpt.config)
