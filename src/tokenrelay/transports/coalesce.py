"""Token coalescing: consecutive text deltas of one choice sent as one event.

A model streams a word or two per event, and each event costs a frame, a write and a wake-up of
the client. The coalescer holds text deltas for a short window and merges them: the merged event
carries the concatenated ``content`` and the ``seq`` of the LAST delta it holds, so its SSE id is
still an exact resume cursor (resuming after it repeats nothing and loses nothing).

Rules:

- Only ``message.delta`` events whose data is exactly ``index`` and ``content`` are merged, and
  only with deltas of the same ``index``; any other delta (a role, logprobs, reasoning text) goes
  as it is.
- The first text delta of a response is never held: the time to the first token does not grow.
- A held delta goes out once the window, counted from the first held delta, has passed, or once
  the merged text reaches ``max_bytes``.
- Any other event sends the held delta first, so the order of events is kept; the terminal event
  therefore always flushes.

The coalescer has no timer of its own: the response's read loop asks for ``deadline`` and waits
for the next events no longer than that, then calls ``push`` again. Pure and stateful per
response: events and the loop's clock in, events to render out.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenrelay.events import Event, EventType


class DeltaCoalescer:
    """Merges text deltas of one response within ``window`` seconds, up to ``max_bytes`` of text.

    Args:
        window: seconds a held delta may wait for more, counted from the first one held.
        max_bytes: a merged delta whose text reaches this many UTF-8 bytes is sent at once.
    """

    __slots__ = ("_held", "_held_bytes", "_max_bytes", "_started", "_window", "deadline")

    def __init__(self, window: float, max_bytes: int) -> None:
        self._window = window
        self._max_bytes = max_bytes
        self._started = False  # a text delta has been sent: later ones may wait
        self._held: list[Event] = []
        self._held_bytes = 0
        # The loop time by which the held delta must be sent; None while nothing is held.
        self.deadline: float | None = None

    def push(self, events: Sequence[Event], now: float) -> list[Event]:
        """The events to send now, in order, given new ``events`` (may be empty) at time ``now``."""
        ready: list[Event] = []
        for event in events:
            data = event.data
            if (
                event.type is EventType.MESSAGE_DELTA
                and len(data) == 2
                and "index" in data
                and type(data.get("content")) is str
            ):
                self._hold(event, now, ready)
            else:
                if self._held:
                    ready.append(self._release())
                ready.append(event)
        if self.deadline is not None and now >= self.deadline:
            ready.append(self._release())
        return ready

    def flush(self) -> list[Event]:
        """The held delta, if any, to send before a stream ends early."""
        return [self._release()] if self._held else []

    def _hold(self, event: Event, now: float, ready: list[Event]) -> None:
        text: str = event.data["content"]
        if not self._started:
            # Nothing to wait for before the first token; an empty text is not that token.
            self._started = bool(text)
            ready.append(event)
            return
        held = self._held
        if held and held[0].data["index"] != event.data["index"]:
            ready.append(self._release())
        if not held:
            self.deadline = now + self._window
        held.append(event)
        self._held_bytes += len(text) if text.isascii() else len(text.encode())
        if self._held_bytes >= self._max_bytes:
            ready.append(self._release())

    def _release(self) -> Event:
        """The held deltas as one event; the list is emptied in place, kept for the next hold."""
        held = self._held
        if len(held) == 1:
            merged = held[0]
        else:
            data = {
                "index": held[0].data["index"],
                "content": "".join([e.data["content"] for e in held]),
            }
            merged = Event(held[-1].seq, EventType.MESSAGE_DELTA, data)
        held.clear()
        self._held_bytes = 0
        self.deadline = None
        return merged
