"""LimitCounters: the store behind per-tenant limits, shared by every instance when in Redis.

Two kinds of counter, each operation atomic (one Lua script per call in Redis):

- a **window counter** (requests per minute, tokens per minute): ``hit`` or ``reserve`` take an
  amount if it fits under the limit, ``adjust`` later corrects what a reservation took;
- **slots** (concurrent streams): ``acquire`` takes one for a holder, ``release`` gives it back,
  and a slot nobody released comes back by itself after its lease (an instance that crashed).

The window slides, approximated by two fixed buckets aligned to multiples of the window: the
current bucket counts fully, the previous one in proportion to the part of it still inside the
sliding window (so it assumes the previous bucket's use was spread evenly). It never admits more
than the limit into one bucket, and at most twice the limit in any window-long span, but usually
close to the limit, with two numbers per counter instead of one entry per request.

Why not the ``limits`` package, which the gateway would otherwise prefer: it has asyncio
strategies over memory and redis-py, but checking a hit and reading its window (remaining, reset
time for ``Retry-After``) are two calls, not one atomic step; a hit cannot be taken back when a
later limit refuses the request; a cost reserved up front cannot be corrected afterwards; it has
no leased slots; and it talks to Redis with a client and key layout of its own, bypassing the
store's error translation. Requests, tokens and streams therefore share one small implementation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol


class LimitKey(NamedTuple):
    """One counter of one tenant; Redis keeps all of a tenant's counters in one hash slot."""

    tenant: str
    name: str  # "requests", "streams", "tokens"


@dataclass(frozen=True, slots=True)
class WindowResult:
    """What a window counter answered.

    Attributes:
        allowed: the amount was taken.
        remaining: what is left under the limit after this call, rounded down.
        reset_after: seconds. Refused: until the amount would fit, if nothing else is taken.
            Taken: until the current bucket ends.
        bucket: the bucket the amount went to; ``adjust`` corrects that bucket.
    """

    allowed: bool
    remaining: int
    reset_after: float
    bucket: int


@dataclass(frozen=True, slots=True)
class SlotResult:
    """What ``acquire`` answered.

    Attributes:
        acquired: the holder has a slot (it may have had it already).
        held: slots held now, this one included when acquired.
        expires_after: refused: seconds until the oldest slot's lease ends, the longest a
            caller must wait (a stream usually ends much sooner); 0 when acquired.
    """

    acquired: bool
    held: int
    expires_after: float


class LimitCounters(Protocol):
    """Window counters and leased slots, keyed by ``LimitKey``."""

    async def hit(self, key: LimitKey, limit: int, window: float) -> WindowResult:
        """Count one request in the sliding ``window`` (seconds) if fewer than ``limit`` are.

        Raises:
            StoreUnavailable: the store cannot be reached.
        """
        ...

    async def reserve(self, key: LimitKey, amount: int, limit: int, window: float) -> WindowResult:
        """Take ``amount`` in the sliding ``window`` (seconds) if the total stays within ``limit``.

        An amount larger than the limit never fits.

        Raises:
            StoreUnavailable: the store cannot be reached.
        """
        ...

    async def adjust(self, key: LimitKey, delta: int, bucket: int) -> None:
        """Add ``delta`` (negative: a refund) to ``bucket``, if it still counts; never below 0.

        Raises:
            StoreUnavailable: the store cannot be reached.
        """
        ...

    async def acquire(self, key: LimitKey, limit: int, lease: float, holder: str) -> SlotResult:
        """Take a slot for ``holder`` for ``lease`` seconds if fewer than ``limit`` are held.

        A holder that already has a slot keeps it, with its lease renewed.

        Raises:
            StoreUnavailable: the store cannot be reached.
        """
        ...

    async def release(self, key: LimitKey, holder: str) -> None:
        """Give back ``holder``'s slot; nothing if it has none (released, or its lease ended).

        Raises:
            StoreUnavailable: the store cannot be reached.
        """
        ...
