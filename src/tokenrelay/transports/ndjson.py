"""Native tokenrelay events as newline-delimited JSON, one ``{"seq","type","data"}`` per line.

``data`` is the same compact encoding as the SSE format's (``sse.native_data``).
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from tokenrelay.errors import TokenRelayError
from tokenrelay.events import Event
from tokenrelay.transports.sse import native_data

NDJSON_HEARTBEAT = b'{"type":"heartbeat"}\n'


def encode_event(event: Event) -> bytes:
    return b'{"seq":%d,"type":"%s","data":%s}\n' % (
        event.seq,
        event.type.encode(),
        native_data(event),
    )


class NDJSONRenderer:
    media_type = "application/x-ndjson"
    heartbeat = NDJSON_HEARTBEAT

    def render(self, events: Sequence[Event]) -> bytes:
        return b"".join([encode_event(event) for event in events])

    def render_error(self, error: TokenRelayError) -> bytes:
        return b'{"type":"error","data":%s}\n' % orjson.dumps(error.to_failure())
