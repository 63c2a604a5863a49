"""What a benchmark run does: the target, the bound, the load shape and the request bodies.

Everything is validated here, before a single connection is opened, so that a typo in a flag is an
error message and not a run that hammers the wrong server or never stops.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

import orjson

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_PROMPT",
    "DEFAULT_REQUESTS",
    "MAX_DURATION",
    "BenchConfig",
    "StreamFormat",
    "load_request_mix",
]

DEFAULT_MODEL: Final = "mock-model"
DEFAULT_PROMPT: Final = "Write one short sentence about the sea."
DEFAULT_REQUESTS: Final = 100  # the bound when neither a request count nor a duration is given
MAX_DURATION: Final = 3600.0  # a load generator left running by mistake must still stop


class StreamFormat(StrEnum):
    """The wire format spoken: the OpenAI chunks or tokenrelay's native run events."""

    OPENAI = "openai"
    NATIVE = "native"


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """One benchmark run.

    Args:
        url: Base URL of the server, with or without a trailing ``/v1``.
        concurrency: Streams open at the same time (one worker each).
        requests: Streams to complete in total. With ``duration`` unset too, 100.
        duration: Seconds after which no new stream starts (at most one hour).
        format: ``openai`` (``/v1/chat/completions``) or ``native`` (``/v1/runs``).
        model: The ``model`` of every request.
        prompt: The single user message of every request.
        max_tokens: ``max_tokens`` of every request, if set.
        mock: The ``mock`` object of every request, to drive the mock upstream.
        api_key: Sent as ``Authorization: Bearer``.
        ramp: New workers started per second; None starts them all at once.
        request_mix: Extra body fields per request, used round-robin; empty for none.
        slow_reader: Bytes per second each stream is read at most, to test backpressure.
        timeout: Seconds one stream may take from request to end.
    """

    url: str
    concurrency: int = 10
    requests: int | None = None
    duration: float | None = None
    format: StreamFormat = StreamFormat.OPENAI
    model: str = DEFAULT_MODEL
    prompt: str = DEFAULT_PROMPT
    max_tokens: int | None = None
    mock: Mapping[str, Any] | None = None
    api_key: str | None = field(default=None, repr=False)
    ramp: float | None = None
    request_mix: tuple[Mapping[str, Any], ...] = ()
    slow_reader: int | None = None
    timeout: float = 300.0

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"the URL must start with http:// or https://, got {self.url!r}")
        _at_least("concurrency", self.concurrency, 1)
        if self.requests is not None:
            _at_least("requests", self.requests, 1)
        if self.duration is not None and not 0 < self.duration <= MAX_DURATION:
            raise ValueError(f"duration must be more than 0 and at most {MAX_DURATION:g} seconds")
        if self.max_tokens is not None:
            _at_least("max_tokens", self.max_tokens, 1)
        if self.ramp is not None and not self.ramp > 0:
            raise ValueError("ramp must be more than 0 connections per second")
        if self.slow_reader is not None:
            _at_least("slow_reader", self.slow_reader, 1)
        if not self.timeout > 0:
            raise ValueError("timeout must be more than 0 seconds")
        if self.mock is not None and not isinstance(self.mock, Mapping):
            raise ValueError("mock must be a JSON object")
        for line, extra in enumerate(self.request_mix, start=1):
            if not isinstance(extra, Mapping):
                raise ValueError(f"request mix entry {line} is not a JSON object")

    @property
    def request_bound(self) -> int | None:
        """Streams to complete: as given, or the default when no other bound is set."""
        if self.requests is None and self.duration is None:
            return DEFAULT_REQUESTS
        return self.requests

    @property
    def base_url(self) -> str:
        """The URL without a trailing ``/`` or ``/v1``: endpoints are appended to it."""
        base = self.url.rstrip("/")
        return base.removesuffix("/v1")

    @property
    def endpoint(self) -> str:
        path = "/v1/chat/completions" if self.format is StreamFormat.OPENAI else "/v1/runs"
        return self.base_url + path

    def headers(self) -> dict[str, str]:
        """Request headers; identity encoding so that bytes counted are bytes on the wire."""
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        headers["Accept-Encoding"] = "identity"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def bodies(self) -> list[bytes]:
        """The encoded request bodies, one per mix entry: encoded once, not per request."""
        base: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": self.prompt}],
        }
        if self.format is StreamFormat.OPENAI:
            base["stream"] = True
        if self.max_tokens is not None:
            base["max_tokens"] = self.max_tokens
        if self.mock is not None:
            base["mock"] = dict(self.mock)
        return [orjson.dumps({**base, **extra}) for extra in self.request_mix or ({},)]

    def to_dict(self) -> dict[str, Any]:
        """The settings as reported with the results; the API key is never included."""
        return {
            "url": self.url,
            "endpoint": self.endpoint,
            "format": str(self.format),
            "concurrency": self.concurrency,
            "requests": self.request_bound,
            "duration": self.duration,
            "model": self.model,
            "max_tokens": self.max_tokens,
            "mock": dict(self.mock) if self.mock is not None else None,
            "ramp": self.ramp,
            "request_mix": len(self.request_mix),
            "slow_reader": self.slow_reader,
            "timeout": self.timeout,
        }


def load_request_mix(path: Path) -> tuple[dict[str, Any], ...]:
    """Read a JSONL file of extra body fields, one object a line; blank lines are skipped.

    Raises:
        ValueError: a line is not a JSON object, or the file has none.
    """
    entries: list[dict[str, Any]] = []
    with path.open("rb") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc})") from None
            if not isinstance(entry, dict):
                raise ValueError(f"{path}:{number}: each line must be a JSON object")
            entries.append(entry)
    if not entries:
        raise ValueError(f"{path}: no requests in the file")
    return tuple(entries)


def _at_least(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be at least {minimum}")
