"""The response cache and coalescing over HTTP: a gateway process in front of the mock upstream.

The mock counts the requests it receives (``/mock/stats``), which is what the cache saves. Every
test asks its own question (a prompt with a fresh id), so answers cached by earlier tests of the
same gateway never meet it. Parallel requests are checked for what holds whatever their timing:
exactly one of them reaches the upstream, every other one either joins its run in flight
(``X-Coalesced: true``) or, arriving after its end, replays the stored answer (``X-Cache: hit``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import FAST_TIMEOUTS, Server

GatewayFactory = Callable[..., Server]
TIMEOUT = 30.0
FRAME = re.compile(rb"id: (\d+)\nevent: ([a-z_.]+)\ndata: ([^\n]*)\n\n")
# A generation long enough that identical requests sent together find it in flight.
SLOW = {"tokens": 20, "itl_ms": 50}


def question(**mock: Any) -> dict[str, Any]:
    """A deterministic request (temperature 0) nobody has asked before."""
    return {
        "model": "mock-model",
        "messages": [{"role": "user", "content": f"Question {uuid.uuid4().hex}"}],
        "temperature": 0,
        "mock": {"tokens": 5, **mock},
    }


def chat(
    base_url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> httpx.Response:
    return httpx.post(
        base_url + "/v1/chat/completions", json=body, headers=headers, timeout=TIMEOUT
    )


def upstream_requests(mock_url: str) -> int:
    count: int = httpx.get(mock_url + "/mock/stats").json()["requests"]
    return count


def sdk(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="sk-test", max_retries=0)


def assert_one_generation(responses: list[httpx.Response]) -> None:
    """One request started the run; every other one joined it or replayed its answer."""
    kinds = [
        "coalesced" if r.headers.get("x-coalesced") == "true" else r.headers["x-cache"]
        for r in responses
    ]
    assert kinds.count("miss") == 1, kinds
    assert set(kinds) <= {"miss", "coalesced", "hit"}, kinds


# Hits


def test_a_second_identical_request_is_a_byte_identical_hit(
    gateway_url: str, mock_url: str
) -> None:
    body = question()
    first = chat(gateway_url, body)
    second = chat(gateway_url, body)
    assert first.status_code == second.status_code == 200
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
    assert "x-coalesced" not in second.headers
    assert second.content == first.content
    assert second.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3 tok4 "
    assert second.headers["x-run-id"] != first.headers["x-run-id"]
    assert upstream_requests(mock_url) == 1


def test_a_streamed_hit_is_byte_identical(gateway_url: str, mock_url: str) -> None:
    body = {**question(), "stream": True}
    first, second = chat(gateway_url, body), chat(gateway_url, body)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
    assert second.headers["content-type"].startswith("text/event-stream")
    assert second.content == first.content
    assert second.content.endswith(b"data: [DONE]\n\n")
    assert upstream_requests(mock_url) == 1


def test_streamed_and_whole_requests_share_one_answer(gateway_url: str, mock_url: str) -> None:
    body = question()
    streamed = chat(
        gateway_url, {**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    whole = chat(gateway_url, body)
    assert (streamed.headers["x-cache"], whole.headers["x-cache"]) == ("miss", "hit")
    assert whole.json()["usage"]["completion_tokens"] == 5
    assert upstream_requests(mock_url) == 1


def test_the_sdk_parses_a_hit_exactly_like_a_miss(gateway_url: str, mock_url: str) -> None:
    create = sdk(gateway_url).chat.completions.with_raw_response.create

    def whole(messages: list[Any]) -> tuple[str, dict[str, Any]]:
        raw = create(model="mock-model", messages=messages, temperature=0)
        return raw.headers["x-cache"], raw.parse().model_dump()

    def streamed(messages: list[Any]) -> tuple[str, list[dict[str, Any]]]:
        raw = create(
            model="mock-model",
            messages=messages,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        return raw.headers["x-cache"], [chunk.model_dump() for chunk in raw.parse()]

    asked_whole, asked_streamed = question()["messages"], question()["messages"]
    (miss, completion), (hit, replayed) = whole(asked_whole), whole(asked_whole)
    assert (miss, hit) == ("miss", "hit")
    assert replayed == completion
    assert completion["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3 tok4 "
    (miss, chunks), (hit, replayed_chunks) = streamed(asked_streamed), streamed(asked_streamed)
    assert (miss, hit) == ("miss", "hit")
    assert replayed_chunks == chunks
    text = "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks if c["choices"])
    assert text == "tok0 tok1 tok2 tok3 tok4 "
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    assert upstream_requests(mock_url) == 2


def parse_frames(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    return [(m.group(2).decode(), json.loads(m.group(3))) for m in FRAME.finditer(raw)]


def test_a_native_run_is_replayed_as_a_new_run(gateway_url: str, mock_url: str) -> None:
    body = question()
    first = httpx.post(gateway_url + "/v1/runs", json=body, timeout=TIMEOUT)
    second = httpx.post(gateway_url + "/v1/runs", json=body, timeout=TIMEOUT)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
    missed, hit = parse_frames(first.content), parse_frames(second.content)
    assert hit[0][1]["run_id"] == second.headers["x-run-id"] != first.headers["x-run-id"]
    for _, data in (missed[0], hit[0]):
        data.pop("run_id")
    assert hit == missed
    assert [kind for kind, _ in hit][-1] == "run.completed"
    replayed = httpx.get(f"{gateway_url}/v1/runs/{second.headers['x-run-id']}/events")
    assert parse_frames(replayed.content)[1:] == hit[1:]  # a replay is a run like any other
    assert upstream_requests(mock_url) == 1


# When the cache stays out of the way


def test_no_cache_asks_the_upstream_again(gateway_url: str, mock_url: str) -> None:
    body = question()
    chat(gateway_url, body)
    fresh = chat(gateway_url, body, {"Cache-Control": "no-cache"})
    assert fresh.status_code == 200
    assert fresh.headers["x-cache"] == "miss"
    assert upstream_requests(mock_url) == 2
    assert chat(gateway_url, body).headers["x-cache"] == "hit"


def test_no_store_bypasses_and_stores_nothing(gateway_url: str, mock_url: str) -> None:
    body = question()
    bypassed = chat(gateway_url, body, {"Cache-Control": "no-store"})
    assert bypassed.status_code == 200
    assert bypassed.headers["x-cache"] == "bypass"
    assert chat(gateway_url, body).headers["x-cache"] == "miss"
    assert upstream_requests(mock_url) == 2


def test_a_sampled_request_bypasses_the_cache(gateway_url: str, mock_url: str) -> None:
    body = {**question(), "temperature": 0.7}
    kinds = [chat(gateway_url, body).headers["x-cache"] for _ in range(2)]
    assert kinds == ["bypass", "bypass"]
    assert upstream_requests(mock_url) == 2


def test_a_failed_run_is_not_stored(gateway_url: str, mock_url: str) -> None:
    body = {**question(error_after=2), "stream": True}
    for _ in range(2):
        failed = chat(gateway_url, body)
        assert failed.status_code == 200  # the stream had started: the error is its last chunk
        assert failed.headers["x-cache"] == "miss"
        assert b'"error"' in failed.content
    assert upstream_requests(mock_url) == 2


# Tenants


@pytest.fixture(scope="module", params=["memory", "redis"])
def two_tenants(
    request: pytest.FixtureRequest, gateway_factory: GatewayFactory
) -> tuple[Server, dict[str, str]]:
    """A gateway with one API key for tenant t1 and one for t2, and those keys."""
    keys = {tenant: "tr_" + secrets.token_urlsafe(32) for tenant in ("t1", "t2")}
    settings = [
        {"name": tenant, "tenant": tenant, "sha256": hashlib.sha256(key.encode()).hexdigest()}
        for tenant, key in keys.items()
    ]
    env = {**FAST_TIMEOUTS, "TOKENRELAY_AUTH__API_KEYS": json.dumps(settings)}
    if request.param == "redis":
        env |= {
            "TOKENRELAY_STORE__BACKEND": "redis",
            "TOKENRELAY_STORE__REDIS_URL": request.getfixturevalue("redis_url"),
            "TOKENRELAY_STORE__KEY_PREFIX": f"cache-tenants-{secrets.token_hex(4)}:",
        }
    return gateway_factory(**env), keys


def test_tenants_never_share_answers(
    two_tenants: tuple[Server, dict[str, str]], mock_url: str
) -> None:
    server, keys = two_tenants
    body = question()

    def ask(tenant: str) -> str:
        response = chat(server.url, body, {"Authorization": f"Bearer {keys[tenant]}"})
        assert response.status_code == 200
        return response.headers["x-cache"]

    assert [ask("t1"), ask("t1"), ask("t2"), ask("t2")] == ["miss", "hit", "miss", "hit"]
    assert upstream_requests(mock_url) == 2


# Coalescing


async def stream_all(base_url: str, body: dict[str, Any], count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base_url, timeout=TIMEOUT) as client:
        return await asyncio.gather(
            *(client.post("/v1/chat/completions", json=body) for _ in range(count))
        )


async def test_identical_requests_together_reach_the_upstream_once(
    gateway_url: str, mock_url: str
) -> None:
    body = {**question(**SLOW), "stream": True}
    responses = await stream_all(gateway_url, body, 10)
    assert [r.status_code for r in responses] == [200] * 10
    assert_one_generation(responses)
    assert all(r.content == responses[0].content for r in responses)  # all of it, from the start
    assert responses[0].content.count(b'"content":"tok') == 20
    assert upstream_requests(mock_url) == 1


async def test_a_reader_leaving_does_not_cut_the_others(gateway_url: str, mock_url: str) -> None:
    body = {**question(tokens=40, itl_ms=50), "stream": True}
    async with httpx.AsyncClient(base_url=gateway_url, timeout=TIMEOUT) as client:
        # The request that starts the generation leaves once the others have joined it.
        async with client.stream("POST", "/v1/chat/completions", json=body) as leaving:
            assert leaving.headers["x-cache"] == "miss"
            others = [
                await client.send(
                    client.build_request("POST", "/v1/chat/completions", json=body), stream=True
                )
                for _ in range(4)
            ]
            async for _ in leaving.aiter_bytes():
                break
        contents = [await response.aread() for response in others]
        for response in others:
            await response.aclose()
    assert all(content == contents[0] for content in contents)
    assert contents[0].count(b'"content":"tok') == 40
    assert contents[0].endswith(b"data: [DONE]\n\n")
    assert upstream_requests(mock_url) == 1


async def test_a_shared_failure_reaches_every_request(gateway_url: str, mock_url: str) -> None:
    # The failure comes seconds after the first token: time enough for all to have joined.
    body = {**question(tokens=20, itl_ms=300, error_after=8), "stream": True}
    responses = await stream_all(gateway_url, body, 6)
    assert_one_generation(responses)
    assert {r.headers.get("x-cache") for r in responses} == {"miss"}  # never stored
    assert all(r.content == responses[0].content for r in responses)
    last = responses[0].content.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert json.loads(last.removeprefix(b"data: "))["error"]["code"] == "upstream_stream_error"
    assert upstream_requests(mock_url) == 1


# The Redis store


@pytest.fixture
def redis_gateway(gateway_factory: GatewayFactory, redis_url: str, redis_prefix: str) -> Server:
    return gateway_factory(
        **FAST_TIMEOUTS,
        TOKENRELAY_STORE__BACKEND="redis",
        TOKENRELAY_STORE__REDIS_URL=redis_url,
        TOKENRELAY_STORE__KEY_PREFIX=redis_prefix,
    )


def test_a_hit_from_the_redis_store(redis_gateway: Server, mock_url: str) -> None:
    body = question()
    first, second = chat(redis_gateway.url, body), chat(redis_gateway.url, body)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
    assert second.content == first.content
    assert upstream_requests(mock_url) == 1


async def test_coalescing_on_the_redis_store(redis_gateway: Server, mock_url: str) -> None:
    body = {**question(**SLOW), "stream": True}
    responses = await stream_all(redis_gateway.url, body, 10)
    assert_one_generation(responses)
    assert all(r.content == responses[0].content for r in responses)
    assert upstream_requests(mock_url) == 1


async def test_two_instances_share_answers_and_generations(
    redis_gateway: Server, gateway_factory: GatewayFactory, mock_url: str
) -> None:
    # A second process on the same Redis and prefix (the extra variable only makes it another).
    other = gateway_factory(**redis_gateway.env, TOKENRELAY_SERVER__LOG_LEVEL="info")
    body = {**question(**SLOW), "stream": True}
    together = await asyncio.gather(
        stream_all(redis_gateway.url, body, 4), stream_all(other.url, body, 4)
    )
    responses = [*together[0], *together[1]]
    assert_one_generation(responses)
    assert all(r.content == responses[0].content for r in responses)
    later = chat(other.url, body)
    assert later.headers["x-cache"] == "hit"
    assert later.content == responses[0].content
    assert upstream_requests(mock_url) == 1
