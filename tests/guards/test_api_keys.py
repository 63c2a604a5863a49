"""API keys: from the configuration (by hash) and from a real Redis, through the Authenticator."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio
from starlette.datastructures import Headers
from structlog.testing import capture_logs

from tests.conftest import RedisServer
from tokenrelay.backends.redis_api_keys import RedisAPIKeyStore
from tokenrelay.backends.redis_store import RedisStore
from tokenrelay.config import APIKeySettings, AuthSettings
from tokenrelay.errors import Forbidden, StoreUnavailable, Unauthenticated
from tokenrelay.guards.auth import (
    APIKeyRecord,
    Authenticator,
    generate_api_key,
    hash_api_key,
    looks_like_jwt,
)
from tokenrelay.guards.principal import Principal

ALICE = "tr_alice-key-0000000000000000000000000000000000000"
BOB = "tr_bob-key-00000000000000000000000000000000000000000"


def configured(**overrides: Any) -> Authenticator:
    keys = [
        APIKeySettings(name="alice", tenant="acme", sha256=hash_api_key(ALICE), scopes=["chat"]),
        APIKeySettings(name="bob", tenant="globex", sha256=hash_api_key(BOB)),
    ]
    return Authenticator(AuthSettings(**{"api_keys": keys, **overrides}))


async def code_of(auth: Authenticator, headers: dict[str, str]) -> str:
    with pytest.raises(Unauthenticated) as caught:
        await auth.authenticate(Headers(headers))
    assert caught.value.status == 401
    return caught.value.instance_code()


# The key functions behind ``tokenrelay hash-key``


def test_generated_keys_are_random_and_hash_to_hex_sha256() -> None:
    first, second = generate_api_key(), generate_api_key()
    assert first != second
    assert re.fullmatch(r"tr_[A-Za-z0-9_-]{43}", first)
    assert not looks_like_jwt(first)
    assert hash_api_key("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    APIKeySettings(name="new", tenant="t", sha256=hash_api_key(first))  # the config accepts it


# Configured keys


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {ALICE}"},
        {"authorization": f"bearer {ALICE}"},
        {"api-key": ALICE},
        {"API-Key": ALICE},
        {"Authorization": f"Bearer {ALICE}", "api-key": ALICE},
        {"Authorization": "Basic dXNlcjpwYXNz", "api-key": ALICE},
    ],
    ids=["bearer", "lowercase", "api-key", "api-key-case", "both-same", "proxy-basic"],
)
async def test_configured_key_is_accepted(headers: dict[str, str]) -> None:
    principal = await configured().authenticate(Headers(headers))
    assert principal == Principal("acme", "alice", "api_key", frozenset({"chat"}))


async def test_each_key_names_its_own_tenant() -> None:
    principal = await configured().authenticate(Headers({"api-key": BOB}))
    assert principal == Principal("globex", "bob", "api_key", frozenset())


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer tr_not-a-key"},
        {"api-key": ALICE[:-1]},
        {"api-key": hash_api_key(ALICE)},  # the hash is not the key
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": f"Token {ALICE}"},
        {"Authorization": f"Bearer {ALICE}", "api-key": BOB},  # two identities: neither
        {"Authorization": "Bearer eyJhbGciOiJIUzI1NiJ9.eyJ0ZW5hbnQiOiJ4In0.c2ln"},  # no JWTs here
    ],
    ids=["unknown", "truncated", "hash", "basic", "other-scheme", "two-keys", "jwt-shaped"],
)
async def test_wrong_key_is_invalid(headers: dict[str, str]) -> None:
    assert await code_of(configured(), headers) == "invalid_credentials"


@pytest.mark.parametrize(
    "headers", [{}, {"api-key": "  "}, {"Authorization": "Bearer"}], ids=["none", "blank", "empty"]
)
async def test_no_key_is_missing(headers: dict[str, str]) -> None:
    assert await code_of(configured(), headers) == "missing_credentials"


async def test_refusal_never_echoes_or_logs_the_key() -> None:
    presented = "tr_guessed-key-that-is-secret-000000000000000"
    with capture_logs() as logs, pytest.raises(Unauthenticated) as caught:
        await configured().authenticate(Headers({"api-key": presented}))
    assert caught.value.message == "the credentials are not valid"
    assert presented not in repr(logs)
    assert hash_api_key(presented) not in repr(logs)
    assert logs == [
        {"event": "authentication_refused", "method": "api_key", "reason": "unknown_key",
         "log_level": "info"}
    ]  # fmt: skip


async def test_required_scopes_refuse_a_key_without_them() -> None:
    auth = configured(required_scopes=["chat"])
    assert (await auth.authenticate(Headers({"api-key": ALICE}))).subject == "alice"
    with pytest.raises(Forbidden) as caught:
        await auth.authenticate(Headers({"api-key": BOB}))
    assert caught.value.status == 403
    assert caught.value.instance_code() == "insufficient_scope"


async def test_websocket_bare_key_is_checked_alike() -> None:
    auth = configured()
    assert (await auth.authenticate_token(ALICE)).tenant == "acme"
    with pytest.raises(Unauthenticated) as caught:
        await auth.authenticate_token("")
    assert caught.value.instance_code() == "missing_credentials"


async def test_without_auth_configured_every_caller_is_the_open_tenant() -> None:
    auth = Authenticator(AuthSettings(open_tenant="public"))
    assert not auth.enabled
    expected = Principal("public", "anonymous", "open")
    assert await auth.authenticate(Headers({})) == expected
    assert await auth.authenticate(Headers({"api-key": "anything"})) == expected
    assert await auth.authenticate_token("whatever") == expected


def test_redis_keys_need_a_store() -> None:
    with pytest.raises(ValueError, match="api_keys_in_redis"):
        Authenticator(AuthSettings(api_keys_in_redis=True))


# Keys in Redis


@pytest.fixture
async def redis_keys(redis_url: str, redis_prefix: str) -> AsyncIterator[RedisAPIKeyStore]:
    store = RedisStore(redis_url, key_prefix=redis_prefix)
    keys = RedisAPIKeyStore(store)
    yield keys
    await keys.close()
    await store.close()


def with_redis(store: RedisAPIKeyStore, **overrides: Any) -> Authenticator:
    keys = [APIKeySettings(name="alice", tenant="acme", sha256=hash_api_key(ALICE))]
    settings = AuthSettings(**{"api_keys": keys, "api_keys_in_redis": True, **overrides})
    return Authenticator(settings, api_key_store=store)


async def test_redis_key_is_accepted_and_revoked_while_running(
    redis_keys: RedisAPIKeyStore,
) -> None:
    auth = with_redis(redis_keys)
    carol = generate_api_key()
    assert await code_of(auth, {"api-key": carol}) == "invalid_credentials"

    await redis_keys.put(hash_api_key(carol), APIKeyRecord("carol", "initech", frozenset({"a"})))
    principal = await auth.authenticate(Headers({"Authorization": f"Bearer {carol}"}))
    assert principal == Principal("initech", "carol", "api_key", frozenset({"a"}))
    # Configured keys still work beside them.
    assert (await auth.authenticate(Headers({"api-key": ALICE}))).tenant == "acme"

    assert await redis_keys.delete(hash_api_key(carol))
    assert await code_of(auth, {"api-key": carol}) == "invalid_credentials"


async def test_redis_layout_is_one_hash_by_key_digest(
    redis_keys: RedisAPIKeyStore, redis_url: str, redis_prefix: str
) -> None:
    carol = generate_api_key()
    await redis_keys.put(
        hash_api_key(carol), APIKeyRecord("carol", "initech", frozenset({"b", "a"}))
    )
    admin = redis.asyncio.Redis.from_url(redis_url)
    try:
        stored = await admin.hgetall(f"{redis_prefix}api_keys")
        # An operator adds a key by hand the same way.
        dave = generate_api_key()
        await admin.hset(
            f"{redis_prefix}api_keys",
            hash_api_key(dave),
            '{"name": "dave", "tenant": "umbrella", "scopes": []}',
        )
    finally:
        await admin.aclose()
    assert stored == {
        hash_api_key(carol).encode(): b'{"name":"carol","tenant":"initech","scopes":["a","b"]}'
    }
    assert carol.encode() not in repr(stored).encode()
    principal = await with_redis(redis_keys).authenticate(Headers({"api-key": dave}))
    assert principal == Principal("umbrella", "dave", "api_key", frozenset())


async def test_redis_scopes_meet_required_scopes(redis_keys: RedisAPIKeyStore) -> None:
    auth = with_redis(redis_keys, required_scopes=["runs"])
    scoped, unscoped = generate_api_key(), generate_api_key()
    await redis_keys.put(hash_api_key(scoped), APIKeyRecord("s", "t", frozenset({"runs"})))
    await redis_keys.put(hash_api_key(unscoped), APIKeyRecord("u", "t", frozenset({"chat"})))
    assert (await auth.authenticate(Headers({"api-key": scoped}))).subject == "s"
    with pytest.raises(Forbidden) as caught:
        await auth.authenticate(Headers({"api-key": unscoped}))
    assert caught.value.instance_code() == "insufficient_scope"


@pytest.mark.parametrize(
    "raw",
    [b"not json", b'{"name": "x"}', b'{"name": "x", "tenant": ""}', b'{"name": "x", "tenant": 7}'],
    ids=["not-json", "no-tenant", "empty-tenant", "tenant-number"],
)
async def test_malformed_redis_record_denies_its_key(
    redis_keys: RedisAPIKeyStore, redis_url: str, redis_prefix: str, raw: bytes
) -> None:
    key = generate_api_key()
    admin = redis.asyncio.Redis.from_url(redis_url)
    try:
        await admin.hset(f"{redis_prefix}api_keys", hash_api_key(key), raw)
    finally:
        await admin.aclose()
    with capture_logs() as logs:
        assert await code_of(with_redis(redis_keys), {"api-key": key}) == "invalid_credentials"
    assert "api_key_record_malformed" in [log["event"] for log in logs]
    assert key not in repr(logs)


async def test_concurrent_lookups_share_round_trips(
    redis_keys: RedisAPIKeyStore, redis_url: str
) -> None:
    auth = with_redis(redis_keys)
    key = generate_api_key()
    await redis_keys.put(hash_api_key(key), APIKeyRecord("k", "t"))
    admin = redis.asyncio.Redis.from_url(redis_url)
    try:
        before = (await admin.info("commandstats")).get("cmdstat_hget", {}).get("calls", 0)
        principals = await asyncio.gather(
            *(auth.authenticate(Headers({"api-key": key})) for _ in range(200))
        )
        after = (await admin.info("commandstats"))["cmdstat_hget"]["calls"]
    finally:
        await admin.aclose()
    assert {p.subject for p in principals} == {"k"}
    assert after - before == 200  # one lookup each, but pipelined: no pool of 200 connections


async def test_redis_down_is_store_unavailable_not_unauthenticated(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    store = RedisStore(redis_server.url, key_prefix=redis_prefix, socket_timeout=1.0)
    keys = RedisAPIKeyStore(store)
    try:
        auth = with_redis(keys)
        key = generate_api_key()
        await keys.put(hash_api_key(key), APIKeyRecord("k", "t"))
        assert (await auth.authenticate(Headers({"api-key": key}))).tenant == "t"

        redis_server.kill()
        with pytest.raises(StoreUnavailable) as caught:
            await auth.authenticate(Headers({"api-key": generate_api_key()}))
        assert caught.value.instance_status() == 503
        # A configured key needs no Redis: it still works.
        assert (await auth.authenticate(Headers({"api-key": ALICE}))).tenant == "acme"

        redis_server.start()  # empty again: it keeps nothing on disk
        await keys.put(hash_api_key(key), APIKeyRecord("k", "t"))
        assert (await auth.authenticate(Headers({"api-key": key}))).tenant == "t"
    finally:
        await keys.close()
        await store.close()


async def test_put_refuses_what_is_not_a_hash(redis_keys: RedisAPIKeyStore) -> None:
    with pytest.raises(ValueError, match="64 lowercase hex"):
        await redis_keys.put("tr_the-key-itself", APIKeyRecord("k", "t"))
