"""The components of a running gateway, built by ``app.py`` and handed to the routes."""

from __future__ import annotations

from dataclasses import dataclass

from tokenrelay.cache.answers import AnswerCache
from tokenrelay.config import Settings
from tokenrelay.guards.admission import AdmissionControl
from tokenrelay.guards.auth import Authenticator
from tokenrelay.guards.ratelimit import TenantLimiter
from tokenrelay.runs.hub import Hub
from tokenrelay.sources import Source


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    hub: Hub
    source: Source
    authenticator: Authenticator
    limiter: TenantLimiter
    admission: AdmissionControl
    answers: AnswerCache
