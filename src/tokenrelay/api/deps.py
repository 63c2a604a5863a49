"""Route dependencies: the components of the running gateway, from the lifespan state.

They are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in a worker thread,
a thread hop per request.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from tokenrelay.errors import UnsupportedMediaType
from tokenrelay.services import Services


async def get_services(request: Request) -> Services:
    services: Services = request.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def require_json(request: Request) -> None:
    """Bodies must say they are JSON.

    A form-encoded POST is a "simple" cross-site request that browsers send without a CORS
    preflight; refusing it keeps other web pages from starting paid generations.
    """
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise UnsupportedMediaType(
            f"send the request body as application/json (Content-Type was {media_type!r})"
        )


JSONBody = Depends(require_json)
