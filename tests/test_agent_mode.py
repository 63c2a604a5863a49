"""Agent mode end to end: the example agent run as users run it, talked to by real clients.

The server is ``python examples/agent_example.py --port P`` in its own process; the clients are
the official ``openai`` SDK and plain HTTP for the native formats.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from examples.agent_example import AGENT_NAME, GREETING

from tests.conftest import ONE_EVENT_PER_DELTA, Server, free_port

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "agent_example.py"
FRAME = re.compile(r"id: (\d+)\nevent: ([a-z_.]+)\ndata: ([^\n]*)\n\n")
WEATHER_QUESTION: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
HELLO: list[Any] = [{"role": "user", "content": "Hello there"}]
FAIL: list[Any] = [{"role": "user", "content": "fail"}]
AGENT_FAILED = {"code": "agent_error", "message": "the agent failed", "retryable": False}
SECRET = "wx-secret-123"  # in the example's exception: it must reach the log, never a client


@pytest.fixture(scope="module")
def agent_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("agent") / "agent.log"
    # One native event per word: the words come 20 ms apart, but a loaded machine could still
    # merge two, and the native tests count them.
    env = {**os.environ, **ONE_EVENT_PER_DELTA}
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, str(EXAMPLE), "--port", str(port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    server = Server(process, f"http://127.0.0.1:{port}", log_path, ONE_EVENT_PER_DELTA)
    try:
        _wait_until_ready(server)
        yield server
    finally:
        server.stop()


def _wait_until_ready(server: Server) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"the example exited early:\n{server.log()}")
        try:
            if httpx.get(server.url + "/readyz", timeout=0.5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"the example did not become ready:\n{server.log()}")


@pytest.fixture
def client(agent_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=agent_server.url + "/v1", api_key="x", max_retries=0)


def native_run(server: Server, messages: list[Any], **headers: str) -> httpx.Response:
    body = {"model": AGENT_NAME, "messages": messages}
    return httpx.post(server.url + "/v1/runs", json=body, headers=headers, timeout=10)


def frames_of(body: str) -> list[tuple[int, str, dict[str, Any]]]:
    """Every SSE frame of a native stream; every character of the body must belong to one."""
    frames, position = [], 0
    for match in FRAME.finditer(body):
        assert match.start() == position, f"unexpected text: {body[position : match.start()]!r}"
        position = match.end()
        frames.append((int(match.group(1)), match.group(2), json.loads(match.group(3))))
    assert position == len(body), f"trailing text: {body[position:]!r}"
    return frames


# The OpenAI format, through the official SDK


def test_the_sdk_streams_the_answer_word_by_word(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=AGENT_NAME,
        messages=HELLO,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    answer_chunks = [chunk for chunk in chunks if chunk.choices]
    assert answer_chunks[0].choices[0].delta.role == "assistant"
    pieces = [chunk.choices[0].delta.content or "" for chunk in answer_chunks]
    assert "".join(pieces) == GREETING
    assert len([piece for piece in pieces if piece]) == len(GREETING.split(" "))
    assert [c.choices[0].finish_reason for c in answer_chunks][-1] == "stop"
    assert {chunk.id for chunk in chunks} == {chunks[0].id}
    assert chunks[0].id.startswith("chatcmpl-")
    assert {chunk.model for chunk in chunks} == {AGENT_NAME}
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(GREETING.split(" "))
    assert chunks[-1].usage.prompt_tokens == 2


def test_a_weather_question_streams_a_tool_call(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=AGENT_NAME, messages=WEATHER_QUESTION, stream=True
    )
    calls: dict[int, dict[str, str]] = {}
    finish_reasons, content = [], ""
    for chunk in stream:
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        finish_reasons.append(choice.finish_reason)
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += delta.id or ""
            if delta.function is not None:
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
    assert list(calls) == [0]
    assert calls[0]["name"] == "get_weather"
    assert calls[0]["arguments"] == '{"city": "Paris"}'
    assert re.fullmatch(r"call_[0-9a-f]{24}", calls[0]["id"])
    assert content == ""
    assert [reason for reason in finish_reasons if reason] == ["tool_calls"]


def test_status_updates_are_left_out_of_the_openai_stream(agent_server: Server) -> None:
    body = {"model": AGENT_NAME, "messages": WEATHER_QUESTION, "stream": True}
    response = httpx.post(agent_server.url + "/v1/chat/completions", json=body, timeout=10)
    assert response.status_code == 200
    assert "looking up the weather" not in response.text
    payloads = [line[6:] for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert all(len(chunk["choices"]) == 1 for chunk in chunks)  # no empty status chunks


def test_non_streaming_answers_are_whole_completions(client: openai.OpenAI) -> None:
    greeting = client.chat.completions.create(model=AGENT_NAME, messages=HELLO)
    assert greeting.object == "chat.completion"
    assert greeting.choices[0].message.content == GREETING
    assert greeting.choices[0].finish_reason == "stop"
    assert greeting.usage is not None
    assert greeting.usage.total_tokens == 2 + len(GREETING.split(" "))

    weather = client.chat.completions.create(model=AGENT_NAME, messages=WEATHER_QUESTION)
    message = weather.choices[0].message
    assert weather.choices[0].finish_reason == "tool_calls"
    assert message.content is None
    assert message.tool_calls is not None
    [call] = message.tool_calls
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert call.function.arguments == '{"city": "Paris"}'


def test_the_tool_result_turn_completes_the_conversation(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model=AGENT_NAME, messages=WEATHER_QUESTION)
    assert first.choices[0].message.tool_calls is not None
    [call] = first.choices[0].message.tool_calls
    conversation: list[Any] = [
        *WEATHER_QUESTION,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 °C and sunny"},
    ]
    stream = client.chat.completions.create(model=AGENT_NAME, messages=conversation, stream=True)
    answer = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert answer == "Here is the forecast: 18 °C and sunny"


def test_a_failing_agent_is_an_api_error_with_its_code(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=AGENT_NAME, messages=FAIL, stream=True)
    with pytest.raises(openai.APIError) as streamed:
        list(stream)
    assert isinstance(streamed.value.body, dict)
    assert streamed.value.body["code"] == "agent_error"
    assert streamed.value.message == "the agent failed"

    with pytest.raises(openai.InternalServerError) as whole:
        client.chat.completions.create(model=AGENT_NAME, messages=FAIL)
    assert whole.value.status_code == 500
    assert isinstance(whole.value.body, dict)
    assert whole.value.body["code"] == "agent_error"
    assert SECRET not in whole.value.response.text


def test_models_lists_the_agent(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == [AGENT_NAME]


# Native events


def test_native_sse_shows_the_status_then_the_answer(agent_server: Server) -> None:
    response = native_run(agent_server, HELLO)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    frames = frames_of(response.text)
    assert [seq for seq, _, _ in frames] == list(range(1, len(frames) + 1))
    kinds = [kind for _, kind, _ in frames]
    words = len(GREETING.split(" "))
    assert kinds == [
        "run.started",
        "message.delta",
        "run.status",
        *["message.delta"] * words,
        "message.completed",
        "usage",
        "run.completed",
    ]
    data = [d for _, _, d in frames]
    assert data[0]["run_id"] == response.headers["x-run-id"]
    assert data[0]["model"] == AGENT_NAME
    assert data[2] == {"status": "thinking"}
    assert "".join(d["content"] for d in data[3 : 3 + words]) == GREETING
    assert data[-3] == {"finish_reason": "stop"}
    assert data[-1] == {}


def test_native_sse_shows_the_tool_call(agent_server: Server) -> None:
    frames = frames_of(native_run(agent_server, WEATHER_QUESTION).text)
    assert [(kind, data) for _, kind, data in frames[2:]] == [
        ("run.status", {"status": "looking up the weather", "city": "Paris"}),
        (
            "tool_call.delta",
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": frames[3][2]["tool_calls"][0]["id"],
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ],
            },
        ),
        (
            "tool_call.delta",
            {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Paris"}'}}]},
        ),
        ("message.completed", {"finish_reason": "tool_calls"}),
        ("run.completed", {}),
    ]


def test_ndjson_carries_the_same_status(agent_server: Server) -> None:
    response = native_run(agent_server, WEATHER_QUESTION, Accept="application/x-ndjson")
    assert response.headers["content-type"] == "application/x-ndjson"
    events = [json.loads(line) for line in response.text.splitlines()]
    assert events[2] == {
        "seq": 3,
        "type": "run.status",
        "data": {"status": "looking up the weather", "city": "Paris"},
    }
    assert [event["type"] for event in events].count("run.completed") == 1
    assert events[-1]["type"] == "run.completed"


def test_a_failing_agent_ends_the_native_stream_with_agent_error(agent_server: Server) -> None:
    response = native_run(agent_server, FAIL)
    assert response.status_code == 200  # the run had started: the failure is its last event
    frames = frames_of(response.text)
    assert [(kind, data) for _, kind, data in frames[2:]] == [
        ("run.status", {"status": "about to fail on purpose"}),
        ("run.failed", AGENT_FAILED),
    ]
    for leak in ("Traceback", "RuntimeError", SECRET):
        assert leak not in response.text
    # The details are in the server's log (written before the run's terminal event).
    log = agent_server.log()
    assert re.search(r"\[error\s*\] agent_failed\s+agent=weather-assistant", log)
    assert f"RuntimeError: the weather service rejected key {SECRET}" in log
