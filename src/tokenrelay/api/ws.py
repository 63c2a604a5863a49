"""``/v1/ws``: several runs over one WebSocket connection (protocol: docs/websocket.md).

The handshake is refused (HTTP 403, or 401 with a ``WWW-Authenticate`` challenge when the server
can send a denial response) for a browser ``Origin`` that is neither the gateway's own nor in
``websocket.allowed_origins``, and for credentials in the headers that do not authenticate.
A handshake without credentials, when authentication is on, is accepted and must send
``{"type": "auth", "token": …}`` first, within ``websocket.auth_timeout``; else the connection
is closed with 1008 and the error's code as the reason. Every run the connection starts, follows
or cancels belongs to the authenticated tenant.

The connection handler owns every task it starts: one reader (client messages, handled in
order), one writer draining a bounded send queue, and one pump per subscribed run copying the
run's events from its subscription into the queue. Whatever ends the connection, every task is
cancelled and awaited and every subscription closed, so a client that vanishes releases its
runs exactly like an HTTP client that disconnects.

Backpressure reaches the pumps, not memory: a pump waits while the queue is full, the run's
events wait in the StreamLog. A client that stops reading is closed with 1013 once a frame has
waited ``send_timeout`` for room in the queue or for the socket (the ``close`` overflow policy).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog
from fastapi import APIRouter, WebSocket
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect

from tokenrelay.errors import (
    EndOfStream,
    Forbidden,
    InternalError,
    RequestError,
    StoreUnavailable,
    TokenRelayError,
    Unauthenticated,
    ValidationFailed,
)
from tokenrelay.events import Event, EventType
from tokenrelay.guards import Principal
from tokenrelay.runs.subscription import Subscription
from tokenrelay.services import Services
from tokenrelay.transports.websocket import (
    Auth,
    CloseCode,
    Ref,
    RunCancel,
    RunCreate,
    RunSubscribe,
    RunUnsubscribe,
    decode_frame,
    echo_fields,
    encode_error,
    encode_event,
    encode_reply,
    origin_allowed,
    parse_auth,
    parse_message,
    validation_failed,
)

from .launch import launch_run
from .problems import problem_response
from .schemas import RunRequest, check_limits

logger = structlog.get_logger("tokenrelay.api")

router = APIRouter(tags=["websocket"])


# Codes of this transport only; the rest of the tree is in errors.py.
class TooManyRuns(RequestError):
    code = "too_many_runs"
    status = 429
    retryable = True
    title = "Too many runs on this connection"


class AlreadySubscribed(RequestError):
    code = "already_subscribed"
    status = 409
    title = "Already subscribed to this run"


class AlreadyAuthenticated(RequestError):
    code = "already_authenticated"
    status = 409
    title = "The connection is authenticated already"


@router.websocket("/ws")
async def websocket_runs(websocket: WebSocket) -> None:
    services: Services = websocket.state.services
    # Nothing is read from the URL's query, where a client may have put a token: dropped from
    # the scope (which the server shares), it is not in the server's handshake log line either.
    websocket.scope["query_string"] = b""
    origin = websocket.headers.get("origin")
    allowed = services.settings.websocket.allowed_origins
    if origin is not None and not origin_allowed(
        origin, websocket.headers.get("host"), websocket.url.scheme, allowed
    ):
        logger.info("websocket_refused", code="origin_not_allowed", origin=origin[:256])
        error = Forbidden("this Origin may not connect", code="origin_not_allowed")
        await _refuse_handshake(websocket, error)
        return
    principal: Principal | None = None
    try:
        principal = await services.authenticator.authenticate(websocket.headers)
    except Unauthenticated as exc:
        if exc.instance_code() != "missing_credentials":
            await _refuse_handshake(websocket, exc)
            return
        # No credentials in the headers: the first message must carry them.
    except TokenRelayError as exc:  # Forbidden (a scope), StoreUnavailable
        await _refuse_handshake(websocket, exc)
        return
    await websocket.accept()
    await Connection(websocket, services, principal).serve()


async def _refuse_handshake(websocket: WebSocket, error: TokenRelayError) -> None:
    """Answer the upgrade request with the error's problem+json when the server can (the ASGI
    denial response extension: uvicorn), else with the server's 403."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(problem_response(error))
    else:
        await websocket.close(CloseCode.POLICY_VIOLATION, error.instance_code())


_WORTH_A_WARNING = frozenset({CloseCode.TRY_AGAIN_LATER, CloseCode.INTERNAL_ERROR})


class _Closing(Exception):
    """The connection is closing: a producer stops instead of queueing more."""


class _Pump:
    __slots__ = ("subscription", "task")

    def __init__(self, subscription: Subscription, task: asyncio.Task[None]) -> None:
        self.subscription = subscription
        self.task = task


class Connection:
    """One client connection: its reader, writer, pumps and limits."""

    def __init__(
        self, websocket: WebSocket, services: Services, principal: Principal | None
    ) -> None:
        self._websocket = websocket
        self._services = services
        self._principal = principal  # None until the first message authenticates
        self._limits = services.settings.websocket
        self._send_timeout = self._limits.send_timeout
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[str] = asyncio.Queue(self._limits.send_queue_size)
        self._streams: dict[str, _Pump] = {}  # the runs streaming to this client, by id
        self._pumps: set[_Pump] = set()  # every pump not yet finished, owned here
        # The first decision to close wins: (code, reason), or None when the client has gone.
        self._closing: asyncio.Future[tuple[CloseCode, str] | None] = self._loop.create_future()
        self._sending_since: float | None = None
        self._guard: asyncio.TimerHandle | None = None
        self._last_activity = self._loop.time()
        self._runs_served = 0

    async def serve(self) -> None:
        """Serve the connection until the client leaves or a limit closes it."""
        started = time.perf_counter()
        reader = asyncio.create_task(self._read(), name="websocket reader")
        writer = asyncio.create_task(self._write(), name="websocket writer")
        drained = asyncio.create_task(self._close_when_drained(), name="websocket drain")
        self._guard = self._loop.call_later(self._send_timeout, self._check_send)
        try:
            await asyncio.wait((reader, writer, self._closing), return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._guard.cancel()
            pumps = list(self._pumps)
            tasks = [reader, writer, drained, *(pump.task for pump in pumps)]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for pump in pumps:  # a pump cancelled before its first step never closed its own
                await pump.subscription.close()
        for task in (reader, writer):
            failure = None if task.cancelled() else task.exception()
            if failure is not None:
                logger.error("websocket_failed", exc_info=failure)
                self._close(CloseCode.INTERNAL_ERROR, "internal error")
        close = self._closing.result() if self._closing.done() else None
        if close is not None:
            await self._send_close(*close)
        # A slow client or a bug is worth a warning; an idle or departed client is not.
        warn = close is not None and close[0] in _WORTH_A_WARNING
        (logger.warning if warn else logger.info)(
            "websocket_closed",
            code=None if close is None else int(close[0]),
            reason="client closed" if close is None else close[1],
            tenant=None if self._principal is None else self._principal.tenant,
            runs=self._runs_served,
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
        )

    async def _close_when_drained(self) -> None:
        """On shutdown, once the drain has ended this client's runs and their last frames are
        out, close with 1012 so the client knows to reconnect elsewhere."""
        await self._services.hub.drained.wait()
        while self._pumps or not self._queue.empty():  # noqa: ASYNC110 (once, at shutdown)
            await asyncio.sleep(0.05)  # a slow client is cut by the send timeout guard
        await asyncio.sleep(0.05)  # the last frame's write has been handed to the server
        self._close(CloseCode.SERVICE_RESTART, "the gateway is restarting")

    def _close(self, code: CloseCode | None, reason: str = "") -> None:
        if not self._closing.done():
            self._closing.set_result(None if code is None else (code, reason))

    async def _send_close(self, code: CloseCode, reason: str) -> None:
        # Bounded too: a client that stopped reading gets the frame only if it reads again soon.
        try:
            async with asyncio.timeout(self._send_timeout):
                await self._websocket.close(code, reason)
        except (TimeoutError, OSError, RuntimeError, WebSocketDisconnect):
            pass

    # The writer and its send timeout.

    async def _write(self) -> None:
        queue, send = self._queue, self._websocket.send
        while True:
            frame = await queue.get()
            self._sending_since = self._loop.time()
            try:
                await send({"type": "websocket.send", "text": frame})
            except (OSError, WebSocketDisconnect):
                self._close(None)
                return
            self._sending_since = None

    def _check_send(self) -> None:
        """The send timeout: one timer per connection rather than one per frame."""
        now = self._loop.time()
        since = self._sending_since
        if since is not None and now - since >= self._send_timeout:
            self._close(CloseCode.TRY_AGAIN_LATER, "slow client: a send timed out")
            return
        next_check = (since if since is not None else now) + self._send_timeout
        self._guard = self._loop.call_at(next_check, self._check_send)

    async def _enqueue(self, frame: str) -> None:
        try:
            self._queue.put_nowait(frame)
        except asyncio.QueueFull:
            await self._wait_for_room(frame)

    async def _wait_for_room(self, frame: str) -> None:
        """The ``close`` overflow policy: wait up to send_timeout, then give up on the client."""
        try:
            async with asyncio.timeout(self._send_timeout):
                await self._queue.put(frame)
        except TimeoutError:
            self._close(CloseCode.TRY_AGAIN_LATER, "slow client: the send queue stayed full")
            raise _Closing from None

    # The reader.

    async def _read(self) -> None:
        try:
            if self._principal is None and not await self._authenticate():
                return
            while (text := await self._receive()) is not None:
                await self._handle(text)
        except _Closing:
            pass

    async def _authenticate(self) -> bool:
        """The first message, due within ``auth_timeout``, must be a valid ``auth``; else the
        connection is closed: 1008 with the error's code as the reason."""
        try:
            async with asyncio.timeout(self._limits.auth_timeout):
                text = await self._receive()
        except TimeoutError:
            self._close(CloseCode.POLICY_VIOLATION, "missing_credentials")
            return False
        if text is None:
            return False  # closed already: gone, too big, binary
        ref: Ref | None = None
        try:
            ref, token = parse_auth(text)
            self._principal = await self._services.authenticator.authenticate_token(token)
        except (Unauthenticated, Forbidden) as exc:
            self._close(CloseCode.POLICY_VIOLATION, exc.instance_code())
            return False
        except TokenRelayError as exc:  # the key store is unavailable: nothing was decided
            self._close(CloseCode.TRY_AGAIN_LATER, exc.instance_code())
            return False
        await self._enqueue(encode_reply("auth.ok", ref))
        return True

    async def _receive(self) -> str | None:
        """The next text message, or None once the connection is to end (the reason is set)."""
        idle_timeout = self._limits.idle_timeout
        while True:
            idle_for = self._loop.time() - self._last_activity
            if not self._streams and idle_for >= idle_timeout:
                self._close(CloseCode.GOING_AWAY, "idle")
                return None
            # While runs stream the connection is not idle: look again a timeout later.
            wait = idle_timeout if self._streams else idle_timeout - idle_for
            try:
                async with asyncio.timeout(wait):
                    message = await self._websocket.receive()
            except TimeoutError:
                continue
            self._last_activity = self._loop.time()
            if message["type"] == "websocket.disconnect":
                self._close(None)
                return None
            text: str | None = message.get("text")
            if text is None:
                self._close(CloseCode.UNSUPPORTED_DATA, "binary frames are not supported")
                return None
            if len(text.encode()) > self._limits.max_message_bytes:
                limit = self._limits.max_message_bytes
                self._close(CloseCode.MESSAGE_TOO_BIG, f"messages are limited to {limit} bytes")
                return None
            return text

    async def _handle(self, text: str) -> None:
        """Handle one client message; a refused one gets an ``error`` frame, nothing closes."""
        ref: Ref | None = None
        run_id: str | None = None
        try:
            raw = decode_frame(text)
            ref, run_id = echo_fields(raw)
            message = parse_message(raw)
            if isinstance(message, RunCreate):
                await self._create(message)
            elif isinstance(message, RunSubscribe):
                await self._subscribe(message)
            elif isinstance(message, RunCancel):
                hub = self._services.hub
                info = await hub.cancel(message.run_id, tenant=self._tenant)
                await self._enqueue(
                    encode_reply("run.cancel.accepted", ref, run_id=info.id, status=info.status)
                )
            elif isinstance(message, RunUnsubscribe):
                await self._unsubscribe(message)
            elif isinstance(message, Auth):
                if self._services.authenticator.enabled:
                    raise AlreadyAuthenticated("the connection's credentials cannot change")
                await self._enqueue(encode_reply("auth.ok", ref))  # open: any token will do
            else:
                await self._enqueue(encode_reply("pong", ref))
        except TokenRelayError as exc:  # the one place a refused message becomes a frame
            await self._enqueue(encode_error(exc, ref=ref, run_id=run_id))

    async def _create(self, message: RunCreate) -> None:
        """``run.create``: validated exactly like ``POST /v1/runs``, then started and streamed."""
        try:
            completion = RunRequest.model_validate(message.request)
            check_limits(completion, self._services.settings.limits)
        except ValidationError as exc:
            raise validation_failed(exc, prefix="request.") from None
        except ValidationFailed as exc:
            fields = [{**error, "field": f"request.{error['field']}"} for error in exc.errors]
            raise ValidationFailed(exc.message, fields) from None
        self._check_capacity()
        body = dict(message.request)
        body.pop("detach", None)  # ours, not the upstream's
        services = self._services
        assert self._principal is not None  # the reader authenticates first
        # Rate limits, admission and the cache answer here: a refusal is an error frame.
        launch = await launch_run(
            services,
            self._principal,
            body,
            detached=message.detach or completion.detach,
            disconnect_grace=services.settings.runs.disconnect_grace,
            cache_control=None,
        )
        subscription = launch.subscription
        await self._start_pump(
            subscription, encode_reply("run.created", message.ref, run_id=subscription.run_id)
        )

    async def _subscribe(self, message: RunSubscribe) -> None:
        """``run.subscribe``: a run started anywhere, from the cursor ``after``."""
        if message.run_id in self._streams:
            raise AlreadySubscribed(f"this connection already streams run {message.run_id}")
        self._check_capacity()
        hub = self._services.hub
        subscription = await hub.subscribe(message.run_id, message.after, tenant=self._tenant)
        reply = encode_reply(
            "run.subscribed", message.ref, run_id=message.run_id, after=message.after
        )
        await self._start_pump(subscription, reply)

    async def _unsubscribe(self, message: RunUnsubscribe) -> None:
        """No more frames of the run after the reply; the run follows the disconnect rules."""
        pump = self._streams.pop(message.run_id, None)
        if pump is not None:
            pump.task.cancel()
            await asyncio.wait((pump.task,))
            await pump.subscription.close()
        reply = encode_reply("run.unsubscribed", message.ref, run_id=message.run_id)
        await self._enqueue(reply)

    @property
    def _tenant(self) -> str:
        assert self._principal is not None  # the reader authenticates first
        return self._principal.tenant

    def _check_capacity(self) -> None:
        limit = self._limits.max_runs_per_connection
        if len(self._streams) >= limit:
            raise TooManyRuns(f"a connection streams at most {limit} runs at once")

    # The pumps.

    async def _start_pump(self, subscription: Subscription, reply: str) -> None:
        """Queue the reply, then the run's events; the subscription is owned from here on."""
        try:
            await self._enqueue(reply)
        except BaseException:
            await subscription.close()
            raise
        run_id = subscription.run_id
        task = asyncio.create_task(self._pump(subscription), name=f"websocket pump {run_id}")
        pump = _Pump(subscription, task)
        self._streams[run_id] = pump
        self._pumps.add(pump)
        self._runs_served += 1
        task.add_done_callback(lambda _: self._pump_done(pump))

    def _pump_done(self, pump: _Pump) -> None:
        self._pumps.discard(pump)
        self._stream_ended(pump.subscription.run_id, pump.task)

    def _stream_ended(self, run_id: str, task: asyncio.Task[Any] | None) -> None:
        # The place is free once the last frame is queued, before the subscription's close
        # (a store round trip): a client that saw the terminal event may start the next run.
        pump = self._streams.get(run_id)
        if pump is not None and pump.task is task:
            del self._streams[run_id]
            self._last_activity = self._loop.time()  # idle from the end of the last run

    async def _pump(self, subscription: Subscription) -> None:
        run_id = subscription.run_id
        try:
            await self._stream(subscription)
        except _Closing:  # also from an error frame that found no room
            pass
        finally:
            self._stream_ended(run_id, asyncio.current_task())
            await subscription.close()

    async def _stream(self, subscription: Subscription) -> None:
        """Copy the run's events into the queue until its terminal event or an error frame."""
        run_id = subscription.run_id
        queue = self._queue
        try:
            while True:
                batch = await subscription.next_batch(None)
                for event in batch:
                    frame = encode_event(run_id, event)
                    try:
                        queue.put_nowait(frame)
                    except asyncio.QueueFull:
                        await self._wait_for_room(frame)
                if batch[-1].is_terminal:
                    return
        except EndOfStream:  # subscribed after the run's end: nothing more will come
            await self._enqueue(encode_reply("run.unsubscribed", run_id=run_id))
        except StoreUnavailable as exc:  # the run cannot go on being logged: it has failed
            failed = Event(subscription.cursor + 1, EventType.RUN_FAILED, exc.to_failure())
            await self._enqueue(encode_event(run_id, failed))
        except TokenRelayError as exc:  # expired, or the cursor is before the kept window
            await self._enqueue(encode_error(exc, run_id=run_id))
        except _Closing:
            raise  # not a failure: the connection is closing
        except Exception:
            logger.exception("websocket_pump_failed", run_id=run_id)
            error = InternalError("the run's stream failed")
            await self._enqueue(encode_error(error, run_id=run_id))
