# syntax=docker/dockerfile:1
# seqrank jobs image: Python 3.11 + CPU PyTorch + the seqrank package, for everything outside Triton:
#   seqrank embed   (the daily CronJob, deploy/jobs.yaml)
#   seqrank ingest  (the HTTP API Deployment and the stream consumer, deploy/ingest.yaml)
# The serving image (../Dockerfile) has no torch, so it cannot run embed. No model is baked in: the jobs read the
# run directory from the seqrank-runs volume. Build from the repository root (docs/deployment.md):
#   docker build -f docker/jobs.Dockerfile -t seqrank-jobs:0.2.0 .
# (docker/jobs.Dockerfile.dockerignore is this build's allowlist.) Pin the digest for a release:
#   FROM python:3.11.14-slim-bookworm@sha256:<digest from `docker pull`>.
FROM python:3.11.14-slim-bookworm

ARG SEQRANK_UID=10001
# The CPU wheel, pinned as in requirements.lock (torch==2.13.0+cpu); the PyPI wheel would pull the CUDA libraries.
ARG TORCH_VERSION=2.13.0+cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp

WORKDIR /opt/seqrank

# 1. the pinned closure of the package's dependencies (deploy/requirements-jobs.txt = pins of requirements.lock),
# 2. torch from the CPU index without dependencies (they are all in step 1), 3. seqrank itself without dependencies,
# then pip check (every requirement satisfied) and an import of what the jobs run.
COPY deploy/requirements-jobs.txt ./requirements-jobs.txt
RUN python -m pip install --no-cache-dir -r requirements-jobs.txt \
    && python -m pip install --no-cache-dir --no-deps --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./src/
COPY seqrank ./src/seqrank
RUN python -m pip install --no-cache-dir --no-deps ./src \
    && rm -rf ./src \
    && python -m pip check \
    && python -c "import torch, fastapi, uvicorn, redis, seqrank.pipeline, seqrank.ingest; assert torch.__version__ == '${TORCH_VERSION}', torch.__version__"

# Non-root, numeric uid (runAsNonRoot can only verify a numeric USER); nothing in the image is writable for it.
RUN groupadd --system --gid "${SEQRANK_UID}" seqrank \
    && useradd --system --uid "${SEQRANK_UID}" --gid "${SEQRANK_UID}" --home-dir /tmp --no-create-home \
       --shell /usr/sbin/nologin seqrank
USER 10001:10001

# 8090: seqrank ingest --serve (the jobs expose nothing)
EXPOSE 8090

# checkov:skip=CKV_DOCKER_2:One image for batch jobs and the ingest API; Kubernetes probes /healthz of the API
ENTRYPOINT ["seqrank"]
CMD ["--help"]
