"""Results back out: the DICOM Basic Text SR reaches a real Orthanc by C-STORE and Orthanc parses
it (queried back over its REST API); FHIR R4 DiagnosticReport JSON from the API is well formed."""

from __future__ import annotations

import contextlib
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from harness.dicom_peers import Orthanc, orthanc_fixture  # noqa: F401
from services.aggregator.config import AggregatorSettings
from services.aggregator.models import SrDelivery, SrSend, Study
from services.aggregator.service import Aggregator
from services.aggregator.sr import Destination
from services.aggregator.users import all_reviews, upsert_user
from services.aggregator.web.app import COOKIE, create_app
from services.core.auth import WebSessions
from tests.support.aggregator_service import (  # noqa: F401
    apply_events,
    judgment,
    offline_aggregator_fixture,
    prediction,
    received,
)


def shared_dicom(shared_data: Path, label: str) -> tuple[Path, str]:
    """A shared DICOM file of the given class and its sample PatientID."""
    import pydicom

    for line in (shared_data / "dicom" / "LABELS.txt").read_text().splitlines():
        cls, name = line.split()[:2]
        if cls == label:
            path = (shared_data / "dicom" / f"{name}.dcm").resolve()
            return path, str(pydicom.dcmread(path, stop_before_pixels=True).PatientID)
    raise AssertionError(f"no {label} file in the shared DICOM set")


async def flag_a_study(agg: Aggregator, dcm: Path, p: float = 0.97) -> str:
    import pydicom

    ds = pydicom.dcmread(dcm, stop_before_pixels=True)
    study, sop = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
    await apply_events(
        agg,
        received(sop, study, storage_uri=dcm.as_uri()),
        prediction(sop, p, study=study),
        judgment(sop, "j1", True, study=study),
    )
    return study


async def test_sr_reaches_orthanc_and_orthanc_parses_it(orthanc: Orthanc, shared_data: Path, tmp_path: Path) -> None:
    dcm, patient_id = shared_dicom(shared_data, "PNEUMONIA")
    settings = AggregatorSettings(
        data_dir=tmp_path,
        policy_file=tmp_path / "none.yaml",
        sr_destination=f"127.0.0.1:{orthanc.dicom_port}:{orthanc.aet}",
        secret_key="x",
    )
    from tests.support.aggregator_service import write_test_policy

    write_test_policy(settings.policy_file)
    agg = Aggregator(settings)
    await agg.migrate()
    try:
        study = await flag_a_study(agg, dcm)
        assert await agg.send_pending_srs() == 1
        # A retry of the same revision stores the same SOP instance again (no duplicate in PACS).
        async with agg.sessions() as s:
            delivery = (await s.scalars(select(SrDelivery))).one()
            delivery.status = "pending"
            (send,) = (await s.scalars(select(SrSend))).all()  # its one destination's send
            send.status = "pending"
            await s.commit()
        assert await agg.send_pending_srs() == 1
    finally:
        await agg.engine.dispose()

    srs = [i for i in orthanc.instances() if orthanc.instance_tags(i).get("Modality") == "SR"]
    assert len(srs) == 1
    tags = orthanc.instance_tags(srs[0])
    assert tags["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.88.11"
    assert tags["StudyInstanceUID"] == study
    assert tags["PatientID"] == patient_id  # filed under the right patient in PACS
    texts = [item.get("TextValue", "") for item in tags["ContentSequence"]]
    assert any("URGENT" in t for t in texts)
    assert any(t.startswith("0.9") for t in texts), texts  # the fused score
    assert any("not a diagnosis" in t for t in texts)
    # Orthanc indexed it as part of the X-ray's study
    studies = orthanc.get("/studies")
    assert len(studies) == 1 and orthanc.get(f"/studies/{studies[0]}")["MainDicomTags"]["StudyInstanceUID"] == study


@pytest.mark.parametrize(
    "offline_aggregator", [{"sr_destination": "127.0.0.1:9:NOBODY", "sr_settle_s": 0}], indirect=True
)
async def test_unreachable_pacs_keeps_the_sr_pending(offline_aggregator: Aggregator, shared_data: Path) -> None:
    dcm, _ = shared_dicom(shared_data, "NORMAL")
    await flag_a_study(offline_aggregator, dcm, p=0.03)
    assert await offline_aggregator.send_pending_srs() == 0
    async with offline_aggregator.sessions() as s:
        delivery = (await s.scalars(select(SrDelivery).where(SrDelivery.status == "pending"))).one()
    # the failure decoded (sr_delivery.py): nobody listens on that port, so the TCP connect is refused
    assert delivery.attempts == 1 and delivery.last_error.startswith("connect")


def test_destination_parsing() -> None:
    assert Destination.parse("pacs.local:104:PACS") == Destination("pacs.local", 104, "PACS")
    with pytest.raises(ValueError):
        Destination.parse("pacs.local")


async def no_one(_key: str) -> None:
    return None


async def signed_in_client(agg: Aggregator, role: str = "clinician") -> httpx.AsyncClient:
    """A client signed in through the login form as a user of `role`."""
    app = create_app(agg)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://aggregator")
    name = f"user-{role}"
    await upsert_user(name, role, "pw-123456", agg.settings)
    page = await client.get("/login")
    token = page.text.split('name="csrf_token" value="')[1].split('"')[0]
    res = await client.post(
        "/login", data={"username": name, "password": "pw-123456", "csrf_token": token, "next": "/worklist"}
    )
    assert res.status_code == 303
    return client


async def test_fhir_diagnostic_report_is_well_formed(offline_aggregator: Aggregator, shared_data: Path) -> None:
    dcm, patient_id = shared_dicom(shared_data, "PNEUMONIA")
    study = await flag_a_study(offline_aggregator, dcm)
    async with contextlib.aclosing(await signed_in_client(offline_aggregator)) as client:
        res = await client.get(f"/api/v1/studies/{study}/fhir")
    assert res.status_code == 200 and res.headers["content-type"].startswith("application/fhir+json")
    report = res.json()
    assert report["resourceType"] == "DiagnosticReport"
    assert report["status"] in ("registered", "partial", "preliminary", "final", "amended")
    assert report["code"]["coding"][0]["system"] == "http://loinc.org"
    assert "not a diagnosis" in report["code"]["text"]
    contained = {r["id"]: r for r in report["contained"]}
    # subject and every result resolve to contained resources of the right type
    assert contained[report["subject"]["reference"].lstrip("#")]["resourceType"] == "Patient"
    assert contained["patient"]["identifier"][0]["value"] == patient_id
    refs = [r["reference"] for r in report["result"]]
    assert refs and all(ref.startswith("#") for ref in refs)
    for ref in refs:
        obs = contained[ref[1:]]
        assert obs["resourceType"] == "Observation" and obs["status"] == report["status"]
        assert obs["code"]["coding"] and obs["subject"] == report["subject"]
        assert "valueCodeableConcept" in obs or "valueQuantity" in obs
    flag = contained["flag"]["valueCodeableConcept"]["coding"][0]["code"]
    assert flag == "URGENT"
    assert 0.9 <= contained["score"]["valueQuantity"]["value"] <= 1.0
    assert report["identifier"][0]["value"] == f"urn:oid:{study}"


async def test_api_lists_studies_by_urgency_and_reviews_are_exported(
    offline_aggregator: Aggregator, shared_data: Path
) -> None:
    agg = offline_aggregator
    await apply_events(agg, received("9.1.1", "9.1"), prediction("9.1.1", 0.03, study="9.1"))
    await apply_events(agg, received("9.2.1", "9.2"), prediction("9.2.1", 0.97, study="9.2"))
    await apply_events(agg, received("9.3.1", "9.3"), prediction("9.3.1", 0.5, study="9.3"))
    async with contextlib.aclosing(await signed_in_client(agg)) as client:
        res = await client.get("/api/v1/studies", params={"page_size": 2})
        body = res.json()
        assert body["total"] == 3 and [i["flag"] for i in body["items"]] == ["URGENT", "UNCERTAIN"]
        res = await client.get("/api/v1/studies", params={"page": 2, "page_size": 2})
        assert [i["flag"] for i in res.json()["items"]] == ["LIKELY_HEALTHY"]
        res = await client.get("/api/v1/studies", params={"flag": "LIKELY_HEALTHY"})
        assert [i["study_uid"] for i in res.json()["items"]] == ["9.1"]
        me = (await client.get("/api/v1/me")).json()
        # a POST without the CSRF token is refused
        assert (await client.post("/api/v1/studies/9.1/review", json={"action": "confirm"})).status_code == 403
        res = await client.post(
            "/api/v1/studies/9.1/review",
            json={"action": "overrule", "flag": "UNCERTAIN", "comment": "subtle opacity"},
            headers={"X-CSRF-Token": me["csrf_token"]},
        )
        assert res.status_code == 200 and res.json()["flag"] == "UNCERTAIN"
        exported = (await client.get("/api/v1/reviews")).json()
        assert exported["total"] == 1 and exported["items"][0]["sop_instance_uids"] == ["9.1.1"]
        history = (await client.get("/api/v1/studies/9.1/history")).json()
        assert history[0]["source"] == "clinician" and history[0]["flag"] == "UNCERTAIN"
        assert (await client.get("/api/openapi.json")).json()["paths"]["/api/v1/studies"]
    # the same labels through the CLI's export (`pneumotriage triage export-reviews`)
    exported_rows = await all_reviews(agg.settings)
    assert [(r["study_uid"], r["label"], r["action"]) for r in exported_rows] == [("9.1", "cant_tell", "overrule")]
    # the clinician's flag stays when more evidence arrives
    await apply_events(agg, judgment("9.1.1", "jx", False, study="9.1"))
    async with agg.sessions() as s:
        assert (await s.get(Study, "9.1")).flag == "UNCERTAIN"  # type: ignore[union-attr]


async def test_annotators_cannot_reach_the_worklist_or_api(offline_aggregator: Aggregator) -> None:
    # An annotator account (signed in with the right password) is refused by role.
    async with contextlib.aclosing(await signed_in_client(offline_aggregator, role="annotator")) as client:
        assert (await client.get("/api/v1/studies")).status_code == 403
        page = await client.get("/worklist", headers={"accept": "text/html"})
        assert page.status_code == 403 and "Not allowed" in page.text
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(offline_aggregator)), base_url="http://aggregator"
    ) as anonymous:
        assert (await anonymous.get("/api/v1/studies")).status_code == 401
        res = await anonymous.get("/worklist", headers={"accept": "text/html"})
        assert res.status_code == 303 and res.headers["location"].startswith("/login")
        # A validly signed session for a user the aggregator does not know (e.g. a labeling
        # annotator's, were the secret shared) is dropped, not trusted.
        web = WebSessions(
            offline_aggregator.settings.resolved_secret_key(), COOKIE, find_account=no_one, load_account=no_one
        )
        anonymous.cookies.set(COOKIE, web.dump({"csrf": "t", "uid": "ann1", "role": "clinician", "name": "ann1"}))
        assert (await anonymous.get("/api/v1/studies")).status_code == 401
        health = await anonymous.get("/healthz")  # no broker in this test: degraded, and says why
        assert health.status_code == 503
        assert health.json()["checks"]["database"] is True and health.json()["checks"]["broker"] is False
        metrics = (await anonymous.get("/metrics")).text
        assert "pt_aggregator_time_to_first_flag_seconds" in metrics and "pt_aggregator_overrides_total" in metrics
