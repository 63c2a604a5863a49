"""In-process implementations: the embedded default, needing no services."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence

from tokenrelay.errors import EndOfStream, EventsLost, NotFound
from tokenrelay.events import Event, RunInfo


class _RunEvents:
    __slots__ = ("bytes", "dropped", "events", "expiry", "waiters")

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.dropped = 0  # events trimmed from the front: events[0].seq == dropped + 1
        self.bytes = 0  # estimated size of the kept events
        # One future per waiting reader, each awaited only by its reader: waking a reader is a
        # set_result, and a reader that gives up (timeout, cancel) affects no other reader.
        self.waiters: list[asyncio.Future[None]] = []
        self.expiry: asyncio.TimerHandle | None = None


class MemoryStreamLog:
    """A StreamLog in a dict.

    Each run keeps at most ``max_events_per_run`` events and about ``max_bytes_per_run`` bytes.
    Finished runs are kept ``retention`` seconds after their end, and at most
    ``max_retained_events`` events of finished runs in all: past that the oldest finished runs
    are dropped first, so a busy process cannot grow without bound.
    """

    def __init__(
        self,
        retention: float = 600.0,
        max_retained_events: int = 1_000_000,
        max_events_per_run: int = 10_000,
        max_bytes_per_run: int = 4_194_304,
    ) -> None:
        self._retention = retention
        self._max_retained_events = max_retained_events
        self._max_events_per_run = max_events_per_run
        self._max_bytes_per_run = max_bytes_per_run
        self._runs: dict[str, _RunEvents] = {}
        self._sealed: OrderedDict[str, int] = OrderedDict()  # finished runs, oldest first
        self._sealed_events = 0

    async def create(self, run_id: str) -> None:
        self._runs[run_id] = _RunEvents()

    async def append(self, run_id: str, events: Sequence[Event]) -> None:
        run = self._get(run_id)
        run.events.extend(events)
        run.bytes += sum(_estimated_size(event) for event in events)
        if len(run.events) > self._max_events_per_run or run.bytes > self._max_bytes_per_run:
            self._trim(run)
        _wake(run)

    async def read(self, run_id: str, after: int, timeout: float | None) -> Sequence[Event]:
        run = self._get(run_id)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not (events := _after(run, run_id, after)):
            # Woken by every append: a cursor beyond the end waits until it is passed.
            if deadline is not None and loop.time() >= deadline:
                return ()
            waiter = loop.create_future()
            run.waiters.append(waiter)
            timer = None if deadline is None else loop.call_at(deadline, _resolve, waiter)
            try:
                await waiter
            finally:
                if timer is not None:
                    timer.cancel()
                if waiter in run.waiters:  # timed out or cancelled: no append took it out
                    run.waiters.remove(waiter)
        return events

    def _trim(self, run: _RunEvents) -> None:
        """Drop the oldest events (never the last one) until the run is within its bounds."""
        drop = 0
        while len(run.events) - drop > 1 and (
            len(run.events) - drop > self._max_events_per_run or run.bytes > self._max_bytes_per_run
        ):
            run.bytes -= _estimated_size(run.events[drop])
            drop += 1
        del run.events[:drop]
        run.dropped += drop

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


def _after(run: _RunEvents, run_id: str, after: int) -> Sequence[Event]:
    """The kept events after the cursor; empty if none yet (see StreamLog.read for the raises)."""
    start = after - run.dropped
    if start < 0:
        raise EventsLost(f"events {after + 1} to {run.dropped} of run {run_id} are no longer kept")
    if len(run.events) > start:
        return run.events[start:]
    if run.expiry is not None:
        raise EndOfStream
    return ()


def _estimated_size(event: Event) -> int:
    """About the bytes an event takes on the wire; exact for the common text delta."""
    content = event.data.get("content")
    if isinstance(content, str) and len(event.data) == 2:
        return len(content) + 64
    return len(event.data_json) + 48


def _wake(run: _RunEvents) -> None:
    waiters, run.waiters = run.waiters, []
    for waiter in waiters:
        _resolve(waiter)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class MemoryRunRegistry:
    """A RunRegistry in a dict, for one process; records expire like the stream log's runs."""

    def __init__(self, retention: float = 600.0, max_finished_runs: int = 100_000) -> None:
        self._retention = retention
        self._max_finished_runs = max_finished_runs
        self._runs: dict[str, RunInfo] = {}
        self._finished: OrderedDict[str, asyncio.TimerHandle] = OrderedDict()
        self._subscribers: dict[str, int] = {}
        self._cancels: asyncio.Queue[str] = asyncio.Queue()

    async def register(self, info: RunInfo) -> None:
        self._runs[info.id] = info

    async def get(self, run_id: str) -> RunInfo | None:
        return self._runs.get(run_id)

    async def finish(self, info: RunInfo) -> None:
        self._runs[info.id] = info
        if info.id not in self._finished:
            loop = asyncio.get_running_loop()
            self._finished[info.id] = loop.call_later(self._retention, self._forget, info.id)
            while len(self._finished) > self._max_finished_runs:
                self._forget(next(iter(self._finished)))

    async def add_subscriber(self, run_id: str, delta: int) -> int:
        count = self._subscribers.get(run_id, 0) + delta
        if count > 0:
            self._subscribers[run_id] = count
        else:
            self._subscribers.pop(run_id, None)
        return max(count, 0)

    async def request_cancel(self, run_id: str) -> None:
        self._cancels.put_nowait(run_id)

    async def cancel_requests(self) -> AsyncIterator[str]:
        while True:
            yield await self._cancels.get()

    def close(self) -> None:
        """Cancel the pending expiry timers (at shutdown)."""
        for timer in self._finished.values():
            timer.cancel()
        self._finished.clear()

    def _forget(self, run_id: str) -> None:
        timer = self._finished.pop(run_id, None)
        if timer is not None:
            timer.cancel()
        self._runs.pop(run_id, None)
        self._subscribers.pop(run_id, None)
