"""Entry point of the CPU Triton image (deploy/docker/triton-cpu.Dockerfile).

The tritonserver in the nvidia-pytriton wheel has the python backend only, so the production model
repository (mounted at /models, onnxruntime-backend config.pbtxt, served as is by the NGC image on
a GPU) is rendered into a python-backend copy (model.onnx run by services/inference/triton_python/
model.py with onnxruntime), then served on 0.0.0.0: HTTP 8000, gRPC 8001, metrics 8002.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

from services.inference.tools.local_triton import LocalTriton
from services.inference.triton_python import MODEL_PY, python_backend_config


def render(source: Path, target: Path) -> list[str]:
    names = []
    for model in sorted(p for p in source.iterdir() if (p / "config.pbtxt").is_file()):
        versions = sorted(
            (d for d in model.iterdir() if d.name.isdigit() and (d / "model.onnx").is_file()), key=lambda d: int(d.name)
        )
        if not versions:
            continue
        config = (model / "config.pbtxt").read_text()
        keep = re.search(r"num_versions:\s*(\d+)", config)
        size = int(json.loads((versions[-1] / "metadata.json").read_text())["input_size"])
        policy = f"version_policy: {{ latest: {{ num_versions: {keep.group(1) if keep else 1} }} }}\n"
        out = target / model.name
        out.mkdir(parents=True)
        threads = os.environ.get("PT_TRITON_INTRA_OP_THREADS", "0")
        (out / "config.pbtxt").write_text(
            python_backend_config(model.name, size, intra_op_threads=int(threads), version_policy=policy)
        )
        for vdir in versions:
            dst = out / vdir.name
            shutil.copytree(vdir, dst)
            shutil.copy2(MODEL_PY, dst / "model.py")
        names.append(model.name)
    return names


def main() -> None:
    source = Path(os.environ.get("PT_TRITON_MODEL_REPOSITORY", "/models"))
    work = Path(os.environ.get("PT_TRITON_WORK_DIR", "/tmp/triton"))
    shutil.rmtree(work, ignore_errors=True)
    names = render(source, work / "models")
    if not names:
        sys.exit(f"no model with a model.onnx under {source}")
    server = LocalTriton(
        work / "models", load_models=tuple(names), work_dir=work, http_port=8000, grpc_port=8001, metrics_port=8002
    )
    cmd = [arg.replace("127.0.0.1", "0.0.0.0") for arg in server.command()]
    print(f"serving {names} from {source} (python backend, CPU)", flush=True)
    os.execve(cmd[0], cmd, server.env())


if __name__ == "__main__":
    main()
