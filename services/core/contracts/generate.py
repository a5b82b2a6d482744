"""Regenerate the Python code for the protobuf contracts with grpcio-tools' bundled protoc."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
PROTO_DIR = REPO_ROOT / "proto"
OUT_DIR = Path(__file__).resolve().parent


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("pneumotriage/v1/*.proto"))


def generate(out_dir: Path = OUT_DIR) -> list[Path]:
    """Run protoc over every .proto under proto/ into out_dir; returns the files written."""
    import grpc_tools  # dev dependency: generation is a developer task
    from grpc_tools import protoc

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    files = [str(p.relative_to(PROTO_DIR)) for p in proto_files()]
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}", *files]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted(p for p in out_dir.rglob("*_pb2.py*"))
