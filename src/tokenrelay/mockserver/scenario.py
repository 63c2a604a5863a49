"""Parse and validate a chat completion request for the mock upstream.

Everything here is pure: the HTTP layer hands over the decoded JSON body and
gets back a frozen description of what to send, or a ``MockOptionError`` that
names the offending field so the 400 response can point at it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

__all__ = [
    "DEFAULTS",
    "DEFAULT_MODEL",
    "DEFAULT_TOOL_ARGUMENTS",
    "DEFAULT_TOOL_NAME",
    "ChatRequest",
    "CompletionPlan",
    "Fault",
    "FaultKind",
    "MockDefaults",
    "MockOptionError",
    "MockScenario",
    "ToolCallSpec",
    "parse_chat_request",
    "parse_mock_options",
    "plan_completion",
]

DEFAULT_MODEL: Final = "mock-model"
DEFAULT_TOOL_NAME: Final = "get_weather"
DEFAULT_TOOL_ARGUMENTS: Final = '{"city": "Paris", "unit": "celsius"}'
_OPTION_KEYS: Final = frozenset(
    {
        "tokens",
        "ttft_ms",
        "itl_ms",
        "tool_call",
        "http_error",
        "http_error_times",
        "scenario",
        "retry_after",
        "drop_after",
        "stall_after",
        "malformed_after",
        "error_after",
    }
)
_TOOL_CALL_KEYS: Final = frozenset({"name", "arguments"})
_TOOL_PIECE: Final = 8  # characters of tool-call arguments per delta


@dataclass(frozen=True, slots=True)
class MockDefaults:
    """Server-wide defaults, used when a request does not override them."""

    tokens: int = 20
    ttft_ms: float = 0
    itl_ms: float = 0
    models: tuple[str, ...] = (DEFAULT_MODEL,)


DEFAULTS: Final = MockDefaults()


class MockOptionError(ValueError):
    """A request field is invalid; ``param`` names it for the error body."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


class FaultKind(StrEnum):
    """How a stream misbehaves once its fault point is reached."""

    DROP = "drop"
    STALL = "stall"
    MALFORMED = "malformed"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Fault:
    """A fault injected after ``after`` content chunks."""

    kind: FaultKind
    after: int


@dataclass(frozen=True, slots=True)
class ToolCallSpec:
    """The single function call streamed instead of text."""

    name: str = DEFAULT_TOOL_NAME
    arguments: str = DEFAULT_TOOL_ARGUMENTS


@dataclass(frozen=True, slots=True)
class MockScenario:
    """Validated ``"mock"`` options with defaults applied."""

    tokens: int = 20
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    tool_call: ToolCallSpec | None = None
    http_error: int | None = None
    http_error_times: int | None = None
    scenario: str | None = None
    retry_after: float | None = None
    drop_after: int | None = None
    stall_after: int | None = None
    malformed_after: int | None = None
    error_after: int | None = None

    @property
    def fault(self) -> Fault | None:
        """The earliest fault; ties go drop, stall, malformed, error."""
        candidates = [
            (after, order, kind)
            for order, (kind, after) in enumerate(
                (
                    (FaultKind.DROP, self.drop_after),
                    (FaultKind.STALL, self.stall_after),
                    (FaultKind.MALFORMED, self.malformed_after),
                    (FaultKind.ERROR, self.error_after),
                )
            )
            if after is not None
        ]
        if not candidates:
            return None
        after, _, kind = min(candidates)
        return Fault(kind=kind, after=after)


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """The parts of a chat completion request the mock reacts to."""

    model: str
    stream: bool
    include_usage: bool
    max_tokens: int | None
    prompt_tokens: int
    mock: MockScenario

    def usage(self, completion_tokens: int) -> dict[str, int]:
        """OpenAI ``usage`` object for ``completion_tokens`` deltas sent."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }


def _int(options: Mapping[str, object], key: str, minimum: int = 0) -> int | None:
    value = options.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MockOptionError(f"mock.{key}", f"mock.{key} must be an integer >= {minimum}")
    return value


def _float(options: Mapping[str, object], key: str) -> float | None:
    value = options.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise MockOptionError(f"mock.{key}", f"mock.{key} must be a number >= 0")
    if value == float("inf"):
        raise MockOptionError(f"mock.{key}", f"mock.{key} must be finite")
    return float(value)


def _tool_call(value: object) -> ToolCallSpec | None:
    if value is None or value is False:
        return None
    if value is True:
        return ToolCallSpec()
    if not isinstance(value, Mapping):
        raise MockOptionError("mock.tool_call", "mock.tool_call must be a boolean or an object")
    for key in value:
        if key not in _TOOL_CALL_KEYS:
            raise MockOptionError(f"mock.tool_call.{key}", f"unknown option mock.tool_call.{key}")
    fields: dict[str, str] = {}
    for key in ("name", "arguments"):
        item = value.get(key)
        if item is None:
            continue
        if not isinstance(item, str):
            raise MockOptionError(f"mock.tool_call.{key}", f"mock.tool_call.{key} must be a string")
        fields[key] = item
    return ToolCallSpec(**fields)


def parse_mock_options(raw: object, defaults: MockDefaults = DEFAULTS) -> MockScenario:
    """Validate the ``"mock"`` object; absent or null means plain defaults."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise MockOptionError("mock", "mock must be an object")
    for key in raw:
        if key not in _OPTION_KEYS:
            raise MockOptionError(f"mock.{key}", f"unknown option mock.{key}")
    http_error = _int(raw, "http_error", minimum=400)
    if http_error is not None and http_error > 599:
        raise MockOptionError("mock.http_error", "mock.http_error must be between 400 and 599")
    scenario = raw.get("scenario")
    if scenario is not None and not isinstance(scenario, str):
        raise MockOptionError("mock.scenario", "mock.scenario must be a string")
    tokens = _int(raw, "tokens")
    ttft_ms = _float(raw, "ttft_ms")
    itl_ms = _float(raw, "itl_ms")
    return MockScenario(
        tokens=defaults.tokens if tokens is None else tokens,
        ttft_ms=float(defaults.ttft_ms) if ttft_ms is None else ttft_ms,
        itl_ms=float(defaults.itl_ms) if itl_ms is None else itl_ms,
        tool_call=_tool_call(raw.get("tool_call")),
        http_error=http_error,
        http_error_times=_int(raw, "http_error_times", minimum=1),
        scenario=scenario,
        retry_after=_float(raw, "retry_after"),
        drop_after=_int(raw, "drop_after"),
        stall_after=_int(raw, "stall_after"),
        malformed_after=_int(raw, "malformed_after"),
        error_after=_int(raw, "error_after"),
    )


def _text_length(content: object) -> int:
    """Characters of a message content: a string or a list of text parts."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, Mapping):
                text = part.get("text")
                if isinstance(text, str):
                    total += len(text)
        return total
    return 0


def _prompt_tokens(messages: object) -> int:
    total = 0
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, Mapping):
                total += _text_length(message.get("content"))
    return max(1, total // 4)


def _max_tokens(body: Mapping[str, object]) -> int | None:
    limits: list[int] = []
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise MockOptionError(key, f"{key} must be an integer >= 0")
        limits.append(value)
    return min(limits) if limits else None


def parse_chat_request(
    body: Mapping[str, object], defaults: MockDefaults = DEFAULTS
) -> ChatRequest:
    """Extract what shapes the response; anything else in the body is ignored."""
    model = body.get("model")
    if model is None:
        model = DEFAULT_MODEL
    elif not isinstance(model, str):
        raise MockOptionError("model", "model must be a string")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise MockOptionError("stream", "stream must be a boolean")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, Mapping):
        raise MockOptionError("stream_options", "stream_options must be an object")
    include_usage = bool(stream_options and stream_options.get("include_usage") is True)
    return ChatRequest(
        model=model,
        stream=bool(stream),
        include_usage=include_usage,
        max_tokens=_max_tokens(body),
        prompt_tokens=_prompt_tokens(body.get("messages")),
        mock=parse_mock_options(body.get("mock"), defaults),
    )


@dataclass(frozen=True, slots=True)
class CompletionPlan:
    """The deltas a request produces once ``max_tokens`` is applied."""

    count: int
    finish_reason: str
    tool_pieces: tuple[str, ...] | None = None

    def text(self, count: int) -> str:
        """The first ``count`` deltas joined: the non-streaming content."""
        if self.tool_pieces is not None:
            return "".join(self.tool_pieces[:count])
        return "".join([f"tok{i} " for i in range(count)])


def plan_completion(chat: ChatRequest) -> CompletionPlan:
    """Text yields ``tokens`` deltas; a tool call yields ~8-character argument pieces."""
    tool = chat.mock.tool_call
    pieces: tuple[str, ...] | None = None
    if tool is not None:
        args = tool.arguments
        pieces = tuple(args[i : i + _TOOL_PIECE] for i in range(0, len(args), _TOOL_PIECE))
        available, natural = len(pieces), "tool_calls"
    else:
        available, natural = chat.mock.tokens, "stop"
    limit = chat.max_tokens
    if limit is not None and limit < available:
        return CompletionPlan(count=limit, finish_reason="length", tool_pieces=pieces)
    return CompletionPlan(count=available, finish_reason=natural, tool_pieces=pieces)
