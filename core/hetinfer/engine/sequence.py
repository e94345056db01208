"""A request's state in the engine: its tokens, sampling parameters, status, block table
and how many of its tokens the KV cache already holds."""

from __future__ import annotations

import enum
import itertools

import numpy as np

from ..sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_arrivals = itertools.count()


class Sequence:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, stop_ids: set[int]):
        self.request_id = request_id
        self.params = params
        self.stop_ids = stop_ids
        self.token_ids: list[int] = list(prompt_ids)      # prompt, then the output so far
        self.num_prompt_tokens = len(prompt_ids)
        self.num_computed_tokens = 0                     # tokens whose K/V the cache holds
        self.num_cached_tokens = 0                       # prompt tokens taken from the prefix cache
        self.block_table: list[int] = []                 # block ids, position p in block p // BS
        self.block_hashes: list[bytes] = []              # hashes of the full blocks, in order
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None            # "stop" | "length" | "abort"
        self.arrival = next(_arrivals)
        self.num_preemptions = 0
        # one seeded stream per request: its sampled text does not depend on its batch
        self.rng = np.random.default_rng(params.seed)
        # logprobs, only for a request that asks (set num_logprobs after add_request): per
        # sampled token (its logprob, [(id, logprob)] of the num_logprobs most likely), from
        # the model's raw logits, computed on the host (runner.attach_logprobs)
        self.num_logprobs: int | None = None
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.value}, tokens={len(self)}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table})")

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to run through the model (the prompt's rest, or the last sampled token)."""
        return len(self.token_ids) - self.num_computed_tokens
