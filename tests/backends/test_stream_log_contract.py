"""The StreamLog contract (``tokenrelay.runs.log.StreamLog``), run against every implementation.

Add an implementation by adding its name to ``BACKENDS`` and a branch to ``make_stream_log``,
which builds a log of that backend with the bounds a test asks for (``retention``,
``max_events_per_run``, ``max_bytes_per_run``). The Redis backend runs against a real
redis-server (the ``redis_url`` fixture), each log under a key prefix of its own.
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tokenrelay.backends.memory import MemoryStreamLog
from tokenrelay.backends.redis_log import RedisStreamLog
from tokenrelay.backends.redis_store import RedisStore
from tokenrelay.errors import EndOfStream, EventsLost, NotFound
from tokenrelay.events import Event, EventType
from tokenrelay.runs.log import StreamLog

BACKENDS = ["memory", "redis"]

# A woken reader must return well before its own read timeout (READ_TIMEOUT). WAKE_GUARD only
# stops a reader that was never woken from holding the test for the whole read timeout.
READ_TIMEOUT = 5.0
WAKE_GUARD = 2.0

StreamLogFactory = Callable[..., StreamLog]


def make_stream_log(backend: str, redis_url: str | None = None, **bounds: Any) -> StreamLog:
    """A new, empty log of ``backend``; ``bounds`` are the keyword arguments of the tests."""
    if backend == "memory":
        return MemoryStreamLog(**bounds)
    if backend == "redis":
        assert redis_url is not None
        store = RedisStore(redis_url, key_prefix=f"test:{uuid.uuid4().hex[:12]}:")
        return RedisStreamLog(store, **bounds)
    raise AssertionError(f"unknown StreamLog backend {backend!r}")


async def close_stream_log(log: StreamLog) -> None:
    close = getattr(log, "close", None)
    if close is not None:
        result = close()
        if inspect.isawaitable(result):
            await result
    if isinstance(log, RedisStreamLog):
        await log.store.close()


def backend_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """What ``make_stream_log`` needs besides the bounds: the Redis of the suite."""
    if request.param == "redis":
        return {"redis_url": request.getfixturevalue("redis_url")}
    return {}


@pytest.fixture(params=BACKENDS)
async def stream_log_factory(request: pytest.FixtureRequest) -> AsyncIterator[StreamLogFactory]:
    created: list[StreamLog] = []

    options = backend_options(request)

    def factory(**bounds: Any) -> StreamLog:
        log = make_stream_log(request.param, **options, **bounds)
        created.append(log)
        return log

    yield factory
    for log in created:
        await close_stream_log(log)


@pytest.fixture(params=BACKENDS)
async def stream_log(request: pytest.FixtureRequest) -> AsyncIterator[StreamLog]:
    log = make_stream_log(request.param, **backend_options(request))
    yield log
    await close_stream_log(log)


@pytest.fixture
async def run_id(stream_log: StreamLog) -> str:
    """A fresh run, created in ``stream_log``."""
    run = "run_test_" + uuid.uuid4().hex
    await stream_log.create(run)
    return run


def delta(seq: int) -> Event:
    return Event(seq, EventType.MESSAGE_DELTA, {"index": 0, "content": f"token {seq}"})


def deltas(first: int, last: int) -> list[Event]:
    return [delta(seq) for seq in range(first, last + 1)]


def seqs(events: object) -> list[int]:
    return [event.seq for event in events]  # type: ignore[attr-defined]


async def blocked_readers(
    log: StreamLog, run: str, after: int, count: int
) -> list[asyncio.Task[object]]:
    """Tasks reading after ``after`` with a long timeout, all already waiting for events."""
    tasks: list[asyncio.Task[object]] = [
        asyncio.create_task(log.read(run, after, READ_TIMEOUT)) for _ in range(count)
    ]
    await asyncio.sleep(0.05)
    assert not any(task.done() for task in tasks), "the readers should be waiting for events"
    return tasks


async def blocked_reader(log: StreamLog, run: str, after: int) -> asyncio.Task[object]:
    (task,) = await blocked_readers(log, run, after, 1)
    return task


async def test_a_new_run_is_empty(stream_log: StreamLog, run_id: str) -> None:
    assert list(await stream_log.read(run_id, 0, 0)) == []


async def test_read_returns_the_events_in_order(stream_log: StreamLog, run_id: str) -> None:
    events = deltas(1, 5)
    await stream_log.append(run_id, events)
    got = list(await stream_log.read(run_id, 0, 0))
    assert got == events
    assert [event.data for event in got] == [event.data for event in events]
    assert [event.type for event in got] == [EventType.MESSAGE_DELTA] * 5


async def test_read_after_cursor_returns_only_later_events(
    stream_log: StreamLog, run_id: str
) -> None:
    await stream_log.append(run_id, deltas(1, 5))
    assert seqs(await stream_log.read(run_id, 0, 0)) == [1, 2, 3, 4, 5]
    assert seqs(await stream_log.read(run_id, 2, 0)) == [3, 4, 5]
    assert seqs(await stream_log.read(run_id, 4, 0)) == [5]


async def test_appends_in_several_batches_read_as_one_sequence(
    stream_log: StreamLog, run_id: str
) -> None:
    await stream_log.append(run_id, deltas(1, 2))
    await stream_log.append(run_id, [delta(3)])
    await stream_log.append(run_id, deltas(4, 6))
    assert seqs(await stream_log.read(run_id, 0, 0)) == [1, 2, 3, 4, 5, 6]
    assert seqs(await stream_log.read(run_id, 1, 0)) == [2, 3, 4, 5, 6]


async def test_runs_are_independent(stream_log: StreamLog, run_id: str) -> None:
    other = run_id + "_other"
    await stream_log.create(other)
    await stream_log.append(run_id, deltas(1, 3))
    await stream_log.append(other, [delta(1)])
    assert seqs(await stream_log.read(run_id, 0, 0)) == [1, 2, 3]
    assert list(await stream_log.read(other, 0, 0)) == [delta(1)]


async def test_read_at_the_end_times_out_empty(stream_log: StreamLog, run_id: str) -> None:
    await stream_log.append(run_id, deltas(1, 2))
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert list(await stream_log.read(run_id, 2, 0.05)) == []
    assert loop.time() - started >= 0.04  # it did wait (lower bound only)


async def test_read_of_an_empty_run_times_out_empty(stream_log: StreamLog, run_id: str) -> None:
    assert list(await stream_log.read(run_id, 0, 0.05)) == []


async def test_read_waits_and_wakes_on_append(stream_log: StreamLog, run_id: str) -> None:
    await stream_log.append(run_id, [delta(1)])
    reader = await blocked_reader(stream_log, run_id, after=1)
    await stream_log.append(run_id, deltas(2, 3))
    got = await asyncio.wait_for(reader, WAKE_GUARD)
    assert seqs(got) == [2, 3]


async def test_read_from_the_start_wakes_on_the_first_append(
    stream_log: StreamLog, run_id: str
) -> None:
    reader = await blocked_reader(stream_log, run_id, after=0)
    await stream_log.append(run_id, [delta(1)])
    assert seqs(await asyncio.wait_for(reader, WAKE_GUARD)) == [1]


async def test_one_append_wakes_all_concurrent_readers(stream_log: StreamLog, run_id: str) -> None:
    await stream_log.append(run_id, deltas(1, 3))
    readers = await blocked_readers(stream_log, run_id, after=3, count=5)
    await stream_log.append(run_id, [delta(4)])
    results = await asyncio.wait_for(asyncio.gather(*readers), WAKE_GUARD)
    assert [seqs(result) for result in results] == [[4]] * 5


async def test_readers_wake_again_on_each_later_append(stream_log: StreamLog, run_id: str) -> None:
    for seq in range(1, 4):
        readers = await blocked_readers(stream_log, run_id, after=seq - 1, count=3)
        await stream_log.append(run_id, [delta(seq)])
        results = await asyncio.wait_for(asyncio.gather(*readers), WAKE_GUARD)
        assert [seqs(result) for result in results] == [[seq]] * 3


async def test_a_cancelled_reader_does_not_break_other_readers(
    stream_log: StreamLog, run_id: str
) -> None:
    await stream_log.append(run_id, [delta(1)])
    readers = await blocked_readers(stream_log, run_id, after=1, count=3)
    readers[1].cancel()
    with pytest.raises(asyncio.CancelledError):
        await readers[1]
    await stream_log.append(run_id, [delta(2)])
    results = await asyncio.wait_for(asyncio.gather(readers[0], readers[2]), WAKE_GUARD)
    assert [seqs(result) for result in results] == [[2], [2]]


async def test_a_reader_after_the_only_waiting_reader_was_cancelled_is_woken(
    stream_log: StreamLog, run_id: str
) -> None:
    first = await blocked_reader(stream_log, run_id, after=0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    second = await blocked_reader(stream_log, run_id, after=0)
    await stream_log.append(run_id, [delta(1)])
    assert seqs(await asyncio.wait_for(second, WAKE_GUARD)) == [1]


async def test_a_reader_that_timed_out_does_not_break_later_readers(
    stream_log: StreamLog, run_id: str
) -> None:
    assert list(await stream_log.read(run_id, 0, 0.02)) == []
    reader = await blocked_reader(stream_log, run_id, after=0)
    await stream_log.append(run_id, [delta(1)])
    assert seqs(await asyncio.wait_for(reader, WAKE_GUARD)) == [1]


async def test_unknown_run_is_not_found(stream_log: StreamLog) -> None:
    unknown = "run_unknown_" + uuid.uuid4().hex
    with pytest.raises(NotFound):
        await stream_log.read(unknown, 0, 0)
    with pytest.raises(NotFound):
        await stream_log.read(unknown, 0, 0.05)
    with pytest.raises(NotFound):
        await stream_log.append(unknown, [delta(1)])
    with pytest.raises(NotFound):
        await stream_log.seal(unknown)


async def test_not_found_has_the_public_code(stream_log: StreamLog) -> None:
    with pytest.raises(NotFound) as info:
        await stream_log.read("run_missing_" + uuid.uuid4().hex, 0, 0)
    assert info.value.instance_code() == "not_found"
    assert info.value.instance_status() == 404


async def test_after_seal_a_read_at_the_end_raises_end_of_stream_without_waiting(
    stream_log: StreamLog, run_id: str
) -> None:
    await stream_log.append(run_id, deltas(1, 2))
    await stream_log.append(run_id, [Event(3, EventType.RUN_COMPLETED, {})])
    await stream_log.seal(run_id)
    # timeout=None would wait forever on a run that can still grow; READ_TIMEOUT outlasts the
    # guard, so a read that waited fails with TimeoutError instead.
    with pytest.raises(EndOfStream):
        await asyncio.wait_for(stream_log.read(run_id, 3, None), WAKE_GUARD)
    with pytest.raises(EndOfStream):
        await asyncio.wait_for(stream_log.read(run_id, 3, READ_TIMEOUT), WAKE_GUARD)
    with pytest.raises(EndOfStream):
        await asyncio.wait_for(stream_log.read(run_id, 3, 0), WAKE_GUARD)


async def test_a_reader_waiting_at_the_end_gets_end_of_stream_on_seal(
    stream_log: StreamLog, run_id: str
) -> None:
    await stream_log.append(run_id, [delta(1), Event(2, EventType.RUN_COMPLETED, {})])
    reader = await blocked_reader(stream_log, run_id, after=2)
    await stream_log.seal(run_id)
    with pytest.raises(EndOfStream):
        await asyncio.wait_for(reader, WAKE_GUARD)


async def test_a_sealed_run_is_still_readable_from_any_cursor(
    stream_log: StreamLog, run_id: str
) -> None:
    await stream_log.append(run_id, deltas(1, 2))
    await stream_log.append(run_id, [Event(3, EventType.RUN_COMPLETED, {})])
    await stream_log.seal(run_id)
    assert seqs(await stream_log.read(run_id, 0, None)) == [1, 2, 3]
    assert seqs(await stream_log.read(run_id, 2, None)) == [3]
    last = list(await stream_log.read(run_id, 2, None))[-1]
    assert last.type is EventType.RUN_COMPLETED
    assert last.is_terminal


async def test_sealing_twice_is_harmless(stream_log: StreamLog, run_id: str) -> None:
    await stream_log.append(run_id, [Event(1, EventType.RUN_COMPLETED, {})])
    await stream_log.seal(run_id)
    await stream_log.seal(run_id)
    assert seqs(await stream_log.read(run_id, 0, 0)) == [1]


async def test_a_sealed_run_expires_after_the_retention_period(
    stream_log_factory: StreamLogFactory,
) -> None:
    log = stream_log_factory(retention=0.05)
    run = "run_retained_" + uuid.uuid4().hex
    await log.create(run)
    await log.append(run, [delta(1), Event(2, EventType.RUN_COMPLETED, {})])
    await log.seal(run)
    assert seqs(await log.read(run, 0, 0)) == [1, 2]  # kept right after the seal
    await asyncio.sleep(0.2)
    with pytest.raises(NotFound):
        await log.read(run, 0, 0)


async def test_only_sealed_runs_expire(stream_log_factory: StreamLogFactory) -> None:
    log = stream_log_factory(retention=0.05)
    sealed, running = "run_sealed_" + uuid.uuid4().hex, "run_running_" + uuid.uuid4().hex
    for run in (sealed, running):
        await log.create(run)
        await log.append(run, [delta(1)])
    await log.seal(sealed)
    await asyncio.sleep(0.2)
    with pytest.raises(NotFound):
        await log.read(sealed, 0, 0)
    assert seqs(await log.read(running, 0, 0)) == [1]


# Per-run bounds: the oldest events of a run are dropped, never the last one


def sized(seq: int, size: int) -> Event:
    return Event(seq, EventType.MESSAGE_DELTA, {"index": 0, "content": "x" * size})


async def first_kept_seq(log: StreamLog, run: str, last: int) -> int:
    """The lowest ``seq`` still readable: every cursor before it raises EventsLost."""
    for after in range(last):
        try:
            events = await log.read(run, after, 0)
        except EventsLost:
            continue
        assert seqs(events) == list(range(after + 1, last + 1))
        return after + 1
    return last


@pytest.mark.parametrize("batch", [1, 8], ids=["one-by-one", "one-batch"])
async def test_past_the_event_bound_the_oldest_events_are_lost(
    stream_log_factory: StreamLogFactory, batch: int
) -> None:
    log = stream_log_factory(max_events_per_run=5)
    run = "run_bounded_" + uuid.uuid4().hex
    await log.create(run)
    events = deltas(1, 8)
    for start in range(0, len(events), batch):
        await log.append(run, events[start : start + batch])
    for after in (0, 1, 2):
        with pytest.raises(EventsLost) as info:
            await log.read(run, after, 0)
        assert info.value.instance_code() == "events_lost"
        assert info.value.instance_status() == 410
    assert seqs(await log.read(run, 3, 0)) == [4, 5, 6, 7, 8]
    assert list(await log.read(run, 3, 0)) == events[3:]
    assert seqs(await log.read(run, 6, 0)) == [7, 8]


async def test_a_cursor_before_the_window_is_lost_even_with_a_timeout(
    stream_log_factory: StreamLogFactory,
) -> None:
    log = stream_log_factory(max_events_per_run=5)
    run = "run_bounded_" + uuid.uuid4().hex
    await log.create(run)
    await log.append(run, deltas(1, 8))
    with pytest.raises(EventsLost):
        await asyncio.wait_for(log.read(run, 0, READ_TIMEOUT), WAKE_GUARD)
    with pytest.raises(EventsLost):
        await asyncio.wait_for(log.read(run, 0, None), WAKE_GUARD)


async def test_reading_within_the_window_after_trimming_still_works(
    stream_log_factory: StreamLogFactory,
) -> None:
    log = stream_log_factory(max_events_per_run=5)
    run = "run_bounded_" + uuid.uuid4().hex
    await log.create(run)
    await log.append(run, deltas(1, 8))
    assert list(await log.read(run, 8, 0)) == []  # at the end of a running run: nothing yet
    reader = await blocked_reader(log, run, after=8)
    await log.append(run, [delta(9)])
    assert seqs(await asyncio.wait_for(reader, WAKE_GUARD)) == [9]
    assert seqs(await log.read(run, 4, 0)) == [5, 6, 7, 8, 9]
    with pytest.raises(EventsLost):
        await log.read(run, 3, 0)
    await log.append(run, [delta(10), Event(11, EventType.RUN_COMPLETED, {})])
    await log.seal(run)
    assert seqs(await log.read(run, 6, None)) == [7, 8, 9, 10, 11]
    assert seqs(await log.read(run, 10, None)) == [11]
    with pytest.raises(EventsLost):
        await log.read(run, 5, None)
    with pytest.raises(EndOfStream):
        await asyncio.wait_for(log.read(run, 11, None), WAKE_GUARD)


async def test_a_waiting_reader_whose_events_are_trimmed_away_gets_events_lost(
    stream_log_factory: StreamLogFactory,
) -> None:
    log = stream_log_factory(max_events_per_run=5)
    run = "run_bounded_" + uuid.uuid4().hex
    await log.create(run)
    await log.append(run, deltas(1, 3))
    reader = await blocked_reader(log, run, after=3)
    await log.append(run, deltas(4, 12))  # events 4 to 7 are dropped at once
    with pytest.raises(EventsLost):
        await asyncio.wait_for(reader, WAKE_GUARD)
    assert seqs(await log.read(run, 7, 0)) == [8, 9, 10, 11, 12]


async def test_past_the_byte_bound_the_oldest_events_are_lost(
    stream_log_factory: StreamLogFactory,
) -> None:
    bound, size = 1000, 300
    log = stream_log_factory(max_bytes_per_run=bound)
    run = "run_bounded_" + uuid.uuid4().hex
    await log.create(run)
    events = [sized(seq, size) for seq in range(1, 11)]
    for event in events:
        await log.append(run, [event])
    with pytest.raises(EventsLost):
        await log.read(run, 0, 0)
    first = await first_kept_seq(log, run, 10)
    kept = list(await log.read(run, first - 1, 0))
    assert kept == events[first - 1 :]
    assert kept[-1].seq == 10
    assert 1 <= len(kept) <= bound // size  # the kept content alone fits in the bound


async def test_the_byte_bound_never_drops_the_last_event(
    stream_log_factory: StreamLogFactory,
) -> None:
    log = stream_log_factory(max_bytes_per_run=100)
    run = "run_bounded_" + uuid.uuid4().hex
    await log.create(run)
    await log.append(run, [sized(1, 500)])
    assert list(await log.read(run, 0, 0)) == [sized(1, 500)]  # alone larger than the bound
    await log.append(run, [sized(2, 500)])
    with pytest.raises(EventsLost):
        await log.read(run, 0, 0)
    assert list(await log.read(run, 1, 0)) == [sized(2, 500)]
    await log.append(run, [sized(3, 500), sized(4, 500)])  # one batch over the bound
    assert list(await log.read(run, 3, 0)) == [sized(4, 500)]
    terminal = Event(5, EventType.RUN_COMPLETED, {})
    await log.append(run, [terminal])
    await log.seal(run)
    assert list(await log.read(run, 4, None)) == [terminal]  # the end is always readable
    with pytest.raises(EndOfStream):
        await asyncio.wait_for(log.read(run, 5, None), WAKE_GUARD)
