"""Sampling parameters (as vLLM names them) and the Sampler that applies them with
ops on the model's device: only the chosen token id comes back to the host.

Randomness: one uniform number per step from a host NumPy generator seeded by
SamplingParams.seed, handed to the `sample` op; the same seed gives the same text."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import ops
from .dtypes import f32, i32
from .errors import InputError
from .tensor import Tensor, empty


@dataclass
class SamplingParams:
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 or -1 = off
    top_p: float = 1.0                # 1 = off
    min_p: float = 0.0                # 0 = off
    repetition_penalty: float = 1.0   # 1 = off; > 1 discourages tokens of the prompt and output
    presence_penalty: float = 0.0     # subtracted once from tokens already in the output
    frequency_penalty: float = 0.0    # subtracted per occurrence in the output
    seed: int | None = None
    max_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        def bad(what):
            raise InputError(f"bad sampling parameter: {what}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            bad(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k == -1:
            self.top_k = 0
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad(f"top_k must be a whole number >= 0 (0 or -1 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0 <= self.min_p <= 1:
            bad(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not self.repetition_penalty > 0:
            bad(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                bad(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            bad(f"max_tokens must be a whole number >= 0, got {self.max_tokens!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not s for s in self.stop):
            bad("stop strings must not be empty")

    def stop_ids(self, eos_ids) -> set[int]:
        """Token ids that end generation: stop_token_ids, and EOS unless ignore_eos."""
        return set(self.stop_token_ids) | (set() if self.ignore_eos else set(eos_ids))

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


class Sampler:
    """Picks the next token from logits (1, V) on the device. Buffers are made once."""

    def __init__(self, params: SamplingParams, vocab_size: int, device):
        self.p = params
        self.rng = np.random.default_rng(params.seed)
        self.out = empty((1,), i32, device)
        self.uniform = empty((1,), f32, device)
        self._counts_host = None
        if params.penalized:
            self.counts = empty((1, vocab_size), i32, device).fill_(0)
            self.seen = empty((1, vocab_size), i32, device).fill_(0)
            self._counts_host = np.zeros(vocab_size, np.int32)
            self._penalized = None

    @staticmethod
    def shape_key(params: SamplingParams) -> tuple:
        """What a captured step bakes in (kernel arguments): samplers with equal keys can
        share one captured graph; the seed and the limits are not part of it."""
        p = params
        return (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty,
                p.frequency_penalty)

    def reset(self, params: SamplingParams) -> None:
        """Reuse this sampler (and its buffers, so a graph captured over them) for params of
        the same shape_key: fresh random stream, penalty counts cleared."""
        assert self.shape_key(params) == self.shape_key(self.p), "reset needs the same sampling shape"
        self.p = params
        self.rng = np.random.default_rng(params.seed)
        if self._counts_host is not None:
            self._counts_host[:] = 0
            self.counts.fill_(0)
            self.seen.fill_(0)

    def start(self, prompt_ids: list[int]) -> None:
        """Mark the prompt's tokens as seen (for the repetition penalty)."""
        if self._counts_host is not None and prompt_ids:
            mask = np.zeros(self.seen.shape, np.int32)
            mask[0, np.asarray(prompt_ids)] = 1
            self.seen.copy_(np.maximum(self.seen.numpy(), mask))

    def prepare(self) -> None:
        """Host -> device inputs of the next step (the uniform number). Outside any graph."""
        if self.p.temperature != 0:
            self.uniform.fill_(self.rng.random())

    def device_step(self, logits: Tensor) -> None:
        """Penalties and the choice, all on the device into self.out (capturable in a graph)."""
        p = self.p
        if self._counts_host is not None:
            if self._penalized is None:
                self._penalized = empty(logits.shape, logits.dtype, logits.device)
            logits = ops.penalties(logits, self.counts, self.seen, p.repetition_penalty,
                                   p.presence_penalty, p.frequency_penalty, out=self._penalized)
        if p.temperature == 0:
            ops.argmax(logits, out=self.out)
        else:
            ops.sample(logits, self.uniform, p.temperature, p.top_k, p.top_p, p.min_p, out=self.out)

    def read(self) -> int:
        """The chosen id back on the host (4 bytes); updates the penalty counts."""
        token = int(self.out.numpy()[0])
        if self._counts_host is not None:      # one element each, written in place
            self._counts_host[token] += 1
            self.counts[0, token:token + 1].fill_(self._counts_host[token])
            self.seen[0, token:token + 1].fill_(1)
        return token

    def __call__(self, logits: Tensor) -> int:
        self.prepare()
        self.device_step(logits)
        return self.read()
