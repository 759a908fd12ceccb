"""The bench's figures: accuracy vs MACs (offline suite), HTTP throughput and latency, ablations, exits.

Why their own module: bench.report writes the markdown around them; these functions only turn a
suite JSON into PNGs, and each figure answers one question (issue 17 item 6): the HTTP figure shows
the served configuration and the all-stages reference, the ablations have their own figure, the exit
histogram counts whole exits, the offline legend names policies per model, not every knob value.
A line joins only client counts that were measured next to each other on the run's grid.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _num(value: Any) -> float:
    """JSON value -> float; None (a NaN in the results) and strings become NaN (as bench.report reads them)."""
    return float(value) if isinstance(value, int | float) else math.nan


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _legend_below(ax: Any, handles: list[Any] | None = None, ncol: int = 3) -> None:
    """The legend under the axes, so it never hides a curve."""
    kwargs: dict[str, Any] = {"handles": handles} if handles is not None else {}
    ax.legend(**kwargs, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=ncol, frameon=False)


def plot_offline(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """Accuracy vs average MACs: per model its two policies' budget_macs curves, the fixed exits and
    the oracle; the ≤1 % drop budget's operating point is labelled on the plot, not in the legend.

    Why so few entries: one line per (model, policy, knob) gave 14 legend entries that nobody could
    match to lines; color = model, line style = policy, marker = kind of point reads at a glance.
    """
    plt = _pyplot()
    from matplotlib.lines import Line2D

    models = doc["result"]["models"]
    fig, ax = plt.subplots(figsize=(8, 6))
    colors = {"boostnet": "tab:blue", "baseline": "tab:orange"}
    styles = {"optimal": "-", "reference": "--"}
    handles = []
    for i, (key, model) in enumerate(models.items()):
        color = colors.get(key, "tab:gray")
        label = f"{key} (t={model['t']:g})"
        for policy, style in styles.items():
            points = model["curves"].get(policy) or []
            if not points:
                continue
            pts = sorted(points, key=lambda p: p["test_macs"])
            (line,) = ax.plot(
                [p["test_macs"] / 1e6 for p in pts],
                [100 * p["test_accuracy"] for p in pts],
                style,
                color=color,
                linewidth=1.4,
                label=f"{label}, {policy} policy",
            )
            handles.append(line)
        any_pts = model["anytime"]
        ax.plot([p["macs"] / 1e6 for p in any_pts], [100 * p["test_accuracy"] for p in any_pts], "o", color=color, ms=5)
        orc = model["oracle"]
        ax.plot(orc["macs"] / 1e6, 100 * orc["accuracy"], "*", color=color, markersize=13)
        head = model["headline"].get("0.01")
        if head:
            x, y = head["test_macs"] / 1e6, 100 * head["test_accuracy"]
            ax.plot(x, y, "D", color="black", markersize=6, markerfacecolor=color)
            offset = (8, -14) if i % 2 == 0 else (8, 6)  # two models' points lie close: one below, one above
            ax.annotate(f"{key}: ≤1 % drop", (x, y), textcoords="offset points", xytext=offset, fontsize=7)
    handles += [
        Line2D([], [], linestyle="", marker="o", color="0.4", label="a fixed exit (every image)"),
        Line2D([], [], linestyle="", marker="*", markersize=11, color="0.4", label="oracle exit"),
    ]
    ax.set_xlabel("average MACs per image (millions), test split")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs average MACs (budget_macs thresholds chosen on held-out data)")
    ax.grid(alpha=0.3)
    _legend_below(ax, handles, ncol=2)
    path = out_dir / "offline_accuracy_vs_macs.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _measured_runs(xs: list[int], grid: list[int]) -> list[list[int]]:
    """`xs` split where a concurrency of the run's grid between two of them was not measured:
    a line joins only neighbours on the grid (a point alone is drawn as a marker)."""
    runs: list[list[int]] = []
    position = {x: i for i, x in enumerate(grid)}
    for x in sorted(xs):
        if runs and position[x] == position[runs[-1][-1]] + 1:
            runs[-1].append(x)
        else:
            runs.append([x])
    return runs


#: Transports of the served budget beside the raw body, as the ablation figure names them.
HTTP_TRANSPORTS = {"multipart_drop_0.01": "multipart body", "v2_binary": "OIP v2 binary", "grpc": "OIP v2 gRPC"}


#: The main HTTP figure: the served configuration's budget and the all-stages reference, raw and multipart.
HTTP_MAIN_SERIES = (  # (mode, label, color, line style, marker): raw bodies filled circles, multipart open squares
    ("drop_0.01", "early exit, ≤1 % drop (served)", "tab:green", "-", "o"),
    ("all_stages", "all stages (reference)", "tab:blue", "-", "o"),
    ("multipart_drop_0.01", "early exit, multipart body", "tab:green", "--", "s"),
    ("multipart_all_stages", "all stages, multipart body", "tab:blue", "--", "s"),
)


def _plot_http_main(plt: Any, agg: list[dict[str, Any]], grid: list[int], out_dir: Path) -> Path:
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 5))
    for mode, label, color, style, marker in HTTP_MAIN_SERIES:
        by = {c["concurrency"]: c for c in agg if c["server"] == "batching" and c["mode"] == mode}
        if not by:
            continue
        for i, run in enumerate(_measured_runs(list(by), grid)):
            cs = [by[k] for k in run]
            rps = [_num(c["req_per_s"]) for c in cs]
            spread = [
                [r - _num(c["req_per_s_min"]) for r, c in zip(rps, cs, strict=True)],
                [_num(c["req_per_s_max"]) - r for r, c in zip(rps, cs, strict=True)],
            ]
            kw = {"color": color, "linestyle": style, "marker": marker, "label": label if i == 0 else None}
            if marker != "o":
                kw["markerfacecolor"] = "white"
            ax.errorbar(run, rps, yerr=spread, capsize=3, **kw)
            ax2.plot(run, [_num(c["p99_ms"]) for c in cs], **kw)
    for a, ylabel, title in (
        (ax, "requests/s (median over rounds, bars: min–max)", "HTTP throughput, `batching` server"),
        (ax2, "p99 latency (ms, median over rounds)", "HTTP p99 latency, `batching` server"),
    ):
        a.set_xscale("log", base=2)
        a.set_xticks(grid, [str(k) for k in grid])
        a.minorticks_off()
        a.set_xlabel("concurrent clients (closed loop)")
        a.set_ylabel(ylabel)
        a.set_title(title)
        a.grid(alpha=0.3)
    ax.set_ylim(bottom=0)
    ax2.set_yscale("log")
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=len(labels), frameon=False)
    path = out_dir / "http_throughput_latency.png"
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_http_ablations(plt: Any, agg: list[dict[str, Any]], compare: dict[str, Any] | None, out_dir: Path) -> Path:
    """One panel per client count with a one-setting ablation: req/s of every server and transport at
    the served budget (drop_0.01), min–max whiskers, p99 written at each bar."""
    rows = [c for c in agg if c["mode"] == "drop_0.01" or (c["server"] == "batching" and c["mode"] in HTTP_TRANSPORTS)]
    clients = (
        sorted({c["concurrency"] for c in rows if c["server"] not in ("batching", "no_batching")})
        or sorted({c["concurrency"] for c in rows})[-1:]
    )
    fig, axes = plt.subplots(1, max(len(clients), 1), figsize=(6.5 * max(len(clients), 1), 4.8), squeeze=False)
    for ax, k in zip(axes[0], clients, strict=False):
        cs = [c for c in rows if c["concurrency"] == k]
        cs.sort(key=lambda c: (c["server"] != "batching", c["mode"] != "drop_0.01", c["server"], c["mode"]))
        names = []
        for c in cs:
            name = c["server"] if c["mode"] == "drop_0.01" else f"batching, {HTTP_TRANSPORTS[c['mode']]}"
            if compare and c["server"] == compare["server"]:
                name = f"{c['server']} ({compare['other']['short']})"
            names.append(name)
        rps = [_num(c["req_per_s"]) for c in cs]
        lo = [r - _num(c["req_per_s_min"]) for r, c in zip(rps, cs, strict=True)]
        hi = [_num(c["req_per_s_max"]) - r for r, c in zip(rps, cs, strict=True)]
        ys = list(range(len(cs)))
        colors = ["tab:green" if (c["server"], c["mode"]) == ("batching", "drop_0.01") else "0.6" for c in cs]
        ax.barh(ys, rps, xerr=[lo, hi], color=colors, capsize=3)
        for y, r, h, c in zip(ys, rps, hi, cs, strict=True):
            end = r + h if math.isfinite(r + h) else r
            p99 = _num(c["p99_ms"])
            text = f"p99 {p99:.1f} ms" if math.isfinite(p99) else "p99 –"
            ax.annotate(text, (end, y), xytext=(6, -3), textcoords="offset points", fontsize=7)
        ax.set_yticks(ys, names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("requests/s (median over rounds, whiskers: min–max)")
        ax.set_title(f"{k} client{'s' if k != 1 else ''}, budget ≤1 % drop")
        ax.grid(alpha=0.3, axis="x")
        ax.set_xlim(0, max([r + h for r, h in zip(rps, hi, strict=True) if math.isfinite(r + h)] or [1]) * 1.3)
    fig.suptitle(
        "Request-path ablations and transports\n(each server differs from `batching`, green, in one setting)",
        fontsize=10,
    )
    path = out_dir / "http_ablations.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_exit_histogram(plt: Any, agg: list[dict[str, Any]], out_dir: Path) -> Path:
    """Where served images exit, per early-exit budget (raw bodies), at the run's largest client count."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ee = [c for c in agg if c["server"] == "batching" and c["mode"].startswith("drop_")]
    if ee:
        top = max(c["concurrency"] for c in ee)
        chosen = sorted((c for c in ee if c["concurrency"] == top), key=lambda c: c["mode"])
        width = 0.8 / len(chosen)
        exits = len(chosen[0]["exit_histogram"])
        for i, c in enumerate(chosen):
            hist = c["exit_histogram"]
            total = max(sum(hist), 1)
            ax.bar(
                [k + 1 + (i - (len(chosen) - 1) / 2) * width for k in range(len(hist))],
                [100 * h / total for h in hist],
                width=width,
                label=f"≤{100 * float(c['mode'].removeprefix('drop_')):g} % drop ({top} clients)",
            )
        ax.set_xticks(range(1, exits + 1), [f"exit {k}" for k in range(1, exits + 1)])
        ax.set_xlim(0.4, exits + 0.6)
        ax.set_xlabel("the exit that answered (1 = first, cheapest)")
        ax.set_ylabel("share of served images (%)")
        ax.set_title("Where served images exit")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    path = out_dir / "http_exit_histogram.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_http(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """[throughput and p99 of the served configuration vs all stages, exit histogram, ablations]."""
    plt = _pyplot()
    agg = doc["result"]["aggregate"]
    grid = sorted({c["concurrency"] for c in agg})
    return [
        _plot_http_main(plt, agg, grid, out_dir),
        _plot_exit_histogram(plt, agg, out_dir),
        _plot_http_ablations(plt, agg, doc["result"].get("compare_with"), out_dir),
    ]
