"""One step's input tensors, built from the scheduler's plan: the flattened token rows of
every scheduled sequence and how they index the paged cache.

    input_ids, positions, slot_mapping   (T,)    one per token row; slot = block * BS + offset
    query_start                          (B+1,)  sequence b owns rows query_start[b]..[b+1]
    context_lens                         (B,)    its keys after this step
    block_tables                         (B, MB) its blocks (unused entries 0)
    logits_rows                          (R,)    rows whose next token is sampled
Padding (for a captured graph's fixed batch) adds one-row sequences of context 1 whose slot
is -1 (nothing written) and whose logits are ignored."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..dtypes import i32
from ..tensor import tensor

FIELDS = ("input_ids", "positions", "slot_mapping", "query_start", "context_lens", "block_tables", "logits_rows")


@dataclass
class StepInput:
    input_ids: object
    positions: object
    slot_mapping: object
    query_start: object
    context_lens: object
    block_tables: object
    logits_rows: object
    num_seqs: int                 # real sequences (the rest is padding)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @classmethod
    def build(cls, scheduled, block_size: int, pad_seqs: int = 0, pad_tokens: int = 0,
              max_blocks: int | None = None, all_rows: bool = False) -> "StepInput":
        """Host arrays for the scheduled chunks. For a captured graph's fixed shapes:
        pad_seqs padding sequences holding pad_tokens rows (>= pad_seqs) between them, and
        all_rows: a logits row for every sequence (its last), sampled or not."""
        bs = block_size
        ids, pos, slots, qs, cl, rows, tables = [], [], [], [0], [], [], []
        for s in scheduled:                 # plain lists: a decode row costs a few appends
            seq, n = s.seq, s.num_tokens
            start = seq.num_computed_tokens
            end = start + n
            table = seq.block_table
            ids.extend(seq.token_ids[start:end])
            if n == 1:
                pos.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                p = np.arange(start, end)
                pos.extend(p.tolist())
                slots.extend((np.asarray(table)[p // bs] * bs + p % bs).tolist())
            qs.append(qs[-1] + n)
            cl.append(end)
            if s.needs_logits or all_rows:
                rows.append(qs[-1] - 1)
            tables.append(table)
        for i in range(pad_seqs):          # n rows over block 0 (read, never written)
            n = pad_tokens // pad_seqs + (i < pad_tokens % pad_seqs)
            ids.extend([0] * n)
            pos.extend(range(n))
            slots.extend([-1] * n)
            qs.append(qs[-1] + n)
            cl.append(n)
            rows.append(qs[-1] - 1)
            tables.append([0])
        mb = max_blocks or max(len(t) for t in tables)
        bt = np.zeros((len(tables), mb), np.int32)
        for i, t in enumerate(tables):
            bt[i, :len(t)] = t
        a = lambda x: np.asarray(x, np.int32)      # noqa: E731
        return cls(a(ids), a(pos), a(slots), a(qs), a(cl), bt, a(rows), len(scheduled))

    @classmethod
    def single(cls, token_ids, start: int, block_size: int, all_logits: bool = False) -> "StepInput":
        """One sequence whose tokens token_ids sit at positions start.. in blocks 0, 1, 2, ...
        (PagedKVCache.for_tokens): logits of every row, or of the last. For tests and tools
        that run a model outside the engine (teacher-forced logits, calibration)."""
        n = len(token_ids)
        end = start + n
        p = np.arange(start, end)
        table = np.arange(-(-end // block_size), dtype=np.int32)[None, :]
        rows = np.arange(n) if all_logits else np.array([n - 1])
        return cls(np.asarray(token_ids, np.int32), p.astype(np.int32), p.astype(np.int32),
                   np.array([0, n], np.int32), np.array([end], np.int32), table, rows.astype(np.int32), 1)

    def packed(self) -> np.ndarray:
        """Every array in one flat i32 array (one host-to-device copy per step)."""
        return np.concatenate([np.asarray(getattr(self, f), np.int32).reshape(-1) for f in FIELDS])

    def to(self, device) -> "StepInput":
        """The same step on device: one i32 tensor, each field a view of it."""
        flat = tensor(self.packed(), i32, device)
        views, at = [], 0
        for f in FIELDS:
            a = np.asarray(getattr(self, f))
            v = flat[at:at + a.size]
            views.append(v.view(*a.shape) if a.ndim != 1 else v)
            at += a.size
        out = StepInput(*views, self.num_seqs)
        out._flat = flat
        return out

    def copy_into(self, dst: "StepInput") -> None:
        """Write this step's arrays into dst's device tensors (a captured graph's inputs,
        made by to() from a step of the same shapes): one copy."""
        dst._flat.copy_(self.packed())
