"""The RunRegistry contract (``tokenrelay.runs.registry.RunRegistry``), run against every
implementation.

Add an implementation by adding its name to ``BACKENDS`` and a branch to ``make_run_registry``,
which builds a registry of that backend with the ``retention`` a test asks for. The Redis backend
runs against a real redis-server (the ``redis_url`` fixture), each registry under a key prefix of
its own.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tokenrelay.backends.memory import MemoryRunRegistry
from tokenrelay.backends.redis_registry import RedisRunRegistry
from tokenrelay.backends.redis_store import RedisStore
from tokenrelay.events import RunInfo
from tokenrelay.runs.registry import RunRegistry

BACKENDS = ["memory", "redis"]

# Only keeps a registry that never delivers from holding the test; never a timing claim.
GUARD = 2.0
# Lets a listener start listening before the request it should see is sent.
SETTLE = 0.05

RunRegistryFactory = Callable[..., RunRegistry]


def make_run_registry(backend: str, redis_url: str | None = None, **options: Any) -> RunRegistry:
    """A new, empty registry of ``backend``; ``options`` are the keyword arguments of the tests."""
    if backend == "memory":
        return MemoryRunRegistry(**options)
    if backend == "redis":
        assert redis_url is not None
        store = RedisStore(redis_url, key_prefix=f"test:{uuid.uuid4().hex[:12]}:")
        return RedisRunRegistry(store, **options)
    raise AssertionError(f"unknown RunRegistry backend {backend!r}")


async def close_run_registry(registry: RunRegistry) -> None:
    close = getattr(registry, "close", None)
    if close is not None:
        result = close()
        if inspect.isawaitable(result):
            await result
    if isinstance(registry, RedisRunRegistry):
        await registry.store.close()


def backend_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """What ``make_run_registry`` needs besides the options: the Redis of the suite."""
    if request.param == "redis":
        return {"redis_url": request.getfixturevalue("redis_url")}
    return {}


@pytest.fixture(params=BACKENDS)
async def registry_factory(request: pytest.FixtureRequest) -> AsyncIterator[RunRegistryFactory]:
    created: list[RunRegistry] = []

    backend = backend_options(request)

    def factory(**options: Any) -> RunRegistry:
        registry = make_run_registry(request.param, **backend, **options)
        created.append(registry)
        return registry

    yield factory
    for registry in created:
        await close_run_registry(registry)


@pytest.fixture(params=BACKENDS)
async def registry(request: pytest.FixtureRequest) -> AsyncIterator[RunRegistry]:
    run_registry = make_run_registry(request.param, **backend_options(request))
    yield run_registry
    await close_run_registry(run_registry)


def new_id() -> str:
    return "run_test_" + uuid.uuid4().hex


def running(run_id: str, *, detached: bool = False, tenant: str = "default") -> RunInfo:
    return RunInfo(run_id, "running", created_at=time.time(), detached=detached, tenant=tenant)


def ended(info: RunInfo, status: Any = "completed", error_code: str | None = None) -> RunInfo:
    return RunInfo(
        info.id,
        status,
        created_at=info.created_at,
        detached=info.detached,
        finished_at=time.time(),
        error_code=error_code,
        tenant=info.tenant,
    )


class CancelListener:
    """Reads ``cancel_requests()`` in a task; ``next()`` is the next id, within the guard."""

    def __init__(self, registry: RunRegistry) -> None:
        self._requests = registry.cancel_requests()
        self._pending: asyncio.Task[str] | None = None

    async def start(self) -> None:
        self._pending = asyncio.create_task(self._next())
        await asyncio.sleep(SETTLE)

    async def next(self) -> str:
        if self._pending is None:
            self._pending = asyncio.create_task(self._next())
        pending, self._pending = self._pending, None
        return await asyncio.wait_for(pending, GUARD)

    async def _next(self) -> str:
        return await anext(self._requests)

    async def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            await asyncio.gather(self._pending, return_exceptions=True)
        aclose = getattr(self._requests, "aclose", None)
        if aclose is not None:
            await aclose()


# Records


async def test_register_then_get_returns_the_record(registry: RunRegistry) -> None:
    info = running(new_id(), detached=True)
    await registry.register(info)
    assert await registry.get(info.id) == info


async def test_finish_replaces_the_record(registry: RunRegistry) -> None:
    info = running(new_id())
    await registry.register(info)
    final = ended(info, "failed", "upstream_disconnected")
    await registry.finish(final)
    got = await registry.get(info.id)
    assert got == final
    assert got is not None
    assert got.status == "failed"
    assert got.error_code == "upstream_disconnected"
    assert got.created_at == info.created_at
    assert got.finished_at is not None


async def test_the_record_keeps_its_tenant_to_the_end(registry: RunRegistry) -> None:
    info = running(new_id(), tenant="acme")
    await registry.register(info)
    assert (await registry.get(info.id)) == info
    await registry.finish(ended(info))
    final = await registry.get(info.id)
    assert final is not None
    assert final.tenant == "acme"


async def test_records_are_independent(registry: RunRegistry) -> None:
    first, second = running(new_id()), running(new_id())
    await registry.register(first)
    await registry.register(second)
    await registry.finish(ended(first, "cancelled", "client_disconnected"))
    got = await registry.get(first.id)
    assert got is not None
    assert got.status == "cancelled"
    assert await registry.get(second.id) == second


async def test_get_of_an_unknown_run_is_none(registry: RunRegistry) -> None:
    assert await registry.get(new_id()) is None


# Subscriber counts


async def test_add_subscriber_counts_up_and_down(registry: RunRegistry) -> None:
    run_id = new_id()
    await registry.register(running(run_id))
    assert await registry.add_subscriber(run_id, 0) == 0
    assert await registry.add_subscriber(run_id, +1) == 1
    assert await registry.add_subscriber(run_id, +1) == 2
    assert await registry.add_subscriber(run_id, 0) == 2
    assert await registry.add_subscriber(run_id, -1) == 1
    assert await registry.add_subscriber(run_id, 0) == 1
    assert await registry.add_subscriber(run_id, -1) == 0
    assert await registry.add_subscriber(run_id, 0) == 0


async def test_add_subscriber_never_goes_below_zero(registry: RunRegistry) -> None:
    run_id = new_id()
    await registry.register(running(run_id))
    assert await registry.add_subscriber(run_id, -1) == 0
    assert await registry.add_subscriber(run_id, -1) == 0
    assert await registry.add_subscriber(run_id, 0) == 0
    assert await registry.add_subscriber(run_id, +1) == 1  # the extra leaves were not kept


async def test_subscriber_counts_are_per_run(registry: RunRegistry) -> None:
    first, second = new_id(), new_id()
    for run_id in (first, second):
        await registry.register(running(run_id))
    await registry.add_subscriber(first, +1)
    await registry.add_subscriber(first, +1)
    await registry.add_subscriber(second, +1)
    assert await registry.add_subscriber(first, 0) == 2
    assert await registry.add_subscriber(second, 0) == 1


# Cancel requests


async def test_a_requested_cancel_is_delivered(registry: RunRegistry) -> None:
    run_id = new_id()
    await registry.register(running(run_id))
    listener = CancelListener(registry)
    await listener.start()
    try:
        await registry.request_cancel(run_id)
        assert await listener.next() == run_id
    finally:
        await listener.close()


async def test_cancel_requests_are_delivered_in_order(registry: RunRegistry) -> None:
    run_ids = [new_id() for _ in range(3)]
    listener = CancelListener(registry)
    await listener.start()
    try:
        for run_id in run_ids:
            await registry.request_cancel(run_id)
        assert [await listener.next() for _ in run_ids] == run_ids
    finally:
        await listener.close()


# Retention


async def test_a_finished_record_expires_after_the_retention(
    registry_factory: RunRegistryFactory,
) -> None:
    registry = registry_factory(retention=0.05)
    info = running(new_id())
    await registry.register(info)
    final = ended(info)
    await registry.finish(final)
    assert await registry.get(info.id) == final  # kept right after the end
    await asyncio.sleep(0.2)
    assert await registry.get(info.id) is None


async def test_only_finished_records_expire(registry_factory: RunRegistryFactory) -> None:
    registry = registry_factory(retention=0.05)
    finished_run, running_run = running(new_id()), running(new_id())
    await registry.register(finished_run)
    await registry.register(running_run)
    await registry.finish(ended(finished_run))
    await asyncio.sleep(0.2)
    assert await registry.get(finished_run.id) is None
    assert await registry.get(running_run.id) == running_run
