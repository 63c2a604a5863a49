"""Transports render events to one wire format each, as pure functions of the events."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from tokenrelay.errors import TokenRelayError
from tokenrelay.events import Event


class StreamRenderer(Protocol):
    """Renders batches of events of one run into the bytes of one streaming response."""

    media_type: str
    heartbeat: bytes

    def render(self, events: Sequence[Event]) -> bytes:
        """The bytes for ``events``, in order; may be empty for events this format omits."""

    def render_error(self, error: TokenRelayError) -> bytes:
        """The last frame of a stream this reader cannot go on with (not a run event)."""
