"""Every PromQL expression of the Grafana dashboard and the Prometheus rules, in one place.

    python deploy/promql_exprs.py check   # names vs docs/architecture.md, PromQL syntax (promtool)
    python deploy/promql_exprs.py list    # print every expression (variables substituted)
    python deploy/promql_exprs.py prometheusrule > deploy/k8s/monitoring/prometheusrule.yaml

Shared by deploy/verify_static.sh and the tests in tests/deploy/ (the live test evaluates each
expression against a real Prometheus scraping a running service).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent
REPO = DEPLOY.parent
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "boostserve.json"
RULES = DEPLOY / "prometheus" / "alerts.yml"
ARCHITECTURE = REPO / "docs" / "architecture.md"

#: Grafana variables -> values that make the expression valid PromQL outside Grafana. The live test
#: overrides `last_stage` with the served model's number of exits.
DEFAULT_VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
    "instance": ".*",
    "last_stage": "3",
    "datasource": "prometheus",
}


@dataclass(frozen=True)
class Expr:
    source: str  # "dashboard" | "record" | "alert"
    name: str  # panel title + legend, record name or alert name
    expr: str


def substitute(expr: str, variables: dict[str, str]) -> str:
    def repl(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            raise KeyError(f"unknown dashboard variable ${name} in {expr!r}")
        return variables[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", repl, expr)


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in panels:
        out.append(panel)
        out.extend(_panels(panel.get("panels", [])))
    return out


def dashboard_exprs(variables: dict[str, str] | None = None) -> list[Expr]:
    values = {**DEFAULT_VARIABLES, **(variables or {})}
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in _panels(dash["panels"]):
        for target in panel.get("targets", []):
            legend = target.get("legendFormat") or target.get("refId", "")
            out.append(Expr("dashboard", f"{panel['title']} [{legend}]", substitute(target["expr"], values)))
    return out


def dashboard_variable_queries() -> list[Expr]:
    """Template variable queries such as label_values(boostserve_ready, instance)."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            out.append(Expr("variable", var["name"], query))
    return out


def rule_exprs() -> list[Expr]:
    rules = yaml.safe_load(RULES.read_text())
    out = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                out.append(Expr("record", rule["record"], rule["expr"].strip()))
            else:
                out.append(Expr("alert", rule["alert"], rule["expr"].strip()))
    return out


def documented_metrics() -> dict[str, str]:
    """Metric name -> type, from the METRICS table of docs/architecture.md."""
    rows = re.findall(r"^\|\s*(boostserve_[a-z0-9_]+)\s*\|\s*([a-z]+)", ARCHITECTURE.read_text(), flags=re.M)
    if not rows:
        raise RuntimeError(f"no metrics table found in {ARCHITECTURE}")
    return dict(rows)


def undocumented_names(exprs: list[Expr]) -> list[str]:
    """`boostserve_*` series used in expressions that the architecture table does not declare."""
    documented = documented_metrics()
    histograms = {n for n, kind in documented.items() if kind == "histogram"}
    problems = []
    for e in exprs:
        for name in set(re.findall(r"\bboostserve_[a-z0-9_]+", e.expr)):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if name in documented or (base in histograms and base != name):
                continue
            problems.append(f"{e.source} {e.name!r}: {name} is not in the metrics table of docs/architecture.md")
    return problems


def promtool_syntax_errors(exprs: list[Expr]) -> list[str]:
    """Parse every expression with promtool (as recording rules in a scratch file)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        raise FileNotFoundError("promtool not found (Debian package prometheus)")
    rules = {"groups": [{"name": "syntax", "rules": [
        {"record": f"check:expr_{i}", "expr": e.expr} for i, e in enumerate(exprs)]}]}  # fmt: skip
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as fh:
        yaml.safe_dump(rules, fh)
        tmp = fh.name
    try:
        out = subprocess.run([promtool, "check", "rules", tmp], capture_output=True, text=True, timeout=60)
    finally:
        Path(tmp).unlink(missing_ok=True)
    if out.returncode == 0:
        return []
    text = out.stdout + out.stderr
    for i, e in enumerate(exprs):
        text = text.replace(f"check:expr_{i}", f"{e.source} {e.name!r}")
    return [text]


def dashboard_structure_errors() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    errors = []
    panels = _panels(dash["panels"])
    ids = [p["id"] for p in panels]
    if len(ids) != len(set(ids)):
        errors.append("duplicate panel ids")
    for p in panels:
        if p["type"] == "row":
            continue
        if not p.get("targets"):
            errors.append(f"panel {p['title']!r} has no targets")
        for t in p.get("targets", []):
            if not t.get("expr"):
                errors.append(f"panel {p['title']!r} target {t.get('refId')} has no expr")
    if dash.get("uid") != "boostserve":
        errors.append("dashboard uid must be 'boostserve' (links in docs/deploy.md)")
    return errors


def prometheus_rule_yaml() -> str:
    """deploy/prometheus/alerts.yml wrapped as a Prometheus-operator PrometheusRule (same groups)."""
    rules = yaml.safe_load(RULES.read_text())
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "boostserve"},
        "spec": {"groups": rules["groups"]},
    }
    header = (
        "# GENERATED from deploy/prometheus/alerts.yml by `python deploy/promql_exprs.py prometheusrule`;\n"
        "# do not edit (tests/deploy/test_static.py checks that it is in sync).\n"
    )

    class Dumper(yaml.SafeDumper):
        pass

    def block(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, block)
    return header + yaml.dump(doc, Dumper=Dumper, sort_keys=False, width=1000)


def main(argv: list[str]) -> int:
    if argv[:1] == ["prometheusrule"]:
        sys.stdout.write(prometheus_rule_yaml())
        return 0
    exprs = dashboard_exprs() + rule_exprs()
    if argv[:1] == ["list"]:
        for e in exprs + dashboard_variable_queries():
            print(f"{e.source:9} {e.name}\n          {' '.join(e.expr.split())}")
        return 0
    errors = dashboard_structure_errors() + undocumented_names(exprs) + promtool_syntax_errors(dashboard_exprs())
    for err in errors:
        print(f"ERROR {err}", file=sys.stderr)
    print(
        f"promql: {len(exprs)} expressions ({len(dashboard_exprs())} dashboard, {len(rule_exprs())} rules): "
        + ("OK" if not errors else f"{len(errors)} error(s)")
    )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
