"""JWKSClient against a real JWKS server on 127.0.0.1 that counts the requests it answers.

Time is the client's injected clock, moved by the tests: cache expiry and the refresh interval
are checked without sleeping.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from starlette.datastructures import Headers
from structlog.testing import capture_logs

from tests.conftest import free_port
from tokenrelay.config import AuthSettings, JWTSettings
from tokenrelay.errors import Unauthenticated
from tokenrelay.guards.auth import Authenticator
from tokenrelay.guards.jwks import JWKSClient

TTL = 300.0
MIN_REFRESH = 30.0


class Clock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str, **extra: Any
) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        public = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        public = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**public, "kid": kid, "use": "sig", **extra}


@dataclass
class JWKSServer:
    """What the server publishes (tests change it) and how often it was asked."""

    url: str
    keys: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    body: bytes | None = None  # sent instead of the key set when set
    requests: int = 0
    runner: web.AppRunner | None = None

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def jwks_server() -> AsyncIterator[JWKSServer]:
    port = free_port()
    server = JWKSServer(f"http://127.0.0.1:{port}/.well-known/jwks.json")

    async def publish(request: web.Request) -> web.Response:
        server.requests += 1
        if server.body is not None:
            return web.Response(body=server.body, status=server.status)
        return web.json_response({"keys": server.keys}, status=server.status)

    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", publish)
    server.runner = web.AppRunner(app)
    await server.runner.setup()
    await web.TCPSite(server.runner, "127.0.0.1", port).start()
    yield server
    await server.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def client(
    jwks_server: JWKSServer, session: aiohttp.ClientSession, clock: Clock
) -> AsyncIterator[JWKSClient]:
    jwks = JWKSClient(jwks_server.url, session, TTL, MIN_REFRESH, clock=clock)
    yield jwks
    await jwks.close()


def token(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str, alg: str = "RS256") -> str:
    now = int(time.time())
    claims = {"sub": "svc", "tenant": "acme", "iat": now, "exp": now + 300}
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


def authenticator(jwks: JWKSClient, url: str, algorithms: list[str] | None = None) -> Authenticator:
    settings = JWTSettings(algorithms=algorithms or ["RS256"], jwks_url=url)
    return Authenticator(AuthSettings(jwt=settings), jwks=jwks)


def bearer(value: str) -> Headers:
    return Headers({"Authorization": f"Bearer {value}"})


async def test_a_published_key_verifies_and_the_set_is_fetched_once(
    jwks_server: JWKSServer, client: JWKSClient
) -> None:
    key = rsa_key()
    jwks_server.keys = [jwk(key, "k1")]
    auth = authenticator(client, jwks_server.url)
    for _ in range(5):
        principal = await auth.authenticate(bearer(token(key, "k1")))
        assert principal.tenant == "acme"
    assert jwks_server.requests == 1


async def test_the_set_is_fetched_again_after_its_ttl(
    jwks_server: JWKSServer, client: JWKSClient, clock: Clock
) -> None:
    jwks_server.keys = [jwk(rsa_key(), "k1")]
    assert await client.get_key("k1") is not None
    clock.advance(TTL - 1)
    assert await client.get_key("k1") is not None
    assert jwks_server.requests == 1
    # A key the provider withdrew stops verifying once the cache has expired.
    jwks_server.keys = [jwk(rsa_key(), "k2")]
    clock.advance(2)
    assert await client.get_key("k1") is None
    assert jwks_server.requests == 2


async def test_an_unknown_kid_triggers_one_refresh(
    jwks_server: JWKSServer, client: JWKSClient, clock: Clock
) -> None:
    jwks_server.keys = [jwk(rsa_key(), "k1")]
    assert await client.get_key("k1") is not None
    clock.advance(MIN_REFRESH)
    jwks_server.keys.append(jwk(rsa_key(), "k2"))
    assert await client.get_key("k2") is not None
    assert jwks_server.requests == 2
    # Still unknown right after a fetch: no new one within the interval.
    assert await client.get_key("k3") is None
    assert await client.get_key("k3") is None
    assert jwks_server.requests == 2


async def test_a_flood_of_random_kids_costs_at_most_one_fetch_per_interval(
    jwks_server: JWKSServer, client: JWKSClient, clock: Clock
) -> None:
    jwks_server.keys = [jwk(rsa_key(), "k1")]

    async def flood() -> list[Any]:
        return await asyncio.gather(*(client.get_key(uuid.uuid4().hex) for _ in range(50)))

    # Cold: the 50 share the one fetch the first of them started.
    assert await flood() == [None] * 50
    assert jwks_server.requests == 1
    clock.advance(MIN_REFRESH - 1)
    assert await flood() == [None] * 50
    assert jwks_server.requests == 1
    clock.advance(1)
    assert await flood() == [None] * 50
    assert jwks_server.requests == 2


async def test_forged_tokens_with_random_kids_are_refused_without_fetching_each(
    jwks_server: JWKSServer, client: JWKSClient
) -> None:
    jwks_server.keys = [jwk(rsa_key(), "k1")]
    auth = authenticator(client, jwks_server.url)
    attacker = rsa_key()

    async def attempt(kid: str) -> str:
        with pytest.raises(Unauthenticated) as caught:
            await auth.authenticate(bearer(token(attacker, kid)))
        return caught.value.instance_code()

    codes = await asyncio.gather(*(attempt(uuid.uuid4().hex) for _ in range(50)))
    assert set(codes) == {"invalid_credentials"}
    assert jwks_server.requests == 1


async def test_key_rotation_new_kid_is_accepted_and_the_retired_one_refused(
    jwks_server: JWKSServer, client: JWKSClient, clock: Clock
) -> None:
    old, new = rsa_key(), rsa_key()
    jwks_server.keys = [jwk(old, "2024")]
    auth = authenticator(client, jwks_server.url)
    assert (await auth.authenticate(bearer(token(old, "2024")))).tenant == "acme"

    jwks_server.keys = [jwk(new, "2025")]
    clock.advance(MIN_REFRESH)
    assert (await auth.authenticate(bearer(token(new, "2025")))).tenant == "acme"
    with pytest.raises(Unauthenticated) as caught:
        await auth.authenticate(bearer(token(old, "2024")))
    assert caught.value.instance_code() == "invalid_credentials"
    assert jwks_server.requests == 2


@pytest.mark.parametrize(
    ("status", "body"),
    [(503, None), (200, b"<html>maintenance</html>"), (200, b'{"keys": []}')],
    ids=["http-503", "not-json", "no-keys"],
)
async def test_a_failing_provider_keeps_the_cached_keys(
    jwks_server: JWKSServer, client: JWKSClient, clock: Clock, status: int, body: bytes | None
) -> None:
    key = rsa_key()
    jwks_server.keys = [jwk(key, "k1")]
    auth = authenticator(client, jwks_server.url)
    assert (await auth.authenticate(bearer(token(key, "k1")))).tenant == "acme"

    jwks_server.status, jwks_server.body = status, body
    clock.advance(TTL + 1)
    with capture_logs() as logs:
        assert (await auth.authenticate(bearer(token(key, "k1")))).tenant == "acme"
    assert jwks_server.requests == 2
    assert [log["event"] for log in logs] == ["jwks_fetch_failed"]
    assert logs[0]["log_level"] == "warning"


async def test_provider_down_keeps_the_cached_keys(
    jwks_server: JWKSServer, client: JWKSClient, clock: Clock
) -> None:
    key = rsa_key()
    jwks_server.keys = [jwk(key, "k1")]
    auth = authenticator(client, jwks_server.url)
    assert (await auth.authenticate(bearer(token(key, "k1")))).tenant == "acme"

    await jwks_server.stop()
    clock.advance(TTL + 1)
    with capture_logs() as logs:
        assert (await auth.authenticate(bearer(token(key, "k1")))).tenant == "acme"
    assert [log["event"] for log in logs] == ["jwks_fetch_failed"]


async def test_provider_down_with_nothing_cached_refuses_the_token(
    session: aiohttp.ClientSession, clock: Clock
) -> None:
    url = f"http://127.0.0.1:{free_port()}/jwks"  # nothing listens there
    jwks = JWKSClient(url, session, TTL, MIN_REFRESH, clock=clock)
    auth = authenticator(jwks, url)
    try:
        with capture_logs() as logs, pytest.raises(Unauthenticated) as caught:
            await auth.authenticate(bearer(token(rsa_key(), "k1")))
    finally:
        await jwks.close()
    assert caught.value.instance_code() == "invalid_credentials"
    assert caught.value.status == 401
    events = [(log["event"], log["log_level"]) for log in logs]
    assert ("jwks_fetch_failed", "warning") in events


async def test_a_hung_provider_times_out_and_the_token_is_refused(
    session: aiohttp.ClientSession, clock: Clock
) -> None:
    release = asyncio.Event()
    port = free_port()

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"keys": []})

    app = web.Application()
    app.router.add_get("/jwks", hang)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}/jwks"
    jwks = JWKSClient(url, session, TTL, MIN_REFRESH, timeout=0.2, clock=clock)
    try:
        assert await jwks.get_key("k1") is None
    finally:
        release.set()
        await jwks.close()
        await runner.cleanup()


async def test_only_public_signing_keys_with_a_kid_are_used(
    jwks_server: JWKSServer, client: JWKSClient
) -> None:
    signing = rsa_key()
    jwks_server.keys = [
        jwk(signing, "sig"),
        {**jwk(rsa_key(), "enc"), "use": "enc"},
        {k: v for k, v in jwk(rsa_key(), "x").items() if k != "kid"},
        {"kty": "oct", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA", "kid": "hmac"},
        {"kty": "RSA", "kid": "broken", "n": "AQAB"},
        {**jwk(rsa_key(), "odd-alg"), "alg": ["RS256"]},
    ]
    assert await client.get_key("sig") is not None
    for kid in ("enc", "hmac", "broken", "odd-alg"):
        assert await client.get_key(kid) is None


async def test_a_key_bound_to_an_algorithm_verifies_only_that_algorithm(
    jwks_server: JWKSServer, client: JWKSClient
) -> None:
    key = rsa_key()
    jwks_server.keys = [jwk(key, "k1", alg="RS256")]
    auth = authenticator(client, jwks_server.url, algorithms=["RS256", "PS256"])
    assert (await auth.authenticate(bearer(token(key, "k1", "RS256")))).tenant == "acme"
    with pytest.raises(Unauthenticated) as caught:
        await auth.authenticate(bearer(token(key, "k1", "PS256")))
    assert caught.value.instance_code() == "invalid_credentials"


async def test_an_ec_key_from_the_set_verifies_es256(
    jwks_server: JWKSServer, client: JWKSClient
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwks_server.keys = [jwk(key, "ec1")]
    auth = authenticator(client, jwks_server.url, algorithms=["ES256", "RS256"])
    assert (await auth.authenticate(bearer(token(key, "ec1", "ES256")))).tenant == "acme"
    # The same kid claimed by an RS256 token: the key's type does not fit, refused.
    with pytest.raises(Unauthenticated):
        await auth.authenticate(bearer(token(rsa_key(), "ec1", "RS256")))
