"""The GPU check's CPU-only parts, in the default suite (CI has no GPU).

`scripts/gpu_check.sh --cpu-only` runs every step of the device run on the CPU provider (the CPU
IO-binding path); the time cap, the loud provider failure and the summary's verdict are checked
here too, since on a GPU machine there is no time to find out they do not work.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _script(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GPU_PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_cpu_only_run_writes_every_result(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check"
    proc = _script("--cpu-only", "--out", str(out), "--seconds", "200")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["passed"] is True and summary["device"] == "cpu"
    assert [s["step"] for s in summary["steps"]] == ["install", "providers", "gpu-tests", "engine"]
    assert all(s["rc"] == 0 for s in summary["steps"])
    tests = summary["gpu_tests"]
    assert tests["tests"] >= 5 and tests["failures"] == tests["errors"] == tests["skipped"] == 0
    providers = json.loads((out / "providers.json").read_text())
    assert providers["session_providers"] == ["CPUExecutionProvider"] and providers["every_stage_on_device"]
    engine = json.loads((out / "engine.json").read_text())
    assert engine["runs"] == ["cpu-dry", "cpu"] and set(engine["results"]) == {"cpu-dry", "cpu"}
    assert not engine["missing"]
    for body in engine["results"].values():
        assert {(c["batch_size"], c["mode"]) for c in body["cells"]} == {
            (b, m) for b in gpu_check.DRY_BATCH_SIZES for m in ("early_exit", "all_stages", "full_onnx")
        }
    assert [row["batch_size"] for row in engine["comparison"]] == list(gpu_check.DRY_BATCH_SIZES)
    assert all(row["device_early_exit_vs_device_full_onnx"] > 0 for row in engine["comparison"])
    parity = engine["device_parity"]
    assert parity["io_binding"] == "cpu" and parity["exit_mismatches"] == 0
    assert all(e["label_mismatches"] == 0 and e["max_abs_logit_diff"] == 0 for e in parity["per_exit"])
    assert "| batch |" in (out / "engine.md").read_text() and "PASSED" in (out / "summary.md").read_text()
    for name in ("providers", "gpu-tests", "engine"):
        assert (out / "logs" / f"{name}.log").is_file()


def test_time_cap_leaves_a_failed_summary(tmp_path: Path) -> None:
    """No time for any step: each is recorded as not run, and the summary still says FAILED."""
    out = tmp_path / "capped"
    proc = _script("--cpu-only", "--out", str(out), "--seconds", "26", timeout=60)
    assert proc.returncode == 1, proc.stderr[-2000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["passed"] is False
    assert [(s["step"], s["rc"]) for s in summary["steps"]] == [
        ("install", 0),
        ("providers", 124),
        ("gpu-tests", 124),
        ("engine", 124),
    ]
    assert "FAILED" in (out / "summary.md").read_text()


@pytest.mark.parametrize("args", [["--bogus"], ["--seconds", "soon"]])
def test_bad_arguments_are_refused(args: list[str], tmp_path: Path) -> None:
    proc = _script(*args, "--out", str(tmp_path / "x"), timeout=30)
    assert proc.returncode == 64 and "gpu_check:" in proc.stderr


def test_missing_cuda_fails_loudly(tmp_path: Path) -> None:
    """Asking for CUDA where ONNX Runtime falls back to CPU is exit 2 with the providers in use."""
    import onnxruntime as ort

    if gpu_check.CUDA in ort.get_available_providers():
        pytest.skip("this machine has a CUDA build of onnxruntime")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "providers", "--device", "cuda", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert "FAIL: CUDAExecutionProvider is not what the sessions run on" in proc.stderr
    report = json.loads((tmp_path / "providers.json").read_text())
    assert report["every_stage_on_device"] is False and gpu_check.CUDA not in report["session_providers"]


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available provider names")
def test_engine_on_a_cuda_fallback_stops_before_measuring(tmp_path: Path) -> None:
    """No CPU numbers under a CUDA label: exit 2 at once, the reason in engine.json."""
    import onnxruntime as ort

    if gpu_check.CUDA in ort.get_available_providers():
        pytest.skip("this machine has a CUDA build of onnxruntime")
    rc = gpu_check.main(["engine", "--device", "cuda", "--out", str(tmp_path), "--budget", "1", "--quiet"])
    engine = json.loads((tmp_path / "engine.json").read_text())
    assert rc == 2 and engine["results"] == {} and engine["comparison"] == []
    assert set(engine["missing"]) == {"cuda", "cpu"} and "fell back" in engine["missing"]["cuda"]


def _junit(path: Path, *, tests: int, failures: int = 0, skipped: int = 0) -> None:
    cases = "".join(f'<testcase classname="t" name="c{i}"/>' for i in range(tests - skipped - failures))
    cases += "".join(f'<testcase classname="t" name="f{i}"><failure message="x"/></testcase>' for i in range(failures))
    cases += "".join(
        f'<testcase classname="t" name="s{i}"><skipped message="no CUDA"/></testcase>' for i in range(skipped)
    )
    path.write_text(
        f'<testsuites><testsuite name="pytest" tests="{tests}" failures="{failures}" errors="0" '
        f'skipped="{skipped}">{cases}</testsuite></testsuites>'
    )


@pytest.mark.parametrize(
    ("steps", "junit", "passed"),
    [
        ("install\t0\t1\t\nproviders\t0\t1\t\n", {"tests": 5}, True),
        ("install\t0\t1\t\nproviders\t2\t1\tno CUDA\n", {"tests": 5}, False),
        ("install\t0\t1\t\n", {"tests": 5, "skipped": 5}, False),  # skipped gpu tests are no pass
        ("install\t0\t1\t\n", {"tests": 5, "failures": 1}, False),
        ("install\t0\t1\t\n", {"tests": 0}, False),
        ("install\t0\t1\t\n", None, False),
        ("", {"tests": 5}, False),
    ],
)
def test_summary_passes_only_when_every_step_and_test_passed(
    tmp_path: Path, steps: str, junit: dict[str, int] | None, passed: bool
) -> None:
    (tmp_path / "steps.tsv").write_text(steps)
    if junit is not None:
        _junit(tmp_path / "pytest-gpu.xml", **junit)
    rc = gpu_check.main(["summary", "--out", str(tmp_path), "--device", "cuda"])
    assert rc == (0 if passed else 1)
    assert json.loads((tmp_path / "gpu_check.json").read_text())["passed"] is passed


def test_script_is_shellcheck_clean() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout
