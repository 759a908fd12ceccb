#!/usr/bin/env bash
# The GPU check (`make gpu-check`; docs/gpu.md): from a clean clone, in at most GPU_CHECK_SECONDS
# (default 470 s, under 8 minutes) even when a step hangs or fails, and always writing what it has:
#
#   env        nvidia-smi's view of the GPU
#   install    .[gpu] (onnxruntime-gpu), pytest and onnx in its own venv (GPU_VENV, default build/gpu-venv);
#              the base interpreter's packages stay visible behind it (CUDA libraries, numpy, ...),
#              so an offline GPU image needs only what it lacks, from GPU_WHEELS
#   cuda-libs  the CUDA/cuDNN libraries of pip's nvidia-* packages on LD_LIBRARY_PATH, and ldd of
#              ONNX Runtime's CUDA provider: which library it cannot find, if any
#   providers  session.get_providers() of every stage must hold CUDAExecutionProvider (fails loudly)
#   gpu-tests  pytest -m gpu tests/gpu (IO binding on the device; junit XML)
#   engine     bench.gpu_check engine: CUDA vs CPU, batch 1-256, early exit vs full ORT (JSON + md + PNG)
#   summary    gpu_check.json + summary.md; exit code 0 only if every step passed
#
# Results go to OUT (default results/gpu-check): steps.tsv, logs/<step>.log, providers.json,
# pytest-gpu.xml, engine.json, engine.md, engine.png, gpu_check.json, summary.md.
#
# Usage: scripts/gpu_check.sh [--cpu-only] [--out DIR] [--seconds N] [--wheels DIR] [--data DIR]
#        scripts/gpu_check.sh --fetch-wheels DIR   (on a machine with an index: wheels for an offline one)
#   --cpu-only  the same steps on the CPU provider (CPU IO-binding path) in the current environment
#               (GPU_PYTHON, default .venv/bin/python), no venv, no GPU: seconds; what CI runs.
# Environment: GPU_PYTHON (base interpreter, default python3), GPU_VENV, GPU_WHEELS, GPU_CHECK_SECONDS,
#              GPU_WHEEL_PYTHON / GPU_WHEEL_PLATFORMS (for --fetch-wheels: default 3.12, manylinux x86_64),
#              GPU_WHEEL_SPLIT (e.g. 45M: --fetch-wheels splits larger wheels; install joins the parts).
# shellcheck disable=SC2317  # the step functions run indirectly (exported, through timeout bash -c)
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)

OUT=results/gpu-check
DEVICE=cuda
LIMIT=${GPU_CHECK_SECONDS:-470}
WHEELS=${GPU_WHEELS:-}
DATA=
FETCH=
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-only) DEVICE=cpu ;;
    --out) OUT=$2; shift ;;
    --seconds) LIMIT=$2; shift ;;
    --wheels) WHEELS=$2; shift ;;
    --data) DATA=$2; shift ;;
    --fetch-wheels) FETCH=$2; shift ;;
    -h | --help) awk 'NR > 1 && /^#/ && !/shellcheck/ { sub(/^# ?/, ""); print } /^set /{ exit }' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 64 ;;
  esac
  shift
done
case "$LIMIT" in '' | *[!0-9]*) echo "gpu_check: --seconds must be a whole number, got '$LIMIT'" >&2; exit 64 ;; esac

# -- wheels for an offline GPU machine -----------------------------------------------------------
if [ -n "$FETCH" ]; then
  PY=${GPU_PYTHON:-python3}
  mkdir -p "$FETCH"
  # The requirements of .[gpu] (read from pyproject.toml), the test runner and the build backend.
  mapfile -t REQS < <("$PY" - <<'EOF'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))
reqs = project["project"]["dependencies"] + project["project"]["optional-dependencies"]["gpu"]
reqs += project["build-system"]["requires"] + ["pytest>=8", "pytest-timeout>=2.3", "onnx>=1.16"]
print("\n".join(reqs))
EOF
  )
  PLATFORM_ARGS=()
  for p in ${GPU_WHEEL_PLATFORMS:-manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any}; do
    PLATFORM_ARGS+=(--platform "$p")
  done
  "$PY" -m pip download --disable-pip-version-check -q --only-binary=:all: --implementation cp \
    --python-version "${GPU_WHEEL_PYTHON:-3.12}" "${PLATFORM_ARGS[@]}" -d "$FETCH" "${REQS[@]}" || exit
  if [ -n "${GPU_WHEEL_SPLIT:-}" ]; then  # e.g. 45M: for transports with a file-size cap; install joins them
    for whl in "$FETCH"/*.whl; do
      if [ "$(stat -c %s "$whl")" -gt "$(numfmt --from=iec "$GPU_WHEEL_SPLIT")" ]; then
        split -b "$GPU_WHEEL_SPLIT" "$whl" "$whl.part-" && rm "$whl" && echo "split $whl"
      fi
    done
  fi
  du -sh "$FETCH"
  exit 0
fi

# -- step plumbing ---------------------------------------------------------------------------------
START=$(date +%s)
RESERVE=25  # seconds kept for the summary, whatever happens before it
mkdir -p "$OUT/logs" || exit 1
OUT=$(cd "$OUT" && pwd)
: >"$OUT/steps.tsv"
rm -f "$OUT"/providers.json "$OUT"/pytest-gpu.xml "$OUT"/engine.* "$OUT"/gpu_check.json "$OUT"/summary.md

left() { echo $((START + LIMIT - RESERVE - $(date +%s))); }

record() {  # name rc seconds note
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$OUT/steps.tsv"
  echo "== $1: exit $2 after ${3}s${4:+ ($4)}" >&2
}

# step NAME CAP NOTE CMD...: run CMD under min(CAP, time left) seconds, log to logs/NAME.log.
step() {
  local name=$1 cap=$2 note=$3 budget t0 rc
  shift 3
  budget=$(left)
  [ "$budget" -gt "$cap" ] && budget=$cap
  if [ "$budget" -lt 5 ]; then
    record "$name" 124 0 "not run: the time cap was reached"
    return 124
  fi
  t0=$(date +%s)
  echo "== $name (at most ${budget}s): $*" >&2
  # Through bash -c, so that CMD may be one of the exported functions below.
  timeout -k 5 "$budget" bash -c '"$@"' "$name" "$@" >"$OUT/logs/$name.log" 2>&1
  rc=$?
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note="stopped at its ${budget}s cap; $note"
  record "$name" "$rc" $(($(date +%s) - t0)) "$note"
  tail -n 5 "$OUT/logs/$name.log" >&2
  return "$rc"
}

PY=
finish() {
  local rc=1 py=${PY:-python3}
  trap - EXIT INT TERM
  if timeout -k 5 20 "$py" -m bench.gpu_check summary --device "$DEVICE" --out "$OUT" >"$OUT/logs/summary.log" 2>&1; then
    rc=0
  fi
  cat "$OUT/logs/summary.log" >&2
  echo "gpu_check: $([ "$rc" -eq 0 ] && echo PASSED || echo FAILED) in $(($(date +%s) - START))s; results in $OUT" >&2
  exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM

# -- env and install -------------------------------------------------------------------------------
if [ "$DEVICE" = cuda ]; then
  step env 20 "nvidia-smi" bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv && nvidia-smi'

  BASE=${GPU_PYTHON:-python3}
  VENV=${GPU_VENV:-build/gpu-venv}
  PY=$ROOT/$VENV/bin/python
  [ "${VENV#/}" != "$VENV" ] && PY=$VENV/bin/python
  export BASE VENV PY WHEELS OUT
  install_gpu() {
    set -e
    "$BASE" -c 'import sys; assert sys.version_info >= (3, 11), sys.version'
    if [ ! -x "$PY" ]; then
      "$BASE" -m venv --without-pip "$VENV"
    fi
    # The base interpreter's site-packages behind the venv's own (a .pth appends them to sys.path):
    # a GPU image's CUDA libraries, numpy and pytest are used as they are; what the venv installs wins.
    site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    "$BASE" -c 'import site, sys; print("\n".join(p for p in site.getsitepackages() + [site.getusersitepackages()] if p))' \
      >"$site/_gpu_check_base.pth"
    if ! "$PY" -m pip --version >/dev/null 2>&1; then
      "$PY" -m ensurepip -q
    fi
    args=(--disable-pip-version-check -q)
    if [ -n "$WHEELS" ]; then
      args+=(--no-index --find-links "$WHEELS")
      for first in "$WHEELS"/*.whl.part-aa; do  # wheels split by --fetch-wheels (GPU_WHEEL_SPLIT)
        [ -e "$first" ] || continue
        cat "${first%-aa}"-* >"${first%.part-aa}" && echo "joined ${first%.part-aa}"
      done
    fi
    echo "installing .[gpu] into $VENV ${WHEELS:+from $WHEELS }with $("$PY" -m pip --version)"
    # onnx: bench.fullgraph chains the stages into the one full-network session the engine step compares with.
    "$PY" -m pip install "${args[@]}" -e ".[gpu]" "pytest>=8" "pytest-timeout>=2.3" "onnx>=1.16"
    "$PY" -m pip list 2>/dev/null | grep -iE '^(onnxruntime|numpy|pytest|pydantic|nvidia)' || true
  }
  export -f install_gpu
  step install 240 "${WHEELS:+wheels from $WHEELS; }venv $VENV" install_gpu

  cuda_libs() {
    # Every nvidia/*/lib folder on the venv's sys.path (pip's CUDA 13 layout: nvidia/cu13/lib, nvidia/cudnn/lib).
    dirs=$("$PY" -c 'import glob, os, sys
print(":".join(sorted({d for p in sys.path for d in glob.glob(os.path.join(p, "nvidia", "*", "lib")) if os.path.isdir(d)})))')
    echo "LD_LIBRARY_PATH+=$dirs"
    echo "$dirs" >"$OUT/logs/.cuda_lib_dirs"
    provider=$("$PY" -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime_providers_cuda.so"))')
    if [ ! -f "$provider" ]; then
      echo "no $provider: this onnxruntime is not a CUDA build"
      return 3
    fi
    LD_LIBRARY_PATH="$dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ldd "$provider"
    missing=$(LD_LIBRARY_PATH="$dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ldd "$provider" | grep -c 'not found')
    [ "$missing" -eq 0 ] || { echo "$missing libraries of the CUDA provider not found"; return 4; }
  }
  export -f cuda_libs
  step cuda-libs 30 "ldd of libonnxruntime_providers_cuda.so" cuda_libs
  if [ -s "$OUT/logs/.cuda_lib_dirs" ]; then
    LD_LIBRARY_PATH="$(cat "$OUT/logs/.cuda_lib_dirs")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export LD_LIBRARY_PATH
  fi
else
  PY=${GPU_PYTHON:-}
  if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
  fi
  record install 0 0 "skipped: --cpu-only runs in $PY"
fi

# -- the checks ------------------------------------------------------------------------------------
export PYTHONUNBUFFERED=1 BOOSTSERVE_GPU_TEST_DEVICE=$DEVICE
# The CPU dry run checks the code, not numbers: fewer images (the default suite runs it).
[ "$DEVICE" = cpu ] && export BOOSTSERVE_GPU_TEST_IMAGES=128
step providers 90 "session.get_providers() must hold the device's provider" \
  "$PY" -m bench.gpu_check providers --device "$DEVICE" --out "$OUT"

step gpu-tests 150 "pytest -m gpu tests/gpu on $DEVICE" \
  "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/gpu --junitxml "$OUT/pytest-gpu.xml"

ENGINE_CAP=$(left)
BUDGET=$(((ENGINE_CAP - 45) * 6 / 10))
IMAGES=512
if [ "$DEVICE" = cpu ]; then  # a dry run of the code, not a measurement
  [ "$BUDGET" -gt 2 ] && BUDGET=2
  IMAGES=128
fi
[ "$BUDGET" -lt 1 ] && BUDGET=1
step engine "$ENGINE_CAP" "timed rounds ${BUDGET}s, $IMAGES images" \
  "$PY" -m bench.gpu_check engine --device "$DEVICE" --out "$OUT" --budget "$BUDGET" --images "$IMAGES" --quiet \
  ${DATA:+--data "$DATA"}
exit 0  # finish() (the EXIT trap) writes the summary and sets the exit code
