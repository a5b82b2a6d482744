"""The committed model repository (deploy/triton/model_repository/pneumonia), read rather than assumed.

Tests take the version numbers they need from here (which versions are committed, which one the
committed config.pbtxt serves, the one to roll back to) and build the expected CLI messages from
them, so committing a new newest version needs no test edit. `copy_committed_model` copies only the
versions a test uses.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMITTED_REPOSITORY = REPO_ROOT / "deploy" / "triton" / "model_repository"
COMMITTED_MODEL = COMMITTED_REPOSITORY / "pneumonia"

# what a deploy or a promotion leaves beside the versions: never part of a copy
_NOT_COPIED = shutil.ignore_patterns(".deploy.lock", "*.jsonl")


def committed_versions() -> list[int]:
    """The committed versions, ascending (directories with a model.onnx). Asserts there is one:
    the committed model is part of the repository."""
    from services.inference.repository import list_versions

    versions = list_versions(COMMITTED_MODEL)
    assert versions, f"no committed model version under {COMMITTED_MODEL} (it is part of the repository)"
    return versions


def newest_committed_version() -> int:
    return committed_versions()[-1]


def active_committed_version() -> int:
    """The version the committed config.pbtxt serves: its pin, else the newest."""
    from services.inference.deploy import active_version

    version = active_version(COMMITTED_REPOSITORY, "pneumonia")
    assert version is not None, f"no committed model version under {COMMITTED_MODEL}"
    return version


def rollback_committed_version() -> int:
    """The newest committed version older than the active one: what a roll-back goes to."""
    active = active_committed_version()
    older = [v for v in committed_versions() if v < active]
    assert older, f"a roll-back needs a committed version older than the active version {active}"
    return older[-1]


def committed_version_dir(version: int | None = None) -> Path:
    """A committed version's directory (default: the active one)."""
    vdir = COMMITTED_MODEL / str(active_committed_version() if version is None else version)
    assert (vdir / "model.onnx").is_file(), f"{vdir} is not a committed model version"
    return vdir


def copy_committed_model(model_dir: Path, versions: Iterable[int] | None = None) -> Path:
    """A live copy at `model_dir` (…/pneumonia): config.pbtxt and the given versions (default: all),
    without the deploy lock and the deploy / promotion logs. Returns `model_dir`."""
    wanted = committed_versions() if versions is None else sorted(set(versions))
    model_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(COMMITTED_MODEL / "config.pbtxt", model_dir / "config.pbtxt")
    for version in wanted:
        shutil.copytree(committed_version_dir(version), model_dir / str(version), ignore=_NOT_COPIED)
    return model_dir
