"""Route dependencies: the components of the running gateway, from the lifespan state.

They are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in a worker thread,
a thread hop per request.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPBearer

from tokenrelay.errors import UnsupportedMediaType
from tokenrelay.guards import Principal
from tokenrelay.services import Services


async def get_services(request: Request) -> Services:
    services: Services = request.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


# For the OpenAPI document only (they never refuse a request): the Authenticator reads the
# headers itself, with its own errors.
_bearer = HTTPBearer(auto_error=False, description="An API key or a JWT")
_api_key = APIKeyHeader(name="api-key", auto_error=False, description="An API key")


async def get_principal(
    request: Request,
    services: ServicesDep,
    _documented_bearer: Annotated[object, Security(_bearer)] = None,
    _documented_api_key: Annotated[object, Security(_api_key)] = None,
) -> Principal:
    """The caller, from its credentials; raises ``Unauthenticated`` (401) or ``Forbidden``."""
    principal = await services.authenticator.authenticate(request.headers)
    # For the request's log line: who called, never with what.
    request.scope.setdefault("state", {})["tenant"] = principal.tenant
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


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
