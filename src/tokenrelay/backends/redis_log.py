"""RedisStreamLog: a run's events in a Redis Stream, so any instance can serve any reader.

Writes. ``append`` queues its events; one batcher per log sends everything queued as one
pipeline, one ``append.lua`` call per run (XADD with the explicit id ``<seq>-0``, trim to the
bounds, TTLs, PUBLISH of the last seq). Appends of one run that arrive before their batch is sent
join its call. ``append`` returns once its batch is stored, so order and errors are its own.

Wake-ups, without polling. Readers wait on a per-run ``_Watch``:

- a run created here is appended here only (its Hub drives it here): the batcher wakes its
  readers as soon as a batch is stored, and knows its last seq, so a caught-up reader waits
  without asking Redis first;
- a run driven elsewhere is watched through its own channel ``…{run:<id>}:wake``, subscribed on
  this log's one pub/sub connection only while readers here wait on it. A channel per run, rather
  than one per prefix: an instance then receives the wake-ups of the runs its readers follow,
  not every append of the whole deployment, and a PUBLISH nobody listens to costs Redis nothing.

After a wake-up a reader does one read (``read.lua``: XRANGE after its cursor, with the sealed
flag and the dropped count, the events as one JSON array decoded in one call), batched with the
reads of the other readers woken at the same moment. A reader of a run driven elsewhere that
times out reads once more, so a lost wake-up or an expired run cannot hold it forever.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import MappingProxyType
from typing import Any

import orjson

from tokenrelay.backends.redis_batch import PipelineBatcher, PipelineCall
from tokenrelay.backends.redis_keys import RunKeys
from tokenrelay.backends.redis_pubsub import RedisSubscriber
from tokenrelay.backends.redis_store import RedisStore
from tokenrelay.errors import EndOfStream, EventsLost, NotFound, StoreUnavailable
from tokenrelay.events import Event, EventType

_EVENT_TYPES = MappingProxyType({kind.value: kind for kind in EventType})
# Seconds a watched channel stays subscribed after its last reader left: a reader between two
# batches, or one reconnecting, should not cost a SUBSCRIBE/UNSUBSCRIBE pair each time.
_LINGER = 10.0


class _Watch:
    """What this instance knows about one run its readers wait on."""

    __slots__ = ("idle_since", "keys", "last", "local", "ready", "sealed", "waiters")

    def __init__(self, keys: RunKeys, *, local: bool) -> None:
        self.keys = keys
        self.local = local  # created (so appended) by this instance
        # Until a remote run's subscription is confirmed, its wake-ups may be missed.
        self.ready = local
        self.last: int | None = 0 if local else None  # last stored seq, when known
        self.sealed = False
        # One future per waiting reader, as in the memory log: a reader that gives up alone.
        self.waiters: list[asyncio.Future[None]] = []
        self.idle_since = 0.0

    def must_read(self, after: int) -> bool:
        """False only when this instance knows that nothing after ``after`` is stored."""
        return not self.ready or self.sealed or self.last is None or self.last > after

    def wake(self) -> None:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            _resolve(waiter)


class RedisStreamLog:
    """A StreamLog in Redis, shared by every gateway instance on the same Redis and prefix.

    Args:
        store: the Redis connection.
        retention: seconds a sealed run is kept.
        max_events_per_run: events kept per run; past it the oldest are dropped.
        max_bytes_per_run: about the bytes kept per run (each event's JSON and 48).
        running_ttl: seconds a run that is not sealed is kept after its last append, so the
            runs of a gateway that died do not stay in Redis forever.
        flush_interval: seconds appends wait for others to share their round trip; 0 sends as
            soon as the loop is free.
        max_events_per_read: the most events one read returns; the reader asks again.
    """

    def __init__(
        self,
        store: RedisStore,
        *,
        retention: float = 600.0,
        max_events_per_run: int = 10_000,
        max_bytes_per_run: int = 4_194_304,
        running_ttl: float = 3600.0,
        flush_interval: float = 0.0,
        max_events_per_read: int = 1000,
    ) -> None:
        self._store = store
        self._scripts = store.scripts
        self._retention_ms = _milliseconds(retention)
        self._running_ttl_ms = _milliseconds(running_ttl)
        self._max_events_per_run = max_events_per_run
        self._max_bytes_per_run = max_bytes_per_run
        self._max_events_per_read = max_events_per_read
        self._writes = PipelineBatcher(store, interval=flush_interval)
        self._reads = PipelineBatcher(store)
        self._unsent: dict[str, PipelineCall] = {}  # run id -> its append call not sent yet
        self._watches: dict[str, _Watch] = {}
        self._by_channel: dict[bytes, _Watch] = {}  # the remote runs, by wake channel
        self._subscriber = RedisSubscriber(
            store,
            on_message=self._on_wake,
            on_subscribed=self._on_subscribed,
            on_lost=self._on_lost,
        )
        self._sweep: asyncio.TimerHandle | None = None

    @property
    def store(self) -> RedisStore:
        """The Redis connection, which its owner closes after this."""
        return self._store

    @property
    def write_round_trips(self) -> int:
        """Pipelines sent for appends and seals so far (each holds many runs' appends)."""
        return self._writes.round_trips

    async def create(self, run_id: str) -> None:
        keys = self._store.keys.run(run_id)
        call = self._writes.script(
            self._scripts.create, (keys.events, keys.meta), [self._running_ttl_ms]
        )
        await call.done
        previous = self._watches.get(run_id)
        watch = self._watches[run_id] = _Watch(keys, local=True)
        if previous is not None:  # readers came first (another instance created the id)
            watch.waiters = previous.waiters
            self._forget_channel(previous)
            watch.wake()

    async def append(self, run_id: str, events: Sequence[Event]) -> None:
        if not events:
            return
        call = self._unsent.get(run_id)
        if call is None or call.sent:
            watch = self._watches.get(run_id)
            keys = watch.keys if watch is not None else self._store.keys.run(run_id)
            args: list[Any] = [
                self._max_events_per_run,
                self._max_bytes_per_run,
                self._running_ttl_ms,
                keys.wake,
            ]
            call = self._writes.script(self._scripts.append, keys.all, args)
            self._unsent[run_id] = call
        for event in events:
            call.args += (event.seq, event.type.value, event.data_json)
        try:
            last = await asyncio.shield(call.done)
        except StoreUnavailable:
            self._lost_track(run_id)
            raise
        finally:
            if self._unsent.get(run_id) is call:
                del self._unsent[run_id]
        if last < 0:
            raise NotFound(f"run {run_id} does not exist or has expired")
        watch = self._watches.get(run_id)
        if watch is not None:
            if watch.last is None or watch.last < last:
                watch.last = last  # what this call stored: known again after a failure
            watch.wake()

    async def read(self, run_id: str, after: int, timeout: float | None) -> Sequence[Event]:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        watch = self._watches.get(run_id)
        if watch is None:
            # Not watched here: read before subscribing. A reader that is behind, or reads a
            # finished run, needs no wake-up at all.
            events = await self._read_once(self._store.keys.run(run_id), run_id, after)
            if events or (deadline is not None and loop.time() >= deadline):
                return events
            watch = self._watch_remote(run_id)
        while True:
            waiter = loop.create_future()
            watch.waiters.append(waiter)
            timer = None
            try:
                # Registered before reading: a wake-up during the read is not missed.
                if watch.must_read(after):
                    events = await self._read_once(watch.keys, run_id, after)
                    if events:
                        return events
                if deadline is not None:
                    if loop.time() >= deadline:
                        return ()
                    timer = loop.call_at(deadline, _resolve, waiter)
                await waiter
            finally:
                if timer is not None:
                    timer.cancel()
                if waiter in watch.waiters:
                    watch.waiters.remove(waiter)
                if not watch.waiters:
                    self._went_idle(watch)
            if deadline is not None and loop.time() >= deadline and not watch.must_read(after):
                if watch.local:
                    return ()
                # Once per timeout a reader of a run driven elsewhere asks Redis itself, so a
                # wake-up lost in pub/sub, or a run that expired, is noticed.
                return await self._read_once(watch.keys, run_id, after)

    async def seal(self, run_id: str) -> None:
        watch = self._watches.get(run_id)
        keys = watch.keys if watch is not None else self._store.keys.run(run_id)
        self._unsent.pop(run_id, None)  # a later append must not go before the seal
        call = self._writes.script(self._scripts.seal, keys.all, [self._retention_ms, keys.wake])
        try:
            result = await asyncio.shield(call.done)
        except StoreUnavailable:
            self._lost_track(run_id)
            raise
        if result < 0:
            raise NotFound(f"run {run_id} does not exist or has expired")
        if watch is not None:
            watch.sealed = True
            watch.wake()  # they read the end, then EndOfStream
            if watch.local and self._watches.get(run_id) is watch:
                del self._watches[run_id]

    async def close(self) -> None:
        """Stop the batchers and the pub/sub connection (the Redis client is the store's)."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        await self._subscriber.close()
        await self._writes.close()
        await self._reads.close()
        for watch in self._watches.values():
            watch.wake()
        self._watches.clear()
        self._by_channel.clear()

    async def _read_once(self, keys: RunKeys, run_id: str, after: int) -> list[Event]:
        call = self._reads.script(
            self._scripts.read, (keys.events, keys.meta), [after, self._max_events_per_read]
        )
        result = await call.done
        status = result[0]
        if status == -1:
            raise NotFound(f"run {run_id} does not exist or has expired")
        if status == -2:
            raise EventsLost(
                f"events {after + 1} to {result[1]} of run {run_id} are no longer kept"
            )
        if result[1]:
            return [
                Event(seq, _EVENT_TYPES[kind], data) for seq, kind, data in orjson.loads(result[1])
            ]
        if status == 1:
            raise EndOfStream
        return []

    def _lost_track(self, run_id: str) -> None:
        """A write failed: what this instance knows may be wrong, so its readers ask Redis."""
        watch = self._watches.get(run_id)
        if watch is not None:
            watch.last = None
            watch.wake()

    def _watch_remote(self, run_id: str) -> _Watch:
        watch = self._watches.get(run_id)
        if watch is None:
            watch = self._watches[run_id] = _Watch(self._store.keys.run(run_id), local=False)
            self._by_channel[watch.keys.wake] = watch
            self._subscriber.subscribe(watch.keys.wake)
        return watch

    def _forget_channel(self, watch: _Watch) -> None:
        if self._by_channel.get(watch.keys.wake) is watch:
            del self._by_channel[watch.keys.wake]
            self._subscriber.unsubscribe(watch.keys.wake)

    def _on_wake(self, channel: bytes, data: bytes) -> None:
        watch = self._by_channel.get(channel)
        if watch is None:
            return
        if data == b"sealed":
            watch.sealed = True
        elif watch.ready:
            seq = int(data)
            if watch.last is None or seq > watch.last:
                watch.last = seq
        watch.wake()

    def _on_subscribed(self, channel: bytes) -> None:
        watch = self._by_channel.get(channel)
        if watch is not None:
            # Appends before the subscription were not announced: its readers read once more.
            watch.ready = True
            watch.wake()

    def _on_lost(self) -> None:
        for watch in self._by_channel.values():
            watch.ready = False
            watch.last = None
            watch.wake()  # they read Redis: the events, or StoreUnavailable

    def _went_idle(self, watch: _Watch) -> None:
        loop = asyncio.get_running_loop()
        watch.idle_since = loop.time()
        if self._sweep is None and (not watch.local or watch.last is None):
            self._sweep = loop.call_later(_LINGER, self._sweep_idle)

    def _sweep_idle(self) -> None:
        """Forget the watches nobody waited on for a while: remote runs and failed local ones."""
        self._sweep = None
        loop = asyncio.get_running_loop()
        idle_before = loop.time() - _LINGER
        remaining = False
        for run_id, watch in list(self._watches.items()):
            if watch.waiters or (watch.local and watch.last is not None):
                continue
            if watch.idle_since <= idle_before:
                del self._watches[run_id]
                self._forget_channel(watch)
            else:
                remaining = True
        if remaining:
            self._sweep = loop.call_later(_LINGER, self._sweep_idle)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))
