"""TenantLimiter: each tenant's requests per minute, concurrent streams and tokens per minute.

A request is checked against its tenant's limits in that order, before its run starts: a
request counts, its stream takes a slot, and its tokens (prompt estimate and longest answer,
``guards/tokens.py``) are reserved. The first limit that refuses gives back what the others took
(a refused request uses up nothing) and answers 429. The run, once over, settles its
``Admission``: the reservation is corrected to what was really used and the slot released.

The limits travel in the RateLimit header fields of draft-ietf-httpapi-ratelimit-headers-11
(structured fields), on every response of a limited tenant, refused or not::

    RateLimit-Policy: "requests";q=60;w=60, "streams";q=4;qu="concurrent-requests",
                      "tokens";q=100000;w=60
    RateLimit: "requests";r=59;t=42

(``RateLimit-Policy`` on one line). ``RateLimit`` names the policy closest to its limit (the
smallest share left), or the one that refused. ``t`` is when the current window ends; refused,
when the request would fit, as ``Retry-After`` says. Tokens are not a registered quota unit, so
their policy says it by name.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass

import structlog

from tokenrelay.config import RateLimitSettings, TenantLimits
from tokenrelay.errors import RateLimited, TokenRelayError
from tokenrelay.guards.counters import LimitCounters, LimitKey

logger = structlog.get_logger("tokenrelay.limits")

# Every configured limit is per minute.
_WINDOW = 60
# A stream slot frees whenever one of the tenant's streams ends, which cannot be foreseen (the
# oldest lease is only an upper bound, minutes away): a refused caller may ask again soon.
_STREAMS_RETRY_AFTER = 1


@dataclass(frozen=True, slots=True)
class _Taken:
    """An amount a window counter took for a request: what to correct or give back."""

    key: LimitKey
    amount: int
    bucket: int


@dataclass(frozen=True, slots=True)
class _Reading:
    """One policy's state after a check, as the RateLimit field reports it."""

    policy: str
    quota: int
    remaining: int
    reset_after: float | None  # seconds; None for streams, which have no window


class Admission:
    """A request the tenant's limits let through.

    ``headers`` go on its response. ``settle`` is called once its run is over (``MeteredSource``
    does it, or the route for a run that never reached the upstream).
    """

    __slots__ = ("_counters", "_requests", "_settled", "_slot", "_tokens", "headers", "tenant")

    def __init__(self, tenant: str, counters: LimitCounters | None) -> None:
        self.tenant = tenant
        self.headers: dict[str, str] = {}
        self._counters = counters
        self._requests: _Taken | None = None
        self._slot: tuple[LimitKey, str] | None = None  # key, holder
        self._tokens: _Taken | None = None
        self._settled = counters is None  # unlimited: nothing to give back

    @property
    def reserved_tokens(self) -> int:
        """Tokens reserved for the run; 0 when the tenant has no token limit."""
        return 0 if self._tokens is None else self._tokens.amount

    @property
    def settled(self) -> bool:
        return self._settled

    @property
    def holds_until_settled(self) -> bool:
        """A stream slot or a token reservation waits for the run's end: meter the run."""
        return not self._settled and (self._slot is not None or self._tokens is not None)

    async def settle(self, used_tokens: int) -> None:
        """Charge what the run used instead of its reservation, and release its stream slot.

        Only the first call counts; later ones do nothing. Never raises: a store that cannot
        be reached is logged (the slot's lease and the window's end repair the counters).

        Args:
            used_tokens: the tokens the run really used; 0 for a run that never reached the
                upstream (a refund of the whole reservation).
        """
        if self._settled or self._counters is None:
            return
        self._settled = True
        counters, slot, tokens = self._counters, self._slot, self._tokens
        # The slot first: a slot left behind blocks a stream for a whole lease.
        if slot is not None:
            await self._quietly(counters.release(*slot), "streams")
        if tokens is not None:
            extra = max(0, used_tokens) - tokens.amount
            await self._quietly(counters.adjust(tokens.key, extra, tokens.bucket), "tokens")

    async def _undo(self) -> None:
        """Give back everything taken so far: a later limit refused, or admission failed."""
        self._settled = True
        counters = self._counters
        if counters is None:
            return
        if self._slot is not None:
            await self._quietly(counters.release(*self._slot), "streams")
        for taken in (self._requests, self._tokens):
            if taken is not None:
                adjust = counters.adjust(taken.key, -taken.amount, taken.bucket)
                await self._quietly(adjust, taken.key.name)

    async def _quietly(self, step: Awaitable[None], what: str) -> None:
        try:
            await step
        except TokenRelayError as exc:  # the store: the lease and the window repair the counts
            logger.warning(
                "rate_limit_settle_failed",
                tenant=self.tenant,
                counter=what,
                code=exc.instance_code(),
            )
        except Exception:  # a bug; the request is answered regardless
            logger.exception("rate_limit_settle_failed", tenant=self.tenant, counter=what)


class TenantLimiter:
    """Applies ``rate_limits`` to each request.

    Args:
        settings: the limits, by tenant.
        counters: where the counts live: this process's memory, or Redis shared by every
            instance.
    """

    def __init__(self, settings: RateLimitSettings, counters: LimitCounters) -> None:
        self._settings = settings
        self._counters = counters

    @property
    def counters(self) -> LimitCounters:
        return self._counters

    async def admit(self, tenant: str, *, reserve_tokens: int) -> Admission:
        """Let a request of ``tenant`` through, or refuse it; a tenant without limits costs nothing.

        Args:
            tenant: whose limits apply.
            reserve_tokens: the tokens the request may use at most (``reserve_for``); capped at
                the tenant's token limit, so that a large request still runs once the window
                is empty, then pays what it really used.

        Raises:
            RateLimited: 429, over a limit; its headers name it and when to come back.
            StoreUnavailable: 503, the counters cannot be reached (nothing stays taken).
        """
        limits = self._settings.for_tenant(tenant)
        requests, streams, tokens = (
            limits.requests_per_minute,
            limits.concurrent_streams,
            limits.tokens_per_minute,
        )
        if requests is None and streams is None and tokens is None:
            return Admission(tenant, None)
        counters, policy = self._counters, _policy_field(limits)
        admission = Admission(tenant, counters)
        readings: list[_Reading] = []
        try:
            if requests is not None:
                key = LimitKey(tenant, "requests")
                window = await counters.hit(key, requests, _WINDOW)
                reading = _Reading("requests", requests, window.remaining, window.reset_after)
                if not window.allowed:
                    raise _refused(
                        f"too many requests: at most {requests} a minute",
                        reading,
                        policy,
                    )
                admission._requests = _Taken(key, 1, window.bucket)
                readings.append(reading)
            if streams is not None:
                key, holder = LimitKey(tenant, "streams"), uuid.uuid4().hex
                # Noted before the call: an admission cancelled meanwhile releases it too.
                admission._slot = (key, holder)
                slot = await counters.acquire(key, streams, self._settings.stream_lease, holder)
                reading = _Reading("streams", streams, max(0, streams - slot.held), None)
                if not slot.acquired:
                    admission._slot = None
                    raise _refused(
                        f"too many streams at once: at most {streams}; one must end first",
                        reading,
                        policy,
                        retry_after=_STREAMS_RETRY_AFTER,
                    )
                readings.append(reading)
            if tokens is not None:
                key, amount = LimitKey(tenant, "tokens"), min(max(0, reserve_tokens), tokens)
                window = await counters.reserve(key, amount, tokens, _WINDOW)
                reading = _Reading("tokens", tokens, window.remaining, window.reset_after)
                if not window.allowed:
                    raise _refused(
                        f"too many tokens: at most {tokens} a minute, and this request "
                        f"reserves {amount} (its prompt and max_tokens)",
                        reading,
                        policy,
                    )
                admission._tokens = _Taken(key, amount, window.bucket)
                readings.append(reading)
        except BaseException:
            # A count whose call was cancelled in flight is not known here: it stays, at most
            # until its window ends. Everything known is given back.
            await admission._undo()
            raise
        admission.headers = {"RateLimit-Policy": policy, "RateLimit": _closest(readings)}
        return admission


def _refused(
    message: str, reading: _Reading, policy: str, *, retry_after: float | None = None
) -> RateLimited:
    wait = retry_after if retry_after is not None else reading.reset_after or 0.0
    seconds = max(1, math.ceil(wait))
    refused = _Reading(reading.policy, reading.quota, reading.remaining, seconds)
    return RateLimited(
        f"{message}; retry in {seconds} s",
        retry_after=seconds,
        headers={"RateLimit-Policy": policy, "RateLimit": _item(refused)},
    )


def _policy_field(limits: TenantLimits) -> str:
    items = []
    if limits.requests_per_minute is not None:
        items.append(f'"requests";q={limits.requests_per_minute};w={_WINDOW}')
    if limits.concurrent_streams is not None:
        items.append(f'"streams";q={limits.concurrent_streams};qu="concurrent-requests"')
    if limits.tokens_per_minute is not None:
        items.append(f'"tokens";q={limits.tokens_per_minute};w={_WINDOW}')
    return ", ".join(items)


def _closest(readings: list[_Reading]) -> str:
    """The RateLimit field: the policy with the smallest share of its quota left."""
    return _item(min(readings, key=lambda reading: reading.remaining / reading.quota))


def _item(reading: _Reading) -> str:
    item = f'"{reading.policy}";r={reading.remaining}'
    if reading.reset_after is not None:
        item += f";t={math.ceil(reading.reset_after)}"
    return item
