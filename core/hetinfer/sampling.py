"""Sampling parameters (as vLLM names them) and the Sampler that applies them with
ops on the model's device: only the chosen token id comes back to the host.

Randomness: one uniform number per step from a host NumPy generator seeded by
SamplingParams.seed, handed to the `sample` op; the same seed gives the same text."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from . import ops
from .dtypes import f32, i32
from .errors import InputError
from .tensor import Tensor, empty

SEED_LIMIT = 2 ** 64
_F32_MAX, _F32_TINY = float(np.finfo(np.float32).max), float(np.finfo(np.float32).tiny)


def _bad(name: str, value, expected: str):
    raise InputError(f"bad sampling parameter: {name} must be {expected}; got {value!r}"
                     + ("" if isinstance(value, (int, float, str)) else f" ({type(value).__name__})"))


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _number(name: str, value, expected: str, ok) -> float:
    """A finite real number (not a bool, not a string) for which ok(value) holds, as a float."""
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        _bad(name, value, expected)
    try:
        v = float(value)              # an int beyond the float range: OverflowError
    except OverflowError:
        v = math.inf
    if not math.isfinite(v) or not ok(v):
        _bad(name, value, expected)
    return v


def _whole(name: str, value, expected: str, ok) -> int:
    if not _is_int(value) or not ok(int(value)):
        _bad(name, value, expected)
    return int(value)


@dataclass
class SamplingParams:
    """Checked when built: every float finite and in its range, integers whole numbers (a
    bool or a float is refused), stop a string or a list of strings; a bad value is one
    InputError naming the parameter, the value and what was expected."""
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 or -1 = off
    top_p: float = 1.0                # 1 = off
    min_p: float = 0.0                # 0 = off
    repetition_penalty: float = 1.0   # 1 = off; > 1 discourages tokens of the prompt and output
    presence_penalty: float = 0.0     # subtracted once from tokens already in the output
    frequency_penalty: float = 0.0    # subtracted per occurrence in the output
    seed: int | None = None
    max_tokens: int = 128             # 0: nothing is generated (the prompt alone, e.g. for echo)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        self.temperature = _number("temperature", self.temperature, ">= 0 (0 = greedy), a finite number",
                                   lambda v: v >= 0)
        self.top_k = _whole("top_k", self.top_k, ">= 0 (0 or -1 = off), a whole number",
                           lambda v: v >= -1)
        if self.top_k == -1:
            self.top_k = 0
        self.top_p = _number("top_p", self.top_p, "in (0, 1], a number", lambda v: 0 < v <= 1)
        self.min_p = _number("min_p", self.min_p, "in [0, 1], a number", lambda v: 0 <= v <= 1)
        self.repetition_penalty = _number("repetition_penalty", self.repetition_penalty,
                                          "> 0 (1 = off), a finite number", lambda v: v > 0)
        for name in ("presence_penalty", "frequency_penalty"):
            setattr(self, name, _number(name, getattr(self, name), "in [-2, 2], a number",
                                        lambda v: -2 <= v <= 2))
        if self.seed is not None:
            self.seed = _whole("seed", self.seed, "None or a whole number in [0, 2**64)",
                               lambda v: 0 <= v < SEED_LIMIT)
        self.max_tokens = _whole("max_tokens", self.max_tokens, ">= 0, a whole number", lambda v: v >= 0)
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            _bad("stop", self.stop, "a string or a list of strings")
        if any(not s for s in stop):
            raise InputError(f"bad sampling parameter: stop strings must not be empty; got {self.stop!r}")
        self.stop = list(stop)
        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)) or not all(_is_int(t) and t >= 0 for t in ids):
            _bad("stop_token_ids", ids, "a list of whole numbers >= 0 (token ids)")
        self.stop_token_ids = [int(t) for t in ids]
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            _bad("ignore_eos", self.ignore_eos, "true or false")
        self.ignore_eos = bool(self.ignore_eos)

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
                # top_k at or above the vocabulary keeps every token: off (0), and it fits the int32 row;
                # a temperature beyond float32 is the largest float32 (not inf, which makes NaN logits)
                t[i], tp[i], mp[i] = min(p.temperature, _F32_MAX), max(p.top_p, _F32_TINY), p.min_p
                k[i] = p.top_k if p.top_k < self.vocab_size else 0
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
            # a penalty > 0 stays > 0 in float32 (the op refuses 0) and keeps penalized logits finite
            rep[i] = min(max(p.repetition_penalty, 1e-20), 1e20)
            pres[i], freq[i] = p.presence_penalty, p.frequency_penalty
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
