"""The OpenAI request shapes as pydantic models, their SamplingParams, and the error shape.

Unknown fields and fields this server does not implement are a 400 naming the field
(never silently ignored)."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hetinfer.errors import InputError
from hetinfer.sampling import SamplingParams

# OpenAI / vLLM fields that exist but are not implemented here: named in the 400
UNSUPPORTED = {
    "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "response_format",
    "logit_bias", "best_of", "suffix", "audio", "modalities", "prediction", "reasoning_effort",
    "service_tier", "store", "metadata", "web_search_options", "guided_json", "guided_regex",
    "guided_choice", "guided_grammar", "use_beam_search", "length_penalty", "prompt_logprobs",
}
MAX_N = 16
MAX_LOGPROBS = 20


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
             429: "rate_limit_error", 503: "service_unavailable_error", 500: "internal_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Base):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(_Base):
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None                    # an end-user id: recorded by OpenAI, no effect on output

    def _max_tokens(self) -> int | None:
        return getattr(self, "max_tokens", None)

    def to_sampling_params(self, default_max_tokens: int, seed_offset: int = 0) -> SamplingParams:
        """SamplingParams for one choice; with n > 1 and a seed, choice i uses seed + i."""
        mt = self._max_tokens()
        if mt is not None and mt < 0:
            raise InputError("max_tokens must be >= 0")
        fields = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                      presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                      repetition_penalty=self.repetition_penalty,
                      seed=None if self.seed is None else self.seed + seed_offset,
                      max_tokens=default_max_tokens if mt is None else mt,
                      stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
                      stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos)
        if fields["temperature"] is None:
            fields["temperature"] = 1.0          # OpenAI's default
        return SamplingParams(**{k: v for k, v in fields.items() if v is not None})


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = 16                # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = None

    def num_logprobs(self) -> int | None:
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"'logprobs' must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", param="logprobs")
        return self.logprobs


class TextPart(_Base):
    type: Literal["text"]
    text: str


class ChatMessage(_Base):
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[TextPart]]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True

    def num_logprobs(self) -> int | None:
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise APIError(400, f"'top_logprobs' must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}",
                               param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def dict_messages(self) -> list[dict]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]


class TokenizeRequest(_Base):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Base):
    model: str | None = None
    tokens: list[int]


def _loc(err) -> str:
    return ".".join(str(p) for p in err.get("loc", ()))


def parse(cls, body) -> BaseModel:
    """Validate a JSON body into cls, or raise a 400 APIError naming the offending field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for key in body:
        if key in UNSUPPORTED:
            raise APIError(400, f"'{key}' is not supported by this server", param=key, code="unsupported_parameter")
    try:
        req = cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        where = _loc(err)
        if err.get("type") == "extra_forbidden":
            msg = f"unknown field '{where}'"
        else:
            msg = f"'{where}': {err.get('msg')}"
        raise APIError(400, msg, param=where.split(".")[0] or None) from None
    if hasattr(req, "num_logprobs"):
        req.num_logprobs()                  # checks the logprobs fields
    return req
