"""Latency distributions in constant memory: an HDR histogram per measure, never a sample list.

A run of millions of tokens records millions of inter-token gaps; an HDR histogram keeps them in a
few tens of kilobytes with a bounded relative error (three significant digits).
"""

from __future__ import annotations

from typing import Final

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]  # hdrh ships no types

__all__ = ["LatencyHistogram"]

_LOWEST_US: Final = 1
_HIGHEST_US: Final = 3600 * 1_000_000  # one hour: the longest run allowed
_SIGNIFICANT_DIGITS: Final = 3


class LatencyHistogram:
    """Durations at microsecond resolution from 1 µs to 1 h; longer ones are clamped to 1 h."""

    __slots__ = ("_histogram",)

    def __init__(self) -> None:
        self._histogram = HdrHistogram(_LOWEST_US, _HIGHEST_US, _SIGNIFICANT_DIGITS)

    def record(self, seconds: float, count: int = 1) -> None:
        """Record ``count`` samples of ``seconds`` (negative clock noise counts as zero)."""
        micros = min(max(int(seconds * 1_000_000), 0), _HIGHEST_US)
        self._histogram.record_value(micros, count)

    @property
    def count(self) -> int:
        return int(self._histogram.get_total_count())

    def percentile_ms(self, percentile: float) -> float:
        """The value at ``percentile`` (0-100) in milliseconds; 0 when nothing was recorded."""
        if not self.count:
            return 0.0
        return round(int(self._histogram.get_value_at_percentile(percentile)) / 1000, 2)

    def max_ms(self) -> float:
        if not self.count:
            return 0.0
        return round(int(self._histogram.get_max_value()) / 1000, 2)

    def summary(self) -> dict[str, float | int]:
        """p50, p90, p99 and max in milliseconds (two decimals), and the sample count."""
        return {
            "p50": self.percentile_ms(50),
            "p90": self.percentile_ms(90),
            "p99": self.percentile_ms(99),
            "max": self.max_ms(),
            "count": self.count,
        }
