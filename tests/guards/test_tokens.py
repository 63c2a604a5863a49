"""Token estimates: what a request reserves before it runs.

(How a run's real use is counted and settled, ``MeteredSource``, is tested with the limiter in
``test_ratelimit.py``.)
"""

from __future__ import annotations

from typing import Any

import pytest

from tokenrelay.guards.tokens import CHARS_PER_TOKEN, TOKENS_PER_MESSAGE, prompt_tokens, reserve_for


def chat(*contents: Any, **fields: Any) -> dict[str, Any]:
    return {
        "model": "mock-model",
        "messages": [{"role": "user", "content": content} for content in contents],
        **fields,
    }


def test_the_prompt_is_a_quarter_of_its_characters_rounded_up_plus_each_message() -> None:
    body = chat("a" * 10, "b" * 7)  # 17 characters: 5 tokens
    assert prompt_tokens(body) == 5 + 2 * TOKENS_PER_MESSAGE


def test_text_parts_count_and_other_parts_do_not() -> None:
    content = [
        {"type": "text", "text": "c" * 8},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 10_000}},
        {"type": "text", "text": "d" * 4},
    ]
    assert prompt_tokens(chat(content)) == 12 // CHARS_PER_TOKEN + TOKENS_PER_MESSAGE


def test_tool_calls_and_tool_results_count() -> None:
    body = {
        "messages": [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ]
    }
    # get_weather (11) + {"city": "Paris"} (17) + sunny (5) = 33 characters: 9 tokens.
    assert prompt_tokens(body) == 9 + 2 * TOKENS_PER_MESSAGE


@pytest.mark.parametrize("body", [{}, {"messages": "hello"}, {"messages": [None, 3]}])
def test_a_body_without_usable_messages_estimates_little(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    count = len(messages) if isinstance(messages, list) else 0
    assert prompt_tokens(body) == count * TOKENS_PER_MESSAGE


def test_the_reservation_is_the_prompt_and_the_longest_answer() -> None:
    body = chat("e" * 40)
    prompt = prompt_tokens(body)
    assert reserve_for(body, default_max_tokens=1024) == prompt + 1024
    assert reserve_for({**body, "max_tokens": 50}, default_max_tokens=1024) == prompt + 50
    both = {**body, "max_tokens": 50, "max_completion_tokens": 70}
    assert reserve_for(both, default_max_tokens=1024) == prompt + 70


def test_several_choices_reserve_an_answer_each() -> None:
    body = chat("f", max_tokens=100, n=3)
    assert reserve_for(body, default_max_tokens=1024) == prompt_tokens(body) + 300


@pytest.mark.parametrize("value", [None, 0, -5, True, "100", 12.5])
def test_an_unusable_max_tokens_reserves_the_default(value: object) -> None:
    body = chat("g", max_tokens=value, n=value)
    assert reserve_for(body, default_max_tokens=256) == prompt_tokens(body) + 256
