"""Starting a run on behalf of a caller: the guards, then the cache, then the Hub.

Every door that starts runs (``/v1/chat/completions``, ``/v1/runs``, ``/v1/ws``) comes through
here, in one order: admission control (this process's capacity, no store round trip), the tenant's
limits (requests, concurrent streams, tokens reserved up front), then the response cache, which
answers from a stored run, attaches to an identical run in flight, or starts the upstream.
Only a run that really reaches the upstream keeps its token reservation and stream slot: a
cache hit or a coalesced request counts as a request and nothing more.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from tokenrelay.events import EventDraft
from tokenrelay.guards import Principal
from tokenrelay.guards.ratelimit import Admission
from tokenrelay.guards.tokens import MeteredSource, prompt_tokens, reserve_for
from tokenrelay.runs.subscription import Subscription
from tokenrelay.services import Services


@dataclass(frozen=True, slots=True)
class Launch:
    subscription: Subscription
    headers: dict[str, str]  # RateLimit and X-Cache, for the response


async def launch_run(
    services: Services,
    principal: Principal,
    body: dict[str, Any],
    *,
    detached: bool,
    disconnect_grace: float,
    cache_control: str | None,
) -> Launch:
    """Start (or join, or replay) the run ``body`` asks for, as ``principal``.

    Raises:
        ServiceUnavailable: 503, the process is at capacity or shutting down.
        RateLimited: 429, the tenant is over a limit.
    """
    with services.admission.admit():
        return await _launch(
            services, principal.tenant, body, detached, disconnect_grace, cache_control
        )


async def _launch(
    services: Services,
    tenant: str,
    body: dict[str, Any],
    detached: bool,
    disconnect_grace: float,
    cache_control: str | None,
) -> Launch:
    decision = services.answers.decide(tenant, body, cache_control)
    admission = await services.limiter.admit(
        tenant,
        reserve_tokens=reserve_for(
            body, default_max_tokens=services.settings.rate_limits.default_max_tokens
        ),
    )

    def upstream() -> AsyncIterator[EventDraft]:
        source = services.source.stream(body)
        if not admission.holds_until_settled:  # no token or stream limit: nothing to count
            return source
        return MeteredSource(source, admission, prompt_tokens(body))

    async def start(source: AsyncIterator[EventDraft]) -> Subscription:
        return await services.hub.start(
            source, detached=detached, disconnect_grace=disconnect_grace, tenant=tenant
        )

    try:
        outcome = await services.answers.open(decision, upstream, start)
    except BaseException:
        await admission.settle(0)
        raise
    if not outcome.upstream_cost:
        await admission.settle(0)
    if outcome.coalesced:
        services.hub.outlive_readers(
            outcome.subscription.run_id, detached=detached, disconnect_grace=disconnect_grace
        )
    return Launch(outcome.subscription, _headers(admission, outcome.x_cache, outcome.coalesced))


def _headers(admission: Admission, x_cache: str, coalesced: bool) -> dict[str, str]:
    headers = {**admission.headers, "X-Cache": x_cache}
    if coalesced:
        headers["X-Coalesced"] = "true"
    return headers
