"""Authentication over HTTP: a gateway started with API keys and JWTs configured by environment.

Every ``/v1`` route refuses a request without valid credentials with a 401 problem and an
RFC 6750 challenge; health checks stay open; no credential ever reaches the gateway's log.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import openai
import pytest

from tests.conftest import GatewayFactory, Server

API_KEY = "tr_http-test-key-Vh1cQ2mZr8sN4kLp0aXe7yTb3uWd6fJg9oIq5"
OTHER_KEY = "tr_http-test-wrong-key-that-nobody-configured-000000"
JWT_SECRET = "http-test-jwt-secret-" + "x" * 43  # 64 bytes
MESSAGES = [{"role": "user", "content": "Say three words."}]
CHALLENGE = 'Bearer realm="tokenrelay"'
INVALID_CHALLENGE = 'Bearer realm="tokenrelay", error="invalid_token"'


def auth_env(**extra: str) -> dict[str, str]:
    """Settings as an operator writes them: JSON values in TOKENRELAY_* variables."""
    keys = [{"name": "ci", "tenant": "t1", "sha256": hashlib.sha256(API_KEY.encode()).hexdigest()}]
    return {
        "TOKENRELAY_AUTH__API_KEYS": json.dumps(keys),
        "TOKENRELAY_AUTH__JWT": json.dumps({"algorithms": ["HS256"], "secret": JWT_SECRET}),
        **extra,
    }


@pytest.fixture(scope="module")
def secured(gateway_factory: GatewayFactory) -> Server:
    return gateway_factory(**auth_env())


def jwt_token(exp_offset: int = 300, **claims: Any) -> str:
    now = int(time.time())
    payload = {"sub": "svc-1", "tenant": "t1", "iat": now - 600, "exp": now + exp_offset, **claims}
    return jwt.encode(payload, JWT_SECRET, algorithm="HS256")


def chat_request(url: str, headers: dict[str, str]) -> httpx.Response:
    body = {"model": "mock-model", "messages": MESSAGES, "stream": True}
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=15)


def run_request(url: str, headers: dict[str, str]) -> httpx.Response:
    body = {"model": "mock-model", "messages": MESSAGES, "mock": {"tokens": 3}}
    return httpx.post(url + "/v1/runs", json=body, headers=headers, timeout=15)


def run_info_request(url: str, headers: dict[str, str]) -> httpx.Response:
    return httpx.get(url + "/v1/runs/run_does_not_matter", headers=headers, timeout=15)


def models_request(url: str, headers: dict[str, str]) -> httpx.Response:
    return httpx.get(url + "/v1/models", headers=headers, timeout=15)


ROUTES: list[Any] = [
    pytest.param(chat_request, id="POST /v1/chat/completions"),
    pytest.param(run_request, id="POST /v1/runs"),
    pytest.param(run_info_request, id="GET /v1/runs/{id}"),
    pytest.param(models_request, id="GET /v1/models"),
]
Request = Callable[[str, dict[str, str]], httpx.Response]


def assert_problem(response: httpx.Response, code: str, challenge: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"] == challenge
    problem = response.json()
    assert problem["status"] == 401
    assert problem["code"] == code
    assert problem["type"] == f"urn:tokenrelay:problem:{code}"
    assert problem["retryable"] is False


@pytest.mark.parametrize("send", ROUTES)
def test_no_credentials_is_401_missing_credentials(secured: Server, send: Request) -> None:
    assert_problem(send(secured.url, {}), "missing_credentials", CHALLENGE)


@pytest.mark.parametrize("send", ROUTES)
@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {OTHER_KEY}"},
        {"api-key": OTHER_KEY},
        {"Authorization": f"Bearer {jwt_token(tenant=None)}"},
    ],
    ids=["bearer", "api-key", "jwt-without-tenant"],
)
def test_invalid_credentials_is_401_with_invalid_token_challenge(
    secured: Server, send: Request, headers: dict[str, str]
) -> None:
    response = send(secured.url, headers)
    assert_problem(response, "invalid_credentials", INVALID_CHALLENGE)
    for value in headers.values():
        assert value.split()[-1] not in response.text


@pytest.mark.parametrize("send", ROUTES)
def test_expired_jwt_is_401_expired_credentials(secured: Server, send: Request) -> None:
    headers = {"Authorization": f"Bearer {jwt_token(exp_offset=-300)}"}
    assert_problem(send(secured.url, headers), "expired_credentials", INVALID_CHALLENGE)


@pytest.mark.parametrize(
    "headers",
    [{"Authorization": f"Bearer {API_KEY}"}, {"api-key": API_KEY}],
    ids=["bearer", "api-key"],
)
def test_valid_key_is_served_on_every_route(
    secured: Server, mock_url: str, headers: dict[str, str]
) -> None:
    assert models_request(secured.url, headers).status_code == 200
    chat = chat_request(secured.url, headers)
    assert chat.status_code == 200
    assert chat.text.rstrip().endswith("data: [DONE]")
    run = run_request(secured.url, headers)
    assert run.status_code == 200
    assert "event: run.completed" in run.text
    info = httpx.get(f"{secured.url}/v1/runs/{run.headers['x-run-id']}", headers=headers)
    assert info.status_code == 200
    assert info.json()["status"] == "completed"


def test_valid_jwt_is_served(secured: Server, mock_url: str) -> None:
    headers = {"Authorization": f"Bearer {jwt_token()}"}
    assert models_request(secured.url, headers).status_code == 200
    assert chat_request(secured.url, headers).status_code == 200


def test_the_openai_sdk_authenticates_with_its_api_key(secured: Server, mock_url: str) -> None:
    client = openai.OpenAI(base_url=secured.url + "/v1", api_key=API_KEY, max_retries=0)
    assert [model.id for model in client.models.list().data] == ["mock-model"]
    wrong = openai.OpenAI(base_url=secured.url + "/v1", api_key=OTHER_KEY, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.chat.completions.create(model="mock-model", messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.status_code == 401


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_checks_need_no_credentials(secured: Server, path: str) -> None:
    assert httpx.get(secured.url + path, timeout=15).status_code == 200


def test_a_missing_required_scope_is_403_insufficient_scope(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory(**auth_env(TOKENRELAY_AUTH__REQUIRED_SCOPES='["chat"]'))
    scoped = {"Authorization": f"Bearer {jwt_token(scope='chat runs')}"}
    unscoped = {"Authorization": f"Bearer {jwt_token(scope='runs')}"}
    assert models_request(gateway.url, scoped).status_code == 200
    for headers in (unscoped, {"api-key": API_KEY}):  # the configured key has no scopes
        response = models_request(gateway.url, headers)
        assert response.status_code == 403
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == "insufficient_scope"


def test_credentials_never_reach_the_log(gateway_factory: GatewayFactory, mock_url: str) -> None:
    # A gateway of its own, logging everything, so its log holds only these requests.
    gateway = gateway_factory(**auth_env(TOKENRELAY_SERVER__LOG_LEVEL="debug"))
    good_jwt, expired_jwt = jwt_token(), jwt_token(exp_offset=-300)
    secrets = [API_KEY, OTHER_KEY, good_jwt, expired_jwt, JWT_SECRET]
    for headers in (
        {"Authorization": f"Bearer {API_KEY}"},
        {"api-key": API_KEY},
        {"Authorization": f"Bearer {OTHER_KEY}"},
        {"Authorization": f"Bearer {good_jwt}"},
        {"Authorization": f"Bearer {expired_jwt}"},
    ):
        models_request(gateway.url, headers)
        run_request(gateway.url, headers)
    log = gateway.log()
    assert "authentication_refused" in log  # the log did record the refusals
    for secret in secrets:
        assert secret not in log
        assert secret[-16:] not in log  # nor a telling piece (a JWT's signature)
    assert hashlib.sha256(API_KEY.encode()).hexdigest() not in log
