"""Bearer JWTs through the Authenticator: every way a token is refused, and every algorithm that
is accepted. Tokens are signed for real, with keys ``cryptography`` generates and HS secrets.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from starlette.datastructures import Headers
from structlog.testing import capture_logs

from tokenrelay.config import AuthSettings, JWTSettings
from tokenrelay.errors import Unauthenticated
from tokenrelay.guards.auth import Authenticator
from tokenrelay.guards.principal import Principal

SECRET = "s" * 64  # long enough for HS512 (RFC 7518: at least the hash's length)
ISSUER = "https://id.example.com"
AUDIENCE = "tokenrelay"
INVALID = "invalid_credentials"


@dataclass(frozen=True)
class Keys:
    rsa_key: rsa.RSAPrivateKey
    ec_key: ec.EllipticCurvePrivateKey
    ed_key: ed25519.Ed25519PrivateKey
    other_rsa_key: rsa.RSAPrivateKey

    def rsa_pem(self) -> str:
        return public_pem(self.rsa_key)


def public_pem(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa_key=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec_key=ec.generate_private_key(ec.SECP256R1()),
        ed_key=ed25519.Ed25519PrivateKey.generate(),
        other_rsa_key=rsa.generate_private_key(public_exponent=65537, key_size=2048),
    )


def jwt_settings(keys: Keys, **overrides: Any) -> JWTSettings:
    values: dict[str, Any] = {
        "algorithms": ["HS256", "HS384", "HS512", "RS256", "PS256", "ES256", "EdDSA"],
        "secret": SECRET,
        "public_keys": {
            "rsa": keys.rsa_pem(),
            "ec": public_pem(keys.ec_key),
            "ed": public_pem(keys.ed_key),
            "default": keys.rsa_pem(),
        },
        "audience": [AUDIENCE],
        "issuer": ISSUER,
        "leeway": 30,
        **overrides,
    }
    return JWTSettings(**values)


def authenticator(keys: Keys, **overrides: Any) -> Authenticator:
    return Authenticator(AuthSettings(jwt=jwt_settings(keys, **overrides)))


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values = {
        "sub": "user-7",
        "tenant": "acme",
        "scope": "chat runs",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 300,
        **overrides,
    }
    return {name: value for name, value in values.items() if value is not None}


def sign(payload: dict[str, Any], key: Any, algorithm: str, kid: str | None = None) -> str:
    return jwt.encode(payload, key, algorithm=algorithm, headers={"kid": kid} if kid else None)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hmac_forged(payload: dict[str, Any], secret: bytes, kid: str | None = None) -> str:
    """An HS256 token signed by hand: PyJWT itself refuses to sign with a PEM as the secret."""
    header = {"alg": "HS256", "typ": "JWT", **({"kid": kid} if kid else {})}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def bearer(token: str) -> Headers:
    return Headers({"Authorization": f"Bearer {token}"})


async def assert_refused(
    auth: Authenticator, token: str, reason: str | None = None, *, code: str = INVALID
) -> Unauthenticated:
    """The 401 a token gets, with ``code``; ``reason``: the check the log says refused it."""
    with capture_logs() as logs, pytest.raises(Unauthenticated) as caught:
        await auth.authenticate(bearer(token))
    error = caught.value
    assert error.status == 401
    assert error.instance_code() == code
    assert token not in error.message
    if reason is not None:
        assert [log.get("reason") for log in logs] == [reason]
    return error


# Refused, one case each


async def test_alg_none_is_refused(keys: Keys) -> None:
    token = jwt.encode(claims(), "", algorithm="none")
    await assert_refused(authenticator(keys), token, "algorithm_not_allowed")


async def test_hs_token_signed_with_the_rsa_public_key_as_secret_is_refused(keys: Keys) -> None:
    # Both families allowed, the public key configured under the token's kid: the token must
    # still be checked against the HS secret, never against the public key's bytes.
    forged = hmac_forged(claims(), keys.rsa_pem().encode(), kid="rsa")
    await assert_refused(authenticator(keys), forged, "InvalidSignatureError")


async def test_hs_token_signed_with_the_rsa_public_key_is_refused_when_only_rs_is_allowed(
    keys: Keys,
) -> None:
    forged = hmac_forged(claims(), keys.rsa_pem().encode())
    auth = authenticator(keys, algorithms=["RS256"], secret=None)
    await assert_refused(auth, forged, "algorithm_not_allowed")


async def test_a_public_key_pem_configured_as_the_secret_never_verifies(keys: Keys) -> None:
    # A misconfiguration: PyJWT refuses a PEM as an HMAC key, so the forgery still fails.
    pem = keys.rsa_pem()
    with pytest.raises(jwt.InvalidKeyError):
        jwt.encode(claims(), pem, algorithm="HS256")
    auth = authenticator(keys, algorithms=["HS256"], secret=pem, public_keys={})
    forged = hmac_forged(claims(), pem.encode())
    await assert_refused(auth, forged, "InvalidKeyError")


async def test_alg_not_in_the_allow_list_is_refused(keys: Keys) -> None:
    token = sign(claims(), SECRET, "HS512")
    auth = authenticator(keys, algorithms=["HS256", "RS256"])
    await assert_refused(auth, token, "algorithm_not_allowed")


async def test_key_of_the_wrong_type_for_the_alg_is_refused(keys: Keys) -> None:
    # An ES256 token naming the RSA key's kid.
    token = sign(claims(), keys.ec_key, "ES256", kid="rsa")
    await assert_refused(authenticator(keys), token, "key_does_not_fit_algorithm")


async def test_signature_by_another_key_is_refused(keys: Keys) -> None:
    token = sign(claims(), keys.other_rsa_key, "RS256", kid="rsa")
    await assert_refused(authenticator(keys), token, "InvalidSignatureError")


async def test_expired_token_is_refused_as_expired(keys: Keys) -> None:
    now = int(time.time())
    token = sign(claims(iat=now - 600, exp=now - 120), SECRET, "HS256")
    error = await assert_refused(authenticator(keys), token, "expired", code="expired_credentials")
    assert 'error="invalid_token"' in error.challenge()


async def test_expired_within_the_leeway_is_accepted(keys: Keys) -> None:
    now = int(time.time())
    token = sign(claims(iat=now - 600, exp=now - 10), SECRET, "HS256")
    principal = await authenticator(keys, leeway=30).authenticate(bearer(token))
    assert principal.tenant == "acme"


async def test_token_without_exp_is_refused(keys: Keys) -> None:
    token = sign(claims(exp=None), SECRET, "HS256")
    await assert_refused(authenticator(keys), token, "MissingRequiredClaimError")


@pytest.mark.parametrize("claim", ["nbf", "iat"])
async def test_token_not_yet_valid_is_refused(keys: Keys, claim: str) -> None:
    now = int(time.time())
    token = sign(claims(**{claim: now + 120}), SECRET, "HS256")
    await assert_refused(authenticator(keys), token, "ImmatureSignatureError")


@pytest.mark.parametrize(
    ("audience", "reason"),
    [("someone-else", "InvalidAudienceError"), (None, "MissingRequiredClaimError")],
    ids=["wrong", "absent"],
)
async def test_wrong_or_missing_audience_is_refused(
    keys: Keys, audience: str | None, reason: str
) -> None:
    token = sign(claims(aud=audience), SECRET, "HS256")
    await assert_refused(authenticator(keys), token, reason)


async def test_audience_is_not_checked_when_none_is_configured(keys: Keys) -> None:
    token = sign(claims(aud="anything"), SECRET, "HS256")
    principal = await authenticator(keys, audience=[]).authenticate(bearer(token))
    assert principal.tenant == "acme"


@pytest.mark.parametrize(
    ("issuer", "reason"),
    [("https://evil.example.com", "InvalidIssuerError"), (None, "MissingRequiredClaimError")],
    ids=["wrong", "absent"],
)
async def test_wrong_or_missing_issuer_is_refused(
    keys: Keys, issuer: str | None, reason: str
) -> None:
    token = sign(claims(iss=issuer), SECRET, "HS256")
    await assert_refused(authenticator(keys), token, reason)


async def test_unknown_kid_is_refused(keys: Keys) -> None:
    token = sign(claims(), keys.rsa_key, "RS256", kid="retired-2019")
    auth = authenticator(keys, public_keys={"rsa": keys.rsa_pem()})
    await assert_refused(auth, token, "unknown_kid")


async def test_missing_tenant_claim_is_refused(keys: Keys) -> None:
    token = sign(claims(tenant=None), SECRET, "HS256")
    await assert_refused(authenticator(keys), token, "no_tenant")


def hs_signed(header: bytes, payload: bytes) -> str:
    """Segments signed with the right secret: only their content is wrong."""
    signing_input = f"{b64(header)}.{b64(payload)}"
    signature = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("abc.def.ghi", "DecodeError"),  # segments that decode to no JSON
        (hs_signed(b"[1, 2]", b'{"tenant": "acme"}'), "DecodeError"),  # header not an object
        (hs_signed(b'{"alg": "HS256"}', b"not json"), "DecodeError"),  # payload not JSON
        (hs_signed(b'{"alg": "HS256"}', b"[1]"), "DecodeError"),  # payload not an object
        (hs_signed(b'{"alg": "HS256", "kid": 7}', b"{}"), "InvalidTokenError"),  # kid a number
        (hs_signed(b'{"typ": "JWT"}', b'{"tenant": "acme"}'), "algorithm_not_allowed"),  # no alg
        ("eyJhbGciOiJIUzI1NiJ9.e30", "unknown_key"),  # two segments: not a JWT, not a key
        ("a.b.c.d", "unknown_key"),  # four segments
        ("eyJhbGciOiJIUzI1NiJ9.e30.!!!!", "unknown_key"),  # not base64url
        ("eyJ" + "A" * 9000 + ".e30.sig", "malformed"),  # far longer than any token
        ("eyJhbGciOiJIUzI1NiJ9.e30.sig\x00", "malformed"),  # a control character
    ],
    ids=[
        "garbage",
        "header-array",
        "payload-text",
        "payload-array",
        "kid-number",
        "no-alg",
        "two-segments",
        "four-segments",
        "bad-base64",
        "huge",
        "control-character",
    ],
)
async def test_malformed_tokens_are_refused(keys: Keys, token: str, reason: str) -> None:
    with capture_logs() as logs, pytest.raises(Unauthenticated) as caught:
        await authenticator(keys).authenticate_token(token)
    assert caught.value.instance_code() == INVALID
    assert [log.get("reason") for log in logs] == [reason]


async def test_tampered_payload_is_refused(keys: Keys) -> None:
    header, _, signature = sign(claims(), SECRET, "HS256").split(".")
    tampered = f"{header}.{b64(json.dumps(claims(tenant='victim')).encode())}.{signature}"
    await assert_refused(authenticator(keys), tampered, "InvalidSignatureError")


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer "}, {"api-key": ""}],
    ids=["none", "empty-bearer", "empty-api-key"],
)
async def test_missing_token_is_refused_as_missing(keys: Keys, headers: dict[str, str]) -> None:
    with pytest.raises(Unauthenticated) as caught:
        await authenticator(keys).authenticate(Headers(headers))
    assert caught.value.instance_code() == "missing_credentials"
    assert caught.value.challenge() == 'Bearer realm="tokenrelay"'


async def test_refusals_say_nothing_of_the_token_or_the_failed_check(keys: Keys) -> None:
    now = int(time.time())
    tokens = [
        sign(claims(aud="someone-else"), SECRET, "HS256"),
        sign(claims(), keys.other_rsa_key, "RS256", kid="rsa"),
        sign(claims(iat=now - 600, exp=now - 120), SECRET, "HS256"),
    ]
    auth = authenticator(keys)
    errors = []
    with capture_logs() as logs:
        for token in tokens:
            with pytest.raises(Unauthenticated) as caught:
                await auth.authenticate(bearer(token))
            errors.append(caught.value)
    assert {error.message for error in errors} <= {
        "the credentials are not valid",
        "the credentials have expired",
    }
    assert [log["event"] for log in logs] == ["authentication_refused"] * 3
    for token in tokens:
        assert all(token not in repr(log) for log in logs)
        # Neither the signature alone (a token's secret part) shows up.
        assert all(token.rsplit(".", 1)[1] not in repr(log) for log in logs)


# Accepted


def signing_key(keys: Keys, algorithm: str) -> tuple[Any, str | None]:
    """The private key (or secret) and kid a token of this algorithm is signed with."""
    return {
        "HS256": (SECRET, None),
        "HS384": (SECRET, None),
        "HS512": (SECRET, None),
        "RS256": (keys.rsa_key, "rsa"),
        "PS256": (keys.rsa_key, "rsa"),
        "ES256": (keys.ec_key, "ec"),
        "EdDSA": (keys.ed_key, "ed"),
    }[algorithm]


@pytest.mark.parametrize(
    "algorithm", ["HS256", "HS384", "HS512", "RS256", "PS256", "ES256", "EdDSA"]
)
async def test_accepted_algorithms_give_tenant_subject_and_scopes(
    keys: Keys, algorithm: str
) -> None:
    key, kid = signing_key(keys, algorithm)
    token = sign(claims(), key, algorithm, kid=kid)
    principal = await authenticator(keys).authenticate(bearer(token))
    assert principal == Principal("acme", "user-7", "jwt", frozenset({"chat", "runs"}))


async def test_public_key_without_kid_is_the_default_one(keys: Keys) -> None:
    token = sign(claims(), keys.rsa_key, "RS256")
    principal = await authenticator(keys).authenticate(bearer(token))
    assert principal.tenant == "acme"


async def test_scopes_as_a_list_and_tenant_from_a_nested_claim(keys: Keys) -> None:
    token = sign(
        claims(tenant=None, scope=None, scp=["chat", "admin"], org={"tenant": {"id": "globex"}}),
        SECRET,
        "HS256",
    )
    auth = authenticator(keys, tenant_claim="org.tenant.id", scopes_claim="scp")
    principal = await auth.authenticate(bearer(token))
    assert principal.tenant == "globex"
    assert principal.scopes == frozenset({"chat", "admin"})


async def test_namespaced_claim_with_dots_is_read_whole(keys: Keys) -> None:
    token = sign(claims(tenant=None, **{"https://example.com/tenant": "initech"}), SECRET, "HS256")
    auth = authenticator(keys, tenant_claim="https://example.com/tenant")
    assert (await auth.authenticate(bearer(token))).tenant == "initech"


async def test_token_without_sub_or_scopes_is_subject_jwt_with_no_scopes(keys: Keys) -> None:
    token = sign(claims(sub=None, scope=None), SECRET, "HS256")
    principal = await authenticator(keys).authenticate(bearer(token))
    assert principal == Principal("acme", "jwt", "jwt", frozenset())


async def test_websocket_bare_token_is_verified_alike(keys: Keys) -> None:
    token = sign(claims(), keys.ec_key, "ES256", kid="ec")
    principal = await authenticator(keys).authenticate_token(token)
    assert principal.tenant == "acme"


def test_secret_too_short_for_its_algorithm_is_a_configuration_error(keys: Keys) -> None:
    with pytest.raises(ValueError, match="at least 64 bytes for HS512"):
        authenticator(keys, algorithms=["HS512"], secret="s" * 40)


@pytest.mark.parametrize(
    ("pem", "message"),
    [
        ("not a key", "is not a PEM public key"),
        (public_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)), "2048 bits"),
    ],
    ids=["not-pem", "short-rsa"],
)
def test_unusable_public_key_is_a_configuration_error(keys: Keys, pem: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        authenticator(keys, public_keys={"default": pem})
