"""The benchmark harness still runs end to end (a few seconds, nginx left out)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_smoke_run_completes_without_failures() -> None:
    done = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--smoke", "--no-nginx"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if " ok=" in line]
    scenarios = {(line.split()[0], line.split()[1]) for line in lines}
    assert scenarios == {
        (scenario, target)
        for scenario in ("S1-c1", "S2", "S3")
        for target in ("direct", "tokenrelay")
    }
    assert all("failed=0" in line for line in lines)


def test_payload_benchmark_smoke_run_completes() -> None:
    done = subprocess.run(
        [sys.executable, "benchmarks/payload.py", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| native SSE |" in done.stdout


def test_cache_benchmark_sees_one_upstream_request_for_identical_ones(tmp_path: Path) -> None:
    report = tmp_path / "cache.md"
    done = subprocess.run(
        [sys.executable, "benchmarks/cache.py", "--output", str(report)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = report.read_text().splitlines()
    coalescing = rows[rows.index(next(r for r in rows if r.startswith("| upstream requests"))) + 2]
    assert coalescing.startswith("| 1 | 49 |")
