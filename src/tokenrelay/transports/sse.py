"""Native events as Server-Sent Events: ``id: <seq>``, ``event: <type>``, ``data: <json>``.

``data`` is the compact native encoding, shared with NDJSON (``native_data``): no field whose
value is null, and no choice ``index`` when it is 0, the default. A text token is therefore
``{"content":"…"}`` and nothing else. The events themselves keep every field: the OpenAI format
is rendered from the same events and needs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import orjson

from tokenrelay.errors import TokenRelayError
from tokenrelay.events import Event, EventType

# A comment line: ignored by every SSE client, enough to keep idle proxies from closing the stream.
SSE_HEARTBEAT = b": heartbeat\n\n"

# Events that belong to one choice; their ``index`` is left out when it is 0.
_CHOICE_TYPES: Final = frozenset(
    {EventType.MESSAGE_DELTA, EventType.TOOL_CALL_DELTA, EventType.MESSAGE_COMPLETED}
)


def native_data(event: Event) -> bytes:
    """The compact JSON of an event's data, as the native formats send it."""
    data = event.data
    if event.type is EventType.MESSAGE_DELTA and len(data) == 2 and data.get("index") == 0:
        content = data.get("content")
        if type(content) is str:  # the hot path: a text token of the first choice
            return b'{"content":%s}' % orjson.dumps(content)
    default_index = event.type in _CHOICE_TYPES and data.get("index") == 0
    if default_index or None in data.values():
        data = {
            key: value
            for key, value in data.items()
            if value is not None and not (default_index and key == "index")
        }
    return orjson.dumps(data)


def encode_event(event: Event) -> bytes:
    """One event as one SSE frame."""
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.seq, event.type.encode(), native_data(event))


class NativeSSERenderer:
    media_type = "text/event-stream"
    heartbeat = SSE_HEARTBEAT

    def render(self, events: Sequence[Event]) -> bytes:
        return b"".join([encode_event(event) for event in events])

    def render_error(self, error: TokenRelayError) -> bytes:
        # No id: it is about this reader's stream, not an event of the run.
        return b"event: error\ndata: %s\n\n" % orjson.dumps(error.to_failure())
