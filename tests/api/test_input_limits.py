"""Input limits, sent for real over a socket: the documented answer, then a request still served.

Each test writes raw HTTP/1.1 to the gateway's port (so a test decides exactly which bytes go out
and when), checks what a client receives, and then that the gateway goes on serving. Limits tested
elsewhere, with the same two checks:

- a body over ``limits.max_body_bytes`` by Content-Length and chunked (413), and the gateway
  serving afterwards: ``test_validation.py`` (``TABLE``, ``test_bad_input_changes_nothing``);
- too many messages, too much content (422 ``limit_exceeded``):
  ``test_validation.py::test_configured_limits_are_enforced``;
- a WebSocket message over ``websocket.max_message_bytes`` (close 1009):
  ``test_websocket.py::test_oversized_message_closes_with_1009``.
"""

from __future__ import annotations

import http.client
import select
import socket
import time
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import GatewayFactory, Server

# Deadlines a test can reach in about a second (the defaults are 10, 30 and 5 seconds).
SHORT_DEADLINES = {
    "TOKENRELAY_SERVER__HEADER_TIMEOUT": "1",
    "TOKENRELAY_SERVER__BODY_TIMEOUT": "1",
    "TOKENRELAY_SERVER__KEEPALIVE_TIMEOUT": "1",
}
MAX_HEADER_BYTES = 16_384  # server.max_header_bytes
GOOD = {
    "model": "mock-model",
    "messages": [{"role": "user", "content": "hi"}],
    "mock": {"tokens": 3},
}


@pytest.fixture
def short_deadlines(gateway_factory: GatewayFactory, mock_url: str) -> Server:
    return gateway_factory(**SHORT_DEADLINES)


def address(server: Server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def connect(server: Server) -> socket.socket:
    return socket.create_connection(address(server), timeout=15)


def get(path: str, *headers: bytes) -> bytes:
    lines = [f"GET {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", *headers, b"", b""]
    return b"\r\n".join(lines)


def read_response(sock: socket.socket) -> tuple[http.client.HTTPResponse, bytes]:
    """One response from the socket (only one may be in flight: the reader buffers ahead)."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response, response.read()


def closed_by_gateway(sock: socket.socket) -> bool:
    """Whether the gateway has closed the connection: nothing more comes but the end."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def trickle(sock: socket.socket, data: bytes) -> None:
    """Send ``data`` a byte every 50 ms; stop as soon as the gateway answers (or closes)."""
    for byte in data:
        try:
            sock.send(bytes([byte]))
        except OSError:
            return
        readable, _, _ = select.select([sock], [], [], 0.05)
        if readable:
            return


def problem(response: http.client.HTTPResponse, body: bytes, status: int) -> dict[str, Any]:
    assert response.status == status, body
    assert response.getheader("content-type") == "application/problem+json"
    document: dict[str, Any] = orjson.loads(body)
    assert document["status"] == status
    assert document["type"] == f"urn:tokenrelay:problem:{document['code']}"
    assert document["retryable"] is False
    return document


def assert_still_serving(server: Server) -> None:
    response = httpx.post(server.url + "/v1/chat/completions", json=GOOD, timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2 "


# Request line and headers: server.max_header_bytes.


def test_headers_over_the_limit_get_431_and_the_connection_closes(
    gateway: Server, mock_url: str
) -> None:
    with connect(gateway) as sock:
        sock.sendall(get("/healthz", b"X-Padding: " + b"a" * (MAX_HEADER_BYTES + 100)))
        response, body = read_response(sock)
        document = problem(response, body, 431)
        assert document["code"] == "headers_too_large"
        assert response.getheader("connection") == "close"
        assert closed_by_gateway(sock)
    assert_still_serving(gateway)


def test_many_small_headers_count_together(gateway: Server, mock_url: str) -> None:
    headers = [f"X-Header-{i}: {'v' * 100}".encode() for i in range(MAX_HEADER_BYTES // 100)]
    with connect(gateway) as sock:
        sock.sendall(get("/healthz", *headers))
        response, body = read_response(sock)
    assert problem(response, body, 431)["code"] == "headers_too_large"
    assert_still_serving(gateway)


def test_headers_that_never_end_are_cut_at_the_limit(gateway: Server, mock_url: str) -> None:
    """A header value that goes on and on is refused once it passes the limit, not buffered."""
    with connect(gateway) as sock:
        sock.sendall(get("/healthz").removesuffix(b"\r\n\r\n") + b"\r\nX-Endless: ")
        answered = False
        for _ in range(64):  # up to 4 MiB, far past the limit
            try:
                sock.sendall(b"a" * 65_536)
            except OSError:
                break
            if select.select([sock], [], [], 0)[0]:
                answered = True
                break
        assert answered or select.select([sock], [], [], 10)[0]
        response, body = read_response(sock)
    assert problem(response, body, 431)["code"] == "headers_too_large"
    assert_still_serving(gateway)


def test_headers_under_the_limit_are_served(gateway_url: str) -> None:
    padding = "a" * (MAX_HEADER_BYTES - 2_000)
    response = httpx.get(gateway_url + "/healthz", headers={"X-Padding": padding})
    assert response.status_code == 200


# Slow clients: server.header_timeout, server.body_timeout, server.keepalive_timeout.


def test_headers_sent_slowly_get_408_after_the_header_timeout(short_deadlines: Server) -> None:
    head = get("/healthz", b"X-Slow: " + b"a" * 400)  # 20 s at a byte every 50 ms
    with connect(short_deadlines) as sock:
        started = time.monotonic()
        trickle(sock, head)
        response, body = read_response(sock)
        waited = time.monotonic() - started
        document = problem(response, body, 408)
        assert closed_by_gateway(sock)
    assert document["code"] == "request_timeout"
    assert waited >= 0.8  # the header timeout: sending bytes does not extend it
    assert_still_serving(short_deadlines)


def test_a_connection_that_sends_nothing_is_closed(short_deadlines: Server) -> None:
    with connect(short_deadlines) as sock:
        started = time.monotonic()
        assert closed_by_gateway(sock)  # no answer is owed: nothing was asked
        assert time.monotonic() - started >= 0.8
    assert_still_serving(short_deadlines)


def test_a_body_sent_slowly_gets_408_and_reaches_no_upstream(
    short_deadlines: Server, mock_url: str
) -> None:
    body = orjson.dumps(GOOD)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    with connect(short_deadlines) as sock:
        sock.sendall(head)
        started = time.monotonic()
        trickle(sock, body)
        response, answer = read_response(sock)
        waited = time.monotonic() - started
        document = problem(response, answer, 408)
        assert response.getheader("connection") == "close"
        assert closed_by_gateway(sock)
    assert document["code"] == "request_timeout"
    assert document["request_id"] == response.getheader("x-request-id")
    assert waited >= 0.8
    assert httpx.get(mock_url + "/mock/requests").json()["requests"] == []
    assert_still_serving(short_deadlines)


def test_an_idle_keep_alive_connection_is_closed(short_deadlines: Server) -> None:
    with connect(short_deadlines) as sock:
        sock.sendall(get("/healthz"))
        assert read_response(sock)[0].status == 200
        sock.sendall(get("/healthz"))  # reused at once: still open
        assert read_response(sock)[0].status == 200
        idle_since = time.monotonic()
        assert closed_by_gateway(sock)
        # Closed for being idle, not at once (the event loop's timers may fire a little early).
        assert time.monotonic() - idle_since >= 0.5


def test_a_connection_stays_usable_after_refused_bodies(gateway: Server, mock_url: str) -> None:
    """A 413 (by Content-Length, the body sent anyway) and a 422 keep the connection usable."""
    too_large = b"x" * (1_048_576 + 1)
    over_limit = orjson.dumps({**GOOD, "n": 2})  # limits.max_n is 1
    good = orjson.dumps(GOOD)
    with connect(gateway) as sock:
        for body, status in ((too_large, 413), (over_limit, 422), (good, 200)):
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            response, answer = read_response(sock)
            assert response.status == status, answer
    assert orjson.loads(answer)["choices"][0]["message"]["content"] == "tok0 tok1 tok2 "
    assert len(httpx.get(mock_url + "/mock/requests").json()["requests"]) == 1
