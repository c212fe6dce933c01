# syntax=docker/dockerfile:1
# seqrank serving image: the official Triton Inference Server container + the seqrank Python package + one exported
# model repository. Build and run: docs/deployment.md.
#
# Base image tag (deliberate): 26.10, the newest monthly Triton release when this was written.
#  - Releases before 25.07 lack the August-2025 security fixes (CVE-2025-23310/23311: stack overflow in HTTP chunked
#    request parsing, unauthenticated; CVE-2025-23319/23320/23334: the Python-backend shared-memory chain to remote
#    code execution), and this image serves Python-backend models over HTTP. 25.07 itself was a security-patch tag
#    (server 2.59.1) without the usual release notes. Later Triton bulletins (e.g. May 2026, fixed by 26.04) mean
#    production stays on a current monthly tag, re-pinned monthly after the checks in docs/deployment.md.
#  - CI runs tritonserver 2.51.0 from the nvidia-pytriton wheel = the 24.10 container, which has none of these fixes:
#    it only ever binds 127.0.0.1 in tests. What CI verifies (configs, ensemble, Python backend, restricted APIs,
#    --model-config-name, canary, explicit model control) was verified on 2.51; the production tag is checked by the
#    container smoke test in docs/deployment.md.
#  - Recent releases are built on CUDA 13 and need a matching NVIDIA driver. On nodes whose driver cannot run them,
#    --build-arg TRITON_RELEASE=25.07 (the patched CUDA 12.9 line) until the driver is upgraded; later CVEs stay open.
#  - Pin the digest too for a release: FROM nvcr.io/nvidia/tritonserver:26.10-py3@sha256:<digest from `docker pull`>.
ARG TRITON_RELEASE=26.10
FROM nvcr.io/nvidia/tritonserver:${TRITON_RELEASE}-py3

# Exported model repository to serve (seqrank export --run RUN --repository build/model_repository). Must lie inside
# the .dockerignore allowlist: build/... or runs/<run>/model_repository.
ARG REPOSITORY=build/model_repository
ARG SEQRANK_UID=10001

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    SEQRANK_REPOSITORY=/opt/seqrank/model_repository \
    SEQRANK_WORKDIR=/tmp/seqrank \
    SEQRANK_TRT_CACHE=/cache/trt

WORKDIR /opt/seqrank

# Python-backend and build_trt.py dependencies, pinned (deploy/requirements-serving.txt = the pins of
# requirements.txt). The base image's Ubuntu marks its Python as externally managed (PEP 668); this image is that
# Python's only user, so pip installs into it. Then the seqrank package itself, without dependencies (torch/pandas are
# training-side only); build_trt.py imports it (seqrank.exporting.triton_config, the buckets).
COPY deploy/requirements-serving.txt ./requirements-serving.txt
RUN PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir -r requirements-serving.txt
COPY pyproject.toml ./src/pyproject.toml
COPY seqrank ./src/seqrank
RUN PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir --no-deps ./src \
    && rm -rf ./src \
    && python3 -c "import seqrank.serving.preprocess, seqrank.exporting.triton_config, numpy, onnxruntime, redis"

COPY --chmod=0755 docker/entrypoint.sh docker/healthcheck.py ./docker/
COPY --chmod=0755 export/build_trt.py ./export/build_trt.py
COPY ${REPOSITORY} ./model_repository
RUN test -f model_repository/ranker/1/model.onnx && test -d model_repository/preprocess/1/tables \
    || { echo "REPOSITORY=${REPOSITORY} is not an exported model repository (no ranker/1/model.onnx or preprocess/1/tables): run seqrank export first" >&2; exit 1; }

# Non-root, numeric uid (Kubernetes runAsNonRoot can only verify a numeric USER). The image content stays root-owned
# and read-only for it; the only writable paths are /tmp (runtime repository) and the engine cache volume.
RUN groupadd --system --gid "${SEQRANK_UID}" seqrank \
    && useradd --system --uid "${SEQRANK_UID}" --gid "${SEQRANK_UID}" --home-dir /tmp --no-create-home \
       --shell /usr/sbin/nologin seqrank \
    && mkdir -p /cache/trt \
    && chown "${SEQRANK_UID}:${SEQRANK_UID}" /cache/trt
VOLUME ["/cache/trt"]
USER 10001:10001

# 8000 HTTP/REST, 8001 gRPC, 8002 Prometheus metrics
EXPOSE 8000 8001 8002

# A canary inference, not /v2/health/ready: a crashed Python stub leaves health at 200. The start period covers the
# first-start TensorRT engine build (minutes; later starts reuse /cache/trt).
HEALTHCHECK --start-period=900s --interval=30s --timeout=10s --retries=3 \
    CMD ["python3", "/opt/seqrank/docker/healthcheck.py", "--quiet", "--timeout", "8"]

ENTRYPOINT ["/opt/seqrank/docker/entrypoint.sh"]
