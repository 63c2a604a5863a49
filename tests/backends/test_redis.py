"""What only the Redis backends do: batching, key layout, TTLs, cross-instance wake-ups and
cancels, and failing fast and recovering when Redis goes away and comes back.

Against a real redis-server: the suite's (``redis_url``) or, for fault tests, a disposable one
(``redis_server``) that the test kills and starts again on the same port.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio
import structlog.testing
from pydantic import ValidationError

from tests.conftest import RedisServer
from tokenrelay.backends.redis_log import RedisStreamLog
from tokenrelay.backends.redis_registry import RedisRunRegistry
from tokenrelay.backends.redis_store import RedisStore
from tokenrelay.config import Settings
from tokenrelay.errors import EndOfStream, NotFound, StoreUnavailable
from tokenrelay.events import Event, EventType, RunInfo

# Only keeps a wake-up that never comes from holding the test; never a timing claim.
GUARD = 2.0

StoreFactory = Callable[..., RedisStore]


def delta(seq: int) -> Event:
    return Event(seq, EventType.MESSAGE_DELTA, {"index": 0, "content": f"token {seq}"})


def new_run() -> str:
    return "run_test_" + uuid.uuid4().hex


@pytest.fixture
async def stores(redis_url: str, redis_prefix: str) -> AsyncIterator[StoreFactory]:
    """Builds stores on the suite's Redis, all with this test's prefix: like several gateways."""
    created: list[RedisStore] = []

    def factory(url: str = redis_url, **options: Any) -> RedisStore:
        store = RedisStore(url, key_prefix=redis_prefix, **options)
        created.append(store)
        return store

    yield factory
    for store in created:
        await store.close()


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain client to look at what the backends wrote."""
    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def command_calls(admin: redis.asyncio.Redis) -> dict[str, int]:
    stats = await admin.info("commandstats")
    return {name.removeprefix("cmdstat_"): value["calls"] for name, value in stats.items()}


def grew(before: dict[str, int], after: dict[str, int], command: str) -> int:
    return after.get(command, 0) - before.get(command, 0)


# Batching


async def test_appends_issued_together_share_one_script_call_per_run(
    stores: StoreFactory, admin: redis.asyncio.Redis
) -> None:
    log = RedisStreamLog(stores())
    runs = [new_run() for _ in range(50)]
    for run in runs:
        await log.create(run)
    before, trips = await command_calls(admin), log.write_round_trips
    await asyncio.gather(
        *(log.append(run, [delta(seq)]) for seq in range(1, 11) for run in runs)
    )  # 500 appends at once
    after = await command_calls(admin)
    assert grew(before, after, "xadd") == 500
    assert grew(before, after, "evalsha") == 50  # one append.lua call per run
    assert log.write_round_trips - trips <= 2  # the first append alone, then all the rest
    for run in runs:
        assert [e.seq for e in await log.read(run, 0, 0)] == list(range(1, 11))
    await log.close()


async def test_runs_producing_tokens_together_share_round_trips(stores: StoreFactory) -> None:
    log = RedisStreamLog(stores())
    runs = [new_run() for _ in range(50)]
    for run in runs:
        await log.create(run)
    trips = log.write_round_trips

    async def produce(run: str) -> None:
        for seq in range(1, 11):  # like the Hub: one event at a time, each append awaited
            await log.append(run, [delta(seq)])

    await asyncio.gather(*(produce(run) for run in runs))
    round_trips = log.write_round_trips - trips
    assert round_trips <= 15  # about one per token step, for all 50 runs: not one per append
    print(f"500 appends from 50 runs: {round_trips} round trips")
    await log.close()


# Key layout and expiry


async def test_every_key_of_a_run_carries_its_hash_tag(
    stores: StoreFactory, admin: redis.asyncio.Redis, redis_prefix: str
) -> None:
    store = stores()
    log, registry = RedisStreamLog(store), RedisRunRegistry(store)
    run = new_run()
    await log.create(run)
    await registry.register(RunInfo(run, "running", created_at=time.time()))
    await registry.add_subscriber(run, +1)
    await log.append(run, [delta(1)])
    keys = sorted(key.decode() for key in await admin.keys(redis_prefix + "*"))
    assert keys == [f"{redis_prefix}{{run:{run}}}:{name}" for name in sorted(_RUN_KEYS)]
    for key in keys:  # Redis Cluster hashes the first {…}: one slot for the whole run
        hash_tag = re.search(r"\{([^}]*)\}", key)
        assert hash_tag is not None and hash_tag.group(1) == f"run:{run}"
    assert await admin.type(f"{redis_prefix}{{run:{run}}}:events") == b"stream"
    entries = await admin.xrange(f"{redis_prefix}{{run:{run}}}:events")
    assert [entry_id for entry_id, _ in entries] == [b"1-0"]
    await log.close()
    await registry.close()


_RUN_KEYS = ("events", "meta", "info", "readers")


async def test_seal_sets_the_retention_on_every_key_of_the_run(
    stores: StoreFactory, admin: redis.asyncio.Redis, redis_prefix: str
) -> None:
    store = stores()
    log = RedisStreamLog(store, retention=30, running_ttl=3600)
    registry = RedisRunRegistry(store, retention=30, running_ttl=3600)
    run = new_run()
    info = RunInfo(run, "running", created_at=time.time())
    await log.create(run)
    await registry.register(info)
    await registry.add_subscriber(run, +1)
    await log.append(run, [delta(1), Event(2, EventType.RUN_COMPLETED, {})])
    for name in _RUN_KEYS:  # running: kept while it appends, gone an hour after a crash
        assert 3_000_000 < await admin.pttl(f"{redis_prefix}{{run:{run}}}:{name}") <= 3_600_000
    await log.seal(run)
    await registry.finish(RunInfo(run, "completed", created_at=info.created_at))
    for name in _RUN_KEYS:
        assert 0 < await admin.pttl(f"{redis_prefix}{{run:{run}}}:{name}") <= 30_000
    await log.close()
    await registry.close()


# Other instances


async def test_a_reader_on_another_instance_is_woken_through_pub_sub(
    stores: StoreFactory, admin: redis.asyncio.Redis
) -> None:
    writer, reader = RedisStreamLog(stores()), RedisStreamLog(stores())  # two gateways
    run = new_run()
    await writer.create(run)
    await writer.append(run, [delta(1)])
    assert [e.seq for e in await reader.read(run, 0, 0)] == [1]
    waiting = asyncio.create_task(reader.read(run, 1, 30))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    before = await command_calls(admin)
    await asyncio.sleep(0.5)  # a waiting reader costs Redis nothing: no polling
    assert grew(before, await command_calls(admin), "evalsha") == 0
    started = time.perf_counter()
    await writer.append(run, [delta(2), delta(3)])
    assert [e.seq for e in await asyncio.wait_for(waiting, GUARD)] == [2, 3]
    print(f"cross-instance wake-up: {(time.perf_counter() - started) * 1000:.2f} ms")
    waiting = asyncio.create_task(reader.read(run, 3, None))
    await asyncio.sleep(0.05)
    await writer.append(run, [Event(4, EventType.RUN_COMPLETED, {})])
    await writer.seal(run)
    assert [e.seq for e in await asyncio.wait_for(waiting, GUARD)] == [4]
    with pytest.raises(EndOfStream):
        await asyncio.wait_for(reader.read(run, 4, None), GUARD)
    await writer.close()
    await reader.close()


async def test_a_cancel_requested_on_one_instance_reaches_another(stores: StoreFactory) -> None:
    driving, other = RedisRunRegistry(stores()), RedisRunRegistry(stores())
    requests = driving.cancel_requests()
    listening = asyncio.create_task(anext(requests))
    await asyncio.sleep(0.1)
    run = new_run()
    await other.register(RunInfo(run, "running", created_at=time.time()))
    assert await driving.get(run) == await other.get(run)
    await other.add_subscriber(run, +1)
    assert await driving.add_subscriber(run, +1) == 2  # readers counted across instances
    await other.request_cancel(run)
    assert await asyncio.wait_for(listening, GUARD) == run
    await requests.aclose()  # type: ignore[attr-defined]
    await driving.close()
    await other.close()


async def test_an_id_that_cannot_be_a_run_is_not_found(stores: StoreFactory) -> None:
    store = stores()
    log, registry = RedisStreamLog(store), RedisRunRegistry(store)
    with pytest.raises(NotFound):
        await log.read("run_{other}", 0, 0)
    assert await registry.get("run_{other}") is None
    await log.close()


# Redis down, and back


async def test_a_dead_redis_fails_fast_and_is_used_again_once_back(
    stores: StoreFactory, redis_server: RedisServer
) -> None:
    store = stores(redis_server.url, socket_timeout=1.0)
    log, registry = RedisStreamLog(store), RedisRunRegistry(store)
    run = new_run()
    await log.create(run)
    await log.append(run, [delta(1)])
    redis_server.kill()
    with structlog.testing.capture_logs() as logs:
        for attempt in (
            log.create(new_run()),
            log.append(run, [delta(2)]),
            log.read(run, 0, None),
            log.seal(run),
            registry.register(RunInfo(new_run(), "running", created_at=time.time())),
            registry.get(run),
        ):
            with pytest.raises(StoreUnavailable) as info:
                await asyncio.wait_for(attempt, GUARD)
            assert info.value.instance_code() == "store_unavailable"
            assert info.value.instance_status() == 503
            assert info.value.retryable
        redis_server.start()  # the same port, empty: a restarted Redis without persistence
        again = new_run()
        await log.create(again)  # the client reconnects, and loads its scripts again
        await log.append(again, [delta(1)])
        assert [e.seq for e in await log.read(again, 0, 0)] == [1]
        with pytest.raises(NotFound):  # what the old Redis held is gone with it
            await log.read(run, 0, 0)
    events = [entry["event"] for entry in logs]
    assert events.count("store_unavailable") == 1  # once per outage, not per call
    assert events.count("store_recovered") == 1
    await log.close()
    await registry.close()


async def test_readers_waiting_when_redis_dies_get_store_unavailable(
    stores: StoreFactory, redis_server: RedisServer
) -> None:
    writer = RedisStreamLog(stores(redis_server.url, socket_timeout=1.0))
    follower = RedisStreamLog(stores(redis_server.url, socket_timeout=1.0))
    run = new_run()
    await writer.create(run)
    await writer.append(run, [delta(1)])
    local = asyncio.create_task(writer.read(run, 1, None))  # woken by its own appends
    remote = asyncio.create_task(follower.read(run, 1, None))  # woken through pub/sub
    await asyncio.sleep(0.2)
    assert not local.done() and not remote.done()
    redis_server.kill()
    with pytest.raises(StoreUnavailable):
        await writer.append(run, [delta(2)])  # the run's next token: its run fails
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(local, GUARD)
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(remote, GUARD)
    redis_server.start()
    again = new_run()
    await writer.create(again)
    await writer.append(again, [delta(1)])
    remote = asyncio.create_task(follower.read(again, 1, 30))
    await asyncio.sleep(0.2)
    await writer.append(again, [delta(2)])
    assert [e.seq for e in await asyncio.wait_for(remote, GUARD + 2)] == [2]
    await writer.close()
    await follower.close()


async def test_cancel_requests_resume_after_redis_restarts(
    stores: StoreFactory, redis_server: RedisServer
) -> None:
    driving = RedisRunRegistry(stores(redis_server.url, socket_timeout=1.0))
    other = RedisRunRegistry(stores(redis_server.url, socket_timeout=1.0))
    requests = driving.cancel_requests()
    listening = asyncio.create_task(anext(requests))
    await asyncio.sleep(0.1)
    redis_server.kill()
    await asyncio.sleep(0.2)
    assert not listening.done()  # the listener waits through the outage, it does not fail
    redis_server.start()
    run = new_run()
    deadline = time.monotonic() + 5
    while not listening.done():  # until the listener has subscribed again
        assert time.monotonic() < deadline
        await other.request_cancel(run)
        await asyncio.sleep(0.1)
    assert listening.result() == run
    await requests.aclose()  # type: ignore[attr-defined]
    await driving.close()
    await other.close()


# Settings


def test_the_redis_store_needs_a_url() -> None:
    with pytest.raises(ValidationError, match="redis_url is required"):
        Settings(store={"backend": "redis"})
    settings = Settings(store={"backend": "redis", "redis_url": "redis://:pw@db:6379/0"})
    assert settings.store.redis_url is not None
    assert "pw" not in settings.model_dump_json()


@pytest.mark.parametrize("prefix", ["{tenant}:", "a}b"])
def test_a_key_prefix_may_not_hold_a_hash_tag(prefix: str) -> None:
    with pytest.raises(ValidationError, match="key_prefix"):
        Settings(store={"key_prefix": prefix})
