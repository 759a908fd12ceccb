"""Issue 15 item 9: settings that would make the server unusable are refused at start (exit 2).

Each case runs the real `boostserve serve` with one BOOSTSERVE_* variable out of range and checks
the exit code and that stderr is exactly one line naming the variable (no traceback). The
artifact path does not exist for the range cases: the settings must be refused before the
artifact is even looked at, so a missing bound shows up as the artifact's message instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.http.settings import MAX_THREADS, Settings

ROOT = Path(__file__).resolve().parents[3]


def _serve(artifacts: Path, **env_settings: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOOSTSERVE_")}
    env.update({f"BOOSTSERVE_{k.upper()}": v for k, v in env_settings.items()})
    return subprocess.run(
        [sys.executable, "-m", "boostserve", "serve", "--artifacts", str(artifacts), "--port", "0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("intra_op_threads", "100000", f"less than or equal to {MAX_THREADS}"),
        ("inter_op_threads", str(MAX_THREADS + 1), f"less than or equal to {MAX_THREADS}"),
        ("request_timeout_s", "1e-9", "greater than or equal to 0.01"),
        ("request_timeout_s", "3601", "less than or equal to 3600"),
        ("shutdown_grace_s", "601", "less than or equal to 600"),
        ("max_body_bytes", str(256 * 1024 * 1024 + 1), "less than or equal to 268435456"),
        ("max_queue", "65537", "less than or equal to 65536"),
        ("max_image_pixels", str((1 << 31) + 1), "less than or equal to 2147483648"),
        ("limit_concurrency", "0", "greater than or equal to 1"),
        ("keep_alive_s", "301", "less than or equal to 300"),
        ("max_header_bytes", str(1024 * 1024 + 1), "less than or equal to 1048576"),
        ("header_timeout_s", "0.01", "greater than or equal to 0.1"),
        ("body_timeout_s", "3601", "less than or equal to 3600"),
    ],
)
def test_out_of_range_setting_exits_2_with_one_line(tmp_path: Path, field: str, value: str, reason: str) -> None:
    out = _serve(tmp_path / "no-artifact", **{field: value})
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert (
        lines[0]
        == f"boostserve serve: invalid settings: BOOSTSERVE_{field.upper()}={value!r}: Input should be {reason}"
    )


def test_pixel_limit_below_the_model_input_exits_2(synthetic_artifact: Path) -> None:
    from service.core.artifact import load_manifest

    spec = load_manifest(synthetic_artifact, verify=False).preprocessing
    pixels = spec.height * spec.width
    out = _serve(synthetic_artifact, max_image_pixels="1")
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [
        f"boostserve serve: invalid settings: BOOSTSERVE_MAX_IMAGE_PIXELS=1 is below the model's input "
        f"{spec.height}x{spec.width} = {pixels} pixels: every image would be refused"
    ]


def test_several_errors_stay_on_one_line(tmp_path: Path) -> None:
    out = _serve(tmp_path / "no-artifact", intra_op_threads="-1", default_budget="{}")
    assert out.returncode == 2
    assert len(out.stderr.splitlines()) == 1, out.stderr
    assert "BOOSTSERVE_INTRA_OP_THREADS='-1'" in out.stderr and "BOOSTSERVE_DEFAULT_BUDGET='{}'" in out.stderr
    assert "Traceback" not in out.stderr


def test_bounds_are_inclusive() -> None:
    s = Settings(
        intra_op_threads=MAX_THREADS,
        inter_op_threads=MAX_THREADS,
        request_timeout_s=0.01,
        shutdown_grace_s=600,
        max_queue=65536,
        max_body_bytes=256 * 1024 * 1024,
        max_image_pixels=1 << 31,
    )
    assert s.intra_op_threads == MAX_THREADS
    s.check_model_input(28, 28)
    with pytest.raises(ValueError, match="below the model's input 28x28 = 784 pixels"):
        Settings(max_image_pixels=783).check_model_input(28, 28)
    Settings(max_image_pixels=784).check_model_input(28, 28)
    with pytest.raises(ValidationError):
        Settings(request_timeout_s=0.0099)
