"""The benchmark for people: a live progress line while it runs, tables when it is done."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from tokenrelay.bench.results import BenchResult, BenchSnapshot

__all__ = ["LiveProgress", "render_result"]


class LiveProgress:
    """One self-replacing status line; refreshed only when a snapshot arrives (≤ 4 a second)."""

    def __init__(self, console: Console) -> None:
        self._live = Live(Text("starting…"), console=console, auto_refresh=False, transient=True)

    def __enter__(self) -> LiveProgress:
        self._live.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._live.stop()

    def update(self, snapshot: BenchSnapshot) -> None:
        line = Text.assemble(
            ("completed ", "dim"),
            (f"{snapshot.ok:,}", "green"),
            ("  failed ", "dim"),
            (f"{snapshot.failed:,}", "red" if snapshot.failed else ""),
            ("  tokens/s ", "dim"),
            f"{snapshot.tokens_per_second:,.0f}",
            ("  open ", "dim"),
            f"{snapshot.active_streams:,}",
            ("  elapsed ", "dim"),
            f"{snapshot.elapsed:.1f} s",
        )
        self._live.update(line, refresh=True)


def render_result(result: BenchResult) -> RenderableType:
    """The summary, latency and failure tables of a finished run."""
    config = result.config
    heading = Text.assemble(
        ("tokenrelay bench ", "bold"),
        f"{config['format']} → {config['endpoint']}, concurrency {config['concurrency']}",
        (" (interrupted: results so far)" if result.interrupted else "", "yellow"),
    )
    summary = Table(show_header=False, box=None)
    summary.add_column(style="dim")
    summary.add_column(justify="right")
    summary.add_row("streams ok", f"{result.ok:,}")
    summary.add_row("streams failed", f"{result.failed:,}")
    summary.add_row("requests/s", f"{result.requests_per_second:,.2f}")
    summary.add_row("tokens", f"{result.tokens:,}")
    summary.add_row("tokens/s", f"{result.tokens_per_second:,.2f}")
    summary.add_row("bytes received", f"{result.bytes:,}")
    summary.add_row("wall time", f"{result.wall_seconds:,.2f} s")

    latency = Table(title="latency (ms)", title_justify="left")
    latency.add_column("")
    for column in ("p50", "p90", "p99", "max", "samples"):
        latency.add_column(column, justify="right")
    for label, values in (
        ("time to first token", result.ttft_ms),
        ("inter-token gap", result.itl_ms),
        ("stream duration", result.duration_ms),
    ):
        if values["count"]:
            cells = [f"{values[name]:,.2f}" for name in ("p50", "p90", "p99", "max")]
        else:
            cells = ["-"] * 4  # no samples: not a latency of zero
        latency.add_row(label, *cells, f"{values['count']:,}")

    parts: list[RenderableType] = [heading, summary, Text(), latency]
    if result.failures:
        failures = Table(title="failures", title_justify="left")
        failures.add_column("code")
        failures.add_column("streams", justify="right")
        for code, count in result.failures.items():
            failures.add_row(code, f"{count:,}")
        parts += [Text(), failures]
    return Group(*parts)
