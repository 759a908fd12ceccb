"""What machine and software produced a result: recorded in every suite's JSON.

Why: benchmark numbers are meaningless without the hardware and versions next to them, and this
host is shared, so the load average at the start of each suite is recorded too (a high value
explains noisy numbers).
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except ImportError:
        return None
    return str(getattr(mod, "__version__", "unknown"))


def cpu_ticks() -> tuple[float, float]:
    """(steal, all) clock ticks of every CPU since boot, from /proc/stat; NaNs where unreadable.

    Steal is the time the hypervisor ran something else while this VM wanted the CPU: on a shared
    VM, the share of it over a measurement says how much of a slow run was the host's doing.
    """
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return math.nan, math.nan
    if len(fields) < 9 or fields[0] != "cpu":
        return math.nan, math.nan
    ticks = [float(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return ticks[7], sum(ticks)


def machine_info(providers_in_use: list[str] | None = None) -> dict[str, Any]:
    """Cores, CPU model, RAM, load, OS, Python and library versions, ORT providers."""
    try:
        affinity = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        affinity = []
    try:
        import onnxruntime as ort

        ort_version: str | None = ort.__version__
        available = list(ort.get_available_providers())
    except ImportError:
        ort_version, available = None, []
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "affinity": affinity,
        "ram_bytes": _ram_bytes(),
        "loadavg_1_5_15": list(load) if load else None,
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "onnxruntime": ort_version,
        "providers_available": available,
        "providers_in_use": providers_in_use,
        "numpy": _version("numpy"),
        "onnx": _version("onnx"),
        "pillow": _version("PIL"),
        "pyspng": _version("pyspng"),
        "orjson": _version("orjson"),
        "httpx": _version("httpx"),
        "git_sha": _git_sha(),
    }
