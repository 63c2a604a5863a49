"""Native events as Server-Sent Events: byte-exact frames in the compact native encoding."""

from __future__ import annotations

import json

import pytest

from tokenrelay.events import Event, EventType
from tokenrelay.sources.sse_parser import SSEDataParser
from tokenrelay.transports.sse import (
    SSE_HEARTBEAT,
    NativeSSERenderer,
    encode_event,
    native_data,
)

TRICKY_TEXT = 'l\u00ednea 1\nl\u00ednea 2\r\n\u2713 \u2028 "quoted" \\ \t\u0000 \U0001f600 end'


def test_a_delta_frame_is_byte_exact() -> None:
    event = Event(3, EventType.MESSAGE_DELTA, {"index": 0, "content": "hi"})
    assert encode_event(event) == b'id: 3\nevent: message.delta\ndata: {"content":"hi"}\n\n'


@pytest.mark.parametrize(
    ("event", "frame"),
    [
        pytest.param(
            Event(1, EventType.RUN_STARTED, {"run_id": "run_1", "model": "m"}),
            b'id: 1\nevent: run.started\ndata: {"run_id":"run_1","model":"m"}\n\n',
            id="run.started",
        ),
        pytest.param(
            Event(
                4,
                EventType.TOOL_CALL_DELTA,
                {"index": 0, "tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]},
            ),
            # The fragment's own index is the upstream's and stays.
            b"id: 4\nevent: tool_call.delta\n"
            b'data: {"tool_calls":[{"index":0,"function":{"arguments":"{\\"a\\":"}}]}\n\n',
            id="tool_call.delta",
        ),
        pytest.param(
            Event(5, EventType.MESSAGE_COMPLETED, {"index": 0, "finish_reason": "stop"}),
            b'id: 5\nevent: message.completed\ndata: {"finish_reason":"stop"}\n\n',
            id="message.completed",
        ),
        pytest.param(
            Event(6, EventType.USAGE, {"prompt_tokens": 1, "total_tokens": 2}),
            b'id: 6\nevent: usage\ndata: {"prompt_tokens":1,"total_tokens":2}\n\n',
            id="usage",
        ),
        pytest.param(
            Event(7, EventType.RUN_COMPLETED, {}),
            b"id: 7\nevent: run.completed\ndata: {}\n\n",
            id="run.completed",
        ),
        pytest.param(
            Event(
                12345,
                EventType.RUN_FAILED,
                {"code": "idle_timeout", "message": "no chunk", "retryable": True},
            ),
            b"id: 12345\nevent: run.failed\n"
            b'data: {"code":"idle_timeout","message":"no chunk","retryable":true}\n\n',
            id="run.failed",
        ),
        pytest.param(
            Event(2, EventType.RUN_CANCELLED, {"reason": "client_disconnected"}),
            b'id: 2\nevent: run.cancelled\ndata: {"reason":"client_disconnected"}\n\n',
            id="run.cancelled",
        ),
    ],
)
def test_every_event_type_is_one_byte_exact_frame(event: Event, frame: bytes) -> None:
    assert encode_event(event) == frame


def test_unicode_and_newlines_stay_inside_one_data_line() -> None:
    event = Event(1, EventType.MESSAGE_DELTA, {"index": 0, "content": TRICKY_TEXT})
    frame = encode_event(event)
    assert b"\r" not in frame
    lines = frame.split(b"\n")
    assert lines[:2] == [b"id: 1", b"event: message.delta"]
    assert lines[3:] == [b"", b""]  # exactly one data line, then the blank line
    assert lines[2].startswith(b"data: ")
    assert json.loads(lines[2][6:]) == {"content": TRICKY_TEXT}
    # Non-ASCII is sent as UTF-8, not escaped; control characters are JSON escapes.
    assert "\u2713".encode() in lines[2]
    assert b"\\n" in lines[2] and b"\\r" in lines[2] and b"\\u0000" in lines[2]


def test_render_joins_frames_in_order() -> None:
    events = [
        Event(1, EventType.RUN_STARTED, {"run_id": "r"}),
        Event(2, EventType.MESSAGE_DELTA, {"index": 0, "content": "a"}),
        Event(3, EventType.RUN_COMPLETED, {}),
    ]
    assert NativeSSERenderer().render(events) == (
        b'id: 1\nevent: run.started\ndata: {"run_id":"r"}\n\n'
        b'id: 2\nevent: message.delta\ndata: {"content":"a"}\n\n'
        b"id: 3\nevent: run.completed\ndata: {}\n\n"
    )


def test_render_of_no_events_is_empty() -> None:
    assert NativeSSERenderer().render([]) == b""


def test_media_type_and_heartbeat() -> None:
    renderer = NativeSSERenderer()
    assert renderer.media_type == "text/event-stream"
    assert renderer.heartbeat == SSE_HEARTBEAT == b": heartbeat\n\n"
    # The heartbeat is a comment: an SSE parser yields no event for it.
    assert SSEDataParser().feed(renderer.heartbeat) == []


def test_a_rendered_stream_parses_back_to_the_same_data() -> None:
    events = [
        Event(1, EventType.RUN_STARTED, {"run_id": "r", "model": "m"}),
        Event(2, EventType.MESSAGE_DELTA, {"index": 0, "content": TRICKY_TEXT}),
        Event(3, EventType.MESSAGE_DELTA, {"index": 0, "content": "\n\n"}),
        Event(4, EventType.RUN_COMPLETED, {}),
    ]
    body = NativeSSERenderer().render(events)
    payloads = SSEDataParser().feed(body)
    assert [json.loads(payload) for payload in payloads] == [
        {"run_id": "r", "model": "m"},
        {"content": TRICKY_TEXT},
        {"content": "\n\n"},
        {},
    ]


@pytest.mark.parametrize(
    ("event", "data"),
    [
        pytest.param(
            Event(2, EventType.MESSAGE_DELTA, {"index": 1, "content": "b"}),
            b'{"index":1,"content":"b"}',
            id="a-second-choice-keeps-its-index",
        ),
        pytest.param(
            Event(2, EventType.MESSAGE_DELTA, {"index": 0, "role": "assistant", "content": ""}),
            b'{"role":"assistant","content":""}',
            id="role-delta",
        ),
        pytest.param(
            Event(2, EventType.MESSAGE_DELTA, {"index": 0, "content": None, "refusal": "no"}),
            b'{"refusal":"no"}',
            id="null-content-left-out",
        ),
        pytest.param(
            Event(2, EventType.MESSAGE_DELTA, {"index": 2, "content": "x", "logprobs": None}),
            b'{"index":2,"content":"x"}',
            id="null-left-out-index-kept",
        ),
        pytest.param(
            Event(
                1,
                EventType.RUN_STARTED,
                {"run_id": "r", "model": "m", "system_fingerprint": None, "service_tier": None},
            ),
            b'{"run_id":"r","model":"m"}',
            id="run.started-without-nulls",
        ),
        pytest.param(
            Event(3, EventType.RUN_STATUS, {"status": "searching", "index": 0}),
            b'{"status":"searching","index":0}',
            id="index-of-a-non-choice-event-stays",
        ),
        pytest.param(
            Event(4, EventType.USAGE, {"prompt_tokens": 0, "completion_tokens": 0}),
            b'{"prompt_tokens":0,"completion_tokens":0}',
            id="zeros-that-are-not-an-index-stay",
        ),
    ],
)
def test_native_data_leaves_out_nulls_and_the_default_index(event: Event, data: bytes) -> None:
    assert native_data(event) == data
    assert encode_event(event) == b"id: %d\nevent: %s\ndata: %s\n\n" % (
        event.seq,
        event.type.encode(),
        data,
    )


def test_encoding_does_not_change_the_event() -> None:
    # The OpenAI format is rendered from the same event and needs every field.
    data = {"index": 0, "content": "hi", "logprobs": None}
    event = Event(2, EventType.MESSAGE_DELTA, dict(data))
    encode_event(event)
    assert event.data == data
