"""Per-tenant limits over HTTP: a real gateway process in front of the mock upstream.

Each test has a gateway of its own (its limits are its configuration), with the response cache
off so that every request really runs. Streams that must overlap are held open by the test
until every answer's status is known, so no count depends on how fast a stream ends.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson

from tests.conftest import GatewayFactory
from tokenrelay.guards.tokens import CHARS_PER_TOKEN, prompt_tokens

CHAT = "/v1/chat/completions"
# Streams that last far longer than any test holds them open.
ENDLESS = {"tokens": 1000, "itl_ms": 50}
FAST = {"tokens": 5, "itl_ms": 0}
NO_COMPRESSION = {"Accept-Encoding": "identity"}  # read the stream as it is sent


def limited(**limits: int) -> dict[str, str]:
    """Gateway environment: these limits for every tenant, no cache."""
    return {
        "TOKENRELAY_RATE_LIMITS__DEFAULT": orjson.dumps(limits).decode(),
        "TOKENRELAY_CACHE__ENABLED": "false",
    }


def chat(mock: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "model": "mock-model",
        "messages": [{"role": "user", "content": "hi"}],
        "mock": mock,
        **extra,
    }


def post(url: str, payload: dict[str, Any]) -> httpx.Response:
    return httpx.post(url + CHAT, json=payload, timeout=15)


def admitted_when_possible(url: str, payload: dict[str, Any], within: float = 15) -> httpx.Response:
    """Ask until the answer is not 429 (a freed slot, a refund are noticed asynchronously)."""
    deadline = time.monotonic() + within
    while True:
        response = post(url, payload)
        if response.status_code != 429 or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


def assert_rate_limited(response: httpx.Response, policy: str) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == "rate_limited" and problem["retryable"] is True
    retry_after = int(response.headers["retry-after"])
    assert retry_after >= 1
    assert response.headers["ratelimit"].startswith(f'"{policy}";r=')
    assert response.headers["ratelimit"].endswith(f";t={retry_after}")
    assert "ratelimit-policy" in response.headers


def remaining(response: httpx.Response, policy: str) -> int:
    name, left = response.headers["ratelimit"].split(";")[:2]
    assert name == f'"{policy}"', response.headers["ratelimit"]
    return int(left.removeprefix("r="))


@asynccontextmanager
async def held_open(
    url: str, payloads: list[dict[str, Any]]
) -> AsyncIterator[list[httpx.Response]]:
    """Send every request at once; the streams admitted stay open until the block ends."""
    async with httpx.AsyncClient(
        timeout=30, limits=httpx.Limits(max_connections=len(payloads)), headers=NO_COMPRESSION
    ) as client:
        requests = [client.build_request("POST", url + CHAT, json=p) for p in payloads]
        responses = await asyncio.gather(*(client.send(r, stream=True) for r in requests))
        try:
            for response in responses:
                if response.status_code != 200:
                    await response.aread()
            yield responses
        finally:
            await asyncio.gather(*(response.aclose() for response in responses))


def test_the_fourth_request_of_a_minute_is_refused_with_rate_limit_headers(
    gateway_factory: GatewayFactory, mock_url: str
) -> None:
    url = gateway_factory(**limited(requests_per_minute=3)).url
    answers = [post(url, chat(FAST)) for _ in range(4)]
    for left, answer in zip([2, 1, 0], answers, strict=False):
        assert answer.status_code == 200, answer.text
        assert answer.headers["ratelimit-policy"] == '"requests";q=3;w=60'
        assert remaining(answer, "requests") == left
        assert 1 <= int(answer.headers["ratelimit"].rsplit(";t=", 1)[1]) <= 60
    refused = answers[3]
    assert_rate_limited(refused, "requests")
    assert refused.headers["ratelimit-policy"] == '"requests";q=3;w=60'
    assert remaining(refused, "requests") == 0
    assert refused.json()["status"] == 429


async def test_only_two_of_ten_parallel_streams_run_with_a_limit_of_two(
    gateway_factory: GatewayFactory, mock_url: str
) -> None:
    url = gateway_factory(**limited(concurrent_streams=2)).url
    async with held_open(url, [chat(ENDLESS, stream=True) for _ in range(10)]) as responses:
        statuses = sorted(response.status_code for response in responses)
        assert statuses == [200] * 2 + [429] * 8
        for response in responses:
            if response.status_code == 200:
                assert response.headers["content-type"].startswith("text/event-stream")
                assert remaining(response, "streams") in (0, 1)
            else:
                assert_rate_limited(response, "streams")
                assert response.headers["ratelimit"] == '"streams";r=0;t=1'
        policy = responses[0].headers["ratelimit-policy"]
        assert policy == '"streams";q=2;qu="concurrent-requests"'
    # The clients left: their slots come back.
    assert admitted_when_possible(url, chat(FAST)).status_code == 200


async def test_a_parallel_burst_cannot_reserve_more_tokens_than_the_limit(
    gateway_factory: GatewayFactory, mock_url: str
) -> None:
    url = gateway_factory(**limited(tokens_per_minute=1000)).url
    payload = chat(ENDLESS, stream=True, max_tokens=200)
    reservation = prompt_tokens(payload) + 200
    fits = 1000 // reservation
    assert fits == 4  # the arithmetic of this test: 4 x 205 fit, 5 do not
    async with held_open(url, [payload] * 10) as responses:
        admitted = [r for r in responses if r.status_code == 200]
        assert len(admitted) == fits
        assert min(remaining(r, "tokens") for r in admitted) == 1000 - fits * reservation
        for response in responses:
            if response.status_code != 200:
                assert_rate_limited(response, "tokens")
                assert "tokens" in response.json()["detail"]


def read_content(pieces: Iterator[bytes], chunks: int) -> str:
    """Read an OpenAI stream until ``chunks`` content deltas arrived; their text.

    ``pieces`` is ``response.iter_bytes()``, kept by the caller: the connection closes once that
    iterator is dropped.
    """
    text, seen, buffer = "", 0, b""
    for piece in pieces:
        buffer += piece
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            if not event.startswith(b"data: "):
                continue  # a heartbeat comment
            data = event.removeprefix(b"data: ")
            if data == b"[DONE]":
                raise AssertionError("the stream ended before the test left it")
            for choice in orjson.loads(data)["choices"]:
                if choice["delta"].get("content"):
                    text += choice["delta"]["content"]
                    seen += 1
        if seen >= chunks:
            return text
    raise AssertionError("the stream ended before the test left it")


def test_a_client_that_leaves_mid_stream_is_charged_what_it_was_sent(
    gateway_factory: GatewayFactory, mock_url: str
) -> None:
    limit, long_answer = 100_000, 50_000
    url = gateway_factory(**limited(tokens_per_minute=limit)).url
    leaving = chat({"tokens": 1000, "itl_ms": 20}, stream=True, max_tokens=long_answer)
    with (
        httpx.Client(timeout=15, headers=NO_COMPRESSION) as client,
        client.stream("POST", url + CHAT, json=leaving) as response,
    ):
        assert response.status_code == 200
        sent = read_content(response.iter_bytes(), chunks=10)  # then it leaves
    # What the leaving client was sent, at least: its prompt and the text it read.
    charged_at_least = prompt_tokens(leaving) + math.ceil(len(sent) / CHARS_PER_TOKEN)
    probe = chat(FAST, max_tokens=5)
    probe_reserves = prompt_tokens(probe) + 5
    deadline = time.monotonic() + 15
    while True:
        answer = post(url, probe)
        assert answer.status_code == 200, answer.text
        left = remaining(answer, "tokens")
        if left > limit - prompt_tokens(leaving) - long_answer or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    # The unused reservation came back, and what was streamed stayed charged.
    assert left > limit - prompt_tokens(leaving) - long_answer
    assert left <= limit - charged_at_least - probe_reserves


def test_a_client_that_leaves_mid_stream_frees_its_slot(
    gateway_factory: GatewayFactory, mock_url: str
) -> None:
    url = gateway_factory(**limited(concurrent_streams=1)).url
    with (
        httpx.Client(timeout=15, headers=NO_COMPRESSION) as client,
        client.stream("POST", url + CHAT, json=chat(ENDLESS, stream=True)) as response,
    ):
        assert response.status_code == 200
        pieces = response.iter_bytes()
        read_content(pieces, chunks=2)
        assert_rate_limited(post(url, chat(FAST)), "streams")
        del pieces  # the client leaves
    answer = admitted_when_possible(url, chat(FAST))
    assert answer.status_code == 200, answer.text
    assert answer.headers["ratelimit"] == '"streams";r=0'
