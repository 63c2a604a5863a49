"""The Hub: starts runs, numbers and logs their events, and lets subscribers read them.

A run is one generation. Its source is an async iterator of event drafts; the Hub drives it in a
task, appends every event to the StreamLog and ends every run with exactly one terminal event:
``run.completed`` when the source is exhausted, ``run.failed`` when it raises, ``run.cancelled``
when it is cancelled. Sources never produce terminal events themselves.

Stopping is not the same as disconnecting. When the last reader of a run leaves, the run is
cancelled at once (``disconnect_grace`` 0, the OpenAI endpoint), after a grace period in which a
reconnecting reader loses nothing, or never (``detached``): an upstream is not paid for tokens
nobody will read, and a reader that comes back can still resume.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import structlog

from tokenrelay.errors import InternalError, NotFound, ServiceUnavailable, TokenRelayError
from tokenrelay.events import Event, EventDraft, EventType, RunInfo
from tokenrelay.runs.log import StreamLog
from tokenrelay.runs.registry import RunRegistry
from tokenrelay.runs.subscription import Subscription

logger = structlog.get_logger("tokenrelay.runs")

_STATUS_OF = {
    EventType.RUN_COMPLETED: "completed",
    EventType.RUN_FAILED: "failed",
    EventType.RUN_CANCELLED: "cancelled",
}


def new_run_id() -> str:
    return "run_" + secrets.token_hex(12)


class Run:
    """What this process knows about a run it drives."""

    __slots__ = (
        "cancel_reason",
        "disconnect_grace",
        "driving",
        "failure",
        "first_event_seen",
        "grace_task",
        "info",
        "stop_requested",
        "subscribers",
        "task",
    )

    def __init__(self, info: RunInfo, disconnect_grace: float) -> None:
        self.info = info
        self.disconnect_grace = disconnect_grace
        self.task: asyncio.Task[None] | None = None
        self.grace_task: asyncio.Task[None] | None = None
        # A task cancelled before its first step never runs a line of its coroutine, so no
        # terminal event would be written: until it runs, a stop is only requested.
        self.driving = False
        self.stop_requested = False  # set by the first stop; the task checks it as it starts
        self.first_event_seen = False  # until then the run counts as a pending start
        self.subscribers = 0  # readers in this process
        # The error that failed the run, kept so the HTTP layer can answer with its status when
        # the run fails before its stream has started.
        self.failure: TokenRelayError | None = None
        self.cancel_reason = "cancelled"

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def finished(self) -> bool:
        return self.task is not None and self.task.done()


class Hub:
    """Run lifecycle and fan-out over a StreamLog, with run records in a RunRegistry."""

    def __init__(self, log: StreamLog, registry: RunRegistry) -> None:
        self.log = log
        self.registry = registry
        self._runs: dict[str, Run] = {}
        self._pending_starts = 0
        self._accepting = True
        self.drained = asyncio.Event()  # set once a drain has ended every run

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def active_runs(self) -> int:
        return len(self._runs)

    @property
    def pending_starts(self) -> int:
        """Runs of this process whose source has not produced its first event yet."""
        return self._pending_starts

    async def start(
        self,
        source: AsyncIterator[EventDraft],
        *,
        detached: bool = False,
        disconnect_grace: float = 0.0,
        tenant: str = "default",
    ) -> Subscription:
        """Start a run driven by ``source`` and return its first subscription (from the start).

        Args:
            source: the run's events, without a terminal one.
            detached: keep generating to the end when every reader has left.
            disconnect_grace: seconds the run goes on with no reader before it is cancelled.
            tenant: the run's owner; only readers of the same tenant will find it.
        """
        if not self._accepting:
            raise ServiceUnavailable("the gateway is shutting down", code="shutting_down")
        info = RunInfo(
            new_run_id(), "running", created_at=time.time(), detached=detached, tenant=tenant
        )
        run = Run(info, disconnect_grace)
        await self.log.create(run.id)
        await self.registry.register(info)
        self._runs[run.id] = run
        self._pending_starts += 1
        run.task = asyncio.create_task(self._drive(run, source), name=f"run {run.id}")
        try:
            return await self._subscribe(run.id, run, after=0)
        except BaseException:
            run.subscribers -= 1  # nobody will read it: do not let it generate for no one
            _stop(run, "client_disconnected")
            raise

    async def subscribe(
        self, run_id: str, after: int = 0, *, tenant: str | None = None
    ) -> Subscription:
        """A new reader of any run this instance or another drives, from the cursor ``after``.

        Raises:
            NotFound: the run does not exist, has expired, or belongs to another tenant.
        """
        await self.info(run_id, tenant=tenant)
        return await self._subscribe(run_id, self._runs.get(run_id), after)

    def outlive_readers(self, run_id: str, *, detached: bool, disconnect_grace: float) -> None:
        """Let a run this process drives live as long as a reader that joined it asked for.

        A request that joins an identical run in flight (coalescing) did not choose how long
        that run outlives its readers; its own wish (detached, a longer grace) is added to the
        run's. Runs driven by another instance keep their own.
        """
        run = self._runs.get(run_id)
        if run is None:
            return
        run.disconnect_grace = max(run.disconnect_grace, disconnect_grace)
        if detached and not run.info.detached:
            run.info = replace(run.info, detached=True)

    async def info(self, run_id: str, *, tenant: str | None = None) -> RunInfo:
        """The run's record.

        Args:
            tenant: the caller's tenant; None only for the gateway's own use (any tenant).

        Raises:
            NotFound: no such run for this tenant. Another tenant's run is "not found" too, not
                forbidden: a caller learns nothing about ids that are not its own.
        """
        info = await self.registry.get(run_id)
        if info is None or (tenant is not None and info.tenant != tenant):
            raise NotFound(f"run {run_id} does not exist or has expired")
        return info

    async def cancel(
        self, run_id: str, reason: str = "cancelled", *, tenant: str | None = None
    ) -> RunInfo:
        """Cancel a run wherever it runs; returns its record (final if it ended here in time)."""
        info = await self.info(run_id, tenant=tenant)
        if info.status != "running":
            return info
        run = self._runs.get(run_id)
        if run is None:
            await self.registry.request_cancel(run_id)  # the driving instance will act
            return info
        if _stop(run, reason) and run.task is not None:
            await asyncio.wait((run.task,), timeout=5)
        return run.info

    async def listen_for_cancels(self) -> None:
        """Cancel the local runs that other instances ask to cancel; runs until cancelled."""
        async for run_id in self.registry.cancel_requests():
            run = self._runs.get(run_id)
            if run is not None:
                _stop(run, "cancelled")

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
            _stop(run, "shutting_down")
        await asyncio.gather(*tasks, return_exceptions=True)
        self.drained.set()

    async def close(self) -> None:
        """Cancel every running run at once (each ends with ``run.cancelled``)."""
        await self.drain(grace=0)

    async def _subscribe(self, run_id: str, run: Run | None, after: int) -> Subscription:
        if run is not None:
            run.subscribers += 1
            if run.grace_task is not None:
                run.grace_task.cancel()
                run.grace_task = None
        await self.registry.add_subscriber(run_id, +1)
        return Subscription(run_id, run, after, self.log, self._release)

    async def _release(self, run_id: str, run: Run | None) -> None:
        if run is not None:
            run.subscribers -= 1
        await self._readers_elsewhere(run_id, -1)
        if run is None or run.subscribers > 0 or run.finished or run.info.detached:
            return
        if run.disconnect_grace <= 0:
            _stop(run, "client_disconnected")
        elif run.grace_task is None:
            run.grace_task = asyncio.create_task(self._stop_when_abandoned(run))

    async def _readers_elsewhere(self, run_id: str, delta: int) -> int:
        """Update and read the cross-instance reader count; 0 if the store cannot say."""
        try:
            return await self.registry.add_subscriber(run_id, delta)
        except TokenRelayError as exc:
            logger.warning("run_readers_unknown", run_id=run_id, code=exc.instance_code())
            return 0

    async def _stop_when_abandoned(self, run: Run) -> None:
        """After each grace period with no local reader: stop, unless readers elsewhere remain."""
        while True:
            await asyncio.sleep(run.disconnect_grace)
            if run.subscribers > 0:
                return
            if await self._readers_elsewhere(run.id, 0) == 0:
                run.grace_task = None
                _stop(run, "client_disconnected")
                return

    def _first_event(self, run: Run) -> None:
        if not run.first_event_seen:
            run.first_event_seen = True
            self._pending_starts -= 1

    async def _drive(self, run: Run, source: AsyncIterator[EventDraft]) -> None:
        log, run_id, seq = self.log, run.id, 0
        terminal: EventDraft
        run.driving = True
        try:
            if run.stop_requested:
                raise asyncio.CancelledError
            async for event_type, data in source:
                seq += 1
                if seq == 1:
                    self._first_event(run)
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
            self._first_event(run)
            await _close_source(source)
            if run.grace_task is not None:
                run.grace_task.cancel()
        run.info = _finished(run.info, terminal)
        try:
            await log.append(run_id, (Event(seq + 1, terminal[0], terminal[1]),))
            await log.seal(run_id)
            await self.registry.finish(run.info)
        except TokenRelayError as exc:  # the store is down: readers get their own failure
            logger.warning("run_end_not_stored", run_id=run_id, code=exc.instance_code())
        finally:
            self._runs.pop(run_id, None)
        if run.info.status != "completed":
            logger.info(f"run_{run.info.status}", run_id=run_id, code=run.info.error_code)


def _stop(run: Run, reason: str) -> bool:
    """Cancel a run's task, or ask it to stop as it starts; False if it already ended.

    Only the first stop counts: a second cancel while the run closes its source would
    interrupt the writing of its terminal event.
    """
    if run.task is None or run.task.done():
        return False
    if run.stop_requested:
        return True
    run.stop_requested = True
    run.cancel_reason = reason
    if run.driving:
        run.task.cancel()
    return True


def _finished(info: RunInfo, terminal: EventDraft) -> RunInfo:
    event_type, data = terminal
    return RunInfo(
        info.id,
        _STATUS_OF[event_type],  # type: ignore[arg-type]
        created_at=info.created_at,
        detached=info.detached,
        finished_at=time.time(),
        error_code=data.get("code", data.get("reason")),
        tenant=info.tenant,
    )


async def _close_source(source: AsyncIterator[EventDraft]) -> None:
    """Close an async generator source now, so its upstream connection is released at once."""
    aclose = getattr(source, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            logger.exception("run_source_close_failed")
