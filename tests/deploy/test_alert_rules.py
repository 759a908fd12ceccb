"""The drift alerts behave as documented on synthetic series: `promtool test rules` on
deploy/prometheus/alerts_test.yml (exit-mix drift fires on a drifted mix at volume, not on the
calibrated mix nor below the volume guard; the shadow drift and tightening alerts fire on their
gauges and not before)."""

from __future__ import annotations

import subprocess

from tests.deploy.conftest import DEPLOY, require_tool


def test_promtool_unit_tests_of_the_drift_alerts() -> None:
    promtool = require_tool("promtool", "apt-get install prometheus")
    out = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"],
        cwd=DEPLOY / "prometheus",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout
