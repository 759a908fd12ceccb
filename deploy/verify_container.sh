#!/usr/bin/env bash
# Build the CPU serving image with podman and prove it works: runs as non-root, has no torch and no
# training code, becomes ready (HEALTHCHECK too), classifies a PNG, serves /metrics.
#
#   bash deploy/verify_container.sh            # what `pytest -m container` runs
#
# Needs root (rootful podman; debootstrap). Installs podman, runc and debootstrap with apt-get when
# missing. The base image is Debian bookworm with python3, built here with debootstrap and imported
# as localhost/boostserve-base:bookworm, so nothing is pulled from a container registry; pip inside the
# build reaches PyPI. Everything lives under $BOOSTSERVE_PODMAN_ROOT (default /var/tmp/boostserve-podman,
# its own image store, so later runs reuse the base image); the host's podman setup is left alone.
#
# Environment:
#   BOOSTSERVE_PODMAN_ROOT   work/storage directory        (/var/tmp/boostserve-podman)
#   BOOSTSERVE_STORAGE       overlay | vfs                 (overlay, falls back to vfs)
#   BOOSTSERVE_REBUILD_BASE  1: debootstrap the base again
#   BOOSTSERVE_ARTIFACTS     artifact dir to mount at /artifacts (default: the embedded model when
#                            service/embedded_model/manifest.json exists, else a synthetic artifact
#                            built with tests/fixtures/synthetic_artifact.py and .venv/bin/python)
#   BOOSTSERVE_KEEP          1: leave the container running for inspection
# Measured on the 2-core dev machine: see docs/deploy.md ("Verification").
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
START=$(date +%s)
ROOT=${BOOSTSERVE_PODMAN_ROOT:-/var/tmp/boostserve-podman}
BASE_TAG=localhost/boostserve-base:bookworm
IMAGE=localhost/boostserve:verify
NAME=boostserve-verify-$$
log() { printf '[verify_container %3ss] %s\n' "$(($(date +%s) - START))" "$*"; }
die() { log "FAIL: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (rootful podman, debootstrap)"

# -- tools --------------------------------------------------------------------------------------
missing=()
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || missing+=(runc)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# -- podman configuration (private: CONTAINERS_CONF / CONTAINERS_STORAGE_CONF) --------------------
mkdir -p "$ROOT"
export CONTAINERS_CONF="$REPO/deploy/podman/containers.conf"
driver=${BOOSTSERVE_STORAGE:-overlay}
write_storage_conf() {
  cat >"$ROOT/storage.conf" <<EOF
[storage]
driver = "$1"
graphroot = "$ROOT/storage-$1"
runroot = "$ROOT/run-$1"
EOF
}
write_storage_conf "$driver"
export CONTAINERS_STORAGE_CONF="$ROOT/storage.conf"
if ! podman info >/dev/null 2>"$ROOT/podman-info.err"; then
  if [ "$driver" = overlay ]; then
    log "overlay storage unusable here ($(tail -1 "$ROOT/podman-info.err")); using vfs"
    driver=vfs
    write_storage_conf vfs
    podman info >/dev/null || die "podman info fails with vfs storage too"
  else
    die "podman info: $(cat "$ROOT/podman-info.err")"
  fi
fi
log "podman $(podman version --format '{{.Client.Version}}'), storage $driver, runtime runc"

cleanup() {
  if [ "${BOOSTSERVE_KEEP:-0}" != 1 ]; then
    podman rm -f -t 2 "$NAME" >/dev/null 2>&1 || true
  fi
  [ -n "${TMPD:-}" ] && rm -rf "$TMPD"
}
TMPD=$(mktemp -d /var/tmp/boostserve-verify.XXXXXX)
trap cleanup EXIT

# -- base image: debootstrap'd bookworm + python3 ---------------------------------------------------
# Test-only base: the host's CA bundle is copied in and named by PIP_CERT, so pip inside the build also
# works behind a TLS-inspecting egress proxy (as on the CI machines). The published image uses the
# default BASE_IMAGE (python:3.11-slim-bookworm) and none of this.
if [ "${BOOSTSERVE_REBUILD_BASE:-0}" = 1 ] || ! podman image exists "$BASE_TAG"; then
  rootfs=${BOOSTSERVE_BASE_ROOTFS:-}
  if [ -z "$rootfs" ]; then
    rootfs="$ROOT/rootfs"
    rm -rf "$rootfs"
    log "debootstrap bookworm (minbase + python3, python3-venv, python3-pip) -> $BASE_TAG"
    nice -n 10 debootstrap --variant=minbase \
      --include=python3,python3-venv,python3-pip,ca-certificates \
      bookworm "$rootfs" http://deb.debian.org/debian >"$ROOT/debootstrap.log" 2>&1 \
      || { tail -20 "$ROOT/debootstrap.log"; die "debootstrap failed"; }
  else
    log "using the existing rootfs $rootfs"
  fi
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* "$rootfs"/tmp/*
  changes=(--change 'CMD ["/bin/bash"]'
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin')
  if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/host-ca-bundle.crt"
    changes+=(--change 'ENV PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt')
  fi
  tar -C "$rootfs" -c . | podman import "${changes[@]}" - "$BASE_TAG" >/dev/null
  [ -n "${BOOSTSERVE_BASE_ROOTFS:-}" ] || rm -rf "$rootfs"
  log "base image imported ($(($(podman image inspect --format '{{.Size}}' "$BASE_TAG") / 1000000)) MB)"
else
  log "reusing $BASE_TAG"
fi

# -- build ---------------------------------------------------------------------------------------
# --format docker keeps HEALTHCHECK (OCI images drop it). --network host: pip reaches PyPI without a
# CNI bridge.
build_args=(--format docker --network host --target runtime --pull=never
  --build-arg "BASE_IMAGE=$BASE_TAG" -t "$IMAGE")
log "building $IMAGE (target runtime)"
b0=$(date +%s)
nice -n 10 podman build "${build_args[@]}" . >"$ROOT/build.log" 2>&1 \
  || { tail -40 "$ROOT/build.log"; die "podman build failed (log: $ROOT/build.log)"; }
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
log "built in $(($(date +%s) - b0)) s; image size $((size / 1000000)) MB ($size bytes)"
if [ "$size" -gt 400000000 ]; then log "WARNING: image larger than the 400 MB target"; fi

# -- static checks on the image ------------------------------------------------------------------------
user=$(podman image inspect --format '{{.Config.User}}' "$IMAGE")
[ "$user" = "10001:10001" ] || die "image USER is '$user', expected 10001:10001"
podman image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE" | grep -q readyz \
  || die "image has no HEALTHCHECK on /readyz"
if podman run --rm --network none "$IMAGE" python3 -c "import torch" >/dev/null 2>&1; then
  die "torch is importable in the serving image"
fi
for mod in models export; do
  if podman run --rm --network none "$IMAGE" python3 -c "import $mod" >/dev/null 2>&1; then
    die "training package '$mod' is importable in the serving image"
  fi
done
uid=$(podman run --rm --network none "$IMAGE" id -u 2>/dev/null)
[ "$uid" = 10001 ] || die "container runs as uid $uid"
if [ -f service/embedded_model/manifest.json ]; then
  podman run --rm --network none "$IMAGE" python3 -c \
    "from service.http.settings import EMBEDDED_MODEL_DIR as d; assert (d / 'manifest.json').is_file(), d" \
    >/dev/null 2>&1 || die "the embedded model (service/embedded_model) is not in the image"
  log "image: embedded model baked in"
fi
log "image: USER 10001, HEALTHCHECK on /readyz, no torch/models/export"

# -- run ---------------------------------------------------------------------------------------------
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
run_args=(-d --name "$NAME" --network host --read-only --tmpfs /tmp --cap-drop ALL
  --security-opt no-new-privileges -e BOOSTSERVE_HOST=127.0.0.1 -e "BOOSTSERVE_PORT=$port")
artifacts=${BOOSTSERVE_ARTIFACTS:-}
if [ -z "$artifacts" ] && [ ! -f service/embedded_model/manifest.json ]; then
  [ -x .venv/bin/python ] || die "no embedded model and no .venv to build a synthetic artifact"
  artifacts="$TMPD/artifact"
  log "no embedded model in service/embedded_model: building a synthetic artifact"
  .venv/bin/python -c "import sys; sys.path.insert(0, '.'); \
from tests.fixtures.synthetic_artifact import build_synthetic_artifact as b; b(sys.argv[1])" "$artifacts" \
    >"$TMPD/artifact.log" 2>&1 || { tail -20 "$TMPD/artifact.log"; die "synthetic artifact build failed"; }
  chmod -R a+rX "$TMPD"
fi
if [ -n "$artifacts" ]; then
  run_args+=(-v "$(cd "$artifacts" && pwd):/artifacts:ro" -e BOOSTSERVE_ARTIFACTS_DIR=/artifacts)
  log "serving mounted artifact $artifacts"
else
  log "serving the embedded model"
fi
# (stderr: podman complains that there is no systemd to schedule HEALTHCHECK runs; we run it by hand)
podman run "${run_args[@]}" "$IMAGE" >/dev/null 2>"$TMPD/run.err" || { cat "$TMPD/run.err"; die "podman run failed"; }
base="http://127.0.0.1:$port"

ready=0
for _ in $(seq 1 120); do
  if python3 -c "import urllib.request as u; u.urlopen('$base/readyz', timeout=2)" 2>/dev/null; then
    ready=1; break
  fi
  [ "$(podman inspect --format '{{.State.Running}}' "$NAME")" = true ] || break
  sleep 1
done
if [ $ready != 1 ]; then
  podman logs "$NAME" 2>&1 | tail -30
  [ "$(podman inspect --format '{{.State.Running}}' "$NAME")" = true ] || die "container exited before ready"
  die "not ready within 120 s"
fi
log "ready on $base"
podman healthcheck run "$NAME" >/dev/null && log "HEALTHCHECK passes" || die "HEALTHCHECK fails"
[ "$(podman exec "$NAME" id -u)" = 10001 ] || die "running process is not uid 10001"

# One PNG made by the image's own Pillow (the model's input size), POSTed raw.
podman exec "$NAME" python3 -c "
import io, json, os, urllib.request as u
from PIL import Image
img = Image.new('L', (28, 28))
img.putdata([(x * 9 + y * 5) % 256 for y in range(28) for x in range(28)])
buf = io.BytesIO(); img.save(buf, format='PNG')
req = u.Request('http://127.0.0.1:%s/v1/classify' % os.environ['BOOSTSERVE_PORT'], data=buf.getvalue(),
                headers={'Content-Type': 'image/png'}, method='POST')
body = json.load(u.urlopen(req, timeout=10))
print(json.dumps(body)[:300])
" >"$TMPD/classify.json" 2>&1 || { cat "$TMPD/classify.json"; die "classify failed"; }
log "classify: $(cat "$TMPD/classify.json")"

python3 -c "import urllib.request as u; print(u.urlopen('$base/metrics', timeout=5).read().decode())" \
  >"$TMPD/metrics.txt"
for series in boostserve_requests_total boostserve_exits_total boostserve_ready boostserve_image_macs_count; do
  grep -q "^$series" "$TMPD/metrics.txt" || die "/metrics lacks $series"
done
log "/metrics serves the boostserve_ series"
podman stop -t 10 "$NAME" >/dev/null 2>&1
log "OK: image $IMAGE ($((size / 1000000)) MB), total $(($(date +%s) - START)) s"
