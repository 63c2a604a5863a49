"""Native events as Server-Sent Events: ``id: <seq>``, ``event: <type>``, ``data: <json>``."""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from tokenrelay.errors import TokenRelayError
from tokenrelay.events import Event

# A comment line: ignored by every SSE client, enough to keep idle proxies from closing the stream.
SSE_HEARTBEAT = b": heartbeat\n\n"


def encode_event(event: Event) -> bytes:
    """One event as one SSE frame."""
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.seq, event.type.encode(), event.data_json)


class NativeSSERenderer:
    media_type = "text/event-stream"
    heartbeat = SSE_HEARTBEAT

    def render(self, events: Sequence[Event]) -> bytes:
        return b"".join([encode_event(event) for event in events])

    def render_error(self, error: TokenRelayError) -> bytes:
        # No id: it is about this reader's stream, not an event of the run.
        return b"event: error\ndata: %s\n\n" % orjson.dumps(error.to_failure())
