"""Deadlines of one upstream stream, enforced by a single timer.

Re-arming a timer for every chunk would allocate per token; instead a chunk only records the time
it arrived (``touch``) and the one timer, when it fires, checks the deadlines and re-arms itself
for the nearest one still ahead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from tokenrelay.config import TimeoutSettings


class Watchdog:
    """Watches first-token, idle-gap and total deadlines; calls ``on_expire`` once when one passes.

    ``expired`` then names the deadline: ``first_token_timeout``, ``idle_timeout`` or
    ``total_timeout``.
    """

    __slots__ = ("_handle", "_loop", "_on_expire", "_started", "_timeouts", "expired", "last_chunk")

    def __init__(
        self,
        timeouts: TimeoutSettings,
        on_expire: Callable[[], None],
        started: float | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeouts = timeouts
        self._on_expire = on_expire
        # ``started`` (loop time) lets the total deadline count what came before the stream.
        self._started = self._loop.time() if started is None else started
        self._handle: asyncio.TimerHandle | None = None
        self.last_chunk: float | None = None
        self.expired: str | None = None

    def start(self) -> None:
        self._arm()

    def touch(self) -> None:
        """Data arrived: the hot path, one clock read and one store."""
        first = self.last_chunk is None
        self.last_chunk = self._loop.time()
        if first and self._handle is not None:
            # From the first-token deadline to the idle one, which may come sooner: re-arm once.
            self._handle.cancel()
            self._arm()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _deadlines(self) -> tuple[float, str]:
        total = self._started + self._timeouts.total
        if self.last_chunk is None:
            gap, which = self._started + self._timeouts.first_token, "first_token_timeout"
        else:
            gap, which = self.last_chunk + self._timeouts.idle, "idle_timeout"
        return (gap, which) if gap < total else (total, "total_timeout")

    def _arm(self) -> None:
        deadline, _ = self._deadlines()
        self._handle = self._loop.call_at(deadline, self._check)

    def _check(self) -> None:
        deadline, which = self._deadlines()
        if self._loop.time() >= deadline:
            self._handle = None
            self.expired = which
            self._on_expire()
        else:
            self._arm()
