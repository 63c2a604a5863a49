"""RedisRunRegistry: run records, reader counts and cancel requests shared by every instance.

A record is the run's ``RunInfo`` as JSON under ``…{run:<id>}:info``, beside the run's events, so
it expires with them. Cancel requests are published on ``<prefix>cancel``; every instance
listens on one subscription and cancels the runs it drives. A request published while an
instance's subscription is down is not seen by it (the client was answered 202, and may ask
again): pub/sub keeps nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import structlog

from tokenrelay.backends.redis_batch import PipelineBatcher
from tokenrelay.backends.redis_pubsub import RedisSubscriber
from tokenrelay.backends.redis_store import RedisStore
from tokenrelay.errors import NotFound
from tokenrelay.events import RunInfo

logger = structlog.get_logger("tokenrelay.store")

# Cancel requests waiting for the Hub, per listener; past it new ones are dropped (and logged):
# a listener that far behind is stuck, and a cancel is a request, not a guarantee.
_MAX_QUEUED_CANCELS = 1024


class RedisRunRegistry:
    """A RunRegistry in Redis.

    Args:
        store: the Redis connection.
        retention: seconds a finished run's record is kept.
        running_ttl: seconds the record of a run that has not finished is kept without an
            append (its log's appends refresh it), so the runs of a dead gateway expire.
    """

    def __init__(
        self, store: RedisStore, *, retention: float = 600.0, running_ttl: float = 3600.0
    ) -> None:
        self._store = store
        self._retention_ms = max(1, round(retention * 1000))
        self._running_ttl_ms = max(1, round(running_ttl * 1000))
        # Run starts, records and reader counts of many requests share round trips too.
        self._calls = PipelineBatcher(store)
        self._listeners: set[asyncio.Queue[str]] = set()
        self._subscriber = RedisSubscriber(store, on_message=self._on_cancel)

    @property
    def store(self) -> RedisStore:
        """The Redis connection, which its owner closes after this."""
        return self._store

    async def register(self, info: RunInfo) -> None:
        key = self._store.keys.run(info.id).info
        await self._calls.command("SET", key, _encode(info), "PX", self._running_ttl_ms).done

    async def get(self, run_id: str) -> RunInfo | None:
        try:
            key = self._store.keys.run(run_id).info
        except NotFound:
            return None
        raw = await self._calls.command("GET", key).done
        return None if raw is None else _decode(raw)

    async def finish(self, info: RunInfo) -> None:
        keys = self._store.keys.run(info.id)
        await self._calls.script(
            self._store.scripts.finish,
            (keys.info, keys.readers),
            [_encode(info), self._retention_ms],
        ).done

    async def add_subscriber(self, run_id: str, delta: int) -> int:
        keys = self._store.keys.run(run_id)
        count = await self._calls.script(
            self._store.scripts.add_subscriber,
            (keys.readers, keys.info),
            [delta, self._running_ttl_ms],
        ).done
        return int(count)

    async def request_cancel(self, run_id: str) -> None:
        await self._calls.command("PUBLISH", self._store.keys.cancel_channel, run_id).done

    async def cancel_requests(self) -> AsyncIterator[str]:
        queue: asyncio.Queue[str] = asyncio.Queue(_MAX_QUEUED_CANCELS)
        self._listeners.add(queue)
        self._subscriber.subscribe(self._store.keys.cancel_channel)
        try:
            while True:
                yield await queue.get()
        finally:
            self._listeners.discard(queue)

    async def close(self) -> None:
        """Stop listening for cancel requests (the Redis client is the store's)."""
        await self._subscriber.close()
        await self._calls.close()

    def _on_cancel(self, channel: bytes, data: bytes) -> None:
        run_id = data.decode(errors="replace")
        for queue in self._listeners:
            try:
                queue.put_nowait(run_id)
            except asyncio.QueueFull:
                logger.warning("cancel_request_dropped", run_id=run_id)


def _encode(info: RunInfo) -> bytes:
    return orjson.dumps(
        {
            "id": info.id,
            "status": info.status,
            "created_at": info.created_at,
            "detached": info.detached,
            "finished_at": info.finished_at,
            "error_code": info.error_code,
            "tenant": info.tenant,
        }
    )


def _decode(raw: bytes) -> RunInfo:
    fields: dict[str, Any] = orjson.loads(raw)
    return RunInfo(**fields)
