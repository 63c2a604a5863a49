"""Watchdog: first-token, idle and total deadlines with one timer. Only lower bounds on timing."""

from __future__ import annotations

import asyncio

import pytest

from tokenrelay.config import TimeoutSettings
from tokenrelay.sources.watchdog import Watchdog

# Generous bound that only stops a broken watchdog from hanging the suite; never a timing claim.
HANG_GUARD = 5.0


class Expiry:
    """Records each ``on_expire`` call with the loop time it happened at."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self.fired = asyncio.Event()

    def __call__(self) -> None:
        self.calls.append(asyncio.get_running_loop().time())
        self.fired.set()

    async def wait(self) -> float:
        await asyncio.wait_for(self.fired.wait(), HANG_GUARD)
        return self.calls[0]


def timeouts(first_token: float, idle: float, total: float) -> TimeoutSettings:
    return TimeoutSettings(connect=1, first_token=first_token, idle=idle, total=total)


def now() -> float:
    return asyncio.get_running_loop().time()


async def touch_for(watchdog: Watchdog, seconds: float, every: float = 0.01) -> float:
    """Touch the watchdog repeatedly for ``seconds``; returns the time of the last touch."""
    end = now() + seconds
    last = now()
    while now() < end and watchdog.expired is None:
        watchdog.touch()
        last = now()
        await asyncio.sleep(every)
    return last


async def test_first_token_fires_when_nothing_arrives() -> None:
    expiry = Expiry()
    started = now()
    watchdog = Watchdog(timeouts(first_token=0.05, idle=1, total=5), expiry)
    watchdog.start()
    fired_at = await expiry.wait()
    assert watchdog.expired == "first_token_timeout"
    assert fired_at - started >= 0.05
    assert watchdog.last_chunk is None


async def test_nothing_has_expired_before_a_deadline() -> None:
    expiry = Expiry()
    watchdog = Watchdog(timeouts(first_token=0.3, idle=0.3, total=5), expiry)
    watchdog.start()
    try:
        await asyncio.sleep(0.05)
        assert watchdog.expired is None
        assert expiry.calls == []
    finally:
        watchdog.stop()


async def test_touch_records_the_time_of_the_last_chunk() -> None:
    watchdog = Watchdog(timeouts(first_token=1, idle=1, total=5), Expiry())
    assert watchdog.last_chunk is None
    before = now()
    watchdog.touch()
    assert watchdog.last_chunk is not None
    assert watchdog.last_chunk >= before


async def test_a_first_chunk_replaces_the_first_token_deadline_with_the_idle_one() -> None:
    expiry = Expiry()
    watchdog = Watchdog(timeouts(first_token=0.2, idle=0.25, total=5), expiry)
    watchdog.start()
    await asyncio.sleep(0.02)
    watchdog.touch()
    touched = watchdog.last_chunk
    assert touched is not None
    fired_at = await expiry.wait()
    assert watchdog.expired == "idle_timeout"
    assert fired_at - touched >= 0.25


async def test_an_idle_deadline_sooner_than_the_first_token_one_applies_at_once() -> None:
    # The first chunk moves the deadline from first_token (far away) to idle (close):
    # the watchdog must not sleep until the old first-token deadline before noticing.
    expiry = Expiry()
    watchdog = Watchdog(timeouts(first_token=60, idle=0.05, total=120), expiry)
    watchdog.start()
    watchdog.touch()
    touched = watchdog.last_chunk
    assert touched is not None
    fired_at = await expiry.wait()  # HANG_GUARD is far below the 60 s first-token deadline
    assert watchdog.expired == "idle_timeout"
    assert fired_at - touched >= 0.05


async def test_total_counts_from_the_given_start_time() -> None:
    expiry = Expiry()
    started = now() - 0.2  # e.g. time spent connecting before the stream began
    watchdog = Watchdog(timeouts(first_token=1, idle=1, total=0.3), expiry, started=started)
    watchdog.start()
    fired_at = await expiry.wait()
    assert watchdog.expired == "total_timeout"
    assert fired_at - started >= 0.3


async def test_first_token_counts_from_the_given_start_time() -> None:
    expiry = Expiry()
    started = now() - 0.1
    watchdog = Watchdog(timeouts(first_token=0.15, idle=1, total=5), expiry, started=started)
    watchdog.start()
    fired_at = await expiry.wait()
    assert watchdog.expired == "first_token_timeout"
    assert fired_at - started >= 0.15


async def test_touches_keep_idle_from_firing_then_idle_fires() -> None:
    expiry = Expiry()
    started = now()
    watchdog = Watchdog(timeouts(first_token=0.15, idle=0.1, total=5), expiry)
    watchdog.start()
    # Touch well past the first-token deadline and several idle periods.
    await touch_for(watchdog, 0.3, every=0.01)
    assert now() - started >= 0.3
    assert watchdog.expired is None
    assert expiry.calls == []
    last_touch = watchdog.last_chunk
    assert last_touch is not None
    fired_at = await expiry.wait()
    assert watchdog.expired == "idle_timeout"
    assert fired_at - last_touch >= 0.1


async def test_total_fires_even_with_constant_touches() -> None:
    expiry = Expiry()
    started = now()
    watchdog = Watchdog(timeouts(first_token=0.2, idle=0.2, total=0.3), expiry)
    watchdog.start()
    await touch_for(watchdog, HANG_GUARD, every=0.01)
    fired_at = await expiry.wait()
    assert watchdog.expired == "total_timeout"
    assert fired_at - started >= 0.3
    assert watchdog.last_chunk is not None
    assert watchdog.last_chunk - started >= 0.2  # touches kept coming after first token and idle


async def test_total_wins_when_it_comes_before_the_first_token_deadline() -> None:
    expiry = Expiry()
    started = now()
    watchdog = Watchdog(timeouts(first_token=1, idle=1, total=0.05), expiry)
    watchdog.start()
    fired_at = await expiry.wait()
    assert watchdog.expired == "total_timeout"
    assert fired_at - started >= 0.05


async def test_stop_prevents_firing() -> None:
    expiry = Expiry()
    watchdog = Watchdog(timeouts(first_token=0.05, idle=0.05, total=0.1), expiry)
    watchdog.start()
    watchdog.stop()
    await asyncio.sleep(0.2)
    assert expiry.calls == []
    assert watchdog.expired is None


async def test_stop_after_some_touches_prevents_firing() -> None:
    expiry = Expiry()
    watchdog = Watchdog(timeouts(first_token=0.05, idle=0.1, total=5), expiry)
    watchdog.start()
    await touch_for(watchdog, 0.15, every=0.01)
    assert watchdog.expired is None
    watchdog.stop()
    await asyncio.sleep(0.25)
    assert expiry.calls == []
    assert watchdog.expired is None


async def test_stop_twice_and_stop_after_expiry_are_harmless() -> None:
    expiry = Expiry()
    watchdog = Watchdog(timeouts(first_token=0.05, idle=1, total=5), expiry)
    watchdog.start()
    await expiry.wait()
    watchdog.stop()
    watchdog.stop()
    assert watchdog.expired == "first_token_timeout"
    assert len(expiry.calls) == 1


@pytest.mark.parametrize(
    ("settings", "touch"),
    [
        pytest.param(timeouts(first_token=0.05, idle=0.05, total=0.1), False, id="first-token"),
        pytest.param(timeouts(first_token=0.3, idle=0.05, total=0.1), True, id="idle"),
    ],
)
async def test_on_expire_is_called_exactly_once(settings: TimeoutSettings, touch: bool) -> None:
    expiry = Expiry()
    watchdog = Watchdog(settings, expiry)
    watchdog.start()
    if touch:
        watchdog.touch()
    await expiry.wait()
    which = watchdog.expired
    # Wait past every other deadline, touching too: nothing fires again.
    await asyncio.sleep(0.12)
    watchdog.touch()
    await asyncio.sleep(0.12)
    assert len(expiry.calls) == 1
    assert watchdog.expired == which
