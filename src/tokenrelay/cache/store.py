"""A stored answer, and the ResponseCache protocol its stores implement.

An answer is what a completed run's source produced: its drafts, in order, without the terminal
event (the Hub adds one to every run, a replay included) and without the run id, which is the
replaying run's own.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from tokenrelay.events import EVENT_SCHEMA_VERSION, EventDraft, EventType

# The layout of an encoded answer; an entry written by a gateway with another layout or another
# event schema is a miss, not a replay in a shape clients no longer expect.
_FORMAT = f"answer/1;events/{EVENT_SCHEMA_VERSION}"


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """The events of a completed run, to be replayed as a new run.

    Args:
        drafts: the source's drafts, in order; no terminal event, no ``run_id``.
        created_at: Unix time the answer was stored.
        size: about the bytes the answer takes (what the memory store's bounds count).
    """

    drafts: tuple[EventDraft, ...]
    created_at: float
    size: int

    @classmethod
    def of(cls, drafts: Iterable[EventDraft], created_at: float | None = None) -> CachedAnswer:
        """An answer of ``drafts``, sized by ``draft_size``."""
        kept = tuple(drafts)
        stamp = time.time() if created_at is None else created_at
        return cls(kept, stamp, sum(draft_size(draft) for draft in kept))

    def encode(self) -> bytes:
        """A compact JSON form: ``[format, created_at, [[type, data], ...]]``."""
        return orjson.dumps([_FORMAT, self.created_at, self.drafts])

    @classmethod
    def decode(cls, raw: bytes) -> CachedAnswer:
        """The answer ``encode`` wrote.

        Raises:
            ValueError: ``raw`` is not an answer of this gateway's format.
        """
        try:
            layout, created_at, items = orjson.loads(raw)
            if layout != _FORMAT or not isinstance(created_at, int | float):
                raise ValueError(f"not an answer of format {_FORMAT}")
            drafts = tuple(_draft(item) for item in items)
        except (TypeError, KeyError) as exc:  # the wrong shape: too few parts, not pairs
            raise ValueError(f"malformed answer: {exc}") from exc
        return cls(drafts, float(created_at), len(raw))


def draft_size(draft: EventDraft) -> int:
    """About the bytes a draft takes encoded; exact enough and cheap for the common text delta."""
    event_type, data = draft
    content = data.get("content")
    if isinstance(content, str) and len(data) == 2:
        return len(content) + 32
    return len(orjson.dumps(data)) + len(event_type) + 8


def _draft(item: Any) -> EventDraft:
    event_type, data = item
    if not isinstance(data, dict):
        raise ValueError("an answer's event data must be an object")
    return EventType(event_type), data


class ResponseCache(Protocol):
    """Answers by cache key, and which run is generating a key right now.

    A store that cannot be reached never fails a request: ``get`` is a miss, ``put`` is skipped,
    ``claim_inflight`` claims nothing (and says so by returning None), each with a warning.
    """

    async def get(self, key: str) -> CachedAnswer | None:
        """The answer stored under ``key``, or None."""
        ...

    async def put(self, key: str, answer: CachedAnswer, ttl: float) -> None:
        """Store ``answer`` for ``ttl`` seconds, unless it is over the store's entry bound."""
        ...

    async def claim_inflight(self, key: str, run_id: str, ttl: float) -> str | None:
        """Record atomically that ``run_id`` generates ``key`` (for at most ``ttl`` seconds).

        Returns None when the claim is ``run_id``'s, or the id of the run that holds it.
        """
        ...

    async def release_inflight(self, key: str, run_id: str) -> None:
        """Forget the claim on ``key`` if ``run_id`` still holds it."""
        ...

    async def close(self) -> None:
        """Release what the store holds (not a connection it shares)."""
        ...
