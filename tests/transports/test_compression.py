"""Content codings: Accept-Encoding negotiation, and compressed streams a client decodes event by
event, with the decoders clients use (zlib, brotli, zstandard)."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import brotli  # type: ignore[import-untyped]
import pytest
import zstandard

from tokenrelay.events import Event, EventType
from tokenrelay.transports.compression import (
    ENCODINGS,
    choose_encoding,
    compress_body,
    open_stream_compressor,
)
from tokenrelay.transports.sse import SSE_HEARTBEAT, NativeSSERenderer

OURS = ["zstd", "br", "gzip"]


@pytest.mark.parametrize(
    ("accept_encoding", "offered", "chosen"),
    [
        pytest.param(None, OURS, None, id="no-header"),
        pytest.param("", OURS, None, id="empty-header"),
        pytest.param("identity", OURS, None, id="identity-only"),
        pytest.param("deflate", OURS, None, id="none-we-offer"),
        pytest.param("gzip", OURS, "gzip", id="gzip"),
        pytest.param("GZip", OURS, "gzip", id="case-insensitive"),
        pytest.param("x-gzip", OURS, "gzip", id="x-gzip-is-gzip"),
        pytest.param("gzip, deflate, br", OURS, "br", id="openai-sdk"),
        pytest.param("gzip, deflate, br, zstd", OURS, "zstd", id="httpx"),
        pytest.param("gzip, deflate, br, zstd", ["gzip", "br"], "gzip", id="our-order-on-ties"),
        pytest.param("*", OURS, "zstd", id="wildcard"),
        pytest.param("*;q=0", OURS, None, id="wildcard-refused"),
        pytest.param("zstd;q=0, *", OURS, "br", id="refusal-wins-over-wildcard"),
        pytest.param("gzip;q=0, br;q=0, zstd;q=0", OURS, None, id="all-refused"),
        pytest.param("gzip;q=0.001", OURS, "gzip", id="smallest-weight-accepts"),
        pytest.param("gzip;q=0.000", OURS, None, id="zero-with-decimals-refuses"),
        pytest.param("gzip;q=1, br;q=0.5", OURS, "gzip", id="client-weight-first"),
        pytest.param(" gzip ; Q=0.8 ,br;q=0.8", OURS, "br", id="spaces-and-equal-weights"),
        pytest.param("gzip;q=abc, br", OURS, "br", id="malformed-weight-ignored"),
        pytest.param("gzip;q=1.5", OURS, None, id="weight-above-one-ignored"),
        pytest.param("gzip;q=0.5;level=1", OURS, "gzip", id="other-parameters"),
        pytest.param("br, br;q=0", OURS, "br", id="first-mention-counts"),
        pytest.param("identity;q=0", OURS, None, id="identity-refused-still-identity"),
        pytest.param(",,gzip,,", OURS, "gzip", id="empty-elements"),
        pytest.param("gzip, br, zstd", [], None, id="compression-off"),
    ],
)
def test_accept_encoding_negotiation(
    accept_encoding: str | None, offered: list[str], chosen: str | None
) -> None:
    assert choose_encoding(accept_encoding, offered) == chosen


Decode = Callable[[bytes], bytes]


def incremental_decoder(encoding: str) -> tuple[Decode, Callable[[], bool]]:
    """A client's decoder: bytes in as they arrive, text out, and whether the body has ended."""
    if encoding == "gzip":
        gzip = zlib.decompressobj(wbits=31)
        return gzip.decompress, lambda: gzip.eof
    if encoding == "br":
        br = brotli.Decompressor()
        return br.process, br.is_finished
    zstd = zstandard.ZstdDecompressor().decompressobj()
    return zstd.decompress, lambda: zstd.eof


def token_stream(tokens: int) -> list[bytes]:
    renderer = NativeSSERenderer()
    events = [Event(1, EventType.RUN_STARTED, {"run_id": "run_1", "model": "m"})]
    events += [
        Event(2 + i, EventType.MESSAGE_DELTA, {"index": 0, "content": f"word{i % 7} \u2713"})
        for i in range(tokens)
    ]
    events.append(Event(2 + tokens, EventType.RUN_COMPLETED, {}))
    return [renderer.render((event,)) for event in events]


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_every_event_is_decodable_as_soon_as_it_arrives(encoding: str) -> None:
    compressor = open_stream_compressor(encoding)
    assert compressor.encoding == encoding
    decode, finished = incremental_decoder(encoding)
    chunks = [*token_stream(200), SSE_HEARTBEAT]
    compressed_size = 0
    for chunk in chunks:
        compressed = compressor.compress(chunk)
        compressed_size += len(compressed)
        # What arrived so far decodes to exactly what was sent: nothing waits for later bytes.
        assert decode(compressed) == chunk
        assert not finished()
    assert decode(compressor.finish()) == b""
    assert finished()
    # Flushing after every event still pays: the frames repeat.
    assert compressed_size < sum(map(len, chunks)) / 2


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_an_empty_stream_is_a_complete_body(encoding: str) -> None:
    decode, finished = incremental_decoder(encoding)
    assert decode(open_stream_compressor(encoding).finish()) == b""
    assert finished()


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_streams_are_independent(encoding: str) -> None:
    """Two responses compressing at once never share state."""
    first, second = open_stream_compressor(encoding), open_stream_compressor(encoding)
    decode_first, _ = incremental_decoder(encoding)
    decode_second, _ = incremental_decoder(encoding)
    for chunk in token_stream(20):
        assert decode_first(first.compress(chunk)) == chunk
        assert decode_second(second.compress(chunk + b": x\n\n")) == chunk + b": x\n\n"


@pytest.mark.parametrize(
    ("encoding", "decompress"),
    [
        ("gzip", lambda body: zlib.decompress(body, wbits=31)),
        ("br", brotli.decompress),
        ("zstd", lambda body: zstandard.ZstdDecompressor().decompress(body)),
    ],
)
def test_a_whole_body_round_trips(encoding: str, decompress: Decode) -> None:
    body = b'{"choices":[{"message":{"content":"%s"}}]}' % (b"tok " * 500)
    compressed = compress_body(body, encoding)
    assert len(compressed) < len(body) / 10
    assert decompress(compressed) == body


def test_unknown_codings_are_refused() -> None:
    with pytest.raises(ValueError, match="deflate"):
        open_stream_compressor("deflate")
    with pytest.raises(ValueError, match="compress"):
        compress_body(b"x", "compress")
