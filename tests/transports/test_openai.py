"""Events rendered as OpenAI chat completion chunks (byte-exact) and as one whole completion."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tokenrelay.events import Event, EventType
from tokenrelay.sources.sse_parser import SSEDataParser
from tokenrelay.transports.openai import (
    DONE,
    OpenAIChunkRenderer,
    aggregate_completion,
    error_object,
)
from tokenrelay.transports.sse import SSE_HEARTBEAT

STARTED = {
    "response_id": "chatcmpl-1",
    "model": "gpt-test",
    "created": 1700000000,
    "system_fingerprint": "fp_1",
    "run_id": "run_abc",
}
# Everything of a chunk before its choices, for STARTED.
PREFIX = (
    b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"gpt-test","system_fingerprint":"fp_1","choices":'
)
USAGE = {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
TOOL_CALL_START = {
    "index": 0,
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": ""},
}


def events(*drafts: tuple[EventType, dict[str, Any]]) -> list[Event]:
    return [Event(seq, kind, data) for seq, (kind, data) in enumerate(drafts, start=1)]


def delta(index: int = 0, **fields: Any) -> tuple[EventType, dict[str, Any]]:
    return (EventType.MESSAGE_DELTA, {"index": index, **fields})


def tool_delta(*calls: dict[str, Any], index: int = 0) -> tuple[EventType, dict[str, Any]]:
    return (EventType.TOOL_CALL_DELTA, {"index": index, "tool_calls": list(calls)})


def completed(reason: str, index: int = 0) -> tuple[EventType, dict[str, Any]]:
    return (EventType.MESSAGE_COMPLETED, {"index": index, "finish_reason": reason})


SMALL_RUN = events(
    (EventType.RUN_STARTED, STARTED),
    delta(role="assistant", content=""),
    delta(content="Hel"),
    delta(content="lo"),
    tool_delta(TOOL_CALL_START),
    tool_delta({"index": 0, "function": {"arguments": '{"city":"Paris"}'}}),
    completed("stop"),
    (EventType.USAGE, USAGE),
    (EventType.RUN_COMPLETED, {}),
)


def frame(choices: bytes, tail: bytes = b"") -> bytes:
    return b"data: " + PREFIX + b"[" + choices + b"]" + tail + b"}\n\n"


EXPECTED_SMALL_RUN = [
    b"",
    frame(
        b'{"index":0,"delta":{"role":"assistant","content":""},'
        b'"logprobs":null,"finish_reason":null}'
    ),
    frame(b'{"index":0,"delta":{"content":"Hel"},"logprobs":null,"finish_reason":null}'),
    frame(b'{"index":0,"delta":{"content":"lo"},"logprobs":null,"finish_reason":null}'),
    frame(
        b'{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function",'
        b'"function":{"name":"get_weather","arguments":""}}]},'
        b'"logprobs":null,"finish_reason":null}'
    ),
    frame(
        b'{"index":0,"delta":{"tool_calls":[{"index":0,'
        b'"function":{"arguments":"{\\"city\\":\\"Paris\\"}"}}]},'
        b'"logprobs":null,"finish_reason":null}'
    ),
    frame(b'{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}'),
    None,  # usage: depends on include_usage
    b"data: [DONE]\n\n",
]
USAGE_FRAME = frame(b"", b',"usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}')


def render_each(renderer: OpenAIChunkRenderer, run: list[Event]) -> list[bytes]:
    return [renderer.render([event]) for event in run]


def chunks_of(body: bytes) -> list[dict[str, Any]]:
    """The JSON chunks of a rendered stream, up to ``[DONE]``."""
    payloads = SSEDataParser().feed(body)
    assert payloads[-1] == b"[DONE]"
    return [json.loads(payload) for payload in payloads[:-1]]


# The chunk stream


def test_small_run_without_usage_is_byte_exact() -> None:
    rendered = render_each(OpenAIChunkRenderer(include_usage=False), SMALL_RUN)
    expected = [b"" if part is None else part for part in EXPECTED_SMALL_RUN]
    assert rendered == expected


def test_small_run_with_usage_is_byte_exact() -> None:
    rendered = render_each(OpenAIChunkRenderer(include_usage=True), SMALL_RUN)
    expected = [USAGE_FRAME if part is None else part for part in EXPECTED_SMALL_RUN]
    assert rendered == expected


def test_rendering_in_one_batch_is_the_concatenation() -> None:
    whole = OpenAIChunkRenderer(include_usage=True).render(SMALL_RUN)
    assert whole == b"".join(render_each(OpenAIChunkRenderer(include_usage=True), SMALL_RUN))


def test_run_started_renders_nothing_and_run_completed_is_done() -> None:
    renderer = OpenAIChunkRenderer(include_usage=False)
    assert renderer.render([Event(1, EventType.RUN_STARTED, STARTED)]) == b""
    assert renderer.render([Event(2, EventType.RUN_COMPLETED, {})]) == DONE == b"data: [DONE]\n\n"


@pytest.mark.parametrize("include_usage", [False, True])
def test_every_chunk_validates_as_a_chat_completion_chunk(include_usage: bool) -> None:
    body = OpenAIChunkRenderer(include_usage=include_usage).render(SMALL_RUN)
    parsed = [ChatCompletionChunk.model_validate(chunk) for chunk in chunks_of(body)]
    assert len(parsed) == (7 if include_usage else 6)
    for chunk in parsed:
        assert chunk.id == "chatcmpl-1"
        assert chunk.object == "chat.completion.chunk"
        assert chunk.created == 1700000000
        assert chunk.model == "gpt-test"
        assert chunk.system_fingerprint == "fp_1"
    assert parsed[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in parsed if chunk.choices) == (
        "Hello"
    )
    tool_calls = parsed[3].choices[0].delta.tool_calls
    assert tool_calls is not None
    assert tool_calls[0].id == "call_1"
    assert tool_calls[0].function is not None
    assert tool_calls[0].function.name == "get_weather"
    assert parsed[5].choices[0].finish_reason == "stop"
    if include_usage:
        assert parsed[6].choices == []
        assert parsed[6].usage is not None
        assert parsed[6].usage.total_tokens == 6
    else:
        assert all(chunk.usage is None for chunk in parsed)


def test_unicode_and_newlines_stay_inside_one_data_line() -> None:
    text = 'a\nb\r\nc \u2713 \u2028 \U0001f600 "q" \\'
    renderer = OpenAIChunkRenderer(include_usage=False)
    renderer.render([Event(1, EventType.RUN_STARTED, STARTED)])
    body = renderer.render([Event(2, EventType.MESSAGE_DELTA, {"index": 0, "content": text})])
    assert body.count(b"\n") == 2 and body.endswith(b"\n\n")
    assert b"\r" not in body
    chunk = ChatCompletionChunk.model_validate(json.loads(body[len(b"data: ") :]))
    assert chunk.choices[0].delta.content == text


def test_other_delta_fields_and_logprobs() -> None:
    logprobs = {
        "content": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": []}]
    }
    renderer = OpenAIChunkRenderer(include_usage=False)
    renderer.render([Event(1, EventType.RUN_STARTED, STARTED)])
    body = renderer.render(
        events(
            delta(content="Hi", logprobs=logprobs),
            delta(refusal="no"),
        )
    )
    first, second = SSEDataParser().feed(body)
    assert first == PREFIX + (
        b'[{"index":0,"delta":{"content":"Hi"},"logprobs":{"content":[{"token":"Hi",'
        b'"logprob":-0.5,"bytes":[72,105],"top_logprobs":[]}]},"finish_reason":null}]}'
    )
    assert second == PREFIX + (
        b'[{"index":0,"delta":{"refusal":"no"},"logprobs":null,"finish_reason":null}]}'
    )
    chunk = ChatCompletionChunk.model_validate(json.loads(first))
    assert chunk.choices[0].logprobs is not None
    assert chunk.choices[0].logprobs.content is not None
    assert chunk.choices[0].logprobs.content[0].token == "Hi"
    assert ChatCompletionChunk.model_validate(json.loads(second)).choices[0].delta.refusal == "no"


def test_the_choice_index_is_kept() -> None:
    renderer = OpenAIChunkRenderer(include_usage=False)
    renderer.render([Event(1, EventType.RUN_STARTED, STARTED)])
    body = renderer.render(events(delta(index=1, content="b"), completed("length", index=1)))
    assert body == frame(
        b'{"index":1,"delta":{"content":"b"},"logprobs":null,"finish_reason":null}'
    ) + frame(b'{"index":1,"delta":{},"logprobs":null,"finish_reason":"length"}')


def test_envelope_without_a_response_id_uses_the_run_id() -> None:
    renderer = OpenAIChunkRenderer(include_usage=False)
    renderer.render([Event(1, EventType.RUN_STARTED, {"run_id": "run_abc"})])
    body = renderer.render([Event(2, EventType.MESSAGE_DELTA, {"index": 0, "content": "x"})])
    assert body == (
        b'data: {"id":"run_abc","object":"chat.completion.chunk","created":0,"model":"",'
        b'"choices":[{"index":0,"delta":{"content":"x"},"logprobs":null,"finish_reason":null}]}\n\n'
    )
    ChatCompletionChunk.model_validate(json.loads(body[len(b"data: ") :]))


def test_envelope_carries_the_service_tier() -> None:
    renderer = OpenAIChunkRenderer(include_usage=False)
    renderer.render([Event(1, EventType.RUN_STARTED, {**STARTED, "service_tier": "default"})])
    body = renderer.render([Event(2, EventType.MESSAGE_DELTA, {"index": 0, "content": "x"})])
    chunk = json.loads(body[len(b"data: ") :])
    assert chunk["service_tier"] == "default"
    assert list(chunk) == [
        "id",
        "object",
        "created",
        "model",
        "system_fingerprint",
        "service_tier",
        "choices",
    ]
    assert ChatCompletionChunk.model_validate(chunk).service_tier == "default"


def test_run_failed_is_an_error_frame() -> None:
    renderer = OpenAIChunkRenderer(include_usage=False)
    failed = Event(
        4,
        EventType.RUN_FAILED,
        {"code": "upstream_disconnected", "message": "the stream ended early", "retryable": True},
    )
    assert renderer.render([failed]) == (
        b'data: {"error":{"message":"the stream ended early","type":"tokenrelay_error",'
        b'"code":"upstream_disconnected","retryable":true}}\n\n'
    )


def test_a_not_retryable_failure_says_so() -> None:
    renderer = OpenAIChunkRenderer(include_usage=False)
    failed = Event(
        2, EventType.RUN_FAILED, {"code": "internal_error", "message": "m", "retryable": False}
    )
    payload = json.loads(renderer.render([failed])[len(b"data: ") :])
    assert payload == {
        "error": {
            "message": "m",
            "type": "tokenrelay_error",
            "code": "internal_error",
            "retryable": False,
        }
    }


@pytest.mark.parametrize("reason", ["client_disconnected", "cancelled", "shutting_down"])
def test_run_cancelled_is_an_error_frame_with_code_cancelled(reason: str) -> None:
    renderer = OpenAIChunkRenderer(include_usage=False)
    cancelled = Event(3, EventType.RUN_CANCELLED, {"reason": reason})
    assert renderer.render([cancelled]) == (
        b'data: {"error":{"message":"the run was cancelled (%s)","type":"tokenrelay_error",'
        b'"code":"cancelled","retryable":true}}\n\n' % reason.encode()
    )


def test_a_failed_run_ends_with_the_error_frame_and_no_done() -> None:
    run = events(
        (EventType.RUN_STARTED, STARTED),
        delta(content="par"),
        (EventType.RUN_FAILED, {"code": "idle_timeout", "message": "idle", "retryable": True}),
    )
    payloads = SSEDataParser().feed(OpenAIChunkRenderer(include_usage=False).render(run))
    assert len(payloads) == 2
    assert b"[DONE]" not in payloads
    assert json.loads(payloads[-1])["error"]["code"] == "idle_timeout"


def test_error_object() -> None:
    assert error_object("c", "m", False) == {
        "message": "m",
        "type": "tokenrelay_error",
        "code": "c",
        "retryable": False,
    }


def test_media_type_and_heartbeat() -> None:
    renderer = OpenAIChunkRenderer(include_usage=False)
    assert renderer.media_type == "text/event-stream"
    assert renderer.heartbeat == SSE_HEARTBEAT


# The whole completion


def test_aggregate_a_text_completion() -> None:
    run = events(
        (EventType.RUN_STARTED, STARTED),
        delta(role="assistant", content=""),
        delta(content="Hel"),
        delta(content="lo"),
        delta(content=", \u2713\n"),
        completed("stop"),
        (EventType.USAGE, USAGE),
        (EventType.RUN_COMPLETED, {}),
    )
    completion = aggregate_completion(run)
    assert completion == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-test",
        "system_fingerprint": "fp_1",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello, \u2713\n"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
    }
    parsed = ChatCompletion.model_validate(completion)
    assert parsed.choices[0].message.content == "Hello, \u2713\n"
    assert parsed.choices[0].finish_reason == "stop"
    assert parsed.usage is not None
    assert parsed.usage.total_tokens == 6


def test_aggregate_without_usage_has_no_usage() -> None:
    run = events(
        (EventType.RUN_STARTED, STARTED),
        delta(content="x"),
        completed("length"),
        (EventType.RUN_COMPLETED, {}),
    )
    completion = aggregate_completion(run)
    assert "usage" not in completion
    parsed = ChatCompletion.model_validate(completion)
    assert parsed.usage is None
    assert parsed.choices[0].finish_reason == "length"
    assert parsed.choices[0].message.content == "x"


@pytest.mark.parametrize(
    "first_delta",
    [
        pytest.param({"role": "assistant"}, id="role-only"),
        pytest.param({"role": "assistant", "content": ""}, id="empty-content"),
    ],
)
def test_aggregate_a_tool_call_only_answer(first_delta: dict[str, Any]) -> None:
    run = events(
        (EventType.RUN_STARTED, STARTED),
        delta(**first_delta),
        tool_delta(TOOL_CALL_START),
        tool_delta({"index": 0, "function": {"arguments": '{"ci'}}),
        tool_delta({"index": 0, "function": {"arguments": 'ty": "Pa'}}),
        tool_delta(
            {"index": 1, "id": "call_2", "type": "function", "function": {"name": "get_time"}}
        ),
        tool_delta({"index": 0, "function": {"arguments": 'ris"}'}}),
        tool_delta({"index": 1, "function": {"arguments": "{}"}}),
        completed("tool_calls"),
        (EventType.USAGE, USAGE),
        (EventType.RUN_COMPLETED, {}),
    )
    completion = aggregate_completion(run)
    assert completion["choices"] == [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": "{}"},
                    },
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ]
    parsed = ChatCompletion.model_validate(completion)
    message = parsed.choices[0].message
    assert message.content is None
    assert message.tool_calls is not None
    assert [call.id for call in message.tool_calls] == ["call_1", "call_2"]
    arguments = message.tool_calls[0].model_dump()["function"]["arguments"]
    assert json.loads(arguments) == {"city": "Paris"}
    assert parsed.choices[0].finish_reason == "tool_calls"


def test_aggregate_text_and_a_tool_call_keeps_the_text() -> None:
    run = events(
        (EventType.RUN_STARTED, STARTED),
        delta(role="assistant", content="Let me check."),
        tool_delta({**TOOL_CALL_START, "function": {"name": "f", "arguments": "{}"}}),
        completed("tool_calls"),
        (EventType.RUN_COMPLETED, {}),
    )
    parsed = ChatCompletion.model_validate(aggregate_completion(run))
    assert parsed.choices[0].message.content == "Let me check."
    assert parsed.choices[0].message.tool_calls is not None
    assert len(parsed.choices[0].message.tool_calls) == 1


def test_aggregate_several_choices_in_index_order() -> None:
    run = events(
        (EventType.RUN_STARTED, STARTED),
        delta(index=1, role="assistant", content=""),
        delta(index=0, role="assistant", content=""),
        delta(index=1, content="B"),
        delta(index=0, content="A"),
        completed("stop", index=1),
        completed("length", index=0),
        (EventType.RUN_COMPLETED, {}),
    )
    parsed = ChatCompletion.model_validate(aggregate_completion(run))
    assert [(c.index, c.message.content, c.finish_reason) for c in parsed.choices] == [
        (0, "A", "length"),
        (1, "B", "stop"),
    ]


def test_aggregate_joins_other_text_fields_and_ignores_logprobs() -> None:
    logprobs = {"content": [{"token": "a", "logprob": 0.0, "bytes": [97], "top_logprobs": []}]}
    run = events(
        (EventType.RUN_STARTED, STARTED),
        delta(role="assistant", refusal="I can"),
        delta(refusal="not."),
        delta(content="a", logprobs=logprobs),
        completed("stop"),
        (EventType.RUN_COMPLETED, {}),
    )
    completion = aggregate_completion(run)
    assert completion["choices"][0]["message"] == {
        "role": "assistant",
        "content": "a",
        "refusal": "I cannot.",
    }
    ChatCompletion.model_validate(completion)


def test_aggregate_without_a_response_id_uses_the_run_id() -> None:
    run = events(
        (EventType.RUN_STARTED, {"run_id": "run_abc"}),
        delta(content="x"),
        completed("stop"),
        (EventType.RUN_COMPLETED, {}),
    )
    completion = aggregate_completion(run)
    assert completion["id"] == "run_abc"
    assert completion["created"] == 0
    assert completion["model"] == ""
    assert "system_fingerprint" not in completion
    ChatCompletion.model_validate(completion)
