"""``GET /health``, ``GET /metrics`` (Prometheus text) and ``GET /v1/models``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from specmux.server.generation import context
from specmux.server.metrics import CONTENT_TYPE_LATEST

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 while the model thread runs (503 once it stops or the server shuts down)."""
    ctx = context(request)
    ok = ctx.worker.alive and not ctx.worker.closing
    return JSONResponse({"status": "ok" if ok else "unavailable",
                         "model": ctx.config.model_name}, status_code=200 if ok else 503)


@router.get("/metrics")
async def prometheus_metrics(request: Request) -> Response:
    return Response(context(request).worker.metrics.exposition(),
                    media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    ctx = context(request)
    return {"object": "list", "data": [{
        "id": ctx.config.model_name, "object": "model", "created": ctx.created,
        "owned_by": "specmux", "root": str(getattr(ctx.pipeline, "target_name", "")),
        "max_model_len": ctx.max_context,
    }]}
