"""tokenrelay: a production-grade response streaming gateway for LLM agents."""

from __future__ import annotations

__version__ = "0.1.0"

from tokenrelay.app import create_app
from tokenrelay.config import Settings, load_settings
from tokenrelay.events import EVENT_SCHEMA_VERSION, Event, EventType
from tokenrelay.sources.agent import (
    Agent,
    AgentEvent,
    AgentRequest,
    status,
    text,
    tool_call,
    tool_call_delta,
    usage,
)

__all__ = [
    "EVENT_SCHEMA_VERSION",
    "Agent",
    "AgentEvent",
    "AgentRequest",
    "Event",
    "EventType",
    "Settings",
    "__version__",
    "create_app",
    "load_settings",
    "status",
    "text",
    "tool_call",
    "tool_call_delta",
    "usage",
]
