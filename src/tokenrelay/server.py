"""Serving the gateway's ASGI app: which server, which protocols, and the drain on SIGTERM.

Cleartext HTTP/1.1 (the default) is served by uvicorn with uvloop and httptools: the lowest
first-token latency measured for this app. HTTP/2 is opt-in and served by granian (Rust, hyper),
which answers HTTP/1.1 on the same port as well:

- ``server.http2``: h2c with prior knowledge next to HTTP/1.1 on the cleartext port;
- ``server.tls_certfile`` / ``tls_keyfile``: TLS, with h2 and http/1.1 offered by ALPN.

The figures behind the split are in ``benchmarks/analysis.md``.

Slow and oversized request heads are bounded by both servers (see ``uvicorn_protocol.py``
for uvicorn; granian by hyper's own settings): a request's line and headers must arrive within
``server.header_timeout`` and take at most ``server.max_header_bytes``; an idle keep-alive
connection is closed after ``server.keepalive_timeout`` (granian: ``header_timeout``, it has no
separate idle timeout; and it holds a connection that never sends a byte, waiting to tell
HTTP/1.1 from h2c). The body's deadline, ``server.body_timeout``, is the app's
(``api/middleware.py``), so it holds with either server.

With either server the shutdown is an input: the first SIGTERM or SIGINT sets the app's
``shutdown`` event (readiness fails, no run starts, open runs get ``server.drain_grace`` seconds,
then end with ``run.cancelled``); the server stops once the drain has ended what was in flight
(uvicorn stops accepting at once, granian when nothing is left in flight: see ``_InFlight``),
at the latest ``drain_grace + 5`` seconds after the signal; the lifespan shuts down last. A
second signal quits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import socket
from types import FrameType
from typing import Any

import structlog
import uvicorn
import uvloop
from granian.constants import HTTPModes, Interfaces, SSLProtocols
from granian.http import HTTP1Settings, HTTP2Settings
from granian.log import LogLevels
from granian.server.embed import Server as GranianServer

from tokenrelay.config import ServerSettings
from tokenrelay.uvicorn_protocol import limited_http_protocol

logger = structlog.get_logger("tokenrelay.server")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# Granian's defaults cap a worker at `backlog` concurrent requests (128 when embedded), which
# queued most of 1,000 open streams: admission is the gateway's job, as with uvicorn.
_BACKLOG = 2048
_MAX_CONCURRENT_REQUESTS = 65_536

# Granian waits for every HTTP/2 connection to finish its graceful GOAWAY, which needs the
# client to answer a PING. An idle connection whose client does not read its socket (httpx's
# pool, so the OpenAI SDK) never answers, and the shutdown would hang on it. Keep-alive pings
# bound that: a connection whose client has not answered a PING for `server.send_timeout`
# seconds is closed, the same deadline a stream gets for a client that stops reading.
_HTTP2_PING_INTERVAL_MS = 5_000

# hyper refuses a smaller HTTP/1.1 read buffer.
_HYPER_MIN_BUFFER = 8192

# Once nothing is in flight, time for the last frames to reach the clients before the GOAWAY.
_LAST_FRAMES_DELAY = 0.5


def uses_http2(settings: ServerSettings) -> bool:
    """Whether HTTP/2 is served (and so granian rather than uvicorn)."""
    return settings.http2 or settings.tls_certfile is not None


def base_url(settings: ServerSettings) -> str:
    """Where the gateway answers, as in its start-up line."""
    scheme = "https" if settings.tls_certfile is not None else "http"
    return f"{scheme}://{settings.host}:{settings.port}"


def run_server(
    app: Any,
    settings: ServerSettings,
    shutdown: asyncio.Event,
    *,
    websocket_max_bytes: int = 16 * 1024 * 1024,
) -> None:
    """Serve ``app`` until SIGTERM/SIGINT, draining through ``shutdown`` first.

    Args:
        app: the ASGI application (``create_app(settings, shutdown)``).
        settings: the ``server`` section: address, protocols, TLS, log level, drain grace.
        shutdown: the event the app drains on; set on the first signal.
        websocket_max_bytes: ``websocket.max_message_bytes``: uvicorn refuses larger messages
            (close 1009) before it has buffered them whole.

    Raises:
        OSError: the TLS certificate or key cannot be loaded (``ssl.SSLError`` included), or
            granian cannot bind the address.
    """
    if uses_http2(settings):
        in_flight = _InFlight(app)
        server = _granian_server(in_flight, settings)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            try:
                runner.run(_serve_granian(server, in_flight, shutdown, _stop_deadline(settings)))
            except RuntimeError as exc:  # granian's Rust side reports a failed bind this way
                if "(os error" in str(exc):
                    raise OSError(str(exc).splitlines()[0]) from exc  # without its backtrace
                raise
    else:
        websockets = _InFlight(app, kinds=("websocket",))
        config = _uvicorn_config(websockets, settings, websocket_max_bytes)
        _DrainingUvicorn(config, shutdown, websockets, _stop_deadline(settings)).run()


def _stop_deadline(settings: ServerSettings) -> int:
    """Seconds after the signal at which connections still open are closed anyway.

    Runs are cancelled (with a terminal event) at drain_grace; this only backs that up.
    """
    return int(settings.drain_grace) + 5


def _uvicorn_config(app: Any, settings: ServerSettings, websocket_max_bytes: int) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=limited_http_protocol(settings),
        timeout_keep_alive=math.ceil(settings.keepalive_timeout),
        ws_max_size=websocket_max_bytes,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=_stop_deadline(settings),
    )


class _DrainingUvicorn(uvicorn.Server):
    """Hands SIGTERM/SIGINT to the app as its shutdown input, then lets uvicorn stop as usual.

    uvicorn lets HTTP responses finish when it stops but closes WebSockets at once (1012), so
    it is told to stop only when the drain has ended the WebSocket sessions too.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        shutdown: asyncio.Event,
        websockets: _InFlight,
        deadline: float,
    ) -> None:
        super().__init__(config)
        self._shutdown = shutdown
        self._websockets = websockets
        self._deadline = deadline
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: set[asyncio.Task[None]] = set()

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None or self._shutdown.is_set():
            super().handle_exit(sig, frame)  # a second signal: stop (Ctrl-C twice: at once)
            return
        self._loop.call_soon_threadsafe(self._begin_drain, sig, frame)

    def _begin_drain(self, sig: int, frame: FrameType | None) -> None:
        self._shutdown.set()
        task = asyncio.get_running_loop().create_task(self._exit_when_websockets_end(sig, frame))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _exit_when_websockets_end(self, sig: int, frame: FrameType | None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._websockets.idle.wait(), self._deadline)
        super().handle_exit(sig, frame)


def _granian_server(app: Any, settings: ServerSettings) -> GranianServer:
    tls: dict[str, Any] = {}
    if settings.tls_certfile is not None:
        tls = {
            "ssl_cert": settings.tls_certfile,
            "ssl_key": settings.tls_keyfile,
            "ssl_protocol_min": SSLProtocols.tls12,
        }
    return GranianServer(
        app,
        address=settings.host,
        port=settings.port,
        interface=Interfaces.ASGI,  # with the lifespan: startup before the first request
        http=HTTPModes.auto,  # HTTP/1.1 and h2c by the connection preface; h2 by ALPN with TLS
        backlog=_BACKLOG,
        backpressure=_MAX_CONCURRENT_REQUESTS,
        http1_settings=HTTP1Settings(
            # hyper closes a connection whose head is late, also an idle keep-alive one.
            header_read_timeout=math.ceil(settings.header_timeout * 1000),
            # hyper's read buffer, which must hold a request's head: larger heads get 431. It
            # cannot be under 8 KiB.
            max_buffer_size=max(settings.max_header_bytes, _HYPER_MIN_BUFFER),
        ),
        http2_settings=HTTP2Settings(
            keep_alive_interval=_HTTP2_PING_INTERVAL_MS,
            keep_alive_timeout=math.ceil(settings.send_timeout),
            max_headers_size=settings.max_header_bytes,
        ),
        log_level=LogLevels(settings.log_level),
        log_dictconfig=_granian_logging(),
        log_access=False,  # our own request line replaces an access log
        **tls,
    )


def _granian_logging() -> dict[str, Any]:
    """Granian's loggers propagate to the root handler (our JSON or console lines) instead of
    getting stdout handlers of their own; incremental, so no handler of ours is replaced."""
    return {
        "version": 1,
        "incremental": True,
        "formatters": {},
        "handlers": {},
        "loggers": {"_granian": {"propagate": True}, "granian.access": {"propagate": True}},
    }


class _InFlight:
    """Counts the HTTP requests and WebSocket sessions in progress, so that granian is stopped
    only once the drain has ended them.

    Stopping granian sends GOAWAY on every HTTP/2 connection and drops WebSockets at once, and
    the h2 stack of httpx (so the OpenAI SDK) then fails the streams still open on it, where
    the drain promises them their last ``run.cancelled``. Stopping when nothing is in flight
    keeps that promise. A counter per request: nothing is wrapped on the per-chunk path.
    """

    def __init__(self, app: Any, kinds: tuple[str, ...] = ("http", "websocket")) -> None:
        self._app = app
        self._kinds = kinds
        self._count = 0
        self.idle = asyncio.Event()
        self.idle.set()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in self._kinds:
            await self._app(scope, receive, send)
            return
        self._count += 1
        self.idle.clear()
        try:
            await self._app(scope, receive, send)
        finally:
            self._count -= 1
            if not self._count:
                self.idle.set()


async def _serve_granian(
    server: GranianServer, in_flight: _InFlight, shutdown: asyncio.Event, deadline: float
) -> None:
    loop = asyncio.get_running_loop()
    stopping: set[asyncio.Task[None]] = set()

    async def stop_when_drained() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(in_flight.idle.wait(), deadline)
            # The last frames leave through granian after the app returned: a GOAWAY read in the
            # same chunk as a stream's end fails that stream in httpx's h2 stack as well.
            await asyncio.sleep(_LAST_FRAMES_DELAY)
        server.stop()  # type: ignore[no-untyped-call]  # granian leaves it unannotated

    def drain() -> None:
        for sig in _SIGNALS:
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_DFL)  # a second signal ends the process at once
        shutdown.set()
        stopping.add(loop.create_task(stop_when_drained()))

    for sig in _SIGNALS:
        loop.add_signal_handler(sig, drain)
    await server.serve()
    await asyncio.gather(*stopping)
