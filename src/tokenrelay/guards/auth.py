"""Authenticator: who is calling, from an API key or a bearer JWT.

A request carries one credential, in ``Authorization: Bearer <credential>`` or in an ``api-key``
header (the Azure OpenAI convention); a WebSocket may send it as its first message instead. A
credential shaped like a JWT (three base64url segments) is verified as one when JWTs are
configured; anything else is an API key, known only by its SHA-256: from the configuration, then,
when ``auth.api_keys_in_redis`` is set, from Redis. With no authentication configured every caller
is the open tenant.

Refusals are ``Unauthenticated`` (401) with a generic message and one of three codes, or
``Forbidden`` (403, ``insufficient_scope``) when a caller lacks a required scope. The credential
itself is never logged nor echoed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from tokenrelay.config import AuthSettings
from tokenrelay.errors import Forbidden, Unauthenticated
from tokenrelay.guards.jwks import JWKSClient
from tokenrelay.guards.jwt_verifier import INVALID_MESSAGE, JWTVerifier
from tokenrelay.guards.principal import Principal

logger = structlog.get_logger("tokenrelay.auth")

MISSING_MESSAGE = "credentials are required: an Authorization: Bearer header or an api-key header"

# Longer than any key or token we issue or accept; refused before any hashing or parsing.
_MAX_CREDENTIAL_CHARS = 8192
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+=*\.[A-Za-z0-9_-]+=*\.[A-Za-z0-9_-]*=*")


@dataclass(frozen=True, slots=True)
class APIKeyRecord:
    """What an API key stands for; the key itself is never kept, only its hash."""

    name: str
    tenant: str
    scopes: frozenset[str] = field(default_factory=frozenset)


class APIKeyStore(Protocol):
    """API keys kept outside the configuration, found by the hex SHA-256 of the key."""

    async def find(self, sha256_hex: str) -> APIKeyRecord | None:
        """The key's record, or None when no key has this hash.

        Raises:
            StoreUnavailable: the store cannot be reached (the caller gets 503, not 401).
        """
        ...


def hash_api_key(key: str) -> str:
    """The hex SHA-256 that ``auth.api_keys`` and the key store know a key by."""
    return hashlib.sha256(key.encode()).hexdigest()


def generate_api_key() -> str:
    """A new random API key: ``tr_`` and 32 random bytes, base64url (no dots: never a JWT)."""
    return "tr_" + secrets.token_urlsafe(32)


def looks_like_jwt(credential: str) -> bool:
    """Three base64url segments separated by dots (the last may be empty: ``alg: none``)."""
    return _JWT_SHAPE.fullmatch(credential) is not None


class Authenticator:
    """Turns the credentials of a request into a Principal.

    Args:
        settings: ``auth``.
        api_key_store: where keys beyond the configured ones are looked up; required when
            ``settings.api_keys_in_redis`` is set.
        jwks: the key set client; required when ``settings.jwt.jwks_url`` is set.

    Raises:
        ValueError: a store or client the settings call for is missing, or a configured JWT
            key is unusable.
    """

    def __init__(
        self,
        settings: AuthSettings,
        *,
        api_key_store: APIKeyStore | None = None,
        jwks: JWKSClient | None = None,
    ) -> None:
        if settings.api_keys_in_redis and api_key_store is None:
            raise ValueError("auth.api_keys_in_redis is set: an API key store is required")
        self._settings = settings
        self._open_principal = Principal(settings.open_tenant, "anonymous", "open")
        self._required_scopes = frozenset(settings.required_scopes)
        self._configured_keys = [
            (bytes.fromhex(key.sha256), APIKeyRecord(key.name, key.tenant, frozenset(key.scopes)))
            for key in settings.api_keys
        ]
        self._api_key_store = api_key_store if settings.api_keys_in_redis else None
        self._jwt = JWTVerifier(settings.jwt, jwks=jwks) if settings.jwt is not None else None

    @property
    def enabled(self) -> bool:
        """Whether callers must authenticate; when not, every caller is the open tenant."""
        return self._settings.enabled

    async def authenticate(self, headers: Mapping[str, str]) -> Principal:
        """The caller of a request, from its ``Authorization`` or ``api-key`` header.

        Args:
            headers: the request's headers, looked up case-insensitively (Starlette's
                ``Headers``).

        Raises:
            Unauthenticated: ``missing_credentials``, ``invalid_credentials`` or
                ``expired_credentials``.
            Forbidden: ``insufficient_scope``, a scope of ``auth.required_scopes`` is missing.
            StoreUnavailable: the API key store cannot be reached.
        """
        if not self.enabled:
            return self._open_principal
        credential = _credential(headers)
        if credential is None:
            raise Unauthenticated(MISSING_MESSAGE, code="missing_credentials")
        return await self.authenticate_token(credential)

    async def authenticate_token(self, token: str) -> Principal:
        """The caller a bare credential (an API key or a JWT) names, as a WebSocket sends it.

        Raises:
            The same as ``authenticate``.
        """
        if not self.enabled:
            return self._open_principal
        token = token.strip()
        if not token:
            raise Unauthenticated(MISSING_MESSAGE, code="missing_credentials")
        # Keys and JWTs are printable ASCII; anything else cannot match and is not hashed.
        if len(token) > _MAX_CREDENTIAL_CHARS or not (token.isascii() and token.isprintable()):
            raise _refused("credential", "malformed")
        if self._jwt is not None and looks_like_jwt(token):
            principal = await self._jwt.verify(token)
        else:
            principal = await self._api_key_principal(token)
        if not self._required_scopes <= principal.scopes:
            logger.info(
                "authentication_refused",
                method=principal.method,
                reason="insufficient_scope",
                tenant=principal.tenant,
                subject=principal.subject,
            )
            raise Forbidden(
                "the credentials do not grant the scopes this gateway requires",
                code="insufficient_scope",
            )
        return principal

    async def _api_key_principal(self, key: str) -> Principal:
        digest = hashlib.sha256(key.encode()).digest()
        record = self._configured_key(digest)
        if record is None and self._api_key_store is not None:
            # Looked up by its hash: an unknown key reveals nothing through the lookup's timing.
            record = await self._api_key_store.find(digest.hex())
        if record is None:
            raise _refused("api_key", "unknown_key")
        return Principal(record.tenant, record.name, "api_key", record.scopes)

    def _configured_key(self, digest: bytes) -> APIKeyRecord | None:
        """The configured key with this hash, compared with every one and in constant time.

        What a timing difference could leak is how much of the presented key's SHA-256 matches
        a stored hash, which tells nothing about any key: no one can choose a digest's prefix.
        Still, ``compare_digest`` and a scan with no early exit make the time depend on the
        number of configured keys only, at about 0.1 µs a key: defence that costs nothing.
        """
        found: APIKeyRecord | None = None
        for stored, record in self._configured_keys:
            if hmac.compare_digest(stored, digest) and found is None:
                found = record
        return found


def _credential(headers: Mapping[str, str]) -> str | None:
    """The one credential of a request, or None when it sent none.

    A Bearer value and an ``api-key`` header that differ are refused: which of two identities
    a request acts as must never be a guess.
    """
    authorization = headers.get("authorization", "").strip()
    api_key = headers.get("api-key", "").strip() or None
    if not authorization:
        return api_key
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer":
        if api_key is not None:
            return api_key  # another scheme (a proxy's Basic), the key is in its own header
        raise _refused("header", "not_bearer")
    bearer = value.strip()
    if not bearer:
        return api_key
    if api_key is not None and api_key != bearer:
        raise _refused("header", "two_credentials")
    return bearer


def _refused(method: str, reason: str) -> Unauthenticated:
    """The error for refused credentials; the reason goes to the log only."""
    logger.info("authentication_refused", method=method, reason=reason)
    return Unauthenticated(INVALID_MESSAGE)
