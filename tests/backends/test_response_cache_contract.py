"""The ResponseCache contract (``tokenrelay.cache.store.ResponseCache``), against every store.

Add a store by adding its name to ``BACKENDS`` and a branch to ``make_cache``. The Redis store
runs against a real redis-server (the ``redis_url`` fixture), each cache under a key prefix of
its own. Bounds by entries and bytes are the memory store's alone: in Redis they are the server's
``maxmemory`` policy, so those tests skip Redis and say so.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio
from structlog.testing import capture_logs

from tests.conftest import RedisServer
from tokenrelay.backends.memory_cache import MemoryResponseCache
from tokenrelay.backends.redis_cache import RedisResponseCache
from tokenrelay.backends.redis_store import RedisStore
from tokenrelay.cache.store import CachedAnswer, ResponseCache
from tokenrelay.events import EventDraft, EventType

BACKENDS = ["memory", "redis"]
MEMORY_ONLY = [
    "memory",
    pytest.param(
        "redis", marks=pytest.mark.skip(reason="Redis bounds entries by its maxmemory policy")
    ),
]
LONG_TTL = 60.0
# Entries given SHORT_TTL are checked only after EXPIRY_WAIT: only "gone by then" is asserted,
# never "still there before", which a loaded machine could make false.
SHORT_TTL = 0.05
EXPIRY_WAIT = 0.3

CacheFactory = Callable[..., ResponseCache]


def answer(text: str = "Hello", tokens: int = 2) -> CachedAnswer:
    drafts: list[EventDraft] = [
        (EventType.RUN_STARTED, {"response_id": "chatcmpl-1", "model": "m", "created": 1}),
        *[(EventType.MESSAGE_DELTA, {"index": 0, "content": text}) for _ in range(tokens)],
        (EventType.MESSAGE_COMPLETED, {"index": 0, "finish_reason": "stop"}),
        (EventType.USAGE, {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": 3}),
    ]
    return CachedAnswer.of(drafts, created_at=1_700_000_000.5)


def new_key() -> str:
    return uuid.uuid4().hex * 2  # the shape of a sha256 hex digest


@pytest.fixture(params=BACKENDS)
async def cache_factory(request: pytest.FixtureRequest) -> AsyncIterator[CacheFactory]:
    created: list[ResponseCache] = []
    stores: list[RedisStore] = []

    def factory(**bounds: Any) -> ResponseCache:
        cache: ResponseCache
        if request.param == "memory":
            cache = MemoryResponseCache(**bounds)
        else:
            store = RedisStore(
                request.getfixturevalue("redis_url"), key_prefix=f"test:{uuid.uuid4().hex[:12]}:"
            )
            stores.append(store)
            cache = RedisResponseCache(store, max_entry_bytes=bounds.get("max_entry_bytes", 2**20))
        created.append(cache)
        return cache

    yield factory
    for cache in created:
        await cache.close()
    for store in stores:
        await store.close()


@pytest.fixture
def cache(cache_factory: CacheFactory) -> ResponseCache:
    return cache_factory()


async def test_an_unknown_key_is_a_miss(cache: ResponseCache) -> None:
    assert await cache.get(new_key()) is None


async def test_a_stored_answer_comes_back_identical(cache: ResponseCache) -> None:
    key, stored = new_key(), answer()
    await cache.put(key, stored, LONG_TTL)
    got = await cache.get(key)
    assert got is not None
    assert got.drafts == stored.drafts
    assert [type(event_type) for event_type, _ in got.drafts] == [EventType] * len(stored.drafts)
    assert got.created_at == stored.created_at
    assert got.size > 0


async def test_a_second_put_replaces_the_answer(cache: ResponseCache) -> None:
    key = new_key()
    await cache.put(key, answer("old"), LONG_TTL)
    await cache.put(key, answer("new"), LONG_TTL)
    got = await cache.get(key)
    assert got is not None and got.drafts == answer("new").drafts


async def test_keys_are_independent(cache: ResponseCache) -> None:
    first, second = new_key(), new_key()
    await cache.put(first, answer("first"), LONG_TTL)
    await cache.put(second, answer("second"), LONG_TTL)
    got_first, got_second = await cache.get(first), await cache.get(second)
    assert got_first is not None and got_first.drafts == answer("first").drafts
    assert got_second is not None and got_second.drafts == answer("second").drafts


async def test_an_answer_expires_after_its_ttl(cache: ResponseCache) -> None:
    short, long = new_key(), new_key()
    await cache.put(short, answer(), SHORT_TTL)
    await cache.put(long, answer(), LONG_TTL)
    await asyncio.sleep(EXPIRY_WAIT)
    assert await cache.get(short) is None
    assert await cache.get(long) is not None


async def test_an_answer_over_the_entry_bound_is_not_stored(cache_factory: CacheFactory) -> None:
    cache = cache_factory(max_entry_bytes=2_000)
    small, large = new_key(), new_key()
    await cache.put(small, answer("x" * 100), LONG_TTL)
    await cache.put(large, answer("x" * 500, tokens=10), LONG_TTL)
    assert await cache.get(small) is not None
    assert await cache.get(large) is None


@pytest.mark.parametrize("cache_factory", MEMORY_ONLY, indirect=True)
async def test_the_least_recently_used_answer_goes_past_max_entries(
    cache_factory: CacheFactory,
) -> None:
    cache = cache_factory(max_entries=2)
    first, second, third = new_key(), new_key(), new_key()
    await cache.put(first, answer(), LONG_TTL)
    await cache.put(second, answer(), LONG_TTL)
    assert await cache.get(first) is not None  # first is now the most recently used
    await cache.put(third, answer(), LONG_TTL)
    assert await cache.get(second) is None
    assert await cache.get(first) is not None
    assert await cache.get(third) is not None


@pytest.mark.parametrize("cache_factory", MEMORY_ONLY, indirect=True)
async def test_least_recently_used_answers_go_past_max_bytes(cache_factory: CacheFactory) -> None:
    one = answer("x" * 1000)
    cache = cache_factory(max_bytes=3 * one.size + one.size // 2)  # room for three
    keys = [new_key() for _ in range(4)]
    for key in keys[:3]:
        await cache.put(key, one, LONG_TTL)
    assert await cache.get(keys[0]) is not None  # keys[1] is now the least recently used
    await cache.put(keys[3], one, LONG_TTL)
    assert await cache.get(keys[1]) is None
    assert all([await cache.get(key) is not None for key in (keys[0], keys[2], keys[3])])
    assert isinstance(cache, MemoryResponseCache)
    assert cache.entries == 3 and cache.bytes == 3 * one.size


@pytest.mark.parametrize("cache_factory", MEMORY_ONLY, indirect=True)
async def test_an_answer_larger_than_the_whole_cache_is_not_kept(
    cache_factory: CacheFactory,
) -> None:
    cache = cache_factory(max_bytes=100)
    key = new_key()
    await cache.put(key, answer("x" * 1000), LONG_TTL)
    assert await cache.get(key) is None
    assert isinstance(cache, MemoryResponseCache)
    assert cache.bytes == 0


async def test_the_first_claim_wins_and_others_learn_its_run(cache: ResponseCache) -> None:
    key = new_key()
    assert await cache.claim_inflight(key, "run_a", LONG_TTL) is None
    assert await cache.claim_inflight(key, "run_b", LONG_TTL) == "run_a"
    assert await cache.claim_inflight(key, "run_a", LONG_TTL) is None  # its own claim
    assert await cache.claim_inflight(new_key(), "run_b", LONG_TTL) is None  # another key


async def test_claims_run_in_parallel_have_one_winner(cache: ResponseCache) -> None:
    key = new_key()
    results = await asyncio.gather(
        *(cache.claim_inflight(key, f"run_{i}", LONG_TTL) for i in range(20))
    )
    winners = [f"run_{i}" for i, holder in enumerate(results) if holder is None]
    assert len(winners) == 1
    assert {holder for holder in results if holder is not None} == set(winners)


async def test_only_the_holder_releases_a_claim(cache: ResponseCache) -> None:
    key = new_key()
    await cache.claim_inflight(key, "run_a", LONG_TTL)
    await cache.release_inflight(key, "run_b")
    assert await cache.claim_inflight(key, "run_c", LONG_TTL) == "run_a"
    await cache.release_inflight(key, "run_a")
    assert await cache.claim_inflight(key, "run_c", LONG_TTL) is None


async def test_a_claim_expires_after_its_ttl(cache: ResponseCache) -> None:
    key = new_key()
    await cache.claim_inflight(key, "run_a", SHORT_TTL)
    await asyncio.sleep(EXPIRY_WAIT)
    assert await cache.claim_inflight(key, "run_b", LONG_TTL) is None


async def test_claims_and_answers_do_not_collide(cache: ResponseCache) -> None:
    key = new_key()
    await cache.claim_inflight(key, "run_a", LONG_TTL)
    assert await cache.get(key) is None
    await cache.put(key, answer(), LONG_TTL)
    assert await cache.claim_inflight(key, "run_b", LONG_TTL) == "run_a"
    await cache.release_inflight(key, "run_a")
    assert await cache.get(key) is not None


# Redis only: the key layout, and outages that must never fail a request.


async def test_redis_keeps_answers_under_the_prefix_with_a_ttl(redis_url: str) -> None:
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    store = RedisStore(redis_url, key_prefix=prefix)
    cache = RedisResponseCache(store)
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        key = new_key()
        await cache.put(key, answer(), 30.0)
        await cache.claim_inflight(key, "run_a", 20.0)
        answer_ttl = await client.pttl(f"{prefix}cache:{{{key}}}")
        claim_ttl = await client.pttl(f"{prefix}inflight:{{{key}}}")
        assert 0 < answer_ttl <= 30_000
        assert 0 < claim_ttl <= 20_000
        assert await client.get(f"{prefix}inflight:{{{key}}}") == b"run_a"
    finally:
        await client.aclose()
        await cache.close()
        await store.close()


async def test_redis_entries_of_another_format_are_misses(redis_url: str) -> None:
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    store = RedisStore(redis_url, key_prefix=prefix)
    cache = RedisResponseCache(store)
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        key = new_key()
        for stored in (b"not json", b'["answer/0;events/1", 1, []]', b'{"a": 1}'):
            await client.set(f"{prefix}cache:{{{key}}}", stored)
            assert await cache.get(key) is None
    finally:
        await client.aclose()
        await cache.close()
        await store.close()


async def test_a_redis_outage_is_a_miss_never_an_error(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, socket_timeout=1.0)
    cache = RedisResponseCache(store)
    try:
        key = new_key()
        await cache.put(key, answer(), LONG_TTL)
        redis_server.kill()
        with capture_logs() as logs:
            assert await cache.get(key) is None
            await cache.put(new_key(), answer(), LONG_TTL)
            assert await cache.claim_inflight(key, "run_a", LONG_TTL) is None  # claimed nothing
            await cache.release_inflight(key, "run_a")
        degraded = [log for log in logs if log["event"] == "cache_degraded"]
        assert len(degraded) == 1  # once per outage, not once per request
        assert degraded[0]["log_level"] == "warning"
        redis_server.start()  # the same port, empty: it works again without a restart of ours
        await cache.put(key, answer(), LONG_TTL)
        assert await cache.get(key) is not None
    finally:
        await cache.close()
        await store.close()
