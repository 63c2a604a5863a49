"""The ASGI response that serves one subscription to a run, streamed or whole.

Two tasks per response, none per token: one serves the events, one waits for the client to go
away; whichever ends first cancels the other (the shape of Starlette's ``StreamingResponse``).
Closing the subscription when the client leaves lets the Hub cancel the upstream.

The status line waits for the run's first event. A run that fails before it starts (upstream
unreachable, rejected, timed out before answering) therefore gets a real HTTP error with
``application/problem+json``; once the stream has started, failures are terminal events.

Payload: a stream may be compressed (``encoding``, negotiated by the route), each write flushed so
every event is decodable on arrival, heartbeats included; a whole completion may be compressed
too; problem responses never are. Text deltas may be coalesced (``coalesce_window``): the held
delta's deadline bounds the wait of the one read loop, so holding costs no timer and no task.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import orjson
import structlog
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from tokenrelay.errors import (
    EndOfStream,
    InternalError,
    ServiceUnavailable,
    StoreUnavailable,
    TokenRelayError,
)
from tokenrelay.events import Event, EventType
from tokenrelay.runs.subscription import Subscription
from tokenrelay.transports import StreamRenderer
from tokenrelay.transports.coalesce import DeltaCoalescer
from tokenrelay.transports.compression import (
    StreamCompressor,
    compress_body,
    open_stream_compressor,
)
from tokenrelay.transports.openai import aggregate_completion

from .problems import problem_body, problem_headers

logger = structlog.get_logger("tokenrelay.api")

STREAM_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx and friends: do not buffer this response
}
_TOKEN_TYPES = frozenset({EventType.MESSAGE_DELTA, EventType.TOOL_CALL_DELTA})
# A whole completion smaller than this is sent as it is: compressing it saves a few dozen bytes.
_MIN_COMPRESSED_BODY = 512


class _ClientGone(Exception):
    """The client closed the connection."""


class RunResponse(Response):
    """Serves a subscription with ``renderer`` (a stream) or as one JSON completion (None).

    A ``Response`` only so that FastAPI hands it to the server as it is; it writes its own
    status line once the run's first event is known.

    Args:
        subscription: the reader of the run to serve.
        renderer: the stream's wire format; None for one whole ``chat.completion``.
        heartbeat_interval: seconds of silence before a heartbeat is written.
        send_timeout: seconds one write may block before the client is given up.
        headers: extra response headers.
        resumed: a reader resuming a run: a failure before any event is an event, not an error.
        encoding: the content coding of the body (``choose_encoding``); None: identity.
        coalesce_window: seconds text deltas may be held to be merged; 0: never.
        coalesce_max_bytes: a merged delta is sent once its text reaches this many bytes.
    """

    media_type = "text/event-stream"  # for the OpenAPI document; each response sets its own

    def __init__(
        self,
        subscription: Subscription,
        renderer: StreamRenderer | None,
        *,
        heartbeat_interval: float,
        send_timeout: float,
        headers: dict[str, str] | None = None,
        resumed: bool = False,
        encoding: str | None = None,
        coalesce_window: float = 0.0,
        coalesce_max_bytes: int = 1024,
    ) -> None:
        self.background = None
        # A new run that fails before its first event is an HTTP error; a resumed one is not:
        # its reader asked for the events, failure included.
        self._resumed = resumed
        self.status_code = 200
        self._subscription = subscription
        self._renderer = renderer
        self._heartbeat_interval = heartbeat_interval
        self._send_timeout = send_timeout
        self._extra_headers = {"X-Run-Id": subscription.run_id, **(headers or {})}
        self._encoding = encoding
        self._compressor: StreamCompressor | None = None
        self._coalesce_window = coalesce_window
        self._coalesce_max_bytes = coalesce_max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._stats: dict[str, Any] = scope.setdefault("state", {})
        self._started_at = self._stats.get("started_at", time.perf_counter())
        self._loop = asyncio.get_running_loop()
        self._sending_since: float | None = None
        self._last_write = self._loop.time()
        self._send_timed_out = False
        serve = asyncio.ensure_future(self._serve(send))
        watch = asyncio.ensure_future(_wait_for_disconnect(receive))
        self._guard = self._loop.call_later(self._send_timeout, self._check_send, serve)
        try:
            await asyncio.wait((serve, watch), return_when=asyncio.FIRST_COMPLETED)
            served = serve.done() and not self._send_timed_out
        finally:
            self._guard.cancel()
            serve.cancel()
            watch.cancel()
            await asyncio.gather(serve, watch, return_exceptions=True)
            try:
                await self._subscription.close()
            except StoreUnavailable:  # the store's outage is logged once by the store
                logger.info("reader_not_released", run_id=self._subscription.run_id)
        failure = None if serve.cancelled() else serve.exception()
        if self._send_timed_out:
            logger.warning("client_send_timeout", run_id=self._subscription.run_id)
        if not served or isinstance(failure, _ClientGone):
            self._stats["client_disconnected"] = True
            logger.info("client_disconnected", run_id=self._subscription.run_id)
        elif failure is not None:
            raise failure

    def _check_send(self, serve: asyncio.Future[None]) -> None:
        """The send timeout, one timer per response rather than one per write."""
        now = self._loop.time()
        since = self._sending_since
        if since is not None and now - since >= self._send_timeout:
            self._send_timed_out = True  # the client stopped reading: give up on it
            serve.cancel()
            return
        next_check = (since if since is not None else now) + self._send_timeout
        self._guard = self._loop.call_at(next_check, self._check_send, serve)

    async def _serve(self, send: Send) -> None:
        try:
            first = await self._subscription.next_batch(None)
        except EndOfStream:
            first = ()  # resumed after the run's end: a complete, empty stream
        except TokenRelayError as exc:  # the run expired, or the cursor is before its window
            await self._send_problem(send, exc)
            return
        if not self._resumed and first[0].is_terminal:
            await self._send_problem(send, self._failure_of(first[0]))
            return
        if self._renderer is None:
            await self._serve_whole(send, first)
        else:
            await self._serve_stream(send, first, self._renderer)

    async def _serve_stream(
        self, send: Send, batch: Sequence[Event], renderer: StreamRenderer
    ) -> None:
        headers = {"Content-Type": renderer.media_type, **STREAM_HEADERS, **self._extra_headers}
        if self._encoding is not None:
            self._compressor = open_stream_compressor(self._encoding)
            headers["Content-Encoding"] = self._encoding
            headers["Vary"] = "Accept-Encoding"
        coalescer = None
        if self._coalesce_window > 0:
            coalescer = DeltaCoalescer(self._coalesce_window, self._coalesce_max_bytes)
        await self._send(
            {"type": "http.response.start", "status": 200, "headers": _raw(headers)}, send
        )
        try:
            while batch:
                events = batch if coalescer is None else coalescer.push(batch, self._loop.time())
                if "ttft_ms" not in self._stats:
                    self._note_first_token(events)
                body = renderer.render(events)
                if not body and self._loop.time() - self._last_write >= self._heartbeat_interval:
                    body = renderer.heartbeat  # events this format omits are no keep-alive
                if body:
                    if self._compressor is not None:
                        body = self._compressor.compress(body)
                    await self._send(
                        {"type": "http.response.body", "body": body, "more_body": True}, send
                    )
                if batch[-1].is_terminal:
                    if batch[-1].type is EventType.RUN_FAILED:
                        self._stats["error_code"] = batch[-1].data["code"]
                    break
                batch = await self._subscription.next_batch(self._read_timeout(coalescer))
                while not batch:
                    if coalescer is None:  # the run is quiet: keep idle proxies from closing
                        await self._write(renderer.heartbeat, send)
                    else:
                        await self._after_quiet(coalescer, renderer, send)
                    batch = await self._subscription.next_batch(self._read_timeout(coalescer))
        except EndOfStream:
            pass
        except StoreUnavailable as exc:
            # The run's events cannot be read any more, and whether it goes on is unknown: end
            # the stream as a failed run, so every client sees a terminal event, not a hang.
            self._stats["error_code"] = exc.instance_code()
            failed = Event(self._subscription.cursor + 1, EventType.RUN_FAILED, exc.to_failure())
            held = coalescer.flush() if coalescer is not None else []
            await self._write(renderer.render((*held, failed)), send)
        except TokenRelayError as exc:  # this reader fell behind the kept window
            self._stats["error_code"] = exc.instance_code()
            held = coalescer.flush() if coalescer is not None else []
            await self._write(renderer.render(held) + renderer.render_error(exc), send)
        end = self._compressor.finish() if self._compressor is not None else b""
        await self._send({"type": "http.response.body", "body": end, "more_body": False}, send)

    def _read_timeout(self, coalescer: DeltaCoalescer | None) -> float:
        """How long to wait for events: a held delta's deadline shortens the heartbeat's wait."""
        if coalescer is None or coalescer.deadline is None:
            return self._heartbeat_interval
        return min(self._heartbeat_interval, max(0.0, coalescer.deadline - self._loop.time()))

    async def _after_quiet(
        self, coalescer: DeltaCoalescer, renderer: StreamRenderer, send: Send
    ) -> None:
        """A read timed out. With nothing held it waited a whole heartbeat interval: send one.
        With a delta held, send it once its window has passed."""
        if coalescer.deadline is None:
            # Not "now - last write >= interval": the loop's clock may make a timeout look a
            # hair short, and that heartbeat would come an interval late.
            await self._write(renderer.heartbeat, send)
            return
        now = self._loop.time()
        held = coalescer.push((), now)
        if held:
            await self._write(renderer.render(held), send)
        elif now - self._last_write >= self._heartbeat_interval:  # a window longer than that
            await self._write(renderer.heartbeat, send)

    async def _write(self, body: bytes, send: Send) -> None:
        """One piece of a stream's body, compressed and flushed when the response is encoded.

        Not on the per-event path, which does the same inline: one coroutine less per event.
        """
        if self._compressor is not None:
            body = self._compressor.compress(body)
        await self._send({"type": "http.response.body", "body": body, "more_body": True}, send)

    async def _serve_whole(self, send: Send, batch: Sequence[Event]) -> None:
        events = list(batch)
        while not events[-1].is_terminal:
            events.extend(await self._subscription.next_batch(None))
        self._note_first_token(events)
        if events[-1].type is not EventType.RUN_COMPLETED:
            await self._send_problem(send, self._failure_of(events[-1]))
            return
        body = orjson.dumps(aggregate_completion(events))
        headers = {"Content-Type": "application/json", **self._extra_headers}
        if self._encoding is not None and len(body) >= _MIN_COMPRESSED_BODY:
            body = compress_body(body, self._encoding)
            headers["Content-Encoding"] = self._encoding
            headers["Vary"] = "Accept-Encoding"
        await self._send(
            {"type": "http.response.start", "status": 200, "headers": _raw(headers)}, send
        )
        await self._send({"type": "http.response.body", "body": body}, send)

    def _failure_of(self, terminal: Event) -> TokenRelayError:
        if terminal.type is EventType.RUN_CANCELLED:
            return ServiceUnavailable(
                f"the run was cancelled ({terminal.data['reason']})", code="cancelled"
            )
        run = self._subscription.run
        failure = run.failure if run is not None else None
        return failure or InternalError(terminal.data.get("message", ""))

    async def _send_problem(self, send: Send, error: TokenRelayError) -> None:
        body = orjson.dumps(problem_body(error, self._stats.get("request_id")))
        headers = {**problem_headers(error), **self._extra_headers}
        self._stats["error_code"] = error.instance_code()
        start = {
            "type": "http.response.start",
            "status": error.instance_status(),
            "headers": _raw(headers),
        }
        await self._send(start, send)
        await self._send({"type": "http.response.body", "body": body}, send)

    async def _send(self, message: Message, send: Send) -> None:
        # _check_send watches this: a client that stops reading must not hold the run forever.
        self._sending_since = self._loop.time()
        try:
            await send(message)
        except OSError as exc:
            raise _ClientGone from exc
        self._last_write, self._sending_since = self._sending_since, None

    def _note_first_token(self, batch: Sequence[Event]) -> None:
        if any(event.type in _TOKEN_TYPES for event in batch):
            self._stats["ttft_ms"] = round((time.perf_counter() - self._started_at) * 1000, 2)


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _raw(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
