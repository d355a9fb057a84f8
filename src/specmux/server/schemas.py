"""Request models of the OpenAI-compatible API (pydantic) and the error body.

Models allow unknown fields (``extra="allow"``) so that any OpenAI client works: fields
specmux does not use (``user``, ``presence_penalty``, ``response_format``...) are ignored.
Known fields are validated strictly (no ``"5"`` for an int, no NaN), and a violation
becomes a 400 in OpenAI's error shape, :func:`error_body`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from specmux.config import SEED_MAX, SEED_MIN  # any 64-bit seed, taken modulo 2**64

MAX_STOP_STRINGS = 16


def _problem(kind: str, message: str) -> PydanticCustomError:
    """A validation error whose message is shown as it is (no pydantic wording)."""
    return PydanticCustomError(f"spec_{kind}", message)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingRequest(_Request):
    """Fields shared by completions and chat completions."""

    model: str | None = Field(None, description="Must be the served model's name (or omitted).")
    max_tokens: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Tokens to generate at most (default: 16 for completions, the "
        "server limit for chat).")
    temperature: Annotated[float, Field(ge=0.0)] | None = Field(
        None, description="0 = greedy (lossless: identical to the target alone); default 1.")
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = Field(
        None, description="vLLM extension: keep the k most likely tokens; 0 or -1 = off.")
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = Field(
        None, description="Stop when the text contains one of these (it is trimmed).")
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1)] = 1

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise _problem("stop", f"must be a string or a list of up to {MAX_STOP_STRINGS} "
                           f"strings, got {_short(value)}")
        if len(value) > MAX_STOP_STRINGS:
            raise _problem("stop", f"at most {MAX_STOP_STRINGS} stop strings are allowed, "
                           f"got {len(value)}")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(dict.fromkeys(s for s in stops if s))

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions``: a text prompt, or token ids; one prompt per request."""

    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        def ids(v: Any) -> bool:
            return isinstance(v, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in v)

        ok = (isinstance(value, str) or ids(value) or (isinstance(value, list) and (
            all(isinstance(p, str) for p in value) or all(ids(p) for p in value))))
        if not ok:
            raise _problem("prompt", "must be a string, a list of token ids, or a list "
                           f"holding one of either, got {_short(value)}")
        return value
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _check_content(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise _problem("content", "must be a string or a list of text parts "
                           f"({{\"type\": \"text\", \"text\": ...}}), got {_short(value)}")
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                what = f"type {kind!r}" if isinstance(kind, str) else _short(part)
                raise _problem("content", f"content part {what} is not supported: this "
                               "server takes text only ({\"type\": \"text\", \"text\": "
                               "...})")
        return value

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingRequest):
    """``POST /v1/chat/completions``: every message goes through the chat template."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
