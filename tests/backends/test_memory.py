"""What only the memory backends do: their bounds on the events and records they keep."""

from __future__ import annotations

import time

import pytest

from tokenrelay.backends.memory import MemoryRunRegistry, MemoryStreamLog
from tokenrelay.errors import EventsLost, NotFound
from tokenrelay.events import Event, EventType, RunInfo


def delta(seq: int) -> Event:
    return Event(seq, EventType.MESSAGE_DELTA, {"index": 0, "content": f"token {seq}"})


async def test_memory_log_drops_the_oldest_finished_runs_past_its_event_bound() -> None:
    log = MemoryStreamLog(retention=600, max_retained_events=5)
    for run_id in ("a", "b", "c"):
        await log.create(run_id)
        await log.append(
            run_id, [Event(1, EventType.MESSAGE_DELTA, {}), Event(2, EventType.RUN_COMPLETED, {})]
        )
        await log.seal(run_id)
    with pytest.raises(NotFound):
        await log.read("a", 0, timeout=0)
    assert [e.seq for e in await log.read("b", 0, timeout=0)] == [1, 2]
    assert [e.seq for e in await log.read("c", 0, timeout=0)] == [1, 2]
    log.close()


async def test_memory_log_counts_only_the_kept_events_of_finished_runs() -> None:
    log = MemoryStreamLog(retention=600, max_retained_events=5, max_events_per_run=2)
    for run_id in ("a", "b"):
        await log.create(run_id)
        await log.append(
            run_id, [delta(1), delta(2), delta(3), Event(4, EventType.RUN_COMPLETED, {})]
        )
        await log.seal(run_id)
    # 2 + 2 kept events: within the bound, although 8 were appended.
    assert [e.seq for e in await log.read("a", 2, timeout=0)] == [3, 4]
    assert [e.seq for e in await log.read("b", 2, timeout=0)] == [3, 4]
    await log.create("c")
    await log.append("c", [delta(1), Event(2, EventType.RUN_COMPLETED, {})])
    await log.seal("c")
    with pytest.raises(NotFound):
        await log.read("a", 2, timeout=0)
    assert [e.seq for e in await log.read("b", 2, timeout=0)] == [3, 4]
    assert [e.seq for e in await log.read("c", 0, timeout=0)] == [1, 2]
    log.close()


async def test_memory_log_keeps_ten_thousand_events_per_run_by_default() -> None:
    log = MemoryStreamLog()
    await log.create("r")
    await log.append("r", [delta(seq) for seq in range(1, 10_001)])
    assert len(await log.read("r", 0, timeout=0)) == 10_000
    await log.append("r", [delta(10_001)])
    with pytest.raises(EventsLost):
        await log.read("r", 0, timeout=0)
    kept = await log.read("r", 1, timeout=0)
    assert (kept[0].seq, kept[-1].seq, len(kept)) == (2, 10_001, 10_000)
    log.close()


async def test_memory_log_sizes_a_text_delta_as_its_content_and_64_bytes() -> None:
    each = len("token 1") + 64
    log = MemoryStreamLog(max_bytes_per_run=3 * each)
    await log.create("r")
    await log.append("r", [delta(seq) for seq in range(1, 4)])
    assert [e.seq for e in await log.read("r", 0, timeout=0)] == [1, 2, 3]  # exactly at the bound
    await log.append("r", [delta(4)])
    with pytest.raises(EventsLost):
        await log.read("r", 0, timeout=0)
    assert [e.seq for e in await log.read("r", 1, timeout=0)] == [2, 3, 4]
    log.close()


async def test_memory_registry_drops_the_oldest_finished_records_past_its_bound() -> None:
    registry = MemoryRunRegistry(retention=600, max_finished_runs=2)
    now = time.time()
    still_running = RunInfo("running", "running", created_at=now)
    await registry.register(still_running)
    for run_id in ("a", "b", "c"):
        await registry.register(RunInfo(run_id, "running", created_at=now))
        await registry.finish(RunInfo(run_id, "completed", created_at=now, finished_at=now))
    assert await registry.get("a") is None
    for run_id in ("b", "c"):
        info = await registry.get(run_id)
        assert info is not None
        assert info.status == "completed"
    assert await registry.get("running") == still_running
    registry.close()


async def test_memory_registry_forgets_the_readers_of_a_dropped_record() -> None:
    registry = MemoryRunRegistry(retention=600, max_finished_runs=1)
    now = time.time()
    for run_id in ("a", "b"):
        await registry.register(RunInfo(run_id, "running", created_at=now))
        await registry.add_subscriber(run_id, +1)
        await registry.finish(RunInfo(run_id, "completed", created_at=now, finished_at=now))
    assert await registry.get("a") is None
    assert await registry.add_subscriber("a", 0) == 0
    assert await registry.add_subscriber("b", 0) == 1
    registry.close()
