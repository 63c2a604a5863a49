"""Two gateways on one Redis enforce one set of limits: a tenant cannot double its quota by
spreading its requests over instances.

Real processes (``tokenrelay serve``), the suite's redis-server, the session's mock upstream.
Each test starts its own pair under a key prefix of its own, so its counters start empty.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.api.test_rate_limits_http import (
    ENDLESS,
    FAST,
    NO_COMPRESSION,
    admitted_when_possible,
    assert_rate_limited,
    chat,
    limited,
    post,
    read_content,
    remaining,
)
from tests.conftest import Server
from tests.test_multi_instance import start_gateway

Pair = tuple[Server, Server]


@pytest.fixture
def instance_pair(
    mock_upstream: Server, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Pair]]:
    """Start two gateways sharing Redis and a key prefix, with these limits."""
    started: list[Server] = []

    def start(**limits: int) -> Pair:
        log_dir = tmp_path_factory.mktemp("limits")
        prefix = f"test:limits:{time.monotonic_ns()}:"
        env = limited(**limits)
        started.append(start_gateway(mock_upstream, redis_url, prefix, log_dir, **env))
        started.append(start_gateway(mock_upstream, redis_url, prefix, log_dir, **env))
        return started[-2], started[-1]

    yield start
    for server in started:
        server.stop()


def test_two_instances_share_one_request_limit(
    instance_pair: Callable[..., Pair], mock_url: str
) -> None:
    a, b = instance_pair(requests_per_minute=3)
    answers = [post(server.url, chat(FAST)) for server in (a, b, a)]
    assert [answer.status_code for answer in answers] == [200, 200, 200]
    assert [remaining(answer, "requests") for answer in answers] == [2, 1, 0]
    assert_rate_limited(post(b.url, chat(FAST)), "requests")
    assert_rate_limited(post(a.url, chat(FAST)), "requests")


def test_two_instances_share_one_stream_limit(
    instance_pair: Callable[..., Pair], mock_url: str
) -> None:
    a, b = instance_pair(concurrent_streams=1)
    with (
        httpx.Client(timeout=15, headers=NO_COMPRESSION) as client,
        client.stream(
            "POST", a.url + "/v1/chat/completions", json=chat(ENDLESS, stream=True)
        ) as streaming,
    ):
        assert streaming.status_code == 200
        pieces = streaming.iter_bytes()
        read_content(pieces, chunks=2)
        assert_rate_limited(post(b.url, chat(FAST)), "streams")
        assert_rate_limited(post(a.url, chat(FAST)), "streams")
        del pieces  # the client leaves
    # The stream on a ended: its slot is free for b.
    answer = admitted_when_possible(b.url, chat(FAST))
    assert answer.status_code == 200, answer.text
