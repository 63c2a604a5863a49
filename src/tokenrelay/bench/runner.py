"""Drive the load: C workers on one aiohttp session, each streaming until the run's bound.

A stream is timed from the moment its request is handed to the client to its terminal frame. The
first token gives the time to first token; each later read that carries tokens gives one gap since
the previous token, and tokens that arrive together in one read count as gaps of zero, as the
client saw them. Everything goes into a ``BenchTally``; nothing is kept per stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Final

import aiohttp

from tokenrelay.bench.config import BenchConfig
from tokenrelay.bench.frames import http_failure_code, parser_for
from tokenrelay.bench.results import BenchResult, BenchSnapshot, BenchTally

__all__ = ["ProgressCallback", "run_bench"]

ProgressCallback = Callable[[BenchSnapshot], None]

_PROGRESS_INTERVAL: Final = 0.25  # four snapshots a second at most
_ERROR_BODY_LIMIT: Final = 64 * 1024
_DRAIN_SECONDS: Final = 1.0  # reading the end of a finished body, so the connection is reused
_SLOW_READS_PER_SECOND: Final = 20  # a slow reader reads in small pieces, not one a second
_SLOW_READ_MAX: Final = 16 * 1024


async def run_bench(
    config: BenchConfig,
    progress: ProgressCallback | None = None,
    *,
    stop: asyncio.Event | None = None,
) -> BenchResult:
    """Run one benchmark against ``config.url`` and return what it measured.

    The run ends by itself once ``config.requests`` streams have finished or ``config.duration``
    has passed (streams open then are finished, within ``config.timeout``).

    Args:
        config: The target, bound and load shape.
        progress: Called with a snapshot about four times a second, and once at the end.
        stop: Set it to end the run early: open streams are abandoned (neither ok nor failed)
            and the result so far is returned, marked ``interrupted``.
    """
    return await _BenchRun(config, progress, stop).run()


class _BenchRun:
    """The state of one run: tickets handed to workers, the tally, the end condition."""

    def __init__(
        self, config: BenchConfig, progress: ProgressCallback | None, stop: asyncio.Event | None
    ) -> None:
        self._config = config
        self._progress = progress
        self._stop = stop
        self._tally = BenchTally()
        self._bodies = config.bodies()
        self._headers = config.headers()
        self._bound = config.request_bound
        self._issued = 0
        self._finished = asyncio.Event()  # no new stream may start
        self._interrupted = False
        self._started = 0.0

    async def run(self) -> BenchResult:
        loop = asyncio.get_running_loop()
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None)  # one deadline per stream, set by us
        self._started = time.perf_counter()
        deadline = None
        if self._config.duration is not None:
            deadline = loop.call_later(self._config.duration, self._finished.set)
        try:
            async with aiohttp.ClientSession(
                connector=connector, timeout=timeout, auto_decompress=False
            ) as session:
                await self._run_workers(session)
                wall_seconds = time.perf_counter() - self._started
        finally:
            if deadline is not None:
                deadline.cancel()
        if self._progress is not None:
            self._progress(self._tally.snapshot(wall_seconds, 0.0))
        return BenchResult.from_tally(
            self._config.to_dict(), self._tally, wall_seconds, self._interrupted
        )

    async def _run_workers(self, session: aiohttp.ClientSession) -> None:
        async with asyncio.TaskGroup() as group:
            workers = [
                group.create_task(self._worker(session, index))
                for index in range(self._config.concurrency)
            ]
            helpers = []
            if self._progress is not None:
                helpers.append(group.create_task(self._report(self._progress)))
            if self._stop is not None:
                helpers.append(group.create_task(self._watch_stop(self._stop, workers)))
            await asyncio.wait(workers)
            for helper in helpers:
                helper.cancel()

    async def _watch_stop(self, stop: asyncio.Event, workers: list[asyncio.Task[None]]) -> None:
        """Shutdown is an input: when ``stop`` is set, no stream starts and open ones end."""
        await stop.wait()
        self._interrupted = True
        self._finished.set()
        for worker in workers:
            worker.cancel()

    async def _report(self, progress: ProgressCallback) -> None:
        previous_tokens, previous_time = 0, time.perf_counter()
        while True:
            await asyncio.sleep(_PROGRESS_INTERVAL)
            now = time.perf_counter()
            tokens = self._tally.tokens
            rate = (tokens - previous_tokens) / (now - previous_time)
            progress(self._tally.snapshot(now - self._started, rate))
            previous_tokens, previous_time = tokens, now

    def _claim(self) -> int | None:
        """The next request's ticket, or None once the bound is reached."""
        if self._finished.is_set():
            return None
        if self._bound is not None and self._issued >= self._bound:
            self._finished.set()
            return None
        self._issued += 1
        return self._issued - 1

    async def _worker(self, session: aiohttp.ClientSession, index: int) -> None:
        ramp = self._config.ramp
        if ramp is not None and index:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._finished.wait(), index / ramp)
            if self._finished.is_set():
                return
        self._tally.workers_started += 1
        while (ticket := self._claim()) is not None:
            await self._stream(session, self._bodies[ticket % len(self._bodies)])

    async def _stream(self, session: aiohttp.ClientSession, body: bytes) -> None:
        """One request, measured and classified; cancellation leaves the tally untouched."""
        tally = self._tally
        tally.active_streams += 1
        sent = time.perf_counter()
        ended: float | None = None
        failure: str | None
        try:
            async with asyncio.timeout(self._config.timeout) as deadline:
                async with session.post(
                    self._config.endpoint, data=body, headers=self._headers
                ) as response:
                    if response.status != 200:
                        raw = await self._read_error_body(response.content)
                        failure = http_failure_code(response.status, raw)
                    else:
                        failure, ended = await self._read(response, sent, deadline)
        except TimeoutError:
            failure = "timeout"
        except (aiohttp.ClientError, OSError):
            failure = "connection_error"
        finally:
            tally.active_streams -= 1
        if ended is None:
            ended = time.perf_counter()
        tally.record_end(ended - sent, failure)

    async def _read(
        self, response: aiohttp.ClientResponse, sent: float, deadline: asyncio.Timeout
    ) -> tuple[str | None, float]:
        """Read the body to its terminal frame: (failure code or None, time of the end)."""
        tally = self._tally
        parser = parser_for(self._config.format)
        reader = _BodyReader(response.content, self._config.slow_reader)
        clock = time.perf_counter
        last_token: float | None = None
        while data := await reader.read():
            now = clock()
            tally.bytes += len(data)
            tokens = parser.feed(data)
            if tokens:
                tally.tokens += tokens
                if last_token is not None:
                    tally.itl.record(now - last_token)
                else:
                    tally.ttft.record(now - sent)
                if tokens > 1:
                    tally.itl.record(0.0, tokens - 1)
                last_token = now
            if parser.finished:
                deadline.reschedule(None)  # the stream is over; what follows cannot fail it
                await self._drain(reader)
                return parser.failure, now
        return "incomplete", clock()

    async def _read_error_body(self, content: aiohttp.StreamReader) -> bytes:
        """The start of an error answer, enough for its code; a huge one is not read whole."""
        pieces: list[bytes] = []
        size = 0
        while size < _ERROR_BODY_LIMIT and (data := await content.read(_ERROR_BODY_LIMIT - size)):
            pieces.append(data)
            size += len(data)
        self._tally.bytes += size
        return b"".join(pieces)

    async def _drain(self, reader: _BodyReader) -> None:
        with contextlib.suppress(TimeoutError, aiohttp.ClientError, OSError):
            async with asyncio.timeout(_DRAIN_SECONDS):
                while data := await reader.read():
                    self._tally.bytes += len(data)


class _BodyReader:
    """Reads whatever has arrived, or at most ``rate`` bytes a second to hold back the server."""

    __slots__ = ("_content", "_rate", "_read_size", "_received", "_started")

    def __init__(self, content: aiohttp.StreamReader, rate: int | None) -> None:
        self._content = content
        self._rate = rate
        self._read_size = max(1, min(_SLOW_READ_MAX, (rate or 0) // _SLOW_READS_PER_SECOND))
        self._received = 0
        self._started = time.perf_counter()

    async def read(self) -> bytes:
        """The next piece of the body; empty at its end."""
        if self._rate is None:
            return await self._content.readany()
        data = await self._content.read(self._read_size)
        # Hand the bytes over only once the rate allows them: the stream cannot end sooner.
        self._received += len(data)
        delay = self._started + self._received / self._rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        return data
