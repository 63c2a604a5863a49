"""Probes and the published API reference."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

PROBLEM = "application/problem+json"
ROUTES = {
    "/v1/chat/completions": {"post"},
    "/v1/runs": {"post"},
    "/v1/runs/{run_id}": {"get"},
    "/v1/runs/{run_id}/events": {"get"},
    "/v1/runs/{run_id}/cancel": {"post"},
    "/v1/models": {"get"},
    "/healthz": {"get"},
    "/readyz": {"get"},
}


@pytest.fixture
def openapi(gateway_url: str) -> dict[str, Any]:
    response = httpx.get(gateway_url + "/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    spec: dict[str, Any] = response.json()
    return spec


def test_healthz(gateway_url: str) -> None:
    response = httpx.get(gateway_url + "/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert response.headers["x-request-id"]


def test_readyz(gateway_url: str) -> None:
    response = httpx.get(gateway_url + "/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    assert body["active_runs"] == 0


def test_openapi_lists_exactly_the_real_routes(openapi: dict[str, Any]) -> None:
    assert openapi["openapi"].startswith("3.")
    assert openapi["info"]["title"] == "tokenrelay"
    paths = {path: set(operations) for path, operations in openapi["paths"].items()}
    assert paths == ROUTES


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/runs"])
def test_openapi_documents_problems_and_streams(openapi: dict[str, Any], path: str) -> None:
    responses = openapi["paths"][path]["post"]["responses"]
    for status in ("400", "413", "422", "502", "503", "504"):
        schema = responses[status]["content"][PROBLEM]["schema"]
        assert {"code", "status", "title", "detail", "retryable"} <= set(schema["required"])
        assert "errors" in schema["properties"]
    assert "text/event-stream" in responses["200"]["content"]
    assert "X-Run-Id" in responses["200"]["headers"]
    request_body = openapi["paths"][path]["post"]["requestBody"]
    assert request_body["required"] is True
    assert "application/json" in request_body["content"]


def test_openapi_documents_what_runs_serves(openapi: dict[str, Any]) -> None:
    responses = openapi["paths"]["/v1/runs"]["post"]["responses"]
    assert "TokenRelay-Event-Version" in responses["200"]["headers"]
    # /v1/runs only ever streams; its refusals are problems like every other error.
    assert set(responses["200"]["content"]) == {"text/event-stream", "application/x-ndjson"}
    assert PROBLEM in responses["406"].get("content", {})


def test_openapi_describes_the_request_schema(openapi: dict[str, Any]) -> None:
    schemas = openapi["components"]["schemas"]
    request = schemas["ChatCompletionRequest"]
    assert set(request["required"]) == {"model", "messages"}
    assert {"temperature", "top_p", "n", "max_tokens", "stop", "tools"} <= set(
        request["properties"]
    )


def test_docs_serve_html(gateway_url: str) -> None:
    response = httpx.get(gateway_url + "/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "swagger" in response.text.lower()
    assert "/openapi.json" in response.text
