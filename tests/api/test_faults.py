"""Upstream faults, deadlines, retries, client disconnects and heartbeats, end to end.

Every test drives a real gateway process in front of the mock upstream (or in front of an upstream
that misbehaves below the HTTP level, see ``raw_upstream``) and checks what a client sees: a
problem document before the stream has started, exactly one terminal event after it, the events
before a failure intact, and the upstream released when the client goes away.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import FAST_TIMEOUTS, GatewayFactory, Server, free_port, start_server

MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]
TERMINAL_TYPES = {"run.completed", "run.failed", "run.cancelled"}
PROBLEM_MEDIA_TYPE = "application/problem+json"
HEARTBEAT = b": heartbeat\n\n"
# These tests read the bytes on the wire, so they ask for them uncompressed.
IDENTITY = {"Accept-Encoding": "identity"}


# --------------------------------------------------------------------------------------------
# Helpers: requests, SSE frames, the mock's counters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """One native SSE frame: ``id: <seq>``, ``event: <type>``, ``data: <json>``."""

    seq: int
    type: str
    data: Any


@dataclass
class Answer:
    """A whole HTTP answer of the gateway, with the time it took."""

    status: int
    headers: httpx.Headers
    body: bytes
    elapsed: float

    def json(self) -> Any:
        return json.loads(self.body)


def chat_body(mock: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "mock-model", "messages": MESSAGES, **extra}
    if mock is not None:
        body["mock"] = mock
    return body


def assert_no_traceback(body: bytes) -> None:
    assert b"Traceback" not in body, body[:2000]


def post(url: str, path: str, body: dict[str, Any], timeout: float = 15.0) -> Answer:
    """POST and read the whole (streamed) answer as the raw bytes on the wire."""
    started = time.monotonic()
    raw = b""
    with (
        httpx.Client(timeout=timeout) as client,
        client.stream("POST", url + path, json=body, headers=IDENTITY) as response,
    ):
        try:
            for piece in response.iter_raw():
                raw += piece
        except httpx.RemoteProtocolError as exc:
            pytest.fail(f"the gateway broke the response off ({exc}) after {raw[-400:]!r}")
        answer = Answer(response.status_code, response.headers, raw, time.monotonic() - started)
    assert_no_traceback(answer.body)
    return answer


def run_native(url: str, mock: dict[str, Any] | None = None, timeout: float = 15.0) -> Answer:
    return post(url, "/v1/runs", chat_body(mock), timeout)


def run_openai(url: str, mock: dict[str, Any] | None = None, timeout: float = 15.0) -> Answer:
    return post(url, "/v1/chat/completions", chat_body(mock, stream=True), timeout)


def blocks(raw: bytes) -> list[bytes]:
    """The SSE blocks of a complete body (comments included), without their blank lines."""
    assert raw.endswith(b"\n\n"), f"the stream does not end with a complete frame: {raw[-200:]!r}"
    return raw[:-2].split(b"\n\n")


def parse_frames(raw: bytes) -> list[Frame]:
    """Native frames of a complete SSE body; comment blocks (heartbeats) are skipped."""
    frames = []
    for block in blocks(raw):
        if block.startswith(b":"):
            assert block == HEARTBEAT[:-2], block
            continue
        lines = block.split(b"\n")
        assert [line.split(b": ", 1)[0] for line in lines] == [b"id", b"event", b"data"], block
        fields = {name: value for name, value in (line.split(b": ", 1) for line in lines)}
        frames.append(
            Frame(int(fields[b"id"]), fields[b"event"].decode(), json.loads(fields[b"data"]))
        )
    return frames


def check_native_stream(answer: Answer) -> list[Frame]:
    """A well-formed native stream: run.started first with seq 1, one terminal, last.

    Every event is there once: the seq rises by one per frame, except where text deltas were
    merged into one frame (which has the seq of the last of them); such a frame holds exactly as
    many of the mock's ``tokN`` tokens as the seq skipped.
    """
    assert answer.status == 200, answer.body
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert "content-encoding" not in answer.headers
    frames = parse_frames(answer.body)
    previous = 0
    for frame in frames:
        merged = frame.seq - previous
        if merged != 1:
            assert frame.type == "message.delta" and list(frame.data) == ["content"], frame
            assert frame.data["content"].count("tok") == merged, (previous, frame)
        previous = frame.seq
    assert frames[0] == Frame(1, "run.started", frames[0].data)
    terminals = [frame for frame in frames if frame.type in TERMINAL_TYPES]
    assert len(terminals) == 1, [frame.type for frame in frames]
    assert frames[-1] is terminals[0]
    return frames


def text(frames: list[Frame]) -> str:
    """The text of the content deltas joined, whether or not some were merged."""
    return "".join(f.data.get("content", "") for f in frames if f.type == "message.delta")


def tokens(count: int) -> str:
    return "".join(f"tok{i} " for i in range(count))


def assert_failed(frames: list[Frame], code: str) -> dict[str, Any]:
    terminal = frames[-1]
    assert terminal.type == "run.failed", terminal
    assert set(terminal.data) == {"code", "message", "retryable"}, terminal.data
    assert terminal.data["code"] == code, terminal.data
    assert isinstance(terminal.data["message"], str) and terminal.data["message"]
    assert isinstance(terminal.data["retryable"], bool)
    return dict(terminal.data)


def openai_data_lines(raw: bytes) -> list[bytes]:
    payloads = []
    for block in blocks(raw):
        if block.startswith(b":"):
            continue
        assert block.startswith(b"data: ") and b"\n" not in block, block
        payloads.append(block[6:])
    return payloads


def check_openai_error_stream(
    answer: Answer, code: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """An OpenAI stream that ends with one error chunk and no ``[DONE]``: (chunks, error)."""
    assert answer.status == 200, answer.body
    payloads = openai_data_lines(answer.body)
    assert b"[DONE]" not in payloads
    decoded = [json.loads(p) for p in payloads]
    errors = [d for d in decoded if "error" in d]
    assert len(errors) == 1 and decoded[-1] is errors[0], decoded[-3:]
    error = errors[0]["error"]
    assert set(error) == {"message", "type", "code", "retryable"}, error
    assert error["type"] == "tokenrelay_error"
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    return decoded[:-1], error


def chunk_text(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def problem(answer: Answer, status: int, code: str) -> dict[str, Any]:
    """The ``application/problem+json`` answer of a run that failed before its stream started."""
    assert answer.status == status, (answer.status, answer.body)
    assert answer.headers["content-type"].startswith(PROBLEM_MEDIA_TYPE), answer.headers
    body: dict[str, Any] = answer.json()
    assert body["code"] == code, body
    assert body["status"] == status, body
    assert body["type"] == f"urn:tokenrelay:problem:{code}"
    assert isinstance(body["detail"], str) and body["detail"]
    assert isinstance(body["retryable"], bool)
    return body


def sdk(url: str, timeout: float = 15.0) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=timeout)


def sdk_stream(url: str, mock: dict[str, Any]) -> tuple[list[Any], openai.APIError | None]:
    """Chunks the SDK yields for a streamed completion, and the error it raised, if any."""
    chunks: list[Any] = []
    with sdk(url) as client:
        try:
            stream = client.chat.completions.create(
                model="mock-model", messages=MESSAGES, stream=True, extra_body={"mock": mock}
            )
            with stream:
                chunks.extend(stream)
        except openai.APIError as exc:
            return chunks, exc
    return chunks, None


def sdk_text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def stats(mock_url: str) -> dict[str, int]:
    result: dict[str, int] = httpx.get(mock_url + "/mock/stats").json()
    return result


def mock_requests(mock_url: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = httpx.get(mock_url + "/mock/requests").json()["requests"]
    return result


def wait_for(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def scenario() -> str:
    return f"faults-{uuid.uuid4().hex}"


@pytest.fixture
def quiet_mock(mock_url: str) -> str:
    """The mock with no stream left over from an earlier test, its counters zeroed."""
    assert wait_for(lambda: stats(mock_url)["active_streams"] == 0, 3.0), stats(mock_url)
    httpx.post(mock_url + "/mock/reset")
    return mock_url


# --------------------------------------------------------------------------------------------
# Gateways
# --------------------------------------------------------------------------------------------

TWO_ATTEMPTS = {**FAST_TIMEOUTS, "TOKENRELAY_RETRIES__MAX_ATTEMPTS": "2"}
TOTAL_ONE_SECOND = {**FAST_TIMEOUTS, "TOKENRELAY_TIMEOUTS__TOTAL": "1"}
# Default deadlines (long), a fast heartbeat: upstream silence is shown, never punished.
FAST_HEARTBEAT = {"TOKENRELAY_SERVER__HEARTBEAT_INTERVAL": "0.2"}
# A first-token deadline well beyond the idle one.
LATE_FIRST_TOKEN = {**FAST_TIMEOUTS, "TOKENRELAY_TIMEOUTS__FIRST_TOKEN": "6"}


@pytest.fixture
def heartbeat_url(gateway_factory: GatewayFactory, quiet_mock: str) -> str:
    return gateway_factory(**FAST_HEARTBEAT).url


def start_gateway(upstream: str, log_dir: Path) -> Server:
    port = free_port()
    return start_server(
        ["serve", "--port", str(port), "--upstream", upstream],
        "/readyz",
        port,
        log_dir / "gateway.log",
        dict(FAST_TIMEOUTS),
    )


@pytest.fixture(scope="module")
def unreachable_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gateway whose upstream port has nothing listening on it."""
    closed_port = free_port()
    server = start_gateway(
        f"http://127.0.0.1:{closed_port}/v1", tmp_path_factory.mktemp("unreachable")
    )
    yield server.url
    server.stop()


class _RawUpstreamHandler(socketserver.BaseRequestHandler):
    """Reads one HTTP request and answers as its body's ``model`` asks, below HTTP semantics.

    ``no-answer``: never a status line. ``headers-only``: a 200 event stream and then silence.
    ``comments-only``: a 200 event stream of SSE comment lines, never a data event.
    ``json-200``: 200 with ``application/json`` instead of an event stream.
    """

    server: _RawUpstream

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(15)
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(65536)
            if not data:
                return
            head += data
        header, _, body = head.partition(b"\r\n\r\n")
        length = 0
        for line in header.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            data = sock.recv(65536)
            if not data:
                return
            body += data
        model = json.loads(body).get("model")
        self.server.models.append(model)
        stream_head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        try:
            if model == "headers-only":
                sock.sendall(stream_head)
            elif model == "comments-only":
                sock.sendall(stream_head)
                comment = b": keep-alive\n\n"
                frame = b"%x\r\n%s\r\n" % (len(comment), comment)
                while not self.server.stopping.wait(0.3):
                    sock.sendall(frame)
                return
            elif model == "json-200":
                payload = b'{"choices": []}'
                sock.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
                )
                return
            # Silence until the gateway gives up and closes the connection.
            while sock.recv(65536):
                pass
        except OSError:
            return


class _RawUpstream(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _RawUpstreamHandler)
        self.models: list[str] = []
        self.stopping = threading.Event()


@pytest.fixture(scope="module")
def raw_upstream_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gateway in front of ``_RawUpstream``."""
    upstream = _RawUpstream()
    thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    thread.start()
    port = upstream.server_address[1]
    server = start_gateway(f"http://127.0.0.1:{port}/v1", tmp_path_factory.mktemp("raw"))
    yield server.url
    server.stop()
    upstream.stopping.set()
    upstream.shutdown()
    upstream.server_close()
    thread.join(5)


# --------------------------------------------------------------------------------------------
# Before the first event: problem documents
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/runs", "/v1/chat/completions"])
def test_upstream_5xx_after_all_retries_is_502_upstream_error(
    gateway_url: str, mock_url: str, path: str
) -> None:
    answer = post(gateway_url, path, chat_body({"http_error": 500}, stream=True))
    body = problem(answer, 502, "upstream_error")
    assert body["retryable"] is True
    assert "500" in body["detail"]
    assert stats(mock_url)["requests"] == 3  # max_attempts defaults to 3


def test_upstream_429_after_all_retries_is_503_upstream_overloaded(
    gateway_url: str, mock_url: str
) -> None:
    body = problem(run_native(gateway_url, {"http_error": 429}), 503, "upstream_overloaded")
    assert body["retryable"] is True
    assert stats(mock_url)["requests"] == 3


@pytest.mark.parametrize("status", [400, 404])
def test_upstream_4xx_is_relayed_as_upstream_rejected_without_retry(
    gateway_url: str, mock_url: str, status: int
) -> None:
    body = problem(run_native(gateway_url, {"http_error": status}), status, "upstream_rejected")
    assert body["retryable"] is False
    assert f"HTTP {status}" in body["detail"]  # the upstream's own message
    assert len(mock_requests(mock_url)) == 1


def test_sdk_sees_pre_stream_failures_as_status_errors(gateway_url: str, mock_url: str) -> None:
    with sdk(gateway_url) as client:
        with pytest.raises(openai.BadRequestError) as rejected:
            client.chat.completions.create(
                model="mock-model",
                messages=MESSAGES,
                stream=True,
                extra_body={"mock": {"http_error": 400}},
            )
        with pytest.raises(openai.InternalServerError) as failed:
            client.chat.completions.create(
                model="mock-model",
                messages=MESSAGES,
                stream=True,
                extra_body={"mock": {"http_error": 503}},
            )
    assert isinstance(rejected.value.body, dict)
    assert rejected.value.body["code"] == "upstream_rejected"
    assert failed.value.status_code == 502
    assert isinstance(failed.value.body, dict)
    assert failed.value.body["code"] == "upstream_error"


def test_unreachable_upstream_is_502_upstream_unreachable(unreachable_url: str) -> None:
    body = problem(run_native(unreachable_url), 502, "upstream_unreachable")
    assert body["retryable"] is True
    with sdk(unreachable_url) as client, pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="mock-model", messages=MESSAGES, stream=True)
    assert caught.value.status_code == 502
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "upstream_unreachable"


def test_upstream_that_never_answers_is_504_first_token_timeout(raw_upstream_url: str) -> None:
    answer = post(raw_upstream_url, "/v1/runs", chat_body(model="no-answer"))
    body = problem(answer, 504, "first_token_timeout")
    assert body["retryable"] is True
    assert answer.elapsed >= 2.0  # TOKENRELAY_TIMEOUTS__FIRST_TOKEN


def test_event_stream_without_any_event_is_504_first_token_timeout(raw_upstream_url: str) -> None:
    answer = post(raw_upstream_url, "/v1/runs", chat_body(model="headers-only"))
    problem(answer, 504, "first_token_timeout")
    assert answer.elapsed >= 2.0


def test_sse_comments_do_not_hold_off_the_first_token_timeout(raw_upstream_url: str) -> None:
    """The first-token deadline runs until the first data event; keep-alive comments are not one."""
    try:
        answer = post(raw_upstream_url, "/v1/runs", chat_body(model="comments-only"), timeout=4.0)
    except httpx.ReadTimeout:
        pytest.fail(
            "an upstream sending only SSE comments kept the run waiting for 4 s; "
            "the first-token timeout is 2 s"
        )
    problem(answer, 504, "first_token_timeout")
    assert answer.elapsed >= 2.0


def test_upstream_answering_json_instead_of_a_stream_is_502_upstream_malformed(
    raw_upstream_url: str,
) -> None:
    answer = post(raw_upstream_url, "/v1/runs", chat_body(model="json-200"))
    problem(answer, 502, "upstream_malformed")


# --------------------------------------------------------------------------------------------
# Retries
# --------------------------------------------------------------------------------------------


def test_5xx_is_retried_until_the_upstream_recovers(gateway_url: str, mock_url: str) -> None:
    name = scenario()
    answer = run_native(gateway_url, {"http_error": 503, "http_error_times": 2, "scenario": name})
    frames = check_native_stream(answer)
    assert frames[-1].type == "run.completed"
    assert text(frames) == tokens(5)
    seen = [r for r in mock_requests(mock_url) if r.get("mock", {}).get("scenario") == name]
    assert len(seen) == 3


def test_max_attempts_bounds_the_retries(gateway_factory: GatewayFactory, mock_url: str) -> None:
    url = gateway_factory(**TWO_ATTEMPTS).url
    name = scenario()
    answer = run_native(url, {"http_error": 503, "http_error_times": 2, "scenario": name})
    problem(answer, 502, "upstream_error")
    assert len(mock_requests(mock_url)) == 2


def test_retry_after_is_honoured(gateway_url: str, mock_url: str) -> None:
    mock = {"http_error": 429, "http_error_times": 1, "retry_after": 0.3, "scenario": scenario()}
    answer = run_native(gateway_url, mock)
    frames = check_native_stream(answer)
    assert frames[-1].type == "run.completed"
    assert text(frames) == tokens(5)
    assert answer.elapsed >= 0.3
    assert len(mock_requests(mock_url)) == 2


def test_retry_after_beyond_the_maximum_is_not_waited_for(gateway_url: str, mock_url: str) -> None:
    answer = run_native(gateway_url, {"http_error": 429, "retry_after": 30})
    body = problem(answer, 503, "upstream_overloaded")
    assert body["retryable"] is True
    assert answer.headers["retry-after"] == "30"
    assert len(mock_requests(mock_url)) == 1


# --------------------------------------------------------------------------------------------
# Mid-stream faults
# --------------------------------------------------------------------------------------------

MID_STREAM_FAULTS = [
    pytest.param({"drop_after": 3}, "upstream_disconnected", id="drop"),
    pytest.param({"stall_after": 3}, "idle_timeout", id="stall"),
    pytest.param({"malformed_after": 3}, "upstream_malformed", id="malformed"),
    pytest.param({"error_after": 3}, "upstream_stream_error", id="error"),
]


@pytest.mark.parametrize(("fault", "code"), MID_STREAM_FAULTS)
def test_native_mid_stream_fault_ends_with_one_run_failed(
    gateway_url: str, fault: dict[str, Any], code: str
) -> None:
    answer = run_native(gateway_url, {"tokens": 10, **fault})
    frames = check_native_stream(answer)
    failure = assert_failed(frames, code)
    assert failure["retryable"] is True
    assert text(frames) == tokens(3)
    # run.started, the role delta, three tokens, run.failed: nothing lost, even if merged.
    assert frames[-1].seq == 6
    assert [f.type for f in frames[:2]] == ["run.started", "message.delta"]
    assert frames[1].data["role"] == "assistant"
    assert {f.type for f in frames[1:-1]} == {"message.delta"}
    if code == "idle_timeout":
        assert answer.elapsed >= 1.0  # TOKENRELAY_TIMEOUTS__IDLE
    if code == "upstream_stream_error":
        assert failure["message"] == "mock upstream failure"


@pytest.mark.parametrize(("fault", "code"), MID_STREAM_FAULTS)
def test_openai_mid_stream_fault_ends_with_one_error_chunk(
    gateway_url: str, fault: dict[str, Any], code: str
) -> None:
    chunks, error = check_openai_error_stream(
        run_openai(gateway_url, {"tokens": 10, **fault}), code
    )
    assert chunk_text(chunks) == "tok0 tok1 tok2 "
    assert error["retryable"] is True


@pytest.mark.parametrize(("fault", "code"), MID_STREAM_FAULTS)
def test_sdk_raises_api_error_with_the_code_mid_stream(
    gateway_url: str, fault: dict[str, Any], code: str
) -> None:
    chunks, error = sdk_stream(gateway_url, {"tokens": 10, **fault})
    assert type(error) is openai.APIError, error
    assert isinstance(error.body, dict)
    assert error.body["code"] == code
    assert error.body["type"] == "tokenrelay_error"
    assert error.body["retryable"] is True
    assert sdk_text(chunks) == "tok0 tok1 tok2 "
    if code == "upstream_stream_error":
        assert error.message == "mock upstream failure"


def test_idle_timeout_does_not_wait_for_the_first_token_deadline(
    gateway_factory: GatewayFactory, mock_url: str
) -> None:
    """Tokens flowed, then the upstream stalled: idle (1 s) applies, not first-token (6 s)."""
    url = gateway_factory(**LATE_FIRST_TOKEN).url
    try:
        answer = run_native(url, {"tokens": 10, "stall_after": 3}, timeout=3.0)
    except httpx.ReadTimeout:
        pytest.fail("a stream idle for 3 s was not ended although the idle timeout is 1 s")
    frames = check_native_stream(answer)
    assert_failed(frames, "idle_timeout")
    assert text(frames) == tokens(3)
    assert answer.elapsed >= 1.0


def test_long_ttft_after_the_role_chunk_is_an_idle_timeout(gateway_url: str) -> None:
    """The mock sends headers and the role chunk at once: the stream has started, then is idle."""
    answer = run_native(gateway_url, {"ttft_ms": 5000})
    frames = check_native_stream(answer)
    assert [f.type for f in frames] == ["run.started", "message.delta", "run.failed"]
    assert frames[1].data == {"role": "assistant", "content": ""}
    assert_failed(frames, "idle_timeout")
    assert answer.elapsed >= 1.0

    chunks, error = sdk_stream(gateway_url, {"ttft_ms": 5000})
    assert type(error) is openai.APIError
    assert isinstance(error.body, dict) and error.body["code"] == "idle_timeout"
    assert sdk_text(chunks) == ""


def test_total_timeout_ends_a_slow_stream(gateway_factory: GatewayFactory, mock_url: str) -> None:
    url = gateway_factory(**TOTAL_ONE_SECOND).url
    mock = {"tokens": 50, "itl_ms": 100}
    answer = run_native(url, mock)
    frames = check_native_stream(answer)
    assert_failed(frames, "total_timeout")
    received = text(frames)
    count = received.count("tok")
    assert 0 < count < 50
    assert received == tokens(count)
    assert answer.elapsed >= 1.0

    chunks, error = sdk_stream(url, mock)
    assert type(error) is openai.APIError
    assert isinstance(error.body, dict) and error.body["code"] == "total_timeout"
    streamed = sdk_text(chunks)
    assert streamed and tokens(50).startswith(streamed)


# --------------------------------------------------------------------------------------------
# Client disconnects
# --------------------------------------------------------------------------------------------


def _read_then_leave(url: str, mock: dict[str, Any], enough: Any, timeout: float = 10.0) -> bytes:
    """Stream a run and close the connection as soon as ``enough(raw_so_far)`` holds."""
    raw = b""
    with (
        httpx.Client(timeout=timeout) as client,
        client.stream("POST", url + "/v1/runs", json=chat_body(mock), headers=IDENTITY) as response,
    ):
        assert response.status_code == 200
        for piece in response.iter_raw():
            raw += piece
            if enough(raw):
                break
    assert_no_traceback(raw)
    return raw


@pytest.fixture
def no_grace_url(gateway_factory: GatewayFactory, quiet_mock: str) -> str:
    """A gateway whose /v1/runs runs stop as soon as their last reader leaves."""
    return gateway_factory(**FAST_TIMEOUTS, TOKENRELAY_RUNS__DISCONNECT_GRACE="0").url


def test_client_leaving_mid_stream_cancels_the_upstream(no_grace_url: str, quiet_mock: str) -> None:
    def enough(raw: bytes) -> bool:
        if b"tok2 " not in raw:  # its own delta, or merged into one with tok1
            return False
        assert stats(quiet_mock)["active_streams"] == 1
        return True

    raw = _read_then_leave(no_grace_url, {"tokens": 100, "itl_ms": 100}, enough)
    assert b"run.completed" not in raw
    assert wait_for(lambda: stats(quiet_mock)["client_disconnects"] == 1, 1.0), stats(quiet_mock)
    final = stats(quiet_mock)
    assert final["completed_streams"] == 0
    assert final["active_streams"] == 0


def test_client_leaving_while_the_first_token_is_awaited_cancels_the_upstream(
    gateway_factory: GatewayFactory, quiet_mock: str
) -> None:
    # Default deadlines (60 s, 30 s): only the client's departure can end this upstream stream.
    url = gateway_factory(TOKENRELAY_RUNS__DISCONNECT_GRACE="0").url

    def enough(raw: bytes) -> bool:
        if b"run.started" not in raw:
            return False
        time.sleep(0.5)  # the gateway waits for the first token with the client still there
        assert stats(quiet_mock)["active_streams"] == 1
        assert stats(quiet_mock)["client_disconnects"] == 0
        return True

    raw = _read_then_leave(url, {"ttft_ms": 5000}, enough)
    assert b"tok0" not in raw
    assert wait_for(lambda: stats(quiet_mock)["client_disconnects"] == 1, 1.0), stats(quiet_mock)
    assert stats(quiet_mock)["completed_streams"] == 0


def test_client_leaving_during_retries_stops_them(no_grace_url: str, quiet_mock: str) -> None:
    # Every attempt fails with 503 and asks for 0.5 s; the client gives up after 0.2 s.
    mock = {"http_error": 503, "retry_after": 0.5}
    with pytest.raises(httpx.ReadTimeout):
        run_native(no_grace_url, mock, timeout=0.2)
    assert stats(quiet_mock)["requests"] == 1
    time.sleep(1.2)  # two more attempts would have been made by now
    assert stats(quiet_mock)["requests"] == 1


def test_openai_client_leaving_cancels_the_upstream_at_once_by_default(
    gateway_url: str, quiet_mock: str
) -> None:
    # The default gateway gives /v1/runs readers a grace period; the OpenAI endpoint has none.
    body = {**chat_body({"tokens": 100, "itl_ms": 100}), "stream": True}
    raw = b""
    with (
        httpx.Client(timeout=10) as client,
        client.stream(
            "POST", gateway_url + "/v1/chat/completions", json=body, headers=IDENTITY
        ) as response,
    ):
        for piece in response.iter_raw():
            raw += piece
            if b'"tok2 "' in raw:
                break
    assert wait_for(lambda: stats(quiet_mock)["client_disconnects"] == 1, 1.0), stats(quiet_mock)
    assert stats(quiet_mock)["completed_streams"] == 0


# --------------------------------------------------------------------------------------------
# Heartbeats
# --------------------------------------------------------------------------------------------


def test_native_heartbeats_fill_the_wait_for_the_first_token(heartbeat_url: str) -> None:
    answer = run_native(heartbeat_url, {"ttft_ms": 700, "tokens": 3})
    frames = check_native_stream(answer)
    assert frames[-1].type == "run.completed"
    assert text(frames) == tokens(3)
    parts = blocks(answer.body)
    role = next(i for i, b in enumerate(parts) if b'"role":"assistant"' in b)
    first = next(i for i, b in enumerate(parts) if b'"tok0 "' in b)
    between = parts[role + 1 : first]
    assert len(between) >= 2, parts
    assert all(b + b"\n\n" == HEARTBEAT for b in between), between


def test_openai_heartbeats_fill_the_wait_and_the_sdk_ignores_them(heartbeat_url: str) -> None:
    answer = run_openai(heartbeat_url, {"ttft_ms": 700, "tokens": 3})
    assert answer.status == 200
    parts = blocks(answer.body)
    role = next(i for i, b in enumerate(parts) if b'"role":"assistant"' in b)
    first = next(i for i, b in enumerate(parts) if b'"tok0 "' in b)
    between = parts[role + 1 : first]
    assert len(between) >= 2, parts
    assert all(b + b"\n\n" == HEARTBEAT for b in between), between
    assert parts[-1] == b"data: [DONE]"

    chunks, error = sdk_stream(heartbeat_url, {"ttft_ms": 700, "tokens": 3})
    assert error is None
    assert sdk_text(chunks) == "tok0 tok1 tok2 "
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
