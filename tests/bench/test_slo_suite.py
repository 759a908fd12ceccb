"""The slo suite's pieces: the Poisson schedule, per-step numbers, the verdicts, the refusal-cost harness."""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.common import load_artifact
from bench.openloop import Phase, run_open_loop, schedule
from bench.slo_suite import (
    SloSettings,
    StepSampler,
    capacity_again,
    hardest_third,
    refusal_cost,
    slo_section,
    step_summary,
)
from bench.targets import evaluate_slo
from tests.fixtures.synthetic_artifact import build_synthetic_artifact
from tests.service.http import images


def test_schedule_is_poisson_at_the_set_rate_per_phase() -> None:
    arrivals = schedule([Phase(200.0, 50.0, [1, 2]), Phase(200.0, 0.0, [3]), Phase(200.0, 200.0, [4])], seed=3)
    times = np.asarray([a[0] for a in arrivals])
    phases = np.asarray([a[1] for a in arrivals])
    assert np.all(np.diff(times) > 0)
    assert set(phases.tolist()) == {0, 2}  # rate 0: no arrival
    assert abs((phases == 0).sum() / 200.0 - 50.0) < 3.0  # 10,000 expected: sd 100 -> 0.5/s
    assert abs((phases == 2).sum() / 200.0 - 200.0) < 6.0
    gaps = np.diff(times[phases == 2])
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05  # exponential gaps: coefficient of variation 1
    assert {a[2] for a in arrivals if a[1] == 0} == {1, 2} and {a[2] for a in arrivals if a[1] == 2} == {4}
    assert schedule([Phase(5.0, 10.0, [0])], seed=1) == schedule([Phase(5.0, 10.0, [0])], seed=1)


def test_open_loop_sends_on_schedule_whatever_the_server_answers() -> None:
    """Against a tiny server that answers 429 to every other request and is slow: every arrival is
    sent (none waits for an answer), statuses and latencies recorded per arrival."""

    async def main() -> tuple[Any, int, int]:
        seen = connections = 0

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal seen, connections
            connections += 1
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))[15:])
                    await reader.readexactly(length)
                    seen += 1
                    await asyncio.sleep(0.05)
                    if seen % 2:
                        budget = {
                            "degraded": True,
                            "budget": {"max_accuracy_drop": 0.001},
                            "effective_budget": {"max_accuracy_drop": 0.02},
                        }
                        body = json.dumps({"results": [{"label": 1, "exit": 2, "macs": 10}], "budget": budget}).encode()
                        status = b"200 OK"
                    else:
                        body, status = b"{}", b"429 Too Many Requests"
                    writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: " + str(len(body)).encode())
                    writer.write(b"\r\n\r\n" + body)
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        result = await run_open_loop(
            host="127.0.0.1", port=port, path="/v1/classify", bodies=[b"x"], phases=[Phase(1.0, 100.0, [0])], seed=0
        )
        server.close()
        return result, seen, connections

    result, seen, connections = asyncio.run(main())
    arrays = result.as_arrays()
    n = arrays["status"].size
    assert n == seen > 60  # ~100 arrivals in 1 s, all sent although each answer takes 50 ms
    assert set(arrays["status"].tolist()) == {200, 429}
    ok = arrays["status"] == 200
    assert np.all(arrays["degraded"][ok]) and np.all(arrays["macs"][ok] == 10)
    assert np.all(arrays["allowed_drop"][ok] == 0.02)
    assert np.all(arrays["latency_s"] >= 0.05)
    lag = arrays["send_lag_s"]  # the generator's own delay: recorded per arrival, small when it keeps up
    assert lag.shape == (n,) and np.all(lag >= 0) and np.median(lag) < 0.05
    assert result.late_sends_s == lag.max()
    # ~5 requests in flight at a time: a few connections, each counted once, on the request that opened it
    assert 1 < arrays["new_connection"].sum() == connections < n / 4
    assert arrays["new_connection"][0]


def test_open_loop_opens_a_new_connection_where_the_server_closed_an_idle_one() -> None:
    """A server that closes every connection once it has answered (as a keep-alive timeout does, with
    no Connection: close): each request opens its own connection, none is written to a dead socket."""
    phases = [Phase(1.0, 8.0, [0])]
    gaps = np.diff([0.0] + [at for at, _, _ in schedule(phases, seed=9)])
    assert gaps.min() > 0.02  # time enough for the client to read each close before the next send

    async def main() -> Any:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))[15:])
            await reader.readexactly(length)
            body = json.dumps({"results": [{"label": 1, "exit": 1, "macs": 1}], "budget": {}}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        result = await run_open_loop(
            host="127.0.0.1", port=port, path="/v1/classify", bodies=[b"x"], phases=phases, seed=9
        )
        server.close()
        return result

    arrays = asyncio.run(main()).as_arrays()
    assert arrays["status"].size == gaps.size > 3
    assert np.all(arrays["status"] == 200)
    assert np.all(arrays["new_connection"])


def test_step_summary_counts_shed_over_target_and_loss() -> None:
    rec = {
        "phase": np.array([0, 0, 0, 0, 1]),
        "status": np.array([200, 200, 429, 200, 200]),
        "latency_s": np.array([0.01, 0.2, np.nan, 0.03, 0.01]),
        "image": np.array([0, 1, 2, 3, 0]),
        "label": np.array([5, 6, -1, 0, 5]),
        "degraded": np.array([True, False, False, True, False]),
        "macs": np.array([1.0, 2.0, np.nan, 3.0, 1.0]),
        "scheduled_s": np.array([0.0, 0.1, 0.2, 0.3, 1.5]),
        "allowed_drop": np.array([0.03, 0.001, np.nan, 0.02, 0.001]),
        "send_lag_s": np.array([0.0, 0.0, 0.0, 0.004, 0.5]),
    }
    labels = np.array([5, 7, 1, 0])
    full = np.array([True, True, True, False])
    s = step_summary(rec, 0, 2.0, labels, full, target_s=0.05)
    assert (s["arrivals"], s["answered"], s["shed"], s["over_target"], s["slo_violations"]) == (4, 3, 1, 1, 2)
    assert s["offered_rps"] == 2.0 and s["served_rps"] == 1.5 and s["shed_share"] == 0.25
    assert s["accuracy"] == pytest.approx(2 / 3) and s["degraded_share"] == pytest.approx(2 / 3)
    assert s["loss_vs_all_stages"] == pytest.approx(2 / 3 - 2 / 3)
    assert s["allowed_drop_mean"] == pytest.approx((0.03 + 0.001 + 0.02) / 3)
    assert s["send_lag_p99_ms"] == pytest.approx(np.percentile([0.0, 0.0, 0.0, 4.0], 99))  # phase 1's lag not counted


def test_hardest_third_takes_the_latest_exits() -> None:
    conf = np.array([[0.99, 0.1, 0.5, 0.2, 0.95, 0.3], [0.5, 0.99, 0.1, 0.2, 0.5, 0.1], [0, 0, 0, 0, 0, 0]])
    thresholds = [0.9, 0.9, -np.inf]
    # exits: 0, 1, 2, 2, 0, 2 -> the two latest and least confident: images 3 (0.2) and 5 (0.3)
    assert hardest_third(conf.astype(np.float32), thresholds).tolist() == [3, 5]


def _steps(shed: float, p99: float, loss: float, violations: int) -> dict[str, Any]:
    steps = [
        {"load": f, "shed_share": shed if f == 1.5 else 0.0, "p99_ms": p99, "loss_vs_all_stages": loss}
        for f in (0.5, 1.0, 1.5, 0.5)
    ]
    return {"steps": steps, "violations": violations}


def _verdicts(static: dict[str, Any], slo: dict[str, Any], live: float, fixed: float) -> dict[str, str]:
    doc = {
        "settings": {"latency_target_ms": 50.0, "floor": 0.03},
        "accuracy_first": {"static": static, "slo": slo},
        "drift": {
            "drift_live": {"settled_macs_over_budget": live},
            "drift_static": {"settled_macs_over_budget": fixed},
        },
    }
    return {t.key: t.verdict for t in evaluate_slo(doc)}


def test_slo_verdicts_pass_and_miss_on_their_limits() -> None:
    good = _verdicts(_steps(0.2, 900.0, 0.001, 5000), _steps(0.005, 40.0, 0.02, 100), 1.01, 1.2)
    assert good == dict.fromkeys(("slo_shed", "slo_p99", "slo_loss", "slo_violations", "drift_macs"), "PASS")
    bad = _verdicts(_steps(0.0, 40.0, 0.001, 500), _steps(0.02, 60.0, 0.04, 100), 1.04, 1.01)
    assert bad == dict.fromkeys(("slo_shed", "slo_p99", "slo_loss", "slo_violations", "drift_macs"), "MISS")
    assert {t.verdict for t in evaluate_slo(None)} == {"N/A"}


def test_refusal_cost_measures_the_head_gate_and_asgi_admission(tmp_path: Path) -> None:
    """bench.shedding_app sheds every classify request, at the head or through admission; the suite
    reads a CPU cost per 429 for both and the markdown reports them beside the served cost."""
    artifact = load_artifact(build_synthetic_artifact(tmp_path / "model"))
    bodies = [images.png()] * 8
    settings = SloSettings(refusal_s=0.3, capacity_clients=4)
    cost = refusal_cost(artifact, bodies, settings, tmp_path / "logs", rounds=2)
    for name in ("head_gate", "asgi"):
        assert cost[name]["share_refused"] == 1.0, cost  # every answer a 429
        low, high = cost[name]["cpu_ms_per_refusal_range"]
        assert 0 <= low <= cost[name]["cpu_ms_per_refusal"] <= high < 100, cost
        assert cost[name]["refusals_per_s"] > 0
    assert "slo-refusal-head_gate.log" in {p.name for p in (tmp_path / "logs").iterdir()}
    doc = {
        "result": {
            "settings": asdict(settings),
            "capacity": {
                "budget_rps": 10.0,
                "floor_rps": 20.0,
                "floor_over_budget": 2.0,
                "floor_cpu_ms_per_request": 0.3,
            },
            "refusal_cost": {
                "head_gate": {"cpu_ms_per_refusal": 0.04, "cpu_ms_per_refusal_range": [0.035, 0.05]},
                "asgi": {"cpu_ms_per_refusal": 0.14, "cpu_ms_per_refusal_range": [0.12, 0.155]},
            },
        }
    }
    text = "\n".join(slo_section(doc, None))
    assert "429 refused at the request head 0.040 ms [0.035–0.050], through ASGI admission 0.140 ms" in text
    assert "per answered request at the floor 0.300 ms" in text


def test_the_report_gives_the_capacity_measured_again_after_the_scenario() -> None:
    """A VM whose speed moved within the run shows as a second capacity far from the first; a
    result from before the second measurement renders as it did."""
    cap = {"budget_rps": 1000.0, "floor_rps": 1400.0, "floor_over_budget": 1.4, "budget_cpu_ms_per_request": 0.5}
    assert capacity_again(cap) is None
    doc = {"result": {"settings": asdict(SloSettings()), "capacity": cap}}
    assert "measured again" not in "\n".join(slo_section(doc, None))
    cap.update(budget_rps_after=600.0, budget_cpu_ms_per_request_after=0.85)
    line = capacity_again(cap)
    assert line == (
        "Capacity at the budget measured again after the accuracy-first scenario: 600 req/s, 0.60× the first "
        "measurement (server CPU per request 0.850 ms against 0.500 ms): far from 1× means the VM's speed moved "
        "within the run."
    )
    assert line in slo_section(doc, None)


def test_step_sampler_reads_cpu_and_batches_at_each_step_boundary() -> None:
    class FakeServer:
        def __init__(self) -> None:
            self.reads = 0

        def cpu_seconds(self) -> float:
            self.reads += 1
            return 0.5 * self.reads  # 0.5 s of CPU between samples

        def scrape(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
            n = float(self.reads)
            return {
                ("boostserve_stage_batch_size_count", frozenset({("stage", "1")})): 10 * n,
                ("boostserve_stage_batch_size_sum", frozenset({("stage", "1")})): 40 * n * n,
                ("boostserve_stage_batch_size_count", frozenset({("stage", "2")})): 999.0,
            }

    sampler = StepSampler(FakeServer(), [0.0, 0.02, 0.04])  # type: ignore[arg-type]
    sampler.start()
    sampler.finish()
    assert len(sampler.samples) == 3
    steps = sampler.per_step([100, 250, 7])
    assert [steps[0]["server_cpu_ms_per_answer"], steps[0]["stage1_batch_mean"]] == pytest.approx([5.0, 12.0])
    assert [steps[1]["server_cpu_ms_per_answer"], steps[1]["stage1_batch_mean"]] == pytest.approx([2.0, 20.0])
    assert all(0.0 <= s["steal_share"] <= 1.0 or math.isnan(s["steal_share"]) for s in steps[:2])  # this VM's own
    assert all(math.isnan(v) for v in steps[2].values())  # no sample after the last boundary
    a, b = sampler.samples[0], sampler.samples[1]
    sampler.samples[1] = replace(b, steal_ticks=a.steal_ticks + 30, all_ticks=a.all_ticks + 120)
    assert sampler.per_step([100, 250])[0]["steal_share"] == pytest.approx(0.25)
    gave_up = StepSampler(FakeServer(), [0.0, 60.0])  # type: ignore[arg-type]
    gave_up.start()
    t = time.perf_counter()
    gave_up.finish(wait=False)  # a failed trace does not wait for the next boundary
    assert time.perf_counter() - t < 5.0 and len(gave_up.samples) <= 1
