#!/usr/bin/env bash
# Reproduce the embedded default model from scratch on this machine (`make model`):
#   1. train compact-fashion-mnist with boosting (t=0.5) and the t=0 baseline (same seed/epochs),
#   2. export + calibrate both through the serving engine,
#   3. install them: service/embedded_model/ (served by default) and docs/artifacts/baseline/,
#      and its int8 version service/embedded_model_int8/ (`boostserve quantize`: int8 where measured faster),
#   4. regenerate the report (docs/results/) and the README's results block
# SKIP_TRAIN=1 reuses existing runs/ checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-/usr/share/datasets/fashion-mnist}
BIN=.venv/bin
[ "${SKIP_TRAIN:-0}" = 1 ] || bash scripts/train_compact_fmnist.sh

staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
$BIN/boostserve export --checkpoint runs/compact-fmnist-t05/checkpoint.pt --data "$DATA" \
  --out "$staging/boostnet" --name compact-fashion-mnist-boostnet
$BIN/boostserve export --checkpoint runs/compact-fmnist-t0/checkpoint.pt --data "$DATA" \
  --out "$staging/baseline" --name compact-fashion-mnist-baseline-t0

$BIN/boostserve quantize --artifacts "$staging/boostnet" --out "$staging/boostnet_int8" --data "$DATA"

rm -rf service/embedded_model service/embedded_model_int8 docs/artifacts/baseline
mkdir -p docs/artifacts
cp -r "$staging/boostnet" service/embedded_model
cp -r "$staging/boostnet_int8" service/embedded_model_int8
cp -r "$staging/baseline" docs/artifacts/baseline

$BIN/boostserve report --artifacts service/embedded_model --label "BoostNet t=0.5" \
  --artifacts service/embedded_model_int8 --label "BoostNet t=0.5 int8" \
  --artifacts docs/artifacts/baseline --label "baseline t=0" --data "$DATA" --out docs/results
$BIN/python scripts/render_readme.py
# docs/policies.md quotes the coverage experiment: `boostserve bench --suite offline --publish` reruns it.
echo "embedded model: $(du -sh service/embedded_model | cut -f1) in service/embedded_model"
