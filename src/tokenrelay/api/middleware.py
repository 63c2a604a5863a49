"""Pure ASGI middleware: nothing here buffers or compresses a response body."""

from __future__ import annotations

import asyncio
import itertools
import re
import secrets
import time

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenrelay.errors import BodyTooLarge, Forbidden, RequestTimeout, TokenRelayError

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
                tenant=state.get("tenant"),
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
    """Refuse request bodies over ``max_bytes`` (413) or slower than ``timeout`` (408) before the
    app sees them.

    The body is read here (the routes read it whole anyway) and handed on to the app; a body
    that grows past the limit is answered at once, whether it announced its Content-Length or
    came chunked, and the app never runs. The timeout bounds the whole body from the end of the
    headers: a client that trickles a byte now and then (slowloris) holds a connection for that
    long at most, and its connection is then closed.

    Args:
        app: the application.
        max_bytes: ``limits.max_body_bytes``.
        timeout: ``server.body_timeout``, seconds.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        try:
            for name, value in scope["headers"]:
                if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                    raise self._too_large()
            async with asyncio.timeout(self.timeout):
                body = await self._read_body(receive)
        except BodyTooLarge as error:
            await self._refuse(error, scope, receive, send)
            return
        except TimeoutError:
            late = RequestTimeout(f"the request body did not arrive within {self.timeout:g} s")
            # The rest of the body may still come: the connection cannot carry another request.
            await self._refuse(late, scope, receive, send, headers={"Connection": "close"})
            return
        if body is None:
            return  # the client left before sending its body
        replayed: Message | None = {"type": "http.request", "body": body}

        async def replay() -> Message:
            nonlocal replayed
            if replayed is not None:
                message, replayed = replayed, None
                return message
            return await receive()

        await self.app(scope, replay, send)

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None when the client disconnected first.

        Raises:
            BodyTooLarge: the body grew past ``max_bytes``.
        """
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self) -> BodyTooLarge:
        return BodyTooLarge(f"the request body exceeds {self.max_bytes} bytes")

    async def _refuse(
        self,
        error: TokenRelayError,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[str, str] | None = None,
    ) -> None:
        state = scope.setdefault("state", {})
        state["error_code"] = error.instance_code()
        response = problem_response(error, state.get("request_id"), headers=headers)
        await response(scope, receive, send)


_LOOPBACK_HOSTS = frozenset({b"localhost", b"127.0.0.1", b"[::1]"})


class LoopbackHostMiddleware:
    """Serve only requests addressed to a loopback name: for a gateway open without auth.

    DNS rebinding points a name a web page controls at 127.0.0.1; the browser then treats the
    gateway as that page's own origin, so neither CORS nor the WebSocket Origin check stops it.
    The ``Host`` header still names the page's domain, and that is refused here.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not _addressed_to_loopback(scope):
            error = Forbidden(
                "this gateway runs without authentication and answers only requests to "
                "localhost, 127.0.0.1 or [::1]",
                code="host_not_allowed",
            )
            if scope["type"] == "http":
                await problem_response(error)(scope, receive, send)
            else:
                await send(
                    {"type": "websocket.close", "code": 1008, "reason": error.instance_code()}
                )
            return
        await self.app(scope, receive, send)


def _addressed_to_loopback(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"host":
            host = value.rsplit(b":", 1)[0] if not value.endswith(b"]") else value
            return host.lower() in _LOOPBACK_HOSTS
    return True  # HTTP/1.0 without Host, or HTTP/2 (":authority" is not passed as a header)
