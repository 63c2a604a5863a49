"""SIGTERM with WebSocket clients: they get their runs' last event, then a 1012 close."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import websockets

from tests.conftest import Server, free_port, start_server


async def test_sigterm_ends_websocket_runs_with_a_terminal_event_then_closes_1012(
    mock_upstream: Server, tmp_path: Path
) -> None:
    port = free_port()
    gateway = start_server(
        ["serve", "--port", str(port), "--upstream", mock_upstream.url + "/v1"],
        "/readyz",
        port,
        tmp_path / "gateway.log",
        {"TOKENRELAY_SERVER__DRAIN_GRACE": "1"},
    )
    frames: list[dict[str, object]] = []
    try:
        async with websockets.connect(f"ws://127.0.0.1:{port}/v1/ws") as ws:
            request = {
                "model": "mock-model",
                "messages": [{"role": "user", "content": "hi"}],
                "mock": {"tokens": 500, "itl_ms": 50},
            }
            await ws.send(json.dumps({"type": "run.create", "request": request}))
            while len([f for f in frames if f.get("type") == "message.delta"]) < 3:
                frames.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
            gateway.process.send_signal(signal.SIGTERM)
            try:
                while True:
                    frames.append(json.loads(await asyncio.wait_for(ws.recv(), 15)))
            except websockets.ConnectionClosed as closed:
                assert closed.rcvd is not None
                assert closed.rcvd.code == 1012
        await asyncio.to_thread(gateway.process.wait, 15)
    finally:
        gateway.stop()
    events = [f for f in frames if "seq" in f]
    assert events[-1]["type"] == "run.cancelled"
    assert events[-1]["data"] == {"reason": "shutting_down"}
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
