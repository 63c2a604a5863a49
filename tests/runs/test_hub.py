"""The Hub: numbering, terminal events, failures, cancellation and shutdown of runs."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from tokenrelay.backends.memory import MemoryStreamLog
from tokenrelay.errors import (
    InternalError,
    ServiceUnavailable,
    UpstreamDisconnected,
    UpstreamTimeout,
)
from tokenrelay.events import TERMINAL_TYPES, Event, EventDraft, EventType
from tokenrelay.runs.hub import Hub, Subscription

# Only keeps a broken Hub from hanging the suite; never a timing claim.
HANG_GUARD = 5.0


@pytest.fixture
async def log() -> AsyncIterator[MemoryStreamLog]:
    stream_log = MemoryStreamLog()
    yield stream_log
    stream_log.close()


@pytest.fixture
async def hub(log: MemoryStreamLog) -> AsyncIterator[Hub]:
    the_hub = Hub(log)
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
    # The run is sealed: a read at the end returns at once, empty, even without a timeout.
    rest = await asyncio.wait_for(subscription.next_batch(None), HANG_GUARD)
    assert list(rest) == []
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
    subscription.close()
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
    second = Subscription(hub, first.run, after=0)
    first.close()
    await asyncio.sleep(0.05)
    assert not first.run.finished
    assert not source.cancelled
    assert source.finalized == 0
    source.release.set()
    events = await collect(second)
    assert terminal_of(events).type is EventType.RUN_COMPLETED
    second.close()  # after the end: nothing to cancel
    assert await finished(hub, second) == events


async def test_the_last_subscriber_leaving_cancels_the_run(hub: Hub) -> None:
    source, first = await blocked_run(hub, [started()])
    second = Subscription(hub, first.run, after=1)
    first.close()
    await asyncio.sleep(0.02)
    assert not first.run.finished
    second.close()
    events = await finished(hub, first)
    assert terminal_of(events).data == {"reason": "client_disconnected"}
    assert source.finalized == 1


async def test_closing_a_subscription_twice_counts_once(hub: Hub) -> None:
    source, first = await blocked_run(hub, [started()])
    second = Subscription(hub, first.run, after=0)
    first.close()
    first.close()
    await asyncio.sleep(0.02)
    assert not first.run.finished
    assert first.run.subscribers == 1
    source.release.set()
    assert terminal_of(await collect(second)).type is EventType.RUN_COMPLETED


async def test_hub_cancel_cancels_the_run(hub: Hub) -> None:
    source, subscription = await blocked_run(hub, [started(), token("a")])
    assert await hub.cancel(subscription.run.id) is True
    events = await collect(subscription)
    terminal = terminal_of(events)
    assert terminal.type is EventType.RUN_CANCELLED
    assert terminal.data == {"reason": "cancelled"}
    assert terminal.seq == 3
    await finished(hub, subscription)
    assert source.cancelled
    assert source.finalized == 1


async def test_hub_cancel_of_a_finished_or_unknown_run_returns_false(hub: Hub) -> None:
    subscription = await hub.start(Source([started()]).generator)
    await collect(subscription)
    await finished(hub, subscription)
    assert await hub.cancel(subscription.run.id) is False
    assert await hub.cancel("run_does_not_exist") is False


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
    subscription.close()


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
    subscription.close()


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
