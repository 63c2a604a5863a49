"""Resumable runs over HTTP: Last-Event-ID reconnects, several readers, grace, detach, cancel."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import FAST_TIMEOUTS, GatewayFactory


@dataclass(frozen=True)
class Frame:
    seq: int
    type: str
    data: dict[str, Any]


def parse_frames(raw: bytes) -> list[Frame]:
    frames = []
    for block in raw.split(b"\n\n"):
        lines = dict(line.split(b": ", 1) for line in block.split(b"\n") if b": " in line)
        if b"id" in lines:
            frames.append(
                Frame(int(lines[b"id"]), lines[b"event"].decode(), orjson.loads(lines[b"data"]))
            )
    return frames


def body(mock: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "model": "mock-model",
        "messages": [{"role": "user", "content": "hi"}],
        "mock": mock,
        **extra,
    }


def read_until(url: str, payload: dict[str, Any], stop_after_seq: int) -> tuple[str, list[Frame]]:
    """Start a run, read frames until ``stop_after_seq``, then drop the connection.

    Frames past ``stop_after_seq`` that came in the same read are dropped, as if never received.
    """
    raw = b""
    with (
        httpx.Client(timeout=10) as client,
        client.stream("POST", url + "/v1/runs", json=payload) as response,
    ):
        assert response.status_code == 200
        run_id = response.headers["x-run-id"]
        for piece in response.iter_bytes():  # decoded: the stream may be compressed
            raw += piece
            frames = parse_frames(raw[: raw.rfind(b"\n\n") + 2])
            if frames and frames[-1].seq >= stop_after_seq:
                return run_id, [f for f in frames if f.seq <= stop_after_seq]
    raise AssertionError("the run ended before the cursor was reached")


def resume(
    url: str,
    run_id: str,
    headers: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
) -> httpx.Response:
    return httpx.get(
        f"{url}/v1/runs/{run_id}/events", headers=headers or {}, params=params, timeout=15
    )


def content(frames: list[Frame]) -> str:
    return "".join(f.data.get("content", "") for f in frames if f.type == "message.delta")


def tokens(n: int, start: int = 0) -> str:
    return "".join(f"tok{i} " for i in range(start, n))


def assert_consecutive(frames: list[Frame], first_seq: int) -> None:
    """Every event from ``first_seq`` on, once, whether or not text deltas were merged.

    The seq rises by one per frame, except at a merged text delta, which has the seq of the last
    delta in it: there it rises by the number of mock tokens (``tokN``) the frame holds.
    """
    previous = first_seq - 1
    for frame in frames:
        step = frame.seq - previous
        if step != 1:
            assert frame.type == "message.delta" and list(frame.data) == ["content"], frame
            assert frame.data["content"].count("tok") == step, (previous, frame)
        previous = frame.seq


def assert_every_event_once(everything: list[Frame], token_count: int) -> None:
    """Nothing lost, nothing repeated, in a whole run of ``token_count`` mock tokens."""
    assert_consecutive(everything, 1)
    assert content(everything) == tokens(token_count)
    assert [f.type for f in everything].count("run.completed") == 1
    assert everything[-1].type == "run.completed"
    # run.started, the role delta, one delta per token, message.completed, usage, run.completed.
    assert everything[-1].seq == token_count + 5


@pytest.mark.parametrize("how", ["last-event-id", "after"])
def test_reconnect_gets_exactly_the_remaining_events(gateway_url: str, how: str) -> None:
    run_id, seen = read_until(gateway_url, body({"tokens": 20, "itl_ms": 30}), stop_after_seq=6)
    cursor = seen[-1].seq
    if how == "last-event-id":
        response = resume(gateway_url, run_id, headers={"Last-Event-ID": str(cursor)})
    else:
        response = resume(gateway_url, run_id, params={"after": cursor})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    rest = parse_frames(response.content)
    assert rest[0].seq > cursor
    assert_every_event_once(seen + rest, 20)


def test_two_readers_see_identical_sequences(uncoalesced_url: str) -> None:
    # One event per delta: a merged stream depends on when each reader reads.
    response = httpx.post(
        uncoalesced_url + "/v1/runs",
        json=body({"tokens": 10, "itl_ms": 20}, detach=True),
        timeout=10,
    )
    run_id = response.headers["x-run-id"]
    first = parse_frames(response.content)
    second = parse_frames(resume(uncoalesced_url, run_id).content)
    assert [f.seq for f in first] == list(range(1, 16))
    assert first == second
    assert content(first) == tokens(10)


def test_detached_run_completes_with_no_reader_and_is_readable_after(
    gateway_url: str, mock_url: str
) -> None:
    run_id, _ = read_until(
        gateway_url, body({"tokens": 15, "itl_ms": 40}, detach=True), stop_after_seq=3
    )
    deadline = time.monotonic() + 10
    while httpx.get(f"{gateway_url}/v1/runs/{run_id}").json()["status"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    info = httpx.get(f"{gateway_url}/v1/runs/{run_id}").json()
    assert info["status"] == "completed"
    assert info["detached"] is True
    frames = parse_frames(resume(gateway_url, run_id).content)
    assert content(frames) == tokens(15)
    assert frames[-1].type == "run.completed"
    stats = httpx.get(mock_url + "/mock/stats").json()
    assert stats["completed_streams"] == 1 and stats["client_disconnects"] == 0
    # "detach" is the gateway's own option: the upstream never saw it.
    assert "detach" not in httpx.get(mock_url + "/mock/requests").json()["requests"][-1]


def test_run_without_reader_is_cancelled_after_the_grace_period(
    gateway_factory: GatewayFactory, mock_url: str
) -> None:
    url = gateway_factory(**FAST_TIMEOUTS, TOKENRELAY_RUNS__DISCONNECT_GRACE="0.5").url
    run_id, _ = read_until(url, body({"tokens": 200, "itl_ms": 50}), stop_after_seq=3)
    time.sleep(0.2)  # within the grace: still generating
    assert httpx.get(f"{url}/v1/runs/{run_id}").json()["status"] == "running"
    deadline = time.monotonic() + 5
    while httpx.get(f"{url}/v1/runs/{run_id}").json()["status"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    info = httpx.get(f"{url}/v1/runs/{run_id}").json()
    assert info["status"] == "cancelled"
    assert info["error_code"] == "client_disconnected"
    frames = parse_frames(resume(url, run_id).content)
    assert frames[-1] == Frame(frames[-1].seq, "run.cancelled", {"reason": "client_disconnected"})
    assert httpx.get(mock_url + "/mock/stats").json()["client_disconnects"] == 1


def test_reconnect_within_the_grace_period_loses_nothing(gateway_factory: GatewayFactory) -> None:
    url = gateway_factory(**FAST_TIMEOUTS, TOKENRELAY_RUNS__DISCONNECT_GRACE="2").url
    run_id, seen = read_until(url, body({"tokens": 30, "itl_ms": 30}), stop_after_seq=5)
    time.sleep(0.3)
    rest = parse_frames(resume(url, run_id, headers={"Last-Event-ID": str(seen[-1].seq)}).content)
    assert rest[0].seq > seen[-1].seq
    assert_every_event_once(seen + rest, 30)


def test_cancel_ends_a_run_with_run_cancelled(gateway_url: str, mock_url: str) -> None:
    run_id, _ = read_until(
        gateway_url, body({"tokens": 500, "itl_ms": 50}, detach=True), stop_after_seq=3
    )
    response = httpx.post(f"{gateway_url}/v1/runs/{run_id}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert response.json()["error_code"] == "cancelled"
    frames = parse_frames(resume(gateway_url, run_id).content)
    assert frames[-1].type == "run.cancelled"
    assert frames[-1].data == {"reason": "cancelled"}
    # Cancelling again changes nothing and says so.
    again = httpx.post(f"{gateway_url}/v1/runs/{run_id}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"


def test_status_of_a_run(gateway_url: str) -> None:
    response = httpx.post(gateway_url + "/v1/runs", json=body({"tokens": 2}), timeout=10)
    run_id = response.headers["x-run-id"]
    info = httpx.get(f"{gateway_url}/v1/runs/{run_id}").json()
    assert info["id"] == run_id
    assert info["object"] == "run"
    assert info["status"] == "completed"
    assert info["finished_at"] >= info["created_at"]


def test_openai_endpoint_names_its_run_and_the_run_is_resumable(gateway_url: str) -> None:
    response = httpx.post(
        gateway_url + "/v1/chat/completions",
        json={**body({"tokens": 4}), "stream": True},
        timeout=10,
    )
    run_id = response.headers["x-run-id"]
    frames = parse_frames(resume(gateway_url, run_id).content)
    assert content(frames) == tokens(4)


@pytest.mark.parametrize(
    ("path", "method"),
    [("/v1/runs/{id}", "GET"), ("/v1/runs/{id}/events", "GET"), ("/v1/runs/{id}/cancel", "POST")],
)
def test_unknown_run_is_404(gateway_url: str, path: str, method: str) -> None:
    response = httpx.request(method, gateway_url + path.format(id="run_000000000000000000000000"))
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "not_found"


def test_cursor_at_the_end_of_a_finished_run_is_an_empty_complete_stream(gateway_url: str) -> None:
    response = httpx.post(gateway_url + "/v1/runs", json=body({"tokens": 2}), timeout=10)
    last = parse_frames(response.content)[-1].seq
    after_end = resume(
        gateway_url, response.headers["x-run-id"], headers={"Last-Event-ID": str(last)}
    )
    assert after_end.status_code == 200
    assert after_end.content == b""


def test_cursor_beyond_the_end_waits_for_live_events(gateway_url: str) -> None:
    run_id, _ = read_until(
        gateway_url, body({"tokens": 10, "itl_ms": 50}, detach=True), stop_after_seq=2
    )
    response = resume(gateway_url, run_id, headers={"Last-Event-ID": "8"})
    frames = parse_frames(response.content)
    # Seq 3 is tok0, so 9 is tok6; a reader's first text delta is never held to be merged.
    assert frames[0] == Frame(9, "message.delta", {"content": "tok6 "})
    assert content(frames) == tokens(10, start=6)
    assert frames[-1].type == "run.completed"


def test_cursor_before_the_kept_window_is_410_events_lost(gateway_factory: GatewayFactory) -> None:
    url = gateway_factory(**FAST_TIMEOUTS, TOKENRELAY_RUNS__MAX_EVENTS_PER_RUN="5").url
    response = httpx.post(url + "/v1/runs", json=body({"tokens": 10}), timeout=10)
    run_id = response.headers["x-run-id"]
    lost = resume(url, run_id, params={"after": 0})
    assert lost.status_code == 410
    assert lost.headers["content-type"] == "application/problem+json"
    assert lost.json()["code"] == "events_lost"
    kept = parse_frames(resume(url, run_id, params={"after": 10}).content)
    assert kept[-1].type == "run.completed"


def test_malformed_last_event_id_is_422(gateway_url: str) -> None:
    response = httpx.post(gateway_url + "/v1/runs", json=body({"tokens": 1}), timeout=10)
    bad = resume(gateway_url, response.headers["x-run-id"], headers={"Last-Event-ID": "abc"})
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["field"] == "Last-Event-ID"
