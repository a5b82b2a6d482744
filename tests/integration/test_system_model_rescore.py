"""Issue 27's done-when, through the real services (ingest, inference, aggregator as processes on a
real RabbitMQ node; dcmtk storescu sends; the real `pneumotriage` CLI): a bad model is refused by
`model deploy` with its figures; forced through with a reason it judges real X-rays; after the
roll-back to the committed active version (`model deploy --version N`, which offers the re-score)
and a restart of inference, `pneumotriage triage rescore --model-version N+1` re-flags every study
the withdrawn version judged with version N, each audit trail saying why, while a study a clinician
confirmed keeps the clinician's flag and is listed for review. N is read from the committed model
repository (the version its config.pbtxt serves), never assumed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.rabbitmq import RabbitNode
from harness.system_harness import SystemHarness
from harness.system_scenario import CLINICIAN, make_batch
from harness.wait import eventually
from tests.support.committed_model import active_committed_version, copy_committed_model
from tests.support.triton import exported_candidate

N_IMAGES = 6
SERVICES = ("ingest", "inference", "aggregator")


@pytest.fixture
def reference_data(shared_data: Path, tmp_path: Path) -> Path:
    """64 real images, 32 per class: the quality gate's reference set, small enough to be quick."""
    root = tmp_path / "reference"
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir(parents=True)
        for src in sorted((shared_data / "kermany224" / "train" / cls).glob("*.jpeg"))[:32]:
            (root / cls / src.name).symlink_to(src)
    return root


class Clinician:
    """A signed-in worklist session (form sign-in with CSRF, as a browser does)."""

    def __init__(self, base_url: str, name: str, password: str) -> None:
        self.client = httpx.Client(base_url=base_url, timeout=30)
        page = self.client.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert token, page.text
        res = self.client.post(
            "/login", data={"username": name, "password": password, "csrf_token": token.group(1), "next": "/worklist"}
        )
        assert res.status_code == 303, res.text
        self.csrf = self.client.get("/api/v1/me").json()["csrf_token"]

    def studies(self) -> dict[str, dict[str, Any]]:
        items = self.client.get("/api/v1/studies", params={"page_size": 500, "lane": "all"}).json()["items"]
        return {s["study_uid"]: s for s in items}

    def history(self, study: str) -> list[dict[str, Any]]:
        return self.client.get(f"/api/v1/studies/{study}/history").json()

    def confirm(self, study: str) -> None:
        res = self.client.post(
            f"/api/v1/studies/{study}/review", json={"action": "confirm"}, headers={"X-CSRF-Token": self.csrf}
        )
        assert res.status_code == 200, res.text


def test_a_bad_model_is_refused_and_forced_through_is_rescored_away_after_a_rollback(
    rabbit: RabbitNode, shared_data: Path, tmp_path: Path, reference_data: Path
) -> None:
    active = active_committed_version()  # what serves before the bad deploy and after the roll-back
    good, bad_version = str(active), str(active + 1)
    live = tmp_path / "live"
    copy_committed_model(live / "pneumonia", [active])  # the only version the run serves
    bad = exported_candidate(tmp_path / "export", seed=7)  # random weights: the "1-epoch" model
    batch = make_batch(shared_data, tmp_path / "dicom", N_IMAGES)
    system = SystemHarness(
        rabbit, tmp_path / "system", services=SERVICES, env={"PT_INFERENCE_MODEL_REPOSITORY": str(live)}
    )
    deploy = ["model", "deploy", "--repository", str(live), "--reference-data", str(reference_data)]
    deploy += ["--reference-split", "all"]

    refused = system.cli(*deploy, "--model-dir", str(bad), check=False)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "refused by the quality gate" in refused.stdout and "AUC" in refused.stdout
    assert f"active (v{good})" in refused.stdout  # the figures of both
    forced = system.cli(*deploy, "--model-dir", str(bad), "--force", "--reason", "issue 27 drill")
    assert "forced past the quality gate" in forced.stdout
    assert f"version {bad_version} added and pinned (was version {good})" in forced.stdout

    with system:  # starts the services, stops them at the end
        system.cli("aggregator", "add-user", CLINICIAN[0], "--role", "clinician", "--password", CLINICIAN[1])
        sent = system.send(batch.paths)
        assert len(sent.acked) == N_IMAGES, sent.refused
        clinician = Clinician(system.url("aggregator"), *CLINICIAN)

        seen: dict[str, Any] = {}

        def all_judged_by(version: str) -> dict[str, dict[str, Any]] | None:
            studies = seen["studies"] = clinician.studies()
            ok = set(studies) == batch.studies and all(s["model_version"] == version for s in studies.values())
            return studies if ok else None

        def state(version: str) -> str:
            flags = sorted((s["flag"], s["model_version"]) for s in seen.get("studies", {}).values())
            return f"every study judged by version {version}; {len(batch.studies)} studies sent, seen {flags}"

        judged = eventually(
            lambda: all_judged_by(bad_version), timeout=180, interval=1, what=lambda: state(bad_version)
        )
        reviewed = sorted(judged)[0]
        clinician.confirm(reviewed)
        reviewed_flag = judged[reviewed]["flag"]

        rollback = system.cli("model", "deploy", "--repository", str(live), "--version", good)
        assert f"version {good} pinned (was version {bad_version})" in rollback.stdout
        assert f"pneumotriage triage rescore --model-version {bad_version}" in rollback.stdout  # offered
        system.restart("inference")  # the embedded runtime serves the pinned version from its start

        out = system.cli(
            "triage", "rescore", "--model-version", bad_version, "--reason", "withdrawn: failed quality gate"
        )
        assert f"judged {N_IMAGES} images in {len(batch.studies)} studies" in out.stdout, out.stdout
        assert reviewed in out.stdout and "carry a clinician's flag" in out.stdout
        assert f"asked inference to re-score {N_IMAGES} of {N_IMAGES} images" in out.stdout

        rescored = eventually(lambda: all_judged_by(good), timeout=180, interval=1, what=lambda: state(good))
        assert rescored[reviewed]["flag"] == reviewed_flag  # the clinician's flag stays
        for study in batch.studies:
            last = clinician.history(study)[0]  # newest first
            assert f"re-scored by model version {good}, replacing version {bad_version}" in last["reason"], last
            assert "withdrawn: failed quality gate" in last["reason"]
        assert "policy says" in clinician.history(reviewed)[0]["reason"]

        again = system.cli("triage", "rescore", "--model-version", bad_version)
        assert "nothing to re-score" in again.stdout  # no study rests on the withdrawn version any more
