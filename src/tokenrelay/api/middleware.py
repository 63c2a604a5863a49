"""Pure ASGI middleware: nothing here buffers or compresses a response body."""

from __future__ import annotations

import itertools
import re
import secrets
import time

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenrelay.errors import BodyTooLarge

from .problems import problem_response

logger = structlog.get_logger("tokenrelay.access")

_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestContextMiddleware:
    """A request id on every request and response, and one log line per request at its end."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # Generated ids: a random per-process prefix and a counter, unique without a system
        # call per request.
        self._id_prefix = secrets.token_hex(4)
        self._ids = itertools.count(1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _client_request_id(scope) or f"{self._id_prefix}{next(self._ids):08x}"
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["started_at"] = started = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", ()),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            logger.info(
                "request",
                method=scope["method"],
                path=scope["path"],
                status=status,
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
                ttft_ms=state.get("ttft_ms"),
                error_code=state.get("error_code"),
                client_disconnected=state.get("client_disconnected", False),
            )
            structlog.contextvars.unbind_contextvars("request_id")


def _client_request_id(scope: Scope) -> str | None:
    """The client's ``X-Request-ID`` when it is safe to log and echo."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            candidate: str = value.decode("latin-1")
            if _SAFE_REQUEST_ID.match(candidate):
                return candidate
    return None


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413 before the app sees them.

    The body is read here (the routes read it whole anyway) and handed on to the app; a body
    that grows past the limit is answered at once, whether it announced its Content-Length or
    came chunked, and the app never runs.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: Message | None = {"type": "http.request", "body": b"".join(chunks)}

        async def replay() -> Message:
            nonlocal body
            if body is not None:
                message, body = body, None
                return message
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = BodyTooLarge(f"the request body exceeds {self.max_bytes} bytes")
        state = scope.setdefault("state", {})
        state["error_code"] = error.instance_code()
        await problem_response(error, state.get("request_id"))(scope, receive, send)
