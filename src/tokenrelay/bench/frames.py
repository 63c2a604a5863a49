"""Count tokens and find the end of a response stream, as cheaply as the client can.

The client must not be the bottleneck when it measures a gateway at tens of thousands of chunks a
second, so a chunk carrying text is recognised with one bytes search and is never JSON-decoded.
Only the rare other frames (role, finish, usage, errors, terminal events) are decoded. JSON keys
cannot be faked by content: a quote inside a string value is always escaped.

Parsers are pure: bytes in, counts and outcome out, no I/O, so tests can feed them any split.
"""

from __future__ import annotations

from typing import Any, Final, Protocol

import orjson

from tokenrelay.bench.config import StreamFormat

__all__ = [
    "NativeFrameParser",
    "OpenAIFrameParser",
    "StreamParser",
    "http_failure_code",
    "parser_for",
]

_CONTENT_KEY: Final = b'"content":"'
_CONTENT_VALUE_AT: Final = len(_CONTENT_KEY)
_QUOTE: Final = b'"'
_DONE: Final = b"[DONE]"
_NATIVE_DELTA: Final = b"event: message.delta\n"
_MAX_FRAME: Final = 1024 * 1024  # an unfinished frame beyond this is not a token stream
# Delta fields whose text is generated output: a chunk with any of them non-empty is a token.
_TOKEN_FIELDS: Final = ("content", "reasoning_content", "reasoning", "refusal")
MALFORMED: Final = "malformed"


class StreamParser(Protocol):
    """Reads one response body: ``feed`` returns the tokens in the frames completed by ``data``.

    ``finished`` turns true at the stream's terminal frame; ``failure`` is then the failure code,
    or None for a stream that ended properly. Bytes fed after the end are ignored.
    """

    finished: bool
    failure: str | None

    def feed(self, data: bytes) -> int: ...


class _SSEFrames:
    """Splits a body into SSE blocks on blank lines, keeping the unfinished tail."""

    __slots__ = ("_tail", "failure", "finished")

    def __init__(self) -> None:
        self._tail = b""
        self.finished = False
        self.failure: str | None = None

    def _blocks(self, data: bytes) -> list[bytes]:
        buffer = self._tail + data if self._tail else data
        if b"\r" in buffer:  # CRLF servers; a pair split across reads is rejoined here too
            buffer = buffer.replace(b"\r\n", b"\n")
        blocks = buffer.split(b"\n\n")
        self._tail = blocks.pop()
        return blocks

    def feed(self, data: bytes) -> int:
        """Tokens in ``data``: the common text frame by a byte search, the rest decoded."""
        if self.finished:
            return 0
        tokens = 0
        for block in self._blocks(data):
            text_tokens = self._text_tokens(block)
            if text_tokens:
                tokens += text_tokens
                continue
            tokens += self._slow_frame(block)
            if self.finished:
                return tokens
        self._check_tail()
        return tokens

    def _text_tokens(self, block: bytes) -> int:
        """The tokens of a plain text frame found by a byte search; 0: decode it."""
        at = block.find(_CONTENT_KEY)
        return int(at >= 0 and not block.startswith(_QUOTE, at + _CONTENT_VALUE_AT))

    def _slow_frame(self, block: bytes) -> int:
        raise NotImplementedError

    def _check_tail(self) -> None:
        """Keep memory bounded whatever the server sends: a frame has a maximum size."""
        if len(self._tail) > _MAX_FRAME and not self.finished:
            self._tail = b""
            self._fail(MALFORMED)

    def _fail(self, code: str) -> None:
        self.finished = True
        self.failure = code


class OpenAIFrameParser(_SSEFrames):
    """``chat.completion.chunk`` frames: a token is a chunk with text; ``[DONE]`` ends well."""

    __slots__ = ()

    def _slow_frame(self, block: bytes) -> int:
        payload = _data_of(block)
        if payload is None:
            return 0  # a comment (heartbeat) or a frame without data
        if payload == _DONE:
            self.finished = True
            return 0
        chunk = _decode(payload)
        if chunk is None:
            self._fail(MALFORMED)
            return 0
        error = chunk.get("error")
        if error:
            self._fail(_error_code(error, "stream_error"))
            return 0
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return 0
        for choice in choices:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if isinstance(delta, dict) and (_has_text(delta) or delta.get("tool_calls")):
                return 1
        return 0


class NativeFrameParser(_SSEFrames):
    """tokenrelay run events: a token is a ``message.delta`` with text or a ``tool_call.delta``.

    ``run.completed`` ends well; ``run.failed`` ends with its code; ``run.cancelled`` with
    ``cancelled``.
    """

    __slots__ = ("_last_id",)

    def __init__(self) -> None:
        super().__init__()
        self._last_id = 0

    def _text_tokens(self, block: bytes) -> int:
        # A text delta the gateway merged (stream.coalesce_native_ms) carries the id of the last
        # delta it holds: it stands for as many tokens as ids it skips.
        previous = self._last_id
        if block.startswith(b"id: "):
            seq = block[4 : block.find(b"\n")]
            if seq.isdigit():
                self._last_id = int(seq)
        if _NATIVE_DELTA in block and super()._text_tokens(block):
            return max(1, self._last_id - previous)
        return 0

    def _slow_frame(self, block: bytes) -> int:
        event = b""
        for line in block.split(b"\n"):
            if line.startswith(b"event:"):
                event = line[6:].strip()
                break
        if event == b"tool_call.delta":
            return 1
        if event == b"run.completed":
            self.finished = True
        elif event == b"run.cancelled":
            self._fail("cancelled")
        elif event in (b"message.delta", b"run.failed"):
            data = _decode(_data_of(block) or b"")
            if data is None:
                self._fail(MALFORMED)
            elif event == b"run.failed":
                self._fail(_error_code(data, "run_failed"))
            elif _has_text(data):
                return 1
        return 0


def parser_for(format: StreamFormat) -> StreamParser:
    """A fresh parser for one stream of ``format``."""
    if format is StreamFormat.NATIVE:
        return NativeFrameParser()
    return OpenAIFrameParser()


def http_failure_code(status: int, body: bytes) -> str:
    """``http_<status>``, plus ``:<code>`` when a problem+json or OpenAI error body names one."""
    document = _decode(body)
    code = None
    if document is not None:
        code = document.get("code")
        error = document.get("error")
        if not code and isinstance(error, dict):
            code = error.get("code")
    if isinstance(code, str) and code:
        return f"http_{status}:{code}"
    return f"http_{status}"


def _data_of(block: bytes) -> bytes | None:
    """The data of an SSE block: its ``data:`` lines joined, one leading space removed."""
    lines = [line[5:] for line in block.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(line[1:] if line.startswith(b" ") else line for line in lines)


def _decode(payload: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _has_text(fields: dict[str, Any]) -> bool:
    return any(isinstance(fields.get(key), str) and fields[key] for key in _TOKEN_FIELDS)


def _error_code(error: object, default: str) -> str:
    """The stable code of an error object (``code``, else ``type``), or ``default``."""
    if isinstance(error, dict):
        for key in ("code", "type"):
            value = error.get(key)
            if isinstance(value, str | int) and not isinstance(value, bool) and value != "":
                return str(value)
    return default
