"""The components of a running gateway, built by ``app.py`` and handed to the routes."""

from __future__ import annotations

from dataclasses import dataclass

from tokenrelay.config import Settings
from tokenrelay.runs.hub import Hub
from tokenrelay.sources import Source


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    hub: Hub
    source: Source
