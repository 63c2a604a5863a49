"""Native events as newline-delimited JSON: byte-exact lines in the compact native encoding."""

from __future__ import annotations

import json

import pytest

from tokenrelay.events import Event, EventType
from tokenrelay.transports.ndjson import NDJSON_HEARTBEAT, NDJSONRenderer, encode_event


def test_a_delta_line_is_byte_exact() -> None:
    event = Event(3, EventType.MESSAGE_DELTA, {"index": 0, "content": "hi"})
    assert encode_event(event) == b'{"seq":3,"type":"message.delta","data":{"content":"hi"}}\n'


@pytest.mark.parametrize(
    ("event", "line"),
    [
        pytest.param(
            Event(1, EventType.RUN_STARTED, {"run_id": "run_1"}),
            b'{"seq":1,"type":"run.started","data":{"run_id":"run_1"}}\n',
            id="run.started",
        ),
        pytest.param(
            Event(2, EventType.TOOL_CALL_DELTA, {"index": 1, "tool_calls": []}),
            b'{"seq":2,"type":"tool_call.delta","data":{"index":1,"tool_calls":[]}}\n',
            id="tool_call.delta-of-a-second-choice",
        ),
        pytest.param(
            Event(3, EventType.MESSAGE_COMPLETED, {"index": 0, "finish_reason": "stop"}),
            b'{"seq":3,"type":"message.completed","data":{"finish_reason":"stop"}}\n',
            id="message.completed",
        ),
        pytest.param(
            Event(2, EventType.RUN_STARTED, {"run_id": "r", "system_fingerprint": None}),
            b'{"seq":2,"type":"run.started","data":{"run_id":"r"}}\n',
            id="run.started-without-nulls",
        ),
        pytest.param(
            Event(9, EventType.RUN_COMPLETED, {}),
            b'{"seq":9,"type":"run.completed","data":{}}\n',
            id="run.completed",
        ),
        pytest.param(
            Event(4, EventType.RUN_FAILED, {"code": "c", "message": "m", "retryable": False}),
            b'{"seq":4,"type":"run.failed","data":{"code":"c","message":"m","retryable":false}}\n',
            id="run.failed",
        ),
        pytest.param(
            Event(5, EventType.RUN_CANCELLED, {"reason": "shutting_down"}),
            b'{"seq":5,"type":"run.cancelled","data":{"reason":"shutting_down"}}\n',
            id="run.cancelled",
        ),
    ],
)
def test_every_event_type_is_one_byte_exact_line(event: Event, line: bytes) -> None:
    assert encode_event(event) == line


def test_each_line_is_the_event_with_its_compact_data() -> None:
    events = [
        Event(1, EventType.RUN_STARTED, {"run_id": "r"}),
        Event(2, EventType.MESSAGE_DELTA, {"index": 0, "content": "a"}),
        Event(3, EventType.USAGE, {"total_tokens": 3}),
        Event(4, EventType.RUN_COMPLETED, {}),
    ]
    body = NDJSONRenderer().render(events)
    assert body.endswith(b"\n")
    lines = body.split(b"\n")[:-1]
    assert [json.loads(line) for line in lines] == [
        {"seq": 1, "type": "run.started", "data": {"run_id": "r"}},
        {"seq": 2, "type": "message.delta", "data": {"content": "a"}},
        {"seq": 3, "type": "usage", "data": {"total_tokens": 3}},
        {"seq": 4, "type": "run.completed", "data": {}},
    ]


def test_unicode_and_newlines_stay_inside_one_line() -> None:
    text = 'a\nb\r\nc \u2713 \u2028 \U0001f600 "q" \\'
    body = encode_event(Event(1, EventType.MESSAGE_DELTA, {"index": 0, "content": text}))
    assert body.count(b"\n") == 1
    assert body.endswith(b"\n")
    assert b"\r" not in body
    assert json.loads(body) == {
        "seq": 1,
        "type": "message.delta",
        "data": {"content": text},
    }


def test_render_of_no_events_is_empty() -> None:
    assert NDJSONRenderer().render([]) == b""


def test_media_type_and_heartbeat() -> None:
    renderer = NDJSONRenderer()
    assert renderer.media_type == "application/x-ndjson"
    assert renderer.heartbeat == NDJSON_HEARTBEAT == b'{"type":"heartbeat"}\n'
    assert json.loads(renderer.heartbeat) == {"type": "heartbeat"}
