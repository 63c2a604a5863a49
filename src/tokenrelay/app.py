"""The composition root: builds every component from Settings and wires them. No logic here."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aiohttp
import structlog
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenrelay import __version__
from tokenrelay.api import build_router
from tokenrelay.api.middleware import BodyLimitMiddleware, RequestContextMiddleware
from tokenrelay.api.problems import (
    handle_http_exception,
    handle_tokenrelay_error,
    handle_unexpected,
    handle_validation_error,
)
from tokenrelay.backends.memory import MemoryRunRegistry, MemoryStreamLog
from tokenrelay.backends.redis_log import RedisStreamLog
from tokenrelay.backends.redis_registry import RedisRunRegistry
from tokenrelay.backends.redis_store import RedisStore
from tokenrelay.config import Settings, UpstreamTarget
from tokenrelay.errors import TokenRelayError
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
            if agent_source is not None:
                source, origin = agent_source, {"agent": agent_source.name}
            else:
                target = await _upstream_target(settings, stack)
                session = await stack.enter_async_context(_client_session())
                source = OpenAIUpstream(session, target, settings.timeouts, settings.retries)
                origin = {"upstream": target.url, "mock": not settings.upstreams}
            hub = Hub(*_stores(settings, stack))
            stack.push_async_callback(hub.close)
            cancels = asyncio.create_task(hub.listen_for_cancels())
            stack.callback(cancels.cancel)
            if shutdown is not None:
                drainer = asyncio.create_task(_drain_on(shutdown, hub, settings.server.drain_grace))
                stack.callback(drainer.cancel)
            logger.info("gateway_started", **origin)
            yield {"services": Services(settings=settings, hub=hub, source=source)}

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
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.limits.max_body_bytes)
    app.add_middleware(RequestContextMiddleware)
    return app


def _stores(settings: Settings, stack: AsyncExitStack) -> tuple[StreamLog, RunRegistry]:
    """The run store ``store.backend`` names: this process's memory, or Redis."""
    if settings.store.backend == "redis":
        logger.info("store_selected", backend="redis", key_prefix=settings.store.key_prefix)
        return _redis_stores(settings, stack)
    logger.info("store_selected", backend="memory")
    return _memory_stores(settings, stack)


def _redis_stores(
    settings: Settings, stack: AsyncExitStack
) -> tuple[RedisStreamLog, RedisRunRegistry]:
    runs, store_settings = settings.runs, settings.store
    assert store_settings.redis_url is not None  # the settings validate it
    store = RedisStore(
        store_settings.redis_url.get_secret_value(),
        key_prefix=store_settings.key_prefix,
        socket_timeout=store_settings.socket_timeout,
    )
    stream_log = RedisStreamLog(
        store,
        retention=runs.retention,
        max_events_per_run=runs.max_events_per_run,
        max_bytes_per_run=runs.max_bytes_per_run,
        flush_interval=store_settings.flush_interval_ms / 1000,
    )
    registry = RedisRunRegistry(store, retention=runs.retention)
    stack.push_async_callback(store.close)  # the last of the three to close
    stack.push_async_callback(stream_log.close)
    stack.push_async_callback(registry.close)
    return stream_log, registry


def _memory_stores(
    settings: Settings, stack: AsyncExitStack
) -> tuple[MemoryStreamLog, MemoryRunRegistry]:
    runs = settings.runs
    stream_log = MemoryStreamLog(
        runs.retention, runs.max_retained_events, runs.max_events_per_run, runs.max_bytes_per_run
    )
    registry = MemoryRunRegistry(runs.retention)
    stack.callback(stream_log.close)
    stack.callback(registry.close)
    return stream_log, registry


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
