"""A real Prometheus scrapes a real `boostserve serve`; every dashboard and rule expression is evaluated.

Default suite (about 20-25 s on a 2-core machine). Everything is on 127.0.0.1 and bounded:
1. a synthetic artifact (tests/fixtures/synthetic_artifact.py) served by `python -m boostserve serve`;
2. Debian's `prometheus` with a 1 s scrape/evaluation interval and deploy/prometheus/alerts.yml;
3. a fixed amount of traffic: valid PNGs (several threads, so stage batches form), a few invalid bodies
   (error series), one unsupported media type;
4. each PromQL expression of deploy/grafana/dashboards/boostserve.json (Grafana variables substituted)
   and of alerts.yml goes through /api/v1/query: it must not error, and must return data unless listed
   in ALLOWED_EMPTY with the reason. Alert expressions are legitimately empty while their condition is
   false, so for each alert the underlying quantity (ALERT_UNDERLYING) must return data instead.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.server import free_port as _free_port
from tests.deploy.conftest import REPO, load_deploy_module, require_tool

RULES_FILE = REPO / "deploy" / "prometheus" / "alerts.yml"
NUM_STAGES = 3
IMAGE_SIZE = 8

#: alert name -> the quantity its condition is about (must return data after the traffic).
ALERT_UNDERLYING = {
    "BoostserveTargetDown": 'up{job="boostserve"}',
    "BoostserveNotReady": "boostserve_ready",
    "BoostserveNoReadyReplica": "sum(boostserve_ready)",
    "BoostserveHighErrorRatio": "boostserve:request_error_ratio:rate5m",
    "BoostserveOverloaded": "boostserve:request_overload_ratio:rate5m",
    "BoostserveHighP99Latency": "boostserve:classify_latency_seconds:p99_rate5m",
    "BoostserveExitDistributionDrift": "boostserve:global_exit_mix_tvd:rate15m",
    "BoostserveBudgetNotHeld": "boostserve:image_macs_budget_ratio:rate15m",
    "BoostserveShadowDisagreementDrift": "boostserve_shadow_expected_early_disagreement",
    "BoostserveDriftTightened": "boostserve_drift_tightening_level",
}
#: alerts whose condition must be false for a healthy, lightly loaded service.
ALERTS_FALSE_WHEN_HEALTHY = {
    "BoostserveTargetDown",
    "BoostserveNotReady",
    "BoostserveNoReadyReplica",
    "BoostserveHighErrorRatio",
    "BoostserveOverloaded",
    # guarded by a minimum of 500 images in 15 minutes; the test sends fewer
    "BoostserveExitDistributionDrift",
    "BoostserveBudgetNotHeld",
    # fewer shadow samples than one drift window (z is NaN), and nothing tightened
    "BoostserveShadowDisagreementDrift",
    "BoostserveDriftTightened",
}
#: dashboard/rule expressions allowed to return no series, with the reason.
ALLOWED_EMPTY: dict[str, str] = {}
#: expressions whose value may be NaN (0/0 or an empty histogram window) though series exist.
NAN_OK = {
    # quantile of stages that answered no image in the window is NaN; other stages have values
    "Exit confidence p50 by stage [exit {{stage}}]": "stages without exits",
    "Drift test and tightening [drift z]": "no drift window (1000 shadow samples) completes in this test",
    # exits the calibration sends no held-out image to have no calibrated rate
    "Shadow disagreement vs calibration [calibrated {{bound}} exit {{stage}}]": "exits without held-out images",
    # the stack runs without a latency target: SLO mode's gauges stay NaN
    "Answered p99 vs shed limit [answered p99]": "SLO mode off in this test",
    "Answered p99 vs shed limit [shed limit]": "SLO mode off in this test",
}


def _wait(what: str, check: Any, timeout: float, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (httpx.HTTPError, OSError, ValueError) as exc:
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"{what}: not reached in {timeout}s (last: {last!r})")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _png(seed: int) -> bytes:
    from PIL import Image

    # Pixel patterns from flat to high-contrast, so images leave at different exits.
    values = [((x * (seed % 7 + 1) * 37 + y * (seed % 5) * 53 + seed * 11) % 256) for y in range(8) for x in range(8)]
    img = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE))
    img.putdata(values)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Stack:
    service_url: str
    prom_url: str
    service_port: int
    classified: int
    log_dir: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.prom_url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            raise AssertionError(f"query failed ({response.status_code}): {expr}\n{json.dumps(body)[:500]}")
        assert body["data"]["resultType"] == "vector", body["data"]["resultType"]
        return list(body["data"]["result"])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus = require_tool("prometheus", "apt-get install prometheus")
    pytest.importorskip("onnx", reason="the synthetic artifact needs onnx (train extra)")
    from tests.fixtures.synthetic_artifact import build_synthetic_artifact

    tmp = tmp_path_factory.mktemp("prom-live")
    artifact = tmp / "artifact"
    build_synthetic_artifact(
        artifact, num_stages=NUM_STAGES, height=IMAGE_SIZE, width=IMAGE_SIZE, channels=1, logit_scale=2.0
    )

    port, prom_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOOSTSERVE_")}
    # Every early exit shadow-sampled, and a global budget that exits at every stage (the default drop
    # certifies only the full network on this small calibration), so the shadow series have data.
    env.update(PYTHONUNBUFFERED="1", BOOSTSERVE_MAX_BATCH_WAIT_MS="5", BOOSTSERVE_SHADOW_FRACTION="1")
    env["BOOSTSERVE_DEFAULT_BUDGET"] = '{"thresholds": [0.5, 0.6, 0]}'
    cmd = [sys.executable, "-m", "boostserve", "serve", "--artifacts", str(artifact)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    with (tmp / "service.log").open("wb") as log:
        service = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {RULES_FILE}\n"
        "scrape_configs:\n  - job_name: boostserve\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{port}']\n"
    )
    prom_cmd = [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}"]
    prom_cmd += [f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"]
    with (tmp / "prometheus.log").open("wb") as log:
        prom = subprocess.Popen(prom_cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    service_url, prom_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{prom_port}"
    try:

        def service_ready() -> bool:
            if service.poll() is not None:
                raise RuntimeError("service exited:\n" + (tmp / "service.log").read_text()[-3000:])
            return httpx.get(f"{service_url}/readyz", timeout=2).status_code == 200

        _wait("service ready", service_ready, 60)
        _wait("prometheus ready", lambda: httpx.get(f"{prom_url}/-/ready", timeout=2).status_code == 200, 30)
        stack = Stack(service_url, prom_url, port, 160, tmp)
        # Traffic only after the first scrape: rate() needs a sample from before the counters moved.
        _wait("first scrape", lambda: stack.query('boostserve_ready{job="boostserve"} == 1'), 30)

        # Bounded traffic: 160 valid images over 4 threads, 6 invalid bodies, 1 wrong media type.
        def classify(seed: int) -> int:
            r = httpx.post(
                f"{service_url}/v1/classify",
                content=_png(seed),
                headers={"content-type": "image/png"},
                timeout=10,
            )
            return r.status_code

        with ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(classify, range(160)))
        assert statuses.count(200) == 160, statuses
        for i in range(6):
            r = httpx.post(f"{service_url}/v1/classify", content=b"not a png %d" % i,
                           headers={"content-type": "image/png"}, timeout=10)  # fmt: skip
            assert 400 <= r.status_code < 500, r.status_code
        r = httpx.post(f"{service_url}/v1/classify", content=b"x", headers={"content-type": "text/plain"}, timeout=10)
        assert r.status_code in (400, 415), r.status_code

        # Prometheus has scraped the final counters and evaluated the rules on them.
        _wait(
            "images scraped",
            lambda: [s for s in stack.query("sum(boostserve_images_total)") if float(s["value"][1]) >= 160],
            30,
        )
        _wait("recording rules evaluated", lambda: stack.query("boostserve:image_macs:avg_rate15m > 0"), 20)
        yield stack
    finally:
        _stop(prom)
        _stop(service)


def _finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(s["value"][1])) for s in result)


def test_prometheus_scrapes_the_service(stack: Stack) -> None:
    targets = httpx.get(f"{stack.prom_url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    assert [t["health"] for t in targets] == ["up"], targets


def test_rules_load_and_evaluate_without_errors(stack: Stack) -> None:
    groups = httpx.get(f"{stack.prom_url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    promql = load_deploy_module("promql_exprs")
    assert len(rules) == len(promql.rule_exprs())
    bad = {r["name"]: r.get("lastError") for r in rules if r.get("health") != "ok"}
    assert not bad, bad


def test_every_dashboard_expression_returns_data(stack: Stack) -> None:
    promql = load_deploy_module("promql_exprs")
    stages = stack.query("boostserve_model_info")[0]["metric"]["stages"]
    assert stages == str(NUM_STAGES)
    failures = []
    for e in promql.dashboard_exprs({"last_stage": stages, "__rate_interval": "1m"}):
        result = stack.query(e.expr)
        if not result and e.name not in ALLOWED_EMPTY:
            failures.append(f"empty: {e.name}: {e.expr}")
        elif result and not _finite(result) and e.name not in NAN_OK:
            failures.append(f"only NaN/inf: {e.name}: {e.expr} -> {result}")
    assert not failures, "\n".join(failures)


def test_dashboard_variable_queries_have_values(stack: Stack) -> None:
    promql = load_deploy_module("promql_exprs")
    for var in promql.dashboard_variable_queries():
        metric, label = var.expr.removeprefix("label_values(").removesuffix(")").split(", ")
        url = f"{stack.prom_url}/api/v1/label/{label}/values"
        values = httpx.get(url, params={"match[]": metric}, timeout=10).json()["data"]
        assert values, f"variable {var.name}: {var.expr} has no values"


def test_every_recording_rule_returns_data(stack: Stack) -> None:
    promql = load_deploy_module("promql_exprs")
    failures = []
    for e in promql.rule_exprs():
        if e.source != "record":
            continue
        direct, recorded = stack.query(e.expr), stack.query(e.name)
        if not direct or not recorded:
            failures.append(f"{e.name}: expr {len(direct)} series, recorded {len(recorded)} series")
        elif not _finite(direct):
            failures.append(f"{e.name}: only NaN/inf {direct}")
    assert not failures, "\n".join(failures)


def test_every_alert_evaluates_and_its_quantity_has_data(stack: Stack) -> None:
    promql = load_deploy_module("promql_exprs")
    alerts = {e.name: e.expr for e in promql.rule_exprs() if e.source == "alert"}
    assert set(alerts) == set(ALERT_UNDERLYING), "every alert needs an entry in ALERT_UNDERLYING"
    failures = []
    for name, expr in alerts.items():
        firing = stack.query(expr)  # may be empty: the condition is false
        if name in ALERTS_FALSE_WHEN_HEALTHY and firing:
            failures.append(f"{name} would fire on a healthy service: {firing}")
        underlying = stack.query(ALERT_UNDERLYING[name])
        if not underlying or not _finite(underlying):
            failures.append(f"{name}: underlying {ALERT_UNDERLYING[name]} -> {underlying}")
    assert not failures, "\n".join(failures)


def test_exit_share_matches_counts(stack: Stack) -> None:
    """The share per stage adds up to 1 and the calibrated fractions exist for every stage."""
    shares = stack.query("boostserve:exit_share:rate15m")
    assert {s["metric"]["stage"] for s in shares} == {str(k) for k in range(1, NUM_STAGES + 1)}
    assert math.isclose(sum(float(s["value"][1]) for s in shares), 1.0, rel_tol=1e-6)
    calibrated = stack.query("boostserve_calibrated_exit_fraction")
    assert len(calibrated) == NUM_STAGES
