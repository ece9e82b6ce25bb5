"""Pure ASGI middleware that answers before any route runs: API key (401), body size (413).

Pure ASGI (not BaseHTTPMiddleware) so that streaming responses and disconnect detection pass
through untouched.
"""
from __future__ import annotations

import hmac

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import error_response


class ApiKeyMiddleware:
    """Requires `Authorization: Bearer <key>` on every /v1/* route."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                response = error_response(401, "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
                                          headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for bodies over `max_bytes`: by Content-Length up front, or while reading a chunked one."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit():
            await error_response(400, "invalid Content-Length header")(scope, receive, send)
            return
        if int(length) > self.max_bytes:
            response = error_response(413, f"Request body too large: the limit is {self.max_bytes} bytes.")
            await response(scope, receive, send)
            return
        await self.app(scope, self._counting(receive), send)

    def _counting(self, receive: Receive) -> Receive:
        received = 0

        async def wrapped() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # FastAPI re-raises HTTPException from body reading
                raise HTTPException(413, f"Request body too large: the limit is {self.max_bytes} bytes.")
            return message

        return wrapped
