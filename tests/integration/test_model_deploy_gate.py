"""`pneumotriage model deploy` (issue 27): nothing changes unless the runtime loaded the version, a
candidate worse than the active version is refused with its figures unless forced with a reason,
every attempt is recorded, and the deploy writes the drift reference. Real onnxruntime, the
committed model versions and real images from the shared data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli import app
from services.inference.deploy import read_registry, read_version_policy, set_version_policy
from services.inference.repository import list_versions
from tests.support.committed_model import (
    active_committed_version,
    committed_version_dir,
    copy_committed_model,
    rollback_committed_version,
)
from tests.support.triton import exported_candidate

ENV = {"COLUMNS": "200"}
# the committed versions this file uses (read from the repository, never assumed): the active one,
# the one a roll-back goes to, and the number a deploy gives the next one
ACTIVE = active_committed_version()
OLDER = rollback_committed_version()
NEXT = ACTIVE + 1


@pytest.fixture(scope="module")
def reference_data(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 real images, 32 per class (enough for a drift reference, fast to evaluate)."""
    root = tmp_path_factory.mktemp("reference")
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir()
        for src in sorted((shared_data / "kermany224" / "train" / cls).glob("*.jpeg"))[:32]:
            (root / cls / src.name).symlink_to(src)
    return root


@pytest.fixture
def live(tmp_path: Path) -> Path:
    """A live repository like the committed one: its active version and the one before it, the
    committed config.pbtxt serving the newest (no pin)."""
    repo = tmp_path / "live"
    copy_committed_model(repo / "pneumonia", [OLDER, ACTIVE])
    assert list_versions(repo / "pneumonia") == [OLDER, ACTIVE]
    assert read_version_policy((repo / "pneumonia" / "config.pbtxt").read_text()) == []
    return repo


def snapshot(repo: Path) -> dict[str, bytes]:
    """Every file that decides what is served (the registry and the lock file aside)."""
    return {
        str(p.relative_to(repo)): p.read_bytes()
        for p in sorted(repo.rglob("*"))
        if p.is_file() and p.name not in ("deployments.jsonl", ".deploy.lock")
    }


def deploy(repo: Path, *args: str, reference: Path | None = None):
    ref = ["--reference-data", str(reference), "--reference-split", "all"] if reference else []
    return CliRunner().invoke(app, ["model", "deploy", "--repository", str(repo), *ref, *args], env=ENV)


def test_a_failed_triton_load_moves_no_pin_and_adds_no_version(live: Path, tmp_path: Path) -> None:
    config = live / "pneumonia" / "config.pbtxt"
    config.write_text(set_version_policy(config.read_text(), ACTIVE))
    before = snapshot(live)

    result = deploy(live, "--version", str(OLDER), "--triton-url", "127.0.0.1:1", "--timeout", "5")
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # a message, not a traceback
    assert "nothing changed" in result.output and "127.0.0.1:1" in result.output
    assert snapshot(live) == before  # still pinned to the active version

    candidate = shutil.copytree(committed_version_dir(ACTIVE), tmp_path / "staged-copy-of-active")
    result = deploy(live, "--model-dir", str(candidate), "--triton-url", "127.0.0.1:1", "--timeout", "5")
    assert result.exit_code == 1, result.output
    assert snapshot(live) == before  # the copied version NEXT was removed again
    outcomes = [(r["action"], r["outcome"]) for r in read_registry(live, "pneumonia")]
    assert outcomes == [("rollback", "failed"), ("deploy", "failed")]


def test_the_message_names_the_version_that_was_active(live: Path, tmp_path: Path, reference_data: Path) -> None:
    candidate = shutil.copytree(committed_version_dir(ACTIVE), tmp_path / "staged-copy-of-active")
    result = deploy(live, "--model-dir", str(candidate), reference=reference_data)
    assert result.exit_code == 0, result.output
    assert f"version {NEXT} added and pinned (was version {ACTIVE})" in result.output
    assert read_version_policy((live / "pneumonia" / "config.pbtxt").read_text()) == [NEXT]
    meta = json.loads((live / "pneumonia" / str(NEXT) / "metadata.json").read_text())
    gate = meta["quality_gate"]
    assert gate["passed"] and gate["candidate"]["auc"] == pytest.approx(gate["active"]["auc"])
    assert gate["reference"]["n_images"] == 64 and gate["active"]["version"] == str(ACTIVE)
    ref = json.loads((live / "pneumonia" / str(NEXT) / "drift_reference.json").read_text())
    assert ref["model_version"] == str(NEXT) and ref["n"] == 64

    result = deploy(live, "--version", str(ACTIVE))  # roll back: the embedded runtime loads it first
    assert result.exit_code == 0, result.output
    assert f"version {ACTIVE} pinned (was version {NEXT})" in result.output
    assert read_version_policy((live / "pneumonia" / "config.pbtxt").read_text()) == [ACTIVE]


def test_a_worse_candidate_is_refused_with_its_figures_unless_forced_with_a_reason(
    live: Path, tmp_path: Path, reference_data: Path
) -> None:
    bad = exported_candidate(tmp_path / "export", seed=7)  # random weights
    before = snapshot(live)
    result = deploy(live, "--model-dir", str(bad), reference=reference_data)
    assert result.exit_code == 3, result.output
    assert "refused by the quality gate" in result.output and "AUC" in result.output
    assert f"active (v{ACTIVE})" in result.output  # the figures of both
    assert snapshot(live) == before

    result = deploy(live, "--model-dir", str(bad), "--force", reference=reference_data)
    assert result.exit_code == 2 and "--reason" in result.output
    assert snapshot(live) == before

    result = deploy(live, "--model-dir", str(bad), "--force", "--reason", "site trial 12", reference=reference_data)
    assert result.exit_code == 0, result.output
    assert "forced past the quality gate" in result.output
    assert read_version_policy((live / "pneumonia" / "config.pbtxt").read_text()) == [NEXT]
    meta = json.loads((live / "pneumonia" / str(NEXT) / "metadata.json").read_text())
    assert meta["quality_gate"]["forced"] is True and meta["quality_gate"]["reason"] == "site trial 12"
    assert not meta["quality_gate"]["passed"]
    rows = read_registry(live, "pneumonia")
    assert [(r["outcome"], r.get("forced", False)) for r in rows] == [("refused", False), ("ok", True)]
    assert rows[1]["reason"] == "site trial 12" and rows[1]["quality"]["active"]["version"] == str(ACTIVE)
    assert rows[0]["quality"]["candidate"]["auc"] < rows[0]["quality"]["active"]["auc"] - 0.01


def test_deploy_mistakes_are_clear_messages_with_exit_2(live: Path, tmp_path: Path, reference_data: Path) -> None:
    before = snapshot(live)
    result = deploy(live, "--model-dir", str(tmp_path / "no-such-dir"))
    assert result.exit_code == 2 and "is not a directory" in result.output, result.output

    corrupt = shutil.copytree(committed_version_dir(ACTIVE), tmp_path / "corrupt")
    (corrupt / "model.onnx").write_bytes(b"not an onnx graph" * 100)
    result = deploy(live, "--model-dir", str(corrupt), reference=reference_data)
    assert result.exit_code == 2 and "not a loadable ONNX model" in result.output, result.output

    resized = shutil.copytree(committed_version_dir(ACTIVE), tmp_path / "resized")
    meta = json.loads((resized / "metadata.json").read_text())
    (resized / "metadata.json").write_text(json.dumps({**meta, "input_size": 128}))
    result = deploy(live, "--model-dir", str(resized), reference=reference_data)
    assert result.exit_code == 2 and "input_size 128 differs" in result.output, result.output

    result = deploy(live, "--version", str(NEXT))  # not in the repository
    assert result.exit_code == 2 and f"version {NEXT} of pneumonia is not in" in result.output, result.output
    for r in (result,):
        assert isinstance(r.exception, SystemExit)
    assert snapshot(live) == before
