"""A Python agent as a run source: an async generator function becomes a streaming model.

The agent yields text (plain ``str`` or ``text()``), tool calls, status updates and usage; this
module turns them into the same events an OpenAI-compatible upstream produces, so every transport
(native SSE and NDJSON, OpenAI chunks, whole completions) serves an agent exactly as it serves a
model. Anything the agent raises that is not a ``TokenRelayError`` becomes ``agent_error`` with a
generic message: the exception's text may hold secrets, so it goes to the log, never to the wire.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import orjson
import structlog

from tokenrelay.errors import AgentError, TokenRelayError
from tokenrelay.events import EventDraft, EventType

logger = structlog.get_logger("tokenrelay.agent")


@dataclass(frozen=True, slots=True)
class AgentRequest:
    """What an agent is asked: one chat completion request.

    Args:
        model: the model the client asked for.
        messages: the conversation, as OpenAI messages (``role``, ``content``, ``tool_calls``,
            ``tool_call_id``, …), already validated.
        body: the whole request body as received, for ``tools``, ``temperature`` and custom
            fields. Shared with the gateway: read it, do not change it.
    """

    model: str
    messages: list[dict[str, Any]]
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Text:
    """A piece of the answer's text; yielding a plain ``str`` is the same."""

    delta: str


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One complete tool call."""

    name: str
    arguments: str
    id: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of a tool call: with a ``name`` it starts a call, without it continues the last."""

    arguments: str
    name: str | None = None
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Status:
    """A progress update, shown on native streams and left out of the OpenAI format."""

    message: str
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of the generation."""

    prompt_tokens: int
    completion_tokens: int


AgentEvent: TypeAlias = str | Text | ToolCall | ToolCallDelta | Status | Usage
"""What an agent may yield."""

Agent: TypeAlias = Callable[[AgentRequest], AsyncIterator[AgentEvent]]
"""An agent: an async generator function (or any callable returning an async iterator)."""


def text(delta: str) -> Text:
    """A piece of the answer's text (``yield "..."`` is shorthand for ``yield text("...")``).

    Args:
        delta: the text to append to the answer; an empty string sends nothing.
    """
    if not isinstance(delta, str):
        raise TypeError(f"text() takes a str, not {type(delta).__name__}")
    return Text(delta)


def tool_call(name: str, arguments: str, *, id: str | None = None) -> ToolCall:
    """A complete call of the tool ``name``; it ends the answer with ``finish_reason``
    ``"tool_calls"`` unless text follows it.

    Args:
        name: the function's name, as in the request's ``tools``.
        arguments: the arguments as a JSON string, sent exactly as given.
        id: the call's id, which the client echoes as ``tool_call_id`` in the tool's answer;
            ``call_<random hex>`` when omitted.
    """
    if not name or not isinstance(name, str):
        raise ValueError("tool_call() needs the tool's name")
    if not isinstance(arguments, str):
        raise TypeError(
            f"tool_call() takes arguments as a JSON str, not {type(arguments).__name__}"
        )
    return ToolCall(name, arguments, id or _new_call_id())


def tool_call_delta(
    arguments: str = "", *, name: str | None = None, id: str | None = None
) -> ToolCallDelta:
    """A piece of a tool call, for agents that stream a call's arguments as they produce them.

    Args:
        arguments: the next piece of the arguments' JSON string.
        name: given, this delta starts a new call of that tool; omitted, it continues the last.
        id: the new call's id (only with ``name``); ``call_<random hex>`` when omitted.
    """
    if not isinstance(arguments, str):
        raise TypeError(f"tool_call_delta() takes a str, not {type(arguments).__name__}")
    if name is None:
        if id is not None:
            raise ValueError("tool_call_delta() takes an id only with the name that starts a call")
        return ToolCallDelta(arguments)
    if not name:
        raise ValueError("tool_call_delta() needs a non-empty name to start a call")
    return ToolCallDelta(arguments, name, id or _new_call_id())


def status(message: str, /, **fields: Any) -> Status:
    """A progress update (``run.status`` ``{"status": message, **fields}``) for native clients.

    Args:
        message: a short human-readable status, such as ``"searching the web"``.
        **fields: extra JSON-serialisable data for the event, such as ``step=2``.
    """
    if not isinstance(message, str):
        raise TypeError(f"status() takes a str message, not {type(message).__name__}")
    if "status" in fields:
        raise ValueError("status() sends its message as 'status'; name the field otherwise")
    return Status(message, fields)


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    """The generation's token counts, sent once after the answer (the last one yielded wins).

    Args:
        prompt_tokens: tokens read.
        completion_tokens: tokens written.
    """
    for name, value in (("prompt_tokens", prompt_tokens), ("completion_tokens", completion_tokens)):
        if type(value) is not int or value < 0:
            raise ValueError(f"usage() needs {name} as a non-negative int, not {value!r}")
    return Usage(prompt_tokens, completion_tokens)


class AgentSource:
    """Serves an agent as a source: the Hub drives it like any upstream.

    Args:
        agent: the agent; called once per run with an ``AgentRequest``.
        name: the model name ``GET /v1/models`` lists.
    """

    def __init__(self, agent: Agent, name: str = "agent") -> None:
        if not callable(agent):
            raise TypeError(f"the agent must be callable, not {type(agent).__name__}")
        if not name:
            raise ValueError("the agent needs a non-empty name")
        self._agent = agent
        self._name = name
        self._created = int(time.time())

    @property
    def name(self) -> str:
        return self._name

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[EventDraft]:
        """The events of one run of the agent for the chat completion request ``body``.

        ``run.started`` comes at once, before the agent's first event, so the client gets its
        response headers (and heartbeats) while the agent is still thinking.
        """
        request = AgentRequest(
            model=str(body.get("model", "")), messages=body.get("messages") or [], body=body
        )
        yield (
            EventType.RUN_STARTED,
            {
                "response_id": "chatcmpl-" + secrets.token_hex(12),
                "model": request.model,
                "created": int(time.time()),
            },
        )
        yield (EventType.MESSAGE_DELTA, {"index": 0, "role": "assistant", "content": ""})
        translator = _Translator()
        events = self._start(request)
        try:
            while True:
                try:
                    item = await anext(events)
                except StopAsyncIteration:
                    break
                except TokenRelayError:
                    raise
                except Exception as exc:
                    raise self._failed() from exc
                if type(item) is str:  # the hot path: a text token
                    if item:
                        translator.ends_with_tool_call = False
                        yield (EventType.MESSAGE_DELTA, {"index": 0, "content": item})
                    continue
                for draft in translator.translate(item):
                    yield draft
        finally:
            if isinstance(events, AsyncGenerator):
                # Closed at once, not by the garbage collector, so its ``finally`` runs now.
                await events.aclose()
        finish_reason = "tool_calls" if translator.ends_with_tool_call else "stop"
        yield (EventType.MESSAGE_COMPLETED, {"index": 0, "finish_reason": finish_reason})
        if translator.usage is not None:
            yield (EventType.USAGE, translator.usage)

    async def list_models(self) -> dict[str, Any]:
        """One model, named after the agent."""
        model = {"id": self._name, "object": "model", "created": self._created}
        return {"object": "list", "data": [{**model, "owned_by": "tokenrelay"}]}

    def _start(self, request: AgentRequest) -> AsyncIterator[AgentEvent]:
        try:
            events = self._agent(request)
        except TokenRelayError:
            raise
        except Exception as exc:
            raise self._failed() from exc
        if not isinstance(events, AsyncIterator):
            close = getattr(events, "close", None)
            if close is not None:
                close()  # a coroutine never awaited would warn
            raise AgentError(
                f"the agent returned {type(events).__name__}, not an async iterator: write it as "
                "an async generator function (async def with yield)"
            )
        return events

    def _failed(self) -> AgentError:
        """Log the agent's exception with its traceback; the client gets only a generic error."""
        logger.exception("agent_failed", agent=self._name)
        return AgentError("the agent failed")


class _Translator:
    """Everything but plain text into drafts; remembers what the finish reason depends on."""

    __slots__ = ("_calls", "ends_with_tool_call", "usage")

    def __init__(self) -> None:
        self._calls = 0  # tool calls started so far: the next call's index
        self.ends_with_tool_call = False
        self.usage: dict[str, int] | None = None  # held back to be sent after the answer

    def translate(self, item: object) -> tuple[EventDraft, ...]:
        if isinstance(item, Text | str):  # str here is a subclass, such as a StrEnum member
            delta = str(item.delta if isinstance(item, Text) else item)
            if not delta:
                return ()
            self.ends_with_tool_call = False
            return ((EventType.MESSAGE_DELTA, {"index": 0, "content": delta}),)
        if isinstance(item, ToolCall):
            return self._tool_call(item.arguments, item.name, item.id)
        if isinstance(item, ToolCallDelta):
            return self._tool_call(item.arguments, item.name, item.id)
        if isinstance(item, Status):
            return ((EventType.RUN_STATUS, _status_data(item)),)
        if isinstance(item, Usage):
            total = item.prompt_tokens + item.completion_tokens
            self.usage = {
                "prompt_tokens": item.prompt_tokens,
                "completion_tokens": item.completion_tokens,
                "total_tokens": total,
            }
            return ()
        raise AgentError(
            f"the agent yielded a {type(item).__name__}; an agent yields str or what text(), "
            "tool_call(), tool_call_delta(), status() and usage() return"
        )

    def _tool_call(
        self, arguments: str, name: str | None, call_id: str | None
    ) -> tuple[EventDraft, ...]:
        """A new call is announced with its id and name, then its arguments follow in pieces."""
        drafts: list[EventDraft] = []
        if name is not None:
            header = {
                "index": self._calls,
                "id": call_id or _new_call_id(),
                "type": "function",
                "function": {"name": name, "arguments": ""},
            }
            self._calls += 1
            drafts.append((EventType.TOOL_CALL_DELTA, {"index": 0, "tool_calls": [header]}))
        elif self._calls == 0:
            raise AgentError(
                "the agent yielded tool_call_delta() without a name before starting a tool call"
            )
        if arguments:
            piece = {"index": self._calls - 1, "function": {"arguments": arguments}}
            drafts.append((EventType.TOOL_CALL_DELTA, {"index": 0, "tool_calls": [piece]}))
        self.ends_with_tool_call = True
        return tuple(drafts)


def _status_data(item: Status) -> dict[str, Any]:
    data = {"status": item.message, **item.fields}
    try:
        orjson.dumps(data)  # checked here: a transport could not encode it mid-stream
    except TypeError as exc:
        raise AgentError(
            f"the agent yielded status({item.message!r}) with fields that are not JSON-serialisable"
        ) from exc
    return data


def _new_call_id() -> str:
    return "call_" + secrets.token_hex(12)
