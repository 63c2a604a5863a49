"""The public API fuzzed from its own OpenAPI document: no input makes the gateway fail (5xx).

schemathesis generates requests for every operation of ``/openapi.json`` (valid ones and ones
that break the schema: wrong types, missing fields, odd strings and headers) and sends them to a
real gateway relaying the mock upstream (no delay between tokens, so every stream ends at once).
Bounded and derandomized: the same cases on every run, well under a minute in all.

Two gateways: an open one, and one with API keys, fuzzed with the key (the routes behind
authentication are reached) and with whatever credentials schemathesis makes up (the 401 path).
Every refusal must be a problem document, as the API promises.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case, CheckContext, GenerationMode, Response
from schemathesis.checks import not_a_server_error

from tests.conftest import GatewayFactory, Server
from tokenrelay.app import create_app
from tokenrelay.config import Settings

KEY = "tr_fuzzing_key_0123456789abcdef0123456789"
BOUNDED = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


# The document the gateway serves, built from the same app (collection needs it before any
# gateway runs; test_the_schema_is_the_one_served checks that it is the served one).
SCHEMA = create_app(Settings()).openapi()

api = schemathesis.openapi.from_dict(SCHEMA)
api.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], deterministic=True
)


@pytest.fixture(scope="module")
def secured_url(gateway_factory: GatewayFactory) -> str:
    sha256 = hashlib.sha256(KEY.encode()).hexdigest()
    keys = [{"name": "fuzz", "tenant": "fuzz", "sha256": sha256}]
    return gateway_factory(TOKENRELAY_AUTH__API_KEYS=json.dumps(keys)).url


def test_the_schema_is_the_one_served(gateway_url: str) -> None:
    assert httpx.get(gateway_url + "/openapi.json").json() == SCHEMA


def refusals_are_problems(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """Every 4xx and 5xx answer is ``application/problem+json`` with a stable ``code``."""
    if response.status_code < 400:
        return None
    media_type = response.headers.get("content-type", [""])[0]
    assert media_type == "application/problem+json", (response.status_code, media_type)
    document: dict[str, Any] = json.loads(response.content)
    assert document["status"] == response.status_code
    assert document["code"], document
    return True


CHECKS = [not_a_server_error, refusals_are_problems]


@api.parametrize()
@BOUNDED
def test_open_gateway_never_fails(case: Case, gateway: Server) -> None:
    case.call_and_validate(base_url=gateway.url, checks=CHECKS, timeout=30)


@api.parametrize()
@BOUNDED
def test_secured_gateway_never_fails(case: Case, secured_url: str) -> None:
    # With the credentials schemathesis makes up (none, or garbage: 401), then with the key in
    # both headers, replacing made-up ones (two different credentials are refused).
    case.call_and_validate(base_url=secured_url, checks=CHECKS, timeout=30)
    credentials = {"Authorization": f"Bearer {KEY}", "api-key": KEY}
    case.call_and_validate(base_url=secured_url, checks=CHECKS, timeout=30, headers=credentials)
