"""``POST /v1/chat/completions``: the OpenAI-compatible relay, streamed or whole."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request

from tokenrelay.transports.openai import OpenAIChunkRenderer

from .deps import JSONBody, ServicesDep
from .problems import PROBLEM_RESPONSES
from .schemas import ChatCompletionRequest, check_limits
from .streaming import RunResponse

router = APIRouter(tags=["openai"])

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A `chat.completion` object, or with `stream: true` a stream of "
        "`chat.completion.chunk` objects as Server-Sent Events ending in `data: [DONE]` "
        '(or in an error chunk `data: {"error": {...}}` if the run fails mid-stream).',
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "text/event-stream": {"schema": {"type": "string"}},
        },
        "headers": {"X-Run-Id": {"schema": {"type": "string"}, "description": "The run's id"}},
    },
    **PROBLEM_RESPONSES,
}


@router.post(
    "/chat/completions",
    summary="Create a chat completion (OpenAI-compatible)",
    response_model=None,
    dependencies=[JSONBody],
    responses=_RESPONSES,
)
async def create_chat_completion(
    completion: ChatCompletionRequest, request: Request, services: ServicesDep
) -> RunResponse:
    check_limits(completion, services.settings.limits)
    # Forward what the client sent, not a re-serialisation: unknown fields pass untouched.
    body = orjson.loads(await request.body())
    subscription = await services.hub.start(
        services.source.stream(body),
        disconnect_grace=services.settings.runs.openai_disconnect_grace,
    )
    renderer = OpenAIChunkRenderer(completion.include_usage) if completion.stream else None
    return RunResponse(
        subscription,
        renderer,
        heartbeat_interval=services.settings.server.heartbeat_interval,
        send_timeout=services.settings.server.send_timeout,
    )
