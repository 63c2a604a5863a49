"""``load_settings``: defaults < file (TOML or YAML) < ``TOKENRELAY_*`` environment < flags."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from tokenrelay.config import Settings, load_settings

SECRET = "sk-very-secret-value-42"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``TOKENRELAY_*`` variable of the outer environment leaks into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("TOKENRELAY_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


TOML = """
[server]
port = 8100
host = "0.0.0.0"

[timeouts]
idle = 12.5

[[upstreams]]
url = "http://model.internal:8000/v1/"
api_key = "sk-very-secret-value-42"
"""

YAML = """
server:
  port: 8100
  host: 0.0.0.0
timeouts:
  idle: 12.5
upstreams:
  - url: http://model.internal:8000/v1/
    api_key: sk-very-secret-value-42
"""


@pytest.fixture(params=["toml", "yaml", "yml"])
def config_file(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    text = TOML if request.param == "toml" else YAML
    return write(tmp_path, f"tokenrelay.{request.param}", text)


def test_defaults() -> None:
    settings = load_settings()
    assert settings == Settings()
    assert settings.server.port == 8080
    assert settings.server.host == "127.0.0.1"
    assert settings.upstreams == []
    assert settings.timeouts.idle == 30.0
    assert settings.limits.max_body_bytes == 1_048_576
    assert settings.limits.max_n == 1


def test_file_overrides_defaults(config_file: Path) -> None:
    settings = load_settings(config_file)
    assert settings.server.port == 8100
    assert settings.server.host == "0.0.0.0"
    assert settings.timeouts.idle == 12.5
    # Sections merge key by key: what the file does not set keeps its default.
    assert settings.timeouts.connect == 5.0
    assert settings.server.log_level == "info"
    assert settings.upstreams[0].url == "http://model.internal:8000/v1"
    api_key = settings.upstreams[0].api_key
    assert api_key is not None
    assert api_key.get_secret_value() == SECRET


def test_environment_overrides_file(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENRELAY_SERVER__PORT", "9999")
    monkeypatch.setenv("TOKENRELAY_TIMEOUTS__CONNECT", "2")
    settings = load_settings(config_file)
    assert settings.server.port == 9999
    assert settings.timeouts.connect == 2.0
    # The rest of the file's sections survive the environment's nested values.
    assert settings.server.host == "0.0.0.0"
    assert settings.timeouts.idle == 12.5


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENRELAY_SERVER__PORT", "9999")
    monkeypatch.setenv("TOKENRELAY_LIMITS__MAX_MESSAGES", "3")
    settings = load_settings()
    assert settings.server.port == 9999
    assert settings.limits.max_messages == 3
    assert settings.server.host == "127.0.0.1"


def test_flags_override_environment(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENRELAY_SERVER__PORT", "9999")
    settings = load_settings(
        config_file,
        {"server": {"port": 7000}, "upstreams": [{"url": "https://other.example/v1"}]},
    )
    assert settings.server.port == 7000
    assert settings.server.host == "0.0.0.0"
    assert [u.url for u in settings.upstreams] == ["https://other.example/v1"]
    assert settings.upstreams[0].api_key is None


def test_invalid_environment_value_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENRELAY_TIMEOUTS__IDLE", "soon")
    with pytest.raises(ValidationError) as caught:
        load_settings()
    assert [e["loc"] for e in caught.value.errors()] == [("timeouts", "idle")]


@pytest.mark.parametrize(
    ("name", "text", "loc"),
    [
        pytest.param("a.toml", "[server]\nprot = 1\n", ("server", "prot"), id="toml-section"),
        pytest.param("a.toml", "colour = 'blue'\n", ("colour",), id="toml-top-level"),
        pytest.param("a.yaml", "timeouts:\n  idel: 3\n", ("timeouts", "idel"), id="yaml-section"),
        pytest.param(
            "a.yaml",
            "upstreams:\n  - url: http://x/v1\n    key: k\n",
            ("upstreams", 0, "key"),
            id="yaml-upstream",
        ),
    ],
)
def test_unknown_key_is_an_error(
    tmp_path: Path, name: str, text: str, loc: tuple[object, ...]
) -> None:
    with pytest.raises(ValidationError) as caught:
        load_settings(write(tmp_path, name, text))
    errors = caught.value.errors()
    assert [(e["loc"], e["type"]) for e in errors] == [(loc, "extra_forbidden")]
    assert str(loc[-1]) in str(caught.value)


@pytest.mark.parametrize(
    ("text", "loc"),
    [
        pytest.param("[timeouts]\nidle = -1\n", ("timeouts", "idle"), id="negative-timeout"),
        pytest.param("[server]\nport = 70000\n", ("server", "port"), id="port-range"),
        pytest.param("[server]\nlog_level = 'loud'\n", ("server", "log_level"), id="log-level"),
        pytest.param("[retries]\nmax_attempts = 0\n", ("retries", "max_attempts"), id="attempts"),
        pytest.param("[limits]\nmax_n = 0\n", ("limits", "max_n"), id="max-n"),
    ],
)
def test_invalid_value_names_the_field(tmp_path: Path, text: str, loc: tuple[object, ...]) -> None:
    with pytest.raises(ValidationError) as caught:
        load_settings(write(tmp_path, "a.toml", text))
    assert [e["loc"] for e in caught.value.errors()] == [loc]


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("ftp://model.internal/v1", id="ftp"),
        pytest.param("model.internal:8000/v1", id="no-scheme"),
        pytest.param("", id="empty"),
    ],
)
def test_invalid_upstream_url(tmp_path: Path, url: str) -> None:
    with pytest.raises(ValidationError) as caught:
        load_settings(write(tmp_path, "a.toml", f"[[upstreams]]\nurl = {json.dumps(url)}\n"))
    assert [e["loc"] for e in caught.value.errors()] == [("upstreams", 0, "url")]
    assert "http://" in str(caught.value)


def test_invalid_upstream_url_from_flags() -> None:
    with pytest.raises(ValidationError) as caught:
        load_settings(None, {"upstreams": [{"url": "localhost:8000/v1"}]})
    assert [e["loc"] for e in caught.value.errors()] == [("upstreams", 0, "url")]


def test_at_most_one_upstream(tmp_path: Path) -> None:
    text = "[[upstreams]]\nurl = 'http://a/v1'\n[[upstreams]]\nurl = 'http://b/v1'\n"
    with pytest.raises(ValidationError) as caught:
        load_settings(write(tmp_path, "a.toml", text))
    assert [e["loc"] for e in caught.value.errors()] == [("upstreams",)]


@pytest.mark.parametrize(
    "name", ["tokenrelay.json", "tokenrelay.ini", "tokenrelay", "config.toml.bak"]
)
def test_bad_suffix_is_a_value_error(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match=r"\.toml, \.yaml or \.yml") as caught:
        load_settings(write(tmp_path, name, "[server]\nport = 1\n"))
    assert not isinstance(caught.value, ValidationError)


def test_yaml_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mapping"):
        load_settings(write(tmp_path, "a.yaml", "- server\n- port\n"))


@pytest.mark.parametrize(
    ("name", "text"),
    [
        pytest.param("a.toml", "[server\nport = 1\n", id="toml"),
        pytest.param("a.yaml", "server: [1, 2\n", id="yaml-unclosed"),
        pytest.param("a.yaml", "server:\n  port: 1\n bad indent: 2\n", id="yaml-indent"),
    ],
)
def test_unparsable_file_is_a_value_error(tmp_path: Path, name: str, text: str) -> None:
    """As documented by load_settings: a file that cannot be parsed raises ValueError."""
    with pytest.raises(ValueError) as caught:
        load_settings(write(tmp_path, name, text))
    assert not isinstance(caught.value, ValidationError)


def test_empty_yaml_is_all_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "a.yaml", "")) == Settings()


def test_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        load_settings(tmp_path / "absent.toml")


def test_secret_is_masked_in_dumps(config_file: Path) -> None:
    settings = load_settings(config_file)
    dumped = settings.model_dump(mode="json")
    assert dumped["upstreams"][0]["api_key"] == "**********"
    assert dumped["upstreams"][0]["url"] == "http://model.internal:8000/v1"
    assert SECRET not in json.dumps(dumped)
    assert SECRET not in settings.model_dump_json()
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValidationError):
        settings.server.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"auth": {"api_keys_in_redis": True}},
            "auth.api_keys_in_redis needs store.redis_url",
        ),
        (
            {"rate_limits": {"stream_lease": 600}},
            "rate_limits.stream_lease must be longer than timeouts.total",
        ),
        (
            {"auth": {"jwt": {"algorithms": ["HS256"]}}},
            "an HS algorithm needs auth.jwt.secret",
        ),
        (
            {"auth": {"jwt": {"algorithms": ["RS256"], "secret": "x" * 32}}},
            "public-key algorithms need auth.jwt.public_keys or jwks_url",
        ),
    ],
)
def test_settings_that_cannot_work_together(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**settings)  # type: ignore[arg-type]


def test_every_setting_is_documented() -> None:
    """docs/configuration.md has a row for every leaf of the Settings tree."""
    from pathlib import Path

    from pydantic import BaseModel

    from tokenrelay.config import Settings

    def leaves(model: type[BaseModel], prefix: str) -> list[str]:
        names = []
        for name, field in model.model_fields.items():
            annotation = field.annotation
            nested = next(
                (
                    arg
                    for arg in (annotation, *getattr(annotation, "__args__", ()))
                    if isinstance(arg, type) and issubclass(arg, BaseModel)
                ),
                None,
            )
            is_list = getattr(annotation, "__origin__", None) is list
            if nested is not None and not is_list and nested.__name__ != "TenantLimits":
                names += leaves(nested, f"{prefix}{name}.")
            else:
                names.append(prefix + name)
        return names

    reference = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    missing = [name for name in leaves(Settings, "") if f"| `{name}` |" not in reference]
    assert missing == []
