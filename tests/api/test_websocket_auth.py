"""``/v1/ws`` authentication and Origin checks, against a real gateway with API keys.

Credentials come in the upgrade request's headers or, when it carried none, in a first ``auth``
message; never in the URL. Browser origins other than the gateway's own and
``websocket.allowed_origins`` are refused at the handshake. Every run belongs to the caller's
tenant. The protocol itself is in ``test_websocket.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from tests.api.test_websocket import (
    TERMINAL,
    chat,
    closed_with,
    content,
    read_runs,
    read_until,
    recv,
    send,
    tokens,
    ws_url,
)
from tests.conftest import GatewayFactory, Server

KEY_A = "tr_websocket_key_of_tenant_a_0123456789"
KEY_B = "tr_websocket_key_of_tenant_b_0123456789"
ALLOWED_ORIGIN = "https://app.example.com"


def keys_env() -> dict[str, str]:
    entries = [
        {
            "name": f"key-{tenant}",
            "tenant": tenant,
            "sha256": hashlib.sha256(k.encode()).hexdigest(),
        }
        for k, tenant in ((KEY_A, "tenant-a"), (KEY_B, "tenant-b"))
    ]
    return {"TOKENRELAY_AUTH__API_KEYS": json.dumps(entries)}


AUTHENTICATED = {
    **keys_env(),
    "TOKENRELAY_WEBSOCKET__AUTH_TIMEOUT": "1",
    "TOKENRELAY_WEBSOCKET__ALLOWED_ORIGINS": json.dumps([ALLOWED_ORIGIN]),
}


@pytest.fixture
def secured(gateway_factory: GatewayFactory, mock_url: str) -> Server:
    return gateway_factory(**AUTHENTICATED)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def create(ws: ClientConnection, ref: str = "r", **mock: Any) -> dict[str, Any]:
    """Send ``run.create``; the reply to it (``run.created`` or ``error``)."""
    await send(ws, {"type": "run.create", "ref": ref, "request": chat(mock or {"tokens": 3})})
    return (await read_until(ws, lambda frame: frame.get("ref") == ref))[-1]


async def upstream_requests(mock_url: str) -> int:
    async with httpx.AsyncClient() as client:
        return len((await client.get(mock_url + "/mock/requests")).json()["requests"])


async def refused_handshake(url: str, **options: Any) -> InvalidStatus:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url, **options):
            pass
    return refused.value


# Credentials in the handshake's headers.


@pytest.mark.parametrize("header", ["bearer", "api-key"])
async def test_a_key_in_the_headers_opens_the_connection(secured: Server, header: str) -> None:
    headers = bearer(KEY_A) if header == "bearer" else {"api-key": KEY_A}
    async with connect(ws_url(secured.url), additional_headers=headers) as ws:
        reply = await create(ws)
        assert reply["type"] == "run.created"
        events, _ = await read_runs(ws, runs=1)
    assert content(events[reply["run_id"]]) == tokens(3)


async def test_an_invalid_key_in_the_headers_is_refused_with_401(secured: Server) -> None:
    refused = await refused_handshake(
        ws_url(secured.url), additional_headers=bearer("tr_not_a_key_of_anyone")
    )
    response = refused.response
    assert response.status_code == 401
    assert (
        response.headers["WWW-Authenticate"] == 'Bearer realm="tokenrelay", error="invalid_token"'
    )
    assert response.headers["Content-Type"] == "application/problem+json"
    assert orjson.loads(response.body)["code"] == "invalid_credentials"


# Credentials in the first message.


async def test_a_first_auth_message_opens_the_connection(secured: Server) -> None:
    async with connect(ws_url(secured.url)) as ws:
        await send(ws, {"type": "auth", "token": KEY_A, "ref": "a"})
        # Messages are handled in order: a run may be asked for before the answer comes.
        await send(ws, {"type": "run.create", "ref": "r", "request": chat({"tokens": 4})})
        assert await recv(ws) == {"type": "auth.ok", "ref": "a"}
        created = await recv(ws)
        assert created["type"] == "run.created"
        events, _ = await read_runs(ws, runs=1)
    assert content(events[created["run_id"]]) == tokens(4)


@pytest.mark.parametrize(
    ("first", "reason"),
    [
        ({"type": "auth", "token": "tr_not_a_key_of_anyone"}, "invalid_credentials"),
        ({"type": "auth", "token": 42}, "invalid_credentials"),
        ({"type": "auth"}, "invalid_credentials"),
        ({"type": "ping"}, "missing_credentials"),
        ({"type": "run.create", "request": chat({"tokens": 1})}, "missing_credentials"),
    ],
)
async def test_a_first_message_without_valid_credentials_closes_with_1008(
    secured: Server, mock_url: str, first: dict[str, Any], reason: str
) -> None:
    async with connect(ws_url(secured.url)) as ws:
        await send(ws, first)
        assert await closed_with(ws) == (1008, reason)
    assert await upstream_requests(mock_url) == 0


async def test_invalid_json_first_closes_with_1008(secured: Server) -> None:
    async with connect(ws_url(secured.url)) as ws:
        await ws.send('{"type": "auth", ')
        assert await closed_with(ws) == (1008, "missing_credentials")


async def test_no_credentials_in_time_closes_with_1008(secured: Server) -> None:
    async with connect(ws_url(secured.url)) as ws:
        started = time.monotonic()
        assert await closed_with(ws) == (1008, "missing_credentials")
    assert time.monotonic() - started >= 1.0  # websocket.auth_timeout


async def test_a_token_in_the_url_is_ignored_and_not_logged(secured: Server) -> None:
    async with connect(ws_url(secured.url) + f"?token={KEY_A}&api-key={KEY_A}") as ws:
        await send(ws, {"type": "ping"})
        assert await closed_with(ws) == (1008, "missing_credentials")
    assert KEY_A not in secured.log()


async def test_auth_on_an_authenticated_connection_is_an_error(secured: Server) -> None:
    async with connect(ws_url(secured.url), additional_headers=bearer(KEY_A)) as ws:
        await send(ws, {"type": "auth", "token": KEY_B, "ref": 1})
        error = await recv(ws)
        assert (error["type"], error["code"], error["ref"]) == ("error", "already_authenticated", 1)
        await send(ws, {"type": "ping"})
        assert await recv(ws) == {"type": "pong"}


async def test_auth_on_an_open_gateway_is_answered_ok(gateway_url: str) -> None:
    """A client written for an authenticated gateway works against an open one as well."""
    async with connect(ws_url(gateway_url)) as ws:
        await send(ws, {"type": "auth", "token": "anything", "ref": "a"})
        assert await recv(ws) == {"type": "auth.ok", "ref": "a"}
        assert (await create(ws))["type"] == "run.created"


# Tenants.


@pytest.fixture(params=["memory", "redis"])
def secured_on_each_store(
    request: pytest.FixtureRequest, gateway_factory: GatewayFactory, mock_url: str
) -> Server:
    if request.param == "memory":
        return gateway_factory(**AUTHENTICATED)
    return gateway_factory(
        **AUTHENTICATED,
        TOKENRELAY_STORE__BACKEND="redis",
        TOKENRELAY_STORE__REDIS_URL=request.getfixturevalue("redis_url"),
        TOKENRELAY_STORE__KEY_PREFIX="ws-isolation:",
    )


async def test_another_tenants_run_is_not_found(secured_on_each_store: Server) -> None:
    url = ws_url(secured_on_each_store.url)
    async with (
        connect(url, additional_headers=bearer(KEY_A)) as owner,
        connect(url, additional_headers=bearer(KEY_B)) as stranger,
    ):
        created = await create(owner, tokens=500, itl_ms=20)
        run_id = created["run_id"]
        for message in (
            {"type": "run.subscribe", "ref": "s", "run_id": run_id},
            {"type": "run.cancel", "ref": "c", "run_id": run_id},
        ):
            await send(stranger, message)
            error = await recv(stranger)
            assert (error["type"], error["code"], error["ref"]) == (
                "error",
                "not_found",
                message["ref"],
            )
        # The owner's run goes on; the owner may cancel it.
        await send(owner, {"type": "run.cancel", "ref": "c", "run_id": run_id})
        frames = await read_until(
            owner, lambda frame: frame.get("run_id") == run_id and frame["type"] in TERMINAL
        )
    assert frames[-1]["type"] == "run.cancelled"


async def test_a_rate_limited_run_is_an_error_reply_and_the_connection_stays(
    gateway_factory: GatewayFactory, mock_url: str
) -> None:
    limited = gateway_factory(
        **AUTHENTICATED, TOKENRELAY_RATE_LIMITS__DEFAULT__REQUESTS_PER_MINUTE="1"
    )
    async with connect(ws_url(limited.url), additional_headers=bearer(KEY_A)) as ws:
        first = await create(ws, ref="1")
        assert first["type"] == "run.created"
        refused = await create(ws, ref="2")
        assert (refused["type"], refused["code"], refused["retryable"]) == (
            "error",
            "rate_limited",
            True,
        )
        assert refused["retry_after"] >= 1
        await send(ws, {"type": "ping", "ref": "p"})
        frames = await read_until(ws, lambda frame: frame.get("ref") == "p")
    assert frames[-1] == {"type": "pong", "ref": "p"}
    assert await upstream_requests(mock_url) == 1


# Origin.


@pytest.mark.parametrize("origin", [ALLOWED_ORIGIN, ALLOWED_ORIGIN + ":443", "own"])
async def test_the_gateways_own_and_allowed_origins_may_connect(
    secured: Server, origin: str
) -> None:
    if origin == "own":
        origin = secured.url
    async with connect(
        ws_url(secured.url), origin=Origin(origin), additional_headers=bearer(KEY_A)
    ) as ws:
        await send(ws, {"type": "ping"})
        assert await recv(ws) == {"type": "pong"}


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example.net",
        "http://app.example.com",  # the allowed origin's host, another scheme
        "https://app.example.com:8443",  # and another port
        "null",
        "own-other-port",
    ],
)
async def test_other_origins_are_refused_with_403_before_credentials(
    secured: Server, origin: str
) -> None:
    if origin == "own-other-port":
        origin = secured.url.rsplit(":", 1)[0] + ":1"
    refused = await refused_handshake(
        ws_url(secured.url), origin=Origin(origin), additional_headers=bearer(KEY_A)
    )
    assert refused.response.status_code == 403
    assert orjson.loads(refused.response.body)["code"] == "origin_not_allowed"


async def test_origin_is_checked_on_an_open_gateway_too(gateway_url: str) -> None:
    refused = await refused_handshake(
        ws_url(gateway_url), origin=Origin("https://evil.example.net")
    )
    assert refused.response.status_code == 403
    async with connect(ws_url(gateway_url), origin=Origin(gateway_url)) as ws:
        await send(ws, {"type": "ping"})
        assert await recv(ws) == {"type": "pong"}


async def test_refusals_leave_the_gateway_serving(secured: Server) -> None:
    for _ in range(3):
        await refused_handshake(ws_url(secured.url), origin=Origin("https://evil.example.net"))
        await refused_handshake(ws_url(secured.url), additional_headers=bearer("tr_wrong"))
    async with connect(ws_url(secured.url), additional_headers=bearer(KEY_B)) as ws:
        reply = await create(ws)
        events, _ = await asyncio.wait_for(read_runs(ws, runs=1), 10)
    assert content(events[reply["run_id"]]) == tokens(3)
