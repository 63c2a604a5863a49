"""The Hub: numbering, terminal events, failures, cancellation, readers and shutdown of runs."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from tokenrelay.backends.memory import MemoryRunRegistry, MemoryStreamLog
from tokenrelay.errors import (
    EndOfStream,
    EventsLost,
    InternalError,
    NotFound,
    ServiceUnavailable,
    UpstreamDisconnected,
    UpstreamTimeout,
)
from tokenrelay.events import TERMINAL_TYPES, Event, EventDraft, EventType
from tokenrelay.runs.hub import Hub
from tokenrelay.runs.subscription import Subscription

# Only keeps a broken Hub from hanging the suite; never a timing claim.
HANG_GUARD = 5.0


@pytest.fixture
async def log() -> AsyncIterator[MemoryStreamLog]:
    stream_log = MemoryStreamLog()
    yield stream_log
    stream_log.close()


@pytest.fixture
async def registry() -> AsyncIterator[MemoryRunRegistry]:
    run_registry = MemoryRunRegistry()
    yield run_registry
    run_registry.close()


@pytest.fixture
async def hub(log: MemoryStreamLog, registry: MemoryRunRegistry) -> AsyncIterator[Hub]:
    the_hub = Hub(log, registry)
    yield the_hub
    await the_hub.close()


class Source:
    """An async generator source that records how far it got and whether its ``finally`` ran."""

    def __init__(
        self,
        drafts: Sequence[EventDraft] = (),
        *,
        raises: BaseException | None = None,
        block: bool = False,
        cleanup_awaits: bool = False,
    ) -> None:
        self.drafts = list(drafts)
        self.raises = raises
        self.block = block
        self.cleanup_awaits = cleanup_awaits
        self.blocked = asyncio.Event()
        self.release = asyncio.Event()
        self.finalized = 0
        self.cancelled = False
        self.generator = self._run()

    async def _run(self) -> AsyncIterator[EventDraft]:
        try:
            for draft in self.drafts:
                yield draft
            if self.block:
                self.blocked.set()
                await self.release.wait()
            if self.raises is not None:
                raise self.raises
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        finally:
            if self.cleanup_awaits:
                await asyncio.sleep(0)
            self.finalized += 1


def started(**fields: Any) -> EventDraft:
    return (EventType.RUN_STARTED, {"response_id": "chatcmpl-1", "model": "m", **fields})


def token(text: str, index: int = 0) -> EventDraft:
    return (EventType.MESSAGE_DELTA, {"index": index, "content": text})


TEXT_RUN: list[EventDraft] = [
    started(),
    token("Hel"),
    token("lo"),
    (EventType.MESSAGE_COMPLETED, {"index": 0, "finish_reason": "stop"}),
    (EventType.USAGE, {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}),
]


async def collect(subscription: Subscription) -> list[Event]:
    """Every event of the run from the subscription's cursor up to its terminal event."""
    events: list[Event] = []
    while not events or not events[-1].is_terminal:
        batch = await subscription.next_batch(HANG_GUARD)
        assert batch, "the run produced no terminal event"
        events.extend(batch)
    return events


async def finished(hub: Hub, subscription: Subscription) -> list[Event]:
    """Wait for the run's task to end; then the whole log of the run."""
    task = subscription.run.task
    assert task is not None
    await asyncio.wait((task,), timeout=HANG_GUARD)
    assert task.done(), "the run did not end"
    return list(await hub.log.read(subscription.run.id, 0, 0))


def terminal_of(events: Sequence[Event]) -> Event:
    terminals = [event for event in events if event.type in TERMINAL_TYPES]
    assert len(terminals) == 1, events
    assert events[-1] is terminals[0], "the terminal event must be the last one"
    return terminals[0]


async def blocked_run(
    hub: Hub, drafts: Sequence[EventDraft] = (started(),)
) -> tuple[Source, Subscription]:
    """A run whose source has produced ``drafts`` and now waits, and its subscription."""
    source = Source(drafts, block=True)
    subscription = await hub.start(source.generator)
    await asyncio.wait_for(source.blocked.wait(), HANG_GUARD)
    return source, subscription


# Numbering and completion


async def test_events_are_numbered_one_to_n(hub: Hub) -> None:
    subscription = await hub.start(Source(TEXT_RUN).generator)
    events = await collect(subscription)
    assert [event.seq for event in events] == list(range(1, len(TEXT_RUN) + 2))
    assert [event.type for event in events[:-1]] == [kind for kind, _ in TEXT_RUN]
    assert [event.data for event in events[1:-1]] == [data for _, data in TEXT_RUN[1:]]


async def test_run_started_gets_the_run_id(hub: Hub) -> None:
    subscription = await hub.start(Source([started(created=5), token("x")]).generator)
    events = await collect(subscription)
    assert events[0].type is EventType.RUN_STARTED
    assert events[0].data == {
        "response_id": "chatcmpl-1",
        "model": "m",
        "created": 5,
        "run_id": subscription.run.id,
    }
    assert re.fullmatch(r"run_[0-9a-f]{24}", subscription.run.id)
    assert "run_id" not in events[1].data


async def test_every_run_gets_its_own_id(hub: Hub) -> None:
    first = await hub.start(Source([started()]).generator)
    second = await hub.start(Source([started()]).generator)
    assert first.run.id != second.run.id
    assert (await collect(first))[0].data["run_id"] == first.run.id
    assert (await collect(second))[0].data["run_id"] == second.run.id


async def test_a_normal_end_has_exactly_one_run_completed_last(hub: Hub) -> None:
    source = Source(TEXT_RUN)
    subscription = await hub.start(source.generator)
    events = await collect(subscription)
    terminal = terminal_of(events)
    assert terminal.type is EventType.RUN_COMPLETED
    assert terminal.data == {}
    assert terminal.seq == len(TEXT_RUN) + 1
    assert await finished(hub, subscription) == events
    assert subscription.run.failure is None
    assert source.finalized == 1


async def test_a_source_without_events_still_completes(hub: Hub) -> None:
    subscription = await hub.start(Source([]).generator)
    events = await collect(subscription)
    assert [(event.seq, event.type) for event in events] == [(1, EventType.RUN_COMPLETED)]


async def test_nothing_is_appended_after_the_terminal_event(hub: Hub) -> None:
    subscription = await hub.start(Source(TEXT_RUN).generator)
    events = await collect(subscription)
    await finished(hub, subscription)
    # The run is sealed: a read at the end ends the stream at once, even without a timeout.
    with pytest.raises(EndOfStream):
        await asyncio.wait_for(subscription.next_batch(None), HANG_GUARD)
    assert subscription.cursor == events[-1].seq


async def test_subscription_cursor_follows_the_events_read(hub: Hub) -> None:
    source, subscription = await blocked_run(hub, [started(), token("a")])
    assert subscription.cursor == 0
    assert [event.seq for event in await subscription.next_batch(HANG_GUARD)] == [1, 2]
    assert subscription.cursor == 2
    assert list(await subscription.next_batch(0.02)) == []  # still running, nothing new
    assert subscription.cursor == 2
    source.release.set()
    assert [event.type for event in await subscription.next_batch(HANG_GUARD)] == [
        EventType.RUN_COMPLETED
    ]
    assert subscription.cursor == 3


async def test_active_runs_counts_running_runs(hub: Hub) -> None:
    assert hub.active_runs == 0
    source, subscription = await blocked_run(hub)
    assert hub.active_runs == 1
    assert not subscription.run.finished
    source.release.set()
    await finished(hub, subscription)
    assert subscription.run.finished
    assert hub.active_runs == 0


# Failures


async def test_a_tokenrelay_error_fails_the_run(hub: Hub) -> None:
    error = UpstreamDisconnected("x")
    source = Source([started(), token("partial")], raises=error)
    subscription = await hub.start(source.generator)
    events = await collect(subscription)
    assert [event.seq for event in events] == [1, 2, 3]
    terminal = terminal_of(events)
    assert terminal.type is EventType.RUN_FAILED
    assert terminal.data == {"code": "upstream_disconnected", "message": "x", "retryable": True}
    await finished(hub, subscription)
    assert subscription.run.failure is error
    assert source.finalized == 1


async def test_a_failure_before_any_event_is_the_only_event(hub: Hub) -> None:
    subscription = await hub.start(Source([], raises=UpstreamDisconnected("gone")).generator)
    events = await collect(subscription)
    assert [(event.seq, event.type) for event in events] == [(1, EventType.RUN_FAILED)]
    assert events[0].data["code"] == "upstream_disconnected"


async def test_a_failure_keeps_the_instance_code(hub: Hub) -> None:
    error = UpstreamTimeout("no chunk for 1 s", which="idle_timeout")
    subscription = await hub.start(Source([started()], raises=error).generator)
    terminal = terminal_of(await collect(subscription))
    assert terminal.data == {
        "code": "idle_timeout",
        "message": "no chunk for 1 s",
        "retryable": True,
    }


async def test_a_plain_exception_fails_the_run_without_leaking_its_text(hub: Hub) -> None:
    secret = "secret-token-sk-12345 at /etc/passwd"
    source = Source([started(), token("a")], raises=RuntimeError(secret))
    subscription = await hub.start(source.generator)
    events = await collect(subscription)
    terminal = terminal_of(events)
    assert terminal.type is EventType.RUN_FAILED
    assert terminal.seq == 3
    assert terminal.data["code"] == "internal_error"
    assert terminal.data["retryable"] is False
    assert isinstance(terminal.data["message"], str)
    assert terminal.data["message"]
    assert "secret" not in terminal.data["message"]
    assert "RuntimeError" not in terminal.data["message"]
    await finished(hub, subscription)
    assert isinstance(subscription.run.failure, InternalError)
    assert secret not in str(subscription.run.failure)
    assert source.finalized == 1


# Cancellation


async def test_closing_the_only_subscription_cancels_the_source(hub: Hub) -> None:
    source, subscription = await blocked_run(hub, [started(), token("a")])
    await subscription.close()
    events = await finished(hub, subscription)
    assert source.cancelled
    assert source.finalized == 1
    assert [event.seq for event in events] == [1, 2, 3]
    terminal = terminal_of(events)
    assert terminal.type is EventType.RUN_CANCELLED
    assert terminal.data == {"reason": "client_disconnected"}
    assert subscription.run.failure is None
    assert hub.active_runs == 0


async def test_a_second_subscriber_keeps_the_run_alive(hub: Hub) -> None:
    source, first = await blocked_run(hub, [started()])
    second = await hub.subscribe(first.run_id, 0)
    assert second.run is first.run
    await first.close()
    await asyncio.sleep(0.05)
    assert not first.run.finished
    assert not source.cancelled
    assert source.finalized == 0
    source.release.set()
    events = await collect(second)
    assert terminal_of(events).type is EventType.RUN_COMPLETED
    await second.close()  # after the end: nothing to cancel
    assert await finished(hub, second) == events


async def test_the_last_subscriber_leaving_cancels_the_run(hub: Hub) -> None:
    source, first = await blocked_run(hub, [started()])
    second = await hub.subscribe(first.run_id, 1)
    await first.close()
    await asyncio.sleep(0.02)
    assert not first.run.finished
    await second.close()
    events = await finished(hub, first)
    assert terminal_of(events).data == {"reason": "client_disconnected"}
    assert source.finalized == 1


async def test_closing_a_subscription_twice_counts_once(
    hub: Hub, registry: MemoryRunRegistry
) -> None:
    source, first = await blocked_run(hub, [started()])
    second = await hub.subscribe(first.run_id, 0)
    await first.close()
    await first.close()
    await asyncio.sleep(0.02)
    assert not first.run.finished
    assert first.run.subscribers == 1
    assert await registry.add_subscriber(first.run_id, 0) == 1
    source.release.set()
    assert terminal_of(await collect(second)).type is EventType.RUN_COMPLETED


async def test_hub_cancel_cancels_the_run(hub: Hub) -> None:
    source, subscription = await blocked_run(hub, [started(), token("a")])
    info = await hub.cancel(subscription.run.id)
    assert info.id == subscription.run_id
    assert info.status == "cancelled"
    assert info.error_code == "cancelled"
    assert info.finished_at is not None
    assert await hub.info(subscription.run_id) == info
    events = await collect(subscription)
    terminal = terminal_of(events)
    assert terminal.type is EventType.RUN_CANCELLED
    assert terminal.data == {"reason": "cancelled"}
    assert terminal.seq == 3
    await finished(hub, subscription)
    assert source.cancelled
    assert source.finalized == 1


async def test_hub_cancel_of_a_finished_run_returns_its_record_unchanged(hub: Hub) -> None:
    subscription = await hub.start(Source([started()]).generator)
    events = await collect(subscription)
    await finished(hub, subscription)
    record = await hub.info(subscription.run_id)
    assert record.status == "completed"
    assert await hub.cancel(subscription.run_id) == record
    assert await hub.info(subscription.run_id) == record
    assert list(await hub.log.read(subscription.run_id, 0, 0)) == events


async def test_hub_cancel_of_an_unknown_run_is_not_found(hub: Hub) -> None:
    with pytest.raises(NotFound) as info:
        await hub.cancel("run_does_not_exist")
    assert info.value.instance_status() == 404


async def test_a_source_that_awaits_in_its_cleanup_still_ends_cancelled(hub: Hub) -> None:
    source = Source([started()], block=True, cleanup_awaits=True)
    subscription = await hub.start(source.generator)
    await asyncio.wait_for(source.blocked.wait(), HANG_GUARD)
    await hub.cancel(subscription.run.id)
    events = await collect(subscription)
    assert terminal_of(events).data == {"reason": "cancelled"}
    assert source.finalized == 1


# Shutdown


async def test_close_cancels_running_runs_with_shutting_down(hub: Hub) -> None:
    runs = [await blocked_run(hub, [started(), token(str(n))]) for n in range(3)]
    assert hub.accepting
    await hub.close()
    assert not hub.accepting
    assert hub.active_runs == 0
    for source, subscription in runs:
        events = list(await hub.log.read(subscription.run.id, 0, 0))
        assert [event.seq for event in events] == [1, 2, 3]
        assert terminal_of(events).type is EventType.RUN_CANCELLED
        assert events[-1].data == {"reason": "shutting_down"}
        assert source.finalized == 1


async def test_close_leaves_finished_runs_as_they_were(hub: Hub) -> None:
    subscription = await hub.start(Source([started()]).generator)
    events = await collect(subscription)
    await finished(hub, subscription)
    await hub.close()
    assert list(await hub.log.read(subscription.run.id, 0, 0)) == events


async def test_start_after_close_raises_shutting_down(hub: Hub) -> None:
    await hub.close()
    source = Source([started()])
    with pytest.raises(ServiceUnavailable) as info:
        await hub.start(source.generator)
    assert info.value.instance_code() == "shutting_down"
    assert info.value.instance_status() == 503
    assert info.value.retryable is True
    assert hub.active_runs == 0


async def test_drain_lets_runs_finish_within_the_grace_and_cancels_the_rest(hub: Hub) -> None:
    quick_source, quick = await blocked_run(hub, [started(), token("q")])
    slow_source, slow = await blocked_run(hub, [started(), token("s")])
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, quick_source.release.set)
    began = loop.time()
    await hub.drain(grace=0.3)
    assert loop.time() - began >= 0.3  # the slow run was given the whole grace period
    quick_events = list(await hub.log.read(quick.run.id, 0, 0))
    assert terminal_of(quick_events).type is EventType.RUN_COMPLETED
    slow_events = list(await hub.log.read(slow.run.id, 0, 0))
    assert [event.seq for event in slow_events] == [1, 2, 3]
    assert terminal_of(slow_events).type is EventType.RUN_CANCELLED
    assert slow_events[-1].data == {"reason": "shutting_down"}
    assert quick_source.finalized == 1
    assert slow_source.finalized == 1
    assert slow_source.cancelled
    assert hub.active_runs == 0


async def test_drain_returns_once_every_run_has_finished(hub: Hub) -> None:
    source, subscription = await blocked_run(hub, [started()])
    asyncio.get_running_loop().call_later(0.02, source.release.set)
    await asyncio.wait_for(hub.drain(grace=60), HANG_GUARD)
    events = list(await hub.log.read(subscription.run.id, 0, 0))
    assert terminal_of(events).type is EventType.RUN_COMPLETED
    assert hub.active_runs == 0


async def test_drain_stops_accepting_at_once(hub: Hub) -> None:
    source, subscription = await blocked_run(hub, [started()])
    draining = asyncio.create_task(hub.drain(grace=HANG_GUARD))
    await asyncio.sleep(0.02)
    assert not hub.accepting
    assert not draining.done()
    with pytest.raises(ServiceUnavailable) as info:
        await hub.start(Source([started()]).generator)
    assert info.value.instance_code() == "shutting_down"
    source.release.set()
    await asyncio.wait_for(draining, HANG_GUARD)
    events = list(await hub.log.read(subscription.run.id, 0, 0))
    assert terminal_of(events).type is EventType.RUN_COMPLETED


async def test_drain_without_runs_returns_at_once(hub: Hub) -> None:
    await asyncio.wait_for(hub.drain(grace=60), HANG_GUARD)
    assert not hub.accepting


# The source is closed in every case


class IteratorSource:
    """A class-based source: not an async generator, so only ``aclose`` can release it."""

    def __init__(self, drafts: Sequence[EventDraft], raises: Exception | None = None) -> None:
        self._drafts = list(drafts)
        self._raises = raises
        self.closed = 0

    def __aiter__(self) -> IteratorSource:
        return self

    async def __anext__(self) -> EventDraft:
        if self._drafts:
            return self._drafts.pop(0)
        if self._raises is not None:
            raise self._raises
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.closed += 1


@pytest.mark.parametrize(
    "raises",
    [None, UpstreamDisconnected("x"), RuntimeError("boom")],
    ids=["completed", "tokenrelay-error", "plain-exception"],
)
async def test_aclose_is_called_on_a_source_that_ends(hub: Hub, raises: Exception | None) -> None:
    source = IteratorSource([started(), token("a")], raises=raises)
    subscription = await hub.start(source)
    await collect(subscription)
    await finished(hub, subscription)
    assert source.closed == 1


async def _end_completed(hub: Hub, source: Source, subscription: Subscription) -> None:
    source.release.set()


async def _end_failed(hub: Hub, source: Source, subscription: Subscription) -> None:
    source.raises = UpstreamDisconnected("x")
    source.release.set()


async def _end_crashed(hub: Hub, source: Source, subscription: Subscription) -> None:
    source.raises = RuntimeError("boom")
    source.release.set()


async def _end_client_gone(hub: Hub, source: Source, subscription: Subscription) -> None:
    await subscription.close()


async def _end_cancelled(hub: Hub, source: Source, subscription: Subscription) -> None:
    await hub.cancel(subscription.run.id)


async def _end_shutdown(hub: Hub, source: Source, subscription: Subscription) -> None:
    await hub.close()


@pytest.mark.parametrize(
    ("end", "terminal"),
    [
        pytest.param(_end_completed, (EventType.RUN_COMPLETED, None), id="completed"),
        pytest.param(_end_failed, (EventType.RUN_FAILED, "upstream_disconnected"), id="failed"),
        pytest.param(_end_crashed, (EventType.RUN_FAILED, "internal_error"), id="crashed"),
        pytest.param(
            _end_client_gone, (EventType.RUN_CANCELLED, "client_disconnected"), id="client-gone"
        ),
        pytest.param(_end_cancelled, (EventType.RUN_CANCELLED, "cancelled"), id="cancelled"),
        pytest.param(_end_shutdown, (EventType.RUN_CANCELLED, "shutting_down"), id="shutdown"),
    ],
)
async def test_the_source_generator_is_closed_in_every_case(
    hub: Hub, end: Any, terminal: tuple[EventType, str | None]
) -> None:
    source, subscription = await blocked_run(hub, [started()])
    await end(hub, source, subscription)
    events = await finished(hub, subscription)
    assert source.finalized == 1
    assert source.generator.ag_frame is None  # the generator is finished, not suspended
    last = terminal_of(events)
    kind, detail = terminal
    assert last.type is kind
    if kind is EventType.RUN_FAILED:
        assert last.data["code"] == detail
    elif kind is EventType.RUN_CANCELLED:
        assert last.data == {"reason": detail}
    assert hub.active_runs == 0


# A run ended before its task ever ran


async def _cancel_by_client(hub: Hub, subscription: Subscription) -> None:
    await subscription.close()


async def _cancel_by_hub(hub: Hub, subscription: Subscription) -> None:
    await hub.cancel(subscription.run.id)


async def _cancel_by_shutdown(hub: Hub, subscription: Subscription) -> None:
    await hub.close()


@pytest.mark.parametrize(
    ("cancel", "reason"),
    [
        pytest.param(_cancel_by_client, "client_disconnected", id="subscription-closed"),
        pytest.param(_cancel_by_hub, "cancelled", id="hub-cancel"),
        pytest.param(_cancel_by_shutdown, "shutting_down", id="hub-close"),
    ],
)
async def test_a_run_cancelled_right_after_start_still_ends_with_run_cancelled(
    hub: Hub, cancel: Any, reason: str
) -> None:
    # No await between start and the cancellation: the run's task has not taken a step yet.
    source = Source([started()])
    subscription = await hub.start(source.generator)
    await cancel(hub, subscription)
    events = await finished(hub, subscription)
    assert [(event.seq, event.type, event.data) for event in events] == [
        (1, EventType.RUN_CANCELLED, {"reason": reason})
    ]
    assert hub.active_runs == 0


# Run records


async def test_a_running_run_has_a_running_record(hub: Hub) -> None:
    before = time.time()
    source, subscription = await blocked_run(hub)
    info = await hub.info(subscription.run_id)
    assert info.id == subscription.run_id == subscription.run.id
    assert info.status == "running"
    assert before <= info.created_at <= time.time()
    assert info.detached is False
    assert info.finished_at is None
    assert info.error_code is None
    assert subscription.run.info == info
    source.release.set()
    await finished(hub, subscription)


@pytest.mark.parametrize(
    ("end", "status", "error_code"),
    [
        pytest.param(_end_completed, "completed", None, id="completed"),
        pytest.param(_end_failed, "failed", "upstream_disconnected", id="failed"),
        pytest.param(_end_crashed, "failed", "internal_error", id="crashed"),
        pytest.param(_end_client_gone, "cancelled", "client_disconnected", id="client-gone"),
        pytest.param(_end_cancelled, "cancelled", "cancelled", id="cancelled"),
        pytest.param(_end_shutdown, "cancelled", "shutting_down", id="shutdown"),
    ],
)
async def test_a_finished_run_has_its_final_record(
    hub: Hub, end: Any, status: str, error_code: str | None
) -> None:
    source, subscription = await blocked_run(hub, [started()])
    created = (await hub.info(subscription.run_id)).created_at
    await end(hub, source, subscription)
    await finished(hub, subscription)
    info = await hub.info(subscription.run_id)
    assert info.id == subscription.run_id
    assert info.status == status
    assert info.error_code == error_code
    assert info.created_at == created
    assert info.finished_at is not None
    assert created <= info.finished_at <= time.time()
    assert info.detached is False
    assert subscription.run.info == info


async def test_info_of_an_unknown_run_is_not_found(hub: Hub) -> None:
    with pytest.raises(NotFound):
        await hub.info("run_does_not_exist")


# Readers: subscribe, detached runs and the disconnect grace


class QueueSource:
    """A source the test feeds draft by draft; ``None`` ends it."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[EventDraft | None] = asyncio.Queue()
        self.cancelled = False
        self.generator = self._run()

    async def _run(self) -> AsyncIterator[EventDraft]:
        try:
            while (draft := await self.queue.get()) is not None:
                yield draft
        except asyncio.CancelledError:
            self.cancelled = True
            raise

    def feed(self, *drafts: EventDraft | None) -> None:
        for draft in drafts:
            self.queue.put_nowait(draft)


async def test_subscribe_to_an_unknown_run_is_not_found(hub: Hub) -> None:
    with pytest.raises(NotFound) as info:
        await hub.subscribe("run_does_not_exist", 0)
    assert info.value.instance_status() == 404


async def test_a_subscriber_reads_from_its_cursor(hub: Hub) -> None:
    source, first = await blocked_run(hub, [started(), token("a"), token("b")])
    later = await hub.subscribe(first.run_id, 2)
    assert later.run_id == first.run_id
    assert later.cursor == 2
    source.release.set()
    events = await collect(later)
    assert [event.seq for event in events] == [3, 4]
    assert events[0].data == {"index": 0, "content": "b"}
    assert terminal_of(events).type is EventType.RUN_COMPLETED
    await later.close()


async def test_a_subscriber_behind_the_kept_window_gets_events_lost(
    registry: MemoryRunRegistry,
) -> None:
    log = MemoryStreamLog(max_events_per_run=3)
    hub = Hub(log, registry)
    try:
        source, first = await blocked_run(hub, [started(), *(token(str(n)) for n in range(5))])
        late = await hub.subscribe(first.run_id, 1)
        with pytest.raises(EventsLost):
            await late.next_batch(HANG_GUARD)
        assert late.cursor == 1
        await late.close()
        caught_up = await hub.subscribe(first.run_id, 3)
        source.release.set()
        events = await collect(caught_up)
        assert [event.seq for event in events] == [4, 5, 6, 7]
        assert terminal_of(events).type is EventType.RUN_COMPLETED
        await caught_up.close()
    finally:
        await hub.close()
        log.close()


async def test_two_subscribers_read_identical_sequences(hub: Hub) -> None:
    source, first = await blocked_run(hub, TEXT_RUN[:2])
    second = await hub.subscribe(first.run_id, 0)
    source.release.set()
    first_events, second_events = await asyncio.gather(collect(first), collect(second))
    assert first_events == second_events
    assert [event.seq for event in first_events] == [1, 2, 3]
    assert [event.type for event in first_events] == [
        EventType.RUN_STARTED,
        EventType.MESSAGE_DELTA,
        EventType.RUN_COMPLETED,
    ]
    await first.close()
    await second.close()


async def test_two_subscribers_of_a_streaming_run_read_identical_sequences(hub: Hub) -> None:
    source = QueueSource()
    first = await hub.start(source.generator)
    second = await hub.subscribe(first.run_id, 0)
    source.feed(started(), token("a"))
    await asyncio.sleep(0.01)
    source.feed(token("b"), token("c"))
    await asyncio.sleep(0.01)
    source.feed(None)
    first_events, second_events = await asyncio.gather(collect(first), collect(second))
    assert first_events == second_events
    assert [event.seq for event in first_events] == [1, 2, 3, 4, 5]
    assert [event.data.get("content") for event in first_events[1:4]] == ["a", "b", "c"]
    assert terminal_of(first_events).type is EventType.RUN_COMPLETED


async def test_closing_the_only_subscription_of_a_detached_run_does_not_cancel_it(
    hub: Hub,
) -> None:
    source = Source([started(), token("a")], block=True)
    subscription = await hub.start(source.generator, detached=True)
    await asyncio.wait_for(source.blocked.wait(), HANG_GUARD)
    assert (await hub.info(subscription.run_id)).detached is True
    await subscription.close()
    await asyncio.sleep(0.05)
    assert not subscription.run.finished
    assert not source.cancelled
    assert (await hub.info(subscription.run_id)).status == "running"
    source.release.set()
    await finished(hub, subscription)
    assert not source.cancelled
    info = await hub.info(subscription.run_id)
    assert info.status == "completed"
    assert info.detached is True
    assert info.error_code is None

    later = await hub.subscribe(subscription.run_id, 0)
    assert later.run is None  # the run ended: nobody drives it any more
    events = await collect(later)
    assert [(event.seq, event.type) for event in events] == [
        (1, EventType.RUN_STARTED),
        (2, EventType.MESSAGE_DELTA),
        (3, EventType.RUN_COMPLETED),
    ]
    assert events[1].data == {"index": 0, "content": "a"}
    with pytest.raises(EndOfStream):
        await asyncio.wait_for(later.next_batch(HANG_GUARD), HANG_GUARD)
    await later.close()


async def test_a_joining_reader_that_detaches_keeps_the_run_going(hub: Hub) -> None:
    """Coalescing: a detached request joins a run started with no grace; both readers leave."""
    source = Source([started(), token("a")], block=True)
    first = await hub.start(source.generator, disconnect_grace=0.0)
    await asyncio.wait_for(source.blocked.wait(), HANG_GUARD)
    joined = await hub.subscribe(first.run_id, 0)
    hub.outlive_readers(first.run_id, detached=True, disconnect_grace=0.0)
    await first.close()
    await joined.close()
    await asyncio.sleep(0.05)
    assert not source.cancelled
    source.release.set()
    await finished(hub, first)
    info = await hub.info(first.run_id)
    assert (info.status, info.detached) == ("completed", True)


async def test_a_joining_reader_lengthens_the_grace_never_shortens_it(hub: Hub) -> None:
    source = QueueSource()
    first = await hub.start(source.generator, disconnect_grace=0.0)
    hub.outlive_readers(first.run_id, detached=False, disconnect_grace=30.0)
    hub.outlive_readers(first.run_id, detached=False, disconnect_grace=0.0)
    assert first.run is not None
    assert first.run.disconnect_grace == 30.0
    await first.close()
    await asyncio.sleep(0.05)
    assert not first.run.finished  # in its grace, not cancelled at once
    await hub.cancel(first.run_id)


async def test_a_reader_back_within_the_disconnect_grace_loses_nothing(hub: Hub) -> None:
    source = QueueSource()
    first = await hub.start(source.generator, disconnect_grace=0.3)
    source.feed(started(), token("a"))
    got = list(await first.next_batch(HANG_GUARD))
    while got[-1].seq < 2:
        got.extend(await first.next_batch(HANG_GUARD))
    assert [event.seq for event in got] == [1, 2]
    cursor = first.cursor
    await first.close()

    source.feed(token("b"), token("c"))  # produced while nobody reads
    await asyncio.sleep(0.1)
    assert not first.run.finished
    assert not source.cancelled
    second = await hub.subscribe(first.run_id, cursor)
    assert second.run is first.run

    await asyncio.sleep(0.35)  # past the grace of the first disconnection
    assert not first.run.finished
    assert not source.cancelled
    source.feed(token("d"), None)
    rest = await collect(second)
    assert [event.seq for event in rest] == [3, 4, 5, 6]
    assert [event.data.get("content") for event in rest[:3]] == ["b", "c", "d"]
    assert terminal_of(rest).type is EventType.RUN_COMPLETED
    assert (await hub.info(first.run_id)).status == "completed"
    await second.close()


async def test_a_run_without_readers_is_cancelled_after_the_disconnect_grace(hub: Hub) -> None:
    source = QueueSource()
    subscription = await hub.start(source.generator, disconnect_grace=0.3)
    source.feed(started())
    assert [event.seq for event in await subscription.next_batch(HANG_GUARD)] == [1]
    loop = asyncio.get_running_loop()
    left = loop.time()
    await subscription.close()
    await asyncio.sleep(0.1)
    assert not subscription.run.finished  # within the grace the run goes on
    task = subscription.run.task
    await asyncio.wait((task,), timeout=HANG_GUARD)
    assert task.done(), "the run was not cancelled after the grace"
    assert loop.time() - left >= 0.3
    events = list(await hub.log.read(subscription.run_id, 0, 0))
    assert [event.seq for event in events] == [1, 2]
    assert terminal_of(events).type is EventType.RUN_CANCELLED
    assert events[-1].data == {"reason": "client_disconnected"}
    assert source.cancelled
    info = await hub.info(subscription.run_id)
    assert info.status == "cancelled"
    assert info.error_code == "client_disconnected"
    assert hub.active_runs == 0


async def test_a_run_that_ends_within_the_grace_completes(hub: Hub) -> None:
    source = QueueSource()
    subscription = await hub.start(source.generator, disconnect_grace=0.3)
    source.feed(started())
    await subscription.next_batch(HANG_GUARD)
    await subscription.close()
    source.feed(token("a"), None)
    events = await finished(hub, subscription)
    assert [event.seq for event in events] == [1, 2, 3]
    assert terminal_of(events).type is EventType.RUN_COMPLETED
    await asyncio.sleep(0.35)  # the grace period passes: the finished run stays completed
    assert (await hub.info(subscription.run_id)).status == "completed"
    assert list(await hub.log.read(subscription.run_id, 0, 0)) == events


# Several instances sharing one registry and one log


async def test_a_reader_on_another_instance_keeps_a_run_in_its_grace_alive(
    hub: Hub, log: MemoryStreamLog, registry: MemoryRunRegistry
) -> None:
    other = Hub(log, registry)
    source = QueueSource()
    local = await hub.start(source.generator, disconnect_grace=0.2)
    remote = await other.subscribe(local.run_id, 0)
    assert remote.run is None  # driven by the first instance
    assert await registry.add_subscriber(local.run_id, 0) == 2
    await local.close()
    await asyncio.sleep(0.5)  # two grace periods with a reader elsewhere
    assert not local.run.finished
    source.feed(started(), token("a"))
    events = list(await remote.next_batch(HANG_GUARD))
    while events[-1].seq < 2:
        events.extend(await remote.next_batch(HANG_GUARD))
    await remote.close()
    task = local.run.task
    await asyncio.wait((task,), timeout=HANG_GUARD)
    assert task.done(), "the run was not cancelled once every reader had left"
    events = list(await hub.log.read(local.run_id, 0, 0))
    assert [event.seq for event in events] == [1, 2, 3]
    assert events[-1].data == {"reason": "client_disconnected"}
    await other.close()


async def test_hub_cancel_of_a_run_driven_elsewhere_asks_its_instance(
    hub: Hub, log: MemoryStreamLog, registry: MemoryRunRegistry
) -> None:
    other = Hub(log, registry)
    listener = asyncio.create_task(hub.listen_for_cancels())
    try:
        source, subscription = await blocked_run(hub, [started()])
        info = await other.cancel(subscription.run_id)
        assert info.id == subscription.run_id
        assert info.status == "running"  # the driving instance has not acted yet
        events = await collect(subscription)
        assert terminal_of(events).data == {"reason": "cancelled"}
        assert source.cancelled
        assert (await other.info(subscription.run_id)).status == "cancelled"
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
        await other.close()


async def test_listen_for_cancels_cancels_the_local_run(
    hub: Hub, registry: MemoryRunRegistry
) -> None:
    listener = asyncio.create_task(hub.listen_for_cancels())
    try:
        source, subscription = await blocked_run(hub, [started(), token("a")])
        await registry.request_cancel("run_driven_elsewhere")  # not ours: ignored
        await registry.request_cancel(subscription.run_id)
        events = await collect(subscription)
        assert [event.seq for event in events] == [1, 2, 3]
        assert terminal_of(events).type is EventType.RUN_CANCELLED
        assert events[-1].data == {"reason": "cancelled"}
        await finished(hub, subscription)
        assert source.cancelled
        info = await hub.info(subscription.run_id)
        assert info.status == "cancelled"
        assert info.error_code == "cancelled"
        assert not listener.done()  # it keeps listening
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener


# A second stop while the source is being closed


class SlowClosingSource:
    """A class-based source whose ``aclose`` takes a while, like closing an upstream response."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.closing = asyncio.Event()
        self.sent = False

    def __aiter__(self) -> SlowClosingSource:
        return self

    async def __anext__(self) -> EventDraft:
        if not self.sent:
            self.sent = True
            return started()
        await self.release.wait()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.closing.set()
        await asyncio.sleep(0.05)


async def _second_stop_by_cancel(hub: Hub, run_id: str) -> None:
    await hub.cancel(run_id)


async def _second_stop_by_shutdown(hub: Hub, run_id: str) -> None:
    await hub.close()


@pytest.mark.parametrize(
    "second_stop",
    [
        pytest.param(_second_stop_by_cancel, id="hub-cancel"),
        pytest.param(_second_stop_by_shutdown, id="hub-close"),
    ],
)
async def test_a_second_stop_while_the_source_closes_still_ends_the_run(
    hub: Hub, second_stop: Any
) -> None:
    source = SlowClosingSource()
    subscription = await hub.start(source)
    assert [event.seq for event in await subscription.next_batch(HANG_GUARD)] == [1]
    first_cancel = asyncio.create_task(hub.cancel(subscription.run_id))
    await asyncio.wait_for(source.closing.wait(), HANG_GUARD)
    await asyncio.wait_for(second_stop(hub, subscription.run_id), HANG_GUARD)
    await asyncio.wait_for(first_cancel, HANG_GUARD)
    await asyncio.wait((subscription.run.task,), timeout=HANG_GUARD)
    events = list(await hub.log.read(subscription.run_id, 0, 0))
    assert [event.seq for event in events] == [1, 2]
    assert terminal_of(events).type is EventType.RUN_CANCELLED
    assert events[-1].data == {"reason": "cancelled"}
    assert (await hub.info(subscription.run_id)).status == "cancelled"
    assert hub.active_runs == 0
