"""Issue 27's CLI pass: a user's mistake ends in a clear message and exit 2, never a traceback; `send`
skips files that are not DICOM with a count. Real files, the committed model, real onnxruntime and
a real dcmtk storescp."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from harness.dicom_peers import StoreSCP, storescp  # noqa: F401
from services.cli import app
from tests.support.committed_model import active_committed_version, committed_version_dir, copy_committed_model

ENV = {"COLUMNS": "200"}


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, list(args), env={**ENV, **(env or {})})


def assert_user_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output


@pytest.fixture(scope="module")
def tiny_data(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir()
        for src in sorted((shared_data / "kermany224" / "train" / cls).glob("*.jpeg"))[:8]:
            (root / cls / src.name).symlink_to(src)
    return root


@pytest.fixture
def corrupt_model(tmp_path: Path) -> Path:
    d = shutil.copytree(committed_version_dir(), tmp_path / "corrupt")
    (d / "model.onnx").write_bytes(b"\x08\x07garbage" * 64)
    return d


@pytest.fixture
def resized_model(tmp_path: Path) -> Path:
    """The committed model with a metadata.json that says another input size than the graph has."""
    d = shutil.copytree(committed_version_dir(), tmp_path / "resized")
    meta = json.loads((d / "metadata.json").read_text())
    (d / "metadata.json").write_text(json.dumps({**meta, "input_size": 128}))
    return d


def test_evaluate_mistakes(tmp_path: Path, tiny_data: Path, corrupt_model: Path, resized_model: Path) -> None:
    assert_user_error(run("model", "evaluate", "--data", str(tmp_path / "nowhere")), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_user_error(run("model", "evaluate", "--data", str(tmp_path / "empty")), "no images under")
    base = ["model", "evaluate", "--data", str(tiny_data), "--bootstrap", "0", "--out", str(tmp_path / "r")]
    assert_user_error(run(*base, "--model-dir", str(corrupt_model)), "not a loadable ONNX model")
    assert_user_error(run(*base, "--model-dir", str(resized_model)), "does not run on a 128 px batch")
    assert_user_error(run(*base, "--model-dir", str(tmp_path / "no-model")), "is not a directory")
    assert_user_error(run(*base, "--split", "test", "--split-file", str(tmp_path / "no-split.json")), "no-split.json")


def test_proxy_eval_export_train_mistakes(tmp_path: Path, tiny_data: Path, corrupt_model: Path) -> None:
    assert_user_error(run("model", "proxy-eval", "--model-dir", str(tmp_path / "none")), "is not a directory")
    assert_user_error(run("model", "proxy-eval", "--model-dir", str(corrupt_model)), "not a loadable ONNX")
    export = ["model", "export", "--data", str(tiny_data), "--out", str(tmp_path / "staging")]
    assert_user_error(run(*export, "--checkpoint", str(tmp_path / "none.pt")), "no checkpoint at")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    assert_user_error(run(*export, "--checkpoint", str(tmp_path / "notes.pt")), "is not a checkpoint written by")
    (tmp_path / "empty").mkdir()
    train = ["model", "train", "--out", str(tmp_path / "staging"), "--split-file", str(tmp_path / "s.json")]
    assert_user_error(run(*train, "--data", str(tmp_path / "empty"), "--epochs", "1"), "no images under")
    assert_user_error(run(*train, "--data", str(tmp_path / "nowhere")), "does not exist")


def test_train_and_export_without_torch_name_the_train_extra(
    tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails as on a serving install
    for mod in [m for m in sys.modules if m.startswith("services.inference.tools.training.")]:
        monkeypatch.delitem(sys.modules, mod)
    result = run("model", "train", "--data", str(tiny_data), "--out", str(tmp_path / "s"), "--epochs", "1")
    assert_user_error(result, "needs PyTorch", "[train]")
    (tmp_path / "c.pt").write_bytes(b"x")
    assert_user_error(run("model", "export", "--checkpoint", str(tmp_path / "c.pt")), "needs PyTorch")


def test_drift_reference_and_gate_evaluate_mistakes(tmp_path: Path, tiny_data: Path) -> None:
    repo = tmp_path / "repo"
    copy_committed_model(repo / "pneumonia", [active_committed_version()])  # drift-reference's default
    drift = ["model", "drift-reference", "--repository", str(repo), "--data", str(tiny_data), "--split", "all"]
    assert_user_error(run(*drift, "--version", "99"), "no version 99")
    assert_user_error(run(*drift), "at least 50 predictions")  # 16 images
    assert_user_error(run(*drift[:-4], "--data", str(tmp_path / "nowhere")), "does not exist")
    gate = ["model", "gate-evaluate", "--data", str(tiny_data), "--limit", "4"]
    assert_user_error(run(*gate, "--gate", str(tmp_path / "no-gate.json")), "does not exist")
    (tmp_path / "gate.json").write_text("{not json")
    assert_user_error(run(*gate, "--gate", str(tmp_path / "gate.json")), "not valid JSON")


def test_recalibrate_and_export_reviews_mistakes(tmp_path: Path) -> None:
    env = {"PT_DATA_DIR": str(tmp_path / "var")}
    assert_user_error(run("triage", "recalibrate", "--rollback", env=env), "nothing to roll back", "nothing changed")
    assert_user_error(run("triage", "recalibrate", "--activate", "99", env=env), "no site calibration version 99")
    out = tmp_path / "missing" / "reviews.jsonl"
    assert_user_error(run("triage", "export-reviews", "--out", str(out), env=env), "does not exist")
    assert not out.parent.exists()


def test_send_skips_files_that_are_not_dicom_with_a_count(shared_data: Path, storescp: StoreSCP) -> None:  # noqa: F811
    folder = shared_data / "dicom"
    assert (folder / "LABELS.txt").is_file()
    n_dicom = len(list(folder.glob("*.dcm")))
    result = run("send", str(folder), "--port", str(storescp.port), "--called-ae", storescp.aet)
    assert result.exit_code == 0, result.output
    assert "skipped 1 file(s) that are not DICOM" in result.output and "LABELS.txt" in result.output
    assert "0x0000" in result.output and "not sent" not in result.output
    assert len(storescp.received()) == n_dicom
