"""Cache keys: what makes two requests the same; and which requests may share an answer."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tokenrelay.cache.key import cache_key, cacheable

TENANT = "t1"
UPSTREAM = "http://127.0.0.1:9/v1"
BODY: dict[str, Any] = {
    "model": "mock-model",
    "messages": [{"role": "user", "content": "Say five words."}],
    "temperature": 0,
}


def key(body: dict[str, Any], tenant: str = TENANT, upstream: str = UPSTREAM) -> str:
    return cache_key(tenant, upstream, body)


def test_key_is_a_sha256_hex_digest() -> None:
    digest = key(BODY)
    assert len(digest) == 64
    int(digest, 16)


def test_key_order_and_whitespace_do_not_matter() -> None:
    spaced = orjson.loads(
        b'{ "temperature" : 0,\n  "messages": [ {"content": "Say five words.", "role": "user"} ],'
        b'\n  "model": "mock-model" }'
    )
    assert key(spaced) == key(BODY)


@pytest.mark.parametrize(
    "transport",
    [
        {"stream": True},
        {"stream": False},
        {"stream_options": {"include_usage": True}},
        {"detach": True},
    ],
    ids=["stream", "no-stream", "stream_options", "detach"],
)
def test_fields_that_only_shape_the_transport_do_not_matter(transport: dict[str, Any]) -> None:
    assert key({**BODY, **transport}) == key(BODY)


def test_tenant_and_upstream_are_part_of_the_key() -> None:
    assert key(BODY, tenant="t2") != key(BODY)
    assert key(BODY, upstream="http://127.0.0.1:10/v1") != key(BODY)


@pytest.mark.parametrize(
    "change",
    [
        {"model": "other-model"},
        {"messages": [{"role": "user", "content": "Say six words."}]},
        {"temperature": 0.2},
        {"top_p": 0.5},
        {"seed": 7},
        {"max_tokens": 3},
        {"max_completion_tokens": 3},
        {"stop": ["\n"]},
        {"presence_penalty": 0.5},
        {"frequency_penalty": 0.5},
        {"logit_bias": {"50256": -100}},
        {"logprobs": True},
        {"n": 2},
        {"response_format": {"type": "json_object"}},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        {"tool_choice": "none"},
        {"user": "someone"},
    ],
    ids=lambda change: next(iter(change)),
)
def test_every_field_that_shapes_the_answer_is_part_of_the_key(change: dict[str, Any]) -> None:
    assert key({**BODY, **change}) != key(BODY)


def test_nested_values_count_in_order_where_json_orders_them() -> None:
    two = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert key({**BODY, "messages": two}) != key({**BODY, "messages": two[::-1]})


@pytest.mark.parametrize(
    ("policy", "fields", "expected"),
    [
        ("never", {"temperature": 0}, False),
        ("always", {"temperature": 0.9, "n": 3}, True),
        ("always", {}, True),
        ("deterministic", {"temperature": 0}, True),
        ("deterministic", {"temperature": 0.0}, True),
        ("deterministic", {"temperature": 0, "n": 1}, True),
        ("deterministic", {"temperature": 0, "n": None}, True),
        ("deterministic", {"temperature": 0, "seed": 7, "top_p": 0.5}, True),
        ("deterministic", {}, False),  # absent: the upstream's default, 1
        ("deterministic", {"temperature": None}, False),
        ("deterministic", {"temperature": 0.7}, False),
        ("deterministic", {"temperature": False}, False),
        ("deterministic", {"temperature": "0"}, False),
        ("deterministic", {"temperature": 0, "n": 2}, False),
        ("deterministic", {"temperature": 0, "n": True}, False),
    ],
)
def test_cacheable(policy: Any, fields: dict[str, Any], expected: bool) -> None:
    body = {"model": "m", "messages": [], **fields}
    assert cacheable(policy, body) is expected
