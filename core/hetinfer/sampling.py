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


class BatchSampler:
    """Picks one token per logits row (R, V) on the device, each row with its own
    parameters held in (R,) device tensors, so one captured graph serves any mix of
    requests. Rows beyond the real ones (padding) sample greedily and are ignored.

    Randomness: each sequence's own seeded generator gives its row's uniform number, so a
    seeded request samples the same text in any batch. Penalties (repetition, presence,
    frequency) need per-row token counts: steps with a penalized row upload them and run
    eagerly (not in a graph)."""

    def __init__(self, rows: int, vocab_size: int, device):
        self.rows, self.vocab_size, self.device = rows, vocab_size, device
        self.out = empty((rows,), i32, device)
        self.uniform = empty((rows,), f32, device)
        self.temperature = empty((rows,), f32, device)
        self.top_k = empty((rows,), i32, device)
        self.top_p = empty((rows,), f32, device)
        self.min_p = empty((rows,), f32, device)
        self.greedy = True
        self.penalized = False
        self._pen = None

    @staticmethod
    def kind(seqs) -> str:
        """What a captured step bakes in: 'greedy' (argmax only) or 'sample'; penalized
        steps are never captured ('penalized')."""
        seqs = [s for s in seqs if s is not None]
        if any(s.params.penalized for s in seqs):
            return "penalized"
        return "greedy" if all(s.params.temperature == 0 for s in seqs) else "sample"

    def prepare(self, seqs) -> None:
        """Host -> device: each row's parameters and uniform number (outside any graph).
        seqs[i] is row i's sequence, or None for a row that is not sampled (its choice is
        ignored and it draws no random number)."""
        r = self.rows
        live = [s for s in seqs if s is not None]
        self.greedy = all(s.params.temperature == 0 for s in live)
        self.penalized = any(s.params.penalized for s in live)
        if not self.greedy:
            t = np.zeros(r, np.float32)
            k = np.zeros(r, np.int32)
            tp = np.ones(r, np.float32)
            mp = np.zeros(r, np.float32)
            u = np.zeros(r, np.float32)
            for i, s in enumerate(seqs):
                if s is None:
                    continue
                p = s.params
                t[i], k[i], tp[i], mp[i] = p.temperature, p.top_k, p.top_p, p.min_p
                if p.temperature:
                    u[i] = s.rng.random()
            for dst, src in ((self.temperature, t), (self.top_k, k), (self.top_p, tp), (self.min_p, mp),
                             (self.uniform, u)):
                dst.copy_(src)
        if self.penalized:
            self._prepare_penalties(seqs)

    def _prepare_penalties(self, seqs) -> None:
        r, v = self.rows, self.vocab_size
        counts = np.zeros((r, v), np.int32)
        seen = np.zeros((r, v), np.int32)
        rep, pres, freq = np.ones(r, np.float32), np.zeros(r, np.float32), np.zeros(r, np.float32)
        for i, s in enumerate(seqs):
            if s is None or not s.params.penalized:
                continue
            p = s.params
            if not p.penalized:
                continue
            out = np.asarray(s.output_ids, np.int64)
            counts[i] = np.bincount(out, minlength=v)[:v]
            seen[i, np.asarray(s.token_ids, np.int64)] = 1
            rep[i], pres[i], freq[i] = p.repetition_penalty, p.presence_penalty, p.frequency_penalty
        dev = self.device
        from .tensor import tensor
        self._pen = tuple(tensor(a, d, dev) for a, d in ((counts, i32), (seen, i32), (rep, f32), (pres, f32),
                                                        (freq, f32)))

    def device_step(self, logits: Tensor) -> None:
        """Penalties and the choice, all on the device into self.out (capturable)."""
        if self.penalized:
            counts, seen, rep, pres, freq = self._pen
            logits = ops.penalties(logits, counts, seen, rep, pres, freq, out=logits)
        if self.greedy:
            ops.argmax(logits, out=self.out)
        else:
            ops.sample(logits, self.uniform, self.temperature, self.top_k, self.top_p, self.min_p, out=self.out)

    def read(self, n: int) -> list[int]:
        """The chosen ids of the first n rows back on the host (one small copy)."""
        return self.out.numpy()[:n].tolist()
