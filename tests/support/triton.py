"""Triton fixtures: a real tritonserver (from the nvidia-pytriton wheel, python backend running the
ONNX with onnxruntime) on loopback, over a temporary model repository.

Version 1 of the repository is the committed model (deploy/triton/model_repository/pneumonia,
the version its config.pbtxt serves) when present, else a small random-weight ONNX with the same I/O.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.inference.tools.local_triton import LocalTriton
from tests.support import committed_model
from tests.support.inference_model import build_tiny_onnx, make_repository, write_version

COMMITTED_MODEL = committed_model.COMMITTED_MODEL  # still importable from here; new code: committed_model


def committed_version_dir() -> Path | None:
    """The committed version the repository serves, or None without a committed model."""
    from services.inference.repository import list_versions

    return committed_model.committed_version_dir() if list_versions(COMMITTED_MODEL) else None


def input_size() -> int:
    from services.inference.preprocess import INPUT_SIZE

    return INPUT_SIZE


def build_repository(root: Path) -> Path:
    """A python-backend repository with version 1 (the committed model, or a tiny one)."""
    committed = committed_version_dir()
    if committed is not None:
        import json

        size = int(json.loads((committed / "metadata.json").read_text())["input_size"])
        make_repository(root, committed / "model.onnx", input_size=size)
        version_dir = root / "pneumonia" / "1"
        shutil.copy2(committed / "metadata.json", version_dir / "metadata.json")
        for extra in committed.iterdir():  # e.g. an ONNX external-data file beside model.onnx
            if extra.is_file() and extra.suffix != ".json" and not (version_dir / extra.name).exists():
                shutil.copy2(extra, version_dir / extra.name)
        return root
    onnx_path = build_tiny_onnx(root.parent / f"{root.name}-tiny.onnx", input_size(), seed=0)
    return make_repository(root, onnx_path, input_size=input_size())


def exported_candidate(directory: Path, seed: int = 1, temperature: float = 2.0) -> Path:
    """What `model export` would hand to `model deploy`: a dir with model.onnx + metadata.json."""
    import json

    size = input_size()
    committed = committed_version_dir()
    if committed is not None:
        size = int(json.loads((committed / "metadata.json").read_text())["input_size"])
    scratch = directory / "scratch"
    build_tiny_onnx(scratch / "model.onnx", size, seed=seed)
    vdir = write_version(scratch / "repo", 1, scratch / "model.onnx", temperature=temperature)
    out = directory / f"candidate-{seed}"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(vdir / "model.onnx", out / "model.onnx")
    shutil.copy2(vdir / "metadata.json", out / "metadata.json")
    return out


@pytest.fixture(scope="session", name="inference_repository")
def inference_repository_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("inference-repo") / "models")


@pytest.fixture(scope="session", name="triton_server")
def triton_server_fixture(inference_repository: Path) -> Iterator[LocalTriton]:
    """One tritonserver for the session, serving `inference_repository` (do not modify it)."""
    server = LocalTriton(inference_repository, load_models=("pneumonia",))
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(name="private_triton")
def private_triton_fixture(tmp_path: Path) -> Iterator[LocalTriton]:
    """A tritonserver of the test's own (tests that kill it or change its repository)."""
    repo = build_repository(tmp_path / "models")
    server = LocalTriton(repo, load_models=("pneumonia",), work_dir=tmp_path / "triton")
    server.start()
    try:
        yield server
    finally:
        server.cleanup()
