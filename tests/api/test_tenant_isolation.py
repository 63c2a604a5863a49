"""Tenants never see each other's runs: another tenant's run id is "not found", on every endpoint.

A 404 (not a 403) for someone else's id, worded like the 404 of an id that never existed, so the
answer says nothing about which ids exist. Checked on the memory store and on Redis.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import httpx
import pytest

from tests.conftest import GatewayFactory

KEY_A, KEY_B = "tr_test_key_of_tenant_a_0123456789", "tr_test_key_of_tenant_b_0123456789"


def api_keys_env(keys: dict[str, str]) -> dict[str, str]:
    """``TOKENRELAY_AUTH__API_KEYS`` for keys -> tenants."""
    entries = [
        {
            "name": f"key-{tenant}",
            "tenant": tenant,
            "sha256": hashlib.sha256(key.encode()).hexdigest(),
        }
        for key, tenant in keys.items()
    ]
    return {"TOKENRELAY_AUTH__API_KEYS": json.dumps(entries)}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def slow_run(**extra: Any) -> dict[str, Any]:
    return {
        "model": "mock-model",
        "messages": [{"role": "user", "content": "hi"}],
        "mock": {"tokens": 200, "itl_ms": 20},
        "detach": True,
        **extra,
    }


@pytest.fixture(params=["memory", "redis"])
def gateway_url(request: pytest.FixtureRequest, gateway_factory: GatewayFactory) -> str:
    env = api_keys_env({KEY_A: "tenant-a", KEY_B: "tenant-b"})
    if request.param == "redis":
        env |= {
            "TOKENRELAY_STORE__BACKEND": "redis",
            "TOKENRELAY_STORE__REDIS_URL": request.getfixturevalue("redis_url"),
            "TOKENRELAY_STORE__KEY_PREFIX": "isolation:",
        }
    return gateway_factory(**env).url


def start_detached(url: str, key: str) -> str:
    """Start a long detached run as the owner of ``key``; returns its id."""
    with (
        httpx.Client(timeout=10) as client,
        client.stream("POST", url + "/v1/runs", json=slow_run(), headers=auth(key)) as reply,
    ):
        assert reply.status_code == 200
        return reply.headers["x-run-id"]


def not_found_shape(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == "not_found"
    return {k: v for k, v in problem.items() if k not in ("detail", "request_id")}


def test_another_tenants_run_is_not_found_on_every_endpoint(gateway_url: str) -> None:
    run_id = start_detached(gateway_url, KEY_A)
    never_existed = "run_" + "0" * 24
    with httpx.Client(base_url=gateway_url, timeout=10, headers=auth(KEY_B)) as client:
        for method, path in [
            ("GET", "/v1/runs/{}"),
            ("GET", "/v1/runs/{}/events"),
            ("GET", "/v1/runs/{}/events?after=3"),
            ("POST", "/v1/runs/{}/cancel"),
        ]:
            theirs = client.request(method, path.format(run_id))
            unknown = client.request(method, path.format(never_existed))
            # The same answer as for an id that never existed: no existence oracle.
            assert not_found_shape(theirs) == not_found_shape(unknown), (method, path)
            assert run_id not in theirs.text.replace(f"run {run_id}", "")

    # Tenant B's cancel did nothing: the owner still sees its run going on and can read it.
    with httpx.Client(base_url=gateway_url, timeout=10, headers=auth(KEY_A)) as client:
        record = client.get(f"/v1/runs/{run_id}")
        assert record.status_code == 200
        assert record.json()["status"] == "running"
        events = client.get(f"/v1/runs/{run_id}/events", params={"after": 0})
        assert events.status_code == 200
        assert "event: message.delta" in events.text
        assert client.post(f"/v1/runs/{run_id}/cancel").status_code == 200


def test_the_owner_can_cancel_and_the_other_tenant_still_cannot_see_the_end(
    gateway_url: str,
) -> None:
    run_id = start_detached(gateway_url, KEY_A)
    with httpx.Client(base_url=gateway_url, timeout=10) as client:
        cancelled = client.post(f"/v1/runs/{run_id}/cancel", headers=auth(KEY_A))
        assert cancelled.status_code == 200
        assert cancelled.json()["status"] == "cancelled"
        not_found_shape(client.get(f"/v1/runs/{run_id}", headers=auth(KEY_B)))
