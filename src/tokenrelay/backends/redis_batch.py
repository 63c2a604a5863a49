"""PipelineBatcher: the Redis calls made while a round trip is in flight share the next one.

One pipeline is in flight at a time. Calls submitted meanwhile wait in a queue and go together
in the next pipeline, as soon as the event loop is free (or after ``interval`` seconds). So the
batches grow with the load on their own: one call alone is sent at once, a thousand streams
producing tokens together share a few round trips instead of a thousand. The queue needs no
bound of its own: every caller awaits its call, so a producer has at most one call waiting.
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import structlog

from tokenrelay.backends.redis_store import LuaScript, RedisStore, fresh
from tokenrelay.errors import InternalError, StoreUnavailable, TokenRelayError

logger = structlog.get_logger("tokenrelay.store")


class PipelineCall:
    """One queued call. ``args`` may still grow until ``sent`` (merged appends)."""

    __slots__ = ("args", "done", "keys", "script", "sent")

    def __init__(
        self,
        script: LuaScript | None,
        keys: tuple[bytes, ...],
        args: list[Any],
        done: asyncio.Future[Any],
    ) -> None:
        self.script = script
        self.keys = keys
        self.args = args
        self.done = done
        self.sent = False


class PipelineBatcher:
    """Sends queued calls (scripts and commands) as pipelines, one in flight at a time.

    Args:
        store: the Redis connection.
        interval: seconds to wait before sending, so that more calls join; 0 sends as soon as
            the loop is free.
    """

    def __init__(self, store: RedisStore, *, interval: float = 0.0) -> None:
        self._store = store
        self._interval = interval
        self._queue: list[PipelineCall] = []
        self._sender: asyncio.Task[None] | None = None
        self.round_trips = 0  # pipelines sent, for tests and metrics

    def script(self, script: LuaScript, keys: tuple[bytes, ...], args: list[Any]) -> PipelineCall:
        """Queue a script call; await its ``done`` (shielded if several tasks may await it)."""
        return self._submit(script, keys, args)

    def command(self, *args: Any) -> PipelineCall:
        """Queue a command; await its ``done``."""
        return self._submit(None, (), list(args))

    def _submit(
        self, script: LuaScript | None, keys: tuple[bytes, ...], args: list[Any]
    ) -> PipelineCall:
        loop = asyncio.get_running_loop()
        call = PipelineCall(script, keys, args, loop.create_future())
        self._queue.append(call)
        if self._sender is None:
            # A context of its own: it serves every request, it must not log as the first one.
            self._sender = loop.create_task(
                self._send_all(), name="redis pipeline batcher", context=contextvars.Context()
            )
        return call

    async def _send_all(self) -> None:
        try:
            while self._queue:
                # Let every task that is ready now queue its call first.
                await asyncio.sleep(self._interval)
                calls, self._queue = self._queue, []
                for call in calls:
                    call.sent = True
                await self._send(calls)
        finally:
            self._sender = None

    async def _send(self, calls: list[PipelineCall]) -> None:
        self.round_trips += 1
        try:
            results = await self._store.run_pipeline(
                [(call.script, call.keys, call.args) for call in calls]
            )
        except TokenRelayError as exc:
            _fail(calls, exc)
            return
        except asyncio.CancelledError:
            _fail(calls, StoreUnavailable("the run store is closing"))
            raise
        except Exception:  # a bug: its callers must not wait forever
            logger.exception("store_batch_failed")
            _fail(calls, InternalError("the run store failed unexpectedly"))
            return
        for call, result in zip(calls, results, strict=True):
            if call.done.done():  # its only reader was cancelled
                continue
            if isinstance(result, TokenRelayError):
                call.done.set_exception(result)
            else:
                call.done.set_result(result)

    async def close(self) -> None:
        """Stop sending; calls still queued fail with ``StoreUnavailable``."""
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        queued, self._queue = self._queue, []
        _fail(queued, StoreUnavailable("the run store is closing"))


def _fail(calls: list[PipelineCall], error: TokenRelayError) -> None:
    for call in calls:
        if not call.done.done():
            call.done.set_exception(fresh(error))
