"""``POST /v1/chat/completions``: the OpenAI-compatible relay, streamed or whole."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request

from tokenrelay.transports.compression import choose_encoding
from tokenrelay.transports.openai import OpenAIChunkRenderer

from .deps import JSONBody, PrincipalDep, ServicesDep
from .launch import launch_run
from .problems import PROBLEM_RESPONSES, RUN_START_HEADERS
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
        "headers": {
            "X-Run-Id": {"schema": {"type": "string"}, "description": "The run's id"},
            **RUN_START_HEADERS,
        },
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
    completion: ChatCompletionRequest,
    request: Request,
    services: ServicesDep,
    principal: PrincipalDep,
) -> RunResponse:
    check_limits(completion, services.settings.limits)
    # Forward what the client sent, not a re-serialisation: unknown fields pass untouched.
    body = orjson.loads(await request.body())
    launch = await launch_run(
        services,
        principal,
        body,
        detached=False,
        disconnect_grace=services.settings.runs.openai_disconnect_grace,
        cache_control=request.headers.get("cache-control"),
    )
    renderer = OpenAIChunkRenderer(completion.include_usage) if completion.stream else None
    return RunResponse(
        launch.subscription,
        renderer,
        headers=launch.headers,
        heartbeat_interval=services.settings.server.heartbeat_interval,
        send_timeout=services.settings.server.send_timeout,
        encoding=choose_encoding(
            request.headers.get("accept-encoding"), services.settings.stream.compression
        ),
        coalesce_window=services.settings.stream.coalesce_openai_ms / 1000,
        coalesce_max_bytes=services.settings.stream.coalesce_max_bytes,
    )
