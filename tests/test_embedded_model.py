"""Issue 5: the embedded default model, end to end through a real server.

`boostserve serve` with no --artifacts serves `service/embedded_model/`. The sample PNGs in
examples/images are Fashion-MNIST test images; for each one the calibration arrays stored at export
(test_confidence / test_correct, same test-split order) tell which exit the default budget takes and
whether the model is right there. The served answers must reproduce that exactly: same exit, and
the true label wherever the report says the model is right.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.server import free_port, wait_until_ready
from service.core.artifact import load_calibration, load_manifest
from service.core.budget import BudgetResolver
from service.core.knobs import Budget
from service.http.settings import EMBEDDED_MODEL_DIR, Settings

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "examples" / "images"


def expected_answers() -> dict[str, tuple[int, bool, int]]:
    """file name -> (1-based exit under the default budget, correct there?, true label)."""
    manifest = load_manifest(EMBEDDED_MODEL_DIR)
    resolver = BudgetResolver(manifest, load_calibration(EMBEDDED_MODEL_DIR, manifest, "heldout"))
    thresholds = resolver.resolve(Budget.parse(Settings().default_budget)).as_array()
    test = load_calibration(EMBEDDED_MODEL_DIR, manifest, "test")
    answers: dict[str, tuple[int, bool, int]] = {}
    for name, info in json.loads((SAMPLES / "labels.json").read_text()).items():
        i = int(info["test_index"])
        exits = np.flatnonzero(test.confidence[:, i] >= thresholds)
        k = int(exits[0]) if exits.size and exits[0] < manifest.num_stages else manifest.num_stages - 1
        answers[name] = (k + 1, bool(test.correct[k, i]), int(info["label"]))
    return answers


def test_readme_results_are_generated_from_the_shipped_artifacts() -> None:
    check = subprocess.run(
        [sys.executable, "scripts/render_readme.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert check.returncode == 0, "README results/config blocks are stale: run `python scripts/render_readme.py`"


def test_embedded_model_serves_the_samples_like_the_report() -> None:
    answers = expected_answers()
    assert sum(correct for _, correct, _ in answers.values()) >= 8, "the report says most samples are right"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOOSTSERVE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "boostserve", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_until_ready(f"{base}/readyz", proc, 60), "server did not become ready"
        served: dict[str, dict[str, object]] = {}
        for name in sorted(answers):
            response = httpx.post(
                f"{base}/v1/classify",
                content=(SAMPLES / name).read_bytes(),
                headers={"Content-Type": "image/png"},
                timeout=10,
            )
            assert response.status_code == 200, response.text
            served[name] = response.json()["results"][0]
        for name, (exit_, correct, label) in answers.items():
            assert served[name]["exit"] == exit_, (name, served[name])
            if correct:
                assert served[name]["label"] == label, (name, served[name])
        metrics = httpx.get(f"{base}/metrics", timeout=5).text
        exits = {
            sample.labels["stage"]: sample.value
            for family in text_string_to_metric_families(metrics)
            for sample in family.samples
            if sample.name == "boostserve_exits_total"
        }
        expected = {str(s): float(sum(e == s for e, _, _ in answers.values())) for s in range(1, 5)}
        assert {k: v for k, v in exits.items() if v} == {k: v for k, v in expected.items() if v}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
