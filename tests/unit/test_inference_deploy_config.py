"""config.pbtxt version pinning and repository versions for `pneumotriage model deploy` (no Triton)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.inference.deploy import (
    DeployError,
    add_version,
    config_backend,
    pin_version,
    read_version_policy,
    set_version_policy,
)
from services.inference.triton_python import python_backend_config
from tests.support.inference_model import build_tiny_onnx, write_version

REPO_ROOT = Path(__file__).resolve().parents[2]

ONNX_CONFIG = """\
# Triton model configuration (comments must survive a deploy)
name: "pneumonia"
platform: "onnxruntime_onnx"
max_batch_size: 32
input [ { name: "image" data_type: TYPE_FP32 dims: [ 1, 64, 64 ] } ]
output [
  { name: "logit" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] } },
  { name: "cam" data_type: TYPE_FP32 dims: [ 4, 4 ] }
]
# version_policy: { all: { } }   <- a comment mentioning the field is left alone
dynamic_batching { max_queue_delay_microseconds: 2000 }
version_policy: { latest: { num_versions: 1 } }
instance_group [ { count: 2 kind: KIND_CPU } ]
"""


def test_pin_replaces_the_policy_and_keeps_everything_else() -> None:
    assert read_version_policy(ONNX_CONFIG) == []
    pinned = set_version_policy(ONNX_CONFIG, 3)
    assert read_version_policy(pinned) == [3]
    assert "# Triton model configuration (comments must survive a deploy)" in pinned
    assert "# version_policy: { all: { } }   <- a comment" in pinned
    assert pinned.count("version_policy:") == 2  # the comment + the one real entry
    assert read_version_policy(set_version_policy(pinned, 1)) == [1]
    assert read_version_policy(set_version_policy(pinned, None)) == []
    assert config_backend(pinned) == "onnxruntime_onnx"


def test_pin_is_appended_when_there_is_no_policy() -> None:
    text = python_backend_config("pneumonia", 64)
    assert read_version_policy(text) == []
    assert read_version_policy(set_version_policy(text, 2)) == [2]
    assert config_backend(text) == "python"


def test_committed_config_can_be_pinned() -> None:
    config = REPO_ROOT / "deploy" / "triton" / "model_repository" / "pneumonia" / "config.pbtxt"
    assert config.exists(), "the committed model's config.pbtxt is missing"
    assert read_version_policy(set_version_policy(config.read_text(), 5)) == [5]


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_onnx(tmp_path_factory.mktemp("onnx") / "tiny.onnx", input_size=64)


def _export_dir(tmp_path: Path, onnx: Path, name: str = "export") -> Path:
    vdir = write_version(tmp_path / f"{name}-repo", 1, onnx)
    out = tmp_path / name
    out.mkdir()
    for f in ("model.onnx", "metadata.json"):
        (out / f).write_bytes((vdir / f).read_bytes())
    return out


def test_add_version_copies_atomically_and_pins(tmp_path: Path, tiny_onnx: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "pneumonia").mkdir(parents=True)
    (repo / "pneumonia" / "config.pbtxt").write_text(python_backend_config("pneumonia", 64))
    export = _export_dir(tmp_path, tiny_onnx)
    version, copied = add_version(repo, "pneumonia", export)
    assert (version, copied) == (1, True)
    assert sorted(p.name for p in (repo / "pneumonia" / "1").iterdir()) == ["metadata.json", "model.onnx", "model.py"]
    assert add_version(repo, "pneumonia", export) == (2, True)
    assert add_version(repo, "pneumonia", export, version=2) == (2, False)  # same files: idempotent
    assert not [p for p in (repo / "pneumonia").iterdir() if p.name.startswith(".deploy")]
    assert pin_version(repo, "pneumonia", 1) == 2
    assert read_version_policy((repo / "pneumonia" / "config.pbtxt").read_text()) == [1]
    with pytest.raises(DeployError):
        pin_version(repo, "pneumonia", 9)


def test_add_version_refuses_bad_exports(tmp_path: Path, tiny_onnx: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "pneumonia").mkdir(parents=True)
    (repo / "pneumonia" / "config.pbtxt").write_text(python_backend_config("pneumonia", 128))
    export = _export_dir(tmp_path, tiny_onnx)
    with pytest.raises(DeployError, match="input_size"):
        add_version(repo, "pneumonia", export)  # 64 px model into a 128 px repository
    (export / "metadata.json").unlink()
    with pytest.raises(DeployError, match=r"metadata\.json"):
        add_version(repo, "pneumonia", export)
    assert not any(p.name.isdigit() for p in (repo / "pneumonia").iterdir())
