"""Results back out as DICOM: a Basic Text SR per study, sent by C-STORE to PACS.

The SR belongs to the patient and study of the X-ray, so its patient/study modules are copied from
the stored DICOM header (PHI goes to PACS, the clinical system of record; never to logs or events).
Its SOP Instance UID is derived from the study UID and the result's revision, so a retried send
stores the same object again instead of a duplicate.

A study's SRs form one chain in one series: each revision names the SR it replaces (Predecessor
Documents Sequence) and the images it judged (Current Requested Procedure Evidence Sequence). The
sender freezes an SR's bytes when it leaves the settle hold (`encode_sr`) and every attempt sends
those bytes (`decode_sr`), so one SOP Instance UID never carries two contents.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from io import BytesIO

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from services.aggregator.flags import PENDING, REPORT_TEXT
from services.aggregator.report import DISCLAIMER, StudyReport

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
CODE_SCHEME = "99PNEUMOTRIAGE"
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


RETROSPECTIVE = (
    "Retrospective triage: this study arrived in a backlog (a catch-up or migration) and was triaged "
    "after the fact, behind the day's new studies; it was not available when the study was first read."
)


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


@dataclass(frozen=True)
class SopRef:
    """One referenced instance: its series, SOP class and SOP instance (the study is the SR's own)."""

    series_uid: str
    sop_class_uid: str
    sop_uid: str


def _hierarchical_refs(study_uid: str, refs: list[SopRef]) -> Dataset:
    """A Hierarchical SOP Instance Reference Macro item: study -> series -> SOP instances."""
    item = Dataset()
    item.StudyInstanceUID = study_uid
    series_items = []
    for series_uid in sorted({r.series_uid for r in refs}):
        series = Dataset()
        series.SeriesInstanceUID = series_uid
        sops = []
        for r in sorted((r for r in refs if r.series_uid == series_uid), key=lambda r: r.sop_uid):
            sop = Dataset()
            sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID = r.sop_class_uid, r.sop_uid
            sops.append(sop)
        series.ReferencedSOPSequence = DicomSequence(sops)
        series_items.append(series)
    item.ReferencedSeriesSequence = DicomSequence(series_items)
    return item


def build_sr(
    report: StudyReport,
    header: Dataset | None,
    *,
    predecessor_sop_uid: str = "",
    evidence: list[SopRef] | None = None,
    complete: bool | None = None,
    verified_by: str = "",
) -> Dataset:
    """A Basic Text SR with the triage flag, score, reason, model version and the disclaimer.

    `predecessor_sop_uid`: the study's previous SR, which this revision replaces (same series);
    `evidence`: the images judged; `complete`: False while images or votes are awaited (PARTIAL);
    `verified_by`: the clinician who confirmed or overruled the flag (VERIFIED), else UNVERIFIED.
    """
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
    if complete is None:
        complete = report.flag != PENDING
    ds.CompletionFlag = "COMPLETE" if complete and report.flag != PENDING else "PARTIAL"
    if verified_by:
        ds.VerificationFlag = "VERIFIED"
        observer = Dataset()
        observer.VerifyingObserverName = verified_by[:64]
        observer.VerifyingOrganization = "PneumoTriage clinician review"
        observer.VerificationDateTime = report.updated_at.astimezone(UTC).strftime("%Y%m%d%H%M%S")
        observer.VerifyingObserverIdentificationCodeSequence = DicomSequence([])
        ds.VerifyingObserverSequence = DicomSequence([observer])
    else:
        ds.VerificationFlag = "UNVERIFIED"
    if predecessor_sop_uid:
        ds.PredecessorDocumentsSequence = DicomSequence(
            [_hierarchical_refs(report.study_uid, [SopRef(series_uid, BASIC_TEXT_SR, predecessor_sop_uid)])]
        )
    if evidence:
        ds.CurrentRequestedProcedureEvidenceSequence = DicomSequence([_hierarchical_refs(report.study_uid, evidence)])
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.ConceptNameCodeSequence = DicomSequence([_code("18748-4", "LN", "Diagnostic imaging report")])
    score = "n/a" if report.p_pneumonia is None else f"{report.p_pneumonia:.3f}"
    items = [
        _text_item(_code("121071", "DCM", "Finding"), f"Triage flag: {report.flag} — {REPORT_TEXT[report.flag]}"),
        _text_item(_code("score", CODE_SCHEME, "P(pneumonia), fused model and crowd"), score),
        _text_item(_code("reason", CODE_SCHEME, "Reason"), report.reason),
        _text_item(
            _code("evidence", CODE_SCHEME, "Evidence"),
            f"model {report.model_version or 'none'}; {report.human_judgments} crowd judgments; "
            f"{'reviewed by a clinician' if report.reviewed else 'not reviewed'}; revision {report.revision}",
        ),
        _text_item(_code("121106", "DCM", "Comment"), DISCLAIMER),
    ]
    if report.retrospective:
        items.append(_text_item(_code("121106", "DCM", "Comment"), RETROSPECTIVE))
    ds.ContentSequence = DicomSequence(items)
    return ds


def encode_sr(ds: Dataset) -> bytes:
    """The SR as DICOM Part 10 bytes: frozen when queued, sent as is by every attempt."""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def decode_sr(data: bytes) -> Dataset:
    return pydicom.dcmread(BytesIO(data))


@dataclass(frozen=True)
class Destination:
    """A PACS (or any Storage SCP) the SRs go to. `name` keys its queue of SRs (aggregator_sr_sends):
    when the PACS moves to another host or port under the same name, what was waiting for it follows."""

    host: str
    port: int
    ae_title: str
    name: str = ""

    @property
    def key(self) -> str:
        return self.name or self.ae_title

    @property
    def label(self) -> str:
        """The metric / log label: AE@host:port."""
        return f"{self.ae_title}@{self.host}:{self.port}"

    @classmethod
    def parse(cls, value: str) -> Destination:
        """ "[NAME=]host:port:AE_TITLE" (the name defaults to the AE title)."""
        name, _, address = value.strip().rpartition("=")
        try:
            host, port, ae = address.rsplit(":", 2)
            if not host or not ae:
                raise ValueError(value)
            return cls(host, int(port), ae, name.strip())
        except ValueError as exc:
            raise ValueError(f"SR destination must be [NAME=]host:port:AE_TITLE, got {value!r}") from exc

    @classmethod
    def parse_list(cls, value: str | None) -> list[Destination]:
        """Comma-separated destinations; each name (or AE title) must be unique."""
        destinations = [cls.parse(part) for part in (value or "").split(",") if part.strip()]
        keys = [d.key for d in destinations]
        if len(set(keys)) != len(keys):
            raise ValueError(f"SR destinations need distinct names (NAME=host:port:AE), got {value!r}")
        return destinations


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
