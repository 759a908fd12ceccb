"""The issue's performance targets, evaluated by code from the suite JSONs (never by hand).

Each target yields a row: what is promised, the limit, the measured value, and PASS / MISS
(or N/A when the suite that measures it did not run). The markdown table is generated from
these rows, so a number in docs/benchmarks.md can only change by re-running the bench.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from bench.common import TARGET_DROP
from bench.stats import safe_ratio

TARGET_CONCURRENCY = 64
TARGET_MODE = "drop_0.01"


@dataclass(frozen=True)
class Target:
    key: str
    description: str
    limit: str
    measured: float
    measured_text: str
    passed: bool | None  # None: not measured in this run
    source: str

    @property
    def verdict(self) -> str:
        return "N/A" if self.passed is None else ("PASS" if self.passed else "MISS")

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "description": self.description,
            "limit": self.limit,
            "measured": self.measured,
            "measured_text": self.measured_text,
            "verdict": self.verdict,
            "source": self.source,
        }


def _row(
    key: str, description: str, limit: str, value: float, fmt: str, ok: bool | None, source: str
) -> Target:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return Target(key, description, limit, math.nan, "not measured", None, source)
    return Target(key, description, limit, float(value), fmt.format(value), ok, source)


def _cell(http: dict[str, Any] | None, server: str, mode: str, concurrency: int) -> dict[str, Any] | None:
    if not http:
        return None
    for cell in http.get("aggregate", []):
        if cell["server"] == server and cell["mode"] == mode and cell["concurrency"] == concurrency:
            return cell
    return None


def _nan(value: Any) -> float:
    return math.nan if value is None else float(value)


def evaluate(offline: dict[str, Any] | None, http: dict[str, Any] | None) -> list[Target]:
    """All target rows from the offline and HTTP results (either may be None)."""
    rows: list[Target] = []
    drop_key = f"{TARGET_DROP:g}"
    point = None
    model = None
    if offline:
        model = offline["models"]["boostnet"]
        point = model["headline"].get(drop_key)
    loss = _nan(point["accuracy_loss"]) if point else math.nan
    frac = _nan(point["macs_fraction_of_full"]) if point else math.nan
    oracle_ratio = safe_ratio(point["test_macs"], model["oracle"]["macs"]) if point and model else math.nan
    src_off = f"offline: max_accuracy_drop={TARGET_DROP:g} chosen on held-out, measured on the test split"
    rows.append(
        _row(
            "offline_loss",
            "accuracy loss vs all stages at the ≤1 % budget (test split)",
            "≤ 1.00 pp",
            100 * loss,
            "{:.2f} pp",
            100 * loss <= 1.0 + 1e-9,
            src_off,
        )
    )
    rows.append(
        _row(
            "offline_macs_fraction",
            "average MACs / full network at ≤1 % loss (test split)",
            "≤ 0.333",
            frac,
            "{:.3f}",
            frac <= 1 / 3,
            src_off,
        )
    )
    rows.append(
        _row(
            "offline_oracle_ratio",
            "average MACs / oracle-exit MACs at ≤1 % loss (test split)",
            "≤ 1.30",
            oracle_ratio,
            "{:.2f}×",
            oracle_ratio <= 1.3,
            src_off,
        )
    )

    ee = _cell(http, "batching", TARGET_MODE, TARGET_CONCURRENCY)
    allst = _cell(http, "batching", "all_stages", TARGET_CONCURRENCY)
    nob = _cell(http, "no_batching", TARGET_MODE, TARGET_CONCURRENCY)
    one = _cell(http, "batching", TARGET_MODE, 1)
    src_http = f"http: {TARGET_MODE} vs all_stages, {TARGET_CONCURRENCY} clients, batching server"
    served_loss = _nan(ee["accuracy_loss_vs_all_stages"]) if ee else math.nan
    served_frac = (
        safe_ratio(ee["avg_macs"], http["full_macs"]) if ee and http and "full_macs" in http else math.nan
    )
    speedup = safe_ratio(ee["req_per_s"], allst["req_per_s"]) if ee and allst else math.nan
    ideal = safe_ratio(http["full_macs"], ee["avg_macs"]) if ee and http and "full_macs" in http else math.nan
    of_ideal = safe_ratio(speedup, ideal)
    p99 = safe_ratio(ee["p99_ms"], allst["p99_ms"]) if ee and allst else math.nan
    batching = safe_ratio(ee["req_per_s"], nob["req_per_s"]) if ee and nob else math.nan
    overhead = _nan(one["overhead_ms_p50"]) if one else math.nan
    rows.append(
        _row(
            "served_loss",
            "served accuracy loss vs all stages, same images (HTTP, 64 clients)",
            "≤ 1.00 pp",
            100 * served_loss,
            "{:.2f} pp",
            100 * served_loss <= 1.0 + 1e-9,
            src_http,
        )
    )
    rows.append(
        _row(
            "served_macs_fraction",
            "served average MACs / full network (HTTP, 64 clients)",
            "≤ 0.333",
            served_frac,
            "{:.3f}",
            served_frac <= 1 / 3,
            src_http,
        )
    )
    rows.append(
        _row(
            "http_speedup",
            "req/s early exit / all stages at 64 clients",
            "≥ 2.80×",
            speedup,
            "{:.2f}×",
            speedup >= 2.8,
            src_http,
        )
    )
    rows.append(
        _row(
            "http_of_ideal",
            "that speedup / MAC-ideal ratio (full MACs / served average MACs)",
            "≥ 0.80",
            of_ideal,
            "{:.2f}" + (f" (ideal {ideal:.2f}×)" if math.isfinite(ideal) else ""),
            of_ideal >= 0.8,
            src_http,
        )
    )
    rows.append(
        _row(
            "http_p99",
            "p99 latency early exit / all stages at 64 clients",
            "≤ 0.50",
            p99,
            "{:.2f}",
            p99 <= 0.5,
            src_http,
        )
    )
    rows.append(
        _row(
            "batching",
            "req/s with cross-request batching / batch-1 serving at 64 clients",
            "≥ 3.00×",
            batching,
            "{:.2f}×",
            batching >= 3.0,
            f"http: {TARGET_MODE}, batching vs no_batching server",
        )
    )
    rows.append(
        _row(
            "overhead",
            "server overhead at 1 client: p50 latency − engine time per image",
            "≤ 1.50 ms",
            overhead,
            "{:.2f} ms",
            overhead <= 1.5,
            f"http: {TARGET_MODE}, 1 client; engine time from boostserve_stage_duration_seconds",
        )
    )
    return rows
