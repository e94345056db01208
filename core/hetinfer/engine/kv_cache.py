"""The paged KV cache: per layer a K pool and a V pool of (num_blocks, block_size, Hkv, Dh),
and how many blocks a device's memory budget allows."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..device import get_allocator
from ..errors import ConfigError, OutOfMemoryError
from ..tensor import empty

CPU_DEFAULT_BYTES = 1 << 30          # CPU: 1 GiB of K/V unless told otherwise
GPU_DEFAULT_UTILIZATION = 0.9


def _fmt(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def host_available_bytes() -> int | None:
    """Memory the host can give without swapping: /proc/meminfo's MemAvailable, else free
    pages x page size (os.sysconf); None when neither is known."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def bytes_per_block(config, dtype, block_size: int) -> int:
    """K and V of one block over all layers."""
    return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim * dtype.itemsize


@dataclass
class KVBudget:
    num_blocks: int
    block_size: int
    block_bytes: int
    max_context: int

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_bytes

    def line(self) -> str:
        fit = self.tokens // self.max_context
        return (f"KV cache: {self.num_blocks} blocks of {self.block_size} tokens = {self.tokens} tokens, "
                f"{_fmt(self.nbytes)}; {fit} sequence(s) of the full context ({self.max_context}) fit")


def plan_budget(model, block_size: int, max_context: int, kv_cache_memory: int | None = None,
                gpu_memory_utilization: float | None = None) -> KVBudget:
    """Blocks for a byte budget: kv_cache_memory bytes; or on a device that reports its
    memory, gpu_memory_utilization x total minus what is in use now (after the weights and a
    warm-up step, as vLLM measures); on the CPU 1 GiB, or 90% of the memory the host has
    available when that is less. Refuses, with the numbers, a budget below one full-context
    sequence and, on the CPU, a kv_cache_memory above the memory available now."""
    per = bytes_per_block(model.config, model.dtype, block_size)
    if kv_cache_memory is not None and gpu_memory_utilization is not None:
        raise ConfigError("give --kv-cache-memory or --gpu-memory-utilization, not both")
    info = get_allocator(model.device).memory_info()
    avail = host_available_bytes() if info is None else None          # the host's memory (CPU)
    host = "" if avail is None else f" (the host has {_fmt(avail)} available)"
    if kv_cache_memory is not None:
        if isinstance(kv_cache_memory, bool) or not isinstance(kv_cache_memory, int) or kv_cache_memory <= 0:
            raise ConfigError(f"kv_cache_memory must be a positive number of bytes, got {kv_cache_memory!r}")
        budget = kv_cache_memory
        if avail is not None and budget > avail:
            raise OutOfMemoryError(f"the KV cache budget (--kv-cache-memory {_fmt(budget)}) is more than the "
                                   f"host has available ({_fmt(avail)}, MemAvailable); lower it")
    else:
        if info is None:
            budget = CPU_DEFAULT_BYTES if avail is None else min(CPU_DEFAULT_BYTES, int(avail * 0.9))
            if gpu_memory_utilization is not None:
                raise ConfigError(f"--gpu-memory-utilization needs a device that reports its memory; "
                                  f"{model.device} does not: give --kv-cache-memory BYTES")
        else:
            util = GPU_DEFAULT_UTILIZATION if gpu_memory_utilization is None else gpu_memory_utilization
            if not 0 < util <= 1:
                raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {util!r}")
            free, total = info
            budget = int(util * total) - (total - free)
    num_blocks = max(0, budget // per)
    need = -(-max_context // block_size)
    if num_blocks < need:
        raise OutOfMemoryError(
            f"the KV cache budget ({_fmt(max(budget, 0))}) holds {num_blocks} blocks of {block_size} "
            f"tokens ({_fmt(per)} each over {model.config.num_hidden_layers} layers); one sequence of "
            f"the full context ({max_context} tokens) needs {need}{host}. Raise --kv-cache-memory / "
            "--gpu-memory-utilization or lower --max-context")
    return KVBudget(num_blocks, block_size, per, max_context)


class PagedKVCache:
    def __init__(self, config, budget: KVBudget, dtype, device):
        shape = (budget.num_blocks, budget.block_size, config.num_key_value_heads, config.head_dim)
        self.budget, self.block_size = budget, budget.block_size
        self.k = [empty(shape, dtype, device) for _ in range(config.num_hidden_layers)]   # (NB, BS, Hkv, Dh)
        self.v = [empty(shape, dtype, device) for _ in range(config.num_hidden_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v)

    @classmethod
    def for_tokens(cls, model, num_tokens: int, block_size: int = 16) -> "PagedKVCache":
        """Pools for one sequence of num_tokens in blocks 0, 1, ... (StepInput.single)."""
        from .kv_cache import bytes_per_block
        nb = max(1, -(-num_tokens // block_size))
        budget = KVBudget(nb, block_size, bytes_per_block(model.config, model.dtype, block_size), num_tokens)
        return cls(model.config, budget, model.dtype, model.device)
