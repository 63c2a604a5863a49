"""uvicorn's HTTP/1.1 protocol with the bounds on a request's head that uvicorn lacks.

uvicorn has no timeout on a request's line and headers, and httptools buffers headers without
limit: a client trickling bytes (slowloris) or sending endless headers would hold a connection
and its memory for ever. ``server.py`` serves uvicorn with the protocol class made here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar

import orjson
import structlog
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tokenrelay.api.problems import problem_body, problem_headers
from tokenrelay.config import ServerSettings
from tokenrelay.errors import HeadersTooLarge, RequestError, RequestTimeout

logger = structlog.get_logger("tokenrelay.server")


@dataclass(frozen=True, slots=True)
class RequestHeadLimits:
    """What ``_LimitedHttpToolsProtocol`` allows a client."""

    max_header_bytes: int
    header_timeout: float
    body_timeout: float
    keepalive_timeout: float


def limited_http_protocol(settings: ServerSettings) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol bounded by ``settings``, as ``uvicorn.Config(http=...)``."""

    class Protocol(_LimitedHttpToolsProtocol):
        limits = RequestHeadLimits(
            max_header_bytes=settings.max_header_bytes,
            header_timeout=settings.header_timeout,
            body_timeout=settings.body_timeout,
            keepalive_timeout=settings.keepalive_timeout,
        )

    return Protocol


class _LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol (httptools) with the bounds on a request's head it lacks.

    uvicorn times a connection out only while it waits for the next request after a response
    (``timeout_keep_alive``, disarmed by any byte that arrives), and httptools buffers a
    request's line and headers without a limit. A client that opens a connection and sends a
    header byte now and then (slowloris) would hold it for ever; one that sends megabytes of
    headers would have them buffered. Here:

    - a request's line and headers must arrive within ``header_timeout`` of the connection's
      start or of the request's first byte: else 408, or a plain close when nothing came;
    - they take at most ``max_header_bytes``, counted as they arrive: else 431;
    - the rest of a body that the app answered without reading it (a 413) must arrive within
      ``body_timeout``, then the connection is idle for ``keepalive_timeout`` at most, as after
      any response: else it is closed.

    A refusal closes the connection: what follows the head on the wire cannot be trusted.
    A body sent slowly to the app is the app's to time out (``body_timeout``).
    """

    limits: ClassVar[RequestHeadLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Bytes received of the next request's head; None while a request's body is read.
        self._head_bytes: int | None = 0
        self._deadline: asyncio.TimerHandle | None = None
        self._timing_head = False  # whether the deadline is the header timeout
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._set_deadline(self.limits.header_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._clear_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # the answer is out and the connection closing
        if self._head_bytes is not None:
            # Counted before parsing: httptools holds an unfinished header value in memory. (Bytes
            # after a request's end in the same read are not counted: at most one read more.)
            self._head_bytes += len(data)
            if not self._timing_head:  # no deadline yet, or the idle one
                self._set_deadline(self.limits.header_timeout, self._head_timed_out)
        elif self._deadline is None and self._answered():
            self._set_deadline(self.limits.body_timeout, self._close)
        super().data_received(data)
        too_large = self._head_bytes is not None and self._head_bytes > self.limits.max_header_bytes
        if too_large and not self._refused:
            self._refuse(HeadersTooLarge(self._too_large_detail()))

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._clear_deadline()
        self._head_bytes = None
        if _head_size(self.url, self.headers) > self.limits.max_header_bytes:
            self._refuse(HeadersTooLarge(self._too_large_detail()))
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        super().on_message_complete()
        self._clear_deadline()
        self._head_bytes = 0
        if self._answered():
            # uvicorn's idle timer, armed when the answer went out, was disarmed by the body.
            self._set_deadline(self.limits.keepalive_timeout, self._close)

    def handle_websocket_upgrade(self) -> None:
        if not self._refused:
            super().handle_websocket_upgrade()

    def _answered(self) -> bool:
        """The current request has had its whole response."""
        return self.cycle is not None and self.cycle.response_complete

    def _set_deadline(self, seconds: float, expire: Callable[[], None]) -> None:
        self._clear_deadline()
        self._deadline = self.loop.call_later(seconds, expire)
        self._timing_head = expire == self._head_timed_out

    def _clear_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
            self._timing_head = False

    def _close(self) -> None:
        self._clear_deadline()
        self.transport.close()

    def _head_timed_out(self) -> None:
        self._clear_deadline()
        if self.transport.is_closing():
            return
        if not self._head_bytes:  # a connection that never sent a byte is not owed an answer
            self.transport.close()
            return
        seconds = f"{self.limits.header_timeout:g}"
        self._refuse(RequestTimeout(f"the request's line and headers took over {seconds} s"))

    def _too_large_detail(self) -> str:
        return f"the request's line and headers exceed {self.limits.max_header_bytes} bytes"

    def _refuse(self, error: RequestError) -> None:
        """Answer ``error`` and close; answered out of turn, the response in progress would be
        cut, so then only close."""
        self._refused = True
        self._clear_deadline()
        logger.info(
            "request_refused", status=error.instance_status(), error_code=error.instance_code()
        )
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(_problem_message(error, self.server_state.default_headers))
        self.transport.close()


def _head_size(url: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    """About the bytes of a request's line and headers (the method and CRLFs aside)."""
    return len(url) + sum(len(name) + len(value) + 4 for name, value in headers)


def _problem_message(error: RequestError, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A whole HTTP/1.1 problem+json response that closes the connection."""
    body = orjson.dumps(problem_body(error))
    headers = [
        *default_headers,
        *(
            (name.lower().encode(), value.encode())
            for name, value in problem_headers(error).items()
        ),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    status = error.instance_status()
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode()]
    head.extend(name + b": " + value + b"\r\n" for name, value in headers)
    return b"".join([*head, b"\r\n", body])
