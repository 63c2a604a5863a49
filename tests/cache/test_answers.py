"""AnswerCache over a real Hub and the memory stores: hits, misses, bypass, and coalescing.

The upstream is a source of our own that counts the generations it really starts (the body of
its generator ran), and can hold a generation in flight or fail it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from tokenrelay.backends.memory import MemoryRunRegistry, MemoryStreamLog
from tokenrelay.backends.memory_cache import MemoryResponseCache
from tokenrelay.cache.answers import BYPASS, AnswerCache, CacheDecision, CacheOutcome
from tokenrelay.cache.key import cache_key
from tokenrelay.config import CacheSettings
from tokenrelay.errors import ServiceUnavailable, UpstreamDisconnected
from tokenrelay.events import TERMINAL_TYPES, Event, EventDraft, EventType
from tokenrelay.runs.hub import Hub
from tokenrelay.runs.subscription import Subscription

# Only keeps a broken cache from hanging the suite; never a timing claim.
HANG_GUARD = 5.0
UPSTREAM = "http://upstream.test/v1"
BODY: dict[str, Any] = {
    "model": "mock-model",
    "messages": [{"role": "user", "content": "Say two words."}],
    "temperature": 0,
}
ANSWER: list[EventDraft] = [
    (EventType.RUN_STARTED, {"response_id": "chatcmpl-1", "model": "mock-model", "created": 7}),
    (EventType.MESSAGE_DELTA, {"index": 0, "role": "assistant", "content": ""}),
    (EventType.MESSAGE_DELTA, {"index": 0, "content": "Hel"}),
    (EventType.MESSAGE_DELTA, {"index": 0, "content": "lo"}),
    (EventType.MESSAGE_COMPLETED, {"index": 0, "finish_reason": "stop"}),
    (EventType.USAGE, {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}),
]


class Upstream:
    """A source factory like the routes', that counts and can hold or fail its generations.

    ``hold_after`` drafts into each generation it waits for ``release``; then it raises
    ``fails`` if given.
    """

    def __init__(
        self,
        drafts: Sequence[EventDraft] = ANSWER,
        *,
        hold_after: int | None = None,
        fails: Exception | None = None,
    ) -> None:
        self.drafts = list(drafts)
        self.hold_after = hold_after
        self.fails = fails
        self.made = 0  # sources made (the factory was called)
        self.started = 0  # generations that really began: upstream requests
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    def __call__(self) -> AsyncIterator[EventDraft]:
        self.made += 1
        return self._generate()

    async def _generate(self) -> AsyncIterator[EventDraft]:
        self.started += 1
        for position, (event_type, data) in enumerate(self.drafts):
            if position == self.hold_after:
                self.holding.set()
                await self.release.wait()
            yield event_type, dict(data)  # a fresh dict per event, as a real source makes
        if self.fails is not None:
            raise self.fails


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    log, registry = MemoryStreamLog(), MemoryRunRegistry()
    the_hub = Hub(log, registry)
    yield the_hub
    await the_hub.close()
    log.close()
    registry.close()


@pytest.fixture
async def store() -> AsyncIterator[MemoryResponseCache]:
    cache_store = MemoryResponseCache()
    yield cache_store
    await cache_store.close()


def make_cache(hub: Hub, store: MemoryResponseCache, **settings: Any) -> AnswerCache:
    return AnswerCache(CacheSettings(**settings), store, hub, UPSTREAM)


@pytest.fixture
def cache(hub: Hub, store: MemoryResponseCache) -> AnswerCache:
    return make_cache(hub, store)


def starter(hub: Hub) -> Any:
    async def start(source: AsyncIterator[EventDraft]) -> Subscription:
        return await hub.start(source, disconnect_grace=0)

    return start


async def open_request(
    cache: AnswerCache,
    hub: Hub,
    upstream: Upstream,
    body: dict[str, Any] | None = None,
    *,
    tenant: str = "t1",
    cache_control: str | None = None,
) -> CacheOutcome:
    decision = cache.decide(tenant, body or BODY, cache_control)
    return await cache.open(decision, upstream, starter(hub))


async def collect(subscription: Subscription) -> list[Event]:
    """Every event of the run up to its terminal event, then the reader is closed."""
    events: list[Event] = []
    try:
        while not events or events[-1].type not in TERMINAL_TYPES:
            batch = await subscription.next_batch(HANG_GUARD)
            assert batch, "the run produced no terminal event"
            events.extend(batch)
    finally:
        await subscription.close()
    return events


def drafts_of(events: Sequence[Event]) -> list[EventDraft]:
    """What a client sees of a run, without the run's own id."""
    return [
        (event.type, {name: value for name, value in event.data.items() if name != "run_id"})
        for event in events
    ]


async def wait_until_ended(subscription: Subscription) -> None:
    task = subscription.run.task if subscription.run is not None else None
    assert task is not None
    await asyncio.wait((task,), timeout=HANG_GUARD)
    assert task.done(), "the run did not end"


# Decisions


def test_a_deterministic_request_may_be_read_and_written(cache: AnswerCache) -> None:
    decision = cache.decide("t1", BODY, None)
    assert decision == CacheDecision(cache_key("t1", UPSTREAM, BODY), read=True, write=True)
    assert not decision.bypass


def test_no_cache_skips_stored_answers_but_stores_the_fresh_one(cache: AnswerCache) -> None:
    decision = cache.decide("t1", BODY, "No-Cache")
    assert (decision.read, decision.write) == (False, True)
    assert decision.key is not None


@pytest.mark.parametrize("header", ["no-store", "max-age=0, no-store", "no-cache,no-store"])
def test_no_store_keeps_the_cache_out(cache: AnswerCache, header: str) -> None:
    assert cache.decide("t1", BODY, header) == BYPASS


def test_a_sampled_request_bypasses_the_cache(cache: AnswerCache) -> None:
    assert cache.decide("t1", {**BODY, "temperature": 0.7}, None).bypass
    assert cache.decide("t1", {key: v for key, v in BODY.items() if key != "temperature"}, None)


def test_policies_by_tenant_and_model_and_the_switch(hub: Hub, store: MemoryResponseCache) -> None:
    sampled = {**BODY, "temperature": 0.7}
    by_tenant = make_cache(hub, store, tenants={"t2": "always"}, models={"mock-model": "never"})
    assert by_tenant.decide("t1", BODY, None).bypass  # the model's policy
    assert not by_tenant.decide("t2", sampled, None).bypass  # the tenant's wins
    assert make_cache(hub, store, enabled=False).decide("t1", BODY, None).bypass


# Hits and misses


async def test_a_completed_run_is_replayed_identically(
    cache: AnswerCache, hub: Hub, store: MemoryResponseCache
) -> None:
    upstream = Upstream()
    first = await open_request(cache, hub, upstream)
    assert (first.x_cache, first.coalesced, first.upstream_cost) == ("miss", False, True)
    missed = await collect(first.subscription)
    second = await open_request(cache, hub, upstream)
    assert (second.x_cache, second.coalesced, second.upstream_cost) == ("hit", False, False)
    hit = await collect(second.subscription)
    assert drafts_of(hit) == drafts_of(missed) == [*ANSWER, (EventType.RUN_COMPLETED, {})]
    assert hit[0].data["run_id"] == second.subscription.run_id != first.subscription.run_id
    assert upstream.started == upstream.made == 1  # the hit never made a source


async def test_replays_leave_the_stored_answer_untouched(
    cache: AnswerCache, hub: Hub, store: MemoryResponseCache
) -> None:
    await collect((await open_request(cache, hub, Upstream())).subscription)
    for _ in range(2):
        await collect((await open_request(cache, hub, Upstream())).subscription)
    stored = await store.get(cache_key("t1", UPSTREAM, BODY))
    assert stored is not None
    assert list(stored.drafts) == ANSWER  # no run id of any run written into it


async def test_a_paced_replay_is_the_same_answer(hub: Hub, store: MemoryResponseCache) -> None:
    cache = make_cache(hub, store, replay="paced", replay_interval_ms=1)
    missed = await collect((await open_request(cache, hub, Upstream())).subscription)
    outcome = await open_request(cache, hub, Upstream())
    assert outcome.x_cache == "hit"
    assert drafts_of(await collect(outcome.subscription)) == drafts_of(missed)


async def test_no_cache_generates_again_and_replaces_the_answer(
    cache: AnswerCache, hub: Hub
) -> None:
    await collect((await open_request(cache, hub, Upstream())).subscription)
    newer = Upstream([*ANSWER[:2], (EventType.MESSAGE_DELTA, {"index": 0, "content": "New"})])
    outcome = await open_request(cache, hub, newer, cache_control="no-cache")
    assert (outcome.x_cache, outcome.upstream_cost) == ("miss", True)
    await collect(outcome.subscription)
    assert newer.started == 1
    replayed = await collect((await open_request(cache, hub, Upstream())).subscription)
    assert drafts_of(replayed)[:-1] == newer.drafts


async def test_a_bypassed_request_is_neither_read_nor_stored(cache: AnswerCache, hub: Hub) -> None:
    upstream = Upstream()
    await collect((await open_request(cache, hub, upstream)).subscription)
    outcome = await open_request(cache, hub, upstream, cache_control="no-store")
    assert (outcome.x_cache, outcome.upstream_cost) == ("bypass", True)
    await collect(outcome.subscription)
    sampled = {**BODY, "temperature": 0.7}
    for _ in range(2):
        outcome = await open_request(cache, hub, upstream, sampled)
        assert outcome.x_cache == "bypass"
        await collect(outcome.subscription)
    assert upstream.started == 4


async def test_tenants_do_not_share_answers(cache: AnswerCache, hub: Hub) -> None:
    upstream = Upstream()
    await collect((await open_request(cache, hub, upstream, tenant="t1")).subscription)
    outcome = await open_request(cache, hub, upstream, tenant="t2")
    assert outcome.x_cache == "miss"
    await collect(outcome.subscription)
    assert upstream.started == 2


@pytest.mark.parametrize(
    "fails",
    [UpstreamDisconnected("cut off mid-stream"), RuntimeError("a bug in the source")],
    ids=["upstream-error", "crash"],
)
async def test_a_failed_run_is_not_stored(
    cache: AnswerCache, hub: Hub, store: MemoryResponseCache, fails: Exception
) -> None:
    failing = Upstream(fails=fails)
    events = await collect((await open_request(cache, hub, failing)).subscription)
    assert events[-1].type is EventType.RUN_FAILED
    assert store.entries == 0
    upstream = Upstream()
    outcome = await open_request(cache, hub, upstream)
    assert outcome.x_cache == "miss"
    assert (await collect(outcome.subscription))[-1].type is EventType.RUN_COMPLETED
    assert upstream.started == 1


async def test_a_cancelled_run_is_not_stored(
    cache: AnswerCache, hub: Hub, store: MemoryResponseCache
) -> None:
    held = Upstream(hold_after=3)
    outcome = await open_request(cache, hub, held)
    await asyncio.wait_for(held.holding.wait(), HANG_GUARD)
    await outcome.subscription.close()  # its only reader left: the run is cancelled
    await wait_until_ended(outcome.subscription)
    log = await hub.log.read(outcome.subscription.run_id, 0, 0)
    assert log[-1].type is EventType.RUN_CANCELLED
    assert store.entries == 0
    assert cache.inflight == 0
    assert (await open_request(cache, hub, Upstream())).x_cache == "miss"


async def test_an_answer_over_max_entry_bytes_is_relayed_but_not_stored(
    hub: Hub, store: MemoryResponseCache
) -> None:
    cache = make_cache(hub, store, max_entry_bytes=200)
    long_text = [(EventType.MESSAGE_DELTA, {"index": 0, "content": "x" * 100})] * 5
    upstream = Upstream([*ANSWER[:2], *long_text])
    events = await collect((await open_request(cache, hub, upstream)).subscription)
    assert drafts_of(events)[:-1] == upstream.drafts
    assert events[-1].type is EventType.RUN_COMPLETED
    assert store.entries == 0
    assert (await open_request(cache, hub, upstream)).x_cache == "miss"


# Coalescing


async def held_requests(
    cache: AnswerCache, hub: Hub, upstream: Upstream, count: int
) -> list[CacheOutcome]:
    """``count`` identical requests opened together while their generation is held."""
    outcomes = await asyncio.gather(*(open_request(cache, hub, upstream) for _ in range(count)))
    await asyncio.wait_for(upstream.holding.wait(), HANG_GUARD)
    return outcomes


async def test_identical_requests_in_flight_share_one_generation(
    cache: AnswerCache, hub: Hub
) -> None:
    upstream = Upstream(hold_after=2)
    outcomes = await held_requests(cache, hub, upstream, 20)
    upstream.release.set()
    streams = await asyncio.gather(*(collect(outcome.subscription) for outcome in outcomes))
    assert upstream.started == upstream.made == 1
    assert len({outcome.subscription.run_id for outcome in outcomes}) == 1
    assert {outcome.x_cache for outcome in outcomes} == {"miss"}
    assert sum(outcome.upstream_cost for outcome in outcomes) == 1
    assert sum(outcome.coalesced for outcome in outcomes) == 19
    assert all(stream == streams[0] for stream in streams)  # the same events, from the start
    assert drafts_of(streams[0]) == [*ANSWER, (EventType.RUN_COMPLETED, {})]
    assert cache.inflight == 0
    assert (await open_request(cache, hub, upstream)).x_cache == "hit"


async def test_a_shared_failure_reaches_every_reader(cache: AnswerCache, hub: Hub) -> None:
    upstream = Upstream(hold_after=2, fails=UpstreamDisconnected("the upstream hung up"))
    outcomes = await held_requests(cache, hub, upstream, 20)
    upstream.release.set()
    streams = await asyncio.gather(*(collect(outcome.subscription) for outcome in outcomes))
    assert upstream.started == 1
    terminals = [stream[-1] for stream in streams]
    assert {terminal.type for terminal in terminals} == {EventType.RUN_FAILED}
    assert all(terminal == terminals[0] for terminal in terminals)
    assert terminals[0].data["code"] == "upstream_disconnected"
    (run,) = {outcome.subscription.run for outcome in outcomes}  # one run, one error:
    assert run is not None and isinstance(run.failure, UpstreamDisconnected)  # one HTTP answer
    assert (await open_request(cache, hub, Upstream())).x_cache == "miss"


async def test_a_reader_leaving_early_does_not_affect_the_others(
    cache: AnswerCache, hub: Hub
) -> None:
    upstream = Upstream(hold_after=3)
    first, *others = await held_requests(cache, hub, upstream, 3)
    assert not first.coalesced  # the reader whose request started the run leaves
    assert await first.subscription.next_batch(HANG_GUARD)
    await first.subscription.close()
    upstream.release.set()
    for outcome in others:
        events = await collect(outcome.subscription)
        assert drafts_of(events) == [*ANSWER, (EventType.RUN_COMPLETED, {})]
    assert upstream.started == 1


async def test_a_request_arriving_as_the_run_is_abandoned_starts_its_own(
    cache: AnswerCache, hub: Hub
) -> None:
    held = Upstream(hold_after=2)
    first = await open_request(cache, hub, held)
    await asyncio.wait_for(held.holding.wait(), HANG_GUARD)
    await first.subscription.close()  # the run is being cancelled: nothing to attach to
    upstream = Upstream()
    outcome = await open_request(cache, hub, upstream)
    assert not outcome.coalesced
    events = await collect(outcome.subscription)
    assert drafts_of(events) == [*ANSWER, (EventType.RUN_COMPLETED, {})]
    assert upstream.started == 1


async def test_when_the_first_start_fails_a_waiting_request_generates(
    cache: AnswerCache, hub: Hub
) -> None:
    upstream = Upstream()
    refused = 0

    async def start(source: AsyncIterator[EventDraft]) -> Subscription:
        nonlocal refused
        if not refused:
            refused += 1
            await asyncio.sleep(0)  # the others are waiting on this start by now
            raise ServiceUnavailable("at capacity")
        return await hub.start(source, disconnect_grace=0)

    decision = cache.decide("t1", BODY, None)
    results = await asyncio.gather(
        *(cache.open(decision, upstream, start) for _ in range(3)), return_exceptions=True
    )
    assert isinstance(results[0], ServiceUnavailable)
    outcomes = [result for result in results[1:] if isinstance(result, CacheOutcome)]
    assert len(outcomes) == 2
    assert [outcome.coalesced for outcome in outcomes] == [False, True]
    for outcome in outcomes:
        assert (await collect(outcome.subscription))[-1].type is EventType.RUN_COMPLETED
    assert upstream.started == 1


async def test_a_waiting_request_that_gives_up_does_not_affect_the_others(
    cache: AnswerCache, hub: Hub
) -> None:
    upstream = Upstream()
    may_start = asyncio.Event()

    async def slow_start(source: AsyncIterator[EventDraft]) -> Subscription:
        await may_start.wait()
        return await hub.start(source, disconnect_grace=0)

    decision = cache.decide("t1", BODY, None)
    first = asyncio.create_task(cache.open(decision, upstream, slow_start))
    leaving = asyncio.create_task(cache.open(decision, upstream, slow_start))
    staying = asyncio.create_task(cache.open(decision, upstream, slow_start))
    await asyncio.sleep(0)  # all three are waiting: one on its start, two on that run
    leaving.cancel()
    may_start.set()
    outcomes = await asyncio.wait_for(asyncio.gather(first, staying), HANG_GUARD)
    assert leaving.cancelled()
    assert [outcome.coalesced for outcome in outcomes] == [False, True]
    streams = [await collect(outcome.subscription) for outcome in outcomes]
    assert streams[0] == streams[1]
    assert upstream.started == 1


async def test_without_coalescing_identical_requests_generate_each(
    hub: Hub, store: MemoryResponseCache
) -> None:
    cache = make_cache(hub, store, coalesce=False)
    upstream = Upstream(hold_after=2)
    outcomes = await asyncio.gather(*(open_request(cache, hub, upstream) for _ in range(3)))
    upstream.release.set()
    for outcome in outcomes:
        assert not outcome.coalesced
        assert (await collect(outcome.subscription))[-1].type is EventType.RUN_COMPLETED
    assert upstream.started == 3
    assert (await open_request(cache, hub, upstream)).x_cache == "hit"


async def test_an_identical_run_of_another_instance_is_joined_before_ours_opens(
    store: MemoryResponseCache,
) -> None:
    # Two gateways sharing one run store and one cache store, as with Redis.
    log, registry = MemoryStreamLog(), MemoryRunRegistry()
    hub_a, hub_b = Hub(log, registry), Hub(log, registry)
    cache_a, cache_b = make_cache(hub_a, store), make_cache(hub_b, store)
    try:
        theirs = Upstream(hold_after=2)
        first = await open_request(cache_a, hub_a, theirs)
        await asyncio.wait_for(theirs.holding.wait(), HANG_GUARD)
        ours = Upstream()
        second = await open_request(cache_b, hub_b, ours)
        assert (second.x_cache, second.coalesced, second.upstream_cost) == ("miss", True, False)
        assert second.subscription.run_id == first.subscription.run_id
        theirs.release.set()
        assert await collect(second.subscription) == await collect(first.subscription)
        assert ours.started == 0  # its source was made, never opened
        assert hub_b.active_runs == 0  # the duplicate run ended at once
        assert (await open_request(cache_b, hub_b, ours)).x_cache == "hit"
    finally:
        await hub_a.close()
        await hub_b.close()
        log.close()
        registry.close()
