"""``POST /v1/runs``: a run streamed as native tokenrelay events (SSE or NDJSON)."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Request

from tokenrelay.errors import NotAcceptable
from tokenrelay.events import EVENT_SCHEMA_VERSION
from tokenrelay.transports import StreamRenderer
from tokenrelay.transports.ndjson import NDJSONRenderer
from tokenrelay.transports.sse import NativeSSERenderer

from .deps import JSONBody, ServicesDep
from .problems import PROBLEM_RESPONSES, problem_doc
from .schemas import ChatCompletionRequest, check_limits
from .streaming import RunResponse

router = APIRouter(tags=["runs"])

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The run's events: SSE frames `id: <seq>`, `event: <type>`, "
        "`data: <json>` (default), or one JSON object per line with "
        "`Accept: application/x-ndjson`. Exactly one terminal event ends the stream. "
        "See docs/protocol.md.",
        "content": {
            "text/event-stream": {"schema": {"type": "string"}},
            "application/x-ndjson": {"schema": {"type": "string"}},
        },
        "headers": {
            "X-Run-Id": {"schema": {"type": "string"}, "description": "The run's id"},
            "TokenRelay-Event-Version": {
                "schema": {"type": "string"},
                "description": "Version of the event schema",
            },
        },
    },
    406: problem_doc("Neither text/event-stream nor application/x-ndjson is acceptable"),
    **PROBLEM_RESPONSES,
}


def choose_renderer(accept: str | None) -> StreamRenderer:
    """Content negotiation on ``Accept``; SSE unless the client prefers NDJSON."""
    media_types = [part.split(";")[0].strip().lower() for part in (accept or "").split(",")]
    for media_type in media_types:
        if media_type in ("", "*/*", "text/*", "text/event-stream"):
            return NativeSSERenderer()
        if media_type in ("application/x-ndjson", "application/*"):
            return NDJSONRenderer()
    raise NotAcceptable(
        f"this endpoint streams text/event-stream or application/x-ndjson; Accept was {accept!r}"
    )


@router.post(
    "/runs",
    summary="Start a run and stream its native events",
    response_model=None,
    dependencies=[JSONBody],
    response_class=RunResponse,
    status_code=200,
    responses=_RESPONSES,
)
async def create_run(
    completion: ChatCompletionRequest,
    request: Request,
    services: ServicesDep,
    accept: Annotated[str | None, Header()] = None,
) -> RunResponse:
    renderer = choose_renderer(accept)
    check_limits(completion, services.settings.limits)
    body = orjson.loads(await request.body())
    subscription = await services.hub.start(services.source.stream(body))
    return RunResponse(
        subscription,
        renderer,
        heartbeat_interval=services.settings.server.heartbeat_interval,
        send_timeout=services.settings.server.send_timeout,
        headers={"TokenRelay-Event-Version": EVENT_SCHEMA_VERSION},
    )
