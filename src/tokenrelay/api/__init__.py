"""HTTP and WebSocket routes: one module per resource, under the versioned ``/v1`` router."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from . import chat, health, models, runs, ws
from .deps import get_principal


def build_router() -> APIRouter:
    v1 = APIRouter(prefix="/v1")
    # Every HTTP route of /v1 needs a caller; the WebSocket authenticates in its own handshake.
    authenticated = [Depends(get_principal)]
    v1.include_router(chat.router, dependencies=authenticated)
    v1.include_router(models.router, dependencies=authenticated)
    v1.include_router(runs.router, dependencies=authenticated)
    v1.include_router(ws.router)
    root = APIRouter()
    root.include_router(health.router)
    root.include_router(v1)
    return root
