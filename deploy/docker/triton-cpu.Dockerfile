# NVIDIA Triton on CPU without the NGC image: the tritonserver binary in the nvidia-pytriton wheel
# (python backend only) serving deploy/triton/model_repository through onnxruntime (triton-cpu.py).
# The NGC image (nvcr.io/nvidia/tritonserver, onnxruntime backend) stays the GPU option:
#   docker compose -f docker-compose.yml -f deploy/docker/compose.gpu.yml up -d
# Build from the repository root (context as deploy/docker/Dockerfile, same build stage):
#   docker build -f deploy/docker/triton-cpu.Dockerfile --build-arg BASE_IMAGE=pneumotriage-base:bookworm -t pneumotriage-triton-cpu .
ARG PYTHON_VERSION=3.11
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG PYTHON_VERSION
RUN command -v python${PYTHON_VERSION} >/dev/null || { apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python${PYTHON_VERSION} python3-venv \
      && rm -rf /var/lib/apt/lists/*; } \
 && python${PYTHON_VERSION} -m venv /opt/pneumotriage/venv
ENV PATH=/opt/pneumotriage/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY services ./services
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${BASE_IMAGE}
ARG PYTHON_VERSION
ARG PYTRITON_VERSION=0.5.7
COPY --from=build /wheels /wheels
# libpython: the python-backend stub links it; curl: the health check
RUN command -v python${PYTHON_VERSION} >/dev/null || { apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python${PYTHON_VERSION} python3-venv libpython${PYTHON_VERSION} \
      && rm -rf /var/lib/apt/lists/*; } \
 && { command -v curl >/dev/null || { apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*; }; } \
 && python${PYTHON_VERSION} -m venv /opt/pneumotriage/venv \
 && /opt/pneumotriage/venv/bin/pip install --no-cache-dir /wheels/*.whl nvidia-pytriton==${PYTRITON_VERSION} \
 && rm -rf /wheels
ENV PATH=/opt/pneumotriage/venv/bin:$PATH \
    PT_TRITON_STUB_ENV=/opt/pneumotriage/triton-stub \
    PYTHONUNBUFFERED=1
# the stub's own venv (numpy<2, see services/inference/tools/local_triton.py), made at build time
RUN python -c "from services.inference.tools.local_triton import ensure_stub_env; ensure_stub_env()"
COPY deploy/docker/triton-cpu.py /usr/local/bin/pt-triton-cpu
COPY deploy/triton/model_repository /models
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=12 CMD ["curl", "-fsS", "http://127.0.0.1:8000/v2/health/ready"]
CMD ["python", "/usr/local/bin/pt-triton-cpu"]
