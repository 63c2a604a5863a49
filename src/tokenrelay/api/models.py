"""``GET /v1/models``: the models of the source (the upstream's, relayed)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from .deps import ServicesDep
from .problems import PROBLEM_RESPONSES

router = APIRouter(tags=["openai"])


@router.get(
    "/models",
    summary="List the upstream's models (OpenAI-compatible)",
    responses=PROBLEM_RESPONSES,
)
async def list_models(services: ServicesDep) -> dict[str, Any]:
    return await services.source.list_models()
