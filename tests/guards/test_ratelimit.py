"""TenantLimiter and MeteredSource over every LimitCounters backend (memory, a real Redis).

What a tenant sees: which requests are let through, the RateLimit headers on each answer, and
that a run gives back what it did not use however it ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.backends.test_limit_counters_contract import BACKENDS, close_counters, make_counters
from tests.conftest import RedisServer, free_port
from tokenrelay.backends.redis_counters import RedisLimitCounters
from tokenrelay.backends.redis_store import RedisStore
from tokenrelay.config import RateLimitSettings, TenantLimits
from tokenrelay.errors import RateLimited, UpstreamDisconnected
from tokenrelay.events import EventDraft, EventType
from tokenrelay.guards.counters import LimitCounters, LimitKey
from tokenrelay.guards.ratelimit import Admission, TenantLimiter
from tokenrelay.guards.tokens import MeteredSource

TENANT = "acme"
TOKENS = LimitKey(TENANT, "tokens")
STREAMS = LimitKey(TENANT, "streams")


@pytest.fixture(params=BACKENDS)
async def counters(request: pytest.FixtureRequest) -> AsyncIterator[LimitCounters]:
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    made = make_counters(request.param, redis_url)
    yield made
    await close_counters(made)


def limiter(counters: LimitCounters, **limits: int) -> TenantLimiter:
    settings = RateLimitSettings(tenants={TENANT: TenantLimits(**limits)})
    return TenantLimiter(settings, counters)


async def tokens_left(counters: LimitCounters, limit: int) -> int:
    """What the tenant's token window has left (a reservation of nothing takes nothing)."""
    return (await counters.reserve(TOKENS, 0, limit, 60)).remaining


async def slot_is_free(counters: LimitCounters) -> bool:
    probe = await counters.acquire(STREAMS, 1, 60, "probe")
    await counters.release(STREAMS, "probe")
    return probe.acquired


async def refused(limits: TenantLimiter, reserve_tokens: int = 1) -> RateLimited:
    with pytest.raises(RateLimited) as caught:
        await limits.admit(TENANT, reserve_tokens=reserve_tokens)
    return caught.value


# Admission


async def test_a_tenant_without_limits_is_admitted_without_touching_the_store() -> None:
    # A Redis that is not there: any round trip would fail the admission.
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.5)
    counters = RedisLimitCounters(store)
    try:
        limits = TenantLimiter(RateLimitSettings(), counters)
        admission = await limits.admit("anyone", reserve_tokens=10_000)
        assert admission.headers == {}
        assert not admission.holds_until_settled  # its runs need no metering
        await admission.settle(10_000)
    finally:
        await counters.close()
        await store.close()


async def test_requests_over_the_limit_get_429_with_retry_after_and_headers(
    counters: LimitCounters,
) -> None:
    limits = limiter(counters, requests_per_minute=3)
    admitted = [await limits.admit(TENANT, reserve_tokens=1) for _ in range(3)]
    assert [a.headers["RateLimit"].split(";")[:2] for a in admitted] == [
        ['"requests"', "r=2"],
        ['"requests"', "r=1"],
        ['"requests"', "r=0"],
    ]
    error = await refused(limits)
    assert error.instance_code() == "rate_limited" and error.instance_status() == 429
    assert error.retry_after is not None and 1 <= error.retry_after <= 120
    assert error.retry_after == int(error.retry_after)  # whole seconds
    assert error.headers == {
        "RateLimit-Policy": '"requests";q=3;w=60',
        "RateLimit": f'"requests";r=0;t={int(error.retry_after)}',
    }


async def test_only_slots_and_token_reservations_wait_for_the_run(
    counters: LimitCounters,
) -> None:
    only_requests = await limiter(counters, requests_per_minute=3).admit(TENANT, reserve_tokens=1)
    assert not only_requests.holds_until_settled  # a request is counted once, at admission
    streams = await limiter(counters, concurrent_streams=2).admit(TENANT, reserve_tokens=1)
    tokens = await limiter(counters, tokens_per_minute=100).admit(TENANT, reserve_tokens=1)
    assert streams.holds_until_settled and tokens.holds_until_settled
    await streams.settle(1)
    await tokens.settle(1)
    assert not streams.holds_until_settled and not tokens.holds_until_settled


async def test_successful_admissions_name_the_policy_closest_to_its_limit(
    counters: LimitCounters,
) -> None:
    limits = limiter(counters, requests_per_minute=10, concurrent_streams=4, tokens_per_minute=1000)
    policy = '"requests";q=10;w=60, "streams";q=4;qu="concurrent-requests", "tokens";q=1000;w=60'
    light = await limits.admit(TENANT, reserve_tokens=10)
    assert light.headers["RateLimit-Policy"] == policy
    assert light.headers["RateLimit"].startswith('"streams";r=3')  # 3/4 left, the least share
    heavy = await limits.admit(TENANT, reserve_tokens=900)
    rate_limit = heavy.headers["RateLimit"]
    assert rate_limit.startswith('"tokens";r=90;t=')
    assert 1 <= int(rate_limit.rsplit("t=", 1)[1]) <= 60


async def test_a_request_refused_for_streams_uses_up_no_request(counters: LimitCounters) -> None:
    limits = limiter(counters, requests_per_minute=3, concurrent_streams=1)
    running = await limits.admit(TENANT, reserve_tokens=1)
    for _ in range(3):
        error = await refused(limits)
        assert error.headers["RateLimit"] == '"streams";r=0;t=1'
        assert error.retry_after == 1
    await running.settle(0)
    for _ in range(2):
        admission = await limits.admit(TENANT, reserve_tokens=1)
        await admission.settle(0)
    assert (await refused(limits)).headers["RateLimit"].startswith('"requests";r=0')


async def test_a_request_refused_for_tokens_holds_no_slot_and_no_request(
    counters: LimitCounters,
) -> None:
    limits = limiter(counters, requests_per_minute=2, concurrent_streams=1, tokens_per_minute=100)
    first = await limits.admit(TENANT, reserve_tokens=100)
    await first.settle(100)  # the window's tokens are used up
    error = await refused(limits, reserve_tokens=10)
    assert error.headers["RateLimit"].startswith('"tokens";r=0;t=')
    assert await slot_is_free(counters)
    assert await tokens_left(counters, 100) == 0
    # The refused request did not count: one more request still fits the minute (and is refused
    # for its tokens again, not for requests).
    assert (await refused(limits, reserve_tokens=10)).headers["RateLimit"].startswith('"tokens"')


async def test_a_reservation_larger_than_the_limit_runs_alone_in_an_empty_window(
    counters: LimitCounters,
) -> None:
    limits = limiter(counters, tokens_per_minute=100)
    admission = await limits.admit(TENANT, reserve_tokens=5000)
    assert admission.reserved_tokens == 100
    await refused(limits, reserve_tokens=1)
    await admission.settle(40)
    assert await tokens_left(counters, 100) == 60


async def test_settle_charges_what_was_used_and_releases_the_slot(
    counters: LimitCounters,
) -> None:
    limits = limiter(counters, concurrent_streams=1, tokens_per_minute=1000)
    admission = await limits.admit(TENANT, reserve_tokens=600)
    assert await tokens_left(counters, 1000) == 400
    assert not await slot_is_free(counters)
    await admission.settle(250)
    assert admission.settled
    assert await tokens_left(counters, 1000) == 750
    assert await slot_is_free(counters)


async def test_settle_counts_only_once(counters: LimitCounters) -> None:
    limits = limiter(counters, concurrent_streams=2, tokens_per_minute=1000)
    admission = await limits.admit(TENANT, reserve_tokens=100)
    other = await limits.admit(TENANT, reserve_tokens=100)
    await admission.settle(300)
    await admission.settle(0)
    await admission.settle(900)
    assert await tokens_left(counters, 1000) == 600  # 300 used, 100 reserved by the other
    third = await limits.admit(TENANT, reserve_tokens=1)  # only one slot was released
    await refused(limits)
    await other.settle(0)
    await third.settle(0)


async def test_settle_never_raises_when_the_store_is_gone(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, key_prefix="test:", socket_timeout=0.5)
    counters = RedisLimitCounters(store)
    try:
        limits = limiter(counters, concurrent_streams=1, tokens_per_minute=1000)
        admission = await limits.admit(TENANT, reserve_tokens=100)
        redis_server.kill()
        await admission.settle(50)  # logged, not raised
        assert admission.settled
    finally:
        await counters.close()
        await store.close()


async def test_parallel_admissions_never_exceed_any_limit(counters: LimitCounters) -> None:
    limits = limiter(counters, requests_per_minute=30, concurrent_streams=5, tokens_per_minute=450)

    async def try_admit() -> Admission | None:
        try:
            return await limits.admit(TENANT, reserve_tokens=100)
        except RateLimited:
            return None

    admitted = [a for a in await asyncio.gather(*(try_admit() for _ in range(50))) if a]
    assert len(admitted) == 4  # 4 x 100 tokens of 450; 5 slots would have allowed one more
    assert await tokens_left(counters, 450) == 50
    for admission in admitted:
        await admission.settle(0)
    assert await tokens_left(counters, 450) == 450


# MeteredSource


async def drafts(
    *items: EventDraft, fail: BaseException | None = None
) -> AsyncIterator[EventDraft]:
    for item in items:
        yield item
    if fail is not None:
        raise fail


def delta(text: str) -> EventDraft:
    return (EventType.MESSAGE_DELTA, {"index": 0, "content": text})


STARTED: EventDraft = (EventType.RUN_STARTED, {"model": "mock-model"})
TOOL_CALL: EventDraft = (
    EventType.TOOL_CALL_DELTA,
    {"index": 0, "tool_calls": [{"index": 0, "function": {"name": "get", "arguments": "{}"}}]},
)


async def metered_admission(counters: LimitCounters) -> tuple[TenantLimiter, Admission]:
    limits = limiter(counters, concurrent_streams=1, tokens_per_minute=10_000)
    return limits, await limits.admit(TENANT, reserve_tokens=5000)


async def test_a_source_read_to_its_end_settles_prompt_and_generated_text(
    counters: LimitCounters,
) -> None:
    _, admission = await metered_admission(counters)
    events = [STARTED, delta("a" * 40), delta("b" * 3), TOOL_CALL]
    source = MeteredSource(drafts(*events), admission, prompt_tokens=20)
    received = [event async for event in source]
    assert received == events and all(a is b for a, b in zip(received, events, strict=True))
    # 20 for the prompt, ceil((40 + 3 + 5) / 4) = 12 generated.
    assert source.used_tokens == 32
    assert admission.settled
    assert await tokens_left(counters, 10_000) == 10_000 - 32
    assert await slot_is_free(counters)


async def test_the_usage_total_replaces_the_estimate(counters: LimitCounters) -> None:
    _, admission = await metered_admission(counters)
    usage: EventDraft = (
        EventType.USAGE,
        {"prompt_tokens": 900, "completion_tokens": 334, "total_tokens": 1234},
    )
    source = MeteredSource(drafts(STARTED, delta("x" * 400), usage), admission, 20)
    async for _ in source:
        pass
    assert await tokens_left(counters, 10_000) == 10_000 - 1234


async def test_a_failing_source_settles_what_it_streamed_and_raises(
    counters: LimitCounters,
) -> None:
    _, admission = await metered_admission(counters)
    failure = UpstreamDisconnected("the upstream closed the stream")
    source = MeteredSource(drafts(STARTED, delta("y" * 80), fail=failure), admission, 10)
    seen = []
    with pytest.raises(UpstreamDisconnected):
        async for event in source:
            seen.append(event)
    assert len(seen) == 2
    assert await tokens_left(counters, 10_000) == 10_000 - 30
    assert await slot_is_free(counters)


async def test_a_cancelled_run_is_charged_what_its_client_was_sent(
    counters: LimitCounters,
) -> None:
    _, admission = await metered_admission(counters)
    waiting = asyncio.Event()

    async def endless() -> AsyncIterator[EventDraft]:
        yield STARTED
        yield delta("z" * 20)
        waiting.set()
        await asyncio.Event().wait()  # an upstream that stalls until the client leaves
        yield delta("never")

    source = MeteredSource(endless(), admission, 10)

    async def consume() -> None:
        async for _ in source:
            pass

    reader = asyncio.create_task(consume())
    await asyncio.wait_for(waiting.wait(), 5)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert admission.settled
    assert await tokens_left(counters, 10_000) == 10_000 - 15
    assert await slot_is_free(counters)


async def test_a_source_closed_before_it_started_refunds_everything(
    counters: LimitCounters,
) -> None:
    _, admission = await metered_admission(counters)
    assert await tokens_left(counters, 10_000) == 5000
    inner = drafts(STARTED, delta("never sent"))
    source = MeteredSource(inner, admission, 500)
    await source.aclose()
    assert admission.settled
    assert await tokens_left(counters, 10_000) == 10_000
    assert await slot_is_free(counters)
    with pytest.raises(StopAsyncIteration):  # the upstream source is closed too
        await anext(inner)


async def test_a_source_closed_mid_stream_settles_what_it_streamed(
    counters: LimitCounters,
) -> None:
    _, admission = await metered_admission(counters)
    closed = asyncio.Event()

    async def tracked() -> AsyncIterator[EventDraft]:
        try:
            yield STARTED
            yield delta("w" * 8)
            yield delta("unread")
        finally:
            closed.set()

    source = MeteredSource(tracked(), admission, 4)
    await anext(source)
    await anext(source)
    await source.aclose()
    assert closed.is_set()
    assert await tokens_left(counters, 10_000) == 10_000 - 6


async def test_the_admission_is_settled_once_whatever_follows(counters: LimitCounters) -> None:
    limits, admission = await metered_admission(counters)
    source = MeteredSource(drafts(STARTED, delta("q" * 4)), admission, 3)
    async for _ in source:
        pass
    await source.aclose()  # as the Hub does after every run
    await admission.settle(0)  # as a route does when its start failed late
    assert await tokens_left(counters, 10_000) == 10_000 - 4
    next_one = await limits.admit(TENANT, reserve_tokens=1)  # the one slot is free
    await next_one.settle(0)


async def test_a_usage_event_without_a_usable_total_leaves_the_estimate(
    counters: LimitCounters,
) -> None:
    _, admission = await metered_admission(counters)
    usage: dict[str, Any] = {"total_tokens": None}
    source = MeteredSource(drafts(delta("e" * 8), (EventType.USAGE, usage)), admission, 2)
    async for _ in source:
        pass
    assert source.used_tokens == 4
