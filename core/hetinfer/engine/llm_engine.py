"""The engine loop: add_request / step / abort. Each step is schedule -> run -> postprocess:
the scheduler picks sequences and chunk sizes, the runner runs one forward over all of
them and samples, the scheduler appends the tokens, stops finished sequences and frees
their blocks."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

import numpy as np

from .. import distributed

from ..errors import ConfigError, InputError
from ..sampling import SamplingParams
from .blocks import BlockManager
from .kv_cache import KVBudget, plan_budget
from .runner import ModelRunner
from .scheduler import Scheduler
from .sequence import Sequence


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    seq: Sequence


class LLMEngine:
    def __init__(self, model, tokenizer=None, *, max_context: int | None = None, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, block_size: int = 16, kv_cache_memory: int | None = None,
                 gpu_memory_utilization: float | None = None, enable_prefix_caching: bool = True,
                 graphs: bool = True, verbose: bool = False):
        for name, v in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens),
                        ("block_size", block_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} must be a whole number >= 1, got {v!r}")
        self.model, self.tokenizer = model, tokenizer
        limit = model.max_context
        if max_context is not None and (not isinstance(max_context, int) or max_context < 2):
            raise ConfigError(f"max_context must be a whole number >= 2, got {max_context!r}")
        self.max_context = min(max_context or limit, limit)
        budget = plan_budget(model, block_size, self.max_context, kv_cache_memory, gpu_memory_utilization)
        group = distributed.group()
        if group.world_size > 1:           # tensor parallel: the blocks that fit on every rank
            from .tp import claim
            claim()
            budget = dataclasses.replace(budget, num_blocks=group.min_int(budget.num_blocks))
        self.budget: KVBudget = budget
        self.blocks = BlockManager(budget.num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens, self.max_context)
        self.runner = ModelRunner(model, budget, max_num_seqs, graphs)
        self.eos_ids = list(getattr(tokenizer, "eos_ids", []) or [])
        self._seqs: dict[str, Sequence] = {}
        self._next_id = 0
        self.num_steps = 0
        if verbose and group.is_root:
            print(budget.line(), file=sys.stderr)
        if group.world_size > 1:           # workers follow rank 0's steps inside start() and exit there
            from .tp import start
            start(self)

    # --- requests ------------------------------------------------------------------
    def add_request(self, prompt_ids, params: SamplingParams | None = None, request_id: str | None = None,
                    stop_ids=None) -> Sequence:
        """Queue a request; it joins the running batch at the next step. Checked now: the
        tokens, the parameters, whether it could ever fit."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InputError(f"params must be SamplingParams, got {type(params).__name__}")
        ids = [int(t) for t in prompt_ids]
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if request_id is None:
            request_id = f"req-{self._next_id}"
            self._next_id += 1
        if request_id in self._seqs:
            raise InputError(f"request id {request_id!r} is already in use")
        stop = set(stop_ids) if stop_ids is not None else params.stop_ids(self.eos_ids)
        seq = Sequence(request_id, ids, params, stop)
        self.scheduler.add(seq)                                 # refuses what could never fit
        self._seqs[request_id] = seq
        return seq

    def abort(self, request_id: str) -> None:
        """Stop a request; its blocks are freed at the next step."""
        if request_id not in self._seqs:
            raise InputError(f"abort: no unfinished request with id {request_id!r}")
        self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # --- the loop ------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step: each request that got a token (or ended) gives one output."""
        outputs = []
        plan = self.scheduler.schedule()
        for seq in self.scheduler.aborted:
            self._seqs.pop(seq.request_id, None)
            outputs.append(RequestOutput(seq.request_id, [], True, "abort", seq))
        # max_tokens = 0: nothing to generate
        for s in [s for s in plan.scheduled if s.seq.params.max_tokens == 0]:
            plan.scheduled.remove(s)
            self.scheduler.finish(s.seq, "length")
            self._seqs.pop(s.seq.request_id, None)
            outputs.append(RequestOutput(s.seq.request_id, [], True, "length", s.seq))
        if not plan.scheduled:
            return outputs
        tokens = self.runner.run(plan)
        self.num_steps += 1
        done = set(id(s) for s in self.scheduler.postprocess(plan, tokens))
        for s in plan.scheduled:
            if not s.needs_logits:
                continue
            seq = s.seq
            fin = id(seq) in done
            if fin:
                self._seqs.pop(seq.request_id, None)
            outputs.append(RequestOutput(seq.request_id, [seq.token_ids[-1]], fin, seq.finish_reason, seq))
        return outputs

    def generate(self, prompts, params) -> list[Sequence]:
        """Run lists of prompt ids to completion together (offline batch); one params for
        all, or one per prompt. Returns the finished sequences in prompt order."""
        if isinstance(params, SamplingParams) or params is None:
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(params)} sampling parameters")
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        while self.has_unfinished():
            self.step()
        return seqs

    def warm_up(self) -> tuple[int, int]:
        """Capture the step graphs before serving, so that the first requests of a server do
        not pay for them: for greedy and sampled rows, each decode batch bucket up to
        max_num_seqs (that many 1-token requests), then each prefill / mixed token bucket the
        token budget can reach (a few prompts whose first step has that shape, new random ids
        each time, so the prefix cache does not shorten them); each shape runs 3 times (the
        eager warm-up, the capture, a replay). (decode graphs, prefill graphs) captured: (0, 0)
        without graphs. Call it before any request."""
        if self.runner.capture is None:
            return 0, 0
        if self.has_unfinished():
            raise InputError("warm_up() runs before any request is added")
        from .runner import SEQ_BUCKETS
        before, decode = self.runner.num_captures, 0
        m, budget = self.scheduler.max_num_seqs, self.scheduler.max_num_batched_tokens
        rng, bs = np.random.default_rng(0), self.blocks.block_size
        for temperature in (0.0, 1.0):
            for b in SEQ_BUCKETS:
                if b > m:
                    break
                params = SamplingParams(max_tokens=3, temperature=temperature, ignore_eos=True, seed=0)
                captured = self.runner.num_captures
                self.generate([[0]] * b, params)
                decode += self.runner.num_captures - captured
            params = SamplingParams(max_tokens=1, temperature=temperature, ignore_eos=True, seed=0)
            for tb in self.runner.mixed_shapes(budget):
                lengths = self._prompt_lengths(tb)
                if lengths is None or sum(-(-(n + 1) // bs) for n in lengths) > self.blocks.num_blocks:
                    continue                 # no such step fits: captured when one comes
                for _ in range(3):
                    prompts = [rng.integers(0, self.model.config.vocab_size, n).tolist() for n in lengths]
                    self.generate(prompts, params)
        return decode, self.runner.num_captures - before - decode

    def _prompt_lengths(self, tb: int) -> list[int] | None:
        """Prompt lengths whose prefill is one step of padded shape (tb, max_num_seqs + 1), or None."""
        m, budget = self.scheduler.max_num_seqs, self.scheduler.max_num_batched_tokens
        for k in range(1, m + 1):
            t = min(tb - (m + 1 - k), budget)
            if t > k and -(-t // k) <= self.max_context - 1 and self.runner.shape(t, k) == (tb, m + 1):
                return [t // k + (i < t % k) for i in range(k)]
        return None

    def stats(self) -> dict:
        s = self.scheduler
        return {"running": len(s.running), "waiting": len(s.waiting), "free_blocks": self.blocks.num_free,
                "num_blocks": self.blocks.num_blocks, "prefix_hit_rate": self.blocks.hit_rate,
                "preemptions": s.num_preemptions, "steps": self.num_steps,
                "graph_replays": self.runner.num_replays}
