"""Continuous batching with chunked prefill: which sequences run in the next step, and
how many of their tokens.

Each step has a token budget (max_num_batched_tokens) and at most max_num_seqs
sequences. Running sequences that decode go first (one token each), then running
sequences still prefilling, then waiting prompts, each taking what is left of the budget
(a prompt longer than that is prefilled in chunks over several steps). New requests join
between steps. When the block pool runs dry, the newest running sequence is preempted:
its blocks are freed and it goes back to the front of the queue, to be recomputed later
(with prefix caching, mostly from its own cached blocks). Pure Python: no device."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..errors import ConfigError, InputError
from .blocks import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int              # tokens of seq run in this step, from seq.num_computed_tokens
    needs_logits: bool = False   # the chunk reaches the sequence's last token: sample its next

    def __post_init__(self):
        self.needs_logits = self.seq.num_computed_tokens + self.num_tokens == len(self.seq)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_decode(self) -> bool:
        """Every sequence of the step runs one token and samples (a pure decode step)."""
        return bool(self.scheduled) and all(s.num_tokens == 1 and s.needs_logits for s in self.scheduled)


def check_fits(num_prompt: int, max_tokens: int, max_model_len: int, num_blocks: int, block_size: int) -> None:
    """InputError for a request that could never run: beyond the context or the whole KV pool
    (the scheduler's check, also made by a server process that holds only these numbers)."""
    if num_prompt < 1:
        raise InputError("the prompt has no tokens")
    total = num_prompt + max_tokens
    if total > max_model_len:
        raise InputError(f"the prompt ({num_prompt} tokens) plus max_tokens ({max_tokens}) is {total} "
                         f"tokens; the context holds {max_model_len}. Shorten the prompt or "
                         "lower max_tokens")
    cap = num_blocks * block_size
    if total > cap:
        raise InputError(f"the prompt plus max_tokens is {total} tokens; the whole KV cache holds {cap} "
                         f"({num_blocks} blocks of {block_size}). Raise the KV budget or lower max_tokens")


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 max_model_len: int = 4096):
        for name, v in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens),
                        ("max_model_len", max_model_len)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} must be a whole number >= 1, got {v!r}")
        self.blocks = blocks
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._aborted: set[str] = set()
        self.num_preemptions = 0

    # --- requests ------------------------------------------------------------------
    def check(self, num_prompt: int, max_tokens: int) -> None:
        """Refuse a request that could never run: beyond the context or the whole pool."""
        check_fits(num_prompt, max_tokens, self.max_model_len, self.blocks.num_blocks, self.blocks.block_size)

    def add(self, seq: Sequence) -> None:
        self.check(seq.num_prompt_tokens, seq.params.max_tokens)
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def abort(self, request_id: str) -> None:
        """Mark for removal at the next schedule() (its blocks are freed then)."""
        self._aborted.add(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _drop_aborted(self) -> list[Sequence]:
        if not self._aborted:
            return []
        gone = [s for s in list(self.waiting) + self.running if s.request_id in self._aborted]
        for s in gone:
            self.finish(s, "abort")
        self._aborted.clear()
        return gone

    # --- one step --------------------------------------------------------------------
    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_blocks(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self.aborted = self._drop_aborted()
        budget = self.max_num_batched_tokens
        decoding = [s for s in self.running if s.num_uncomputed == 1]
        prefilling = [s for s in self.running if s.num_uncomputed > 1]
        for seq in decoding + prefilling:
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING:        # preempted below while we went
                continue
            n = min(seq.num_uncomputed, budget)
            while not self.blocks.can_allocate(seq, n):
                victim = max(self.running, key=lambda s: s.arrival)   # the newest
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                continue
            self.blocks.allocate(seq, n)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        if out.preempted:                                   # no room: admit nobody this step
            out.scheduled = [s for s in out.scheduled if s.seq.status == SequenceStatus.RUNNING]
            return out
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                hit = self.blocks.match_prefix(seq)
                # the blocks it would still need for its first chunk, counted before taking any
                n = min(len(seq) - len(hit) * self.blocks.block_size, budget)
                need = self.blocks.blocks_for(len(hit) * self.blocks.block_size + n) - len(hit)
                free_hits = sum(1 for b in hit if self.blocks.ref_count[b] == 0)
                if need + free_hits > self.blocks.num_free:
                    break
                self.blocks.take_prefix(seq, hit)
            n = min(seq.num_uncomputed, budget)
            if not self.blocks.can_allocate(seq, n):
                break
            self.blocks.allocate(seq, n)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return out

    # --- after the step --------------------------------------------------------------
    def finish(self, seq: Sequence, reason: str) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_blocks(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def postprocess(self, out: SchedulerOutput, tokens: list[int]) -> list[Sequence]:
        """Advance each scheduled sequence by its chunk; append the sampled tokens (one per
        sequence that needed logits, in order); stop the finished ones. Returns those."""
        it = iter(tokens)
        done = []
        for s in out.scheduled:
            seq = s.seq
            seq.num_computed_tokens += s.num_tokens
            self.blocks.register_full_blocks(seq)
            if not s.needs_logits:
                continue
            token = next(it)
            seq.token_ids.append(token)
            p = seq.params
            if token in seq.stop_ids:
                reason = "stop"
            elif seq.num_output_tokens >= p.max_tokens or len(seq) >= self.max_model_len:
                reason = "length"
            else:
                continue
            self.finish(seq, reason)
            done.append(seq)
        return done
