"""Import hygiene (no torch/models/export in the serving process) and settings parsing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.core.knobs import Budget
from service.http.settings import EMBEDDED_MODEL_DIR, Settings
from tests.service.http.conftest import ClientFactory

ROOT = Path(__file__).resolve().parents[3]


def test_service_app_imports_no_torch_models_or_export() -> None:
    code = (
        "import sys, service.http.app, service.commands.serve\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'models', 'export'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == ""


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("BOOSTSERVE_"):
            monkeypatch.delenv(key)
    s = Settings()
    assert s.artifacts_dir == EMBEDDED_MODEL_DIR
    assert (s.host, s.port, s.early_exit, s.admin_token, s.log_format) == (
        "127.0.0.1",
        8000,
        True,
        None,
        "text",
    )
    assert s.default_budget == {"max_accuracy_drop": 0.01}


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOOSTSERVE_PROVIDERS", "cuda, cpu")
    monkeypatch.setenv("BOOSTSERVE_DEFAULT_BUDGET", '{"budget_macs": 1e6}')
    monkeypatch.setenv("BOOSTSERVE_DEFAULT_POLICY", "reference")
    monkeypatch.setenv("BOOSTSERVE_EARLY_EXIT", "false")
    monkeypatch.setenv("BOOSTSERVE_ADMIN_TOKEN", "s3cr3t-value")
    monkeypatch.setenv("BOOSTSERVE_LOG_LEVEL", "DEBUG")
    s = Settings()
    assert s.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert s.budget() == Budget("budget_macs", 1e6, "reference")
    assert s.early_exit is False and s.log_level == "debug"
    assert s.admin_token is not None and s.admin_token.get_secret_value() == "s3cr3t-value"
    assert "s3cr3t" not in repr(s)


@pytest.mark.parametrize(
    ("field", "value", "contains"),
    [
        ("default_budget", "{not json", "must be JSON"),
        ("default_budget", '{"max_exit": 1, "budget_macs": 5}', "give at most one budget knob"),
        ("default_budget", "{}", "give exactly one of budget_macs, max_accuracy_drop, max_exit, thresholds"),
        ("providers", "quantum", "unknown execution provider"),
        ("max_batch_size", "0", "greater than or equal to 1"),
        ("log_format", "xml", "text"),
        ("port", "70000", "65535"),
    ],
)
def test_invalid_settings_have_clear_messages(
    monkeypatch: pytest.MonkeyPatch, field: str, value: str, contains: str
) -> None:
    monkeypatch.setenv(f"BOOSTSERVE_{field.upper()}", value)
    with pytest.raises(ValidationError, match=contains):
        Settings()


def test_serve_fails_fast_on_a_missing_artifact(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "boostserve", "serve", "--artifacts", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 2
    assert "manifest.json" in out.stderr and "Traceback" not in out.stderr


def test_serve_fails_fast_on_a_corrupted_artifact(tmp_path: Path, synthetic_artifact: Path) -> None:
    import shutil

    copy = tmp_path / "artifact"
    shutil.copytree(synthetic_artifact, copy)
    with (copy / "stage_02.onnx").open("ab") as handle:
        handle.write(b"tampered")
    out = subprocess.run(
        [sys.executable, "-m", "boostserve", "serve", "--artifacts", str(copy)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 2
    assert "corrupted" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("setting", "cpus", "on_loop", "inline_ms"),
    [
        ("auto", 1.0, False, 2.0),  # one CPU: short batches on the loop, long ones on the thread
        ("auto", 2.0, False, 0.0),
        ("thread", 1.0, False, 0.0),
        ("loop", 8.0, True, 0.0),
    ],
)
def test_stage_execution_follows_the_usable_cpus(
    monkeypatch: pytest.MonkeyPatch, setting: str, cpus: float, on_loop: bool, inline_ms: float
) -> None:
    import service.http.settings as settings_module

    monkeypatch.setattr(settings_module, "usable_cpus", lambda: cpus)
    settings = Settings(stage_execution=setting)
    assert settings.runs_stages_on_loop() is on_loop
    assert settings.inline_batch_limit_ms() == inline_ms


def test_usable_cpus_reads_the_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from service.http.settings import usable_cpus

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert usable_cpus() == 1.0


def test_gc_freeze_after_start_up(make_client: ClientFactory) -> None:
    import gc

    gc.unfreeze()
    try:
        with make_client(gc_freeze=True):
            frozen = gc.get_freeze_count()
        assert frozen > 10_000  # the app, the engine and every imported module
    finally:
        gc.unfreeze()
    with make_client():  # the tests' default (off): nothing frozen
        assert gc.get_freeze_count() == 0


def test_no_import_cycle_in_service() -> None:
    """Modules of service/ import each other one way only (runtime.py <-> classify_json.py was a cycle)."""
    import grimp

    graph = grimp.build_graph("service")
    modules = sorted(m for m in graph.modules if m.startswith("service"))
    cycles = []
    for module in modules:
        for imported in graph.find_modules_directly_imported_by(module):
            if imported.startswith("service") and graph.chain_exists(importer=imported, imported=module):
                cycles.append((module, imported))
    assert cycles == []


@pytest.mark.parametrize(("raw", "value"), [("true", True), ("FALSE", False), ("1", True), ("0", False)])
def test_the_early_exit_setting_takes_the_knob_spellings(
    monkeypatch: pytest.MonkeyPatch, raw: str, value: bool
) -> None:
    monkeypatch.setenv("BOOSTSERVE_EARLY_EXIT", raw)
    assert Settings().early_exit is value


def test_the_early_exit_setting_refuses_what_requests_refuse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOOSTSERVE_EARLY_EXIT", "yes")
    with pytest.raises(
        ValueError, match=r"early_exit must be a boolean: true or false \(in text also 1 or 0\), got 'yes'"
    ):
        Settings()
