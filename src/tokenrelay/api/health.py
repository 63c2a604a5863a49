"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from .deps import ServicesDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: the gateway takes new streams",
    responses={503: {"description": "Not taking new streams (shutting down or at capacity)"}},
)
async def readyz(services: ServicesDep) -> JSONResponse:
    hub = services.hub
    load = {"active_runs": hub.active_runs, "pending_starts": hub.pending_starts}
    if not hub.accepting:
        return JSONResponse({"status": "shutting_down", **load}, status_code=503)
    if services.admission.overloaded:
        return JSONResponse({"status": "overloaded", **load}, status_code=503)
    return JSONResponse({"status": "ready", **load})
