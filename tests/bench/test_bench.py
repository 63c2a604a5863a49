"""``tokenrelay bench`` end to end: real runs against the mock upstream and a gateway process.

Timings are checked as lower bounds only (a loaded machine may be slower, never faster).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tokenrelay.bench import (
    BenchConfig,
    BenchResult,
    BenchSnapshot,
    StreamFormat,
    load_request_mix,
    run_bench,
)

DOCUMENTED_KEYS = {
    "config",
    "requests",
    "tokens",
    "bytes",
    "ttft_ms",
    "itl_ms",
    "duration_ms",
    "failures",
    "wall_seconds",
    "interrupted",
}
LATENCY_KEYS = {"p50", "p90", "p99", "max", "count"}


def mock_requests(mock_url: str) -> list[dict[str, Any]]:
    """The bodies the mock upstream received since the test started, oldest first."""
    requests: list[dict[str, Any]] = httpx.get(mock_url + "/mock/requests").json()["requests"]
    return requests


def assert_all_ok(result: BenchResult, streams: int, tokens_each: int) -> None:
    assert (result.ok, result.failed, result.failures) == (streams, 0, {})
    assert result.tokens == streams * tokens_each
    assert result.ttft_ms["count"] == streams
    assert result.itl_ms["count"] == streams * (tokens_each - 1)
    assert result.duration_ms["count"] == streams
    assert result.bytes > 0
    assert 0 < result.ttft_ms["p50"] <= result.ttft_ms["max"]
    assert result.duration_ms["max"] >= result.ttft_ms["max"]


@pytest.mark.parametrize("stream_format", list(StreamFormat))
async def test_small_run_through_the_gateway(
    uncoalesced_url: str, stream_format: StreamFormat
) -> None:
    # One native event per token: the token counts below are exact.
    config = BenchConfig(
        uncoalesced_url, concurrency=4, requests=12, format=stream_format, mock={"tokens": 10}
    )
    result = await run_bench(config)
    assert_all_ok(result, streams=12, tokens_each=10)
    assert result.tokens_per_second > 0
    assert result.requests_per_second > 0


async def test_any_openai_compatible_server(mock_url: str) -> None:
    config = BenchConfig(mock_url + "/v1/", concurrency=4, requests=12, mock={"tokens": 10})
    result = await run_bench(config)
    assert_all_ok(result, streams=12, tokens_each=10)
    assert config.endpoint == mock_url + "/v1/chat/completions"


async def test_the_request_carries_every_setting(mock_url: str) -> None:
    config = BenchConfig(
        mock_url,
        requests=1,
        concurrency=1,
        model="other-model",
        prompt="Count to three.",
        max_tokens=2,
        mock={"tokens": 5},
    )
    result = await run_bench(config)
    assert (result.ok, result.tokens) == (1, 2)
    [body] = mock_requests(mock_url)
    assert body == {
        "model": "other-model",
        "messages": [{"role": "user", "content": "Count to three."}],
        "stream": True,
        "max_tokens": 2,
        "mock": {"tokens": 5},
    }


@pytest.mark.parametrize("stream_format", list(StreamFormat))
async def test_http_errors_before_the_stream_are_counted_by_status_and_code(
    gateway_url: str, stream_format: StreamFormat
) -> None:
    # The gateway retries the upstream's 503s, then answers 502 upstream_error (problem+json).
    config = BenchConfig(
        gateway_url, concurrency=2, requests=4, format=stream_format, mock={"http_error": 503}
    )
    result = await run_bench(config)
    assert (result.ok, result.failed) == (0, 4)
    assert result.failures == {"http_502:upstream_error": 4}
    assert result.ttft_ms["count"] == result.duration_ms["count"] == 0


async def test_http_error_without_a_code_is_the_status_alone(mock_url: str) -> None:
    result = await run_bench(BenchConfig(mock_url, requests=2, mock={"http_error": 503}))
    assert result.failures == {"http_503": 2}


@pytest.mark.parametrize("stream_format", list(StreamFormat))
async def test_mid_stream_failure_is_counted_by_its_code(
    uncoalesced_url: str, stream_format: StreamFormat
) -> None:
    config = BenchConfig(
        uncoalesced_url,
        concurrency=3,
        requests=3,
        format=stream_format,
        mock={"tokens": 10, "drop_after": 4},
    )
    result = await run_bench(config)
    assert (result.ok, result.failed) == (0, 3)
    assert result.failures == {"upstream_disconnected": 3}
    assert result.tokens == 12  # the tokens before the failure were received and are counted
    assert result.ttft_ms["count"] == 3
    assert result.duration_ms["count"] == 0  # only streams that ended properly


async def test_body_cut_short_is_a_connection_error(mock_url: str) -> None:
    # The mock closes the socket mid-body, without the chunked encoding's last chunk.
    result = await run_bench(BenchConfig(mock_url, requests=2, mock={"drop_after": 2}))
    assert result.failures == {"connection_error": 2}
    assert result.tokens == 4


async def test_body_ending_without_done_is_incomplete(mock_url: str, tmp_path: Path) -> None:
    # A server that ignores "stream" answers one JSON document: it never says [DONE].
    mix = tmp_path / "mix.jsonl"
    mix.write_text('{"stream": false}\n')
    config = BenchConfig(mock_url, requests=2, request_mix=load_request_mix(mix))
    result = await run_bench(config)
    assert result.failures == {"incomplete": 2}


async def test_stream_over_its_timeout_is_a_timeout(mock_url: str) -> None:
    config = BenchConfig(mock_url, requests=2, timeout=0.3, mock={"tokens": 5, "stall_after": 2})
    result = await run_bench(config)
    assert result.failures == {"timeout": 2}
    assert result.tokens == 4


async def test_nothing_listening_is_a_connection_error() -> None:
    result = await run_bench(BenchConfig(f"http://127.0.0.1:{free_port()}", requests=3))
    assert (result.ok, result.failures) == (0, {"connection_error": 3})


async def test_requests_file_is_used_round_robin(
    gateway_url: str, mock_url: str, tmp_path: Path
) -> None:
    mix = tmp_path / "mix.jsonl"
    mix.write_text(
        '{"messages": [{"role": "user", "content": "variant A"}], "mock": {"tokens": 2}}\n'
        "\n"
        '{"messages": [{"role": "user", "content": "variant B"}], "mock": {"tokens": 3}}\n'
    )
    config = BenchConfig(gateway_url, concurrency=1, requests=4, request_mix=load_request_mix(mix))
    result = await run_bench(config)
    assert (result.ok, result.tokens) == (4, 2 + 3 + 2 + 3)
    prompts = [body["messages"][0]["content"] for body in mock_requests(mock_url)]
    assert prompts == ["variant A", "variant B", "variant A", "variant B"]


async def test_duration_stops_the_run_by_itself(mock_url: str) -> None:
    config = BenchConfig(mock_url, concurrency=2, duration=1, mock={"tokens": 5, "itl_ms": 10})
    assert config.request_bound is None
    result = await run_bench(config)
    assert result.wall_seconds >= 1.0
    assert result.ok >= 2 and result.failed == 0
    assert result.tokens == result.ok * 5
    assert not result.interrupted


async def test_slow_reader_reads_no_faster_than_its_rate(mock_url: str) -> None:
    rate = 4000  # bytes per second; one stream of about 2.7 kB
    config = BenchConfig(mock_url, concurrency=1, requests=1, slow_reader=rate, mock={"tokens": 10})
    result = await run_bench(config)
    assert result.ok == 1
    assert result.bytes > rate / 2
    assert result.duration_ms["max"] >= result.bytes / rate * 1000 - 0.01


async def test_ramp_starts_workers_at_the_given_rate(mock_url: str) -> None:
    snapshots: list[BenchSnapshot] = []
    config = BenchConfig(
        mock_url, concurrency=5, requests=15, ramp=5, mock={"tokens": 3, "itl_ms": 100}
    )
    result = await run_bench(config, snapshots.append)
    all_started = [s for s in snapshots if s.workers_started == 5]
    assert all_started, [s.workers_started for s in snapshots]
    assert all_started[0].elapsed >= 0.8  # workers 0-4 start at 0, 0.2, … 0.8 s
    assert result.wall_seconds >= 0.8
    assert result.ok == 15


async def test_progress_snapshots_and_stop_event(mock_url: str) -> None:
    snapshots: list[BenchSnapshot] = []
    stop = asyncio.Event()
    config = BenchConfig(mock_url, concurrency=3, requests=30, mock={"tokens": 100, "itl_ms": 20})

    def progress(snapshot: BenchSnapshot) -> None:
        snapshots.append(snapshot)
        if snapshot.tokens:
            stop.set()

    result = await run_bench(config, progress, stop=stop)
    assert result.interrupted
    assert (result.ok, result.failed) == (0, 0)  # streams cut short by the stop are not failures
    assert result.tokens > 0
    assert any(s.active_streams == 3 and s.tokens_per_second > 0 for s in snapshots)
    assert snapshots[-1].active_streams == 0


def test_cli_json_output(uncoalesced_url: str) -> None:
    completed = subprocess.run(
        [
            *(sys.executable, "-m", "tokenrelay", "bench", uncoalesced_url + "/v1"),
            *("-c", "2", "-n", "4", "--format", "native", "--mock", '{"tokens": 3}', "--json"),
        ],
        capture_output=True,
        timeout=30,
    )
    assert completed.returncode == 0, completed.stderr
    output = json.loads(completed.stdout)
    assert set(output) == DOCUMENTED_KEYS
    assert output["requests"]["ok"] == 4 and output["requests"]["failed"] == 0
    assert output["requests"]["per_second"] > 0
    assert output["tokens"]["total"] == 12 and output["tokens"]["per_second"] > 0
    for key in ("ttft_ms", "itl_ms", "duration_ms"):
        assert set(output[key]) == LATENCY_KEYS
    assert output["ttft_ms"]["count"] == 4 and output["itl_ms"]["count"] == 8
    assert output["failures"] == {}
    assert output["config"]["format"] == "native"
    assert output["config"]["endpoint"] == uncoalesced_url + "/v1/runs"
    assert output["wall_seconds"] > 0 and output["bytes"] > 0


def test_cli_ctrl_c_stops_early_and_still_prints_the_results(mock_url: str) -> None:
    command = [sys.executable, "-m", "tokenrelay", "bench", mock_url, "-c", "2", "-d", "60"]
    command += ["--mock", '{"tokens": 1000, "itl_ms": 20}', "--json"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        deadline = time.monotonic() + 20
        while httpx.get(mock_url + "/mock/stats").json()["active_streams"] < 2:
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=20)
    assert process.returncode == 130, stderr
    output = json.loads(stdout)
    assert output["interrupted"] is True
    assert output["requests"] == {"ok": 0, "failed": 0, "per_second": 0.0}
    assert output["tokens"]["total"] > 0


def test_cli_refuses_an_unbounded_duration(gateway_url: str) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "tokenrelay", "bench", gateway_url, "-d", "3601"],
        capture_output=True,
        timeout=30,
    )
    assert completed.returncode == 2
    assert b"duration" in completed.stderr
    assert completed.stdout == b""
