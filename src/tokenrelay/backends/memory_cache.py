"""MemoryResponseCache: answers and in-flight claims in this process, bounded like an LRU."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import NamedTuple

from tokenrelay.cache.store import CachedAnswer


class _Entry(NamedTuple):
    answer: CachedAnswer
    expires_at: float  # time.monotonic()


class _Claim(NamedTuple):
    run_id: str
    expires_at: float


class MemoryResponseCache:
    """A ResponseCache in a dict: least recently used answers go first past either bound.

    Args:
        max_entries: answers kept at most.
        max_bytes: about the bytes of all answers kept (``CachedAnswer.size``).
        max_entry_bytes: a larger answer is not stored.
    """

    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        max_bytes: int = 64 * 1024 * 1024,
        max_entry_bytes: int = 1_048_576,
    ) -> None:
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._max_entry_bytes = max_entry_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._claims: dict[str, _Claim] = {}

    @property
    def entries(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """About the bytes of the answers kept."""
        return self._bytes

    async def get(self, key: str) -> CachedAnswer | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at <= time.monotonic():
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return entry.answer

    async def put(self, key: str, answer: CachedAnswer, ttl: float) -> None:
        if answer.size > self._max_entry_bytes:
            return
        self._remove(key)
        self._entries[key] = _Entry(answer, time.monotonic() + ttl)
        self._bytes += answer.size
        # Expired entries are only found when read; the bounds keep them from piling up.
        while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
            self._remove(next(iter(self._entries)))

    async def claim_inflight(self, key: str, run_id: str, ttl: float) -> str | None:
        now = time.monotonic()
        claim = self._claims.get(key)
        if claim is not None and claim.expires_at > now and claim.run_id != run_id:
            return claim.run_id
        self._claims[key] = _Claim(run_id, now + ttl)
        return None

    async def release_inflight(self, key: str, run_id: str) -> None:
        claim = self._claims.get(key)
        if claim is not None and claim.run_id == run_id:
            del self._claims[key]

    async def close(self) -> None:
        self._entries.clear()
        self._claims.clear()
        self._bytes = 0

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry.answer.size
