"""Stream payload: bytes on the wire per token, events per second and time to first token, for
each stream format, content coding and coalescing setting.

    python benchmarks/payload.py            # under a minute; writes benchmarks/payload.md
    python benchmarks/payload.py --smoke    # seconds; checks the harness, writes nothing

One mock upstream (``tokenrelay mock-upstream``) and two gateways on 127.0.0.1, one coalescing
deltas (10 ms windows for every format) and one not. Each cell of the wire tables is one
1,000-token answer read off a plain socket, so every byte of the body counts (chunked framing
included), and decoded here incrementally, as a client does; the streams of one pacing run at the
same time. Time to first token is measured on short answers, one request at a time. The
compressor figures are measured in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ENCODINGS = ("identity", "gzip", "br", "zstd")
FORMATS = {  # name: (path, Accept)
    "native SSE": ("/v1/runs", "text/event-stream"),
    "NDJSON": ("/v1/runs", "application/x-ndjson"),
    "OpenAI SSE": ("/v1/chat/completions", "text/event-stream"),
}
COALESCE_ENV = {
    "off": {
        "TOKENRELAY_STREAM__COALESCE_NATIVE_MS": "0",
        "TOKENRELAY_STREAM__COALESCE_OPENAI_MS": "0",
    },
    "10 ms": {
        "TOKENRELAY_STREAM__COALESCE_NATIVE_MS": "10",
        "TOKENRELAY_STREAM__COALESCE_OPENAI_MS": "10",
    },
}


@dataclass(frozen=True)
class Plan:
    tokens: int
    pacings_ms: tuple[float, ...]  # inter-token latency of the mock
    ttft_requests: int


FULL = Plan(tokens=1000, pacings_ms=(5.0, 20.0), ttft_requests=100)
SMOKE = Plan(tokens=100, pacings_ms=(2.0,), ttft_requests=10)


@dataclass
class Stream:
    """One answer as the client received it."""

    wire_bytes: int  # the body as sent, chunked framing included
    body_bytes: int
    events: int
    seconds: float  # from the first token to the end
    ttft_ms: float


def decoder_for(encoding: str) -> Callable[[bytes], bytes]:
    import brotli  # type: ignore[import-untyped]
    import zstandard

    if encoding == "identity":
        return lambda data: data
    if encoding == "gzip":
        return zlib.decompressobj(wbits=31).decompress
    if encoding == "br":
        return brotli.Decompressor().process  # type: ignore[no-any-return]
    if encoding == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress
    raise ValueError(f"unexpected Content-Encoding {encoding!r}")


def count_events(body: bytes, accept: str) -> int:
    if accept == "application/x-ndjson":
        return body.count(b"\n") - body.count(b'{"type":"heartbeat"}\n')
    return body.count(b"\n\n") - body.count(b": heartbeat\n\n")


class Dechunker:
    """The body of an HTTP/1.1 chunked response, from the bytes as they arrive."""

    def __init__(self) -> None:
        self._buffer = b""
        self._left = 0  # bytes of the current chunk's data still to come
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        body = b""
        while not self.done:
            if self._left:
                piece = self._buffer[: self._left]
                self._buffer = self._buffer[len(piece) :]
                self._left -= len(piece)
                body += piece
                if self._left:
                    break
            line_end = self._buffer.find(b"\r\n")
            if line_end < 0:
                break
            line, self._buffer = self._buffer[:line_end], self._buffer[line_end + 2 :]
            if line:  # else the line break that ends a chunk's data
                self._left = int(line.split(b";")[0], 16)
                self.done = self._left == 0
        return body


async def read_stream(url: str, form: str, encoding: str, mock: dict[str, Any]) -> Stream:
    """One answer over a connection of its own, counting every byte of the body on the wire."""
    path, accept = FORMATS[form]
    body: dict[str, Any] = {
        "model": "mock-model",
        "messages": [{"role": "user", "content": "hi"}],
        "mock": mock,
    }
    if path.endswith("completions"):
        body["stream"] = True
    payload = json.dumps(body).encode()
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    started = time.perf_counter()
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAccept: {accept}\r\n"
        f"Accept-Encoding: {encoding}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
        + payload
    )
    try:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        if not head.startswith("http/1.1 200") or "transfer-encoding: chunked" not in head:
            raise RuntimeError(f"{form} {encoding}: unexpected answer {head!r}")
        served = "identity"
        for line in head.split("\r\n"):
            if line.startswith("content-encoding:"):
                served = line.split(":", 1)[1].strip()
        if served != encoding:
            raise RuntimeError(f"{form}: asked for {encoding}, got {served}")
        decode, chunks = decoder_for(served), Dechunker()
        first_token_at = None
        wire = 0
        decoded = bytearray()
        while not chunks.done and (data := await reader.read(65536)):
            wire += len(data)
            decoded += decode(chunks.feed(data))
            if first_token_at is None and b"tok0 " in decoded:
                first_token_at = time.perf_counter()
        ended = time.perf_counter()
    finally:
        writer.close()
    if first_token_at is None or f"tok{mock['tokens'] - 1} ".encode() not in decoded:
        raise RuntimeError(f"{form} {encoding}: the answer is incomplete")
    return Stream(
        wire_bytes=wire,
        body_bytes=len(decoded),
        events=count_events(bytes(decoded), accept),
        seconds=ended - first_token_at,
        ttft_ms=(first_token_at - started) * 1000,
    )


async def wire_phase(urls: dict[str, str], plan: Plan) -> dict[tuple[Any, ...], Stream]:
    results: dict[tuple[Any, ...], Stream] = {}
    for itl in plan.pacings_ms:
        keys = [
            (itl, coalescing, form, encoding)
            for coalescing in urls
            for form in FORMATS
            for encoding in ENCODINGS
        ]
        mock = {"tokens": plan.tokens, "itl_ms": itl}
        streams = await asyncio.gather(
            *(read_stream(urls[key[1]], key[2], key[3], mock) for key in keys)
        )
        results.update(zip(keys, streams, strict=True))
        print(f"wire: {len(keys)} streams at {itl:g} ms a token", file=sys.stderr)
    return results


async def ttft_phase(urls: dict[str, str], plan: Plan) -> dict[tuple[str, str], list[float]]:
    results: dict[tuple[str, str], list[float]] = {}
    for coalescing, url in urls.items():
        for encoding in ENCODINGS:
            samples = [
                (await read_stream(url, "native SSE", encoding, {"tokens": 5})).ttft_ms
                for _ in range(plan.ttft_requests)
            ]
            results[coalescing, encoding] = samples
    print("ttft: done", file=sys.stderr)
    return results


def compressor_costs(events: int = 1000, streams: int = 200) -> dict[str, tuple[float, float]]:
    """Per encoding: µs of CPU per compressed event, and KiB of memory per open stream."""
    from tokenrelay.events import Event, EventType
    from tokenrelay.transports.compression import open_stream_compressor
    from tokenrelay.transports.sse import NativeSSERenderer

    renderer = NativeSSERenderer()
    frames = [
        renderer.render(
            [Event(seq, EventType.MESSAGE_DELTA, {"index": 0, "content": f"tok{seq} "})]
        )
        for seq in range(events)
    ]
    costs = {}
    for encoding in ENCODINGS[1:]:
        compressor = open_stream_compressor(encoding)
        started = time.process_time()
        for frame in frames:
            compressor.compress(frame)
        cpu_us = (time.process_time() - started) / events * 1e6
        before = _rss_kib()
        kept = []
        for _ in range(streams):
            kept.append(open_stream_compressor(encoding))
            for frame in frames[:20]:
                kept[-1].compress(frame)
        costs[encoding] = (cpu_us, (_rss_kib() - before) / streams)
        del kept
    return costs


def _rss_kib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1024


def report(
    plan: Plan,
    wire: dict[tuple[Any, ...], Stream],
    ttft: dict[tuple[str, str], list[float]],
    costs: dict[str, tuple[float, float]],
    command: str,
) -> str:
    import brotli
    import zstandard

    import tokenrelay

    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Stream payload",
        "",
        f"Produced by `{command}` on {now}.",
        f"Versions: tokenrelay {tokenrelay.__version__}, python {platform.python_version()}, "
        f"zlib {zlib.ZLIB_RUNTIME_VERSION}, "
        f"brotli {brotli.__version__}, zstandard {zstandard.__version__}, cpus {os.cpu_count()}.",
        "",
        "The mock upstream's tokens look like `tok123 ` (5 to 8 bytes of text). Bytes per token",
        "are every byte of the response body on the socket, HTTP/1.1 chunked framing included,",
        "divided by the tokens of the answer; events are the frames the client decoded",
        "(heartbeats aside), events/s those of one stream. Coalescing merges text deltas",
        "arriving within 10 ms of the first held one; the first token is never held. Native",
        'deltas carried `"index":0,` before the compact encoding: 10 bytes a token more.',
        "",
    ]
    for itl in plan.pacings_ms:
        lines += [
            f"## {plan.tokens:,} tokens at {1000 / itl:g} tokens/s ({itl:g} ms apart)",
            "",
            "| format | coalescing | events | events/s | identity B/token | gzip | br | zstd |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for form in FORMATS:
            for coalescing in COALESCE_ENV:
                base = wire[itl, coalescing, form, "identity"]
                per_token = [
                    wire[itl, coalescing, form, enc].wire_bytes / plan.tokens for enc in ENCODINGS
                ]
                cells = [f"{per_token[0]:.1f}"] + [
                    f"{value:.1f} ({value / per_token[0]:.0%})" for value in per_token[1:]
                ]
                lines.append(
                    f"| {form} | {coalescing} | {base.events:,} | "
                    f"{base.events / base.seconds:,.0f} | " + " | ".join(cells) + " |"
                )
        lines.append("")
    lines += [
        f"## Time to first token, native SSE, {plan.ttft_requests} requests one at a time",
        "",
        "From sending the request to decoding the first token, in ms.",
        "",
        "| coalescing | encoding | p50 | p90 |",
        "|---|---|---|---|",
    ]
    for (coalescing, encoding), samples in ttft.items():
        deciles = statistics.quantiles(samples, n=10)
        lines.append(
            f"| {coalescing} | {encoding} | {statistics.median(samples):.2f} | {deciles[8]:.2f} |"
        )
    lines += [
        "",
        "## Compressors, in process",
        "",
        "CPU per compressed and flushed native delta frame, and memory per open stream (resident",
        "memory of 200 compressors that have each sent 20 frames).",
        "",
        "| encoding | µs per event | KiB per stream |",
        "|---|---|---|",
    ]
    lines += [f"| {enc} | {cpu:.1f} | {kib:.0f} |" for enc, (cpu, kib) in costs.items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds, writes nothing")
    parser.add_argument("--output", type=Path, default=HERE / "payload.md")
    options = parser.parse_args()
    plan = SMOKE if options.smoke else FULL

    from benchmarks.run import free_port, process, tokenrelay_command

    costs = compressor_costs()
    with tempfile.TemporaryDirectory(prefix="tokenrelay-payload-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        mock_port = free_port()
        mock_url = f"http://127.0.0.1:{mock_port}"
        stack.enter_context(
            process(
                tokenrelay_command("mock-upstream", "--port", str(mock_port)),
                mock_url + "/v1/models",
                workdir / "mock.log",
            )
        )
        urls = {}
        for coalescing, env in COALESCE_ENV.items():
            port = free_port()
            urls[coalescing] = f"http://127.0.0.1:{port}"
            args = ["serve", "--port", str(port), "--upstream", mock_url + "/v1"]
            args += ["--log-level", "warning"]
            stack.enter_context(
                process(
                    tokenrelay_command(*args),
                    urls[coalescing] + "/readyz",
                    workdir / f"gw-{port}.log",
                    env,
                )
            )
        wire = asyncio.run(wire_phase(urls, plan))
        ttft = asyncio.run(ttft_phase(urls, plan))
    command = "python benchmarks/payload.py" + (" --smoke" if options.smoke else "")
    text = report(plan, wire, ttft, costs, command)
    print(text)
    if not options.smoke:
        options.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    sys.exit(main())
