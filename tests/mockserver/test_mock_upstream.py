"""Tests for the mock upstream, against a real server on a free local port."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import openai
import orjson
import pytest

from tokenrelay.mockserver import MockDefaults, start_mock_server
from tokenrelay.mockserver.scenario import (
    FaultKind,
    MockOptionError,
    parse_chat_request,
    parse_mock_options,
)

DONE = b"data: [DONE]\n\n"
MALFORMED = b'data: {"id": "broken", this is not json\n\n'
ERROR_EVENT = (
    b'data: {"error":{"message":"mock upstream failure",'
    b'"type":"server_error","code":"mock_error"}}\n\n'
)


@pytest.fixture
async def base_url() -> AsyncIterator[str]:
    runner, port = await start_mock_server("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def _post(session: aiohttp.ClientSession, base_url: str, body: Any) -> tuple[int, bytes]:
    async with session.post(f"{base_url}/v1/chat/completions", json=body) as resp:
        return resp.status, await resp.read()


async def _stream_body(session: aiohttp.ClientSession, base_url: str, **body: Any) -> bytes:
    status, raw = await _post(session, base_url, {"stream": True, **body})
    assert status == 200
    return raw


def _events(raw: bytes) -> list[bytes]:
    """Split an SSE body into complete ``data: ...\\n\\n`` events."""
    assert raw.endswith(b"\n\n")
    return [part + b"\n\n" for part in raw[:-2].split(b"\n\n")]


def _payloads(raw: bytes) -> list[dict[str, Any]]:
    """Decode every JSON event, checking it is compact orjson output byte for byte."""
    result = []
    for event in _events(raw):
        if event == DONE:
            continue
        assert event.startswith(b"data: ")
        payload = event[len(b"data: ") : -2]
        decoded = orjson.loads(payload)
        assert orjson.dumps(decoded) == payload
        result.append(decoded)
    return result


async def _stats(session: aiohttp.ClientSession, base_url: str) -> dict[str, int]:
    async with session.get(f"{base_url}/mock/stats") as resp:
        stats: dict[str, int] = await resp.json()
        return stats


def _chunk(head: dict[str, Any], delta: dict[str, Any], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return b"data: " + orjson.dumps({**head, "choices": [choice]}) + b"\n\n"


async def test_stream_is_byte_exact(session: aiohttp.ClientSession, base_url: str) -> None:
    async with session.post(
        f"{base_url}/v1/chat/completions",
        json={"model": "gpt-test", "stream": True, "mock": {"tokens": 2}},
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["Cache-Control"] == "no-cache"
        raw = await resp.read()
    first = orjson.loads(_events(raw)[0][6:])
    assert first["id"].startswith("chatcmpl-mock-")
    assert isinstance(first["created"], int)
    head = {
        "id": first["id"],
        "object": "chat.completion.chunk",
        "created": first["created"],
        "model": "gpt-test",
        "system_fingerprint": "fp_mock",
    }
    assert _events(raw) == [
        _chunk(head, {"role": "assistant", "content": ""}),
        _chunk(head, {"content": "tok0 "}),
        _chunk(head, {"content": "tok1 "}),
        _chunk(head, {}, "stop"),
        DONE,
    ]
    assert _payloads(raw)[1]["choices"][0]["delta"] == {"content": "tok0 "}


async def test_include_usage(session: aiohttp.ClientSession, base_url: str) -> None:
    raw = await _stream_body(
        session,
        base_url,
        messages=[
            {"role": "system", "content": "abcdefghijkl"},
            {"role": "user", "content": [{"type": "text", "text": "wxyz"}]},
        ],
        stream_options={"include_usage": True},
        mock={"tokens": 3},
    )
    chunks = _payloads(raw)
    assert raw.endswith(DONE)
    assert len(chunks) == 6
    assert all("usage" in chunk and chunk["usage"] is None for chunk in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    assert chunks[-1]["id"] == chunks[0]["id"]


async def test_usage_absent_without_stream_options(
    session: aiohttp.ClientSession, base_url: str
) -> None:
    chunks = _payloads(await _stream_body(session, base_url, mock={"tokens": 1}))
    assert [("usage" in chunk) for chunk in chunks] == [False, False, False]


@pytest.mark.parametrize("limit_field", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_finishes_with_length(
    session: aiohttp.ClientSession, base_url: str, limit_field: str
) -> None:
    raw = await _stream_body(session, base_url, mock={"tokens": 10}, **{limit_field: 3})
    chunks = _payloads(raw)
    deltas = [chunk["choices"][0]["delta"].get("content") for chunk in chunks[1:-1]]
    assert deltas == ["tok0 ", "tok1 ", "tok2 "]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_large_unpaced_stream_keeps_order(
    session: aiohttp.ClientSession, base_url: str
) -> None:
    chunks = _payloads(await _stream_body(session, base_url, mock={"tokens": 1000}))
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    assert text == "".join(f"tok{i} " for i in range(1000))
    assert len(chunks) == 1002


async def test_tool_call_stream_reassembles(session: aiohttp.ClientSession, base_url: str) -> None:
    arguments = '{"query": "tokenrelay streaming", "limit": 3}'
    raw = await _stream_body(
        session, base_url, mock={"tool_call": {"name": "search", "arguments": arguments}}
    )
    chunks = _payloads(raw)
    header = chunks[1]["choices"][0]["delta"]["tool_calls"][0]
    assert header["index"] == 0
    assert header["id"].startswith("call_mock_")
    assert header["type"] == "function"
    assert header["function"] == {"name": "search", "arguments": ""}
    pieces = [
        chunk["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
        for chunk in chunks[2:-1]
    ]
    assert "".join(pieces) == arguments
    assert all(0 < len(piece) <= 8 for piece in pieces)
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "tool_calls",
    }


async def test_openai_sdk_streams(base_url: str) -> None:
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="mock-model",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_body={"mock": {"tokens": 3}},
        )
        parts: list[str] = []
        finish: list[str | None] = []
        async for chunk in stream:
            for choice in chunk.choices:
                parts.append(choice.delta.content or "")
                finish.append(choice.finish_reason)
    assert "".join(parts) == "tok0 tok1 tok2 "
    assert finish[-1] == "stop"


async def test_openai_sdk_non_streaming(base_url: str) -> None:
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0) as client:
        completion = await client.chat.completions.create(
            model="other-model",
            messages=[{"role": "user", "content": "12345678"}],
            extra_body={"mock": {"tokens": 4}},
        )
        tool = await client.chat.completions.create(
            model="other-model",
            messages=[{"role": "user", "content": "weather?"}],
            extra_body={"mock": {"tool_call": True}},
        )
    assert completion.object == "chat.completion"
    assert completion.model == "other-model"
    assert completion.choices[0].message.content == "tok0 tok1 tok2 tok3 "
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (2, 4)
    assert completion.usage.total_tokens == 6
    calls = tool.choices[0].message.tool_calls
    assert tool.choices[0].message.content is None
    assert calls is not None and len(calls) == 1
    assert calls[0].type == "function"
    assert calls[0].function.name == "get_weather"
    assert calls[0].function.arguments == '{"city": "Paris", "unit": "celsius"}'
    assert tool.choices[0].finish_reason == "tool_calls"


async def test_http_error_times_per_scenario(session: aiohttp.ClientSession, base_url: str) -> None:
    mock = {"http_error": 503, "http_error_times": 2, "scenario": "flaky", "retry_after": 1}
    results = []
    for _ in range(3):
        async with session.post(
            f"{base_url}/v1/chat/completions", json={"mock": {**mock, "tokens": 1}}
        ) as resp:
            results.append((resp.status, resp.headers.get("Retry-After"), await resp.json()))
    error = {
        "message": "mock upstream error (HTTP 503)",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    assert results[0] == (503, "1", {"error": error})
    assert results[1] == (503, "1", {"error": error})
    assert results[2][0] == 200
    assert results[2][1] is None
    assert results[2][2]["choices"][0]["message"]["content"] == "tok0 "
    other_status, _ = await _post(session, base_url, {"mock": {**mock, "scenario": "other"}})
    assert other_status == 503
    async with session.post(f"{base_url}/mock/reset") as resp:
        assert resp.status == 200
    again_status, _ = await _post(session, base_url, {"mock": mock})
    assert again_status == 503


async def test_http_error_without_times_always_fails(
    session: aiohttp.ClientSession, base_url: str
) -> None:
    statuses = []
    for _ in range(3):
        status, raw = await _post(session, base_url, {"stream": True, "mock": {"http_error": 429}})
        statuses.append(status)
    assert statuses == [429, 429, 429]
    assert orjson.loads(raw)["error"]["code"] == "rate_limit_exceeded"


async def test_drop_after_aborts_body(session: aiohttp.ClientSession, base_url: str) -> None:
    async with session.post(
        f"{base_url}/v1/chat/completions", json={"stream": True, "mock": {"drop_after": 2}}
    ) as resp:
        assert resp.status == 200
        received = b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async for data in resp.content.iter_any():
                received += data
    assert b'"tok1 "' in received
    assert b'"tok2 "' not in received
    assert DONE not in received
    stats = await _stats(session, base_url)
    assert (stats["completed_streams"], stats["client_disconnects"]) == (0, 0)


async def test_stall_then_client_leaves_counts_disconnect(
    session: aiohttp.ClientSession, base_url: str
) -> None:
    resp = await session.post(
        f"{base_url}/v1/chat/completions", json={"stream": True, "mock": {"stall_after": 1}}
    )
    received = b""
    while b'"tok0 "' not in received:
        received += await resp.content.readany()
    assert (await _stats(session, base_url))["active_streams"] == 1
    resp.close()
    deadline = time.monotonic() + 1.0
    stats = await _stats(session, base_url)
    while stats["client_disconnects"] != 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        stats = await _stats(session, base_url)
    assert stats["client_disconnects"] == 1
    assert stats["active_streams"] == 0
    assert stats["completed_streams"] == 0


async def test_stall_ends_when_server_stops(session: aiohttp.ClientSession) -> None:
    runner, port = await start_mock_server("127.0.0.1", 0)
    async with session.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json={"stream": True, "mock": {"stall_after": 0}},
    ) as resp:
        first = await resp.content.readany()
        assert b'"role":"assistant"' in first
        await runner.cleanup()
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_malformed_after_exact_bytes(session: aiohttp.ClientSession, base_url: str) -> None:
    raw = await _stream_body(session, base_url, mock={"malformed_after": 1})
    events = _events(raw)
    assert len(events) == 3
    assert b'"delta":{"content":"tok0 "}' in events[1]
    assert events[2] == MALFORMED
    assert raw.endswith(b'"finish_reason":null}]}\n\n' + MALFORMED)


async def test_error_after_exact_bytes(session: aiohttp.ClientSession, base_url: str) -> None:
    raw = await _stream_body(session, base_url, mock={"error_after": 2, "tokens": 5})
    events = _events(raw)
    assert len(events) == 4
    assert b'"delta":{"content":"tok1 "}' in events[2]
    assert events[3] == ERROR_EVENT
    stats = await _stats(session, base_url)
    assert stats["completed_streams"] == 1


async def test_itl_pacing_lower_bound(session: aiohttp.ClientSession, base_url: str) -> None:
    arrivals: list[float] = []
    started = time.monotonic()
    async with session.post(
        f"{base_url}/v1/chat/completions",
        json={"stream": True, "mock": {"tokens": 5, "itl_ms": 50}},
    ) as resp:
        buffer = b""
        async for line in resp.content:
            buffer += line
            if b'"content":"tok' in line:
                arrivals.append(time.monotonic())
    assert len(arrivals) == 5
    assert arrivals == sorted(arrivals)
    assert arrivals[-1] - started >= 0.2  # 4 gaps of 50 ms after the first token
    assert buffer.endswith(DONE)


async def test_bad_json_is_rejected(session: aiohttp.ClientSession, base_url: str) -> None:
    async with session.post(
        f"{base_url}/v1/chat/completions",
        data=b"{not json",
        headers={"Content-Type": "application/json", "Authorization": "Bearer anything"},
    ) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] is None
    assert body["error"]["code"] is None
    assert isinstance(body["error"]["message"], str)
    status, raw = await _post(session, base_url, [1, 2])
    assert status == 400
    assert orjson.loads(raw)["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("mock", "field"),
    [
        ({"tokns": 3}, "mock.tokns"),
        ({"tokens": "3"}, "mock.tokens"),
        ({"tokens": True}, "mock.tokens"),
        ({"itl_ms": -1}, "mock.itl_ms"),
        ({"http_error": 200}, "mock.http_error"),
        ({"http_error_times": 0}, "mock.http_error_times"),
        ({"tool_call": {"name": 1}}, "mock.tool_call.name"),
        ({"tool_call": "yes"}, "mock.tool_call"),
        ({"drop_after": -2}, "mock.drop_after"),
        ([1], "mock"),
    ],
)
async def test_bad_mock_option_names_field(
    session: aiohttp.ClientSession, base_url: str, mock: Any, field: str
) -> None:
    status, raw = await _post(session, base_url, {"mock": mock})
    assert status == 400
    error = orjson.loads(raw)["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == field
    assert field in error["message"]
    assert error["code"] is None


async def test_models_and_server_defaults(session: aiohttp.ClientSession) -> None:
    defaults = MockDefaults(tokens=2, models=("alpha", "beta"))
    runner, port = await start_mock_server("127.0.0.1", 0, defaults)
    try:
        async with session.get(f"http://127.0.0.1:{port}/v1/models") as resp:
            models = await resp.json()
        status, raw = await _post(session, f"http://127.0.0.1:{port}", {})
    finally:
        await runner.cleanup()
    assert models["object"] == "list"
    assert [model["id"] for model in models["data"]] == ["alpha", "beta"]
    for model in models["data"]:
        assert model["object"] == "model"
        assert model["owned_by"] == "tokenrelay-mock"
        assert isinstance(model["created"], int)
    assert status == 200
    body = orjson.loads(raw)
    assert body["model"] == "mock-model"
    assert body["choices"][0]["message"]["content"] == "tok0 tok1 "


async def test_request_log_and_stats(session: aiohttp.ClientSession, base_url: str) -> None:
    body = {"model": "m", "messages": [], "top_k": 5, "mock": {"tokens": 1}}
    await _post(session, base_url, body)
    await _stream_body(session, base_url, mock={"tokens": 1}, vendor_extension={"a": [1]})
    async with session.get(f"{base_url}/mock/requests") as resp:
        logged = (await resp.json())["requests"]
    assert logged == [body, {"stream": True, "mock": {"tokens": 1}, "vendor_extension": {"a": [1]}}]
    assert await _stats(session, base_url) == {
        "requests": 2,
        "active_streams": 0,
        "completed_streams": 1,
        "client_disconnects": 0,
    }
    async with session.post(f"{base_url}/mock/reset") as resp:
        assert (await resp.json())["requests"] == 0
    async with session.get(f"{base_url}/mock/requests") as resp:
        assert await resp.json() == {"requests": []}


def test_fault_precedence_and_defaults() -> None:
    scenario = parse_mock_options({"error_after": 2, "stall_after": 2, "drop_after": 5})
    assert scenario.fault is not None
    assert (scenario.fault.kind, scenario.fault.after) == (FaultKind.STALL, 2)
    assert parse_mock_options(None, MockDefaults(tokens=7, itl_ms=3)).tokens == 7
    assert parse_mock_options({"tool_call": False}).tool_call is None
    chat = parse_chat_request({"messages": [{"role": "user", "content": None}]})
    assert (chat.model, chat.stream, chat.prompt_tokens, chat.max_tokens) == (
        "mock-model",
        False,
        1,
        None,
    )
    with pytest.raises(MockOptionError) as excinfo:
        parse_chat_request({"max_tokens": -1})
    assert excinfo.value.param == "max_tokens"


def test_serve_forever_stops_on_sigterm() -> None:
    code = (
        "from tokenrelay.mockserver import MockDefaults, serve_mock_forever\n"
        "serve_mock_forever('127.0.0.1', 0, MockDefaults(), lambda p: print(p, flush=True))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        response = httpx.get(f"http://127.0.0.1:{port}/v1/models")
        assert response.json()["data"][0]["id"] == "mock-model"
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
