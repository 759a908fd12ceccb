"""A real `boostserve serve` in a subprocess, pinned to its own CPUs, for the HTTP suite.

Why a subprocess and not an in-process app: the measurement must include what a deployment runs
— the CLI, uvicorn, its event loop and its HTTP parser — and must not share the GIL with the
load generator. Settings go through the environment (`BOOSTSERVE_*`, service.http.settings), exactly
as an operator would set them; the bench records them verbatim.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (tiny race with other processes; fine for a bench)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until_ready(url: str, proc: subprocess.Popen[Any], timeout_s: float, poll_s: float = 0.1) -> bool:
    """Poll `url` until it answers 200 (True), the process exits or `timeout_s` passes (False).

    The one readiness loop shared by the bench and the tests that start `boostserve serve`.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(poll_s)
    return False


def parse_prometheus(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Minimal text-format parser: {(series name, labels): value}; enough for sums and counts."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, rest = line.rpartition(" ")
        if not name_labels:
            continue
        try:
            value = float(rest)
        except ValueError:
            continue
        labels: frozenset[tuple[str, str]] = frozenset()
        name = name_labels
        if "{" in name_labels:
            name, _, body = name_labels.partition("{")
            pairs = []
            for part in body.rstrip("}").split('",'):
                key, _, val = part.partition("=")
                if key:
                    pairs.append((key.strip(), val.strip().strip('"')))
            labels = frozenset(pairs)
        out[(name.strip(), labels)] = value
    return out


def metric_sum(metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """Sum of every series `name` whose labels include `labels` (0.0 when absent)."""
    want = set(labels.items())
    return sum(v for (n, lab), v in metrics.items() if n == name and want <= lab)


class ServerProcess:
    """Start, probe, scrape and stop one `python -m boostserve serve` process."""

    def __init__(
        self,
        artifacts: Path,
        env: dict[str, str],
        *,
        cpus: list[int] | None,
        log_path: Path,
        host: str = "127.0.0.1",
        startup_timeout_s: float = 120.0,
    ) -> None:
        self.artifacts = artifacts
        self.env = env
        self.cpus = cpus
        self.host = host
        self.port = free_port(host)
        self.log_path = log_path
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = float("nan")

    #: `python -m` these, then --artifacts/--host/--port, then `extra_args` (a subclass may run another entry point).
    entry_point: tuple[str, ...] = ("boostserve", "serve")

    @property
    def extra_args(self) -> list[str]:
        return []

    @property
    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            *self.entry_point,
            "--artifacts",
            str(self.artifacts),
            "--host",
            self.host,
            "--port",
            str(self.port),
            *self.extra_args,
        ]

    def describe(self) -> dict[str, Any]:
        return {"command": self.command, "env": self.env, "cpus": self.cpus, "startup_s": self.startup_s}

    def process_env(self) -> dict[str, str]:
        """The environment the server starts with: ours plus its settings."""
        return {**os.environ, **self.env}

    def start(self) -> None:
        env = self.process_env()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            self.command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        if self.cpus:
            # Pinned right after fork, while the child is still starting Python: every thread it
            # creates later (uvicorn, ORT, anyio workers) inherits this affinity.
            os.sched_setaffinity(self.proc.pid, self.cpus)
        if wait_until_ready(self.url("/readyz"), self.proc, self.startup_timeout_s):
            self.startup_s = time.perf_counter() - t0
            return
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited with {self.proc.returncode} during start-up; log:\n{self.log_tail()}")
        self.stop()
        raise RuntimeError(f"server not ready after {self.startup_timeout_s:.0f} s; log:\n{self.log_tail()}")

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def scrape(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        with urllib.request.urlopen(self.url("/metrics"), timeout=10) as response:
            return parse_prometheus(response.read().decode())

    def cpu_seconds(self) -> float:
        """utime + stime of the server process (all its threads) from /proc; NaN if unreadable."""
        if self.proc is None:
            return float("nan")
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks = os.sysconf("SC_CLK_TCK")
            return (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, ValueError, IndexError):
            return float("nan")

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (graceful drain), then SIGKILL after timeout_s; only our own child."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(timeout=5)

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
