"""A stored answer as the source of a new run: a cache hit is a finished run replayed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from tokenrelay.cache.store import CachedAnswer
from tokenrelay.events import EventDraft, EventType

_PACED_TYPES = frozenset({EventType.MESSAGE_DELTA, EventType.TOOL_CALL_DELTA})
# An immediate replay of a long answer lets other tasks run every this many drafts.
_YIELD_EVERY = 64


async def replay_source(answer: CachedAnswer, interval: float = 0.0) -> AsyncIterator[EventDraft]:
    """The drafts of ``answer``, for ``Hub.start``.

    Args:
        answer: what to replay.
        interval: seconds between two deltas (``replay: paced``); 0 replays at once.
    """
    delta_sent = False
    for position, (event_type, data) in enumerate(answer.drafts):
        if event_type is EventType.RUN_STARTED:
            # The Hub writes the new run's id into this draft: the stored one must stay as is.
            data = dict(data)
        if event_type in _PACED_TYPES and interval > 0:
            if delta_sent:
                await asyncio.sleep(interval)
            delta_sent = True
        elif position % _YIELD_EVERY == _YIELD_EVERY - 1:
            await asyncio.sleep(0)
        yield event_type, data
