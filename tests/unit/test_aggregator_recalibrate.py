"""Site recalibration through the aggregator's real store: a site whose healthy images score higher
than at validation (a shifted stream) loses rule-out specificity at fixed sensitivity; refitting
from N confirmed labels (clinician confirm/overrule + high-trust crowd consensus) restores it on the
held-out part of the stream. Plus the minimum-count guard, versions, roll-back, and the running
aggregator applying the active version."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from services.aggregator import site_calibration as sc
from services.aggregator.config import AggregatorSettings
from services.aggregator.flags import HEALTHY, URGENT
from services.aggregator.fusion import Evidence
from services.aggregator.policy import Policy
from services.aggregator.service import Aggregator
from services.aggregator.tools import recalibrate as rc
from services.aggregator.tools.calibrate import OperatingPoints
from services.core.calibration import sigmoid
from services.core.contracts import Answer, LabelAggregate
from tests.support.aggregator_service import (  # noqa: F401
    TEST_POLICY,
    apply_events,
    offline_aggregator_fixture,
    prediction,
    ref,
    write_test_policy,
)


def shifted_site(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels): at validation healthy ~ N(-3, 1.2) and pneumonia ~ N(2.5, 1.2); this
    site's detector moves both up (+2.5 / +1)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.5).astype(int)
    return np.where(y == 1, rng.normal(3.5, 1.2, n), rng.normal(-0.5, 1.2, n)), y


def rule_out(probs: np.ndarray, y: np.ndarray, policy: Policy) -> tuple[float, float]:
    flags = np.array([policy.classify(Evidence(model_probability=float(p)))[0] for p in probs])
    cleared = flags == HEALTHY
    return float((~cleared & (y == 1)).sum() / (y == 1).sum()), float((cleared & (y == 0)).sum() / (y == 0).sum())


async def feed_site(agg: Aggregator, logits: np.ndarray, y: np.ndarray, labeled: int, crowd: int) -> None:
    """Predictions for every image; the first `labeled` get a clinician review, the next `crowd` a
    high-trust crowd consensus; the rest stay unlabeled (held out)."""
    for i, (z, label) in enumerate(zip(logits, y, strict=True)):
        sop, study = f"1.2.826.0.1.55.{i}", f"1.2.826.0.1.56.{i}"
        await apply_events(agg, prediction(sop, float(sigmoid(z)), "1", study=study, logit=float(z)))
        if i < labeled:
            target = URGENT if label == 1 else HEALTHY
            async with agg.sessions() as s:
                from services.aggregator.models import Study

                current = (await s.get(Study, study)).flag  # type: ignore[union-attr]
            action = "confirm" if current == target else "overrule"
            await agg.review(study, "dr-site", action, None if action == "confirm" else target, "")
        elif i < labeled + crowd:
            p = 0.99 if label == 1 else 0.01
            agg_msg = LabelAggregate(
                image=ref(sop, study),
                p_pneumonia=p,
                final_label=Answer.ANSWER_PNEUMONIA if label else Answer.ANSWER_HEALTHY,
                confidence=max(p, 1 - p),
                judgments=5,
                complete=True,
                method="dawid_skene",
                revision=1,
            )
            await apply_events(agg, agg_msg)


@pytest.mark.parametrize("offline_aggregator", [{}], indirect=True)
async def test_recalibration_restores_specificity_at_fixed_sensitivity(offline_aggregator: Aggregator) -> None:
    agg = offline_aggregator
    logits, y = shifted_site(700, seed=3)
    n_fit = 300  # 200 clinician reviews + 100 crowd consensus labels; 400 held out
    await feed_site(agg, logits, y, labeled=200, crowd=100)
    async with agg.sessions() as s:
        labels = await rc.collect_labels(s)
    assert len(labels) == n_fit
    assert {lab.source for lab in labels} == {"clinician", "crowd"}
    assert {lab.sop_uid: lab.label for lab in labels} == {f"1.2.826.0.1.55.{i}": int(y[i]) for i in range(n_fit)}

    cal = rc.fit_site_calibration(labels, TEST_POLICY, bootstrap=60, seed=0)
    held_logits, held_y = logits[n_fit:], y[n_fit:]
    _sens_before, spec_before = rule_out(sigmoid(held_logits), held_y, TEST_POLICY)
    site_policy = Policy(TEST_POLICY.fusion, cal.thresholds)
    sens_after, spec_after = rule_out(np.array([cal.probability(z) for z in held_logits]), held_y, site_policy)

    # the same model at validation (unshifted), same rule: what "restored" means
    rng = np.random.default_rng(11)
    val_y = (rng.random(2000) < 0.5).astype(int)
    val_logits = np.where(val_y == 1, rng.normal(2.5, 1.2, 2000), rng.normal(-3, 1.2, 2000))
    _val_sens, val_spec = rule_out(sigmoid(val_logits), val_y, TEST_POLICY)

    assert spec_before < 0.5 < val_spec, (spec_before, val_spec)  # the shift broke the rule-out
    assert sens_after >= 0.92, sens_after  # target 0.95 on the fit labels; held out within noise
    assert spec_after >= val_spec - 0.1 and spec_after > spec_before + 0.35, (spec_before, spec_after, val_spec)
    ci = cal.meta["ci95_bootstrap"]
    assert ci["a"] is not None and ci["a"][0] <= cal.a <= ci["a"][1]
    assert ci["specificity"] is not None and ci["specificity"][0] < ci["specificity"][1]
    assert cal.meta["labels"] == n_fit and cal.meta["sources"] == {"clinician": 200, "crowd": 100}

    # the rule-out keeps its sensitivity with 80 % confidence (services/core/sensitivity_bound.py):
    # it clears no more than the sample's own 95 % point does, and misses no more held-out pneumonias
    assert cal.meta["operating_points"]["rule_out_confidence"] == rc.SITE_RULE_OUT_CONFIDENCE == 0.8
    plain = rc.fit_site_calibration(labels, TEST_POLICY, OperatingPoints(), bootstrap=0, seed=0)
    plain_policy = Policy(TEST_POLICY.fusion, plain.thresholds)
    sens_plain, spec_plain = rule_out(np.array([plain.probability(z) for z in held_logits]), held_y, plain_policy)
    print(
        f"held out: sensitivity {sens_plain:.3f} -> {sens_after:.3f}, specificity {spec_plain:.3f} -> {spec_after:.3f}"
    )
    assert cal.thresholds.rule_out <= plain.thresholds.rule_out
    assert sens_after >= sens_plain and spec_after <= spec_plain


@pytest.mark.parametrize("offline_aggregator", [{}], indirect=True)
async def test_minimum_count_guard(offline_aggregator: Aggregator) -> None:
    logits, y = shifted_site(80, seed=4)
    await feed_site(offline_aggregator, logits, y, labeled=60, crowd=0)
    async with offline_aggregator.sessions() as s:
        labels = await rc.collect_labels(s)
    with pytest.raises(rc.NotEnoughLabels, match="at least 100"):
        rc.fit_site_calibration(labels, TEST_POLICY)
    rc.fit_site_calibration(labels, TEST_POLICY, min_labels=50, min_per_class=20, bootstrap=0)


async def test_versions_rollback_and_the_aggregator_applies_the_active_one(tmp_path: Path) -> None:
    directory = tmp_path / "site-calibration"
    logits, y = shifted_site(300, seed=5)
    labels = [
        rc.SiteLabel(str(i), float(z), float(sigmoid(z)), int(v), "clinician", "pneumonia", "1")
        for i, (z, v) in enumerate(zip(logits, y, strict=True))
    ]
    first = rc.fit_site_calibration(labels, TEST_POLICY, bootstrap=0)
    sc.save_new_version(directory, first)
    second = rc.fit_site_calibration(labels[:200], TEST_POLICY, bootstrap=0)
    sc.save_new_version(directory, second)
    assert sc.versions(directory) == [1, 2] and sc.active_version(directory) == 2
    assert sc.load_version(directory, 2).meta["previous_active"] == 1

    settings = AggregatorSettings(
        data_dir=tmp_path,
        policy_file=write_test_policy(tmp_path / "policy.yaml"),
        secret_key="test-secret",
        site_calibration_dir=directory,
    )
    agg = Aggregator(settings)
    await agg.migrate()
    try:
        assert agg.site is not None and agg.site.version == 2
        assert agg.policy.thresholds == second.thresholds
        await apply_events(agg, prediction("1.2.826.0.1.57.1", 0.5, "1", study="1.2.826.0.1.58.1", logit=0.0))
        await apply_events(agg, prediction("1.2.826.0.1.57.2", 0.5, "2", study="1.2.826.0.1.58.2", logit=0.0))
        async with agg.sessions() as s:
            ws = await agg.store.load(s, ["1.2.826.0.1.58.1", "1.2.826.0.1.58.2"])
            ev1, _ = agg.store.evidence(ws, "1.2.826.0.1.57.1")
            ev2, _ = agg.store.evidence(ws, "1.2.826.0.1.57.2")
        assert ev1.model_probability == pytest.approx(second.probability(0.0))
        assert ev2.model_probability == 0.5  # another model version: its own calibration
    finally:
        await agg.engine.dispose()

    assert sc.rollback(directory) == 1 and sc.active_version(directory) == 1
    assert sc.rollback(directory) is None and sc.active_version(directory) is None
    assert Aggregator(settings).site is None
    with pytest.raises(ValueError):
        sc.activate(directory, 7)


@pytest.mark.parametrize("offline_aggregator", [{}], indirect=True)
async def test_cli_guard_write_list_and_rollback(
    offline_aggregator: Aggregator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import Result
    from typer.testing import CliRunner

    from services.cli import app

    logits, y = shifted_site(40, seed=6)
    await feed_site(offline_aggregator, logits, y, labeled=0, crowd=40)
    monkeypatch.setenv("PT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("PT_AGGREGATOR_POLICY_FILE", str(tmp_path / "policy.yaml"))
    runner = CliRunner()

    async def invoke(args: list[str]) -> Result:  # the command runs its own event loop: in a thread
        return await asyncio.to_thread(runner.invoke, app, args)

    guarded = await invoke(["triage", "recalibrate"])
    assert guarded.exit_code == 2 and "at least 100" in guarded.output
    assert not (tmp_path / "site-calibration").exists()
    args = ["triage", "recalibrate", "--min-labels", "30", "--min-per-class", "5", "--bootstrap", "20"]
    dry = await invoke([*args, "--dry-run"])
    assert dry.exit_code == 0 and "Platt" in dry.output and not (tmp_path / "site-calibration").exists()
    wrote = await invoke(args)
    assert wrote.exit_code == 0, wrote.output
    assert sc.active_version(tmp_path / "site-calibration") == 1
    listed = await invoke(["triage", "recalibrate", "--list"])
    assert "* v1" in listed.output and "active: v1" in listed.output
    back = await invoke(["triage", "recalibrate", "--rollback"])
    assert back.exit_code == 0 and "none (model calibration)" in back.output
    assert sc.active_version(tmp_path / "site-calibration") is None
