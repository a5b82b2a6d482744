"""The Triton model-repository layout, owned in one place: `<root>/<name>/config.pbtxt` and one
directory per version, `<root>/<name>/<N>/{model.onnx, metadata.json}`.

One rule says what a version is (`list_versions`: a directory named by an integer that holds
`model.onnx`), one says which number a new version gets (`next_version`: above every
integer-named directory, so a half-written one is never reused), and one reads the version pin in
config.pbtxt (`read_version_policy`). The runtime, deployment, training export, evaluation and the
tests all use these; nothing else lists version directories.
"""

from __future__ import annotations

from pathlib import Path

MODEL_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
CONFIG_FILE = "config.pbtxt"


def list_versions(model_dir: Path) -> list[int]:
    """The versions of a model: integer-named directories that hold model.onnx, ascending."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and (p / MODEL_FILE).is_file()
    )


def latest_version_dir(model_dir: Path) -> Path:
    """The newest version's directory (FileNotFoundError when there is none)."""
    versions = list_versions(model_dir)
    if not versions:
        raise FileNotFoundError(f"no model version under {model_dir}")
    return Path(model_dir) / str(versions[-1])


def next_version(model_dir: Path) -> int:
    """The number for a new version: above every integer-named directory (complete or not)."""
    model_dir = Path(model_dir)
    taken = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()] if model_dir.is_dir() else []
    return max(taken, default=0) + 1


def parse_config(text: str):  # -> model_config_pb2.ModelConfig
    """config.pbtxt text -> Triton's ModelConfig protobuf."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def read_version_policy(text: str) -> list[int]:
    """Versions pinned by `version_policy: { specific: ... }`; [] for latest/all/no policy."""
    config = parse_config(text)
    if config.HasField("version_policy") and config.version_policy.WhichOneof("policy_choice") == "specific":
        return sorted(int(v) for v in config.version_policy.specific.versions)
    return []
