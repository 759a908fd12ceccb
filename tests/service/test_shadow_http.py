"""The shadow monitor in the server: same answers as without it, counters exact, the expectation of
the point in force exported, requests with their own budget never sampled, the setting checked."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.core.shadow import expected_disagreement
from service.http.settings import Settings
from tests.service.http import images
from tests.service.http.conftest import _client

GLOBAL = {"max_accuracy_drop": 0.1}
IMAGES = [images.png(seed=seed) for seed in range(24)]


def _series(client: TestClient, name: str) -> dict[str, float]:
    """label text -> value for one metric family of /metrics."""
    out: dict[str, float] = {}
    for line in client.get("/metrics").text.splitlines():
        match = re.match(rf"{name}(\{{[^}}]*\}})? (\S+)$", line)
        if match:
            out[match.group(1) or ""] = float(match.group(2))
    return out


def _classify(client: TestClient, body: bytes, **params: Any) -> dict[str, Any]:
    response = client.post("/v1/classify", content=body, params=params, headers={"content-type": "image/png"})
    assert response.status_code == 200, response.text
    result = response.json()
    result.pop("latency_ms")
    return result


def _wait_samples(client: TestClient, total: int) -> dict[str, float]:
    """Shadow work runs once the server idles; poll its counter (a bounded wait for an event, not a
    timing claim: 30 s covers any load)."""
    for _ in range(3000):
        samples = _series(client, "boostserve_shadow_samples_total")
        if sum(samples.values()) >= total:
            return samples
        time.sleep(0.01)
    raise AssertionError(f"shadow samples never reached {total}")


def test_answers_equal_the_unsampled_servers_and_every_early_exit_is_counted(synthetic_artifact: Path) -> None:
    with _client(synthetic_artifact, default_budget=GLOBAL, shadow_fraction=0.0) as plain:
        want = [_classify(plain, body) for body in IMAGES]
        assert sum(_series(plain, "boostserve_shadow_samples_total").values()) == 0
    with _client(synthetic_artifact, default_budget=GLOBAL, shadow_fraction=1.0) as client:
        got = [_classify(client, body) for body in IMAGES]
        assert got == want  # shadow work never changes an answer
        exits = [r["results"][0]["exit"] for r in got]
        num_stages = got[0]["results"][0]["exits_total"]
        early = sum(1 for e in exits if e < num_stages)
        assert early > 0  # the premise: this budget exits early on these images
        samples = _wait_samples(client, early)
        assert samples == {f'{{stage="{k}"}}': float(exits.count(k)) for k in range(1, num_stages)}
        assert _series(client, "boostserve_global_budget_exits_total") == {
            f'{{stage="{k}"}}': float(exits.count(k)) for k in range(1, num_stages + 1)
        }
        disagreements = _series(client, "boostserve_shadow_disagreements_total")
        assert all(0 <= disagreements[key] <= samples[key] for key in samples)
        # The calibrated expectation of the point in force, as the monitor computes it.
        service = client.app.state.service  # type: ignore[attr-defined]
        exp = expected_disagreement(service.resolver.calibration, service.live.current.thresholds.thresholds)
        expected = _series(client, "boostserve_shadow_expected_disagreement")
        for bound in ("upper", "lower"):
            for k, rate in enumerate(exp.rates(bound), start=1):
                value = expected[f'{{bound="{bound}",stage="{k}"}}']
                assert (math.isnan(value) and rate is None) or value == pytest.approx(rate)
        early_rate = _series(client, "boostserve_shadow_expected_early_disagreement")['{bound="upper"}']
        assert early_rate == pytest.approx(exp.early_rate("upper"))
        assert math.isnan(_series(client, "boostserve_shadow_drift_z")[""])  # 24 samples: no window yet
        assert _series(client, "boostserve_drift_tightening_level")[""] == 0
        # A request with its own budget is never sampled, nor counted in the global exit mix.
        before = sum(samples.values())
        _classify(client, IMAGES[0], max_accuracy_drop=0.1)
        _classify(client, IMAGES[1], early_exit="false")
        _classify(client, IMAGES[2])  # ... and one more on the global budget, so we know shadow work ran since
        after = _wait_samples(client, before + (1 if exits[2] < num_stages else 0))
        assert sum(after.values()) == before + (1 if exits[2] < num_stages else 0)
        assert sum(_series(client, "boostserve_global_budget_exits_total").values()) == len(IMAGES) + 1


def test_the_default_fraction_and_its_range(tmp_path: Path) -> None:
    assert Settings(artifacts_dir=tmp_path).shadow_fraction == 0.01
    assert Settings(artifacts_dir=tmp_path, shadow_fraction=0).shadow_fraction == 0.0
    for bad in (-0.01, 1.01, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="shadow_fraction"):
            Settings(artifacts_dir=tmp_path, shadow_fraction=bad)


def test_no_drift_control_without_shadow_sampling(synthetic_artifact: Path) -> None:
    with _client(synthetic_artifact, default_budget=GLOBAL, shadow_fraction=0.0) as client:
        service = client.app.state.service  # type: ignore[attr-defined]
        assert service.drift is None and service.scheduler.shadow_sink is None
    with _client(synthetic_artifact, default_budget=GLOBAL) as client:
        service = client.app.state.service  # type: ignore[attr-defined]
        assert service.drift is not None and service.scheduler.shadow_fraction == 0.01
        assert np.isfinite(service.drift.monitor.expectation.early_rate())
