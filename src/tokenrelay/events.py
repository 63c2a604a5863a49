"""The event model: what every source produces and every transport renders.

An event is immutable and numbered: ``seq`` starts at 1 for each run and is the SSE ``id:`` and
the resume cursor. Event type names are part of the public, versioned protocol
(``EVENT_SCHEMA_VERSION``); ``docs/protocol.md`` describes each payload.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import orjson

# 2: native data leaves out null fields and a choice index of 0 (docs/protocol.md).
EVENT_SCHEMA_VERSION = "2"


class EventType(StrEnum):
    RUN_STARTED = "run.started"
    MESSAGE_DELTA = "message.delta"
    TOOL_CALL_DELTA = "tool_call.delta"
    MESSAGE_COMPLETED = "message.completed"
    USAGE = "usage"
    RUN_STATUS = "run.status"  # progress of an agent; not part of the OpenAI format
    RUN_COMPLETED = "run.completed"
    RUN_FAILED = "run.failed"
    RUN_CANCELLED = "run.cancelled"


TERMINAL_TYPES = frozenset({EventType.RUN_COMPLETED, EventType.RUN_FAILED, EventType.RUN_CANCELLED})

# An event as a source yields it, before the Hub numbers it.
EventDraft = tuple[EventType, dict[str, Any]]


class Event:
    """One numbered event of a run. Treated as immutable."""

    __slots__ = ("data", "seq", "type")

    def __init__(self, seq: int, type: EventType, data: dict[str, Any]) -> None:
        self.seq = seq
        self.type = type
        self.data = data

    @property
    def data_json(self) -> bytes:
        # Not cached: orjson's result keeps a ~4 KiB allocation alive behind a few dozen bytes,
        # which, kept for every event of every retained run, would dominate the gateway's memory.
        return orjson.dumps(self.data)

    @property
    def is_terminal(self) -> bool:
        return self.type in TERMINAL_TYPES

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "type": str(self.type), "data": self.data}

    def __repr__(self) -> str:
        return f"Event(seq={self.seq}, type={self.type!s}, data={self.data!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return (self.seq, self.type, self.data) == (other.seq, other.type, other.data)

    def __hash__(self) -> int:
        return hash((self.seq, self.type))


RunStatus = Literal["running", "completed", "failed", "cancelled"]


@dataclass(frozen=True, slots=True)
class RunInfo:
    """A run's public record (``GET /v1/runs/{id}``)."""

    id: str
    status: RunStatus
    created_at: float  # Unix time
    detached: bool = False
    finished_at: float | None = None
    error_code: str | None = None  # the code of run.failed, or the reason of run.cancelled
    tenant: str = "default"  # who started it; nobody else may see it (not part of the record)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "object": "run",
            "status": self.status,
            "created_at": self.created_at,
            "detached": self.detached,
        }
        if self.finished_at is not None:
            data["finished_at"] = self.finished_at
        if self.error_code is not None:
            data["error_code"] = self.error_code
        return data
