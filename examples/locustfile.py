# Run it (locust is not a dependency of tokenrelay):
#   pip install locust; locust -f examples/locustfile.py --host http://127.0.0.1:8080
# Headless, 50 users for one minute:
#   locust -f examples/locustfile.py --host http://127.0.0.1:8080 --headless -u 50 -r 10 -t 1m
"""Streaming chat completions under Locust, with time to first token as its own metric.

Each user streams ``POST /v1/chat/completions`` from tokenrelay or any OpenAI-compatible server.
Locust's own row for the POST is the time to the response headers. Two custom request types are
fired as the stream is read, so Locust tabulates and charts their percentiles too:

- ``TTFT``: request sent to the first content delta;
- ``STREAM``: request sent to ``data: [DONE]`` (a stream without it, or with an error chunk, is
  a failure).

Environment variables: ``TOKENRELAY_MODEL`` (default ``mock-model``), ``TOKENRELAY_MOCK`` (the
mock upstream's options as JSON; empty for a real model), ``TOKENRELAY_API_KEY``.
For many users and fine-grained latencies prefer ``tokenrelay bench``: its client is asyncio
rather than one greenlet per user, and it records every inter-token gap.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from locust import HttpUser, between, events, task

MODEL = os.environ.get("TOKENRELAY_MODEL", "mock-model")
MOCK = os.environ.get("TOKENRELAY_MOCK", '{"tokens": 50, "itl_ms": 20}')
API_KEY = os.environ.get("TOKENRELAY_API_KEY", "")
PATH = "/v1/chat/completions"


def fire(request_type: str, started: float, length: int, error: Exception | None = None) -> None:
    """Report one custom measurement to Locust's statistics, in milliseconds."""
    events.request.fire(
        request_type=request_type,
        name=PATH,
        response_time=(time.perf_counter() - started) * 1000,
        response_length=length,
        exception=error,
        context={},
    )


class StreamingChatUser(HttpUser):
    """A user who asks a question, reads the whole streamed answer, waits, and asks again."""

    wait_time = between(0.5, 1.5)

    def on_start(self) -> None:
        self.body: dict[str, Any] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Write one short sentence about the sea."}],
            "stream": True,
        }
        if MOCK:
            self.body["mock"] = json.loads(MOCK)
        self.headers = {"Accept": "text/event-stream"}
        if API_KEY:
            self.headers["Authorization"] = f"Bearer {API_KEY}"

    @task
    def stream_chat_completion(self) -> None:
        started = time.perf_counter()
        received = 0
        first_token = True
        with self.client.post(
            PATH, json=self.body, headers=self.headers, stream=True, catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            response.success()  # the POST row: the answer started; the stream is judged below
            for line in response.iter_lines():
                received += len(line) + 1
                if not line.startswith(b"data:"):
                    continue  # blank separators and ": heartbeat" comments
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    fire("STREAM", started, received)
                    return
                chunk = json.loads(payload)
                if "error" in chunk:
                    code = (chunk["error"] or {}).get("code")
                    fire("STREAM", started, received, RuntimeError(f"stream error: {code}"))
                    return
                if first_token and any(
                    (choice.get("delta") or {}).get("content") for choice in chunk["choices"]
                ):
                    first_token = False
                    fire("TTFT", started, 0)
            fire("STREAM", started, received, RuntimeError("stream ended without [DONE]"))
