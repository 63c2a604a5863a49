"""Benchmarks of tokenrelay itself, side by side with a direct connection and nginx, in one run.

    python benchmarks/run.py            # the full run (a few minutes); writes benchmarks/README.md
    python benchmarks/run.py --smoke    # seconds; checks the harness still works, writes nothing

Every target relays the same mock upstream (``tokenrelay mock-upstream``) on 127.0.0.1; the load
comes from ``tokenrelay bench`` in its own process. nginx is configured as a streaming proxy
(``proxy_buffering off``, upstream keep-alive) with one worker, like tokenrelay's one process;
the script installs it from Debian if it is missing. Absolute numbers on a shared 2-core machine
are noise: the ratios measured in the same run are the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    concurrency: int
    requests: int
    mock: dict[str, Any]
    ramp: float | None = None


FULL_SCENARIOS = (
    Scenario("S1-c1", "S1 latency, 1 stream", 1, 300, {"tokens": 200}),
    Scenario("S1-c50", "S1 latency, 50 streams", 50, 1000, {"tokens": 200}),
    Scenario("S2", "S2 throughput, 100 streams", 100, 600, {"tokens": 500}),
    Scenario("S3", "S3 1,000 slow streams", 1000, 1000, {"tokens": 100, "itl_ms": 50}, ramp=500),
)
SMOKE_SCENARIOS = (
    Scenario("S1-c1", "S1 latency, 1 stream", 1, 20, {"tokens": 20}),
    Scenario("S2", "S2 throughput, 10 streams", 10, 40, {"tokens": 50}),
    Scenario("S3", "S3 slow streams", 50, 50, {"tokens": 10, "itl_ms": 20}, ramp=200),
)


@dataclass
class Measurement:
    scenario: Scenario
    target: str
    result: dict[str, Any]
    cpu_seconds: float | None = None
    memory_per_stream_kib: float | None = None

    @property
    def chunks(self) -> int:
        return int(self.result["tokens"]["total"])


@dataclass
class Target:
    name: str
    url: str
    pid: int | None  # the process whose CPU and memory are measured (None: nothing between)
    extra: dict[str, Any] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_ready(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not become ready")


@contextmanager
def process(
    args: list[str], ready_url: str, log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``args`` (``env`` added to ours) until the block ends, once ``ready_url`` answers."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    try:
        wait_ready(ready_url)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tokenrelay_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tokenrelay", *args]


def ensure_nginx() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if found:
        return found
    print("nginx is missing: installing it from Debian", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "nginx-light"], check=True, env=env)
    return "/usr/sbin/nginx"


NGINX_CONF = """
worker_processes 1;
worker_rlimit_nofile 20000;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  upstream mock {{ server 127.0.0.1:{upstream_port}; keepalive 512; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_cache off;
      proxy_read_timeout 300s;
    }}
  }}
}}
"""


@contextmanager
def nginx(binary: str, upstream_port: int, workdir: Path) -> Iterator[Target]:
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(workdir=workdir, upstream_port=upstream_port, port=port))
    url = f"http://127.0.0.1:{port}"
    with process(
        [binary, "-c", str(conf), "-p", str(workdir)], url + "/v1/models", workdir / "nginx.log"
    ) as master:
        workers = children(master.pid)
        yield Target("nginx", url, workers[0] if workers else master.pid)


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def rss_kib(pid: int) -> float:
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * PAGE_SIZE / 1024


class PeakMemory:
    """Samples a process's resident memory every 100 ms while a load runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_kib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, rss_kib(self.pid))


def run_load(target: Target, scenario: Scenario) -> Measurement:
    args = [
        "bench",
        target.url,
        "--json",
        "--quiet",
        "-c",
        str(scenario.concurrency),
        "-n",
        str(scenario.requests),
        "--mock",
        json.dumps(scenario.mock),
        "--timeout",
        "120",
    ]
    if scenario.ramp:
        args += ["--ramp", str(scenario.ramp)]
    before_cpu = cpu_seconds(target.pid) if target.pid else None
    baseline = rss_kib(target.pid) if target.pid else None
    with ExitStack() as stack:
        memory = stack.enter_context(PeakMemory(target.pid)) if target.pid else None
        done = subprocess.run(tokenrelay_command(*args), capture_output=True, check=False)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"bench failed on {target.name}: {done.stderr.decode()[-2000:]}")
    measurement = Measurement(scenario, target.name, json.loads(done.stdout))
    if target.pid and before_cpu is not None and memory is not None and baseline is not None:
        measurement.cpu_seconds = cpu_seconds(target.pid) - before_cpu
        measurement.memory_per_stream_kib = (memory.peak - baseline) / scenario.concurrency
    return measurement


def versions(nginx_binary: str | None) -> dict[str, str]:
    import aiohttp
    import uvicorn

    import tokenrelay

    found = {
        "tokenrelay": tokenrelay.__version__,
        "python": platform.python_version(),
        "uvicorn": uvicorn.__version__,
        "aiohttp": aiohttp.__version__,
        "cpus": str(os.cpu_count()),
    }
    if nginx_binary:
        out = subprocess.run([nginx_binary, "-v"], capture_output=True, text=True).stderr
        found["nginx"] = out.strip().split("/")[-1]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds, writes nothing")
    parser.add_argument("--no-nginx", action="store_true", help="leave nginx out")
    parser.add_argument("--output", type=Path, default=HERE / "README.md")
    options = parser.parse_args()
    scenarios = SMOKE_SCENARIOS if options.smoke else FULL_SCENARIOS
    nginx_binary = None if options.no_nginx else ensure_nginx()

    with tempfile.TemporaryDirectory(prefix="tokenrelay-bench-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        mock_port, relay_port = free_port(), free_port()
        mock_url = f"http://127.0.0.1:{mock_port}"
        stack.enter_context(
            process(
                tokenrelay_command("mock-upstream", "--port", str(mock_port)),
                mock_url + "/v1/models",
                workdir / "mock.log",
            )
        )
        relay = stack.enter_context(
            process(
                tokenrelay_command(
                    "serve",
                    "--port",
                    str(relay_port),
                    "--upstream",
                    mock_url + "/v1",
                    "--log-level",
                    "warning",
                ),
                f"http://127.0.0.1:{relay_port}/readyz",
                workdir / "tokenrelay.log",
            )
        )
        targets = [
            Target("direct", mock_url, None),
            Target("tokenrelay", f"http://127.0.0.1:{relay_port}", relay.pid),
        ]
        if nginx_binary:
            targets.insert(1, stack.enter_context(nginx(nginx_binary, mock_port, workdir)))
        measurements = []
        for scenario in scenarios:
            for target in targets:
                measurement = run_load(target, scenario)
                measurements.append(measurement)
                print(summary_line(measurement), file=sys.stderr)
    failures = sum(m.result["requests"]["failed"] for m in measurements)
    if options.smoke:
        return 1 if failures else 0
    from benchmarks.report import write_report

    command = "python benchmarks/run.py" + (" --no-nginx" if options.no_nginx else "")
    write_report(options.output, measurements, versions(nginx_binary), command)
    (options.output.parent / "results.json").write_text(
        json.dumps(
            [
                {
                    "scenario": m.scenario.name,
                    "target": m.target,
                    "cpu_seconds": m.cpu_seconds,
                    "memory_per_stream_kib": m.memory_per_stream_kib,
                    **m.result,
                }
                for m in measurements
            ],
            indent=2,
        )
    )
    return 0


def summary_line(m: Measurement) -> str:
    r = m.result
    cpu = f" cpu={m.cpu_seconds:.2f}s" if m.cpu_seconds is not None else ""
    return (
        f"{m.scenario.name:7} {m.target:10} ok={r['requests']['ok']} "
        f"failed={r['requests']['failed']} chunks/s={r['tokens']['per_second']:,.0f} "
        f"ttft p50={r['ttft_ms']['p50']}ms p99={r['ttft_ms']['p99']}ms "
        f"itl p99={r['itl_ms']['p99']}ms{cpu}"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    sys.exit(main())
