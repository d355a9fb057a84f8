"""What the endpoints share: the app's context, body parsing, request -> job -> response.

:class:`ServerContext` (``app.state.ctx``) holds the limits, the pipeline and the worker.
:func:`parse_body` turns a request body into a schema object or a precise 400;
:func:`build_request` applies the limits (prompt + max_tokens must fit the context, as in
vLLM); :func:`collect` and :func:`stream_events` turn the worker's events into a JSON
response or server-sent events.  Every accepted request ends with a well-formed answer:
its result, an error JSON, or (streaming) an error event followed by ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

from specmux.api import Pipeline
from specmux.server.errors import APIError, failure, queue_full, shutting_down, validation_message
from specmux.server.schemas import SamplingRequest, error_body
from specmux.server.worker import (
    Delta,
    Failed,
    Finished,
    GenerationRequest,
    Job,
    QueueFull,
    ShuttingDown,
    Worker,
    spec_decode_summary,
)
from specmux.types import SamplingParams

DEFAULT_TEMPERATURE = 1.0  # OpenAI's default when a request does not say
JSON_TYPES = ("application/json",)

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class ServerConfig:
    """Limits and defaults of one app (see :func:`~specmux.server.app.create_app`)."""

    model_name: str
    max_prompt_tokens: int
    max_tokens_limit: int = 4096
    default_max_tokens: int = 16  # completions only, as OpenAI; chat defaults to the limit
    max_body_bytes: int = 2 * 2**20


@dataclass
class ServerContext:
    """Everything a route needs (``request.app.state.ctx``)."""

    config: ServerConfig
    pipeline: Pipeline
    worker: Worker
    tokenizer_lock: threading.Lock
    max_context: int
    vocab_size: int
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def policy_name(self) -> str:
        return self.pipeline.selector.name


def context(request: Request) -> ServerContext:
    return request.app.state.ctx


async def parse_body(request: Request, schema: type[M]) -> M:
    """The body as ``schema``; a 400 that says what is wrong and what is allowed."""
    ctype = request.headers.get("content-type", "")
    mime = ctype.split(";")[0].strip().lower()
    if mime not in JSON_TYPES and not mime.endswith("+json"):
        got = f"Content-Type {ctype!r}" if ctype else "no Content-Type"
        raise APIError(400, f"the body must be a JSON object sent with Content-Type: "
                       f"application/json (got {got}); with curl add "
                       "-H 'Content-Type: application/json'", code="unsupported_content_type")
    raw = await request.body()
    try:
        obj = json.loads(raw)
    except RecursionError:
        raise APIError(400, "malformed JSON body: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise APIError(400, f"malformed JSON body: {e}") from None
    if not isinstance(obj, dict):
        raise APIError(400, f"the body must be a JSON object, got a JSON {_json_type(obj)}")
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "strings must be valid Unicode (the body holds a lone UTF-16 "
                       "surrogate escape such as \\ud800)") from None
    try:
        return schema.model_validate(obj)
    except ValidationError as e:
        message, param = validation_message(list(e.errors()))
        raise APIError(400, message, param=param) from None


def _json_type(obj: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(obj), "number")


def check_model(ctx: ServerContext, body: SamplingRequest) -> None:
    name = ctx.config.model_name
    if body.model is not None and body.model != name:
        raise APIError(404, f"The model `{body.model}` does not exist; this server serves "
                       f"`{name}`", param="model", code="model_not_found")
    if body.n != 1:
        raise APIError(400, f"only n=1 is supported, got n={body.n}", param="n")


def check_prompt_ids(ctx: ServerContext, ids: list[int], param: str) -> None:
    if not ids:
        raise APIError(400, "the prompt is empty", param=param)
    limit = ctx.config.max_prompt_tokens
    if len(ids) > limit:
        raise APIError(400, f"the prompt has {len(ids)} tokens, more than the {limit} "
                       "allowed", param=param, code="context_length_exceeded")


def build_request(ctx: ServerContext, body: SamplingRequest, ids: list[int],
                  max_tokens: int | None, default: int) -> GenerationRequest:
    """The job for ``ids``; ``max_tokens`` (None: ``default``, cut to the context) is checked
    against the server limit and, with the prompt, against the model's context (vLLM's 400)."""
    limit, context_len = ctx.config.max_tokens_limit, ctx.max_context
    if max_tokens is None:
        max_tokens = max(1, min(default, context_len - len(ids)))
    elif max_tokens > limit:
        raise APIError(400, f"max_tokens is {max_tokens}, more than the {limit} allowed",
                       param="max_tokens")
    if len(ids) + max_tokens > context_len:
        raise APIError(400, f"This model's maximum context length is {context_len} tokens. "
                       f"However, you requested {len(ids) + max_tokens} tokens ({len(ids)} in "
                       f"the prompt, {max_tokens} in the completion). Please reduce the "
                       "prompt or max_tokens.", param="max_tokens",
                       code="context_length_exceeded")
    top_k = body.top_k if body.top_k is not None and body.top_k > 0 else 0
    sampling = SamplingParams(
        temperature=DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, top_k=top_k, seed=body.seed,
    )
    return GenerationRequest(prompt_ids=ids, max_tokens=max_tokens, sampling=sampling,
                             stop=body.stop_strings())


def submit(ctx: ServerContext, request: GenerationRequest) -> Job:
    try:
        return ctx.worker.submit(request)
    except QueueFull as e:
        raise queue_full(e) from None
    except ShuttingDown as e:
        raise shutting_down(e) from None


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Cancel ``job`` when the client disconnects."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


async def collect(job: Job, request: Request) -> Finished:
    """Wait for the end of ``job`` (APIError if it failed; cancelled if the client left)."""
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    try:
        while True:
            event = await job.events.get()
            if isinstance(event, Finished):
                return event
            if isinstance(event, Failed):
                raise failure(event.error)
    finally:
        job.cancel()  # no-op when finished; stops the generation if we were cancelled
        watcher.cancel()


def usage(job: Job, done: Finished) -> dict[str, int]:
    n_prompt, n_out = len(job.request.prompt_ids), len(done.token_ids)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out,
            "total_tokens": n_prompt + n_out}


def spec_decode(ctx: ServerContext, done: Finished) -> dict[str, Any]:
    return spec_decode_summary(done.stats, ctx.policy_name, done.queue_seconds,
                               done.generation_seconds)


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


Chunk = Callable[[str | None, str | None], dict[str, Any]]


async def stream_events(ctx: ServerContext, job: Job, request: Request, include_usage: bool,
                        chunk: Chunk, first: dict[str, Any] | None) -> AsyncIterator[str]:
    """SSE lines of ``job``: chunks, the last with ``spec_decode``, then ``data: [DONE]``;
    a failure (also at shutdown) becomes an error event before ``[DONE]``."""
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    try:
        if first is not None:
            yield sse(first)
        while True:
            event = await job.events.get()
            if isinstance(event, Delta):
                if event.text:
                    yield sse(chunk(event.text, None))
            elif isinstance(event, Finished):
                for line in _final_chunks(ctx, job, event, chunk, include_usage):
                    yield line
                break
            else:  # Failed: the status line is gone, so report in-band
                yield sse(failure(event.error).body())
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()
        watcher.cancel()


def _final_chunks(ctx: ServerContext, job: Job, done: Finished, chunk: Chunk,
                  include_usage: bool) -> list[str]:
    last = chunk(None, done.finish_reason)
    last["spec_decode"] = spec_decode(ctx, done)
    lines = [sse(last)]
    if include_usage:
        tail = chunk(None, None)
        tail["choices"] = []
        tail["usage"] = usage(job, done)
        tail["spec_decode"] = last["spec_decode"]
        lines.append(sse(tail))
    return lines


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


__all__ = ["DEFAULT_TEMPERATURE", "ServerConfig", "ServerContext", "build_request",
           "check_model", "check_prompt_ids", "collect", "context", "error_body",
           "parse_body", "spec_decode", "sse_response", "stream_events", "submit", "usage"]
