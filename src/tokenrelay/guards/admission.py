"""Global admission control: shed load with 503 at once instead of slowing every stream down.

Two caps per process, read from the Hub without a lock or a store round trip: the runs it
drives (each holds an upstream connection and a task), and the runs still waiting for their
upstream's first answer (a slow upstream piles these up first). Past either, a new run gets 503
with ``Retry-After`` before anything is started, and readiness fails so a load balancer sends the
next requests elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tokenrelay.config import AdmissionSettings
from tokenrelay.errors import ServiceUnavailable
from tokenrelay.runs.hub import Hub


class AdmissionControl:
    def __init__(self, settings: AdmissionSettings, hub: Hub) -> None:
        self._settings = settings
        self._hub = hub
        # Admitted requests on their way to the Hub: a parallel burst must not slip past the
        # caps while each one awaits its rate limits and cache before the Hub counts its run.
        self._admitting = 0

    @property
    def overloaded(self) -> bool:
        hub, settings, admitting = self._hub, self._settings, self._admitting
        return (
            hub.active_runs + admitting >= settings.max_open_streams
            or hub.pending_starts + admitting >= settings.max_pending_starts
        )

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Hold a place while a run is being started; the Hub counts it once started.

        Raises:
            ServiceUnavailable: 503 ``overloaded``, this process is at a cap.
        """
        if self.overloaded:
            raise ServiceUnavailable(
                "the gateway is at capacity; retry shortly",
                code="overloaded",
                retry_after=self._settings.retry_after,
            )
        self._admitting += 1
        try:
            yield
        finally:
            self._admitting -= 1
