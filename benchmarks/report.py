"""Writes ``benchmarks/README.md`` from one run's measurements: tables, ratios, targets."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmarks.run import Measurement


INTRO = """\
tokenrelay relaying the mock upstream, side by side in one run with a direct connection to the
mock and with nginx (`proxy_buffering off`, one worker) in front of it. The load is `tokenrelay
bench` in its own process, on 127.0.0.1. tokenrelay runs with the full pipeline: every chunk
parsed into events, appended to the stream log, re-encoded in the OpenAI format.

Absolute numbers on a shared 2-core machine (mock, relay and load generator share the two cores)
are noise; the ratios within one run are the figures."""


# The benchmarks with a script and a page of their own.
SEE_ALSO = (
    "Also measured, each by its own script: the response cache and coalescing in\n"
    "[cache.md](cache.md) (`python benchmarks/cache.py`), bytes per token by encoding,\n"
    "compression and coalescing in [payload.md](payload.md) (`python benchmarks/payload.py`)."
)


def _pick(measurements: Sequence[Measurement], scenario: str, target: str) -> Measurement | None:
    for m in measurements:
        if m.scenario.name == scenario and m.target == target:
            return m
    return None


def _ms(value: float) -> str:
    return f"{value:.2f}"


def _row(m: Measurement) -> str:
    r = m.result
    cpu = "" if m.cpu_seconds is None else f"{m.cpu_seconds:.2f}"
    per_chunk = "" if not m.cpu_seconds or not m.chunks else f"{m.cpu_seconds / m.chunks * 1e6:.1f}"
    memory = "" if m.memory_per_stream_kib is None else f"{m.memory_per_stream_kib:.1f}"
    return (
        f"| {m.target} | {r['requests']['ok']} | {r['requests']['failed']} "
        f"| {_ms(r['ttft_ms']['p50'])} | {_ms(r['ttft_ms']['p99'])} "
        f"| {_ms(r['itl_ms']['p50'])} | {_ms(r['itl_ms']['p99'])} "
        f"| {r['tokens']['per_second']:,.0f} | {cpu} | {per_chunk} | {memory} |"
    )


def _targets(measurements: Sequence[Measurement]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for each figure the project holds itself to."""
    rows: list[tuple[str, str, bool | None]] = []

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("inf")

    s2_relay, s2_nginx = _pick(measurements, "S2", "tokenrelay"), _pick(measurements, "S2", "nginx")
    if s2_relay and s2_nginx:
        value = ratio(
            s2_relay.result["tokens"]["per_second"], s2_nginx.result["tokens"]["per_second"]
        )
        rows.append(("S2: chunks/s ≥ 0.5x nginx", f"{value:.2f}x", value >= 0.5))
    s1_relay, s1_direct = (
        _pick(measurements, "S1-c1", "tokenrelay"),
        _pick(measurements, "S1-c1", "direct"),
    )
    if s1_relay and s1_direct:
        added = s1_relay.result["ttft_ms"]["p50"] - s1_direct.result["ttft_ms"]["p50"]
        rows.append(
            ("S1, 1 stream: TTFT p50 added over direct ≤ 0.5 ms", f"{added:.2f} ms", added <= 0.5)
        )
    s150_relay, s150_nginx = (
        _pick(measurements, "S1-c50", "tokenrelay"),
        _pick(measurements, "S1-c50", "nginx"),
    )
    if s150_relay and s150_nginx:
        value = ratio(s150_relay.result["ttft_ms"]["p99"], s150_nginx.result["ttft_ms"]["p99"])
        rows.append(("S1, 50 streams: TTFT p99 ≤ 1.5x nginx", f"{value:.2f}x", value <= 1.5))
    s3_relay, s3_nginx = _pick(measurements, "S3", "tokenrelay"), _pick(measurements, "S3", "nginx")
    if s3_relay:
        failed = s3_relay.result["requests"]["failed"]
        rows.append(("S3: zero failures", str(failed), failed == 0))
        memory = s3_relay.memory_per_stream_kib or 0.0
        rows.append(("S3: memory per open stream ≤ 30 KiB", f"{memory:.1f} KiB", memory <= 30))
    if s3_relay and s3_nginx:
        value = ratio(s3_relay.result["itl_ms"]["p99"], s3_nginx.result["itl_ms"]["p99"])
        rows.append(("S3: inter-token gap p99 within 10% of nginx", f"{value:.2f}x", value <= 1.10))
    return rows


def write_report(
    path: Path, measurements: Sequence[Measurement], versions: dict[str, str], command: str
) -> None:
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Benchmarks",
        "",
        INTRO,
        "",
        f"Produced by `{command}` on {today}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        "",
        SEE_ALSO,
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for name, measured, met in _targets(measurements):
        lines.append(f"| {name} | {measured} | {'yes' if met else 'no'} |")
    lines += ["", "## Results", ""]
    header = (
        "| target | ok | failed | TTFT p50 ms | TTFT p99 ms | gap p50 ms | gap p99 ms "
        "| chunks/s | relay CPU s | CPU µs/chunk | KiB/stream |"
    )
    seen: list[Any] = []
    for m in measurements:
        if m.scenario in seen:
            continue
        seen.append(m.scenario)
        s = m.scenario
        lines += [
            f"### {s.title}",
            "",
            f"{s.concurrency} concurrent, {s.requests} streams, mock options `{s.mock}`"
            + (f", ramp {s.ramp:g}/s" if s.ramp else "")
            + ".",
            "",
            header,
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [_row(x) for x in measurements if x.scenario == s]
        lines.append("")
    lines += [
        "Columns: TTFT is request sent to first content token at the client; gap is the time",
        "between two tokens at the client; chunks/s counts content chunks over the wall time;",
        "relay CPU is the user+system time of the relay process during the scenario (nginx: its",
        "worker); KiB/stream is the peak resident memory during the scenario above the idle",
        "process, divided by the concurrent streams.",
        "",
    ]
    analysis = path.parent / "analysis.md"
    if analysis.exists():  # hand-written: the profile and what stands in the way
        lines += [analysis.read_text()]
    path.write_text("\n".join(lines))
