"""The run registry: what is known about every run, whichever instance drives it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from tokenrelay.events import RunInfo


class RunRegistry(Protocol):
    """Run records, cross-instance subscriber counts and cancel requests.

    Records expire with the run's events (the StreamLog's retention).
    """

    async def register(self, info: RunInfo) -> None:
        """Record a new run."""

    async def get(self, run_id: str) -> RunInfo | None:
        """The run's record, or None if it never existed or has expired."""

    async def finish(self, info: RunInfo) -> None:
        """Replace the record of a run that ended; it now expires with the retention."""

    async def add_subscriber(self, run_id: str, delta: int) -> int:
        """Count readers on every instance (``delta`` +1 or -1); returns the new count."""

    async def request_cancel(self, run_id: str) -> None:
        """Ask the instance that drives the run to cancel it."""

    def cancel_requests(self) -> AsyncIterator[str]:
        """The run ids whose cancel was requested, as they come (for the driving instances)."""
        ...
