"""Smaller stream payloads over real HTTP: compressed streams a client decodes event by event, the
compact native encoding byte for byte, and coalesced deltas whose ids stay resume cursors.

Coalescing is made deterministic with a window far longer than any test: a held delta then goes
out only when another event, the size limit or the end of the run sends it, never by the clock.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from typing import Any

import brotli  # type: ignore[import-untyped]
import httpx
import openai
import orjson
import pytest
import zstandard

from tests.conftest import GatewayFactory

MESSAGES: list[Any] = [{"role": "user", "content": "Say some words."}]
FRAME = re.compile(rb"(?:id: (\d+)\n)?event: ([a-z_.]+)\ndata: ([^\n]*)\n\n")
IDENTITY = {"Accept-Encoding": "identity"}
# Held deltas wait for another event, the size limit or the end: never for the clock.
HOLD_FOREVER = "600000"

Frame = tuple[int | None, str, dict[str, Any]]


def run_body(**mock: Any) -> dict[str, Any]:
    return {"model": "mock-model", "messages": MESSAGES, "mock": mock}


def tokens(n: int, start: int = 0) -> str:
    return "".join(f"tok{i} " for i in range(start, n))


def parse_frames(raw: bytes) -> list[Frame]:
    """SSE frames; heartbeats (comments) are skipped, every other byte must belong to a frame."""
    raw = raw.replace(b": heartbeat\n\n", b"")
    frames: list[Frame] = []
    position = 0
    for match in FRAME.finditer(raw):
        assert match.start() == position, f"unexpected bytes: {raw[position : match.start()]!r}"
        position = match.end()
        seq = int(match.group(1)) if match.group(1) else None
        frames.append((seq, match.group(2).decode(), orjson.loads(match.group(3))))
    assert position == len(raw), f"trailing bytes: {raw[position:]!r}"
    return frames


def text_of(frames: list[Frame]) -> str:
    return "".join(data.get("content", "") for _, kind, data in frames if kind == "message.delta")


def deltas(frames: list[Frame]) -> list[str]:
    return [data["content"] for _, kind, data in frames if kind == "message.delta"]


class Decoder:
    """A client's incremental decoder for one content coding."""

    def __init__(self, encoding: str) -> None:
        if encoding == "gzip":
            gzip = zlib.decompressobj(wbits=31)
            self.feed: Callable[[bytes], bytes] = gzip.decompress
            self.finished: Callable[[], bool] = lambda: gzip.eof
        elif encoding == "br":
            br = brotli.Decompressor()
            self.feed, self.finished = br.process, br.is_finished
        else:
            zstd = zstandard.ZstdDecompressor().decompressobj()
            self.feed, self.finished = zstd.decompress, lambda: zstd.eof


@pytest.fixture
def plain_url(gateway_factory: GatewayFactory, mock_url: str) -> str:
    """A gateway that never coalesces: one frame per event."""
    return gateway_factory(TOKENRELAY_STREAM__COALESCE_NATIVE_MS="0").url


@pytest.fixture
def holding_url(gateway_factory: GatewayFactory, mock_url: str) -> str:
    """A gateway that holds deltas until something else sends them, with fast heartbeats."""
    return gateway_factory(
        TOKENRELAY_STREAM__COALESCE_NATIVE_MS=HOLD_FOREVER,
        TOKENRELAY_STREAM__COALESCE_OPENAI_MS=HOLD_FOREVER,
        TOKENRELAY_SERVER__HEARTBEAT_INTERVAL="0.2",
    ).url


# Compression


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_each_event_is_decodable_while_the_stream_is_still_open(
    holding_url: str, encoding: str
) -> None:
    """The upstream stalls after two tokens; the client still reads the first token and the
    heartbeats, compressed, long before the run ends (it ends only when the test cancels it)."""
    decoder = Decoder(encoding)
    received = b""
    with (
        httpx.Client(timeout=20) as client,
        client.stream(
            "POST",
            holding_url + "/v1/runs",
            json=run_body(tokens=5, stall_after=2),
            headers={"Accept-Encoding": encoding},
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-encoding"] == encoding
        assert response.headers["vary"].lower() == "accept-encoding"
        assert "content-length" not in response.headers
        pieces = response.iter_raw()
        for piece in pieces:
            received += decoder.feed(piece)
            if b": heartbeat\n\n" in received:
                break
        frames = parse_frames(received)
        # Open: the second token is held, and no terminal event has been written.
        assert [kind for _, kind, _ in frames] == ["run.started", "message.delta", "message.delta"]
        assert deltas(frames) == ["", "tok0 "]
        run_id = response.headers["x-run-id"]
        cancelled = client.post(f"{holding_url}/v1/runs/{run_id}/cancel")
        assert cancelled.status_code == 200
        for piece in pieces:
            received += decoder.feed(piece)
    assert decoder.finished()
    frames = parse_frames(received)
    assert text_of(frames) == tokens(2)
    assert frames[-1][1:] == ("run.cancelled", {"reason": "cancelled"})


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
@pytest.mark.parametrize("accept", ["text/event-stream", "application/x-ndjson"])
def test_a_compressed_stream_carries_the_same_bytes(
    plain_url: str, encoding: str, accept: str
) -> None:
    identity = httpx.post(
        plain_url + "/v1/runs", json=run_body(tokens=40), headers={**IDENTITY, "Accept": accept}
    )
    decoder = Decoder(encoding)
    with httpx.stream(
        "POST",
        plain_url + "/v1/runs",
        json=run_body(tokens=40),
        headers={"Accept-Encoding": encoding, "Accept": accept},
    ) as response:
        assert response.headers["content-encoding"] == encoding
        raw = b"".join(response.iter_raw())
    decoded = decoder.feed(raw)
    assert decoder.finished()
    assert len(raw) < len(decoded) / 2
    # Identical but for the ids of the run and of the upstream's response.
    assert _without_ids(decoded) == _without_ids(identity.content)


def _without_ids(body: bytes) -> bytes:
    body = re.sub(rb"run_[0-9a-f]+", b"run_", body)
    body = re.sub(rb'"created":\d+', b'"created":0', body)
    return re.sub(rb"chatcmpl-mock-[0-9a-zA-Z]+", b"chatcmpl", body)


@pytest.mark.parametrize("accept_encoding", [None, "", "identity", "deflate", "gzip;q=0, *;q=0"])
def test_no_compression_unless_the_client_accepts_one_we_offer(
    plain_url: str, accept_encoding: str | None
) -> None:
    with httpx.Client(timeout=10) as client:
        del client.headers["accept-encoding"]  # httpx would send its own
        headers = {} if accept_encoding is None else {"Accept-Encoding": accept_encoding}
        response = client.post(plain_url + "/v1/runs", json=run_body(tokens=3), headers=headers)
    assert response.status_code == 200
    assert "content-encoding" not in response.headers
    assert "vary" not in response.headers
    assert text_of(parse_frames(response.content)) == tokens(3)


def test_compression_can_be_switched_off(gateway_factory: GatewayFactory, mock_url: str) -> None:
    url = gateway_factory(TOKENRELAY_STREAM__COMPRESSION="[]").url
    response = httpx.post(
        url + "/v1/runs", json=run_body(tokens=3), headers={"Accept-Encoding": "gzip"}
    )
    assert "content-encoding" not in response.headers
    assert text_of(parse_frames(response.content)) == tokens(3)


def test_a_default_httpx_client_gets_gzip_and_reads_it(plain_url: str) -> None:
    # httpx asks for gzip, deflate, br and zstd alike: gzip is first in stream.compression.
    response = httpx.post(plain_url + "/v1/runs", json=run_body(tokens=5), timeout=10)
    assert response.headers["content-encoding"] == "gzip"
    assert text_of(parse_frames(response.content)) == tokens(5)


def test_the_clients_preference_wins_over_the_default_order(plain_url: str) -> None:
    response = httpx.post(
        plain_url + "/v1/runs",
        json=run_body(tokens=5),
        headers={"Accept-Encoding": "gzip;q=0.5, zstd"},
        timeout=10,
    )
    assert response.headers["content-encoding"] == "zstd"
    assert text_of(parse_frames(response.content)) == tokens(5)


@pytest.mark.parametrize(
    ("request_body", "status"),
    [
        pytest.param({"model": "mock-model", "messages": "not a list"}, 422, id="invalid"),
        pytest.param(run_body(http_error=400), 400, id="upstream-rejects"),
    ],
)
def test_problem_responses_are_not_compressed(
    plain_url: str, request_body: dict[str, Any], status: int
) -> None:
    for path in ("/v1/runs", "/v1/chat/completions"):
        response = httpx.post(
            plain_url + path, json=request_body, headers={"Accept-Encoding": "gzip, br, zstd"}
        )
        assert response.status_code == status
        assert response.headers["content-type"] == "application/problem+json"
        assert "content-encoding" not in response.headers
        assert response.json()["status"] == status


# The official SDK, which asks for gzip, deflate and br.


def sdk(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="sk-test", max_retries=0)


def test_the_openai_sdk_reads_a_compressed_stream(plain_url: str) -> None:
    raw = sdk(plain_url).chat.completions.with_raw_response.create(
        model="mock-model", messages=MESSAGES, stream=True, extra_body={"mock": {"tokens": 30}}
    )
    assert raw.headers["content-encoding"] == "gzip"
    chunks: list[Any] = list(raw.parse())
    contents = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices]
    # The OpenAI format is not coalesced by default: one chunk per token, as the upstream sent.
    assert contents == ["", *(f"tok{i} " for i in range(30)), None]
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize(("tokens_asked", "compressed"), [(300, True), (3, False)])
def test_the_openai_sdk_reads_a_whole_completion(
    plain_url: str, tokens_asked: int, compressed: bool
) -> None:
    raw = sdk(plain_url).chat.completions.with_raw_response.create(
        model="mock-model", messages=MESSAGES, extra_body={"mock": {"tokens": tokens_asked}}
    )
    # Small answers are not worth a compressor.
    assert (raw.headers.get("content-encoding") == "gzip") is compressed
    completion: Any = raw.parse()
    assert completion.choices[0].message.content == tokens(tokens_asked)


def test_the_openai_sdk_reads_coalesced_chunks(holding_url: str) -> None:
    stream = sdk(holding_url).chat.completions.create(
        model="mock-model", messages=MESSAGES, stream=True, extra_body={"mock": {"tokens": 30}}
    )
    contents = [chunk.choices[0].delta.content for chunk in stream if chunk.choices]
    # The role, the first token at once, then the rest merged into one chunk.
    assert contents == ["", "tok0 ", tokens(30, start=1), None]


# The compact native encoding


def test_native_frames_are_compact(plain_url: str) -> None:
    response = httpx.post(plain_url + "/v1/runs", json=run_body(tokens=2), headers=IDENTITY)
    blocks = response.content.split(b"\n\n")
    assert blocks[1:5] == [
        b'id: 2\nevent: message.delta\ndata: {"role":"assistant","content":""}',
        b'id: 3\nevent: message.delta\ndata: {"content":"tok0 "}',
        b'id: 4\nevent: message.delta\ndata: {"content":"tok1 "}',
        b'id: 5\nevent: message.completed\ndata: {"finish_reason":"stop"}',
    ]
    assert blocks[6:] == [b"id: 7\nevent: run.completed\ndata: {}", b""]
    frames = parse_frames(response.content)
    # run.started carries the ids once, for the whole stream.
    assert {"run_id", "response_id", "model", "created"} <= set(frames[0][2])
    assert frames[0][2]["run_id"] == response.headers["x-run-id"]
    assert frames[5][1] == "usage" and frames[5][2]["completion_tokens"] == 2
    assert all(value is not None for _, _, data in frames for value in data.values())


def test_ndjson_lines_are_compact(plain_url: str) -> None:
    response = httpx.post(
        plain_url + "/v1/runs",
        json=run_body(tokens=1),
        headers={**IDENTITY, "Accept": "application/x-ndjson"},
    )
    lines = response.content.split(b"\n")
    assert lines[1:4] == [
        b'{"seq":2,"type":"message.delta","data":{"role":"assistant","content":""}}',
        b'{"seq":3,"type":"message.delta","data":{"content":"tok0 "}}',
        b'{"seq":4,"type":"message.completed","data":{"finish_reason":"stop"}}',
    ]


def test_tool_call_deltas_leave_out_the_default_choice(plain_url: str) -> None:
    response = httpx.post(plain_url + "/v1/runs", json=run_body(tool_call=True), headers=IDENTITY)
    frames = parse_frames(response.content)
    calls = [data for _, kind, data in frames if kind == "tool_call.delta"]
    assert calls and all(list(data) == ["tool_calls"] for data in calls)
    # The fragments are the upstream's, their own index included.
    assert all(call["index"] == 0 for data in calls for call in data["tool_calls"])
    arguments = "".join(d["tool_calls"][0]["function"].get("arguments", "") for d in calls)
    assert orjson.loads(arguments) == {"city": "Paris", "unit": "celsius"}
    assert ("message.completed", {"finish_reason": "tool_calls"}) in [f[1:] for f in frames]


# Coalescing


def coalesced_run(url: str, **mock: Any) -> tuple[str, list[Frame]]:
    response = httpx.post(url + "/v1/runs", json=run_body(**mock), headers=IDENTITY, timeout=10)
    assert response.status_code == 200
    return response.headers["x-run-id"], parse_frames(response.content)


def test_deltas_merge_into_one_event_whose_id_is_the_last_seq(holding_url: str) -> None:
    _, frames = coalesced_run(holding_url, tokens=30)
    # seq: 1 run.started, 2 role, 3..32 tok0..tok29, 33 message.completed, 34 usage, 35 end.
    assert [(seq, kind) for seq, kind, _ in frames] == [
        (1, "run.started"),
        (2, "message.delta"),
        (3, "message.delta"),
        (32, "message.delta"),
        (33, "message.completed"),
        (34, "usage"),
        (35, "run.completed"),
    ]
    assert deltas(frames) == ["", "tok0 ", tokens(30, start=1)]


def test_the_first_token_is_not_held(holding_url: str) -> None:
    """The upstream stalls after three tokens: the first arrives, the other two are held."""
    with (
        httpx.Client(timeout=20, headers=IDENTITY) as client,
        client.stream(
            "POST", holding_url + "/v1/runs", json=run_body(tokens=9, stall_after=3)
        ) as response,
    ):
        received = b""
        pieces = response.iter_raw()
        for piece in pieces:
            received += piece
            if b'"tok0 "' in received:
                break
        client.post(f"{holding_url}/v1/runs/{response.headers['x-run-id']}/cancel")
        received += b"".join(pieces)
    frames = parse_frames(received)
    assert deltas(frames) == ["", "tok0 ", "tok1 tok2 "]
    # The merged delta's id is the seq of its last token (tok2, seq 5).
    assert [(seq, kind) for seq, kind, _ in frames][2:] == [
        (3, "message.delta"),
        (5, "message.delta"),
        (6, "run.cancelled"),
    ]


def test_merged_text_is_sent_once_it_reaches_max_bytes(
    gateway_factory: GatewayFactory, mock_url: str
) -> None:
    url = gateway_factory(
        TOKENRELAY_STREAM__COALESCE_NATIVE_MS=HOLD_FOREVER,
        TOKENRELAY_STREAM__COALESCE_MAX_BYTES="32",
    ).url
    _, frames = coalesced_run(url, tokens=60)
    merged = deltas(frames)[2:]
    assert "".join(merged) == tokens(60, start=1)
    # Each is sent by the token that takes it to 32 bytes or more (tokens are 5 or 6 bytes).
    assert all(32 <= len(text) < 32 + 6 for text in merged[:-1])
    assert len(merged[-1]) < 32 + 6


@pytest.mark.parametrize("cut", [2, 3, 32, 33, 35])
def test_resuming_after_any_sent_id_loses_nothing_and_repeats_nothing(
    holding_url: str, cut: int
) -> None:
    run_id, frames = coalesced_run(holding_url, tokens=30)
    seen = [frame for frame in frames if frame[0] is not None and frame[0] <= cut]
    assert seen[-1][0] == cut  # a cursor the client really received
    response = httpx.get(
        f"{holding_url}/v1/runs/{run_id}/events",
        headers={**IDENTITY, "Last-Event-ID": str(cut)},
        timeout=10,
    )
    assert response.status_code == 200
    rest = parse_frames(response.content)
    assert all(seq is not None and seq > cut for seq, _, _ in rest)
    everything = seen + rest
    assert text_of(everything) == tokens(30)
    kinds = [kind for _, kind, _ in everything]
    assert kinds.count("run.started") == kinds.count("run.completed") == 1
    assert kinds[-1] == "run.completed"


def test_a_resumed_reader_gets_coalesced_compressed_events(holding_url: str) -> None:
    run_id, _ = coalesced_run(holding_url, tokens=30)
    decoder = Decoder("gzip")
    with httpx.stream(
        "GET",
        f"{holding_url}/v1/runs/{run_id}/events",
        headers={"Accept-Encoding": "gzip", "Last-Event-ID": "1"},
    ) as response:
        assert response.headers["content-encoding"] == "gzip"
        decoded = b"".join(decoder.feed(piece) for piece in response.iter_raw())
    frames = parse_frames(decoded)
    assert [seq for seq, _, _ in frames] == [2, 3, 32, 33, 34, 35]
    assert text_of(frames) == tokens(30)
