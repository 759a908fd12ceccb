"""Helpers for the deployment checks: find the tools, load the deploy/ helper modules.

A missing tool skips its test with the reason printed, except under CI (CI=true), where .ci/run and
the dev extra install every tool, so a missing one is a failure rather than a silent skip.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
VENV_BIN = Path(sys.executable).parent


def find_tool(name: str) -> str | None:
    """The tool from the running venv (pip-installed: hadolint, kubectl, kubernetes-validate), else PATH."""
    local = VENV_BIN / name
    if local.exists():
        return str(local)
    return shutil.which(name)


def require_tool(name: str, how: str) -> str:
    path = find_tool(name)
    if path is None:
        reason = f"{name} not installed ({how})"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{reason}; CI installs it, so this is a setup error")
        pytest.skip(reason)
    return path


def load_deploy_module(name: str) -> ModuleType:
    """Import deploy/<name>.py (deploy/ is scripts, not a package)."""
    path = DEPLOY / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"boostserve_deploy_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
