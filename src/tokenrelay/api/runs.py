"""``POST /v1/runs``: a run streamed as native tokenrelay events (SSE or NDJSON)."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse

from tokenrelay.errors import NotAcceptable, ValidationFailed
from tokenrelay.events import EVENT_SCHEMA_VERSION
from tokenrelay.runs.subscription import Subscription
from tokenrelay.services import Services
from tokenrelay.transports import StreamRenderer
from tokenrelay.transports.compression import choose_encoding
from tokenrelay.transports.ndjson import NDJSONRenderer
from tokenrelay.transports.sse import NativeSSERenderer

from .deps import JSONBody, PrincipalDep, ServicesDep
from .launch import launch_run
from .problems import PROBLEM_RESPONSES, RUN_START_HEADERS, problem_doc
from .schemas import RunRequest, check_limits
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
            **RUN_START_HEADERS,
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
    completion: RunRequest,
    request: Request,
    services: ServicesDep,
    principal: PrincipalDep,
    accept: Annotated[str | None, Header()] = None,
) -> RunResponse:
    renderer = choose_renderer(accept)
    check_limits(completion, services.settings.limits)
    body = orjson.loads(await request.body())
    body.pop("detach", None)  # ours, not the upstream's
    launch = await launch_run(
        services,
        principal,
        body,
        detached=completion.detach,
        disconnect_grace=services.settings.runs.disconnect_grace,
        cache_control=request.headers.get("cache-control"),
    )
    return _event_stream(
        launch.subscription,
        renderer,
        services,
        resumed=False,
        headers=launch.headers,
        accept_encoding=request.headers.get("accept-encoding"),
    )


@router.get(
    "/runs/{run_id}",
    summary="A run's status",
    responses={404: problem_doc("No such run, or it has expired")},
)
async def get_run(run_id: str, services: ServicesDep, principal: PrincipalDep) -> dict[str, Any]:
    return (await services.hub.info(run_id, tenant=principal.tenant)).to_dict()


@router.get(
    "/runs/{run_id}/events",
    summary="Stream a run's events from a position (resume)",
    response_model=None,
    response_class=RunResponse,
    status_code=200,
    responses={
        200: _RESPONSES[200],
        404: problem_doc("No such run, or it has expired"),
        406: _RESPONSES[406],
        410: problem_doc("The events after the cursor are no longer kept"),
        422: problem_doc("The cursor is not a whole number"),
    },
)
async def stream_run_events(
    run_id: str,
    request: Request,
    services: ServicesDep,
    principal: PrincipalDep,
    after: Annotated[
        int | None, Query(ge=0, description="Stream the events after this seq.")
    ] = None,
    last_event_id: Annotated[
        str | None,
        Header(description="What a reconnecting EventSource sends; wins over `after`."),
    ] = None,
    accept: Annotated[str | None, Header()] = None,
) -> RunResponse:
    renderer = choose_renderer(accept)
    cursor = _cursor(last_event_id) if last_event_id is not None else after or 0
    subscription = await services.hub.subscribe(run_id, cursor, tenant=principal.tenant)
    return _event_stream(
        subscription,
        renderer,
        services,
        resumed=True,
        accept_encoding=request.headers.get("accept-encoding"),
    )


@router.post(
    "/runs/{run_id}/cancel",
    summary="Cancel a run",
    responses={
        202: {"description": "Another instance drives the run and was asked to cancel it"},
        404: problem_doc("No such run, or it has expired"),
    },
)
async def cancel_run(run_id: str, services: ServicesDep, principal: PrincipalDep) -> JSONResponse:
    info = await services.hub.cancel(run_id, tenant=principal.tenant)
    return JSONResponse(info.to_dict(), status_code=202 if info.status == "running" else 200)


def _cursor(last_event_id: str) -> int:
    if not last_event_id.isdigit():
        raise ValidationFailed(
            "Last-Event-ID must be the seq of an event",
            [{"field": "Last-Event-ID", "message": "not a whole number", "type": "int_parsing"}],
        )
    return int(last_event_id)


def _event_stream(
    subscription: Subscription,
    renderer: StreamRenderer,
    services: Services,
    *,
    resumed: bool,
    headers: dict[str, str] | None = None,
    accept_encoding: str | None = None,
) -> RunResponse:
    stream = services.settings.stream
    return RunResponse(
        subscription,
        renderer,
        heartbeat_interval=services.settings.server.heartbeat_interval,
        send_timeout=services.settings.server.send_timeout,
        headers={"TokenRelay-Event-Version": EVENT_SCHEMA_VERSION, **(headers or {})},
        resumed=resumed,
        encoding=choose_encoding(accept_encoding, stream.compression),
        coalesce_window=stream.coalesce_native_ms / 1000,
        coalesce_max_bytes=stream.coalesce_max_bytes,
    )
