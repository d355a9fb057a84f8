"""The OpenAI-compatible HTTP app (FastAPI): completions, chat, streaming, metrics.

Endpoints (one route module each, :mod:`specmux.server.routes`):

* ``GET /v1/models`` — the one served model;
* ``POST /v1/completions`` and ``POST /v1/chat/completions`` — OpenAI's request and response
  shapes, ``stream: true`` as server-sent events (``data: {...}`` chunks, then
  ``data: [DONE]``).  Every response (with streaming: the final chunk) carries an extra
  top-level ``spec_decode`` object with this request's speculative decoding metrics, which
  OpenAI clients ignore;
* ``GET /health`` — 200 while the model thread runs;
* ``GET /metrics`` — Prometheus text (:mod:`specmux.server.metrics`).

Bad requests get a 4xx with OpenAI's error body ``{"error": {"message", "type", "param",
"code"}}`` (:mod:`specmux.server.errors`): a body that is not JSON, malformed JSON, wrong
types and out-of-range values, a prompt + max_tokens beyond the context (400), an unknown
model (404), a too-large body (413), a full queue (429, with ``Retry-After``); while shutting
down, 503 (with ``Retry-After``).  Generation runs on one model thread
(:mod:`specmux.server.worker`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from specmux.api import Pipeline
from specmux.errors import ConfigError
from specmux.server.errors import APIError, install_handlers
from specmux.server.generation import ServerConfig, ServerContext
from specmux.server.guard import Guard
from specmux.server.metrics import ServerMetrics
from specmux.server.routes import ROUTERS
from specmux.server.run import serve
from specmux.server.worker import LearnerStore, Worker

log = logging.getLogger(__name__)

__all__ = ["APIError", "ServerConfig", "create_app", "serve"]


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
    if reset_per_query is not None:
        pipeline.selector.reset_per_query = reset_per_query
    config = server_config(pipeline, model_name, max_prompt_tokens, max_tokens_limit,
                           default_max_tokens, max_body_bytes)
    selector = pipeline.selector
    metrics = ServerMetrics([str(a) for a in selector.arms], selector.drafter_names)
    store = LearnerStore(state_dir, pipeline) if state_dir is not None else None
    lock = threading.Lock()
    worker = Worker(pipeline, metrics, max_queue=max_queue, store=store, save_every=save_every,
                    save_interval=save_interval, tokenizer_lock=lock)
    ctx = ServerContext(config, pipeline, worker, lock, pipeline.target.max_context,
                        pipeline.target.vocab_size)
    app = FastAPI(title="specmux", version="0.1.0", lifespan=_lifespan(ctx, store),
                  summary="OpenAI-compatible speculative decoding with an online learner")
    app.state.ctx = ctx
    app.state.config, app.state.worker, app.state.metrics = config, worker, metrics
    app.state.store, app.state.pipeline = store, pipeline
    app.add_middleware(Guard, max_body_bytes=max_body_bytes, metrics=metrics)
    install_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    return app


def server_config(pipeline: Pipeline, model_name: str | None, max_prompt_tokens: int | None,
                  max_tokens_limit: int, default_max_tokens: int,
                  max_body_bytes: int) -> ServerConfig:
    """The app's limits, checked (ConfigError for a value < 1)."""
    max_context = pipeline.target.max_context
    limit_prompt = max_context - 1 if max_prompt_tokens is None else min(
        max_prompt_tokens, max_context - 1)
    for name, value in (("max_prompt_tokens", limit_prompt),
                        ("max_tokens_limit", max_tokens_limit),
                        ("max_body_bytes", max_body_bytes),
                        ("default_max_tokens", default_max_tokens)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    return ServerConfig(
        model_name=model_name or str(getattr(pipeline, "target_name", "specmux")),
        max_prompt_tokens=limit_prompt, max_tokens_limit=max_tokens_limit,
        default_max_tokens=min(default_max_tokens, max_tokens_limit),
        max_body_bytes=max_body_bytes,
    )


def _lifespan(ctx: ServerContext, store: LearnerStore | None):  # noqa: ANN202
    """Restore the learner and start the model thread; at the end stop it and save."""
    import asyncio

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if store is not None:
            store.restore()
        ctx.worker.start()
        selector = ctx.pipeline.selector
        log.info("serving %s: drafters %s, policy %s", ctx.config.model_name,
                 selector.drafter_names, selector.name)
        try:
            yield
        finally:
            await asyncio.to_thread(ctx.worker.stop)

    return lifespan
