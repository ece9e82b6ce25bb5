"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` for every failure.

Handlers here turn FastAPI's validation errors (422 by default) into 400s, Starlette's HTTP
errors (404 route, 405, malformed bodies) into the same shape, and keep a last-resort 500 for
genuine bugs, which should never be reachable from anything a client sends.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

# status -> (type, default code); mirrors the types OpenAI's API uses.
ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    404: ("not_found_error", None),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "queue_full"),
    500: ("server_error", None),
    503: ("service_unavailable", None),
}


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class APIError(Exception):
    """Raised anywhere in the HTTP layer; becomes an OpenAI error response."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or ERROR_TYPES.get(status, ("", None))[1]
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    error_type, default_code = ERROR_TYPES.get(status, ("invalid_request_error", None))
    info = ErrorInfo(message=message, type=error_type, param=param, code=code or default_code)
    return ErrorResponse(error=info).model_dump()


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    """First pydantic error as 'param: message' (OpenAI reports one problem at a time)."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', 'decode error')}", None
    first = max(errors, key=lambda e: len(e.get("loc", ())))  # a union's most specific failure
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and not _is_union_tag(part)]
    param = ".".join(loc) or None
    if param is None and first.get("type") == "missing":
        return "the request body is empty; send a JSON object", None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        message = "nanoserve does not support this field (see the README's list of supported fields)"
    return (f"{param}: {message}" if param else message), param


def _is_union_tag(part) -> bool:
    """pydantic names the member of a union it tried ('str', 'list[int]', 'function-after[...]')."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = _describe_validation(exc)
    if param is None and "json" not in request.headers.get("content-type", "json"):
        message = "the body must be a JSON object; send it with Content-Type: application/json"
    return error_response(400, message, param)


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 400 and "parsing the body" in detail:
        detail = "the request body is not valid UTF-8 JSON"
    return error_response(exc.status_code, detail, headers=getattr(exc, "headers", None))


async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, f"internal error: {type(exc).__name__}")


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(Exception, _on_unexpected)


def _doc(description: str) -> dict:
    return {"model": ErrorResponse, "description": description}


# For /openapi.json: the error responses every generation route can return.
ERROR_RESPONSES = {
    400: _doc("Invalid parameters, malformed JSON, or a prompt + max_tokens beyond the context"),
    401: _doc("Missing or wrong API key (when the server runs with --api-key)"),
    404: _doc("Unknown model"),
    413: _doc("Request body larger than --max-request-bytes"),
    429: _doc("Waiting queue full (--max-queue); retry after the Retry-After seconds"),
    503: _doc("Model still loading, server shutting down, or the engine loop died"),
}
