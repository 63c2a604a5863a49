"""The StreamLog contract (``tokenrelay.runs.log.StreamLog``), run against every implementation.

Add an implementation by adding its name to ``BACKENDS`` and a branch to ``make_stream_log``.
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from tokenrelay.backends.memory import MemoryStreamLog
from tokenrelay.errors import NotFound
from tokenrelay.events import Event, EventType
from tokenrelay.runs.log import StreamLog

BACKENDS = ["memory"]

# A woken reader must return well before its own read timeout (READ_TIMEOUT). WAKE_GUARD only
# stops a reader that was never woken from holding the test for the whole read timeout.
READ_TIMEOUT = 5.0
WAKE_GUARD = 2.0

StreamLogFactory = Callable[..., StreamLog]


def make_stream_log(backend: str, retention: float = 600.0) -> StreamLog:
    if backend == "memory":
        return MemoryStreamLog(retention=retention)
    raise AssertionError(f"unknown StreamLog backend {backend!r}")


async def close_stream_log(log: StreamLog) -> None:
    close = getattr(log, "close", None)
    if close is not None:
        result = close()
        if inspect.isawaitable(result):
            await result


@pytest.fixture(params=BACKENDS)
async def stream_log_factory(request: pytest.FixtureRequest) -> AsyncIterator[StreamLogFactory]:
    created: list[StreamLog] = []

    def factory(retention: float = 600.0) -> StreamLog:
        log = make_stream_log(request.param, retention)
        created.append(log)
        return log

    yield factory
    for log in created:
        await close_stream_log(log)


@pytest.fixture(params=BACKENDS)
async def stream_log(request: pytest.FixtureRequest) -> AsyncIterator[StreamLog]:
    log = make_stream_log(request.param)
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


async def test_after_seal_a_read_at_the_end_returns_empty_without_waiting(
    stream_log: StreamLog, run_id: str
) -> None:
    await stream_log.append(run_id, deltas(1, 2))
    await stream_log.append(run_id, [Event(3, EventType.RUN_COMPLETED, {})])
    await stream_log.seal(run_id)
    # timeout=None would wait forever on a run that can still grow.
    assert list(await asyncio.wait_for(stream_log.read(run_id, 3, None), WAKE_GUARD)) == []
    assert list(await asyncio.wait_for(stream_log.read(run_id, 3, READ_TIMEOUT), WAKE_GUARD)) == []


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
