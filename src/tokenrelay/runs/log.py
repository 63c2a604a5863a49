"""The StreamLog: where a run's events live, so any subscriber can read them from any position."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from tokenrelay.events import Event


class StreamLog(Protocol):
    """Append-only, numbered event storage per run, readable from a cursor.

    ``seq`` of the events of one run is 1, 2, 3, … with no gaps, so ``after`` is simply the last
    ``seq`` a reader has seen (0 for the beginning). Each run keeps at most a bounded number of
    events and bytes; past the bounds its oldest events are dropped.
    """

    async def create(self, run_id: str) -> None:
        """Make an empty log for a new run."""

    async def append(self, run_id: str, events: Sequence[Event]) -> None:
        """Append events (already numbered in order) and wake the readers waiting on the run."""

    async def read(self, run_id: str, after: int, timeout: float | None) -> Sequence[Event]:
        """Events with ``seq > after``; if there are none yet, wait up to ``timeout`` seconds.

        Returns an empty sequence when the wait timed out.

        Raises:
            NotFound: the run is unknown or has expired.
            EventsLost: events after ``after`` were dropped by the per-run bounds.
            EndOfStream: the run is sealed and everything after ``after`` has been read.
        """

    async def seal(self, run_id: str) -> None:
        """The run has its terminal event: keep it for the retention period, then forget it."""
