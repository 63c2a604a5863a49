"""CORS: browser pages of ``server.cors_origins`` may call the API, pages of other origins may not.

What a browser decides from: the preflight's ``Access-Control-Allow-*`` answer, and the
``Access-Control-Allow-Origin`` / ``-Expose-Headers`` of the real response. A gateway with no
``cors_origins`` answers no CORS header at all.
"""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest

from tests.conftest import GatewayFactory, Server

ALLOWED = "https://app.example.com"
OTHER = "https://evil.example.net"
RUN = {
    "model": "mock-model",
    "messages": [{"role": "user", "content": "hi"}],
    "mock": {"tokens": 2},
}


@pytest.fixture
def cors_gateway(gateway_factory: GatewayFactory, mock_url: str) -> Server:
    return gateway_factory(TOKENRELAY_SERVER__CORS_ORIGINS=json.dumps([ALLOWED]))


def preflight(url: str, origin: str, method: str = "POST", headers: str = "") -> httpx.Response:
    request_headers = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers:
        request_headers["Access-Control-Request-Headers"] = headers
    return httpx.options(url, headers=request_headers)


def cors_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("access-control-")}


def listed(value: str) -> set[str]:
    return {item.strip().lower() for item in value.split(",")}


def test_preflight_from_an_allowed_origin_gets_the_allow_headers(cors_gateway: Server) -> None:
    asked = "authorization, content-type, api-key, last-event-id, cache-control"
    response = preflight(cors_gateway.url + "/v1/runs", ALLOWED, headers=asked)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ALLOWED
    assert {"get", "post", "options"} <= listed(response.headers["access-control-allow-methods"])
    assert listed(asked) <= listed(response.headers["access-control-allow-headers"])
    assert "access-control-allow-credentials" not in response.headers  # no cookies are used
    assert "Origin" in response.headers["vary"]


def test_preflight_from_another_origin_is_refused(cors_gateway: Server) -> None:
    response = preflight(cors_gateway.url + "/v1/runs", OTHER, headers="authorization")
    assert response.status_code == 400
    # Without Access-Control-Allow-Origin the browser sends nothing; the other
    # Access-Control-* fields Starlette adds to the refusal allow nothing on their own.
    assert "access-control-allow-origin" not in response.headers


def test_preflight_for_a_method_the_api_does_not_offer_is_refused(cors_gateway: Server) -> None:
    response = preflight(cors_gateway.url + "/v1/runs", ALLOWED, method="DELETE")
    assert response.status_code == 400


def test_a_simple_request_from_another_origin_carries_no_allow_origin(
    cors_gateway: Server,
) -> None:
    response = httpx.get(cors_gateway.url + "/v1/models", headers={"Origin": OTHER})
    assert response.status_code == 200  # the browser, not the gateway, withholds the answer
    assert "access-control-allow-origin" not in response.headers


def test_a_run_from_an_allowed_origin_exposes_its_headers(cors_gateway: Server) -> None:
    with httpx.stream(
        "POST", cors_gateway.url + "/v1/runs", json=RUN, headers={"Origin": ALLOWED}, timeout=10
    ) as response:
        response.read()
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ALLOWED
    exposed = listed(response.headers["access-control-expose-headers"])
    assert {"x-run-id", "x-cache", "ratelimit", "ratelimit-policy", "retry-after"} <= exposed
    assert response.headers["x-run-id"]


def test_an_error_from_an_allowed_origin_is_readable(cors_gateway: Server) -> None:
    """A browser page must be able to read the problem document of a refused request."""
    response = httpx.post(
        cors_gateway.url + "/v1/runs", json={"model": "m"}, headers={"Origin": ALLOWED}
    )
    assert response.status_code == 422
    assert response.headers["access-control-allow-origin"] == ALLOWED


def test_without_cors_origins_no_origin_is_allowed(gateway_url: str) -> None:
    response = preflight(gateway_url + "/v1/runs", ALLOWED, headers="content-type")
    assert "access-control-allow-origin" not in response.headers
    simple = httpx.get(gateway_url + "/v1/models", headers={"Origin": ALLOWED})
    assert cors_headers(simple) == {}


def test_an_open_gateway_refuses_requests_addressed_to_another_host(gateway_url: str) -> None:
    """DNS rebinding: a page's own domain resolved to 127.0.0.1 reaches an open gateway as
    "same origin", past CORS; its Host header still names that domain."""
    rebound = httpx.post(
        gateway_url + "/v1/runs", json=RUN, headers={"Host": "evil.example.net:8080"}
    )
    assert rebound.status_code == 403
    assert rebound.headers["content-type"] == "application/problem+json"
    assert rebound.json()["code"] == "host_not_allowed"
    for host in ("localhost", "127.0.0.1:8080", "[::1]:8080"):
        response = httpx.post(gateway_url + "/v1/runs", json=RUN, headers={"Host": host})
        assert response.status_code == 200, host


def test_a_gateway_with_auth_does_not_check_the_host(gateway_factory: GatewayFactory) -> None:
    """With credentials required a rebinding page has nothing to gain (it has no key), and a
    gateway behind a proxy is addressed by its public name."""
    key = "tr_host_check_key_0123456789abcdef"
    digest = hashlib.sha256(key.encode()).hexdigest()
    server = gateway_factory(
        TOKENRELAY_AUTH__API_KEYS=json.dumps([{"name": "k", "tenant": "t", "sha256": digest}])
    )
    response = httpx.post(
        server.url + "/v1/runs",
        json=RUN,
        headers={"Host": "api.example.com", "Authorization": f"Bearer {key}"},
    )
    assert response.status_code == 200
