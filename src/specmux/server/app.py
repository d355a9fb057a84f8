"""The OpenAI-compatible HTTP app (FastAPI): completions, chat, streaming, metrics.

Endpoints:

* ``GET /v1/models`` — the one served model;
* ``POST /v1/completions`` and ``POST /v1/chat/completions`` — OpenAI's request and response
  shapes, ``stream: true`` as server-sent events (``data: {...}`` chunks, then
  ``data: [DONE]``).  Every response (with streaming: the final chunk) carries an extra
  top-level ``spec_decode`` object with this request's speculative decoding metrics, which
  OpenAI clients ignore;
* ``GET /health`` — 200 while the model thread runs;
* ``GET /metrics`` — Prometheus text (:mod:`specmux.server.metrics`).

Bad requests get a 4xx with OpenAI's error body ``{"error": {"message", "type", "param",
"code"}}``: malformed JSON, wrong types and out-of-range values (400), an unknown model
(404), a too-large body (413), a full queue (429).  Generation runs on one model thread
(:mod:`specmux.server.worker`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from specmux.api import Pipeline
from specmux.errors import ConfigError, PromptError, SpecmuxError
from specmux.server.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from specmux.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingRequest,
    error_body,
)
from specmux.server.worker import (
    Delta,
    Failed,
    Finished,
    GenerationRequest,
    Job,
    LearnerStore,
    QueueFull,
    ShuttingDown,
    Worker,
    spec_decode_summary,
)
from specmux.types import SamplingParams

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ENDPOINTS = frozenset({"/v1/models", "/v1/completions", "/v1/chat/completions", "/health",
                       "/metrics"})
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default when a request does not say


@dataclass(frozen=True)
class ServerConfig:
    """Limits and defaults of one app (see :func:`create_app`)."""

    model_name: str
    max_prompt_tokens: int
    max_tokens_limit: int = 4096
    default_max_tokens: int = 16  # completions only, as OpenAI; chat defaults to the limit
    max_body_bytes: int = 2 * 2**20


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code),
                            status_code=self.status)


def _json_error(status: int, message: str, type_: str = "invalid_request_error",
                param: str | None = None, code: str | None = None) -> JSONResponse:
    return APIError(status, message, type_, param, code).response()


class _Guard:
    """Pure-ASGI middleware: request body size limit (413) and per-status HTTP counters.

    The body is read (up to the limit) before the app sees it and replayed to it; later
    ``receive`` calls go to the server, so the app still sees the client disconnect.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, metrics: ServerMetrics) -> None:
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        status = [500]

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            body = await self._read_body(scope, receive)
            if isinstance(body, Response):
                await body(scope, receive, send_counted)
                return
            if body is None:  # the client went away while sending
                status[0] = 499
                return
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_counted)
        finally:
            self.metrics.http_requests.labels(endpoint=endpoint, status=str(status[0])).inc()

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | Response | None:
        limit = self.max_body_bytes
        too_large = _json_error(413, f"the request body exceeds {limit} bytes",
                                code="request_too_large")
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return _json_error(400, "invalid Content-Length header")
                if declared > limit:
                    return too_large
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "none", "function-after"})


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = list(exc.errors())
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", first.get("msg", ""))
        return f"malformed JSON body: {detail}", None
    # Drop pydantic's union-branch tags (e.g. 'str', 'list[int]') from the location.
    parts = [p for p in loc if "[" not in p and p not in _UNION_TAGS]
    where = f"{'.'.join(parts)}: " if parts else ""
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}{first.get('msg', 'invalid value')}{more}", parts[0] if parts else None


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Cancel ``job`` when the client disconnects."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def create_app(
    pipeline: Pipeline,
    *,
    model_name: str | None = None,
    state_dir: str | Path | None = None,
    max_queue: int = 64,
    max_prompt_tokens: int | None = None,
    max_tokens_limit: int = 4096,
    default_max_tokens: int = 16,
    max_body_bytes: int = 2 * 2**20,
    save_every: int = 20,
    save_interval: float = 60.0,
    reset_per_query: bool | None = None,
) -> FastAPI:
    """An OpenAI-compatible app serving ``pipeline`` (see the module docstring).

    ``state_dir``: where the learner state is kept (restored at startup, saved every
    ``save_every`` requests or ``save_interval`` seconds and at shutdown); ``None`` keeps
    it in memory only.  ``max_queue``: generations that may wait (429 beyond).
    ``max_prompt_tokens`` (default: the target's context - 1), ``max_tokens_limit`` and
    ``max_body_bytes`` bound a request.  ``reset_per_query`` overrides the pipeline's:
    ``True`` makes the learner start afresh on every request instead of learning the
    workload.
    """
    if pipeline.tokenizer is None:
        raise ConfigError("serving needs a tokenizer: build the Pipeline with tokenizer=")
    max_context = pipeline.target.max_context
    limit_prompt = max_context - 1 if max_prompt_tokens is None else min(
        max_prompt_tokens, max_context - 1)
    for name, value in (("max_prompt_tokens", limit_prompt), ("max_tokens_limit",
                        max_tokens_limit), ("max_body_bytes", max_body_bytes),
                        ("default_max_tokens", default_max_tokens)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if reset_per_query is not None:
        pipeline.selector.reset_per_query = reset_per_query
    config = ServerConfig(
        model_name=model_name or str(getattr(pipeline, "target_name", "specmux")),
        max_prompt_tokens=limit_prompt, max_tokens_limit=max_tokens_limit,
        default_max_tokens=min(default_max_tokens, max_tokens_limit),
        max_body_bytes=max_body_bytes,
    )
    arm_names = [str(a) for a in pipeline.selector.arms]
    metrics = ServerMetrics(arm_names, pipeline.selector.drafter_names)
    store = LearnerStore(state_dir, pipeline) if state_dir is not None else None
    tokenizer_lock = threading.Lock()
    worker = Worker(pipeline, metrics, max_queue=max_queue, store=store,
                    save_every=save_every, save_interval=save_interval,
                    tokenizer_lock=tokenizer_lock)
    created = int(time.time())
    vocab_size = pipeline.target.vocab_size

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if store is not None:
            store.restore()
        worker.start()
        log.info("serving %s: drafters %s, policy %s, queue %d", config.model_name,
                 pipeline.selector.drafter_names, pipeline.selector.name, max_queue)
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(title="specmux", version="0.1.0", lifespan=lifespan,
                  summary="OpenAI-compatible speculative decoding with an online learner")
    app.state.config = config
    app.state.worker = worker
    app.state.metrics = metrics
    app.state.store = store
    app.state.pipeline = pipeline
    app.add_middleware(_Guard, max_body_bytes=max_body_bytes, metrics=metrics)

    # -- errors -----------------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _json_error(400, message, param=param)

    @app.exception_handler(SpecmuxError)
    async def _specmux_error(_: Request, exc: SpecmuxError) -> JSONResponse:
        return _json_error(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(error_body(str(exc.detail), type_, None, code),
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.error("internal error: %r", exc, exc_info=exc)
        return _json_error(500, f"internal error ({type(exc).__name__})", "server_error")

    # -- request → generation ------------------------------------------------------------

    def check_model(body: SamplingRequest) -> None:
        if body.model is not None and body.model != config.model_name:
            raise APIError(404, f"The model `{body.model}` does not exist; this server "
                           f"serves `{config.model_name}`", param="model",
                           code="model_not_found")
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")

    def check_prompt_ids(ids: list[int], param: str) -> None:
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        if len(ids) > config.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens, more than the "
                           f"{config.max_prompt_tokens} allowed", param=param,
                           code="context_length_exceeded")

    def build_request(body: SamplingRequest, ids: list[int],
                      max_tokens: int | None, default: int) -> GenerationRequest:
        if max_tokens is None:
            max_tokens = default
        elif max_tokens > config.max_tokens_limit:
            raise APIError(400, f"max_tokens is {max_tokens}, more than the "
                           f"{config.max_tokens_limit} allowed", param="max_tokens")
        top_k = body.top_k if body.top_k is not None and body.top_k > 0 else 0
        sampling = SamplingParams(
            temperature=DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, top_k=top_k, seed=body.seed,
        )
        return GenerationRequest(prompt_ids=ids, max_tokens=max_tokens, sampling=sampling,
                                 stop=body.stop_strings())

    def encode_completion_prompt(body: CompletionRequest) -> list[int]:
        prompt: Any = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise APIError(400, f"batched prompts ({len(prompt)}) are not supported; "
                               "send one prompt per request", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "the prompt is empty", param="prompt")
            with tokenizer_lock:
                ids = pipeline.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
            if any(not 0 <= t < vocab_size for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {vocab_size})",
                               param="prompt")
        check_prompt_ids(ids, "prompt")
        return ids

    def encode_chat(body: ChatCompletionRequest) -> list[int]:
        from jinja2.exceptions import TemplateError

        tokenizer = pipeline.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template; use "
                           "/v1/completions", param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            with tokenizer_lock:
                out: Any = tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        except (TemplateError, ValueError, TypeError, KeyError) as e:
            raise APIError(400, f"the chat template rejected the messages: {e}",
                           param="messages") from None
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        ids = [int(t) for t in out]
        check_prompt_ids(ids, "messages")
        return ids

    def submit(request: GenerationRequest) -> Job:
        try:
            return worker.submit(request)
        except QueueFull as e:
            raise APIError(429, str(e), "rate_limit_error", code="queue_full") from None
        except ShuttingDown as e:
            raise APIError(503, str(e), "server_error", code="shutting_down") from None

    def failure(error: BaseException) -> APIError:
        if isinstance(error, ShuttingDown):
            return APIError(503, str(error), "server_error", code="shutting_down")
        if isinstance(error, PromptError):
            return APIError(400, str(error), param="prompt")
        if isinstance(error, SpecmuxError):
            return APIError(400, str(error))
        return APIError(500, f"internal error ({type(error).__name__})", "server_error")

    async def collect(job: Job, request: Request) -> Finished:
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

    def spec_decode(done: Finished) -> dict[str, Any]:
        return spec_decode_summary(done.stats, pipeline.selector.name, done.queue_seconds,
                                   done.generation_seconds)

    async def stream_events(
        job: Job, request: Request, include_usage: bool,
        chunk: Callable[[str | None, str | None], dict[str, Any]],
        first: dict[str, Any] | None,
    ) -> AsyncIterator[str]:
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        try:
            if first is not None:
                yield _sse(first)
            while True:
                event = await job.events.get()
                if isinstance(event, Delta):
                    if event.text:
                        yield _sse(chunk(event.text, None))
                elif isinstance(event, Finished):
                    last = chunk(None, event.finish_reason)
                    last["spec_decode"] = spec_decode(event)
                    yield _sse(last)
                    if include_usage:
                        tail = chunk(None, None)
                        tail["choices"] = []
                        tail["usage"] = usage(job, event)
                        tail["spec_decode"] = last["spec_decode"]
                        yield _sse(tail)
                    break
                else:  # Failed: the status line is gone, so report in-band
                    err = failure(event.error)
                    yield _sse(error_body(err.message, err.type, err.param, err.code))
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()
            watcher.cancel()

    def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    # -- endpoints ------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = worker.alive
        return JSONResponse({"status": "ok" if ok else "unavailable",
                             "model": config.model_name}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": config.model_name, "object": "model", "created": created,
            "owned_by": "specmux", "root": str(getattr(pipeline, "target_name", "")),
            "max_model_len": max_context,
        }]}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check_model(body)
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if body.logprobs is not None:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if body.best_of not in (None, 1):
            raise APIError(400, "only best_of=1 is supported", param="best_of")
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        ids = await asyncio.to_thread(encode_completion_prompt, body)
        job = submit(build_request(body, ids, body.max_tokens, config.default_max_tokens))
        rid, model = f"cmpl-{uuid.uuid4().hex}", config.model_name
        now = int(time.time())

        def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": now, "model": model,
                    "choices": [{"index": 0, "text": text or "", "logprobs": None,
                                 "finish_reason": finish}]}

        if body.stream:
            return sse_response(stream_events(job, request, body.include_usage, chunk, None))
        done = await collect(job, request)
        out = chunk(done.text, done.finish_reason)
        out["usage"] = usage(job, done)
        out["spec_decode"] = spec_decode(done)
        return JSONResponse(out)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        check_model(body)
        if body.logprobs or body.top_logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        ids = await asyncio.to_thread(encode_chat, body)
        max_tokens = body.max_completion_tokens if body.max_tokens is None else body.max_tokens
        job = submit(build_request(body, ids, max_tokens, config.max_tokens_limit))
        rid, model = f"chatcmpl-{uuid.uuid4().hex}", config.model_name
        now = int(time.time())

        def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
            delta = {} if text is None else {"content": text}
            return {"id": rid, "object": "chat.completion.chunk", "created": now,
                    "model": model, "choices": [{"index": 0, "delta": delta,
                                                 "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            first = chunk("", None)
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            return sse_response(stream_events(job, request, body.include_usage, chunk, first))
        done = await collect(job, request)
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": now, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                         "logprobs": None, "finish_reason": done.finish_reason}],
            "usage": usage(job, done),
            "spec_decode": spec_decode(done),
        })

    return app


def serve(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info", graceful_timeout: float = 10.0,
          access_log: bool = True) -> None:
    """Run ``app`` with uvicorn until SIGINT/SIGTERM (then the lifespan saves the learner).

    ``port=0`` picks a free port; the address is logged (``serving on http://HOST:PORT``).
    ``graceful_timeout``: seconds in-flight requests get to finish on shutdown.
    """
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=graceful_timeout, access_log=access_log)
    sock = config.bind_socket()
    bound = sock.getsockname()
    url_host = f"[{bound[0]}]" if ":" in str(bound[0]) else bound[0]
    log.info("serving on http://%s:%d", url_host, bound[1])
    uvicorn.Server(config).run(sockets=[sock])
