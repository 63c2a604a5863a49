"""RedisResponseCache: answers and in-flight claims shared by every instance of a gateway.

```
<prefix>cache:{<key>}       an answer (CachedAnswer.encode()), expiring after the cache's ttl
<prefix>inflight:{<key>}    the id of the run generating the answer, while it runs
```

Bounds. Redis keeps no LRU of its own per key family: the number and bytes of answers are
bounded by the Redis server's ``maxmemory`` and its eviction policy (``allkeys-lru``, or
``volatile-lru``: every entry has a TTL). Answers over ``max_entry_bytes`` are still refused here,
before they are sent.

A cache is an optimisation, so Redis failures never fail a request: ``get`` is a miss, ``put``
does nothing, ``claim_inflight`` claims nothing. The first failure after a success is logged
(``cache_degraded``), and the first success after it (``cache_recovered``).
"""

from __future__ import annotations

import structlog

from tokenrelay.backends.redis_batch import PipelineBatcher
from tokenrelay.backends.redis_store import LuaScript, RedisStore, describe
from tokenrelay.cache.store import CachedAnswer
from tokenrelay.errors import TokenRelayError

logger = structlog.get_logger("tokenrelay.cache")


class RedisResponseCache:
    """A ResponseCache in Redis, on the gateway's shared connection.

    Args:
        store: the Redis connection (closed by its owner, after this cache).
        max_entry_bytes: a larger encoded answer is not stored.
    """

    def __init__(self, store: RedisStore, *, max_entry_bytes: int = 1_048_576) -> None:
        self._store = store
        self._max_entry_bytes = max_entry_bytes
        self._prefix = store.keys.prefix
        # Lookups of many requests arriving together share round trips.
        self._calls = PipelineBatcher(store)
        self._claim = LuaScript.load("cache_claim")
        self._release = LuaScript.load("cache_release")
        self._degraded = False

    def answer_key(self, key: str) -> bytes:
        return f"{self._prefix}cache:{{{key}}}".encode()

    def claim_key(self, key: str) -> bytes:
        return f"{self._prefix}inflight:{{{key}}}".encode()

    async def get(self, key: str) -> CachedAnswer | None:
        try:
            raw = await self._calls.command("GET", self.answer_key(key)).done
        except TokenRelayError as exc:
            self._note_failure("get", exc)
            return None
        self._note_success()
        if raw is None:
            return None
        try:
            return CachedAnswer.decode(raw)
        except ValueError as exc:  # written by another version, or damaged: a miss
            logger.warning("cache_entry_unreadable", error=describe(exc))
            return None

    async def put(self, key: str, answer: CachedAnswer, ttl: float) -> None:
        encoded = answer.encode()
        if len(encoded) > self._max_entry_bytes:
            return
        try:
            await self._calls.command("SET", self.answer_key(key), encoded, "PX", _ms(ttl)).done
        except TokenRelayError as exc:
            self._note_failure("put", exc)
            return
        self._note_success()

    async def claim_inflight(self, key: str, run_id: str, ttl: float) -> str | None:
        call = self._calls.script(self._claim, (self.claim_key(key),), [run_id, _ms(ttl)])
        try:
            holder = await call.done
        except TokenRelayError as exc:
            self._note_failure("claim_inflight", exc)
            return None
        self._note_success()
        return None if holder is None else bytes(holder).decode()

    async def release_inflight(self, key: str, run_id: str) -> None:
        call = self._calls.script(self._release, (self.claim_key(key),), [run_id])
        try:
            await call.done
        except TokenRelayError as exc:  # the claim then expires with its ttl
            self._note_failure("release_inflight", exc)
            return
        self._note_success()

    async def close(self) -> None:
        await self._calls.close()

    def _note_failure(self, operation: str, exc: TokenRelayError) -> None:
        if not self._degraded:
            self._degraded = True
            logger.warning("cache_degraded", operation=operation, code=exc.instance_code())

    def _note_success(self) -> None:
        if self._degraded:
            self._degraded = False
            logger.info("cache_recovered")


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
