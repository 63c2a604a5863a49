"""``BenchConfig``: URLs, bounds and request bodies are settled before any connection opens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from tokenrelay.bench import BenchConfig, StreamFormat, load_request_mix
from tokenrelay.bench.command import build_config


@pytest.mark.parametrize(
    "url",
    ["http://h:8080", "http://h:8080/", "http://h:8080/v1", "http://h:8080/v1/"],
)
def test_the_url_may_end_with_or_without_v1(url: str) -> None:
    assert BenchConfig(url).endpoint == "http://h:8080/v1/chat/completions"
    assert BenchConfig(url, format=StreamFormat.NATIVE).endpoint == "http://h:8080/v1/runs"


def test_a_path_prefix_is_kept() -> None:
    assert BenchConfig("https://h/proxy/v1").endpoint == "https://h/proxy/v1/chat/completions"


def test_without_any_bound_the_run_is_100_requests() -> None:
    assert BenchConfig("http://h").request_bound == 100
    assert BenchConfig("http://h", duration=5).request_bound is None
    assert BenchConfig("http://h", requests=7, duration=5).request_bound == 7


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"duration": 3601}, "duration"),
        ({"duration": 0}, "duration"),
        ({"concurrency": 0}, "concurrency"),
        ({"requests": 0}, "requests"),
        ({"ramp": 0}, "ramp"),
        ({"slow_reader": 0}, "slow_reader"),
        ({"timeout": 0}, "timeout"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_out_of_range_settings_are_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BenchConfig("http://h", **settings)


def test_the_url_needs_a_scheme() -> None:
    with pytest.raises(ValueError, match="http://"):
        BenchConfig("localhost:8080")


def test_bodies_merge_the_mix_over_the_defaults() -> None:
    config = BenchConfig(
        "http://h",
        mock={"tokens": 3},
        max_tokens=9,
        request_mix=({"mock": {"tokens": 1}}, {"temperature": 0.5}),
    )
    first, second = (orjson.loads(body) for body in config.bodies())
    assert first["mock"] == {"tokens": 1} and first["max_tokens"] == 9 and first["stream"] is True
    assert second["mock"] == {"tokens": 3} and second["temperature"] == 0.5


def test_native_bodies_do_not_ask_for_openai_streaming() -> None:
    [body] = BenchConfig("http://h", format=StreamFormat.NATIVE).bodies()
    assert "stream" not in orjson.loads(body)


def test_the_api_key_is_sent_but_never_reported() -> None:
    config = BenchConfig("http://h", api_key="sk-secret")
    assert config.headers()["Authorization"] == "Bearer sk-secret"
    assert "sk-secret" not in repr(config) and "sk-secret" not in str(config.to_dict())


def test_request_mix_file_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "mix.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=":2: each line must be a JSON object"):
        load_request_mix(path)
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="no requests"):
        load_request_mix(path)


def test_command_line_values_are_checked() -> None:
    with pytest.raises(ValueError, match="--mock is not valid JSON"):
        build_config("http://h", mock="{tokens: 3}", requests_file=None)
    with pytest.raises(ValueError, match="--format must be openai or native"):
        build_config("http://h", mock=None, requests_file=None, format="grpc")
    config = build_config("http://h", mock='{"tokens": 3}', requests_file=None, format="native")
    assert config.mock == {"tokens": 3} and config.format is StreamFormat.NATIVE
