"""The one error tree of tokenrelay.

Every failure the gateway knows about is one of these types. Each carries a stable ``code`` (part
of the public protocol), an HTTP ``status`` used when it happens before a stream has started, and a
``retryable`` flag that tells a client whether trying again may help.

```
TokenRelayError
├── RequestError                 400 bad_request               the client sent something we refuse
│   ├── InvalidJSON              400 invalid_json
│   ├── ValidationFailed         422 validation_failed (field-level ``errors``)
│   ├── BodyTooLarge             413 body_too_large
│   ├── NotAcceptable            406 not_acceptable
│   ├── UnsupportedMediaType     415 unsupported_media_type
│   ├── NotFound                 404 not_found
│   ├── EventsLost               410 events_lost               the cursor is before the kept window
│   ├── MethodNotAllowed         405 method_not_allowed
│   ├── RequestTimeout           408 request_timeout           the head or body came too slowly
│   ├── HeadersTooLarge          431 headers_too_large
│   ├── Unauthenticated          401 missing_credentials | invalid_credentials
│   │                                | expired_credentials
│   ├── Forbidden                403 forbidden | insufficient_scope | origin_not_allowed
│   └── RateLimited              429 rate_limited              a tenant's limit (requests, tokens,
│                                                              concurrent streams)
├── UpstreamError                the model server failed us (502/503/504 before a stream)
│   ├── UpstreamUnreachable      502 upstream_unreachable      connect refused, DNS, reset
│   ├── UpstreamHTTPError        502 upstream_error            5xx after the retries
│   ├── UpstreamRejected         4xx upstream_rejected         the upstream refused the request
│   ├── UpstreamOverloaded       503 upstream_overloaded       429 after the retries
│   ├── UpstreamTimeout          504 connect_timeout | first_token_timeout | idle_timeout
│   │                                | total_timeout
│   ├── UpstreamDisconnected     502 upstream_disconnected     the stream ended early
│   ├── UpstreamMalformed        502 upstream_malformed        not SSE, not JSON, wrong shape
│   └── UpstreamStreamError      502 upstream_stream_error     an error chunk mid-stream
├── AgentError                   500 agent_error               the Python agent raised or misbehaved
├── ServiceUnavailable           503 shutting_down | overloaded
│   └── StoreUnavailable         503 store_unavailable         the run store (Redis) is unreachable
└── InternalError                500 internal_error            a bug; details only in the log
```

Foreign exceptions (aiohttp, redis, JSON decoders, pydantic) are translated into these at the
boundary where they occur, with ``raise ... from exc``. They become HTTP responses in
``api/problems.py`` and terminal ``run.failed`` events in ``runs/hub.py``, nowhere else (a reader
whose store fails mid-stream gets its ``run.failed`` from ``api/streaming.py``).
"""

from __future__ import annotations

from typing import Any, ClassVar


class TokenRelayError(Exception):
    """Base of every error tokenrelay raises on purpose."""

    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False
    title: ClassVar[str] = "Internal error"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    def instance_code(self) -> str:
        """The code of this instance; subclasses with several codes override it."""
        return self.code

    def instance_status(self) -> int:
        return self.status

    def to_failure(self) -> dict[str, Any]:
        """The payload of a ``run.failed`` event."""
        return {"code": self.instance_code(), "message": self.message, "retryable": self.retryable}


class RequestError(TokenRelayError):
    code = "bad_request"
    status = 400
    title = "Bad request"


class InvalidJSON(RequestError):
    code = "invalid_json"
    status = 400
    title = "Request body is not valid JSON"


class ValidationFailed(RequestError):
    code = "validation_failed"
    status = 422
    title = "Request failed validation"

    def __init__(self, message: str, errors: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.errors = errors


class BodyTooLarge(RequestError):
    code = "body_too_large"
    status = 413
    title = "Request body too large"


class NotAcceptable(RequestError):
    code = "not_acceptable"
    status = 406
    title = "No acceptable response format"


class UnsupportedMediaType(RequestError):
    code = "unsupported_media_type"
    status = 415
    title = "Unsupported media type"


class NotFound(RequestError):
    code = "not_found"
    status = 404
    title = "Not found"


class EventsLost(RequestError):
    """A reader asked for events that are no longer kept (the run's log was trimmed)."""

    code = "events_lost"
    status = 410
    title = "Events no longer available"


class MethodNotAllowed(RequestError):
    code = "method_not_allowed"
    status = 405
    title = "Method not allowed"


class RequestTimeout(RequestError):
    code = "request_timeout"
    status = 408
    title = "Request not received in time"


class HeadersTooLarge(RequestError):
    """The request's line and headers exceed ``server.max_header_bytes``."""

    code = "headers_too_large"
    status = 431
    title = "Request header fields too large"


class Unauthenticated(RequestError):
    """No credentials, or credentials that prove nothing; the detail never says which check failed.

    Answered with 401 and a ``WWW-Authenticate`` challenge (RFC 6750).
    """

    code = "invalid_credentials"
    status = 401
    title = "Authentication required"
    CODES: ClassVar[frozenset[str]] = frozenset(
        {"missing_credentials", "invalid_credentials", "expired_credentials"}
    )

    def __init__(self, message: str, *, code: str = "invalid_credentials") -> None:
        if code not in self.CODES:
            raise ValueError(f"unknown authentication code {code!r}")
        super().__init__(message)
        self._code = code

    def instance_code(self) -> str:
        return self._code

    def challenge(self) -> str:
        """The ``WWW-Authenticate`` value: RFC 6750 adds an error only when a token was sent."""
        if self._code == "missing_credentials":
            return 'Bearer realm="tokenrelay"'
        return 'Bearer realm="tokenrelay", error="invalid_token"'


class Forbidden(RequestError):
    """Authenticated, but not allowed to do this (a missing scope, a browser origin refused)."""

    code = "forbidden"
    status = 403
    title = "Forbidden"

    def __init__(self, message: str, *, code: str = "forbidden") -> None:
        super().__init__(message)
        self._code = code

    def instance_code(self) -> str:
        return self._code


class RateLimited(RequestError):
    """A tenant is over one of its limits; ``headers`` say which and when to come back."""

    code = "rate_limited"
    status = 429
    retryable = True
    title = "Rate limit exceeded"

    def __init__(
        self, message: str, *, retry_after: float, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        self.headers = headers or {}


class UpstreamError(TokenRelayError):
    status = 502
    title = "Upstream error"


class UpstreamUnreachable(UpstreamError):
    code = "upstream_unreachable"
    retryable = True
    title = "Upstream unreachable"


class UpstreamHTTPError(UpstreamError):
    code = "upstream_error"
    retryable = True
    title = "Upstream returned an error"


class UpstreamRejected(UpstreamError):
    """The upstream answered 4xx (not 429): its status is relayed, the request was at fault."""

    code = "upstream_rejected"
    title = "Upstream rejected the request"

    def __init__(self, message: str, *, upstream_status: int) -> None:
        super().__init__(message)
        self.upstream_status = upstream_status

    def instance_status(self) -> int:
        return self.upstream_status


class UpstreamOverloaded(UpstreamError):
    code = "upstream_overloaded"
    status = 503
    retryable = True
    title = "Upstream is rate limiting"


class UpstreamTimeout(UpstreamError):
    status = 504
    retryable = True
    title = "Upstream timed out"
    CODES: ClassVar[frozenset[str]] = frozenset(
        {"connect_timeout", "first_token_timeout", "idle_timeout", "total_timeout"}
    )

    def __init__(self, message: str, *, which: str) -> None:
        if which not in self.CODES:
            raise ValueError(f"unknown timeout kind {which!r}")
        super().__init__(message)
        self.which = which

    def instance_code(self) -> str:
        return self.which


class UpstreamDisconnected(UpstreamError):
    code = "upstream_disconnected"
    retryable = True
    title = "Upstream closed the stream early"


class UpstreamMalformed(UpstreamError):
    code = "upstream_malformed"
    retryable = True
    title = "Upstream sent a malformed stream"


class UpstreamStreamError(UpstreamError):
    code = "upstream_stream_error"
    retryable = True
    title = "Upstream reported an error mid-stream"


class AgentError(TokenRelayError):
    """The Python agent raised, or yielded something it may not; details only in the log."""

    code = "agent_error"
    status = 500
    title = "The agent failed"


class ServiceUnavailable(TokenRelayError):
    code = "overloaded"
    status = 503
    retryable = True
    title = "Service unavailable"

    def __init__(
        self, message: str, *, code: str = "overloaded", retry_after: float | None = None
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        self._code = code

    def instance_code(self) -> str:
        return self._code


class StoreUnavailable(ServiceUnavailable):
    """The run store cannot be reached: no run can start or go on until it is back."""

    code = "store_unavailable"
    title = "Run store unavailable"

    def __init__(self, message: str, *, retry_after: float | None = 1.0) -> None:
        super().__init__(message, code="store_unavailable", retry_after=retry_after)


class InternalError(TokenRelayError):
    code = "internal_error"
    status = 500
    title = "Internal error"


class EndOfStream(Exception):
    """Control flow, never shown to a client: a run's log is sealed and read to its end."""
