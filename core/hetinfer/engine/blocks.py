"""The block pool: fixed-size KV blocks with a free list, reference counts, and prefix
caching by a hash chained over (parent block's hash, the block's token ids).

A full block whose keys and values are computed is registered under its hash; a new
sequence whose prompt starts with registered blocks takes them (its reference count goes
up) instead of prefilling them. A block whose count falls to zero goes to the end of the
free list with its hash kept: it can still be hit until it is taken for new tokens, which
happens least recently used first, only when the free list is all that is left.
Pure Python: no device, testable on its own."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from ..errors import ConfigError


def block_hash(parent: bytes | None, token_ids) -> bytes:
    """sha256 over the parent's hash and the tokens: no collision another user could plant."""
    h = hashlib.sha256(parent or b"root")
    h.update(np.asarray(token_ids, np.int64).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ConfigError(f"the KV cache needs at least one block, got {num_blocks}")
        if block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}                       # hash -> block id
        # blocks with no owner, least recently used first (cached ones keep their hash)
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hits = self.queries = 0                             # prefix-cache blocks

    # --- queries -------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _new_blocks(self, seq, num_tokens: int) -> int:
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_allocate(self, seq, num_new_tokens: int) -> bool:
        return self._new_blocks(seq, seq.num_computed_tokens + num_new_tokens) <= self.num_free

    # --- prefix cache --------------------------------------------------------------
    def match_prefix(self, seq) -> list[int]:
        """Registered blocks that hold the first full blocks of seq's tokens (at most up
        to its last token, which must run through the model to give logits)."""
        if not self.prefix_caching:
            return []
        bs, out, parent = self.block_size, [], None
        for i in range((len(seq) - 1) // bs):
            parent = block_hash(parent, seq.token_ids[i * bs:(i + 1) * bs])
            block = self.cached.get(parent)
            if block is None:
                break
            out.append(block)
        return out

    def take_prefix(self, seq, blocks: list[int]) -> None:
        """Give a new sequence the cached blocks of its prefix (from match_prefix)."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        full = (len(seq) - 1) // self.block_size
        self.queries += full
        self.hits += len(blocks)
        for b in blocks:
            if self.ref_count[b] == 0:
                del self.free[b]
            self.ref_count[b] += 1
            seq.block_table.append(b)
            seq.block_hashes.append(self.hash_of[b])
        seq.num_computed_tokens = seq.num_cached_tokens = len(blocks) * self.block_size

    # --- allocation ----------------------------------------------------------------
    def _pop_free(self) -> int:
        b, _ = self.free.popitem(last=False)                     # least recently used
        h = self.hash_of[b]
        if h is not None:                                        # evict it from the cache
            if self.cached.get(h) == b:
                del self.cached[h]
            self.hash_of[b] = None
        return b

    def allocate(self, seq, num_new_tokens: int) -> None:
        """Blocks for seq's next num_new_tokens tokens (call can_allocate first)."""
        need = self._new_blocks(seq, seq.num_computed_tokens + num_new_tokens)
        if need > self.num_free:
            raise RuntimeError(f"allocate: {need} blocks needed, {self.num_free} free (call can_allocate)")
        for _ in range(need):
            b = self._pop_free()
            self.ref_count[b] = 1
            seq.block_table.append(b)

    def register_full_blocks(self, seq) -> None:
        """After a step: hash the blocks that are now full of computed tokens, so later
        sequences with the same prefix can take them."""
        bs = self.block_size
        while len(seq.block_hashes) < seq.num_computed_tokens // bs:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = block_hash(parent, seq.token_ids[i * bs:(i + 1) * bs])
            seq.block_hashes.append(h)
            b = seq.block_table[i]
            if self.prefix_caching and h not in self.cached and self.hash_of[b] is None:
                self.cached[h] = b
                self.hash_of[b] = h

    def free_blocks(self, seq) -> None:
        """Drop seq's references, last block first (so the tail of a sequence is evicted
        before its prefix, which others are likelier to share)."""
        for b in reversed(seq.block_table):
            self.ref_count[b] -= 1
            assert self.ref_count[b] >= 0, f"block {b} freed more often than taken"
            if self.ref_count[b] == 0:
                if self.hash_of[b] is None:
                    self.free[b] = None
                    self.free.move_to_end(b, last=False)         # no cached content: reuse first
                else:
                    self.free[b] = None                          # most recently used: evicted last
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0
