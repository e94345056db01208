"""Chat templates rendered with jinja2 the way HF's apply_chat_template does:
a sandboxed environment with trim_blocks/lstrip_blocks, loop controls, a tojson
filter, raise_exception() and strftime_now(), and the special tokens as strings."""

from __future__ import annotations

import json
import sys
from datetime import datetime

from .errors import InputError

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
          " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")
ROLES = ("system", "user", "assistant", "tool")
_warned: set[str] = set()


def _raise(message):
    from jinja2.exceptions import TemplateError
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def check_messages(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InputError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise InputError(f"message {i} has unknown role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise InputError(f"message {i} content must be a string, got {type(m['content']).__name__}")
    return list(messages)


class ChatTemplate:
    def __init__(self, source: str | None, special_tokens: dict[str, str] | None = None, name: str = "model"):
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        self.fallback = source is None
        if self.fallback and name not in _warned:
            _warned.add(name)
            print(f"hetinfer: {name} has no chat template; using ChatML", file=sys.stderr)
        self.source = source or CHATML
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.template = env.from_string(self.source)
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def from_checkpoint(cls, ckpt) -> "ChatTemplate":
        tok = ckpt.tokenizer
        special = {}
        if tok.bos_id is not None:
            special["bos_token"] = tok.id_to_piece(tok.bos_id)
        if tok.eos_ids:
            special["eos_token"] = tok.id_to_piece(tok.eos_ids[0])
        return cls(ckpt.chat_template, special, name=str(getattr(ckpt, "path", "model")))

    def render(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
        from jinja2.exceptions import TemplateError
        messages = check_messages(messages)
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **{**self.special_tokens, **kwargs})
        except TemplateError as e:
            raise InputError(f"the chat template refused these messages: {e}") from None
