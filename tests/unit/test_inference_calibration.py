"""Calibration as stored in metadata.json, applied by the inference service."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from services.inference.runtime import Calibration, ModelNotFound, ModelRepository

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_temperature_scaling_is_sigmoid_of_logit_over_t() -> None:
    cal = Calibration.from_metadata({"method": "temperature", "temperature": 1.7})
    for z in (-40.0, -3.2, -0.1, 0.0, 0.4, 2.5, 40.0):
        assert float(cal.apply(z)) == pytest.approx(1.0 / (1.0 + math.exp(-z / 1.7)), abs=1e-15)
    p = cal.apply(np.array([-800.0, 800.0]))
    assert np.all(np.isfinite(p)) and 0.0 <= p[0] < 1e-100 and p[1] == 1.0


def test_platt_and_isotonic_and_none() -> None:
    platt = Calibration.from_metadata({"method": "platt", "a": 0.5, "b": -1.0})
    assert float(platt.apply(2.0)) == pytest.approx(0.5)
    iso = Calibration.from_metadata({"method": "isotonic", "x": [-2, 0, 2], "y": [0.1, 0.3, 0.9]})
    assert iso.apply(np.array([-5.0, -1.0, 1.0, 9.0])).tolist() == pytest.approx([0.1, 0.2, 0.6, 0.9])
    assert float(Calibration.from_metadata(None).apply(0.0)) == 0.5


@pytest.mark.parametrize(
    "bad",
    [
        {"method": "temperature", "temperature": 0},
        {"method": "temperature", "temperature": -1},
        {"method": "temperature", "temperature": float("nan")},
        {"method": "isotonic", "x": [1, 0], "y": [0.2, 0.4]},
        {"method": "isotonic", "x": [0, 1, 2], "y": [0.2, 0.4]},
        {"method": "histogram"},
    ],
)
def test_malformed_calibration_is_refused(bad: dict) -> None:
    with pytest.raises((ValueError, KeyError)):
        Calibration.from_metadata(bad)


def _version(root: Path, v: int, temperature: float) -> None:
    d = root / "pneumonia" / str(v)
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(b"onnx")
    meta = {"name": "pneumonia", "version": str(v), "input_size": 192, "calibration": {"temperature": temperature}}
    (d / "metadata.json").write_text(json.dumps(meta))


def test_repository_resolves_requested_pinned_or_newest(tmp_path: Path) -> None:
    _version(tmp_path, 1, 1.0)
    _version(tmp_path, 3, 2.0)
    (tmp_path / "pneumonia" / "7").mkdir()  # no model.onnx: not a version
    repo = ModelRepository(tmp_path, "pneumonia")
    assert repo.versions() == [1, 3]
    assert repo.resolve() == "3"
    assert repo.resolve("1") == "1"
    with pytest.raises(ModelNotFound):
        repo.resolve("2")
    (tmp_path / "pneumonia" / "config.pbtxt").write_text(
        'name: "pneumonia"\nversion_policy: { specific: { versions: [ 1 ] } }\n'
    )
    assert ModelRepository(tmp_path, "pneumonia").resolve() == "1"
    assert repo.get("3").calibration.temperature == 2.0
    with pytest.raises(ModelNotFound):
        ModelRepository(tmp_path / "empty", "pneumonia").resolve()


def test_committed_model_metadata_is_usable_by_the_service() -> None:
    repo = ModelRepository(REPO_ROOT / "deploy" / "triton" / "model_repository", "pneumonia")
    assert repo.versions(), "no committed model version under deploy/triton/model_repository/pneumonia"
    model = repo.get(repo.resolve())
    assert model.input_size > 0
    assert model.calibration.method in ("temperature", "isotonic", "platt")
    assert 0.0 < float(model.calibration.apply(0.0)) < 1.0
