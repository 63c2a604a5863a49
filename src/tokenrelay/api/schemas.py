"""Request schemas: validated once per request, never per token.

Unknown fields are allowed everywhere (``top_k``, ``guided_json``, vendor extensions, the mock's
``mock`` options) and reach the upstream untouched: the gateway forwards the JSON body it received,
not a re-serialisation of these models.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tokenrelay.config import LimitSettings
from tokenrelay.errors import ValidationFailed


class _Open(BaseModel):
    # Strict: the body is forwarded as received, so a "0.7" accepted for a number here would
    # reach the upstream as a string. Extra fields are allowed and forwarded untouched.
    model_config = ConfigDict(extra="allow", strict=True)


class ContentPart(_Open):
    type: str = Field(min_length=1, max_length=64)
    text: str | None = None


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(None, max_length=256)
    tool_call_id: str | None = Field(None, max_length=256)
    tool_calls: list[dict[str, Any]] | None = None


class FunctionDefinition(_Open):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Open):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class StreamOptions(_Open):
    include_usage: bool = False


class ChatCompletionRequest(_Open):
    """An OpenAI chat completion request, as ``/v1/chat/completions`` and ``/v1/runs`` take it."""

    model: str = Field(min_length=1, max_length=256)
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1, le=128)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stop: str | list[str] | None = None
    seed: int | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: str | dict[str, Any] | None = None
    user: str | None = Field(None, max_length=256)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class RunRequest(ChatCompletionRequest):
    """A chat completion request started as a run (``POST /v1/runs``)."""

    detach: bool = Field(
        False,
        description="Keep generating to the end when every reader has left; "
        "the events stay readable from /v1/runs/{id}/events. Not sent upstream.",
    )


def check_limits(request: ChatCompletionRequest, limits: LimitSettings) -> None:
    """The configurable limits, checked after the schema.

    Raises:
        ValidationFailed: naming each field over its limit.
    """
    errors = []
    if len(request.messages) > limits.max_messages:
        errors.append(_error("messages", f"at most {limits.max_messages} messages are accepted"))
    if request.n is not None and request.n > limits.max_n:
        errors.append(_error("n", f"n may be at most {limits.max_n}"))
    if isinstance(request.stop, list) and len(request.stop) > 4:
        errors.append(_error("stop", "at most 4 stop sequences are accepted"))
    if _content_chars(request) > limits.max_content_chars:
        errors.append(
            _error("messages", f"message content exceeds {limits.max_content_chars} characters")
        )
    if errors:
        summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        raise ValidationFailed(f"the request is invalid: {summary}", errors)


def _content_chars(request: ChatCompletionRequest) -> int:
    total = 0
    for message in request.messages:
        if isinstance(message.content, str):
            total += len(message.content)
        elif message.content:
            total += sum(len(part.text or "") for part in message.content)
    return total


def _error(field: str, message: str) -> dict[str, str]:
    return {"field": field, "message": message, "type": "limit_exceeded"}
