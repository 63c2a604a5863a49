"""MemoryLimitCounters: the limit counters of one process, in dicts.

Every operation runs without awaiting, so each is atomic on the event loop. The arithmetic is
the same as the Redis scripts' (``lua/limit_*.lua``); ``guards/counters.py`` describes it.
"""

from __future__ import annotations

import math
import time

from tokenrelay.guards.counters import LimitKey, SlotResult, WindowResult

# Seconds between sweeps of the counters nobody touched for long: a process serving many tenants
# in turn must not keep every one of them.
_SWEEP_INTERVAL = 60.0


class _Window:
    """A window counter: the current bucket's count and the previous one's."""

    __slots__ = ("bucket", "current", "length", "previous")

    def __init__(self, length: float) -> None:
        self.length = length
        self.bucket = 0
        self.current = 0
        self.previous = 0

    def roll(self, bucket: int) -> None:
        """Move to ``bucket``: the current count becomes the previous one, or both end."""
        if bucket == self.bucket + 1:
            self.previous, self.current = self.current, 0
        elif bucket != self.bucket:
            self.previous = self.current = 0
        self.bucket = bucket


class MemoryLimitCounters:
    """LimitCounters in this process (``store.backend = "memory"``): one instance's limits."""

    def __init__(self) -> None:
        self._windows: dict[LimitKey, _Window] = {}
        self._slots: dict[LimitKey, dict[str, float]] = {}  # holder -> end of its lease
        self._next_sweep = time.monotonic() + _SWEEP_INTERVAL

    async def hit(self, key: LimitKey, limit: int, window: float) -> WindowResult:
        return self._take(key, 1, limit, window)

    async def reserve(self, key: LimitKey, amount: int, limit: int, window: float) -> WindowResult:
        return self._take(key, amount, limit, window)

    async def adjust(self, key: LimitKey, delta: int, bucket: int) -> None:
        counter = self._windows.get(key)
        if counter is None:
            return
        if counter.bucket == bucket:
            counter.current = max(0, counter.current + delta)
        elif counter.bucket == bucket + 1:
            counter.previous = max(0, counter.previous + delta)

    async def acquire(self, key: LimitKey, limit: int, lease: float, holder: str) -> SlotResult:
        now = self._now()
        slots = self._slots.setdefault(key, {})
        for expired in [name for name, end in slots.items() if end <= now]:
            del slots[expired]
        if holder not in slots and len(slots) >= limit:
            return SlotResult(False, len(slots), min(slots.values()) - now)
        slots[holder] = now + lease
        return SlotResult(True, len(slots), 0.0)

    async def release(self, key: LimitKey, holder: str) -> None:
        slots = self._slots.get(key)
        if slots is not None:
            slots.pop(holder, None)
            if not slots:
                del self._slots[key]

    def _take(self, key: LimitKey, amount: int, limit: int, window: float) -> WindowResult:
        now = self._now()
        counter = self._windows.get(key)
        if counter is None or counter.length != window:
            counter = self._windows[key] = _Window(window)
        counter.roll(math.floor(now / window))
        elapsed = now - counter.bucket * window
        used = counter.previous * (window - elapsed) / window + counter.current
        if used + amount <= limit:
            counter.current += amount
            remaining = math.floor(limit - used - amount)
            return WindowResult(True, remaining, window - elapsed, counter.bucket)
        wait = _wait(counter, amount, limit, window, elapsed)
        return WindowResult(False, max(0, math.floor(limit - used)), wait, counter.bucket)

    def _now(self) -> float:
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + _SWEEP_INTERVAL
            self._sweep(now)
        return now

    def _sweep(self, now: float) -> None:
        """Forget windows whose buckets both ended and slot sets whose leases all did."""
        for key, counter in list(self._windows.items()):
            if math.floor(now / counter.length) > counter.bucket + 1:
                del self._windows[key]
        for key, slots in list(self._slots.items()):
            if all(end <= now for end in slots.values()):
                del self._slots[key]


def _wait(counter: _Window, amount: int, limit: int, window: float, elapsed: float) -> float:
    """Seconds until ``amount`` fits, the weight of the previous bucket falling linearly."""
    if amount > limit:
        return 2 * window  # never fits; the longest any count is remembered
    if counter.current + amount <= limit:
        # Within this bucket, once previous * weight has dropped enough.
        weight = (limit - counter.current - amount) / counter.previous
        return max(0.0, (1 - weight) * window - elapsed)
    # Next bucket: the current count becomes the previous one and starts to fade.
    weight = (limit - amount) / counter.current
    return window - elapsed + (1 - weight) * window
