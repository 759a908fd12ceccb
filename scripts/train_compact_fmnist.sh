#!/usr/bin/env bash
# Train compact-fashion-mnist with boosting (t=0.5) and the joint-training baseline (t=0),
# same seed and epochs, one after the other, 2 threads each. Outputs in runs/compact-fmnist-t05 and -t0.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-/usr/share/datasets/fashion-mnist}
for T in 05 0; do
  t=$([ "$T" = 05 ] && echo 0.5 || echo 0)
  .venv/bin/boostserve train --config compact-fashion-mnist --data "$DATA" --out "runs/compact-fmnist-t$T" \
    --t "$t" --seed 0 --threads 2 --quiet
done
