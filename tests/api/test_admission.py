"""Global admission control: past its caps the gateway sheds new runs with 503 at once.

Caps are per process: runs driven at once (``admission.max_open_streams``) and runs still waiting
for their upstream's first answer (``admission.max_pending_starts``). A parallel burst must not
slip past them, shed requests never reach the upstream, and readiness reports the overload.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import httpx

from tests.conftest import GatewayFactory


def run_body(mock: dict[str, Any]) -> dict[str, Any]:
    return {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "mock": mock}


async def burst(url: str, count: int, mock: dict[str, Any]) -> tuple[list[int], dict[str, Any]]:
    """Open ``count`` streams at once; returns their statuses, the 503s' problem and readiness."""
    statuses: list[int] = []
    shed: dict[str, Any] = {}
    async with contextlib.AsyncExitStack() as stack:
        client = await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=15))

        async def open_one() -> None:
            response = await stack.enter_async_context(
                client.stream("POST", "/v1/runs", json=run_body(mock))
            )
            statuses.append(response.status_code)
            if response.status_code == 503:
                await response.aread()
                shed.update(
                    problem=response.json(),
                    retry_after=response.headers.get("retry-after"),
                )

        await asyncio.gather(*(open_one() for _ in range(count)))
        ready = await client.get("/readyz")
        shed["ready"] = (ready.status_code, ready.json()["status"])
    return statuses, shed


async def test_a_burst_past_the_open_stream_cap_gets_503_at_once(
    gateway_factory: GatewayFactory, mock_url: str
) -> None:
    url = gateway_factory(TOKENRELAY_ADMISSION__MAX_OPEN_STREAMS="3").url
    statuses, shed = await burst(url, 10, {"tokens": 100, "itl_ms": 50})
    assert sorted(statuses) == [200] * 3 + [503] * 7
    assert shed["problem"]["code"] == "overloaded"
    assert shed["problem"]["retryable"] is True
    assert shed["retry_after"] == "1"
    assert shed["ready"] == (503, "overloaded")
    async with httpx.AsyncClient(timeout=10) as client:
        # The shed requests never reached the upstream.
        assert (await client.get(mock_url + "/mock/stats")).json()["requests"] == 3
        # Once the streams are gone, the gateway takes runs again.
        for _ in range(100):
            if (await client.get(url + "/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        response = await client.post(url + "/v1/runs", json=run_body({"tokens": 2}))
        assert response.status_code == 200


async def test_runs_waiting_for_a_slow_upstream_are_capped(
    gateway_factory: GatewayFactory, mock_url: str
) -> None:
    url = gateway_factory(
        TOKENRELAY_ADMISSION__MAX_PENDING_STARTS="2", TOKENRELAY_ADMISSION__RETRY_AFTER="3"
    ).url
    statuses, shed = await burst(url, 6, {"tokens": 2, "ttft_ms": 1500})
    assert sorted(statuses) == [200] * 2 + [503] * 4
    assert shed["problem"]["code"] == "overloaded"
    assert shed["retry_after"] == "3"
