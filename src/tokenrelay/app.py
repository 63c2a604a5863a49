"""The composition root: builds every component from Settings and wires them. No logic here."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from tokenrelay import __version__
from tokenrelay.api import build_router
from tokenrelay.api.middleware import (
    BodyLimitMiddleware,
    LoopbackHostMiddleware,
    RequestContextMiddleware,
)
from tokenrelay.api.problems import (
    handle_http_exception,
    handle_tokenrelay_error,
    handle_unexpected,
    handle_validation_error,
)
from tokenrelay.backends.memory import MemoryRunRegistry, MemoryStreamLog
from tokenrelay.backends.memory_cache import MemoryResponseCache
from tokenrelay.backends.memory_counters import MemoryLimitCounters
from tokenrelay.backends.redis_api_keys import RedisAPIKeyStore
from tokenrelay.backends.redis_cache import RedisResponseCache
from tokenrelay.backends.redis_counters import RedisLimitCounters
from tokenrelay.backends.redis_log import RedisStreamLog
from tokenrelay.backends.redis_registry import RedisRunRegistry
from tokenrelay.backends.redis_store import RedisStore
from tokenrelay.cache.answers import AnswerCache
from tokenrelay.cache.store import ResponseCache
from tokenrelay.config import AuthSettings, Settings, StoreSettings, UpstreamTarget
from tokenrelay.errors import TokenRelayError
from tokenrelay.guards.admission import AdmissionControl
from tokenrelay.guards.auth import Authenticator
from tokenrelay.guards.counters import LimitCounters
from tokenrelay.guards.exposure import is_loopback
from tokenrelay.guards.jwks import JWKSClient
from tokenrelay.guards.ratelimit import TenantLimiter
from tokenrelay.mockserver import MockDefaults, start_mock_server
from tokenrelay.runs.hub import Hub
from tokenrelay.runs.log import StreamLog
from tokenrelay.runs.registry import RunRegistry
from tokenrelay.services import Services
from tokenrelay.sources import Source
from tokenrelay.sources.agent import Agent, AgentSource
from tokenrelay.sources.openai_upstream import OpenAIUpstream

logger = structlog.get_logger("tokenrelay")


def create_app(
    settings: Settings | None = None,
    shutdown: asyncio.Event | None = None,
    *,
    agent: Agent | None = None,
    agent_name: str = "agent",
) -> FastAPI:
    """Build the gateway as an ASGI application.

    Args:
        settings: the effective configuration; defaults (embedded mode, built-in mock model)
            when omitted.
        shutdown: set by the owner of the process (``tokenrelay serve`` on SIGTERM) to drain:
            readiness fails, no new runs start, open runs get ``server.drain_grace`` seconds
            to finish and are then cancelled with a terminal event.
        agent: an async generator function that answers every run (see ``docs/agents.md``);
            when given, no upstream is used and no mock model is started.
        agent_name: the model name under which the agent is listed by ``GET /v1/models``.
    """
    settings = settings or Settings()
    agent_source = AgentSource(agent, agent_name) if agent is not None else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        async with AsyncExitStack() as stack:
            source: Source
            origin: dict[str, Any]
            session = await stack.enter_async_context(_client_session())
            cache_settings = settings.cache
            if agent_source is not None:
                source, origin = agent_source, {"agent": agent_source.name}
                # An agent is code with effects of its own: never answer it from a cache.
                cache_settings = cache_settings.model_copy(update={"enabled": False})
            else:
                target = await _upstream_target(settings, stack)
                source = OpenAIUpstream(session, target, settings.timeouts, settings.retries)
                origin = {"upstream": target.url, "mock": not settings.upstreams}
            stores = _stores(settings, stack)
            hub = Hub(stores.stream_log, stores.registry)
            stack.push_async_callback(hub.close)
            authenticator = _authenticator(settings.auth, session, stores.redis, stack)
            cancels = asyncio.create_task(hub.listen_for_cancels())
            stack.callback(cancels.cancel)
            if shutdown is not None:
                drainer = asyncio.create_task(_drain_on(shutdown, hub, settings.server.drain_grace))
                stack.callback(drainer.cancel)
            logger.info("gateway_started", **origin, auth=authenticator.enabled)
            yield {
                "services": Services(
                    settings=settings,
                    hub=hub,
                    source=source,
                    authenticator=authenticator,
                    limiter=TenantLimiter(settings.rate_limits, stores.counters),
                    admission=AdmissionControl(settings.admission, hub),
                    answers=AnswerCache(
                        cache_settings, stores.answers, hub, upstream=next(iter(origin.values()))
                    ),
                )
            }

    app = FastAPI(
        title="tokenrelay",
        version=__version__,
        summary="A streaming gateway for LLM agents: OpenAI-compatible relay and native events.",
        lifespan=lifespan,
        docs_url="/docs",
        openapi_url="/openapi.json",
        redoc_url=None,
    )
    app.include_router(build_router())
    app.add_exception_handler(TokenRelayError, handle_tokenrelay_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_exception)
    app.add_exception_handler(Exception, handle_unexpected)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.limits.max_body_bytes,
        timeout=settings.server.body_timeout,
    )
    if settings.server.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.server.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=[
                "Authorization",
                "Content-Type",
                "api-key",
                "Last-Event-ID",
                "Cache-Control",
            ],
            expose_headers=[
                "X-Run-Id",
                "X-Request-ID",
                "X-Cache",
                "X-Coalesced",
                "RateLimit",
                "RateLimit-Policy",
                "Retry-After",
            ],
            max_age=600,
        )
    if not settings.auth.enabled and is_loopback(settings.server.host):
        app.add_middleware(LoopbackHostMiddleware)
    app.add_middleware(RequestContextMiddleware)
    return app


@dataclass(frozen=True, slots=True)
class _Stores:
    """Every store-backed component, on one backend."""

    stream_log: StreamLog
    registry: RunRegistry
    counters: LimitCounters
    answers: ResponseCache
    redis: RedisStore | None  # also for API keys in Redis on the memory backend


def _stores(settings: Settings, stack: AsyncExitStack) -> _Stores:
    """The stores ``store.backend`` names: this process's memory, or Redis.

    Callbacks close them in the reverse order: every component before the Redis connection.
    """
    backend = settings.store.backend
    redis = None
    if backend == "redis" or settings.auth.api_keys_in_redis:
        redis = _redis_store(settings.store)
        stack.push_async_callback(redis.close)
    logger.info("store_selected", backend=backend, key_prefix=settings.store.key_prefix)
    if backend == "redis":
        assert redis is not None
        return _redis_stores(settings, redis, stack)
    return _memory_stores(settings, redis, stack)


def _redis_store(store_settings: StoreSettings) -> RedisStore:
    assert store_settings.redis_url is not None  # the settings validate it
    return RedisStore(
        store_settings.redis_url.get_secret_value(),
        key_prefix=store_settings.key_prefix,
        socket_timeout=store_settings.socket_timeout,
    )


def _redis_stores(settings: Settings, redis: RedisStore, stack: AsyncExitStack) -> _Stores:
    runs = settings.runs
    stream_log = RedisStreamLog(
        redis,
        retention=runs.retention,
        max_events_per_run=runs.max_events_per_run,
        max_bytes_per_run=runs.max_bytes_per_run,
        flush_interval=settings.store.flush_interval_ms / 1000,
    )
    registry = RedisRunRegistry(redis, retention=runs.retention)
    counters = RedisLimitCounters(redis)
    answers = RedisResponseCache(redis, max_entry_bytes=settings.cache.max_entry_bytes)
    for close in (stream_log.close, registry.close, counters.close, answers.close):
        stack.push_async_callback(close)
    return _Stores(stream_log, registry, counters, answers, redis)


def _memory_stores(settings: Settings, redis: RedisStore | None, stack: AsyncExitStack) -> _Stores:
    runs, cache = settings.runs, settings.cache
    stream_log = MemoryStreamLog(
        runs.retention, runs.max_retained_events, runs.max_events_per_run, runs.max_bytes_per_run
    )
    registry = MemoryRunRegistry(runs.retention)
    answers = MemoryResponseCache(
        max_entries=cache.max_entries,
        max_bytes=cache.max_bytes,
        max_entry_bytes=cache.max_entry_bytes,
    )
    stack.callback(stream_log.close)
    stack.callback(registry.close)
    stack.push_async_callback(answers.close)
    return _Stores(stream_log, registry, MemoryLimitCounters(), answers, redis)


def _authenticator(
    settings: AuthSettings,
    session: aiohttp.ClientSession,
    redis: RedisStore | None,
    stack: AsyncExitStack,
) -> Authenticator:
    jwks = None
    if settings.jwt is not None and settings.jwt.jwks_url is not None:
        jwks = JWKSClient(
            settings.jwt.jwks_url,
            session,
            settings.jwt.jwks_cache_ttl,
            settings.jwt.jwks_min_refresh_interval,
        )
        stack.push_async_callback(jwks.close)
    api_key_store = None
    if settings.api_keys_in_redis:
        assert redis is not None  # the settings validate it
        api_key_store = RedisAPIKeyStore(redis)
        stack.push_async_callback(api_key_store.close)
    return Authenticator(settings, api_key_store=api_key_store, jwks=jwks)


async def _drain_on(shutdown: asyncio.Event, hub: Hub, grace: float) -> None:
    await shutdown.wait()
    logger.info("gateway_draining", active_runs=hub.active_runs, grace=grace)
    await hub.drain(grace)


async def _upstream_target(settings: Settings, stack: AsyncExitStack) -> UpstreamTarget:
    """The configured upstream, or the built-in mock model started on a free loopback port."""
    if settings.upstreams:
        return settings.upstreams[0]
    mock = settings.mock
    runner, port = await start_mock_server(
        "127.0.0.1", 0, MockDefaults(tokens=mock.tokens, ttft_ms=mock.ttft_ms, itl_ms=mock.itl_ms)
    )
    stack.push_async_callback(runner.cleanup)
    return UpstreamTarget(url=f"http://127.0.0.1:{port}/v1")


def _client_session() -> aiohttp.ClientSession:
    # No pool cap: every open stream holds one upstream connection, admission control
    # (not the pool) decides how many there may be.
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=60, keepalive_timeout=30)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None),
        auto_decompress=True,
        raise_for_status=False,
    )
