"""What a run measured: the live tally, the snapshots shown while it runs, the final result.

One ``BenchTally`` per run is written by every worker (they share one event loop, so plain
counters need no lock). It holds histograms and counters only, so its size does not grow with
the number of streams or tokens.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tokenrelay.bench.histogram import LatencyHistogram

__all__ = ["BenchResult", "BenchSnapshot", "BenchTally"]


@dataclass(frozen=True, slots=True)
class BenchSnapshot:
    """The state of a running benchmark, handed to the progress callback a few times a second.

    Args:
        elapsed: Seconds since the run started.
        ok: Streams that ended properly so far.
        failed: Streams that failed so far.
        tokens: Tokens received so far.
        tokens_per_second: Tokens per second since the previous snapshot.
        active_streams: Streams open right now.
        workers_started: Workers started so far (fewer than the concurrency while ramping).
    """

    elapsed: float
    ok: int
    failed: int
    tokens: int
    tokens_per_second: float
    active_streams: int
    workers_started: int


class BenchTally:
    """Counters and histograms of one run, written by the workers as streams progress."""

    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0
        self.tokens = 0
        self.bytes = 0
        self.active_streams = 0
        self.workers_started = 0
        self.failures: Counter[str] = Counter()
        self.ttft = LatencyHistogram()
        self.itl = LatencyHistogram()
        self.duration = LatencyHistogram()

    def record_end(self, duration: float, failure: str | None) -> None:
        """Count a stream that ended; only proper ends go into the duration histogram."""
        if failure is None:
            self.ok += 1
            self.duration.record(duration)
        else:
            self.failed += 1
            self.failures[failure] += 1

    def snapshot(self, elapsed: float, tokens_per_second: float) -> BenchSnapshot:
        return BenchSnapshot(
            elapsed=elapsed,
            ok=self.ok,
            failed=self.failed,
            tokens=self.tokens,
            tokens_per_second=tokens_per_second,
            active_streams=self.active_streams,
            workers_started=self.workers_started,
        )


@dataclass(frozen=True, slots=True)
class BenchResult:
    """The outcome of a run.

    Args:
        config: The run's settings, as ``BenchConfig.to_dict`` reports them.
        ok: Streams that ended properly.
        failed: Streams that failed, each counted once in ``failures``.
        tokens: Tokens received, failed streams included.
        bytes: Response bytes received (bodies, error bodies included).
        wall_seconds: From the start of the run to the end of its last stream.
        ttft_ms: Time to first token summary (request sent to first token).
        itl_ms: Inter-token gap summary.
        duration_ms: Stream duration summary, streams that ended properly only.
        failures: Failed streams by failure code.
        interrupted: The run was stopped before its bound (Ctrl-C or the stop event).
    """

    config: dict[str, Any]
    ok: int
    failed: int
    tokens: int
    bytes: int
    wall_seconds: float
    ttft_ms: dict[str, float | int]
    itl_ms: dict[str, float | int]
    duration_ms: dict[str, float | int]
    failures: dict[str, int] = field(default_factory=dict)
    interrupted: bool = False

    @classmethod
    def from_tally(
        cls, config: dict[str, Any], tally: BenchTally, wall_seconds: float, interrupted: bool
    ) -> BenchResult:
        return cls(
            config=config,
            ok=tally.ok,
            failed=tally.failed,
            tokens=tally.tokens,
            bytes=tally.bytes,
            wall_seconds=wall_seconds,
            ttft_ms=tally.ttft.summary(),
            itl_ms=tally.itl.summary(),
            duration_ms=tally.duration.summary(),
            failures=dict(tally.failures.most_common()),
            interrupted=interrupted,
        )

    @property
    def requests_per_second(self) -> float:
        """Streams finished (ok or failed) per second of wall time."""
        return _rate(self.ok + self.failed, self.wall_seconds)

    @property
    def tokens_per_second(self) -> float:
        return _rate(self.tokens, self.wall_seconds)

    def to_dict(self) -> dict[str, Any]:
        """The documented JSON shape of ``tokenrelay bench --json``."""
        return {
            "config": self.config,
            "requests": {
                "ok": self.ok,
                "failed": self.failed,
                "per_second": self.requests_per_second,
            },
            "tokens": {"total": self.tokens, "per_second": self.tokens_per_second},
            "bytes": self.bytes,
            "ttft_ms": dict(self.ttft_ms),
            "itl_ms": dict(self.itl_ms),
            "duration_ms": dict(self.duration_ms),
            "failures": dict(self.failures),
            "wall_seconds": round(self.wall_seconds, 3),
            "interrupted": self.interrupted,
        }


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 2) if seconds > 0 else 0.0
