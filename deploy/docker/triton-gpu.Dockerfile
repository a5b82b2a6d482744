# The GPU option for Triton (deploy/docker/compose.gpu.yml): NVIDIA's NGC image as published, with
# the onnxruntime backend; compose mounts deploy/triton/model_repository at /models.
ARG BASE_IMAGE=nvcr.io/nvidia/tritonserver:24.12-py3
FROM ${BASE_IMAGE}
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=12 CMD ["curl", "-fsS", "http://127.0.0.1:8000/v2/health/ready"]
CMD ["tritonserver", "--model-repository=/models", "--model-control-mode=explicit", "--load-model=*", "--strict-readiness=true"]
