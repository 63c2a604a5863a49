"""Several gateways on one Redis: any instance serves any run, and Redis outages end streams
with a typed terminal event instead of hanging them.

Real processes (``tokenrelay serve``), a real redis-server, the session's mock upstream.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.api.test_resume import (
    Frame,
    assert_consecutive,
    assert_every_event_once,
    body,
    content,
    parse_frames,
    read_until,
    resume,
    tokens,
)
from tests.conftest import FAST_TIMEOUTS, RedisServer, Server, free_port, start_server


def start_gateway(
    mock_upstream: Server, redis_url: str, prefix: str, log_dir: Path, **env: str
) -> Server:
    port = free_port()
    return start_server(
        ["serve", "--port", str(port), "--upstream", mock_upstream.url + "/v1"],
        "/readyz",
        port,
        log_dir / f"gateway-{port}.log",
        {
            **FAST_TIMEOUTS,
            "TOKENRELAY_STORE__BACKEND": "redis",
            "TOKENRELAY_STORE__REDIS_URL": redis_url,
            "TOKENRELAY_STORE__KEY_PREFIX": prefix,
            "TOKENRELAY_STORE__SOCKET_TIMEOUT": "1",
            **env,
        },
    )


@pytest.fixture(scope="module")
def instances(
    mock_upstream: Server, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Server]]:
    """Two gateways sharing the suite's Redis and a key prefix: one deployment, two instances."""
    log_dir = tmp_path_factory.mktemp("instances")
    prefix = f"test:multi:{time.monotonic_ns()}:"
    first = start_gateway(mock_upstream, redis_url, prefix, log_dir)
    try:
        second = start_gateway(mock_upstream, redis_url, prefix, log_dir)
    except BaseException:
        first.stop()
        raise
    yield first, second
    first.stop()
    second.stop()


def stream_in_background(
    pool: ThreadPoolExecutor, url: str, path: str, json: object | None = None
) -> Future[list[Frame]]:
    """Read a whole stream in a thread; the future holds its frames."""

    def read() -> list[Frame]:
        method = "GET" if json is None else "POST"
        response = httpx.request(method, url + path, json=json, timeout=20)
        assert response.status_code == 200, response.text
        return parse_frames(response.content)

    return pool.submit(read)


def wait_for_status(url: str, run_id: str, status: str, within: float = 10) -> dict[str, object]:
    deadline = time.monotonic() + within
    while True:
        info: dict[str, object] = httpx.get(f"{url}/v1/runs/{run_id}").json()
        if info["status"] == status:
            return info
        assert time.monotonic() < deadline, info
        time.sleep(0.05)


def test_a_run_started_on_one_instance_is_followed_from_another(
    instances: tuple[Server, Server], mock_url: str
) -> None:
    a, b = instances
    run_id, seen = read_until(a.url, body({"tokens": 20, "itl_ms": 30}), stop_after_seq=3)
    with ThreadPoolExecutor(2) as pool:
        follower = stream_in_background(pool, b.url, f"/v1/runs/{run_id}/events")
        followed = follower.result(timeout=20)
    assert followed[:3] == seen  # from the start, live, on the other instance
    assert_every_event_once(followed, 20)
    info = httpx.get(f"{b.url}/v1/runs/{run_id}").json()
    assert info["status"] == "completed" and info["id"] == run_id


def test_a_reader_that_left_one_instance_resumes_on_another(
    instances: tuple[Server, Server], mock_url: str
) -> None:
    a, b = instances
    run_id, seen = read_until(a.url, body({"tokens": 20, "itl_ms": 30}), stop_after_seq=6)
    running = httpx.get(f"{b.url}/v1/runs/{run_id}").json()
    assert running["status"] == "running" and running["id"] == run_id
    response = resume(b.url, run_id, headers={"Last-Event-ID": str(seen[-1].seq)})
    assert response.status_code == 200
    rest = parse_frames(response.content)
    assert rest[0].seq == seen[-1].seq + 1  # exactly the remaining events
    assert_every_event_once(seen + rest, 20)


def test_cancel_on_one_instance_ends_the_run_on_the_instance_driving_it(
    instances: tuple[Server, Server], mock_url: str
) -> None:
    a, b = instances
    raw = b""
    with (
        httpx.Client(timeout=10) as client,
        client.stream("POST", a.url + "/v1/runs", json=body({"tokens": 500, "itl_ms": 20})) as r,
    ):
        run_id = r.headers["x-run-id"]
        pieces = r.iter_bytes()  # decoded: the stream may be compressed
        for piece in pieces:
            raw += piece
            if len(parse_frames(raw[: raw.rfind(b"\n\n") + 2])) >= 3:
                break
        response = httpx.post(f"{b.url}/v1/runs/{run_id}/cancel")
        assert response.status_code == 202  # B does not drive the run: it asked A to cancel it
        for piece in pieces:  # A's stream goes on to its end
            raw += piece
    frames = parse_frames(raw)
    assert frames[-1].type == "run.cancelled"
    assert frames[-1].data == {"reason": "cancelled"}
    assert content(frames).count("tok") < 500
    info = wait_for_status(b.url, run_id, "cancelled")
    assert info["error_code"] == "cancelled"


def test_a_detached_run_completes_with_no_reader_and_is_readable_elsewhere(
    instances: tuple[Server, Server], mock_url: str
) -> None:
    a, b = instances
    run_id, _ = read_until(a.url, body({"tokens": 15, "itl_ms": 20}, detach=True), stop_after_seq=3)
    info = wait_for_status(b.url, run_id, "completed")
    assert info["detached"] is True
    frames = parse_frames(resume(b.url, run_id).content)
    assert frames[0].seq == 1
    assert content(frames) == tokens(15)
    assert frames[-1].type == "run.completed"


def test_streams_end_with_run_failed_when_redis_dies_and_runs_start_again_once_back(
    mock_upstream: Server, mock_url: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    prefix = "test:outage:"
    a = start_gateway(mock_upstream, redis_server.url, prefix, tmp_path)
    b = start_gateway(mock_upstream, redis_server.url, prefix, tmp_path)
    try:
        run_id, seen = read_until(
            a.url, body({"tokens": 400, "itl_ms": 20}, detach=True), stop_after_seq=3
        )
        with ThreadPoolExecutor(2) as pool:
            driven = stream_in_background(
                pool, a.url, f"/v1/runs/{run_id}/events?after={seen[-1].seq}"
            )
            followed = stream_in_background(pool, b.url, f"/v1/runs/{run_id}/events")
            time.sleep(0.5)
            assert not driven.done() and not followed.done()
            redis_server.kill()
            killed = time.monotonic()
            streams = [driven.result(timeout=10), followed.result(timeout=10)]
            print(f"streams ended {time.monotonic() - killed:.2f} s after Redis died")
        for frames, first_seq in zip(streams, (seen[-1].seq + 1, 1), strict=True):
            last = frames[-1]
            assert last.type == "run.failed"
            assert last.data["code"] == "store_unavailable"
            assert last.data["retryable"] is True
            # Every event up to the failure, once and in order (seq 3 is tok0).
            assert_consecutive(frames, first_seq)
            text, first_token = content(frames), max(first_seq - 3, 0)
            assert text == tokens(first_token + text.count("tok"), start=first_token)

        refused = httpx.post(a.url + "/v1/runs", json=body({"tokens": 2}), timeout=10)
        assert refused.status_code == 503
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["code"] == "store_unavailable"
        assert "store_unavailable" in a.log()

        redis_server.start()  # the same port, as a restarted Redis comes back
        response = httpx.post(a.url + "/v1/runs", json=body({"tokens": 3}), timeout=10)
        assert response.status_code == 200
        frames = parse_frames(response.content)
        assert_every_event_once(frames, 3)
        again = parse_frames(resume(b.url, response.headers["x-run-id"]).content)
        # The other instance is back too. A live reader and a reader of the finished run may
        # merge deltas differently; the events are the same.
        assert_every_event_once(again, 3)
        assert again[0] == frames[0] and again[-2:] == frames[-2:]
        assert "store_recovered" in a.log()
    finally:
        a.stop()
        b.stop()
