"""The Hub: starts runs, numbers and logs their events, and lets subscribers read them.

A run is one generation. Its source is an async iterator of event drafts; the Hub drives it in a
task, appends every event to the StreamLog and ends every run with exactly one terminal event:
``run.completed`` when the source is exhausted, ``run.failed`` when it raises, ``run.cancelled``
when it is cancelled. Sources never produce terminal events themselves.

When the last subscriber of a run leaves before the run ends, the Hub cancels the source, so an
upstream is not paid for tokens nobody reads.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Sequence
from typing import Any

import structlog

from tokenrelay.errors import InternalError, ServiceUnavailable, TokenRelayError
from tokenrelay.events import Event, EventDraft, EventType
from tokenrelay.runs.log import StreamLog

logger = structlog.get_logger("tokenrelay.runs")


def new_run_id() -> str:
    return "run_" + secrets.token_hex(12)


class Run:
    """What this process knows about a run it drives."""

    __slots__ = (
        "cancel_reason",
        "driving",
        "failure",
        "id",
        "stop_requested",
        "subscribers",
        "task",
    )

    def __init__(self, run_id: str) -> None:
        self.id = run_id
        self.task: asyncio.Task[None] | None = None
        # A task cancelled before its first step never runs a line of its coroutine, so no
        # terminal event would be written: until it runs, a stop is only requested.
        self.driving = False
        self.stop_requested = False
        self.subscribers = 0
        # The error that failed the run, kept so the HTTP layer can answer with its status when
        # the run fails before its stream has started.
        self.failure: TokenRelayError | None = None
        self.cancel_reason = "cancelled"

    @property
    def finished(self) -> bool:
        return self.task is not None and self.task.done()


class Subscription:
    """One reader of one run, from a cursor. Close it when done; the Hub counts readers."""

    __slots__ = ("_closed", "_hub", "_log", "cursor", "run")

    def __init__(self, hub: Hub, run: Run, after: int) -> None:
        self._hub = hub
        self._log = hub.log
        self.run = run
        self.cursor = after
        self._closed = False
        run.subscribers += 1

    async def next_batch(self, timeout: float | None) -> Sequence[Event]:
        """The events after the cursor, waiting up to ``timeout``; empty when the wait timed out."""
        events = await self._log.read(self.run.id, self.cursor, timeout)
        if events:
            self.cursor = events[-1].seq
        return events

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._hub._release(self.run)


class Hub:
    """Run lifecycle and fan-out over a StreamLog."""

    def __init__(self, log: StreamLog) -> None:
        self.log = log
        self._runs: dict[str, Run] = {}
        self._accepting = True

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def active_runs(self) -> int:
        return len(self._runs)

    async def start(self, source: AsyncIterator[EventDraft]) -> Subscription:
        """Start a run driven by ``source`` and return its first subscription (from the start).

        The caller owns the subscription: closing it without another reader cancels the run.
        """
        if not self._accepting:
            raise ServiceUnavailable("the gateway is shutting down", code="shutting_down")
        run = Run(new_run_id())
        await self.log.create(run.id)
        subscription = Subscription(self, run, after=0)
        self._runs[run.id] = run
        run.task = asyncio.create_task(self._drive(run, source), name=f"run {run.id}")
        return subscription

    async def cancel(self, run_id: str, reason: str = "cancelled") -> bool:
        """Cancel a run this process drives; returns whether it was still running."""
        run = self._runs.get(run_id)
        return run is not None and _stop(run, reason)

    async def drain(self, grace: float) -> None:
        """Stop accepting runs, give the running ones ``grace`` seconds to finish, cancel the rest.

        Cancelled runs end with ``run.cancelled`` (reason ``shutting_down``), which their
        subscribers still receive: a shutdown never cuts a stream silently.
        """
        self._accepting = False
        tasks = [run.task for run in self._runs.values() if run.task is not None]
        if tasks and grace > 0:
            await asyncio.wait(tasks, timeout=grace)
        for run in list(self._runs.values()):
            await self.cancel(run.id, reason="shutting_down")
        await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        """Cancel every running run at once (each ends with ``run.cancelled``)."""
        await self.drain(grace=0)

    def _release(self, run: Run) -> None:
        run.subscribers -= 1
        if run.subscribers == 0:
            _stop(run, "client_disconnected")

    async def _drive(self, run: Run, source: AsyncIterator[EventDraft]) -> None:
        log, run_id, seq = self.log, run.id, 0
        terminal: EventDraft
        run.driving = True
        try:
            if run.stop_requested:
                raise asyncio.CancelledError
            async for event_type, data in source:
                seq += 1
                if event_type is EventType.RUN_STARTED:
                    data["run_id"] = run_id
                await log.append(run_id, (Event(seq, event_type, data),))
            terminal = (EventType.RUN_COMPLETED, {})
        except asyncio.CancelledError:
            terminal = (EventType.RUN_CANCELLED, {"reason": run.cancel_reason})
        except TokenRelayError as exc:
            run.failure = exc
            terminal = (EventType.RUN_FAILED, exc.to_failure())
        except Exception:
            logger.exception("run_source_crashed", run_id=run_id)
            run.failure = InternalError("the run failed unexpectedly")
            terminal = (EventType.RUN_FAILED, run.failure.to_failure())
        finally:
            await _close_source(source)
        await log.append(run_id, (Event(seq + 1, terminal[0], terminal[1]),))
        await log.seal(run_id)
        self._runs.pop(run_id, None)
        _log_run_end(run, terminal)


def _stop(run: Run, reason: str) -> bool:
    """Cancel a run's task, or ask it to stop as it starts; False if it already ended."""
    if run.task is None or run.task.done():
        return False
    run.cancel_reason = reason
    if run.driving:
        run.task.cancel()
    else:
        run.stop_requested = True
    return True


async def _close_source(source: AsyncIterator[EventDraft]) -> None:
    """Close an async generator source now, so its upstream connection is released at once."""
    aclose = getattr(source, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            logger.exception("run_source_close_failed")


def _log_run_end(run: Run, terminal: tuple[EventType, dict[str, Any]]) -> None:
    event_type, data = terminal
    if event_type is EventType.RUN_FAILED:
        logger.info("run_failed", run_id=run.id, code=data["code"])
    elif event_type is EventType.RUN_CANCELLED:
        logger.info("run_cancelled", run_id=run.id, reason=data["reason"])
