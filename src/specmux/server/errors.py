"""OpenAI-shaped errors: :class:`APIError`, the exception handlers, readable 400 messages.

Every error answer is ``{"error": {"message", "type", "param", "code"}}``
(:func:`~specmux.server.schemas.error_body`).  A message says what is wrong and what is
allowed; ``param`` names the request field.  Anything unexpected is logged with its
traceback and answered 500 in the same shape (a bug).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from specmux.config import plain_message, shown_value
from specmux.errors import PromptError, SpecmuxError
from specmux.server.schemas import error_body
from specmux.server.worker import QueueFull, ShuttingDown

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1  # 429 (queue full) and 503 (shutting down) carry Retry-After


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def json_error(status: int, message: str, type_: str = "invalid_request_error",
               param: str | None = None, code: str | None = None) -> JSONResponse:
    return APIError(status, message, type_, param, code).response()


def queue_full(error: QueueFull) -> APIError:
    return APIError(429, str(error), "rate_limit_error", code="queue_full",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def shutting_down(error: BaseException) -> APIError:
    return APIError(503, str(error), "server_error", code="shutting_down",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def failure(error: BaseException) -> APIError:
    """The API error for a generation that failed on the model thread."""
    if isinstance(error, ShuttingDown):
        return shutting_down(error)
    if isinstance(error, PromptError):
        return APIError(400, str(error), param="prompt", code="context_length_exceeded"
                        if "context" in str(error) else None)
    if isinstance(error, SpecmuxError):
        return APIError(400, str(error))
    return APIError(500, f"internal error ({type(error).__name__})", "server_error")


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "none", "function-after",
                         "function-before", "constrained-int", "constrained-str", "literal"})


def validation_message(errors: list[Any]) -> tuple[str, str | None]:
    """(message, param) for pydantic errors: the first problem, where it is, what was sent."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", first.get("msg", ""))
        return f"malformed JSON body: {detail}", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # Drop pydantic's union-branch tags (e.g. 'str', 'list[int]') from the location.
    parts = [p for p in loc if "[" not in p and p not in _UNION_TAGS]
    where = f"{'.'.join(parts)}: " if parts else ""
    return f"{where}{plain_message(first)}{shown_value(first)}", parts[0] if parts else None


def install_handlers(app: FastAPI) -> None:
    """Answer every error in OpenAI's shape (4xx for the client's, 500 for bugs)."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        return json_error(400, message, param=param)

    @app.exception_handler(ValidationError)
    async def _validation(_: Request, exc: ValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        return json_error(400, message, param=param)

    @app.exception_handler(SpecmuxError)
    async def _specmux_error(_: Request, exc: SpecmuxError) -> JSONResponse:
        return json_error(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(error_body(str(exc.detail), type_, None, code),
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.error("internal error: %r", exc, exc_info=exc)
        return json_error(500, f"internal error ({type(exc).__name__})", "server_error")
