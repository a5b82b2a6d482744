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

from services.aggregator.config import AggregatorSettings
from services.aggregator.service import Aggregator
from services.system.rabbitmq import RabbitNode
from tests.integration.test_aggregator_outputs import flag_a_study, shared_dicom, signed_in_client
from tests.support.aggregator_service import write_test_policy

LIVE = Path(__file__).resolve().parents[2] / "deploy" / "triton" / "model_repository" / "pneumonia"


def _metrics(auc: float, sens: float, spec: float, version: str) -> dict:
    return {
        "version": version,
        "auc": auc,
        "auc_ci95": [auc - 0.01, auc + 0.01],
        "sensitivity": sens,
        "sensitivity_ci95": [sens - 0.02, sens + 0.02],
        "specificity": spec,
        "specificity_ci95": [spec - 0.03, spec + 0.03],
        "ece": 0.04,
        "threshold": 0.5,
    }


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
    meta["metrics"]["locked_site_test"] = {
        "n_images": 180,
        "n_patients": 150,
        "n_pneumonia": 110,
        "bootstrap": 500,
        "candidate": _metrics(0.987, 0.96, 0.91, "3"),
        "reference": _metrics(0.970, 0.99, 0.63, "2"),
        "difference": {
            "auc": {"value": 0.017, "ci95": [0.006, 0.029]},
            "sensitivity": {"value": -0.03, "ci95": [-0.045, -0.01]},
            "specificity": {"value": 0.28, "ci95": [0.19, 0.37]},
        },
        "agreement": 0.86,
    }
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
        v3 = next(v for v in repo["versions"] if v["version"] == 3)
        assert v3["site"] == "hospital-a" and v3["locked"]["difference"]["specificity"]["value"] == 0.28
        assert repo["promotions"][0]["reason"] == "test"
        assert "site hospital-a, base v2, 180 images" in page.text
        assert "specificity +0.280" in page.text
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
