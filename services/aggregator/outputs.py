"""Results back out: a DICOM Basic Text SR per study (sent by C-STORE to PACS) and FHIR R4
DiagnosticReport + Observation JSON.

The SR belongs to the patient and study of the X-ray, so its patient/study modules are copied from
the stored DICOM header (PHI goes to PACS, the clinical system of record; never to logs or events).
Its SOP Instance UID is derived from the study UID and the result's revision, so a retried send
stores the same object again instead of a duplicate.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from services.aggregator.policy import HEALTHY, NOT_TRIAGED, PENDING, SUSPECTED, UNCERTAIN, URGENT

log = logging.getLogger(__name__)

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
DISCLAIMER = "Diagnostic aid — not a diagnosis. Every study must still be read by a qualified clinician."
CODE_SCHEME = "99PNEUMOTRIAGE"
FLAG_TEXT = {
    URGENT: "Urgent: pneumonia likely, high confidence",
    SUSPECTED: "Pneumonia suspected",
    UNCERTAIN: "Uncertain: radiologist first",
    HEALTHY: "Likely healthy (read routinely)",
    NOT_TRIAGED: "Not triaged",
    PENDING: "Pending",
}
PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
    "StudyDescription",
)


def path_of(storage_uri: str) -> Path | None:
    if not storage_uri:
        return None
    parsed = urlparse(storage_uri)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path))
    return None


def read_header(storage_uri: str) -> Dataset | None:
    """The stored image's header (no pixels), or None when it cannot be read."""
    from services.core.imaging import read_dicom

    path = path_of(storage_uri)
    if path is None or not path.is_file():
        return None
    try:
        return read_dicom(path, stop_before_pixels=True)
    except Exception:  # a missing or unreadable file must not break the result
        log.warning("cannot read stored header", extra={"error": "unreadable file"})
        return None


@dataclass(frozen=True)
class StudyReport:
    """What goes into the SR / FHIR resources for one study result."""

    study_uid: str
    flag: str
    p_pneumonia: float | None
    reason: str
    revision: int
    model_version: str
    human_judgments: int
    reviewed: bool
    updated_at: datetime
    sop_uids: tuple[str, ...] = ()


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def _text_item(code: Dataset, text: str, relationship: str = "CONTAINS") -> Dataset:
    item = Dataset()
    item.RelationshipType = relationship
    item.ValueType = "TEXT"
    item.ConceptNameCodeSequence = DicomSequence([code])
    item.TextValue = text[:1024]
    return item


def sr_uids(study_uid: str, revision: int) -> tuple[str, str]:
    """(series UID, SOP instance UID) of a study's SR revision: deterministic, so re-sends are idempotent."""
    series = generate_uid(entropy_srcs=[study_uid, "pneumotriage-sr-series"])
    sop = generate_uid(entropy_srcs=[study_uid, str(revision), "pneumotriage-sr"])
    return series, sop


def build_sr(report: StudyReport, header: Dataset | None) -> Dataset:
    """A Basic Text SR with the triage flag, score, reason, model version and the disclaimer."""
    series_uid, sop_uid = sr_uids(report.study_uid, report.revision)
    now = datetime.now(UTC)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = report.study_uid
    ds.SeriesInstanceUID = series_uid
    for kw in PATIENT_STUDY_KEYWORDS:  # patient + general study modules (type 2: present, may be empty)
        setattr(ds, kw, getattr(header, kw, "") if header is not None else "")
    ds.Modality = "SR"
    ds.SeriesNumber = 9901
    ds.SeriesDescription = "PneumoTriage result (diagnostic aid)"
    ds.InstanceNumber = report.revision
    ds.Manufacturer = "PneumoTriage"
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence([])
    ds.PerformedProcedureCodeSequence = DicomSequence([])
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    ds.CompletionFlag = "COMPLETE" if report.flag != PENDING else "PARTIAL"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.ConceptNameCodeSequence = DicomSequence([_code("18748-4", "LN", "Diagnostic imaging report")])
    score = "n/a" if report.p_pneumonia is None else f"{report.p_pneumonia:.3f}"
    items = [
        _text_item(_code("121071", "DCM", "Finding"), f"Triage flag: {report.flag} — {FLAG_TEXT[report.flag]}"),
        _text_item(_code("score", CODE_SCHEME, "P(pneumonia), fused model and crowd"), score),
        _text_item(_code("reason", CODE_SCHEME, "Reason"), report.reason),
        _text_item(
            _code("evidence", CODE_SCHEME, "Evidence"),
            f"model {report.model_version or 'none'}; {report.human_judgments} crowd judgments; "
            f"{'reviewed by a clinician' if report.reviewed else 'not reviewed'}; revision {report.revision}",
        ),
        _text_item(_code("121106", "DCM", "Comment"), DISCLAIMER),
    ]
    ds.ContentSequence = DicomSequence(items)
    return ds


@dataclass(frozen=True)
class Destination:
    host: str
    port: int
    ae_title: str

    @classmethod
    def parse(cls, value: str) -> Destination:
        """ "host:port:AE_TITLE"."""
        try:
            host, port, ae = value.rsplit(":", 2)
            return cls(host, int(port), ae)
        except ValueError as exc:
            raise ValueError(f"SR destination must be host:port:AE_TITLE, got {value!r}") from exc


def send_sr(ds: Dataset, dest: Destination, calling_ae: str = "PT_AGGREGATOR", timeout: float = 30.0) -> None:
    """C-STORE the SR (blocking; run it in a thread). Raises when the peer does not store it."""
    from pydicom.uid import ImplicitVRLittleEndian
    from pynetdicom import AE
    from pynetdicom.sop_class import BasicTextSRStorage  # type: ignore[attr-defined]

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(BasicTextSRStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        raise ConnectionError(f"association with {dest.ae_title}@{dest.host}:{dest.port} failed")
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    code = int(getattr(status, "Status", -1)) if status else -1
    if code not in (0x0000, 0xB000, 0xB007, 0xB006):
        raise RuntimeError(f"C-STORE of the SR failed with status 0x{code:04X}" if code >= 0 else "no C-STORE response")


# ---- FHIR R4 -----------------------------------------------------------------------------------

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
            "coding": [{"system": FLAG_SYSTEM, "code": report.flag, "display": FLAG_TEXT[report.flag]}],
            "text": FLAG_TEXT[report.flag],
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
        "conclusion": f"{FLAG_TEXT[report.flag]}. {DISCLAIMER}",
    }
