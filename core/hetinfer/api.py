"""The Python API, in the style users know from vLLM:

    from hetinfer import LLM, SamplingParams
    llm = LLM(device="cpu")            # default model: SmolLM2, its Q4_1 weights kept packed
    out = llm.generate("Once upon a time", SamplingParams(temperature=0.8, seed=1))[0]
    for piece in llm.stream("The sea is", SamplingParams(max_tokens=20)): print(piece, end="")
    llm.chat([{"role": "user", "content": "Hi!"}]).text
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Iterator

from .chat_template import ChatTemplate
from .engine import Generator, LLMEngine, Stats, load
from .errors import InputError
from .sampling import SamplingParams
from .streaming import TextStream


def _params(params) -> SamplingParams:
    if params is None:
        return SamplingParams()
    if not isinstance(params, SamplingParams):
        raise InputError(f"sampling parameters must be a SamplingParams, got {type(params).__name__}")
    return params


@dataclass
class CompletionOutput:
    text: str
    token_ids: list[int]
    finish_reason: str                 # "stop" (EOS, stop token or string) | "length" | "context"
    prompt_token_ids: list[int] = field(default_factory=list)
    stats: Stats | None = None


class LLM:
    """engine_options go to LLMEngine: max_num_seqs, max_num_batched_tokens, block_size,
    kv_cache_memory, gpu_memory_utilization, enable_prefix_caching. max_context: a whole
    number >= 2, at most the model's context limit (a larger one is a ConfigError, as in vLLM);
    None: that limit. tensor_parallel=N shards the model over N ranks, one process each: run
    the script under `mpirun -n N` (without mpirun it re-launches itself through mpirun);
    rank 0 returns from LLM(...) and drives generation, the other ranks follow its steps
    inside LLM(...) and exit when rank 0 does."""

    def __init__(self, model=None, device: str = "cpu", dtype: str | None = None, max_context: int | None = None,
                 progress: bool = False, eager: bool = False, quantize: str | None = None,
                 weights: str | None = None, tensor_parallel: int = 1, **engine_options):
        if tensor_parallel != 1:   # N ranks: this script under mpirun -n N (re-launched there if need be)
            import os
            import sys

            from . import distributed
            script = sys.argv[0] if sys.argv and os.path.isfile(sys.argv[0]) else None
            distributed.ensure_ranks(tensor_parallel, [sys.executable] + sys.argv if script else None)
        self.model, self.checkpoint = load(model, device, dtype, max_context, progress=progress,
                                           quantize=quantize, weights=weights)
        self.tokenizer = self.checkpoint.tokenizer
        self.engine = LLMEngine(self.model, self.tokenizer, max_context=max_context, graphs=not eager,
                                verbose=progress, **engine_options)
        self.generator = Generator(self.model, self.tokenizer, engine=self.engine)
        self._template = None

    @property
    def chat_template(self) -> ChatTemplate:
        if self._template is None:
            self._template = ChatTemplate.from_checkpoint(self.checkpoint)
        return self._template

    def _run(self, ids: list[int], params: SamplingParams, out: CompletionOutput) -> Iterator[str]:
        stream = TextStream(self.tokenizer, params.stop)
        yield from stream.follow(self.generator.generate(ids, params), params.stop_ids(self.tokenizer.eos_ids))
        out.token_ids, out.text = stream.tokens, stream.text
        st = self.generator.stats
        out.finish_reason = "stop" if stream.stopped else st.finish_reason
        out.stats = st

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InputError("the prompt is empty")
            return self.tokenizer.encode(prompt, max_tokens=self.engine.max_context)
        if not isinstance(prompt, (list, tuple)):
            raise InputError(f"a prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        if not prompt:
            raise InputError("the prompt has no tokens")
        vocab = self.model.config.vocab_size
        for t in prompt:
            if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < vocab:
                raise InputError(f"the prompt's token id {t!r} is not a whole number in the vocabulary [0, {vocab})")
        return [int(t) for t in prompt]

    def generate(self, prompts, params=None) -> list[CompletionOutput]:
        """Complete one prompt or a list of them (text or token ids), all at once in one
        batch; params: one SamplingParams for all, or a list with one per prompt."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and isinstance(prompts[0], numbers.Integral)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise InputError(f"prompts must be a str, a list of token ids, or a list of those; got "
                             f"{type(prompts).__name__}")
        if not isinstance(params, (list, tuple)):
            params = [_params(params)] * len(prompts)
        if len(params) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(params)} sampling parameters")
        params = [_params(sp) for sp in params]
        ids = [self._encode(p) for p in prompts]          # every prompt checked before any runs
        eng = self.engine
        for i, (p, sp) in enumerate(zip(ids, params)):
            eng.scheduler.check(len(p), sp.max_tokens)
        eos = self.tokenizer.eos_ids
        streams = [TextStream(self.tokenizer, sp.stop) for sp in params]
        seqs = [eng.add_request(p, sp) for p, sp in zip(ids, params)]
        index = {s.request_id: i for i, s in enumerate(seqs)}
        try:
            while eng.has_unfinished():
                for o in eng.step():
                    i = index.get(o.request_id)
                    if i is None:
                        continue
                    st = streams[i]
                    for t in o.new_token_ids:
                        st.tokens.append(t)
                        if t not in params[i].stop_ids(eos) and not st.stopped:
                            st.push(t)
                    if st.stopped and not o.finished:     # a stop string ended it
                        eng.abort(o.request_id)
        finally:
            for s in seqs:
                if not s.is_finished:
                    eng.abort(s.request_id)
            while eng.has_unfinished() and any(not s.is_finished for s in seqs):
                eng.step()
        outs = []
        for p, s, st in zip(ids, seqs, streams):
            st.flush()
            reason = "stop" if st.stopped else ("stop" if s.finish_reason == "abort" else s.finish_reason)
            outs.append(CompletionOutput(st.text, st.tokens, reason, p))
        return outs

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the completion's text as it is generated."""
        ids = self._encode(prompt)
        yield from self._run(ids, _params(params), CompletionOutput("", [], "", ids))

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> CompletionOutput:
        """Answer the last message of a conversation, rendered with the model's template."""
        text = self.chat_template.render(messages, add_generation_prompt=True)
        ids = self.tokenizer.encode(text, add_bos=False, max_tokens=self.engine.max_context)
        out = CompletionOutput("", [], "", ids)
        for _ in self._run(ids, _params(params), out):
            pass
        return out
