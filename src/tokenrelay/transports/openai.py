"""Events rendered in the OpenAI chat completions format, streamed (chunks) or whole.

A stream reproduces what the upstream sent, as the official SDKs parse it: the same response id,
model, creation time and fingerprint on every chunk, the same deltas, tool-call deltas, finish
reasons and usage (only when the client asked with ``stream_options.include_usage``). A run that
fails or is cancelled ends with an error chunk, ``data: {"error": {...}}``, which the official
Python SDK raises as ``openai.APIError``; a stream never ends silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from tokenrelay.errors import TokenRelayError
from tokenrelay.events import Event, EventType
from tokenrelay.transports.sse import SSE_HEARTBEAT

DONE = b"data: [DONE]\n\n"
_TEXT_CHOICE = b'{"index":%d,"delta":{"content":%s},"logprobs":null,"finish_reason":null}'


def error_object(code: str, message: str, retryable: bool) -> dict[str, Any]:
    """An OpenAI-style error object carrying our stable code."""
    return {"message": message, "type": "tokenrelay_error", "code": code, "retryable": retryable}


class OpenAIChunkRenderer:
    """Stateful per stream: the envelope comes from ``run.started``."""

    media_type = "text/event-stream"
    heartbeat = SSE_HEARTBEAT

    __slots__ = ("_include_usage", "_prefix")

    def __init__(self, include_usage: bool) -> None:
        self._include_usage = include_usage
        self._prefix = b""

    def render(self, events: Sequence[Event]) -> bytes:
        return b"".join([self._render_one(event) for event in events])

    def render_error(self, error: TokenRelayError) -> bytes:
        return _error_frame(error.instance_code(), error.message, error.retryable)

    def _render_one(self, event: Event) -> bytes:
        kind, data = event.type, event.data
        if kind is EventType.MESSAGE_DELTA:
            if len(data) == 2 and "content" in data:  # the hot path: a text token
                content = orjson.dumps(data["content"])
                return self._chunk(_TEXT_CHOICE % (data["index"], content))
            delta = {k: v for k, v in data.items() if k not in ("index", "logprobs")}
            return self._choice(data["index"], delta, logprobs=data.get("logprobs"))
        if kind is EventType.TOOL_CALL_DELTA:
            return self._choice(data["index"], {"tool_calls": data["tool_calls"]})
        if kind is EventType.MESSAGE_COMPLETED:
            return self._choice(data["index"], {}, finish_reason=data["finish_reason"])
        if kind is EventType.USAGE:
            if not self._include_usage:
                return b""
            return self._chunk(b"", b',"usage":' + orjson.dumps(data))
        if kind is EventType.RUN_STARTED:
            self._prefix = _envelope_prefix(data)
            return b""
        if kind is EventType.RUN_COMPLETED:
            return DONE
        if kind is EventType.RUN_FAILED:
            return _error_frame(data["code"], data["message"], data["retryable"])
        if kind is EventType.RUN_CANCELLED:
            return _error_frame("cancelled", f"the run was cancelled ({data['reason']})", True)
        return b""

    def _choice(
        self,
        index: int,
        delta: dict[str, Any],
        *,
        logprobs: Any = None,
        finish_reason: str | None = None,
    ) -> bytes:
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
        }
        return self._chunk(orjson.dumps(choice))

    def _chunk(self, choices: bytes, tail: bytes = b"") -> bytes:
        return b"data: %s[%s]%s}\n\n" % (self._prefix, choices, tail)


def _envelope_prefix(started: dict[str, Any]) -> bytes:
    """``{"id":…,"object":…,…,"choices":`` — everything of a chunk before its choices."""
    envelope = {
        "id": started.get("response_id", started.get("run_id")),
        "object": "chat.completion.chunk",
        "created": started.get("created", 0),
        "model": started.get("model", ""),
    }
    for optional in ("system_fingerprint", "service_tier"):
        if optional in started:
            envelope[optional] = started[optional]
    return orjson.dumps(envelope)[:-1] + b',"choices":'


def _error_frame(code: str, message: str, retryable: bool) -> bytes:
    return b"data: %s\n\n" % orjson.dumps({"error": error_object(code, message, retryable)})


def aggregate_completion(events: Sequence[Event]) -> dict[str, Any]:
    """A whole ``chat.completion`` object from the events of a completed run."""
    started: dict[str, Any] = {}
    choices: dict[int, dict[str, Any]] = {}
    usage: dict[str, Any] | None = None
    for event in events:
        data = event.data
        if event.type is EventType.RUN_STARTED:
            started = data
        elif event.type is EventType.MESSAGE_DELTA:
            message = _choice_slot(choices, data["index"])["message"]
            for key, value in data.items():
                if key == "index" or key == "logprobs":
                    continue
                if isinstance(value, str) and key != "role":
                    message[key] = (message.get(key) or "") + value
                else:
                    message[key] = value
        elif event.type is EventType.TOOL_CALL_DELTA:
            message = _choice_slot(choices, data["index"])["message"]
            _merge_tool_calls(message.setdefault("tool_calls", []), data["tool_calls"])
        elif event.type is EventType.MESSAGE_COMPLETED:
            _choice_slot(choices, data["index"])["finish_reason"] = data["finish_reason"]
        elif event.type is EventType.USAGE:
            usage = data
    completion: dict[str, Any] = {
        "id": started.get("response_id", started.get("run_id")),
        "object": "chat.completion",
        "created": started.get("created", 0),
        "model": started.get("model", ""),
    }
    if "system_fingerprint" in started:
        completion["system_fingerprint"] = started["system_fingerprint"]
    for choice in choices.values():
        message = choice["message"]
        if message.get("tool_calls") and not message["content"]:
            message["content"] = None
    completion["choices"] = [choices[index] for index in sorted(choices)]
    if usage is not None:
        completion["usage"] = usage
    return completion


def _choice_slot(choices: dict[int, dict[str, Any]], index: int) -> dict[str, Any]:
    if index not in choices:
        choices[index] = {
            "index": index,
            "message": {"role": "assistant", "content": None},
            "logprobs": None,
            "finish_reason": None,
        }
    return choices[index]


def _merge_tool_calls(calls: list[dict[str, Any]], deltas: list[dict[str, Any]]) -> None:
    """Accumulate streamed tool-call fragments: names and ids arrive once, arguments in pieces."""
    for delta in deltas:
        position = delta.get("index", len(calls))
        while len(calls) <= position:
            calls.append(
                {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
            )
        call = calls[position]
        if delta.get("id"):
            call["id"] = delta["id"]
        if delta.get("type"):
            call["type"] = delta["type"]
        function = delta.get("function") or {}
        if function.get("name"):
            call["function"]["name"] += function["name"]
        if function.get("arguments"):
            call["function"]["arguments"] += function["arguments"]
