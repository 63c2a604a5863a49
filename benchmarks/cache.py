"""What the response cache saves: a hit against a miss, and identical requests sent together.

    python benchmarks/cache.py          # about half a minute; writes benchmarks/cache.md

Starts the mock upstream and a gateway with the default cache settings (``deterministic``
policy, immediate replay, coalescing on), as ``benchmarks/run.py`` does, then measures through
``/v1/chat/completions`` (streamed):

- a miss and a hit of the same 1,000-token answer (temperature 0): time to the first token,
  tokens per second of the stream after it, and the whole request's duration, the median of a
  few questions each asked twice;
- 50 identical requests sent at once: how many reached the upstream (the mock's own count; it
  must be 1), and how the others were served.

The upstream paces its tokens (``ITL_MS``) as a model would; a hit is limited only by the
gateway and the client. Absolute numbers on a shared 2-core machine are noise; the ratios are
the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
# Run as a script, this directory is on sys.path, not the repository: share run.py's helpers.
sys.path.insert(0, str(HERE.parent))
from benchmarks.run import free_port, process, tokenrelay_command  # noqa: E402 (path set above)

TOKENS = 1000
ITL_MS = 1.0
QUESTIONS = 5  # each asked twice: a miss, then a hit
PARALLEL = 50
PARALLEL_MOCK = {"tokens": 200, "itl_ms": 5}  # about a second in flight
TOKEN_MARK = b'"content":"tok'


@dataclass(frozen=True)
class Timing:
    x_cache: str
    coalesced: bool
    first_token: float  # seconds from sending the request
    duration: float  # seconds from sending to the end of the stream
    tokens: int
    body: bytes

    @property
    def tokens_per_second(self) -> float:
        streaming = self.duration - self.first_token
        return self.tokens / streaming if streaming > 0 else float("inf")


def question(mock: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": "mock-model",
        "messages": [{"role": "user", "content": f"Question {uuid.uuid4().hex}"}],
        "temperature": 0,
        "stream": True,
        "mock": mock,
    }


async def timed_request(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Timing:
    started = time.perf_counter()
    first_token: float | None = None
    received = bytearray()
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for chunk in response.content.iter_any():
            received += chunk
            if first_token is None and TOKEN_MARK in received:
                first_token = time.perf_counter() - started
    duration = time.perf_counter() - started
    return Timing(
        x_cache=response.headers.get("X-Cache", "?"),
        coalesced=response.headers.get("X-Coalesced") == "true",
        first_token=duration if first_token is None else first_token,
        duration=duration,
        tokens=bytes(received).count(TOKEN_MARK),
        body=bytes(received),
    )


def upstream_requests(mock_url: str, *, reset: bool = False) -> int:
    request = urllib.request.Request(
        mock_url + ("/mock/reset" if reset else "/mock/stats"), method="POST" if reset else "GET"
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        count: int = json.loads(response.read())["requests"]
        return count


async def hit_against_miss(url: str) -> dict[str, list[Timing]]:
    timings: dict[str, list[Timing]] = {"miss": [], "hit": []}
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for _ in range(QUESTIONS):
            body = question({"tokens": TOKENS, "itl_ms": ITL_MS})
            for expected in ("miss", "hit"):
                timing = await timed_request(session, url, body)
                if timing.x_cache != expected or timing.tokens != TOKENS:
                    raise RuntimeError(f"expected a complete {expected}, got {timing}")
                timings[expected].append(timing)
    return timings


async def identical_together(url: str) -> tuple[list[Timing], float]:
    body = question(PARALLEL_MOCK)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        timings = await asyncio.gather(
            *(timed_request(session, url, body) for _ in range(PARALLEL))
        )
    return list(timings), time.perf_counter() - started


def median(values: list[float]) -> float:
    return statistics.median(values)


def report(
    timings: dict[str, list[Timing]],
    together: list[Timing],
    together_seconds: float,
    upstream_count: int,
) -> str:
    miss, hit = timings["miss"], timings["hit"]
    rows = [
        "| | miss | hit | hit / miss |",
        "|---|---:|---:|---:|",
    ]

    def row(name: str, unit: str, pick: Any, digits: int) -> None:
        miss_value = median([pick(t) for t in miss])
        hit_value = median([pick(t) for t in hit])
        ratio = hit_value / miss_value if miss_value else float("inf")
        rows.append(
            f"| {name} ({unit}) | {miss_value:,.{digits}f} | {hit_value:,.{digits}f} "
            f"| {ratio:,.2f}x |"
        )

    row("time to first token", "ms", lambda t: t.first_token * 1000, 1)
    row("tokens per second of a stream", "tokens/s", lambda t: t.tokens_per_second, 0)
    row("whole request", "ms", lambda t: t.duration * 1000, 1)
    served = {
        "coalesced": sum(t.coalesced for t in together),
        "hit": sum(t.x_cache == "hit" for t in together),
        "miss": sum(t.x_cache == "miss" and not t.coalesced for t in together),
    }
    identical = all(t.body == together[0].body for t in together)
    lines = [
        "# Response cache",
        "",
        f"`python benchmarks/cache.py`: one gateway process in front of the mock upstream, "
        f"default cache settings; Python {platform.python_version()}, {os.cpu_count()} CPUs.",
        "",
        f"## A miss and a hit of a {TOKENS:,}-token answer",
        "",
        f"Streamed chat completions, temperature 0; the upstream paces tokens {ITL_MS:g} ms "
        f"apart. Medians of {QUESTIONS} questions, each asked twice.",
        "",
        *rows,
        "",
        f"## {PARALLEL} identical requests at once",
        "",
        f"{PARALLEL_MOCK['tokens']} tokens, {PARALLEL_MOCK['itl_ms']} ms apart.",
        "",
        "| upstream requests | coalesced | hits | misses | identical streams | all done (ms) |",
        "|---:|---:|---:|---:|:---:|---:|",
        f"| {upstream_count} | {served['coalesced']} | {served['hit']} | {served['miss']} "
        f"| {'yes' if identical else 'NO'} | {together_seconds * 1000:,.0f} |",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=HERE / "cache.md")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tokenrelay-cache-bench-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        mock_port, relay_port = free_port(), free_port()
        mock_url, relay_url = f"http://127.0.0.1:{mock_port}", f"http://127.0.0.1:{relay_port}"
        stack.enter_context(
            process(
                tokenrelay_command("mock-upstream", "--port", str(mock_port)),
                mock_url + "/v1/models",
                workdir / "mock.log",
            )
        )
        serve = ("serve", "--port", str(relay_port), "--upstream", mock_url + "/v1")
        stack.enter_context(
            process(
                tokenrelay_command(*serve, "--log-level", "warning"),
                relay_url + "/readyz",
                workdir / "tokenrelay.log",
            )
        )
        timings = asyncio.run(hit_against_miss(relay_url))
        upstream_requests(mock_url, reset=True)
        together, together_seconds = asyncio.run(identical_together(relay_url))
        upstream_count = upstream_requests(mock_url)
    table = report(timings, together, together_seconds, upstream_count)
    print(table)
    options.output.write_text(table)
    if upstream_count != 1:
        print(
            f"{PARALLEL} identical requests reached the upstream {upstream_count} times",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
