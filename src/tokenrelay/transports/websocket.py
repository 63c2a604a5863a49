"""The ``/v1/ws`` wire format: client frames parsed, events and replies encoded.

Every frame is one compact JSON object. A run event is ``{"run_id", "seq", "type", "data"}``: the
``run_id`` tells the runs of one connection apart, ``seq`` is the resume cursor as everywhere.
Replies to client messages carry the client's ``ref``. The handshake's rules are here too: the
``auth`` message and the ``Origin`` check. Pure functions only; ``api/ws.py`` does the I/O and
the runs. See docs/websocket.md.
"""

from __future__ import annotations

import math
from enum import IntEnum
from typing import Annotated, Any
from urllib.parse import urlsplit

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tokenrelay.errors import (
    InvalidJSON,
    RequestError,
    TokenRelayError,
    Unauthenticated,
    ValidationFailed,
)
from tokenrelay.events import Event
from tokenrelay.transports.sse import native_data

Ref = str | int


class CloseCode(IntEnum):
    """The close codes the gateway sends (RFC 6455 section 7.4), each for one reason."""

    NORMAL = 1000  # the closing handshake the client started
    GOING_AWAY = 1001  # idle timeout
    UNSUPPORTED_DATA = 1003  # a binary frame: the protocol is JSON text
    INVALID_DATA = 1007  # text that is not UTF-8 (sent by the ASGI server)
    POLICY_VIOLATION = 1008  # no valid credentials in time; the reason is the error's code
    MESSAGE_TOO_BIG = 1009  # a client message over websocket.max_message_bytes
    INTERNAL_ERROR = 1011  # a bug; details only in the log
    SERVICE_RESTART = 1012  # the gateway drained on shutdown: its runs have ended, reconnect
    TRY_AGAIN_LATER = 1013  # a slow client: its send queue stayed full, or a send timed out


def encode_event(run_id: str, event: Event) -> str:
    """One run event as one frame, its data as compact as on the other native formats."""
    frame = b'{"run_id":%s,"seq":%d,"type":"%s","data":%s}' % (
        orjson.dumps(run_id),
        event.seq,
        event.type.encode(),
        native_data(event),
    )
    return frame.decode()


def encode_reply(kind: str, ref: Ref | None = None, **fields: Any) -> str:
    """A control frame (``run.created``, ``pong``, …); fields that are None are left out."""
    message: dict[str, Any] = {"type": kind}
    if ref is not None:
        message["ref"] = ref
    message.update((key, value) for key, value in fields.items() if value is not None)
    return orjson.dumps(message).decode()


def encode_error(
    error: TokenRelayError, *, ref: Ref | None = None, run_id: str | None = None
) -> str:
    """An ``error`` frame: about one client message (``ref``) or one run's stream (``run_id``)."""
    errors = error.errors if isinstance(error, ValidationFailed) else None
    return encode_reply(
        "error",
        ref,
        code=error.instance_code(),
        message=error.message,
        retryable=error.retryable,
        retry_after=None if error.retry_after is None else math.ceil(error.retry_after),
        run_id=run_id,
        errors=errors,
    )


class UnknownMessage(RequestError):
    """A client message whose ``type`` this protocol does not have (errors.py holds the rest)."""

    code = "unknown_message"
    title = "Unknown message type"


# Client messages. Unknown fields are ignored, so clients may send newer fields to older gateways.
RunId = Annotated[str, Field(min_length=1, max_length=128)]
ClientRef = Annotated[str, Field(max_length=256)] | int


class ClientMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    ref: ClientRef | None = None


class RunCreate(ClientMessage):
    request: dict[str, Any]  # validated as a RunRequest by the route, forwarded as received
    detach: bool = False


class RunSubscribe(ClientMessage):
    run_id: RunId
    after: int = Field(0, ge=0)


class RunCancel(ClientMessage):
    run_id: RunId


class RunUnsubscribe(ClientMessage):
    run_id: RunId


class Ping(ClientMessage):
    pass


class Auth(ClientMessage):
    """The credentials of a connection whose handshake carried none (browsers cannot set
    headers on a WebSocket); checked by the Authenticator, which bounds the length."""

    token: str


MESSAGE_TYPES: dict[str, type[ClientMessage]] = {
    "run.create": RunCreate,
    "run.subscribe": RunSubscribe,
    "run.cancel": RunCancel,
    "run.unsubscribe": RunUnsubscribe,
    "ping": Ping,
    "auth": Auth,
}


def parse_auth(text: str) -> tuple[Ref | None, str]:
    """The ``ref`` and token of the ``auth`` message that opens a connection whose handshake
    carried no credentials.

    Raises:
        Unauthenticated: ``missing_credentials`` when the message is anything else (invalid JSON
            included), ``invalid_credentials`` when it is an ``auth`` message without a token.
    """
    try:
        raw = decode_frame(text)
    except RequestError:
        raw = {}
    ref, _ = echo_fields(raw)
    if raw.get("type") != "auth":
        raise Unauthenticated("send an auth message first", code="missing_credentials")
    try:
        message = Auth.model_validate(raw)
    except ValidationError:
        raise Unauthenticated("the auth message has no token (a string)") from None
    return ref, message.token


_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_allowed(origin: str, host: str | None, scheme: str, allowed: list[str]) -> bool:
    """Whether a browser page of ``origin`` may open a connection.

    Args:
        origin: the handshake's ``Origin`` header.
        host: its ``Host`` header; with ``scheme`` (ws or wss), the gateway's own origin.
        allowed: ``websocket.allowed_origins``, the other origins allowed.
    """
    own = _origin_key(f"{'https' if scheme == 'wss' else 'http'}://{host}") if host else None
    key = _origin_key(origin)
    if key is None:
        return False  # "null" (a sandboxed page, a file) or garbage
    return key == own or key in {_origin_key(entry) for entry in allowed}


def _origin_key(origin: str) -> tuple[str, str, int] | None:
    """``scheme://host[:port]`` as (scheme, host, port), the default port made explicit."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return parts.scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[parts.scheme]


def decode_frame(text: str) -> dict[str, Any]:
    """A client text frame as a JSON object.

    Raises:
        InvalidJSON: the frame is not JSON.
        ValidationFailed: it is JSON, but not an object.
    """
    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise InvalidJSON("the message is not valid JSON") from None
    if not isinstance(raw, dict):
        raise ValidationFailed("a message is a JSON object", [_field("", "not an object")])
    return raw


def echo_fields(raw: dict[str, Any]) -> tuple[Ref | None, str | None]:
    """The ``ref`` and ``run_id`` an error about this message carries, even when it is invalid."""
    ref, run_id = raw.get("ref"), raw.get("run_id")
    if isinstance(ref, bool) or not isinstance(ref, str | int):
        ref = None
    elif isinstance(ref, str):
        ref = ref[:256]
    return ref, run_id if isinstance(run_id, str) else None


def parse_message(raw: dict[str, Any]) -> ClientMessage:
    """The typed message.

    Raises:
        UnknownMessage: the ``type`` is not in ``MESSAGE_TYPES``.
        ValidationFailed: a field is missing or invalid; ``errors`` names each.
    """
    kind = raw.get("type")
    if not isinstance(kind, str):
        raise ValidationFailed("a message needs a type", [_field("type", "a string is required")])
    model = MESSAGE_TYPES.get(kind)
    if model is None:
        known = ", ".join(MESSAGE_TYPES)
        raise UnknownMessage(f"unknown message type {kind[:64]!r}; known: {known}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise validation_failed(exc) from None


def validation_failed(exc: ValidationError, prefix: str = "") -> ValidationFailed:
    """Pydantic's errors as field-level ``errors``, fields named by their path in the message."""
    fields = [
        _field(prefix + ".".join(str(part) for part in error["loc"]), error["msg"], error["type"])
        for error in exc.errors()
    ]
    summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:5])
    return ValidationFailed(f"the message is invalid: {summary}", fields)


def _field(name: str, message: str, kind: str = "value_error") -> dict[str, str]:
    return {"field": name.rstrip(".") or "message", "message": message, "type": kind}
