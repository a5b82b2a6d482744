"""Triage flags: the one registry. Everything a flag is, in one row of `REGISTRY`; every consumer
derives what it needs from here instead of spelling the flags out again:

* the policy (`policy.py`): the names it returns, `URGENCY` (a study takes its most urgent image's
  flag) and `SEVERITY` (the clinical order the monotonicity tests check);
* the store (`triage_store.py`): the value written to `aggregator_studies.flag` (the name), the
  worklist order written to `aggregator_studies.urgency`, the `TriageUpdated.flag` enum (`PROTO`),
  the flags a clinician may overrule to (`FLAGS`), the label a clinician's review exports (`MEANS`),
  which SR revisions are not held for the settle time (`SR_AT_ONCE`, also sent first by
  `service.py`);
* the report: the SR finding's text and the FHIR Observation's display (`REPORT_TEXT`);
* the worklist: the filter's choices and labels (`FLAGS`, `LABELS`), its order (`urgency` column)
  and the badge colours (`css()`, served as `/flags.css` next to `/static/app.css`);
* offline fitting (`tools/calibrate.py`, `tools/recalibrate.py`): which flags are scored as a test for
  pneumonia or for health (`MEANS`).

PENDING is in the registry too (a worklist row, a label, a colour, the last place in the order) but
is not a flag: never published (`FLAG_UNSPECIFIED`), never chosen by a clinician.

To add a flag: a row here, its value in `enum Flag` of `proto/pneumotriage/v1/events.proto` (then
`pneumotriage contracts generate`), the policy rule that emits it if the policy is to set it (a flag
only a clinician sets needs none), tests and docs (docs/architecture.md, "Triage flags").
`tests/unit/test_aggregator_flags.py` fails while any consumer disagrees with this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from services.core.contracts import Flag

URGENT = "URGENT"
SUSPECTED = "PNEUMONIA_SUSPECTED"
UNCERTAIN = "UNCERTAIN"
NOT_TRIAGED = "NOT_TRIAGED"
HEALTHY = "LIKELY_HEALTHY"
PENDING = "PENDING"  # no evidence yet: not a flag, never published


@dataclass(frozen=True)
class FlagSpec:
    """One triage flag (or the PENDING state): all that the aggregator's parts need to know of it."""

    name: str  # the stored value (aggregator_studies.flag), the API's and FHIR's code, the CSS class flag-<name>
    label: str  # the worklist's short label
    text: str  # the SR finding and the FHIR display: "Triage flag: <name> — <text>"
    proto: str  # its value in pneumotriage.v1.Flag
    urgency: int  # worklist order, smaller first (stored in aggregator_studies.urgency: never renumber)
    background: str  # badge colours
    color: str
    # Clinical order of the triaged flags (higher = more pneumonia): more evidence never lowers it.
    # None: off that scale (NOT_TRIAGED: the model may not judge the image; PENDING).
    severity: int | None = None
    # What the flag asserts about the image: a clinician's confirm/overrule to it is exported as
    # that label, and calibration scores the flag as a test for it. None: no label (cant_tell).
    means: Literal["pneumonia", "healthy"] | None = None
    sr_at_once: bool = False  # its SR revision is not held for the settle time and goes out first
    is_flag: bool = True  # False: PENDING (never published, not a clinician's choice)


REGISTRY: tuple[FlagSpec, ...] = (
    FlagSpec(
        URGENT,
        label="Urgent",
        text="Urgent: pneumonia likely, high confidence",
        proto="FLAG_URGENT",
        urgency=0,
        background="#b00020",
        color="#fff",
        severity=3,
        means="pneumonia",
        sr_at_once=True,
    ),
    FlagSpec(
        SUSPECTED,
        label="Pneumonia suspected",
        text="Pneumonia suspected",
        proto="FLAG_PNEUMONIA_SUSPECTED",
        urgency=1,
        background="#e07000",
        color="#fff",
        severity=2,
        means="pneumonia",
    ),
    FlagSpec(
        UNCERTAIN,
        label="Uncertain",
        text="Uncertain: radiologist first",
        proto="FLAG_UNCERTAIN",
        urgency=2,
        background="#6a3fb5",
        color="#fff",
        severity=1,
    ),
    FlagSpec(
        NOT_TRIAGED,
        label="Not triaged",
        text="Not triaged",
        proto="FLAG_NOT_TRIAGED",
        urgency=3,
        background="#666",
        color="#fff",
    ),
    FlagSpec(
        HEALTHY,
        label="Likely healthy",
        text="Likely healthy (read routinely)",
        proto="FLAG_LIKELY_HEALTHY",
        urgency=4,
        background="#1d7a3a",
        color="#fff",
        severity=0,
        means="healthy",
    ),
    FlagSpec(
        PENDING,
        label="Awaiting evidence",
        text="Pending",
        proto="FLAG_UNSPECIFIED",
        urgency=5,
        background="#ccc",
        color="#222",
        is_flag=False,
    ),
)

SPECS: dict[str, FlagSpec] = {f.name: f for f in REGISTRY}
# The flags, most urgent first (the worklist filter's order, the clinician's overrule choices).
FLAGS: tuple[str, ...] = tuple(f.name for f in sorted(REGISTRY, key=lambda f: f.urgency) if f.is_flag)
URGENCY: dict[str, int] = {f.name: f.urgency for f in REGISTRY}
SEVERITY: dict[str, int] = {f.name: f.severity for f in REGISTRY if f.severity is not None}
LABELS: dict[str, str] = {f.name: f.label for f in REGISTRY}
REPORT_TEXT: dict[str, str] = {f.name: f.text for f in REGISTRY}
PROTO: dict[str, int] = {f.name: Flag.Value(f.proto) for f in REGISTRY}
MEANS: dict[str, str] = {f.name: f.means for f in REGISTRY if f.means is not None}
SR_AT_ONCE: frozenset[str] = frozenset(f.name for f in REGISTRY if f.sr_at_once)


def css() -> str:
    """The badge colour rules, one per registry row (served as /flags.css beside /static/app.css)."""
    return "".join(f".badge.flag-{f.name} {{ background: {f.background}; color: {f.color}; }}\n" for f in REGISTRY)
