"""The ``tokenrelay`` command as a user runs it: ``python -m tokenrelay ...`` in a subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import tokenrelay
from tests.conftest import Server, free_port, start_server

SECRET = "sk-cli-secret-do-not-print"

VALID = f"""
[server]
port = 8100

[timeouts]
idle = 12.5

[[upstreams]]
url = "http://model.internal:8000/v1"
api_key = "{SECRET}"
"""


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TOKENRELAY_")}
    return {**env, **extra}


def tokenrelay_cmd(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenrelay", *args],
        capture_output=True,
        text=True,
        env=clean_env(**env),
        timeout=30,
    )


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_check_config_prints_effective_settings(tmp_path: Path) -> None:
    result = tokenrelay_cmd("check-config", str(write(tmp_path, "ok.toml", VALID)))
    assert result.returncode == 0, result.stderr
    settings = json.loads(result.stdout)
    assert settings["server"]["port"] == 8100
    assert settings["server"]["host"] == "127.0.0.1"
    assert settings["timeouts"]["idle"] == 12.5
    assert settings["timeouts"]["connect"] == 5.0
    assert settings["upstreams"] == [
        {"url": "http://model.internal:8000/v1", "api_key": "**********"}
    ]
    assert set(settings) == {
        "server",
        "upstreams",
        "timeouts",
        "retries",
        "limits",
        "runs",
        "store",
        "websocket",
        "auth",
        "rate_limits",
        "admission",
        "cache",
        "stream",
        "mock",
    }
    assert SECRET not in result.stdout
    assert SECRET not in result.stderr


def test_check_config_reads_yaml(tmp_path: Path) -> None:
    text = (
        f"server:\n  port: 8100\nupstreams:\n  - url: https://x.example/v1\n    api_key: {SECRET}\n"
    )
    result = tokenrelay_cmd("check-config", str(write(tmp_path, "ok.yaml", text)))
    assert result.returncode == 0, result.stderr
    settings = json.loads(result.stdout)
    assert settings["server"]["port"] == 8100
    assert settings["upstreams"][0]["api_key"] == "**********"
    assert SECRET not in result.stdout + result.stderr


def test_check_config_applies_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "ok.toml", VALID)
    result = tokenrelay_cmd("check-config", str(path), TOKENRELAY_SERVER__PORT="9999")
    assert result.returncode == 0, result.stderr
    settings = json.loads(result.stdout)
    assert settings["server"]["port"] == 9999
    assert settings["timeouts"]["idle"] == 12.5


@pytest.mark.parametrize(
    ("text", "field"),
    [
        pytest.param("[timeouts]\nidle = -1\n", "timeouts.idle", id="negative-idle"),
        pytest.param("[server]\nprot = 8080\n", "server.prot", id="unknown-field"),
        pytest.param("verbose = true\n", "verbose", id="unknown-top-level"),
        pytest.param("[[upstreams]]\nurl = 'ftp://x'\n", "upstreams.0.url", id="bad-url"),
    ],
)
def test_check_config_names_the_bad_field(tmp_path: Path, text: str, field: str) -> None:
    result = tokenrelay_cmd("check-config", str(write(tmp_path, "bad.toml", text)))
    assert result.returncode != 0
    assert result.stdout == ""
    assert f"invalid setting {field}:" in result.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "[auth.jwt]\nalgorithms = ['HS256']\nsecret = 'short'\n",
            "invalid setting auth.jwt.secret must be at least 32 bytes for HS256",
            id="short-secret",
        ),
        pytest.param(
            "[auth.jwt]\nalgorithms = ['RS256']\n[auth.jwt.public_keys]\nmain = 'not a key'\n",
            "invalid setting auth.jwt.public_keys['main'] is not a PEM public key",
            id="bad-pem",
        ),
    ],
)
def test_check_config_refuses_jwt_keys_that_cannot_work(
    tmp_path: Path, text: str, message: str
) -> None:
    result = tokenrelay_cmd("check-config", str(write(tmp_path, "jwt.toml", text)))
    assert result.returncode == 2
    assert message in result.stderr
    assert "short" not in result.stderr.replace(message, "")  # the secret is not echoed


def test_check_config_names_a_bad_environment_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "ok.toml", VALID)
    result = tokenrelay_cmd("check-config", str(path), TOKENRELAY_TIMEOUTS__IDLE="-5")
    assert result.returncode != 0
    assert "timeouts.idle" in result.stderr
    assert SECRET not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        pytest.param("bad.json", "{}", ".toml, .yaml or .yml", id="suffix"),
        pytest.param("bad.toml", "[server\nport = 1\n", "cannot read config", id="broken-toml"),
        pytest.param("bad.yaml", "server: [1, 2\n", "cannot read config", id="broken-yaml"),
    ],
)
def test_check_config_unreadable_file(tmp_path: Path, name: str, text: str, message: str) -> None:
    result = tokenrelay_cmd("check-config", str(write(tmp_path, name, text)))
    assert result.returncode != 0
    assert result.stdout == ""
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_missing_file(tmp_path: Path) -> None:
    result = tokenrelay_cmd("check-config", str(tmp_path / "absent.toml"))
    assert result.returncode != 0
    assert "absent.toml" in result.stderr
    assert "Traceback" not in result.stderr


def test_version() -> None:
    result = tokenrelay_cmd("version")
    assert result.returncode == 0
    assert result.stdout.strip() == tokenrelay.__version__
    assert tokenrelay.__version__


@pytest.fixture
def mock_model_gateway(tmp_path: Path) -> Iterator[tuple[Server, int]]:
    """``tokenrelay serve`` with no upstream at all, on a free port."""
    port = free_port()
    server = start_server(
        ["serve", "--port", str(port)],
        "/readyz",
        port,
        tmp_path / "serve.log",
        {"TOKENRELAY_MOCK__ITL_MS": "5"},
    )
    yield server, port
    server.stop()


def test_serve_without_upstream_uses_the_built_in_mock(
    mock_model_gateway: tuple[Server, int],
) -> None:
    server, port = mock_model_gateway
    startup = [line for line in server.log().splitlines() if "built-in mock model" in line]
    assert len(startup) == 1
    assert f"http://127.0.0.1:{port}" in startup[0]
    assert tokenrelay.__version__ in startup[0]

    body = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.stream("POST", server.url + "/v1/runs", json=body, timeout=10) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        lines = list(response.iter_lines())
    events = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    assert events[0] == "run.started"
    assert events[-1] == "run.completed"
    assert events.count("run.completed") == 1
    # The role chunk and 20 default tokens, some merged into one event (stream.coalesce_native_ms).
    assert 2 <= events.count("message.delta") <= 21
    data = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    text = "".join(
        d.get("content", "") for d, e in zip(data, events, strict=True) if e == "message.delta"
    )
    assert text == "".join(f"tok{i} " for i in range(20))
    assert httpx.get(server.url + "/v1/models").json()["data"][0]["id"] == "mock-model"


def test_serve_stops_cleanly_on_sigterm(mock_model_gateway: tuple[Server, int]) -> None:
    server, _ = mock_model_gateway
    server.stop()
    # uvicorn re-raises the SIGTERM it handled once the graceful shutdown is done.
    assert server.process.returncode in (0, -signal.SIGTERM)
    log = server.log()
    assert "Application shutdown complete." in log
    assert "Traceback" not in log


def test_serve_an_agent_from_the_command_line(tmp_path: Path) -> None:
    port = free_port()
    server = start_server(
        ["serve", "--port", str(port), "--agent", "examples.agent_example:weather_agent"],
        "/readyz",
        port,
        tmp_path / "agent.log",
    )
    try:
        models = httpx.get(server.url + "/v1/models").json()
        assert [model["id"] for model in models["data"]] == ["weather_agent"]
        answer = httpx.post(
            server.url + "/v1/chat/completions",
            json={"model": "weather_agent", "messages": [{"role": "user", "content": "hello"}]},
            timeout=10,
        ).json()
        assert answer["choices"][0]["message"]["content"]
        assert answer["choices"][0]["finish_reason"] == "stop"
    finally:
        server.stop()
    assert "serving the agent examples.agent_example:weather_agent" in server.log()


def test_serve_refuses_an_agent_it_cannot_load() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tokenrelay", "serve", "--agent", "no_such_module:agent"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "cannot load the agent no_such_module:agent" in result.stderr


def test_serve_on_loopback_without_auth_runs_open_and_says_so(
    mock_model_gateway: tuple[Server, int],
) -> None:
    server, _ = mock_model_gateway
    warnings = [line for line in server.log().splitlines() if line.startswith("warning: ")]
    assert warnings == [
        "warning: no API keys or JWT configured: open to every client of 127.0.0.1 "
        "(tenant 'default')"
    ]


def test_serve_refuses_a_public_address_without_auth() -> None:
    result = tokenrelay_cmd("serve", "--host", "0.0.0.0", "--port", str(free_port()))
    assert result.returncode == 2
    assert "refusing to serve on 0.0.0.0 without authentication" in result.stderr
    assert "--insecure-no-auth" in result.stderr


def test_serve_a_public_address_open_only_when_told_to(tmp_path: Path) -> None:
    port = free_port()
    server = start_server(
        ["serve", "--host", "0.0.0.0", "--port", str(port), "--insecure-no-auth"],
        "/readyz",
        port,
        tmp_path / "open.log",
    )
    try:
        assert httpx.get(server.url + "/v1/models").status_code == 200
    finally:
        server.stop()
    assert "warning: --insecure-no-auth: serving 0.0.0.0 with NO authentication" in server.log()


def test_serve_a_public_address_with_api_keys(tmp_path: Path) -> None:
    key = "tr_cli_test_key_0123456789abcdef"
    digest = hashlib.sha256(key.encode()).hexdigest()
    port = free_port()
    server = start_server(
        ["serve", "--host", "0.0.0.0", "--port", str(port)],
        "/readyz",
        port,
        tmp_path / "keys.log",
        {
            "TOKENRELAY_AUTH__API_KEYS": json.dumps(
                [{"name": "ops", "tenant": "t", "sha256": digest}]
            )
        },
    )
    try:
        assert httpx.get(server.url + "/v1/models").status_code == 401
        models = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert models.status_code == 200
    finally:
        server.stop()
    assert "warning:" not in server.log()
    assert key not in server.log()


def test_hash_key_hashes_a_key_from_stdin_and_makes_new_ones() -> None:
    given = subprocess.run(
        [sys.executable, "-m", "tokenrelay", "hash-key", "-"],
        input="tr_my_key\n",
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=30,
        check=True,
    )
    assert given.stdout == f"sha256: {hashlib.sha256(b'tr_my_key').hexdigest()}\n"
    fresh = tokenrelay_cmd("hash-key")
    key_line, hash_line = fresh.stdout.splitlines()
    key = key_line.removeprefix("key:    ")
    assert len(key) >= 40
    assert hash_line == f"sha256: {hashlib.sha256(key.encode()).hexdigest()}"
