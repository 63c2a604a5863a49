"""The Redis connection the Redis backends share, and the one place redis errors become ours.

Every command goes through ``RedisStore.run_pipeline``: a Redis that cannot be reached (refused,
reset, timed out, read-only after a failover, out of memory) becomes ``StoreUnavailable``,
anything else it answers with an error ``InternalError``. (Pub/sub, whose failures never reach a
caller, reports them here too.) The first failure of an outage is logged as
``store_unavailable`` and the first success after it as ``store_recovered``: one line each, not
one per token. The client reconnects by itself; nothing has to be restarted.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from importlib import resources
from typing import Any

import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from tokenrelay.backends.redis_keys import KeyLayout
from tokenrelay.errors import InternalError, StoreUnavailable, TokenRelayError

logger = structlog.get_logger("tokenrelay.store")

# Errors that say "Redis is not there (now)", as opposed to "Redis refused this command".
UNAVAILABLE_ERRORS = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OutOfMemoryError)
_STORE_DOWN_MESSAGE = "the run store is unavailable; try again shortly"


@dataclass(frozen=True, slots=True)
class LuaScript:
    """A script of ``backends/lua/``, called by its SHA1 (loaded again if Redis forgot it)."""

    name: str
    source: str
    sha: str

    @classmethod
    def load(cls, name: str) -> LuaScript:
        source = resources.files("tokenrelay.backends").joinpath(f"lua/{name}.lua").read_text()
        return cls(name, source, hashlib.sha1(source.encode()).hexdigest())


@dataclass(frozen=True, slots=True)
class Scripts:
    create: LuaScript
    append: LuaScript
    read: LuaScript
    seal: LuaScript
    finish: LuaScript
    add_subscriber: LuaScript

    @classmethod
    def load(cls) -> Scripts:
        return cls(*(LuaScript.load(field.name) for field in fields(cls)))

    def every(self) -> tuple[LuaScript, ...]:
        return tuple(getattr(self, field.name) for field in fields(self))


# One call of a pipeline: a script, its keys and its other arguments; or None, (), a command.
PipelineSpec = tuple[LuaScript | None, Sequence[bytes], Sequence[Any]]


class RedisStore:
    """One Redis client (a connection pool) for a gateway, with its key layout and scripts.

    Args:
        url: ``redis://[:password@]host:port/db``, ``rediss://…`` or ``unix://…``.
        key_prefix: the prefix of every key and channel, so gateways can share a Redis.
        socket_timeout: seconds a connect or a command may take; short, so a dead Redis fails
            requests fast instead of holding them.
        max_connections: connections to Redis at most. A gateway needs about five: its calls
            go in pipelines, one in flight per batcher (appends, reads, run records), and each
            of its two pub/sub subscriptions holds one.
    """

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "tokenrelay:",
        socket_timeout: float = 2.0,
        max_connections: int = 64,
    ) -> None:
        self.keys = KeyLayout(key_prefix)
        self.scripts = Scripts.load()
        # At most max_connections, each wait for one bounded by the socket timeout. One retry, on
        # connection errors only: a pooled connection that Redis closed (a restart) is replaced
        # at once, but a Redis that does not answer costs one timeout, not several.
        self._pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=socket_timeout,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            health_check_interval=0,
        )
        self.client = Redis(connection_pool=self._pool)
        self._unavailable = False

    async def run_pipeline(self, calls: Sequence[PipelineSpec]) -> list[Any]:
        """Run calls in one pipeline (one round trip); the result of each, in order.

        A call that Redis answered with an error has that error, translated, as its result.

        Raises:
            StoreUnavailable: Redis cannot be reached; no result is known.
        """
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            for index in todo:
                script, keys, args = calls[index]
                if script is None:
                    pipe.execute_command(*args)
                else:
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
            try:
                answers = await pipe.execute(raise_on_error=False)
            except (RedisError, OSError) as exc:
                raise self.translate(exc) from exc
            missing = []
            for index, answer in zip(todo, answers, strict=True):
                if isinstance(answer, NoScriptError) and attempt == 0:
                    missing.append(index)  # a restarted or flushed Redis: load and call again
                elif isinstance(answer, Exception):
                    results[index] = self.translate(answer)
                    results[index].__cause__ = answer
                else:
                    results[index] = answer
            if not missing:
                break
            forgotten = {script for script, _, _ in (calls[index] for index in missing) if script}
            await self._load_scripts({*self.scripts.every(), *forgotten})
            todo = missing
        self.note_reachable()
        return results

    async def _load_scripts(self, scripts: set[LuaScript]) -> None:
        """Load scripts a restarted or flushed Redis forgot: the run store's (all at once, they
        are about to be called) and those of any other backend that were just called."""
        pipe = self.client.pipeline(transaction=False)
        for script in scripts:
            pipe.script_load(script.source)
        try:
            await pipe.execute()
        except (RedisError, OSError) as exc:
            raise self.translate(exc) from exc

    def translate(self, exc: BaseException) -> TokenRelayError:
        """Our error for a redis one (to be raised ``from`` it); notes an outage."""
        if isinstance(exc, (*UNAVAILABLE_ERRORS, OSError)):
            self.note_unavailable(exc)
            return StoreUnavailable(_STORE_DOWN_MESSAGE)
        logger.error("store_error", error=f"{type(exc).__name__}: {exc}")
        return InternalError("the run store answered with an error")

    def note_unavailable(self, exc: BaseException) -> None:
        """Log the first failure of an outage."""
        if not self._unavailable:
            self._unavailable = True
            logger.warning("store_unavailable", backend="redis", error=describe(exc))

    def note_reachable(self) -> None:
        """Log the first success after an outage."""
        if self._unavailable:
            self._unavailable = False
            logger.info("store_recovered", backend="redis")

    async def close(self) -> None:
        await self.client.aclose()
        await self._pool.disconnect()


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def fresh(error: TokenRelayError) -> TokenRelayError:
    """A copy of an error for one more waiter, so tracebacks do not pile up on one object."""
    clone = copy.copy(error)
    clone.__traceback__ = None
    clone.__cause__ = error.__cause__
    return clone
