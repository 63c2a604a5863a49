"""The LimitCounters contract (``tokenrelay.guards.counters.LimitCounters``), run against every
implementation.

Add an implementation by adding its name to ``BACKENDS`` and a branch to ``make_counters``. The
Redis backend runs against a real redis-server (the ``redis_url`` fixture), each under a key
prefix of its own. Windows and leases that must end within a test are a fraction of a second
long; tests wait at least as long as the counters said, never assert that something happens
within a time.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from tests.conftest import RedisServer
from tokenrelay.backends.memory_counters import MemoryLimitCounters
from tokenrelay.backends.redis_counters import RedisLimitCounters
from tokenrelay.backends.redis_store import RedisStore
from tokenrelay.errors import StoreUnavailable
from tokenrelay.guards.counters import LimitCounters, LimitKey

BACKENDS = ["memory", "redis"]

MINUTE = 60.0  # long enough that no window ends during a test
SHORT = 0.4  # seconds: a window or lease a test waits out
MARGIN = 0.1  # added to every wait the counters announce (Redis counts in milliseconds)

REQUESTS = LimitKey("acme", "requests")
TOKENS = LimitKey("acme", "tokens")
STREAMS = LimitKey("acme", "streams")


def make_counters(backend: str, redis_url: str | None = None) -> LimitCounters:
    if backend == "memory":
        return MemoryLimitCounters()
    if backend == "redis":
        assert redis_url is not None
        return RedisLimitCounters(RedisStore(redis_url, key_prefix=f"test:{uuid.uuid4().hex}:"))
    raise AssertionError(f"unknown LimitCounters backend {backend!r}")


async def close_counters(counters: LimitCounters) -> None:
    if isinstance(counters, RedisLimitCounters):
        await counters.close()
        await counters.store.close()


@pytest.fixture(params=BACKENDS)
async def counters(request: pytest.FixtureRequest) -> AsyncIterator[LimitCounters]:
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    made = make_counters(request.param, redis_url)
    yield made
    await close_counters(made)


# Window counters


async def test_hits_are_allowed_up_to_the_limit_then_refused(counters: LimitCounters) -> None:
    results = [await counters.hit(REQUESTS, 3, MINUTE) for _ in range(4)]
    assert [r.allowed for r in results] == [True, True, True, False]
    assert [r.remaining for r in results] == [2, 1, 0, 0]
    refused = results[-1]
    assert 0 < refused.reset_after <= 2 * MINUTE  # a usable Retry-After
    assert 0 < results[0].reset_after <= MINUTE  # the current window's end


async def test_a_refused_hit_takes_nothing(counters: LimitCounters) -> None:
    await counters.hit(REQUESTS, 1, MINUTE)
    for _ in range(5):
        assert not (await counters.hit(REQUESTS, 1, MINUTE)).allowed
    assert (await counters.hit(REQUESTS, 2, MINUTE)).allowed  # a higher limit: one more fits


async def test_reserve_takes_amounts_and_refuses_what_does_not_fit(
    counters: LimitCounters,
) -> None:
    first = await counters.reserve(TOKENS, 600, 1000, MINUTE)
    assert first.allowed and first.remaining == 400
    too_much = await counters.reserve(TOKENS, 500, 1000, MINUTE)
    assert not too_much.allowed and too_much.remaining == 400
    assert (await counters.reserve(TOKENS, 400, 1000, MINUTE)).allowed


async def test_an_amount_larger_than_the_limit_never_fits(counters: LimitCounters) -> None:
    result = await counters.reserve(TOKENS, 1001, 1000, MINUTE)
    assert not result.allowed and result.remaining == 1000


async def test_counters_of_other_tenants_and_names_are_separate(counters: LimitCounters) -> None:
    assert (await counters.hit(REQUESTS, 1, MINUTE)).allowed
    assert (await counters.hit(LimitKey("globex", "requests"), 1, MINUTE)).allowed
    assert (await counters.hit(LimitKey("acme", "other"), 1, MINUTE)).allowed
    assert not (await counters.hit(REQUESTS, 1, MINUTE)).allowed


async def test_a_refused_request_fits_once_its_reset_after_has_passed(
    counters: LimitCounters,
) -> None:
    for _ in range(2):
        assert (await counters.hit(REQUESTS, 2, SHORT)).allowed
    refused = await counters.hit(REQUESTS, 2, SHORT)
    assert not refused.allowed
    await asyncio.sleep(refused.reset_after + MARGIN)
    assert (await counters.hit(REQUESTS, 2, SHORT)).allowed


async def test_the_whole_limit_is_back_two_windows_after_the_last_use(
    counters: LimitCounters,
) -> None:
    assert (await counters.reserve(TOKENS, 100, 100, SHORT)).allowed
    await asyncio.sleep(2 * SHORT + MARGIN)
    result = await counters.reserve(TOKENS, 100, 100, SHORT)
    assert result.allowed and result.remaining == 0


async def test_adjust_refunds_what_a_reservation_did_not_use(counters: LimitCounters) -> None:
    reservation = await counters.reserve(TOKENS, 800, 1000, MINUTE)
    assert not (await counters.reserve(TOKENS, 300, 1000, MINUTE)).allowed
    await counters.adjust(TOKENS, -500, reservation.bucket)  # it used 300
    after = await counters.reserve(TOKENS, 300, 1000, MINUTE)
    assert after.allowed and after.remaining == 400


async def test_adjust_charges_what_a_run_used_beyond_its_reservation(
    counters: LimitCounters,
) -> None:
    reservation = await counters.reserve(TOKENS, 100, 1000, MINUTE)
    await counters.adjust(TOKENS, 850, reservation.bucket)  # it used 950
    assert not (await counters.reserve(TOKENS, 100, 1000, MINUTE)).allowed
    assert (await counters.reserve(TOKENS, 50, 1000, MINUTE)).remaining == 0


async def test_a_refund_never_takes_a_count_below_zero(counters: LimitCounters) -> None:
    reservation = await counters.reserve(TOKENS, 10, 100, MINUTE)
    await counters.adjust(TOKENS, -1000, reservation.bucket)
    assert (await counters.reserve(TOKENS, 100, 100, MINUTE)).allowed
    assert not (await counters.reserve(TOKENS, 1, 100, MINUTE)).allowed


async def test_adjusting_a_bucket_that_no_longer_counts_changes_nothing(
    counters: LimitCounters,
) -> None:
    old = await counters.reserve(TOKENS, 10, 100, SHORT)
    await asyncio.sleep(2 * SHORT + MARGIN)
    now = await counters.reserve(TOKENS, 10, 100, SHORT)
    await counters.adjust(TOKENS, 1000, old.bucket)
    assert (await counters.reserve(TOKENS, 80, 100, SHORT)).allowed
    assert now.bucket > old.bucket


async def test_adjust_of_a_counter_never_used_is_harmless(counters: LimitCounters) -> None:
    await counters.adjust(LimitKey("nobody", "tokens"), 50, 12345)
    assert (await counters.reserve(LimitKey("nobody", "tokens"), 100, 100, MINUTE)).allowed


async def test_parallel_hits_never_admit_more_than_the_limit(counters: LimitCounters) -> None:
    results = await asyncio.gather(*(counters.hit(REQUESTS, 20, MINUTE) for _ in range(50)))
    assert sum(r.allowed for r in results) == 20


async def test_parallel_reservations_never_exceed_the_limit(counters: LimitCounters) -> None:
    results = await asyncio.gather(*(counters.reserve(TOKENS, 10, 125, MINUTE) for _ in range(50)))
    assert sum(r.allowed for r in results) == 12
    assert min(r.remaining for r in results) == 5


# Slots


async def test_slots_are_taken_up_to_the_limit_and_released(counters: LimitCounters) -> None:
    first = await counters.acquire(STREAMS, 2, MINUTE, "a")
    second = await counters.acquire(STREAMS, 2, MINUTE, "b")
    third = await counters.acquire(STREAMS, 2, MINUTE, "c")
    assert (first.acquired, first.held) == (True, 1)
    assert (second.acquired, second.held) == (True, 2)
    assert (third.acquired, third.held) == (False, 2)
    assert 0 < third.expires_after <= MINUTE
    await counters.release(STREAMS, "a")
    assert (await counters.acquire(STREAMS, 2, MINUTE, "c")).acquired


async def test_a_holder_acquiring_again_keeps_its_one_slot(counters: LimitCounters) -> None:
    await counters.acquire(STREAMS, 2, MINUTE, "a")
    again = await counters.acquire(STREAMS, 2, MINUTE, "a")
    assert (again.acquired, again.held) == (True, 1)
    assert (await counters.acquire(STREAMS, 2, MINUTE, "b")).acquired


async def test_releasing_a_slot_not_held_is_harmless(counters: LimitCounters) -> None:
    await counters.release(STREAMS, "nobody")
    await counters.acquire(STREAMS, 1, MINUTE, "a")
    await counters.release(STREAMS, "b")
    assert not (await counters.acquire(STREAMS, 1, MINUTE, "c")).acquired


async def test_a_slot_never_released_comes_back_when_its_lease_ends(
    counters: LimitCounters,
) -> None:
    assert (await counters.acquire(STREAMS, 1, SHORT, "crashed")).acquired
    refused = await counters.acquire(STREAMS, 1, SHORT, "next")
    assert not refused.acquired
    await asyncio.sleep(refused.expires_after + MARGIN)
    assert (await counters.acquire(STREAMS, 1, SHORT, "next")).acquired


async def test_parallel_acquires_never_hold_more_than_the_limit(counters: LimitCounters) -> None:
    results = await asyncio.gather(
        *(counters.acquire(STREAMS, 7, MINUTE, f"holder-{i}") for i in range(50))
    )
    assert sum(r.acquired for r in results) == 7
    await asyncio.gather(*(counters.release(STREAMS, f"holder-{i}") for i in range(50)))
    assert (await counters.acquire(STREAMS, 7, MINUTE, "later")).held == 1


# Redis only


async def test_redis_keys_carry_the_tenant_as_hash_tag_and_expire(redis_url: str) -> None:
    prefix = f"test:{uuid.uuid4().hex}:"
    store = RedisStore(redis_url, key_prefix=prefix)
    counters = RedisLimitCounters(store)
    try:
        await counters.hit(REQUESTS, 5, MINUTE)
        await counters.acquire(STREAMS, 5, 30.0, "a")
        keys = sorted(await store.client.keys(prefix + "*"))
        assert keys == [
            f"{prefix}limits:{{acme}}:requests".encode(),
            f"{prefix}limits:{{acme}}:streams".encode(),
        ]
        assert 0 < await store.client.pttl(keys[0]) <= 2 * MINUTE * 1000
        assert 0 < await store.client.pttl(keys[1]) <= 30_000
    finally:
        await counters.close()
        await store.close()


async def test_redis_counters_fail_with_store_unavailable_and_recover(
    redis_server: RedisServer,
) -> None:
    store = RedisStore(redis_server.url, key_prefix="test:", socket_timeout=1.0)
    counters = RedisLimitCounters(store)
    try:
        assert (await counters.hit(REQUESTS, 5, MINUTE)).allowed
        redis_server.kill()
        with pytest.raises(StoreUnavailable):
            await counters.hit(REQUESTS, 5, MINUTE)
        with pytest.raises(StoreUnavailable):
            await counters.acquire(STREAMS, 5, MINUTE, "a")
        redis_server.start()  # empty, like a restart without persistence
        assert (await counters.hit(REQUESTS, 5, MINUTE)).remaining == 4
        assert (await counters.acquire(STREAMS, 5, MINUTE, "a")).acquired
    finally:
        await counters.close()
        await store.close()
