"""The bench's figures say what they should: whole exits, the served configuration, few legend entries,
no line across a client count that was not measured."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import figures as report


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Every figure the plot functions close, kept open for inspection."""
    plt = report._pyplot()
    close = plt.close
    kept: list[Any] = []
    monkeypatch.setattr(plt, "close", kept.append)
    yield kept
    for fig in kept:
        close(fig)


def _cell(server: str, mode: str, concurrency: int, rps: float, hist: list[int] | None = None) -> dict[str, Any]:
    return {
        "server": server,
        "mode": mode,
        "concurrency": concurrency,
        "req_per_s": rps,
        "req_per_s_min": rps * 0.9,
        "req_per_s_max": rps * 1.1,
        "p99_ms": 10.0,
        "exit_histogram": hist or [5, 3, 1, 1],
    }


GRID = (1, 8, 64, 256)


def _http_doc() -> dict[str, Any]:
    """Main modes at every client count; multipart and ablations at 1 and 64 only (quick-like)."""
    agg = [_cell("batching", m, k, 100.0 * k) for m in ("drop_0.01", "drop_0.005", "all_stages") for k in GRID]
    agg += [_cell("batching", m, k, 50.0 * k) for m in ("multipart_drop_0.01", "multipart_all_stages") for k in (1, 64)]
    agg += [_cell(s, "drop_0.01", k, 40.0 * k) for s in ("fastapi_path", "no_access_log") for k in (1, 64)]
    agg += [_cell("batching", "v2_binary", 64, 900.0), _cell("no_batching", "drop_0.01", 64, 700.0)]
    return {"result": {"aggregate": agg}}


def test_the_http_figure_shows_the_served_configuration_and_all_stages(tmp_path: Path, figures: list[Any]) -> None:
    report.plot_http(_http_doc(), tmp_path)
    main = figures[0]
    labels = [t.get_text() for t in main.legends[0].get_texts()]
    assert labels == [series[1] for series in report.HTTP_MAIN_SERIES]  # no ablation, no drop_0.005
    for ax in main.axes:
        for line in ax.get_lines():
            xs = [int(x) for x in line.get_xdata()]
            if len(xs) > 1 and line.get_linestyle() not in ("None", ""):
                # a line only between neighbours on the run's client grid: multipart (1 and 64) is markers only
                assert all(GRID.index(b) == GRID.index(a) + 1 for a, b in itertools.pairwise(xs)), xs


def test_the_ablations_have_their_own_figure(tmp_path: Path, figures: list[Any]) -> None:
    paths = report.plot_http(_http_doc(), tmp_path)
    assert [p.name for p in paths] == ["http_throughput_latency.png", "http_exit_histogram.png", "http_ablations.png"]
    ablations = figures[2]
    panels = {ax.get_title(): [t.get_text() for t in ax.get_yticklabels()] for ax in ablations.axes}
    assert set(panels) == {"1 client, budget ≤1 % drop", "64 clients, budget ≤1 % drop"}
    assert panels["64 clients, budget ≤1 % drop"] == [
        "batching",
        "batching, multipart body",
        "batching, OIP v2 binary",
        "fastapi_path",
        "no_access_log",
        "no_batching",
    ]


def test_the_exit_histogram_has_whole_exits(tmp_path: Path, figures: list[Any]) -> None:
    report.plot_http(_http_doc(), tmp_path)
    ax = figures[1].axes[0]
    assert list(ax.get_xticks()) == [1, 2, 3, 4]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["exit 1", "exit 2", "exit 3", "exit 4"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "≤0.5 % drop (256 clients)",
        "≤1 % drop (256 clients)",
    ]


def test_the_offline_plot_has_at_most_six_legend_entries(tmp_path: Path, figures: list[Any]) -> None:
    curve = [{"test_macs": m * 1e6, "test_accuracy": a} for m, a in ((1.0, 0.8), (2.0, 0.9), (3.0, 0.92))]

    def model(t: float) -> dict[str, Any]:
        knobs = {"max_accuracy_drop/optimal": curve, "max_accuracy_drop/reference": curve}
        return {
            "t": t,
            "curves": {"optimal": curve, "reference": curve, **knobs},
            "anytime": [{"macs": 1e6, "test_accuracy": 0.8}, {"macs": 3e6, "test_accuracy": 0.92}],
            "oracle": {"macs": 1.5e6, "accuracy": 0.95},
            "headline": {"0.01": {"test_macs": 2e6, "test_accuracy": 0.9}},
        }

    report.plot_offline({"result": {"models": {"boostnet": model(0.5), "baseline": model(0.0)}}}, tmp_path)
    legend = figures[0].axes[0].get_legend()
    labels = [t.get_text() for t in legend.get_texts()]
    assert len(labels) <= 6, labels
    assert labels[:4] == [
        "boostnet (t=0.5), optimal policy",
        "boostnet (t=0.5), reference policy",
        "baseline (t=0), optimal policy",
        "baseline (t=0), reference policy",
    ]


@pytest.mark.parametrize(("early_exit", "verdict"), [(2900.0, "PASS"), (2700.0, "MISS")])
def test_the_multipart_speedup_has_its_own_verdict(early_exit: float, verdict: str) -> None:
    from bench.targets import evaluate

    agg = [
        _cell("batching", "multipart_drop_0.01", 64, early_exit),
        _cell("batching", "multipart_all_stages", 64, 1000.0),
        _cell("batching", "drop_0.01", 64, 1.0),  # the raw cells do not enter the multipart row
        _cell("batching", "all_stages", 64, 100.0),
    ]
    row = next(t for t in evaluate(None, {"aggregate": agg, "pooled": []}) if t.key == "http_speedup_multipart")
    assert (row.verdict, row.measured) == (verdict, early_exit / 1000.0)
