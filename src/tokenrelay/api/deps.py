"""Route dependencies: the components of the running gateway, from the lifespan state."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from tokenrelay.services import Services


def get_services(request: Request) -> Services:
    services: Services = request.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]
