"""``tokenrelay bench`` behind the argument parser: build the config, run, print, exit code.

Ctrl-C is an input to the run (the ``stop`` event), not an exception: the first one ends the run
and the results so far are still printed; a second one interrupts at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Final

import orjson
from rich.console import Console

from tokenrelay.bench.config import BenchConfig, StreamFormat, load_request_mix
from tokenrelay.bench.report import LiveProgress, render_result
from tokenrelay.bench.results import BenchResult
from tokenrelay.bench.runner import ProgressCallback, run_bench

__all__ = ["EXIT_ALL_FAILED", "EXIT_INTERRUPTED", "build_config", "run_command"]

EXIT_ALL_FAILED: Final = 1
EXIT_INTERRUPTED: Final = 130  # the shell's code for "ended by SIGINT"


def build_config(
    url: str,
    *,
    mock: str | None,
    requests_file: Path | None,
    **settings: Any,
) -> BenchConfig:
    """A ``BenchConfig`` from command-line values; ``mock`` is JSON text, the file is JSONL.

    Raises:
        ValueError: with a message fit for the user.
    """
    mock_options = None
    if mock is not None:
        try:
            mock_options = orjson.loads(mock)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"--mock is not valid JSON: {exc}") from None
        if not isinstance(mock_options, dict):
            raise ValueError("--mock must be a JSON object")
    mix = load_request_mix(requests_file) if requests_file is not None else ()
    stream_format = settings.get("format", StreamFormat.OPENAI)
    if stream_format not in tuple(StreamFormat):
        raise ValueError(f"--format must be openai or native, got {stream_format!r}")
    settings["format"] = StreamFormat(stream_format)
    return BenchConfig(url, mock=mock_options, request_mix=mix, **settings)


def run_command(config: BenchConfig, *, json_output: bool, quiet: bool) -> int:
    """Run the benchmark and print its table (or JSON) to stdout.

    Returns:
        The exit code: 0, 1 when every stream failed, 130 when interrupted.
    """
    console = Console()
    live = not (quiet or json_output) and sys.stdout.isatty()
    if live:
        with LiveProgress(console) as progress:
            result = _run_loop(_until_interrupted(config, progress.update))
    else:
        result = _run_loop(_until_interrupted(config, None))
    if json_output:
        sys.stdout.write(orjson.dumps(result.to_dict()).decode() + "\n")
    else:
        console.print(render_result(result))
    if result.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_ALL_FAILED if result.failed and not result.ok else 0


async def _until_interrupted(config: BenchConfig, progress: ProgressCallback | None) -> BenchResult:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def first_interrupt() -> None:
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)  # the next Ctrl-C raises KeyboardInterrupt

    with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows; not the main thread
        loop.add_signal_handler(signal.SIGINT, first_interrupt)
    try:
        return await run_bench(config, progress, stop=stop)
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)


def _run_loop(main: Coroutine[Any, Any, BenchResult]) -> BenchResult:
    """Run on uvloop when it is installed: the client's own overhead is part of what we measure."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
