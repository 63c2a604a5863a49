"""The agent source: what each thing an agent yields becomes, failures, and cancellation."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from enum import StrEnum
from typing import Any

import pytest
from structlog.testing import capture_logs

from tokenrelay import AgentEvent, AgentRequest, status, text, tool_call, tool_call_delta, usage
from tokenrelay.backends.memory import MemoryRunRegistry, MemoryStreamLog
from tokenrelay.errors import AgentError, TokenRelayError
from tokenrelay.events import TERMINAL_TYPES, Event, EventDraft, EventType
from tokenrelay.runs.hub import Hub
from tokenrelay.sources.agent import AgentSource

# Only keeps a broken source from hanging the suite; never a timing claim.
HANG_GUARD = 5.0

BODY: dict[str, Any] = {"model": "my-agent", "messages": [{"role": "user", "content": "hi"}]}
ROLE = (EventType.MESSAGE_DELTA, {"index": 0, "role": "assistant", "content": ""})
STOP = (EventType.MESSAGE_COMPLETED, {"index": 0, "finish_reason": "stop"})
TOOL_CALLS = (EventType.MESSAGE_COMPLETED, {"index": 0, "finish_reason": "tool_calls"})


def agent_of(*items: Any) -> Callable[[AgentRequest], AsyncIterator[AgentEvent]]:
    """An agent that yields ``items`` as they are, whatever they are."""

    async def agent(request: AgentRequest) -> AsyncIterator[AgentEvent]:
        for item in items:
            yield item

    return agent


def content(piece: str) -> EventDraft:
    return (EventType.MESSAGE_DELTA, {"index": 0, "content": piece})


def call_header(position: int, call_id: str, name: str) -> EventDraft:
    header = {
        "index": position,
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": ""},
    }
    return (EventType.TOOL_CALL_DELTA, {"index": 0, "tool_calls": [header]})


def call_arguments(position: int, arguments: str) -> EventDraft:
    piece = {"index": position, "function": {"arguments": arguments}}
    return (EventType.TOOL_CALL_DELTA, {"index": 0, "tool_calls": [piece]})


async def drafts_of(source: AgentSource, body: dict[str, Any] = BODY) -> list[EventDraft]:
    return [draft async for draft in source.stream(body)]


async def answer(*items: Any) -> list[EventDraft]:
    """The drafts after ``run.started`` and the role delta, which every run begins with."""
    drafts = await drafts_of(AgentSource(agent_of(*items)))
    assert drafts[1] == ROLE
    return drafts[2:]


# What every run begins and ends with


async def test_a_run_starts_with_run_started_and_the_assistant_role() -> None:
    before = int(time.time())
    drafts = await drafts_of(AgentSource(agent_of("Hello")))
    kind, started = drafts[0]
    assert kind is EventType.RUN_STARTED
    assert set(started) == {"response_id", "model", "created"}
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{24}", started["response_id"])
    assert started["model"] == "my-agent"
    assert before <= started["created"] <= int(time.time())
    assert drafts[1:] == [ROLE, content("Hello"), STOP]


async def test_every_run_gets_its_own_response_id() -> None:
    source = AgentSource(agent_of("x"))
    first, second = await drafts_of(source), await drafts_of(source)
    assert first[0][1]["response_id"] != second[0][1]["response_id"]


async def test_an_agent_that_yields_nothing_still_answers_an_empty_message() -> None:
    assert await answer() == [STOP]


async def test_the_agent_gets_the_model_the_messages_and_the_whole_body() -> None:
    seen: list[AgentRequest] = []

    async def agent(request: AgentRequest) -> AsyncIterator[AgentEvent]:
        seen.append(request)
        yield "ok"

    body = {**BODY, "temperature": 0.5, "my_field": {"tenant": "acme"}}
    await drafts_of(AgentSource(agent), body)
    assert seen == [AgentRequest(model="my-agent", messages=BODY["messages"], body=body)]
    assert seen[0].body["my_field"] == {"tenant": "acme"}


# Text


async def test_str_and_text_become_the_same_content_deltas() -> None:
    assert await answer("Hel", text("lo"), " world") == [
        content("Hel"),
        content("lo"),
        content(" world"),
        STOP,
    ]


async def test_str_subclasses_are_sent_as_plain_str() -> None:
    class Word(StrEnum):
        HELLO = "hello"

    [delta, _] = await answer(Word.HELLO)
    assert delta == content("hello")
    assert type(delta[1]["content"]) is str  # encoded as the text, not as an enum member


async def test_empty_text_sends_nothing() -> None:
    assert await answer("", text(""), "a") == [content("a"), STOP]


def test_text_refuses_what_is_not_a_str() -> None:
    with pytest.raises(TypeError, match="bytes"):
        text(b"raw")  # type: ignore[arg-type]


# Tool calls


async def test_a_tool_call_streams_its_header_then_its_arguments() -> None:
    assert await answer(tool_call("get_weather", '{"city": "Paris"}', id="call_1")) == [
        call_header(0, "call_1", "get_weather"),
        call_arguments(0, '{"city": "Paris"}'),
        TOOL_CALLS,
    ]


async def test_a_tool_call_without_an_id_gets_a_fresh_one() -> None:
    first, second = tool_call("f", "{}"), tool_call("f", "{}")
    assert re.fullmatch(r"call_[0-9a-f]{24}", first.id)
    assert first.id != second.id
    assert (await answer(first))[0] == call_header(0, first.id, "f")


async def test_a_tool_call_with_empty_arguments_sends_only_its_header() -> None:
    assert await answer(tool_call("now", "", id="call_1")) == [
        call_header(0, "call_1", "now"),
        TOOL_CALLS,
    ]


async def test_several_tool_calls_are_numbered_in_order() -> None:
    drafts = await answer(tool_call("a", "{}", id="call_a"), tool_call("b", "[]", id="call_b"))
    assert drafts == [
        call_header(0, "call_a", "a"),
        call_arguments(0, "{}"),
        call_header(1, "call_b", "b"),
        call_arguments(1, "[]"),
        TOOL_CALLS,
    ]


async def test_tool_call_deltas_start_a_call_with_a_name_and_continue_it_without() -> None:
    drafts = await answer(
        tool_call_delta(name="search", id="call_s"),
        tool_call_delta('{"q": '),
        tool_call_delta('"cats"}'),
        tool_call_delta("{}", name="fetch", id="call_f"),
    )
    assert drafts == [
        call_header(0, "call_s", "search"),
        call_arguments(0, '{"q": '),
        call_arguments(0, '"cats"}'),
        call_header(1, "call_f", "fetch"),
        call_arguments(1, "{}"),
        TOOL_CALLS,
    ]


async def test_a_tool_call_delta_without_a_started_call_is_an_agent_error() -> None:
    with pytest.raises(AgentError, match="without a name before starting a tool call"):
        await answer(tool_call_delta('{"q": 1}'))


def test_the_tool_call_helpers_refuse_what_they_cannot_send() -> None:
    with pytest.raises(ValueError, match="name"):
        tool_call("", "{}")
    with pytest.raises(TypeError, match="dict"):
        tool_call("f", {"city": "Paris"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="only with the name"):
        tool_call_delta("{}", id="call_1")
    with pytest.raises(ValueError, match="non-empty name"):
        tool_call_delta(name="")


# The finish reason


@pytest.mark.parametrize(
    ("items", "finish_reason"),
    [
        pytest.param(("text",), "stop", id="text"),
        pytest.param((tool_call("f", "{}"),), "tool_calls", id="tool-call"),
        pytest.param(("Let me look.", tool_call("f", "{}")), "tool_calls", id="text-then-call"),
        pytest.param((tool_call("f", "{}"), "Done."), "stop", id="call-then-text"),
        pytest.param((tool_call("f", "{}"), text("Done.")), "stop", id="call-then-text()"),
        pytest.param((tool_call("f", "{}"), ""), "tool_calls", id="call-then-empty-text"),
        pytest.param(
            (tool_call("f", "{}"), status("waiting"), usage(1, 2)),
            "tool_calls",
            id="call-then-status-and-usage",
        ),
        pytest.param(
            ("a", tool_call_delta(name="f"), "b", tool_call_delta("{}")),
            "tool_calls",
            id="delta-continued-after-text",
        ),
    ],
)
async def test_finish_reason_is_tool_calls_only_when_no_text_follows_the_last_call(
    items: tuple[Any, ...], finish_reason: str
) -> None:
    completed = [data for kind, data in await answer(*items) if kind is EventType.MESSAGE_COMPLETED]
    assert completed == [{"index": 0, "finish_reason": finish_reason}]


# Status and usage


async def test_status_becomes_run_status_with_its_fields() -> None:
    assert await answer(status("searching"), status("reading", step=2, urls=["a"]), "x") == [
        (EventType.RUN_STATUS, {"status": "searching"}),
        (EventType.RUN_STATUS, {"status": "reading", "step": 2, "urls": ["a"]}),
        content("x"),
        STOP,
    ]


async def test_status_fields_that_are_not_json_are_an_agent_error() -> None:
    with pytest.raises(AgentError, match=r"status\('saving'\) with fields that are not JSON"):
        await answer(status("saving", when={1, 2}))


def test_status_keeps_its_message_under_status() -> None:
    with pytest.raises(ValueError, match="'status'"):
        status("a", status="b")
    assert status("a", message="b").fields == {"message": "b"}


async def test_usage_is_sent_once_after_the_answer_and_the_last_one_wins() -> None:
    assert await answer(usage(3, 1), "Hi", usage(4, 2)) == [
        content("Hi"),
        STOP,
        (EventType.USAGE, {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}),
    ]


def test_usage_refuses_counts_that_are_not_non_negative_ints() -> None:
    with pytest.raises(ValueError, match="prompt_tokens"):
        usage(-1, 0)
    with pytest.raises(ValueError, match="completion_tokens"):
        usage(0, 1.5)  # type: ignore[arg-type]


# Failures


async def test_an_exception_in_the_agent_becomes_a_generic_agent_error() -> None:
    async def agent(request: AgentRequest) -> AsyncIterator[AgentEvent]:
        yield "partial"
        raise RuntimeError("db password is hunter2")

    drafts: list[EventDraft] = []
    with capture_logs() as logs, pytest.raises(AgentError) as caught:
        async for draft in AgentSource(agent, name="bot").stream(BODY):
            drafts.append(draft)
    assert drafts[2:] == [content("partial")]
    error = caught.value
    assert error.to_failure() == {
        "code": "agent_error",
        "message": "the agent failed",
        "retryable": False,
    }
    assert error.instance_status() == 500
    assert isinstance(error.__cause__, RuntimeError)  # kept for the log's traceback
    [entry] = [entry for entry in logs if entry["event"] == "agent_failed"]
    assert entry["agent"] == "bot"
    assert entry["log_level"] == "error"
    assert entry["exc_info"] is True


async def test_an_agent_that_raises_before_its_first_yield_fails_the_same_way() -> None:
    async def agent(request: AgentRequest) -> AsyncIterator[AgentEvent]:
        raise KeyError("secret")
        yield "unreachable"

    with capture_logs() as logs, pytest.raises(AgentError, match=r"^the agent failed$"):
        await drafts_of(AgentSource(agent))
    assert [entry["event"] for entry in logs] == ["agent_failed"]


async def test_a_token_relay_error_from_the_agent_passes_through() -> None:
    class QuotaExceeded(TokenRelayError):
        code = "quota_exceeded"
        status = 429
        retryable = True

    async def agent(request: AgentRequest) -> AsyncIterator[AgentEvent]:
        yield "a"
        raise QuotaExceeded("the tenant's daily quota is used up")

    with pytest.raises(QuotaExceeded) as caught:
        await drafts_of(AgentSource(agent))
    assert caught.value.to_failure() == {
        "code": "quota_exceeded",
        "message": "the tenant's daily quota is used up",
        "retryable": True,
    }


@pytest.mark.parametrize(
    ("item", "type_name"),
    [(42, "int"), (None, "NoneType"), (b"bytes", "bytes"), ({"content": "x"}, "dict")],
)
async def test_yielding_something_else_is_an_agent_error_naming_its_type(
    item: object, type_name: str
) -> None:
    with pytest.raises(AgentError, match=f"^the agent yielded a {type_name}; an agent yields str"):
        await answer("ok", item)


async def test_an_agent_that_is_not_an_async_generator_is_an_agent_error() -> None:
    async def agent(request: AgentRequest) -> str:  # returns instead of yielding
        return "hello"

    source = AgentSource(agent)  # type: ignore[arg-type]
    with pytest.raises(AgentError, match="returned coroutine, not an async iterator"):
        await drafts_of(source)
    # The coroutine was closed: no "never awaited" warning (which this suite turns into errors).


async def test_an_agent_callable_that_raises_at_once_is_an_agent_error() -> None:
    def agent(request: AgentRequest) -> AsyncIterator[AgentEvent]:
        raise ValueError("secret")

    with capture_logs() as logs, pytest.raises(AgentError, match=r"^the agent failed$"):
        await drafts_of(AgentSource(agent))
    assert [entry["event"] for entry in logs] == ["agent_failed"]


def test_an_agent_source_needs_a_callable_and_a_name() -> None:
    with pytest.raises(TypeError, match="callable"):
        AgentSource("not an agent")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name"):
        AgentSource(agent_of(), name="")


async def test_list_models_lists_the_agent_by_name() -> None:
    models = await AgentSource(agent_of(), name="weather-bot").list_models()
    assert models["object"] == "list"
    [model] = models["data"]
    assert model["id"] == "weather-bot"
    assert model["object"] == "model"
    assert isinstance(model["created"], int)


# Cancellation: the agent's generator is closed, its ``finally`` runs


class BlockingAgent:
    """Yields one token, then waits until cancelled; records whether its ``finally`` ran."""

    def __init__(self) -> None:
        self.waiting = asyncio.Event()
        self.cleaned_up = False

    async def __call__(self, request: AgentRequest) -> AsyncIterator[AgentEvent]:
        try:
            yield "first"
            self.waiting.set()
            await asyncio.Event().wait()
            yield "never"
        finally:
            self.cleaned_up = True


async def test_cancelling_the_run_while_the_agent_awaits_runs_its_finally() -> None:
    agent = BlockingAgent()
    drafts: list[EventDraft] = []

    async def drive() -> None:
        async for draft in AgentSource(agent).stream(BODY):
            drafts.append(draft)

    task = asyncio.create_task(drive())
    await asyncio.wait_for(agent.waiting.wait(), HANG_GUARD)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert agent.cleaned_up
    assert drafts[2:] == [content("first")]


async def test_closing_the_source_at_a_yield_closes_the_agent() -> None:
    agent = BlockingAgent()
    stream = AgentSource(agent).stream(BODY)
    assert isinstance(stream, AsyncGenerator)
    drafts = [await anext(stream) for _ in range(3)]
    assert drafts[2] == content("first")
    assert not agent.cleaned_up
    await stream.aclose()  # what the Hub does when the run ends while the source is suspended
    assert agent.cleaned_up


# Through the Hub, as the gateway runs it


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    log, registry = MemoryStreamLog(), MemoryRunRegistry()
    the_hub = Hub(log, registry)
    yield the_hub
    await the_hub.close()
    log.close()
    registry.close()


async def run_events(hub: Hub, source: AgentSource) -> list[Event]:
    """Every event of a run of ``source`` up to its terminal event."""
    subscription = await hub.start(source.stream(BODY))
    events: list[Event] = []
    while not events or not events[-1].is_terminal:
        batch = await subscription.next_batch(HANG_GUARD)
        assert batch, "the run produced no terminal event"
        events.extend(batch)
    await subscription.close()
    return events


async def test_a_run_of_an_agent_is_numbered_and_completed_by_the_hub(hub: Hub) -> None:
    events = await run_events(hub, AgentSource(agent_of(status("go"), "Hi", usage(1, 1))))
    assert [(event.seq, event.type) for event in events] == [
        (1, EventType.RUN_STARTED),
        (2, EventType.MESSAGE_DELTA),
        (3, EventType.RUN_STATUS),
        (4, EventType.MESSAGE_DELTA),
        (5, EventType.MESSAGE_COMPLETED),
        (6, EventType.USAGE),
        (7, EventType.RUN_COMPLETED),
    ]
    assert re.fullmatch(r"run_[0-9a-f]{24}", events[0].data["run_id"])
    assert events[2].data == {"status": "go"}


async def test_an_agent_failure_ends_the_run_with_agent_error_and_no_details(hub: Hub) -> None:
    async def agent(request: AgentRequest) -> AsyncIterator[AgentEvent]:
        yield "partial"
        raise RuntimeError("db password is hunter2")

    with capture_logs():
        events = await run_events(hub, AgentSource(agent))
    terminals = [event for event in events if event.type in TERMINAL_TYPES]
    assert terminals == [events[-1]]
    assert events[-1].type is EventType.RUN_FAILED
    assert events[-1].data == {
        "code": "agent_error",
        "message": "the agent failed",
        "retryable": False,
    }
    assert not any(b"hunter2" in event.data_json for event in events)


async def test_cancelling_a_run_through_the_hub_closes_the_agent(hub: Hub) -> None:
    agent = BlockingAgent()
    subscription = await hub.start(AgentSource(agent).stream(BODY))
    await asyncio.wait_for(agent.waiting.wait(), HANG_GUARD)
    await hub.cancel(subscription.run_id)
    events = list(await hub.log.read(subscription.run_id, 0, 0))
    assert events[-1].type is EventType.RUN_CANCELLED
    assert events[-1].data == {"reason": "cancelled"}
    assert agent.cleaned_up
    await subscription.close()


async def test_the_last_reader_leaving_closes_the_agent(hub: Hub) -> None:
    agent = BlockingAgent()
    subscription = await hub.start(AgentSource(agent).stream(BODY))
    await asyncio.wait_for(agent.waiting.wait(), HANG_GUARD)
    run = subscription.run
    assert run is not None and run.task is not None
    await subscription.close()  # the client went away
    await asyncio.wait_for(asyncio.shield(run.task), HANG_GUARD)
    events = list(await hub.log.read(subscription.run_id, 0, 0))
    assert events[-1].data == {"reason": "client_disconnected"}
    assert agent.cleaned_up
