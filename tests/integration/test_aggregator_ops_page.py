"""The operations / ML page (`/ops`, admin; `/api/v1/ops`): SR delivery per destination (issue 23),
the lanes of every stage from a real RabbitMQ (issue 24), and the models: what scored images, what
the repository serves, a site candidate's locked-set comparison and the promotions log as
`model adapt` / `model promote` write them, the site calibration and drift (issue 28).
Before: none of this was on any page; a clinician must not see it."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np

from harness.rabbitmq import RabbitNode
from services.aggregator.config import AggregatorSettings
from services.aggregator.service import Aggregator
from services.inference.tools.site_loop import Scored, paired_comparison
from tests.integration.test_aggregator_outputs import flag_a_study, shared_dicom, signed_in_client
from tests.support.aggregator_service import write_test_policy

LIVE = Path(__file__).resolve().parents[2] / "deploy" / "triton" / "model_repository" / "pneumonia"


def model_repository(root: Path) -> Path:
    """The shipped version 2 and a site candidate 3 as `model adapt` + `shadow-add` leave them, pinned to 2."""
    model = root / "pneumonia"
    (model / "2").mkdir(parents=True)
    shutil.copy(LIVE / "2" / "metadata.json", model / "2" / "metadata.json")
    config = (LIVE / "config.pbtxt").read_text()
    config = config.replace(
        "version_policy: { latest: { num_versions: 1 } }", "version_policy: { specific: { versions: [ 2 ] } }"
    )
    (model / "config.pbtxt").write_text(config)
    meta = json.loads((LIVE / "2" / "metadata.json").read_text())
    meta["version"] = "3"
    meta["site_adaptation"] = {"site": "hospital-a", "base_version": "2"}
    # the comparison as model adapt writes it (site_loop.paired_comparison), on synthetic scores
    rng = np.random.default_rng(5)
    y = np.array([0] * 70 + [1] * 110)
    candidate = Scored("3", np.clip(np.where(y == 1, 0.8, 0.15) + rng.normal(0, 0.12, len(y)), 0, 1), 0.5)
    reference = Scored("2", np.clip(np.where(y == 1, 0.85, 0.45) + rng.normal(0, 0.15, len(y)), 0, 1), 0.5)
    patients = [f"p{i}" for i in range(len(y))]
    meta["metrics"]["locked_site_test"] = paired_comparison(y, patients, candidate, reference, n=50)
    (model / "3").mkdir()
    (model / "3" / "metadata.json").write_text(json.dumps(meta))
    entry = {"at": "2026-12-07T10:00:00Z", "kind": "undo", "version": 2, "previous": 3, "user": "mle", "reason": "test"}
    (model / "promotions.jsonl").write_text(json.dumps(entry) + "\n")
    return root


async def test_ops_page_shows_delivery_lanes_and_models_to_admins_only(
    rabbit: RabbitNode, shared_data: Path, tmp_path: Path
) -> None:
    settings = AggregatorSettings(
        data_dir=tmp_path,
        policy_file=write_test_policy(tmp_path / "policy.yaml"),
        secret_key="test-secret",
        amqp_url=rabbit.url,
        sr_destination="PACS=127.0.0.1:9:NOBODY",
        sr_settle_s=0,
        drift_reference_dir=model_repository(tmp_path / "models"),
        ops_metrics_urls="",
    )
    agg = Aggregator(settings)
    await agg.migrate()
    try:
        dcm, _ = shared_dicom(shared_data, "PNEUMONIA")
        await flag_a_study(agg, dcm)
        assert await agg.send_pending_srs() == 0  # nobody listens on port 9: the breaker opens

        async with contextlib.aclosing(await signed_in_client(agg)) as clinician:
            assert (await clinician.get("/ops")).status_code == 403
            assert (await clinician.get("/api/v1/ops")).status_code == 403

        async with contextlib.aclosing(await signed_in_client(agg, role="admin")) as admin:
            page = await admin.get("/ops")
            data = (await admin.get("/api/v1/ops")).json()
        assert page.status_code == 200, page.text

        (dest,) = data["sr_delivery"]["destinations"]
        assert (dest["name"], dest["destination"], dest["state"], dest["pending"]) == (
            "PACS",
            "NOBODY@127.0.0.1:9",
            "open",
            1,
        )
        assert "NOBODY@127.0.0.1:9" in page.text and "connect" in page.text

        lanes = data["lanes"]
        assert lanes["error"] == ""
        assert {(r["stage"], r["lane"]) for r in lanes["rows"]} == {
            (stage, lane) for stage in ("inference", "labeling", "aggregator") for lane in ("fresh", "backfill")
        }
        assert "aggregator.events.backfill" in {r["queue"] for r in lanes["rows"]}

        models = data["models"]
        (served,) = models["serving_24h"]
        assert served["images"] == 1
        repo = models["repository"]
        assert (repo["pinned"], repo["served"]) == (2, 2)
        v2 = next(v for v in repo["versions"] if v["version"] == 2)
        shipped = json.loads((LIVE / "2" / "metadata.json").read_text())["metrics"]["test"]
        assert v2["test_auc"] == shipped["auc"]["value"] and v2["test_specificity"] == shipped["specificity"]["value"]
        v3 = next(v for v in repo["versions"] if v["version"] == 3)
        spec_gain = v3["locked"]["difference"]["specificity"]["value"]
        assert v3["site"] == "hospital-a" and spec_gain > 0.2
        assert repo["promotions"][0]["reason"] == "test"
        assert "site hospital-a, base v2, 180 images" in page.text
        assert f"specificity {spec_gain:+.3f}" in page.text
        # the plots: both ROC curves with their operating points, both reliability diagrams
        assert 'id="plots-v3"' in page.text and page.text.count("<polyline") == 2
        assert 'aria-label="reliability diagram of version 3 and its base"' in page.text
        plots = v3["locked"]["plots"]
        assert len(plots["candidate"]["roc"].split()) >= 3 and plots["candidate"]["operating_point"]
        assert sum(b["n"] for b in plots["reference"]["reliability"]) == 180
        assert "Diagnostic aid" in page.text or "diagnostic aid" in page.text
        assert models["drift"]["status"]
    finally:
        await agg.engine.dispose()


async def test_ops_page_without_a_broker_still_shows_the_rest(tmp_path: Path) -> None:
    settings = AggregatorSettings(
        data_dir=tmp_path,
        policy_file=write_test_policy(tmp_path / "policy.yaml"),
        secret_key="test-secret",
        amqp_url="amqp://guest:guest@127.0.0.1:9/",
        ops_metrics_urls="",
    )
    agg = Aggregator(settings)
    await agg.migrate()
    try:
        async with contextlib.aclosing(await signed_in_client(agg, role="admin")) as admin:
            page = await admin.get("/ops")
            data = (await admin.get("/api/v1/ops")).json()
        assert page.status_code == 200
        assert data["lanes"]["error"].startswith("broker not reachable")
        assert data["sr_delivery"] is None and "No SR destination" in page.text
        assert data["models"]["repository"]["versions"], "the shipped repository's versions"
    finally:
        await agg.engine.dispose()
