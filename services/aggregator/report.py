"""What one study's result says, as the SR (`sr`) and the FHIR resources (`fhir`) both render it
(each flag's wording: `flags.REPORT_TEXT`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

DISCLAIMER = "Diagnostic aid — not a diagnosis. Every study must still be read by a qualified clinician."


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
