"""RedisSubscriber: one pub/sub connection that outlives Redis restarts.

Its owner says which channels it wants; the subscriber keeps them subscribed. When the connection
fails it tells its owner (``on_lost``: messages may have been missed), reconnects with backoff,
subscribes again, and confirms each channel (``on_subscribed``: from now on nothing is missed).
A connection that stays silent is pinged, so a Redis that vanished without closing its sockets
is noticed too.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Callable
from typing import Any

import structlog
from redis.asyncio.client import PubSub
from redis.exceptions import TimeoutError as RedisTimeoutError

from tokenrelay.backends.redis_store import UNAVAILABLE_ERRORS, RedisStore

logger = structlog.get_logger("tokenrelay.store")

_FIRST_RETRY = 0.05  # seconds before reconnecting; doubles per failure
_MAX_RETRY = 2.0

OnMessage = Callable[[bytes, bytes], None]
OnChannel = Callable[[bytes], None]


class RedisSubscriber:
    """Keeps a set of channels subscribed and hands their messages to callbacks.

    Args:
        store: the Redis connection (one connection of its pool is used for pub/sub).
        on_message: called with (channel, data) for every message.
        on_subscribed: called with a channel once its subscription is confirmed.
        on_lost: called when the connection failed: messages may have been missed.
        ping_interval: seconds of silence after which the connection is pinged; no answer
            within as long again counts as a failed connection.
    """

    def __init__(
        self,
        store: RedisStore,
        *,
        on_message: OnMessage,
        on_subscribed: OnChannel | None = None,
        on_lost: Callable[[], None] | None = None,
        ping_interval: float = 10.0,
    ) -> None:
        self._store = store
        self._on_message = on_message
        self._on_subscribed = on_subscribed
        self._on_lost = on_lost
        self._ping_interval = ping_interval
        self._wanted: set[bytes] = set()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def subscribe(self, channel: bytes) -> None:
        """Want ``channel``; ``on_subscribed`` tells when it is subscribed."""
        if channel in self._wanted:
            return
        self._wanted.add(channel)
        self._changed.set()
        if self._task is None and not self._closed:
            # A context of its own: it serves every request, it must not log as the first one.
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="redis subscriber", context=contextvars.Context()
            )

    def unsubscribe(self, channel: bytes) -> None:
        if channel in self._wanted:
            self._wanted.discard(channel)
            self._changed.set()

    async def close(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        delay = _FIRST_RETRY
        while True:
            pubsub = self._store.client.pubsub()
            confirmed: list[bool] = []
            try:
                await self._session(pubsub, confirmed)
            except (*UNAVAILABLE_ERRORS, OSError) as exc:
                self._store.note_unavailable(exc)
            except Exception:  # refused (an ACL?) or a bug: keep trying, but say so
                logger.exception("store_subscriber_failed")
            finally:
                if self._on_lost is not None:
                    self._on_lost()
                with contextlib.suppress(Exception):
                    await asyncio.shield(pubsub.aclose())
            if confirmed:  # it worked for a while: this is a new outage
                delay = _FIRST_RETRY
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_RETRY)

    async def _session(self, pubsub: PubSub, confirmed: list[bool]) -> None:
        """Subscribe to what is wanted and deliver messages until the connection fails."""
        while not self._wanted:
            self._changed.clear()
            await self._changed.wait()
        self._changed.clear()
        subscribed = set(self._wanted)
        await pubsub.subscribe(*subscribed)
        reader = asyncio.create_task(self._read(pubsub, confirmed))
        writer = asyncio.create_task(self._follow_wanted(pubsub, subscribed))
        try:
            done, _ = await asyncio.wait((reader, writer), return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises what ended the session
        finally:
            for task in (reader, writer):
                task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)

    async def _follow_wanted(self, pubsub: PubSub, subscribed: set[bytes]) -> None:
        """Subscribe and unsubscribe as the wanted channels change, several at a time."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            added, removed = self._wanted - subscribed, subscribed - self._wanted
            if added:
                await pubsub.subscribe(*added)
                subscribed |= added
            if removed:
                await pubsub.unsubscribe(*removed)
                subscribed -= removed

    async def _read(self, pubsub: PubSub, confirmed: list[bool]) -> None:
        ping_unanswered = False
        while True:
            message: dict[str, Any] | None = await pubsub.get_message(timeout=self._ping_interval)
            if message is None:
                if ping_unanswered:
                    raise RedisTimeoutError("the pub/sub connection stopped answering")
                await pubsub.ping()
                ping_unanswered = True
                continue
            ping_unanswered = False
            kind = message["type"]
            if kind == "message":
                self._on_message(message["channel"], message["data"])
            elif kind == "subscribe":
                if not confirmed:
                    confirmed.append(True)
                    self._store.note_reachable()
                if self._on_subscribed is not None:
                    self._on_subscribed(message["channel"])
