"""What only the memory backend does: bounding the events it keeps for finished runs."""

from __future__ import annotations

import pytest

from tokenrelay.backends.memory import MemoryStreamLog
from tokenrelay.errors import NotFound
from tokenrelay.events import Event, EventType


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
