"""A real `boostserve serve` process on 127.0.0.1 for the reliability tests.

Why a subprocess and not an in-process uvicorn: overload, shutdown and soak are about the process
the operator runs (signals, exit code, RSS, the uvicorn/asyncio stack), so we start exactly the
command line from the docs: `boostserve serve --artifacts DIR --host 127.0.0.1 --port P`, with the
knobs (queue limit, grace period, token ...) passed as BOOSTSERVE_* environment variables.
Every wait is bounded; `stop()` always reaps the child.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.server import free_port

REPO = Path(__file__).resolve().parents[2]
BOOSTSERVE = REPO / ".venv" / "bin" / "boostserve"

#: Readiness endpoint (503 until the engine is loaded and warmed up); fallbacks tried in order.
READY_PATHS = ("/ready", "/readyz", "/v1/ready", "/v2/health/ready", "/health/ready")


def boostserve_command() -> list[str]:
    if BOOSTSERVE.exists():
        return [str(BOOSTSERVE)]
    return [sys.executable, "-m", "boostserve"]


def serve_env(**settings: Any) -> dict[str, str]:
    """os.environ without inherited BOOSTSERVE_* variables, plus the given settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOOSTSERVE_")}
    env["PYTHONUNBUFFERED"] = "1"
    for key, value in settings.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        env[f"BOOSTSERVE_{key.upper()}"] = str(value)
    return env


def rss_bytes(pid: int) -> int:
    """Resident set size from /proc/PID/status (VmRSS, kB)."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+)\s+kB", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no VmRSS for pid {pid}")
    return int(match.group(1)) * 1024


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfINFNa]+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text format -> {name: [(labels, value), ...]} (enough for gauges and counters)."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        out.setdefault(name, []).append((dict(_LABEL.findall(labels or "")), float(value)))
    return out


class LiveServer:
    """`boostserve serve` in a child process; logs go to files under log_dir."""

    def __init__(
        self,
        artifacts: Path,
        log_dir: Path,
        *,
        port: int | None = None,
        extra_args: list[str] | None = None,
        cpus: set[int] | None = None,
        **settings: Any,
    ) -> None:
        self.artifacts = Path(artifacts)
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.settings = settings
        self.extra_args = list(extra_args or [])
        #: CPUs the server process (and every thread it starts) may run on; None: all.
        self.cpus = cpus
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = log_dir / f"server-{self.port}.out"
        self.stderr_path = log_dir / f"server-{self.port}.err"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_path: str | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def command(self) -> list[str]:
        return [
            *boostserve_command(),
            "serve",
            "--artifacts",
            str(self.artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self.extra_args,
        ]

    def start(self, timeout: float = 60.0) -> LiveServer:
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=out,
                stderr=err,
                env=serve_env(**self.settings),
                cwd=str(REPO),
                preexec_fn=None if self.cpus is None else self._pin,
            )
        self.wait_ready(timeout)
        return self

    def _pin(self) -> None:
        """In the child before exec: the server and all its threads inherit the affinity."""
        assert self.cpus is not None
        os.sched_setaffinity(0, self.cpus)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def logs(self) -> str:
        parts = []
        for path in (self.stdout_path, self.stderr_path):
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        with httpx.Client(base_url=self.base_url, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise RuntimeError(
                        f"boostserve exited with {self.proc.returncode if self.proc else '?'} before ready:\n"
                        + self.logs()[-4000:]
                    )
                paths = (self.ready_path,) if self.ready_path else READY_PATHS
                for path in paths:
                    try:
                        response = client.get(path)
                    except httpx.HTTPError as exc:
                        last = repr(exc)
                        break
                    if response.status_code == 200:
                        self.ready_path = path
                        return
                    if response.status_code != 404:
                        self.ready_path = path
                    last = f"{path}: {response.status_code}"
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"boostserve not ready after {timeout}s ({last}):\n{self.logs()[-4000:]}")

    def is_ready(self) -> bool:
        try:
            return httpx.get(self.base_url + (self.ready_path or READY_PATHS[0]), timeout=5.0).status_code == 200
        except httpx.HTTPError:
            return False

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def __enter__(self) -> LiveServer:
        # `with LiveServer(...).start() as s` must not start a second process: it would lose the
        # first one (never stopped, a leaked server per test run) while the second died on the port.
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- probes ----------------------------------------------------------------------------------
    def rss(self) -> int:
        return rss_bytes(self.pid)

    def metrics(self, client: httpx.Client | None = None) -> dict[str, list[tuple[dict[str, str], float]]]:
        getter = client.get if client is not None else httpx.get
        response = getter(self.base_url + "/metrics", timeout=5.0)
        response.raise_for_status()
        return parse_metrics(response.text)


def run_serve_expect_failure(
    artifacts: Path, timeout: float = 60.0, **settings: Any
) -> subprocess.CompletedProcess[str]:
    """Run `boostserve serve` on a bad artifact; it must exit by itself (bounded by timeout)."""
    port = free_port()
    cmd = [
        *boostserve_command(),
        "serve",
        "--artifacts",
        str(artifacts),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=serve_env(**settings), cwd=str(REPO)
    )
