"""Bad input is refused before it reaches the upstream, always as ``application/problem+json``.

One table of bad requests, sent to both endpoints that take a chat completion request. Each row
names the status, the stable ``code`` and, for 422, the field the client has to fix.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.conftest import GatewayFactory

ENDPOINTS = ["/v1/chat/completions", "/v1/runs"]
USER = {"role": "user", "content": "hello"}
GOOD: dict[str, Any] = {"model": "mock-model", "messages": [USER], "mock": {"tokens": 3}}
MAX_BODY = 1_048_576
GENERATED_ID = re.compile(r"^[0-9a-f]{16}$")

Content = bytes | Callable[[], Iterator[bytes]]


@dataclass(frozen=True)
class Bad:
    """One bad request and the problem it must produce."""

    content: Content
    status: int
    code: str
    field: str | None = None
    error_type: str | None = None


def body(**fields: Any) -> bytes:
    """A request body: GOOD with ``fields`` replaced (a value of ``...`` removes the field)."""
    merged = {**GOOD, **fields}
    return json.dumps({k: v for k, v in merged.items() if v is not ...}).encode()


def invalid(field: str, error_type: str | None = None, **fields: Any) -> Bad:
    return Bad(body(**fields), 422, "validation_failed", field, error_type)


def oversized() -> bytes:
    return body(messages=[{"role": "user", "content": "x" * (MAX_BODY + 1000)}])


def oversized_chunks() -> Iterator[bytes]:
    """The same oversized body as a generator: httpx sends it chunked, with no Content-Length."""
    data = oversized()
    for start in range(0, len(data), 64 * 1024):
        yield data[start : start + 64 * 1024]


TABLE = [
    pytest.param(
        Bad(b'{"model": "mock-model", "messages": [', 400, "invalid_json"), id="invalid-json"
    ),
    pytest.param(Bad(b"not json at all", 400, "invalid_json"), id="not-json"),
    pytest.param(
        Bad(json.dumps([GOOD]).encode(), 422, "validation_failed", "body"), id="json-array"
    ),
    pytest.param(Bad(b'"a string"', 422, "validation_failed", "body"), id="json-string"),
    pytest.param(invalid("model", "missing", model=...), id="missing-model"),
    pytest.param(invalid("model", model=42), id="model-not-string"),
    pytest.param(invalid("model", model=""), id="empty-model"),
    pytest.param(invalid("messages", "missing", messages=...), id="missing-messages"),
    pytest.param(invalid("messages", "too_short", messages=[]), id="empty-messages"),
    pytest.param(invalid("messages", messages="hello"), id="messages-not-a-list"),
    pytest.param(invalid("messages.0", messages=["hello"]), id="message-not-an-object"),
    pytest.param(
        invalid("messages.0.role", messages=[{"role": "wizard", "content": "hi"}]),
        id="unknown-role",
    ),
    pytest.param(invalid("messages.0.role", messages=[{"content": "hi"}]), id="missing-role"),
    pytest.param(invalid("temperature", temperature="hot"), id="temperature-word"),
    pytest.param(invalid("temperature", temperature="0.7"), id="temperature-numeric-string"),
    pytest.param(invalid("max_tokens", max_tokens="2"), id="max_tokens-numeric-string"),
    pytest.param(invalid("temperature", temperature=3), id="temperature-3"),
    pytest.param(invalid("temperature", temperature=-1), id="temperature-negative"),
    pytest.param(invalid("top_p", top_p=1.5), id="top_p-1.5"),
    pytest.param(invalid("n", n=0), id="n-0"),
    pytest.param(invalid("n", "limit_exceeded", n=2), id="n-over-max_n"),
    pytest.param(invalid("max_tokens", max_tokens=0), id="max_tokens-0"),
    pytest.param(invalid("presence_penalty", presence_penalty=5), id="presence_penalty-5"),
    pytest.param(
        invalid("stop", "limit_exceeded", stop=["a", "b", "c", "d", "e"]), id="five-stop-sequences"
    ),
    pytest.param(
        invalid("tools.0.type", tools=[{"type": "retrieval", "function": {"name": "f"}}]),
        id="tool-bad-type",
    ),
    pytest.param(invalid("tools.0.function", tools=[{"type": "function"}]), id="tool-no-function"),
    pytest.param(Bad(oversized(), 413, "body_too_large"), id="too-large-content-length"),
    pytest.param(Bad(oversized_chunks, 413, "body_too_large"), id="too-large-chunked"),
]


def send(base_url: str, path: str, content: Content, **headers: str) -> httpx.Response:
    payload = content() if callable(content) else content
    return httpx.post(
        base_url + path,
        content=payload,
        headers={"Content-Type": "application/json", **headers},
        timeout=10,
    )


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """A problem+json answer with ``status`` and ``code``, naming the response's request id."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem: dict[str, Any] = response.json()
    assert problem["status"] == status
    assert problem["code"] == code
    assert problem["type"] == f"urn:tokenrelay:problem:{code}"
    assert problem["retryable"] is False
    assert problem["title"]
    assert problem["detail"]
    assert problem["request_id"] == response.headers["x-request-id"]
    return problem


def upstream_requests(mock_url: str) -> list[Any]:
    requests: list[Any] = httpx.get(mock_url + "/mock/requests").json()["requests"]
    return requests


def check(response: httpx.Response, bad: Bad) -> None:
    problem = assert_problem(response, bad.status, bad.code)
    if bad.status == 422:
        fields = [error["field"] for error in problem["errors"]]
        assert bad.field in fields, problem
        assert all(error["message"] for error in problem["errors"])
        if bad.error_type is not None:
            assert {"field": bad.field, "type": bad.error_type}.items() <= next(
                e for e in problem["errors"] if e["field"] == bad.field
            ).items(), problem
    else:
        assert "errors" not in problem


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize("bad", TABLE)
def test_bad_request_is_a_problem(gateway_url: str, mock_url: str, path: str, bad: Bad) -> None:
    check(send(gateway_url, path, bad.content), bad)
    assert upstream_requests(mock_url) == []


LIMITS = {"TOKENRELAY_LIMITS__MAX_MESSAGES": "3", "TOKENRELAY_LIMITS__MAX_CONTENT_CHARS": "100"}
LIMIT_TABLE = [
    pytest.param(body(messages=[USER] * 4), id="four-messages"),
    pytest.param(body(messages=[{"role": "user", "content": "x" * 101}]), id="101-chars"),
    pytest.param(
        body(
            messages=[
                {"role": "user", "content": "x" * 60},
                {"role": "assistant", "content": "y" * 41},
            ]
        ),
        id="101-chars-over-two-messages",
    ),
    pytest.param(
        body(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "x" * 50},
                        {"type": "text", "text": "y" * 51},
                    ],
                }
            ]
        ),
        id="101-chars-in-parts",
    ),
]


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize("content", LIMIT_TABLE)
def test_configured_limits_are_enforced(
    gateway_factory: GatewayFactory, mock_url: str, path: str, content: bytes
) -> None:
    limited = gateway_factory(**LIMITS)
    problem = assert_problem(send(limited.url, path, content), 422, "validation_failed")
    assert problem["errors"] == [
        {"field": "messages", "message": problem["errors"][0]["message"], "type": "limit_exceeded"}
    ]
    assert upstream_requests(mock_url) == []


def test_requests_at_the_configured_limits_pass(
    gateway_factory: GatewayFactory, mock_url: str
) -> None:
    limited = gateway_factory(**LIMITS)
    messages = [{"role": "user", "content": "x" * 40}] * 2 + [{"role": "user", "content": "y" * 20}]
    response = send(limited.url, "/v1/chat/completions", body(messages=messages))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2 "
    assert [r["messages"] for r in upstream_requests(mock_url)] == [messages]


@pytest.mark.parametrize("path", ["/v1/nope", "/nope", "/v1/chat/completions/extra"])
def test_unknown_path_is_a_404_problem(gateway_url: str, path: str) -> None:
    for method in ("GET", "POST"):
        response = httpx.request(method, gateway_url + path, json=GOOD)
        problem = assert_problem(response, 404, "not_found")
        assert path in problem["detail"]


@pytest.mark.parametrize("path", ENDPOINTS)
def test_wrong_method_is_a_405_problem(gateway_url: str, mock_url: str, path: str) -> None:
    response = httpx.get(gateway_url + path)
    assert response.status_code == 405
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["allow"] == "POST"
    problem = response.json()
    assert problem["status"] == 405
    assert problem["request_id"] == response.headers["x-request-id"]
    assert problem["type"] == f"urn:tokenrelay:problem:{problem['code']}"
    assert problem["retryable"] is False
    # A wrong method is the client's mistake, not a bug in the gateway.
    assert problem["code"] != "internal_error", problem
    assert upstream_requests(mock_url) == []


def test_bad_input_changes_nothing(gateway_url: str, mock_url: str) -> None:
    """The whole table, then a normal request: served, and the only one the upstream ever saw."""
    for path in ENDPOINTS:
        for param in TABLE:
            (bad,) = param.values
            assert isinstance(bad, Bad)
            assert send(gateway_url, path, bad.content).status_code == bad.status
    assert upstream_requests(mock_url) == []

    response = send(gateway_url, "/v1/chat/completions", body())
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2 "
    with httpx.stream("POST", gateway_url + "/v1/runs", json=GOOD, timeout=10) as stream:
        assert stream.status_code == 200
        text = stream.read().decode()
    assert text.rstrip().endswith("event: run.completed\ndata: {}")
    assert len(upstream_requests(mock_url)) == 2
    assert httpx.get(gateway_url + "/readyz").json()["active_runs"] == 0


def test_client_request_id_is_echoed(gateway_url: str) -> None:
    bad = send(gateway_url, "/v1/runs", body(model=...), **{"X-Request-ID": "abc-123"})
    assert bad.headers["x-request-id"] == "abc-123"
    assert assert_problem(bad, 422, "validation_failed")["request_id"] == "abc-123"

    good = send(gateway_url, "/v1/chat/completions", body(), **{"X-Request-ID": "abc-123"})
    assert good.status_code == 200
    assert good.headers["x-request-id"] == "abc-123"


@pytest.mark.parametrize(
    "unsafe",
    [
        pytest.param("has spaces in it", id="spaces"),
        pytest.param("a" * 300, id="300-chars"),
        pytest.param("semi;colon", id="semicolon"),
        pytest.param("<script>", id="markup"),
    ],
)
def test_unsafe_request_id_is_replaced(gateway_url: str, unsafe: str) -> None:
    response = send(gateway_url, "/v1/chat/completions", b"[", **{"X-Request-ID": unsafe})
    replaced = response.headers["x-request-id"]
    assert replaced != unsafe
    assert GENERATED_ID.match(replaced)
    assert assert_problem(response, 400, "invalid_json")["request_id"] == replaced


def test_each_request_gets_its_own_id(gateway_url: str) -> None:
    ids = {send(gateway_url, "/v1/runs", b"{").headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5
    assert all(GENERATED_ID.match(i) for i in ids)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/runs"])
@pytest.mark.parametrize(
    "content_type", ["application/x-www-form-urlencoded", "text/plain", None], ids=str
)
def test_body_not_sent_as_json_is_415(
    gateway_url: str, mock_url: str, path: str, content_type: str | None
) -> None:
    body = b'{"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}'
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = httpx.post(gateway_url + path, content=body, headers=headers)
    assert response.status_code == 415
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "unsupported_media_type"
    assert httpx.get(mock_url + "/mock/requests").json()["requests"] == []


def test_json_with_charset_is_accepted(gateway_url: str) -> None:
    body = b'{"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}'
    headers = {"Content-Type": "application/json; charset=utf-8"}
    response = httpx.post(gateway_url + "/v1/chat/completions", content=body, headers=headers)
    assert response.status_code == 200
    assert response.json()["object"] == "chat.completion"
