"""Sources produce the events of a run: an OpenAI-compatible upstream, or a Python agent."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from tokenrelay.events import EventDraft


class Source(Protocol):
    """What the routes start runs from."""

    def stream(self, body: dict[str, Any]) -> AsyncIterator[EventDraft]:
        """The events of one generation for a chat completion request ``body``.

        Never yields terminal events (the Hub adds exactly one); raises a ``TokenRelayError``
        to fail the run.
        """
        ...

    async def list_models(self) -> dict[str, Any]:
        """An OpenAI ``GET /models`` answer."""
        ...
