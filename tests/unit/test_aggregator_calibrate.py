"""calibrate: learned fusion weights, thresholds that meet the operating points on the data they
were fitted on, held-out numbers reported, and the CLI writing a policy file the service loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from services.aggregator.flags import HEALTHY, SUSPECTED, URGENT
from services.aggregator.fusion import FEATURES, Evidence, Vote, feature_matrix, fit_weights
from services.aggregator.policy import Policy
from services.aggregator.tools.calibrate import LabeledImage, OperatingPoints, calibrate, load_jsonl, split
from services.core.calibration import sigmoid


def synthetic(n: int = 1500, seed: int = 1) -> list[dict]:
    """Images with a noisy model and a mixed crowd (good, average and near-random annotators)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        y = int(rng.random() < 0.6)
        z = rng.normal(1.2 if y else -1.2, 1.4)
        votes = []
        for k in range(int(rng.integers(0, 5))):
            acc = float(rng.choice([0.9, 0.75, 0.55]))
            said = y if rng.random() < acc else 1 - y
            votes.append(
                {
                    "answer": "pneumonia" if said else "healthy",
                    "confidence": "sure" if rng.random() < 0.7 else "probably",
                    "trust": acc,
                    "annotator": k,
                }
            )
        rows.append(
            {
                "id": f"im{i}",
                "group": f"p{i // 2}",
                "label": y,
                "model_probability": sigmoid(float(z)),
                "votes": votes,
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_fit_weights_are_learned_and_non_negative(tmp_path: Path) -> None:
    images = load_jsonl(write_jsonl(tmp_path / "d.jsonl", synthetic()))
    x = feature_matrix(im.evidence for im in images)
    y = [im.label for im in images]
    w = fit_weights(x, y)
    assert w.learned["model_logit"] and w.learned["human_sure_logodds"]
    assert all(v >= 0 for v in w.weights.values())
    assert w.weights["model_logit"] > 0 and w.weights["human_sure_logodds"] > 0
    # A feature that points the wrong way is dropped, not given a negative weight.
    x_bad = x.copy()
    wrong_way = 1.0 - 2.0 * np.asarray(y) + np.random.default_rng(0).normal(0, 1.0, len(x))
    x_bad[:, FEATURES.index("aggregate_logodds")] = wrong_way
    w_bad = fit_weights(x_bad, y)
    assert w_bad.weights["aggregate_logodds"] == 0.0


def test_fusion_beats_each_source_alone(tmp_path: Path) -> None:
    from sklearn.metrics import roc_auc_score

    images = load_jsonl(write_jsonl(tmp_path / "d.jsonl", synthetic()))
    result = calibrate(images, held_out=0.4, seed=3)
    _, test_idx = split(images, 0.4, 3)
    test = [images[i] for i in test_idx]  # judged on images the weights were not fitted on
    y = np.array([im.label for im in test])
    fused = [result.policy.fusion.posterior(im.evidence) for im in test]
    model = [im.evidence.model_probability for im in test]
    crowd = [im.evidence.human_logodds for im in test]
    assert roc_auc_score(y, fused) > max(roc_auc_score(y, model), roc_auc_score(y, crowd))


def test_thresholds_meet_operating_points_on_fit_data_and_report_held_out(tmp_path: Path) -> None:
    images = load_jsonl(write_jsonl(tmp_path / "d.jsonl", synthetic()))
    ops = OperatingPoints(rule_out_sensitivity=0.95, urgent_ppv=0.9, suspected_ppv=0.85)
    result = calibrate(images, ops, held_out=0.3, seed=0)
    t = result.policy.thresholds
    assert 0.0 <= t.rule_out < t.suspected <= t.urgent <= 1.0
    fit = result.fit_report["flags"]
    assert fit[HEALTHY]["sensitivity"] >= 0.95
    assert fit[HEALTHY]["count"] > 0, "the rule-out clears some studies"
    assert fit[URGENT]["ppv"] >= 0.9 and fit[URGENT]["count"] > 0
    assert fit["URGENT_OR_SUSPECTED"]["ppv"] >= 0.85
    held = result.held_out_report
    assert held is not None and held["images"] > 0
    assert set(held["flags"]) >= {URGENT, SUSPECTED, HEALTHY, "UNCERTAIN"}
    assert result.fit_report["images"] + held["images"] == len(images)
    # no patient on both sides of the split
    fit_idx, test_idx = split(images, 0.3, 0)
    assert not {images[i].group for i in fit_idx} & {images[i].group for i in test_idx}


def test_prevalence_changes_ppv_not_sensitivity(tmp_path: Path) -> None:
    images = load_jsonl(write_jsonl(tmp_path / "d.jsonl", synthetic()))
    a = calibrate(images, held_out=0.0, prevalence=None)
    b = calibrate(images, held_out=0.0, prevalence=0.15, fusion=a.policy.fusion)
    assert b.fit_report["prevalence"] == 0.15
    assert b.fit_report["flags"][HEALTHY]["sensitivity"] >= 0.95
    assert b.policy.thresholds.urgent >= a.policy.thresholds.urgent


def test_cli_calibrate_writes_a_policy_the_service_loads(tmp_path: Path) -> None:
    from services.cli import app

    data = write_jsonl(tmp_path / "labeled.jsonl", synthetic(600, seed=5))
    out = tmp_path / "policy.yaml"
    res = CliRunner().invoke(app, ["triage", "calibrate", "--data", str(data), "--out", str(out), "--seed", "2"])
    assert res.exit_code == 0, res.output
    assert "held out" in res.output
    policy = Policy.load(out)
    assert policy.fusion.learned["model_logit"]
    assert policy.meta["fit"]["flags"][HEALTHY]["sensitivity"] >= 0.95
    assert policy.meta["held_out"]["images"] > 0
    res = CliRunner().invoke(
        app, ["triage", "evaluate", "--data", str(data), "--policy", str(out)], env={"COLUMNS": "200"}
    )
    assert res.exit_code == 0 and "LIKELY_HEALTHY" in res.output


def test_load_jsonl_parses_votes(tmp_path: Path) -> None:
    rows = [{"id": "a", "label": 1, "votes": [{"answer": "ANSWER_PNEUMONIA", "trust": 0.7}]}]
    (im,) = load_jsonl(write_jsonl(tmp_path / "x.jsonl", rows))
    assert isinstance(im, LabeledImage) and im.group == "a"
    assert im.evidence == Evidence(None, (Vote("pneumonia", "sure", 0.7),))
