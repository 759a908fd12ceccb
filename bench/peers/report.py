"""The peers suite's markdown section and plot, generated from peers.json (bench.report calls them).

Every number comes from the JSON the runner wrote; skipped peers are listed with their reason,
and the versions each peer ran with are printed next to the table.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench.stats import safe_ratio

BOOSTSERVE = "boostserve"
MODE_TEXT = {"early_exit": "early exit", "full": "full network"}


def _f(value: Any, fmt: str = "{:.2f}", scale: float = 1.0) -> str:
    """A number of the JSON ("–" for a missing one: NaN is stored as null)."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return "–"
    return fmt.format(value * scale)


def _label(cell: dict[str, Any]) -> str:
    return f"{cell['server']} ({MODE_TEXT.get(cell['mode'], cell['mode'])})"


def ranked(result: dict[str, Any], concurrency: int) -> list[dict[str, Any]]:
    """The aggregate rows at `concurrency`, fastest first."""
    rows = [c for c in result.get("aggregate", []) if c["concurrency"] == concurrency]
    return sorted(rows, key=lambda c: -(c["req_per_s"] if isinstance(c["req_per_s"], int | float) else 0.0))


def _reference(result: dict[str, Any], concurrency: int) -> float:
    """boostserve early exit's median req/s at `concurrency` (NaN when absent)."""
    ref = next(
        (c for c in ranked(result, concurrency) if c["server"] == BOOSTSERVE and c["mode"] == "early_exit"), None
    )
    return float(ref["req_per_s"]) if ref and isinstance(ref["req_per_s"], int | float) else math.nan


def _versions(server: dict[str, Any]) -> str:
    versions = server.get("versions") or {}
    return ", ".join(f"{k} {v}" for k, v in versions.items()) or "this environment (see Machine)"


def peers_section(doc: dict[str, Any], image: str | None) -> list[str]:
    """Markdown lines of the peers section."""
    r, s, m = doc["result"], doc["settings"], doc.get("machine", {})
    servers = {sv["name"]: sv for sv in r["servers"]}
    thresholds = ", ".join(_f(t, "{:.4f}") if isinstance(t, int | float) else str(t) for t in r["thresholds"])
    exp = r["expected"]
    lines = [
        "## Peers: the same network served by other servers (`boostserve bench --suite peers`)",
        "",
        f"`{r['model']}` ({r['version']}); {r['images']} Fashion-MNIST test images as PNG (mean "
        f"{r['png_bytes_mean']:.0f} B), each server in its own documented request envelope "
        "(bench.peers.protocol); closed loop, "
        f"server and every process it starts pinned to CPUs {s['server_cpus']}, load generator to "
        f"{s['client_cpus']}; {s['rounds']} interleaved round(s) (each round starts every server in "
        f"rotating order, measures it, stops it), {s['warmup_s']:g} s warm-up then {s['duration_s']:g} s per cell; "
        f"every batcher at max batch {s['max_batch_size']} and max wait {s['max_wait_ms']:g} ms where it has "
        "those knobs; ONNX Runtime with one intra-op thread everywhere. Peers serve the full network as one "
        "ONNX (bench.fullgraph); the hand-written early-exit peer runs the stage graphs with boostserve's "
        f"thresholds for max_accuracy_drop={r['drop']:g} ({thresholds}). Every answer is checked against the "
        "expected answer of its image, computed in process by boostserve's engine (full network: "
        f"{100 * exp['full_accuracy']:.2f} % accurate on these images; early exit: "
        f"{100 * exp['early_exit_accuracy']:.2f} %, {100 * exp['early_exit_macs_fraction']:.1f} % of the full "
        "MACs). CPU per request: the server's whole process tree over the measured window. "
        f"The machine was shared with other work (load average at start {m.get('loadavg_1_5_15')}): "
        "medians and min–max over rounds.",
        "",
        "Rerun: `boostserve bench --suite peers` (add `--publish` to update this page). Each peer is installed "
        "on first use into its own venv under `--peers-cache` (default `~/.cache/boostserve/peers`, made with "
        "Debian's /usr/bin/python3.11 where it exists; pins in bench/peers/envs.py and the `peers` extra); "
        "`--no-peer-install` skips a missing one with the reason recorded. Not part of the default bench or CI.",
        "",
    ]
    for k in sorted({c["concurrency"] for c in r.get("aggregate", [])}):
        ref = _reference(r, k)
        lines += [
            f"{k} clients:",
            "",
            "| server | mode | batching | req/s (median) | min–max | p50 ms | p99 ms | server CPU ms/req "
            "| answers | label mismatches | errors | accuracy | boostserve early exit ÷ this |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for c in ranked(r, k):
            sv = servers.get(c["server"], {})
            lines.append(
                f"| {c['server']} | {MODE_TEXT.get(c['mode'], c['mode'])} | {sv.get('batching', '')} "
                f"| {_f(c['req_per_s'], '{:.0f}')} "
                f"| {_f(c['req_per_s_min'], '{:.0f}')}–{_f(c['req_per_s_max'], '{:.0f}')} "
                f"| {_f(c['p50_ms'])} | {_f(c['p99_ms'])} | {_f(c['server_cpu_ms_per_request'], '{:.3f}')} "
                f"| {c['answers']} | {c['label_mismatches']} | {c['errors']} "
                f"| {_f(c['accuracy'], '{:.2f} %', 100)} "
                f"| {_f(safe_ratio(ref, c['req_per_s']), '{:.2f}×')} |"
            )
        lines.append("")
    skipped = [sv for sv in r["servers"] if sv["status"] != "ok"]
    if skipped:
        lines += ["Skipped (not measured):", ""]
        lines += [f"- `{sv['name']}`: {sv['reason']}" for sv in skipped]
        lines.append("")
    lines += [
        "What each server is, what it is sent, and the versions it ran:",
        "",
        "| server | what | request | versions | start-up s per round |",
        "|---|---|---|---|---:|",
    ]
    for sv in r["servers"]:
        startup = "/".join(_f(x, "{:.1f}") for x in sv.get("startup_s", [])) or "–"
        request = f"`{sv.get('protocol', '')}` POST {sv.get('path', '')}"
        lines.append(f"| {sv['name']} | {sv['title']} | {request} | {_versions(sv)} | {startup} |")
    if image:
        lines += ["", f"![peers]({image})"]
    return lines


def plot_peers(doc: dict[str, Any], out_dir: Path) -> Path:
    """req/s (bars: min–max) and p99 per server and mode at the largest client count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = doc["result"]
    counts = sorted({c["concurrency"] for c in r.get("aggregate", [])})
    rows = list(reversed(ranked(r, counts[-1]))) if counts else []
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 0.5 * len(rows) + 1.8), sharey=True)
    names = [_label(c) for c in rows]
    ys = list(range(len(rows)))
    colors = ["tab:blue" if c["server"] == BOOSTSERVE else "tab:gray" for c in rows]
    med = [c["req_per_s"] or 0.0 for c in rows]
    lo = [max(m - (c["req_per_s_min"] or m), 0.0) for m, c in zip(med, rows, strict=True)]
    hi = [max((c["req_per_s_max"] or m) - m, 0.0) for m, c in zip(med, rows, strict=True)]
    ax.barh(ys, med, xerr=[lo, hi], color=colors, capsize=3)
    ax.set_yticks(ys, names, fontsize=8)
    ax.set_xlabel("requests/s (median over rounds, bars: min–max)")
    ax.set_title(f"Throughput, {counts[-1] if counts else '?'} clients, server on one core")
    ax.grid(alpha=0.3, axis="x")
    ax2.barh(ys, [c["p99_ms"] or 0.0 for c in rows], color=colors)
    ax2.set_xlabel("p99 latency (ms, median over rounds)")
    ax2.set_title("p99 latency")
    ax2.grid(alpha=0.3, axis="x")
    path = out_dir / "peers_throughput.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
