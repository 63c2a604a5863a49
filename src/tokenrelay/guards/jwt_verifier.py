"""JWTVerifier: a bearer JWT becomes a Principal, or ``Unauthenticated``.

The key is chosen from the algorithm, never the other way round. A token's ``alg`` must be in
the configured allow-list; an HS algorithm is verified with the shared secret and nothing else,
any other with a public key (configured PEM by ``kid``, or the JWKS) whose type fits the
algorithm. So a token cannot make a public key serve as an HMAC secret (the classic algorithm
confusion), nor an RSA key verify an ECDSA signature. PyJWT then checks the signature and the
claims: ``exp`` (required), ``nbf``, ``iat``, ``aud`` and ``iss`` when configured, with leeway.

Every refusal is ``invalid_credentials``, except a token past its ``exp`` (``expired_credentials``):
the client learns nothing about which check failed; the log line ``authentication_refused`` says
it for the operator.
"""

from __future__ import annotations

from typing import Any

import jwt
import structlog
from cryptography.hazmat.primitives.asymmetric.ec import (
    SECP256R1,
    SECP384R1,
    SECP521R1,
    EllipticCurvePublicKey,
)
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from tokenrelay.config import JWTSettings
from tokenrelay.errors import Unauthenticated
from tokenrelay.guards.jwks import PUBLIC_KEY_TYPES, JWKSClient, PublicKey, VerificationKey
from tokenrelay.guards.principal import Principal

logger = structlog.get_logger("tokenrelay.auth")

INVALID_MESSAGE = "the credentials are not valid"
EXPIRED_MESSAGE = "the credentials have expired"

# The ``kid`` a configured public key is found under when a token names none.
DEFAULT_KID = "default"

# RFC 7518 3.2: an HMAC key at least as long as the hash's output.
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
_RSA_MIN_BITS = 2048  # NIST SP 800-131A, as PyJWT enforces it
_EC_CURVES = {"ES256": SECP256R1, "ES384": SECP384R1, "ES512": SECP521R1}
# Longest tenant name a token may carry (as an API key's, see APIKeySettings).
_MAX_TENANT_CHARS = 128


class JWTVerifier:
    """Verifies bearer JWTs against the configured algorithms, keys and claims.

    Args:
        settings: ``auth.jwt``.
        jwks: the key set client; required when ``settings.jwks_url`` is set.

    Raises:
        ValueError: a configured key is unusable (a PEM that is not a public key, an RSA key
            under 2048 bits, a secret shorter than its HS algorithm's hash), or ``jwks_url``
            is set and no client given.
    """

    def __init__(self, settings: JWTSettings, *, jwks: JWKSClient | None = None) -> None:
        if settings.jwks_url is not None and jwks is None:
            raise ValueError("auth.jwt.jwks_url is set: a JWKSClient is required")
        self._settings = settings
        self._algorithms = frozenset(settings.algorithms)
        self._secret = _checked_secret(settings)
        self._public_keys = {
            kid: VerificationKey(_load_public_key(kid, pem))
            for kid, pem in settings.public_keys.items()
        }
        self._jwks = jwks
        # A too short key (a weak JWKS entry) is refused, not warned about on every request.
        self._decoder = jwt.PyJWT(
            options={
                "require": ["exp"],
                "verify_aud": bool(settings.audience),
                "enforce_minimum_key_length": True,
            }
        )

    async def verify(self, token: str) -> Principal:
        """The caller a token names.

        Raises:
            Unauthenticated: ``expired_credentials`` past ``exp`` (and leeway), else
                ``invalid_credentials``.
        """
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise _refused(type(exc).__name__) from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self._algorithms:
            raise _refused("algorithm_not_allowed")
        kid = header.get("kid")  # a string if present: PyJWT checked it
        key = await self._key_for(algorithm, kid)
        try:
            claims = self._decoder.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._settings.audience or None,
                issuer=self._settings.issuer,
                leeway=self._settings.leeway,
            )
        except jwt.ExpiredSignatureError:
            raise _refused("expired", code="expired_credentials") from None
        except jwt.PyJWTError as exc:
            raise _refused(type(exc).__name__) from None
        return self._principal(claims)

    async def _key_for(self, algorithm: str, kid: str | None) -> PublicKey | bytes:
        """The key the algorithm calls for: the secret for HS, a public key of its type else."""
        if algorithm.startswith("HS"):
            if self._secret is None:
                raise _refused("no_secret")
            return self._secret
        found = self._public_keys.get(kid or DEFAULT_KID)
        if found is None and kid is not None and self._jwks is not None:
            found = await self._jwks.get_key(kid)
        if found is None:
            raise _refused("unknown_kid", kid=kid[:64] if kid else kid)
        if found.algorithm not in (None, algorithm) or not key_fits(algorithm, found.key):
            raise _refused("key_does_not_fit_algorithm")
        return found.key

    def _principal(self, claims: dict[str, Any]) -> Principal:
        tenant = claim(claims, self._settings.tenant_claim)
        if not isinstance(tenant, str) or not 0 < len(tenant) <= _MAX_TENANT_CHARS:
            raise _refused("no_tenant")
        scopes = claim(claims, self._settings.scopes_claim)
        if isinstance(scopes, str):
            scope_set = frozenset(scopes.split())
        elif isinstance(scopes, list) and all(isinstance(scope, str) for scope in scopes):
            scope_set = frozenset(scopes)
        elif scopes is None:
            scope_set = frozenset()
        else:
            raise _refused("malformed_scopes")
        subject = claims.get("sub")
        return Principal(tenant, subject if isinstance(subject, str) else "jwt", "jwt", scope_set)


def key_fits(algorithm: str, key: PublicKey) -> bool:
    """Whether a public key is of the type (and curve) an algorithm verifies with."""
    if algorithm.startswith(("RS", "PS")):
        return isinstance(key, RSAPublicKey)
    if algorithm in _EC_CURVES:
        return isinstance(key, EllipticCurvePublicKey) and isinstance(
            key.curve, _EC_CURVES[algorithm]
        )
    if algorithm == "EdDSA":
        return isinstance(key, Ed25519PublicKey | Ed448PublicKey)
    return False


def claim(claims: dict[str, Any], name: str) -> Any:
    """A claim by name, or by dotted path into nested objects (``realm.tenant``).

    A name that is itself a claim wins, so namespaced claims such as
    ``https://example.com/tenant`` are found whole.
    """
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _refused(reason: str, *, code: str = "invalid_credentials", **details: Any) -> Unauthenticated:
    """The error for a refused token; the reason goes to the log only, never to the client."""
    logger.info("authentication_refused", method="jwt", reason=reason, **details)
    message = EXPIRED_MESSAGE if code == "expired_credentials" else INVALID_MESSAGE
    return Unauthenticated(message, code=code)


def check_jwt_settings(settings: JWTSettings) -> None:
    """Raise ``ValueError`` naming the setting when a configured secret or key cannot work.

    What the Settings cannot check alone (key material): ``check-config`` and ``serve`` call it
    so that a bad key is refused before the gateway starts, not at its first request.
    """
    _checked_secret(settings)
    for kid, pem in settings.public_keys.items():
        _load_public_key(kid, pem)


def _checked_secret(settings: JWTSettings) -> bytes | None:
    if settings.secret is None:
        return None
    secret = settings.secret.get_secret_value().encode()
    for algorithm in settings.algorithms:
        needed = _HMAC_MIN_BYTES.get(algorithm, 0)
        if len(secret) < needed:
            raise ValueError(f"auth.jwt.secret must be at least {needed} bytes for {algorithm}")
    return secret


def _load_public_key(kid: str, pem: str) -> PublicKey:
    try:
        key = load_pem_public_key(pem.encode())
    except ValueError as exc:
        raise ValueError(f"auth.jwt.public_keys[{kid!r}] is not a PEM public key") from exc
    if not isinstance(key, PUBLIC_KEY_TYPES):
        raise ValueError(f"auth.jwt.public_keys[{kid!r}] is of an unsupported key type")
    if isinstance(key, RSAPublicKey) and key.key_size < _RSA_MIN_BITS:
        # PyJWT would refuse every token it signs; say so at start-up instead.
        raise ValueError(f"auth.jwt.public_keys[{kid!r}] is shorter than {_RSA_MIN_BITS} bits")
    return key
