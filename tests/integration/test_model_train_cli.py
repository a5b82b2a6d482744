"""`pneumotriage model train | export | evaluate` end to end on a few real images (tiny and fast)."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from services.inference.tools.model_cli import app


@pytest.fixture(scope="module")
def tiny_data(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-data")
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir()
        for src in sorted((shared_data / "kermany224" / "train" / cls).glob("*.jpeg"))[:24]:
            (root / cls / src.name).symlink_to(src)
    return root


def test_train_export_evaluate(tiny_data: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    repo, ckpt, split = tmp_path / "repo", tmp_path / "ckpt.pt", tmp_path / "split.json"
    common = ["--data", str(tiny_data), "--out", str(repo), "--split-file", str(split)]
    result = runner.invoke(
        app, ["model", "train", *common, "--checkpoint", str(ckpt), "--epochs", "1", "--input-size", "64"]
    )
    assert result.exit_code == 0, result.output
    v1 = repo / "pneumonia" / "1"
    meta = json.loads((v1 / "metadata.json").read_text())
    assert meta["input_size"] == 64 and meta["train_seconds"] > 0 and "test" in meta["metrics"]
    assert meta["onnx_check"]["max_abs_diff_logit"] < 1e-4
    assert split.exists() and (repo / "pneumonia" / "config.pbtxt").exists()
    session = ort.InferenceSession(str(v1 / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [1, 64, 64]

    result = runner.invoke(app, ["model", "export", "--checkpoint", str(ckpt), *common[:4], "--split-file", str(split)])
    assert result.exit_code == 0, result.output
    assert (repo / "pneumonia" / "2" / "model.onnx").exists()

    out = tmp_path / "report"
    result = runner.invoke(
        app,
        ["model", "evaluate", "--data", str(tiny_data), "--model-dir", str(v1), "--out", str(out), "--bootstrap", "50"],
    )
    assert result.exit_code == 0, result.output
    for name in ("report.json", "predictions.csv", "roc.png", "pr.png", "reliability.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    assert report["n_images"] == 48 and report["n_pneumonia"] == 24
    auc = report["metrics"]["auc"]
    assert 0.0 <= auc["ci95"][0] <= auc["ci95"][1] <= 1.0 and 0.0 <= auc["value"] <= 1.0
    assert set(report["subgroups"]["by_subtype"]) <= {"bacteria", "virus", "pneumonia"}
    assert "224x224" in report["subgroups"]["by_image_size"]

    result = runner.invoke(
        app,
        [
            "model",
            "evaluate",
            "--data",
            str(tiny_data),
            "--model-dir",
            str(v1),
            "--out",
            str(tmp_path / "wide"),
            "--bootstrap",
            "0",
            "--simulate-aspect",
            "1.25",
        ],
    )
    assert result.exit_code == 0, result.output
    wide = json.loads((tmp_path / "wide" / "report.json").read_text())
    assert wide["simulated_aspect"] == 1.25 and list(wide["subgroups"]["by_image_size"]) == ["224x280"]


def test_train_stages_its_version_and_leaves_the_live_repository_alone(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 27: an experiment is never served by default: no `--out` stages it under PT_DATA_DIR."""
    from services.inference.repository import list_versions
    from services.inference.tools.model_cli import DEFAULT_REPOSITORY

    live = DEFAULT_REPOSITORY / "pneumonia"
    before = {p: p.read_bytes() for p in live.rglob("*") if p.is_file() and p.suffix in (".pbtxt", ".json")}
    versions = list_versions(live)
    monkeypatch.setenv("PT_DATA_DIR", str(tmp_path / "var"))
    args = ["--data", str(tiny_data), "--split-file", str(tmp_path / "split.json"), "--epochs", "1"]
    try:
        result = CliRunner().invoke(
            app,
            ["model", "train", *args, "--checkpoint", str(tmp_path / "c.pt"), "--input-size", "64"],
            env={"COLUMNS": "200"},
        )
        assert result.exit_code == 0, result.output
        staged = tmp_path / "var" / "model-staging" / "pneumonia" / "1"
        assert (staged / "model.onnx").is_file() and (staged / "metadata.json").is_file()
        assert "staged" in result.output and f"model deploy --model-dir {staged}" in result.output
        assert "test split" in result.output and "AUC" in result.output  # test metrics printed
        assert list_versions(live) == versions
        assert {p: p.read_bytes() for p in before} == before
    finally:  # on the old behaviour the version landed in the live repository: do not leave it there
        for v in set(list_versions(live)) - set(versions):
            import shutil

            shutil.rmtree(live / str(v))
