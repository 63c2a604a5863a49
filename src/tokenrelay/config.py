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
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
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
    http2: bool = Field(
        False,
        description="Also serve HTTP/2 with prior knowledge (h2c) on the cleartext port, "
        "served by granian instead of uvicorn.",
    )
    tls_certfile: Path | None = Field(
        None, description="PEM certificate (chain): serve TLS, with h2 and http/1.1 by ALPN."
    )
    tls_keyfile: Path | None = Field(None, description="PEM private key of tls_certfile.")
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Browser origins allowed to call the API (CORS); empty: none.",
    )
    max_header_bytes: int = Field(
        16_384, ge=1024, description="Request line and headers, in all; larger gets 431."
    )
    header_timeout: float = Field(
        10.0, gt=0, description="Seconds a client has to send a request's line and headers."
    )
    body_timeout: float = Field(
        30.0, gt=0, description="Seconds a client has to send a request's whole body."
    )
    keepalive_timeout: float = Field(
        5.0, gt=0, description="Seconds an idle keep-alive connection is kept open."
    )

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSettings:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("tls_certfile and tls_keyfile are set together")
        return self


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


class WebSocketSettings(_Section):
    """Limits of one ``/v1/ws`` connection (see docs/websocket.md)."""

    max_message_bytes: int = Field(
        1_048_576, gt=0, description="A larger client message closes the connection with 1009."
    )
    idle_timeout: float = Field(
        300.0,
        gt=0,
        description="Seconds with no client message and no run streaming before a close (1001).",
    )
    max_runs_per_connection: int = Field(
        16, ge=1, description="Runs one connection may stream at once; more get too_many_runs."
    )
    send_queue_size: int = Field(
        1000, ge=1, description="Frames waiting to be sent per connection, at most."
    )
    send_queue_overflow: Literal["close"] = Field(
        "close",
        description="When the queue stays full for send_timeout: close with 1013, release runs.",
    )
    send_timeout: float = Field(
        30.0, gt=0, description="Seconds a frame may wait for the client before it is dropped."
    )
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="Browser origins that may connect besides the gateway's own; "
        "clients without an Origin header are not browsers and are not checked.",
    )
    auth_timeout: float = Field(
        10.0, gt=0, description="Seconds to send the auth message when no header carried one."
    )


class StoreSettings(_Section):
    """Where runs live: in this process (``memory``) or in Redis, shared by every instance."""

    backend: Literal["memory", "redis"] = Field(
        "memory", description="memory: one process, no services; redis: several instances."
    )
    redis_url: SecretStr | None = Field(
        None, description="redis://[:password@]host:port/db (rediss:// for TLS); for redis."
    )
    key_prefix: str = Field(
        "tokenrelay:", description="Prefix of every Redis key and channel of this gateway."
    )
    socket_timeout: float = Field(
        2.0, gt=0, description="Seconds a Redis command may take before the store is unavailable."
    )
    flush_interval_ms: float = Field(
        0.0,
        ge=0,
        description="Extra milliseconds appends wait to share a Redis round trip; 0: none.",
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("key_prefix")
    @classmethod
    def _no_hash_tag(cls, value: str) -> str:
        # A brace would become the Redis Cluster hash tag of every key: one slot for all runs.
        if "{" in value or "}" in value:
            raise ValueError("must not contain { or }")
        return value

    @model_validator(mode="after")
    def _url_for_redis(self) -> StoreSettings:
        if self.backend == "redis" and self.redis_url is None:
            raise ValueError("store.redis_url is required when store.backend is redis")
        return self


class APIKeySettings(_Section):
    """One API key, stored only as a hash (``tokenrelay hash-key`` makes one)."""

    name: str = Field(description="A label for logs; never the key itself.")
    tenant: str = Field(min_length=1, max_length=128)
    sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="Hex SHA-256 of the key (keys are random, 32+ bytes).",
    )
    scopes: list[str] = Field(default_factory=list)


# fmt: off
JWTAlgorithm = Literal[
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "EdDSA",
]
# fmt: on


class JWTSettings(_Section):
    """Bearer JWTs: verified with a shared secret, PEM public keys, or a JWKS URL."""

    algorithms: list[JWTAlgorithm] = Field(
        min_length=1, description="The allow-list; a token with any other `alg` is refused."
    )
    secret: SecretStr | None = Field(None, description="Shared secret for the HS algorithms.")
    public_keys: dict[str, str] = Field(
        default_factory=dict, description='PEM public keys by `kid` ("default" when no kid).'
    )
    jwks_url: str | None = Field(None, description="Where to fetch a JSON Web Key Set.")
    jwks_cache_ttl: float = Field(300.0, gt=0, description="Seconds a fetched JWKS is trusted.")
    jwks_min_refresh_interval: float = Field(
        30.0, ge=0, description="At most one JWKS fetch per this many seconds (unknown kids)."
    )
    audience: list[str] = Field(default_factory=list, description="Accepted `aud`; empty: none.")
    issuer: str | None = Field(None, description="The required `iss`.")
    leeway: float = Field(30.0, ge=0, description="Seconds of clock skew allowed on exp/nbf/iat.")
    tenant_claim: str = Field("tenant", description="Claim naming the tenant (dots for nesting).")
    scopes_claim: str = Field("scope", description="Claim with the scopes (string or list).")

    @model_validator(mode="after")
    def _some_key(self) -> JWTSettings:
        uses_hs = any(alg.startswith("HS") for alg in self.algorithms)
        uses_public = any(not alg.startswith("HS") for alg in self.algorithms)
        if uses_hs and self.secret is None:
            raise ValueError("an HS algorithm needs auth.jwt.secret")
        if uses_public and not self.public_keys and self.jwks_url is None:
            raise ValueError("public-key algorithms need auth.jwt.public_keys or jwks_url")
        return self


class AuthSettings(_Section):
    """Who may call. With nothing configured the gateway is open (loopback only, see serve)."""

    api_keys: list[APIKeySettings] = Field(default_factory=list)
    api_keys_in_redis: bool = Field(
        False, description="Also look keys up in Redis (store.redis_url), by their hash."
    )
    jwt: JWTSettings | None = None
    required_scopes: list[str] = Field(
        default_factory=list, description="Scopes every caller must have; empty: none."
    )
    insecure_no_auth: bool = Field(
        False, description="Allow serving without auth on a non-loopback address."
    )
    open_tenant: str = Field("default", description="The tenant of every caller when open.")

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys) or self.api_keys_in_redis or self.jwt is not None


class TenantLimits(_Section):
    """Limits of one tenant; None is unlimited."""

    requests_per_minute: int | None = Field(None, ge=1)
    concurrent_streams: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)


class RateLimitSettings(_Section):
    """Per-tenant throttling; counters are shared through Redis when store.backend is redis."""

    default: TenantLimits = TenantLimits()
    tenants: dict[str, TenantLimits] = Field(
        default_factory=dict, description="Overrides by tenant name (a whole TenantLimits each)."
    )
    default_max_tokens: int = Field(
        1024,
        ge=1,
        description="Completion tokens reserved when a request sets no max_tokens.",
    )
    stream_lease: float = Field(
        900.0,
        gt=0,
        description="Seconds a concurrent-stream slot outlives a crashed instance at most.",
    )

    def for_tenant(self, tenant: str) -> TenantLimits:
        return self.tenants.get(tenant, self.default)


class AdmissionSettings(_Section):
    """What one process takes on before it sheds load with 503."""

    max_open_streams: int = Field(
        2000, ge=1, description="Runs this process drives at once; past it new ones get 503."
    )
    max_pending_starts: int = Field(
        200, ge=1, description="Runs waiting for their upstream's first answer at once."
    )
    retry_after: float = Field(1.0, gt=0, description="Retry-After of a shed request, seconds.")


CachePolicy = Literal["never", "deterministic", "always"]


class CacheSettings(_Section):
    """Exact-match response cache and coalescing of identical requests in flight."""

    enabled: bool = True
    policy: CachePolicy = Field(
        "deterministic",
        description="never; deterministic: only requests with temperature 0 and n 1; always.",
    )
    models: dict[str, CachePolicy] = Field(default_factory=dict, description="Policy by model.")
    tenants: dict[str, CachePolicy] = Field(
        default_factory=dict, description="Policy by tenant (wins over the model's)."
    )
    ttl: float = Field(3600.0, gt=0, description="Seconds an answer is kept.")
    max_entries: int = Field(10_000, ge=1)
    max_bytes: int = Field(64 * 1024 * 1024, ge=1, description="Bytes of all entries, about.")
    max_entry_bytes: int = Field(1_048_576, ge=1, description="Larger answers are not stored.")
    replay: Literal["immediate", "paced"] = "immediate"
    replay_interval_ms: float = Field(
        10.0, ge=0, description="Pause between replayed deltas when replay is paced."
    )
    coalesce: bool = Field(
        True, description="Identical cacheable requests in flight share one generation."
    )

    def policy_for(self, tenant: str, model: str) -> CachePolicy:
        if not self.enabled:
            return "never"
        return self.tenants.get(tenant) or self.models.get(model) or self.policy


class StreamSettings(_Section):
    """Payload of streams: token coalescing and compression."""

    # gzip first: brotli's encoder state costs ~290 KiB per open stream against ~30 KiB for
    # gzip or zstd, and zstd compresses worst when flushed after every event.
    compression: tuple[Literal["gzip", "zstd", "br"], ...] = Field(
        ("gzip", "zstd", "br"),
        description="Encodings offered, in order of preference; empty: never compress.",
    )
    coalesce_native_ms: float = Field(
        10.0, ge=0, description="Window merging deltas of native streams; 0: off."
    )
    coalesce_openai_ms: float = Field(
        0.0, ge=0, description="The same for OpenAI chunks; off by default (one chunk a token)."
    )
    coalesce_max_bytes: int = Field(
        1024, ge=1, description="A merged delta is sent once its text reaches this size."
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
    store: StoreSettings = StoreSettings()
    websocket: WebSocketSettings = WebSocketSettings()
    auth: AuthSettings = AuthSettings()
    rate_limits: RateLimitSettings = RateLimitSettings()
    admission: AdmissionSettings = AdmissionSettings()
    cache: CacheSettings = CacheSettings()
    stream: StreamSettings = StreamSettings()
    mock: MockSettings = MockSettings()

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.auth.api_keys_in_redis and self.store.redis_url is None:
            raise ValueError("auth.api_keys_in_redis needs store.redis_url")
        # A stream slot is leased, not renewed: it must outlast the longest generation.
        if self.rate_limits.stream_lease <= self.timeouts.total:
            raise ValueError("rate_limits.stream_lease must be longer than timeouts.total")
        return self

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
