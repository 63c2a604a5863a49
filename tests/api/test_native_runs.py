"""``POST /v1/runs``: native events, checked byte by byte as a client reads them off the socket."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import httpx
import pytest

MESSAGES = [{"role": "user", "content": "Say three words."}]
FRAME = re.compile(rb"id: (\d+)\nevent: ([a-z_.]+)\ndata: ([^\n]*)\n\n")


def run_request(**mock: Any) -> dict[str, Any]:
    return {"model": "mock-model", "messages": MESSAGES, "mock": {"tokens": 3, **mock}}


def post_run(base_url: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(base_url + "/v1/runs", json=body, headers=headers, timeout=10)


def parse_frames(raw: bytes) -> list[tuple[int, str, dict[str, Any]]]:
    """Split an SSE body into frames; every byte of the body must belong to one."""
    frames = []
    position = 0
    for match in FRAME.finditer(raw):
        assert match.start() == position, f"unexpected bytes: {raw[position : match.start()]!r}"
        position = match.end()
        data = match.group(3)
        decoded = json.loads(data)
        # Compact JSON: exactly what a minimal encoder writes, no spaces, key order kept.
        assert data == json.dumps(decoded, separators=(",", ":"), ensure_ascii=False).encode()
        frames.append((int(match.group(1)), match.group(2).decode(), decoded))
    assert position == len(raw), f"trailing bytes: {raw[position:]!r}"
    return frames


def test_sse_framing_and_event_order(uncoalesced_url: str) -> None:
    response = post_run(uncoalesced_url, run_request())
    assert response.status_code == 200
    frames = parse_frames(response.content)

    assert [seq for seq, _, _ in frames] == list(range(1, len(frames) + 1))
    types = [kind for _, kind, _ in frames]
    assert types == [
        "run.started",
        "message.delta",
        "message.delta",
        "message.delta",
        "message.delta",
        "message.completed",
        "usage",
        "run.completed",
    ]
    data = [d for _, _, d in frames]

    started = data[0]
    assert started["run_id"] == response.headers["x-run-id"]
    assert started["run_id"].startswith("run_")
    assert started["response_id"].startswith("chatcmpl-mock-")
    assert started["model"] == "mock-model"

    # Compact: no null fields, no choice index when it is the first choice.
    assert data[1] == {"role": "assistant", "content": ""}
    assert data[2:5] == [{"content": f"tok{i} "} for i in range(3)]
    assert data[5] == {"finish_reason": "stop"}
    assert data[6]["completion_tokens"] == 3
    assert data[6]["total_tokens"] == data[6]["prompt_tokens"] + 3
    assert data[7] == {}


def test_sse_headers(gateway_url: str) -> None:
    response = post_run(gateway_url, run_request(), **{"Accept-Encoding": "identity"})
    assert response.status_code == 200
    headers = response.headers
    assert headers["content-type"] == "text/event-stream"
    assert headers["cache-control"] == "no-cache"
    assert headers["x-accel-buffering"] == "no"
    assert headers["tokenrelay-event-version"] == "2"
    assert headers["x-run-id"].startswith("run_")
    assert "content-encoding" not in headers
    assert "content-length" not in headers


def test_sse_is_compressed_when_the_client_asks(gateway_url: str) -> None:
    response = post_run(gateway_url, run_request(), **{"Accept-Encoding": "gzip"})
    assert response.status_code == 200
    headers = response.headers
    assert headers["content-type"] == "text/event-stream"
    assert headers["content-encoding"] == "gzip"  # httpx decodes it below
    assert headers["vary"].lower() == "accept-encoding"
    assert headers["x-accel-buffering"] == "no"
    assert "content-length" not in headers
    frames = parse_frames(response.content)
    assert "".join(d.get("content", "") for _, k, d in frames if k == "message.delta") == (
        "tok0 tok1 tok2 "
    )
    assert frames[-1][1] == "run.completed"


def test_each_run_has_its_own_id(gateway_url: str) -> None:
    ids = [post_run(gateway_url, run_request(tokens=1)).headers["x-run-id"] for _ in range(3)]
    assert len(set(ids)) == 3


@pytest.mark.parametrize(
    "accept",
    [
        pytest.param(None, id="no-accept"),
        pytest.param("*/*", id="any"),
        pytest.param("text/event-stream", id="sse"),
        pytest.param("text/*", id="any-text"),
    ],
)
def test_sse_is_the_default(gateway_url: str, accept: str | None) -> None:
    headers = {} if accept is None else {"Accept": accept}
    response = post_run(gateway_url, run_request(tokens=1), **headers)
    assert response.headers["content-type"] == "text/event-stream"
    assert parse_frames(response.content)[-1][1] == "run.completed"


@pytest.mark.parametrize(
    "accept",
    [
        pytest.param("application/x-ndjson", id="ndjson"),
        pytest.param("text/html, application/x-ndjson", id="ndjson-second"),
    ],
)
def test_ndjson_carries_the_same_events(uncoalesced_url: str, accept: str) -> None:
    sse = parse_frames(post_run(uncoalesced_url, run_request()).content)
    response = post_run(
        uncoalesced_url, run_request(), Accept=accept, **{"Accept-Encoding": "gzip"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ndjson"
    assert response.headers["tokenrelay-event-version"] == "2"
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["content-encoding"] == "gzip"  # httpx decodes it below

    assert response.content.endswith(b"\n")
    lines = response.content.split(b"\n")[:-1]
    events = [json.loads(line) for line in lines]
    assert all(list(event) == ["seq", "type", "data"] for event in events)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["type"] for e in events] == [kind for _, kind, _ in sse]

    # Ids differ per run; everything after run.started is the same in both formats.
    assert events[0]["data"]["run_id"] == response.headers["x-run-id"]
    assert events[0]["data"]["model"] == "mock-model"
    assert [e["data"] for e in events[1:]] == [d for _, _, d in sse[1:]]


@pytest.mark.parametrize("accept", ["text/html", "application/json", "image/png, text/plain"])
def test_unacceptable_accept_is_a_406_problem(gateway_url: str, mock_url: str, accept: str) -> None:
    response = post_run(gateway_url, run_request(), Accept=accept)
    assert response.status_code == 406
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == "not_acceptable"
    assert problem["status"] == 406
    assert problem["request_id"] == response.headers["x-request-id"]
    assert httpx.get(mock_url + "/mock/requests").json()["requests"] == []


def test_tool_call_run(gateway_url: str) -> None:
    frames = parse_frames(post_run(gateway_url, run_request(tool_call=True)).content)
    assert frames[0][1] == "run.started"
    assert frames[-1] == (len(frames), "run.completed", {})
    deltas = [data for _, kind, data in frames if kind == "tool_call.delta"]
    assert len(deltas) >= 2
    # The first choice's index is left out; the fragments keep the upstream's own.
    assert all(list(d) == ["tool_calls"] and isinstance(d["tool_calls"], list) for d in deltas)
    calls = [d["tool_calls"][0] for d in deltas]
    assert calls[0]["id"].startswith("call_mock_")
    assert calls[0]["type"] == "function"
    assert calls[0]["function"]["name"] == "get_weather"
    assert all(call["index"] == 0 for call in calls)
    arguments = "".join(call["function"].get("arguments", "") for call in calls)
    assert json.loads(arguments) == {"city": "Paris", "unit": "celsius"}
    content = [d.get("content") for _, kind, d in frames if kind == "message.delta"]
    assert not any(content)
    completed = [d for _, kind, d in frames if kind == "message.completed"]
    assert completed == [{"finish_reason": "tool_calls"}]


def test_exactly_one_terminal_event_last(gateway_url: str) -> None:
    for mock in ({}, {"tool_call": True}, {"tokens": 0}):
        frames = parse_frames(post_run(gateway_url, run_request(**mock)).content)
        terminal = [
            kind for _, kind, _ in frames if kind.startswith("run.") and kind != "run.started"
        ]
        assert terminal == ["run.completed"]
        assert frames[-1][1] == "run.completed"


def test_events_reach_the_client_as_they_happen(gateway_url: str) -> None:
    """Like ``curl -N``: the first token is readable long before the run is over."""
    started = time.monotonic()
    first_token_at = None
    received = b""
    with httpx.stream(
        "POST", gateway_url + "/v1/runs", json=run_request(itl_ms=200), timeout=10
    ) as response:
        assert response.status_code == 200
        for chunk in response.iter_bytes():
            received += chunk
            if first_token_at is None and b'"content":"tok0 "' in received:
                first_token_at = time.monotonic() - started
    total = time.monotonic() - started
    assert first_token_at is not None
    assert first_token_at < total - 0.3, (first_token_at, total)
    frames = parse_frames(received)
    contents = [d["content"] for _, k, d in frames if k == "message.delta"]
    # The first token is never held back to be merged with later ones.
    assert contents[:2] == ["", "tok0 "]
    assert "".join(contents) == "tok0 tok1 tok2 "
