"""What one study's result says, as the SR (`sr`) and the FHIR resources (`fhir`) both render it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from services.aggregator.policy import HEALTHY, NOT_TRIAGED, PENDING, SUSPECTED, UNCERTAIN, URGENT

DISCLAIMER = "Diagnostic aid — not a diagnosis. Every study must still be read by a qualified clinician."
FLAG_TEXT = {
    URGENT: "Urgent: pneumonia likely, high confidence",
    SUSPECTED: "Pneumonia suspected",
    UNCERTAIN: "Uncertain: radiologist first",
    HEALTHY: "Likely healthy (read routinely)",
    NOT_TRIAGED: "Not triaged",
    PENDING: "Pending",
}


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
    retrospective: bool = False  # a backfill study: triaged during a catch-up, not while it was read
