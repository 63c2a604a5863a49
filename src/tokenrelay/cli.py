"""The ``tokenrelay`` command: parses arguments and calls into the package, nothing more."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from tokenrelay import __version__

cli = typer.Typer(
    name="tokenrelay",
    help="A streaming gateway for LLM agents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="A TOML or YAML config file.", exists=True, dir_okay=False),
]


@cli.command()
def serve(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="Address to bind [default: 127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="Port to bind [default: 8080].")] = None,
    upstream: Annotated[
        str | None,
        typer.Option(help="Base URL of an OpenAI-compatible API, e.g. http://localhost:8000/v1."),
    ] = None,
    upstream_api_key: Annotated[
        str | None,
        typer.Option(help="API key sent to the upstream.", envvar="TOKENRELAY_UPSTREAM_API_KEY"),
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help="debug, info, warning or error [default: info].")
    ] = None,
    agent: Annotated[
        str | None,
        typer.Option(help="Serve a Python agent instead of an upstream: module:function."),
    ] = None,
    http2: Annotated[
        bool | None,
        typer.Option(
            "--http2/--no-http2",
            help="Also serve HTTP/2 (h2c, prior knowledge) on the cleartext port [default: no].",
            show_default=False,
        ),
    ] = None,
    tls_certfile: Annotated[
        Path | None,
        typer.Option(
            help="PEM certificate: serve TLS, HTTP/2 and HTTP/1.1 by ALPN.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    tls_keyfile: Annotated[
        Path | None,
        typer.Option(help="PEM private key of --tls-certfile.", exists=True, dir_okay=False),
    ] = None,
    insecure_no_auth: Annotated[
        bool,
        typer.Option(
            "--insecure-no-auth",
            help="Serve a non-loopback address with no authentication (never in production).",
        ),
    ] = False,
) -> None:
    """Run the gateway. With no upstream it serves the built-in mock model."""
    from tokenrelay.app import create_app
    from tokenrelay.guards.exposure import InsecureBind, open_access_notice
    from tokenrelay.server import base_url, run_server, uses_http2
    from tokenrelay.telemetry.logging import configure_logging

    server_flags = _given(
        host=host,
        port=port,
        log_level=log_level,
        http2=http2,
        tls_certfile=tls_certfile,
        tls_keyfile=tls_keyfile,
    )
    flags: dict[str, Any] = {"server": server_flags}
    if insecure_no_auth:
        flags["auth"] = {"insecure_no_auth": True}
    if upstream is not None:
        flags["upstreams"] = [_given(url=upstream, api_key=upstream_api_key)]
    settings = _load_or_exit(config, flags)
    configure_logging(settings.server.log_level, settings.server.log_format)
    try:
        notice = open_access_notice(settings)
    except InsecureBind as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    agent_function = _import_agent(agent) if agent is not None else None
    where = base_url(settings.server)
    if uses_http2(settings.server):
        where += " with HTTP/2"
    if agent is not None:
        serving = f"serving the agent {agent}"
    elif settings.upstreams:
        serving = f"relaying {settings.upstreams[0].url}"
    else:
        serving = "no upstream configured: serving the built-in mock model"
    typer.echo(f"tokenrelay {__version__} on {where} ({serving})", err=True)
    if notice is not None:
        typer.echo(f"warning: {notice}", err=True)
    shutdown = asyncio.Event()
    app = create_app(
        settings, shutdown, agent=agent_function, agent_name=(agent or "").rpartition(":")[2]
    )
    try:
        run_server(
            app,
            settings.server,
            shutdown,
            websocket_max_bytes=settings.websocket.max_message_bytes,
        )
    except OSError as exc:  # a TLS file that cannot be loaded, an address granian cannot bind
        typer.echo(f"cannot serve on {base_url(settings.server)}: {exc}", err=True)
        raise typer.Exit(2) from None


@cli.command("mock-upstream")
def mock_upstream(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8081,
    tokens: Annotated[int, typer.Option(help="Content deltas per answer by default.")] = 20,
    ttft_ms: Annotated[float, typer.Option(help="Default delay before the first token.")] = 0.0,
    itl_ms: Annotated[float, typer.Option(help="Default delay between tokens.")] = 0.0,
) -> None:
    """Run the mock OpenAI-compatible upstream (speed and faults set per request)."""
    from tokenrelay.mockserver import MockDefaults, serve_mock_forever

    defaults = MockDefaults(tokens=tokens, ttft_ms=ttft_ms, itl_ms=itl_ms)

    def ready(bound_port: int) -> None:
        typer.echo(f"mock upstream on http://{host}:{bound_port}/v1", err=True)

    serve_mock_forever(host, port, defaults, on_ready=ready)


@cli.command("hash-key")
def hash_key(
    key: Annotated[
        str | None,
        typer.Argument(
            help="The API key to hash; - reads it from stdin (kept out of the shell history); "
            "omitted: generate a new random key."
        ),
    ] = None,
) -> None:
    """Print an API key's SHA-256 for auth.api_keys (and a new key when none is given)."""
    from tokenrelay.guards.auth import generate_api_key, hash_api_key

    if key == "-":
        key = sys.stdin.readline().strip()
    if key is None:
        key = generate_api_key()
        typer.echo(f"key:    {key}")
    typer.echo(f"sha256: {hash_api_key(key)}")


@cli.command("check-config")
def check_config(
    file: Annotated[Path, typer.Argument(help="The config file to check.", dir_okay=False)],
) -> None:
    """Validate a config file (with TOKENRELAY_* variables applied) and print the result."""
    settings = _load_or_exit(file, {})
    typer.echo(json.dumps(settings.model_dump(mode="json"), indent=2))


@cli.command()
def bench(
    url: Annotated[
        str, typer.Argument(help="Base URL of tokenrelay or any OpenAI-compatible server.")
    ],
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", help="Open streams.")] = 10,
    requests: Annotated[
        int | None,
        typer.Option("--requests", "-n", help="Streams to complete (100 when -d is not given)."),
    ] = None,
    duration: Annotated[
        float | None,
        typer.Option("--duration", "-d", help="Seconds after which no stream starts (≤ 3600)."),
    ] = None,
    stream_format: Annotated[
        str, typer.Option("--format", help="openai (/v1/chat/completions) or native (/v1/runs).")
    ] = "openai",
    model: Annotated[str, typer.Option(help="The model of every request.")] = "mock-model",
    prompt: Annotated[
        str | None,
        typer.Option(help="The user message of every request (default: a short sentence)."),
    ] = None,
    max_tokens: Annotated[int | None, typer.Option(help="max_tokens of every request.")] = None,
    mock: Annotated[
        str | None, typer.Option(help='Mock upstream options as JSON, e.g. {"tokens": 200}.')
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(help="Sent as a Bearer token.", envvar="TOKENRELAY_BENCH_API_KEY"),
    ] = None,
    ramp: Annotated[
        float | None, typer.Option(help="New connections per second (default: all at once).")
    ] = None,
    requests_file: Annotated[
        Path | None,
        typer.Option(
            help="JSONL: extra body fields per request, used round-robin.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    slow_reader: Annotated[
        int | None, typer.Option(help="Read each stream at most this many bytes per second.")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds one stream may take.")] = 300.0,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the results as one JSON object.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No live progress line.")] = False,
) -> None:
    """Load-test a streaming server: TTFT, inter-token gaps, throughput, failures by code."""
    from tokenrelay.bench.command import build_config, run_command

    try:
        config = build_config(
            url,
            mock=mock,
            requests_file=requests_file,
            concurrency=concurrency,
            requests=requests,
            duration=duration,
            format=stream_format,
            model=model,
            max_tokens=max_tokens,
            api_key=api_key,
            ramp=ramp,
            slow_reader=slow_reader,
            timeout=timeout,
            **_given(prompt=prompt),
        )
    except (OSError, ValueError) as exc:
        typer.echo(f"bench: {exc}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(run_command(config, json_output=json_output, quiet=quiet))


@cli.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def _import_agent(spec: str) -> Any:
    """``package.module:function`` → the function, importable from the current directory."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        typer.echo(f"--agent must look like module:function, got {spec!r}", err=True)
        raise typer.Exit(2)
    sys.path.insert(0, os.getcwd())
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        typer.echo(f"cannot load the agent {spec}: {exc}", err=True)
        raise typer.Exit(2) from None


def _given(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def _load_or_exit(config: Path | None, flags: dict[str, Any]) -> Any:
    from tokenrelay.config import load_settings
    from tokenrelay.guards.jwt_verifier import check_jwt_settings

    try:
        settings = load_settings(config, flags)
    except ValidationError as exc:
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"]) or "(top level)"
            typer.echo(f"invalid setting {field}: {error['msg']}", err=True)
        raise typer.Exit(2) from None
    except (OSError, ValueError) as exc:
        typer.echo(f"cannot read config: {exc}", err=True)
        raise typer.Exit(2) from None
    if settings.auth.jwt is not None:
        try:
            check_jwt_settings(settings.auth.jwt)
        except ValueError as exc:
            typer.echo(f"invalid setting {exc}", err=True)
            raise typer.Exit(2) from None
    return settings


def main() -> None:
    cli(prog_name="tokenrelay")


if __name__ == "__main__":
    main()
