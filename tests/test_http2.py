"""HTTP/2 as clients speak it: h2c with prior knowledge, h2 by ALPN over TLS, HTTP/1.1 beside both.

Every gateway here is a real ``tokenrelay serve`` process relaying the session's mock upstream;
the clients are httpx with its HTTP/2 stack (h2) and the official ``openai`` SDK on top of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import http.client
import ipaddress
import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from tests.conftest import Server, free_port, start_server

MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]


def expected_text(tokens: int) -> str:
    return "".join(f"tok{i} " for i in range(tokens))


@dataclass
class RunStream:
    """What one client saw of one ``/v1/runs`` stream."""

    http_version: str
    events: list[tuple[str, dict[str, Any]]]
    first_event_at: float
    ended_at: float

    @property
    def text(self) -> str:
        return "".join(
            data.get("content", "") for kind, data in self.events if kind == "message.delta"
        )

    @property
    def terminal_events(self) -> list[str]:
        return [
            kind for kind, _ in self.events if kind.startswith("run.") and kind != "run.started"
        ]


async def stream_run(
    client: httpx.AsyncClient, mock: dict[str, Any], **extensions: Any
) -> RunStream:
    body = {"model": "mock-model", "messages": MESSAGES, "mock": mock}
    events: list[tuple[str, dict[str, Any]]] = []
    first_event_at = 0.0
    async with client.stream("POST", "/v1/runs", json=body, extensions=extensions) as response:
        assert response.status_code == 200
        kind = ""
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                kind = line[7:]
                first_event_at = first_event_at or time.monotonic()
            elif line.startswith("data: "):
                events.append((kind, orjson.loads(line[6:])))
    return RunStream(response.http_version, events, first_event_at, time.monotonic())


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tokenrelay test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    certfile.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return certfile, keyfile


def trusting(certfile: Path) -> ssl.SSLContext:
    """A client TLS context that trusts the test certificate (and nothing else)."""
    return ssl.create_default_context(cafile=str(certfile))


@pytest.fixture(scope="module")
def h2c_gateway(
    mock_upstream: Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """``tokenrelay serve --http2``: HTTP/1.1 and h2c on one cleartext port."""
    port = free_port()
    server = start_server(
        ["serve", "--port", str(port), "--upstream", mock_upstream.url + "/v1", "--http2"],
        "/readyz",
        port,
        tmp_path_factory.mktemp("h2c") / "gateway.log",
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_gateway(
    mock_upstream: Server, tls_files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """``tokenrelay serve`` with a certificate (from the config, by environment variables)."""
    certfile, keyfile = tls_files
    port = free_port()
    log_path = tmp_path_factory.mktemp("tls-gateway") / "gateway.log"
    env = {
        "TOKENRELAY_SERVER__TLS_CERTFILE": str(certfile),
        "TOKENRELAY_SERVER__TLS_KEYFILE": str(keyfile),
    }
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tokenrelay",
                "serve",
                "--port",
                str(port),
                "--upstream",
                mock_upstream.url + "/v1",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
    server = Server(process, f"https://127.0.0.1:{port}", log_path, env)
    deadline = time.monotonic() + 20
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{server.log()}")
        try:
            response = httpx.get(server.url + "/readyz", verify=trusting(certfile), timeout=0.5)
            if response.status_code == 200:
                break
        except httpx.TransportError:
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"server did not become ready:\n{server.log()}") from None
        time.sleep(0.05)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def h2c_strict_gateway(
    mock_upstream: Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """``tokenrelay serve --http2`` with one-second header and body deadlines."""
    port = free_port()
    server = start_server(
        ["serve", "--port", str(port), "--upstream", mock_upstream.url + "/v1", "--http2"],
        "/readyz",
        port,
        tmp_path_factory.mktemp("h2c-strict") / "gateway.log",
        {"TOKENRELAY_SERVER__HEADER_TIMEOUT": "1", "TOKENRELAY_SERVER__BODY_TIMEOUT": "1"},
    )
    yield server
    server.stop()


async def test_h2c_twenty_concurrent_runs_share_one_connection(h2c_gateway: Server) -> None:
    connections: list[object] = []

    async def trace(event: str, info: dict[str, Any]) -> None:
        if event == "connection.connect_tcp.complete":
            connections.append(info["return_value"])

    token_counts = [5 + i % 4 for i in range(20)]
    async with httpx.AsyncClient(
        base_url=h2c_gateway.url, http1=False, http2=True, timeout=20
    ) as client:
        streams = await asyncio.gather(
            *(stream_run(client, {"tokens": n, "itl_ms": 20}, trace=trace) for n in token_counts)
        )

    assert len(connections) == 1
    for stream, tokens in zip(streams, token_counts, strict=True):
        assert stream.http_version == "HTTP/2"
        assert stream.events[0][0] == "run.started"
        assert stream.terminal_events == ["run.completed"]
        assert stream.events[-1][0] == "run.completed"
        assert stream.text == expected_text(tokens)
    # Multiplexed, not queued: every stream had begun before the first one ended.
    assert max(s.first_event_at for s in streams) < min(s.ended_at for s in streams)
    assert '"path": "/v1/runs"' in h2c_gateway.log()  # our own request line, in JSON


async def test_openai_sdk_streams_over_h2c(h2c_gateway: Server) -> None:
    async with httpx.AsyncClient(http1=False, http2=True) as http_client:
        client = openai.AsyncOpenAI(
            base_url=h2c_gateway.url + "/v1",
            api_key="sk-test",
            max_retries=0,
            http_client=http_client,
        )

        async def answer(tokens: int) -> tuple[str, str]:
            stream = await client.chat.completions.create(
                model="mock-model",
                messages=MESSAGES,
                stream=True,
                extra_body={"mock": {"tokens": tokens}},
            )
            pieces = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices]
            return stream.response.http_version, "".join(p or "" for p in pieces)

        answers = await asyncio.gather(*(answer(n) for n in (3, 7, 12)))
    assert answers == [("HTTP/2", expected_text(n)) for n in (3, 7, 12)]


def test_http1_is_still_served_on_the_h2c_port(h2c_gateway: Server) -> None:
    body = {"model": "mock-model", "messages": MESSAGES, "mock": {"tokens": 6}}
    with httpx.stream("POST", h2c_gateway.url + "/v1/runs", json=body, timeout=10) as response:
        assert response.http_version == "HTTP/1.1"
        assert response.headers["content-type"] == "text/event-stream"
        lines = list(response.iter_lines())
    events = [line[7:] for line in lines if line.startswith("event: ")]
    assert events[0] == "run.started"
    assert events[-1] == "run.completed"
    assert events.count("run.completed") == 1
    startup = h2c_gateway.log().splitlines()[0]
    assert f"on {h2c_gateway.url} with HTTP/2" in startup


async def test_tls_negotiates_h2_by_alpn_and_still_serves_http1(
    tls_gateway: Server, tls_files: tuple[Path, Path]
) -> None:
    verify = trusting(tls_files[0])
    async with httpx.AsyncClient(base_url=tls_gateway.url, http2=True, verify=verify) as h2:
        stream = await stream_run(h2, {"tokens": 4})
        response = await h2.get("/healthz")
        ssl_object = response.extensions["network_stream"].get_extra_info("ssl_object")
        assert ssl_object.selected_alpn_protocol() == "h2"
    assert stream.http_version == "HTTP/2"
    assert stream.terminal_events == ["run.completed"]
    assert stream.text == expected_text(4)

    async with httpx.AsyncClient(base_url=tls_gateway.url, http2=False, verify=verify) as h1:
        stream = await stream_run(h1, {"tokens": 4})
    assert stream.http_version == "HTTP/1.1"
    assert stream.terminal_events == ["run.completed"]
    assert stream.text == expected_text(4)
    assert f"on {tls_gateway.url} with HTTP/2" in tls_gateway.log()


async def test_sigterm_drains_http2_streams_and_exits_despite_an_idle_connection(
    mock_upstream: Server, tmp_path: Path
) -> None:
    port = free_port()
    gateway = start_server(
        ["serve", "--port", str(port), "--upstream", mock_upstream.url + "/v1", "--http2"],
        "/readyz",
        port,
        tmp_path / "gateway.log",
        {"TOKENRELAY_SERVER__DRAIN_GRACE": "1", "TOKENRELAY_SERVER__SEND_TIMEOUT": "2"},
    )
    try:
        async with (
            httpx.AsyncClient(base_url=gateway.url, http1=False, http2=True) as idle,
            httpx.AsyncClient(base_url=gateway.url, http1=False, http2=True, timeout=20) as client,
        ):
            # A pooled HTTP/2 connection that its client does not read while it is idle.
            assert (await idle.get("/healthz")).http_version == "HTTP/2"
            short = asyncio.create_task(stream_run(client, {"tokens": 8, "itl_ms": 50}))
            long = asyncio.create_task(stream_run(client, {"tokens": 500, "itl_ms": 50}))
            await asyncio.sleep(0.3)  # both streams are under way
            assert not short.done()
            signalled_at = time.monotonic()
            gateway.process.send_signal(signal.SIGTERM)
            short_run, long_run = await short, await long
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(gateway.process.wait, 15)
            exited_after = time.monotonic() - signalled_at
    finally:
        gateway.stop()

    assert short_run.terminal_events == ["run.completed"]
    assert short_run.text == expected_text(8)
    assert long_run.events[-1] == ("run.cancelled", {"reason": "shutting_down"})
    assert long_run.terminal_events == ["run.cancelled"]
    assert long_run.http_version == "HTTP/2"
    assert gateway.process.returncode == 0
    # The drain grace, then at most a ping interval and the send timeout for the idle connection
    # (without keep-alive pings granian would wait for it for ever).
    assert exited_after < 1 + 0.5 + 5 + 2 + 3
    log = gateway.log()
    assert '"gateway_draining"' in log
    assert "Traceback" not in log


def test_a_certificate_without_its_key_is_an_invalid_setting(tmp_path: Path) -> None:
    config = tmp_path / "tls.toml"
    config.write_text('[server]\ntls_certfile = "cert.pem"\n', encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "tokenrelay", "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "invalid setting server:" in result.stderr
    assert "tls_certfile and tls_keyfile are set together" in result.stderr


def test_an_unreadable_certificate_stops_the_start_with_a_message(tmp_path: Path) -> None:
    not_a_certificate = tmp_path / "cert.pem"
    not_a_certificate.write_text("not a certificate\n", encoding="utf-8")
    tls = ["--tls-certfile", str(not_a_certificate), "--tls-keyfile", str(not_a_certificate)]
    result = subprocess.run(
        [sys.executable, "-m", "tokenrelay", "serve", "--port", str(free_port()), *tls],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "cannot serve on https://127.0.0.1:" in result.stderr
    assert "Traceback" not in result.stderr


# Input limits as granian (hyper) enforces them; uvicorn's are in tests/api/test_input_limits.py.


def raw_connection(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=15)


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65_536):
            received += chunk
    return received


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "h2c"])
def test_headers_over_the_limit_get_431_from_granian(h2c_gateway: Server, http2: bool) -> None:
    padding = "a" * 17_000  # server.max_header_bytes is 16 KiB
    with httpx.Client(base_url=h2c_gateway.url, http1=not http2, http2=http2) as client:
        refused = client.get("/healthz", headers={"X-Padding": padding})
        assert refused.status_code == 431
        assert refused.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
    with httpx.Client(base_url=h2c_gateway.url, http1=not http2, http2=http2) as client:
        assert client.get("/healthz", headers={"X-Padding": "a" * 8_000}).status_code == 200


def test_headers_sent_slowly_are_cut_by_granian(h2c_strict_gateway: Server) -> None:
    """hyper closes the connection when the head is late; it sends no 408 (see operations)."""
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 400
    with raw_connection(h2c_strict_gateway) as sock:
        started = time.monotonic()
        for byte in head:  # 20 s at a byte every 50 ms, unless the gateway closes first
            try:
                sock.send(bytes([byte]))
            except OSError:
                break
            if select.select([sock], [], [], 0.05)[0]:
                break
        assert read_until_closed(sock) == b""
        assert time.monotonic() - started >= 0.8
    assert httpx.get(h2c_strict_gateway.url + "/healthz").status_code == 200


def test_a_body_sent_slowly_gets_408_from_granian_too(h2c_strict_gateway: Server) -> None:
    body = orjson.dumps({"model": "mock-model", "messages": MESSAGES, "mock": {"tokens": 2}})
    head = (
        b"POST /v1/runs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    with raw_connection(h2c_strict_gateway) as sock:
        sock.sendall(head)
        for byte in body:
            sock.send(bytes([byte]))
            if select.select([sock], [], [], 0.05)[0]:
                break
        response = http.client.HTTPResponse(sock)
        response.begin()
        problem = orjson.loads(response.read())
        assert response.status == 408
        assert response.getheader("content-type") == "application/problem+json"
        assert read_until_closed(sock) == b""  # the rest of the body is not waited for
    assert (problem["status"], problem["code"]) == (408, "request_timeout")
    with httpx.Client(base_url=h2c_strict_gateway.url, http1=False, http2=True) as client:
        stream_body = {"model": "mock-model", "messages": MESSAGES, "mock": {"tokens": 2}}
        assert client.post("/v1/runs", json=stream_body).status_code == 200


async def test_websocket_origin_is_checked_by_granian_too(
    h2c_gateway: Server,
) -> None:
    url = h2c_gateway.url.replace("http://", "ws://") + "/v1/ws"
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url, origin=Origin("https://evil.example.net")):
            pass
    assert refused.value.response.status_code == 403
    assert orjson.loads(refused.value.response.body)["code"] == "origin_not_allowed"
    async with connect(url, origin=Origin(h2c_gateway.url)) as ws:
        await ws.send(orjson.dumps({"type": "ping", "ref": 1}).decode())
        assert orjson.loads(await ws.recv()) == {"type": "pong", "ref": 1}
