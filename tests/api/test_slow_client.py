"""A client that stops reading is dropped after the send timeout, and its upstream is closed."""

from __future__ import annotations

import socket
import time

import httpx
import orjson

from tests.conftest import GatewayFactory


def test_client_that_stops_reading_is_dropped_and_the_upstream_closed(
    gateway_factory: GatewayFactory, mock_url: str
) -> None:
    gateway = gateway_factory(TOKENRELAY_SERVER__SEND_TIMEOUT="0.5")
    body = orjson.dumps(
        {
            "model": "mock-model",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "mock": {"tokens": 300_000},  # far more than the socket buffers hold
        }
    )
    port = int(gateway.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        client.sendall(head.encode() + body)
        # Read nothing. The gateway's writes block once the buffers are full.
        deadline = time.monotonic() + 10
        stats: dict[str, int] = {}
        while time.monotonic() < deadline:
            stats = httpx.get(mock_url + "/mock/stats").json()
            if stats["client_disconnects"]:
                break
            time.sleep(0.1)
    assert stats["client_disconnects"] == 1
    assert stats["completed_streams"] == 0
    assert '"client_send_timeout"' in gateway.log()
