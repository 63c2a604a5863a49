"""HTTP and WebSocket routes: one module per resource, under the versioned ``/v1`` router."""

from __future__ import annotations

from fastapi import APIRouter

from . import chat, health, models, runs, ws


def build_router() -> APIRouter:
    v1 = APIRouter(prefix="/v1")
    v1.include_router(chat.router)
    v1.include_router(models.router)
    v1.include_router(runs.router)
    v1.include_router(ws.router)
    root = APIRouter()
    root.include_router(health.router)
    root.include_router(v1)
    return root
