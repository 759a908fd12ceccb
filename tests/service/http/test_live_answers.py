"""Answers on a moved global budget: effective budget, thresholds and `degraded` (v1 and v2, exact
bodies), requests with their own budget untouched, the live layer's metrics and settings."""

from __future__ import annotations

import itertools
import json
import math
import re
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.core.knobs import Budget
from service.core.live.slo import Signals
from service.core.policies import ThresholdResult
from service.http.settings import Settings
from tests.service.http import images
from tests.service.http.conftest import ClientFactory

GLOBAL = {"max_accuracy_drop": 0.01}
CHEAP = Budget.of(max_accuracy_drop=0.3)


@pytest.fixture(scope="module")
def degraded_client(synthetic_artifact: Any) -> Iterator[TestClient]:
    from tests.service.http.conftest import _client

    with _client(synthetic_artifact, default_budget=GLOBAL) as client:
        service = client.app.state.service  # type: ignore[attr-defined]
        assert client.portal is not None
        client.portal.call(service.live.degrade, CHEAP)  # on the server's loop, as SLO mode would
        assert service.live.degraded  # the premise: CHEAP is cheaper than GLOBAL on this artifact
        yield client


def expected_info(client: TestClient, result: ThresholdResult, given: dict[str, Any], effective: Any) -> dict:
    service = client.app.state.service  # type: ignore[attr-defined]
    info = result.to_json()
    return {
        "budget": given,
        "effective_budget": effective,
        "degraded": effective is not None,
        "thresholds": info["thresholds"],
        "policy": info["policy"],
        "expected_accuracy": info["expected_accuracy"],
        "expected_macs": info["expected_macs"],
        "expected_macs_fraction": info["expected_macs"] / service.manifest.full_macs,
        "exit_fractions": info["exit_fractions"],
        "calibrated": True,
        "early_exit": True,
    }


def test_v1_answer_on_the_global_budget_says_degraded_with_the_effective_point(degraded_client: TestClient) -> None:
    service = degraded_client.app.state.service  # type: ignore[attr-defined]
    response = degraded_client.post("/v1/classify", content=images.png(), headers={"content-type": "image/png"})
    assert response.status_code == 200, response.text
    expected = expected_info(
        degraded_client,
        service.resolver.resolve(CHEAP),
        {"max_accuracy_drop": 0.01, "policy": "optimal"},
        {"max_accuracy_drop": 0.3, "policy": "optimal"},
    )
    assert response.json()["budget"] == expected


def test_v1_request_with_its_own_budget_is_not_moved(degraded_client: TestClient) -> None:
    service = degraded_client.app.state.service  # type: ignore[attr-defined]
    response = degraded_client.post(
        "/v1/classify?max_accuracy_drop=0.01", content=images.png(), headers={"content-type": "image/png"}
    )
    assert response.status_code == 200, response.text
    own = Budget.of(max_accuracy_drop=0.01)
    expected = expected_info(degraded_client, service.resolver.resolve(own), own.to_json(), None)
    assert response.json()["budget"] == expected


def _v2(client: TestClient, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    pixels = np.random.default_rng(0).integers(0, 256, size=(1, 8, 8, 1), dtype=np.uint8)
    body: dict[str, Any] = {
        "inputs": [{"name": "image", "shape": [1, 8, 8, 1], "datatype": "UINT8", "data": pixels.ravel().tolist()}]
    }
    if parameters:
        body["parameters"] = parameters
    model = client.app.state.service.manifest.name  # type: ignore[attr-defined]
    response = client.post(f"/v2/models/{model}/infer", json=body)
    assert response.status_code == 200, response.text
    parameters_out: dict[str, Any] = response.json()["parameters"]
    assert parameters_out.pop("latency_ms") > 0
    return parameters_out


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def test_v2_parameters_say_degraded_with_the_effective_point(degraded_client: TestClient) -> None:
    service = degraded_client.app.state.service  # type: ignore[attr-defined]
    assert _v2(degraded_client) == {
        "exits_total": 3,
        "early_exit": True,
        "deadline_hits": 0,
        "budget": _compact({"max_accuracy_drop": 0.01, "policy": "optimal"}),
        "thresholds": _compact(service.resolver.resolve(CHEAP).to_json()["thresholds"]),
        "degraded": True,
        "effective_budget": _compact({"max_accuracy_drop": 0.3, "policy": "optimal"}),
    }
    own = {"max_accuracy_drop": 0.01}
    assert _v2(degraded_client, own) == {
        "exits_total": 3,
        "early_exit": True,
        "deadline_hits": 0,
        "budget": _compact({"max_accuracy_drop": 0.01, "policy": "optimal"}),
        "thresholds": _compact(service.resolver.resolve(Budget.of(**own)).to_json()["thresholds"]),
        "degraded": False,
    }


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


def test_metrics_show_the_operating_point_and_degraded_traffic(degraded_client: TestClient) -> None:
    service = degraded_client.app.state.service  # type: ignore[attr-defined]
    before = _metric(degraded_client.get("/metrics").text, "boostserve_degraded_requests_total")
    for _ in range(3):
        degraded_client.post("/v1/classify", content=images.png(), headers={"content-type": "image/png"})
    degraded_client.post("/v1/classify?max_exit=1", content=images.png(), headers={"content-type": "image/png"})
    text = degraded_client.get("/metrics").text
    assert _metric(text, "boostserve_degraded_requests_total") == before + 3  # the own-budget one is not
    assert _metric(text, "boostserve_degraded") == 1.0
    cheap = service.resolver.resolve(CHEAP)
    full = float(service.resolver.calibration.correct[-1].mean())
    assert _metric(text, "boostserve_operating_point_expected_drop") == pytest.approx(full - cheap.expected_accuracy)
    assert _metric(text, "boostserve_budget_expected_macs") == pytest.approx(cheap.expected_macs)
    assert _metric(text, "boostserve_degraded_seconds_total") >= 0.0


def test_get_budget_shows_the_point_in_force(degraded_client: TestClient) -> None:
    body = degraded_client.get("/v1/budget").json()
    assert body["degraded"] is True and body["effective_budget"] == {"max_accuracy_drop": 0.3, "policy": "optimal"}
    assert body["budget"] == {"max_accuracy_drop": 0.01, "policy": "optimal"}


def test_mac_controller_runs_only_on_a_global_budget_macs(make_client: ClientFactory) -> None:
    with make_client(default_budget={"budget_macs": 3e6}) as client:
        assert client.portal is not None
        control = client.app.state.live  # type: ignore[attr-defined]
        client.portal.call(control.tick, 0.0, 0.0)
        assert control.mac is not None and control.slo is None
    with make_client(default_budget=GLOBAL, live_budget=False) as client:
        assert client.app.state.live is None  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"latency_target_ms": 0}, "latency_target_ms"),
        ({"latency_target_ms": 60_001}, "latency_target_ms"),
        ({"max_accuracy_drop_under_load": 0}, "max_accuracy_drop_under_load"),
        ({"max_accuracy_drop_under_load": 0.6}, "max_accuracy_drop_under_load"),
        ({"live_budget_window": 99}, "live_budget_window"),
    ],
)
def test_live_settings_are_range_checked(env: dict[str, Any], message: str, tmp_path: Any) -> None:
    with pytest.raises(ValueError, match=message):
        Settings(artifacts_dir=tmp_path, **env)


def test_empty_latency_target_means_off(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOOSTSERVE_LATENCY_TARGET_MS", "")
    assert Settings(artifacts_dir=tmp_path).latency_target_ms is None
    monkeypatch.setenv("BOOSTSERVE_LATENCY_TARGET_MS", "50")
    assert math.isclose(Settings(artifacts_dir=tmp_path).latency_target_ms or 0.0, 50.0)


def test_slo_mode_builds_a_ladder_within_the_floor_and_sheds_only_through_it(make_client: ClientFactory) -> None:
    with make_client(default_budget=GLOBAL, latency_target_ms=50, max_accuracy_drop_under_load=0.2) as client:
        assert client.portal is not None
        control = client.app.state.live  # type: ignore[attr-defined]
        service = client.app.state.service  # type: ignore[attr-defined]
        client.portal.call(control.tick, 0.0, 0.0)
        ladder = control._ladder
        assert ladder[0] is None and len(ladder) >= 2 and len(ladder) == len(control.slo.rungs)
        drops = [b.value for b in ladder[1:]]
        assert all(b.kind == "max_accuracy_drop" for b in ladder[1:]) and drops[-1] <= 0.2
        assert drops == sorted(drops) and all(0.01 < d <= 0.2 for d in drops)  # between the budget and the floor
        costs = [service.live.adjusted.thresholds.expected_macs] + [
            service.resolver.resolve(b).expected_macs for b in ladder[1:]
        ]
        assert all(a > b for a, b in itertools.pairwise(costs))  # every rung strictly cheaper
        floor_cost = service.resolver.resolve(Budget.of(max_accuracy_drop=0.2)).expected_macs
        assert costs[-1] == floor_cost  # the last rung is as cheap as the floor allows (equal points deduplicated)
        ok = client.post("/v1/classify", content=images.png(), headers={"content-type": "image/png"})
        assert ok.status_code == 200
        control.slo.should_shed = lambda backlog: True  # as at the floor with a long predicted wait
        shed = client.post("/v1/classify", content=images.png(), headers={"content-type": "image/png"})
        assert shed.status_code == 429 and shed.json()["error"]["type"] == "over_capacity"
        assert "cheapest allowed operating point" in shed.json()["error"]["message"]


def test_slo_mode_sees_the_event_loop_lag_and_sheds_on_it_at_the_floor(make_client: ClientFactory) -> None:
    """Requests waiting for a busy loop are invisible to the scheduler's queue; the tick's own timer
    lateness is the signal (a sleep of 0.1 s that ended 0.9 s late)."""
    with make_client(default_budget=GLOBAL, latency_target_ms=50, max_accuracy_drop_under_load=0.2) as client:
        assert client.portal is not None
        control = client.app.state.live  # type: ignore[attr-defined]
        client.portal.call(control.tick, 0.0, 0.0)
        control.slo.rung = control.slo.floor
        client.portal.call(control.tick, 1.0, 1.0, 0.9)
        assert control.loop_lag == pytest.approx(0.9)
        shed = client.post("/v1/classify", content=images.png(), headers={"content-type": "image/png"})
        assert shed.status_code == 429, shed.text
        client.portal.call(control.tick, 1.1, 0.1, 0.0)  # on time again: no lag, no shedding
        assert control.loop_lag == 0.0
        ok = client.post("/v1/classify", content=images.png(), headers={"content-type": "image/png"})
        assert ok.status_code == 200, ok.text


def test_slo_mode_reads_what_answered_requests_took_and_what_it_refused(make_client: ClientFactory) -> None:
    """The tick hands the controller the p99 of the answers in its window (each request's time in the
    core, recorded as it is answered) and the images the shed rule refused since the last tick."""
    with make_client(default_budget=GLOBAL, latency_target_ms=50, max_accuracy_drop_under_load=0.2) as client:
        assert client.portal is not None
        control = client.app.state.live  # type: ignore[attr-defined]
        client.portal.call(control.tick, 0.0, 0.0)
        before = time.monotonic()
        for _ in range(3):
            ok = client.post("/v1/classify", content=images.png(), headers={"content-type": "image/png"})
            assert ok.status_code == 200
        took = [latency for _, latency in control.latencies._answers]
        assert len(took) == 3 and all(0.0 < t < time.monotonic() - before for t in took)
        control.slo.rung, control.slo.shed_delay = control.slo.floor, -1.0  # at the floor, shedding
        for _ in range(2):
            shed = client.post("/v1/classify", content=images.png(), headers={"content-type": "image/png"})
            assert shed.status_code == 429
        control.slo.shed_delay = control.slo.config.shed_max  # shedding seen; back to the limit's most
        seen: list[Signals] = []
        update = control.slo.update
        control.slo.update = lambda s: seen.append(s) or update(s)
        client.portal.call(control.tick, 0.1, 0.1)
        assert seen[-1].refused == 2 and seen[-1].latency is None  # 3 answers: too few for a p99
        for _ in range(60):
            control.latencies.add(time.monotonic(), 0.2)
        client.portal.call(control.tick, 0.2, 0.1)
        assert seen[-1].refused == 0 and seen[-1].latency == pytest.approx(0.2)
        text = client.get("/metrics").text
        assert _metric(text, "boostserve_slo_answered_p99_seconds") == pytest.approx(0.2)
        assert _metric(text, "boostserve_slo_shed_limit_seconds") == pytest.approx(control.slo.shed_delay)
        # p99 four times the target, but no queue (an idle test server): shedding cannot help, no shrink
        assert control.slo.shed_delay == pytest.approx(control.slo.config.shed_max)


def test_a_ladder_rebuild_keeps_what_slo_mode_learnt_and_the_tick_reads_cpu_time(make_client: ClientFactory) -> None:
    """A new adjusted point rebuilds the ladder and its controller; the rates, the overhead, whether
    it was ever learnt from a saturated tick (else the CPU bound would overwrite it) and the shed
    limit carry over. Each tick hands the controller the process's CPU time since the last one."""
    with make_client(default_budget=GLOBAL, latency_target_ms=50, max_accuracy_drop_under_load=0.2) as client:
        assert client.portal is not None
        control = client.app.state.live  # type: ignore[attr-defined]
        client.portal.call(control.tick, 0.0, 0.0)
        old = control.slo
        old.overhead, old.saturated_once, old.arrival_rate, old.shed_delay = 0.0004, True, 123.0, 0.015
        control._ladder_for = None  # as after a new adjusted point
        seen: list[Signals] = []
        client.portal.call(control.tick, 0.1, 0.1)
        new = control.slo
        assert new is not old
        assert (new.overhead, new.saturated_once, new.shed_delay) == (0.0004, True, 0.015)
        update = new.update
        new.update = lambda s: seen.append(s) or update(s)
        client.portal.call(control.tick, 0.2, 0.1)
        assert seen[-1].cpu_s is not None and seen[-1].cpu_s >= 0.0
