"""Errors as ``application/problem+json`` (RFC 9457): the one place an error becomes a response."""

from __future__ import annotations

import math
from typing import Any

import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from tokenrelay.errors import (
    InternalError,
    InvalidJSON,
    MethodNotAllowed,
    NotFound,
    RateLimited,
    RequestError,
    TokenRelayError,
    Unauthenticated,
    ValidationFailed,
)

PROBLEM_MEDIA_TYPE = "application/problem+json"

_PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "title", "status", "detail", "code", "retryable"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "code": {"type": "string", "description": "Stable error code, see docs/protocol.md"},
        "retryable": {"type": "boolean"},
        "request_id": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "field": {"type": "string"},
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                },
            },
        },
    },
}


def problem_doc(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {PROBLEM_MEDIA_TYPE: {"schema": _PROBLEM_SCHEMA}},
    }


# OpenAPI documentation of the error answers every route can give.
PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: problem_doc("Invalid JSON or a request the upstream refused"),
    401: problem_doc("Missing or invalid credentials (see `WWW-Authenticate`)"),
    403: problem_doc("The credentials do not allow this"),
    413: problem_doc("Request body too large"),
    415: problem_doc("The body is not sent as application/json"),
    422: problem_doc("Request failed validation; `errors` names each field"),
    429: problem_doc("A tenant limit was reached; see `Retry-After` and `RateLimit`"),
    502: problem_doc("The upstream failed before the stream started"),
    503: problem_doc("The upstream or the gateway is overloaded or shutting down"),
    504: problem_doc("The upstream timed out before the stream started"),
}


# OpenAPI documentation of the headers of every response that starts a run.
RUN_START_HEADERS: dict[str, dict[str, Any]] = {
    "X-Cache": {
        "schema": {"type": "string", "enum": ["hit", "miss", "bypass"]},
        "description": "hit: replayed from the response cache; miss: generated; bypass: the "
        "cache was not consulted (policy or Cache-Control)",
    },
    "X-Coalesced": {
        "schema": {"type": "string"},
        "description": "true when this request joined an identical one already generating",
    },
    "RateLimit": {"schema": {"type": "string"}, "description": "The tenant's nearest limit"},
    "RateLimit-Policy": {"schema": {"type": "string"}, "description": "The tenant's limits"},
}


def problem_body(
    error: TokenRelayError, request_id: str | None = None, status: int | None = None
) -> dict[str, Any]:
    code = error.instance_code()
    body: dict[str, Any] = {
        "type": f"urn:tokenrelay:problem:{code}",
        "title": error.title,
        "status": status or error.instance_status(),
        "detail": error.message,
        "code": code,
        "retryable": error.retryable,
    }
    if isinstance(error, ValidationFailed):
        body["errors"] = error.errors
    if request_id:
        body["request_id"] = request_id
    return body


def problem_headers(error: TokenRelayError) -> dict[str, str]:
    headers = {"Content-Type": PROBLEM_MEDIA_TYPE, "Cache-Control": "no-store"}
    if error.retry_after is not None:
        headers["Retry-After"] = str(math.ceil(error.retry_after))
    if isinstance(error, Unauthenticated):
        headers["WWW-Authenticate"] = error.challenge()
    elif isinstance(error, RateLimited):
        headers.update(error.headers)
    return headers


def problem_response(
    error: TokenRelayError,
    request_id: str | None = None,
    *,
    status: int | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    return Response(
        orjson.dumps(problem_body(error, request_id, status)),
        status_code=status or error.instance_status(),
        headers={**problem_headers(error), **(headers or {})},
    )


def validation_error(exc: RequestValidationError) -> RequestError:
    """FastAPI's validation errors as ours: undecodable JSON is 400, the rest 422 by field."""
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        return InvalidJSON("the request body is not valid JSON")
    fields = [
        {
            "field": ".".join(str(part) for part in e.get("loc", ())[1:]) or "body",
            "message": e.get("msg", "invalid"),
            "type": e.get("type", "value_error"),
        }
        for e in errors
    ]
    summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:5])
    return ValidationFailed(f"the request is invalid: {summary}", fields)


def _request_id(request: Request, error: TokenRelayError) -> str | None:
    """The request's id; also notes the error code for the request log line."""
    state = request.scope.setdefault("state", {})
    state["error_code"] = error.instance_code()
    value = state.get("request_id")
    return value if isinstance(value, str) else None


async def handle_tokenrelay_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TokenRelayError)
    return problem_response(exc, _request_id(request, exc))


async def handle_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    error = validation_error(exc)
    return problem_response(error, _request_id(request, error))


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 answers, in the same problem format."""
    assert isinstance(exc, StarletteHTTPException)
    error: TokenRelayError
    if exc.status_code == 404:
        error = NotFound(f"no route for {request.url.path}")
    elif exc.status_code == 405:
        error = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
    else:
        error = RequestError(str(exc.detail))
    return problem_response(
        error,
        _request_id(request, error),
        status=exc.status_code,
        headers=dict(exc.headers or {}),
    )


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    """The last resort: a bug. The traceback goes to the log, never to the client."""
    error = InternalError("an internal error occurred")
    return problem_response(error, _request_id(request, error))
