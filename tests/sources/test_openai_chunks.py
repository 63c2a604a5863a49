"""ChunkTranslator: OpenAI ``chat.completion.chunk`` objects in, tokenrelay event drafts out."""

from __future__ import annotations

from typing import Any

import pytest

from tokenrelay.errors import UpstreamMalformed, UpstreamStreamError
from tokenrelay.events import EventType
from tokenrelay.sources.openai_chunks import ChunkTranslator, started_data


def chunk(*choices: dict[str, Any], **envelope: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-test",
        "system_fingerprint": "fp_1",
        "choices": list(choices),
    }
    base.update(envelope)
    return base


def choice(delta: Any, index: int = 0, **extra: Any) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None, **extra}


def started_translator() -> ChunkTranslator:
    """A translator that has already seen its first chunk."""
    translator = ChunkTranslator()
    translator.translate(chunk())
    return translator


def test_first_chunk_produces_run_started_with_the_stream_constants() -> None:
    first = chunk(choice({"role": "assistant", "content": ""}), service_tier="default")
    drafts = ChunkTranslator().translate(first)
    assert drafts[0] == (
        EventType.RUN_STARTED,
        {
            "response_id": "chatcmpl-1",
            "model": "gpt-test",
            "created": 1700000000,
            "system_fingerprint": "fp_1",
            "service_tier": "default",
        },
    )


def test_run_started_comes_from_the_first_chunk_only() -> None:
    translator = ChunkTranslator()
    assert not translator.started
    first = translator.translate(chunk(choice({"content": "a"})))
    assert translator.started
    later = translator.translate(chunk(choice({"content": "b"}), id="other", model="other"))
    assert [kind for kind, _ in first] == [EventType.RUN_STARTED, EventType.MESSAGE_DELTA]
    assert later == [(EventType.MESSAGE_DELTA, {"index": 0, "content": "b"})]


def test_run_started_is_produced_even_by_a_first_chunk_without_choices() -> None:
    drafts = ChunkTranslator().translate(chunk())
    assert drafts == [
        (
            EventType.RUN_STARTED,
            {
                "response_id": "chatcmpl-1",
                "model": "gpt-test",
                "created": 1700000000,
                "system_fingerprint": "fp_1",
            },
        )
    ]


def test_run_started_leaves_out_missing_and_null_fields() -> None:
    first = {"id": "x", "model": "m", "system_fingerprint": None, "choices": []}
    assert ChunkTranslator().translate(first) == [
        (EventType.RUN_STARTED, {"response_id": "x", "model": "m"})
    ]


def test_started_data_keeps_only_the_stream_constant_fields() -> None:
    whole = {
        "id": "chatcmpl-9",
        "object": "chat.completion",
        "created": 5,
        "model": "m",
        "service_tier": "flex",
        "choices": [{"index": 0}],
        "usage": {"total_tokens": 1},
    }
    assert started_data(whole) == {
        "response_id": "chatcmpl-9",
        "created": 5,
        "model": "m",
        "service_tier": "flex",
    }


def test_plain_content_hot_path() -> None:
    translator = started_translator()
    assert translator.translate(chunk(choice({"content": "Hello"}))) == [
        (EventType.MESSAGE_DELTA, {"index": 0, "content": "Hello"})
    ]


def test_plain_content_keeps_the_choice_index() -> None:
    translator = started_translator()
    assert translator.translate(chunk(choice({"content": "x"}, index=2))) == [
        (EventType.MESSAGE_DELTA, {"index": 2, "content": "x"})
    ]


def test_empty_string_content_is_kept() -> None:
    translator = started_translator()
    assert translator.translate(chunk(choice({"content": ""}))) == [
        (EventType.MESSAGE_DELTA, {"index": 0, "content": ""})
    ]


def test_null_content_alone_produces_no_delta() -> None:
    translator = started_translator()
    assert translator.translate(chunk(choice({"content": None}))) == []


def test_empty_or_missing_delta_produces_no_delta() -> None:
    translator = started_translator()
    assert translator.translate(chunk(choice({}))) == []
    assert translator.translate(chunk({"index": 0, "finish_reason": None})) == []


def test_role_chunk() -> None:
    translator = started_translator()
    drafts = translator.translate(chunk(choice({"role": "assistant", "content": ""})))
    assert drafts == [(EventType.MESSAGE_DELTA, {"index": 0, "role": "assistant", "content": ""})]


def test_null_fields_are_dropped() -> None:
    translator = started_translator()
    delta = {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "function_call": None,
        "tool_calls": None,
    }
    assert translator.translate(chunk(choice(delta))) == [
        (EventType.MESSAGE_DELTA, {"index": 0, "role": "assistant"})
    ]


def test_other_delta_fields_are_kept() -> None:
    translator = started_translator()
    delta = {"reasoning_content": "think", "content": None, "refusal": "no"}
    assert translator.translate(chunk(choice(delta))) == [
        (EventType.MESSAGE_DELTA, {"index": 0, "reasoning_content": "think", "refusal": "no"})
    ]


def test_logprobs_are_kept() -> None:
    translator = started_translator()
    logprobs = {
        "content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}]
    }
    drafts = translator.translate(chunk(choice({"content": "Hi"}, logprobs=logprobs)))
    assert drafts == [
        (EventType.MESSAGE_DELTA, {"index": 0, "content": "Hi", "logprobs": logprobs})
    ]


def test_tool_calls_become_a_tool_call_delta() -> None:
    translator = started_translator()
    calls = [
        {
            "index": 0,
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": ""},
        }
    ]
    drafts = translator.translate(
        chunk(choice({"role": "assistant", "content": None, "tool_calls": calls}))
    )
    assert drafts == [
        (EventType.MESSAGE_DELTA, {"index": 0, "role": "assistant"}),
        (EventType.TOOL_CALL_DELTA, {"index": 0, "tool_calls": calls}),
    ]


def test_tool_call_argument_fragments_are_passed_as_sent() -> None:
    translator = started_translator()
    calls = [{"index": 0, "function": {"arguments": '{"city": "Pa'}}]
    assert translator.translate(chunk(choice({"tool_calls": calls}))) == [
        (EventType.TOOL_CALL_DELTA, {"index": 0, "tool_calls": calls})
    ]


def test_empty_tool_calls_list_produces_nothing() -> None:
    translator = started_translator()
    assert translator.translate(chunk(choice({"tool_calls": []}))) == []


def test_finish_reason_produces_message_completed() -> None:
    translator = started_translator()
    assert translator.translate(chunk(choice({}, finish_reason="stop"))) == [
        (EventType.MESSAGE_COMPLETED, {"index": 0, "finish_reason": "stop"})
    ]


def test_content_and_finish_reason_in_one_chunk() -> None:
    translator = started_translator()
    drafts = translator.translate(chunk(choice({"content": "end"}, finish_reason="length")))
    assert drafts == [
        (EventType.MESSAGE_DELTA, {"index": 0, "content": "end"}),
        (EventType.MESSAGE_COMPLETED, {"index": 0, "finish_reason": "length"}),
    ]


def test_tool_calls_and_finish_reason_in_one_chunk() -> None:
    translator = started_translator()
    calls = [{"index": 0, "function": {"arguments": "}"}}]
    drafts = translator.translate(chunk(choice({"tool_calls": calls}, finish_reason="tool_calls")))
    assert drafts == [
        (EventType.TOOL_CALL_DELTA, {"index": 0, "tool_calls": calls}),
        (EventType.MESSAGE_COMPLETED, {"index": 0, "finish_reason": "tool_calls"}),
    ]


def test_several_choices_in_one_chunk_keep_their_order() -> None:
    translator = started_translator()
    drafts = translator.translate(
        chunk(
            choice({"content": "a"}, index=0),
            choice({"content": "b"}, index=1, finish_reason="stop"),
        )
    )
    assert drafts == [
        (EventType.MESSAGE_DELTA, {"index": 0, "content": "a"}),
        (EventType.MESSAGE_DELTA, {"index": 1, "content": "b"}),
        (EventType.MESSAGE_COMPLETED, {"index": 1, "finish_reason": "stop"}),
    ]


def test_usage() -> None:
    translator = started_translator()
    usage = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert translator.translate(chunk(usage=usage)) == [(EventType.USAGE, usage)]


def test_usage_comes_after_the_choices_of_the_same_chunk() -> None:
    translator = started_translator()
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    drafts = translator.translate(
        chunk(choice({"content": "x"}, finish_reason="stop"), usage=usage)
    )
    assert [kind for kind, _ in drafts] == [
        EventType.MESSAGE_DELTA,
        EventType.MESSAGE_COMPLETED,
        EventType.USAGE,
    ]
    assert drafts[-1] == (EventType.USAGE, usage)


def test_null_usage_is_ignored() -> None:
    translator = started_translator()
    assert translator.translate(chunk(choice({"content": "x"}), usage=None)) == [
        (EventType.MESSAGE_DELTA, {"index": 0, "content": "x"})
    ]


def test_usage_that_is_not_an_object_is_malformed() -> None:
    with pytest.raises(UpstreamMalformed):
        started_translator().translate(chunk(usage=[1, 2]))


def test_error_chunk_raises_upstream_stream_error_with_its_message() -> None:
    error_chunk = {"error": {"message": "model overloaded", "type": "server_error", "code": 503}}
    with pytest.raises(UpstreamStreamError) as info:
        ChunkTranslator().translate(error_chunk)
    assert info.value.message == "model overloaded"
    assert info.value.to_failure() == {
        "code": "upstream_stream_error",
        "message": "model overloaded",
        "retryable": True,
    }


def test_error_chunk_after_the_stream_started() -> None:
    translator = started_translator()
    with pytest.raises(UpstreamStreamError, match="went away"):
        translator.translate({"error": {"message": "went away"}})


def test_error_that_is_not_an_object_is_reported_as_text() -> None:
    with pytest.raises(UpstreamStreamError) as info:
        ChunkTranslator().translate({"error": "plain failure"})
    assert info.value.message == "plain failure"


def test_error_chunk_does_not_start_the_run() -> None:
    translator = ChunkTranslator()
    with pytest.raises(UpstreamStreamError):
        translator.translate({"error": {"message": "no"}})
    assert not translator.started


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param([{"choices": []}], id="list"),
        pytest.param("data", id="string"),
        pytest.param(42, id="number"),
        pytest.param(None, id="null"),
    ],
)
def test_a_chunk_that_is_not_an_object_is_malformed(bad: Any) -> None:
    with pytest.raises(UpstreamMalformed):
        ChunkTranslator().translate(bad)


@pytest.mark.parametrize(
    "choices",
    [
        pytest.param({"0": {"index": 0, "delta": {"content": "x"}}}, id="object"),
        pytest.param("abc", id="string"),
        pytest.param(7, id="number"),
        pytest.param(True, id="true"),
        pytest.param({}, id="empty-object"),
    ],
)
def test_choices_that_are_not_a_list_are_malformed(choices: Any) -> None:
    with pytest.raises(UpstreamMalformed):
        started_translator().translate(chunk(choices=choices))


@pytest.mark.parametrize(
    "the_choice",
    [
        pytest.param("text", id="string"),
        pytest.param(3, id="number"),
        pytest.param(["index", 0], id="list"),
    ],
)
def test_a_choice_that_is_not_an_object_is_malformed(the_choice: Any) -> None:
    with pytest.raises(UpstreamMalformed):
        started_translator().translate(chunk(the_choice))


@pytest.mark.parametrize(
    "delta",
    [
        pytest.param("content", id="string"),
        pytest.param("x", id="one-char-string"),
        pytest.param(["content"], id="list-containing-content"),
        pytest.param([1, 2], id="list"),
        pytest.param(5, id="number"),
        pytest.param([], id="empty-list"),
    ],
)
def test_a_delta_that_is_not_an_object_is_malformed(delta: Any) -> None:
    with pytest.raises(UpstreamMalformed):
        started_translator().translate(chunk(choice(delta)))


def test_tool_calls_that_are_not_a_list_are_malformed() -> None:
    with pytest.raises(UpstreamMalformed):
        started_translator().translate(chunk(choice({"tool_calls": {"index": 0}})))


def test_malformed_error_chains_the_cause() -> None:
    with pytest.raises(UpstreamMalformed) as info:
        started_translator().translate(chunk(choice(5)))
    assert isinstance(info.value.__cause__, (TypeError, AttributeError))


def test_finished_choices_counts_finish_reasons() -> None:
    translator = ChunkTranslator()
    assert translator.finished_choices == 0
    translator.translate(chunk(choice({"role": "assistant", "content": ""})))
    translator.translate(
        chunk(choice({"content": "a"}, index=0), choice({"content": "b"}, index=1))
    )
    assert translator.finished_choices == 0
    translator.translate(chunk(choice({}, index=0, finish_reason="stop")))
    assert translator.finished_choices == 1
    translator.translate(chunk(choice({"content": "c"}, index=1, finish_reason="length")))
    assert translator.finished_choices == 2
    translator.translate(
        chunk(usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})
    )
    assert translator.finished_choices == 2


def test_a_null_finish_reason_does_not_count() -> None:
    translator = started_translator()
    translator.translate(chunk(choice({"content": "a"}, finish_reason=None)))
    assert translator.finished_choices == 0


def test_a_whole_stream() -> None:
    translator = ChunkTranslator()
    stream = [
        chunk(choice({"role": "assistant", "content": ""})),
        chunk(choice({"content": "Hel"})),
        chunk(choice({"content": "lo"})),
        chunk(choice({}, finish_reason="stop")),
        chunk(usage={"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}),
    ]
    drafts = [draft for item in stream for draft in translator.translate(item)]
    assert [kind for kind, _ in drafts] == [
        EventType.RUN_STARTED,
        EventType.MESSAGE_DELTA,
        EventType.MESSAGE_DELTA,
        EventType.MESSAGE_DELTA,
        EventType.MESSAGE_COMPLETED,
        EventType.USAGE,
    ]
    assert (
        "".join(d.get("content", "") for k, d in drafts if k is EventType.MESSAGE_DELTA) == "Hello"
    )
    assert translator.finished_choices == 1
