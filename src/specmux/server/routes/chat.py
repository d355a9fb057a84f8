"""``POST /v1/chat/completions``: every message goes through the chat template."""

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
from specmux.server.schemas import ChatCompletionRequest

router = APIRouter()


def encode_chat(ctx: ServerContext, body: ChatCompletionRequest) -> list[int]:
    """Token ids of the conversation through the tokenizer's chat template."""
    from jinja2.exceptions import TemplateError

    tokenizer = ctx.pipeline.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template; use "
                       "/v1/completions", param="messages")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        with ctx.tokenizer_lock:
            out: Any = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    except (TemplateError, ValueError, TypeError, KeyError) as e:
        raise APIError(400, f"the chat template rejected the messages: {e}",
                       param="messages") from None
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    ids = [int(t) for t in out]
    check_prompt_ids(ctx, ids, "messages")
    return ids


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request) -> Any:
    ctx = context(request)
    body = await parse_body(request, ChatCompletionRequest)
    check_model(ctx, body)
    if body.logprobs or body.top_logprobs:
        raise APIError(400, "logprobs are not supported", param="logprobs")
    ids = await asyncio.to_thread(encode_chat, ctx, body)
    max_tokens = body.max_completion_tokens if body.max_tokens is None else body.max_tokens
    job = submit(ctx, build_request(ctx, body, ids, max_tokens, ctx.config.max_tokens_limit))
    rid, model, now = f"chatcmpl-{uuid.uuid4().hex}", ctx.config.model_name, int(time.time())

    def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
        delta = {} if text is None else {"content": text}
        return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish}]}

    if body.stream:
        first = chunk("", None)
        first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        return sse_response(stream_events(ctx, job, request, body.include_usage, chunk, first))
    done = await collect(job, request)
    return JSONResponse({
        "id": rid, "object": "chat.completion", "created": now, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                     "logprobs": None, "finish_reason": done.finish_reason}],
        "usage": usage(job, done),
        "spec_decode": spec_decode(ctx, done),
    })
