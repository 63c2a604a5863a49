"""An OpenAI-compatible upstream (vLLM, Ollama, llama.cpp, OpenAI, the mock) as a run source.

aiohttp is the client: on this kind of workload (hundreds of long-lived streams per process) its
connection pool stays cheap where httpx's scans every pooled connection per request
(encode/httpx#3215). Every aiohttp exception is translated into our error tree here.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import structlog

from tokenrelay.config import RetrySettings, TimeoutSettings, UpstreamTarget
from tokenrelay.errors import (
    UpstreamDisconnected,
    UpstreamError,
    UpstreamHTTPError,
    UpstreamMalformed,
    UpstreamOverloaded,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from tokenrelay.events import EventDraft
from tokenrelay.sources.openai_chunks import ChunkTranslator
from tokenrelay.sources.sse_parser import SSEDataParser
from tokenrelay.sources.watchdog import Watchdog

logger = structlog.get_logger("tokenrelay.upstream")

_ERROR_BODY_LIMIT = 64 * 1024
_DRAIN_TIMEOUT = 1.0  # seconds to wait for the end of a body after its [DONE]


class _DeadlineExpired(Exception):
    """Injected into the response reader when the watchdog fires."""


class OpenAIUpstream:
    """Streams chat completions from one OpenAI-compatible server, with retries and deadlines."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        target: UpstreamTarget,
        timeouts: TimeoutSettings,
        retries: RetrySettings,
    ) -> None:
        self._session = session
        self._target = target
        self._timeouts = timeouts
        self._retries = retries
        self._headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        if target.api_key is not None:
            self._headers["Authorization"] = f"Bearer {target.api_key.get_secret_value()}"

    @property
    def url(self) -> str:
        return self._target.url

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[EventDraft]:
        """Events of one streamed chat completion; the request ``body`` is forwarded as is.

        Only ``stream`` and ``stream_options.include_usage`` are set, so that usage is always
        known to the gateway; transports decide whether the client sees it.
        """
        payload = {**body, "stream": True}
        payload["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        started = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout_at(started + self._timeouts.total):
                response = await self._open(orjson.dumps(payload))
        except TimeoutError as exc:
            raise UpstreamTimeout(
                "the upstream did not start streaming within the total timeout",
                which="total_timeout",
            ) from exc
        complete = False
        try:
            async for draft in self._read(response, started):
                yield draft
            complete = True
        finally:
            if complete:
                await _release(response)
            else:
                response.close()  # the upstream sees the disconnect and stops generating

    async def list_models(self) -> dict[str, Any]:
        """The upstream's ``GET /models`` answer, relayed as is."""
        timeout = aiohttp.ClientTimeout(
            sock_connect=self._timeouts.connect, total=self._timeouts.first_token
        )
        try:
            async with self._session.get(
                f"{self.url}/models", headers=self._headers, timeout=timeout
            ) as response:
                if response.status != 200:
                    raise await _error_from(response)
                models = await response.json(loads=orjson.loads, content_type=None)
        except aiohttp.ClientError as exc:
            raise _connect_error(exc) from exc
        except TimeoutError as exc:
            raise UpstreamTimeout(
                "the upstream did not list its models in time", which="first_token_timeout"
            ) from exc
        except ValueError as exc:
            raise UpstreamMalformed("the upstream's model list is not JSON") from exc
        if not isinstance(models, dict):
            raise UpstreamMalformed("the upstream's model list is not a JSON object")
        return models

    async def _open(self, data: bytes) -> aiohttp.ClientResponse:
        """POST the request, retrying connect errors, 429 and 5xx with capped backoff."""
        url = f"{self.url}/chat/completions"
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._timeouts.connect)
        for attempt in range(1, self._retries.max_attempts + 1):
            try:
                async with asyncio.timeout(self._timeouts.first_token):
                    response = await self._session.post(
                        url, data=data, headers=self._headers, timeout=timeout
                    )
            except aiohttp.ClientError as exc:
                error: UpstreamError = _connect_error(exc)
            except TimeoutError as exc:
                raise UpstreamTimeout(
                    "the upstream did not answer before the first-token timeout",
                    which="first_token_timeout",
                ) from exc
            else:
                if response.status == 200:
                    return _checked_event_stream(response)
                error = await _error_from(response)
            if not error.retryable or attempt == self._retries.max_attempts:
                raise error
            delay = self._backoff(attempt, error.retry_after)
            if delay is None:
                raise error
            logger.info("upstream_retry", attempt=attempt, code=error.instance_code(), delay=delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _backoff(self, attempt: int, retry_after: float | None) -> float | None:
        """Seconds to wait before the next attempt; None if the upstream asks for too long."""
        if retry_after is not None:
            return retry_after if retry_after <= self._retries.retry_after_max else None
        cap = min(self._retries.backoff_max, self._retries.backoff_initial * 2 ** (attempt - 1))
        return random.uniform(cap / 2, cap)  # jitter so that retries do not arrive in lockstep

    async def _read(
        self, response: aiohttp.ClientResponse, started: float
    ) -> AsyncIterator[EventDraft]:
        parser = SSEDataParser()
        translator = ChunkTranslator()

        def expire() -> None:
            response.content.set_exception(_DeadlineExpired())

        watchdog = Watchdog(self._timeouts, expire, started)
        watchdog.start()
        try:
            async for chunk in response.content.iter_any():
                payloads = parser.feed(chunk)
                if payloads:  # comments and partial events are not progress
                    watchdog.touch()
                for payload in payloads:
                    if payload == b"[DONE]":
                        return
                    for draft in translator.translate(_decode(payload)):
                        yield draft
        except (aiohttp.ClientError, _DeadlineExpired) as exc:
            if watchdog.expired is not None:
                raise UpstreamTimeout(
                    f"the upstream exceeded the {watchdog.expired.replace('_', ' ')}",
                    which=watchdog.expired,
                ) from exc
            raise UpstreamDisconnected("the upstream connection broke mid-stream") from exc
        except ValueError as exc:
            raise UpstreamMalformed(
                f"the upstream sent malformed Server-Sent Events: {exc}"
            ) from exc
        finally:
            watchdog.stop()
        # The body ended without [DONE]: complete only if every choice had finished.
        if translator.finished_choices == 0 or parser.pending.strip():
            raise UpstreamDisconnected("the upstream closed the stream before it was complete")


async def _release(response: aiohttp.ClientResponse) -> None:
    """Read the rest of a finished body (the chunked terminator after ``[DONE]``) and give the
    connection back to the pool; aiohttp closes a connection whose body was not read to its end.
    """
    try:
        async with asyncio.timeout(_DRAIN_TIMEOUT):
            while await response.content.readany():
                pass
    except (TimeoutError, aiohttp.ClientError):
        response.close()
    else:
        response.release()


def _decode(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise UpstreamMalformed(
            f"the upstream sent a chunk that is not JSON: {payload[:80]!r}"
        ) from exc


def _checked_event_stream(response: aiohttp.ClientResponse) -> aiohttp.ClientResponse:
    if response.content_type != "text/event-stream":
        response.close()
        raise UpstreamMalformed(
            f"the upstream answered {response.content_type!r} instead of text/event-stream"
        )
    return response


def _connect_error(exc: aiohttp.ClientError) -> UpstreamError:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamTimeout("connecting to the upstream timed out", which="connect_timeout")
    return UpstreamUnreachable(f"cannot reach the upstream: {type(exc).__name__}")


async def _error_from(response: aiohttp.ClientResponse) -> UpstreamError:
    """Turn a non-200 upstream answer into our error, with the upstream's own message."""
    try:
        body = await response.content.read(_ERROR_BODY_LIMIT)
    except aiohttp.ClientError:
        body = b""
    finally:
        response.close()
    message = _upstream_message(body) or response.reason or "no message"
    status = response.status
    if status == 429:
        return UpstreamOverloaded(
            f"the upstream is rate limiting: {message}",
            retry_after=_retry_after(response.headers.get("Retry-After")),
        )
    if status >= 500:
        return UpstreamHTTPError(
            f"the upstream answered {status}: {message}",
            retry_after=_retry_after(response.headers.get("Retry-After")),
        )
    return UpstreamRejected(f"the upstream refused the request: {message}", upstream_status=status)


def _upstream_message(body: bytes) -> str:
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:300].decode("utf-8", "replace").strip()
    error = decoded.get("error") if isinstance(decoded, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(error, str):
        return error
    return str(decoded)[:300]


def _retry_after(value: str | None) -> float | None:
    """Parse ``Retry-After`` (delta seconds or an HTTP date) into seconds from now."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
