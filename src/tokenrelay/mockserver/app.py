"""The mock OpenAI-compatible upstream: aiohttp handlers, stream writer, stats.

It exists to drive the gateway in tests and benchmarks, so the hot path avoids
per-chunk JSON encoding: every stream pre-encodes its envelope once and each
content chunk is a single bytes format.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Mapping
from enum import Enum
from http import HTTPStatus
from typing import Any, Final

import orjson
from aiohttp import web

from tokenrelay.mockserver.scenario import (
    DEFAULTS,
    ChatRequest,
    CompletionPlan,
    FaultKind,
    MockDefaults,
    MockOptionError,
    MockScenario,
    parse_chat_request,
    plan_completion,
)

__all__ = ["STATE_KEY", "MockState", "create_mock_app"]

_BATCH: Final = 64  # content chunks per write when there is no inter-token delay
_REQUEST_LOG_SIZE: Final = 100
_STALL_POLL_S: Final = 0.25  # fallback when the runner lacks handler_cancellation
_DONE: Final = b"data: [DONE]\n\n"
_MALFORMED: Final = b'data: {"id": "broken", this is not json\n\n'
_ERROR_PAYLOAD: Final = {
    "error": {"message": "mock upstream failure", "type": "server_error", "code": "mock_error"}
}
_ERROR_EVENT: Final = b"data: " + orjson.dumps(_ERROR_PAYLOAD) + b"\n\n"
_SSE_HEADERS: Final = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


class _Outcome(Enum):
    COMPLETED = "completed"
    DISCONNECTED = "disconnected"
    DROPPED = "dropped"  # closed on purpose by the mock; not the client's doing
    FAILED = "failed"


class MockState:
    """Counters, request log and id sequence of one mock app instance."""

    def __init__(self, defaults: MockDefaults) -> None:
        self.defaults = defaults
        self.started = int(time.time())
        self.closing = asyncio.Event()
        self.requests = 0
        self.active_streams = 0
        self.completed_streams = 0
        self.client_disconnects = 0
        self.request_log: deque[Any] = deque(maxlen=_REQUEST_LOG_SIZE)
        self.scenario_failures: dict[str, int] = {}
        self._last_id = 0

    def next_id(self) -> int:
        self._last_id += 1
        return self._last_id

    def should_fail(self, scenario: MockScenario) -> bool:
        """Apply ``http_error_times``: only the first N per scenario fail."""
        if scenario.http_error is None:
            return False
        if scenario.http_error_times is None:
            return True
        key = scenario.scenario or ""
        failed = self.scenario_failures.get(key, 0)
        if failed >= scenario.http_error_times:
            return False
        self.scenario_failures[key] = failed + 1
        return True

    def record(self, outcome: _Outcome) -> None:
        if outcome is _Outcome.COMPLETED:
            self.completed_streams += 1
        elif outcome is _Outcome.DISCONNECTED:
            self.client_disconnects += 1

    def reset(self) -> None:
        """Zero counters; ``active_streams`` is a live gauge and stays truthful."""
        self.requests = 0
        self.completed_streams = 0
        self.client_disconnects = 0
        self.request_log.clear()
        self.scenario_failures.clear()

    def snapshot(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "active_streams": self.active_streams,
            "completed_streams": self.completed_streams,
            "client_disconnects": self.client_disconnects,
        }


STATE_KEY: Final = web.AppKey("tokenrelay_mock_state", MockState)


class _Envelope:
    """Pre-encoded chunk framing for one stream, byte-identical to orjson output."""

    __slots__ = ("_base", "_head", "_tail", "_usage_null")

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        self._base = (
            b'data: {"id":'
            + orjson.dumps(completion_id)
            + b',"object":"chat.completion.chunk","created":'
            + str(created).encode()
            + b',"model":'
            + orjson.dumps(model)
            + b',"system_fingerprint":"fp_mock","choices":'
        )
        self._usage_null = b',"usage":null' if include_usage else b""
        self._head = self._base + b'[{"index":0,"delta":'
        self._tail = b',"logprobs":null,"finish_reason":null}]' + self._usage_null + b"}\n\n"

    def chunk(self, delta: bytes) -> bytes:
        return self._head + delta + self._tail

    def template(self, delta_head: bytes, delta_tail: bytes) -> bytes:
        """A ``%d`` template for numbered deltas; literal ``%`` is escaped."""
        return (
            (self._head + delta_head).replace(b"%", b"%%")
            + b"%d"
            + (delta_tail + self._tail).replace(b"%", b"%%")
        )

    def finish(self, reason: str) -> bytes:
        end = b"}]" + self._usage_null + b"}\n\n"
        return self._head + b'{},"logprobs":null,"finish_reason":' + orjson.dumps(reason) + end

    def usage(self, usage: dict[str, int]) -> bytes:
        return self._base + b'[],"usage":' + orjson.dumps(usage) + b"}\n\n"


def _delta_encoder(env: _Envelope, plan: CompletionPlan) -> Callable[[int], bytes]:
    """Return ``i -> chunk bytes``: a bytes format for text, a lookup for tool pieces."""
    if plan.tool_pieces is None:
        return env.template(b'{"content":"tok', b' "}').__mod__
    chunks = [
        env.chunk(orjson.dumps({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}))
        for piece in plan.tool_pieces[: plan.count]
    ]
    return chunks.__getitem__


def _tool_call(name: str, n: int, arguments: str) -> dict[str, Any]:
    function = {"name": name, "arguments": arguments}
    return {"id": f"call_mock_{n}", "type": "function", "function": function}


def _json(
    payload: object, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:  # e.g. 599 has no registered phrase
        reason = "Mock Error"
    return web.Response(
        body=orjson.dumps(payload),
        status=status,
        reason=reason,
        content_type="application/json",
        headers=headers,
    )


def _error(
    status: int,
    message: str,
    *,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    error = {"message": message, "type": kind, "param": param, "code": code}
    return _json({"error": error}, status=status, headers=headers)


def _http_error(scenario: MockScenario) -> web.Response:
    status = scenario.http_error or 500
    kind, code = {
        401: ("authentication_error", "invalid_api_key"),
        403: ("permission_error", None),
        404: ("not_found_error", "model_not_found"),
        429: ("rate_limit_error", "rate_limit_exceeded"),
    }.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    headers: dict[str, str] = {}
    if scenario.retry_after is not None:
        value = scenario.retry_after
        headers["Retry-After"] = str(int(value)) if value.is_integer() else repr(value)
    message = f"mock upstream error (HTTP {status})"
    return _error(status, message, kind=kind, code=code, headers=headers)


def _client_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _close(request: web.BaseRequest) -> None:
    """Close the socket without the terminating chunk, so the body is incomplete."""
    transport = request.transport
    if transport is not None:
        transport.close()


async def _stall(request: web.BaseRequest, state: MockState) -> _Outcome:
    """Hold the connection open until the client leaves or the server stops."""
    while not _client_gone(request):
        if state.closing.is_set():
            _close(request)
            return _Outcome.DROPPED
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.closing.wait(), _STALL_POLL_S)
    return _Outcome.DISCONNECTED


async def _sleep_until(loop: asyncio.AbstractEventLoop, deadline: float) -> None:
    delay = deadline - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)


async def _stream(request: web.Request, state: MockState, chat: ChatRequest) -> web.StreamResponse:
    """Write the SSE stream; batches when unpaced, paces on a fixed schedule."""
    n = state.next_id()
    scenario = chat.mock
    env = _Envelope(f"chatcmpl-mock-{n}", int(time.time()), chat.model, chat.include_usage)
    plan = plan_completion(chat)
    encode = _delta_encoder(env, plan)
    fault = scenario.fault
    stop = plan.count if fault is None else min(fault.after, plan.count)
    loop = asyncio.get_running_loop()
    resp = web.StreamResponse(headers=_SSE_HEADERS)
    pending = [env.chunk(b'{"role":"assistant","content":""}')]

    async def flush() -> None:
        if pending:
            data = b"".join(pending)
            pending.clear()
            await resp.write(data)

    outcome = _Outcome.FAILED
    state.active_streams += 1
    try:
        await resp.prepare(request)
        start = loop.time() + scenario.ttft_ms / 1000
        itl = scenario.itl_ms / 1000
        if scenario.ttft_ms > 0:
            await flush()
            await _sleep_until(loop, start)
        if scenario.tool_call is not None:
            call = {"index": 0, **_tool_call(scenario.tool_call.name, n, "")}
            pending.append(env.chunk(orjson.dumps({"tool_calls": [call]})))
        for i in range(stop):
            if i and itl > 0:
                await flush()
                await _sleep_until(loop, start + i * itl)
            elif len(pending) >= _BATCH:
                await flush()
                await asyncio.sleep(0)  # stay fair to other streams on the loop
            pending.append(encode(i))
        if fault is None:
            pending.append(env.finish(plan.finish_reason))
            if chat.include_usage:
                pending.append(env.usage(chat.usage(stop)))
            pending.append(_DONE)
        elif fault.kind is FaultKind.MALFORMED:
            pending.append(_MALFORMED)
        elif fault.kind is FaultKind.ERROR:
            pending.append(_ERROR_EVENT)
        await flush()
        if fault is not None and fault.kind is FaultKind.DROP:
            outcome = _Outcome.DISCONNECTED if _client_gone(request) else _Outcome.DROPPED
            _close(request)
        elif fault is not None and fault.kind is FaultKind.STALL:
            outcome = await _stall(request, state)
        else:
            await resp.write_eof()
            outcome = _Outcome.COMPLETED
    except ConnectionResetError:
        outcome = _Outcome.DISCONNECTED
    except asyncio.CancelledError:
        outcome = _Outcome.DISCONNECTED
        raise
    finally:
        state.active_streams -= 1
        state.record(outcome)
    return resp


async def _complete(request: web.Request, state: MockState, chat: ChatRequest) -> web.Response:
    """Answer a non-streaming request after the time the stream would have taken."""
    n = state.next_id()
    scenario = chat.mock
    plan = plan_completion(chat)
    fault = scenario.fault
    count = plan.count if fault is None else min(fault.after, plan.count)
    try:
        await asyncio.sleep((scenario.ttft_ms + count * scenario.itl_ms) / 1000)
        if fault is not None and fault.kind is FaultKind.DROP:
            _close(request)
            return web.Response(status=500)  # never delivered: the socket is closed
        if fault is not None and fault.kind is FaultKind.STALL:
            state.record(await _stall(request, state))
            return web.Response(status=500)
    except asyncio.CancelledError:
        state.record(_Outcome.DISCONNECTED)
        raise
    if fault is not None and fault.kind is FaultKind.MALFORMED:
        return web.Response(body=_MALFORMED[6:-2], content_type="application/json")
    if fault is not None and fault.kind is FaultKind.ERROR:
        return _json(_ERROR_PAYLOAD, status=500)
    message: dict[str, Any] = {"role": "assistant", "content": plan.text(count)}
    if scenario.tool_call is not None:
        message["tool_calls"] = [_tool_call(scenario.tool_call.name, n, message["content"])]
        message["content"] = None
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": plan.finish_reason}
    return _json(
        {
            "id": f"chatcmpl-mock-{n}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": chat.model,
            "system_fingerprint": "fp_mock",
            "choices": [choice],
            "usage": chat.usage(count),
        }
    )


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    state.requests += 1
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "We could not parse the JSON body of your request.")
    if not isinstance(body, dict):
        return _error(400, "The request body must be a JSON object.")
    state.request_log.append(body)
    try:
        chat = parse_chat_request(body, state.defaults)
    except MockOptionError as exc:
        return _error(400, exc.message, param=exc.param)
    if state.should_fail(chat.mock):
        return _http_error(chat.mock)
    if chat.stream:
        return await _stream(request, state, chat)
    return await _complete(request, state, chat)


async def _models(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    data = [
        {"id": model, "object": "model", "created": state.started, "owned_by": "tokenrelay-mock"}
        for model in state.defaults.models
    ]
    return _json({"object": "list", "data": data})


async def _stats(request: web.Request) -> web.Response:
    return _json(request.app[STATE_KEY].snapshot())


async def _reset(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.reset()
    return _json(state.snapshot())


async def _requests(request: web.Request) -> web.Response:
    return _json({"requests": list(request.app[STATE_KEY].request_log)})


async def _on_shutdown(app: web.Application) -> None:
    app[STATE_KEY].closing.set()


def create_mock_app(defaults: MockDefaults = DEFAULTS) -> web.Application:
    """Build the app; serve it with ``handler_cancellation=True`` for prompt disconnects."""
    app = web.Application()
    app[STATE_KEY] = MockState(defaults)
    app.on_shutdown.append(_on_shutdown)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/mock/stats", _stats)
    app.router.add_post("/mock/reset", _reset)
    app.router.add_get("/mock/requests", _requests)
    return app
