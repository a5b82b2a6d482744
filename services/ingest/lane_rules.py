"""Which lane an accepted image takes (issue 24; services/core/lanes.py for what lanes do).

In order, the first rule that applies decides:
1. lanes off (PT_INGEST_LANES=false): fresh — every image first-in first-out, as before lanes;
2. the calling AE is one of PT_INGEST_BACKFILL_AES (a migration or archive AE): backfill, whatever
   the request says;
3. the C-STORE request's Priority (0000,0700) is HIGH (0x0001): fresh;
4. the image's acquisition date-time (AcquisitionDateTime, else AcquisitionDate/Time, ContentDate/
   Time, SeriesDate/Time, StudyDate/Time) is older than PT_INGEST_BACKFILL_AGE_H hours: backfill;
5. otherwise (recent, or no usable date): fresh — a child who may be waiting is never put behind a
   backlog because a header is missing.
DICOM dates carry no time zone: they are read as this machine's local time (an error of a few
hours against a window of a day).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from services.core.lanes import BACKFILL, FRESH
from services.ingest.config import IngestSettings

PRIORITY_HIGH = 0x0001
PRIORITY_NAMES = {0x0000: "MEDIUM", 0x0001: "HIGH", 0x0002: "LOW"}


def parse_dicom_datetime(date: str, time: str = "") -> datetime | None:
    """'20260103' + '142530.123' -> a naive local datetime; None when the date is unusable."""
    date = (date or "").strip()
    if len(date) < 8 or not date[:8].isdigit():
        return None
    digits = "".join(ch for ch in (time or "").strip().split(".")[0] if ch.isdigit())[:6]
    digits = (digits + "000000")[:6] if digits else "000000"
    try:
        return datetime.strptime(date[:8] + digits, "%Y%m%d%H%M%S")
    except ValueError:
        return None


def acquired_at(values: dict[str, str]) -> tuple[datetime | None, str]:
    """The image's acquisition moment from its header values (by keyword), and which one it was."""
    dt = (values.get("AcquisitionDateTime") or "").strip()
    if dt:
        parsed = parse_dicom_datetime(dt[:8], dt[8:].split("+")[0].split("-")[0])
        if parsed is not None:
            return parsed, "acquisition"
    for prefix, name in (
        ("Acquisition", "acquisition"),
        ("Content", "content"),
        ("Series", "series"),
        ("Study", "study"),
    ):
        parsed = parse_dicom_datetime(values.get(f"{prefix}Date", ""), values.get(f"{prefix}Time", ""))
        if parsed is not None:
            return parsed, name
    return None, ""


def classify(
    settings: IngestSettings,
    calling_ae: str,
    priority: int,
    acquired: datetime | None,
    source: str = "acquisition",
    now: datetime | None = None,
) -> tuple[str, str]:
    """(lane, reason) for one accepted image."""
    if not settings.lanes:
        return FRESH, "lanes off"
    if calling_ae.strip().upper() in settings.backfill_ae_set:
        return BACKFILL, f"calling AE {calling_ae.strip()} is a backfill AE"
    if priority == PRIORITY_HIGH:
        return FRESH, "priority HIGH"
    if acquired is not None:
        now = now or datetime.now()
        age = now - acquired
        if age > timedelta(hours=settings.backfill_age_h):
            return BACKFILL, f"{source} date {acquired:%Y-%m-%d %H:%M} older than {settings.backfill_age_h:g} h"
        return FRESH, f"{source} date within {settings.backfill_age_h:g} h"
    return FRESH, "no acquisition date"
