"""`pneumotriage inference predict` runs the service pipeline on real DICOM files; `model deploy`
refuses what it cannot deploy with a clear message and a non-zero exit."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from services.cli import app
from tests.support.inference_service import shared_dicoms
from tests.support.triton import inference_repository_fixture  # noqa: F401


def test_predict_prints_calibrated_probabilities(shared_data: Path, inference_repository: Path) -> None:
    files = shared_dicoms(shared_data)[:3]
    bad = shared_data / "dicom" / "LABELS.txt"
    result = CliRunner().invoke(
        app,
        ["inference", "predict", *map(str, files), str(bad), "--repository", str(inference_repository)],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    for f in files:
        assert f.name in result.output
    assert result.output.count("pneumonia v1") == 3
    assert "undecodable" in result.output  # the text file, reported in its row


def test_deploy_without_a_model_or_version_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["model", "deploy", "--repository", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 2  # a mistake in the request: a message, exit 2 (issue 27)
    assert "--model-dir" in result.output
    result = CliRunner().invoke(
        app, ["model", "deploy", "--repository", str(tmp_path), "--model-dir", str(tmp_path)], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 2 and "config.pbtxt does not exist" in result.output
