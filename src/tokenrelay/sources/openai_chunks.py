"""Translate OpenAI ``chat.completion.chunk`` objects into tokenrelay events, and nothing else.

Everything the OpenAI format needs to be rebuilt exactly is kept: the response id, model, creation
time and system fingerprint (in ``run.started``), every delta field (role, content, refusal,
reasoning fields of other vendors), tool-call deltas as sent, finish reasons and usage.
"""

from __future__ import annotations

from typing import Any

from tokenrelay.errors import UpstreamMalformed, UpstreamStreamError
from tokenrelay.events import EventDraft, EventType

_STARTED_FIELDS = ("id", "model", "created", "system_fingerprint", "service_tier")


class ChunkTranslator:
    """Stateful per stream: the first chunk also produces ``run.started``."""

    __slots__ = ("finished_choices", "started")

    def __init__(self) -> None:
        self.started = False
        self.finished_choices = 0

    def translate(self, chunk: Any) -> list[EventDraft]:
        """Events for one decoded chunk.

        Raises:
            UpstreamStreamError: the chunk is an error object.
            UpstreamMalformed: the chunk does not have the shape of a completion chunk.
        """
        if not isinstance(chunk, dict):
            raise UpstreamMalformed("upstream chunk is not a JSON object")
        error = chunk.get("error")
        if error:
            raise UpstreamStreamError(_error_message(error))
        drafts: list[EventDraft] = []
        if not self.started:
            self.started = True
            drafts.append((EventType.RUN_STARTED, started_data(chunk)))
        choices = chunk.get("choices")
        if choices is not None and not isinstance(choices, list):
            raise UpstreamMalformed("upstream chunk has choices that are not a list")
        try:
            for choice in choices or ():
                self._choice(choice, drafts)
        except (AttributeError, TypeError) as exc:
            raise UpstreamMalformed(f"upstream chunk has an unexpected shape: {exc}") from exc
        usage = chunk.get("usage")
        if usage:
            if not isinstance(usage, dict):
                raise UpstreamMalformed("upstream usage is not an object")
            drafts.append((EventType.USAGE, usage))
        return drafts

    def _choice(self, choice: dict[str, Any], drafts: list[EventDraft]) -> None:
        index = choice.get("index", 0)
        delta = choice.get("delta")
        if type(index) is not int:
            raise TypeError("the choice index is not an integer")
        if delta is None:
            delta = {}
        elif not isinstance(delta, dict):
            raise TypeError("the delta is not an object")
        logprobs = choice.get("logprobs")
        if len(delta) == 1 and "content" in delta and logprobs is None:
            # The hot path: a plain text token.
            if delta["content"] is not None:
                drafts.append((EventType.MESSAGE_DELTA, {"index": index, **delta}))
        else:
            fields = {k: v for k, v in delta.items() if v is not None and k != "tool_calls"}
            if logprobs is not None:
                fields["logprobs"] = logprobs
            if fields:
                drafts.append((EventType.MESSAGE_DELTA, {"index": index, **fields}))
            tool_calls = delta.get("tool_calls")
            if tool_calls:
                if not isinstance(tool_calls, list):
                    raise TypeError("tool_calls is not a list")
                drafts.append(
                    (EventType.TOOL_CALL_DELTA, {"index": index, "tool_calls": tool_calls})
                )
        finish_reason = choice.get("finish_reason")
        if finish_reason is not None:
            self.finished_choices += 1
            drafts.append(
                (EventType.MESSAGE_COMPLETED, {"index": index, "finish_reason": finish_reason})
            )


def started_data(chunk: dict[str, Any]) -> dict[str, Any]:
    """The stream-constant fields of a completion chunk (or of a whole completion)."""
    return {"response_id" if k == "id" else k: chunk[k] for k in _STARTED_FIELDS if chunk.get(k)}


def _error_message(error: Any) -> str:
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    return str(error)[:500]
