"""Real servers on 127.0.0.1 for the whole suite: the mock upstream, gateways and Redis.

The first two are started through the ``tokenrelay`` command, exactly as a user starts them.
Gateways are cached per configuration, so tests that need short timeouts or a fast heartbeat get
their own process without paying a start-up per test. Redis is a real ``redis-server``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    """A server process of ours and the URL it answers on."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_server(
    args: list[str], ready_path: str, port: int, log_path: Path, env: dict[str, str] | None = None
) -> Server:
    """Run ``python -m tokenrelay ARGS`` and wait until ``ready_path`` answers 200."""
    full_env = {**os.environ, **(env or {})}
    with log_path.open("wb") as log_file:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "tokenrelay", *args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=full_env,
        )
    url = f"http://127.0.0.1:{port}"
    server = Server(process, url, log_path, env or {})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{server.log()}")
        try:
            if httpx.get(url + ready_path, timeout=0.5).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"server did not become ready:\n{server.log()}")


@pytest.fixture(scope="session")
def mock_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The mock OpenAI-compatible upstream, as ``tokenrelay mock-upstream``."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("mock") / "mock.log"
    server = start_server(
        ["mock-upstream", "--port", str(port), "--tokens", "5"], "/v1/models", port, log_path
    )
    yield server
    server.stop()


@pytest.fixture
def mock_url(mock_upstream: Server) -> Iterator[str]:
    """The mock's base URL, its statistics and request log reset for this test."""
    httpx.post(mock_upstream.url + "/mock/reset")
    yield mock_upstream.url


GatewayFactory = Callable[..., Server]


@pytest.fixture(scope="session")
def gateway_factory(
    mock_upstream: Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayFactory]:
    """Start (or reuse) a gateway relaying the mock, configured by ``TOKENRELAY_*`` variables."""
    started: dict[tuple[tuple[str, str], ...], Server] = {}

    def gateway(**env: str) -> Server:
        key = tuple(sorted(env.items()))
        if key not in started:
            port = free_port()
            log_path = tmp_path_factory.mktemp("gateway") / "gateway.log"
            started[key] = start_server(
                ["serve", "--port", str(port), "--upstream", mock_upstream.url + "/v1"],
                "/readyz",
                port,
                log_path,
                env,
            )
        return started[key]

    yield gateway
    for server in started.values():
        server.stop()


# Short deadlines so that fault tests finish in about a second each.
FAST_TIMEOUTS = {
    "TOKENRELAY_TIMEOUTS__FIRST_TOKEN": "2",
    "TOKENRELAY_TIMEOUTS__IDLE": "1",
    "TOKENRELAY_RETRIES__BACKOFF_INITIAL": "0.05",
    "TOKENRELAY_RETRIES__BACKOFF_MAX": "0.2",
}


@pytest.fixture(scope="session")
def gateway(gateway_factory: GatewayFactory) -> Server:
    """The gateway most tests use: defaults, but deadlines short enough for fault tests."""
    return gateway_factory(**FAST_TIMEOUTS)


@pytest.fixture
def gateway_url(gateway: Server, mock_url: str) -> str:
    """The default gateway's URL; the mock behind it is reset for this test."""
    return gateway.url


# Native streams merge text deltas that arrive close together; tests that count frames or expect
# ids 1, 2, 3, … without gaps turn that off.
ONE_EVENT_PER_DELTA = {"TOKENRELAY_STREAM__COALESCE_NATIVE_MS": "0"}


@pytest.fixture(scope="session")
def uncoalesced_gateway(gateway_factory: GatewayFactory) -> Server:
    """The default gateway, but sending one native event per delta, never merged."""
    return gateway_factory(**FAST_TIMEOUTS, **ONE_EVENT_PER_DELTA)


@pytest.fixture
def uncoalesced_url(uncoalesced_gateway: Server, mock_url: str) -> str:
    """``uncoalesced_gateway``'s URL; the mock behind it is reset for this test."""
    return uncoalesced_gateway.url


# Redis: a real redis-server, never a fake.


@dataclass
class RedisServer:
    """A disposable ``redis-server`` on a loopback port that a test may kill and start again."""

    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or start again, on the same port) and wait until it answers PING."""
        log_file = (self.directory / "redis.log").open("ab")
        with log_file:
            self.process = subprocess.Popen(
                [
                    "redis-server",
                    "--port", str(self.port),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", str(self.directory),
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited early:\n{self.log()}")
            if _redis_answers(self.port):
                return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server did not answer:\n{self.log()}")

    def kill(self) -> None:
        """Kill it at once (SIGKILL), as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_redis_server(directory: Path) -> RedisServer:
    """Start a disposable redis-server on a free port; skip the test if there is none to run."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (scripts/setup installs it)")
    server = RedisServer(free_port(), directory)
    server.start()
    return server


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis for the whole suite: ``REDIS_URL`` when set, else a redis-server of its own.

    Tests share it: each uses its own key prefix (``redis_prefix``).
    """
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    server = start_redis_server(tmp_path_factory.mktemp("redis"))
    yield server.url
    server.stop()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of this test's own."""
    return f"test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, to kill and restart; stopped at the end."""
    server = start_redis_server(tmp_path)
    yield server
    server.stop()
