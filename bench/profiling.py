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

#: Our own code by component: files or folders of this repository (checked to exist by the tests,
#: so a move cannot silently send its samples to the framework frames around it).
OWN_CODE: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("prometheus metrics", ("service/http/metrics.py",)),
    ("access log", ("service/http/logging_setup.py",)),
    ("image decode + preprocess", ("service/core/preprocess.py", "service/core/decode_pool.py")),
    ("response rendering", ("service/http/v1/render.py", "service/http/v2/codec.py")),
    ("scheduler (queues, batches, answers)", ("service/core/scheduler/",)),
    ("engine (Python side)", ("service/core/engine.py", "service/core/tensors.py")),
    (
        "classify core (options, budget, exit rule, live control)",
        (
            "service/core/classify.py",
            "service/core/budget.py",
            "service/core/budget_source.py",
            "service/core/knobs.py",
            "service/core/exit_rule.py",
            "service/core/memo.py",
            "service/core/shadow.py",
            "service/core/policies/",
            "service/core/live/",
        ),
    ),
    ("HTTP request path (fast path, routes, middleware, protocol)", ("service/http/",)),
)

#: Third-party code by component (a regex on the frame).
LIBRARIES: tuple[tuple[str, str], ...] = (
    ("ONNX Runtime (Session.run)", r"onnxruntime"),
    ("prometheus metrics", r"prometheus_client"),
    ("image decode + preprocess", r"PIL/|pyspng"),
    ("response rendering", r"pydantic|json/|jsonable_encoder"),
    ("numpy", r"numpy/"),
    ("FastAPI/Starlette", r"fastapi/|starlette/"),
    ("uvicorn HTTP protocol (httptools)", r"uvicorn/|h11/|httptools"),
    ("thread-pool hand-off", r"concurrent/futures|threading\.py|queue\.py"),
    ("asyncio event loop", r"asyncio/|selectors\.py|uvloop"),
)


def _own_rule(paths: tuple[str, ...]) -> str:
    """A frame "function (path:line)" whose path is one of ours, relative or absolute (py-spy prints both)."""
    return "|".join(rf"[(/]{re.escape(p)}" for p in paths)


#: (component, regex on a frame "function (file:line)"), checked from the innermost frame outwards;
#: within one frame the first rule that matches wins (ours before the libraries).
COMPONENTS: tuple[tuple[str, str], ...] = (
    *((name, _own_rule(paths)) for name, paths in OWN_CODE),
    *LIBRARIES,
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
