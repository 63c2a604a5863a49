"""Tokens for the per-tenant limits: an estimate reserved before a run, the real count after it.

No tokenizer: a token is about four characters of English text, and the upstream's own count
replaces the estimate whenever it sends one (a ``usage`` event, with
``stream_options.include_usage``). The estimate only has to be close enough to throttle; what a
run really used is settled when it ends (``MeteredSource``), refunding an unused reservation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, TypeGuard

from tokenrelay.events import EventDraft, EventType

if TYPE_CHECKING:
    from tokenrelay.guards.ratelimit import Admission

CHARS_PER_TOKEN = 4
# What chat formats add around each message (role, separators): OpenAI's cookbook counts 3 to 4.
TOKENS_PER_MESSAGE = 4
# Text fields of a message delta besides content that the model generated too.
_OTHER_DELTA_TEXT = ("refusal", "reasoning_content", "reasoning")
# Looked up once: an enum member lookup per token costs more than the count itself.
_MESSAGE_DELTA = EventType.MESSAGE_DELTA
_TOOL_CALL_DELTA = EventType.TOOL_CALL_DELTA
_USAGE = EventType.USAGE


def prompt_tokens(body: dict[str, Any]) -> int:
    """An estimate of the tokens of a chat request's messages.

    The characters of every message's text (string content, text parts, tool call names and
    arguments) divided by four, rounded up, and ``TOKENS_PER_MESSAGE`` per message. Images and
    other non-text parts are not counted: the upstream's usage, when it reports it, corrects that.
    """
    messages = body.get("messages")
    if not isinstance(messages, list):
        return 0
    chars = 0
    for message in messages:
        if isinstance(message, dict):
            chars += _content_chars(message.get("content")) + _tool_call_chars(message)
    return _tokens(chars) + TOKENS_PER_MESSAGE * len(messages)


def reserve_for(body: dict[str, Any], *, default_max_tokens: int) -> int:
    """Tokens to reserve for a chat request before it runs: its prompt and its longest answer.

    Args:
        body: the request, as the client sent it.
        default_max_tokens: the answer's length when the request sets neither
            ``max_completion_tokens`` nor ``max_tokens`` (``rate_limits.default_max_tokens``).
    """
    completion = default_max_tokens
    for field in ("max_completion_tokens", "max_tokens"):
        value = body.get(field)
        if _positive_int(value):
            completion = value
            break
    choices = body.get("n")
    return prompt_tokens(body) + completion * (choices if _positive_int(choices) else 1)


class MeteredSource(AsyncIterator[EventDraft]):
    """A run's source that counts the tokens it produces and settles its Admission at the end.

    Every event passes through unchanged. The count is the ``total_tokens`` of a ``usage`` event
    when there is one; otherwise ``prompt_tokens`` and the generated text (message and tool-call
    deltas) at four characters a token. A source never started (closed before the run began)
    used nothing.

    The Admission is settled once, however the run ends: the source is exhausted, raises, is
    cancelled (a client that left: what it was sent so far counts), or is closed with
    ``aclose()``, which the Hub calls on every source, started or not. That is why this is a
    class and not an async generator, whose ``finally`` never runs if it was never started.

    Args:
        source: the events of the run.
        admission: what the tenant's limits let through for it.
        prompt_tokens: the estimate of the prompt, ``prompt_tokens(body)``.
    """

    __slots__ = ("_admission", "_chars", "_prompt_tokens", "_source", "_started", "_usage")

    def __init__(
        self, source: AsyncIterator[EventDraft], admission: Admission, prompt_tokens: int
    ) -> None:
        self._source = source
        self._admission = admission
        self._prompt_tokens = prompt_tokens
        self._chars = 0
        self._usage: int | None = None
        self._started = False

    @property
    def used_tokens(self) -> int:
        """The tokens the run has used so far, as it will be settled."""
        if self._usage is not None:
            return self._usage
        if not self._started:
            return 0
        return self._prompt_tokens + _tokens(self._chars)

    def __aiter__(self) -> MeteredSource:
        return self

    async def __anext__(self) -> EventDraft:
        self._started = True
        try:
            draft = await self._source.__anext__()
        except BaseException:  # exhausted, failed or cancelled: the run ends either way
            await self._admission.settle(self.used_tokens)
            raise
        kind, data = draft
        # The hot path, once per token: a type check, a lookup and an integer add.
        if kind is _MESSAGE_DELTA:
            content = data.get("content")
            if isinstance(content, str):
                self._chars += len(content)
            if len(data) > 2:  # more than index and content: a first or unusual delta
                self._chars += _other_delta_chars(data)
        elif kind is _TOOL_CALL_DELTA:
            self._chars += _tool_call_chars(data)
        elif kind is _USAGE:
            total = data.get("total_tokens")
            if _positive_int(total):
                self._usage = total
        return draft

    async def aclose(self) -> None:
        """Close the source (releasing its upstream connection), then settle."""
        try:
            close = getattr(self._source, "aclose", None)
            if close is not None:
                await close()
        finally:
            await self._admission.settle(self.used_tokens)


def _tokens(chars: int) -> int:
    return -(-chars // CHARS_PER_TOKEN)


def _positive_int(value: object) -> TypeGuard[int]:
    return type(value) is int and value > 0


def _content_chars(content: object) -> int:
    """Characters of a message's content: a string, or a list of parts of which text counts."""
    if isinstance(content, str):
        return len(content)
    chars = 0
    if isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(text := part.get("text"), str):
                chars += len(text)
    return chars


def _tool_call_chars(holder: dict[str, Any]) -> int:
    """Characters of the function names and arguments in ``holder["tool_calls"]``."""
    calls = holder.get("tool_calls")
    chars = 0
    if isinstance(calls, list):
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                for field in ("name", "arguments"):
                    text = function.get(field)
                    if isinstance(text, str):
                        chars += len(text)
    return chars


def _other_delta_chars(data: dict[str, Any]) -> int:
    chars = 0
    for field in _OTHER_DELTA_TEXT:
        text = data.get(field)
        if isinstance(text, str):
            chars += len(text)
    return chars
