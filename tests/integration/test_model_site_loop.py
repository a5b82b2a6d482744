"""The site loop (issue 28): `model adapt` (locked set first, guard, lineage, evidence beside the base
version), `model shadow-add`, `model compare`, `model promote` (the rule; recorded; undone by promoting
the previous version). Tiny: ~90 real X-rays, one epoch, few bootstrap resamples. The base is a
committed version read from the repository (see BASE), never a hard-coded number."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from services.inference.deploy import active_version
from services.inference.tools import site_loop
from services.inference.tools.adapt import AdaptRecipe, NotEnoughLabels, adapt, net_from_onnx
from tests.support.committed_model import committed_version_dir, committed_versions, copy_committed_model


def _members(version: int) -> int:
    net = json.loads((committed_version_dir(version) / "metadata.json").read_text()).get("training", {}).get("net")
    return int((net or {}).get("members", 1))


# `model adapt` fine-tunes one network (net_from_onnx reads a single PneumoniaNet back from the ONNX):
# the base is the newest committed version that is one network, not an ensemble of several
BASE = max(v for v in committed_versions() if _members(v) == 1)
CANDIDATE = BASE + 1  # the number shadow-add gives the adapted version in a repository holding BASE


def _site(shared_data: Path, out: Path, per_class: int) -> Path:
    """`per_class` images of each class, one per patient."""
    from services.inference.tools.training.dataset import scan_folder

    seen: set[str] = set()
    counts = {0: 0, 1: 0}
    for r in scan_folder(shared_data / "kermany224" / "train"):
        if r.patient in seen or counts[r.label] >= per_class:
            continue
        seen.add(r.patient)
        counts[r.label] += 1
        dst = out / ("PNEUMONIA" if r.label else "NORMAL") / r.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(r.path, dst)
    return out


@pytest.fixture
def live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    repo = tmp_path / "live"
    copy_committed_model(repo / "pneumonia", [BASE])
    monkeypatch.setenv("PT_DATA_DIR", str(tmp_path / "var"))
    return repo


def test_onnx_weights_read_back(live: Path) -> None:
    import onnxruntime as ort
    import torch

    net, meta = net_from_onnx(live / "pneumonia" / str(BASE))
    x = np.random.default_rng(0).normal(size=(2, 1, meta["input_size"], meta["input_size"])).astype(np.float32)
    want = ort.InferenceSession(str(live / "pneumonia" / str(BASE) / "model.onnx")).run(["logit"], {"image": x})[0]
    with torch.no_grad():
        got = net(torch.from_numpy(x))[0].numpy()
    assert np.allclose(got, want, atol=1e-3), (got, want)


def test_guard_refuses_too_few_labels(live: Path, shared_data: Path, tmp_path: Path) -> None:
    site = _site(shared_data, tmp_path / "few", 12)
    with pytest.raises(NotEnoughLabels, match="too few site labels"):
        adapt([site], live / "pneumonia" / str(BASE), tmp_path / "staging", "tiny", AdaptRecipe(epochs=1))


def test_promotion_rule() -> None:
    def comparison(auc: float, sens: float, spec: float) -> dict:
        return {
            "difference": {
                "auc": {"ci95": [auc, auc + 0.02]},
                "sensitivity": {"ci95": [sens, sens + 0.05]},
                "specificity": {"ci95": [spec, spec + 0.05]},
            }
        }

    assert site_loop.promotion_verdict(comparison(0.001, -0.03, -0.02))["passed"]  # better AUC
    assert site_loop.promotion_verdict(comparison(-0.01, -0.03, 0.01))["passed"]  # better specificity
    assert not site_loop.promotion_verdict(comparison(0.01, -0.08, 0.05))["passed"]  # sensitivity inferior
    assert not site_loop.promotion_verdict(comparison(-0.001, 0.0, -0.001))["passed"]  # nothing better


def test_adapt_shadow_compare_promote_undo(
    live: Path, shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.inference.cli import app

    site = _site(shared_data, tmp_path / "site", 45)
    recipe = AdaptRecipe(epochs=1, bootstrap=40, min_per_class=15, min_locked_per_class=8)
    vdir = adapt([site], live / "pneumonia" / str(BASE), tmp_path / "staging", "siteA", recipe)
    meta = json.loads((vdir / "metadata.json").read_text())
    lineage = meta["site_adaptation"]
    assert lineage["base_version"] == str(BASE) and lineage["seed"] == 1234 and lineage["wall_seconds"] > 0
    assert lineage["sources"][0]["images"] == 90 and len(lineage["sources"][0]["sha256"]) == 64
    locked = json.loads((vdir / "locked_test_set.json").read_text())
    n_locked = len(locked["images"])
    assert locked["counts"]["NORMAL"] >= 8 and locked["counts"]["PNEUMONIA"] >= 8
    assert lineage["n_fine_tune"] + n_locked == 90  # never trained on the locked set
    # the calibration and threshold come from the same pool, scored out of fold
    assert lineage["n_calibration"] == lineage["n_fine_tune"] and lineage["calibration_folds"] == 4
    assert meta["calibration_details"]["fitted_on"].startswith("out-of-fold logits")
    c = meta["metrics"]["locked_site_test"]
    assert c["candidate"]["version"] == meta["version"] and c["reference"]["version"] == str(BASE)
    assert c["n_images"] == n_locked and len(c["difference"]["auc"]["ci95"]) == 2
    # what the ops page plots: ROC with the operating point, reliability bins over every locked image
    for name in ("candidate", "reference"):
        assert c["curves"][name]["roc"][0] == [0.0, 0.0] and c["curves"][name]["roc"][-1] == [1.0, 1.0]
        assert sum(n for _, _, n in c["curves"][name]["reliability"]) == n_locked
    # the locked set is reused by the next candidate of the site, however the labels grew
    assert site_loop.load_or_carve("siteA", [], 0.5, 1)[0]["images"] == locked["images"]

    runner = CliRunner()
    out = runner.invoke(app, ["model", "shadow-add", "--model-dir", str(vdir), "--repository", str(live)])
    assert out.exit_code == 0, out.output
    assert active_version(live, "pneumonia") == BASE
    assert (live / "pneumonia" / str(CANDIDATE) / "locked_test_set.json").exists()
    out = runner.invoke(app, ["model", "compare", "--repository", str(live), "--bootstrap", "20"])
    assert out.exit_code == 0, out.output
    assert f"version {CANDIDATE} against the active version {BASE}" in out.output and "promotion rule" in out.output

    # the rule decides; a refusal changes nothing
    monkeypatch.setattr(site_loop, "promotion_verdict", lambda c, margin=0.05: {"passed": False, "reasons": ["x"]})
    out = runner.invoke(app, ["model", "promote", str(CANDIDATE), "--reason", "site A", "--repository", str(live)])
    assert out.exit_code == 3 and active_version(live, "pneumonia") == BASE, out.output
    monkeypatch.setattr(site_loop, "promotion_verdict", lambda c, margin=0.05: {"passed": True, "reasons": []})
    monkeypatch.setenv("PT_USER", "ml-engineer")
    promote = ["model", "promote", str(CANDIDATE), "--reason", "better on site A", "--repository", str(live)]
    out = runner.invoke(app, promote)
    assert out.exit_code == 0 and active_version(live, "pneumonia") == CANDIDATE, out.output
    entry = json.loads((live / "pneumonia" / "promotions.jsonl").read_text().splitlines()[-1])
    assert entry["user"] == "ml-engineer" and entry["reason"] == "better on site A" and entry["previous"] == BASE
    # undo: the previous version has no locked set, but it was active before
    out = runner.invoke(app, ["model", "promote", str(BASE), "--reason", "undo", "--repository", str(live)])
    assert out.exit_code == 0 and active_version(live, "pneumonia") == BASE, out.output
