"""RedisLimitCounters: per-tenant limit counters shared by every instance on one Redis.

```
<prefix>limits:{<tenant>}:requests   hash b, c, p: the request window (lua/limit_window.lua)
<prefix>limits:{<tenant>}:tokens     hash b, c, p: the token window
<prefix>limits:{<tenant>}:streams    sorted set: holder -> end of its lease, in ms
```

The tenant is the hash tag: in Redis Cluster all of a tenant's counters share a slot. Times are
Redis's own (``TIME`` inside the scripts), so instances with skewed clocks agree on windows.
Each call is one script, atomic; calls made while a round trip is in flight share the next one.
"""

from __future__ import annotations

from typing import Any

from tokenrelay.backends.redis_batch import PipelineBatcher
from tokenrelay.backends.redis_store import LuaScript, RedisStore
from tokenrelay.guards.counters import LimitKey, SlotResult, WindowResult


class RedisLimitCounters:
    """LimitCounters in Redis (``store.backend = "redis"``), on the run store's connection.

    Args:
        store: the Redis connection, whose owner closes it after this.
    """

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self._prefix = store.keys.prefix
        self._calls = PipelineBatcher(store)
        self._window = LuaScript.load("limit_window")
        self._adjust = LuaScript.load("limit_adjust")
        self._acquire = LuaScript.load("limit_acquire")

    @property
    def store(self) -> RedisStore:
        """The Redis connection, which its owner closes after this."""
        return self._store

    async def hit(self, key: LimitKey, limit: int, window: float) -> WindowResult:
        return await self.reserve(key, 1, limit, window)

    async def reserve(self, key: LimitKey, amount: int, limit: int, window: float) -> WindowResult:
        allowed, remaining, wait_ms, bucket = await self._eval(
            self._window, key, amount, limit, _milliseconds(window)
        )
        return WindowResult(bool(allowed), int(remaining), wait_ms / 1000, int(bucket))

    async def adjust(self, key: LimitKey, delta: int, bucket: int) -> None:
        if delta:
            await self._eval(self._adjust, key, delta, bucket)

    async def acquire(self, key: LimitKey, limit: int, lease: float, holder: str) -> SlotResult:
        acquired, held, wait_ms = await self._eval(
            self._acquire, key, limit, _milliseconds(lease), holder
        )
        return SlotResult(bool(acquired), int(held), wait_ms / 1000)

    async def release(self, key: LimitKey, holder: str) -> None:
        await self._calls.command("ZREM", self._key(key), holder).done

    async def close(self) -> None:
        """Stop the batcher; calls still queued fail with ``StoreUnavailable``."""
        await self._calls.close()

    async def _eval(self, script: LuaScript, key: LimitKey, *args: Any) -> Any:
        return await self._calls.script(script, (self._key(key),), list(args)).done

    def _key(self, key: LimitKey) -> bytes:
        return f"{self._prefix}limits:{{{key.tenant}}}:{key.name}".encode()


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))
