"""Optional py-spy profile of the server during one HTTP cell, summarised by component.

Why in the bench: "what limits the throughput" should be reproducible from the same command that
produced the numbers, not a one-off manual session. py-spy is not a dependency: when it is not
installed the profile is skipped and the report says so (`pip install py-spy`).

Samples are taken in `--gil` mode (only the thread holding the GIL is sampled), so the shares are
of the server's *Python* time; ONNX Runtime's own kernels release the GIL and show up only through
the Python frames around them. Each sample is attributed to the innermost frame that matches one of
the component rules below (first match from the leaf up).
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

#: (component, regex on a frame "function (file:line)"), checked from the innermost frame outwards.
COMPONENTS: tuple[tuple[str, str], ...] = (
    ("ONNX Runtime (Session.run)", r"onnxruntime"),
    ("request id (uuid)", r"\(uuid\.py"),
    ("prometheus metrics", r"prometheus_client|service/metrics\.py"),
    ("telemetry (fastapi/opentelemetry)", r"telemetry|opentelemetry"),
    ("image decode + preprocess (Pillow)", r"PIL/|service/preprocess\.py"),
    ("response serialisation (pydantic/json)", r"pydantic|json/|serialize_response|jsonable_encoder"),
    ("numpy", r"numpy/"),
    ("scheduler", r"service/scheduler\.py"),
    ("engine (Python side)", r"service/engine\.py"),
    ("route + runtime + budget", r"service/api_v1\.py|service/runtime\.py|service/budget\.py|service/policy\.py"),
    ("service middleware", r"service/middleware\.py"),
    ("FastAPI/Starlette", r"fastapi/|starlette/"),
    ("uvicorn HTTP protocol (h11/httptools)", r"uvicorn/|h11/|httptools"),
    ("thread-pool hand-off", r"concurrent/futures|threading\.py|queue\.py"),
    ("asyncio event loop", r"asyncio/|selectors\.py|uvloop"),
)


def find_py_spy() -> str | None:
    """py-spy next to this interpreter (a venv) or on PATH."""
    local = Path(sys.executable).parent / "py-spy"
    if local.is_file():
        return str(local)
    return shutil.which("py-spy")


def summarise_raw(path: Path, top: int = 15) -> dict[str, Any]:
    """Component shares and the hottest functions (self time) of a py-spy `--format raw` file."""
    components: collections.Counter[str] = collections.Counter()
    self_time: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        self_time[re.sub(r":\d+\)$", ")", frames[-1])] += n
        for frame in reversed(frames):
            name = next((c for c, rx in COMPONENTS if re.search(rx, frame)), None)
            if name is not None:
                components[name] += n
                break
        else:
            components["other"] += n
    return {
        "samples": total,
        "components": [{"component": c, "share": n / total} for c, n in components.most_common()] if total else [],
        "hottest": [{"function": f, "share": n / total} for f, n in self_time.most_common(top)] if total else [],
    }


class ServerProfile:
    """Context manager: py-spy records `pid` for `seconds` (raw format) while the caller drives load."""

    def __init__(self, pid: int, seconds: float, rate: int = 250) -> None:
        self.pid, self.seconds, self.rate = pid, seconds, rate
        self.exe = find_py_spy()
        self._dir = tempfile.TemporaryDirectory(prefix="boostserve-pyspy-")
        self.out = Path(self._dir.name) / "profile.txt"
        self.proc: subprocess.Popen[bytes] | None = None
        self.error: str | None = None if self.exe else "py-spy not installed (pip install py-spy)"

    def __enter__(self) -> ServerProfile:
        if self.exe:
            self.proc = subprocess.Popen(
                [
                    self.exe,
                    "record",
                    "--pid",
                    str(self.pid),
                    "--output",
                    str(self.out),
                    "--format",
                    "raw",
                    "--rate",
                    str(self.rate),
                    "--duration",
                    str(max(1, round(self.seconds))),
                    "--gil",
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            try:
                _, err = self.proc.communicate(timeout=self.seconds + 30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                _, err = self.proc.communicate()
            if self.proc.returncode != 0 or not self.out.is_file():
                self.error = f"py-spy failed ({self.proc.returncode}): {err.decode(errors='replace')[-300:]}"

    def summary(self) -> dict[str, Any]:
        try:
            if self.error is not None:
                return {"available": False, "reason": self.error}
            return {"available": True, "sampling": "gil", "rate_hz": self.rate, **summarise_raw(self.out)}
        finally:
            self._dir.cleanup()
