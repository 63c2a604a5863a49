"""Mock OpenAI-compatible upstream used to test and benchmark the gateway.

Behaviour is chosen per request through a ``"mock"`` object in the body, so a
single running instance can serve every scenario (pacing, tool calls, HTTP
errors, dropped, stalled, malformed or failing streams).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable

from aiohttp import web

from tokenrelay.mockserver.app import create_mock_app
from tokenrelay.mockserver.scenario import DEFAULTS, MockDefaults

__all__ = ["MockDefaults", "create_mock_app", "serve_mock_forever", "start_mock_server"]

_SHUTDOWN_TIMEOUT_S = 2.0  # in-flight streams get this long before they are cancelled


async def start_mock_server(
    host: str, port: int, defaults: MockDefaults = DEFAULTS
) -> tuple[web.AppRunner, int]:
    """Serve on the running loop; port 0 picks a free port, which is returned.

    Handler cancellation is on so a client that goes away (even mid-stall) is
    noticed at once. Stop with ``await runner.cleanup()``.
    """
    runner = web.AppRunner(
        create_mock_app(defaults),
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=_SHUTDOWN_TIMEOUT_S,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = int(runner.addresses[0][1])
    except BaseException:
        await runner.cleanup()
        raise
    return runner, bound


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _serve(
    host: str, port: int, defaults: MockDefaults, on_ready: Callable[[int], None] | None
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Unsupported on Windows and off the main thread; Ctrl-C still cancels us there.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    runner, bound = await start_mock_server(host, port, defaults)
    try:
        if on_ready is not None:
            on_ready(bound)
        await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await runner.cleanup()


def serve_mock_forever(
    host: str,
    port: int,
    defaults: MockDefaults,
    on_ready: Callable[[int], None] | None = None,
) -> None:
    """Block serving until SIGINT/SIGTERM; ``on_ready`` gets the bound port."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_serve(host, port, defaults, on_ready))
