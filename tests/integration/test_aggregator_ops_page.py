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
from services.inference.deploy import set_version_policy
from services.inference.tools.site_loop import Scored, paired_comparison
from tests.integration.test_aggregator_outputs import flag_a_study, shared_dicom, signed_in_client
from tests.support.aggregator_service import write_test_policy
from tests.support.committed_model import COMMITTED_MODEL, active_committed_version

# the shipped version (what the committed config.pbtxt serves) and the number of a site candidate
SHIPPED = active_committed_version()
CANDIDATE = SHIPPED + 1


def model_repository(root: Path) -> Path:
    """The shipped version and a site candidate (the next number) as `model adapt` + `shadow-add`
    leave them, pinned to the shipped one."""
    model = root / "pneumonia"
    (model / str(SHIPPED)).mkdir(parents=True)
    shipped_meta = COMMITTED_MODEL / str(SHIPPED) / "metadata.json"
    shutil.copy(shipped_meta, model / str(SHIPPED) / "metadata.json")
    config = set_version_policy((COMMITTED_MODEL / "config.pbtxt").read_text(), SHIPPED)
    assert f"version_policy: {{ specific: {{ versions: [ {SHIPPED} ] }} }}" in config, config
    (model / "config.pbtxt").write_text(config)
    meta = json.loads(shipped_meta.read_text())
    meta["version"] = str(CANDIDATE)
    meta["site_adaptation"] = {"site": "hospital-a", "base_version": str(SHIPPED)}
    # the comparison as model adapt writes it (site_loop.paired_comparison), on synthetic scores
    rng = np.random.default_rng(5)
    y = np.array([0] * 70 + [1] * 110)
    candidate = Scored(str(CANDIDATE), np.clip(np.where(y == 1, 0.8, 0.15) + rng.normal(0, 0.12, len(y)), 0, 1), 0.5)
    reference = Scored(str(SHIPPED), np.clip(np.where(y == 1, 0.85, 0.45) + rng.normal(0, 0.15, len(y)), 0, 1), 0.5)
    patients = [f"p{i}" for i in range(len(y))]
    meta["metrics"]["locked_site_test"] = paired_comparison(y, patients, candidate, reference, n=50)
    (model / str(CANDIDATE)).mkdir()
    (model / str(CANDIDATE) / "metadata.json").write_text(json.dumps(meta))
    entry = {"at": "2026-12-07T10:00:00Z", "kind": "undo", "version": SHIPPED, "previous": CANDIDATE}
    entry |= {"user": "mle", "reason": "test"}
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
        assert (repo["pinned"], repo["served"]) == (SHIPPED, SHIPPED)
        shipped_row = next(v for v in repo["versions"] if v["version"] == SHIPPED)
        shipped = json.loads((COMMITTED_MODEL / str(SHIPPED) / "metadata.json").read_text())["metrics"]["test"]
        assert shipped_row["test_auc"] == shipped["auc"]["value"]
        assert shipped_row["test_specificity"] == shipped["specificity"]["value"]
        site_row = next(v for v in repo["versions"] if v["version"] == CANDIDATE)
        spec_gain = site_row["locked"]["difference"]["specificity"]["value"]
        assert site_row["site"] == "hospital-a" and spec_gain > 0.2
        assert repo["promotions"][0]["reason"] == "test"
        assert f"site hospital-a, base v{SHIPPED}, 180 images" in page.text
        assert f"specificity {spec_gain:+.3f}" in page.text
        # the plots: both ROC curves with their operating points, both reliability diagrams
        assert f'id="plots-v{CANDIDATE}"' in page.text and page.text.count("<polyline") == 2
        assert f'aria-label="reliability diagram of version {CANDIDATE} and its base"' in page.text
        plots = site_row["locked"]["plots"]
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
