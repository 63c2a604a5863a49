"""Native events as Server-Sent Events: byte-exact frames."""

from __future__ import annotations

import json

import pytest

from tokenrelay.events import Event, EventType
from tokenrelay.sources.sse_parser import SSEDataParser
from tokenrelay.transports.sse import SSE_HEARTBEAT, NativeSSERenderer, encode_event

TRICKY_TEXT = 'l\u00ednea 1\nl\u00ednea 2\r\n\u2713 \u2028 "quoted" \\ \t\u0000 \U0001f600 end'


def test_a_delta_frame_is_byte_exact() -> None:
    event = Event(3, EventType.MESSAGE_DELTA, {"index": 0, "content": "hi"})
    assert (
        encode_event(event) == b'id: 3\nevent: message.delta\ndata: {"index":0,"content":"hi"}\n\n'
    )


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
            b"id: 4\nevent: tool_call.delta\n"
            b'data: {"index":0,"tool_calls":[{"index":0,'
            b'"function":{"arguments":"{\\"a\\":"}}]}\n\n',
            id="tool_call.delta",
        ),
        pytest.param(
            Event(5, EventType.MESSAGE_COMPLETED, {"index": 0, "finish_reason": "stop"}),
            b'id: 5\nevent: message.completed\ndata: {"index":0,"finish_reason":"stop"}\n\n',
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
    assert json.loads(lines[2][6:]) == {"index": 0, "content": TRICKY_TEXT}
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
        b'id: 2\nevent: message.delta\ndata: {"index":0,"content":"a"}\n\n'
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
    assert [json.loads(payload) for payload in payloads] == [event.data for event in events]
