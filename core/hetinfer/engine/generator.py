"""The single-stream client of the engine: one prompt in, its tokens out as they come
(the CLI's generate and chat, LLM.stream). A batch of one on the same engine that
serves many; a chat turn reuses the cached blocks of the conversation so far."""

from __future__ import annotations

import dataclasses
import resource
import time
from dataclasses import dataclass
from typing import Iterator

from ..device import get_allocator
from ..errors import InputError
from ..sampling import SamplingParams
from .llm_engine import LLMEngine


@dataclass
class Stats:
    """What the last generate() did."""
    prompt_tokens: int = 0            # prefilled this call
    cached_tokens: int = 0            # reused from the cache (not prefilled)
    prefill_s: float = 0.0
    new_tokens: int = 0
    decode_s: float = 0.0
    finish_reason: str = ""
    peak_host_bytes: int = 0
    peak_device_bytes: int | None = None

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        # the first new token comes from prefill; decode steps are new_tokens - 1
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s else 0.0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Generator:
    """generate(prompt ids) yields new token ids; stats says what it took. max_context
    caps the KV cache (default: the model's context); engine options go to LLMEngine."""

    def __init__(self, model, tokenizer, max_context: int | None = None, graphs: bool = True,
                 engine: LLMEngine | None = None, **engine_options):
        self.model, self.tokenizer = model, tokenizer
        self.engine = engine or LLMEngine(model, tokenizer, max_context=max_context, graphs=graphs,
                                          **engine_options)
        self.cached: list[int] = []          # the last sequence's tokens (prompt and output)
        self.stats = Stats()

    @property
    def max_context(self) -> int:
        return self.engine.max_context

    def encode_prompt(self, prompt: str) -> list[int]:
        if not prompt:
            raise InputError("the prompt is empty; give some text to continue")
        return self.tokenizer.encode(prompt, max_tokens=self.max_context)     # (longer ones: refused cheaply)

    def reset(self) -> None:
        self.cached = []

    def generate(self, prompt_ids: list[int], params: SamplingParams | None = None, *,
                 max_new_tokens: int | None = None, stop_ids: list[int] | None = None,
                 reuse_prefix: bool = True) -> Iterator[int]:
        """Yields new token ids. The prompt's longest prefix held in the cache's blocks
        (an earlier chat turn, a shared system prompt) is not prefilled again; generation
        that reaches the context's end finishes with finish_reason "context"."""
        params = params or SamplingParams()
        limit = params.max_tokens if max_new_tokens is None else max_new_tokens
        n = len(prompt_ids)
        if n == 0:
            raise InputError("the prompt has no tokens")
        if n >= self.max_context:
            raise InputError(f"the prompt is {n} tokens but the context holds {self.max_context}; "
                             "shorten it or raise --max-context (up to the model's limit "
                             f"{self.model.config.max_position_embeddings})")
        if not isinstance(limit, int) or limit < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {limit}")
        room = self.max_context - n
        clamped = limit > room
        run = dataclasses.replace(params, max_tokens=min(limit, room))
        eng = self.engine
        t0 = time.perf_counter()
        seq = eng.add_request(prompt_ids, run, stop_ids=stop_ids)
        st = self.stats = Stats()
        t1 = None
        try:
            while True:
                outs = [o for o in eng.step() if o.seq is seq]
                for o in outs:
                    if t1 is None:
                        t1 = time.perf_counter()
                        st.prefill_s = t1 - t0
                        st.cached_tokens = seq.num_cached_tokens
                        st.prompt_tokens = n - seq.num_cached_tokens
                    for tok in o.new_token_ids:
                        st.new_tokens += 1
                        yield tok
                    if o.finished:
                        st.finish_reason = o.finish_reason
                if seq.is_finished:
                    break
        finally:                # also when the caller stops early (stop string, Ctrl-C)
            if not seq.is_finished:
                eng.abort(seq.request_id)
                eng.step()                                   # frees its blocks now
            if clamped and st.finish_reason == "length":
                st.finish_reason = "context"
            st.finish_reason = st.finish_reason or "stop"
            st.prompt_tokens = st.prompt_tokens or n - seq.num_cached_tokens
            st.decode_s = time.perf_counter() - (t1 or t0)
            st.peak_host_bytes = peak_rss_bytes()
            self.cached = list(seq.token_ids)
            if self.model.device.type != "cpu":
                st.peak_device_bytes = get_allocator(self.model.device).stats().get("peak")
