"""SIGTERM drains: runs that finish within the grace period complete, the rest end typed."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.conftest import Server, free_port, start_server


def _run_events(url: str, mock: dict[str, Any], into: list[dict[str, Any]]) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "mock": mock}
    with httpx.stream("POST", url + "/v1/runs", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("event: "):
                into.append({"type": line[7:]})
            elif line.startswith("data: "):
                into[-1]["data"] = orjson.loads(line[6:])


def test_sigterm_completes_short_runs_and_cancels_long_ones_with_a_terminal_event(
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
    short: list[dict[str, Any]] = []
    long: list[dict[str, Any]] = []
    clients = [
        threading.Thread(
            target=_run_events, args=(gateway.url, {"tokens": 8, "itl_ms": 50}, short)
        ),
        threading.Thread(
            target=_run_events, args=(gateway.url, {"tokens": 500, "itl_ms": 50}, long)
        ),
    ]
    for client in clients:
        client.start()
    try:
        while len(short) < 3 or len(long) < 3:  # both streams are under way
            time.sleep(0.02)
        gateway.process.send_signal(signal.SIGTERM)
        for client in clients:
            client.join(15)
        gateway.process.wait(15)
    finally:
        gateway.stop()

    assert short[-1]["type"] == "run.completed"
    assert "".join(e["data"].get("content", "") for e in short if e["type"] == "message.delta") == (
        "".join(f"tok{i} " for i in range(8))
    )
    assert long[-1] == {"type": "run.cancelled", "data": {"reason": "shutting_down"}}
    assert sum(e["type"].startswith("run.") and e["type"] != "run.started" for e in long) == 1
    assert '"gateway_draining"' in gateway.log()
