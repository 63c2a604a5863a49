"""A Subscription: one reader of one run, from a cursor."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from tokenrelay.events import Event
from tokenrelay.runs.log import StreamLog

if TYPE_CHECKING:
    from tokenrelay.runs.hub import Run


class Subscription:
    """Reads a run's events after ``cursor``. Close it when done: the Hub counts readers."""

    __slots__ = ("_closed", "_log", "_release", "cursor", "run", "run_id")

    def __init__(
        self,
        run_id: str,
        run: Run | None,
        after: int,
        log: StreamLog,
        release: Callable[[str, Any], Awaitable[None]],
    ) -> None:
        self.run_id = run_id
        self.run = run  # set when this process drives the run
        self.cursor = after
        self._log = log
        self._release = release
        self._closed = False

    async def next_batch(self, timeout: float | None) -> Sequence[Event]:
        """The events after the cursor, waiting up to ``timeout``; empty when the wait timed out.

        Raises:
            EndOfStream: the run has ended and every event has been read.
            EventsLost: the events after the cursor are no longer kept.
            NotFound: the run has expired.
        """
        events = await self._log.read(self.run_id, self.cursor, timeout)
        if events:
            self.cursor = events[-1].seq
        return events

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._release(self.run_id, self.run)
