"""In-process implementations: the embedded default, needing no services."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Sequence

from tokenrelay.errors import NotFound
from tokenrelay.events import Event


class _RunEvents:
    __slots__ = ("events", "expiry", "waiters")

    def __init__(self) -> None:
        self.events: list[Event] = []
        # One future per waiting reader, each awaited only by its reader: waking a reader is a
        # set_result, and a reader that gives up (timeout, cancel) affects no other reader.
        self.waiters: list[asyncio.Future[None]] = []
        self.expiry: asyncio.TimerHandle | None = None


class MemoryStreamLog:
    """A StreamLog in a dict.

    Finished runs are kept ``retention`` seconds after their end, and at most
    ``max_retained_events`` events of finished runs in all: past that the oldest finished runs
    are dropped first, so a busy process cannot grow without bound.
    """

    def __init__(self, retention: float = 600.0, max_retained_events: int = 1_000_000) -> None:
        self._retention = retention
        self._max_retained_events = max_retained_events
        self._runs: dict[str, _RunEvents] = {}
        self._sealed: OrderedDict[str, int] = OrderedDict()  # finished runs, oldest first
        self._sealed_events = 0

    async def create(self, run_id: str) -> None:
        self._runs[run_id] = _RunEvents()

    async def append(self, run_id: str, events: Sequence[Event]) -> None:
        run = self._get(run_id)
        run.events.extend(events)
        _wake(run)

    async def read(self, run_id: str, after: int, timeout: float | None) -> Sequence[Event]:
        run = self._get(run_id)
        if len(run.events) > after:
            return run.events[after:]
        if run.expiry is not None:
            return ()  # sealed: nothing more will come
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        run.waiters.append(waiter)
        timer = None if timeout is None else loop.call_later(timeout, _resolve, waiter)
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            if waiter in run.waiters:  # timed out or cancelled: no append took it out
                run.waiters.remove(waiter)
        return run.events[after:]

    async def seal(self, run_id: str) -> None:
        run = self._get(run_id)
        _wake(run)
        if run.expiry is None:
            loop = asyncio.get_running_loop()
            run.expiry = loop.call_later(self._retention, self._forget, run_id)
            self._sealed[run_id] = len(run.events)
            self._sealed_events += len(run.events)
            while self._sealed_events > self._max_retained_events and len(self._sealed) > 1:
                self._forget(next(iter(self._sealed)))

    def _forget(self, run_id: str) -> None:
        run = self._runs.pop(run_id, None)
        if run is not None and run.expiry is not None:
            run.expiry.cancel()
        self._sealed_events -= self._sealed.pop(run_id, 0)

    def close(self) -> None:
        """Cancel the pending expiry timers (at shutdown)."""
        for run in self._runs.values():
            if run.expiry is not None:
                run.expiry.cancel()
        self._runs.clear()
        self._sealed.clear()
        self._sealed_events = 0

    def _get(self, run_id: str) -> _RunEvents:
        try:
            return self._runs[run_id]
        except KeyError:
            raise NotFound(f"run {run_id} does not exist or has expired") from None


def _wake(run: _RunEvents) -> None:
    waiters, run.waiters = run.waiters, []
    for waiter in waiters:
        _resolve(waiter)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
