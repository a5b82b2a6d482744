"""Results back out as FHIR R4: a DiagnosticReport with a contained Patient and two Observations
(the triage flag and P(pneumonia)), served by the worklist's API."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

from pydicom.dataset import Dataset

from services.aggregator.flags import PENDING, REPORT_TEXT
from services.aggregator.report import DISCLAIMER, StudyReport

FLAG_SYSTEM = "urn:pneumotriage:triage-flag"


def _iso(dt: datetime) -> str:
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).isoformat(timespec="seconds")


def fhir_diagnostic_report(report: StudyReport, header: Dataset | None) -> dict[str, Any]:
    """A FHIR R4 DiagnosticReport with contained Patient and two Observations (flag, score)."""
    status = "final" if report.reviewed else "preliminary"
    if report.flag == PENDING:
        status = "registered"
    patient: dict[str, Any] = {"resourceType": "Patient", "id": "patient"}
    if header is not None and str(getattr(header, "PatientID", "")):
        patient["identifier"] = [{"value": str(header.PatientID)}]
    if header is not None and str(getattr(header, "PatientName", "")):
        patient["name"] = [{"text": str(header.PatientName).replace("^", " ").strip()}]
    subject = {"reference": "#patient"}
    category = [
        {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "imaging"}]}
    ]
    flag_obs: dict[str, Any] = {
        "resourceType": "Observation",
        "id": "flag",
        "status": status,
        "category": category,
        "code": {
            "coding": [{"system": "urn:pneumotriage:codes", "code": "triage-flag"}],
            "text": "Pneumonia triage flag",
        },
        "subject": subject,
        "effectiveDateTime": _iso(report.updated_at),
        "valueCodeableConcept": {
            "coding": [{"system": FLAG_SYSTEM, "code": report.flag, "display": REPORT_TEXT[report.flag]}],
            "text": REPORT_TEXT[report.flag],
        },
        "note": [{"text": report.reason}],
    }
    results = [{"reference": "#flag"}]
    contained: list[dict[str, Any]] = [patient, flag_obs]
    if report.p_pneumonia is not None:
        contained.append(
            {
                "resourceType": "Observation",
                "id": "score",
                "status": status,
                "category": category,
                "code": {
                    "coding": [{"system": "urn:pneumotriage:codes", "code": "p-pneumonia"}],
                    "text": "Probability of pneumonia (model and crowd, fused)",
                },
                "subject": subject,
                "effectiveDateTime": _iso(report.updated_at),
                "valueQuantity": {
                    "value": round(report.p_pneumonia, 4),
                    "unit": "probability",
                    "system": "http://unitsofmeasure.org",
                    "code": "1",
                },
            }
        )
        results.append({"reference": "#score"})
    rid = hashlib.sha256(f"{report.study_uid}:{report.revision}".encode()).hexdigest()[:32]
    return {
        "resourceType": "DiagnosticReport",
        "id": rid,
        "contained": contained,
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{report.study_uid}"}],
        "status": status,
        "category": [
            {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD", "display": "Radiology"}
                ]
            }
        ],
        "code": {
            "coding": [{"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}],
            "text": "Chest X-ray pneumonia triage (diagnostic aid — not a diagnosis)",
        },
        "subject": subject,
        "effectiveDateTime": _iso(report.updated_at),
        "issued": _iso(datetime.now(UTC)),
        "imagingStudy": [{"identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{report.study_uid}"}}],
        "result": results,
        "conclusion": f"{REPORT_TEXT[report.flag]}. {DISCLAIMER}",
    }
