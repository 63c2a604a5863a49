"""The stream parsers of ``tokenrelay bench``: tokens, ends and failure codes from raw bytes."""

from __future__ import annotations

import orjson
import pytest

from tokenrelay.bench.config import StreamFormat
from tokenrelay.bench.frames import (
    NativeFrameParser,
    OpenAIFrameParser,
    StreamParser,
    http_failure_code,
    parser_for,
)

PREFIX = b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":'


def chunk(delta: dict[str, object], finish_reason: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return PREFIX + orjson.dumps([choice]) + b"}\n\n"


def native(seq: int, event: str, data: dict[str, object]) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (seq, event.encode(), orjson.dumps(data))


OPENAI_STREAM = (
    chunk({"role": "assistant", "content": ""})
    + b"".join(chunk({"content": f"tok{i} "}) for i in range(3))
    + chunk({"content": 'a "quoted" "content":"x" text'})
    + b": heartbeat\n\n"
    + chunk({"reasoning_content": "thinking"})
    + chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]})
    + chunk({}, finish_reason="stop")
    + PREFIX
    + b'[],"usage":{"completion_tokens":6}}\n\n'
    + b"data: [DONE]\n\n"
)
# As the gateway sends it: compact data, without the first choice's index.
NATIVE_STREAM = (
    native(1, "run.started", {"run_id": "run_1"})
    + native(2, "message.delta", {"role": "assistant", "content": ""})
    + b"".join(native(3 + i, "message.delta", {"content": f"t{i}"}) for i in range(3))
    + b": heartbeat\n\n"
    + native(6, "tool_call.delta", {"tool_calls": []})
    + native(7, "message.completed", {"finish_reason": "stop"})
    + native(8, "run.completed", {})
)


def feed_in_pieces(parser: StreamParser, body: bytes, size: int) -> int:
    return sum(parser.feed(body[i : i + size]) for i in range(0, len(body), size))


@pytest.mark.parametrize("size", [1, 2, 7, 64, 10_000])
@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
def test_openai_tokens_and_end_whatever_the_reads(size: int, crlf: bool) -> None:
    body = OPENAI_STREAM.replace(b"\n", b"\r\n") if crlf else OPENAI_STREAM
    parser = OpenAIFrameParser()
    assert feed_in_pieces(parser, body, size) == 6
    assert (parser.finished, parser.failure) == (True, None)


@pytest.mark.parametrize("size", [1, 3, 50, 10_000])
def test_native_tokens_and_end_whatever_the_reads(size: int) -> None:
    parser = NativeFrameParser()
    assert feed_in_pieces(parser, NATIVE_STREAM, size) == 4
    assert (parser.finished, parser.failure) == (True, None)


def test_a_merged_native_delta_counts_every_token_it_holds() -> None:
    """With stream.coalesce_native_ms, one delta stands for the ids it skips."""
    body = (
        native(1, "run.started", {"run_id": "run_1"})
        + native(2, "message.delta", {"role": "assistant", "content": ""})
        + native(3, "message.delta", {"content": "t0 "})
        + native(7, "message.delta", {"content": "t1 t2 t3 t4 "})
        + native(8, "message.completed", {"finish_reason": "stop"})
        + native(9, "run.completed", {})
    )
    parser = NativeFrameParser()
    assert parser.feed(body) == 5
    assert (parser.finished, parser.failure) == (True, None)


def test_openai_error_chunk_ends_with_its_code() -> None:
    parser = OpenAIFrameParser()
    error = {"message": "broke", "type": "tokenrelay_error", "code": "upstream_disconnected"}
    body = chunk({"content": "a"}) + b"data: " + orjson.dumps({"error": error}) + b"\n\n"
    assert parser.feed(body + chunk({"content": "after the end"})) == 1
    assert (parser.finished, parser.failure) == (True, "upstream_disconnected")
    assert parser.feed(b"data: [DONE]\n\n") == 0
    assert parser.failure == "upstream_disconnected"


def test_openai_error_without_code_uses_its_type() -> None:
    parser = OpenAIFrameParser()
    parser.feed(b'data: {"error": {"message": "x", "type": "server_error", "code": null}}\n\n')
    assert parser.failure == "server_error"


def test_openai_chunk_that_is_not_json_is_malformed() -> None:
    parser = OpenAIFrameParser()
    assert parser.feed(b'data: {"id": "broken", this is not json\n\n') == 0
    assert (parser.finished, parser.failure) == (True, "malformed")


def test_openai_body_without_frames_is_not_finished() -> None:
    parser = OpenAIFrameParser()
    assert parser.feed(b'{"object": "chat.completion", "choices": []}') == 0
    assert not parser.finished


@pytest.mark.parametrize(
    ("event", "data", "failure"),
    [
        ("run.failed", {"code": "idle_timeout", "message": "m", "retryable": True}, "idle_timeout"),
        ("run.failed", {"message": "no code"}, "run_failed"),
        ("run.cancelled", {"reason": "shutdown"}, "cancelled"),
    ],
)
def test_native_failures(event: str, data: dict[str, object], failure: str) -> None:
    parser = NativeFrameParser()
    body = native(1, "message.delta", {"content": "a"}) + native(2, event, data)
    assert parser.feed(body) == 1
    assert (parser.finished, parser.failure) == (True, failure)


def test_parser_for_each_format() -> None:
    assert isinstance(parser_for(StreamFormat.OPENAI), OpenAIFrameParser)
    assert isinstance(parser_for(StreamFormat.NATIVE), NativeFrameParser)


@pytest.mark.parametrize(
    ("status", "body", "code"),
    [
        (502, b'{"type":"urn:x","status":502,"code":"upstream_error"}', "http_502:upstream_error"),
        (429, b'{"error":{"code":"rate_limit_exceeded"}}', "http_429:rate_limit_exceeded"),
        (503, b'{"error":{"message":"x","code":null}}', "http_503"),
        (500, b"Internal Server Error", "http_500"),
        (404, b"", "http_404"),
    ],
)  # fmt: skip
def test_http_failure_code(status: int, body: bytes, code: str) -> None:
    assert http_failure_code(status, body) == code


@pytest.mark.parametrize(
    "parser", [OpenAIFrameParser(), NativeFrameParser()], ids=["openai", "native"]
)
def test_a_frame_that_never_ends_is_malformed_not_unbounded(parser: StreamParser) -> None:
    piece = b"x" * 65536
    for _ in range(16):
        assert parser.feed(piece) == 0
    assert not parser.finished
    parser.feed(piece)
    assert (parser.finished, parser.failure) == (True, "malformed")
