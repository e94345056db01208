"""The Python API, in the style users know from vLLM:

    from hetinfer import LLM, SamplingParams
    llm = LLM(device="cpu", dtype="f32")                 # default model: SmolLM2
    out = llm.generate("Once upon a time", SamplingParams(temperature=0.8, seed=1))[0]
    for piece in llm.stream("The sea is", SamplingParams(max_tokens=20)): print(piece, end="")
    llm.chat([{"role": "user", "content": "Hi!"}]).text
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from .chat_template import ChatTemplate
from .engine import Generator, Stats, load
from .errors import InputError
from .sampling import SamplingParams
from .streaming import TextStream


@dataclass
class CompletionOutput:
    text: str
    token_ids: list[int]
    finish_reason: str                 # "stop" (EOS, stop token or string) | "length" | "context"
    prompt_token_ids: list[int] = field(default_factory=list)
    stats: Stats | None = None


class LLM:
    def __init__(self, model=None, device: str = "cpu", dtype: str = "f32", max_context: int = 4096,
                 progress: bool = False, eager: bool = False):
        self.model, self.checkpoint = load(model, device, dtype, max_context, progress=progress)
        self.tokenizer = self.checkpoint.tokenizer
        self.generator = Generator(self.model, self.tokenizer, max_context, graphs=not eager)
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
            return self.tokenizer.encode(prompt)
        if not prompt:
            raise InputError("the prompt has no tokens")
        return [int(t) for t in prompt]

    def generate(self, prompts, params: SamplingParams | None = None) -> list[CompletionOutput]:
        """Complete one prompt or a list of them (text or token ids), one after another."""
        params = params or SamplingParams()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        outs = []
        for p in prompts:
            ids = self._encode(p)
            out = CompletionOutput("", [], "", ids)
            for _ in self._run(ids, params, out):
                pass
            outs.append(out)
        return outs

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the completion's text as it is generated."""
        ids = self._encode(prompt)
        yield from self._run(ids, params or SamplingParams(), CompletionOutput("", [], "", ids))

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> CompletionOutput:
        """Answer the last message of a conversation, rendered with the model's template."""
        text = self.chat_template.render(messages, add_generation_prompt=True)
        ids = self.tokenizer.encode(text, add_bos=False)
        out = CompletionOutput("", [], "", ids)
        for _ in self._run(ids, params or SamplingParams(), out):
            pass
        return out
