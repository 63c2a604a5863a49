"""One Settings tree for the whole gateway.

Precedence, lowest first: defaults < config file (TOML or YAML) < ``TOKENRELAY_*`` environment
variables (nested with ``__``, e.g. ``TOKENRELAY_TIMEOUTS__IDLE=10``) < command-line flags.
``load_settings`` merges them explicitly so the order is visible in one place.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ENV_PREFIX = "TOKENRELAY_"


class _Section(BaseModel):
    # A typo in a config file must be an error, not a silently ignored key.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "json"
    heartbeat_interval: float = Field(
        15.0, gt=0, description="Seconds of upstream silence before an SSE comment line is sent."
    )
    send_timeout: float = Field(
        30.0, gt=0, description="Seconds a write to a client may block before it is dropped."
    )
    drain_grace: float = Field(
        10.0,
        ge=0,
        description="On shutdown, seconds open runs may take to finish before they are cancelled.",
    )


class UpstreamTarget(_Section):
    url: str = Field(description="Base URL of an OpenAI-compatible API, ending in /v1.")
    api_key: SecretStr | None = None

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")


class TimeoutSettings(_Section):
    connect: float = Field(5.0, gt=0, description="Seconds to open a connection upstream.")
    first_token: float = Field(
        60.0, gt=0, description="Seconds from sending a request to the first streamed chunk."
    )
    idle: float = Field(30.0, gt=0, description="Seconds allowed between two upstream chunks.")
    total: float = Field(600.0, gt=0, description="Seconds a whole generation may take.")


class RetrySettings(_Section):
    max_attempts: int = Field(3, ge=1, le=10, description="Tries before the first token, in all.")
    backoff_initial: float = Field(0.2, ge=0)
    backoff_max: float = Field(5.0, ge=0)
    retry_after_max: float = Field(
        10.0, ge=0, description="An upstream Retry-After longer than this is not waited for."
    )


class LimitSettings(_Section):
    max_body_bytes: int = Field(1_048_576, gt=0)
    max_messages: int = Field(512, gt=0)
    max_content_chars: int = Field(
        400_000, gt=0, description="Characters of text in all messages of one request."
    )
    max_n: int = Field(1, ge=1, description="Largest accepted `n` (choices per request).")


class RunSettings(_Section):
    retention: float = Field(
        600.0, gt=0, description="Seconds a finished run's events are kept after its end."
    )
    disconnect_grace: float = Field(
        10.0,
        ge=0,
        description="Seconds a /v1/runs run goes on with no reader before it is cancelled.",
    )
    openai_disconnect_grace: float = Field(
        0.0,
        ge=0,
        description="The same for /v1/chat/completions; 0 cancels the upstream at once.",
    )
    max_events_per_run: int = Field(
        10_000, gt=0, description="Events kept per run; past it the oldest are dropped."
    )
    max_bytes_per_run: int = Field(
        4_194_304, gt=0, description="About the bytes of events kept per run."
    )
    max_retained_events: int = Field(
        1_000_000,
        gt=0,
        description="Events of finished runs kept in memory in all; the oldest runs go first.",
    )


class MockSettings(_Section):
    """The built-in mock model served when no upstream is configured."""

    tokens: int = Field(20, ge=0)
    ttft_ms: float = Field(0.0, ge=0)
    itl_ms: float = Field(20.0, ge=0)


class Settings(BaseSettings):
    """Everything configurable about one gateway process."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True)

    server: ServerSettings = ServerSettings()
    upstreams: list[UpstreamTarget] = Field(
        default_factory=list,
        max_length=1,
        description="OpenAI-compatible upstreams; empty serves the built-in mock model.",
    )
    timeouts: TimeoutSettings = TimeoutSettings()
    retries: RetrySettings = RetrySettings()
    limits: LimitSettings = LimitSettings()
    runs: RunSettings = RunSettings()
    mock: MockSettings = MockSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only explicit values: load_settings merges file, env and flags itself.
        return (init_settings,)


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML or YAML config file into a plain dict."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        return tomllib.loads(text)
    if path.suffix in {".yaml", ".yml"}:
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping")
        return data
    raise ValueError(f"{path}: config files end in .toml, .yaml or .yml")


def read_environment() -> dict[str, Any]:
    """The ``TOKENRELAY_*`` variables of this process as a nested dict."""
    source = EnvSettingsSource(Settings, env_prefix=ENV_PREFIX, env_nested_delimiter="__")
    return dict(source())


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge two config dicts; ``override`` wins, nested sections merge key by key."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(config_file: Path | None = None, flags: dict[str, Any] | None = None) -> Settings:
    """Build the effective Settings: defaults < file < environment < flags.

    Raises:
        pydantic.ValidationError: a value is invalid; ``loc`` names the field.
        ValueError, OSError: the file cannot be read or parsed.
    """
    data: dict[str, Any] = {}
    if config_file is not None:
        data = read_config_file(config_file)
    data = merge(data, read_environment())
    data = merge(data, flags or {})
    return Settings(**data)
