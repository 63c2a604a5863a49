"""SSEDataParser: data payloads of an upstream's SSE byte stream, however the bytes are split."""

from __future__ import annotations

import itertools
import random

import pytest

from tokenrelay.sources.sse_parser import SSEDataParser

# A stream with every kind of line the parser must handle, with LF line endings.
STREAM = (
    b": keep-alive comment\n\n"
    b'data: {"a":1}\n\n'
    b"event: message\nid: 7\nretry: 1000\ndata: first\ndata:second\n\n"
    b"data:nospace\n\n"
    b"id: 8\n\n"
    b": comment\ndata: after a comment\n\n"
    b"data: h\xc3\xa9llo \xe2\x9c\x93\n\n"  # UTF-8 of "h\u00e9llo \u2713"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    b'{"a":1}',
    b"first\nsecond",
    b"nospace",
    b"after a comment",
    "h\u00e9llo \u2713".encode(),
    b"[DONE]",
]

# Multi-line events are where a line ending split across two reads would matter.
MULTILINE = b"event: delta\ndata: one\ndata: two\n\ndata: three\ndata:\ndata: five\n\n"
MULTILINE_EXPECTED = [b"one\ntwo", b"three\n\nfive"]


def feed_all(parser: SSEDataParser, pieces: list[bytes]) -> list[bytes]:
    payloads: list[bytes] = []
    for piece in pieces:
        payloads.extend(parser.feed(piece))
    return payloads


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[start:end] for start, end in itertools.pairwise(bounds)]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def random_splits(data: bytes, seed: int, trials: int) -> list[list[bytes]]:
    rng = random.Random(seed)
    splits = []
    for _ in range(trials):
        cuts = rng.sample(range(1, len(data)), rng.randint(1, min(12, len(data) - 1)))
        splits.append(split_at(data, cuts))
    return splits


def test_whole_stream_in_one_feed() -> None:
    parser = SSEDataParser()
    assert parser.feed(STREAM) == EXPECTED
    assert parser.pending == b""


def test_stream_fed_one_byte_at_a_time() -> None:
    parser = SSEDataParser()
    assert feed_all(parser, bytewise(STREAM)) == EXPECTED
    assert parser.pending == b""


def test_stream_split_in_two_at_every_byte_boundary() -> None:
    for cut in range(len(STREAM) + 1):
        parser = SSEDataParser()
        assert feed_all(parser, [STREAM[:cut], STREAM[cut:]]) == EXPECTED, cut
        assert parser.pending == b""


def test_stream_in_random_splits_with_a_fixed_seed() -> None:
    for pieces in random_splits(STREAM, seed=20240611, trials=300):
        assert b"".join(pieces) == STREAM
        parser = SSEDataParser()
        assert feed_all(parser, pieces) == EXPECTED, pieces


def test_payloads_are_returned_by_the_feed_that_completes_them() -> None:
    parser = SSEDataParser()
    assert parser.feed(b"data: a") == []
    assert parser.feed(b"\n") == []
    assert parser.feed(b"\ndata: b\n\ndata: c") == [b"a", b"b"]
    assert parser.feed(b"\n\n") == [b"c"]


def test_empty_feed_returns_nothing() -> None:
    parser = SSEDataParser()
    assert parser.feed(b"") == []
    assert parser.feed(b"data: x") == []
    assert parser.feed(b"") == []
    assert parser.pending == b"data: x"


def test_multiline_data_is_joined_with_newlines() -> None:
    assert SSEDataParser().feed(MULTILINE) == MULTILINE_EXPECTED


def test_multiline_data_in_every_two_piece_split() -> None:
    for cut in range(len(MULTILINE) + 1):
        parser = SSEDataParser()
        assert feed_all(parser, [MULTILINE[:cut], MULTILINE[cut:]]) == MULTILINE_EXPECTED, cut


@pytest.mark.parametrize(
    ("frame", "payload"),
    [
        pytest.param(b"data: x\n\n", b"x", id="with-space"),
        pytest.param(b"data:x\n\n", b"x", id="without-space"),
        pytest.param(b"data:  x\n\n", b" x", id="only-one-space-stripped"),
        pytest.param(b"data: a: b\n\n", b"a: b", id="colon-in-value"),
        pytest.param(b"id: 1\ndata:x\n\n", b"x", id="without-space-multiline-path"),
        pytest.param(b"id: 1\ndata:  x\n\n", b" x", id="two-spaces-multiline-path"),
    ],
)
def test_data_field_with_and_without_the_space(frame: bytes, payload: bytes) -> None:
    assert SSEDataParser().feed(frame) == [payload]


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(b": just a comment\n\n", id="comment"),
        pytest.param(b":\n\n", id="bare-colon-comment"),
        pytest.param(b"event: ping\n\n", id="event"),
        pytest.param(b"id: 42\n\n", id="id"),
        pytest.param(b"retry: 3000\n\n", id="retry"),
        pytest.param(b"event: ping\nid: 1\nretry: 5\n: note\n\n", id="all-but-data"),
    ],
)
def test_frames_without_data_produce_nothing(frame: bytes) -> None:
    parser = SSEDataParser()
    assert parser.feed(frame) == []
    assert parser.pending == b""


def test_comment_event_id_and_retry_lines_do_not_change_the_data() -> None:
    frame = b": c1\nevent: x\ndata: one\nid: 9\n: c2\nretry: 10\ndata: two\n\n"
    assert SSEDataParser().feed(frame) == [b"one\ntwo"]


@pytest.mark.parametrize("ending", [b"\r\n", b"\r"], ids=["crlf", "cr"])
def test_crlf_and_cr_line_endings_in_one_feed(ending: bytes) -> None:
    stream = STREAM.replace(b"\n", ending)
    assert SSEDataParser().feed(stream) == EXPECTED


def test_mixed_line_endings_in_one_feed() -> None:
    stream = b"data: a\r\ndata: b\n\r\ndata: c\r\rdata: d\n\n"
    assert SSEDataParser().feed(stream) == [b"a\nb", b"c", b"d"]


def test_cr_line_endings_fed_one_byte_at_a_time() -> None:
    stream = STREAM.replace(b"\n", b"\r")
    parser = SSEDataParser()
    assert feed_all(parser, bytewise(stream)) == EXPECTED


def test_crlf_line_endings_fed_one_byte_at_a_time() -> None:
    stream = STREAM.replace(b"\n", b"\r\n")
    parser = SSEDataParser()
    assert feed_all(parser, bytewise(stream)) == EXPECTED


def test_crlf_line_endings_in_random_splits_with_a_fixed_seed() -> None:
    stream = MULTILINE.replace(b"\n", b"\r\n")
    for pieces in random_splits(stream, seed=7, trials=300):
        parser = SSEDataParser()
        assert feed_all(parser, pieces) == MULTILINE_EXPECTED, pieces


def test_crlf_pair_split_across_two_feeds_is_one_line_ending() -> None:
    # "\r" ends one read and "\n" starts the next: together they are one line break, not a
    # blank line, so the two data lines belong to one event.
    parser = SSEDataParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\ndata: b\r\n\r\n") == [b"a\nb"]


@pytest.mark.parametrize(
    "stream",
    [
        pytest.param(b"hello\n\n", id="bare-word"),
        pytest.param(b'{"choices":[]}\n\n', id="raw-json"),
        pytest.param(b"data: x\nnot sse at all\n\n", id="after-a-data-line"),
        pytest.param(b"datum: x\n\n", id="unknown-field"),
        pytest.param(b"<html>\n<body>oops</body>\n\n", id="html"),
    ],
)
def test_a_non_sse_line_raises_value_error(stream: bytes) -> None:
    with pytest.raises(ValueError, match="not a Server-Sent Events line"):
        SSEDataParser().feed(stream)


def test_a_non_sse_line_raises_only_once_its_frame_is_complete() -> None:
    parser = SSEDataParser()
    assert parser.feed(b"garbage") == []
    with pytest.raises(ValueError):
        parser.feed(b"\n\n")


def test_pending_holds_the_unterminated_event() -> None:
    parser = SSEDataParser()
    assert parser.pending == b""
    parser.feed(b"data: par")
    assert parser.pending == b"data: par"
    parser.feed(b"tial\n")
    assert parser.pending == b"data: partial\n"
    assert parser.feed(b"\ndata: next") == [b"partial"]
    assert parser.pending == b"data: next"
    assert parser.feed(b"\n\n") == [b"next"]
    assert parser.pending == b""


def test_default_size_limit_is_8_mib() -> None:
    assert SSEDataParser.MAX_EVENT_BYTES == 8 * 1024 * 1024


def test_an_unterminated_event_past_the_default_limit_raises() -> None:
    parser = SSEDataParser()
    body = b"data: " + b"x" * (SSEDataParser.MAX_EVENT_BYTES - 6)
    assert parser.feed(body) == []  # exactly at the limit: still accepted
    with pytest.raises(ValueError, match="size limit"):
        parser.feed(b"x")


def test_size_limit_applies_to_an_event_growing_over_several_feeds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(SSEDataParser, "MAX_EVENT_BYTES", 32)
    parser = SSEDataParser()
    for _ in range(3):
        assert parser.feed(b"data: 0123") == []
    assert len(parser.pending) == 30
    assert parser.feed(b"ab") == []  # 32 bytes: at the limit, fine
    with pytest.raises(ValueError, match="size limit"):
        parser.feed(b"c")


def test_size_limit_counts_only_the_unterminated_event(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SSEDataParser, "MAX_EVENT_BYTES", 32)
    parser = SSEDataParser()
    # Many complete events in one read are not one oversized event.
    events = b"".join(b"data: %02d\n\n" % i for i in range(20))
    assert parser.feed(events) == [b"%02d" % i for i in range(20)]
    assert parser.feed(b"data: " + b"y" * 26) == []
    with pytest.raises(ValueError):
        parser.feed(b"y")
