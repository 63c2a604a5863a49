"""The authenticated caller of a request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the tenant owns every run, cache entry and limit the request touches.

    ``subject`` names the caller in logs (an API key's name, a token's ``sub``), never a secret.
    """

    tenant: str
    subject: str
    method: Literal["open", "api_key", "jwt"]
    scopes: frozenset[str] = field(default_factory=frozenset)
