"""The OpenAI-compatible relay, driven by the official ``openai`` SDK.

Each test asks the same thing of the mock directly and through the gateway, and compares what the
SDK hands the caller: the relay must be invisible.
"""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

MESSAGES: list[Any] = [{"role": "user", "content": "Say five words."}]


def sdk(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="sk-test", max_retries=0)


def async_sdk(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="sk-test", max_retries=0)


def without_generation_ids(chunk: dict[str, Any]) -> dict[str, Any]:
    """Ids and creation times differ per generation; the rest of a chunk must not."""
    assert chunk.pop("id").startswith("chatcmpl-mock-")
    chunk.pop("created")
    for choice in chunk["choices"]:
        for call in choice["delta"]["tool_calls"] or []:
            if call["id"] is not None:
                assert call.pop("id").startswith("call_mock_")
    return chunk


def stream_chunks(base_url: str, **extra: Any) -> list[dict[str, Any]]:
    stream = sdk(base_url).chat.completions.create(
        model="mock-model", messages=MESSAGES, stream=True, **extra
    )
    return [chunk.model_dump() for chunk in stream]


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({}, id="text"),
        pytest.param({"stream_options": {"include_usage": True}}, id="with-usage"),
        pytest.param({"extra_body": {"mock": {"tool_call": True}}}, id="tool-call"),
        pytest.param({"max_tokens": 3}, id="length-finish"),
    ],
)
def test_stream_through_gateway_equals_stream_from_upstream(
    gateway_url: str, mock_url: str, extra: dict[str, Any]
) -> None:
    direct = [without_generation_ids(c) for c in stream_chunks(mock_url, **extra)]
    relayed = [without_generation_ids(c) for c in stream_chunks(gateway_url, **extra)]
    assert relayed == direct


def test_relayed_chunks_keep_upstream_id_and_created(gateway_url: str) -> None:
    chunks = stream_chunks(gateway_url)
    assert len({(c["id"], c["created"]) for c in chunks}) == 1
    assert chunks[0]["id"].startswith("chatcmpl-mock-")
    assert chunks[0]["system_fingerprint"] == "fp_mock"
    text = "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks if c["choices"])
    assert text == "tok0 tok1 tok2 tok3 tok4 "
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_usage_chunk_only_when_asked(gateway_url: str) -> None:
    without = stream_chunks(gateway_url)
    assert all(c["usage"] is None for c in without)
    with_usage = stream_chunks(gateway_url, stream_options={"include_usage": True})
    assert with_usage[-1]["choices"] == []
    assert with_usage[-1]["usage"]["completion_tokens"] == 5


def test_tool_call_arguments_reassemble(gateway_url: str) -> None:
    chunks = stream_chunks(gateway_url, extra_body={"mock": {"tool_call": True}})
    calls = [c["choices"][0]["delta"]["tool_calls"] for c in chunks if c["choices"]]
    fragments = [call[0] for call in calls if call]
    assert fragments[0]["id"].startswith("call_mock_")
    assert fragments[0]["function"]["name"] == "get_weather"
    arguments = "".join(f["function"]["arguments"] or "" for f in fragments)
    assert arguments == '{"city": "Paris", "unit": "celsius"}'
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_async_client_streams_in_order(gateway_url: str) -> None:
    client = async_sdk(gateway_url)
    stream = await client.chat.completions.create(
        model="mock-model", messages=MESSAGES, stream=True, extra_body={"mock": {"tokens": 40}}
    )
    pieces = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices]
    assert "".join(p or "" for p in pieces) == "".join(f"tok{i} " for i in range(40))
    await client.close()


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({}, id="text"),
        pytest.param({"extra_body": {"mock": {"tool_call": True}}}, id="tool-call"),
    ],
)
def test_non_streaming_equals_upstream(
    gateway_url: str, mock_url: str, extra: dict[str, Any]
) -> None:
    direct = sdk(mock_url).chat.completions.create(model="mock-model", messages=MESSAGES, **extra)
    relayed = sdk(gateway_url).chat.completions.create(
        model="mock-model", messages=MESSAGES, **extra
    )
    direct_dump, relayed_dump = direct.model_dump(), relayed.model_dump()
    for dump in (direct_dump, relayed_dump):
        dump.pop("id")
        dump.pop("created")
        for choice in dump["choices"]:
            for call in choice["message"]["tool_calls"] or []:
                call.pop("id")
    assert relayed_dump == direct_dump


def test_unknown_fields_reach_the_upstream_untouched(gateway_url: str, mock_url: str) -> None:
    extra = {"top_k": 5, "guided_json": {"type": "object"}, "vendor_x": [1, "two", None]}
    stream_chunks(gateway_url, extra_body=extra, temperature=0.5)
    received = httpx.get(mock_url + "/mock/requests").json()["requests"][-1]
    assert {k: received[k] for k in extra} == extra
    assert received["temperature"] == 0.5
    assert received["messages"] == MESSAGES


def test_models_are_the_upstreams(gateway_url: str, mock_url: str) -> None:
    direct = sdk(mock_url).models.list()
    relayed = sdk(gateway_url).models.list()
    assert [m.id for m in relayed.data] == [m.id for m in direct.data] == ["mock-model"]


def test_response_names_its_run(gateway_url: str) -> None:
    raw = sdk(gateway_url).chat.completions.with_raw_response.create(
        model="mock-model", messages=MESSAGES, stream=True
    )
    assert raw.headers["x-run-id"].startswith("run_")
    assert raw.headers["cache-control"] == "no-cache"
    assert raw.headers["x-accel-buffering"] == "no"
    assert raw.headers["content-type"].startswith("text/event-stream")
    # The SDK asks for compression, gets one of the codings it named, and decodes it.
    asked = raw.http_request.headers["accept-encoding"]
    assert raw.headers["content-encoding"] in {coding.strip() for coding in asked.split(",")}
    assert raw.headers["vary"].lower() == "accept-encoding"
    chunks = [chunk.model_dump() for chunk in raw.parse()]
    text = "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks if c["choices"])
    assert text == "tok0 tok1 tok2 tok3 tok4 "
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("accept_encoding", [None, "identity"])
def test_stream_is_not_compressed_unless_asked(
    gateway_url: str, accept_encoding: str | None
) -> None:
    with httpx.Client(timeout=10) as client:
        del client.headers["accept-encoding"]  # httpx would ask for its own codings
        headers = {} if accept_encoding is None else {"Accept-Encoding": accept_encoding}
        response = client.post(
            gateway_url + "/v1/chat/completions",
            json={"model": "mock-model", "messages": MESSAGES, "stream": True},
            headers=headers,
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert "content-encoding" not in response.headers
    # The body is the plain event stream, chunk by chunk, ending as OpenAI's does.
    assert response.content.startswith(b"data: {")
    assert response.content.endswith(b"data: [DONE]\n\n")
