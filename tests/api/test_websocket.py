"""``/v1/ws``: several runs over one WebSocket, a real gateway and the ``websockets`` client."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import FAST_TIMEOUTS, GatewayFactory, Server, free_port
from tokenrelay.app import create_app
from tokenrelay.config import ServerSettings, Settings, UpstreamTarget

TERMINAL = {"run.completed", "run.failed", "run.cancelled"}

# One gateway whose limits a test can reach in about a second; its runs are cancelled as soon
# as their last reader leaves, so the mock upstream shows when a run was released. Runs keep
# enough events that a stalled reader is closed as slow (1013) before it falls out of the kept
# window (events_lost) while the socket buffers (~4 MB on loopback) fill.
LIMITED = {
    **FAST_TIMEOUTS,
    "TOKENRELAY_RUNS__DISCONNECT_GRACE": "0",
    "TOKENRELAY_RUNS__MAX_EVENTS_PER_RUN": "200000",
    "TOKENRELAY_RUNS__MAX_BYTES_PER_RUN": "67108864",
    "TOKENRELAY_WEBSOCKET__IDLE_TIMEOUT": "1",
    "TOKENRELAY_WEBSOCKET__MAX_RUNS_PER_CONNECTION": "2",
    "TOKENRELAY_WEBSOCKET__SEND_QUEUE_SIZE": "10",
    "TOKENRELAY_WEBSOCKET__SEND_TIMEOUT": "1",
}


@pytest.fixture
def limited(gateway_factory: GatewayFactory, mock_url: str) -> Server:
    return gateway_factory(**LIMITED)


def ws_url(http_url: str) -> str:
    return http_url.replace("http://", "ws://", 1) + "/v1/ws"


def chat(mock: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "model": "mock-model",
        "messages": [{"role": "user", "content": "hi"}],
        "mock": mock,
        **extra,
    }


def tokens(n: int) -> str:
    return "".join(f"tok{i} " for i in range(n))


def content(frames: list[dict[str, Any]]) -> str:
    return "".join(f["data"].get("content", "") for f in frames if f["type"] == "message.delta")


async def send(ws: ClientConnection, message: dict[str, Any]) -> None:
    await ws.send(orjson.dumps(message).decode())


async def recv(ws: ClientConnection) -> dict[str, Any]:
    frame: dict[str, Any] = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
    return frame


async def read_until(
    ws: ClientConnection, done: Callable[[dict[str, Any]], bool]
) -> list[dict[str, Any]]:
    frames = [await recv(ws)]
    while not done(frames[-1]):
        frames.append(await recv(ws))
    return frames


async def create(ws: ClientConnection, mock: dict[str, Any], ref: str = "r") -> str:
    """Start a run and return its id; frames of other runs before the reply are skipped."""
    await send(ws, {"type": "run.create", "ref": ref, "request": chat(mock)})
    reply = (await read_until(ws, lambda frame: frame.get("ref") == ref))[-1]
    assert reply["type"] == "run.created"
    run_id: str = reply["run_id"]
    return run_id


async def read_runs(
    ws: ClientConnection, runs: int, until_seq: int | None = None
) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """Frames by run until ``runs`` runs ended (or one reached ``until_seq``), and the rest."""
    events: dict[str, list[dict[str, Any]]] = defaultdict(list)
    others: list[dict[str, Any]] = []
    ended = 0
    while ended < runs:
        frame = await recv(ws)
        if "run_id" not in frame or "seq" not in frame:
            others.append(frame)
            continue
        events[frame["run_id"]].append(frame)
        ended += frame["type"] in TERMINAL
        if until_seq is not None and frame["seq"] >= until_seq:
            break
    return events, others


async def closed_with(ws: ClientConnection) -> tuple[int, str]:
    """Read until the gateway closes the connection; the close code and reason it sent."""
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(ws.recv(), 15)
    received = closed.value.rcvd
    assert received is not None, "the gateway sent no close frame"
    return received.code, received.reason


async def wait_for_released_upstream(mock_url: str) -> None:
    async with httpx.AsyncClient() as client:
        deadline = time.monotonic() + 5
        while (await client.get(mock_url + "/mock/stats")).json()["client_disconnects"] < 1:
            assert time.monotonic() < deadline, "the run's upstream was not released"
            await asyncio.sleep(0.05)
        stats = (await client.get(mock_url + "/mock/stats")).json()
    assert stats["client_disconnects"] == 1
    assert stats["completed_streams"] == 0


async def test_two_runs_multiplexed_on_one_connection(gateway_url: str) -> None:
    async with connect(ws_url(gateway_url)) as ws:
        await send(ws, {"type": "run.create", "ref": "a", "request": chat({"tokens": 12})})
        await send(ws, {"type": "run.create", "ref": "b", "request": chat({"tokens": 5})})
        events, replies = await read_runs(ws, runs=2)
    run_ids = {reply["ref"]: reply["run_id"] for reply in replies}
    assert [reply["type"] for reply in replies] == ["run.created", "run.created"]
    assert set(events) == set(run_ids.values())
    for ref, count in (("a", 12), ("b", 5)):
        frames = events[run_ids[ref]]
        assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
        assert [f["type"] in TERMINAL for f in frames].count(True) == 1
        assert frames[0]["type"] == "run.started"
        assert frames[0]["data"]["run_id"] == run_ids[ref]
        last = {"run_id": run_ids[ref], "seq": len(frames), "type": "run.completed", "data": {}}
        assert frames[-1] == last
        assert content(frames) == tokens(count)


async def test_subscribe_after_resumes_a_detached_http_run(gateway_url: str) -> None:
    seen: list[dict[str, Any]] = []
    body = chat({"tokens": 20, "itl_ms": 30}, detach=True)
    async with (
        httpx.AsyncClient(timeout=10) as client,
        client.stream("POST", gateway_url + "/v1/runs", json=body) as response,
    ):
        run_id = response.headers["x-run-id"]
        async for line in response.aiter_lines():  # then drop the connection at seq 6
            if line.startswith("event: "):
                seen.append({"seq": len(seen) + 1, "type": line[7:]})
            elif line.startswith("data: "):
                seen[-1]["data"] = orjson.loads(line[6:])
                if len(seen) == 6:
                    break
    async with connect(ws_url(gateway_url)) as ws:
        await send(ws, {"type": "run.subscribe", "ref": "s", "run_id": run_id, "after": 6})
        assert await recv(ws) == {
            "type": "run.subscribed",
            "ref": "s",
            "run_id": run_id,
            "after": 6,
        }
        events, others = await read_runs(ws, runs=1)
    rest = events[run_id]
    assert others == []
    assert [f["seq"] for f in rest] == list(range(7, 7 + len(rest)))
    assert content(seen + rest) == tokens(20)
    assert [f["type"] for f in rest].count("run.completed") == 1
    assert rest[-1]["type"] == "run.completed"


async def test_cancel_ends_the_run_with_run_cancelled(gateway_url: str) -> None:
    async with connect(ws_url(gateway_url)) as ws:
        run_id = await create(ws, {"tokens": 500, "itl_ms": 20})
        await read_runs(ws, runs=1, until_seq=3)
        await send(ws, {"type": "run.cancel", "ref": "c", "run_id": run_id})
        events, replies = await read_runs(ws, runs=1)
        if not replies:  # the reply may come after the run's last event
            replies.append(await recv(ws))
    assert replies == [
        {"type": "run.cancel.accepted", "ref": "c", "run_id": run_id, "status": "cancelled"}
    ]
    frames = events[run_id]
    assert [f["type"] in TERMINAL for f in frames].count(True) == 1
    assert frames[-1]["type"] == "run.cancelled"
    assert frames[-1]["data"] == {"reason": "cancelled"}


async def test_invalid_json_is_an_error_and_the_connection_stays_usable(gateway_url: str) -> None:
    async with connect(ws_url(gateway_url)) as ws:
        await ws.send('{"type": "ping", ')
        error = await recv(ws)
        assert error["type"] == "error"
        assert error["code"] == "invalid_json"
        await send(ws, {"type": "ping", "ref": "after"})
        assert await recv(ws) == {"type": "pong", "ref": "after"}


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (
            {"type": "run.create", "request": {"model": "m", "messages": [{"role": "robot"}]}},
            "request.messages.0.role",
        ),
        ({"type": "run.create", "request": chat({}, n=2)}, "request.n"),  # limits.max_n
        ({"type": "run.create", "request": chat({}), "detach": "yes"}, "detach"),
        ({"type": "run.subscribe", "after": 3}, "run_id"),
        ({"type": "run.subscribe", "run_id": "run_x", "after": -1}, "after"),
    ],
)
async def test_invalid_message_is_validation_failed_naming_the_field(
    gateway_url: str, message: dict[str, Any], field: str
) -> None:
    async with connect(ws_url(gateway_url)) as ws:
        await send(ws, {**message, "ref": 7})
        error = await recv(ws)
        assert error["type"] == "error"
        assert error["code"] == "validation_failed"
        assert error["ref"] == 7
        assert [e["field"] for e in error["errors"]] == [field]
        await send(ws, {"type": "ping"})
        assert await recv(ws) == {"type": "pong"}


async def test_unknown_message_type_is_an_error(gateway_url: str) -> None:
    async with connect(ws_url(gateway_url)) as ws:
        await send(ws, {"type": "run.explode", "ref": "u"})
        error = await recv(ws)
        assert (error["type"], error["code"], error["ref"]) == ("error", "unknown_message", "u")
        await send(ws, {"type": "ping"})
        assert await recv(ws) == {"type": "pong"}


async def test_subscribe_to_an_unknown_run_is_not_found(gateway_url: str) -> None:
    async with connect(ws_url(gateway_url)) as ws:
        await send(ws, {"type": "run.subscribe", "ref": 1, "run_id": "run_000000000000"})
        error = await recv(ws)
        assert error["code"] == "not_found"
        assert (error["ref"], error["run_id"]) == (1, "run_000000000000")


async def test_subscribe_before_the_kept_window_is_events_lost(
    gateway_factory: GatewayFactory, mock_url: str
) -> None:
    url = gateway_factory(**FAST_TIMEOUTS, TOKENRELAY_RUNS__MAX_EVENTS_PER_RUN="5").url
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(url + "/v1/runs", json=chat({"tokens": 10, "itl_ms": 5}))
    run_id = response.headers["x-run-id"]
    async with connect(ws_url(url)) as ws:
        await send(ws, {"type": "run.subscribe", "run_id": run_id, "after": 0})
        assert (await recv(ws))["type"] == "run.subscribed"
        error = await recv(ws)
        assert (error["type"], error["code"], error["run_id"]) == ("error", "events_lost", run_id)


async def test_oversized_message_closes_with_1009(gateway_url: str) -> None:
    async with connect(ws_url(gateway_url)) as ws:
        await ws.send("x" * (1_048_576 + 1))
        code, _ = await closed_with(ws)
    assert code == 1009
    async with connect(ws_url(gateway_url)) as ws:  # the gateway goes on serving
        run_id = await create(ws, {"tokens": 3})
        events, _ = await read_runs(ws, runs=1)
    assert content(events[run_id]) == tokens(3)


async def test_binary_frame_closes_with_1003(gateway_url: str) -> None:
    async with connect(ws_url(gateway_url)) as ws:
        await ws.send(orjson.dumps({"type": "ping"}))
        code, _ = await closed_with(ws)
    assert code == 1003


async def test_ping_pong(gateway_url: str) -> None:
    async with connect(ws_url(gateway_url)) as ws:
        await send(ws, {"type": "ping", "ref": "p"})
        assert await recv(ws) == {"type": "pong", "ref": "p"}
        await send(ws, {"type": "ping"})
        assert await recv(ws) == {"type": "pong"}


@pytest.mark.parametrize("offered", [True, False])
async def test_permessage_deflate_is_negotiated_only_when_offered(
    gateway_url: str, offered: bool
) -> None:
    async with connect(ws_url(gateway_url), compression="deflate" if offered else None) as ws:
        extensions = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        run_id = await create(ws, {"tokens": 3})
        events, _ = await read_runs(ws, runs=1)
    assert ("permessage-deflate" in extensions) is offered
    assert content(events[run_id]) == tokens(3)


async def test_too_many_runs_on_one_connection(limited: Server) -> None:
    async with connect(ws_url(limited.url)) as ws:
        first = await create(ws, {"tokens": 500, "itl_ms": 20}, ref="1")
        await create(ws, {"tokens": 500, "itl_ms": 20}, ref="2")
        await send(ws, {"type": "run.create", "ref": "3", "request": chat({"tokens": 1})})
        refused = (await read_until(ws, lambda frame: frame["type"] == "error"))[-1]
        assert (refused["code"], refused["ref"], refused["retryable"]) == (
            "too_many_runs",
            "3",
            True,
        )
        # A run that ends frees its place.
        await send(ws, {"type": "run.cancel", "run_id": first})
        await read_until(
            ws, lambda frame: frame.get("run_id") == first and frame["type"] in TERMINAL
        )
        await create(ws, {"tokens": 1}, ref="4")


async def test_idle_connection_is_closed_with_1001(limited: Server) -> None:
    started = time.monotonic()
    async with connect(ws_url(limited.url)) as ws:
        code, reason = await closed_with(ws)
    assert (code, reason) == (1001, "idle")
    assert time.monotonic() - started >= 1.0


async def test_a_streaming_run_is_not_idle(limited: Server) -> None:
    async with connect(ws_url(limited.url)) as ws:
        started = time.monotonic()
        run_id = await create(ws, {"tokens": 30, "itl_ms": 50})  # longer than the idle timeout
        events, _ = await read_runs(ws, runs=1)
        assert time.monotonic() - started >= 1.0
        assert events[run_id][-1]["type"] == "run.completed"
        assert content(events[run_id]) == tokens(30)
        assert await closed_with(ws) == (1001, "idle")


async def test_unsubscribe_stops_the_frames_and_releases_the_run(
    limited: Server, mock_url: str
) -> None:
    async with connect(ws_url(limited.url)) as ws:
        run_id = await create(ws, {"tokens": 500, "itl_ms": 20})
        await read_runs(ws, runs=1, until_seq=3)
        await send(ws, {"type": "run.unsubscribe", "ref": "u", "run_id": run_id})
        while (frame := await recv(ws)).get("run_id") == run_id and "seq" in frame:
            pass  # events queued before the request
        assert frame == {"type": "run.unsubscribed", "ref": "u", "run_id": run_id}
        await send(ws, {"type": "ping"})
        assert await recv(ws) == {"type": "pong"}  # nothing of the run after the reply
        await wait_for_released_upstream(mock_url)


@pytest.mark.parametrize("how", ["close", "drop"])
async def test_client_that_disconnects_mid_run_releases_it(
    limited: Server, mock_url: str, how: str
) -> None:
    async with connect(ws_url(limited.url)) as ws:
        run_id = await create(ws, {"tokens": 500, "itl_ms": 20})
        await read_runs(ws, runs=1, until_seq=3)
        if how == "drop":
            ws.transport.abort()  # no closing handshake
    await wait_for_released_upstream(mock_url)
    async with httpx.AsyncClient() as client:
        info = (await client.get(f"{limited.url}/v1/runs/{run_id}")).json()
    assert (info["status"], info["error_code"]) == ("cancelled", "client_disconnected")


async def test_slow_client_is_closed_with_1013_and_its_run_released(
    limited: Server, mock_url: str
) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", int(limited.url.rsplit(":", 1)[1])))
    sock.setblocking(False)
    async with connect(ws_url(limited.url), sock=sock, compression=None, max_queue=1) as ws:
        # 40,000 frames a second, far more than the socket buffers hold; 10 s in all.
        await send(
            ws, {"type": "run.create", "request": chat({"tokens": 400_000, "itl_ms": 0.025})}
        )
        # Read nothing: the socket buffers fill, then the gateway's send queue (10 frames).
        started = time.monotonic()
        await wait_for_released_upstream(mock_url)
        assert time.monotonic() - started >= 1.0  # websocket.send_timeout
        code, reason = await closed_with(ws)  # reading again, the close frame arrives last
    assert code == 1013
    assert reason.startswith("slow client")
    log = limited.log()
    assert '"code": 1013' in log
    assert "Traceback" not in log  # closing is not a failure of the run's stream


async def test_drain_ends_runs_with_run_cancelled_and_refuses_new_ones(mock_url: str) -> None:
    shutdown = asyncio.Event()  # what `tokenrelay serve` sets on SIGTERM
    settings = Settings(
        server=ServerSettings(drain_grace=0.2), upstreams=[UpstreamTarget(url=mock_url + "/v1")]
    )
    port = free_port()
    config = uvicorn.Config(create_app(settings, shutdown), port=port, log_config=None)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        async with httpx.AsyncClient() as client:
            while not server.started:  # uvicorn has no event for it
                with contextlib.suppress(httpx.TransportError):
                    await client.get(f"http://127.0.0.1:{port}/readyz")
                await asyncio.sleep(0.02)
        async with connect(f"ws://127.0.0.1:{port}/v1/ws") as ws:
            run_id = await create(ws, {"tokens": 500, "itl_ms": 20})
            await read_runs(ws, runs=1, until_seq=3)
            shutdown.set()
            events, _ = await read_runs(ws, runs=1)
            assert events[run_id][-1]["type"] == "run.cancelled"
            assert events[run_id][-1]["data"] == {"reason": "shutting_down"}
            await send(ws, {"type": "run.create", "ref": "late", "request": chat({"tokens": 1})})
            refused = await recv(ws)
            assert (refused["code"], refused["ref"], refused["retryable"]) == (
                "shutting_down",
                "late",
                True,
            )
    finally:
        server.should_exit = True
        await serving
