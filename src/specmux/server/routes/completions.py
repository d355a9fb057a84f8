"""``POST /v1/completions``: a text prompt or token ids, one prompt per request."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from specmux.server.errors import APIError
from specmux.server.generation import (
    ServerContext,
    build_request,
    check_model,
    check_prompt_ids,
    collect,
    context,
    parse_body,
    spec_decode,
    sse_response,
    stream_events,
    submit,
    usage,
)
from specmux.server.schemas import CompletionRequest

router = APIRouter()


def check_unsupported(body: CompletionRequest) -> None:
    if body.echo:
        raise APIError(400, "echo is not supported", param="echo")
    if body.logprobs is not None:
        raise APIError(400, "logprobs are not supported", param="logprobs")
    if body.best_of not in (None, 1):
        raise APIError(400, "only best_of=1 is supported", param="best_of")
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")


def encode_prompt(ctx: ServerContext, body: CompletionRequest) -> list[int]:
    """Token ids of the (single) prompt: text through the tokenizer, or ids as they are."""
    prompt: Any = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise APIError(400, f"batched prompts ({len(prompt)}) are not supported; "
                           "send one prompt per request", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        with ctx.tokenizer_lock:
            ids = ctx.pipeline.encode(prompt)
    else:
        ids = [int(t) for t in prompt]
        if any(not 0 <= t < ctx.vocab_size for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {ctx.vocab_size})",
                           param="prompt")
    check_prompt_ids(ctx, ids, "prompt")
    return ids


@router.post("/v1/completions", response_model=None)
async def completions(request: Request) -> Any:
    ctx = context(request)
    body = await parse_body(request, CompletionRequest)
    check_model(ctx, body)
    check_unsupported(body)
    ids = await asyncio.to_thread(encode_prompt, ctx, body)
    job = submit(ctx, build_request(ctx, body, ids, body.max_tokens,
                                    ctx.config.default_max_tokens))
    rid, model, now = f"cmpl-{uuid.uuid4().hex}", ctx.config.model_name, int(time.time())

    def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
        return {"id": rid, "object": "text_completion", "created": now, "model": model,
                "choices": [{"index": 0, "text": text or "", "logprobs": None,
                             "finish_reason": finish}]}

    if body.stream:
        return sse_response(stream_events(ctx, job, request, body.include_usage, chunk, None))
    done = await collect(job, request)
    out = chunk(done.text, done.finish_reason)
    out["usage"] = usage(job, done)
    out["spec_decode"] = spec_decode(ctx, done)
    return JSONResponse(out)
