# boostserve serving image: FastAPI + ONNX Runtime, the embedded model baked in. No torch, no training
# code: the wheel is built from boostserve/ (CLI) and service/ only, and the runtime stage installs that
# wheel with exactly one ONNX Runtime extra.
#
#   CPU (default target `runtime`):
#     docker build -t boostserve:cpu .
#   CUDA (target `runtime-gpu`, onnxruntime-gpu on an NVIDIA CUDA + cuDNN runtime base):
#     docker build --target runtime-gpu -t boostserve:gpu .
#   Tests pass a locally built base (deploy/verify_container.sh):
#     podman build --format docker --build-arg BASE_IMAGE=localhost/boostserve-base:bookworm .
#
# Every setting is a BOOSTSERVE_* environment variable (service/http/settings.py); to serve another
# artifact, mount it and set BOOSTSERVE_ARTIFACTS_DIR (e.g. -v ./artifacts:/artifacts:ro
# -e BOOSTSERVE_ARTIFACTS_DIR=/artifacts). See docs/deploy.md.

# Any Debian-like image with python3 (>= 3.11) and its venv module.
ARG BASE_IMAGE=python:3.11-slim-bookworm
# The CUDA major version must match the onnxruntime-gpu wheel pip resolves: onnxruntime-gpu 1.31.x on
# PyPI links libcudart.so.13 / libcublas.so.13 and needs cuDNN 9 (checked with readelf on the wheel),
# so CUDA 13.x + cuDNN 9 (host driver >= 580). For CUDA 12 hosts pin onnxruntime-gpu <= 1.2x built
# for CUDA 12 and pass e.g. CUDA_BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04.
ARG CUDA_BASE_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG APP_UID=10001

# --------------------------------------------------------------------------------------------------
# wheel: build the project wheel from the serving sources only.
FROM ${BASE_IMAGE} AS wheel
SHELL ["/bin/sh", "-eu", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python3 -m venv /opt/build
# models/, export/, bench/ and tests are deliberately absent (.dockerignore allows only these).
COPY pyproject.toml README.md ./
COPY boostserve/ boostserve/
COPY service/ service/
RUN /opt/build/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && ls -l /wheels

# --------------------------------------------------------------------------------------------------
# venv-cpu: a self-contained virtual environment with boostserve[cpu].
FROM ${BASE_IMAGE} AS venv-cpu
SHELL ["/bin/sh", "-eu", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# Dependencies first, from pyproject.toml alone: this layer stays cached while only code changes.
COPY pyproject.toml /tmp/pyproject.toml
RUN python3 -m venv /opt/venv \
    && python3 -c "import tomllib; p = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['cpu']))" > /tmp/requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt
COPY --from=wheel /wheels /wheels
RUN /opt/venv/bin/pip install --no-cache-dir "$(ls /wheels/boostserve-*.whl)[cpu]" \
    && /opt/venv/bin/pip uninstall --yes pip \
    && find /opt/venv -name 'tests' -path '*/numpy/*' -prune -exec rm -rf {} + \
    && /opt/venv/bin/python -c "import service, onnxruntime; print('onnxruntime', onnxruntime.__version__)"

# --------------------------------------------------------------------------------------------------
# venv-gpu: the same with boostserve[gpu], on the CUDA base (its python3 differs from BASE_IMAGE's).
FROM ${CUDA_BASE_IMAGE} AS venv-gpu
SHELL ["/bin/sh", "-eu", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml /tmp/pyproject.toml
RUN python3 -m venv /opt/venv \
    && python3 -c "import tomllib; p = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['gpu']))" > /tmp/requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt
COPY --from=wheel /wheels /wheels
RUN /opt/venv/bin/pip install --no-cache-dir "$(ls /wheels/boostserve-*.whl)[gpu]" \
    && /opt/venv/bin/pip uninstall --yes pip

# --------------------------------------------------------------------------------------------------
# runtime-gpu: CUDA variant. Select the provider with BOOSTSERVE_PROVIDERS (default here: cuda,cpu).
FROM ${CUDA_BASE_IMAGE} AS runtime-gpu
ARG APP_UID
SHELL ["/bin/sh", "-eu", "-c"]
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid "${APP_UID}" boostserve \
    && useradd --system --uid "${APP_UID}" --gid "${APP_UID}" --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin boostserve
COPY --from=venv-gpu /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BOOSTSERVE_HOST=0.0.0.0 \
    BOOSTSERVE_PORT=8000 \
    BOOSTSERVE_PROVIDERS=cuda,cpu
USER ${APP_UID}:${APP_UID}
WORKDIR /tmp
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('BOOSTSERVE_PORT', '8000'), timeout=2)"]
CMD ["boostserve", "serve"]

# --------------------------------------------------------------------------------------------------
# runtime: the CPU image (default target, last stage).
FROM ${BASE_IMAGE} AS runtime
ARG APP_UID
SHELL ["/bin/sh", "-eu", "-c"]
RUN groupadd --system --gid "${APP_UID}" boostserve \
    && useradd --system --uid "${APP_UID}" --gid "${APP_UID}" --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin boostserve
COPY --from=venv-cpu /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BOOSTSERVE_HOST=0.0.0.0 \
    BOOSTSERVE_PORT=8000
USER ${APP_UID}:${APP_UID}
WORKDIR /tmp
EXPOSE 8000
# Readiness, not liveness: the container is healthy once the model is loaded and warmed up.
# urlopen raises (non-zero exit) on connection errors and on any non-2xx answer such as 503.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('BOOSTSERVE_PORT', '8000'), timeout=2)"]
CMD ["boostserve", "serve"]
