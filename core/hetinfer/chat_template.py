"""Chat templates rendered with jinja2 the way HF's apply_chat_template does:
a sandboxed environment with trim_blocks/lstrip_blocks, loop controls, a tojson
filter, raise_exception() and strftime_now(), and the special tokens as strings.

Templates come with model files, so they render under a budget (hetinfer.template_sandbox:
bounded string growth, loop iterations, recursion depth and output). Any failure, a syntax
error, an error inside the template or a budget passed, is one ChatTemplateError naming the
template's source (e.g. "chat_template in DIR/tokenizer_config.json") and the cause."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

from .errors import ChatTemplateError, InputError
from .template_sandbox import BudgetedEnvironment, BudgetExceeded, TemplateBudget

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
          " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")
ROLES = ("system", "user", "assistant", "tool")
_warned: set[str] = set()


class _Refused(Exception):
    """raise_exception() called by a template: it refuses the messages."""


def _raise(message):
    raise _Refused(str(message))


def _strftime_now(fmt):
    if not isinstance(fmt, str) or len(fmt) > 256:
        raise BudgetExceeded("strftime_now() takes a format string of at most 256 characters")
    return datetime.now().strftime(fmt)


def template_origin(ckpt) -> str:
    """Where a checkpoint's chat template was read from, for error messages."""
    path = Path(getattr(ckpt, "path", "model"))
    if getattr(ckpt, "format", None) == "gguf":
        return f"GGUF metadata tokenizer.chat_template of {path}"
    if path.is_dir():
        tc, jinja = path / "tokenizer_config.json", path / "chat_template.jinja"
        try:
            in_config = tc.is_file() and tc.stat().st_size < 64 << 20 and b'"chat_template"' in tc.read_bytes()
        except OSError:
            in_config = False
        return str(jinja) if jinja.is_file() and not in_config else f"chat_template in {tc}"
    return f"the chat template of {path}"


def _template_line(e: BaseException) -> int | None:
    """The template line an error was raised at (jinja2 rewrites tracebacks to template lines)."""
    line, tb = getattr(e, "lineno", None), e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _failure(origin: str, e: BaseException, when: str) -> ChatTemplateError:
    from jinja2.exceptions import TemplateSyntaxError
    line = _template_line(e)
    at = f" at line {line}" if line else ""
    if isinstance(e, _Refused):
        return ChatTemplateError(f"the chat template ({origin}) refused these messages: {e}")
    if isinstance(e, TemplateSyntaxError):
        return ChatTemplateError(f"the chat template ({origin}) has a syntax error{at}: {e.message}")
    if isinstance(e, BudgetExceeded):
        return ChatTemplateError(f"the chat template ({origin}) went past its budget{at} while {when}: {e}")
    if isinstance(e, RecursionError):
        return ChatTemplateError(f"the chat template ({origin}) nests too deeply{at} while {when}")
    return ChatTemplateError(f"the chat template ({origin}) failed{at} while {when}: {type(e).__name__}: {e}")


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
    """source: the template text (None: ChatML, with a notice); origin: where it came from,
    named in errors; budget: the render's limits (TemplateBudget defaults)."""

    def __init__(self, source: str | None, special_tokens: dict[str, str] | None = None, name: str = "model",
                 origin: str | None = None, budget: TemplateBudget | None = None):
        from jinja2.ext import loopcontrols
        self.fallback = source is None
        if self.fallback and name not in _warned:
            _warned.add(name)
            print(f"hetinfer: {name} has no chat template; using ChatML", file=sys.stderr)
        if source is not None and not isinstance(source, str):
            raise ChatTemplateError(f"the chat template ({origin or name}) is a {type(source).__name__}; "
                                    "expected a string")
        self.source = source or CHATML
        self.origin = origin or ("the built-in ChatML template" if self.fallback else f"the chat template of {name}")
        self.env = BudgetedEnvironment(budget, trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        self.env.globals["raise_exception"] = _raise
        self.env.globals["strftime_now"] = _strftime_now
        try:
            self.template = self.env.from_string(self.source)
        except Exception as e:       # noqa: BLE001 - syntax errors, nesting the compiler refuses, the size
            raise _failure(self.origin, e, "compiling") from None
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def from_checkpoint(cls, ckpt) -> "ChatTemplate":
        tok = ckpt.tokenizer
        special = {}
        if tok.bos_id is not None:
            special["bos_token"] = tok.id_to_piece(tok.bos_id)
        if tok.eos_ids:
            special["eos_token"] = tok.id_to_piece(tok.eos_ids[0])
        origin = template_origin(ckpt) if ckpt.chat_template is not None else None
        return cls(ckpt.chat_template, special, name=str(getattr(ckpt, "path", "model")), origin=origin)

    def render(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
        messages = check_messages(messages)
        try:
            text = self.env.render_text(self.template, messages=messages, add_generation_prompt=add_generation_prompt,
                                        **{**self.special_tokens, **kwargs})
        except Exception as e:       # noqa: BLE001 - whatever the template does wrong is one error
            raise _failure(self.origin, e, "rendering") from None
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:   # e.g. '\ud800' written in the template: no tokenizer can encode it
            raise ChatTemplateError(f"the chat template ({self.origin}) rendered a lone surrogate (U+"
                                    f"{ord(text[e.start]):04X}) at character {e.start}; expected valid "
                                    "Unicode") from None
        return text
