"""A multi-turn chat session over one Generator. The KV cache is kept between
turns: each turn renders the whole conversation with the model's template and
prefills only the tokens the cache does not already hold. When the conversation
outgrows the context, the oldest turns are dropped (the system prompt stays)."""

from __future__ import annotations

from typing import Iterator

from .chat_template import ChatTemplate
from .errors import InputError
from .sampling import SamplingParams
from .streaming import TextStream


class ChatSession:
    def __init__(self, generator, template: ChatTemplate, system: str | None = None,
                 params: SamplingParams | None = None, reply_room: int = 256):
        self.gen, self.template = generator, template
        self.system = system
        self.params = params or SamplingParams(temperature=0.7, top_p=0.9, max_tokens=512)
        self.reply_room = reply_room          # context kept free for the answer
        self.notices: list[str] = []
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.gen.reset()

    def _prompt_ids(self) -> list[int]:
        """Render and tokenize; drop the oldest turns while the reply would not fit."""
        room = min(self.reply_room, self.gen.max_context // 4)
        dropped = 0
        while True:
            text = self.template.render(self.messages, add_generation_prompt=True)
            ids = self.gen.tokenizer.encode(text, add_bos=False)
            if len(ids) + room <= self.gen.max_context:
                break
            first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
            if len(self.messages) - first <= 1:
                self.messages.pop()
                raise InputError(f"the message is {len(ids)} tokens with its template; the context holds "
                                 f"{self.gen.max_context} with {room} kept for the answer")
            del self.messages[first]                 # oldest user (or assistant) message
            if len(self.messages) > first and self.messages[first]["role"] == "assistant":
                del self.messages[first]
            dropped += 1
        if dropped:
            self.notices.append(f"dropped the {dropped} oldest turn(s) to fit the context")
        return ids

    def send(self, text: str) -> Iterator[str]:
        """Add a user message and stream the answer's text. The answer (even one cut
        short by Ctrl-C) joins the conversation."""
        if not text.strip():
            raise InputError("the message is empty")
        self.messages.append({"role": "user", "content": text})
        ids = self._prompt_ids()
        tok = self.gen.tokenizer
        reply = []
        try:
            tokens = self.gen.generate(ids, self.params, reuse_prefix=True)
            for piece in TextStream(tok, self.params.stop).follow(tokens, self.params.stop_ids(tok.eos_ids)):
                reply.append(piece)
                yield piece
        finally:
            self.messages.append({"role": "assistant", "content": "".join(reply).strip()})
